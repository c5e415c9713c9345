//! The wgpu backend executed: the same network, training and samplers as
//! the CPU backend, on whatever adapter wgpu finds (in CI, Mesa's lavapipe,
//! a software Vulkan driver; on a GPU machine, its own driver).
//!
//! Run with `cargo test --release -p diffusion-cli --features wgpu --test
//! wgpu`. Without the feature every test here is ignored and says why.
//! Each process compiles its kernels when it first meets them, and burn
//! autotunes each new shape by running the candidate kernels. On lavapipe
//! on a 2-core CPU that is one to three minutes per sampling process and
//! more than ten for the first step of a training process at batch 8, so
//! CI runs one training step at batch 4 in this process, one guided
//! sampler and the driver check; the shipped model's forward pass, the
//! other samplers, `eval` and a training run with resume are `#[ignore]`d
//! there: `scripts/gpu-check.sh` runs the whole group
//! (`--include-ignored`) on a machine with a GPU.
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
/// |wgpu − cpu| of one training loss, relative to it (the tiny run's
/// model, four images; equal to 6 digits on lavapipe).
const LOSS_TOL: f32 = 1e-3;
/// Max |wgpu − cpu| of a parameter's gradient, relative to the largest
/// entry of that gradient.
/// (1.48e-3 measured on lavapipe.)
const GRAD_TOL: f32 = 1e-2;
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

/// A run's model config and the weights file `file` (ema.mpk or
/// model.mpk) of its latest checkpoint.
fn latest_weights(run: &Path, file: &str) -> (diffusion_model::UNetConfig, PathBuf) {
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join(name)).unwrap()).unwrap()
    };
    let config = serde_json::from_value(read("config.json")["model"].clone()).unwrap();
    let latest = read("checkpoints/latest.json");
    let weights = run
        .join("checkpoints")
        .join(latest["dir"].as_str().unwrap())
        .join(file);
    (config, weights)
}

/// What the binary does at start (see its main.rs): without a display
/// session, Mesa's device-select layer only prints errors.
fn quiet_device_select() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
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

#[test]
#[ignore = "minutes on a software driver; scripts/gpu-check.sh runs it on a GPU (--include-ignored)"]
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
        let (config, weights) = latest_weights(&run, "ema.mpk");

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
        quiet_device_select();
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

/// DPM-Solver++ with guidance (a multistep solver, the conditional and
/// unconditional halves in one batch), in CI.
#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs --features wgpu and a Vulkan driver")]
fn a_guided_sampler_draws_the_same_images_on_wgpu_and_cpu() {
    samplers_match(&[("dpm-solver++", "2")]);
}

/// The other samplers, on a GPU (each costs one to two minutes of kernel
/// compilation on a software driver).
#[test]
#[ignore = "minutes on a software driver; scripts/gpu-check.sh runs it on a GPU (--include-ignored)"]
fn the_other_samplers_draw_the_same_images_on_wgpu_and_cpu() {
    samplers_match(&[("ddim", "1"), ("ddpm", "1"), ("reference", "1")]);
}

