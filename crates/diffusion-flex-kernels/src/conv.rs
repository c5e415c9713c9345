//! conv2d on the CPU backend with a faster backward pass.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, ModuleOps};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::conv_direct::Narrow;
use super::conv_transpose;
use super::conv_winograd::{Winograd, WinogradScratch};
use super::matmul::{matmul, View};
use super::{dims4, dot, f32s, grown, madd, par_new_chunks, sum, sum_in_order, vectorised, with_scratch};

/// A conv2d whose passes avoid Flex's slow paths. Forward: `conv2d` (`conv.rs`). The
/// input gradient of a stride-1 conv is itself a conv (flipped kernel,
/// channels swapped per group), run by `conv2d` on all cores instead of
/// Flex's single-threaded direct transposed conv; the weight gradient is an
/// im2col + gemm per image (ungrouped) or a direct loop per channel
/// (depthwise) instead of one conv per group; the bias gradient is a
/// per-channel sum without a transposed copy. Anything else falls back to
/// burn's default backward.
pub fn autodiff(conv: &Conv2d<Autodiff<Flex>>, x: Tensor<Autodiff<Flex>, 4>) -> Tensor<Autodiff<Flex>, 4> {
    let (Some(options), Some(bias)) = (conv_options(conv, &x), &conv.bias) else {
        return conv.forward(x);
    };
    // The input gradient pads by k − 1 − p.
    if options.padding[0] >= conv.kernel_size[0] || options.padding[1] >= conv.kernel_size[1] {
        return conv.forward(x);
    }
    let [x, weight, bias] = [
        x.into_primitive().tensor(),
        conv.weight.val().into_primitive().tensor(),
        bias.val().into_primitive().tensor(),
    ];
    let out = match Conv2dBackward
        .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = conv2d(
                x.primitive.clone(),
                weight.primitive.clone(),
                Some(bias.primitive),
                options.clone(),
            );
            prep.finish((x.primitive, weight.primitive, options), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(conv2d(
            x.primitive,
            weight.primitive,
            Some(bias.primitive),
            options,
        )),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The conv of a module on `Flex` without autodiff, through `conv2d`.
pub fn inference(conv: &Conv2d<Flex>, x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    let Some(options) = conv_options(conv, &x) else {
        return conv.forward(x);
    };
    let bias = conv.bias.as_ref().map(|b| b.val().into_primitive().tensor());
    let out = conv2d(
        x.into_primitive().tensor(),
        conv.weight.val().into_primitive().tensor(),
        bias,
        options,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The options of `conv` when these kernels apply to it (f32 input,
/// symmetric padding); None otherwise.
pub(crate) fn conv_options<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<ConvOptions<2>> {
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => [top, left],
        PaddingConfig2d::Valid => [0, 0],
        _ => return None,
    };
    (x.dtype() == DType::F32).then(|| ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups))
}

/// conv2d forward. Depthwise convs run [`depthwise`], ungrouped ones
/// [`Ungrouped::run`] in parallel over groups of images; grouped ones go
/// to Flex.
pub(crate) fn conv2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: ConvOptions<2>,
) -> FlexTensor {
    if is_depthwise(&x, &weight, &options) {
        return depthwise(x, weight, bias, options);
    }
    let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
    let (xs, ws) = (f32s(&x), f32s(&weight));
    let Some(conv) = Ungrouped::new(dims4(&x), dims4(&weight), ws, &options) else {
        return Flex::conv2d(x, weight, bias, options);
    };
    let bias = bias.map(|b| b.to_contiguous());
    let b = dims4(&x)[0];
    let bs = bias.as_ref().map(f32s);
    let per_task = conv.images_per_task(b);
    let (in_len, out_len) = (conv.in_len(), conv.out_len());
    let (out, _) = par_new_chunks(b * out_len, per_task * out_len, |task, out| {
        let images = out.len() / out_len;
        let xs = &xs[task * per_task * in_len..][..images * in_len];
        with_scratch(|scratch: &mut ConvScratch| conv.run(xs, ws, bs, scratch, out));
    });
    FlexTensor::from_data(TensorData::new(out, [b, conv.cout, conv.ho, conv.wo]))
}

/// An ungrouped conv2d (cin → cout channels, h×w → ho×wo) and the path
/// [`conv2d`] takes for it: [`Ungrouped::im2col`] products over groups of
/// images for small outputs (at most [`IM2COL_POSITIONS`] per image),
/// strided or dilated convs and convs that widen (cin < cout), kh·kw
/// shifted matrix products per image on a zero-padded copy otherwise (no
/// im2col matrix, kh·kw times the input, is built).
///
/// The widening rule, per conv at batch 41 on one core of an Intel Xeon
/// (AVX-512), im2col against shifted: 1→48 at 28x28 0.78 vs 1.99 ms (the
/// shifted products have depth cin = 1), 32→96 at 14x14 4.09 vs 4.97 ms,
/// 64→96 at 14x14 8.30 vs 8.84 ms; the narrowing convs measured the other
/// way (48→16 at 28x28 7.04 vs 6.00 ms, 96→32 at 14x14 5.87 vs 5.18 ms).
#[derive(Debug, Clone)]
pub(crate) struct Ungrouped {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
    options: ConvOptions<2>,
    im2col: bool,
    /// The Winograd path, where it applies (3x3, stride 1, padding 1, see
    /// [`winograd_applies`]); it pre-empts the others.
    winograd: Option<Winograd>,
    /// The weights reordered for the direct kernel, where the shifted path
    /// with few output channels takes it (built once per conv, not per
    /// image).
    narrow: Option<Narrow>,
    /// The shifted path's weights one tap after another, [kh·kw, cout,
    /// cin], so each tap's [cout, cin] matrix has unit stride along cin
    /// (built once per conv). Read in place of [cout, cin, kh, kw] with its
    /// stride of kh·kw, gemm packed the tap's weights again for every
    /// image and tap: 6.6% of 96→32 at 14x14 with AVX2.
    tap_major: Vec<f32>,
}

/// Buffers one task of [`Ungrouped::run`] reuses from call to call.
#[derive(Default)]
pub(crate) struct ConvScratch {
    padded: Padded,
    acc: Vec<f32>,
    cols: Vec<f32>,
    winograd: WinogradScratch,
}

/// A zero-padded copy of planes: the interior is rewritten for every
/// input, the borders stay zero as long as the geometry (`key`: the
/// plane's size, its padding and the padded row or kernel width) does.
#[derive(Default)]
pub(crate) struct Padded {
    buf: Vec<f32>,
    key: [usize; 5],
}

impl Padded {
    /// `len` floats with zero borders for planes of geometry `key`.
    fn for_geometry(&mut self, key: [usize; 5], len: usize) -> &mut [f32] {
        if self.key != key || self.buf.len() != len {
            self.buf.clear();
            self.buf.resize(len, 0.0);
            self.key = key;
        }
        &mut self.buf
    }
}

impl Ungrouped {
    /// The conv of inputs [_, cin, h, w] with the weight `ws` [cout, cin,
    /// kh, kw] under `options` ([`Ungrouped::run`] must be given the same
    /// `ws`); None for grouped convs and for kernels larger than the padded
    /// input (left to Flex).
    pub fn new(
        [_, cin, h, w]: [usize; 4],
        [cout, cin_w, kh, kw]: [usize; 4],
        ws: &[f32],
        options: &ConvOptions<2>,
    ) -> Option<Self> {
        let [ph, pw] = options.padding;
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        let reach = |k: usize, i: usize| options.dilation[i] * (k - 1) + 1;
        if options.groups != 1 || cin_w != cin || hp < reach(kh, 0) || wp < reach(kw, 1) {
            return None;
        }
        let (ho, wo) = (
            (hp - reach(kh, 0)) / options.stride[0] + 1,
            (wp - reach(kw, 1)) / options.stride[1] + 1,
        );
        let winograd = winograd_applies([cin, h, w], [cout, kh, kw], options)
            .then(|| Winograd::new(cin, cout, [h, w], &ws[..cout * cin * 9]));
        let im2col = options.stride != [1, 1]
            || options.dilation != [1, 1]
            || ho * wo <= IM2COL_POSITIONS
            || cin < cout;
        let narrow = if im2col || winograd.is_some() {
            None
        } else {
            Narrow::new(ws, [cout, cin, kh, kw])
        };
        let taps = kh * kw;
        let mut tap_major = Vec::new();
        if !im2col && narrow.is_none() && winograd.is_none() {
            tap_major.resize(taps * cout * cin, 0.0);
            for (k, &wv) in ws[..cout * cin * taps].iter().enumerate() {
                // k = (co·cin + ci)·taps + tap
                let (co_ci, tap) = (k / taps, k % taps);
                tap_major[tap * cout * cin + co_ci] = wv;
            }
        }
        Some(Ungrouped {
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            ho,
            wo,
            options: options.clone(),
            im2col,
            winograd,
            narrow,
            tap_major,
        })
    }

    /// Floats of one input image.
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// Floats of one output image.
    pub fn out_len(&self) -> usize {
        self.cout * self.ho * self.wo
    }

    /// Images one task of a batch of `batch` should take: on the Winograd
    /// and im2col paths about enough tiles or columns for gemm's widest
    /// tiles ([`WINOGRAD_COLUMNS`], [`IM2COL_COLUMNS`]), in a number of
    /// tasks the threads share evenly ([`balanced_group`]); one otherwise.
    pub fn images_per_task(&self, batch: usize) -> usize {
        if let Some(winograd) = &self.winograd {
            balanced_group(batch, (WINOGRAD_COLUMNS / winograd.tiles()).max(1))
        } else if self.im2col {
            balanced_group(batch, IM2COL_COLUMNS / (self.ho * self.wo).max(1))
        } else {
            1
        }
    }

    /// out [images, cout, ho, wo] = conv(xs [images, cin, h, w]) + bias.
    pub fn run(
        &self,
        xs: &[f32],
        ws: &[f32],
        bias: Option<&[f32]>,
        scratch: &mut ConvScratch,
        out: &mut [f32],
    ) {
        if let Some(winograd) = &self.winograd {
            winograd.run(xs, bias, &mut scratch.winograd, out);
        } else if self.im2col {
            self.run_im2col(xs, ws, bias, scratch, out);
        } else {
            for (xb, out) in xs
                .chunks_exact(self.in_len())
                .zip(out.chunks_exact_mut(self.out_len()))
            {
                self.run_shifted(xb, bias, scratch, out);
            }
        }
    }

    /// One image as kh·kw shifted matrix products (stride 1, dilation 1).
    fn run_shifted(&self, xb: &[f32], bias: Option<&[f32]>, scratch: &mut ConvScratch, out: &mut [f32]) {
        let Ungrouped {
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            ho,
            wo,
            ..
        } = *self;
        let [ph, pw] = self.options.padding;
        let wp = w + 2 * pw;
        // The products run over a grid of ho rows of wp columns (the last
        // kw − 1 of each row are discarded), rounded up to whole vectors:
        // gemm then reads the shifted planes in place instead of copying
        // them into its panels (it packs a column-major operand whose row
        // count is no multiple of the vector width). Each padded plane has
        // zeros past its end for the last tap of that grid: kw − 1 plus the
        // rounding.
        let grid = (ho * wp).next_multiple_of(GRID_MULTIPLE);
        let plane = grid + (kh - 1) * wp + kw;
        let padded = scratch.padded.for_geometry([h, w, ph, pw, kw], cin * plane);
        for ci in 0..cin {
            for y in 0..h {
                let dst = (ci * plane) + (y + ph) * wp + pw;
                padded[dst..dst + w].copy_from_slice(&xb[(ci * h + y) * w..][..w]);
            }
        }
        if let Some(narrow) = &self.narrow {
            narrow.run(padded, [cin, plane, wp], [kh, kw], bias, out, [ho, wo]);
            return;
        }
        let acc = grown(&mut scratch.acc, cout * grid);
        for i in 0..kh {
            for j in 0..kw {
                // acc [out, grid] (+)= W[:, :, i, j] [out, in] · padded shifted by (i, j) [in, grid]
                let lhs = View::rows(&self.tap_major[(i * kw + j) * cout * cin..][..cout * cin], cin);
                let rhs = View {
                    data: &padded[i * wp + j..],
                    rs: plane,
                    cs: 1,
                };
                matmul(acc, cout, grid, cin, lhs, rhs, 1.0, i + j > 0);
            }
        }
        for co in 0..cout {
            let bias = bias.map_or(0.0, |bs| bs[co]);
            for y in 0..ho {
                let src = &acc[co * grid + y * wp..][..wo];
                for (o, &a) in out[(co * ho + y) * wo..][..wo].iter_mut().zip(src) {
                    *o = a + bias;
                }
            }
        }
    }

    /// Several images as one matrix product:
    /// out [cout, images·positions] = W [cout, cin·kh·kw] · im2col(x).
    /// For small outputs (7x7, 3x3) and strided convs: the shifted products
    /// would give gemm only a few dozen columns per image, a third of them
    /// padding.
    fn run_im2col(
        &self,
        xs: &[f32],
        ws: &[f32],
        bias: Option<&[f32]>,
        scratch: &mut ConvScratch,
        out: &mut [f32],
    ) {
        let Ungrouped {
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            ho,
            wo,
            ..
        } = *self;
        let (taps, positions) = (cin * kh * kw, ho * wo);
        let images = out.len() / self.out_len();
        let n = images * positions;
        // The product in slices of input channels, each slice's im2col rows
        // sized to stay in cache between being written and read (the whole
        // matrix, 9·cin rows, is megabytes at 7x7 and 3x3: written and
        // read back through memory it cost a fifth of the conv).
        let chunk = (IM2COL_SLICE / (kh * kw * n).max(1)).clamp(1, cin.max(1));
        let cols = grown(&mut scratch.cols, chunk * kh * kw * n);
        let acc = grown(&mut scratch.acc, cout * n);
        let hw = h * w;
        for c0 in (0..cin).step_by(chunk) {
            let cc = chunk.min(cin - c0);
            for (g, xb) in xs.chunks_exact(self.in_len()).enumerate() {
                im2col(
                    &xb[c0 * hw..(c0 + cc) * hw],
                    [cc, h, w],
                    [kh, kw],
                    [ho, wo],
                    &self.options,
                    &mut cols[g * positions..],
                    n,
                );
            }
            // acc (+)= W[:, c0 .. c0 + cc, :, :] [cout, cc·kh·kw] · cols
            let lhs = View {
                data: &ws[c0 * kh * kw..],
                rs: taps,
                cs: 1,
            };
            matmul(acc, cout, n, cc * kh * kw, lhs, View::rows(cols, n), 1.0, c0 > 0);
        }
        for (g, out) in out.chunks_exact_mut(cout * positions).enumerate() {
            for (co, out) in out.chunks_exact_mut(positions).enumerate() {
                let bias = bias.map_or(0.0, |bs| bs[co]);
                for (o, &a) in out.iter_mut().zip(&acc[co * n + g * positions..][..positions]) {
                    *o = a + bias;
                }
            }
        }
    }
}

/// Tiles (4x4 output blocks) one Winograd task takes, about: the
/// products' column count; 16 images a task at 7x7 (4 tiles each), 4 at
/// 14x14 (16). M (36·cout·tiles) is then 1.8 MB at 192 outputs. Against
/// 32, 128, and 128 at 14x14 only, in per-conv benches (`cargo bench -p
/// diffusion-flex-kernels --features unet -- conv3x3`, batch 81, two
/// rounds, 2-core Intel Xeon family 6 model 207) none was faster on every
/// conv; 64 was within the noise of the best on each. (With F(2x2, 3x3),
/// 2x2 tiles, 128 columns and 64 on 7x7 planes measured best on the
/// model-167 Xeon.)
const WINOGRAD_COLUMNS: usize = 64;

/// Output sizes (positions per plane) that [`Winograd`] takes: 7x7 to
/// 14x14 and what lies between. Per conv at batch 81 on 2 cores of an
/// Intel Xeon, Winograd against the path it replaced, AVX-512 (AVX2, both
/// held to it): 64→96 at 14x14 5.7 vs 7.7 ms (7.8 vs 11.2), 96→32 4.1 vs
/// 4.4 (5.6 vs 6.4), 192→64 at 7x7 3.7 vs 4.7 (5.9 vs 6.3), 128→192 6.8 vs
/// 7.2 (9.9 vs 11.2); but at 3x3, whose four 2x2 tiles cover 16 outputs
/// for 9, 384→128 5.4 vs 3.5 (6.7 vs 4.9), and at 28x28, where the
/// shifted products read the plane in place, 48→16 6.1 vs 4.9 (7.5 vs 6.7).
/// (Those were F(2x2, 3x3). F(4x4, 3x3) at 3x3, one tile per image, and at
/// 28x28 was no faster either: 384→128 3.9-4.9 vs 4.0-5.3 ms, 128→384
/// 4.0-4.1 vs 3.0-4.1, 48→16 5.5-5.8 vs 4.9-5.4, 32→24 4.6-5.4 vs
/// 4.4-4.5, 24→8 2.6-2.7 vs 1.3, two alternating rounds on the model-207
/// Xeon.)
const WINOGRAD_POSITIONS: std::ops::RangeInclusive<usize> = 25..=256;

/// Whether [`Winograd`] computes a conv: 3x3, stride 1, padding 1,
/// dilation 1, ungrouped, at least 8 channels each way, an output size in
/// [`WINOGRAD_POSITIONS`].
fn winograd_applies([cin, h, w]: [usize; 3], [cout, kh, kw]: [usize; 3], options: &ConvOptions<2>) -> bool {
    [kh, kw] == [3, 3]
        && options.stride == [1, 1]
        && options.dilation == [1, 1]
        && options.padding == [1, 1]
        && options.groups == 1
        && cin >= 8
        && cout >= 8
        && WINOGRAD_POSITIONS.contains(&(h * w))
}

/// Output columns a depthwise kernel computes at once: one AVX-512
/// vector, two AVX2 ones.
const DW_LANES: usize = 16;

/// Output columns at once for planes at most this wide.
const DW_NARROW: usize = 8;

/// Planes (image, channel) per parallel task of [`depthwise`].
const DW_PLANES_PER_TASK: usize = 8;

/// A depthwise conv (stride 1, one kh×kw filter per channel: the
/// ConvNeXt blocks' 7x7) computed directly: each plane is copied into a
/// zero-padded buffer, then every output row is built [`DW_LANES`] (or,
/// for narrow planes, [`DW_NARROW`]) columns at a time in registers, tap
/// by tap. Flex's depthwise path walks the same taps over rows of 28 or
/// fewer columns with scalar remainder loops compiled for baseline x86-64.
fn depthwise(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: ConvOptions<2>,
) -> FlexTensor {
    let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
    let [b, c, h, w] = dims4(&x);
    let [_, _, kh, kw] = dims4(&weight);
    let Some(dw) = Depthwise::new([h, w], [kh, kw], options.padding) else {
        return Flex::conv2d(x, weight, bias, options);
    };
    let bias = bias.map(|b| b.to_contiguous());
    let (xs, ws) = (f32s(&x), f32s(&weight));
    let bs = bias.as_ref().map(f32s);
    let (ho, wo) = (dw.ho, dw.wo);
    let (out, _) = par_new_chunks(b * c * ho * wo, DW_PLANES_PER_TASK * ho * wo, |task, out| {
        with_scratch(|padded: &mut Padded| {
            for (i, out) in out.chunks_exact_mut(ho * wo).enumerate() {
                let plane = task * DW_PLANES_PER_TASK + i;
                let ci = plane % c;
                let taps = &ws[ci * kh * kw..][..kh * kw];
                let bias = bs.map_or(0.0, |bs| bs[ci]);
                dw.plane(&xs[plane * h * w..][..h * w], taps, bias, padded, out);
            }
        })
    });
    FlexTensor::from_data(TensorData::new(out, [b, c, ho, wo]))
}

/// One plane of a depthwise conv (stride 1, dilation 1): h×w → ho×wo.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Depthwise {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ph: usize,
    pw: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Depthwise {
    /// None when the kernel is larger than the padded plane (left to Flex).
    pub fn new([h, w]: [usize; 2], [kh, kw]: [usize; 2], [ph, pw]: [usize; 2]) -> Option<Self> {
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        (hp >= kh && wp >= kw).then(|| Depthwise {
            h,
            w,
            kh,
            kw,
            ph,
            pw,
            ho: hp - kh + 1,
            wo: wp - kw + 1,
        })
    }

    /// `out` [ho, wo] = bias + the kh×kw filter `taps` over `src` [h, w]
    /// (zero-padded through `padded`).
    pub fn plane(&self, src: &[f32], taps: &[f32], bias: f32, padded: &mut Padded, out: &mut [f32]) {
        let Depthwise {
            h,
            w,
            kh,
            kw,
            ph,
            pw,
            wo,
            ..
        } = *self;
        // A padded row holds every column the last chunk of lanes reads.
        let lanes = if wo <= DW_NARROW { DW_NARROW } else { DW_LANES };
        let row = wo.div_ceil(lanes) * lanes + kw - 1;
        let buf = padded.for_geometry([h, w, ph, pw, row], (h + 2 * ph) * row);
        for (y, src) in src.chunks_exact(w).enumerate() {
            buf[(y + ph) * row + pw..][..w].copy_from_slice(src);
        }
        debug_assert_eq!(taps.len(), kh * kw);
        #[cfg(target_arch = "x86_64")]
        if crate::simd_level() == crate::SimdLevel::Avx512 {
            // SAFETY: the CPU has AVX-512F (simd_level checked it).
            unsafe { depthwise_plane_avx512(buf, row, taps, [kh, kw], bias, out, [self.ho, wo]) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd_level() == crate::SimdLevel::Avx2 {
            let geometry = ([kh, kw], [self.ho, wo]);
            // SAFETY: the CPU has AVX2 and FMA (simd_level checked it); each
            // padded row holds whole chunks of `lanes` columns plus kw − 1.
            unsafe {
                if lanes == DW_NARROW {
                    depthwise_plane_avx2::<1>(buf, row, taps, bias, out, geometry);
                } else {
                    depthwise_plane_avx2::<2>(buf, row, taps, bias, out, geometry);
                }
            }
            return;
        }
        // Baseline x86-64 (or another architecture): the portable loop
        // without FMA, 8 columns at a time for narrow planes (the 7x7 and
        // 3x3 levels, where 16 would leave most lanes idle).
        if lanes == DW_NARROW {
            depthwise_rows::<false, DW_NARROW>(buf, row, taps, kw, bias, out, wo);
        } else {
            depthwise_rows::<false, DW_LANES>(buf, row, taps, kw, bias, out, wo);
        }
    }
}

/// Output rows [`depthwise_plane_avx512`] builds at once.
#[cfg(target_arch = "x86_64")]
const DW_ROWS: usize = 4;

/// [`depthwise_rows`] for AVX-512: 16 columns (a masked vector for the
/// last, narrower chunk: the 7x7 and 3x3 planes take one) of
/// [`DW_ROWS`] output rows at once. Each shifted input vector is loaded
/// once and feeds every output row it reaches (up to kh·kw·4 FMAs for
/// (kh + 3)·kw loads instead of one load per FMA), and the four rows'
/// sums are independent chains. The taps are summed in the same order
/// as [`depthwise_rows`] (bias, then row by row, column by column), so
/// the result has the same bits as that loop with FMA and as
/// [`depthwise_plane_avx2`] (both tested). (Written with
/// intrinsics: the compiler builds [`depthwise_rows`]'s 16-lane array as
/// one 8-lane vector and eight scalar FMAs.) The 7x7 filter takes
/// [`depthwise7_avx512`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise_plane_avx512(
    padded: &[f32],
    row: usize,
    taps: &[f32],
    [kh, kw]: [usize; 2],
    bias: f32,
    out: &mut [f32],
    [ho, wo]: [usize; 2],
) {
    use std::arch::x86_64::*;
    // Every load below reads columns x0 + j .. x0 + j + n ≤ wo + kw − 1 of
    // rows y0 + ir < ho + kh − 1; every store writes inside `out`.
    assert!(row >= wo + kw - 1 && padded.len() >= (ho + kh - 1) * row);
    assert!(taps.len() == kh * kw && out.len() == ho * wo);
    let (src, dst) = (padded.as_ptr(), out.as_mut_ptr());
    if let (7, 7, Ok(taps)) = (kh, kw, <&[f32; 49]>::try_from(taps)) {
        for x0 in (0..wo).step_by(16) {
            let n = (wo - x0).min(16);
            let mask = ((1u32 << n) - 1) as __mmask16;
            for y0 in (0..ho).step_by(DW7_ROWS) {
                // SAFETY: rows y0 .. y0 + rows ≤ ho of the output, input rows
                // y0 .. y0 + rows + 6 ≤ ho + kh − 1, columns as asserted above.
                let (line, dst) = unsafe { (src.add(y0 * row + x0), dst.add(y0 * wo + x0)) };
                let at = (line, row, dst, wo);
                // SAFETY: as above; the CPU has AVX-512F (this function's contract).
                unsafe {
                    match (ho - y0).min(DW7_ROWS) {
                        8 => depthwise7_avx512::<8>(at, taps, bias, mask),
                        7 => depthwise7_avx512::<7>(at, taps, bias, mask),
                        6 => depthwise7_avx512::<6>(at, taps, bias, mask),
                        5 => depthwise7_avx512::<5>(at, taps, bias, mask),
                        4 => depthwise7_avx512::<4>(at, taps, bias, mask),
                        3 => depthwise7_avx512::<3>(at, taps, bias, mask),
                        2 => depthwise7_avx512::<2>(at, taps, bias, mask),
                        _ => depthwise7_avx512::<1>(at, taps, bias, mask),
                    }
                }
            }
        }
        return;
    }
    for x0 in (0..wo).step_by(16) {
        let n = (wo - x0).min(16);
        let mask = ((1u32 << n) - 1) as __mmask16;
        let mut y0 = 0;
        while y0 < ho {
            let rows = (ho - y0).min(DW_ROWS);
            let mut acc = [_mm512_set1_ps(bias); DW_ROWS];
            for ir in 0..kh + rows - 1 {
                // SAFETY: in bounds by the asserts above.
                let line = unsafe { src.add((y0 + ir) * row + x0) };
                for j in 0..kw {
                    // SAFETY: in bounds by the asserts above (masked lanes are not read).
                    let v = unsafe { _mm512_maskz_loadu_ps(mask, line.add(j)) };
                    for (k, acc) in acc.iter_mut().enumerate() {
                        // Output row y0 + k takes input row y0 + ir through tap row ir − k.
                        let i = ir.wrapping_sub(k);
                        if k < rows && i < kh {
                            *acc = _mm512_fmadd_ps(_mm512_set1_ps(taps[i * kw + j]), v, *acc);
                        }
                    }
                }
            }
            for (k, acc) in acc.iter().enumerate().take(rows) {
                // SAFETY: row y0 + k < ho, columns x0 .. x0 + n ≤ wo.
                unsafe { _mm512_mask_storeu_ps(dst.add((y0 + k) * wo + x0), mask, *acc) };
            }
            y0 += rows;
        }
    }
}

/// Output rows [`depthwise7_avx512`] builds at once: eight independent
/// chains of multiply-adds keep both of a core's FMA units busy (four
/// chains of 4-cycle latency fill one).
#[cfg(target_arch = "x86_64")]
const DW7_ROWS: usize = 8;

/// [`depthwise_plane_avx512`] for the ConvNeXt blocks' 7x7 filter: R ≤
/// [`DW7_ROWS`] output rows of one chunk of 16 (masked) columns. The
/// input rows are unrolled at compile time ([`depthwise7_input_row`]), so
/// which output rows each input row reaches, and through which tap,
/// costs nothing at run time; the generic loop tested that for every
/// multiply-add and read every tap through a bounds check. The taps are
/// summed in the same order (bias, then tap row by row, column by
/// column), so the bits are those of the generic loop. The depthwise
/// conv's share of sampling's CPU time fell from about 7% to 3.2% (4.7%
/// held to AVX2, from 7.5%), 2-core Intel Xeon family 6 model 207.
///
/// # Safety
/// The CPU must have AVX-512F; `line` points at input row y0, column x0
/// of a padded plane with rows of `row` floats holding R + 6 rows from
/// there, each with the masked columns + 6 readable; `dst` at output row
/// y0, column x0 of rows of `wo` floats, R of them, masked columns
/// writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise7_avx512<const R: usize>(
    (line, row, dst, wo): (*const f32, usize, *mut f32, usize),
    taps: &[f32; 49],
    bias: f32,
    mask: std::arch::x86_64::__mmask16,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(bias); R];
    macro_rules! input_rows {
        ($($ir:literal)*) => {$(
            if $ir < R + 6 {
                // SAFETY: input row $ir < R + 6 (the contract above).
                unsafe { depthwise7_input_row::<R, $ir>(line.add($ir * row), taps, mask, &mut acc) };
            }
        )*};
    }
    input_rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13);
    for (k, acc) in acc.iter().enumerate() {
        // SAFETY: output row k < R (the contract above).
        unsafe { _mm512_mask_storeu_ps(dst.add(k * wo), mask, *acc) };
    }
}

