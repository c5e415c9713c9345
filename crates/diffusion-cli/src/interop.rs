//! Weights of the PyTorch reference: `diffusion import` (a `torch.save`d
//! state_dict or a safetensors file) and `diffusion export` (safetensors
//! with the reference's names, loadable by PyTorch).
//!
//! The reference's parameter names are its module paths; they map onto this
//! U-Net's as follows (L = number of levels − 1):
//!
//! | reference | here |
//! |---|---|
//! | `class_emb.weight` | `class_embedding.table.weight` |
//! | `downblocks.0.{0,1}.` | `stem.{convnext,attention}.` |
//! | `downblocks.i.{0,1}.` (i = 1..L) | `down_blocks.(i−1).{convnext,attention}.` |
//! | `upblocks.j.{0,1}.` | `up_blocks.j.{convnext,attention}.` |
//! | `downscales.i.`, `upscales.j.`, `final_conv.` | `downsamples.i.`, `upsamples.j.`, `head.` |
//! | ConvNeXt `ds_conv`, `t_fc`, `c_fc`, `sequential.{0,1,3,4}`, `shortcut` | `depthwise`, `time_proj`, `class_proj`, `norm1`, `conv1`, `norm2`, `conv2`, `shortcut` |
//! | attention `gn`, `wx`, `wo` | `norm`, `qkv`, `out` |
//!
//! Linear weights are transposed ([out, in] there, [in, out] here; burn-store's
//! PyTorch adapters do it) and GroupNorm's `weight`/`bias` are burn's
//! `gamma`/`beta` (renamed by the key mapping). `t_emb`, the fixed time
//! table, is not a parameter here (this U-Net computes it from the same
//! formula): import ignores it and export does not write it, so load an
//! exported file into the reference with `load_state_dict(sd, strict=False)`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn_store::{
    ApplyResult, BurnToPyTorchAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};
use diffusion_model::{UNet, UNetConfig};

use crate::backend::{dispatch, BackendKind, Task};
use crate::checkpoint::{self, TrainState};
use crate::config::{Preset, RunConfig, Weights};

/// (regex on a reference name, replacement) pairs, applied in order.
pub fn reference_to_burn(levels: usize) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = vec![
        // GroupNorm's affine parameters: weight/bias there, gamma/beta here.
        (r"\.(sequential\.[03]|gn)\.weight$".into(), ".$1.gamma".into()),
        (r"\.(sequential\.[03]|gn)\.bias$".into(), ".$1.beta".into()),
        (r"^class_emb\.".into(), "class_embedding.table.".into()),
        (r"^downblocks\.0\.0\.".into(), "stem.convnext.".into()),
        (r"^downblocks\.0\.1\.".into(), "stem.attention.".into()),
    ];
    for i in 1..levels {
        p.push((
            format!(r"^downblocks\.{i}\.0\."),
            format!("down_blocks.{}.convnext.", i - 1),
        ));
        p.push((
            format!(r"^downblocks\.{i}\.1\."),
            format!("down_blocks.{}.attention.", i - 1),
        ));
    }
    for (from, to) in [
        (r"^upblocks\.(\d+)\.0\.", "up_blocks.$1.convnext."),
        (r"^upblocks\.(\d+)\.1\.", "up_blocks.$1.attention."),
        (r"^downscales\.", "downsamples."),
        (r"^upscales\.", "upsamples."),
        (r"^final_conv\.", "head."),
        (r"\.ds_conv\.", ".depthwise."),
        (r"\.t_fc\.", ".time_proj."),
        (r"\.c_fc\.", ".class_proj."),
        (r"\.sequential\.0\.", ".norm1."),
        (r"\.sequential\.1\.", ".conv1."),
        (r"\.sequential\.3\.", ".norm2."),
        (r"\.sequential\.4\.", ".conv2."),
        (r"\.gn\.", ".norm."),
        (r"\.wx\.", ".qkv."),
        (r"\.wo\.", ".out."),
    ] {
        p.push((from.into(), to.into()));
    }
    p
}

