//! Trains the tiny U-Net on 2 CPU replicas in step (what `diffusion train
//! --devices 2` does), with the library crates alone. Kill it at any time
//! and run it again: it resumes from the last checkpoint, bit for bit.
//!
//!     cargo run --release -p diffusion-train --example replicas -- RUN_DIR [IDX_DIR]
use std::path::Path;
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use diffusion_core::NoiseSchedule;
use diffusion_data::{load_split, BatchLoader, Split};
use diffusion_model::UNetConfig;
use diffusion_train::distributed::Cluster;
use diffusion_train::{Fit, FitConfig, LogEvent, OnLog, Trainer, TrainerConfig};

type B = Autodiff<Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let run_dir = args.next().ok_or("usage: replicas RUN_DIR [IDX_DIR]")?;
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/mnist");
    train(&run_dir, Path::new(&args.next().unwrap_or(mnist.into())))
}

/// Trains (or resumes) the run in `run_dir` on the MNIST files in `data`.
pub fn train(run_dir: &str, data: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // 512 images in global batches of 32 (16 per replica), 4 epochs.
    let images = Arc::new(load_split(data, Split::Train)?.truncated(512));
    let loader = BatchLoader::new(images, 32, 1, 1);
    let total = loader.batches_per_epoch() as u64 * 4;
    let fit = Fit::new(
        run_dir,
        FitConfig::new(4).with_log_every(8).with_checkpoint_every(8),
    );
    let devices = vec![Default::default(); 2];
    let mut trainers = Vec::new();
    for device in &devices {
        let unet = UNetConfig::tiny().init_seeded::<B>(device, 1)?;
        let mut config = TrainerConfig::new(total);
        (config.lr, config.seed) = (2e-3, 1);
        let mut trainer = Trainer::new(unet, &NoiseSchedule::reference(), config, device);
        println!("{:?}", fit.open(&mut trainer)?); // Fresh, Resumed(state) or Finished(state)
        trainers.push(trainer);
    }
    let cluster = Cluster::local(2);
    let recipe = b"tiny U-Net, 512 MNIST images, batch 32, seed 1";
    let mut log = OnLog(|l: &LogEvent| println!("step {:3}  loss {:.4}", l.step, l.loss));
    let out = fit.run_cluster(&cluster, &mut trainers, &devices, &loader, recipe, &mut log)?;
    println!(
        "{:?} at step {}, checkpoints in {run_dir}",
        out.stop, out.state.step
    );
    Ok(())
}