/// Input row IR of [`depthwise7_avx512`]: each of its 7 shifted vectors
/// is loaded once and feeds output row k through tap row IR − k, for
/// every k < R that tap row exists for.
///
/// # Safety
/// As [`depthwise7_avx512`], for the row at `line`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise7_input_row<const R: usize, const IR: usize>(
    line: *const f32,
    taps: &[f32; 49],
    mask: std::arch::x86_64::__mmask16,
    acc: &mut [std::arch::x86_64::__m512; R],
) {
    use std::arch::x86_64::*;
    for j in 0..7 {
        // SAFETY: columns j .. j + 16 of the row, masked (the contract above).
        let v = unsafe { _mm512_maskz_loadu_ps(mask, line.add(j)) };
        for (k, acc) in acc.iter_mut().enumerate() {
            let i = IR.wrapping_sub(k);
            if i < 7 {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(taps[i * 7 + j]), v, *acc);
            }
        }
    }
}

/// [`depthwise_plane_avx512`]'s schedule with AVX2: V vectors of 8
/// columns (16 for planes wider than 8, else 8) of [`DW_ROWS`] output
/// rows at once, so each loaded input vector feeds up to four rows and
/// the rows' sums are independent chains. The portable loop keeps one
/// chain per vector, so its 49 FMAs per 7x7 output wait on each other's
/// latency. Same order of the taps as [`depthwise_rows`], so the same bits
/// as the portable loop with FMA. The 7x7 filter takes [`depthwise7_avx2`].
///
/// # Safety
/// The CPU must have AVX2 and FMA; `padded` has rows of `row` ≥
/// wo.div_ceil(8·V)·8·V + kw − 1 floats (whole vectors are loaded past
/// wo), at least ho + kh − 1 of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_plane_avx2<const V: usize>(
    padded: &[f32],
    row: usize,
    taps: &[f32],
    bias: f32,
    out: &mut [f32],
    ([kh, kw], [ho, wo]): ([usize; 2], [usize; 2]),
) {
    use std::arch::x86_64::*;
    let cols = 8 * V;
    assert!(row >= wo.div_ceil(cols) * cols + kw - 1 && padded.len() >= (ho + kh - 1) * row);
    assert!(taps.len() == kh * kw && out.len() == ho * wo);
    let (src, dst) = (padded.as_ptr(), out.as_mut_ptr());
    if let (7, 7, Ok(taps)) = (kh, kw, <&[f32; 49]>::try_from(taps)) {
        // Eight chains of multiply-adds: 8 rows of one vector, 4 of two.
        let most = 8 / V;
        for x0 in (0..wo).step_by(cols) {
            for y0 in (0..ho).step_by(most) {
                // SAFETY: rows y0 .. y0 + rows ≤ ho of the output, input rows
                // y0 .. y0 + rows + 6 ≤ ho + kh − 1, whole vectors of columns
                // as asserted above; stores stop at wo.
                let (line, dst) = unsafe { (src.add(y0 * row + x0), dst.add(y0 * wo + x0)) };
                let at = (line, row, dst, wo, wo - x0);
                // SAFETY: as above; the CPU has AVX2 and FMA (this function's contract).
                unsafe {
                    match (ho - y0).min(most) {
                        8 => depthwise7_avx2::<V, 8>(at, taps, bias),
                        7 => depthwise7_avx2::<V, 7>(at, taps, bias),
                        6 => depthwise7_avx2::<V, 6>(at, taps, bias),
                        5 => depthwise7_avx2::<V, 5>(at, taps, bias),
                        4 => depthwise7_avx2::<V, 4>(at, taps, bias),
                        3 => depthwise7_avx2::<V, 3>(at, taps, bias),
                        2 => depthwise7_avx2::<V, 2>(at, taps, bias),
                        _ => depthwise7_avx2::<V, 1>(at, taps, bias),
                    }
                }
            }
        }
        return;
    }
    for x0 in (0..wo).step_by(cols) {
        let mut y0 = 0;
        while y0 < ho {
            let rows = (ho - y0).min(DW_ROWS);
            let mut acc = [[_mm256_set1_ps(bias); V]; DW_ROWS];
            for ir in 0..kh + rows - 1 {
                // SAFETY: in bounds by the asserts above.
                let line = unsafe { src.add((y0 + ir) * row + x0) };
                for j in 0..kw {
                    let mut v = [_mm256_setzero_ps(); V];
                    for (u, v) in v.iter_mut().enumerate() {
                        // SAFETY: columns x0 + j + 8u .. + 8 ≤ row (asserted).
                        *v = unsafe { _mm256_loadu_ps(line.add(j + 8 * u)) };
                    }
                    for (k, acc) in acc.iter_mut().enumerate() {
                        // Output row y0 + k takes input row y0 + ir through tap row ir − k.
                        let i = ir.wrapping_sub(k);
                        if k < rows && i < kh {
                            let t = _mm256_set1_ps(taps[i * kw + j]);
                            for (a, &v) in acc.iter_mut().zip(&v) {
                                *a = _mm256_fmadd_ps(t, v, *a);
                            }
                        }
                    }
                }
            }
            for (k, acc) in acc.iter().enumerate().take(rows) {
                for (u, a) in acc.iter().enumerate() {
                    let x = x0 + 8 * u;
                    if x >= wo {
                        break;
                    }
                    // SAFETY: row y0 + k < ho, columns x .. x + min(8, wo − x) ≤ wo.
                    unsafe { store_first_avx2(dst.add((y0 + k) * wo + x), *a, wo - x) };
                }
            }
            y0 += rows;
        }
    }
}

