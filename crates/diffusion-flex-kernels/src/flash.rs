//! Attention without the score matrix: softmax(q·kᵀ·s)·v computed block by
//! block of queries (FlashAttention's forward and backward, Dao 2022/2023),
//! with the matmuls on the `gemm` crate (the one Flex uses) and the softmax
//! on the vectorised row loops of this module's parent. For the queries of
//! [`block_forward`] (64 side by side in memory), the scores' product is
//! this module's own AVX-512/AVX2 kernel with the column max folded in
//! ([`Block::fused_softmax`]): with d = 8 or 16, gemm's packing and set-up
//! cost as much as its multiply-adds.
//!
//! A [batch, 784, 784] score matrix is 2.5 MB per image; written out (and,
//! for training, kept until the backward pass) it costs memory bandwidth
//! and page faults. Here each task holds one block of 64 query rows
//! (64 × 784 floats, 200 KB, in L2) and keeps only the log-sum-exp of each
//! row for the backward pass, which recomputes the block's probabilities.

use rayon::prelude::*;

use super::matmul::{matmul, View};
use super::{dot, exp2, grown, par_new_chunks, vectorised, with_scratch, zeroed};
#[cfg(target_arch = "x86_64")]
use super::{EXP2_MAX, EXP2_MIN, EXP2_POLY, EXP_ROUND};

/// Query rows per block.
const BLOCK: usize = 64;

/// Shapes of one attention call: `batch` sequences of `len` tokens of
/// width `d` (queries and keys have the same length: self-attention).
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    pub len: usize,
    pub d: usize,
}

impl Dims {
    /// The score scale 1/√d.
    pub fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// Returns o = softmax(q·kᵀ/√d)·v and the log-sum-exp of each score row.
/// `q`, `k`, `v`, `o`: [batch, len, d] row-major; lse: [batch, len].
///
/// Each task holds the scores of one block of query rows *transposed*,
/// sᵀ [len, rows], so that the queries of the block lie side by side:
/// the softmax's max, exp and sum then run down the columns with full
/// vectors and no horizontal reductions, and both products keep the
/// block's rows (64) as the wide, unit-stride dimension of gemm's
/// microkernel. (With the rows of the scores contiguous instead, P·v has
/// only d = 8 or 16 output columns, which leaves gemm's widest tiles
/// mostly empty.) The probabilities are left unnormalised and the d
/// outputs of each row divided by the row's sum afterwards: one pass over
/// [rows, d] instead of one over [rows, len].
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    let mut o = zeroed(batch * per_seq);
    let mut lse = zeroed(batch * len);
    if per_seq == 0 {
        return (o, lse);
    }
    // One task per block of query rows of one sequence.
    o.par_chunks_mut(per_seq)
        .zip(lse.par_chunks_mut(len))
        .enumerate()
        .for_each(|(b, (o, lse))| {
            let seq = b * per_seq..(b + 1) * per_seq;
            let (q, k, v) = (&q[seq.clone()], &k[seq.clone()], &v[seq]);
            o.par_chunks_mut(BLOCK * d)
                .zip(lse.par_chunks_mut(BLOCK))
                .enumerate()
                .for_each(|(block, (o, lse))| {
                    with_scratch(|scratch: &mut Scratch| {
                        let (start, rows) = (block * BLOCK, lse.len());
                        // A whole block's qᵀ [d, 64] is copied so that its
                        // queries lie side by side, which lets
                        // `Block::fused_softmax` make the scores (same bits
                        // as gemm's, which reads qᵀ strided in place).
                        let mut q_copy = std::mem::take(&mut scratch.q_t);
                        let q_t = if rows == BLOCK {
                            let q_t = grown(&mut q_copy, d * BLOCK);
                            transpose_into(&q[start * d..][..BLOCK * d], d, q_t);
                            View::rows(q_t, BLOCK)
                        } else {
                            View::transposed(&q[start * d..], d)
                        };
                        let block = Block {
                            k: View::rows(k, d),
                            q_t,
                            v_t: View::transposed(v, d),
                            len,
                            rows,
                            d,
                        };
                        let (ot, maxes, sums) = block.attend(dims.scale(), scratch);
                        for i in 0..rows {
                            let inv = 1.0 / sums[i];
                            for (j, out) in o[i * d..][..d].iter_mut().enumerate() {
                                *out = ot[j * rows + i] * inv;
                            }
                            // The max is in base-2 units (`softmax_columns`).
                            lse[i] = maxes[i] * std::f32::consts::LN_2 + sums[i].ln();
                        }
                        scratch.q_t = q_copy;
                    })
                });
        });
    (o, lse)
}

/// One block of `rows` queries against all `len` keys, as views in
/// whatever layout the caller holds them: k [len, d], the block's queries
/// qᵀ [d, rows], vᵀ [d, len].
struct Block<'a> {
    k: View<'a>,
    q_t: View<'a>,
    v_t: View<'a>,
    len: usize,
    rows: usize,
    d: usize,
}

impl Block<'_> {
    /// Leaves the unnormalised outputs oᵀ [d, rows] in `ot` and returns
    /// each query's max score, in base-2 units (the score times log₂ e),
    /// and sum of exps (the first `rows` entries): sᵀ [len, rows] = scale ·
    /// log₂ e · k · qᵀ, the column softmax of sᵀ in base 2 (in `st`),
    /// oᵀ = vᵀ · pᵀ; returns oᵀ (in `scratch`) with them.
    fn attend<'s>(
        &self,
        scale: f32,
        scratch: &'s mut Scratch,
    ) -> (&'s mut [f32], [f32; BLOCK], [f32; BLOCK]) {
        let Block { len, rows, d, .. } = *self;
        let st = grown(&mut scratch.st, len * rows);
        let ot = grown(&mut scratch.ot, d * rows);
        // Scores in base-2 units for `softmax_columns`.
        let alpha = scale * std::f32::consts::LOG2_E;
        let (mut maxes, mut sums) = ([0f32; BLOCK], [0f32; BLOCK]);
        if !self.fused_softmax(alpha, st, &mut maxes, &mut sums) {
            matmul(st, len, rows, d, self.k, self.q_t, alpha, false);
            softmax_columns(st, &mut maxes[..rows], &mut sums[..rows]);
        }
        matmul(ot, d, rows, len, self.v_t, View::rows(st, rows), 1.0, false);
        (ot, maxes, sums)
    }

    /// Where the CPU has AVX2 (or AVX-512) and the block has 64 queries
    /// side by side in memory (qᵀ with unit column stride, as
    /// [`block_forward`] holds them and [`forward`] copies them):
    /// sᵀ = α·k·qᵀ by [`scores_avx512`] or [`scores_avx2`], each column's
    /// max taken as the scores are written, then the exp pass of
    /// [`softmax_columns`] on that tier. The same
    /// bits as gemm's product and `softmax_columns` (tested). Returns
    /// false, touching nothing, where it does not apply.
    fn fused_softmax(
        &self,
        alpha: f32,
        st: &mut [f32],
        maxes: &mut [f32; BLOCK],
        sums: &mut [f32; BLOCK],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.rows == BLOCK && self.q_t.cs == 1 && self.len > 0 {
            match crate::simd_level() {
                crate::SimdLevel::Avx512 => {
                    // SAFETY: the CPU has AVX-512F (checked by simd_level).
                    unsafe { fused_softmax_avx512(self, alpha, st, maxes, sums) };
                    return true;
                }
                crate::SimdLevel::Avx2 => {
                    // SAFETY: the CPU has AVX2 and FMA (checked by simd_level).
                    unsafe { fused_softmax_avx2(self, alpha, st, maxes, sums) };
                    return true;
                }
                crate::SimdLevel::Baseline => {}
            }
        }
        // (Unused on other architectures.)
        let _ = (alpha, st, maxes, sums);
        false
    }
}

/// [`Block::fused_softmax`] with AVX2: [`scores_avx2`], then
/// [`exp_columns_avx2`] on each 16 columns.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fused_softmax_avx2(
    block: &Block,
    alpha: f32,
    st: &mut [f32],
    maxes: &mut [f32; BLOCK],
    sums: &mut [f32; BLOCK],
) {
    // SAFETY: the caller's.
    unsafe { scores_avx2(block, alpha, st, maxes) };
    for c0 in (0..BLOCK).step_by(COLS) {
        let m: &[f32; COLS] = maxes[c0..c0 + COLS].try_into().unwrap();
        let s: &mut [f32; COLS] = (&mut sums[c0..c0 + COLS]).try_into().unwrap();
        // SAFETY: the caller's.
        unsafe { exp_columns_avx2(&mut st[..block.len * BLOCK], BLOCK, c0, m, s) };
    }
}

/// [`Block::fused_softmax`] with AVX-512: [`scores_avx512`], then
/// [`exp_rows_avx512`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fused_softmax_avx512(
    block: &Block,
    alpha: f32,
    st: &mut [f32],
    maxes: &mut [f32; BLOCK],
    sums: &mut [f32; BLOCK],
) {
    // SAFETY: the caller's.
    unsafe {
        scores_avx512(block, alpha, st, maxes);
        exp_rows_avx512(&mut st[..block.len * BLOCK], maxes, sums);
    }
}

