//! Faster kernels for burn's Flex CPU backend: attention, conv2d, group
//! norm and GELU for `Flex` (inference) and `Autodiff<Flex>` (training),
//! conv_transpose2d and the U-Net's attention block for both, its ConvNeXt
//! block for `Flex`, each computing the same function as burn's own
//! operation.
//!
//! This is the one library crate of the workspace that names a backend; it
//! depends on burn, `gemm` and `rayon` only, so any burn program on Flex can
//! call these functions. The diffusion U-Net picks them up through its
//! table of replaceable kernels (`diffusion_model::kernels`), where the
//! `diffusion` binary installs them:
//!
//! `install_for_unet()` (feature `unet`) does that for `Flex` and
//! `Autodiff<Flex>`; without the feature the crate does not depend on the
//! U-Net at all, and its functions serve any burn program on Flex.
//!
//! Why they are faster: burn builds attention, group norm and the conv
//! backward pass out of generic operations; on Flex several of those are
//! slow paths (a single-threaded direct transposed conv for every conv's
//! input gradient, one conv per channel for a depthwise weight gradient,
//! broadcasts through a strided iterator, libm's scalar `expf`, a
//! [batch, 784, 784] score matrix written out and kept for the backward
//! pass). Each kernel here computes the same function (tested against
//! burn's to float rounding) with fewer passes, on rayon's pool (the one
//! Flex uses), with loops that vectorise:
//! - [`attention`]: FlashAttention forward and backward (`flash`), the
//!   forward on transposed score blocks (a column softmax, wide gemm tiles);
//! - `attention_block` (feature `unet`): the U-Net's whole attention block
//!   in the image layout, without transposed token copies: for inference,
//!   and under autodiff as one operation after its group norm (burn's
//!   version runs its linear layers and the q/k/v slices' backward on the
//!   calling thread alone);
//! - `convnext_block` (feature `unet`): the U-Net's whole ConvNeXt block for
//!   inference, one group of images at a time through every step, so its
//!   intermediates stay in the core's cache;
//! - [`conv`]: conv2d as Winograd F(4x4, 3x3) (3x3 convs with outputs of
//!   7x7 to 14x14: 36 products per 4x4 block instead of 144,
//!   `conv_winograd`), shifted matrix products (large outputs that do
//!   not widen), one im2col product per group of images, built in slices of
//!   input channels that stay in cache (small, strided or widening convs),
//!   a direct AVX-512 kernel for up to 8 output channels (`conv_direct`),
//!   or a direct depthwise kernel; input gradient as a conv (strided convs:
//!   the transposed conv), weight gradient by im2col + gemm or direct loops;
//! - [`conv_transpose`]: conv_transpose2d as a matrix product and a col2im
//!   per image; its input gradient as a conv, its weight gradient by
//!   im2col + gemm;
//! - [`group_norm`]: one pass for statistics, one for the output, one fused
//!   backward pass;
//! - [`gelu`]: one pass each way with a vectorised erf;
//! - [`cat_channels`]: two image batches joined along channels, one image
//!   per task (and its autodiff version, whose backward splits the
//!   gradient the same way).
//!
//! Dispatch: hot loops are compiled for baseline x86-64 (SSE2), AVX2 + FMA
//! and AVX-512F, and [`simd_level`] picks the widest the CPU has at run
//! time (`DIFFUSION_SIMD=avx2` or `baseline` caps it); the matrix products
//! run on `gemm`, whose own run-time dispatch includes its AVX-512
//! microkernels with the feature `avx512-gemm` (the default; gemm's
//! `x86-v4`). [`gemm_simd_level`] says which gemm takes. To measure a CPU
//! without AVX-512 on one that has it, build without `avx512-gemm` and
//! run with `DIFFUSION_SIMD=avx2`.
//!
//! Invariants: results are deterministic (parallel partial sums are
//! combined in a fixed order; one machine always takes the same path, so
//! the same input gives the same bits), and a shape a kernel does not
//! cover falls back to burn's operation.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

