//! Reverse-process samplers.
//!
//! Every sampler is built from a [`SamplerConfig`] with its timesteps fixed
//! at build time, and moves x one step at a time through
//! [`Sampler::step`], which takes the noise it adds as an argument so that
//! runs are reproducible and testable. [`crate::sample()`](fn@crate::sample) drives the loop.
//!
//! | kind | what it is | noise |
//! |---|---|---|
//! | [`SamplerKind::Reference`] | the reference notebook's loop, kept exactly | √β·√η·z |
//! | [`SamplerKind::Ddpm`] | ancestral sampling with the posterior q(x_s \| x_t, x̂0) (Ho et al. 2020) | posterior σ |
//! | [`SamplerKind::Ddim`] | Song et al. (2020), eq. 12; η = 0 deterministic, η = 1 equals DDPM | η·σ_DDPM |
//! | [`SamplerKind::DpmSolverPp`] | DPM-Solver++(2M) (Lu et al. 2022), for 10–20 steps | none |

mod ddim;
mod ddpm;
mod dpm_solver;
mod reference;

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverPp;
pub use reference::ReferenceSampler;

use crate::prediction::{Estimate, Prediction};
use crate::schedule::NoiseSchedule;
use crate::timesteps::{self, Spacing};
use crate::CoreError;

/// A reverse-process sampler with fixed timesteps `t[0]` > … > `t[n]`.
pub trait Sampler<B: Backend> {
    /// The timesteps, strictly decreasing; step i goes from `t[i]` to `t[i+1]`.
    fn timesteps(&self) -> &[usize];

    /// The number of steps (and denoiser evaluations), n.
    fn num_steps(&self) -> usize {
        self.timesteps().len() - 1
    }

    /// Whether step i adds noise, i.e. needs `noise` in [`Sampler::step`].
    fn needs_noise(&self, i: usize) -> bool;

    /// Moves x from `t[i]` to `t[i+1]`, given the denoiser's `output` at
    /// (x, `t[i]`) in the form `prediction`, and standard normal `noise` of
    /// x's shape when [`Sampler::needs_noise`] says so.
    ///
    /// # Shapes
    /// `x`, `output`, `noise`: [B, C, H, W]; returns [B, C, H, W].
    ///
    /// # Panics
    /// If the step needs noise and `noise` is `None`.
    fn step(
        &mut self,
        i: usize,
        x: Tensor<B, 4>,
        output: Tensor<B, 4>,
        prediction: Prediction,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4>;

    /// Forgets any history kept between steps (multistep solvers), so the
    /// sampler can start a new trajectory.
    fn reset(&mut self) {}
}

/// The sampling algorithm and its own parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SamplerKind {
    /// The reference notebook's loop (SPEC.md); η = 0.1 there.
    Reference {
        /// Noise scale η ≥ 0: the added noise is √β·√η·z; 0 is deterministic.
        eta: f64,
    },
    /// DDPM ancestral sampling on any timestep subsequence.
    Ddpm,
    /// DDIM with η ≥ 0.
    Ddim {
        /// η ≥ 0: 0 is deterministic DDIM, 1 gives DDPM's posterior variance.
        eta: f64,
    },
    /// DPM-Solver++(2M), deterministic.
    DpmSolverPp,
}

/// Whether and where to clamp x̂0 before each update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clip {
    /// Use x̂0 as the denoiser gives it.
    Off,
    /// Clamp x̂0 to [lo, hi] (and recompute ε̂ from it).
    Range(f64, f64),
}

/// Everything that fixes a sampler: algorithm, step count, spacing, clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// The sampling algorithm and its parameters.
    pub kind: SamplerKind,
    /// Number of steps (denoiser evaluations; the reference spacing makes
    /// one fewer, as the notebook does).
    pub steps: usize,
    /// How the sampled timesteps are picked from 0..=T.
    pub spacing: Spacing,
    /// Whether and where x̂0 is clamped before each update.
    pub clip: Clip,
}

impl SamplerConfig {
    /// A sampler of `kind` with `steps` steps and this kind's defaults:
    /// the reference sampler uses the reference spacing and no clipping, as
    /// the notebook does; the others use trailing spacing (T → 0) and clamp
    /// x̂0 to the data range [−1, 1].
    pub fn new(kind: SamplerKind, steps: usize) -> Self {
        match kind {
            SamplerKind::Reference { .. } => Self {
                kind,
                steps,
                spacing: Spacing::Reference,
                clip: Clip::Off,
            },
            _ => Self {
                kind,
                steps,
                spacing: Spacing::Trailing,
                clip: Clip::Range(-1.0, 1.0),
            },
        }
    }

    /// The reference notebook's sampler: 35 steps, η = 0.1.
    pub fn reference() -> Self {
        Self::new(SamplerKind::Reference { eta: 0.1 }, 35)
    }

