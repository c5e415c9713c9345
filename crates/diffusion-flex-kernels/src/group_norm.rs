//! Group norm on the CPU backend: fused forward and backward passes.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::{dot, par_new_chunks, sum, sum_sq_dev, vectorised};

/// Group norm as one pass for the statistics and one for the output
/// (burn's runs a dozen, the affine part as broadcasts through a strided
/// iterator), and one fused backward pass.
pub fn autodiff(norm: &GroupNorm<Autodiff<Flex>>, x: Tensor<Autodiff<Flex>, 4>) -> Tensor<Autodiff<Flex>, 4> {
    let Some((gamma, beta)) = affine_params(norm, &x) else {
        return norm.forward(x);
    };
    let [x, gamma, beta] = [
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    ];
    let x_flex = x.primitive.to_contiguous();
    let gamma_flex = gamma.primitive.to_contiguous();
    let beta_flex = beta.primitive.to_contiguous();
    let (y, mean, rstd) = group_norm_forward(&x_flex, &gamma_flex, &beta_flex, norm.num_groups, norm.epsilon);
    let out = match GroupNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            GroupNormState {
                x: x_flex,
                gamma: gamma_flex,
                mean,
                rstd,
                groups: norm.num_groups,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Group norm on `Flex` without autodiff, through the same fused forward
/// pass; a non-affine norm or non-f32 input falls back to burn's.
pub fn inference(norm: &GroupNorm<Flex>, x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    let Some((gamma, beta)) = affine_params(norm, &x) else {
        return norm.forward(x);
    };
    let x = x.into_primitive().tensor().to_contiguous();
    let [gamma, beta] = [gamma, beta].map(|p| p.into_primitive().tensor().to_contiguous());
    let (y, _, _) = group_norm_forward(&x, &gamma, &beta, norm.num_groups, norm.epsilon);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// γ and β of `norm` when these kernels apply (an affine norm, f32 input).
pub(crate) fn affine_params<B: Backend>(
    norm: &GroupNorm<B>,
    x: &Tensor<B, 4>,
) -> Option<(Tensor<B, 1>, Tensor<B, 1>)> {
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) if norm.affine && x.dtype() == DType::F32 => {
            Some((gamma.val(), beta.val()))
        }
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct GroupNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    /// Mean and 1/√(var + ε) of each (sample, group).
    mean: Vec<f32>,
    rstd: Vec<f32>,
    groups: usize,
}

#[derive(Debug)]
struct GroupNormBackward;

impl Backward<Flex, 3> for GroupNormBackward {
    type State = GroupNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let st = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dx, dgamma, dbeta) = group_norm_backward(&st, &grad);
        let channels = dgamma.len();
        let as_tensor = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, [channels]));
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, as_tensor(dbeta));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, as_tensor(dgamma));
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx);
        }
    }
}

/// y = (x − mean)·rstd·γ\[c\] + β\[c\] over each (sample, group); returns y and
/// the statistics.
fn group_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    groups: usize,
    epsilon: f64,
) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let shape = x.layout().shape().clone();
    let (b, c) = (shape[0], shape[1]);
    let hw = shape.num_elements() / (b * c).max(1);
    let per_group = c / groups;
    let n = per_group * hw;
    let xs = x.as_slice::<f32>().unwrap();
    let (gs, bs) = (gamma.as_slice::<f32>().unwrap(), beta.as_slice::<f32>().unwrap());
    let (y, stats) = par_new_chunks(xs.len(), n, |i, y| {
        let g0 = (i % groups) * per_group;
        group_norm_chunk(
            y,
            &xs[i * n..][..y.len()],
            &gs[g0..g0 + per_group],
            &bs[g0..g0 + per_group],
            hw,
            epsilon,
        )
    });
    let y = FlexTensor::from_data(TensorData::new(y, shape));
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