pub mod attention;
#[cfg(feature = "unet")]
pub mod attention_block;
pub mod conv;
mod conv_direct;
pub mod conv_transpose;
mod conv_winograd;
#[cfg(feature = "unet")]
pub mod convnext_block;
mod flash;
pub mod gelu;
pub mod group_norm;
mod matmul;
#[cfg(feature = "train")]
pub mod optim;

/// Defines `fn $name(args)` whose body is compiled three times: for the
/// baseline x86-64 target (SSE2), with AVX2 + FMA, and with AVX-512F, the
/// widest the CPU has picked at run time, so the loops below vectorise 4,
/// 8 or 16 wide. Inside the body the constant `FMA` says whether the tier
/// has fused multiply-add ([`madd`] uses it). The AVX2 and AVX-512 tiers
/// compute the same bits (no reassociation: the vector width changes only
/// how many lanes run at once); the baseline tier rounds its
/// multiply-adds twice. Every tier is deterministic.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body<const FMA: bool>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body::<true>($($arg),*)
                }
                match $crate::simd_level() {
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked by simd_level).
                    $crate::SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU has AVX2 and FMA (checked by simd_level).
                    $crate::SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::SimdLevel::Baseline => {}
                }
            }
            body::<false>($($arg),*)
        }
    };
}

/// The vector instructions the kernels use on this CPU, narrowest first
/// (so `min` of two levels is the one both allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// SSE2 only (every x86-64), or a CPU of another architecture.
    Baseline,
    /// AVX2 and FMA: 8 floats a vector.
    Avx2,
    /// AVX-512F (with AVX2 and FMA): 16 floats a vector.
    Avx512,
}

/// The widest [`SimdLevel`] this CPU supports, detected once.
/// `DIFFUSION_SIMD=avx2` or `baseline` caps it (to compare the paths on
/// one machine).
pub fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let detected = if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            SimdLevel::Baseline
        } else if std::is_x86_feature_detected!("avx512f") {
            SimdLevel::Avx512
        } else {
            SimdLevel::Avx2
        };
        #[cfg(not(target_arch = "x86_64"))]
        let detected = SimdLevel::Baseline;
        let cap = match std::env::var("DIFFUSION_SIMD").as_deref() {
            Ok("baseline") => SimdLevel::Baseline,
            Ok("avx2") => SimdLevel::Avx2,
            _ => SimdLevel::Avx512,
        };
        detected.min(cap)
    })
}

/// The vector instructions of gemm's matrix products on this CPU: AVX-512
/// where the CPU has AVX-512F and this crate was built with the
/// `avx512-gemm` feature (the default), else AVX2 + FMA where the CPU has
/// FMA, else baseline. `DIFFUSION_SIMD` does not reach gemm, whose
/// dispatch is its own; build without `avx512-gemm` to keep it to AVX2.
pub fn gemm_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512-gemm") && std::is_x86_feature_detected!("avx512f") {
            SimdLevel::Avx512
        } else if std::is_x86_feature_detected!("fma") {
            SimdLevel::Avx2
        } else {
            SimdLevel::Baseline
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    SimdLevel::Baseline
}

pub(crate) use vectorised;

/// Runs `f` on this thread's instance of the scratch type `T`, created on
/// first use and kept for the life of the thread (rayon's workers live as
/// long as the pool). Kernels keep their work buffers here instead of in
/// per-split rayon state (`map_init`), which rayon creates afresh for each
/// split of each call, so every split allocated and zero-filled its
/// buffers again (up to a few MB for an im2col matrix). The most recently
/// returned instance is taken first; a nested call for the same type,
/// which the kernels do not make, gets a fresh instance rather than a
/// borrow error.
pub(crate) fn with_scratch<T: Default + 'static, R>(f: impl FnOnce(&mut T) -> R) -> R {
    use std::any::Any;
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
    }
    let taken = POOL.with_borrow_mut(|pool| {
        let at = pool.iter().rposition(|b| b.is::<T>())?;
        pool.swap_remove(at).downcast::<T>().ok()
    });
    let mut scratch = taken.unwrap_or_default();
    let result = f(&mut scratch);
    POOL.with_borrow_mut(|pool| pool.push(scratch));
    result
}