/// The inverse of [`reference_to_burn`].
pub fn burn_to_reference(levels: usize) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = vec![
        (r"\.(norm1|norm2|norm)\.gamma$".into(), ".$1.weight".into()),
        (r"\.(norm1|norm2|norm)\.beta$".into(), ".$1.bias".into()),
        (r"^class_embedding\.table\.".into(), "class_emb.".into()),
        (r"^stem\.convnext\.".into(), "downblocks.0.0.".into()),
        (r"^stem\.attention\.".into(), "downblocks.0.1.".into()),
    ];
    for i in 1..levels {
        p.push((
            format!(r"^down_blocks\.{}\.convnext\.", i - 1),
            format!("downblocks.{i}.0."),
        ));
        p.push((
            format!(r"^down_blocks\.{}\.attention\.", i - 1),
            format!("downblocks.{i}.1."),
        ));
    }
    for (from, to) in [
        (r"^up_blocks\.(\d+)\.convnext\.", "upblocks.$1.0."),
        (r"^up_blocks\.(\d+)\.attention\.", "upblocks.$1.1."),
        (r"^downsamples\.", "downscales."),
        (r"^upsamples\.", "upscales."),
        (r"^head\.", "final_conv."),
        (r"\.depthwise\.", ".ds_conv."),
        (r"\.time_proj\.", ".t_fc."),
        (r"\.class_proj\.", ".c_fc."),
        (r"\.norm1\.", ".sequential.0."),
        (r"\.conv1\.", ".sequential.1."),
        (r"\.norm2\.", ".sequential.3."),
        (r"\.conv2\.", ".sequential.4."),
        (r"\.norm\.", ".gn."),
        (r"\.qkv\.", ".wx."),
        (r"\.out\.", ".wo."),
    ] {
        p.push((from.into(), to.into()));
    }
    p
}

/// One error listing every missing, unexpected or mis-shaped key.
/// Unexpected keys are named as in the file (the mapping undone).
fn check(result: &ApplyResult, file: &Path, levels: usize) -> Result<()> {
    let missing: Vec<String> = result.missing.iter().map(|(path, _)| path.clone()).collect();
    let back: Vec<(regex::Regex, String)> = burn_to_reference(levels)
        .into_iter()
        .map(|(from, to)| (regex::Regex::new(&from).expect("valid pattern"), to))
        .collect();
    let unused: Vec<String> = result
        .unused
        .iter()
        .filter(|k| k.as_str() != "t_emb")
        .map(|k| {
            back.iter().fold(k.clone(), |name, (re, to)| {
                re.replace_all(&name, to.as_str()).into_owned()
            })
        })
        .collect();
    let errors: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
    if missing.is_empty() && unused.is_empty() && errors.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing keys (this U-Net's names): {}",
            missing.join(", ")
        ));
    }
    if !unused.is_empty() {
        parts.push(format!(
            "unexpected keys (the file's names): {}",
            unused.join(", ")
        ));
    }
    if !errors.is_empty() {
        parts.push(errors.join("; "));
    }
    bail!(
        "{}: does not match the U-Net configuration; {}. Pass --config with the reference run's widths, strides, mult, embedding width and T",
        file.display(),
        parts.join("; ")
    )
}

/// Loads reference weights (.pt or .safetensors, by extension) into a U-Net.
pub fn load_reference<B: Backend>(config: &UNetConfig, file: &Path, device: &B::Device) -> Result<UNet<B>> {
    load_reference_into(config.init::<B>(device)?, file)
}

