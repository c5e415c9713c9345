//! Attention without the score matrix: softmax(q·kᵀ·s)·v computed block by
//! block of queries (FlashAttention's forward and backward, Dao 2022/2023),
//! with the matmuls on the `gemm` crate (the one Flex uses) and the softmax
//! on the vectorised row loops of this module's parent.
//!
//! A [batch, 784, 784] score matrix is 2.5 MB per image; written out (and,
//! for training, kept until the backward pass) it costs memory bandwidth
//! and page faults. Here each task holds one block of 64 query rows
//! (64 × 784 floats, 200 KB, in L2) and keeps only the log-sum-exp of each
//! row for the backward pass, which recomputes the block's probabilities.

use rayon::prelude::*;

use super::matmul::{matmul, View};
use super::{dot, exp, max, sum, vectorised};

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
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch, len, d } = dims;
    let per_seq = len * d;
    let mut o = vec![0f32; batch * per_seq];
    let mut lse = vec![0f32; batch * len];
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
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, (block, (o, lse))| {
                    let (start, rows) = (block * BLOCK, lse.len());
                    scores.resize(rows * len, 0.0);
                    let q_blk = View::rows(&q[start * d..], d);
                    matmul(
                        scores,
                        rows,
                        len,
                        d,
                        q_blk,
                        View::transposed(k, d),
                        dims.scale(),
                        false,
                    );
                    for (row, lse) in scores.chunks_exact_mut(len).zip(lse.iter_mut()) {
                        *lse = softmax_with_lse(row);
                    }
                    matmul(
                        o,
                        rows,
                        d,
                        len,
                        View::rows(scores, len),
                        View::rows(v, d),
                        1.0,
                        false,
                    );
                });
        });
    (o, lse)
}

/// Gradients (dq, dk, dv) of Σ dO ⊙ o with respect to q, k and v.
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
    let mut dq = vec![0f32; batch * per_seq];
    let mut dk = vec![0f32; batch * per_seq];
    let mut dv = vec![0f32; batch * per_seq];
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
            let mut p = vec![0f32; BLOCK.min(len) * len];
            let mut dp = vec![0f32; BLOCK.min(len) * len];
            let mut start = 0;
            while start < len {
                let rows = BLOCK.min(len - start);
                let (p, dp) = (&mut p[..rows * len], &mut dp[..rows * len]);
                let q_blk = View::rows(&q[start * d..], d);
                let do_blk = View::rows(&d_o[start * d..], d);
                // P = exp(q·kᵀ·scale − lse), recomputed.
                matmul(p, rows, len, d, q_blk, View::transposed(k, d), scale, false);
                for (i, row) in p.chunks_exact_mut(len).enumerate() {
                    exp_shifted(row, lse[start + i]);
                }
                // dv += Pᵀ·dO
                matmul(dv, len, d, rows, View::transposed(p, len), do_blk, 1.0, true);
                // dP = dO·vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ o)), in dp.
                matmul(dp, rows, len, d, do_blk, View::transposed(v, d), 1.0, false);
                for i in 0..rows {
                    let r = start + i;
                    let delta = dot(&d_o[r * d..][..d], &o[r * d..][..d]);
                    softmax_grad_row(&mut dp[i * len..][..len], &p[i * len..][..len], delta);
                }
                // dq = scale·dS·k; dk += scale·dSᵀ·q
                matmul(
                    &mut dq[start * d..],
                    rows,
                    d,
                    len,
                    View::rows(dp, len),
                    View::rows(k, d),
                    scale,
                    false,
                );
                matmul(dk, len, d, rows, View::transposed(dp, len), q_blk, scale, true);
                start += rows;
            }
        });
    (dq, dk, dv)
}

vectorised! {
    /// Softmax of `row` in place; returns its log-sum-exp.
    fn softmax_with_lse(row: &mut [f32]) -> f32 {
        let m = max(row);
        let m = if m.is_finite() { m } else { 0.0 };
        for x in row.iter_mut() {
            *x = exp(*x - m);
        }
        let total = sum(row);
        let inv = 1.0 / total;
        for x in row.iter_mut() {
            *x *= inv;
        }
        m + total.ln()
    }
}

vectorised! {
    /// row ← exp(row − shift).
    fn exp_shifted(row: &mut [f32], shift: f32) -> () {
        for x in row.iter_mut() {
            *x = exp(*x - shift);
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
