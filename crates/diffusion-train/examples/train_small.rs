//! Trains a small class-conditional U-Net on Fashion-MNIST for a few hundred
//! steps with the library crates only (checkpoints in `fashion-run/`; run it
//! again to continue), then samples a PNG grid.
//!
//!     cargo run --release -p diffusion-train --example train_small -- [IDX_DIR] [STEPS]
//!
//! IDX_DIR defaults to `diffusion_data::default_dir(FashionMnist)`
//! ($DIFFUSION_DATA_DIR/fashion-mnist or ~/.cache/diffusion-rs/fashion-mnist),
//! downloaded there when missing.
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor};
use diffusion_core::{
    sample, Guided, NoiseSchedule, NoiseSource, Objective, SamplerConfig, SamplerKind, SeededNoise,
};
use diffusion_data::{
    canonical_mirrors, default_dir, download, is_present, load_split, BatchLoader, DatasetName, Split,
};
use diffusion_model::UNetConfig;
use diffusion_train::{Fit, FitConfig, LogEvent, LrSchedule, OnLog, Trainer, TrainerConfig};

type B = Autodiff<Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(Into::into)
        .unwrap_or_else(|| default_dir(DatasetName::FashionMnist));
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(300);
    if !is_present(&dir) {
        download(
            DatasetName::FashionMnist,
            &dir,
            &canonical_mirrors(DatasetName::FashionMnist),
            &mut |_| {},
        )?;
    }
    diffusion_flex_kernels::join_global_pool(); // this thread runs a share of each kernel (optional)
    diffusion_flex_kernels::install_for_unet(); // the fast CPU kernels (optional)
    diffusion_flex_kernels::install_for_training(); // Adam and the EMA in one pass (optional)
    let device = Default::default();
    let set = Arc::new(load_split(&dir, Split::Train)?);
    let loader = BatchLoader::new(set, 64, 0, 2);

    // A custom U-Net: three levels, attention only at the coarsest.
    let unet = UNetConfig::new()
        .with_widths(vec![16, 32, 64])
        .with_strides(vec![2, 2])
        .with_up_widths(vec![32, 16])
        .with_attention(vec![false, false, true])
        .init_seeded::<B>(&device, 0)?;
    let schedule = NoiseSchedule::reference();
    let config = TrainerConfig {
        lr: 2e-3,
        lr_schedule: LrSchedule {
            warmup_steps: 50,
            cosine_decay: true,
            min_factor: 0.05,
        },
        objective: Objective {
            label_dropout: 0.1,
            ..Objective::default()
        },
        // More than 1 splits each batch over threads; with the CPU kernels
        // one is faster (150 steps: 38 to 41 s against 40 to 44 s with 2).
        shards: 1,
        ..TrainerConfig::new(steps)
    };
    let mut trainer = Trainer::new(unet, &schedule, config, &device);
    // The library's loop: epochs, checkpoints in fashion-run/ (run the
    // example again to continue from the last one), a log every 50 steps.
    let epochs = (steps as usize).div_ceil(loader.batches_per_epoch());
    let fit = Fit::new("fashion-run", FitConfig::new(epochs).with_stop_after(Some(steps)));
    println!("{:?}", fit.open(&mut trainer)?);
    let start = std::time::Instant::now();
    let mut log = OnLog(|l: &LogEvent| {
        println!(
            "step {:4}  loss {:.4}  {:.0} s",
            l.step,
            l.loss,
            start.elapsed().as_secs_f64()
        )
    });
    fit.run(&mut trainer, &loader, &device, &mut log)?;

    // 10 samples of each class from the EMA weights: DPM-Solver++ 20 steps, guidance 2.
    let ema = &trainer.ema().model;
    let classes = Tensor::<Flex, 1, Int>::arange(0..100, &device).div_scalar(10);
    let x: Tensor<Flex, 4> = NoiseSource::sample(&mut SeededNoise::new(1), [100, 1, 28, 28], &device);
    let mut sampler = SamplerConfig::new(SamplerKind::DpmSolverPp, 20).build::<Flex>(&schedule)?;
    let x0 = sample(
        &Guided::new(ema, 2.0),
        sampler.as_mut(),
        x,
        Some(classes),
        &mut SeededNoise::new(2),
        |_, _| {},
    );
    let pixels: Vec<u8> = x0
        .into_data()
        .to_vec::<f32>()?
        .iter()
        .map(|v| ((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8)
        .collect();
    let grid = image::GrayImage::from_fn(280, 280, |x, y| {
        let (img, px) = ((y / 28 * 10 + x / 28) as usize, ((y % 28) * 28 + x % 28) as usize);
        image::Luma([pixels[img * 784 + px]])
    });
    grid.save("fashion-grid.png")?;
    println!(
        "{steps} steps in {:.0} s; samples (a row per class): fashion-grid.png",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
