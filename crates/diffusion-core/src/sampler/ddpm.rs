//! DDPM ancestral sampling (Ho et al. 2020) on any timestep subsequence.
//!
//! From t to s < t, with a = ᾱ(t), a' = ᾱ(s), α = a/a', β = 1 − α, the
//! posterior q(x_s | x_t, x0) has
//! mean √a'·β/(1 − a)·x̂0 + √α·(1 − a')/(1 − a)·x_t and
//! variance β·(1 − a')/(1 − a), which is 0 on the last step to t = 0.

use burn::tensor::{backend::Backend, Tensor};

use super::{add_noise, Sampler, Steps};
use crate::prediction::Prediction;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Ddpm {
    steps: Steps,
}

impl Ddpm {
    pub(crate) fn new(steps: Steps) -> Self {
        Self { steps }
    }

    /// Posterior variance of step i.
    fn variance(&self, i: usize) -> f64 {
        let (a, a_next) = self.steps.alpha_bars(i);
        (1.0 - a / a_next) * (1.0 - a_next) / (1.0 - a)
    }
}

impl<B: Backend> Sampler<B> for Ddpm {
    fn timesteps(&self) -> &[usize] {
        &self.steps.timesteps
    }

    fn needs_noise(&self, i: usize) -> bool {
        self.variance(i) > 0.0
    }

    fn step(
        &mut self,
        i: usize,
        x: Tensor<B, 4>,
        output: Tensor<B, 4>,
        prediction: Prediction,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let (a, a_next) = self.steps.alpha_bars(i);
        let x0 = self.steps.estimate(i, &x, output, prediction).x0;
        let alpha = a / a_next;
        let beta = 1.0 - alpha;
        let mean = x0.mul_scalar(a_next.sqrt() * beta / (1.0 - a))
            + x.mul_scalar(alpha.sqrt() * (1.0 - a_next) / (1.0 - a));
        let var = self.variance(i);
        if var > 0.0 {
            add_noise(mean, noise, var.sqrt())
        } else {
            mean
        }
    }
}
