//! `cargo xtask`: builds the `diffusion` CLI with the right backend feature
//! and runs it, so that nobody types feature flags.
//!
//! ```text
//! cargo xtask train  [--backend cuda|wgpu|cpu] [flags of `diffusion train`]
//! cargo xtask sample [--backend ..] --checkpoint RUN_DIR [flags of `diffusion sample`]
//! cargo xtask <any other diffusion subcommand> [--backend ..] [flags]
//! cargo xtask help
//! ```
//!
//! Without `--backend`, xtask picks what the machine has: cuda when an
//! NVIDIA driver is present, else wgpu when a hardware Vulkan driver is
//! installed, else cpu; and it says which.

mod backend;

use std::process::{exit, Command};

use backend::Backend;

const USAGE: &str = "\
usage: cargo xtask <command> [--backend cuda|wgpu|cpu] [flags...]

commands (each builds the `diffusion` CLI in release with the backend's
feature and runs the subcommand of the same name; `--help` after a command
lists its flags):
  train       train a model              (cargo xtask train --preset quick)
  sample      draw samples from a run    (cargo xtask sample --checkpoint runs/quick)
  eval        sample-quality numbers     (cargo xtask eval --checkpoint runs/quick)
  classifier  retrain eval's MNIST judge (data/classifier)
  bench       training and sampling speed of the reference U-Net
  import      PyTorch reference weights into a run (--pt model.pt --out RUN_DIR)
  export      a run's weights as safetensors with the reference's names
  download    fetch MNIST or Fashion-MNIST
  help        this text";

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first().cloned() else {
        eprintln!("{USAGE}");
        exit(2);
    };
    if matches!(command.as_str(), "help" | "--help" | "-h") {
        println!("{USAGE}");
        return;
    }
    args.remove(0);
    let backend = match take_flag(&mut args, "--backend") {
        Ok(Some(name)) => match name.parse::<Backend>() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: --backend {name}: {e}");
                exit(2);
            }
        },
        Ok(None) => {
            let (b, why) = Backend::detect();
            eprintln!("xtask: no --backend given; using {b} ({why})");
            b
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit(2);
        }
    };
    exit(run_cli(backend, &command, &args));
}

/// Removes `--name VALUE` or `--name=VALUE` from `args` and returns VALUE.
fn take_flag(args: &mut Vec<String>, name: &str) -> Result<Option<String>, String> {
    let prefix = format!("{name}=");
    if let Some(i) = args.iter().position(|a| a == name) {
        if i + 1 >= args.len() {
            return Err(format!("{name} needs a value (cuda, wgpu or cpu)"));
        }
        let value = args.remove(i + 1);
        args.remove(i);
        return Ok(Some(value));
    }
    if let Some(i) = args.iter().position(|a| a.starts_with(&prefix)) {
        let value = args.remove(i)[prefix.len()..].to_string();
        return Ok(Some(value));
    }
    Ok(None)
}

/// Where cargo puts the release binary.
fn release_binary() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target
        .join("release")
        .join(format!("diffusion{}", std::env::consts::EXE_SUFFIX))
}

/// `cargo build --release -p diffusion-cli --features <backend>` with
/// cargo's own progress, then `cargo run` of the same (already built, so
/// silent): `-- <command> --backend <backend> <args>`.
fn run_cli(backend: Backend, command: &str, args: &[String]) -> i32 {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !release_binary().exists() {
        eprintln!(
            "xtask: first build of the `diffusion` binary (release, feature {}): it compiles burn, \
             which takes several minutes (about 5 to 15 on 2 cores); cargo's progress follows. \
             Later runs start at once.",
            backend.feature()
        );
    }
    let built = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--package",
            "diffusion-cli",
            "--features",
            backend.feature(),
        ])
        .status();
    match built {
        Ok(s) if s.success() => {}
        Ok(s) => return s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("error: could not run cargo: {e}");
            return 1;
        }
    }
    let status = Command::new(cargo)
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "diffusion-cli",
            "--features",
            backend.feature(),
            "--",
        ])
        .arg(command)
        .args(["--backend", backend.name()])
        .args(args)
        .status();
    match status {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("error: could not run cargo: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn backend_flag_is_taken_out_of_the_arguments() {
        let mut args = strings(&["--epochs", "2", "--backend", "cpu", "--seed", "1"]);
        assert_eq!(take_flag(&mut args, "--backend").unwrap(), Some("cpu".into()));
        assert_eq!(args, strings(&["--epochs", "2", "--seed", "1"]));
        let mut args = strings(&["--backend=wgpu"]);
        assert_eq!(take_flag(&mut args, "--backend").unwrap(), Some("wgpu".into()));
        assert!(args.is_empty());
        let mut args = strings(&["--backend"]);
        assert!(take_flag(&mut args, "--backend").is_err());
        let mut args = strings(&["--seed", "3"]);
        assert_eq!(take_flag(&mut args, "--backend").unwrap(), None);
    }
}
