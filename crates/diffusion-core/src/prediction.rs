//! What the network predicts, and conversions between the three targets.
//!
//! With a = ᾱ(t), x_t = √a·x0 + √(1−a)·ε, and v = √a·ε − √(1−a)·x0
//! (Salimans & Ho 2022), any one of ε, x0, v together with x_t gives the
//! other two:
//!
//! | from | x̂0 | ε̂ |
//! |---|---|---|
//! | ε | (x_t − √(1−a)·ε)/√a | ε |
//! | x0 | x0 | (x_t − √a·x0)/√(1−a) |
//! | v | √a·x_t − √(1−a)·v | √(1−a)·x_t + √a·v |
//!
//! Samplers work on the pair (x̂0, ε̂), so every sampler works with every
//! objective.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// The training target of a denoiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise ε (the reference, Ho et al. 2020).
    #[default]
    Epsilon,
    /// The clean sample x0 (`"x0"` in configs; `"sample"`, its old name,
    /// is still read).
    #[serde(alias = "sample")]
    X0,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022).
    V,
}

/// A denoiser's estimate at one step, in both forms the samplers use.
#[derive(Debug, Clone)]
pub struct Estimate<B: Backend> {
    /// x̂0, the estimate of the clean sample.
    pub x0: Tensor<B, 4>,
    /// ε̂, the estimate of the noise in x_t.
    pub eps: Tensor<B, 4>,
}

impl Prediction {
    /// The training target for clean data `x0` noised with `eps` at
    /// `alpha_bar` (one value per sample, shape [B, 1, 1, 1] or broadcastable).
    pub fn target<B: Backend>(
        self,
        x0: Tensor<B, 4>,
        eps: Tensor<B, 4>,
        alpha_bar: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        match self {
            Prediction::Epsilon => eps,
            Prediction::X0 => x0,
            Prediction::V => {
                let sa = alpha_bar.clone().sqrt();
                let sb = alpha_bar.neg().add_scalar(1.0).sqrt();
                eps * sa - x0 * sb
            }
        }
    }

    /// Turns a network output at x_t (all samples at the same ᾱ) into (x̂0, ε̂).
    ///
    /// For `Epsilon` at ᾱ = 0 x̂0 is undefined; schedules keep ᾱ > 0 (see
    /// [`crate::schedule`]).
    pub fn to_estimate<B: Backend>(
        self,
        x_t: Tensor<B, 4>,
        output: Tensor<B, 4>,
        alpha_bar: f64,
    ) -> Estimate<B> {
        let sa = alpha_bar.sqrt();
        let sb = (1.0 - alpha_bar).sqrt();
        match self {
            Prediction::Epsilon => {
                let x0 = (x_t - output.clone().mul_scalar(sb)).div_scalar(sa);
                Estimate { x0, eps: output }
            }
            Prediction::X0 => {
                let eps = if sb > 0.0 {
                    (x_t - output.clone().mul_scalar(sa)).div_scalar(sb)
                } else {
                    output.zeros_like()
                };
                Estimate { x0: output, eps }
            }
            Prediction::V => {
                let x0 = x_t.clone().mul_scalar(sa) - output.clone().mul_scalar(sb);
                let eps = x_t.mul_scalar(sb) + output.mul_scalar(sa);
                Estimate { x0, eps }
            }
        }
    }

    /// The network output that corresponds to the estimate (x̂0, ε̂) at ᾱ:
    /// the inverse of [`Prediction::to_estimate`].
    pub fn from_estimate<B: Backend>(self, estimate: &Estimate<B>, alpha_bar: f64) -> Tensor<B, 4> {
        let sa = alpha_bar.sqrt();
        let sb = (1.0 - alpha_bar).sqrt();
        match self {
            Prediction::Epsilon => estimate.eps.clone(),
            Prediction::X0 => estimate.x0.clone(),
            Prediction::V => estimate.eps.clone().mul_scalar(sa) - estimate.x0.clone().mul_scalar(sb),
        }
    }
}

impl<B: Backend> Estimate<B> {
    /// Clamps x̂0 to `[lo, hi]` and recomputes ε̂ from it, so the pair stays
    /// consistent with x_t: ε̂ = (x_t − √ᾱ·x̂0)/√(1−ᾱ).
    pub fn clip(self, x_t: Tensor<B, 4>, alpha_bar: f64, lo: f64, hi: f64) -> Self {
        let x0 = self.x0.clamp(lo, hi);
        let sb = (1.0 - alpha_bar).sqrt();
        if sb == 0.0 {
            return Estimate { x0, eps: self.eps };
        }
        let eps = (x_t - x0.clone().mul_scalar(alpha_bar.sqrt())).div_scalar(sb);
        Estimate { x0, eps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, tensor, TestBackend};

    #[test]
    fn conversions_round_trip() {
        let x0 = tensor(&[0.3, -0.7, 0.9, 0.0], [1, 1, 2, 2]);
        let eps = tensor(&[1.1, 0.2, -1.5, 0.4], [1, 1, 2, 2]);
        for a in [0.999_f64, 0.5, 0.01] {
            let x_t = x0.clone().mul_scalar(a.sqrt()) + eps.clone().mul_scalar((1.0 - a).sqrt());
            let ab = Tensor::<TestBackend, 4>::full([1, 1, 1, 1], a, &x0.device());
            for kind in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
                let out = kind.target(x0.clone(), eps.clone(), ab.clone());
                let est = kind.to_estimate(x_t.clone(), out.clone(), a);
                assert!(max_abs_diff(&est.x0, &x0) < 1e-4, "{kind:?} a={a}");
                assert!(max_abs_diff(&est.eps, &eps) < 1e-4, "{kind:?} a={a}");
                let back = kind.from_estimate(&est, a);
                assert!(max_abs_diff(&back, &out) < 1e-5, "{kind:?} a={a}");
            }
        }
    }

    #[test]
    fn v_target_closed_form() {
        // a = 0.64: √a = 0.8, √(1−a) = 0.6; v = 0.8·ε − 0.6·x0.
        let x0 = tensor(&[1.0, -1.0], [1, 1, 1, 2]);
        let eps = tensor(&[0.5, 2.0], [1, 1, 1, 2]);
        let ab = Tensor::<TestBackend, 4>::full([1, 1, 1, 1], 0.64, &x0.device());
        let v = Prediction::V.target(x0, eps, ab);
        assert!(max_abs_diff(&v, &tensor(&[0.8 * 0.5 - 0.6, 0.8 * 2.0 + 0.6], [1, 1, 1, 2])) < 1e-6);
    }

    #[test]
    fn clip_keeps_the_pair_consistent() {
        let a = 0.25; // √a = 0.5, √(1−a) ≈ 0.866
        let x_t = tensor(&[1.0, -0.2], [1, 1, 1, 2]);
        let est = Estimate {
            x0: tensor(&[3.0, -0.5], [1, 1, 1, 2]),
            eps: tensor(&[0.0, 0.0], [1, 1, 1, 2]),
        };
        let c = est.clip(x_t, a, -1.0, 1.0);
        assert!(max_abs_diff(&c.x0, &tensor(&[1.0, -0.5], [1, 1, 1, 2])) < 1e-7);
        let sb = 0.75f64.sqrt();
        let expect = [((1.0 - 0.5) / sb) as f32, ((-0.2 + 0.25) / sb) as f32];
        assert!(max_abs_diff(&c.eps, &tensor(&expect, [1, 1, 1, 2])) < 1e-6);
    }
}
