//! Checkpoints: model, EMA and optimizer state and the step counter.
//!
//! Each checkpoint is a folder `checkpoints/step-NNNNNNNN/` written in full
//! under a temporary name and then renamed; `checkpoints/latest.json` names
//! the newest complete one and is itself replaced atomically. A kill at any
//! moment therefore leaves the last good checkpoint intact and pointed at.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::Backend;
use diffusion_model::{UNet, UNetConfig};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_bytes_atomically;

pub type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

pub const MODEL: &str = "model";
pub const EMA: &str = "ema";
pub const OPTIMIZER: &str = "optimizer";

/// Where training stands.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch the next step belongs to (from 0).
    pub epoch: u64,
    /// Batch of that epoch the next step uses.
    pub batch_in_epoch: u64,
    /// EMA updates done.
    pub ema_updates: u64,
    /// Whether every epoch is done.
    pub finished: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Latest {
    dir: String,
    state: TrainState,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint through `save(dir)` (which writes the weight files
/// into `dir`), then points `latest.json` at it and removes older ones.
pub fn write(run_dir: &Path, state: TrainState, save: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let name = format!("step-{:08}", state.step);
    let final_dir = root.join(&name);
    let tmp_dir = root.join(format!("{name}.partial"));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir)?;
    }
    fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    save(&tmp_dir)?;
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)?;
    }
    fs::rename(&tmp_dir, &final_dir).with_context(|| format!("renaming {} into place", tmp_dir.display()))?;
    let latest = serde_json::to_string_pretty(&Latest {
        dir: name.clone(),
        state,
    })?;
    write_bytes_atomically(&root.join("latest.json"), latest.as_bytes())?;
    // Older checkpoints (and partial leftovers of killed runs) go.
    for entry in fs::read_dir(&root)?.flatten() {
        let file_name = entry.file_name().to_string_lossy().to_string();
        if file_name.starts_with("step-") && file_name != name && entry.path().is_dir() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(final_dir)
}

/// The newest complete checkpoint: its folder and the state saved with it.
pub fn latest(run_dir: &Path) -> Result<(PathBuf, TrainState)> {
    let path = checkpoints_dir(run_dir).join("latest.json");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no checkpoint found; train first, or point at a run directory made by `train`",
            path.display()
        )
    })?;
    let latest: Latest = serde_json::from_str(&text)
        .with_context(|| format!("{}: corrupt checkpoint index", path.display()))?;
    let dir = checkpoints_dir(run_dir).join(&latest.dir);
    if !dir.is_dir() {
        bail!(
            "{}: the checkpoint named by latest.json is missing",
            dir.display()
        );
    }
    Ok((dir, latest.state))
}

/// Loads weights saved by [`save_module`] into a freshly built U-Net.
pub fn load_unet<B: Backend>(config: &UNetConfig, file: &Path, device: &B::Device) -> Result<UNet<B>> {
    let model = config.init::<B>(device)?;
    model
        .load_file(file.to_path_buf(), &Recorder::new(), device)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}.mpk: cannot load weights ({e}); the checkpoint is corrupt or from another model",
                file.display()
            )
        })
}

/// Saves a module's weights as `file`.mpk.
pub fn save_module<B: Backend, M: Module<B>>(module: M, file: &Path) -> Result<()> {
    module
        .save_file(file.to_path_buf(), &Recorder::new())
        .map_err(|e| anyhow::anyhow!("{}: cannot save weights: {e}", file.display()))
}
