//! The wgpu backend executed: the same network, training and samplers as
//! the CPU backend, on whatever adapter wgpu finds (in CI, Mesa's lavapipe,
//! a software Vulkan driver; on a GPU machine, its own driver).
//!
//! Run with `cargo test --release -p diffusion-cli --features wgpu --test
//! wgpu`. Without the feature every test here is ignored and says why.
//! Each process compiles its kernels when it first meets them (a minute on
//! lavapipe, less from the second process on: Mesa and cubecl keep caches
//! under ~/.cache), so the checks use small shapes and few processes.
//!
//! Tolerances. Both backends compute in f32, but a GPU backend sums
//! products in another order (tiled matmuls and convolutions, tree
//! reductions) and has its own exp/erf, so results differ by float
//! rounding, which a sampler carries from step to step. The bounds below
//! are about ten times the differences measured on lavapipe (printed by
//! each test, see the README), and far below a change anyone could see
//! (pixels lie in [-1, 1]; a wrong kernel moves them by tenths).
#![cfg_attr(not(feature = "wgpu"), allow(dead_code, unused_imports))]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[path = "support/mod.rs"]
mod support;
use support::*;

/// Max |wgpu − cpu| of one U-Net forward pass (the shipped model's v
/// output, up to about 16 in size; 1.05e-5 measured on lavapipe).
const FORWARD_TOL: f32 = 1e-4;
/// Max |wgpu − cpu| of a sampled image after six steps (at most 1.07e-3
/// measured on lavapipe, DDIM).
const SAMPLE_TOL: f32 = 1e-2;

/// A tiny run trained on the CPU backend (seconds), shared by the tests
/// that sample or evaluate it.
fn cpu_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = scratch("wgpu-cpu-run").join("run");
        train_tiny(&dir, &["--seed", "4"]);
        dir
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The losses column of a run's metrics.csv, by step.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            let step = f.next().unwrap().parse().unwrap();
            let loss = f.nth(1).unwrap().parse().unwrap();
            (step, loss)
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs --features wgpu and a Vulkan driver")]
fn the_shipped_unet_gives_the_same_output_on_wgpu_and_cpu() {
    #[cfg(feature = "wgpu")]
    {
        use burn::tensor::backend::Backend;
        use burn::tensor::{Int, Tensor, TensorData};
        use diffusion_core::{NoiseSource, SeededNoise};
        use diffusion_model::{UNet, UNetConfig};

        // The source tree's copy, or ./data on a machine the test binary was
        // carried to (scripts/gpu-check.sh runs it from the repository).
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pretrained/mnist");
        let run = if built.is_dir() {
            built
        } else {
            PathBuf::from("data/pretrained/mnist")
        };
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
        let config: UNetConfig = serde_json::from_value(config["model"].clone()).unwrap();
        let latest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/latest.json")).unwrap())
                .unwrap();
        let weights = run
            .join("checkpoints")
            .join(latest["dir"].as_str().unwrap())
            .join("ema.mpk");

        // Four images at four noise levels and four classes.
        fn forward<B: Backend>(config: &UNetConfig, weights: &Path, device: &B::Device) -> Vec<f32> {
            let model: UNet<B> = config.init(device).unwrap();
            let model = diffusion_train::checkpoint::load_module(model, weights, device).unwrap();
            let x: Tensor<B, 4> = NoiseSource::<B>::sample(&mut SeededNoise::new(11), [4, 1, 28, 28], device);
            let t = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i32, 120, 300, 499], [4]), device);
            let c = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i32, 3, 7, 9], [4]), device);
            model
                .forward(x, t, Some(c))
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap()
        }
        // What the binary does at start (see its main.rs): without a display
        // session, Mesa's device-select layer only prints errors.
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
        let cpu = forward::<burn::backend::Flex>(&config, &weights, &Default::default());
        let gpu = forward::<burn_wgpu::Wgpu>(&config, &weights, &Default::default());
        let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&cpu, &gpu);
        eprintln!("U-Net forward: max |wgpu - cpu| = {diff:.2e} (outputs up to {scale:.2})");
        assert!(scale > 0.5, "a trained network's output is order 1, got {scale}");
        assert!(
            diff < FORWARD_TOL,
            "max |wgpu - cpu| = {diff:.2e} >= {FORWARD_TOL:.0e}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs --features wgpu and a Vulkan driver")]