/// The first `len` elements of `buf`, growing it (with zeros) when it is
/// shorter; never shrinks it, so a reused buffer is filled only once.
pub(crate) fn grown(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// A new vector of `len` floats built in parallel, `chunk` at a time:
/// `fill(i, out)` gets the i-th chunk, zeroed, and its results come back
/// in chunk order beside the vector. (Work buffers a task needs come from
/// [`with_scratch`].)
///
/// Each chunk is zeroed inside its own task, right before `fill` writes
/// it, so the zeros land in that core's cache and the cores share the
/// work. `vec![0.0; len]` instead zeroes everything on the calling thread
/// first (one `memset` over cold memory while the other cores wait): 7% of
/// the CPU time of sampling on a 2-core Intel Xeon.
pub(crate) fn par_new_chunks<R, F>(len: usize, chunk: usize, fill: F) -> (Vec<f32>, Vec<R>)
where
    R: Send,
    F: Fn(usize, &mut [f32]) -> R + Sync + Send,
{
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let results: Vec<R> = out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, part)| {
            part.fill(MaybeUninit::new(0.0));
            // SAFETY: every element of `part` was written just above, and
            // MaybeUninit<f32> has the size and alignment of f32.
            let part = unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) };
            fill(i, part)
        })
        .collect();
    // SAFETY: the chunks cover 0..len and `collect` ran every one of them,
    // so all `len` elements were initialised (a panic in `fill` propagates
    // before this line and drops the vector with length 0).
    unsafe { out.set_len(len) };
    (out, results)
}

/// `vec![0.0; len]` zeroed by rayon's workers, 64K values a task, not by
/// the calling thread alone (for outputs that a kernel then fills in
/// tasks of another shape).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    par_new_chunks(len, 64 * 1024, |_, _| ()).0
}

/// Entries per task when [`sum_in_order`] adds up partials.
const SUM_SLICE: usize = 16 * 1024;

/// The element-wise sum of equally long `parts` (per-task partial sums of
/// a gradient), added in their order in parallel slices: the bits do not
/// depend on how rayon scheduled the tasks that made them (bit-for-bit
/// resumable training).
pub(crate) fn sum_in_order(parts: &[Vec<f32>]) -> Vec<f32> {
    let n = parts.first().map_or(0, Vec::len);
    par_new_chunks(n, SUM_SLICE, |slice, total| {
        for p in parts {
            let p = &p[slice * SUM_SLICE..][..total.len()];
            total.iter_mut().zip(p).for_each(|(t, p)| *t += p);
        }
    })
    .0
}

/// Makes the calling thread thread 0 of rayon's global pool (the pool
/// these kernels and Flex run on; its size as rayon picks it:
/// `RAYON_NUM_THREADS`, else one thread per CPU, this one included).
///
/// Without it, every parallel loop that the thread driving the model
/// starts is handed to a pool thread, and the caller sleeps until the loop
/// is done: two wake-ups per kernel, and one thread more than there are
/// cores, which the OS moves between them. As a member, the caller runs
/// the loop's first part itself while the others steal the rest (on a
/// 2-core Xeon: 4x fewer context switches, 2 CPU migrations per bench run
/// instead of ~130, training at batch 32 ~3% faster with a steadier step
/// time; sampling unchanged within noise).
///
/// Call it once, from the thread that runs the model (`main`), before
/// anything has used rayon; it returns false, changing nothing, when the
/// global pool already exists. Other threads' parallel loops still run
/// (they are handed to the pool), but while this thread blocks outside
/// rayon (a `JoinHandle::join`) its share of the pool idles: give it a
/// share of threaded work to run itself.
pub fn join_global_pool() -> bool {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok()
}

