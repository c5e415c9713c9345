//! A run's configuration: every choice of a training run, saved as
//! `config.json` in the run directory so that `sample` and `--resume` need
//! no flag repeated.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diffusion_core::{Clip, SamplerConfig, SamplerKind, Schedule};
use diffusion_data::DatasetName;
use diffusion_model::UNetConfig;
use diffusion_train::EmaConfig;
pub use diffusion_train::LrSchedule;
use serde::{Deserialize, Serialize};

use crate::fsutil::write_bytes_atomically;

/// Named starting points for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    /// The best digits this project makes on a CPU in about 45 minutes (2
    /// cores): the quick U-Net predicting v, all 60,000 images x 3 epochs
    /// at batch 64, cosine learning rate, EMA 0.999; samples with
    /// DPM-Solver++ (20 steps) and guidance. `data/pretrained/mnist` is this
    /// preset's run.
    Full,
}

/// Which weights sampling uses by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub dataset: DatasetName,
    /// Where the IDX files are; `None` = the bundled MNIST (or a download).
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training images (`None` = all).
    pub limit: Option<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    /// Adam ε; 1e-8 as PyTorch (burn's default is 1e-5).
    pub adam_epsilon: f64,
    pub seed: u64,
    /// Probability of training a sample without its label (classifier-free
    /// guidance); 0 in the seed preset.
    pub label_dropout: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023); `None` = plain MSE.
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    pub ema: EmaConfig,
    /// Save a checkpoint every N steps (0 = only at epoch ends).
    pub checkpoint_every: u64,
    /// Read the loss back from the device every N steps (progress, metrics).
    pub log_every: u64,
    /// Threads preparing batches.
    pub workers: usize,
    /// On the CPU backend, pieces each batch is split into and computed in
    /// parallel threads (the gradient is that of the whole batch).
    #[serde(default = "one")]
    pub shards: usize,
    /// Data-parallel replicas (devices × nodes) of the last session; each
    /// took `batch_size / world_size` of every batch. Informative: a run
    /// may resume with another world size that divides `batch_size`.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Adam (the default) or AdamW with its weight decay.
    #[serde(default)]
    pub optimizer: diffusion_train::OptimizerKind,
    /// Clip the gradients' global norm to this before each step.
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

/// The grid drawn after every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewConfig {
    /// Number of images (classes cycle 0, 1, 2, …).
    pub n: usize,
    /// The sampler that draws them.
    pub sampler: SamplerConfig,
    /// The quality measured after every epoch (MNIST runs only).
    #[serde(default)]
    pub quality: Option<QualityProbe>,
}

/// A small evaluation after every epoch: `per_class` digits of each class,
/// judged by the classifier `eval` uses; accuracy and Fréchet distance go
/// to `quality.csv` and the run's `training.png`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityProbe {
    /// Digits drawn per class.
    pub per_class: usize,
    /// How they are drawn.
    pub sampler: SamplerConfig,
    /// Classifier-free guidance scale.
    pub guidance: f64,
}

