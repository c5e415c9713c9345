//! The U-Net's whole ConvNeXt block on the CPU backend, for inference,
//! fused per group of images (feature `unet`).
//!
//! Composed of separate kernels, the block writes seven full-batch tensors
//! to memory and reads them back (depthwise conv, its sum with the
//! condition, group norm, conv, GELU, group norm, conv, plus the
//! shortcut and the sum): at 28x28 with 48 hidden channels each is 24 MB
//! for a batch of 162, far beyond the caches. Here one task takes one
//! image (or, for the small levels, the few images one im2col product
//! holds) through every step, its intermediates (150 KB for one 28x28
//! image) staying in the core's L2; only the block's input and output
//! cross memory. Each step is the same code as the separate kernel
//! (`conv::Depthwise`, `conv::Ungrouped`, the group norm and GELU loops),
//! so the result is the same function to float rounding.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use diffusion_model::ConvNeXtBlock;

use super::conv::{conv_options, ConvScratch, Depthwise, Padded, Ungrouped};
use super::gelu::gelu_forward;
use super::group_norm::{affine_params, group_norm_chunk_in_place};
use super::matmul::{matmul, View};
use super::{dims4, f32s, grown, par_new_chunks, with_scratch};

/// `block.forward_generic(x, cond)` on `Flex` without autodiff, fused.
/// Blocks these kernels do not cover (non-f32 input, a grouped or
/// non-depthwise first conv, a norm without affine parameters, convs that
/// change the image size, a shortcut other than a 1x1 conv) take the
/// generic path.
pub fn inference(block: &ConvNeXtBlock<Flex>, x: Tensor<Flex, 4>, cond: Tensor<Flex, 2>) -> Tensor<Flex, 4> {
    let Some(plan) = Plan::new(block, &x) else {
        return block.forward_generic(x, cond);
    };
    let [b, _, h, w] = x.dims();
    let tensor = |t: Tensor<Flex, 4>| t.into_primitive().tensor().to_contiguous();
    let (x, cond) = (tensor(x), cond.into_primitive().tensor().to_contiguous());
    let out = plan.run(f32s(&x), f32s(&cond), b);
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(TensorData::new(
        out,
        [b, plan.cout, h, w],
    ))))
}

/// A contiguous copy of a parameter.
fn param<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    t.into_primitive().tensor().to_contiguous()
}

/// A conv's weight and bias.
struct ConvParams {
    weight: FlexTensor,
    bias: Option<FlexTensor>,
}

impl ConvParams {
    fn of(conv: &Conv2d<Flex>) -> Self {
        ConvParams {
            weight: param(conv.weight.val()),
            bias: conv.bias.as_ref().map(|b| param(b.val())),
        }
    }

    fn weight(&self) -> &[f32] {
        f32s(&self.weight)
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_ref().map(f32s)
    }
}

/// A group norm's γ, β, group count and ε.
struct NormParams {
    gamma: FlexTensor,
    beta: FlexTensor,
    groups: usize,
    epsilon: f64,
}

impl NormParams {
    fn of(norm: &GroupNorm<Flex>, x: &Tensor<Flex, 4>, channels: usize) -> Option<Self> {
        let (gamma, beta) = affine_params(norm, x)?;
        (norm.num_groups > 0 && channels.is_multiple_of(norm.num_groups)).then(|| NormParams {
            gamma: param(gamma),
            beta: param(beta),
            groups: norm.num_groups,
            epsilon: norm.epsilon,
        })
    }

    /// Normalises one image [channels, hw] in place.
    fn apply(&self, image: &mut [f32], hw: usize) {
        let per_group = image.len() / (self.groups * hw);
        let (gamma, beta) = (f32s(&self.gamma), f32s(&self.beta));
        for (g, chunk) in image.chunks_exact_mut(per_group * hw).enumerate() {
            let c0 = g * per_group;
            group_norm_chunk_in_place(
                chunk,
                &gamma[c0..c0 + per_group],
                &beta[c0..c0 + per_group],
                hw,
                self.epsilon,
            );
        }
    }
}