/// Stores the first min(8, n) lanes of `v` at `at` (a masked store when
/// n < 8).
///
/// # Safety
/// The CPU must have AVX2; min(8, n) floats from `at` must be writable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_first_avx2(at: *mut f32, v: std::arch::x86_64::__m256, n: usize) {
    use std::arch::x86_64::*;
    if n >= 8 {
        // SAFETY: 8 floats writable (the contract above).
        unsafe { _mm256_storeu_ps(at, v) };
    } else {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
        // SAFETY: n floats writable; lanes from n on are masked off.
        unsafe { _mm256_maskstore_ps(at, mask, v) };
    }
}

/// [`depthwise7_avx512`] with AVX2: R output rows of V vectors of 8
/// columns, R·V ≤ 8 chains, the input rows unrolled at compile time
/// ([`depthwise7_input_row_avx2`]); the same order of the taps, so the
/// same bits as [`depthwise_plane_avx2`]'s generic loop.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `line` points at input row y0, column
/// x0 of a padded plane with rows of `row` floats holding R + 6 rows from
/// there, each with 8·V + 6 columns readable; `dst` at output row y0,
/// column x0 of rows of `wo` floats, R of them, min(8·V, left) columns
/// writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise7_avx2<const V: usize, const R: usize>(
    (line, row, dst, wo, left): (*const f32, usize, *mut f32, usize, usize),
    taps: &[f32; 49],
    bias: f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_set1_ps(bias); V]; R];
    macro_rules! input_rows {
        ($($ir:literal)*) => {$(
            if $ir < R + 6 {
                // SAFETY: input row $ir < R + 6 (the contract above).
                unsafe { depthwise7_input_row_avx2::<V, R, $ir>(line.add($ir * row), taps, &mut acc) };
            }
        )*};
    }
    input_rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13);
    for (k, acc) in acc.iter().enumerate() {
        for (u, a) in acc.iter().enumerate() {
            if 8 * u >= left {
                break;
            }
            // SAFETY: output row k < R, columns 8u .. 8u + min(8, left − 8u)
            // (the contract above).
            unsafe { store_first_avx2(dst.add(k * wo + 8 * u), *a, left - 8 * u) };
        }
    }
}

