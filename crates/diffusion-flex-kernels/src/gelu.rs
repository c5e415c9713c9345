//! GELU on the CPU backend: one vectorised pass forwards and one backwards
//! (Flex evaluates libm's scalar `erff` per element).
//!
//! gelu(x) = x·Φ(x) = ½·x·(1 + erf(x/√2)); gelu'(x) = Φ(x) + x·φ(x).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::{exp, f32s, par_new_chunks, vectorised};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// Exact (erf) GELU on `Flex` without autodiff, in one vectorised pass;
/// non-f32 input falls back to burn's.
pub fn inference(x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    if x.dtype() != DType::F32 {
        return burn::tensor::activation::gelu(x);
    }
    let x = x.into_primitive().tensor().to_contiguous();
    Tensor::from_primitive(TensorPrimitive::Float(forward(&x)))
}

/// Exact (erf) GELU under autodiff, with a one-pass backward; non-f32
/// input falls back to burn's.
pub fn autodiff(x: Tensor<Autodiff<Flex>, 4>) -> Tensor<Autodiff<Flex>, 4> {
    if x.dtype() != DType::F32 {
        return burn::tensor::activation::gelu(x);
    }
    let x = x.into_primitive().tensor();
    let input = x.primitive.to_contiguous();
    let y = forward(&input);
    let out = match GeluBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(input, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The input x.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(parent) = parent {
            let (xs, gs) = (f32s(&ops.state), f32s(&grad));
            let (dx, _) = par_new_chunks(gs.len(), CHUNK, |i, dx| {
                gelu_backward(dx, &xs[i * CHUNK..][..dx.len()], &gs[i * CHUNK..][..dx.len()])
            });
            let shape = grad.layout().shape().clone();
            grads.register::<Flex>(parent.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
    }
}

fn forward(x: &FlexTensor) -> FlexTensor {
    let xs = f32s(x);
    let (y, _) = par_new_chunks(xs.len(), CHUNK, |i, y| {
        gelu_forward(y, &xs[i * CHUNK..][..y.len()])
    });
    FlexTensor::from_data(TensorData::new(y, x.layout().shape().clone()))
}

vectorised! {
    /// y = GELU(x), elementwise.
    pub(crate) fn gelu_forward(y: &mut [f32], x: &[f32]) -> () {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

vectorised! {
    fn gelu_backward(dx: &mut [f32], x: &[f32], grad: &[f32]) -> () {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(grad) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp::<FMA>(-0.5 * x * x);
            *dx = g * (cdf + x * pdf);
        }
    }
}

/// erf for f32 as a rational function x·P(x²)/Q(x²) on [−4, 4] (the
/// approximation of Eigen and XLA; erf(±4) rounds to ±1 in f32), without
/// branches so that it vectorises. Absolute error below 1e-6 (tested).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906_3e-4;
    let p = p * x2 - 2.954_6e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329e-3;
    let q = q * x2 - 1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, values};
    use burn::tensor::Distribution;

    /// erf(x) = 2/√π · Σ (−1)ⁿ x^(2n+1) / (n!·(2n+1)), summed in f64
    /// (for |x| ≤ 5 the terms stay below 1e10, so about 1e-7 of precision
    /// is lost to cancellation; far below the tolerance tested).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut total) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_its_series_to_1e6() {
        let mut worst = 0f64;
        let mut x = -5.0f32;
        while x <= 5.0 {
            worst = worst.max((erf(x) as f64 - erf_series(x as f64)).abs());
            x += 0.000_7;
        }
        assert!(worst < 1e-6, "worst absolute error {worst:e}");
    }

    #[test]
    fn gelu_and_its_gradient_match_burn() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([3, 5, 31, 17], Distribution::Normal(0.0, 3.0), &device);
        let run = |ours: bool| {
            let x = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
            let y = if ours {
                autodiff(x.clone())
            } else {
                burn::tensor::activation::gelu(x.clone())
            };
            let out = values(y.clone());
            let grads = (y.clone() * y).sum().backward(); // d/dx Σ y² = 2·y·y'
            (out, values(x.grad(&grads).unwrap()))
        };
        let ((ours, ours_g), (reference, reference_g)) = (run(true), run(false));
        assert!(
            max_abs_diff(&ours, &reference) < 1e-5,
            "{}",
            max_abs_diff(&ours, &reference)
        );
        assert!(
            max_abs_diff(&ours_g, &reference_g) < 1e-4,
            "{}",
            max_abs_diff(&ours_g, &reference_g)
        );
        assert!(max_abs_diff(&values(inference(x)), &reference) < 1e-5);
    }
}