/// The block's shapes, the paths of its convs and its parameters.
struct Plan {
    cin: usize,
    hidden: usize,
    cout: usize,
    hw: usize,
    depthwise: Depthwise,
    dw: ConvParams,
    norm1: NormParams,
    conv1: Ungrouped,
    c1: ConvParams,
    norm2: NormParams,
    conv2: Ungrouped,
    c2: ConvParams,
    /// The 1x1 shortcut conv's weight [cout, cin] and bias; None for the
    /// identity.
    shortcut: Option<ConvParams>,
}

/// Buffers one task reuses from image group to image group.
#[derive(Default)]
struct Scratch {
    dw_padded: Padded,
    /// The normalised depthwise output [images, cin, hw].
    h1: Vec<f32>,
    /// conv1's output before the GELU [images, hidden, hw].
    pre: Vec<f32>,
    /// The normalised GELU output [images, hidden, hw].
    h2: Vec<f32>,
    conv1: ConvScratch,
    conv2: ConvScratch,
}

impl Plan {
    fn new(block: &ConvNeXtBlock<Flex>, x: &Tensor<Flex, 4>) -> Option<Self> {
        if x.dtype() != DType::F32 {
            return None;
        }
        let [b, cin, h, w] = x.dims();
        // The depthwise conv: one filter per channel, stride 1.
        let dw_options = conv_options(&block.depthwise, x)?;
        let dw = ConvParams::of(&block.depthwise);
        let [dw_out, per_group, kh, kw] = dims4(&dw.weight);
        if dw_options.groups != cin
            || dw_out != cin
            || per_group != 1
            || dw_options.stride != [1, 1]
            || dw_options.dilation != [1, 1]
        {
            return None;
        }
        let depthwise = Depthwise::new([h, w], [kh, kw], dw_options.padding)?;
        if [depthwise.ho, depthwise.wo] != [h, w] {
            return None;
        }
        let (c1, c2) = (ConvParams::of(&block.conv1), ConvParams::of(&block.conv2));
        let conv1 = Ungrouped::new(
            [b, cin, h, w],
            dims4(&c1.weight),
            c1.weight(),
            &conv_options(&block.conv1, x)?,
        )?;
        let hidden = conv1.cout;
        let conv2 = Ungrouped::new(
            [b, hidden, h, w],
            dims4(&c2.weight),
            c2.weight(),
            &conv_options(&block.conv2, x)?,
        )?;
        if [conv1.ho, conv1.wo, conv2.ho, conv2.wo] != [h, w, h, w] {
            return None;
        }
        let cout = conv2.cout;
        let shortcut = match &block.shortcut {
            None if cout == cin => None,
            Some(conv) => {
                let options = conv_options(conv, x)?;
                let p = ConvParams::of(conv);
                let plain = options.stride == [1, 1] && options.padding == [0, 0] && options.groups == 1;
                if !plain || dims4(&p.weight) != [cout, cin, 1, 1] {
                    return None;
                }
                Some(p)
            }
            None => return None,
        };
        Some(Plan {
            cin,
            hidden,
            cout,
            hw: h * w,
            depthwise,
            dw,
            norm1: NormParams::of(&block.norm1, x, cin)?,
            conv1,
            c1,
            norm2: NormParams::of(&block.norm2, x, hidden)?,
            conv2,
            c2,
            shortcut,
        })
    }

    /// The block's output [b, cout, h, w] for `x` [b, cin, h, w] and
    /// `cond` [b, cin], one task per group of images.
    fn run(&self, x: &[f32], cond: &[f32], b: usize) -> Vec<f32> {
        let out_len = self.cout * self.hw;
        let per_task = self.conv1.images_per_task(b).max(self.conv2.images_per_task(b));
        par_new_chunks(b * out_len, per_task * out_len, |task, out| {
            with_scratch(|s: &mut Scratch| self.run_images(x, cond, task * per_task, s, out))
        })
        .0
    }

