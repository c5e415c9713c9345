//! A run directory: its configuration (`config.json`) and its checkpoints,
//! opened for sampling, evaluating or resuming.
//!
//! ```no_run
//! # fn main() -> Result<(), diffusion_train::run::RunError> {
//! use burn::backend::Flex;
//! use diffusion_train::run::Run;
//!
//! let run = Run::open("data/pretrained/mnist".as_ref())?;
//! let model = run.model::<Flex>(run.config.sample_weights, &Default::default())?;
//! let schedule = run.noise_schedule()?;
//! println!("{} steps trained, T = {}", run.state.step, schedule.num_steps());
//! # let _ = model;
//! # Ok(())
//! # }
//! ```

mod config;

use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use diffusion_core::NoiseSchedule;
use diffusion_model::{UNet, UNetConfig};

use crate::distill::Progressive;
use crate::Trainer;

pub use config::{
    upgrade, ConfigError, DistillFrom, Preset, PreviewConfig, QualityProbe, RunConfig, TrainConfig, Weights,
    CONFIG_FILE, MAX_SAMPLES,
};

use crate::checkpoint::{self, CheckpointError, TrainState};

/// What can go wrong opening a run; each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `config.json` cannot be read.
    #[error("{}: cannot read the run's config; is {} a run directory made by `train`?", .path.display(), .dir.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The run directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not JSON of a run's configuration.
    #[error("{}: not a valid run config (corrupt, or from another version)", .path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// A value of `config.json` is out of range.
    #[error("{}: invalid value", .path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Which value, and why.
        #[source]
        source: ConfigError,
    },
    /// `config.json` cannot be written.
    #[error("writing {}", .path.display())]
    Write {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint is missing, corrupt or does not fit the model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The model cannot be built from the configuration.
    #[error("{}: {message}", .path.display())]
    Model {
        /// The config file.
        path: PathBuf,
        /// What the model said.
        message: String,
    },
}

/// An opened run: its configuration and its newest checkpoint.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run directory.
    pub dir: PathBuf,
    /// Its `config.json`, read and validated.
    pub config: RunConfig,
    /// The newest checkpoint's folder.
    pub checkpoint: PathBuf,
    /// Where training stood at that checkpoint.
    pub state: TrainState,
}

impl Run {
    /// Reads `dir/config.json` and finds the newest checkpoint (its index
    /// read and checked); weights are loaded by [`Run::model`].
    pub fn open(dir: &Path) -> Result<Self, RunError> {
        let config = RunConfig::load(dir)?;
        let (checkpoint, state) = checkpoint::latest(dir)?;
        Ok(Run {
            dir: dir.to_path_buf(),
            config,
            checkpoint,
            state,
        })
    }

    /// The U-Net with the checkpoint's raw or EMA weights, checked
    /// (checksum, shapes, finite values) as it loads.
    pub fn model<B: Backend>(&self, weights: Weights, device: &B::Device) -> Result<UNet<B>, RunError> {
        self.weights_into(&self.config.model, &self.dir.join(CONFIG_FILE), weights, device)
    }

    /// The checkpoint's `weights` loaded into a U-Net built from `model`
    /// (described by the file `config`, which errors name).
    fn weights_into<B: Backend>(
        &self,
        model: &UNetConfig,
        config: &Path,
        weights: Weights,
        device: &B::Device,
    ) -> Result<UNet<B>, RunError> {
        let blank = model.init::<B>(device).map_err(model_error(config))?;
        let file = self.checkpoint.join(weights.file());
        Ok(checkpoint::load_module(blank, &file, device)?)
    }

    /// The run's noise schedule.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule, RunError> {
        self.config.noise_schedule().map_err(|source| RunError::Invalid {
            path: self.dir.join(CONFIG_FILE),
            source,
        })
    }
}

/// The error of a U-Net that cannot be built from the configuration in `path`.
fn model_error(path: &Path) -> impl Fn(diffusion_model::ModelError) -> RunError + '_ {
    move |e| RunError::Model {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The trainer a run configuration describes, at step 0 on `device`
/// (`total_steps` sets the learning-rate schedule; `cpu` allows the
/// configured shards): the U-Net from its seeded initialisation, or for a
/// distilled run a student made from its teacher's weights, with the
/// teacher attached ([`Trainer::with_teacher`]). Resume it with
/// [`crate::Fit::open`] or [`Trainer::resume`].
pub fn build_trainer<B: AutodiffBackend>(
    config: &RunConfig,
    device: &B::Device,
    total_steps: u64,
    cpu: bool,
) -> Result<Trainer<B, UNet<B>>, RunError> {
    let invalid = |source| RunError::Invalid {
        path: PathBuf::from(CONFIG_FILE),
        source,
    };
    let schedule = config.noise_schedule().map_err(invalid)?;
    let trainer_config = config.trainer_config(total_steps, cpu);
    let Some(from) = &config.distill else {
        let model = config
            .model
            .init_seeded::<B>(device, config.train.trainer.seed)
            .map_err(model_error(Path::new(CONFIG_FILE)))?;
        return Ok(Trainer::new(model, &schedule, trainer_config, device));
    };
    let teacher = Run::open(&from.teacher)?;
    let teacher_schedule = teacher.noise_schedule()?;
    if teacher_schedule != schedule {
        return Err(RunError::Model {
            path: teacher.dir.join(CONFIG_FILE),
            message: "the teacher's noise schedule (kind or T) differs from the student's".into(),
        });
    }
    // The student starts from the teacher's weights, loaded into the
    // student's own configuration (so its shapes are checked).
    let student = teacher.weights_into(&config.model, Path::new(CONFIG_FILE), from.weights, device)?;
    let teacher_model = teacher.model::<B::InnerBackend>(from.weights, device)?;
    let progressive = Progressive::new(
        teacher_model,
        &schedule,
        config.sampler.steps,
        from.guidance,
        config.sampler.clip,
    )
    .map_err(|e| invalid(ConfigError(e.to_string())))?;
    Ok(Trainer::new(student, &schedule, trainer_config, device).with_teacher(progressive))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pretrained/mnist")
    }

    /// The shipped run opens: its config, its last step (5 epochs of
    /// 937 full batches of 64 = 4,685), its EMA weights (the only ones it
    /// ships: asking for the raw ones names the missing file).
    #[test]
    fn the_shipped_run_opens_with_its_weights() {
        let run = Run::open(&shipped()).unwrap();
        assert_eq!(run.config.preset, Preset::Full);
        assert_eq!((run.state.step, run.state.finished), (4_685, true));
        let device = Default::default();
        let ema = run.model::<Flex>(Weights::Ema, &device).unwrap();
        assert_eq!(crate::params::first_non_finite(&ema), None);
        assert_eq!(ema.num_steps(), 500);
        assert_eq!(run.noise_schedule().unwrap().num_steps(), 500);
        let raw = run.model::<Flex>(Weights::Model, &device).unwrap_err();
        assert!(raw.to_string().contains("model.mpk"), "{raw}");
    }

    #[test]
    fn a_folder_without_a_run_says_what_it_needs() {
        let dir = std::env::temp_dir().join(format!("run-open-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Run::open(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.to_string().ends_with("a run directory made by `train`?") && matches!(e, RunError::Read { .. }),
            "{e}"
        );
    }
}
