//! Direct 3x3 (any kh×kw) convolution for convs with few output channels,
//! on AVX-512: the U-Net's narrowing convs at 28x28 (48→16, 32→24, 24→8,
//! 8→3, 3→1).
//!
//! Through `gemm`, the shifted products of such a conv spend most of
//! their time packing: each of the kh·kw products copies the whole
//! [cin, positions] input into gemm's panels and then does only cout
//! multiply-adds per copied float (a third of the time of 24→8 at 28x28
//! was packing, measured with `perf`). Here every output channel's sums
//! for 16 positions stay in registers while the loop runs over input
//! channels and taps: one load of 16 inputs feeds cout multiply-adds
//! (each with its weight broadcast from memory), nothing is packed and
//! nothing but the result is stored.

/// Output channels up to which [`Narrow`] applies: 8 channels × 2 rows
/// of accumulators and 8 broadcast weights fill 24 of AVX-512's 32
/// vector registers. (With 16 or 24 channels in one row, loading each
/// weight inside its multiply-add, it measured slower than gemm for
/// 48→16 and no faster for 32→24.)
pub(crate) const MAX_COUT: usize = 8;

/// A conv's weight [cout, cin, kh, kw] reordered for [`Narrow::run`]:
/// [cin, kh, kw, C] with the output channels innermost, zero-padded to C
/// (the accumulator count the kernel is compiled for).
#[derive(Debug, Clone)]
pub(crate) struct Narrow {
    weights: Vec<f32>,
    cout: usize,
    lanes: usize,
}

impl Narrow {
    /// The kernel for `cout` ≤ [`MAX_COUT`] output channels on a CPU with
    /// AVX-512F; None otherwise (the caller keeps its gemm path).
    pub fn new(ws: &[f32], [cout, cin, kh, kw]: [usize; 4]) -> Option<Narrow> {
        if cout == 0 || cout > MAX_COUT || crate::simd_level() != crate::SimdLevel::Avx512 {
            return None;
        }
        let lanes = [4, 8].into_iter().find(|&c| c >= cout)?;
        let taps = kh * kw;
        let mut weights = vec![0f32; cin * taps * lanes];
        for (k, dst) in weights.chunks_exact_mut(lanes).enumerate() {
            // k = ci·taps + tap; dst[co] = ws[co, ci, tap].
            for (co, d) in dst.iter_mut().take(cout).enumerate() {
                *d = ws[co * cin * taps + k];
            }
        }
        Some(Narrow { weights, cout, lanes })
    }