/// Installs these kernels into the diffusion U-Net's table of replaceable
/// kernels for `Flex` and `Autodiff<Flex>` (idempotent).
#[cfg(feature = "unet")]
pub fn install_for_unet() {
    use burn::backend::{Autodiff, Flex};
    use diffusion_model::kernels::{install, Kernels};
    install::<Flex>(Kernels {
        attention: attention::inference,
        conv2d: conv::inference,
        group_norm: group_norm::inference,
        gelu: gelu::inference,
        attention_block: attention_block::inference,
        convnext_block: convnext_block::inference,
        conv_transpose2d: conv_transpose::inference,
        cat_channels,
    });
    install::<Autodiff<Flex>>(Kernels {
        attention: attention::autodiff,
        conv2d: conv::autodiff,
        group_norm: group_norm::autodiff,
        gelu: gelu::autodiff,
        attention_block: attention_block::autodiff,
        convnext_block: diffusion_model::kernels::generic_convnext_block,
        conv_transpose2d: conv_transpose::autodiff,
        cat_channels: cat_channels_autodiff,
    });
}

/// Installs Adam's and the EMA's kernels ([`optim`]) into the trainer's
/// table of replaceable kernels (`diffusion_train::kernels`) for `Flex`,
/// the backend its optimizer and EMA run on under `Autodiff<Flex>`
/// (idempotent).
#[cfg(feature = "train")]
pub fn install_for_training() {
    use diffusion_train::kernels::{install, TrainKernels};
    install::<Flex>(TrainKernels {
        adam_step: optim::adam_step,
        blend: optim::blend,
    });
}

/// `Tensor::cat(vec![a, b], 1)` for image batches on Flex, one image per
/// parallel task. Flex's cat copies on the calling thread while the other
/// cores wait: 1.4% of sampling's wall time on a 2-core Xeon, with both
/// workers idle. Other dtypes or unequal batch or plane sizes fall back
/// to burn's cat.
pub fn cat_channels(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
    if !cat_applies(a.dtype(), b.dtype(), a.dims(), b.dims()) {
        return Tensor::cat(vec![a, b], 1);
    }
    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(cat_forward(&a, &b)))
}

/// [`cat_channels`] under autodiff: its backward splits the gradient
/// into each input's channels, one image per parallel task, into
/// contiguous tensors. (burn's cat backward hands each input a strided
/// slice of the gradient, which the skip's gradient sum then walks on the
/// calling thread: 2% of a training step.)
pub fn cat_channels_autodiff(
    a: Tensor<Autodiff<Flex>, 4>,
    b: Tensor<Autodiff<Flex>, 4>,
) -> Tensor<Autodiff<Flex>, 4> {
    if !cat_applies(a.dtype(), b.dtype(), a.dims(), b.dims()) {
        return Tensor::cat(vec![a, b], 1);
    }
    let (ca, cb) = (a.dims()[1], b.dims()[1]);
    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let out = cat_forward(&a.primitive, &b.primitive);
    let out = match CatBackward
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish([ca, cb], out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn cat_applies(da: DType, db: DType, [n, _, h, w]: [usize; 4], [nb, _, hb, wb]: [usize; 4]) -> bool {
    da == DType::F32 && db == DType::F32 && (n, h, w) == (nb, hb, wb)
}

/// [a, b] along channels, per image.
fn cat_forward(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (a, b) = (a.to_contiguous(), b.to_contiguous());
    let ([n, ca, h, w], cb) = (dims4(&a), dims4(&b)[1]);
    let (xa, xb) = (f32s(&a), f32s(&b));
    let (la, lb) = (ca * h * w, cb * h * w);
    let (out, _) = par_new_chunks(n * (la + lb), la + lb, |i, out| {
        out[..la].copy_from_slice(&xa[i * la..][..la]);
        out[la..].copy_from_slice(&xb[i * lb..][..lb]);
    });
    FlexTensor::from_data(TensorData::new(out, [n, ca + cb, h, w]))
}

#[derive(Debug)]
struct CatBackward;

impl Backward<Flex, 2> for CatBackward {
    /// The channel counts of a and b.
    type State = [usize; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let [ca, cb] = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [n, _, h, w] = dims4(&grad);
        let g = f32s(&grad);
        let (hw, per) = (h * w, (ca + cb) * h * w);
        for (node, c, from) in [(node_a, ca, 0), (node_b, cb, ca * hw)] {
            if let Some(node) = node {
                let len = c * hw;
                let (part, _) = par_new_chunks(n * len, len, |i, out| {
                    out.copy_from_slice(&g[i * per + from..][..len]);
                });
                grads.register::<Flex>(
                    node.id,
                    FlexTensor::from_data(TensorData::new(part, [n, c, h, w])),
                );
            }
        }
    }
}

/// The four dimensions of a rank-4 tensor.
fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// The values of a contiguous f32 tensor.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

const LANES: usize = 8;

#[inline(always)]
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
#[inline(always)]
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

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// a·b + c: one fused multiply-add (one rounding) when `FMA`, which the
/// [`vectorised`] tiers with FMA pass; a multiply and an add otherwise (a
/// fused one without the instruction would be a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`]'s constants, shared with the AVX-512 and AVX2 versions of the
/// column softmax (`flash.rs`), which must give the same bits: the input
/// range, 1.5·2^23 (adding it rounds to an integer), ln 2 split into a part
/// exact in a product with n and the rest, and the polynomial's
/// coefficients from r⁶ down to r² (e^r ≈ 1 + r + r²·P(r)).
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.0;
const EXP_ROUND: f32 = 12_582_912.0;
const EXP_LN2_HI: f32 = -0.693_359_4;
const EXP_LN2_LO: f32 = 2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];

/// e^x for x in [−87.3, 88], Cephes' `expf` without branches (so it
/// vectorises): x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by a degree-6
/// polynomial, 2^n put in the exponent bits. Relative error below 2e-7
/// (tested); below −87.3 it returns e^−87.3 ≈ 1.2e-38 instead of a subnormal.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let t = x * std::f32::consts::LOG2_E + EXP_ROUND;
    let n = t - EXP_ROUND;
    let r = madd::<FMA>(n, EXP_LN2_LO, madd::<FMA>(n, EXP_LN2_HI, x));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = madd::<FMA>(p, r, c);
    }
    let e = madd::<FMA>(p, r * r, r + 1.0);
    // t's low mantissa bits hold n (two's complement); e·2^n is e with n
    // added to its exponent field (exactly the product: e ∈ [0.7, 1.42]
    // and the clamp keep the result normal; one integer add instead of
    // building 2^n and multiplying).
    let n_int = (t.to_bits() as i32).wrapping_sub(EXP_ROUND.to_bits() as i32);
    f32::from_bits((e.to_bits() as i32).wrapping_add(n_int << 23) as u32)
}