/// Input row IR of [`depthwise7_avx2`]: each shifted vector is loaded
/// once and feeds output row k through tap row IR − k, for every k < R
/// that tap row exists for.
///
/// # Safety
/// As [`depthwise7_avx2`], for the row at `line`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise7_input_row_avx2<const V: usize, const R: usize, const IR: usize>(
    line: *const f32,
    taps: &[f32; 49],
    acc: &mut [[std::arch::x86_64::__m256; V]; R],
) {
    use std::arch::x86_64::*;
    for j in 0..7 {
        let mut v = [_mm256_setzero_ps(); V];
        for (u, v) in v.iter_mut().enumerate() {
            // SAFETY: columns j + 8u .. + 8 ≤ 8·V + 6 (the contract above).
            *v = unsafe { _mm256_loadu_ps(line.add(j + 8 * u)) };
        }
        for (k, acc) in acc.iter_mut().enumerate() {
            let i = IR.wrapping_sub(k);
            if i < 7 {
                let t = _mm256_set1_ps(taps[i * 7 + j]);
                for (a, &v) in acc.iter_mut().zip(&v) {
                    *a = _mm256_fmadd_ps(t, v, *a);
                }
            }
        }
    }
}

/// One output plane of a depthwise conv: `out` [ho, wo] = bias +
/// Σ_ij taps[i, j] · padded[y + i, x + j], `L` columns at a time held in
/// registers, where `padded` has rows of `row` columns (zero borders; only
/// the inner part is ever written).
#[inline(always)]
fn depthwise_rows<const FMA: bool, const L: usize>(
    padded: &[f32],
    row: usize,
    taps: &[f32],
    kw: usize,
    bias: f32,
    out: &mut [f32],
    wo: usize,
) {
    for (y, out) in out.chunks_exact_mut(wo).enumerate() {
        for x0 in (0..wo).step_by(L) {
            let mut acc = [bias; L];
            for (i, taps) in taps.chunks_exact(kw).enumerate() {
                let line = &padded[(y + i) * row + x0..];
                for (j, &t) in taps.iter().enumerate() {
                    let src: &[f32; L] = line[j..j + L].try_into().unwrap();
                    for l in 0..L {
                        acc[l] = madd::<FMA>(t, src[l], acc[l]);
                    }
                }
            }
            let n = L.min(wo - x0);
            out[x0..x0 + n].copy_from_slice(&acc[..n]);
        }
    }
}

