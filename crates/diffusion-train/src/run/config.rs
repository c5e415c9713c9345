//! A run's configuration: every choice of a training run, saved as
//! `config.json` in the run directory so that sampling and resuming need
//! no setting repeated.

use std::path::{Path, PathBuf};

use diffusion_core::{
    LossWeighting, NoiseSchedule, Objective, SamplerConfig, SamplerKind, Schedule, Spacing,
};
use diffusion_data::DatasetName;
use diffusion_model::UNetConfig;
use serde::{Deserialize, Serialize};

use super::RunError;
use crate::atomic::write_bytes_atomically;
use crate::{EmaConfig, LrSchedule, OptimizerKind, TrainerConfig};

/// Most images a preview grid may hold (as many as one `sample` call draws).
pub const MAX_SAMPLES: usize = 10_000;

/// A value of a run's configuration that is out of range: the message
/// names the field (and the flag that sets it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

macro_rules! bail {
    ($($t:tt)*) => { return Err(ConfigError(format!($($t)*))) };
}

/// Named starting points for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// SPEC.md's run exactly: the reference U-Net, 20 epochs, batch 128,
    /// Adam 1e-3, T = 500; samples with the reference sampler (35 steps,
    /// η = 0.1) from the raw weights.
    Seed,
    /// The README's first command: a lighter U-Net (no attention at 28x28
    /// and 14x14) predicting v with Min-SNR-5 weighting, 900 steps of batch
    /// 32 over 28,800 MNIST images (about 6 to 10 minutes on a 2-core
    /// CPU); samples with DPM-Solver++ (20 steps) and guidance 2.25.
    Quick,
    /// Seconds on a CPU, for tests: a very small U-Net on 512 images.
    Tiny,
    /// The best digits this project makes on a CPU in 40 to 70 minutes (2
    /// cores): the quick U-Net predicting v, all 60,000 images x 5 epochs
    /// at batch 64, cosine learning rate, EMA 0.999; samples with
    /// DPM-Solver++ (20 steps) and guidance 1.5. `data/pretrained/mnist` is
    /// this preset's run.
    Full,
}

/// Which weights sampling uses by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    /// The exponential moving average of the weights.
    Ema,
    /// The trained weights as they are.
    Model,
}

impl Weights {
    /// The weights file of a checkpoint folder (without extension).
    pub fn file(self) -> &'static str {
        match self {
            Weights::Ema => crate::checkpoint::EMA,
            Weights::Model => crate::checkpoint::MODEL,
        }
    }
}

/// Where a distilled run learns from (progressive distillation, see
/// [`crate::distill`]). The student's step count is its sampler's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillFrom {
    /// The teacher's run directory, as it was given (a relative path is
    /// read from the working directory, when training starts or resumes).
    pub teacher: PathBuf,
    /// Which of the teacher's weights teach.
    pub weights: Weights,
    /// The guidance of the teacher's steps, folded into the student (which
    /// then samples with guidance 1: one network evaluation per step).
    pub guidance: f64,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The images trained on.
    pub dataset: DatasetName,
    /// Where the IDX files are; `None` = the bundled MNIST (or a download).
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training images (`None` = all).
    pub limit: Option<usize>,
    /// Passes over the data.
    pub epochs: usize,
    /// Images per step (all replicas together).
    pub batch_size: usize,
    /// Save a checkpoint every N steps (0 = only at epoch ends).
    pub checkpoint_every: u64,
    /// Read the loss back from the device every N steps (progress, metrics).
    pub log_every: u64,
    /// Threads preparing batches.
    pub workers: usize,
    /// Data-parallel replicas (devices × nodes) of the last session; each
    /// took `batch_size / world_size` of every batch. Informative: a run
    /// may resume with another world size that divides `batch_size`.
    #[serde(default = "one")]
    pub world_size: usize,
    /// The trainer's settings (learning rate and its schedule, optimizer,
    /// seed, objective, EMA, shards, clipping), stored in the same object.
    /// On the CPU backend `shards` is the number of pieces each batch is
    /// computed in; a run's `total_steps` is 0 (derived when it starts).
    #[serde(flatten)]
    pub trainer: TrainerConfig,
}