/// [`scores_avx2`] with AVX-512: four keys by all 64 queries a tile (16
/// sums in registers), the same operations per score, so the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(block: &Block, alpha: f32, st: &mut [f32], maxes: &mut [f32; BLOCK]) {
    use std::arch::x86_64::*;
    let Block { k, q_t, len, d, .. } = *block;
    assert!(block.rows == BLOCK && q_t.cs == 1 && st.len() >= len * BLOCK);
    k.check(len, d);
    q_t.check(d, BLOCK);
    let (kp, qp, sp) = (k.data.as_ptr(), q_t.data.as_ptr(), st.as_mut_ptr());
    let a = _mm512_set1_ps(alpha);
    // One tile: keys l0 .. l0 + N, all 64 queries.
    #[inline(always)]
    unsafe fn tile<const N: usize>(
        (kp, qp, sp): (*const f32, *const f32, *mut f32),
        (k, q_t): (View, View),
        d: usize,
        l0: usize,
        a: __m512,
        m: &mut [__m512; 4],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; N];
        for j in 0..d {
            // SAFETY: j < d, 64 columns of qᵀ (checked by the caller).
            let q = unsafe { qp.add(j * q_t.rs) };
            // SAFETY: as above.
            let qv = unsafe {
                [
                    _mm512_loadu_ps(q),
                    _mm512_loadu_ps(q.add(16)),
                    _mm512_loadu_ps(q.add(32)),
                    _mm512_loadu_ps(q.add(48)),
                ]
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: key l0 + i < len, j < d (checked by the caller).
                let kv = _mm512_set1_ps(unsafe { *kp.add((l0 + i) * k.rs + j * k.cs) });
                for h in 0..4 {
                    acc[h] = _mm512_fmadd_ps(kv, qv[h], acc[h]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for h in 0..4 {
                let y = _mm512_mul_ps(acc[h], a);
                // SAFETY: row l0 + i < len of sᵀ [len, 64], columns 16h .. 16h + 16.
                unsafe { _mm512_storeu_ps(sp.add((l0 + i) * BLOCK + 16 * h), y) };
                // y > m ? y : m, as `softmax_columns` (a NaN score is passed over).
                m[h] = _mm512_max_ps(y, m[h]);
            }
        }
    }
    let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut l0 = 0;
    while l0 + 4 <= len {
        // SAFETY: l0 + 4 ≤ len (the loop's condition).
        unsafe { tile::<4>((kp, qp, sp), (k, q_t), d, l0, a, &mut m) };
        l0 += 4;
    }
    while l0 < len {
        // SAFETY: l0 < len.
        unsafe { tile::<1>((kp, qp, sp), (k, q_t), d, l0, a, &mut m) };
        l0 += 1;
    }
    for (h, m) in m.iter().enumerate() {
        // SAFETY: 16h + 16 ≤ 64 = maxes.len().
        unsafe { _mm512_storeu_ps(maxes.as_mut_ptr().add(16 * h), finite_or_zero_avx512(*m)) };
    }
}

/// sᵀ [len, 64] = α · k [len, d] · qᵀ [d, 64] into `st`, and the max of
/// each column (0 where it is not finite, as [`softmax_columns`] takes
/// it) into `maxes`, with AVX2: five keys by sixteen queries a tile, ten
/// sums in registers, as many FMAs in flight as two FMA units of latency 5
/// take (AMD Zen 2 and 3; Intel's latency 4 needs eight; batch-81 blocks
/// at 28x28, d = 16, 2% faster than with four keys on an Intel Xeon),
/// the d products of each score summed in order by fused multiply-adds
/// from zero and then scaled by α, as gemm's microkernel does, so the
/// same bits. For d = 8 or 16, gemm spent as long packing and setting up
/// this product as multiplying, and the max was a pass of its own.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(block: &Block, alpha: f32, st: &mut [f32], maxes: &mut [f32; BLOCK]) {
    use std::arch::x86_64::*;
    let Block { k, q_t, len, d, .. } = *block;
    assert!(block.rows == BLOCK && q_t.cs == 1 && st.len() >= len * BLOCK);
    k.check(len, d);
    q_t.check(d, BLOCK);
    let (kp, qp, sp) = (k.data.as_ptr(), q_t.data.as_ptr(), st.as_mut_ptr());
    let a = _mm256_set1_ps(alpha);
    // One tile: keys l0 .. l0 + N, queries c0 .. c0 + 16.
    #[inline(always)]
    unsafe fn tile<const N: usize>(
        (kp, qp, sp): (*const f32, *const f32, *mut f32),
        (k, q_t): (View, View),
        d: usize,
        l0: usize,
        c0: usize,
        a: __m256,
        m: &mut [__m256; 2],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for j in 0..d {
            // SAFETY: j < d and c0 + 16 ≤ 64 columns of qᵀ (checked by the caller).
            let q = unsafe { qp.add(j * q_t.rs + c0) };
            // SAFETY: as above.
            let (qa, qb) = unsafe { (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8))) };
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: key l0 + i < len, j < d (checked by the caller).
                let kv = _mm256_set1_ps(unsafe { *kp.add((l0 + i) * k.rs + j * k.cs) });
                acc[0] = _mm256_fmadd_ps(kv, qa, acc[0]);
                acc[1] = _mm256_fmadd_ps(kv, qb, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let (ya, yb) = (_mm256_mul_ps(acc[0], a), _mm256_mul_ps(acc[1], a));
            // SAFETY: row l0 + i < len of sᵀ [len, 64], columns c0 .. c0 + 16.
            unsafe {
                let at = sp.add((l0 + i) * BLOCK + c0);
                _mm256_storeu_ps(at, ya);
                _mm256_storeu_ps(at.add(8), yb);
            }
            // y > m ? y : m, as `softmax_columns` (a NaN score is passed over).
            m[0] = _mm256_max_ps(ya, m[0]);
            m[1] = _mm256_max_ps(yb, m[1]);
        }
    }
    for c0 in (0..BLOCK).step_by(16) {
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        let mut l0 = 0;
        while l0 + 5 <= len {
            // SAFETY: l0 + 5 ≤ len (the loop's condition), c0 + 16 ≤ 64.
            unsafe { tile::<5>((kp, qp, sp), (k, q_t), d, l0, c0, a, &mut m) };
            l0 += 5;
        }
        while l0 < len {
            // SAFETY: l0 < len, c0 + 16 ≤ 64.
            unsafe { tile::<1>((kp, qp, sp), (k, q_t), d, l0, c0, a, &mut m) };
            l0 += 1;
        }
        for (h, m) in m.iter().enumerate() {
            // SAFETY: c0 + 8h + 8 ≤ 64 = maxes.len().
            unsafe { _mm256_storeu_ps(maxes.as_mut_ptr().add(c0 + 8 * h), finite_or_zero_avx2(*m)) };
        }
    }
}

/// One task's buffers for [`backward`]: a block's probabilities and their
/// gradient [rows, len], and the transposed gradients.
#[derive(Default)]
struct BackwardScratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    k_t: Vec<f32>,
    v_t: Vec<f32>,
    dq_t: Vec<f32>,
    dk_t: Vec<f32>,
    dv_t: Vec<f32>,
}

/// One task's buffers for [`Block::attend`]: the score block sᵀ and the
/// unnormalised outputs oᵀ; for [`forward`], a block's queries qᵀ.
#[derive(Default)]
struct Scratch {
    st: Vec<f32>,
    ot: Vec<f32>,
    q_t: Vec<f32>,
}

/// The weights of one attention block, as slices: `w_qkv` [d, 3d] and
/// `w_out` [d, d] (burn's Linear layout, [in, out]), biases \[3d\] and \[d\].
pub struct BlockWeights<'a> {
    pub w_qkv: &'a [f32],
    pub b_qkv: Option<&'a [f32]>,
    pub w_out: &'a [f32],
    pub b_out: Option<&'a [f32]>,
}

/// A whole attention block for inference, in the image layout throughout:
/// returns x + Wo·attention(q, k, v) + bo with [q; k; v] = Wqkv·gn + bqkv,
/// where `x` and its group norm `gn` are [batch, d, len] (channel-major,
/// as the U-Net holds them) and the result has that shape too.
///
/// In this layout qᵀ, kᵀ and vᵀ are contiguous [d, len] slabs of one
/// [3d, len] product per image, and each block of queries ends in
/// Wo·oᵀ [d, rows], so no transposed copy of the tokens is ever made
/// (the generic block transposes to [len, d], splits q, k and v into
/// copies, and transposes back).
pub fn block_forward(x: &[f32], gn: &[f32], weights: &BlockWeights, dims: Dims) -> Vec<f32> {
    if dims.len * dims.d == 0 {
        return Vec::new();
    }
    let qkv = project_qkv(gn, weights, dims);
    let projected = attend_blocks(&qkv, weights, dims);
    add_residual(x, &projected, weights, dims)
}

/// [q; k; v]ᵀ [3d, len] per image for [`block_forward`].
fn project_qkv(gn: &[f32], weights: &BlockWeights, dims: Dims) -> Vec<f32> {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    // [q; k; v]ᵀ [3d, len] = Wqkvᵀ [3d, d] · gn [d, len] + bqkv, per image.
    par_new_chunks(batch * 3 * per_seq, 3 * per_seq, |b, dst| {
        let gn = View::rows(&gn[b * per_seq..][..per_seq], len);
        matmul(
            dst,
            3 * d,
            len,
            d,
            View::transposed(weights.w_qkv, 3 * d),
            gn,
            1.0,
            false,
        );
        if let Some(bias) = weights.b_qkv {
            for (row, &bias) in dst.chunks_exact_mut(len).zip(bias) {
                row.iter_mut().for_each(|v| *v += bias);
            }
        }
    })
    .0
}

/// Wo·oᵀ [d, rows] for each block of queries of each image (a [`BLOCK`]-row
/// slot per block) for [`block_forward`].
fn attend_blocks(qkv: &[f32], weights: &BlockWeights, dims: Dims) -> Vec<f32> {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    // One task per block of queries of one image: Wo·oᵀ [d, rows].
    let blocks = len.div_ceil(BLOCK);
    par_new_chunks(batch * blocks * d * BLOCK, d * BLOCK, |task, dst| {
        with_scratch(|scratch: &mut Scratch| {
            let (b, start) = (task / blocks, (task % blocks) * BLOCK);
            let rows = BLOCK.min(len - start);
            let slab = &qkv[b * 3 * per_seq..][..3 * per_seq];
            let (q_t, k_t, v_t) = (
                &slab[..per_seq],
                &slab[per_seq..2 * per_seq],
                &slab[2 * per_seq..],
            );
            let block = Block {
                k: View {
                    data: k_t,
                    rs: 1,
                    cs: len,
                },
                q_t: View {
                    data: &q_t[start..],
                    rs: len,
                    cs: 1,
                },
                v_t: View::rows(v_t, len),
                len,
                rows,
                d,
            };
            let (ot, _, sums) = block.attend(dims.scale(), scratch);
            // Normalised per column.
            for row in ot.chunks_exact_mut(rows) {
                for (v, s) in row.iter_mut().zip(sums.iter()) {
                    *v /= *s;
                }
            }
            // Wo·oᵀ: Woᵀ [d, d] · oᵀ [d, rows]
            let w_out_t = View::transposed(weights.w_out, d);
            matmul(
                &mut dst[..d * rows],
                d,
                rows,
                d,
                w_out_t,
                View::rows(ot, rows),
                1.0,
                false,
            );
        })
    })
    .0
}

