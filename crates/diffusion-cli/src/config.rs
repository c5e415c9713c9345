//! A run's configuration ([`diffusion_train::run`]) and the sampling flags
//! that `sample` and `eval` apply to it.

use anyhow::{bail, Result};
use diffusion_core::{Clip, SamplerConfig, SamplerKind};
pub use diffusion_train::run::{Preset, QualityProbe, RunConfig, Weights, CONFIG_FILE};

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
        if w != 1.0 && run.train.trainer.objective.label_dropout == 0.0 {
            eprintln!("warning: this model was trained without label dropout, so its unconditional branch is untrained; --guidance may do harm");
        }
        Ok(w)
    }
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