/// [`exp2`]'s constants, shared with the AVX-512 and AVX2 versions of
/// the column softmax (`flash.rs`), which must give the same bits: the
/// input range (every result normal: at −125.5 the reduction leaves r =
/// 0.5) and the coefficients of 2^r ≈ 1 + r·P(r) from r⁶'s down to r's
/// (a relative-error fit on |r| ≤ 1/2: 2e-9 in exact arithmetic, 8e-8
/// evaluated in f32 with fused multiply-adds).
const EXP2_MIN: f32 = -125.5;
const EXP2_MAX: f32 = 127.0;
const EXP2_POLY: [f32; 6] = [
    1.535_334_9e-4,
    1.339_887_5e-3,
    9.618_438e-3,
    5.550_332_4e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// 2^x for x in [−125.5, 127]: x = n + r with n = round(x) and |r| ≤ 1/2
/// (exact in floats, so no ln 2 split as in [`exp`]), 2^r by a degree-6
/// polynomial, 2^n put in the exponent bits. The column softmax works in
/// base 2 (its scores are scaled by log₂ e in the product that makes them),
/// which saves exp's multiply by log₂ e and two multiply-adds of range
/// reduction per value. Relative error below 2e-7 (tested); below −125.5
/// it returns 2^−125.5 instead of a subnormal.
#[inline(always)]
fn exp2<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(EXP2_MIN, EXP2_MAX);
    let t = x + EXP_ROUND;
    let n = t - EXP_ROUND;
    let r = x - n;
    let mut p = EXP2_POLY[0];
    for &c in &EXP2_POLY[1..] {
        p = madd::<FMA>(p, r, c);
    }
    let e = madd::<FMA>(p, r, 1.0);
    // As in `exp`: n in t's low mantissa bits, added to e's exponent field
    // (e ∈ [0.7, 1.42]; the clamp keeps the result normal).
    let n_int = (t.to_bits() as i32).wrapping_sub(EXP_ROUND.to_bits() as i32);
    f32::from_bits((e.to_bits() as i32).wrapping_add(n_int << 23) as u32)
}