/// x + bo + the projected blocks, in the image layout, for [`block_forward`].
fn add_residual(x: &[f32], projected: &[f32], weights: &BlockWeights, dims: Dims) -> Vec<f32> {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    let blocks = len.div_ceil(BLOCK);
    // out = x + bo + Wo·oᵀ, the blocks put back side by side.
    par_new_chunks(batch * per_seq, per_seq, |b, out| {
        let x = &x[b * per_seq..][..per_seq];
        for blk in 0..blocks {
            let start = blk * BLOCK;
            let rows = BLOCK.min(len - start);
            let src = &projected[(b * blocks + blk) * d * BLOCK..][..d * rows];
            for j in 0..d {
                let bias = weights.b_out.map_or(0.0, |b| b[j]);
                let at = j * len + start;
                for ((o, &x), &y) in out[at..at + rows]
                    .iter_mut()
                    .zip(&x[at..at + rows])
                    .zip(&src[j * rows..][..rows])
                {
                    *o = x + (y + bias);
                }
            }
        }
    })
    .0
}

/// Gradients (dq, dk, dv) of Σ dO ⊙ o with respect to q, k and v.
///
/// One task per sequence, a block of 64 queries at a time: P recomputed
/// and dS made by [`rows_by_keys`] (gemm and a row pass without AVX2),
/// dvᵀ and dkᵀ accumulated by gemm with len as the wide dimension, dq by
/// [`ds_times_k`] (dot products where d ≤ 8, else gemm as dqᵀ = kᵀ·dSᵀ).
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { batch, len, d } = dims;
    let scale = dims.scale();
    let per_seq = len * d;
    let mut dq = zeroed(batch * per_seq);
    let mut dk = zeroed(batch * per_seq);
    let mut dv = zeroed(batch * per_seq);
    // One task per sequence: dk and dv sum over all query blocks.
    dq.par_chunks_mut(per_seq.max(1))
        .zip(
            dk.par_chunks_mut(per_seq.max(1))
                .zip(dv.par_chunks_mut(per_seq.max(1))),
        )
        .enumerate()
        .for_each(|(b, (dq, (dk, dv)))| {
            let seq = b * per_seq..(b + 1) * per_seq;
            let (q, k, v) = (&q[seq.clone()], &k[seq.clone()], &v[seq.clone()]);
            let (o, d_o) = (&o[seq.clone()], &d_o[seq]);
            let lse = &lse[b * len..][..len];
            with_scratch(|scratch: &mut BackwardScratch| {
                let rows_max = BLOCK.min(len);
                let p = grown(&mut scratch.p, rows_max * len);
                let dp = grown(&mut scratch.dp, rows_max * len);
                // dkᵀ and dvᵀ [d, len]: products with the d outputs as
                // gemm's narrow dimension and len as its wide one (the
                // other way round, d = 8 or 16 rows leave most of its
                // 64-row tiles empty).
                let dk_t = grown(&mut scratch.dk_t, d * len);
                let dv_t = grown(&mut scratch.dv_t, d * len);
                let dq_t = grown(&mut scratch.dq_t, d * rows_max);
                // kᵀ and vᵀ [d, len], copied once per sequence: as the
                // right-hand side of q·kᵀ and dO·vᵀ, gemm reads them in place
                // (given k and v row-major it copies them into its panels
                // for every block of queries).
                let k_t = grown(&mut scratch.k_t, d * len);
                transpose_into(k, d, k_t);
                let v_t = grown(&mut scratch.v_t, d * len);
                transpose_into(v, d, v_t);
                let (k_t, v_t) = (&*k_t, &*v_t);
                let mut start = 0;
                while start < len {
                    let rows = BLOCK.min(len - start);
                    let (p, dp) = (&mut p[..rows * len], &mut dp[..rows * len]);
                    let (q_blk, do_blk) = (&q[start * d..][..rows * d], &d_o[start * d..][..rows * d]);
                    let blk = (rows, len, d);
                    // P = exp(q·kᵀ·scale − lse), recomputed in base 2 as the
                    // forward pass made it: 2^(q·kᵀ·scale·log₂ e − lse·log₂ e).
                    let log2e = std::f32::consts::LOG2_E;
                    let mut shift = [0f32; BLOCK];
                    for (s, &l) in shift.iter_mut().zip(&lse[start..start + rows]) {
                        *s = l * log2e;
                    }
                    let shift = &shift[..rows];
                    rows_by_keys::<false>(p, (q_blk, k_t), blk, scale * log2e, shift, &[]);
                    // dvᵀ += dOᵀ·P
                    let do_t = View::transposed(do_blk, d);
                    matmul(dv_t, d, len, rows, do_t, View::rows(p, len), 1.0, start > 0);
                    // dP = dO·vᵀ; dS = P ⊙ (dP − δ), δ = rowsum(dO ⊙ o), in dp.
                    let mut delta = [0f32; BLOCK];
                    for (i, delta) in delta[..rows].iter_mut().enumerate() {
                        let r = start + i;
                        *delta = dot(&d_o[r * d..][..d], &o[r * d..][..d]);
                    }
                    let delta = &delta[..rows];
                    rows_by_keys::<true>(dp, (do_blk, v_t), blk, 1.0, delta, p);
                    // dq = scale·dS·k (by dot products where d ≤ 8), else
                    // dqᵀ = scale·kᵀ·dSᵀ; then dkᵀ += scale·qᵀ·dS
                    ds_times_k(&mut dq[start * d..][..rows * d], dp, k_t, blk, scale, dq_t);
                    let q_t = View::transposed(&q[start * d..], d);
                    matmul(dk_t, d, len, rows, q_t, View::rows(dp, len), scale, start > 0);
                    start += rows;
                }
                transpose_into(dk_t, len, dk);
                transpose_into(dv_t, len, dv);
            })
        });
    (dq, dk, dv)
}

/// out [rows, len] = f(α · a [rows, d] · b_t [d, len]) for [`backward`],
/// finished entry by entry as it leaves the registers, with AVX-512 or
/// AVX2: with `GRAD` false, 2^(y − c_i), the probabilities P of the block
/// from q and kᵀ (c = lse·log₂ e); with `GRAD` true, p_il · (y − c_i), dS
/// from dO, vᵀ and P (c = δ = rowsum(dO ⊙ o)). The same bits as gemm's
/// product followed by [`exp2_shifted`] or [`softmax_grad_row`] (tested):
/// each entry's d products summed in order by fused multiply-adds from
/// zero, then scaled by α. gemm wrote [rows, len] and the pass after it
/// read and wrote it again; here each entry is written once, and the
/// product (d = 8 to 64 multiply-adds per entry) skips gemm's packing and
/// set-up. Without AVX2: gemm's product and the row pass. Returns whether
/// the vector kernel ran.
fn rows_by_keys<const GRAD: bool>(
    out: &mut [f32],
    (a, b_t): (&[f32], &[f32]),
    (rows, len, d): (usize, usize, usize),
    alpha: f32,
    c: &[f32],
    p: &[f32],
) -> bool {
    assert!(out.len() == rows * len && a.len() == rows * d && b_t.len() == d * len && c.len() == rows);
    assert!(!GRAD || p.len() == rows * len);
    #[cfg(target_arch = "x86_64")]
    match crate::simd_level() {
        crate::SimdLevel::Avx512 => {
            // SAFETY: the CPU has AVX-512F (checked by simd_level); sizes asserted above.
            unsafe { rows_by_keys_avx512::<GRAD>(out, (a, b_t), (rows, len, d), alpha, c, p) };
            return true;
        }
        crate::SimdLevel::Avx2 => {
            // SAFETY: the CPU has AVX2 and FMA (checked by simd_level); sizes asserted above.
            unsafe { rows_by_keys_avx2::<GRAD>(out, (a, b_t), (rows, len, d), alpha, c, p) };
            return true;
        }
        crate::SimdLevel::Baseline => {}
    }
    matmul(
        out,
        rows,
        len,
        d,
        View::rows(a, d),
        View::rows(b_t, len),
        alpha,
        false,
    );
    for (i, (row, &c)) in out.chunks_exact_mut(len).zip(c).enumerate() {
        if GRAD {
            softmax_grad_row(row, &p[i * len..][..len], c);
        } else {
            exp2_shifted(row, c);
        }
    }
    false
}

