//! The U-Net's whole attention block on the CPU backend through
//! `flash.rs` (feature `unet`): for inference ([`inference`]) and under
//! autodiff ([`autodiff`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use diffusion_model::{AttentionBlock, AttentionImpl};

use super::flash::{self, BlockWeights, Dims};
use super::matmul::{matmul, View};
use super::{f32s, grown, par_new_chunks, sum, sum_in_order, with_scratch};

/// `block.forward(x)` on `Flex` without autodiff, fused: group norm (this
/// crate's kernel), then projections, attention and the residual add in
/// the image layout (no transposed copies of the tokens). Blocks set to
/// [`AttentionImpl::Explicit`] and non-f32 inputs take the generic path.
pub fn inference(block: &AttentionBlock<Flex>, x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    if block.implementation != AttentionImpl::Fused || x.dtype() != DType::F32 {
        return block.forward_generic(x);
    }
    let [batch, d, h, w] = x.dims();
    let gn = crate::group_norm::inference(&block.norm, x.clone());
    let contiguous = |t: Tensor<Flex, 4>| t.into_primitive().tensor().to_contiguous();
    let (x, gn) = (contiguous(x), contiguous(gn));
    let param = |t: Tensor<Flex, 2>| t.into_primitive().tensor().to_contiguous();
    let bias = |t: Tensor<Flex, 1>| t.into_primitive().tensor().to_contiguous();
    let w_qkv = param(block.qkv.weight.val());
    let w_out = param(block.out.weight.val());
    let b_qkv: Option<FlexTensor> = block.qkv.bias.as_ref().map(|b| bias(b.val()));
    let b_out: Option<FlexTensor> = block.out.bias.as_ref().map(|b| bias(b.val()));
    let weights = BlockWeights {
        w_qkv: f32s(&w_qkv),
        b_qkv: b_qkv.as_ref().map(f32s),
        w_out: f32s(&w_out),
        b_out: b_out.as_ref().map(f32s),
    };
    let dims = Dims { batch, len: h * w, d };
    let out = flash::block_forward(f32s(&x), f32s(&gn), &weights, dims);
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(TensorData::new(
        out,
        [batch, d, h, w],
    ))))
}