    /// out [cout, ho, wo] = bias + Σ_ci Σ_ij W[:, ci, i, j] · input[ci, y + i, x + j]
    /// over `padded`: cin planes of `plane` floats each, rows of `row`
    /// floats (the input with its zero borders).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        padded: &[f32],
        [cin, plane, row]: [usize; 3],
        [kh, kw]: [usize; 2],
        bias: Option<&[f32]>,
        out: &mut [f32],
        [ho, wo]: [usize; 2],
    ) {
        assert!(row >= wo + kw - 1 && plane >= (ho + kh - 1) * row && padded.len() >= cin * plane);
        assert!(self.weights.len() == cin * kh * kw * self.lanes && out.len() == self.cout * ho * wo);
        let geometry = Geometry {
            cin,
            plane,
            row,
            kh,
            kw,
            ho,
            wo,
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `new` returned Some only on a CPU with AVX-512F; the
        // asserts above keep every access inside the slices.
        unsafe {
            match self.lanes {
                4 => narrow_avx512::<4, 4>(padded, &self.weights, bias, out, self.cout, geometry),
                _ => narrow_avx512::<8, 2>(padded, &self.weights, bias, out, self.cout, geometry),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("Narrow::new returns None off x86-64");
    }
}

#[derive(Clone, Copy)]
struct Geometry {
    cin: usize,
    plane: usize,
    row: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

/// [`Narrow::run`] with C ≥ cout output channels (zero weights past
/// cout) for R output rows at once: for each chunk of 16 columns (masked
/// for the last, narrower one) the R·C sums start at the bias and take
/// every (ci, i, j) in order; each weight is broadcast once and feeds the
/// R rows.
///
/// # Safety
/// The CPU must have AVX-512F; the slices must hold what
/// [`Narrow::run`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn narrow_avx512<const C: usize, const R: usize>(
    padded: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    cout: usize,
    g: Geometry,
) {
    use std::arch::x86_64::*;
    let (src, wts, dst) = (padded.as_ptr(), weights.as_ptr(), out.as_mut_ptr());
    let mut start = [0f32; C];
    if let Some(bias) = bias {
        start[..cout].copy_from_slice(&bias[..cout]);
    }
    let mut y0 = 0;
    while y0 < g.ho {
        let rows = (g.ho - y0).min(R);
        for x0 in (0..g.wo).step_by(16) {
            let n = (g.wo - x0).min(16);
            let mask = ((1u32 << n) - 1) as __mmask16;
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for row in acc.iter_mut() {
                for (a, &b) in row.iter_mut().zip(&start) {
                    *a = _mm512_set1_ps(b);
                }
            }
            for ci in 0..g.cin {
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let mut w = [_mm512_setzero_ps(); C];
                        // SAFETY: entry (ci, i, j) of the reordered weights, C floats.
                        let wp = unsafe { wts.add(((ci * g.kh + i) * g.kw + j) * C) };
                        for (c, w) in w.iter_mut().enumerate() {
                            // SAFETY: c < C.
                            *w = _mm512_set1_ps(unsafe { *wp.add(c) });
                        }
                        for (r, acc) in acc.iter_mut().enumerate() {
                            // Rows past the last output row read nothing.
                            let y = if r < rows { y0 + r } else { y0 };
                            // SAFETY: row y + i < ho + kh − 1 of plane ci; columns
                            // x0 + j .. x0 + j + n ≤ wo + kw − 1 ≤ row (masked
                            // lanes are not read).
                            let v = unsafe {
                                _mm512_maskz_loadu_ps(mask, src.add(ci * g.plane + (y + i) * g.row + x0 + j))
                            };
                            for (a, &w) in acc.iter_mut().zip(&w) {
                                *a = _mm512_fmadd_ps(v, w, *a);
                            }
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                for (c, a) in acc.iter().enumerate().take(cout) {
                    // SAFETY: channel c < cout, row y0 + r < ho, columns x0 .. x0 + n ≤ wo.
                    unsafe { _mm512_mask_storeu_ps(dst.add((c * g.ho + y0 + r) * g.wo + x0), mask, *a) };
                }
            }
        }
        y0 += rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against the conv summed in f64, on zero-padded planes as
    /// `Ungrouped::run_shifted` lays them out: every channel count up to
    /// [`MAX_COUT`] (both accumulator widths, unused lanes), partial row
    /// groups, masked column tails and a 3x5 kernel. Nothing to compare
    /// on a CPU without AVX-512F.
    #[test]
    fn narrow_kernel_matches_the_sum() {
        if crate::simd_level() != crate::SimdLevel::Avx512 {
            eprintln!("skipped: this CPU runs the gemm path instead (no AVX-512F)");
            return;
        }
        let mut next = crate::test_util::uniform(12345u32);
        for (cin, cout, [h, w], [kh, kw], [ph, pw]) in [
            (24, 8, [28, 28], [3, 3], [1, 1]),
            (8, 3, [28, 28], [3, 3], [1, 1]),
            (3, 1, [28, 28], [3, 3], [1, 1]),
            (5, 6, [13, 21], [3, 5], [1, 2]),
            (2, 2, [9, 17], [3, 3], [0, 0]),
        ] {
            let (hp, wp) = (h + 2 * ph, w + 2 * pw);
            let (ho, wo) = (hp - kh + 1, wp - kw + 1);
            let plane = hp * wp + kw;
            let x: Vec<f32> = (0..cin * h * w).map(|_| next()).collect();
            let ws: Vec<f32> = (0..cout * cin * kh * kw).map(|_| next()).collect();
            let bias: Vec<f32> = (0..cout).map(|_| next()).collect();
            let mut padded = vec![0f32; cin * plane];
            for ci in 0..cin {
                for y in 0..h {
                    let at = ci * plane + (y + ph) * wp + pw;
                    padded[at..at + w].copy_from_slice(&x[(ci * h + y) * w..][..w]);
                }
            }
            let narrow = Narrow::new(&ws, [cout, cin, kh, kw]).expect("cout ≤ MAX_COUT on AVX-512");
            let mut out = vec![f32::NAN; cout * ho * wo];
            narrow.run(
                &padded,
                [cin, plane, wp],
                [kh, kw],
                Some(&bias),
                &mut out,
                [ho, wo],
            );
            let mut worst = 0f64;
            for co in 0..cout {
                for y in 0..ho {
                    for xo in 0..wo {
                        let mut exact = bias[co] as f64;
                        for ci in 0..cin {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (iy, ix) =
                                        ((y + i) as isize - ph as isize, (xo + j) as isize - pw as isize);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        let xv = x[(ci * h + iy as usize) * w + ix as usize] as f64;
                                        exact += ws[((co * cin + ci) * kh + i) * kw + j] as f64 * xv;
                                    }
                                }
                            }
                        }
                        // An output never written is still NaN: count it as infinitely off.
                        let diff = (out[(co * ho + y) * wo + xo] as f64 - exact).abs();
                        worst = worst.max(if diff.is_nan() { f64::INFINITY } else { diff });
                    }
                }
            }
            // Each output sums cin·kh·kw products of magnitude ≤ 1/4 in f32.
            assert!(worst < 1e-5, "{cin}→{cout} at {h}x{w}: off by {worst:e}");
        }
    }
}