fn every_sampler_draws_the_same_images_on_wgpu_and_cpu() {
    let run = cpu_run();
    let dir = scratch("wgpu-samplers");
    // The start noise from a file, the steps' noise from --seed (drawn on
    // the host, so the stochastic samplers add the same noise on both).
    // Deterministic values spread over [-1.7, 1.7] (i times the golden
    // ratio, fractional part): any start noise serves for a comparison.
    let noise: Vec<f32> = (0..4 * 784)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 3.4)
        .collect();
    let noise_file = dir.join("noise.npy");
    write_npy(&noise_file, &[4, 1, 28, 28], &noise);
    for (sampler, guidance) in [
        ("ddim", "1"),
        ("dpm-solver++", "2"),
        ("ddpm", "1"),
        ("reference", "1"),
    ] {
        let draw = |backend: &str| {
            let npy = dir.join(format!("{backend}-{}.npy", sampler.replace('+', "p")));
            let text = ok(bin()
                .args([
                    "sample",
                    "--backend",
                    backend,
                    "--sampler",
                    sampler,
                    "--steps",
                    "6",
                ])
                .args(["--guidance", guidance, "--seed", "3", "--noise"])
                .arg(&noise_file)
                .arg("--checkpoint")
                .arg(run)
                .arg("--out")
                .arg(dir.join(format!("{backend}.png")))
                .arg("--npy")
                .arg(&npy));
            // On a software driver (lavapipe) the binary says so, once.
            let notes = text.matches("note: wgpu runs on a software").count();
            assert!(notes <= usize::from(backend == "wgpu"), "{text}");
            read_npy(&npy)
        };
        let (cpu, gpu) = (draw("cpu"), draw("wgpu"));
        let diff = max_abs_diff(&cpu, &gpu);
        eprintln!("{sampler} (guidance {guidance}): max |wgpu - cpu| = {diff:.2e}");
        assert!(
            diff < SAMPLE_TOL,
            "{sampler}: max |wgpu - cpu| = {diff:.2e} >= {SAMPLE_TOL:.0e}"
        );
        // The images are not the noise: the sampler ran.
        assert!(
            max_abs_diff(&cpu, &noise) > 0.5,
            "{sampler} left the noise as it was"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs --features wgpu and a Vulkan driver")]
fn a_tiny_run_trains_checkpoints_and_resumes_on_wgpu() {
    let root = scratch("wgpu-train");
    let (gpu, cpu) = (root.join("wgpu"), root.join("cpu"));
    let train = |backend: &str, dir: &Path, stop: &str| {
        ok(bin()
            .args(["train", "--backend", backend, "--preset", "tiny", "--seed", "2"])
            .args(["--stop-after", stop, "--out"])
            .arg(dir))
    };
    let text = train("wgpu", &gpu, "10");
    assert!(text.contains("stopped at step 10"), "{text}");
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gpu.join("checkpoints/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["state"]["step"], 10, "{latest}");
    // Resumed, it goes on from step 11 over the epoch end at step 16 (a
    // checkpoint and a preview grid drawn on wgpu) to step 20.
    let text = ok(bin()
        .args(["train", "--backend", "wgpu", "--stop-after", "20", "--resume"])
        .arg(&gpu));
    assert!(text.contains("stopped at step 20"), "{text}");
    assert!(gpu.join("samples/epoch-001.png").is_file());
    train("cpu", &cpu, "20");

    let (g, c) = (losses(&gpu), losses(&cpu));
    assert_eq!(
        g.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>(),
        "each step once in metrics.csv"
    );
    let g: Vec<f64> = g.into_iter().map(|r| r.1).collect();
    let c: Vec<f64> = c.into_iter().map(|r| r.1).collect();
    eprintln!("losses wgpu {g:.3?}\nlosses cpu  {c:.3?}");
    assert!(g.iter().all(|l| l.is_finite()), "{g:?}");
    let (first, last) = (mean(&g[..5]), mean(&g[15..]));
    assert!(
        last < 0.8 * first,
        "wgpu loss should fall: {first:.3} -> {last:.3}"
    );
    // The backends draw t, ε and label dropout from their own generators,
    // so single steps differ by sampling noise; over the last ten steps the
    // mean loss agrees within 15% (2.3% measured on lavapipe; a wrong
    // gradient would not fall at all, or diverge).
    let (gm, cm) = (mean(&g[10..]), mean(&c[10..]));
    eprintln!("mean loss of steps 11-20: wgpu {gm:.4}, cpu {cm:.4}");
    assert!((gm / cm - 1.0).abs() < 0.15, "wgpu {gm:.4} vs cpu {cm:.4}");
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs --features wgpu and a Vulkan driver")]
fn eval_and_bench_run_on_wgpu() {
    let run = cpu_run();
    let text = ok(bin()
        .args([
            "eval",
            "--backend",
            "wgpu",
            "--per-class",
            "2",
            "--steps",
            "3",
            "--checkpoint",
        ])
        .arg(run));
    assert!(text.contains("accuracy") && text.contains("Fréchet"), "{text}");
    let text = ok(bin().args([
        "bench",
        "--backend",
        "wgpu",
        "--model",
        "tiny",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--skip-128",
        "--skip-1000",
    ]));
    let json = text
        .lines()
        .rfind(|l| l.starts_with('{'))
        .expect("bench's JSON line");
    let result: serde_json::Value = serde_json::from_str(json).unwrap();
    eprintln!("bench on wgpu: {json}");
    assert_eq!(result["backend"], "wgpu");
    assert!(result["train_images_per_s_b32"].as_f64().unwrap() > 0.0);
    assert!(result["sample_81x35_s"].as_f64().unwrap() > 0.0);
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs --features wgpu and a Vulkan driver")]
fn wgpu_without_any_driver_is_one_error_line() {
    // The Vulkan loader pointed at a driver list that does not exist: wgpu
    // then sees no adapter at all, where burn itself would panic.
    let err = fails(
        bin()
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .args(["sample", "--backend", "wgpu", "--n", "1", "--checkpoint"])
            .arg(cpu_run()),
    );
    assert!(
        err.contains("--backend wgpu: no Vulkan adapter found") && err.contains("--backend cpu"),
        "{err}"
    );
}
