//! The backends compiled into this binary, and running generic code on one.
//!
//! This is the only place in the workspace that names a concrete backend.

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;

#[cfg(not(any(feature = "cpu", feature = "cuda", feature = "wgpu")))]
compile_error!("enable at least one backend feature of diffusion-cli: cpu, cuda or wgpu");

/// A backend this binary was built with (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// NVIDIA GPUs through CUDA (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda,
    /// Any GPU through wgpu: Vulkan, Metal, DX12 (feature `wgpu`).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// burn's Flex CPU backend: pure Rust, SIMD, all cores (feature `cpu`).
    #[cfg(feature = "cpu")]
    Cpu,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => "cuda",
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => "wgpu",
            #[cfg(feature = "cpu")]
            BackendKind::Cpu => "cpu",
        }
    }

    /// Whether this is the CPU backend.
    pub fn is_cpu(self) -> bool {
        self.name() == "cpu"
    }

    /// On the CPU backend, the vector instructions of this project's
    /// kernels and of gemm's matrix products ("avx512", "avx2" or
    /// "baseline"): what `DIFFUSION_SIMD` and the `avx512-gemm` feature
    /// left of the CPU's. `None` on the GPU backends.
    pub fn cpu_simd(self) -> Option<CpuSimd> {
        #[cfg(feature = "cpu")]
        if self.is_cpu() {
            use diffusion_flex_kernels::SimdLevel;
            let name = |level| match level {
                SimdLevel::Avx512 => "avx512",
                SimdLevel::Avx2 => "avx2",
                SimdLevel::Baseline => "baseline",
            };
            return Some(CpuSimd {
                kernels: name(diffusion_flex_kernels::simd_level()),
                gemm: name(diffusion_flex_kernels::gemm_simd_level()),
            });
        }
        None
    }

    /// `--backend` if given; else, among the compiled backends, cuda when
    /// an NVIDIA driver is present, then wgpu, then cpu. Says which.
    pub fn resolve(flag: Option<BackendKind>) -> BackendKind {
        if let Some(b) = flag {
            return b;
        }
        let compiled: Vec<BackendKind> = <BackendKind as clap::ValueEnum>::value_variants().to_vec();
        let nvidia = std::path::Path::new("/dev/nvidiactl").exists();
        let pick = compiled
            .iter()
            .copied()
            .find(|b| b.name() != "cuda" || nvidia)
            .unwrap_or(compiled[0]);
        let names: Vec<&str> = compiled.iter().map(|b| b.name()).collect();
        eprintln!(
            "diffusion: no --backend given; using {} (compiled in: {})",
            pick.name(),
            names.join(", ")
        );
        pick
    }
}

/// The vector instructions the CPU backend runs with ([`BackendKind::cpu_simd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CpuSimd {
    /// This project's kernels (`diffusion-flex-kernels`).
    pub kernels: &'static str,
    /// gemm's matrix products.
    pub gemm: &'static str,
}

/// Work that runs on any autodiff backend (inference code uses
/// `B::InnerBackend`).
pub trait Task {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;

    /// Devices the task asks for (data-parallel training: `--devices`).
    fn devices(&self) -> usize {
        1
    }

    /// Runs on `devices` (as many as [`Task::devices`]); the default runs
    /// on the first.
    fn run_on<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output>
    where
        Self: Sized,
    {
        let first = devices.into_iter().next().expect("at least one device");
        self.run::<B>(first)
    }
}