/// Everything about a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub preset: Preset,
    pub model: UNetConfig,
    pub schedule: Schedule,
    pub train: TrainConfig,
    /// `sample`'s default sampler.
    pub sampler: SamplerConfig,
    /// `sample`'s default weights.
    pub sample_weights: Weights,
    /// `sample`'s and `eval`'s default classifier-free guidance scale.
    #[serde(default = "one_f64")]
    pub guidance: f64,
    pub preview: PreviewConfig,
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

    /// What every preset starts from: SPEC.md's training run.
    fn base_train() -> TrainConfig {
        let ema = EmaConfig {
            decay: 0.999,
            warmup: true,
        };
        TrainConfig {
            dataset: DatasetName::Mnist,
            data_dir: None,
            limit: None,
            epochs: 20,
            batch_size: 128,
            lr: 1e-3,
            lr_schedule: LrSchedule::constant(),
            adam_epsilon: 1e-8,
            seed: 0,
            label_dropout: 0.0,
            min_snr_gamma: None,
            ema,
            checkpoint_every: 500,
            log_every: 10,
            workers: 2,
            shards: 2,
            world_size: 1,
            optimizer: diffusion_train::OptimizerKind::Adam,
            grad_clip: None,
        }
    }

    /// The reference run of SPEC.md, unchanged.
    fn seed_preset() -> Self {
        let (preset, base_train) = (Preset::Seed, Self::base_train());
        RunConfig {
            preset,
            model: UNetConfig::new(),
            schedule: Schedule::default(),
            train: base_train,
            sampler: SamplerConfig::reference(),
            sample_weights: Weights::Model,
            guidance: 1.0,
            preview: PreviewConfig {
                n: 81,
                sampler: SamplerConfig::reference(),
                // The preset's own sampler: this ε model has no label
                // dropout, so no guidance, and DPM-Solver++ without it
                // misjudged it (57.5% where the reference sampler drew
                // 91.7%, docs/quality.md).
                quality: Some(QualityProbe {
                    per_class: 20,
                    sampler: SamplerConfig::reference(),
                    guidance: 1.0,
                }),
            },
        }
    }

    /// Chosen by measurement within about 10 minutes of CPU training
    /// (docs/quality.md): v prediction with Min-SNR-5 weighting,
    /// 28,800 distinct images seen once, DPM-Solver++ 20 steps with
    /// guidance 2.25 on the raw weights.
    fn quick_preset() -> Self {
        let (preset, base_train) = (Preset::Quick, Self::base_train());
        RunConfig {
            preset,
            model: UNetConfig::new()
                .with_attention(vec![false, false, true, true])
                .with_prediction(diffusion_core::Prediction::V),
            schedule: Schedule::default(),
            train: TrainConfig {
                epochs: 1,
                batch_size: 32,
                lr: 2e-3,
                lr_schedule: LrSchedule {
                    warmup_steps: 100,
                    cosine_decay: true,
                    min_factor: 0.05,
                },
                label_dropout: 0.1,
                min_snr_gamma: Some(5.0),
                ema: EmaConfig {
                    decay: 0.995,
                    warmup: true,
                },
                limit: Some(28_800),
                shards: 4,
                ..base_train
            },
            sampler: SamplerConfig::new(SamplerKind::DpmSolverPp, 20),
            // After 900 steps the EMA still lags the fast-moving weights:
            // the raw weights measured better (98.6% against 97.8%).
            sample_weights: Weights::Model,
            guidance: 2.25,
            preview: PreviewConfig {
                n: 20,
                sampler: SamplerConfig::new(SamplerKind::DpmSolverPp, 20),
                quality: Some(QualityProbe {
                    per_class: 20,
                    sampler: SamplerConfig::new(SamplerKind::DpmSolverPp, 10),
                    guidance: 2.0,
                }),
            },
        }
    }

    /// `quick` on all of MNIST for 3 epochs, sampled from the EMA.
    fn full_preset() -> Self {
        let mut c = RunConfig::preset(Preset::Quick);
        c.preset = Preset::Full;
        let t = &mut c.train;
        t.limit = None;
        t.epochs = 3;
        t.batch_size = 64;
        t.lr_schedule.warmup_steps = 200;
        t.min_snr_gamma = None;
        t.ema.decay = 0.999;
        t.checkpoint_every = 200;
        c.sample_weights = Weights::Ema;
        c.guidance = 1.6;
        c
    }

    /// Seconds on a CPU: for tests.
    fn tiny_preset() -> Self {
        let (preset, base_train) = (Preset::Tiny, Self::base_train());
        RunConfig {
            preset,
            model: UNetConfig::tiny(),
            schedule: Schedule::default(),
            train: TrainConfig {
                epochs: 2,
                batch_size: 32,
                lr: 2e-3,
                limit: Some(512),
                label_dropout: 0.1,
                ema: EmaConfig {
                    decay: 0.99,
                    warmup: true,
                },
                checkpoint_every: 0,
                log_every: 1,
                ..base_train
            },
            sampler: SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 8),
            sample_weights: Weights::Ema,
            guidance: 1.0,
            preview: PreviewConfig {
                n: 10,
                sampler: SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 4),
                quality: None,
            },
        }
    }

    /// The library trainer's settings for a run of `total_steps` steps;
    /// batches are sharded over threads only on the CPU backend.
    pub fn trainer_config(&self, total_steps: u64, cpu: bool) -> diffusion_train::TrainerConfig {
        let t = &self.train;
        diffusion_train::TrainerConfig {
            lr: t.lr,
            lr_schedule: t.lr_schedule,
            adam_epsilon: t.adam_epsilon,
            seed: t.seed,
            objective: diffusion_core::Objective {
                label_dropout: t.label_dropout,
                weighting: match t.min_snr_gamma {
                    Some(gamma) => diffusion_core::LossWeighting::MinSnr { gamma },
                    None => diffusion_core::LossWeighting::Uniform,
                },
            },
            ema: t.ema,
            shards: if cpu { t.shards.max(1) } else { 1 },
            total_steps,
            optimizer: t.optimizer,
            grad_clip: t.grad_clip,
        }
    }

    /// Checks every value a run depends on, whether it came from flags or
    /// from a `config.json` edited by hand: one error naming the field.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let at_least_1 = [
            ("epochs (--epochs)", t.epochs),
            ("batch_size (--batch)", t.batch_size),
            ("workers (--workers)", t.workers),
            ("shards (--shards)", t.shards),
            ("log_every", t.log_every as usize),
            ("preview.n", self.preview.n),
            ("sampler.steps (--steps)", self.sampler.steps),
            ("preview.sampler.steps", self.preview.sampler.steps),
        ];
        for (name, v) in at_least_1 {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        for (name, value, max) in [
            ("workers (--workers)", t.workers, 64),
            ("shards (--shards)", t.shards, 256),
            ("preview.n", self.preview.n, crate::sample::MAX_SAMPLES),
        ] {
            if value > max {
                bail!("{name} must be at most {max}, got {value}");
            }
        }
        if t.world_size == 0 || t.batch_size % t.world_size != 0 {
            bail!(
                "batch_size {} does not split over {} replicas; with --devices/--nodes, --batch is per device (or leave it out: the preset's batch is split)",
                t.batch_size,
                t.world_size
            );
        }
        if t.limit == Some(0) {
            bail!("limit (--limit) must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr.is_finite() && t.lr <= 1.0) {
            bail!("lr (--lr) must be a number in (0, 1], got {}", t.lr);
        }
        if !(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite()) {
            bail!("adam_epsilon must be a positive number, got {}", t.adam_epsilon);
        }
        check_optimizer(t)?;
        if !(0.0..1.0).contains(&t.label_dropout) {
            bail!(
                "label_dropout (--label-dropout) must be in [0, 1), got {}",
                t.label_dropout
            );
        }
        if !(0.0..1.0).contains(&t.ema.decay) {
            bail!("ema.decay (--ema-decay) must be in [0, 1), got {}", t.ema.decay);
        }
        if let Some(g) = t.min_snr_gamma {
            if !(g > 0.0 && g.is_finite()) {
                bail!("min_snr_gamma (--min-snr-gamma) must be a positive number, got {g}");
            }
        }
        let lr = &t.lr_schedule;
        if !(0.0..=1.0).contains(&lr.min_factor) {
            bail!("lr_schedule.min_factor must be in [0, 1], got {}", lr.min_factor);
        }
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
            if !(q.guidance.is_finite() && q.guidance >= 0.0) {
                bail!(
                    "preview.quality.guidance must be a number >= 0, got {}",
                    q.guidance
                );
            }
        }
        if t.label_dropout > 0.0 && self.model.num_classes.is_none() {
            bail!("label_dropout (--label-dropout) needs a class-conditional model");
        }
        self.model.level_sizes()?;
        if self.model.image_channels != 1 {
            bail!(
                "model.image_channels must be 1 (grey images), got {}",
                self.model.image_channels
            );
        }
        let schedule = diffusion_core::NoiseSchedule::new(self.schedule, self.model.num_steps)?;
        for s in [&self.sampler, &self.preview.sampler] {
            s.validate(&schedule)?;
        }
        if let Some(q) = &self.preview.quality {
            q.sampler.validate(&schedule)?;
        }
        Ok(())
    }

    /// Reads and validates `RUN_DIR/config.json`.
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read the run's config; is {} a run directory made by `train`?",
                path.display(),
                run_dir.display()
            )
        })?;
        let config: RunConfig = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a valid run config (corrupt, or from another version)",
                path.display()
            )
        })?;
        config
            .validate()
            .with_context(|| format!("{}: invalid value", path.display()))?;
        Ok(config)
    }

    /// Writes `RUN_DIR/config.json` atomically.
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_bytes_atomically(&run_dir.join(CONFIG_FILE), text.as_bytes())
    }
}