/// The grid drawn after every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewConfig {
    /// Number of images (classes cycle 0, 1, 2, …).
    pub n: usize,
    /// The quality measured after every epoch (MNIST runs only).
    #[serde(default)]
    pub quality: Option<QualityProbe>,
}

/// A small evaluation after every epoch: `per_class` digits of each class,
/// drawn with the run's sampler, guidance and weights and judged by the
/// classifier `eval` uses; accuracy and Fréchet distance go to
/// `quality.csv` and the run's `training.png`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityProbe {
    /// Digits drawn per class.
    pub per_class: usize,
}

/// Everything about a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// The preset it started from.
    pub preset: Preset,
    /// The U-Net (its `num_steps` is the schedule's T).
    pub model: UNetConfig,
    /// The noise schedule's shape.
    pub schedule: Schedule,
    /// Data, epochs, checkpoints and the trainer's settings.
    pub train: TrainConfig,
    /// `sample`'s default sampler.
    pub sampler: SamplerConfig,
    /// `sample`'s default weights.
    pub sample_weights: Weights,
    /// `sample`'s and `eval`'s default classifier-free guidance scale.
    #[serde(default = "one_f64")]
    pub guidance: f64,
    /// The grid (and quality probe) after every epoch.
    pub preview: PreviewConfig,
    /// Set for a distilled run: its teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillFrom>,
}

