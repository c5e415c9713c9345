//! Faster kernels for the CPU backend (burn's Flex), installed into
//! [`diffusion_model::kernels`] for `Flex` and `Autodiff<Flex>`.
//!
//! Attention is softmax(q·kᵀ/√d)·v over 784 tokens at 28x28: burn runs its
//! softmax as five passes over the [batch, 784, 784] score matrix (max, sub,
//! exp, sum, div, with broadcasts through a strided iterator and libm's
//! scalar `expf`), and autodiff adds as many again backwards. Here the two
//! matmuls stay burn's (Flex calls the `gemm` crate) and the softmax is one
//! fused pass per row forwards and one backwards, with a polynomial exp the
//! compiler vectorises, in parallel over rows on rayon's pool (the one Flex
//! uses).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, ModuleOps};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use diffusion_model::kernels::{self, Kernels};
use rayon::prelude::*;

/// Installs the kernels of this module for the CPU backend (idempotent).
pub fn install() {
    kernels::install::<Flex>(Kernels {
        attention: attention::<Flex>,
        group_norm: group_norm_inference,
        ..Kernels::default()
    });
    kernels::install::<Autodiff<Flex>>(Kernels {
        attention: attention::<Autodiff<Flex>>,
        conv2d: conv2d_autodiff,
        group_norm: group_norm_autodiff,
    });
}

/// Backends whose softmax over the last dimension this module provides.
pub trait FusedSoftmax: Backend {
    fn softmax_last(x: Tensor<Self, 3>) -> Tensor<Self, 3>;
}

impl FusedSoftmax for Flex {
    fn softmax_last(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let t = x.into_primitive().tensor();
        if t.dtype() != DType::F32 {
            let x = Tensor::from_primitive(TensorPrimitive::Float(t));
            return burn::tensor::activation::softmax(x, 2);
        }
        Tensor::from_primitive(TensorPrimitive::Float(softmax_forward(t)))
    }
}