#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    /// x, weight and the options.
    type State = (FlexTensor, FlexTensor, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let (x, weight, options) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, channel_sums(&grad));
        }
        if let Some(node) = node_w {
            let g = if is_depthwise(&x, &weight, &options) {
                depthwise_weight_grad(&x.to_contiguous(), &grad, &weight, &options)
            } else if options.groups == 1 {
                weight_grad_gemm(&x.to_contiguous(), &grad, &weight, &options)
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

fn is_depthwise(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> bool {
    let [c_out, per_group, _, _] = dims4(weight);
    let c_in = dims4(x)[1];
    options.groups == c_in
        && c_out == c_in
        && per_group == 1
        && options.stride == [1, 1]
        && options.dilation == [1, 1]
}

/// Σ over batch, height and width, per channel: [B, C, H, W] → \[C\].
pub(crate) fn channel_sums(grad: &FlexTensor) -> FlexTensor {
    let [b, c, h, w] = dims4(grad);
    let g = grad.as_slice::<f32>().expect("contiguous f32 gradient");
    let sums: Vec<f32> = (0..c)
        .into_par_iter()
        .map(|ci| (0..b).map(|bi| sum(&g[(bi * c + ci) * h * w..][..h * w])).sum())
        .collect();
    FlexTensor::from_data(TensorData::new(sums, [c]))
}

/// ∂L/∂x of a conv. For stride 1 and dilation 1 it is the conv of the
/// output gradient with the spatially flipped kernel whose in/out channels
/// are swapped within each group, padded by k − 1 − p; for larger strides
/// of an ungrouped conv it is the transposed conv of the output gradient
/// with the same weight (its adjoint), with the output padding that gives
/// back the input's size. Both run on all cores; Flex's direct transposed
/// conv (what burn's default backward calls) runs on one.
fn input_grad(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, options: ConvOptions<2>) -> FlexTensor {
    let [_, _, h, w] = dims4(&x);
    let [_, _, kh, kw] = dims4(&weight);
    if options.dilation != [1, 1] {
        return Flex::conv2d_x_backward(x, weight, grad, options);
    }
    if options.stride != [1, 1] {
        let [_, _, ho, wo] = dims4(&grad);
        // h + 2p − k = (ho − 1)·s + r with 0 ≤ r < s: r is the output padding.
        let rest = |len: usize, i: usize, k: usize, out: usize| {
            (len + 2 * options.padding[i])
                .checked_sub(k + out.checked_sub(1)? * options.stride[i])
                .filter(|&r| r < options.stride[i])
        };
        if let (1, Some(r0), Some(r1)) = (options.groups, rest(h, 0, kh, ho), rest(w, 1, kw, wo)) {
            let adjoint = conv_transpose::Options {
                stride: options.stride,
                padding: options.padding,
                padding_out: [r0, r1],
            };
            let weight = weight.to_contiguous();
            if let Some(dx) = conv_transpose::forward(&grad.to_contiguous(), &weight, None, adjoint) {
                return dx;
            }
        }
        return Flex::conv2d_x_backward(x, weight, grad, options);
    }
    let w = flipped_swapped(&weight.to_contiguous(), options.groups);
    let padding = [kh - 1 - options.padding[0], kw - 1 - options.padding[1]];
    conv2d(
        grad,
        w,
        None,
        ConvOptions::new([1, 1], padding, [1, 1], options.groups),
    )
}

/// The weight of a conv's input gradient: `weight` [out, in/g, kh, kw]
/// flipped in both spatial dims, with in and out swapped within each of
/// the `groups` groups: [in, out/g, kh, kw].
fn flipped_swapped(weight: &FlexTensor, groups: usize) -> FlexTensor {
    let [c_out, per_group_in, kh, kw] = dims4(weight);
    let per_group_out = c_out / groups;
    let (ws, k) = (f32s(weight), kh * kw);
    // In parallel, whole rows per task (about 16K values): on the calling
    // thread alone this was 1% of a training step.
    let row_len = per_group_out * k;
    let rows_per_task = (16 * 1024 / row_len.max(1)).max(1);
    let (out, _) = par_new_chunks(ws.len(), rows_per_task * row_len, |task, rows| {
        for (r, dst) in rows.chunks_exact_mut(row_len).enumerate() {
            // Row (g, ci) of the result: filters co of group g, tap order reversed.
            let row = task * rows_per_task + r;
            let (g, ci) = (row / per_group_in, row % per_group_in);
            for (co, dst) in dst.chunks_exact_mut(k).enumerate() {
                let src = &ws[((g * per_group_out + co) * per_group_in + ci) * k..][..k];
                dst.iter_mut().zip(src.iter().rev()).for_each(|(d, &s)| *d = s);
            }
        }
    });
    FlexTensor::from_data(TensorData::new(
        out,
        [groups * per_group_in, per_group_out, kh, kw],
    ))
}

/// The im2col matrix of one image `xb` [cin, h, w]: row (ci, i, j) holds,
/// for every output position (oy, ox), the input value under tap (i, j),
/// or 0 in the padding. Row r is written to `cols[r·stride..][..ho·wo]`,
/// so several images can sit side by side in one matrix.
fn im2col(
    xb: &[f32],
    [cin, h, w]: [usize; 3],
    [kh, kw]: [usize; 2],
    [ho, wo]: [usize; 2],
    options: &ConvOptions<2>,
    cols: &mut [f32],
    stride: usize,
) {
    let positions = ho * wo;
    if wo < IM2COL_GATHER_WIDTH {
        return with_scratch(|table: &mut Im2colTable| {
            table.fill(xb, [cin, h, w], [kh, kw], [ho, wo], options, cols, stride)
        });
    }
    for ci in 0..cin {
        let plane = &xb[ci * h * w..][..h * w];
        for i in 0..kh {
            for j in 0..kw {
                let row = &mut cols[((ci * kh + i) * kw + j) * stride..][..positions];
                for oy in 0..ho {
                    let iy = (oy * options.stride[0] + i * options.dilation[0]) as isize
                        - options.padding[0] as isize;
                    let out = &mut row[oy * wo..][..wo];
                    if iy < 0 || iy >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    if options.stride[1] == 1 && options.dilation[1] == 1 {
                        // Input column ox + j − p: a zero margin, one run, a zero margin.
                        let shift = j as isize - options.padding[1] as isize;
                        let x0 = (-shift).clamp(0, wo as isize) as usize;
                        let x1 = (w as isize - shift).clamp(x0 as isize, wo as isize) as usize;
                        out[..x0].fill(0.0);
                        let from = (x0 as isize + shift) as usize;
                        out[x0..x1].copy_from_slice(&src[from..from + (x1 - x0)]);
                        out[x1..].fill(0.0);
                        continue;
                    }
                    for (ox, o) in out.iter_mut().enumerate() {
                        let ix = (ox * options.stride[1] + j * options.dilation[1]) as isize
                            - options.padding[1] as isize;
                        *o = if ix >= 0 && ix < w as isize {
                            src[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Output widths below which [`im2col`] goes through [`Im2colTable`]:
/// narrower rows make its copies and zero margins too short to pay for
/// their calls (at 7x7, 128 channels, the copies cost as much as the
/// matrix product).
const IM2COL_GATHER_WIDTH: usize = 16;

/// [`im2col`] for narrow outputs, per thread. Unstrided, with rows of 4
/// to 16 values: a zero-padded copy of each plane (`plane`, borders kept
/// while the geometry `key` holds) whose rows are moved as short vector
/// runs ([`copy_rows`]). Otherwise (strided, or rows under 4 values, as
/// at 3x3, where runs of 2 measured slower) a gather: for the geometry
/// last used, the index into the input plane of the value under each tap
/// at each output position (h·w, a zero appended to the plane, in the
/// padding), and the plane copy with that zero.
#[derive(Default)]
struct Im2colTable {
    key: [usize; 12],
    idx: Vec<u32>,
    plane: Vec<f32>,
}

impl Im2colTable {
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &mut self,
        xb: &[f32],
        [cin, h, w]: [usize; 3],
        [kh, kw]: [usize; 2],
        [ho, wo]: [usize; 2],
        options: &ConvOptions<2>,
        cols: &mut [f32],
        stride: usize,
    ) {
        let (hw, positions) = (h * w, ho * wo);
        let (s, p, d) = (options.stride, options.padding, options.dilation);
        let key = [h, w, kh, kw, ho, wo, s[0], s[1], p[0], p[1], d[0], d[1]];
        if s == [1, 1] && d == [1, 1] && (4..=16).contains(&wo) && (4..=16).contains(&w) {
            // Unstrided: each output row under tap (i, j) is wo consecutive
            // values of a zero-padded copy of the plane, moved as two short
            // vector runs (a gather fetches them one by one: 11% of 64→96
            // and 16% of 192→64 with AVX2, where the copies made those
            // convs 12% and 20% faster).
            let (hp, wp) = (h + 2 * p[0], w + 2 * p[1]);
            let len = hp * wp;
            if self.key != key || self.plane.len() != len {
                // Zero borders, kept while the geometry holds (the interior
                // is rewritten for every channel).
                self.plane.clear();
                self.plane.resize(len, 0.0);
                self.idx.clear();
                self.key = key;
            }
            let interior = Rows {
                start: p[0] * wp + p[1],
                stride: wp,
            };
            let dense = |start| Rows { start, stride: wo };
            for ci in 0..cin {
                let plane = Rows {
                    start: ci * hw,
                    stride: w,
                };
                copy_rows(&mut self.plane, interior, xb, plane, h, w);
                for i in 0..kh {
                    for j in 0..kw {
                        let row = dense((ci * kh * kw + i * kw + j) * stride);
                        let tap = Rows {
                            start: i * wp + j,
                            stride: wp,
                        };
                        copy_rows(cols, row, &self.plane, tap, ho, wo);
                    }
                }
            }
            return;
        }
        if self.key != key {
            self.idx.clear();
            for i in 0..kh {
                for j in 0..kw {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let iy = (oy * s[0] + i * d[0]).checked_sub(p[0]).filter(|&y| y < h);
                            let ix = (ox * s[1] + j * d[1]).checked_sub(p[1]).filter(|&x| x < w);
                            let at = match (iy, ix) {
                                (Some(y), Some(x)) => y * w + x,
                                _ => hw,
                            };
                            self.idx
                                .push(u32::try_from(at).expect("plane below 2^32 elements"));
                        }
                    }
                }
            }
            self.key = key;
        }
        self.plane.resize(hw + 1, 0.0);
        for ci in 0..cin {
            self.plane[..hw].copy_from_slice(&xb[ci * hw..][..hw]);
            self.plane[hw] = 0.0;
            for tap in 0..kh * kw {
                let row = &mut cols[(ci * kh * kw + tap) * stride..][..positions];
                // SAFETY: every index is at most h·w (built above) and the
                // plane has h·w + 1 values.
                unsafe { gather_into(row, &self.plane, &self.idx[tap * positions..][..positions]) };
            }
        }
    }
}

/// A block of `rows` rows of `width` floats: row y at `start + y·stride`.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    stride: usize,
}

vectorised! {
    /// The `rows` rows of 4 ≤ `width` ≤ 16 floats of `src` at `from` to
    /// `dst` at `to`. Each row is moved as two fixed-width runs that
    /// overlap in its middle, [0, v) and [width − v, width) with v = 8 for
    /// rows of 8 and up, else 4 (how memcpy moves short lengths): exact,
    /// with plain vector moves, and no call per row (`copy_from_slice` of
    /// a run this short is a `memcpy` call). AVX2's masked store, the
    /// other way, is slow on AMD; AVX-512's masked load and store, one per
    /// row, measured no faster on the Xeon (192→64 at 7x7, 5 pairs).
    fn copy_rows(dst: &mut [f32], to: Rows, src: &[f32], from: Rows, rows: usize, width: usize) -> () {
        assert!((4..=16).contains(&width));
        fn two_runs<const V: usize>(dst: &mut [f32], src: &[f32]) {
            let n = dst.len();
            let head: &[f32; V] = src[..V].try_into().unwrap();
            let tail: &[f32; V] = src[n - V..n].try_into().unwrap();
            dst[..V].copy_from_slice(head);
            dst[n - V..].copy_from_slice(tail);
        }
        for y in 0..rows {
            let src = &src[from.start + y * from.stride..][..width];
            let dst = &mut dst[to.start + y * to.stride..][..width];
            if width >= 8 {
                two_runs::<8>(dst, src);
            } else {
                two_runs::<4>(dst, src);
            }
        }
    }
}

/// out\[k\] = src\[idx\[k\]\], 16 at a time with AVX-512's gather (the
/// portable loop compiles to one bounds-checked scalar load per value).
///
/// # Safety
/// The CPU must have AVX-512F, and every `idx[k]` must be below
/// `src.len()` and 2^31.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_avx512(out: &mut [f32], src: &[f32], idx: &[u32]) {
    use std::arch::x86_64::*;
    assert_eq!(out.len(), idx.len());
    let n = out.len();
    let (dst, ix, base) = (out.as_mut_ptr(), idx.as_ptr(), src.as_ptr());
    let mut k = 0;
    while k < n {
        let mask = if n - k >= 16 {
            u16::MAX
        } else {
            ((1u32 << (n - k)) - 1) as u16
        };
        // SAFETY: lanes k..k + 16 that the mask keeps lie inside `idx` and
        // `out`; every gathered index lies inside `src` (the caller's promise).
        unsafe {
            let offsets = _mm512_maskz_loadu_epi32(mask, ix.add(k) as *const i32);
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, base as _);
            _mm512_mask_storeu_ps(dst.add(k), mask, v);
        }
        k += 16;
    }
}

/// out\[k\] = src\[idx\[k\]\], 8 at a time with AVX2's gather, the last
/// values one by one.
///
/// # Safety
/// The CPU must have AVX2, and every `idx[k]` must be below `src.len()`
/// and 2^31.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_avx2(out: &mut [f32], src: &[f32], idx: &[u32]) {
    use std::arch::x86_64::*;
    assert_eq!(out.len(), idx.len());
    let whole = out.len() / 8 * 8;
    let (dst, ix, base) = (out.as_mut_ptr(), idx.as_ptr(), src.as_ptr());
    for k in (0..whole).step_by(8) {
        // SAFETY: k + 8 ≤ len of `idx` and `out`; every gathered index lies
        // inside `src` (the caller's promise).
        unsafe {
            let offsets = _mm256_loadu_si256(ix.add(k) as *const __m256i);
            let v = _mm256_i32gather_ps::<4>(base, offsets);
            _mm256_storeu_ps(dst.add(k), v);
        }
    }
    for k in whole..out.len() {
        out[k] = src[idx[k] as usize];
    }
}

/// out\[k\] = src\[idx\[k\]\], with the CPU's gather instruction (AVX-512 or
/// AVX2; on the baseline tier one value at a time).
///
/// # Safety
/// Every `idx[k]` must be below `src.len()` and 2^31 (the vector paths
/// do not check).
pub(crate) unsafe fn gather_into(out: &mut [f32], src: &[f32], idx: &[u32]) {
    debug_assert!(idx.iter().all(|&i| (i as usize) < src.len() && i < 1 << 31));
    #[cfg(target_arch = "x86_64")]
    match crate::simd_level() {
        // SAFETY: the CPU has AVX-512F; the indices are the caller's promise.
        crate::SimdLevel::Avx512 => return unsafe { gather_avx512(out, src, idx) },
        // SAFETY: the CPU has AVX2; the indices are the caller's promise.
        crate::SimdLevel::Avx2 => return unsafe { gather_avx2(out, src, idx) },
        crate::SimdLevel::Baseline => {}
    }
    gather(out, src, idx);
}

vectorised! {
    /// out\[k\] = src\[idx\[k\]\].
    fn gather(out: &mut [f32], src: &[f32], idx: &[u32]) -> () {
        for (o, &i) in out.iter_mut().zip(idx) {
            *o = src[i as usize];
        }
    }
}

/// What [`Ungrouped::run_shifted`] rounds its grid up to: 16 floats, the
/// AVX-512 vector gemm's kernels are built from.
const GRID_MULTIPLE: usize = 16;

/// Outputs per image up to which [`Ungrouped`] takes the im2col path for
/// every conv (the U-Net's 7x7 and 3x3 levels; at 14x14 the shifted
/// products measured faster for the narrowing convs).
const IM2COL_POSITIONS: usize = 64;

/// Output columns (images × positions) one task of [`Ungrouped::run_im2col`]
/// (and of the transposed conv's product) aims for: enough for gemm's
/// widest tiles.
pub(crate) const IM2COL_COLUMNS: usize = 256;

/// The size of the groups `items` are split into for parallel tasks,
/// near `want` (at least 1) but in a number of groups that is a multiple
/// of rayon's thread count where the items allow, so that no thread is
/// left with a whole group more than the others. With few groups that
/// matters: 81 images at 3x3 in groups of 28 were 3 tasks, two of them
/// on one of 2 threads (the other idle a third of the conv), and a
/// training batch of 32 was 28 + 4; now 21, 21, 21, 18 and 16 + 16.
pub(crate) fn balanced_group(items: usize, want: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let groups = items.div_ceil(want.max(1)).next_multiple_of(threads).min(items);
    items.div_ceil(groups.max(1)).max(1)
}

/// Floats of im2col rows [`Ungrouped::run_im2col`] builds at once.
const IM2COL_SLICE: usize = 32 * 1024;

/// Images per parallel task of [`weight_grad_gemm`].
const IMAGES_PER_TASK: usize = 4;

/// ∂L/∂w of an ungrouped conv as one matrix product per image:
/// ∂w [out, in·kh·kw] += grad_b [out, ho·wo] · im2col(x_b)ᵀ [ho·wo, in·kh·kw],
/// in parallel over fixed groups of images.
pub(crate) fn weight_grad_gemm(
    x: &FlexTensor,
    grad: &FlexTensor,
    weight: &FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let [b, cin, h, w] = dims4(x);
    let [_, cout, ho, wo] = dims4(grad);
    let [_, _, kh, kw] = dims4(weight);
    let (taps, positions) = (cin * kh * kw, ho * wo);
    let (xs, gs) = (f32s(x), f32s(grad));
    // Fixed chunks of images summed in a fixed order: the result does not
    // depend on how rayon schedules them (bit-for-bit resumable training).
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(IMAGES_PER_TASK))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0f32; cout * taps];
            // im2col writes every value of its matrix (zeros where the
            // window overhangs), so a reused buffer needs no zeroing: a
            // fresh one cost a zero-fill of up to 1.4 MB per task.
            with_scratch(|cols: &mut Vec<f32>| {
                let cols = grown(cols, taps * positions);
                for bi in chunk * IMAGES_PER_TASK..((chunk + 1) * IMAGES_PER_TASK).min(b) {
                    let xb = &xs[bi * cin * h * w..][..cin * h * w];
                    im2col(xb, [cin, h, w], [kh, kw], [ho, wo], options, cols, positions);
                    let gb = &gs[bi * cout * positions..][..cout * positions];
                    let (lhs, rhs) = (View::rows(gb, positions), View::transposed(cols, positions));
                    matmul(&mut acc, cout, taps, positions, lhs, rhs, 1.0, true);
                }
            });
            acc
        })
        .collect();
    let total = sum_in_order(&partials);
    FlexTensor::from_data(TensorData::new(total, [cout, cin, kh, kw]))
}