impl RunConfig {
    /// The starting configuration of a preset.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Seed => Self::seed_preset(),
            Preset::Quick => Self::quick_preset(),
            Preset::Full => Self::full_preset(),
            Preset::Tiny => Self::tiny_preset(),
        }
    }

    /// A student of the run in `teacher_dir` (configured as `teacher`)
    /// that samples in `steps` deterministic DDIM steps with the teacher's
    /// guidance folded in (progressive distillation, [`crate::distill`];
    /// the teacher takes 2 × `steps`). It starts from the teacher's
    /// sampling weights, trains one epoch of the teacher's data at a
    /// learning rate of 1e-4 (Salimans & Ho's) decayed by a cosine to 1e-5, keeps
    /// no label dropout (the student is conditional only) and samples from
    /// its EMA with guidance 1.
    pub fn distilled(teacher_dir: &Path, teacher: &RunConfig, steps: usize) -> Result<Self, ConfigError> {
        let mut c = teacher.clone();
        c.distill = Some(DistillFrom {
            teacher: teacher_dir.to_path_buf(),
            weights: teacher.sample_weights,
            guidance: teacher.guidance,
        });
        c.sampler = SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, steps).with_clip(teacher.sampler.clip);
        c.guidance = 1.0;
        c.sample_weights = Weights::Ema;
        let t = &mut c.train;
        t.epochs = 1;
        t.checkpoint_every = 100;
        t.trainer.lr = 1e-4;
        t.trainer.lr_schedule = LrSchedule {
            warmup_steps: 0,
            cosine_decay: true,
            min_factor: 0.1,
        };
        t.trainer.objective = Objective::default();
        c.validate()?;
        Ok(c)
    }

    /// What every preset starts from: SPEC.md's training run.
    fn base_train() -> TrainConfig {
        let trainer = TrainerConfig {
            ema: EmaConfig {
                decay: 0.999,
                warmup: true,
            },
            // One shard: with the CPU kernels a whole batch keeps the cores
            // busy, and splitting it only shrinks each kernel's work (2
            // Xeon cores, 2026-12-07: seed preset 138 to 148 img/s with 1
            // shard, 132 to 135 with 2; quick preset 190 to 207 with 1,
            // 124 to 130 with 4). A machine setting: `--shards` changes it.
            shards: 1,
            ..TrainerConfig::new(0)
        };
        TrainConfig {
            dataset: DatasetName::Mnist,
            data_dir: None,
            limit: None,
            epochs: 20,
            batch_size: 128,
            checkpoint_every: 500,
            log_every: 10,
            workers: 2,
            world_size: 1,
            trainer,
        }
    }

    /// The reference run of SPEC.md, unchanged.
    fn seed_preset() -> Self {
        RunConfig {
            preset: Preset::Seed,
            model: UNetConfig::new(),
            schedule: Schedule::default(),
            train: Self::base_train(),
            sampler: SamplerConfig::reference(),
            sample_weights: Weights::Model,
            guidance: 1.0,
            preview: PreviewConfig {
                n: 81,
                // The preset's own sampler: this ε model has no label
                // dropout, so no guidance, and DPM-Solver++ without it
                // misjudged it (57.5% where the reference sampler drew
                // 91.7%, docs/quality.md).
                quality: Some(QualityProbe { per_class: 20 }),
            },
            distill: None,
        }
    }

    /// Chosen by measurement within about 10 minutes of CPU training
    /// (docs/quality.md): v prediction with Min-SNR-5 weighting,
    /// 28,800 distinct images seen once, DPM-Solver++ 20 steps with
    /// guidance 2.25 on the raw weights.
    fn quick_preset() -> Self {
        let base = Self::base_train();
        RunConfig {
            preset: Preset::Quick,
            model: UNetConfig::new()
                .with_attention(vec![false, false, true, true])
                .with_prediction(diffusion_core::Prediction::V),
            schedule: Schedule::default(),
            train: TrainConfig {
                epochs: 1,
                batch_size: 32,
                limit: Some(28_800),
                trainer: TrainerConfig {
                    lr: 2e-3,
                    lr_schedule: LrSchedule {
                        warmup_steps: 100,
                        cosine_decay: true,
                        min_factor: 0.05,
                    },
                    objective: Objective {
                        label_dropout: 0.1,
                        weighting: LossWeighting::MinSnr { gamma: 5.0 },
                    },
                    ema: EmaConfig {
                        decay: 0.995,
                        warmup: true,
                    },
                    ..base.trainer.clone()
                },
                ..base
            },
            sampler: SamplerConfig::new(SamplerKind::DpmSolverPp, 20),
            // After 900 steps the EMA still lags the fast-moving weights:
            // the raw weights measured better (98.6% against 97.8%).
            sample_weights: Weights::Model,
            guidance: 2.25,
            preview: PreviewConfig {
                n: 20,
                quality: Some(QualityProbe { per_class: 20 }),
            },
            distill: None,
        }
    }

    /// `quick` on all of MNIST for 5 epochs, sampled from the EMA with
    /// guidance 1.5 (measured in docs/quality.md: 3 epochs at guidance 1.6
    /// gave 99.5% and Fréchet 1.11x the floor, 5 epochs at 1.5 give 99.7%
    /// and 0.96x).
    fn full_preset() -> Self {
        let mut c = RunConfig::preset(Preset::Quick);
        c.preset = Preset::Full;
        let t = &mut c.train;
        t.limit = None;
        t.epochs = 5;
        t.batch_size = 64;
        t.checkpoint_every = 200;
        let trainer = &mut t.trainer;
        trainer.lr_schedule.warmup_steps = 200;
        trainer.objective.weighting = LossWeighting::Uniform;
        trainer.ema.decay = 0.999;
        c.sample_weights = Weights::Ema;
        c.guidance = 1.5;
        c
    }

    /// Seconds on a CPU: for tests.
    fn tiny_preset() -> Self {
        let base = Self::base_train();
        RunConfig {
            preset: Preset::Tiny,
            model: UNetConfig::tiny(),
            schedule: Schedule::default(),
            train: TrainConfig {
                epochs: 2,
                batch_size: 32,
                limit: Some(512),
                checkpoint_every: 0,
                log_every: 1,
                trainer: TrainerConfig {
                    lr: 2e-3,
                    objective: Objective {
                        label_dropout: 0.1,
                        ..Objective::default()
                    },
                    ema: EmaConfig {
                        decay: 0.99,
                        warmup: true,
                    },
                    ..base.trainer.clone()
                },
                ..base
            },
            sampler: SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 8),
            sample_weights: Weights::Ema,
            guidance: 1.0,
            preview: PreviewConfig { n: 10, quality: None },
            distill: None,
        }
    }

    /// The library trainer's settings for a run of `total_steps` steps;
    /// batches are sharded over threads only on the CPU backend.
    pub fn trainer_config(&self, total_steps: u64, cpu: bool) -> TrainerConfig {
        TrainerConfig {
            shards: if cpu { self.train.trainer.shards.max(1) } else { 1 },
            total_steps,
            ..self.train.trainer.clone()
        }
    }

    /// What every replica of a data-parallel run must agree on before
    /// training, besides the step and the weights: the recipe (model,
    /// schedule, data, epochs, batch, the trainer's settings, the world
    /// size), without per-machine choices (threads, workers, folders).
    /// Replicas compare it (feature `collective`) before the first step.
    pub fn recipe(&self, total_steps: u64) -> Vec<u8> {
        let mut trainer = serde_json::to_value(self.trainer_config(total_steps, false)).unwrap_or_default();
        if let Some(fields) = trainer.as_object_mut() {
            // Threads per replica: a per-machine choice, not part of the recipe.
            fields.remove("shards");
        }
        serde_json::json!({
            "model": self.model,
            "schedule": self.schedule,
            "epochs": self.train.epochs,
            "batch": self.train.batch_size,
            "trainer": trainer,
            "dataset": self.train.dataset,
            "limit": self.train.limit,
            // Every node must count the same replicas (--devices × --nodes).
            "world": self.train.world_size,
        })
        .to_string()
        .into_bytes()
    }

    /// The noise schedule of the run (T = the model's `num_steps`).
    pub fn noise_schedule(&self) -> Result<NoiseSchedule, ConfigError> {
        NoiseSchedule::new(self.schedule, self.model.num_steps).map_err(|e| ConfigError(e.to_string()))
    }

    /// A distilled run samples as it was trained: deterministic DDIM on the
    /// trailing grid, at most T/2 steps.
    fn check_distilled(&self, d: &DistillFrom) -> Result<(), ConfigError> {
        let s = &self.sampler;
        if s.kind != (SamplerKind::Ddim { eta: 0.0 }) || s.spacing != Spacing::Trailing {
            bail!("sampler: a distilled run samples with DDIM, eta 0, trailing spacing (as it was trained)");
        }
        if 2 * s.steps > self.model.num_steps {
            bail!(
                "sampler.steps (--steps): a distilled student takes at most T/2 = {} steps, got {}",
                self.model.num_steps / 2,
                s.steps
            );
        }
        if !(d.guidance.is_finite() && d.guidance >= 0.0) {
            bail!("distill.guidance must be a number >= 0, got {}", d.guidance);
        }
        Ok(())
    }

    /// Checks every value a run depends on, whether it came from flags or
    /// from a `config.json` edited by hand: one error naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        let at_least_1 = [
            ("epochs (--epochs)", t.epochs),
            ("batch_size (--batch)", t.batch_size),
            ("workers (--workers)", t.workers),
            ("shards (--shards)", t.trainer.shards),
            ("log_every", t.log_every as usize),
            ("preview.n", self.preview.n),
            ("sampler.steps (--steps)", self.sampler.steps),
        ];
        for (name, v) in at_least_1 {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        for (name, value, max) in [
            ("workers (--workers)", t.workers, 64),
            ("shards (--shards)", t.trainer.shards, 256),
            ("preview.n", self.preview.n, MAX_SAMPLES),
        ] {
            if value > max {
                bail!("{name} must be at most {max}, got {value}");
            }
        }
        if t.world_size == 0 || !t.batch_size.is_multiple_of(t.world_size) {
            bail!(
                "batch_size {} does not split over {} replicas; with --devices/--nodes, --batch is per device (or leave it out: the preset's batch is split)",
                t.batch_size,
                t.world_size
            );
        }
        if t.limit == Some(0) {
            bail!("limit (--limit) must be at least 1");
        }
        check_trainer(&t.trainer)?;
        if let Some(q) = &self.preview.quality {
            if !(1..=1000).contains(&q.per_class) {
                bail!(
                    "preview.quality.per_class (--quality-per-class) must be in 1..=1000, got {}",
                    q.per_class
                );
            }
            if t.dataset != DatasetName::Mnist
                || self.model.num_classes.is_none()
                || self.model.image_size != 28
            {
                bail!("the quality probe (--quality-per-class) judges class-conditional 28x28 MNIST digits only");
            }
        }
        if let Some(d) = &self.distill {
            self.check_distilled(d)?;
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            bail!(
                "guidance (--guidance) must be a number >= 0, got {}",
                self.guidance
            );
        }
        if t.trainer.objective.label_dropout > 0.0 && self.model.num_classes.is_none() {
            bail!("label_dropout (--label-dropout) needs a class-conditional model");
        }
        self.model.level_sizes().map_err(|e| ConfigError(e.to_string()))?;
        if self.model.image_channels != 1 {
            bail!(
                "model.image_channels must be 1 (grey images), got {}",
                self.model.image_channels
            );
        }
        let schedule = self.noise_schedule()?;
        self.sampler
            .validate(&schedule)
            .map_err(|e| ConfigError(e.to_string()))
    }

    /// Reads `RUN_DIR/config.json` (also the layout written before the
    /// trainer's settings were embedded, see [`upgrade`]) and validates it.
    pub fn load(run_dir: &Path) -> Result<Self, RunError> {
        let path = run_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| RunError::Read {
            path: path.clone(),
            dir: run_dir.to_path_buf(),
            source,
        })?;
        let not_valid = |e: serde_json::Error| RunError::Parse {
            path: path.clone(),
            source: e,
        };
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(not_valid)?;
        upgrade(&mut value);
        let config: RunConfig = serde_json::from_value(value).map_err(not_valid)?;
        config.validate().map_err(|source| RunError::Invalid {
            path: path.clone(),
            source,
        })?;
        Ok(config)
    }

    /// Writes `RUN_DIR/config.json` atomically.
    pub fn save(&self, run_dir: &Path) -> Result<(), RunError> {
        let path = run_dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| RunError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_bytes_atomically(&path, text.as_bytes()).map_err(|source| RunError::Write { path, source })
    }
}

