//! Noise schedules, the forward process and reverse-process samplers for
//! denoising diffusion models, generic over any [burn] backend.
//!
//! This crate does no I/O and names no backend. Bring your own model by
//! implementing [`Denoiser`] (or pass a closure), pick a [`SamplerConfig`],
//! and call [`sample()`](fn@sample):
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::{Distribution, Int, Tensor};
//! use diffusion_core::{sample, BackendNoise, NoiseSchedule, SamplerConfig, SamplerKind};
//!
//! type B = Flex;
//! let device = Default::default();
//!
//! // The reference schedule: cosine, T = 500.
//! let schedule = NoiseSchedule::reference();
//!
//! // A stand-in for a trained network: it predicts ε = 0.1·x_t. Any
//! // `Fn(x_t, t, classes) -> ε` is a denoiser; so is a struct implementing
//! // `Denoiser`, which may also say it predicts x0 or v instead.
//! let model = |x: Tensor<B, 4>, _t: usize, _c: Option<Tensor<B, 1, Int>>| x.mul_scalar(0.1);
//!
//! // DDIM, 10 steps from t = T to t = 0, deterministic (η = 0).
//! let mut sampler = SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 10).build::<B>(&schedule).unwrap();
//!
//! let x_t = Tensor::<B, 4>::random([4, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
//! let x0 = sample(&model, sampler.as_mut(), x_t, None, &mut BackendNoise, |step, _x| {
//!     // Called after every step: progress bars, animation frames.
//!     assert!(step.t > step.t_next);
//! });
//! assert_eq!(x0.dims(), [4, 1, 28, 28]);
//! ```
//!
//! Training: an [`Objective`] draws per-sample t, ε and label drops for a
//! batch and gives the loss of any [`BatchDenoiser`] on it (ε, x0 or v
//! targets, plain or Min-SNR-γ weighting); see [`objective`].
//!
//! Modules: [`schedule`] (ᾱ tables and how the end of a schedule is
//! handled), [`forward`], [`prediction`] (ε, x0 and v), [`objective`]
//! (the training loss), [`timesteps`] (spacings), [`sampler`] (the
//! samplers), [`denoiser`], [`guidance`], [`rng`] (the seeded generator)
//! and [`mod@sample`].

pub mod denoiser;
pub mod forward;
pub mod guidance;
pub mod objective;
pub mod prediction;
pub mod rng;
pub mod sample;
pub mod sampler;
pub mod schedule;
pub mod timesteps;

#[cfg(test)]
pub(crate) mod test_util;

pub use denoiser::{BatchDenoiser, Denoiser, Labels};
pub use forward::ForwardProcess;
pub use guidance::{Guided, NO_CLASS};
pub use objective::{LossWeighting, Objective, TrainingBatch};
pub use prediction::{Estimate, Prediction};
pub use sample::{sample, BackendNoise, NoiseSource, SeededNoise, StepInfo};
pub use sampler::{Clip, Sampler, SamplerConfig, SamplerKind};
pub use schedule::{NoiseSchedule, Schedule};
pub use timesteps::Spacing;

/// A schedule or sampler that cannot be built as configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    /// The noise schedule's parameters or step count are invalid; the message says which.
    #[error("invalid noise schedule: {0}")]
    InvalidSchedule(String),
    /// The sampler's parameters (η, clip range, timesteps) are invalid; the message says which.
    #[error("invalid sampler: {0}")]
    InvalidSampler(String),
}