/// Loads reference weights into `model`, a U-Net built from the
/// configuration the file is expected to match (every name, shape, dtype
/// and value is checked as in [`load_reference`]).
pub fn load_reference_into<B: Backend>(mut model: UNet<B>, file: &Path) -> Result<UNet<B>> {
    let levels = model.downsamples.len() + 1;
    let expected = diffusion_train::params::describe(&model);
    let is_safetensors = file.extension().is_some_and(|e| e == "safetensors");
    let result = if is_safetensors {
        let mut store = SafetensorsStore::from_file(file.to_path_buf())
            .with_from_adapter(PyTorchToBurnAdapter)
            .allow_partial(true)
            .validate(false)
            .map_indices_contiguous(false);
        for (from, to) in reference_to_burn(levels) {
            store = store.with_key_remapping(from, to);
        }
        check_dtypes(&mut store, file)?;
        guarded(file, || model.load_from(&mut store))?
            .map_err(|e| anyhow::anyhow!("{}: cannot read safetensors: {e}", file.display()))?
    } else {
        let mut store = PytorchStore::from_file(file.to_path_buf())
            .allow_partial(true)
            .validate(false)
            .map_indices_contiguous(false);
        for (from, to) in reference_to_burn(levels) {
            store = store.with_key_remapping(from, to);
        }
        check_dtypes(&mut store, file)?;
        guarded(file, || model.load_from(&mut store))?.map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read a PyTorch state_dict (torch.save(model.state_dict(), path)): {e}",
                file.display()
            )
        })?
    };
    check(&result, file, levels)?;
    Ok(diffusion_train::checkpoint::check_loaded(&expected, model, file)?)
}

/// burn-store's decoding with its panics turned into an error naming the
/// file.
fn guarded<T>(file: &Path, decode: impl FnOnce() -> T) -> Result<T> {
    Ok(diffusion_train::checkpoint::decode_guarded(
        file, "weights", decode,
    )?)
}

/// Refuses a file in which a tensor is not floating point, before any
/// tensor is built: burn-store panics on such a tensor ("Expected float
/// dtype"), and in burn 0.21 that panic, raised while the store holds its
/// tensors, ends the process with SIGSEGV instead of an error.
fn check_dtypes<S: ModuleStore>(store: &mut S, file: &Path) -> Result<()>
where
    S::Error: std::fmt::Display,
{
    let snapshots = guarded(file, || store.get_all_snapshots())?
        .map_err(|e| anyhow::anyhow!("{}: cannot read the tensors: {e}", file.display()))?;
    for (name, snapshot) in snapshots {
        if !snapshot.dtype.is_float() {
            bail!(
                "{}: tensor {name} holds {:?} values; weights must be floating point (save the model's float state_dict)",
                file.display(),
                snapshot.dtype
            );
        }
    }
    Ok(())
}

/// Writes a U-Net's weights as safetensors with the reference's names.
pub fn save_reference<B: Backend>(model: &UNet<B>, file: &Path) -> Result<()> {
    let levels = model.downsamples.len() + 1;
    let mut store = SafetensorsStore::from_file(file.to_path_buf())
        .with_to_adapter(BurnToPyTorchAdapter)
        .overwrite(true)
        .map_indices_contiguous(false);
    for (from, to) in burn_to_reference(levels) {
        store = store.with_key_remapping(from, to);
    }
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: cannot write safetensors: {e}", file.display()))
}

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
    let config = RunConfig::load(&args.checkpoint)?;
    let (dir, _) = checkpoint::latest(&args.checkpoint)?;
    let weights = args.weights.unwrap_or(config.sample_weights);
    dispatch(
        backend,
        ExportTask {
            config,
            dir,
            weights,
            out: args.safetensors,
        },
    )
}

struct ExportTask {
    config: RunConfig,
    dir: PathBuf,
    weights: Weights,
    out: PathBuf,
}

impl Task for ExportTask {
    type Output = i32;

    fn run<AB: AutodiffBackend>(self, device: AB::Device) -> Result<i32> {
        let file = self.weights.file();
        let model =
            checkpoint::load_unet::<AB::InnerBackend>(&self.config.model, &self.dir.join(file), &device)?;
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
