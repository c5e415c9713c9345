//! The U-Net's whole attention block on the CPU backend, for inference,
//! through `flash::block_forward` (feature `unet`).

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use diffusion_model::{AttentionBlock, AttentionImpl};

use super::f32s;
use super::flash::{self, BlockWeights, Dims};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel_diff, values};
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
}