pub const CONFIG_FILE: &str = "config.json";

fn one() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

/// clap's view of the samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerName {
    /// The reference notebook's loop (strided timesteps, its β and √η noise).
    Reference,
    /// DDPM ancestral sampling.
    Ddpm,
    /// DDIM with --eta (0 = deterministic).
    Ddim,
    /// DPM-Solver++(2M), for 10 to 20 steps.
    #[value(name = "dpm-solver++")]
    DpmSolverPp,
}

/// Sampling flags shared by `sample` and `eval`; left out, each takes the
/// run's default.
#[derive(Debug, clap::Args)]
pub struct SamplingFlags {
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerName>,
    /// Number of denoising steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Noise level of the reference and DDIM samplers (DDIM: 0 = deterministic, 1 = DDPM).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Clamp x̂0 to [-1, 1] at each step (true/false; default per sampler).
    #[arg(long)]
    pub clip: Option<bool>,
    /// Classifier-free guidance scale w: ε = ε_uncond + w·(ε_cond − ε_uncond);
    /// 1 is plain conditional sampling (default: the run's choice). Needs a
    /// model trained with label dropout.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Which weights: the EMA or the raw model (default: the run's choice).
    #[arg(long, value_enum)]
    pub weights: Option<Weights>,
}

impl SamplingFlags {
    /// The run's default sampler with these flags applied.
    pub fn sampler(&self, run: &RunConfig) -> Result<SamplerConfig> {
        sampler_from_flags(&run.sampler, self.sampler, self.steps, self.eta, self.clip)
    }