    /// Sets the spacing.
    pub fn with_spacing(mut self, spacing: Spacing) -> Self {
        self.spacing = spacing;
        self
    }

    /// Sets x̂0 clipping.
    pub fn with_clip(mut self, clip: Clip) -> Self {
        self.clip = clip;
        self
    }

    /// Builds the sampler for `schedule`.
    pub fn build<B: Backend>(&self, schedule: &NoiseSchedule) -> Result<Box<dyn Sampler<B>>, CoreError> {
        let ts = self.spacing.timesteps(schedule.num_steps(), self.steps)?;
        self.build_with_timesteps(schedule, ts)
    }

    /// Checks the configuration against a schedule without building
    /// anything: what [`SamplerConfig::build`] would refuse.
    pub fn validate(&self, schedule: &NoiseSchedule) -> Result<(), CoreError> {
        let ts = self.spacing.timesteps(schedule.num_steps(), self.steps)?;
        timesteps::validate(&ts, schedule.num_steps())?;
        self.check_parameters().map(|_| ())
    }

    /// The clip range and η checked; returns η where the kind has one.
    fn check_parameters(&self) -> Result<Option<f64>, CoreError> {
        if let Clip::Range(lo, hi) = self.clip {
            // Unordered bounds (a NaN) fail as well as lo ≥ hi.
            if lo.partial_cmp(&hi) != Some(std::cmp::Ordering::Less) {
                return Err(CoreError::InvalidSampler(format!(
                    "clip range must have lo < hi, got [{lo}, {hi}]"
                )));
            }
        }
        match self.kind {
            SamplerKind::Reference { eta } | SamplerKind::Ddim { eta } => {
                if eta.is_finite() && eta >= 0.0 {
                    Ok(Some(eta))
                } else {
                    Err(CoreError::InvalidSampler(format!(
                        "eta must be a finite number >= 0, got {eta}"
                    )))
                }
            }
            SamplerKind::Ddpm | SamplerKind::DpmSolverPp => Ok(None),
        }
    }

    /// Builds the sampler on a hand-made, strictly decreasing timestep list
    /// (the config's `steps` and `spacing` are ignored).
    pub fn build_with_timesteps<B: Backend>(
        &self,
        schedule: &NoiseSchedule,
        timesteps: Vec<usize>,
    ) -> Result<Box<dyn Sampler<B>>, CoreError> {
        timesteps::validate(&timesteps, schedule.num_steps())?;
        let eta = self.check_parameters()?.unwrap_or(0.0);
        let steps = Steps::new(schedule, timesteps, self.clip);
        Ok(match self.kind {
            SamplerKind::Reference { .. } => Box::new(ReferenceSampler::new(steps, eta)),
            SamplerKind::Ddpm => Box::new(Ddpm::new(steps)),
            SamplerKind::Ddim { .. } => Box::new(Ddim::new(steps, eta)),
            SamplerKind::DpmSolverPp => Box::new(DpmSolverPp::new(steps)),
        })
    }
}

/// What all samplers share: the timesteps, ᾱ at each, and clipping.
#[derive(Debug, Clone)]
pub(crate) struct Steps {
    timesteps: Vec<usize>,
    /// ᾱ(t\[i\]) for each timestep.
    alpha_bar: Vec<f64>,
    clip: Clip,
}

impl Steps {
    pub(crate) fn new(schedule: &NoiseSchedule, timesteps: Vec<usize>, clip: Clip) -> Self {
        let alpha_bar = timesteps.iter().map(|&t| schedule.alpha_bar(t)).collect();
        Self {
            timesteps,
            alpha_bar,
            clip,
        }
    }

    /// (ᾱ at t\[i\], ᾱ at t\[i+1\]).
    pub(crate) fn alpha_bars(&self, i: usize) -> (f64, f64) {
        (self.alpha_bar[i], self.alpha_bar[i + 1])
    }

    /// The (x̂0, ε̂) pair at step i, clipped as configured.
    pub(crate) fn estimate<B: Backend>(
        &self,
        i: usize,
        x: &Tensor<B, 4>,
        output: Tensor<B, 4>,
        prediction: Prediction,
    ) -> Estimate<B> {
        let a = self.alpha_bar[i];
        let est = prediction.to_estimate(x.clone(), output, a);
        match self.clip {
            Clip::Off => est,
            Clip::Range(lo, hi) => est.clip(x.clone(), a, lo, hi),
        }
    }
}

/// Adds `scale · noise` to `x`, insisting that the noise was given.
pub(crate) fn add_noise<B: Backend>(
    x: Tensor<B, 4>,
    noise: Option<Tensor<B, 4>>,
    scale: f64,
) -> Tensor<B, 4> {
    let z = noise.expect("this sampler step adds noise: pass `noise` when `needs_noise` is true");
    x + z.mul_scalar(scale)
}