impl<C: CheckpointStrategy> FusedSoftmax for Autodiff<Flex, C> {
    fn softmax_last(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let x = x.into_primitive().tensor();
        if x.primitive.dtype() != DType::F32 {
            let x = Tensor::from_primitive(TensorPrimitive::Float(x));
            return burn::tensor::activation::softmax(x, 2);
        }
        let out = match SoftmaxBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = softmax_forward(x.primitive);
                prep.finish(p.clone(), p)
            }
            OpsKind::UnTracked(prep) => prep.finish(softmax_forward(x.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// A conv2d whose backward pass avoids Flex's slow paths: the input
/// gradient of a stride-1 conv is itself a conv (flipped kernel, channels
/// swapped per group), which Flex runs as im2col + gemm on all cores instead
/// of its single-threaded direct transposed conv; the weight gradient of a
/// depthwise conv is a direct loop per channel instead of one conv per
/// group; the bias gradient is a per-channel sum without a transposed copy.
/// Anything else falls back to burn's default backward.
fn conv2d_autodiff(conv: &Conv2d<Autodiff<Flex>>, x: Tensor<Autodiff<Flex>, 4>) -> Tensor<Autodiff<Flex>, 4> {
    let padding = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => [*top, *left],
        PaddingConfig2d::Valid => [0, 0],
        _ => return conv.forward(x),
    };
    let Some(bias) = &conv.bias else {
        return conv.forward(x);
    };
    let options = ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups);
    let weight = conv.weight.val();
    if x.dtype() != DType::F32 || padding[0] >= conv.kernel_size[0] || padding[1] >= conv.kernel_size[1] {
        return conv.forward(x);
    }
    let [x, weight, bias] = [
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.val().unsqueeze::<4>().into_primitive().tensor(),
    ];
    let bias_shape = bias.primitive.layout().shape().clone();
    let bias_1d = bias.primitive.reshape([bias_shape.num_elements()].into());
    let out = match Conv2dBackward
        .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = Flex::conv2d(x.primitive.clone(), weight.primitive.clone(), Some(bias_1d), options.clone());
            prep.finish((x.primitive, weight.primitive, bias_shape, options), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(Flex::conv2d(x.primitive, weight.primitive, Some(bias_1d), options)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    /// x, weight, the bias's shape (as given to the op) and the options.
    type State = (FlexTensor, FlexTensor, burn::tensor::Shape, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let (x, weight, bias_shape, options) = ops.state;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, channel_sums(&grad).reshape(bias_shape));
        }
        if let Some(node) = node_w {
            let g = if is_depthwise(&x, &weight, &options) {
                depthwise_weight_grad(&contiguous(x.clone()), &grad, &weight, &options)
            } else {
                Flex::conv2d_weight_backward(x.clone(), weight.clone(), grad.clone(), options.clone())
            };
            grads.register::<Flex>(node.id, g);
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, input_grad(x, weight, grad, options));
        }
    }
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

fn is_depthwise(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> bool {
    let [c_out, per_group, _, _] = dims4(weight);
    let c_in = dims4(x)[1];
    options.groups == c_in && c_out == c_in && per_group == 1 && options.stride == [1, 1] && options.dilation == [1, 1]
}

/// Σ over batch, height and width, per channel: [B, C, H, W] → [C].
fn channel_sums(grad: &FlexTensor) -> FlexTensor {
    let [b, c, h, w] = dims4(grad);
    let g = grad.as_slice::<f32>().expect("contiguous f32 gradient");
    let sums: Vec<f32> = (0..c)
        .into_par_iter()
        .map(|ci| (0..b).map(|bi| sum(&g[(bi * c + ci) * h * w..][..h * w])).sum())
        .collect();
    FlexTensor::from_data(burn::tensor::TensorData::new(sums, [c]))
}

/// ∂L/∂x of a conv: for stride 1 and dilation 1 it is the conv of the output
/// gradient with the spatially flipped kernel whose in/out channels are
/// swapped within each group, padded by k − 1 − p.
fn input_grad(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, options: ConvOptions<2>) -> FlexTensor {
    if options.stride != [1, 1] || options.dilation != [1, 1] {
        return Flex::conv2d_x_backward(x, weight, grad, options);
    }
    let [c_out, per_group_in, kh, kw] = dims4(&weight);
    let g = options.groups;
    let w = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(weight))
        .reshape([g, c_out / g, per_group_in, kh * kw])
        .swap_dims(1, 2) // [g, in/g, out/g, k·k]
        .reshape([g * per_group_in, c_out / g, kh, kw])
        .flip([2, 3]);
    let padding = [kh - 1 - options.padding[0], kw - 1 - options.padding[1]];
    let w = contiguous(w.into_primitive().tensor());
    Flex::conv2d(grad, w, None, ConvOptions::new([1, 1], padding, [1, 1], g))
}

/// ∂L/∂w of a depthwise conv (stride 1): for each channel c and tap (i, j),
/// Σ_b Σ_y Σ_x grad[b, c, y, x] · x[b, c, y + i − p, x + j − p].
fn depthwise_weight_grad(x: &FlexTensor, grad: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> FlexTensor {
    let [b, c, h, w] = dims4(x);
    let [_, _, ho, wo] = dims4(grad);
    let [_, _, kh, kw] = dims4(weight);
    let [ph, pw] = options.padding;
    let (xs, gs) = (x.as_slice::<f32>().unwrap(), grad.as_slice::<f32>().unwrap());
    let taps: Vec<f32> = (0..c)
        .into_par_iter()
        .flat_map_iter(|ci| {
            let mut acc = vec![0f32; kh * kw];
            for bi in 0..b {
                let xp = &xs[(bi * c + ci) * h * w..][..h * w];
                let gp = &gs[(bi * c + ci) * ho * wo..][..ho * wo];
                for i in 0..kh {
                    for j in 0..kw {
                        // Output columns whose input column x + j − pw lies inside [0, w).
                        let x0 = pw.saturating_sub(j);
                        let x1 = (w + pw).saturating_sub(j).min(wo);
                        if x0 >= x1 {
                            continue;
                        }
                        let mut total = 0.0;
                        for y in 0..ho {
                            let iy = y + i;
                            if iy < ph || iy - ph >= h {
                                continue;
                            }
                            let xrow = &xp[(iy - ph) * w..][..w];
                            total += dot(&gp[y * wo + x0..y * wo + x1], &xrow[x0 + j - pw..x1 + j - pw]);
                        }
                        acc[i * kw + j] += total;
                    }
                }
            }
            acc
        })
        .collect();
    FlexTensor::from_data(burn::tensor::TensorData::new(taps, [c, 1, kh, kw]))
}

/// Group norm as one pass for the statistics and one for the output
/// (burn's runs a dozen, the affine part as broadcasts through a strided
/// iterator), and one fused backward pass.
fn group_norm_autodiff(norm: &GroupNorm<Autodiff<Flex>>, x: Tensor<Autodiff<Flex>, 4>) -> Tensor<Autodiff<Flex>, 4> {
    let (Some(gamma), Some(beta)) = (&norm.gamma, &norm.beta) else {
        return norm.forward(x);
    };
    if x.dtype() != DType::F32 || !norm.affine {
        return norm.forward(x);
    }
    let [x, gamma, beta] = [
        x.into_primitive().tensor(),
        gamma.val().unsqueeze::<4>().into_primitive().tensor(),
        beta.val().unsqueeze::<4>().into_primitive().tensor(),
    ];
    let x_flex = contiguous(x.primitive.clone());
    let (gamma_flex, beta_flex) = (contiguous(gamma.primitive.clone()), contiguous(beta.primitive.clone()));
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

fn group_norm_inference(norm: &GroupNorm<Flex>, x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    let (Some(gamma), Some(beta)) = (&norm.gamma, &norm.beta) else {
        return norm.forward(x);
    };
    if x.dtype() != DType::F32 || !norm.affine {
        return norm.forward(x);
    }
    let x = contiguous(x.into_primitive().tensor());
    let [gamma, beta] = [gamma, beta].map(|p| contiguous(p.val().into_primitive().tensor()));
    let (y, _, _) = group_norm_forward(&x, &gamma, &beta, norm.num_groups, norm.epsilon);
    Tensor::from_primitive(TensorPrimitive::Float(y))
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
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (dx, dgamma, dbeta) = group_norm_backward(&st, &grad);
        let param_shape = st.gamma.layout().shape().clone();
        let channels = dgamma.len();
        let as_tensor = |v: Vec<f32>| FlexTensor::from_data(burn::tensor::TensorData::new(v, [channels])).reshape(param_shape.clone());
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

/// y = (x − mean)·rstd·γ[c] + β[c] over each (sample, group); returns y and
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
    let mut y = vec![0f32; xs.len()];
    let stats: Vec<(f32, f32)> = y
        .par_chunks_mut(n.max(1))
        .zip(xs.par_chunks(n.max(1)))
        .enumerate()
        .map(|(i, (y, x))| {
            let mean = sum(x) / n as f32;
            let var = sum_sq_dev(x, mean) / n as f32;
            let rstd = 1.0 / (var as f64 + epsilon).sqrt() as f32;
            let g0 = (i % groups) * per_group;
            for (ci, (y, x)) in y.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
                let scale = rstd * gs[g0 + ci];
                let shift = bs[g0 + ci] - mean * scale;
                for (y, x) in y.iter_mut().zip(x) {
                    *y = x * scale + shift;
                }
            }
            (mean, rstd)
        })
        .collect();
    let y = FlexTensor::from_data(burn::tensor::TensorData::new(y, shape));
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// With x̂ = (x − mean)·rstd and the group means ⟨·⟩:
/// ∂x = rstd·(γ·dy − ⟨γ·dy⟩ − x̂·⟨γ·dy·x̂⟩), ∂γ[c] = Σ dy·x̂, ∂β[c] = Σ dy.
fn group_norm_backward(st: &GroupNormState, grad: &FlexTensor) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let shape = st.x.layout().shape().clone();
    let (b, c) = (shape[0], shape[1]);
    let hw = shape.num_elements() / (b * c).max(1);
    let groups = st.groups;
    let per_group = c / groups;
    let n = (per_group * hw).max(1);
    let (xs, dys) = (st.x.as_slice::<f32>().unwrap(), grad.as_slice::<f32>().unwrap());
    let gs = st.gamma.as_slice::<f32>().unwrap();
    let mut dx = vec![0f32; xs.len()];
    // Per (sample, group): this group's channels' Σ dy·x̂ and Σ dy.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(n)
        .zip(xs.par_chunks(n).zip(dys.par_chunks(n)))
        .enumerate()
        .map(|(i, (dx, (x, dy)))| {
            let (mean, rstd) = (st.mean[i], st.rstd[i]);
            let g0 = (i % groups) * per_group;
            let mut dgamma = vec![0f32; per_group];
            let mut dbeta = vec![0f32; per_group];
            let (mut m1, mut m2) = (0f32, 0f32);
            for ci in 0..per_group {
                let (x, dy) = (&x[ci * hw..][..hw], &dy[ci * hw..][..hw]);
                let sdy = sum(dy);
                let sdyxhat = rstd * (dot(dy, x) - mean * sdy);
                dgamma[ci] = sdyxhat;
                dbeta[ci] = sdy;
                m1 += gs[g0 + ci] * sdy;
                m2 += gs[g0 + ci] * sdyxhat;
            }
            let (m1, m2) = (m1 / n as f32, m2 / n as f32);
            for ci in 0..per_group {
                let gamma = gs[g0 + ci];
                let (x, dy) = (&x[ci * hw..][..hw], &dy[ci * hw..][..hw]);
                for ((dx, &x), &dy) in dx[ci * hw..][..hw].iter_mut().zip(x).zip(dy) {
                    let xhat = (x - mean) * rstd;
                    *dx = rstd * (gamma * dy - m1 - xhat * m2);
                }
            }
            (dgamma, dbeta)
        })
        .collect();
    let mut dgamma = vec![0f32; c];
    let mut dbeta = vec![0f32; c];
    for (i, (dg, db)) in partials.iter().enumerate() {
        let g0 = (i % groups) * per_group;
        for ci in 0..per_group {
            dgamma[g0 + ci] += dg[ci];
            dbeta[g0 + ci] += db[ci];
        }
    }
    (FlexTensor::from_data(burn::tensor::TensorData::new(dx, shape)), dgamma, dbeta)
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The softmax output P.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(parent) = parent {
            grads.register::<Flex>(parent.id, softmax_backward(&ops.state, grad));
        }
    }
}

/// softmax(q·kᵀ/√d)·v with the fused softmax.
///
/// # Shapes
/// - `q`, `k`, `v`: [batch, tokens, d]; returns [batch, tokens, d]
pub fn attention<B: FusedSoftmax>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
    let d = q.dims()[2];
    let scores = q.mul_scalar(1.0 / (d as f64).sqrt()).matmul(k.swap_dims(1, 2)); // [B, L, L]
    B::softmax_last(scores).matmul(v)
}