/// Runs `task` on the chosen backend: its default device, or devices
/// 0..N−1 when the task asks for N (`cuda:i`, the i-th wgpu GPU, or N
/// replicas of the CPU).
pub fn dispatch<T: Task>(kind: BackendKind, task: T) -> Result<T::Output> {
    let n = task.devices().max(1);
    match kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let devices = if n == 1 {
                vec![burn_cuda::CudaDevice::default()]
            } else {
                (0..n).map(burn_cuda::CudaDevice::new).collect()
            };
            task.run_on::<Autodiff<burn_cuda::Cuda>>(devices)
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            wgpu_adapter::check(n)?;
            let devices = if n == 1 {
                vec![burn_wgpu::WgpuDevice::default()]
            } else {
                (0..n).map(burn_wgpu::WgpuDevice::DiscreteGpu).collect()
            };
            task.run_on::<Autodiff<burn_wgpu::Wgpu>>(devices)
        }
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => {
            // This thread drives the model: as thread 0 of the kernels'
            // pool it runs a share of each parallel loop itself.
            diffusion_flex_kernels::join_global_pool();
            diffusion_flex_kernels::install_for_unet();
            diffusion_flex_kernels::install_for_training();
            task.run_on::<Autodiff<burn::backend::Flex>>(vec![Default::default(); n])
        }
    }
}

/// What wgpu will run on, asked before burn opens a device: burn panics
/// when no adapter exists, and a software driver (Mesa's lavapipe) is
/// correct but slow, which a user should hear once.
#[cfg(feature = "wgpu")]
mod wgpu_adapter {
    use anyhow::{bail, Result};
    use burn_wgpu::graphics::{AutoGraphicsApi, GraphicsApi};

    /// Fails with one line when wgpu has no adapter, or fewer GPUs than
    /// `devices`; says once when the default adapter is a CPU (software)
    /// one.
    pub fn check(devices: usize) -> Result<()> {
        let api = AutoGraphicsApi::backend();
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: api.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters: Vec<wgpu::AdapterInfo> = block_on(instance.enumerate_adapters(api.into()))
            .iter()
            .map(|a| a.get_info())
            .collect();
        if adapters.is_empty() {
            bail!(
                "--backend wgpu: no {api:?} adapter found; install your GPU's {api:?} driver \
                 (or Mesa's software one, Debian package mesa-vulkan-drivers: slow), or use --backend cpu"
            );
        }
        let gpus = adapters
            .iter()
            .filter(|a| a.device_type == wgpu::DeviceType::DiscreteGpu)
            .count();
        if devices > 1 && gpus < devices {
            bail!(
                "--devices {devices} with --backend wgpu needs {devices} discrete GPUs; wgpu sees {gpus} ({})",
                names(&adapters)
            );
        }
        // burn's default device is the adapter wgpu prefers for high
        // performance, unless CUBECL_WGPU_DEFAULT_DEVICE names another.
        let forced_cpu = std::env::var("CUBECL_WGPU_DEFAULT_DEVICE").is_ok_and(|v| v == "Cpu");
        let software = forced_cpu
            || (devices == 1
                && block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                }))
                .is_ok_and(|a| a.get_info().device_type == wgpu::DeviceType::Cpu));
        if software {
            let name = adapters
                .iter()
                .find(|a| a.device_type == wgpu::DeviceType::Cpu)
                .map_or("a CPU adapter", |a| a.name.as_str());
            eprintln!(
                "note: wgpu runs on a software {api:?} driver ({name}): correct but slow, and its \
                 first steps compile kernels for minutes. For a GPU, install its {api:?} driver \
                 (wgpu sees: {}); for speed on this machine, use --backend cpu.",
                names(&adapters)
            );
        }
        Ok(())
    }

    fn names(adapters: &[wgpu::AdapterInfo]) -> String {
        adapters
            .iter()
            .map(|a| format!("{} ({:?})", a.name, a.device_type))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Runs a future of wgpu's native API, which completes without waiting
    /// on anything outside it.
    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(value) = future.as_mut().poll(&mut cx) {
                return value;
            }
            std::thread::yield_now();
        }
    }
}

/// The CPU's threads (`RAYON_NUM_THREADS` if set, as for the kernels).
pub fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads that draw sampling batches at once: the CPU's on the CPU
/// backend (the single-threaded stretches between parallel kernels then
/// overlap), 1 on a GPU.
pub fn sampling_threads(cpu: bool) -> usize {
    if cpu {
        cpu_threads()
    } else {
        1
    }
}