/// `block.forward(x)` on `Autodiff<Flex>` as one autodiff operation after
/// the group norm (this crate's kernel, its own operation): projections,
/// attention (FlashAttention's forward and backward) and the residual add
/// read and write the image layout [B, d, H·W] directly, every step runs
/// on all cores, and the weight gradients are per-image partial products
/// summed in image order (the same bits on every run).
///
/// The generic block transposes the tokens to [B, H·W, d] and back, runs
/// burn's single-threaded linear layers, and splits q, k and v with
/// slices whose backward writes three zero-filled copies of the [B, H·W, 3d]
/// gradient: a third of the calling thread's serial time in a batch-32
/// training step. Blocks without biases, set to
/// [`AttentionImpl::Explicit`], or on non-f32 inputs take the generic path.
pub fn autodiff(
    block: &AttentionBlock<Autodiff<Flex>>,
    x: Tensor<Autodiff<Flex>, 4>,
) -> Tensor<Autodiff<Flex>, 4> {
    let (Some(b_qkv), Some(b_out), true) = (&block.qkv.bias, &block.out.bias, fused_applies(block, &x))
    else {
        return block.forward_generic(x);
    };
    let [batch, d, h, w] = x.dims();
    let gn = crate::group_norm::autodiff(&block.norm, x.clone());
    let [x, gn] = [x, gn].map(|t| t.into_primitive().tensor());
    let [w_qkv, w_out] =
        [block.qkv.weight.val(), block.out.weight.val()].map(|t| t.into_primitive().tensor());
    let [b_qkv, b_out] = [b_qkv.val(), b_out.val()].map(|t| t.into_primitive().tensor());
    let [x_flex, gn_flex] = [&x, &gn].map(|t| t.primitive.to_contiguous());
    let [w_qkv_flex, w_out_flex, b_qkv_flex, b_out_flex] =
        [&w_qkv, &w_out, &b_qkv, &b_out].map(|t| t.primitive.to_contiguous());
    let dims = Dims { batch, len: h * w, d };
    let weights = BlockWeights {
        w_qkv: f32s(&w_qkv_flex),
        b_qkv: Some(f32s(&b_qkv_flex)),
        w_out: f32s(&w_out_flex),
        b_out: Some(f32s(&b_out_flex)),
    };
    let (out, saved) = forward_saving(f32s(&x_flex), f32s(&gn_flex), &weights, dims);
    let out = FlexTensor::from_data(TensorData::new(out, [batch, d, h, w]));
    let parents = [x.node, gn.node, w_qkv.node, b_qkv.node, w_out.node, b_out.node];
    let out = match AttentionBlockBackward
        .prepare::<NoCheckpointing>(parents)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            BlockState {
                gn: gn_flex,
                w_qkv: w_qkv_flex,
                w_out: w_out_flex,
                saved,
                dims,
                shape: [batch, d, h, w],
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Whether [`autodiff`] runs `block` on `x` as one operation (else it
/// takes the generic path).
fn fused_applies(block: &AttentionBlock<Autodiff<Flex>>, x: &Tensor<Autodiff<Flex>, 4>) -> bool {
    let d = x.dims()[1];
    block.implementation == AttentionImpl::Fused
        && x.dtype() == DType::F32
        && block.qkv.bias.is_some()
        && block.out.bias.is_some()
        && block.qkv.weight.dims() == [d, 3 * d]
        && block.out.weight.dims() == [d, d]
}

/// What the training forward keeps for the backward pass: q, k, v and the
/// attention output o token-major [batch, len, d] (FlashAttention's
/// layout), and the log-sum-exp of each score row.
#[derive(Debug, Clone)]
struct Saved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
}

#[derive(Debug, Clone)]
struct BlockState {
    gn: FlexTensor,
    w_qkv: FlexTensor,
    w_out: FlexTensor,
    saved: Saved,
    dims: Dims,
    /// [B, d, H, W].
    shape: [usize; 4],
}

#[derive(Debug)]
struct AttentionBlockBackward;

impl Backward<Flex, 6> for AttentionBlockBackward {
    type State = BlockState;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gn, node_w_qkv, node_b_qkv, node_w_out, node_b_out] = ops.parents;
        let st = ops.state;
        let d = st.dims.d;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let weights = BlockWeights {
            w_qkv: f32s(&st.w_qkv),
            b_qkv: None,
            w_out: f32s(&st.w_out),
            b_out: None,
        };
        let g = backward(f32s(&dy), f32s(&st.gn), &weights, &st.saved, st.dims);
        let results = [
            (node_gn, g.gn, st.shape.to_vec()),
            (node_w_qkv, g.w_qkv, vec![d, 3 * d]),
            (node_b_qkv, g.b_qkv, vec![3 * d]),
            (node_w_out, g.w_out, vec![d, d]),
            (node_b_out, g.b_out, vec![d]),
        ];
        for (node, values, shape) in results {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(values, shape)));
            }
        }
        // The residual: ∂x = ∂out.
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dy);
        }
    }
}

/// out = x + Wo·attention(q, k, v) + bo with q, k, v = Wqkv·gn + bqkv (as
/// [`flash::block_forward`]), keeping q, k, v, o and the log-sum-exps.
/// `x`, `gn` and the result are [batch, d, len].
fn forward_saving(x: &[f32], gn: &[f32], weights: &BlockWeights, dims: Dims) -> (Vec<f32>, Saved) {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    // q, k, v [len, d] = gnᵀ [len, d] · Wqkv[:, part] [d, d] + bqkv[part], per image.
    let project = |offset: usize| {
        par_new_chunks(batch * per_seq, per_seq, |b, dst| {
            let gn_t = View::transposed(&gn[b * per_seq..][..per_seq], len);
            let w = View {
                data: &weights.w_qkv[offset..],
                rs: 3 * d,
                cs: 1,
            };
            matmul(dst, len, d, d, gn_t, w, 1.0, false);
            if let Some(bias) = weights.b_qkv {
                let bias = &bias[offset..offset + d];
                for row in dst.chunks_exact_mut(d) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            }
        })
        .0
    };
    let (q, k, v) = (project(0), project(d), project(2 * d));
    let (o, lse) = flash::forward(&q, &k, &v, dims);
    // out [d, len] = x + (Woᵀ [d, d] · oᵀ [d, len] + bo), per image.
    let (out, _) = par_new_chunks(batch * per_seq, per_seq, |b, out| {
        let o_t = View::transposed(&o[b * per_seq..][..per_seq], d);
        matmul(
            out,
            d,
            len,
            d,
            View::transposed(weights.w_out, d),
            o_t,
            1.0,
            false,
        );
        let x = &x[b * per_seq..][..per_seq];
        for (j, (row, x)) in out.chunks_exact_mut(len).zip(x.chunks_exact(len)).enumerate() {
            let bias = weights.b_out.map_or(0.0, |b| b[j]);
            row.iter_mut().zip(x).for_each(|(y, &x)| *y = x + (*y + bias));
        }
    });
    (out, Saved { q, k, v, o, lse })
}