/// A contiguous f32 tensor that this code owns (copied only if shared or strided).
fn owned(t: FlexTensor) -> FlexTensor {
    let n = t.layout().num_elements();
    if t.is_contiguous() && t.layout().start_offset() == 0 && t.bytes().len() == n * 4 && t.is_unique() {
        t
    } else {
        t.to_contiguous()
    }
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

fn softmax_forward(x: FlexTensor) -> FlexTensor {
    let mut x = owned(x);
    let cols = *x.layout().shape().last().unwrap_or(&1);
    if cols > 0 {
        let data = x.storage_mut::<f32>();
        data.par_chunks_mut(cols * rows_per_task(cols))
            .for_each(|rows| rows.chunks_exact_mut(cols).for_each(softmax_row));
    }
    x
}

/// dx = p ⊙ (g − Σ g⊙p), per row, computed in the gradient's buffer.
fn softmax_backward(p: &FlexTensor, grad: FlexTensor) -> FlexTensor {
    let mut g = owned(grad);
    let p = p.as_slice::<f32>().expect("the softmax output is contiguous f32");
    let cols = *g.layout().shape().last().unwrap_or(&1);
    if cols > 0 {
        let chunk = cols * rows_per_task(cols);
        let data = g.storage_mut::<f32>();
        data.par_chunks_mut(chunk).zip(p.par_chunks(chunk)).for_each(|(g, p)| {
            for (g, p) in g.chunks_exact_mut(cols).zip(p.chunks_exact(cols)) {
                let dot = dot(g, p);
                for (g, &p) in g.iter_mut().zip(p) {
                    *g = p * (*g - dot);
                }
            }
        });
    }
    g
}

const LANES: usize = 8;

fn softmax_row(row: &mut [f32]) {
    let max = max(row);
    let max = if max.is_finite() { max } else { 0.0 };
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    rest.iter().chain(&acc).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Σ (v − mean)².
fn sum_sq_dev(v: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|x| (x - mean) * (x - mean)).sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += (c[i] - mean) * (c[i] - mean);
        }
    }
    acc.iter().sum::<f32>() + rest
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// e^x for x in [−87.3, 88], Cephes' `expf` without branches (so it
/// vectorises): x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by a degree-6
/// polynomial, 2^n put in the exponent bits. Relative error below 2e-7
/// (tested); below −87.3 it returns e^−87.3 ≈ 1.2e-38 instead of a subnormal.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // t's low mantissa bits hold n (two's complement): 2^n = (n + 127) << 23.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits(((n_int + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    #[test]
    fn exp_matches_std_to_2e7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, exact) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.001_3;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 2e-38 && exp(-1000.0) >= 0.0);
    }

    fn values<const D: usize, B: Backend>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn softmax_matches_burn_including_large_logits_and_odd_widths() {
        let device = Default::default();
        for (shape, scale) in [([3, 7, 13], 1.0), ([2, 5, 784], 30.0), ([1, 4, 1], 5.0)] {
            let x = Tensor::<Flex, 3>::random(shape, Distribution::Normal(0.0, scale), &device);
            let ours = values(Flex::softmax_last(x.clone()));
            let reference = values(softmax(x, 2));
            assert!(max_diff(&ours, &reference) < 1e-6, "{shape:?}: {}", max_diff(&ours, &reference));
        }
    }

    #[test]
    fn softmax_gradient_matches_burn_autodiff() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random([2, 9, 37], Distribution::Normal(0.0, 3.0), &device);
        let w = Tensor::<Ad, 3>::random([2, 9, 37], Distribution::Normal(0.0, 1.0), &device);
        let grad_of = |fused: bool| {
            let x = Tensor::<Ad, 3>::from_inner(x.clone()).require_grad();
            let y = if fused { Ad::softmax_last(x.clone()) } else { softmax(x.clone(), 2) };
            // A loss that weights every output differently.
            let grads = (y * w.clone()).sum().backward();
            values(x.grad(&grads).unwrap())
        };
        let (ours, reference) = (grad_of(true), grad_of(false));
        assert!(max_diff(&ours, &reference) < 1e-6, "{}", max_diff(&ours, &reference));
        assert!(reference.iter().any(|g| g.abs() > 1e-2));
    }

    #[test]
    fn attention_and_its_gradients_match_the_generic_kernel() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let make = || Tensor::<Flex, 3>::random([2, 50, 8], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (make(), make(), make());
        let w = Tensor::<Ad, 3>::random([2, 50, 8], Distribution::Normal(0.0, 1.0), &device);
        let run = |f: fn(Tensor<Ad, 3>, Tensor<Ad, 3>, Tensor<Ad, 3>) -> Tensor<Ad, 3>| {
            let [q, k, v] = [&q, &k, &v].map(|t| Tensor::<Ad, 3>::from_inner(t.clone()).require_grad());
            let y = f(q.clone(), k.clone(), v.clone());
            let out = values(y.clone());
            let grads = (y * w.clone()).sum().backward();
            let g: Vec<Vec<f32>> = [q, k, v].iter().map(|t| values(t.grad(&grads).unwrap())).collect();
            (out, g)
        };
        let (ours, ours_g) = run(attention::<Ad>);
        let (generic, generic_g) = run(kernels::generic_attention::<Ad>);
        assert!(max_diff(&ours, &generic) < 1e-5);
        for (a, b) in ours_g.iter().zip(&generic_g) {
            assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b));
        }
        // Inference path too.
        let inference = values(attention::<Flex>(q.clone(), k.clone(), v.clone()));
        assert!(max_diff(&inference, &generic) < 1e-5);
    }
}