/// [`rows_by_keys`] with AVX-512: tiles of 4 rows by 64 positions (16 sums
/// in registers), then by 16, the last 16 masked.
///
/// # Safety
/// The CPU must have AVX-512F; the sizes are [`rows_by_keys`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_by_keys_avx512<const GRAD: bool>(
    out: &mut [f32],
    (a, b_t): (&[f32], &[f32]),
    (rows, len, d): (usize, usize, usize),
    alpha: f32,
    c: &[f32],
    p: &[f32],
) {
    use std::arch::x86_64::*;
    type Ptrs = (*mut f32, *const f32, *const f32, *const f32, *const f32);
    // Rows i0 .. i0 + I, positions l0 .. l0 + 16·V, the last vector's lanes in `last`.
    #[inline(always)]
    unsafe fn tile<const GRAD: bool, const I: usize, const V: usize>(
        (op, ap, bp, cp, pp): Ptrs,
        (len, d): (usize, usize),
        (i0, l0): (usize, usize),
        last: __mmask16,
        alpha: __m512,
    ) {
        let mask = |v: usize| if v + 1 == V { last } else { 0xffff };
        let mut acc = [[_mm512_setzero_ps(); V]; I];
        for j in 0..d {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                // SAFETY: row j < d of bᵀ; the lanes of mask(v) are positions < len.
                *bv = unsafe { _mm512_maskz_loadu_ps(mask(v), bp.add(j * len + l0 + 16 * v)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row i0 + i < rows of a [rows, d], j < d.
                let av = _mm512_set1_ps(unsafe { *ap.add((i0 + i) * d + j) });
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: i0 + i < rows = c.len().
            let ci = _mm512_set1_ps(unsafe { *cp.add(i0 + i) });
            for (v, &acc) in acc.iter().enumerate() {
                let at = (i0 + i) * len + l0 + 16 * v;
                let y = _mm512_sub_ps(_mm512_mul_ps(acc, alpha), ci);
                let y = if GRAD {
                    // SAFETY: entry (i0 + i, l0 + 16v ..) of p [rows, len], lanes of mask(v).
                    _mm512_mul_ps(unsafe { _mm512_maskz_loadu_ps(mask(v), pp.add(at)) }, y)
                } else {
                    exp2_avx512(y)
                };
                // SAFETY: as above, of out [rows, len].
                unsafe { _mm512_mask_storeu_ps(op.add(at), mask(v), y) };
            }
        }
    }
    let ptrs: Ptrs = (out.as_mut_ptr(), a.as_ptr(), b_t.as_ptr(), c.as_ptr(), p.as_ptr());
    let alpha = _mm512_set1_ps(alpha);
    let whole = len / 64 * 64;
    let mut i0 = 0;
    while i0 < rows {
        let four = rows - i0 >= 4;
        let mut l0 = 0;
        // SAFETY (all tiles): rows i0 .. i0 + I ≤ rows, positions inside len or masked.
        while l0 < whole {
            unsafe {
                if four {
                    tile::<GRAD, 4, 4>(ptrs, (len, d), (i0, l0), 0xffff, alpha)
                } else {
                    tile::<GRAD, 1, 4>(ptrs, (len, d), (i0, l0), 0xffff, alpha)
                }
            }
            l0 += 64;
        }
        while l0 < len {
            let n = (len - l0).min(16);
            let last = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
            unsafe {
                if four {
                    tile::<GRAD, 4, 1>(ptrs, (len, d), (i0, l0), last, alpha)
                } else {
                    tile::<GRAD, 1, 1>(ptrs, (len, d), (i0, l0), last, alpha)
                }
            }
            l0 += 16;
        }
        i0 += if four { 4 } else { 1 };
    }
}

/// [`rows_by_keys`] with AVX2: tiles of 4 rows by 16 positions (8 sums in
/// registers), then by 8, the last 8 masked.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the sizes are [`rows_by_keys`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_by_keys_avx2<const GRAD: bool>(
    out: &mut [f32],
    (a, b_t): (&[f32], &[f32]),
    (rows, len, d): (usize, usize, usize),
    alpha: f32,
    c: &[f32],
    p: &[f32],
) {
    use std::arch::x86_64::*;
    type Ptrs = (*mut f32, *const f32, *const f32, *const f32, *const f32);
    // Rows i0 .. i0 + I, positions l0 .. l0 + 8·V, the last vector's lanes in `last`.
    #[inline(always)]
    unsafe fn tile<const GRAD: bool, const I: usize, const V: usize>(
        (op, ap, bp, cp, pp): Ptrs,
        (len, d): (usize, usize),
        (i0, l0): (usize, usize),
        last: __m256i,
        alpha: __m256,
    ) {
        let mask = |v: usize| if v + 1 == V { last } else { _mm256_set1_epi32(-1) };
        let mut acc = [[_mm256_setzero_ps(); V]; I];
        for j in 0..d {
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                // SAFETY: row j < d of bᵀ; the lanes of mask(v) are positions < len.
                *bv = unsafe { _mm256_maskload_ps(bp.add(j * len + l0 + 8 * v), mask(v)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row i0 + i < rows of a [rows, d], j < d.
                let av = _mm256_set1_ps(unsafe { *ap.add((i0 + i) * d + j) });
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(av, bv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: i0 + i < rows = c.len().
            let ci = _mm256_set1_ps(unsafe { *cp.add(i0 + i) });
            for (v, &acc) in acc.iter().enumerate() {
                let at = (i0 + i) * len + l0 + 8 * v;
                let y = _mm256_sub_ps(_mm256_mul_ps(acc, alpha), ci);
                let y = if GRAD {
                    // SAFETY: entry (i0 + i, l0 + 8v ..) of p [rows, len], lanes of mask(v).
                    _mm256_mul_ps(unsafe { _mm256_maskload_ps(pp.add(at), mask(v)) }, y)
                } else {
                    exp2_avx2(y)
                };
                // SAFETY: as above, of out [rows, len].
                unsafe { _mm256_maskstore_ps(op.add(at), mask(v), y) };
            }
        }
    }
    let ptrs: Ptrs = (out.as_mut_ptr(), a.as_ptr(), b_t.as_ptr(), c.as_ptr(), p.as_ptr());
    let alpha = _mm256_set1_ps(alpha);
    let all = _mm256_set1_epi32(-1);
    let whole = len / 16 * 16;
    let mut i0 = 0;
    while i0 < rows {
        let four = rows - i0 >= 4;
        let mut l0 = 0;
        // SAFETY (all tiles): rows i0 .. i0 + I ≤ rows, positions inside len or masked.
        while l0 < whole {
            unsafe {
                if four {
                    tile::<GRAD, 4, 2>(ptrs, (len, d), (i0, l0), all, alpha)
                } else {
                    tile::<GRAD, 1, 2>(ptrs, (len, d), (i0, l0), all, alpha)
                }
            }
            l0 += 16;
        }
        while l0 < len {
            let n = (len - l0).min(8) as i32;
            let last = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            unsafe {
                if four {
                    tile::<GRAD, 4, 1>(ptrs, (len, d), (i0, l0), last, alpha)
                } else {
                    tile::<GRAD, 1, 1>(ptrs, (len, d), (i0, l0), last, alpha)
                }
            }
            l0 += 8;
        }
        i0 += if four { 4 } else { 1 };
    }
}

/// 2^x for 16 floats with AVX-512: [`exp_columns_avx512`]'s steps (the
/// clamp, n by `roundscale`, the polynomial, e·2^n by `scalef`), the bits
/// of `exp2::<true>`. Inlined into AVX-512 functions only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp2_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // x.clamp(−125.5, 127), NaN kept (max/min return their second operand on NaN).
    let x = _mm512_min_ps(
        _mm512_set1_ps(EXP2_MAX),
        _mm512_max_ps(_mm512_set1_ps(EXP2_MIN), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let r = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for &coef in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coef));
    }
    _mm512_scalef_ps(_mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0)), n)
}

/// 2^x for 8 floats with AVX2: [`exp_columns_avx2`]'s steps, the bits of
/// `exp2::<true>`. Inlined into AVX2 functions only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp2_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let round = _mm256_set1_ps(EXP_ROUND);
    // x.clamp(−125.5, 127), NaN kept (max/min return their second operand on NaN).
    let x = _mm256_min_ps(
        _mm256_set1_ps(EXP2_MAX),
        _mm256_max_ps(_mm256_set1_ps(EXP2_MIN), x),
    );
    let t = _mm256_add_ps(x, round);
    let r = _mm256_sub_ps(x, _mm256_sub_ps(t, round));
    let mut p = _mm256_set1_ps(EXP2_POLY[0]);
    for &coef in &EXP2_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coef));
    }
    let e = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
    let scale = _mm256_slli_epi32::<23>(_mm256_castps_si256(t));
    _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), scale))
}

/// dq [rows, d] = scale · dS [rows, len] · k [len, d] for [`backward`]
/// (`k_t` is kᵀ [d, len]): by dot products where d ≤ 8 and the CPU has
/// AVX2 or AVX-512, else by gemm as dqᵀ = scale · kᵀ · dSᵀ into `dq_t`
/// (scratch of d·rows floats) and transposed. Returns whether the dot
/// products ran.
///
/// The other products of the backward pass have len as the wide dimension
/// of their output; this one's output is only d wide. gemm computes it as
/// dqᵀ = kᵀ·dSᵀ with the block's 64 queries as the wide dimension, but
/// first gathers dS transposed, a [64, len] copy per block. With d = 8 the
/// copy costs more than the 8 columns of products it feeds, so there each
/// entry is instead a dot product of a row of dS and a row of kᵀ, both
/// read in place ([`ds_times_k_avx512`], [`ds_times_k_avx2`]). From d = 16
/// up gemm's way measured faster: the copy is shared by more columns, and
/// the dot products each end in a horizontal sum.
fn ds_times_k(
    dq: &mut [f32],
    ds: &[f32],
    k_t: &[f32],
    (rows, len, d): (usize, usize, usize),
    scale: f32,
    dq_t: &mut [f32],
) -> bool {
    assert!(dq.len() == rows * d && ds.len() == rows * len && k_t.len() == len * d);
    #[cfg(target_arch = "x86_64")]
    if d <= 8 {
        match crate::simd_level() {
            crate::SimdLevel::Avx512 => {
                // SAFETY: the CPU has AVX-512F (checked by simd_level); sizes asserted above.
                unsafe { ds_times_k_avx512(dq, ds, k_t, (rows, len, d), scale) };
                return true;
            }
            crate::SimdLevel::Avx2 => {
                // SAFETY: the CPU has AVX2 and FMA (checked by simd_level); sizes asserted above.
                unsafe { ds_times_k_avx2(dq, ds, k_t, (rows, len, d), scale) };
                return true;
            }
            crate::SimdLevel::Baseline => {}
        }
    }
    let dq_t = &mut dq_t[..d * rows];
    matmul(
        dq_t,
        d,
        rows,
        len,
        View::rows(k_t, len),
        View::transposed(ds, len),
        scale,
        false,
    );
    transpose_into(dq_t, rows, dq);
    false
}

/// dst [cols, rows] = srcᵀ, for src [rows, cols] row-major (rows =
/// src.len() / cols).
fn transpose_into(src: &[f32], cols: usize, dst: &mut [f32]) {
    let rows = src.len() / cols;
    for (i, row) in src.chunks_exact(cols).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            dst[j * rows + i] = x;
        }
    }
}

