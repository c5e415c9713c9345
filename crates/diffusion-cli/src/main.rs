//! `diffusion`: train and sample class-conditional diffusion models.
//!
//! Usually run through `cargo xtask train|sample`, which builds this binary
//! with the right backend feature. Errors are printed as one line and give
//! a non-zero exit status.

/// `println!` that ignores a closed stdout (`diffusion ... | head`): files
/// are written whatever happens to the terminal, and a reader that went
/// away is not an error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod backend;
mod bench;
mod checkpoint;
mod config;
mod data;
mod eval;
mod fsutil;
#[cfg(test)]
mod fuzz;
mod interop;
mod judge;
mod npy;
mod plot;
mod progress;
mod sample;
mod train;

use clap::{Parser, Subcommand};

/// Train and sample class-conditional diffusion models (MNIST by default)
/// on cuda, wgpu or the CPU.
#[derive(Debug, Parser)]
#[command(name = "diffusion", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model and write a run directory (config, checkpoints,
    /// metrics, a sample grid per epoch).
    Train(train::TrainArgs),
    /// Distil a run into a student that samples in fewer steps
    /// (progressive distillation: one student step learns two guided
    /// teacher steps); writes a run directory like `train`.
    Distill(train::DistillArgs),
    /// Draw samples from a trained run: a PNG grid, optionally a GIF of the
    /// reverse process and a .npy of the samples.
    Sample(sample::SampleArgs),
    /// Measure sample quality: conditional accuracy and Fréchet distance,
    /// judged by the project's MNIST classifier.
    Eval(eval::EvalArgs),
    /// Train the MNIST classifier that `eval` uses as its judge.
    Classifier(judge::ClassifierArgs),
    /// Load weights of the PyTorch reference (.pt state_dict or
    /// safetensors) into a new run directory.
    Import(interop::ImportArgs),
    /// Write a run's weights as safetensors with the reference's names.
    Export(interop::ExportArgs),
    /// Time training and sampling of the reference U-Net (img/s, seconds).
    Bench(bench::BenchArgs),
    /// Fetch a data set (MNIST or Fashion-MNIST) from its canonical mirrors.
    Download(data::DownloadArgs),
}

/// Keeps freed memory in the process. glibc gives every block above
/// 32 MiB back to the OS when it is freed (mmap/munmap) and trims the heap,
/// so each CPU training step page-faults its hundreds of MiB of activations
/// and attention scores in again, zeroed by the kernel: measured 25–30% of a
/// step here (`diffusion bench`: 22.6 → 28.1 img/s at batch 32). Memory
/// stays at the peak a run needs, which it reaches every step anyway.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

/// Mesa's Vulkan device-select layer connects to a Wayland display to
/// order the GPUs, and where there is none (a server, CI) prints "error:
/// XDG_RUNTIME_DIR is invalid" twice, which is no error of ours. Without a
/// display session it has nothing to choose by, so it is turned off.
#[cfg(feature = "wgpu")]
fn quiet_vulkan_device_select() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() && std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY (edition 2021: a safe call): no other thread exists yet.
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

fn main() {
    keep_freed_memory();
    #[cfg(feature = "wgpu")]
    quiet_vulkan_device_select();
    // A panic inside a library (a device that cannot start, say) becomes one
    // line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        let msg = msg.lines().next().unwrap_or(msg);
        // burn's collective engine panics in its network tasks (tokio
        // workers) when a peer goes away; the training thread then reports
        // the lost peer as one clear error, so these stay quiet.
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("tokio"))
        {
            return;
        }
        eprintln!("error: internal failure: {msg}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(args, None),
        Command::Distill(args) => train::distill(args),
        Command::Sample(args) => sample::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Classifier(args) => judge::train(args),
        Command::Import(args) => interop::import(args),
        Command::Export(args) => interop::export(args),
        Command::Bench(args) => bench::run(args),
        Command::Download(args) => data::download(args),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {text}");
            1
        }
    };
    std::process::exit(code);
}