/// The file a run's configuration is stored in.
pub const CONFIG_FILE: &str = "config.json";

/// Brings a config written by an older version to today's layout, in
/// place: `train.label_dropout` and `train.min_snr_gamma` become
/// `train.objective`, and the preview and probe's own samplers and
/// guidance (they now draw with the run's) are dropped. Today's layout
/// passes through unchanged.
pub fn upgrade(config: &mut serde_json::Value) {
    use serde_json::{json, Value};
    if let Some(train) = config.get_mut("train").and_then(Value::as_object_mut) {
        if !train.contains_key("objective") {
            let dropout = train.remove("label_dropout").unwrap_or(json!(0.0));
            let weighting = match train.remove("min_snr_gamma") {
                Some(gamma) if !gamma.is_null() => json!({ "min_snr": { "gamma": gamma } }),
                _ => json!("uniform"),
            };
            train.insert(
                "objective".into(),
                json!({ "label_dropout": dropout, "weighting": weighting }),
            );
        }
        train.entry("shards").or_insert(json!(1));
    }
    if let Some(preview) = config.get_mut("preview").and_then(Value::as_object_mut) {
        preview.remove("sampler");
        if let Some(quality) = preview.get_mut("quality").and_then(Value::as_object_mut) {
            quality.remove("sampler");
            quality.remove("guidance");
        }
    }
}