#[cfg(test)]
mod group_norm_tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
    }

    #[test]
    fn group_norm_and_gradients_match_burn() {
        let device = Default::default();
        for (groups, shape, offset) in [(1, [3, 6, 5, 4], 0.0), (1, [2, 48, 28, 28], 3.0), (3, [2, 6, 7, 7], -2.0)] {
            let c = shape[1];
            let norm = GroupNormConfig::new(groups, c).init::<Ad>(&device);
            // Non-trivial affine parameters, fixed for both runs.
            let norm = GroupNorm {
                gamma: Some(Param::from_tensor(Tensor::random([c], Distribution::Normal(1.0, 0.5), &device))),
                beta: Some(Param::from_tensor(Tensor::random([c], Distribution::Normal(0.0, 0.5), &device))),
                ..norm
            };
            let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(offset, 2.0), &device);
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n).map(|i| 0.1 * (1 + i % 7) as f32).collect();
            let run = |ours: bool| {
                let x = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
                let y = if ours { group_norm_autodiff(&norm, x.clone()) } else { norm.forward(x.clone()) };
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
            for (what, (a, b)) in ["output", "dx", "dgamma", "dbeta"].iter().zip(ours.iter().zip(&reference)) {
                let d = max_rel_diff(a, b);
                assert!(d < 2e-5, "groups {groups} {shape:?}: {what} differs by {d:e}");
            }
            let inner = GroupNorm {
                gamma: norm.gamma.as_ref().map(|p| Param::from_tensor(p.val().inner())),
                beta: norm.beta.as_ref().map(|p| Param::from_tensor(p.val().inner())),
                num_groups: groups,
                num_channels: c,
                epsilon: norm.epsilon,
                affine: true,
            };
            let d = max_rel_diff(&values(group_norm_inference(&inner, x.clone())), &reference[0]);
            assert!(d < 2e-5, "inference differs by {d:e}");
        }
    }
}