    /// The block's output `out` [images, cout, h, w] for the images from
    /// `first` on.
    fn run_images(&self, x: &[f32], cond: &[f32], first: usize, s: &mut Scratch, out: &mut [f32]) {
        let Plan {
            cin,
            hidden,
            cout,
            hw,
            ..
        } = *self;
        let (in_len, out_len) = (cin * hw, cout * hw);
        let images = out.len() / out_len;
        let x = &x[first * in_len..][..images * in_len];
        let Scratch {
            dw_padded,
            h1,
            pre,
            h2,
            conv1,
            conv2,
        } = s;
        // h1 = GN1(depthwise(x) + bias + cond), image by image.
        let h1 = grown(h1, images * in_len);
        let (taps, dw_bias) = (self.dw.weight(), self.dw.bias());
        let k = taps.len() / cin;
        for (g, (xb, h1)) in x
            .chunks_exact(in_len)
            .zip(h1.chunks_exact_mut(in_len))
            .enumerate()
        {
            for (c, (src, dst)) in xb.chunks_exact(hw).zip(h1.chunks_exact_mut(hw)).enumerate() {
                let bias = dw_bias.map_or(0.0, |bs| bs[c]) + cond[(first + g) * cin + c];
                self.depthwise
                    .plane(src, &taps[c * k..][..k], bias, dw_padded, dst);
            }
            self.norm1.apply(h1, hw);
        }
        // h2 = GN2(GELU(conv1(h1))).
        let pre = grown(pre, images * hidden * hw);
        let h2 = grown(h2, images * hidden * hw);
        self.conv1.run(h1, self.c1.weight(), self.c1.bias(), conv1, pre);
        gelu_forward(h2, pre);
        for h2 in h2.chunks_exact_mut(hidden * hw) {
            self.norm2.apply(h2, hw);
        }
        // out = conv2(h2) + shortcut(x).
        self.conv2.run(h2, self.c2.weight(), self.c2.bias(), conv2, out);
        for (xb, out) in x.chunks_exact(in_len).zip(out.chunks_exact_mut(out_len)) {
            match &self.shortcut {
                None => {
                    for (o, &v) in out.iter_mut().zip(xb) {
                        *o += v;
                    }
                }
                Some(p) => {
                    // out [cout, hw] += W [cout, cin] · x [cin, hw] + bias
                    let ws = View::rows(p.weight(), cin);
                    matmul(out, cout, hw, cin, ws, View::rows(xb, hw), 1.0, true);
                    if let Some(bias) = p.bias() {
                        for (out, &bias) in out.chunks_exact_mut(hw).zip(bias) {
                            for o in out.iter_mut() {
                                *o += bias;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel_diff, values};
    use burn::tensor::Distribution;
    use diffusion_model::ConvNeXtConfig;

    #[test]
    fn fused_block_matches_the_generic_block() {
        let device = Default::default();
        // The U-Net's blocks (in, out, size): every level, with and without
        // a shortcut, and a size that is no multiple of the vector width.
        for (cin, cout, h, w) in [
            (1, 16, 28, 28),
            (32, 8, 28, 28),
            (8, 1, 28, 28),
            (32, 32, 14, 14),
            (128, 64, 7, 7),
            (128, 128, 3, 3),
            (6, 4, 5, 13),
        ] {
            let block = ConvNeXtConfig::new(cin, cout, 12).init::<Flex>(&device);
            let x = Tensor::<Flex, 4>::random([3, cin, h, w], Distribution::Normal(0.0, 1.5), &device);
            let cond = Tensor::<Flex, 2>::random([3, cin], Distribution::Normal(0.0, 1.0), &device);
            assert!(
                Plan::new(&block, &x).is_some(),
                "{cin} -> {cout}: the fused path must apply"
            );
            let fused = values(inference(&block, x.clone(), cond.clone()));
            let generic = values(block.forward_generic(x, cond));
            let diff = max_rel_diff(&fused, &generic);
            assert!(
                diff < 1e-5,
                "{cin} -> {cout} at {h}x{w}: fused block differs by {diff:e}"
            );
        }
    }
}