fn samplers_match(samplers: &[(&str, &str)]) {
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
    for &(sampler, guidance) in samplers {
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
fn one_training_step_gives_the_same_loss_and_gradients_on_wgpu_and_cpu() {
    #[cfg(feature = "wgpu")]
    {
        use burn::backend::{Autodiff, Flex};
        use burn::module::{Module, ModuleVisitor, Param};
        use burn::tensor::backend::AutodiffBackend;
        use burn::tensor::{Int, Tensor, TensorData};
        use diffusion_core::{
            ForwardProcess, Labels, LossWeighting, NoiseSchedule, NoiseSource, Objective, SeededNoise,
            TrainingBatch,
        };
        use diffusion_model::{UNet, UNetConfig};

        /// Every parameter's path and gradient, in the module's order.
        struct Grads<'a, B: AutodiffBackend> {
            grads: &'a B::Gradients,
            path: Vec<String>,
            out: Vec<(String, Vec<f32>)>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let grad = param
                    .val()
                    .grad(self.grads)
                    .expect("every parameter has a gradient");
                let values = grad.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                self.out.push((self.path.join("."), values));
            }
        }

        /// The loss and the gradients of one step of the tiny run's model on
        /// a fixed batch: four images, noise and timesteps from host seeds.
        fn step<B: AutodiffBackend>(
            config: &UNetConfig,
            weights: &Path,
            device: &B::Device,
        ) -> (f32, Vec<(String, Vec<f32>)>) {
            let model: UNet<B> = config.init(device).unwrap();
            let model = diffusion_train::checkpoint::load_module(model, weights, device).unwrap();
            let x0: Tensor<B, 4> = NoiseSource::<B>::sample(&mut SeededNoise::new(5), [4, 1, 28, 28], device);
            let batch = TrainingBatch {
                x0: x0.clamp(-1.0, 1.0),
                t: Tensor::<B, 1, Int>::from_data(TensorData::new(vec![1i32, 90, 260, 480], [4]), device),
                eps: NoiseSource::<B>::sample(&mut SeededNoise::new(6), [4, 1, 28, 28], device),
                labels: Labels::Classes(Tensor::from_data(
                    TensorData::new(vec![0i32, 3, 7, 9], [4]),
                    device,
                )),
            };
            let objective = Objective {
                label_dropout: 0.0,
                weighting: LossWeighting::Uniform,
            };
            let fp = ForwardProcess::new(&NoiseSchedule::reference(), device);
            let loss = objective.loss(&model, &fp, batch);
            let value = loss.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap()[0];
            let grads = loss.backward();
            let mut visitor = Grads::<B> {
                grads: &grads,
                path: Vec::new(),
                out: Vec::new(),
            };
            model.visit(&mut visitor);
            (value, visitor.out)
        }

        let run = cpu_run();
        let (config, weights) = latest_weights(run, "model.mpk");
        quiet_device_select();
        let (cpu_loss, cpu) = step::<Autodiff<Flex>>(&config, &weights, &Default::default());
        let (gpu_loss, gpu) = step::<Autodiff<burn_wgpu::Wgpu>>(&config, &weights, &Default::default());
        eprintln!("loss: wgpu {gpu_loss:.6}, cpu {cpu_loss:.6}");
        assert!(cpu_loss.is_finite() && cpu_loss > 0.01, "{cpu_loss}");
        assert!(
            (gpu_loss - cpu_loss).abs() <= LOSS_TOL * cpu_loss,
            "loss: wgpu {gpu_loss} vs cpu {cpu_loss}"
        );
        assert_eq!(gpu.len(), cpu.len(), "parameters");
        // Each parameter's gradient against its own size: the worst
        // difference relative to the largest entry of the CPU gradient, or
        // to a thousandth of the largest entry of any gradient where that
        // is larger. Some gradients are zero but for rounding (1e-8, where
        // others are order 1e-1): the stem's depthwise bias and its time
        // and class projections add a constant to a single channel, which
        // the group norm after them takes out again.
        let largest = cpu
            .iter()
            .flat_map(|(_, c)| c.iter())
            .fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("largest gradient entry: {largest:.3e}");
        let mut worst = (0.0f32, String::new());
        for ((name, g), (_, c)) in gpu.iter().zip(&cpu) {
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let rel = max_abs_diff(g, c) / scale.max(1e-3 * largest);
            if rel > GRAD_TOL {
                let gpu_scale = g.iter().fold(0f32, |m, v| m.max(v.abs()));
                eprintln!(
                    "  {name} ({} values): max |cpu| {scale:.3e}, max |wgpu| {gpu_scale:.3e}, relative difference {rel:.2e}",
                    c.len()
                );
            }
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        eprintln!(
            "{} gradients: max |wgpu - cpu| / max |cpu| = {:.2e} ({})",
            cpu.len(),
            worst.0,
            worst.1
        );
        assert!(
            worst.0 < GRAD_TOL,
            "gradient of {}: {:.2e} >= {GRAD_TOL:.0e}",
            worst.1,
            worst.0
        );
    }
}

#[test]
#[ignore = "training compiles and tunes kernels for tens of minutes on a software driver; scripts/gpu-check.sh runs it on a GPU (--include-ignored)"]
fn a_tiny_run_checkpoints_and_resumes_on_wgpu() {
    // Batches of 8 from 32 images: an epoch is four steps. Stopped at step
    // 2, resumed, it goes over the epoch end at step 4 (a checkpoint and a
    // preview grid drawn on wgpu) to step 6. That the steps compute what the CPU
    // does is the test above; this one checks the run around them.
    let run = scratch("wgpu-train").join("run");
    let text = ok(bin()
        .args(["train", "--backend", "wgpu", "--preset", "tiny", "--seed", "2"])
        .args(["--batch", "8", "--limit", "32", "--stop-after", "2", "--out"])
        .arg(&run));
    assert!(text.contains("stopped at step 2"), "{text}");
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["state"]["step"], 2, "{latest}");
    let text = ok(bin()
        .args(["train", "--backend", "wgpu", "--stop-after", "6", "--resume"])
        .arg(&run));
    assert!(text.contains("stopped at step 6"), "{text}");
    assert!(run.join("samples/epoch-001.png").is_file());
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["state"]["step"], 6, "{latest}");
    let losses = losses(&run);
    eprintln!("losses wgpu {losses:.3?}");
    assert_eq!(
        losses.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>(),
        "each step once in metrics.csv"
    );
    assert!(losses.iter().all(|r| r.1.is_finite() && r.1 > 0.0), "{losses:?}");
}

#[test]
#[ignore = "23 minutes on a software driver with empty caches (2-core Zen 1); scripts/gpu-check.sh runs it on a GPU (--include-ignored)"]
fn eval_runs_on_wgpu() {
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