vectorised! {
    /// Normalises one (sample, group) of `hw`-sized channel planes;
    /// returns (mean, rstd).
    fn group_norm_chunk(y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], hw: usize, epsilon: f64) -> (f32, f32) {
        let (mean, rstd) = stats(x, epsilon);
        for (ci, (y, x)) in y.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
            let scale = rstd * gamma[ci];
            let shift = beta[ci] - mean * scale;
            for (y, x) in y.iter_mut().zip(x) {
                *y = x * scale + shift;
            }
        }
        (mean, rstd)
    }
}

vectorised! {
    /// [`group_norm_chunk`] in place, for a chunk the caller no longer
    /// needs un-normalised (a fused block's intermediate).
    pub(crate) fn group_norm_chunk_in_place(x: &mut [f32], gamma: &[f32], beta: &[f32], hw: usize, epsilon: f64) -> () {
        let (mean, rstd) = stats(x, epsilon);
        for (ci, x) in x.chunks_exact_mut(hw).enumerate() {
            let scale = rstd * gamma[ci];
            let shift = beta[ci] - mean * scale;
            for x in x.iter_mut() {
                *x = *x * scale + shift;
            }
        }
    }
}

/// The mean and 1/√(var + ε) of one (sample, group), the variance as the
/// mean squared deviation from the mean (two passes: no cancellation).
#[inline(always)]
fn stats(x: &[f32], epsilon: f64) -> (f32, f32) {
    let n = x.len();
    let mean = sum(x) / n as f32;
    let var = sum_sq_dev(x, mean) / n as f32;
    (mean, 1.0 / (var as f64 + epsilon).sqrt() as f32)
}

/// With x̂ = (x − mean)·rstd and the group means ⟨·⟩:
/// ∂x = rstd·(γ·dy − ⟨γ·dy⟩ − x̂·⟨γ·dy·x̂⟩), ∂γ\[c\] = Σ dy·x̂, ∂β\[c\] = Σ dy.
fn group_norm_backward(st: &GroupNormState, grad: &FlexTensor) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let shape = st.x.layout().shape().clone();
    let (b, c) = (shape[0], shape[1]);
    let hw = shape.num_elements() / (b * c).max(1);
    let groups = st.groups;
    let per_group = c / groups;
    let n = (per_group * hw).max(1);
    let (xs, dys) = (st.x.as_slice::<f32>().unwrap(), grad.as_slice::<f32>().unwrap());
    let gs = st.gamma.as_slice::<f32>().unwrap();
    // Per (sample, group): this group's channels' Σ dy·x̂ and Σ dy.
    let (dx, partials) = par_new_chunks(xs.len(), n, |i, dx| {
        let g0 = (i % groups) * per_group;
        let (x, dy) = (&xs[i * n..][..dx.len()], &dys[i * n..][..dx.len()]);
        group_norm_backward_chunk(dx, x, dy, &gs[g0..g0 + per_group], st.mean[i], st.rstd[i], hw)
    });
    let mut dgamma = vec![0f32; c];
    let mut dbeta = vec![0f32; c];
    for (i, (dg, db)) in partials.iter().enumerate() {
        let g0 = (i % groups) * per_group;
        for ci in 0..per_group {
            dgamma[g0 + ci] += dg[ci];
            dbeta[g0 + ci] += db[ci];
        }
    }
    (FlexTensor::from_data(TensorData::new(dx, shape)), dgamma, dbeta)
}

