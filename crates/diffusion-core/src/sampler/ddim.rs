//! DDIM (Song et al. 2020, eq. 12).
//!
//! From t to s < t, with a = ᾱ(t), a' = ᾱ(s):
//! σ = η·√((1 − a')/(1 − a))·√(1 − a/a'),
//! x_s = √a'·x̂0 + √(1 − a' − σ²)·ε̂ + σ·z.
//! η = 0 is deterministic; η = 1 gives DDPM's posterior variance, and then
//! the step is DDPM's step exactly (the mean coefficients coincide).

use burn::tensor::{backend::Backend, Tensor};

use super::{add_noise, Sampler, Steps};
use crate::prediction::Prediction;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Ddim {
    steps: Steps,
    eta: f64,
}

impl Ddim {
    pub(crate) fn new(steps: Steps, eta: f64) -> Self {
        Self { steps, eta }
    }

    /// σ of step i.
    fn sigma(&self, i: usize) -> f64 {
        let (a, a_next) = self.steps.alpha_bars(i);
        self.eta * ((1.0 - a_next) / (1.0 - a)).sqrt() * (1.0 - a / a_next).sqrt()
    }
}

impl<B: Backend> Sampler<B> for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.steps.timesteps
    }

    fn needs_noise(&self, i: usize) -> bool {
        self.sigma(i) > 0.0
    }

    fn step(
        &mut self,
        i: usize,
        x: Tensor<B, 4>,
        output: Tensor<B, 4>,
        prediction: Prediction,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let (_, a_next) = self.steps.alpha_bars(i);
        let est = self.steps.estimate(i, &x, output, prediction);
        let sigma = self.sigma(i);
        let dir = (1.0 - a_next - sigma * sigma).max(0.0).sqrt();
        let x = est.x0.mul_scalar(a_next.sqrt()) + est.eps.mul_scalar(dir);
        if sigma > 0.0 {
            add_noise(x, noise, sigma)
        } else {
            x
        }
    }
}
