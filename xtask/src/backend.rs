//! Which backend to build the CLI with.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cuda,
    Wgpu,
    Cpu,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
            Backend::Cpu => "cpu",
        }
    }

    /// The `diffusion-cli` Cargo feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        self.name()
    }

    /// cuda if an NVIDIA driver is present; else wgpu if a hardware Vulkan
    /// driver is installed (Mesa's lavapipe, a CPU emulation, does not
    /// count: the cpu backend is much faster than it); else cpu.
    pub fn detect() -> (Backend, String) {
        if Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia/version").exists() {
            return (Backend::Cuda, "an NVIDIA driver is present".into());
        }
        if let Some(icd) = hardware_vulkan_icd() {
            return (Backend::Wgpu, format!("Vulkan driver {icd}"));
        }
        (
            Backend::Cpu,
            "no NVIDIA driver and no hardware Vulkan driver found".into(),
        )
    }
}

/// The first Vulkan ICD manifest that is not a software rasteriser.
fn hardware_vulkan_icd() -> Option<String> {
    let dirs = [
        "/usr/share/vulkan/icd.d",
        "/etc/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
    ];
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let software = name.contains("lvp") || name.contains("swiftshader") || name.contains("lavapipe");
            if name.ends_with(".json") && !software {
                return Some(name);
            }
        }
    }
    None
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cuda" => Ok(Backend::Cuda),
            "wgpu" => Ok(Backend::Wgpu),
            "cpu" => Ok(Backend::Cpu),
            other => Err(format!("unknown backend `{other}`; use cuda, wgpu or cpu")),
        }
    }
}