#[cfg(test)]
mod test_util {
    use burn::tensor::backend::Backend;
    use burn::tensor::Tensor;

    pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// The output's values and the gradients of Σ w ⊙ y with fixed
    /// weights 0.1, 0.2, …, 1.0, 0.1, … (every output weighted differently,
    /// so a gradient that lands in the wrong place shows).
    pub fn weighted_backward<const D: usize>(
        y: Tensor<burn::backend::Autodiff<burn::backend::Flex>, D>,
    ) -> (Vec<f32>, burn::backend::autodiff::grads::Gradients) {
        type Ad = burn::backend::Autodiff<burn::backend::Flex>;
        let n = y.dims().iter().product::<usize>();
        let w: Vec<f32> = (0..n).map(|i| 0.1 * (1 + i % 10) as f32).collect();
        let w = Tensor::<Ad, 1>::from_floats(w.as_slice(), &y.device()).reshape(y.dims());
        let out = values(y.clone().inner());
        (out, (y * w).sum().backward())
    }

    /// A reproducible stream of values in [−0.5, 0.5) (a 32-bit linear
    /// congruential generator, its top 24 bits), for the kernels' tests.
    pub fn uniform(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

    /// max |a − b|.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// max |a − b| / max |b|.
    pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        max_abs_diff(a, b) / b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel channel concatenation against burn's cat: the same
    /// values in the same places (each image's channels of `a`, then of
    /// `b`), for the U-Net's up-path shape and a single image.
    #[test]
    fn cat_channels_matches_burn() {
        use burn::tensor::{Distribution, Tensor};
        let device = Default::default();
        for [n, ca, cb, h, w] in [[3, 2, 5, 4, 7], [1, 16, 16, 28, 28]] {
            let a = Tensor::<Flex, 4>::random([n, ca, h, w], Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<Flex, 4>::random([n, cb, h, w], Distribution::Normal(0.0, 1.0), &device);
            let ours = cat_channels(a.clone(), b.clone());
            assert_eq!(ours.dims(), [n, ca + cb, h, w]);
            let burn = Tensor::cat(vec![a, b], 1);
            assert_eq!(ours.into_data(), burn.into_data(), "{n}x({ca}+{cb})x{h}x{w}");
        }
    }

    /// Under autodiff: the output and both inputs' gradients (of a
    /// weighted sum, so each gradient value has its own weight) equal
    /// burn's cat's, bit for bit (the backward only copies); with `a` not
    /// tracked, `b` still gets its part.
    #[test]
    fn cat_channels_gradients_match_burn() {
        use crate::test_util::{values, weighted_backward};
        use burn::tensor::Distribution;
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        for track_a in [true, false] {
            let a = Tensor::<Flex, 4>::random([3, 2, 4, 5], Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<Flex, 4>::random([3, 3, 4, 5], Distribution::Normal(0.0, 1.0), &device);
            let results: Vec<Vec<Vec<f32>>> = [true, false]
                .into_iter()
                .map(|ours| {
                    let a = Tensor::<Ad, 4>::from_inner(a.clone());
                    let a = if track_a { a.require_grad() } else { a };
                    let b = Tensor::<Ad, 4>::from_inner(b.clone()).require_grad();
                    let y = if ours {
                        cat_channels_autodiff(a.clone(), b.clone())
                    } else {
                        Tensor::cat(vec![a.clone(), b.clone()], 1)
                    };
                    let (out, grads) = weighted_backward(y);
                    let ga = a.grad(&grads).map(values).unwrap_or_default();
                    vec![out, ga, values(b.grad(&grads).unwrap())]
                })
                .collect();
            assert_eq!(results[0], results[1], "a tracked: {track_a}");
            assert_eq!(results[0][1].is_empty(), !track_a);
        }
    }

    #[test]
    fn exp_matches_std_to_2e7_relative() {
        let mut worst = 0f64;
        // From the clamp at −87.3 (the smallest results, 2^−126 and up) on.
        let mut x = -87.3f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            for ours in [exp::<false>(x), exp::<true>(x)] {
                assert!(ours.is_normal(), "exp({x}) = {ours:e} is not a normal float");
                worst = worst.max(((ours as f64 - exact) / exact).abs());
            }
            x += 0.001_3;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp::<false>(0.0), 1.0);
        assert_eq!(exp::<true>(0.0), 1.0);
        assert!(exp::<false>(-1000.0) < 2e-38 && exp::<false>(-1000.0) >= 0.0);
        assert!(exp::<true>(-1000.0) < 2e-38 && exp::<true>(-1000.0) >= 0.0);
    }

    #[test]
    fn exp2_matches_std_to_2e7_relative() {
        let mut worst = 0f64;
        // From the clamp at −125.5 (the smallest results, 2^−125.5) on.
        let mut x = -125.5f32;
        while x < 127.0 {
            let exact = (x as f64).exp2();
            for ours in [exp2::<false>(x), exp2::<true>(x)] {
                assert!(ours.is_normal(), "exp2({x}) = {ours:e} is not a normal float");
                worst = worst.max(((ours as f64 - exact) / exact).abs());
            }
            x += 0.001_7;
        }
        // Halfway points, where n rounds to even and r = ±1/2.
        for x in [-125.5f32, -3.5, -0.5, 0.5, 2.5, 126.5] {
            let exact = (x as f64).exp2();
            for ours in [exp2::<false>(x), exp2::<true>(x)] {
                worst = worst.max(((ours as f64 - exact) / exact).abs());
            }
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        for n in -125..=127 {
            assert_eq!(exp2::<true>(n as f32), (n as f32).exp2(), "2^{n}");
        }
        assert!(exp2::<false>(-1000.0) < 2e-38 && exp2::<false>(-1000.0) >= 0.0);
        assert!(exp2::<true>(-1000.0) < 2e-38 && exp2::<true>(-1000.0) >= 0.0);
    }

    #[test]
    fn scratch_is_kept_per_thread_and_grown_never_shrinks() {
        #[derive(Default)]
        struct Buf(Vec<f32>);
        // A buffer grown in one call is there, with its contents, in the next.
        with_scratch(|b: &mut Buf| grown(&mut b.0, 5).copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]));
        let (len, head) = with_scratch(|b: &mut Buf| {
            let head = grown(&mut b.0, 2).to_vec();
            // A nested call for the same type gets a fresh instance.
            let nested = with_scratch(|inner: &mut Buf| inner.0.len());
            assert_eq!(nested, 0);
            (b.0.len(), head)
        });
        assert_eq!((len, head), (5, vec![1.0, 2.0]));
        // Growing keeps the old values and zero-fills the new ones.
        let grown_values = with_scratch(|b: &mut Buf| grown(&mut b.0, 7).to_vec());
        assert_eq!(grown_values, [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]);
        // Another thread has its own.
        let other = std::thread::spawn(|| with_scratch(|b: &mut Buf| b.0.len()))
            .join()
            .unwrap();
        assert_eq!(other, 0);
    }

    #[test]
    fn new_chunks_are_zeroed_cover_the_vector_and_return_in_order() {
        // 10 elements in chunks of 4: 4 + 4 + 2. Each task checks its chunk
        // is zeroed, then writes 100·chunk + offset; the results are the
        // chunk lengths in chunk order.
        let (v, lens) = par_new_chunks(10, 4, |i, part| {
            assert!(part.iter().all(|&x| x == 0.0));
            for (j, x) in part.iter_mut().enumerate() {
                *x = (100 * i + j) as f32;
            }
            (i, part.len())
        });
        assert_eq!(v, [0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0, 200.0, 201.0]);
        assert_eq!(lens, [(0, 4), (1, 4), (2, 2)]);
        let (empty, none) = par_new_chunks(0, 0, |_, _| ());
        assert!(empty.is_empty() && none.is_empty());
    }
}
