//! DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order,
//! in data-prediction (x̂0) form.
//!
//! With α_t = √ᾱ(t), σ_t = √(1 − ᾱ(t)), λ_t = ln(α_t/σ_t) and
//! h = λ_s − λ_t for the step t → s:
//! - first order (the first step, and any step to σ_s = 0):
//!   x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^(−h))·x̂0_t;
//! - otherwise, with r = h_prev/h and D = (1 + 1/(2r))·x̂0_t − 1/(2r)·x̂0_prev:
//!   x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^(−h))·D.
//!
//! A last step to t = 0 (σ = 0) returns x̂0 itself.

use burn::tensor::{backend::Backend, Tensor};

use super::{Sampler, Steps};
use crate::prediction::Prediction;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct DpmSolverPp<B: Backend> {
    steps: Steps,
    /// x̂0 and h of the previous step.
    previous: Option<(Tensor<B, 4>, f64)>,
}

impl<B: Backend> DpmSolverPp<B> {
    pub(crate) fn new(steps: Steps) -> Self {
        Self {
            steps,
            previous: None,
        }
    }
}

/// λ = ln(√a/√(1 − a)); +∞ at a = 1.
fn lambda(a: f64) -> f64 {
    0.5 * (a.ln() - (1.0 - a).ln())
}

impl<B: Backend> Sampler<B> for DpmSolverPp<B> {
    fn timesteps(&self) -> &[usize] {
        &self.steps.timesteps
    }

    fn needs_noise(&self, _i: usize) -> bool {
        false
    }

    fn step(
        &mut self,
        i: usize,
        x: Tensor<B, 4>,
        output: Tensor<B, 4>,
        prediction: Prediction,
        _noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        if i == 0 {
            self.previous = None;
        }
        let (a, a_next) = self.steps.alpha_bars(i);
        let x0 = self.steps.estimate(i, &x, output, prediction).x0;
        let sigma_next = (1.0 - a_next).sqrt();
        if sigma_next == 0.0 {
            self.previous = None;
            return x0;
        }
        let h = lambda(a_next) - lambda(a);
        let ratio = sigma_next / (1.0 - a).sqrt();
        let coef = a_next.sqrt() * -(-h).exp_m1();
        let d = match self.previous.take() {
            None => x0.clone(),
            Some((x0_prev, h_prev)) => {
                let half_inv_r = 0.5 * h / h_prev;
                x0.clone().mul_scalar(1.0 + half_inv_r) - x0_prev.mul_scalar(half_inv_r)
            }
        };
        self.previous = Some((x0, h));
        x.mul_scalar(ratio) + d.mul_scalar(coef)
    }

    fn reset(&mut self) {
        self.previous = None;
    }
}