/// Gradients of the block after its group norm.
struct BlockGrads {
    /// ∂gn [batch, d, len].
    gn: Vec<f32>,
    /// ∂Wqkv [d, 3d] and ∂bqkv \[3d\].
    w_qkv: Vec<f32>,
    b_qkv: Vec<f32>,
    /// ∂Wo [d, d] and ∂bo \[d\].
    w_out: Vec<f32>,
    b_out: Vec<f32>,
}

/// The backward pass of [`forward_saving`] for the output gradient `dy`
/// [batch, d, len] (∂x is `dy` itself).
fn backward(dy: &[f32], gn: &[f32], weights: &BlockWeights, saved: &Saved, dims: Dims) -> BlockGrads {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    // Per image: ∂o [len, d] = dyᵀ [len, d] · Woᵀ [d, d], and the image's
    // share of ∂Wo [d, d] = oᵀ [d, len] · dyᵀ [len, d] and of ∂bo.
    let (d_o, out_parts) = par_new_chunks(batch * per_seq, per_seq, |b, d_o| {
        let dy = &dy[b * per_seq..][..per_seq];
        let dy_t = View::transposed(dy, len);
        matmul(
            d_o,
            len,
            d,
            d,
            dy_t,
            View::transposed(weights.w_out, d),
            1.0,
            false,
        );
        let mut part = vec![0f32; d * d + d];
        let o_t = View::transposed(&saved.o[b * per_seq..][..per_seq], d);
        matmul(&mut part[..d * d], d, d, len, o_t, dy_t, 1.0, false);
        for (s, row) in part[d * d..].iter_mut().zip(dy.chunks_exact(len)) {
            *s = sum(row);
        }
        part
    });
    let (dq, dk, dv) = flash::backward(&saved.q, &saved.k, &saved.v, &saved.o, &saved.lse, &d_o, dims);
    // Per image, with g = [∂q ∂k ∂v] [len, 3d]: ∂gn [d, len] = Wqkv [d, 3d]
    // · gᵀ, and the image's share of ∂Wqkv [d, 3d] = gn [d, len] · g and of ∂bqkv.
    let (d_gn, qkv_parts) = par_new_chunks(batch * per_seq, per_seq, |b, d_gn| {
        with_scratch(|g: &mut Vec<f32>| {
            let g = grown(g, len * 3 * d);
            for (l, row) in g.chunks_exact_mut(3 * d).enumerate() {
                for (part, src) in row.chunks_exact_mut(d).zip([&dq, &dk, &dv]) {
                    part.copy_from_slice(&src[(b * len + l) * d..][..d]);
                }
            }
            let w_qkv = View::rows(weights.w_qkv, 3 * d);
            matmul(d_gn, d, len, 3 * d, w_qkv, View::transposed(g, 3 * d), 1.0, false);
            let mut part = vec![0f32; 3 * d * d + 3 * d];
            let gn = View::rows(&gn[b * per_seq..][..per_seq], len);
            matmul(
                &mut part[..3 * d * d],
                d,
                3 * d,
                len,
                gn,
                View::rows(g, 3 * d),
                1.0,
                false,
            );
            let sums = &mut part[3 * d * d..];
            for row in g.chunks_exact(3 * d) {
                sums.iter_mut().zip(row).for_each(|(s, g)| *s += g);
            }
            part
        })
    });
    let (mut w_out, mut w_qkv) = (sum_in_order(&out_parts), sum_in_order(&qkv_parts));
    BlockGrads {
        gn: d_gn,
        b_qkv: w_qkv.split_off(3 * d * d),
        w_qkv,
        b_out: w_out.split_off(d * d),
        w_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel_diff, values, weighted_backward};
    use burn::tensor::Distribution;
    use diffusion_model::AttentionConfig;

    #[test]
    fn fused_block_matches_the_generic_block() {
        let device = Default::default();
        // The U-Net's levels (28, 14, 7, 3 with their widths) and a length
        // that is no multiple of the 64-query block or of 16 columns.
        for (d, h, w) in [
            (16, 28, 28),
            (8, 28, 28),
            (32, 14, 14),
            (64, 7, 7),
            (128, 3, 3),
            (4, 5, 13),
        ] {
            let block = AttentionConfig::new(d).init::<Flex>(&device);
            let x = Tensor::<Flex, 4>::random([3, d, h, w], Distribution::Normal(0.0, 1.5), &device);
            let fused = values(inference(&block, x.clone()));
            let generic = values(block.forward_generic(x));
            let diff = max_rel_diff(&fused, &generic);
            assert!(diff < 1e-5, "d {d}, {h}x{w}: fused block differs by {diff:e}");
        }
    }

    type Ad = Autodiff<Flex>;

    /// Output, ∂x and the gradients of the norm's γ and β, Wqkv, bqkv, Wo
    /// and bo of `block` on `x` under a loss weighting every output
    /// differently, through the fused operation or the generic block.
    fn run(block: &AttentionBlock<Ad>, x: &Tensor<Flex, 4>, fused: bool) -> Vec<Vec<f32>> {
        use burn::module::Param;
        let fresh1 = |p: &Param<Tensor<Ad, 1>>| Param::from_tensor(p.val().detach().require_grad());
        let fresh2 = |p: &Param<Tensor<Ad, 2>>| Param::from_tensor(p.val().detach().require_grad());
        let mut block = block.clone();
        block.norm.gamma = block.norm.gamma.as_ref().map(fresh1);
        block.norm.beta = block.norm.beta.as_ref().map(fresh1);
        block.qkv.weight = fresh2(&block.qkv.weight);
        block.qkv.bias = block.qkv.bias.as_ref().map(fresh1);
        block.out.weight = fresh2(&block.out.weight);
        block.out.bias = block.out.bias.as_ref().map(fresh1);
        let x = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
        let y = if fused {
            autodiff(&block, x.clone())
        } else {
            block.forward_generic(x.clone())
        };
        let (out, grads) = weighted_backward(y);
        let grad1 =
            |p: &Option<Param<Tensor<Ad, 1>>>| values(p.as_ref().unwrap().val().grad(&grads).unwrap());
        vec![
            out,
            values(x.grad(&grads).unwrap()),
            grad1(&block.norm.gamma),
            grad1(&block.norm.beta),
            values(block.qkv.weight.val().grad(&grads).unwrap()),
            grad1(&block.qkv.bias),
            values(block.out.weight.val().grad(&grads).unwrap()),
            grad1(&block.out.bias),
        ]
    }

    #[test]
    fn fused_autodiff_block_matches_the_generic_block() {
        let device = Default::default();
        // The U-Net's levels, and a length (65) one past the 64-query block.
        for (d, h, w) in [(16, 28, 28), (32, 14, 14), (64, 7, 7), (128, 3, 3), (4, 5, 13)] {
            let block = AttentionConfig::new(d).init::<Ad>(&device);
            // Parameters are initialised lazily, on first use: once here, so
            // that both runs' copies hold the same values.
            let _ = (block.qkv.weight.val(), block.out.weight.val());
            let _ = (
                block.qkv.bias.as_ref().map(|b| b.val()),
                block.out.bias.as_ref().map(|b| b.val()),
            );
            let _ = (
                block.norm.gamma.as_ref().map(|g| g.val()),
                block.norm.beta.as_ref().map(|b| b.val()),
            );
            let x = Tensor::<Flex, 4>::random([2, d, h, w], Distribution::Normal(0.0, 1.5), &device);
            let probe = Tensor::<Ad, 4>::from_inner(x.clone());
            assert!(
                fused_applies(&block, &probe),
                "d {d}: the fused operation must apply"
            );
            let (fused, generic) = (run(&block, &x, true), run(&block, &x, false));
            let names = ["output", "dx", "dgamma", "dbeta", "dWqkv", "dbqkv", "dWo", "dbo"];
            for (what, (a, b)) in names.iter().zip(fused.iter().zip(&generic)) {
                assert_eq!(a.len(), b.len(), "d {d}, {h}x{w}: {what} sizes");
                let diff = max_rel_diff(a, b);
                assert!(diff < 1e-4, "d {d}, {h}x{w}: {what} differs by {diff:e}");
            }
        }
    }
}