/// ∂L/∂w of a depthwise conv (stride 1): for each channel c and tap (i, j),
/// Σ_b Σ_y Σ_x grad[b, c, y, x] · x[b, c, y + i − p, x + j − p].
///
/// Per image and channel, the input is laid out zero-padded with rows of
/// r = w + 2·pw floats and the gradient with the same row length (zeros
/// past its wo columns); then each tap's sum over y and x is one dot
/// product of the whole gradient buffer with the padded input shifted by
/// i·r + j ([`depthwise_tap_sums`]): a gradient column x ≥ wo is zero, so
/// the terms that would run into the next row add nothing. That is kh·kw
/// vectorised products of ho·r values, where the loop it replaces took one
/// short, unvectorised product per tap and output row (kh·kw·ho of them,
/// of 3 to 28 values): 2.8% of the CPU time of a `bench` run of 12
/// training steps and one sampling run, now 0.4% (Intel Xeon family 6
/// model 207).
fn depthwise_weight_grad(
    x: &FlexTensor,
    grad: &FlexTensor,
    weight: &FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let [b, c, h, w] = dims4(x);
    let [_, _, ho, wo] = dims4(grad);
    let [_, _, kh, kw] = dims4(weight);
    let [ph, pw] = options.padding;
    let (xs, gs) = (x.as_slice::<f32>().unwrap(), grad.as_slice::<f32>().unwrap());
    let r = w + 2 * pw;
    debug_assert!(ho + kh == h + 2 * ph + 1 && wo + kw == r + 1);
    let taps: Vec<f32> = (0..c)
        .into_par_iter()
        .flat_map_iter(|ci| {
            let mut acc = vec![0f32; kh * kw];
            // The padded input, with kw − 1 zeros past its last row (read by
            // the last tap row's shifted products against the gradient's
            // zero columns), and the gradient in rows of r.
            let mut padded = vec![0f32; (h + 2 * ph) * r + kw - 1];
            let mut g = vec![0f32; ho * r];
            for bi in 0..b {
                let xp = &xs[(bi * c + ci) * h * w..][..h * w];
                let gp = &gs[(bi * c + ci) * ho * wo..][..ho * wo];
                for (y, src) in xp.chunks_exact(w).enumerate() {
                    padded[(y + ph) * r + pw..][..w].copy_from_slice(src);
                }
                for (y, src) in gp.chunks_exact(wo).enumerate() {
                    g[y * r..][..wo].copy_from_slice(src);
                }
                depthwise_tap_sums(&g, &padded, [kh, kw, r], &mut acc);
            }
            acc
        })
        .collect();
    FlexTensor::from_data(TensorData::new(taps, [c, 1, kh, kw]))
}