fn one() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

/// The trainer's settings that a run can get wrong: one error naming the
/// field and its flag.
fn check_trainer(t: &TrainerConfig) -> Result<(), ConfigError> {
    if !(t.lr > 0.0 && t.lr.is_finite() && t.lr <= 1.0) {
        bail!("lr (--lr) must be a number in (0, 1], got {}", t.lr);
    }
    if !(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite()) {
        bail!("adam_epsilon must be a positive number, got {}", t.adam_epsilon);
    }
    if let OptimizerKind::AdamW { weight_decay } = t.optimizer {
        if !(weight_decay.is_finite() && (0.0..1.0).contains(&weight_decay)) {
            bail!("weight decay (--weight-decay) must be a number in [0, 1), got {weight_decay}");
        }
    }
    if let Some(c) = t.grad_clip {
        if !(c.is_finite() && c > 0.0) {
            bail!("grad_clip (--grad-clip) must be a positive number, got {c}");
        }
    }
    let dropout = t.objective.label_dropout;
    if !(0.0..1.0).contains(&dropout) {
        bail!("label_dropout (--label-dropout) must be in [0, 1), got {dropout}");
    }
    if !(0.0..1.0).contains(&t.ema.decay) {
        bail!("ema.decay (--ema-decay) must be in [0, 1), got {}", t.ema.decay);
    }
    if let LossWeighting::MinSnr { gamma: g } = t.objective.weighting {
        if !(g > 0.0 && g.is_finite()) {
            bail!("min_snr_gamma (--min-snr-gamma) must be a positive number, got {g}");
        }
    }
    let lr = &t.lr_schedule;
    if !(0.0..=1.0).contains(&lr.min_factor) {
        bail!("lr_schedule.min_factor must be in [0, 1], got {}", lr.min_factor);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_preset_is_the_reference_run() {
        let c = RunConfig::preset(Preset::Seed);
        let t = &c.train.trainer;
        assert_eq!((c.train.epochs, c.train.batch_size, t.lr), (20, 128, 1e-3));
        assert_eq!(c.model.num_steps, 500);
        assert_eq!(t.objective.label_dropout, 0.0);
        assert_eq!(t.lr_schedule, LrSchedule::constant());
        assert_eq!(c.sampler, SamplerConfig::reference());
        assert_eq!(c.sampler.steps, 35);
    }

    #[test]
    fn the_shipped_pretrained_run_is_the_full_preset() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pretrained/mnist");
        let shipped = RunConfig::load(&dir).unwrap();
        let mut preset = RunConfig::preset(Preset::Full);
        // It trained in 4 CPU shards, the presets' default then (a machine
        // setting, outside the recipe; the presets take 1 since).
        preset.train.trainer.shards = 4;
        assert_eq!(
            serde_json::to_value(&shipped).unwrap(),
            serde_json::to_value(&preset).unwrap()
        );
    }

    /// The shipped run's config as written before the trainer's settings
    /// were embedded (label dropout and Min-SNR flat in `train`, preview and
    /// probe with their own samplers) reads as the same run.
    #[test]
    fn a_config_in_the_old_layout_reads_as_the_same_run() {
        let old = include_str!("../../tests/data/config-v1-full.json");
        let dir = std::env::temp_dir().join(format!("run-config-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), old).unwrap();
        let loaded = RunConfig::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // That run was the full preset of its day: 3 epochs, guidance 1.6,
        // 4 CPU shards.
        let mut then = RunConfig::preset(Preset::Full);
        then.train.epochs = 3;
        then.guidance = 1.6;
        then.train.trainer.shards = 4;
        assert_eq!(
            serde_json::to_value(&loaded).unwrap(),
            serde_json::to_value(then).unwrap()
        );
        let mut quick_v1 = serde_json::json!({
            "train": { "label_dropout": 0.1, "min_snr_gamma": 5.0 },
            "preview": { "n": 20, "sampler": {}, "quality": { "per_class": 20, "sampler": {}, "guidance": 2.0 } }
        });
        upgrade(&mut quick_v1);
        assert_eq!(
            quick_v1,
            serde_json::json!({
                "train": {
                    "objective": { "label_dropout": 0.1, "weighting": { "min_snr": { "gamma": 5.0 } } },
                    "shards": 1
                },
                "preview": { "n": 20, "quality": { "per_class": 20 } }
            })
        );
    }

    /// Replicas agree on the recipe whatever their machine: threads,
    /// workers and folders are left out; the learning rate, the batch and
    /// the world size are in.
    #[test]
    fn the_recipe_holds_the_run_and_not_the_machine() {
        let base = RunConfig::preset(Preset::Tiny);
        let recipe = base.recipe(100);
        let mut machine = base.clone();
        machine.train.trainer.shards = 7;
        machine.train.workers = 3;
        machine.train.data_dir = Some(PathBuf::from("/elsewhere"));
        assert_eq!(machine.recipe(100), recipe);
        assert_eq!(
            base.trainer_config(100, true).shards,
            base.train.trainer.shards.max(1)
        );

        let mut lr = base.clone();
        lr.train.trainer.lr *= 2.0;
        let mut batch = base.clone();
        batch.train.batch_size += 1;
        let mut world = base.clone();
        world.train.world_size += 1;
        for other in [lr, batch, world] {
            assert_ne!(other.recipe(100), recipe);
        }
        assert_ne!(base.recipe(101), recipe, "the total steps set the schedule");
    }

    /// A student copies its teacher's model and data, samples in its own
    /// steps without guidance, and keeps the teacher's guidance for the
    /// lessons; a hand-edited sampler it was not trained for is refused.
    #[test]
    fn a_distilled_config_samples_as_it_is_trained() {
        let teacher = RunConfig::preset(Preset::Full);
        let c = RunConfig::distilled(Path::new("runs/full"), &teacher, 4).unwrap();
        assert_eq!(
            serde_json::to_value(&c.model).unwrap(),
            serde_json::to_value(&teacher.model).unwrap()
        );
        assert_eq!(c.train.dataset, teacher.train.dataset);
        assert_eq!(c.sampler, SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 4));
        assert_eq!(c.guidance, 1.0);
        let from = c.distill.clone().unwrap();
        assert_eq!(
            (from.teacher.as_path(), from.guidance),
            (Path::new("runs/full"), teacher.guidance)
        );
        assert_eq!(c.train.trainer.objective.label_dropout, 0.0);
        let back: RunConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.distill, c.distill);

        let mut dpm = c.clone();
        dpm.sampler = SamplerConfig::new(SamplerKind::DpmSolverPp, 4);
        assert!(dpm.validate().unwrap_err().0.contains("DDIM"));
        assert!(RunConfig::distilled(Path::new("t"), &teacher, 251).is_err());
        // An ordinary run's config.json has no `distill` key.
        assert!(!serde_json::to_string(&teacher).unwrap().contains("distill"));
    }

    #[test]
    fn config_round_trips_through_json() {
        for p in [Preset::Seed, Preset::Quick, Preset::Tiny, Preset::Full] {
            let c = RunConfig::preset(p);
            let json = serde_json::to_value(&c).unwrap();
            let back: RunConfig = serde_json::from_value(json.clone()).unwrap();
            assert_eq!(serde_json::to_value(&back).unwrap(), json);
        }
    }
}

#[cfg(test)]
mod prediction_names {
    use diffusion_core::Prediction;

    #[test]
    fn x0_is_written_as_x0_and_the_old_name_sample_still_reads() {
        assert_eq!(serde_json::to_string(&Prediction::X0).unwrap(), "\"x0\"");
        assert_eq!(
            serde_json::from_str::<Prediction>("\"x0\"").unwrap(),
            Prediction::X0
        );
        assert_eq!(
            serde_json::from_str::<Prediction>("\"sample\"").unwrap(),
            Prediction::X0
        );
    }
}