#[cfg(test)]
mod conv_tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
    }

    /// Output, ∂x, ∂w, ∂bias of `conv` on `x` under a loss that weights
    /// every output differently, with our kernel or burn's.
    fn run(conv: &Conv2d<Ad>, x: &Tensor<Flex, 4>, ours: bool) -> [Vec<f32>; 4] {
        let conv = conv.clone();
        let conv = Conv2d {
            weight: Param::from_tensor(conv.weight.val().detach().require_grad()),
            bias: conv.bias.map(|b| Param::from_tensor(b.val().detach().require_grad())),
            ..conv
        };
        assert!(conv.weight.is_initialized());
        let x = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
        let y = if ours { conv2d_autodiff(&conv, x.clone()) } else { conv.forward(x.clone()) };
        // Fixed loss weights: 0.1, 0.2, …, 1.0, 0.1, …
        let n = y.dims().iter().product::<usize>();
        let w: Vec<f32> = (0..n).map(|i| 0.1 * (1 + i % 10) as f32).collect();
        let w = Tensor::<Ad, 1>::from_floats(w.as_slice(), &y.device()).reshape(y.dims());
        let out = values(y.clone().inner());
        let grads = (y * w).sum().backward();
        [
            out,
            values(x.grad(&grads).unwrap()),
            values(conv.weight.val().grad(&grads).unwrap()),
            values(conv.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn conv_gradients_match_burn() {
        let device = Default::default();
        let pad = |h, w| PaddingConfig2d::Explicit(h, w, h, w);
        let cases = [
            ("3x3 pad 1", Conv2dConfig::new([5, 7], [3, 3]).with_padding(pad(1, 1)), [2, 5, 9, 8]),
            ("depthwise 7x7 pad 3", Conv2dConfig::new([6, 6], [7, 7]).with_groups(6).with_padding(pad(3, 3)), [3, 6, 10, 9]),
            ("depthwise 7x7 pad 3 on 3x3", Conv2dConfig::new([4, 4], [7, 7]).with_groups(4).with_padding(pad(3, 3)), [2, 4, 3, 3]),
            ("1x1", Conv2dConfig::new([4, 3], [1, 1]), [2, 4, 5, 5]),
            ("3x3 no padding", Conv2dConfig::new([3, 4], [3, 3]), [2, 3, 7, 6]),
            ("3x5 pad 1,2", Conv2dConfig::new([3, 4], [3, 5]).with_padding(pad(1, 2)), [2, 3, 6, 7]),
            ("groups 2", Conv2dConfig::new([4, 6], [3, 3]).with_groups(2).with_padding(pad(1, 1)), [2, 4, 6, 6]),
            ("stride 2 (fallback)", Conv2dConfig::new([3, 5], [3, 3]).with_stride([2, 2]).with_padding(pad(1, 1)), [2, 3, 8, 8]),
        ];
        for (name, config, shape) in cases {
            let conv = config.init::<Ad>(&device);
            // Fix the (lazily initialised) parameters so both runs share them.
            let conv = Conv2d {
                weight: Param::from_tensor(conv.weight.val()),
                bias: conv.bias.map(|b| Param::from_tensor(b.val())),
                ..conv
            };
            let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let (ours, reference) = (run(&conv, &x, true), run(&conv, &x, false));
            for (what, (a, b)) in ["output", "dx", "dw", "dbias"].iter().zip(ours.iter().zip(&reference)) {
                assert_eq!(a.len(), b.len(), "{name}: {what} sizes");
                let d = max_rel_diff(a, b);
                assert!(d < 1e-5, "{name}: {what} differs by {d:e} (relative to its largest value)");
            }
        }
    }
}
