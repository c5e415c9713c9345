//! The reference notebook's sampler, kept exactly (SPEC.md, "Sampling, as
//! the reference does it").
//!
//! With a = ᾱ(t\[i\]), a' = ᾱ(t\[i+1\]):
//! β = clip((1 − a/a')·(1 − a')/(1 − a), 0, 0.999),
//! x ← (x − β·ε̂/√(1 − a))/√(1 − β), then x += √β·√η·z when η > 0.
//!
//! The mean uses the posterior variance β where DDPM uses 1 − a/a', and the
//! noise is scaled by √η rather than η: it is neither DDPM nor DDIM, and is
//! kept so that outputs can be compared with the reference.

use burn::tensor::{backend::Backend, Tensor};

use super::{add_noise, Sampler, Steps};
use crate::prediction::Prediction;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ReferenceSampler {
    steps: Steps,
    eta: f64,
}

impl ReferenceSampler {
    pub(crate) fn new(steps: Steps, eta: f64) -> Self {
        Self { steps, eta }
    }

    /// The β of step i (the posterior variance, clipped at 0.999).
    fn beta(&self, i: usize) -> f64 {
        let (a, a_next) = self.steps.alpha_bars(i);
        ((1.0 - a / a_next) * (1.0 - a_next) / (1.0 - a)).clamp(0.0, 0.999)
    }
}

impl<B: Backend> Sampler<B> for ReferenceSampler {
    fn timesteps(&self) -> &[usize] {
        &self.steps.timesteps
    }

    fn needs_noise(&self, _i: usize) -> bool {
        self.eta > 0.0
    }

    fn step(
        &mut self,
        i: usize,
        x: Tensor<B, 4>,
        output: Tensor<B, 4>,
        prediction: Prediction,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let (a, _) = self.steps.alpha_bars(i);
        let eps = self.steps.estimate(i, &x, output, prediction).eps;
        let beta = self.beta(i);
        let x = (x - eps.mul_scalar(beta / (1.0 - a).sqrt())).div_scalar((1.0 - beta).sqrt());
        if self.eta > 0.0 {
            add_noise(x, noise, beta.sqrt() * self.eta.sqrt())
        } else {
            x
        }
    }
}
