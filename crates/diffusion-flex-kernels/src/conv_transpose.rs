//! conv_transpose2d on the CPU backend for inference: one matrix product
//! and a scatter-add per image.
//!
//! Flex runs a transposed conv as a direct loop over every (input, tap,
//! output channel); the U-Net's three up convs took 2-4% of the CPU time
//! of sampling that way. Here, per image, cols [cout·kh·kw, h·w] =
//! Wᵀ [cout·kh·kw, cin] · x [cin, h·w] on `gemm`, then each column's
//! kh·kw·cout values are added into the output at (y·s + i − p,
//! x·s + j − p) (col2im).

use burn::backend::Flex;
use burn::nn::conv::ConvTranspose2d;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::matmul::{matmul, View};
use super::{dims4, f32s, grown, par_new_chunks, with_scratch};
use burn::backend::flex::FlexTensor;

/// `conv.forward(x)` on `Flex` without autodiff. Grouped or dilated convs
/// and non-f32 inputs take burn's path.
pub fn inference(conv: &ConvTranspose2d<Flex>, x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    if x.dtype() != DType::F32 || conv.groups != 1 || conv.dilation != [1, 1] {
        return conv.forward(x);
    }
    let x = x.into_primitive().tensor().to_contiguous();
    let weight = conv.weight.val().into_primitive().tensor().to_contiguous();
    let bias = conv
        .bias
        .as_ref()
        .map(|b| b.val().into_primitive().tensor().to_contiguous());
    let [b, cin, h, w] = dims4(&x);
    let [cin_w, cout, kh, kw] = dims4(&weight);
    let (s, p, op) = (conv.stride, conv.padding, conv.padding_out);
    // Output size (h − 1)·s − 2p + k + output padding, when positive.
    let size = |len: usize, i: usize, k: usize| ((len.max(1) - 1) * s[i] + k + op[i]).checked_sub(2 * p[i]);
    let (Some(ho), Some(wo)) = (size(h, 0, kh), size(w, 1, kw)) else {
        return conv.forward(Tensor::from_primitive(TensorPrimitive::Float(x)));
    };
    if cin_w != cin || h == 0 || w == 0 || ho == 0 || wo == 0 {
        return conv.forward(Tensor::from_primitive(TensorPrimitive::Float(x)));
    }
    let (xs, ws) = (f32s(&x), f32s(&weight));
    let bs = bias.as_ref().map(f32s);
    let (hw, taps) = (h * w, cout * kh * kw);
    let (out, _) = par_new_chunks(
        b * cout * ho * wo,
        cout * ho * wo,
        || (),
        |_, bi, out| {
            with_scratch(|cols: &mut Vec<f32>| {
                let cols = grown(cols, taps * hw);
                // cols [(co, i, j), (y, x)] = Σ_ci W[ci, co, i, j] · x[ci, y, x]
                let xb = View::rows(&xs[bi * cin * hw..][..cin * hw], hw);
                matmul(cols, taps, hw, cin, View::transposed(ws, taps), xb, 1.0, false);
                for (co, plane) in out.chunks_exact_mut(ho * wo).enumerate() {
                    plane.fill(bs.map_or(0.0, |bs| bs[co]));
                    for i in 0..kh {
                        for j in 0..kw {
                            let col = &cols[((co * kh + i) * kw + j) * hw..][..hw];
                            for y in 0..h {
                                let Some(oy) = (y * s[0] + i).checked_sub(p[0]).filter(|&oy| oy < ho) else {
                                    continue;
                                };
                                let row = &mut plane[oy * wo..][..wo];
                                for (x, &v) in col[y * w..][..w].iter().enumerate() {
                                    if let Some(ox) = (x * s[1] + j).checked_sub(p[1]).filter(|&ox| ox < wo) {
                                        row[ox] += v;
                                    }
                                }
                            }
                        }
                    }
                }
            })
        },
    );
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(TensorData::new(
        out,
        [b, cout, ho, wo],
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel_diff, values};
    use burn::nn::conv::ConvTranspose2dConfig;
    use burn::tensor::Distribution;

    #[test]
    fn conv_transpose_matches_burn() {
        let device = Default::default();
        // The U-Net's up convs (3→7 stride 3, 7→14 and 14→28 stride 2 with
        // output padding 1), then odd shapes: no padding, unequal strides,
        // a 2x4 kernel, padding that crops past a whole input row.
        let cases = [
            ([128, 64], [3, 3], [3, 3], [1, 1], [0, 0], [3, 3]),
            ([64, 32], [3, 3], [2, 2], [1, 1], [1, 1], [7, 7]),
            ([32, 16], [3, 3], [2, 2], [1, 1], [1, 1], [14, 14]),
            ([5, 3], [3, 3], [1, 1], [0, 0], [0, 0], [4, 6]),
            ([4, 6], [2, 4], [2, 3], [1, 2], [1, 0], [5, 3]),
            ([3, 2], [3, 3], [1, 1], [2, 2], [0, 0], [6, 5]),
        ];
        for (channels, kernel, stride, padding, padding_out, [h, w]) in cases {
            let conv = ConvTranspose2dConfig::new(channels, kernel)
                .with_stride(stride)
                .with_padding(padding)
                .with_padding_out(padding_out)
                .init::<Flex>(&device);
            let x =
                Tensor::<Flex, 4>::random([3, channels[0], h, w], Distribution::Normal(0.0, 1.0), &device);
            let ours = inference(&conv, x.clone());
            let burn = conv.forward(x);
            assert_eq!(
                ours.dims(),
                burn.dims(),
                "{channels:?} {kernel:?} stride {stride:?}"
            );
            let diff = max_rel_diff(&values(ours), &values(burn));
            assert!(
                diff < 1e-5,
                "{channels:?} {kernel:?} stride {stride:?}: differs by {diff:e}"
            );
        }
    }
}