vectorised! {
    /// `acc[i·kw + j] += g · padded[i·r + j ..][..g.len()]` for every tap.
    fn depthwise_tap_sums(g: &[f32], padded: &[f32], geometry: [usize; 3], acc: &mut [f32]) -> () {
        let [kh, kw, r] = geometry;
        for i in 0..kh {
            for j in 0..kw {
                acc[i * kw + j] += dot(g, &padded[i * r + j..][..g.len()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel_diff, values, weighted_backward};
    use burn::module::Param;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    /// Output, ∂x, ∂w, ∂bias of `conv` on `x` under a loss that weights
    /// every output differently, with our kernel or burn's.
    fn run(conv: &Conv2d<Ad>, x: &Tensor<Flex, 4>, ours: bool) -> [Vec<f32>; 4] {
        let conv = conv.clone();
        let conv = Conv2d {
            weight: Param::from_tensor(conv.weight.val().detach().require_grad()),
            bias: conv
                .bias
                .map(|b| Param::from_tensor(b.val().detach().require_grad())),
            ..conv
        };
        assert!(conv.weight.is_initialized());
        let x = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
        let y = if ours {
            autodiff(&conv, x.clone())
        } else {
            conv.forward(x.clone())
        };
        let (out, grads) = weighted_backward(y);
        [
            out,
            values(x.grad(&grads).unwrap()),
            values(conv.weight.val().grad(&grads).unwrap()),
            values(conv.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
        ]
    }

    /// The AVX-512 and AVX2 depthwise kernels against the portable loop
    /// they replace (with fused multiply-adds): the same bits, on the
    /// U-Net's plane sizes and on ones with partial chunks and partial row
    /// blocks. Each kernel is checked where the CPU has its instructions.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn depthwise_kernels_have_the_bits_of_the_portable_loop() {
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let mut next = crate::test_util::uniform(12345u32);
        for (h, w, k, p) in [
            (28, 28, 7, 3),
            (14, 14, 7, 3),
            (7, 7, 7, 3),
            (3, 3, 7, 3),
            (17, 33, 3, 1),
            (5, 13, 7, 3),
            (10, 20, 7, 3),
        ] {
            let dw = Depthwise::new([h, w], [k, k], [p, p]).unwrap();
            let (ho, wo) = (dw.ho, dw.wo);
            let lanes = if wo <= DW_NARROW { DW_NARROW } else { DW_LANES };
            let row = wo.div_ceil(lanes) * lanes + k - 1;
            let padded: Vec<f32> = (0..(h + 2 * p) * row).map(|_| next()).collect();
            let taps: Vec<f32> = (0..k * k).map(|_| next()).collect();
            let mut portable = vec![0f32; ho * wo];
            if lanes == DW_NARROW {
                depthwise_rows::<true, DW_NARROW>(&padded, row, &taps, k, 0.3, &mut portable, wo);
            } else {
                depthwise_rows::<true, DW_LANES>(&padded, row, &taps, k, 0.3, &mut portable, wo);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // NaN-filled: an output a kernel never writes fails the comparison.
            if avx512 {
                let mut ours = vec![f32::NAN; ho * wo];
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe { depthwise_plane_avx512(&padded, row, &taps, [k, k], 0.3, &mut ours, [ho, wo]) };
                assert_eq!(bits(&ours), bits(&portable), "AVX-512, {h}x{w}, {k}x{k}");
            }
            if avx2 {
                let mut ours = vec![f32::NAN; ho * wo];
                let geometry = ([k, k], [ho, wo]);
                // SAFETY: the CPU has AVX2 and FMA (checked above); rows as `plane` pads them.
                unsafe {
                    if lanes == DW_NARROW {
                        depthwise_plane_avx2::<1>(&padded, row, &taps, 0.3, &mut ours, geometry);
                    } else {
                        depthwise_plane_avx2::<2>(&padded, row, &taps, 0.3, &mut ours, geometry);
                    }
                }
                assert_eq!(bits(&ours), bits(&portable), "AVX2, {h}x{w}, {k}x{k}");
            }
        }
    }

    /// Every tier's gather, lengths with and without a partial last
    /// vector, picks `src[idx[k]]` (scattered indices, the last one the
    /// end of `src`).
    #[test]
    fn gathers_pick_the_indexed_values() {
        let src: Vec<f32> = (0..100).map(|i| i as f32 * 0.5 - 7.0).collect();
        for n in [0, 5, 8, 16, 23, 41] {
            let idx: Vec<u32> = (0..n)
                .map(|k| if k == n - 1 { 99 } else { (k * 37 % 100) as u32 })
                .collect();
            let expected: Vec<f32> = idx.iter().map(|&i| src[i as usize]).collect();
            let mut out = vec![f32::NAN; n];
            // SAFETY: every index is below 100.
            unsafe { gather_into(&mut out, &src, &idx) };
            assert_eq!(out, expected, "n {n}, {:?}", crate::simd_level());
            let mut portable = vec![f32::NAN; n];
            gather(&mut portable, &src, &idx);
            assert_eq!(portable, expected, "n {n}, portable");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut avx2 = vec![f32::NAN; n];
                // SAFETY: the CPU has AVX2; every index is below 100.
                unsafe { gather_avx2(&mut avx2, &src, &idx) };
                assert_eq!(avx2, expected, "n {n}, AVX2");
            }
        }
    }

    /// Group sizes for a pool of 2 and of 3 threads: few groups become a
    /// multiple of the thread count (81 images at 3x3, 28 wanted: 4
    /// groups of up to 21; a batch of 32: 2 of 16), many are left near
    /// the size wanted, and no group is empty or larger than wanted.
    #[test]
    fn balanced_groups() {
        let pool = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
        };
        let (two, three) = (pool(2), pool(3));
        for (items, want, size) in [
            (81, 28, 21),
            (32, 28, 16),
            (81, 5, 5),
            (32, 5, 4),
            (81, 1, 1),
            (3, 28, 2),
            (1, 28, 1),
            (0, 28, 1),
        ] {
            assert_eq!(
                two.install(|| balanced_group(items, want)),
                size,
                "{items} items, {want} wanted, 2 threads"
            );
        }
        for (items, want, size) in [(81, 28, 27), (32, 28, 11), (81, 5, 5), (2, 28, 1)] {
            assert_eq!(
                three.install(|| balanced_group(items, want)),
                size,
                "{items} items, {want} wanted, 3 threads"
            );
        }
    }

    #[test]
    fn conv_gradients_match_burn() {
        let device = Default::default();
        let pad = |h, w| PaddingConfig2d::Explicit(h, w, h, w);
        let cases = [
            (
                "3x3 pad 1",
                Conv2dConfig::new([5, 7], [3, 3]).with_padding(pad(1, 1)),
                [2, 5, 9, 8],
            ),
            (
                // Shifted products at the U-Net's 28x28.
                "3x3 pad 1, 28x28",
                Conv2dConfig::new([6, 4], [3, 3]).with_padding(pad(1, 1)),
                [3, 6, 28, 28],
            ),
            (
                // Few output channels at 28x28: the direct kernel on
                // AVX-512 (8 channels, pairs of rows, a 12-column tail).
                "3x3 pad 1, 28x28, 24→8",
                Conv2dConfig::new([24, 8], [3, 3]).with_padding(pad(1, 1)),
                [2, 24, 28, 28],
            ),
            (
                // The direct kernel with 4 channels (3 used), rows in
                // groups of 4 with one left over, a 3x5 kernel.
                "3x5 pad 1,2, 13x21, 5→3",
                Conv2dConfig::new([5, 3], [3, 5]).with_padding(pad(1, 2)),
                [2, 5, 13, 21],
            ),
            (
                // The U-Net's 192→64 at 7x7: Winograd (half-outside tiles
                // at the edge) with its input channels in slices, the last
                // one partial; ∂x (64→192) also through Winograd.
                "3x3 pad 1, 7x7, 192→64",
                Conv2dConfig::new([192, 64], [3, 3]).with_padding(pad(1, 1)),
                [5, 192, 7, 7],
            ),
            (
                // Winograd at 14x14, whole tiles.
                "3x3 pad 1, 14x14, 16→24",
                Conv2dConfig::new([16, 24], [3, 3]).with_padding(pad(1, 1)),
                [3, 16, 14, 14],
            ),
            (
                // The 3x3 level: im2col through the gather table, in
                // slices of input channels.
                "3x3 pad 1, 3x3, 384→16",
                Conv2dConfig::new([384, 16], [3, 3]).with_padding(pad(1, 1)),
                [12, 384, 3, 3],
            ),
            (
                // A widening conv at 14x14: im2col whose rows of 14 move
                // as two overlapping runs of 8 (7x7 above: runs of 4).
                "3x3 pad 1, 14x14, 3→5",
                Conv2dConfig::new([3, 5], [3, 3]).with_padding(pad(1, 1)),
                [3, 3, 14, 14],
            ),
            (
                // A widening conv at 28x28: im2col with row copies.
                "3x3 pad 1, 28x28, 2→6",
                Conv2dConfig::new([2, 6], [3, 3]).with_padding(pad(1, 1)),
                [3, 2, 28, 28],
            ),
            (
                "3x3 pad 2",
                Conv2dConfig::new([3, 4], [3, 3]).with_padding(pad(2, 2)),
                [2, 3, 10, 9],
            ),
            (
                "depthwise 7x7 pad 3",
                Conv2dConfig::new([6, 6], [7, 7])
                    .with_groups(6)
                    .with_padding(pad(3, 3)),
                [3, 6, 10, 9],
            ),
            (
                // Wider than one chunk of DW_LANES columns, with a partial last chunk.
                "depthwise 7x7 pad 3, 28 wide",
                Conv2dConfig::new([3, 3], [7, 7])
                    .with_groups(3)
                    .with_padding(pad(3, 3)),
                [2, 3, 5, 28],
            ),
            (
                "depthwise 3x3 pad 1, 33 wide",
                Conv2dConfig::new([2, 2], [3, 3])
                    .with_groups(2)
                    .with_padding(pad(1, 1)),
                [1, 2, 17, 33],
            ),
            (
                "depthwise 7x7 pad 3 on 3x3",
                Conv2dConfig::new([4, 4], [7, 7])
                    .with_groups(4)
                    .with_padding(pad(3, 3)),
                [2, 4, 3, 3],
            ),
            ("1x1", Conv2dConfig::new([4, 3], [1, 1]), [2, 4, 5, 5]),
            ("3x3 no padding", Conv2dConfig::new([3, 4], [3, 3]), [2, 3, 7, 6]),
            (
                "3x5 pad 1,2",
                Conv2dConfig::new([3, 4], [3, 5]).with_padding(pad(1, 2)),
                [2, 3, 6, 7],
            ),
            (
                "groups 2",
                Conv2dConfig::new([4, 6], [3, 3])
                    .with_groups(2)
                    .with_padding(pad(1, 1)),
                [2, 4, 6, 6],
            ),
            (
                // 30 images of 3x3: two groups of images, the second partial.
                "3x3 pad 1 on 3x3, 30 images",
                Conv2dConfig::new([6, 5], [3, 3]).with_padding(pad(1, 1)),
                [30, 6, 3, 3],
            ),
            (
                "3x3 stride 3 pad 1, 7x7 to 3x3",
                Conv2dConfig::new([4, 6], [3, 3])
                    .with_stride([3, 3])
                    .with_padding(pad(1, 1)),
                [5, 4, 7, 7],
            ),
            (
                "3x3 dilation 2",
                Conv2dConfig::new([3, 2], [3, 3])
                    .with_dilation([2, 2])
                    .with_padding(pad(2, 2)),
                [2, 3, 9, 10],
            ),
            (
                "stride 2",
                Conv2dConfig::new([3, 5], [3, 3])
                    .with_stride([2, 2])
                    .with_padding(pad(1, 1)),
                [2, 3, 8, 8],
            ),
            (
                // The U-Net's first down conv (output padding 1 in ∂x).
                "16→32 stride 2 pad 1, 28x28",
                Conv2dConfig::new([16, 32], [3, 3])
                    .with_stride([2, 2])
                    .with_padding(pad(1, 1)),
                [2, 16, 28, 28],
            ),
            (
                // Its last: a weight of 73,728 entries, summed in several
                // slices over 3 chunks of images.
                "64→128 stride 3 pad 1, 7x7, 9 images",
                Conv2dConfig::new([64, 128], [3, 3])
                    .with_stride([3, 3])
                    .with_padding(pad(1, 1)),
                [9, 64, 7, 7],
            ),
            (
                // Output padding 1 down, 0 across.
                "stride 2x3 pad 1, 10x10",
                Conv2dConfig::new([3, 4], [3, 3])
                    .with_stride([2, 3])
                    .with_padding(pad(1, 1)),
                [2, 3, 10, 10],
            ),
            (
                "groups 2 stride 2",
                Conv2dConfig::new([4, 6], [3, 3])
                    .with_groups(2)
                    .with_stride([2, 2])
                    .with_padding(pad(1, 1)),
                [2, 4, 7, 7],
            ),
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
            // Inference path: the same output.
            let inner = Conv2d {
                weight: Param::from_tensor(conv.weight.val().inner()),
                bias: conv.bias.as_ref().map(|b| Param::from_tensor(b.val().inner())),
                stride: conv.stride,
                kernel_size: conv.kernel_size,
                dilation: conv.dilation,
                groups: conv.groups,
                padding: conv.padding.clone(),
            };
            let d = max_rel_diff(&values(inference(&inner, x.clone())), &reference[0]);
            assert!(d < 1e-5, "{name}: inference output differs by {d:e}");
            for (what, (a, b)) in ["output", "dx", "dw", "dbias"]
                .iter()
                .zip(ours.iter().zip(&reference))
            {
                assert_eq!(a.len(), b.len(), "{name}: {what} sizes");
                let d = max_rel_diff(a, b);
                assert!(
                    d < 1e-5,
                    "{name}: {what} differs by {d:e} (relative to its largest value)"
                );
            }
        }
    }
}