vectorised! {
    /// ∂x of one (sample, group); returns this group's (Σ dy·x̂, Σ dy) per channel.
    fn group_norm_backward_chunk(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        mean: f32,
        rstd: f32,
        hw: usize
    ) -> (Vec<f32>, Vec<f32>) {
        let per_group = gamma.len();
        let n = x.len();
        let mut dgamma = vec![0f32; per_group];
        let mut dbeta = vec![0f32; per_group];
        let (mut m1, mut m2) = (0f32, 0f32);
        for ci in 0..per_group {
            let (x, dy) = (&x[ci * hw..][..hw], &dy[ci * hw..][..hw]);
            let sdy = sum(dy);
            let sdyxhat = rstd * (dot(dy, x) - mean * sdy);
            dgamma[ci] = sdyxhat;
            dbeta[ci] = sdy;
            m1 += gamma[ci] * sdy;
            m2 += gamma[ci] * sdyxhat;
        }
        let (m1, m2) = (m1 / n as f32, m2 / n as f32);
        for ci in 0..per_group {
            let (x, dy) = (&x[ci * hw..][..hw], &dy[ci * hw..][..hw]);
            for ((dx, &x), &dy) in dx[ci * hw..][..hw].iter_mut().zip(x).zip(dy) {
                let xhat = (x - mean) * rstd;
                *dx = rstd * (gamma[ci] * dy - m1 - xhat * m2);
            }
        }
        (dgamma, dbeta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel_diff, values};
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    #[test]
    fn group_norm_and_gradients_match_burn() {
        let device = Default::default();
        for (groups, shape, offset) in [
            (1, [3, 6, 5, 4], 0.0),
            (1, [2, 48, 28, 28], 3.0),
            (3, [2, 6, 7, 7], -2.0),
        ] {
            let c = shape[1];
            let norm = GroupNormConfig::new(groups, c).init::<Ad>(&device);
            // Non-trivial affine parameters, fixed for both runs.
            let norm = GroupNorm {
                gamma: Some(Param::from_tensor(Tensor::random(
                    [c],
                    Distribution::Normal(1.0, 0.5),
                    &device,
                ))),
                beta: Some(Param::from_tensor(Tensor::random(
                    [c],
                    Distribution::Normal(0.0, 0.5),
                    &device,
                ))),
                ..norm
            };
            let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(offset, 2.0), &device);
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n).map(|i| 0.1 * (1 + i % 7) as f32).collect();
            let run = |ours: bool| {
                let x = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
                let y = if ours {
                    autodiff(&norm, x.clone())
                } else {
                    norm.forward(x.clone())
                };
                let out = values(y.clone().inner());
                let w = Tensor::<Ad, 1>::from_floats(w.as_slice(), &device).reshape(shape);
                let grads = (y * w).sum().backward();
                [
                    out,
                    values(x.grad(&grads).unwrap()),
                    values(norm.gamma.as_ref().unwrap().val().grad(&grads).unwrap()),
                    values(norm.beta.as_ref().unwrap().val().grad(&grads).unwrap()),
                ]
            };
            let (ours, reference) = (run(true), run(false));
            for (what, (a, b)) in ["output", "dx", "dgamma", "dbeta"]
                .iter()
                .zip(ours.iter().zip(&reference))
            {
                // dgamma sums w·x̂ over every position of a channel (n =
                // 1,568 at 28x28, two images), terms of both signs that
                // largely cancel. Two summation orders in f32 differ by
                // about √n·2^-24·Σ|w·x̂| ≈ 40 · 6e-8 · 500 (|w| ≈ 0.4,
                // |x̂| ≈ 0.8) ≈ 1.2e-3, against a largest dgamma of about 40
                // (the largest of 48 sums with spread √(n·0.2) ≈ 18): ~3e-5,
                // which 2e-5 did not always cover (2.3e-5 seen once in some
                // 100 random draws).
                let tolerance = if *what == "dgamma" { 1e-4 } else { 2e-5 };
                let d = max_rel_diff(a, b);
                assert!(
                    d < tolerance,
                    "groups {groups} {shape:?}: {what} differs by {d:e}"
                );
            }
            let inner = GroupNorm {
                gamma: norm.gamma.as_ref().map(|p| Param::from_tensor(p.val().inner())),
                beta: norm.beta.as_ref().map(|p| Param::from_tensor(p.val().inner())),
                num_groups: groups,
                num_channels: c,
                epsilon: norm.epsilon,
                affine: true,
            };
            let d = max_rel_diff(&values(inference(&inner, x.clone())), &reference[0]);
            assert!(d < 2e-5, "inference differs by {d:e}");
        }
    }
}