    /// The weights to sample from.
    pub fn weights(&self, run: &RunConfig) -> Weights {
        self.weights.unwrap_or(run.sample_weights)
    }

    /// The guidance scale, checked; warns when the run's model never learnt
    /// an unconditional branch.
    pub fn guidance(&self, run: &RunConfig) -> anyhow::Result<f64> {
        let w = self.guidance.unwrap_or(run.guidance);
        if !(w.is_finite() && w >= 0.0) {
            anyhow::bail!("--guidance must be a number >= 0, got {w}");
        }
        if w != 1.0 && run.train.label_dropout == 0.0 {
            eprintln!("warning: this model was trained without label dropout, so its unconditional branch is untrained; --guidance may do harm");
        }
        Ok(w)
    }
}

/// The optimizer's settings: AdamW's decay in [0, 1), a positive clip.
fn check_optimizer(t: &TrainConfig) -> Result<()> {
    if let diffusion_train::OptimizerKind::AdamW { weight_decay } = t.optimizer {
        if !(weight_decay.is_finite() && (0.0..1.0).contains(&weight_decay)) {
            bail!("weight decay (--weight-decay) must be a number in [0, 1), got {weight_decay}");
        }
    }
    if let Some(c) = t.grad_clip {
        if !(c.is_finite() && c > 0.0) {
            bail!("grad_clip (--grad-clip) must be a positive number, got {c}");
        }
    }
    Ok(())
}

/// Applies `sample`/`eval` flags to a run's default sampler.
pub fn sampler_from_flags(
    default: &SamplerConfig,
    name: Option<SamplerName>,
    steps: Option<usize>,
    eta: Option<f64>,
    clip: Option<bool>,
) -> Result<SamplerConfig> {
    let current_eta = match default.kind {
        SamplerKind::Reference { eta } | SamplerKind::Ddim { eta } => Some(eta),
        _ => None,
    };
    let mut config = match name {
        None => default.clone(),
        Some(name) => {
            let kind = match name {
                SamplerName::Reference => SamplerKind::Reference {
                    eta: current_eta.unwrap_or(0.1),
                },
                SamplerName::Ddpm => SamplerKind::Ddpm,
                SamplerName::Ddim => SamplerKind::Ddim { eta: 0.0 },
                SamplerName::DpmSolverPp => SamplerKind::DpmSolverPp,
            };
            let steps = if matches!(kind, SamplerKind::Reference { .. }) {
                35
            } else {
                default.steps
            };
            SamplerConfig::new(kind, steps)
        }
    };
    if let Some(steps) = steps {
        config.steps = steps;
    }
    if let Some(eta) = eta {
        config.kind = match config.kind {
            SamplerKind::Reference { .. } => SamplerKind::Reference { eta },
            SamplerKind::Ddim { .. } => SamplerKind::Ddim { eta },
            other => {
                bail!("--eta applies to the reference and ddim samplers only, not {other:?}; leave it out")
            }
        };
    }
    if steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if let Some(clip) = clip {
        config.clip = if clip { Clip::Range(-1.0, 1.0) } else { Clip::Off };
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_preset_is_the_reference_run() {
        let c = RunConfig::preset(Preset::Seed);
        assert_eq!((c.train.epochs, c.train.batch_size, c.train.lr), (20, 128, 1e-3));
        assert_eq!(c.model.num_steps, 500);
        assert_eq!(c.train.label_dropout, 0.0);
        assert_eq!(c.train.lr_schedule, LrSchedule::constant());
        assert_eq!(c.sampler, SamplerConfig::reference());
        assert_eq!(c.sampler.steps, 35);
    }

    #[test]
    fn the_shipped_pretrained_run_is_the_full_preset() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pretrained/mnist");
        let shipped = RunConfig::load(&dir).unwrap();
        let preset = RunConfig::preset(Preset::Full);
        assert_eq!(
            serde_json::to_value(&shipped).unwrap(),
            serde_json::to_value(&preset).unwrap()
        );
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
