//! `diffusion import` (a `torch.save`d state_dict or a safetensors file of
//! the PyTorch reference into a run directory) and `diffusion export` (a
//! run's weights as safetensors with the reference's names); the name
//! table and the checks are [`diffusion_model::interop`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
pub use diffusion_model::interop::{load_reference, save_reference};
use diffusion_model::UNetConfig;
use diffusion_train::Run;

use crate::backend::{dispatch, BackendKind, Task};
use crate::checkpoint::{self, TrainState};
use crate::config::{Preset, RunConfig, Weights};

/// `diffusion import` flags.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// A state_dict saved by `torch.save(model.state_dict(), path)`.
    #[arg(long, required_unless_present = "safetensors", conflicts_with = "safetensors")]
    pub pt: Option<PathBuf>,
    /// Or a safetensors file with the reference's names (as `export` writes).
    #[arg(long)]
    pub safetensors: Option<PathBuf>,
    /// The U-Net's configuration as JSON (a UNetConfig; default: the reference).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `diffusion export` flags.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    #[arg(long, value_name = "RUN_DIR")]
    pub checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    pub safetensors: PathBuf,
    /// Which weights (default: the run's sampling choice).
    #[arg(long, value_enum)]
    pub weights: Option<Weights>,
}

pub fn import(args: ImportArgs) -> Result<i32> {
    let backend = BackendKind::resolve(args.backend);
    let model = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            serde_json::from_str::<UNetConfig>(&text)
                .with_context(|| format!("{}: not a UNetConfig JSON", path.display()))?
        }
        None => UNetConfig::new(),
    };
    model.level_sizes()?;
    if args.out.join(crate::config::CONFIG_FILE).exists() {
        bail!("{} already holds a run; choose another --out", args.out.display());
    }
    let file = args
        .pt
        .clone()
        .or(args.safetensors.clone())
        .expect("clap requires one");
    if !file.is_file() {
        bail!("{}: no such file", file.display());
    }
    let mut config = RunConfig::preset(Preset::Seed);
    config.model = model;
    dispatch(
        backend,
        ImportTask {
            config,
            file,
            out: args.out,
        },
    )
}

struct ImportTask {
    config: RunConfig,
    file: PathBuf,
    out: PathBuf,
}

impl Task for ImportTask {
    type Output = i32;

    fn run<AB: AutodiffBackend>(self, device: AB::Device) -> Result<i32> {
        let model = load_reference::<AB::InnerBackend>(&self.config.model, &self.file, &device)?;
        std::fs::create_dir_all(&self.out).with_context(|| format!("creating {}", self.out.display()))?;
        self.config.save(&self.out)?;
        let state = TrainState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            ema_updates: 0,
            finished: true,
        };
        checkpoint::write(&self.out, state, |dir| {
            checkpoint::save_module(model.clone(), &dir.join(checkpoint::MODEL))?;
            checkpoint::save_module(model.clone(), &dir.join(checkpoint::EMA))
        })?;
        say!(
            "imported {} into {}; sample with: cargo xtask sample --checkpoint {}",
            self.file.display(),
            self.out.display(),
            self.out.display()
        );
        Ok(0)
    }
}

pub fn export(args: ExportArgs) -> Result<i32> {
    let backend = BackendKind::resolve(args.backend);
    let run = Run::open(&args.checkpoint)?;
    let weights = args.weights.unwrap_or(run.config.sample_weights);
    dispatch(
        backend,
        ExportTask {
            run,
            weights,
            out: args.safetensors,
        },
    )
}

struct ExportTask {
    run: Run,
    weights: Weights,
    out: PathBuf,
}

impl Task for ExportTask {
    type Output = i32;

    fn run<AB: AutodiffBackend>(self, device: AB::Device) -> Result<i32> {
        let model = self.run.model::<AB::InnerBackend>(self.weights, &device)?;
        save_reference(&model, &self.out)?;
        say!(
            "wrote {} ({:?} weights, reference names)",
            self.out.display(),
            self.weights
        );
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy;
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};
    use diffusion_model::UNet;
    use std::path::Path;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/reference_small")
            .join(name)
    }

    fn fixture_config() -> UNetConfig {
        serde_json::from_str(&std::fs::read_to_string(fixture("unet.json")).unwrap()).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Forward of the imported model on the recorded input, with and without classes.
    fn forward(model: &UNet<Flex>) -> (Vec<f32>, Vec<f32>) {
        let device = Default::default();
        let x = npy::read(&fixture("x.npy")).unwrap();
        let t: Vec<i32> = npy::read(&fixture("t.npy"))
            .unwrap()
            .data
            .iter()
            .map(|&v| v as i32)
            .collect();
        let c: Vec<i32> = npy::read(&fixture("classes.npy"))
            .unwrap()
            .data
            .iter()
            .map(|&v| v as i32)
            .collect();
        let n = t.len();
        let xt = Tensor::<Flex, 4>::from_data(TensorData::new(x.data, [n, 1, 28, 28]), &device);
        let tt = Tensor::<Flex, 1, Int>::from_data(TensorData::new(t, [n]), &device);
        let ct = Tensor::<Flex, 1, Int>::from_data(TensorData::new(c, [n]), &device);
        let y = model
            .forward(xt.clone(), tt.clone(), Some(ct))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let y_uncond = model.forward(xt, tt, None).into_data().to_vec::<f32>().unwrap();
        (y, y_uncond)
    }

    #[test]
    fn pytorch_reference_weights_give_the_recorded_output() {
        // tests/fixtures/make_reference_fixture.py made model.pt and y.npy
        // with PyTorch; the imported model must reproduce y to 1e-4.
        let model =
            load_reference::<Flex>(&fixture_config(), &fixture("model.pt"), &Default::default()).unwrap();
        let (y, y_uncond) = forward(&model);
        let want = npy::read(&fixture("y.npy")).unwrap().data;
        let want_uncond = npy::read(&fixture("y_uncond.npy")).unwrap().data;
        let (d, du) = (max_diff(&y, &want), max_diff(&y_uncond, &want_uncond));
        assert!(
            d < 1e-4 && du < 1e-4,
            "max differences {d} (conditional), {du} (unconditional)"
        );
    }

    #[test]
    fn safetensors_export_round_trips() {
        let model =
            load_reference::<Flex>(&fixture_config(), &fixture("model.pt"), &Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("interop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("unet.safetensors");
        save_reference(&model, &file).unwrap();
        let back = load_reference::<Flex>(&fixture_config(), &file, &Default::default()).unwrap();
        assert_eq!(forward(&model).0, forward(&back).0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_mismatched_config_lists_every_bad_key() {
        let config = fixture_config().with_mult(3);
        let err = load_reference::<Flex>(&config, &fixture("model.pt"), &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.pt") && err.contains("Shape mismatch"),
            "{err}"
        );
        assert!(err.contains("conv1") && err.contains("conv2"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let config = fixture_config().with_num_classes(None);
        let err = load_reference::<Flex>(&config, &fixture("model.pt"), &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unexpected keys") && err.contains("class_emb.weight"),
            "{err}"
        );
    }
}