/// [`ds_times_k`] with AVX-512: tiles of 4 rows of dS by 4 rows of kᵀ
/// (16 sums in registers), 16 positions of len a step, the last step
/// masked (zeros). Each entry is scale times the sum of its 16 lanes, the
/// lanes summed as a tree: lane t + 8 onto lane t, then t + 4, t + 2,
/// t + 1 (what the test's scalar reference does).
///
/// # Safety
/// The CPU must have AVX-512F; dq holds rows·d floats, ds rows·len, k_t
/// d·len.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn ds_times_k_avx512(
    dq: &mut [f32],
    ds: &[f32],
    k_t: &[f32],
    (rows, len, d): (usize, usize, usize),
    scale: f32,
) {
    use std::arch::x86_64::*;
    let (dp, sp, kp) = (dq.as_mut_ptr(), ds.as_ptr(), k_t.as_ptr());
    let tail: __mmask16 = (1u32 << (len % 16)).wrapping_sub(1) as __mmask16;
    #[inline(always)]
    unsafe fn tile<const I: usize, const J: usize>(
        (dp, sp, kp): (*mut f32, *const f32, *const f32),
        (len, d): (usize, usize),
        (i0, j0): (usize, usize),
        tail: __mmask16,
        scale: f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); J]; I];
        let mut kv = [_mm512_setzero_ps(); J];
        let mut l = 0;
        while l + 16 <= len {
            for (j, kv) in kv.iter_mut().enumerate() {
                // SAFETY: row j0 + j < d of kᵀ, positions l .. l + 16 ≤ len.
                *kv = unsafe { _mm512_loadu_ps(kp.add((j0 + j) * len + l)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row i0 + i < rows of dS, positions l .. l + 16 ≤ len.
                let sv = unsafe { _mm512_loadu_ps(sp.add((i0 + i) * len + l)) };
                for (acc, &kv) in acc.iter_mut().zip(&kv) {
                    *acc = _mm512_fmadd_ps(sv, kv, *acc);
                }
            }
            l += 16;
        }
        if tail != 0 {
            for (j, kv) in kv.iter_mut().enumerate() {
                // SAFETY: the lanes of `tail` are positions l .. len of row j0 + j.
                *kv = unsafe { _mm512_maskz_loadu_ps(tail, kp.add((j0 + j) * len + l)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above, row i0 + i of dS.
                let sv = unsafe { _mm512_maskz_loadu_ps(tail, sp.add((i0 + i) * len + l)) };
                for (acc, &kv) in acc.iter_mut().zip(&kv) {
                    *acc = _mm512_fmadd_ps(sv, kv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &acc) in acc.iter().enumerate() {
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
                let h8 = _mm256_add_ps(_mm512_castps512_ps256(acc), hi);
                let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
                let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
                let h1 = _mm_add_ss(h2, _mm_movehdup_ps(h2));
                // SAFETY: entry (i0 + i, j0 + j) of dq [rows, d].
                unsafe { *dp.add((i0 + i) * d + j0 + j) = _mm_cvtss_f32(h1) * scale };
            }
        }
    }
    let ptrs = (dp, sp, kp);
    let mut i0 = 0;
    while i0 < rows {
        let mut j0 = 0;
        while j0 < d {
            // SAFETY: i0 < rows, j0 < d; the tile's rows and columns stay inside (conditions).
            unsafe {
                match (rows - i0 >= 4, d - j0 >= 4) {
                    (true, true) => tile::<4, 4>(ptrs, (len, d), (i0, j0), tail, scale),
                    (true, false) => tile::<4, 1>(ptrs, (len, d), (i0, j0), tail, scale),
                    (false, true) => tile::<1, 4>(ptrs, (len, d), (i0, j0), tail, scale),
                    (false, false) => tile::<1, 1>(ptrs, (len, d), (i0, j0), tail, scale),
                }
            }
            j0 += if d - j0 >= 4 { 4 } else { 1 };
        }
        i0 += if rows - i0 >= 4 { 4 } else { 1 };
    }
}

/// [`ds_times_k_avx512`] with AVX2: tiles of 4 rows of dS by 2 rows of kᵀ,
/// 8 positions a step, the 8 lanes summed as a tree (t + 4, t + 2, t + 1).
///
/// # Safety
/// The CPU must have AVX2 and FMA; dq holds rows·d floats, ds rows·len,
/// k_t d·len.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ds_times_k_avx2(
    dq: &mut [f32],
    ds: &[f32],
    k_t: &[f32],
    (rows, len, d): (usize, usize, usize),
    scale: f32,
) {
    use std::arch::x86_64::*;
    let (dp, sp, kp) = (dq.as_mut_ptr(), ds.as_ptr(), k_t.as_ptr());
    let rest = (len % 8) as i32;
    let tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    #[inline(always)]
    unsafe fn tile<const I: usize, const J: usize>(
        (dp, sp, kp): (*mut f32, *const f32, *const f32),
        (len, d): (usize, usize),
        (i0, j0): (usize, usize),
        tail: __m256i,
        scale: f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); J]; I];
        let mut kv = [_mm256_setzero_ps(); J];
        let mut l = 0;
        while l + 8 <= len {
            for (j, kv) in kv.iter_mut().enumerate() {
                // SAFETY: row j0 + j < d of kᵀ, positions l .. l + 8 ≤ len.
                *kv = unsafe { _mm256_loadu_ps(kp.add((j0 + j) * len + l)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row i0 + i < rows of dS, positions l .. l + 8 ≤ len.
                let sv = unsafe { _mm256_loadu_ps(sp.add((i0 + i) * len + l)) };
                for (acc, &kv) in acc.iter_mut().zip(&kv) {
                    *acc = _mm256_fmadd_ps(sv, kv, *acc);
                }
            }
            l += 8;
        }
        if l < len {
            for (j, kv) in kv.iter_mut().enumerate() {
                // SAFETY: the lanes of `tail` are positions l .. len of row j0 + j.
                *kv = unsafe { _mm256_maskload_ps(kp.add((j0 + j) * len + l), tail) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above, row i0 + i of dS.
                let sv = unsafe { _mm256_maskload_ps(sp.add((i0 + i) * len + l), tail) };
                for (acc, &kv) in acc.iter_mut().zip(&kv) {
                    *acc = _mm256_fmadd_ps(sv, kv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &acc) in acc.iter().enumerate() {
                let h4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
                let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
                let h1 = _mm_add_ss(h2, _mm_movehdup_ps(h2));
                // SAFETY: entry (i0 + i, j0 + j) of dq [rows, d].
                unsafe { *dp.add((i0 + i) * d + j0 + j) = _mm_cvtss_f32(h1) * scale };
            }
        }
    }
    let ptrs = (dp, sp, kp);
    let mut i0 = 0;
    while i0 < rows {
        let mut j0 = 0;
        while j0 < d {
            // SAFETY: i0 < rows, j0 < d; the tile's rows and columns stay inside (conditions).
            unsafe {
                match (rows - i0 >= 4, d - j0 >= 2) {
                    (true, true) => tile::<4, 2>(ptrs, (len, d), (i0, j0), tail, scale),
                    (true, false) => tile::<4, 1>(ptrs, (len, d), (i0, j0), tail, scale),
                    (false, true) => tile::<1, 2>(ptrs, (len, d), (i0, j0), tail, scale),
                    (false, false) => tile::<1, 1>(ptrs, (len, d), (i0, j0), tail, scale),
                }
            }
            j0 += if d - j0 >= 2 { 2 } else { 1 };
        }
        i0 += if rows - i0 >= 4 { 4 } else { 1 };
    }
}

/// Columns of the transposed score block handled at once by
/// [`softmax_columns`]: their running maxima and sums stay in registers
/// (one AVX-512 vector, two AVX2 ones) while the pass walks down the rows.
const COLS: usize = 16;

vectorised! {
    /// Softmax down the columns of `st` ([len, rows] row-major, rows =
    /// `maxes.len()`) in base 2, unnormalised: each column j becomes
    /// 2^(s − m_j), with its max m_j in `maxes` (0 where the column has no
    /// finite max) and its sum in `sums`. The scores come scaled by log₂ e
    /// (in the product that makes them), so these are e^(s' − m'_j) for the
    /// natural-log scores s' = s·ln 2: the softmax is the same. Blocks of
    /// 64 queries on AVX-512 take [`softmax_rows_avx512`].
    fn softmax_columns(st: &mut [f32], maxes: &mut [f32], sums: &mut [f32]) -> () {
        let rows = maxes.len();
        #[cfg(target_arch = "x86_64")]
        if let (true, crate::SimdLevel::Avx512, Ok(maxes), Ok(sums)) =
            (FMA, crate::simd_level(), maxes.try_into(), sums.try_into())
        {
            // SAFETY: the CPU has AVX-512F (checked by simd_level).
            unsafe { softmax_rows_avx512(st, maxes, sums) };
            return;
        }
        let mut c0 = 0;
        while c0 + COLS <= rows {
            // Four running maxima over interleaved rows: independent
            // chains instead of one max per row waiting on the last (the
            // max is exact, so the order does not change the result).
            let mut m4 = [[f32::NEG_INFINITY; COLS]; 4];
            let quads = st.chunks_exact(4 * rows);
            for row in quads.remainder().chunks_exact(rows) {
                let x: &[f32; COLS] = row[c0..c0 + COLS].try_into().unwrap();
                for l in 0..COLS {
                    m4[0][l] = if x[l] > m4[0][l] { x[l] } else { m4[0][l] };
                }
            }
            for quad in quads {
                for (k, m) in m4.iter_mut().enumerate() {
                    let x: &[f32; COLS] = quad[k * rows + c0..][..COLS].try_into().unwrap();
                    for l in 0..COLS {
                        m[l] = if x[l] > m[l] { x[l] } else { m[l] };
                    }
                }
            }
            let mut m = m4[0];
            for other in &m4[1..] {
                for l in 0..COLS {
                    m[l] = if other[l] > m[l] { other[l] } else { m[l] };
                }
            }
            for v in m.iter_mut() {
                if !v.is_finite() {
                    *v = 0.0;
                }
            }
            let mut s = [0f32; COLS];
            #[cfg(target_arch = "x86_64")]
            let done = FMA && match crate::simd_level() {
                crate::SimdLevel::Avx512 => {
                    // SAFETY: the CPU has AVX-512F (checked by simd_level).
                    unsafe { exp_columns_avx512(st, rows, c0, &m, &mut s) };
                    true
                }
                crate::SimdLevel::Avx2 => {
                    // SAFETY: the CPU has AVX2 and FMA (checked by simd_level).
                    unsafe { exp_columns_avx2(st, rows, c0, &m, &mut s) };
                    true
                }
                crate::SimdLevel::Baseline => false,
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            if !done {
                for row in st.chunks_exact_mut(rows) {
                    let x: &mut [f32; COLS] = (&mut row[c0..c0 + COLS]).try_into().unwrap();
                    for l in 0..COLS {
                        let e = exp2::<FMA>(x[l] - m[l]);
                        x[l] = e;
                        s[l] += e;
                    }
                }
            }
            maxes[c0..c0 + COLS].copy_from_slice(&m);
            sums[c0..c0 + COLS].copy_from_slice(&s);
            c0 += COLS;
        }
        // The last rows % COLS columns, one at a time.
        for c in c0..rows {
            let mut m = f32::NEG_INFINITY;
            for row in st.chunks_exact(rows) {
                m = if row[c] > m { row[c] } else { m };
            }
            let m = if m.is_finite() { m } else { 0.0 };
            let mut s = 0.0;
            for row in st.chunks_exact_mut(rows) {
                let e = exp2::<FMA>(row[c] - m);
                row[c] = e;
                s += e;
            }
            maxes[c] = m;
            sums[c] = s;
        }
    }
}

/// The exp pass of [`softmax_columns`] over columns c0 .. c0 + 16 of `st`
/// ([_, rows] row-major) with AVX-512: x ← 2^(x − m) and s += x, row by
/// row ([`exp2_avx512`]), with the same bits as the portable loop with
/// FMA (`exp2::<true>`): the same clamp, reduction and polynomial, n by
/// `roundscale` (what adding 1.5·2^23 does) and e·2^n by `scalef` (what
/// adding n to the exponent field does; the clamp keeps every result
/// normal). 15 vector operations per 16 values (19 with the natural-base
/// exp).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_columns_avx512(st: &mut [f32], rows: usize, c0: usize, m: &[f32; COLS], s: &mut [f32; COLS]) {
    use std::arch::x86_64::*;
    assert!(COLS == 16 && c0 + COLS <= rows && st.len().is_multiple_of(rows));
    let mv = _mm512_loadu_ps(m.as_ptr());
    let mut sum = _mm512_setzero_ps();
    let base = st.as_mut_ptr();
    for row in 0..st.len() / rows {
        // SAFETY: columns c0 .. c0 + 16 ≤ rows of row `row` (asserted above).
        let at = unsafe { base.add(row * rows + c0) };
        // SAFETY: as above.
        let y = unsafe { exp2_avx512(_mm512_sub_ps(_mm512_loadu_ps(at), mv)) };
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(at, y) };
        sum = _mm512_add_ps(sum, y);
    }
    // SAFETY: `s` holds 16 floats.
    unsafe { _mm512_storeu_ps(s.as_mut_ptr(), sum) };
}

/// [`softmax_columns`] with AVX-512 for a block of 64 queries (every
/// block but a sequence's last): both passes walk the rows in order, all
/// 64 columns (four vectors) at once, so they stream through `st` instead
/// of visiting it 16 columns at a time with a 256-byte stride (the loads
/// and stores of the strided pass were a third of its samples). The
/// same bits as the portable loop with FMA: each maximum is exact, and
/// each column's exps and sum are the same operations in the same order
/// as [`exp_columns_avx512`]'s.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows_avx512(st: &mut [f32], maxes: &mut [f32; 64], sums: &mut [f32; 64]) {
    use std::arch::x86_64::*;
    assert!(st.len().is_multiple_of(64));
    let len = st.len() / 64;
    let base = st.as_mut_ptr();
    // Maxima of even and odd rows (independent chains), then together.
    let mut m2 = [[_mm512_set1_ps(f32::NEG_INFINITY); 4]; 2];
    for row in 0..len {
        for (h, m) in m2[row % 2].iter_mut().enumerate() {
            // SAFETY: row < len and 16h + 16 ≤ 64: inside `st`.
            let x = unsafe { _mm512_loadu_ps(base.add(row * 64 + 16 * h)) };
            // x > m ? x : m, as the portable loop (a NaN score is passed over).
            *m = _mm512_max_ps(x, *m);
        }
    }
    for (h, (&odd, &even)) in m2[1].iter().zip(&m2[0]).enumerate() {
        let m = _mm512_max_ps(odd, even);
        // SAFETY: `maxes` holds 64 floats.
        unsafe { _mm512_storeu_ps(maxes.as_mut_ptr().add(16 * h), finite_or_zero_avx512(m)) };
    }
    // SAFETY: the caller's.
    unsafe { exp_rows_avx512(st, maxes, sums) };
}

/// m where it is finite, else 0: the max [`softmax_columns`] takes for a
/// column without a finite max (all −∞, or a +∞).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn finite_or_zero_avx512(m: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(m), _mm512_set1_ps(f32::INFINITY));
    _mm512_mask_blend_ps(finite, _mm512_setzero_ps(), m)
}

/// [`finite_or_zero_avx512`] with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn finite_or_zero_avx2(m: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), m);
    let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(abs, _mm256_set1_ps(f32::INFINITY));
    _mm256_blendv_ps(_mm256_setzero_ps(), m, finite)
}

/// The exp pass of [`softmax_rows_avx512`], given the 64 columns' maxima:
/// x ← 2^(x − m) row by row, all 64 columns at once, each column's sum in
/// `sums`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_rows_avx512(st: &mut [f32], maxes: &[f32; 64], sums: &mut [f32; 64]) {
    use std::arch::x86_64::*;
    assert!(st.len().is_multiple_of(64));
    let len = st.len() / 64;
    let base = st.as_mut_ptr();
    let zero = _mm512_setzero_ps();
    let m = maxes.as_ptr();
    // SAFETY: `maxes` holds 64 floats.
    let mv = unsafe {
        [
            _mm512_loadu_ps(m),
            _mm512_loadu_ps(m.add(16)),
            _mm512_loadu_ps(m.add(32)),
            _mm512_loadu_ps(m.add(48)),
        ]
    };
    let mut sum = [zero; 4];
    for row in 0..len {
        for (h, (sum, &mv)) in sum.iter_mut().zip(&mv).enumerate() {
            // SAFETY: row < len and 16h + 16 ≤ 64: inside `st`.
            let at = unsafe { base.add(row * 64 + 16 * h) };
            // SAFETY: as above.
            let y = unsafe { exp2_avx512(_mm512_sub_ps(_mm512_loadu_ps(at), mv)) };
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(at, y) };
            *sum = _mm512_add_ps(*sum, y);
        }
    }
    for (h, sum) in sum.iter().enumerate() {
        // SAFETY: `sums` holds 64 floats.
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add(16 * h), *sum) };
    }
}

/// [`exp_columns_avx512`] with AVX2: the 16 columns as two vectors, the
/// portable loop's steps one for one (n by adding and subtracting
/// 1.5·2^23, e·2^n by adding t's bits shifted to the exponent field:
/// (t − 1.5·2^23)'s bits << 23 are t's bits << 23, the constant's low
/// bits being zero), with the constants held in registers: the compiled
/// loop, short of registers for two vectors' worth, broadcast them from
/// memory again for every row.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_columns_avx2(st: &mut [f32], rows: usize, c0: usize, m: &[f32; COLS], s: &mut [f32; COLS]) {
    use std::arch::x86_64::*;
    assert!(COLS == 16 && c0 + COLS <= rows && st.len().is_multiple_of(rows));
    // SAFETY: `m` holds 16 floats.
    let mv = unsafe { [_mm256_loadu_ps(m.as_ptr()), _mm256_loadu_ps(m.as_ptr().add(8))] };
    let (lo, hi) = (_mm256_set1_ps(EXP2_MIN), _mm256_set1_ps(EXP2_MAX));
    let round = _mm256_set1_ps(EXP_ROUND);
    let one = _mm256_set1_ps(1.0);
    let poly = EXP2_POLY.map(|c| _mm256_set1_ps(c));
    let mut sum = [_mm256_setzero_ps(); 2];
    let base = st.as_mut_ptr();
    for row in 0..st.len() / rows {
        for (h, (sum, &mv)) in sum.iter_mut().zip(&mv).enumerate() {
            // SAFETY: columns c0 + 8h .. c0 + 8h + 8 ≤ rows of row `row` (asserted above).
            let at = unsafe { base.add(row * rows + c0 + 8 * h) };
            // SAFETY: as above.
            let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(at) }, mv);
            // x.clamp(−125.5, 127), NaN kept (max/min return their second operand on NaN).
            let x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
            let t = _mm256_add_ps(x, round);
            let r = _mm256_sub_ps(x, _mm256_sub_ps(t, round));
            let mut p = poly[0];
            for &coef in &poly[1..] {
                p = _mm256_fmadd_ps(p, r, coef);
            }
            let e = _mm256_fmadd_ps(p, r, one);
            let scale = _mm256_slli_epi32::<23>(_mm256_castps_si256(t));
            let y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), scale));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(at, y) };
            *sum = _mm256_add_ps(*sum, y);
        }
    }
    // SAFETY: `s` holds 16 floats.
    unsafe {
        _mm256_storeu_ps(s.as_mut_ptr(), sum[0]);
        _mm256_storeu_ps(s.as_mut_ptr().add(8), sum[1]);
    }
}

vectorised! {
    /// row ← 2^(row − shift).
    fn exp2_shifted(row: &mut [f32], shift: f32) -> () {
        for x in row.iter_mut() {
            *x = exp2::<FMA>(*x - shift);
        }
    }
}

vectorised! {
    /// dp ← p ⊙ (dp − delta).
    fn softmax_grad_row(dp: &mut [f32], p: &[f32], delta: f32) -> () {
        for (g, &p) in dp.iter_mut().zip(p) {
            *g = p * (*g - delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The column softmax (AVX-512's exp pass where the CPU has it; AVX2's,
    /// also run directly wherever the CPU has AVX2) against
    /// the same softmax written with the scalar `exp` of the tier that runs
    /// (with fused multiply-adds unless the tier is baseline): the same
    /// bits, on score blocks of the U-Net's lengths with 64 query columns,
    /// a partial last chunk of columns, scores far below the column max
    /// (clamped to e^−87.3) and a column of −∞ (max taken as 0).
    #[test]
    fn column_softmax_has_the_bits_of_the_scalar_exp() {
        let mut next = crate::test_util::uniform(7u32);
        let fma = crate::simd_level() != crate::SimdLevel::Baseline;
        for (len, rows) in [(784, 64), (196, 64), (49, 49), (9, 9), (130, 37)] {
            let mut st: Vec<f32> = (0..len * rows).map(|_| 24.0 * next()).collect();
            st[3 * rows + 1] = -150.0;
            if rows > 20 {
                for l in 0..len {
                    st[l * rows + 20] = f32::NEG_INFINITY;
                }
            }
            let mut expected = st.clone();
            let (mut max_ref, mut sum_ref) = (vec![0f32; rows], vec![0f32; rows]);
            for c in 0..rows {
                let m = (0..len)
                    .map(|l| st[l * rows + c])
                    .fold(f32::NEG_INFINITY, f32::max);
                let m = if m.is_finite() { m } else { 0.0 };
                let mut s = 0f32;
                for l in 0..len {
                    let x = st[l * rows + c] - m;
                    let e = if fma { exp2::<true>(x) } else { exp2::<false>(x) };
                    expected[l * rows + c] = e;
                    s += e;
                }
                (max_ref[c], sum_ref[c]) = (m, s);
            }
            // The AVX2 exp pass directly, on whole chunks of 16 columns
            // (a CPU with AVX-512 takes the AVX-512 pass below).
            #[cfg(target_arch = "x86_64")]
            if fma && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                let mut ours = st.clone();
                for c0 in (0..rows / COLS * COLS).step_by(COLS) {
                    let m: [f32; COLS] = max_ref[c0..c0 + COLS].try_into().unwrap();
                    let mut s = [0f32; COLS];
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { exp_columns_avx2(&mut ours, rows, c0, &m, &mut s) };
                    let (got, want): (Vec<u32>, Vec<u32>) = (0..len)
                        .flat_map(|l| (c0..c0 + COLS).map(move |c| l * rows + c))
                        .map(|i| (ours[i].to_bits(), expected[i].to_bits()))
                        .unzip();
                    assert_eq!(got, want, "{len}x{rows}: AVX2 probabilities, columns {c0}..");
                    let want_s: Vec<u32> = sum_ref[c0..c0 + COLS].iter().map(|x| x.to_bits()).collect();
                    assert_eq!(s.map(f32::to_bits).to_vec(), want_s, "{len}x{rows}: AVX2 sums");
                }
            }
            let (mut maxes, mut sums) = (vec![0f32; rows], vec![0f32; rows]);
            softmax_columns(&mut st, &mut maxes, &mut sums);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&maxes), bits(&max_ref), "{len}x{rows}: maxima");
            assert_eq!(bits(&sums), bits(&sum_ref), "{len}x{rows}: sums");
            assert_eq!(bits(&st), bits(&expected), "{len}x{rows}: probabilities");
        }
    }

    /// A block's scores and softmax by the fused AVX2 kernels (wherever the
    /// CPU has AVX2 and FMA) and AVX-512 ones (where it has AVX-512F)
    /// against gemm's product and `softmax_columns` held to the same tier:
    /// the same bits for the scores, maxima, sums and probabilities. Keys and queries in the layout `block_forward`
    /// holds them ([d, len], channel-major), the U-Net's lengths and widths
    /// and odd ones (key counts not a multiple of the 4-key tile; 64, the
    /// fewest a block of 64 queries has), a key
    /// with infinite entries (infinite and NaN scores, columns whose max
    /// is taken as 0) and scores far apart (exps clamped).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fused_scores_have_the_bits_of_gemm_and_the_column_softmax() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let mut next = crate::test_util::uniform(11u32);
        for (len, d, spread) in [
            (784, 16, 4.0),
            (784, 8, 4.0),
            (196, 32, 4.0),
            (70, 3, 60.0),
            (67, 5, 4.0),
            (64, 4, 4.0),
        ] {
            let (mut k_t, q_t): (Vec<f32>, Vec<f32>) = (
                (0..d * len).map(|_| spread * next()).collect(),
                (0..d * (len + 64)).map(|_| spread * next()).collect(),
            );
            if len > 10 && d >= 4 {
                // Key 9: infinite scores, and NaN where q's entries 2 and 3 share a sign.
                k_t[2 * len + 9] = f32::INFINITY;
                k_t[3 * len + 9] = f32::NEG_INFINITY;
            }
            let block = Block {
                k: View {
                    data: &k_t,
                    rs: 1,
                    cs: len,
                },
                q_t: View {
                    data: &q_t,
                    rs: len + 64,
                    cs: 1,
                },
                v_t: View::rows(&[], 0),
                len,
                rows: BLOCK,
                d,
            };
            let alpha = (d as f32).sqrt().recip() * std::f32::consts::LOG2_E;
            let mut want = vec![0f32; len * BLOCK];
            matmul(&mut want, len, BLOCK, d, block.k, block.q_t, alpha, false);
            let want_scores = want.clone();
            let (mut want_max, mut want_sum) = ([0f32; BLOCK], [0f32; BLOCK]);
            for c0 in (0..BLOCK).step_by(COLS) {
                // The AVX2 tier of softmax_columns, written out: its max
                // (exact, so any order) and exp_columns_avx2.
                let mut m = [f32::NEG_INFINITY; COLS];
                for row in want.chunks_exact(BLOCK) {
                    for (m, &x) in m.iter_mut().zip(&row[c0..c0 + COLS]) {
                        *m = if x > *m { x } else { *m };
                    }
                }
                let m = m.map(|m| if m.is_finite() { m } else { 0.0 });
                let mut s = [0f32; COLS];
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { exp_columns_avx2(&mut want, BLOCK, c0, &m, &mut s) };
                want_max[c0..c0 + COLS].copy_from_slice(&m);
                want_sum[c0..c0 + COLS].copy_from_slice(&s);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut scores = vec![0f32; len * BLOCK];
            let mut maxes = [0f32; BLOCK];
            // SAFETY: as above.
            unsafe { scores_avx2(&block, alpha, &mut scores, &mut maxes) };
            assert_eq!(bits(&scores), bits(&want_scores), "len {len}, d {d}: scores");
            assert_eq!(bits(&maxes), bits(&want_max), "len {len}, d {d}: maxima");
            let (mut st, mut maxes, mut sums) = (vec![0f32; len * BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
            // SAFETY: as above.
            unsafe { fused_softmax_avx2(&block, alpha, &mut st, &mut maxes, &mut sums) };
            assert_eq!(bits(&maxes), bits(&want_max), "len {len}, d {d}: maxima");
            assert_eq!(bits(&sums), bits(&want_sum), "len {len}, d {d}: sums");
            assert_eq!(bits(&st), bits(&want), "len {len}, d {d}: probabilities");
            // AVX-512: the same scores and maxima, and the probabilities and
            // sums of its own exp pass (`softmax_rows_avx512`'s).
            if std::is_x86_feature_detected!("avx512f") {
                let mut scores = vec![0f32; len * BLOCK];
                let mut maxes = [0f32; BLOCK];
                // SAFETY: the CPU has AVX-512F (checked just above).
                unsafe { scores_avx512(&block, alpha, &mut scores, &mut maxes) };
                assert_eq!(
                    bits(&scores),
                    bits(&want_scores),
                    "len {len}, d {d}: AVX-512 scores"
                );
                assert_eq!(bits(&maxes), bits(&want_max), "len {len}, d {d}: AVX-512 maxima");
                let (mut want, mut want_max, mut want_sum) =
                    (want_scores.clone(), [0f32; BLOCK], [0f32; BLOCK]);
                // SAFETY: as above.
                unsafe { softmax_rows_avx512(&mut want, &mut want_max, &mut want_sum) };
                let (mut st, mut maxes, mut sums) = (vec![0f32; len * BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
                // SAFETY: as above.
                unsafe { fused_softmax_avx512(&block, alpha, &mut st, &mut maxes, &mut sums) };
                assert_eq!(bits(&maxes), bits(&want_max), "len {len}, d {d}: AVX-512 maxima");
                assert_eq!(bits(&sums), bits(&want_sum), "len {len}, d {d}: AVX-512 sums");
                assert_eq!(bits(&st), bits(&want), "len {len}, d {d}: AVX-512 probabilities");
            }
            if len > 10 && d >= 4 {
                let (nan, inf) = (
                    want_scores.iter().filter(|x| x.is_nan()).count(),
                    want_scores.iter().filter(|x| x.is_infinite()).count(),
                );
                assert!(
                    nan > 0 && inf > 0,
                    "len {len}, d {d}: {nan} NaN and {inf} infinite scores"
                );
            }
        }
    }

    /// [`forward`] (whose whole blocks of 64 queries take the fused scores
    /// on a copied qᵀ) against the same attention through gemm and
    /// [`softmax_columns`] on qᵀ read in place, as `forward` made it
    /// before: the same bits of o and the log-sum-exp, for the U-Net's
    /// lengths (784 and 196: whole blocks and a partial last one) and 49
    /// (one partial block), with d = 16 and 8, on whichever tier runs.
    #[test]
    fn forward_has_the_bits_of_the_gemm_path() {
        let mut next = crate::test_util::uniform(11u32);
        for (batch, len, d) in [(2, 784, 16), (3, 196, 8), (2, 49, 16)] {
            let dims = Dims { batch, len, d };
            let n = batch * len * d;
            let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..n).map(|_| 3.0 * next()).collect(),
                (0..n).map(|_| 3.0 * next()).collect(),
                (0..n).map(|_| next()).collect(),
            );
            let (o, lse) = forward(&q, &k, &v, dims);
            let alpha = dims.scale() * std::f32::consts::LOG2_E;
            let (mut want_o, mut want_lse) = (vec![0f32; n], vec![0f32; batch * len]);
            for b in 0..batch {
                let seq = b * len * d..(b + 1) * len * d;
                let (q, k, v) = (&q[seq.clone()], &k[seq.clone()], &v[seq]);
                for start in (0..len).step_by(BLOCK) {
                    let rows = BLOCK.min(len - start);
                    let mut st = vec![0f32; len * rows];
                    matmul(
                        &mut st,
                        len,
                        rows,
                        d,
                        View::rows(k, d),
                        View::transposed(&q[start * d..], d),
                        alpha,
                        false,
                    );
                    let (mut maxes, mut sums) = (vec![0f32; rows], vec![0f32; rows]);
                    softmax_columns(&mut st, &mut maxes, &mut sums);
                    let mut ot = vec![0f32; d * rows];
                    matmul(
                        &mut ot,
                        d,
                        rows,
                        len,
                        View::transposed(v, d),
                        View::rows(&st, rows),
                        1.0,
                        false,
                    );
                    for i in 0..rows {
                        let r = b * len + start + i;
                        for j in 0..d {
                            want_o[r * d + j] = ot[j * rows + i] * (1.0 / sums[i]);
                        }
                        want_lse[r] = maxes[i] * std::f32::consts::LN_2 + sums[i].ln();
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o), bits(&want_o), "batch {batch}, len {len}, d {d}: o");
            assert_eq!(
                bits(&lse),
                bits(&want_lse),
                "batch {batch}, len {len}, d {d}: lse"
            );
        }
    }

    /// [`ds_times_k`]'s dot products against a scalar reference with the
    /// same order of operations (lane t of W sums positions t, t + W, … by
    /// fused multiply-adds from zero, zeros past the end; the lanes then
    /// summed as a tree, W/2 apart first): the same bits, for W = 16
    /// (AVX-512) and W = 8 (AVX2) wherever the CPU has them. Then against
    /// gemm's product, within 1e-5 of the sum of the terms' magnitudes:
    /// the dispatching function where it applies (d ≤ 8, AVX2 or AVX-512;
    /// checked that it does exactly there), elsewhere the reference with
    /// W = 1. Shapes: the U-Net's blocks (64 or a partial 16 or 4 queries,
    /// len 784, 196, 49, d 8 to 64), and tails in every dimension.
    #[test]
    fn ds_times_k_has_the_bits_of_its_scalar_reference() {
        let mut next = crate::test_util::uniform(5u32);
        let reference =
            |ds: &[f32], k_t: &[f32], (rows, len, d): (usize, usize, usize), scale: f32, w: usize| {
                let mut dq = vec![0f32; rows * d];
                for i in 0..rows {
                    for j in 0..d {
                        let mut lanes = vec![0f32; w];
                        for l0 in (0..len.div_ceil(w) * w).step_by(w) {
                            for (t, lane) in lanes.iter_mut().enumerate() {
                                let l = l0 + t;
                                let (a, b) = if l < len {
                                    (ds[i * len + l], k_t[j * len + l])
                                } else {
                                    (0.0, 0.0)
                                };
                                *lane = a.mul_add(b, *lane);
                            }
                        }
                        let mut n = w;
                        while n > 1 {
                            n /= 2;
                            for t in 0..n {
                                lanes[t] += lanes[t + n];
                            }
                        }
                        dq[i * d + j] = lanes[0] * scale;
                    }
                }
                dq
            };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for dims @ (rows, len, d) in [
            (64, 784, 16),
            (16, 784, 8),
            (64, 196, 32),
            (4, 196, 64),
            (64, 49, 64),
            (3, 9, 5),
            (6, 23, 7),
            (1, 1, 1),
        ] {
            let ds: Vec<f32> = (0..rows * len).map(|_| next()).collect();
            let k: Vec<f32> = (0..len * d).map(|_| next()).collect();
            let mut k_t = vec![0f32; d * len];
            transpose_into(&k, d, &mut k_t);
            let scale = 0.25;
            let mut ours = vec![0f32; rows * d];
            let taken = ds_times_k(&mut ours, &ds, &k_t, dims, scale, &mut vec![0f32; d * rows]);
            let simd = cfg!(target_arch = "x86_64") && crate::simd_level() != crate::SimdLevel::Baseline;
            assert_eq!(taken, d <= 8 && simd, "{dims:?}: taken");
            if !taken {
                ours.copy_from_slice(&reference(&ds, &k_t, dims, scale, 1));
            }
            let mut gemm = vec![0f32; rows * d];
            matmul(
                &mut gemm,
                rows,
                d,
                len,
                View::rows(&ds, len),
                View::rows(&k, d),
                scale,
                false,
            );
            for i in 0..rows {
                for j in 0..d {
                    let mass: f32 = (0..len).map(|l| (ds[i * len + l] * k[l * d + j]).abs()).sum();
                    let (a, b) = (ours[i * d + j], gemm[i * d + j]);
                    assert!(
                        (a - b).abs() <= 1e-5 * mass * scale,
                        "{dims:?} ({i}, {j}): {a} against gemm's {b}"
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    let mut dq = vec![0f32; rows * d];
                    // SAFETY: the CPU has AVX2 and FMA (checked just above); sizes as documented.
                    unsafe { ds_times_k_avx2(&mut dq, &ds, &k_t, dims, scale) };
                    assert_eq!(
                        bits(&dq),
                        bits(&reference(&ds, &k_t, dims, scale, 8)),
                        "{dims:?}: AVX2"
                    );
                }
                if std::is_x86_feature_detected!("avx512f") {
                    let mut dq = vec![0f32; rows * d];
                    // SAFETY: the CPU has AVX-512F (checked just above); sizes as documented.
                    unsafe { ds_times_k_avx512(&mut dq, &ds, &k_t, dims, scale) };
                    assert_eq!(
                        bits(&dq),
                        bits(&reference(&ds, &k_t, dims, scale, 16)),
                        "{dims:?}: AVX-512"
                    );
                }
            }
        }
    }

    /// [`rows_by_keys`] against what [`backward`] did before it: gemm's
    /// product, then [`exp2_shifted`] (P) or [`softmax_grad_row`] (dS) row
    /// by row (its exp with fused multiply-adds, as on these tiers). The
    /// same bits, on each tier the CPU has (AVX-512, AVX2) and
    /// through the dispatching function, for the U-Net's blocks (64 queries
    /// or a partial 16 or 4; len 784, 196, 49; d 8 to 64) and tails in
    /// every dimension, with shifts that push some exps below the clamp at
    /// 2^−125.5 and infinite and NaN products.
    #[test]
    fn rows_by_keys_has_the_bits_of_gemm_and_the_row_passes() {
        let mut next = crate::test_util::uniform(9u32);
        let same_bits = |got: &[f32], want: &[f32], what: String| {
            let differ: Vec<usize> = (0..want.len())
                .filter(|&i| got[i].to_bits() != want[i].to_bits())
                .collect();
            if let Some(&i) = differ.first() {
                panic!(
                    "{what}: {} entries differ, first at {i}: {} against {}",
                    differ.len(),
                    got[i],
                    want[i]
                );
            }
        };
        for (rows, len, d) in [
            (64, 784, 16),
            (16, 784, 8),
            (64, 196, 32),
            (4, 196, 32),
            (64, 49, 64),
            (3, 9, 5),
            (5, 70, 3),
            (1, 1, 1),
        ] {
            let blk = (rows, len, d);
            let a: Vec<f32> = (0..rows * d).map(|_| 6.0 * next()).collect();
            let mut b_t: Vec<f32> = (0..d * len).map(|_| 6.0 * next()).collect();
            if len > 10 && d >= 3 {
                // Position 9: infinite products, NaN where a's entries 1 and 2 share a sign.
                b_t[len + 9] = f32::INFINITY;
                b_t[2 * len + 9] = f32::NEG_INFINITY;
            }
            let c: Vec<f32> = (0..rows)
                .map(|i| if i % 3 == 0 { 200.0 } else { 8.0 * next() })
                .collect();
            let p: Vec<f32> = (0..rows * len).map(|_| next() + 0.5).collect();
            let alpha = 0.3;
            // P: gemm, then 2^(y − c_i).
            let mut want_p = vec![0f32; rows * len];
            matmul(
                &mut want_p,
                rows,
                len,
                d,
                View::rows(&a, d),
                View::rows(&b_t, len),
                alpha,
                false,
            );
            for (row, &c) in want_p.chunks_exact_mut(len).zip(&c) {
                // `exp2_shifted` on the AVX2 and AVX-512 tiers.
                row.iter_mut().for_each(|x| *x = exp2::<true>(*x - c));
            }
            // dS: gemm with α = 1, then p ⊙ (y − c_i).
            let mut want_ds = vec![0f32; rows * len];
            matmul(
                &mut want_ds,
                rows,
                len,
                d,
                View::rows(&a, d),
                View::rows(&b_t, len),
                1.0,
                false,
            );
            for (i, row) in want_ds.chunks_exact_mut(len).enumerate() {
                softmax_grad_row(row, &p[i * len..][..len], c[i]);
            }
            let run = |tier: &str, f: &dyn Fn(&mut [f32], bool)| {
                let mut got = vec![0f32; rows * len];
                f(&mut got, false);
                same_bits(&got, &want_p, format!("{blk:?} {tier}: P"));
                f(&mut got, true);
                same_bits(&got, &want_ds, format!("{blk:?} {tier}: dS"));
            };
            let simd = cfg!(target_arch = "x86_64") && crate::simd_level() != crate::SimdLevel::Baseline;
            let mut out = vec![0f32; rows * len];
            assert_eq!(
                rows_by_keys::<false>(&mut out, (&a, &b_t), blk, alpha, &c, &[]),
                simd
            );
            if simd {
                run("dispatched", &|out, grad| {
                    if grad {
                        rows_by_keys::<true>(out, (&a, &b_t), blk, 1.0, &c, &p);
                    } else {
                        rows_by_keys::<false>(out, (&a, &b_t), blk, alpha, &c, &[]);
                    }
                });
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above); sizes as documented.
                    run("AVX2", &|out, grad| unsafe {
                        if grad {
                            rows_by_keys_avx2::<true>(out, (&a, &b_t), blk, 1.0, &c, &p);
                        } else {
                            rows_by_keys_avx2::<false>(out, (&a, &b_t), blk, alpha, &c, &[]);
                        }
                    });
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above); sizes as documented.
                    run("AVX-512", &|out, grad| unsafe {
                        if grad {
                            rows_by_keys_avx512::<true>(out, (&a, &b_t), blk, 1.0, &c, &p);
                        } else {
                            rows_by_keys_avx512::<false>(out, (&a, &b_t), blk, alpha, &c, &[]);
                        }
                    });
                }
            }
            if len > 10 && d >= 3 {
                let (nan, tiny) = (
                    want_ds.iter().filter(|x| x.is_nan()).count(),
                    want_p.iter().filter(|&&x| x > 0.0 && x < 1e-37).count(),
                );
                assert!(nan > 0 && tiny > 0, "{blk:?}: {nan} NaN, {tiny} clamped exps");
            }
        }
    }
}
