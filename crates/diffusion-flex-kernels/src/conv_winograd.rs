//! 3x3 convs (stride 1, padding 1, ungrouped) as Winograd F(4x4, 3x3)
//! (Lavin and Gray 2016): each 4x4 block of outputs comes from a 6x6
//! patch of the input through 36 products per channel pair instead of
//! 144, so the matrix products, most of a conv's work, do 36 multiply-adds
//! where im2col does 144: 3.1x fewer at 14x14 (16 tiles over 196 outputs)
//! and at 7x7 (4 tiles over 49). F(2x2, 3x3), which this replaced, did 16
//! per 2x2 block: 784 at 14x14 and 256 at 7x7 where this does 576 and 144.
//!
//! With V = Bᵀ·d·B the transformed 6x6 input patch d of one channel and
//! U = G·g·Gᵀ the transformed 3x3 filter g (once per conv call), the
//! output block is Aᵀ·(Σ over input channels U ⊙ V)·A; the sum over input
//! channels is, for each of the 36 positions ξ of the 6x6 transform, one
//! matrix product M\[ξ\] [cout, tiles] = U\[ξ\] [cout, cin] · V\[ξ\] [cin, tiles]
//! over the tiles of a group of images.
//!
//! The matrices come from the interpolation points 0, −1, 1, ½, −2 and ∞
//! (Cook–Toom, as Lavin and Gray build theirs), not the usual 0, ±1, ±2,
//! ∞: the usual set's Bᵀ and Aᵀ scale values by up to 5 and 8 against
//! G's 1/24, and at 7x7 and 14x14 with 64 to 192 channels its f32 results
//! were off by 5.5e-6 to 8.1e-6 of the largest output (against an f64
//! direct conv); these points, 2.0e-6 to 2.8e-6 (F(2x2, 3x3): 3.6e-7 to
//! 5.9e-7). Bᵀ and Aᵀ hold only halves, quarters, eighths and small
//! integers, exact in binary; U is computed in f64 and rounded once.

use super::conv::gather_into;
use super::matmul::{matmul, View};
use super::{grown, madd, par_new_chunks, vectorised};

/// Outputs per tile side (m), input patch side (m + 2), transform
/// positions ((m + 2)²).
const M: usize = 4;
const P: usize = 6;
const XI: usize = P * P;

/// Bᵀ [6, 6] for the points 0, −1, 1, ½, −2, ∞: V = Bᵀ·d·B. The kernels
/// apply it through its rows written out ([`bt_times`]), which the tests
/// check against it.
#[cfg_attr(not(test), allow(dead_code))]
const BT: [[f32; P]; P] = [
    [1.0, -1.5, -2.0, 1.5, 1.0, 0.0],
    [0.0, 1.0, -2.5, 0.5, 1.0, 0.0],
    [0.0, -1.0, 0.5, 2.5, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 0.5, -1.0, -0.5, 1.0, 0.0],
    [0.0, 1.0, -1.5, -2.0, 1.5, 1.0],
];

/// G [6, 3] (f64; U is rounded to f32 once): U = G·g·Gᵀ.
const G: [[f64; 3]; P] = [
    [1.0, 0.0, 0.0],
    [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
    [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
    [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
    [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// Aᵀ [4, 6]: Y = Aᵀ·M·A, applied as [`at_times`].
#[cfg_attr(not(test), allow(dead_code))]
const AT: [[f32; P]; M] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.5, -2.0, 0.0],
    [0.0, 1.0, 1.0, 0.25, 4.0, 0.0],
    [0.0, -1.0, 1.0, 0.125, -8.0, 1.0],
];

/// Floats of transformed input held at once (36·channels·tiles): the
/// products run over slices of input channels this size, so V stays in
/// the core's cache between its transform and its products. Each slice
/// after the first reads and writes all of M again (36·cout·tiles), so
/// fewer, larger slices pay: 512 KB (half of a 1 MB L2) against 256 KB
/// measured 8-15% faster on the convs with 64 to 128 input channels at
/// batch 81 and sampling 2-3% faster (6 alternating pairs, 2-core Intel
/// Xeon family 6 model 167, F(2x2, 3x3)); 1 MB was no faster again.
const V_SLICE: usize = 128 * 1024;

/// A 3x3 conv, stride 1, padding 1, cin → cout channels on h×w images,
/// with its transformed filters.
#[derive(Debug, Clone)]
pub(crate) struct Winograd {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    /// Tiles down and across: ⌈h/4⌉, ⌈w/4⌉.
    th: usize,
    tw: usize,
    /// U [cout, 36, cin]: position ξ = 6·i + j of every transformed
    /// filter (U\[ξ\] is the [cout, cin] matrix at stride 36·cin).
    u: Vec<f32>,
    /// The six columns c of the tiles' patches, row by row of the padded
    /// plane, the rows sorted by their remainder mod 4: at ((4·c + py mod
    /// 4)·(th + 1) + ⌊py/4⌋)·tw + tx, the index in the input plane of
    /// padded row py, column 4·tx + c, or h·w (a zero after the plane) in
    /// the padding. A patch's 6x6 values are rows 4·ty to 4·ty + 5 of
    /// these, so each padded row's values are gathered once, not twice,
    /// and for each of the six rows of a patch the tiles' values lie
    /// together (24·(th + 1)·tw values: 480 at 14x14).
    patch: Vec<u32>,
    /// For each output position of a plane, its index in the tiles'
    /// outputs [16, tiles] ([`output_transform`]).
    place: Vec<u32>,
}

/// Buffers one task of [`Winograd::run`] reuses from call to call.
#[derive(Default)]
pub(crate) struct WinogradScratch {
    /// One input channel's planes of every image of the task, and a zero.
    plane: Vec<f32>,
    /// [`Winograd::patch`] for all the task's images at once: each padded
    /// row's tiles image after image (a row of images·tw values), indices
    /// into `plane`; built, with `place`, for (h, w, images) = `patch_for`.
    patch: Vec<u32>,
    patch_for: (usize, usize, usize),
    /// The patches' columns ([`Winograd::patch`]), then their transform
    /// along the rows, in the same layout.
    d: Vec<f32>,
    rows: Vec<f32>,
    /// The output transform's results [16, n] for the n tiles of the
    /// task's images.
    y: Vec<f32>,
    /// V [36, channels of a slice, tiles of the task's images].
    v: Vec<f32>,
    /// M [36, cout, tiles of the task's images].
    m: Vec<f32>,
    /// [`Winograd::place`] for outputs [16, n] in the column order of
    /// `patch` (built with it).
    place: Vec<u32>,
}

impl Winograd {
    /// The conv of inputs [_, cin, h, w] with the weight `ws` [cout, cin, 3, 3].
    pub fn new(cin: usize, cout: usize, [h, w]: [usize; 2], ws: &[f32]) -> Self {
        // In parallel over output channels: once per conv call, and on the
        // calling thread alone it held up the other cores.
        let (u, _) = par_new_chunks(cout * XI * cin, XI * cin, |co, u| {
            for ci in 0..cin {
                let g = &ws[(co * cin + ci) * 9..][..9];
                // t = G·g [6, 3], then U = t·Gᵀ [6, 6], in f64.
                let mut t = [[0f64; 3]; P];
                for (t, gr) in t.iter_mut().zip(&G) {
                    for (j, t) in t.iter_mut().enumerate() {
                        *t = (0..3).map(|k| gr[k] * f64::from(g[3 * k + j])).sum();
                    }
                }
                for (i, t) in t.iter().enumerate() {
                    for (j, gr) in G.iter().enumerate() {
                        let value: f64 = (0..3).map(|k| t[k] * gr[k]).sum();
                        u[(i * P + j) * cin + ci] = value as f32;
                    }
                }
            }
        });
        let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
        let tiles = th * tw;
        let index = |v: usize| u32::try_from(v).expect("plane below 2^32 values");
        let mut patch = vec![0u32; P * M * (th + 1) * tw];
        for c in 0..P {
            for py in 0..M * (th + 1) {
                for tx in 0..tw {
                    // Padded row py is input row py − 1, padded column
                    // 4·tx + c input column 4·tx + c − 1.
                    let y = py.checked_sub(1).filter(|&y| y < h);
                    let x = (M * tx + c).checked_sub(1).filter(|&x| x < w);
                    let at = match (y, x) {
                        (Some(y), Some(x)) => y * w + x,
                        _ => h * w,
                    };
                    patch[((M * c + py % M) * (th + 1) + py / M) * tw + tx] = index(at);
                }
            }
        }
        let place = (0..h * w)
            .map(|p| {
                let (y, x) = (p / w, p % w);
                index((M * (y % M) + x % M) * tiles + (y / M) * tw + x / M)
            })
            .collect();
        Winograd {
            cin,
            cout,
            h,
            w,
            th,
            tw,
            u,
            patch,
            place,
        }
    }

    /// Tiles (4x4 output blocks) of one image.
    pub fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// out [images, cout, h, w] = conv(xs [images, cin, h, w]) + bias.
    pub fn run(&self, xs: &[f32], bias: Option<&[f32]>, s: &mut WinogradScratch, out: &mut [f32]) {
        let Winograd { cin, cout, h, w, .. } = *self;
        let (hw, tiles) = (h * w, self.tiles());
        let images = out.len() / (cout * hw);
        let n = images * tiles;
        // The tiles of all images lie row of tiles by row of tiles: column
        // (ty·images + img)·tw + tx of V, M and y, so each pass of the
        // transforms runs over every image's tiles at once (one plane of
        // 7x7 has only 4 tiles, a quarter of a vector).
        let wide = images * self.tw;
        if s.patch_for != (h, w, images) {
            s.patch.clear();
            s.patch.resize(self.patch.len() * images, 0);
            for (row, at) in self.patch.chunks_exact(self.tw).enumerate() {
                for img in 0..images {
                    for (tx, &at) in at.iter().enumerate() {
                        let at = at as usize;
                        let at = if at < hw { img * hw + at } else { images * hw };
                        s.patch[row * wide + img * self.tw + tx] =
                            u32::try_from(at).expect("below 2^32 values");
                    }
                }
            }
            s.place.clear();
            s.place.extend(self.place.iter().map(|&at| {
                let (q, tile) = (at as usize / tiles, at as usize % tiles);
                let (ty, tx) = (tile / self.tw, tile % self.tw);
                u32::try_from(q * n + ty * wide + tx).expect("below 2^32 values")
            }));
            s.patch_for = (h, w, images);
        }
        let plane = grown(&mut s.plane, images * hw + 1);
        plane[images * hw] = 0.0;
        let (d, rows) = (grown(&mut s.d, s.patch.len()), grown(&mut s.rows, s.patch.len()));
        let slice = (V_SLICE / (XI * n).max(1)).clamp(1, cin.max(1));
        let v = grown(&mut s.v, XI * slice * n);
        let m = grown(&mut s.m, XI * cout * n);
        for c0 in (0..cin).step_by(slice) {
            let k = slice.min(cin - c0);
            for c in 0..k {
                for img in 0..images {
                    plane[img * hw..][..hw].copy_from_slice(&xs[(img * cin + c0 + c) * hw..][..hw]);
                }
                // SAFETY: every index of `s.patch` is at most images·h·w
                // (built above from `patch`'s, at most h·w), and the
                // planes have images·h·w + 1 values.
                unsafe { gather_into(d, plane, &s.patch) };
                input_transform(d, self.th, wide, rows, &mut v[c * n..], k * n);
            }
            for xi in 0..XI {
                // M[ξ] (+)= U[ξ][:, c0 .. c0 + k] · V[ξ]
                let lhs = View {
                    data: &self.u[xi * cin + c0..],
                    rs: XI * cin,
                    cs: 1,
                };
                let rhs = View::rows(&v[xi * k * n..][..k * n], n);
                matmul(
                    &mut m[xi * cout * n..][..cout * n],
                    cout,
                    n,
                    k,
                    lhs,
                    rhs,
                    1.0,
                    c0 > 0,
                );
            }
        }
        // Y (+ bias) for every tile of every image at once per output
        // channel, then each image's planes put in place from y [16, n].
        let y = grown(&mut s.y, M * M * n);
        for co in 0..cout {
            output_transform(&m[co * n..], cout * n, n, bias.map_or(0.0, |bs| bs[co]), y);
            for img in 0..images {
                let dst = &mut out[(img * cout + co) * hw..][..hw];
                // SAFETY: every index of `s.place` is at most 15·n +
                // (th − 1)·images·tw + tw − 1 (`self.place`'s are below
                // 16·tiles), so from img·tw on, img < images, below 16·n.
                unsafe { gather_into(dst, &y[img * self.tw..], &s.place) };
            }
        }
    }
}

/// Bᵀ·x for one column x of six values, written out ([`BT`]; the test
/// `rows_written_out_are_the_matrices` checks one against the other).
#[inline(always)]
fn bt_times<const FMA: bool>([x0, x1, x2, x3, x4, x5]: [f32; P]) -> [f32; P] {
    [
        madd::<FMA>(1.5, x3 - x1, madd::<FMA>(-2.0, x2, x0 + x4)),
        madd::<FMA>(0.5, x3, madd::<FMA>(-2.5, x2, x1 + x4)),
        madd::<FMA>(2.5, x3, madd::<FMA>(0.5, x2, x4 - x1)),
        madd::<FMA>(2.0, x3 - x1, x4 - x2),
        madd::<FMA>(0.5, x1 - x3, x4 - x2),
        madd::<FMA>(1.5, x4 - x2, madd::<FMA>(-2.0, x3, x1 + x5)),
    ]
}

/// Aᵀ·x for one column x of six values, written out ([`AT`]).
#[inline(always)]
fn at_times<const FMA: bool>([x0, x1, x2, x3, x4, x5]: [f32; P]) -> [f32; M] {
    let (sum, diff) = (x1 + x2, x2 - x1);
    [
        x0 + sum + (x3 + x4),
        madd::<FMA>(0.5, x3, madd::<FMA>(-2.0, x4, diff)),
        madd::<FMA>(0.25, x3, madd::<FMA>(4.0, x4, sum)),
        madd::<FMA>(0.125, x3, madd::<FMA>(-8.0, x4, diff + x5)),
    ]
}

/// Values a step of [`combine`] and [`output_transform`] take: one
/// AVX-512 vector, two AVX2 ones.
const L: usize = 16;

/// dst\[to\[j\] + i\] = f(src[at[·] + i])\[j\] for every i < len: one pass over
/// the values, six inputs and `J` outputs at a time, [`L`] values a step
/// in fixed-size arrays, which the compiler turns into vectors (an index
/// loop over six slices stayed scalar, and arrays of six slices built per
/// pass cost more than the passes on 7x7 planes).
#[inline(always)]
fn combine<const J: usize>(
    f: impl Fn([f32; P]) -> [f32; J],
    src: &[f32],
    at: [usize; P],
    dst: &mut [f32],
    to: [usize; J],
    len: usize,
) {
    let whole = len / L * L;
    for base in (0..whole).step_by(L) {
        combine_step(&f, src, at, dst, to, base, L);
    }
    if whole < len {
        combine_step(&f, src, at, dst, to, whole, len - whole);
    }
}

/// [`combine`] for the `n` ≤ [`L`] values from `base` on.
#[inline(always)]
fn combine_step<const J: usize>(
    f: &impl Fn([f32; P]) -> [f32; J],
    src: &[f32],
    at: [usize; P],
    dst: &mut [f32],
    to: [usize; J],
    base: usize,
    n: usize,
) {
    let mut x = [[0f32; L]; P];
    for (x, &at) in x.iter_mut().zip(&at) {
        x[..n].copy_from_slice(&src[at + base..][..n]);
    }
    let mut r = [[0f32; L]; J];
    for l in 0..L {
        let y = f([x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]]);
        for j in 0..J {
            r[j][l] = y[j];
        }
    }
    for (r, &to) in r.iter().zip(&to) {
        dst[to + base..][..n].copy_from_slice(&r[..n]);
    }
}

/// [0, gap, 2·gap, …] + first.
fn offsets<const J: usize>(first: usize, gap: usize) -> [usize; J] {
    let mut at = [first; J];
    for (j, at) in at.iter_mut().enumerate() {
        *at += j * gap;
    }
    at
}

vectorised! {
    /// V = Bᵀ·d·B for all th·tw tiles of a plane (or of the planes laid
    /// side by side as one) at once, from `d`, the patches' columns
    /// ([`Winograd::patch`]): position ξ goes to `v[ξ·stride..][..th·tw]`.
    /// Every step is a pass over all the padded rows' or all the tiles'
    /// values, so it runs in full vectors (one tile at a time, with its
    /// patch read value by value, took more time than the products).
    fn input_transform(d: &[f32], th: usize, tw: usize, rows: &mut [f32], v: &mut [f32], stride: usize) -> () {
        let (len, t) = (M * (th + 1) * tw, th * tw);
        // Along the rows first, h = d·B: column j of every padded row's
        // tiles at rows[j·len..], in the layout of `d`.
        combine(bt_times::<FMA>, d, offsets(0, len), rows, offsets(0, len), len);
        // Then down the columns, V = Bᵀ·h: row k of tile (ty, tx)'s patch
        // is padded row 4·ty + k, at class k mod 4, row ty + ⌊k/4⌋.
        let mut at = [0; P];
        for (k, at) in at.iter_mut().enumerate() {
            *at = ((k % M) * (th + 1) + k / M) * tw;
        }
        for j in 0..P {
            combine(bt_times::<FMA>, &rows[j * len..], at, v, offsets(j * stride, P * stride), t);
        }
    }
}

/// [`output_transform`] for the `n` ≤ [`L`] tiles from `base` on.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_step<const FMA: bool>(
    m: &[f32],
    stride: usize,
    t: usize,
    bias: f32,
    y: &mut [f32],
    base: usize,
    n: usize,
) {
    // Down the columns: s[r][c] = (Aᵀ·M)[r][c].
    let mut s = [[[0f32; L]; P]; M];
    for c in 0..P {
        let mut x = [[0f32; L]; P];
        for (i, x) in x.iter_mut().enumerate() {
            x[..n].copy_from_slice(&m[(i * P + c) * stride + base..][..n]);
        }
        for l in 0..L {
            let col = at_times::<FMA>([x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]]);
            for r in 0..M {
                s[r][c][l] = col[r];
            }
        }
    }
    // Along the rows: Y = s·A.
    for (r, s) in s.iter().enumerate() {
        let mut out = [[0f32; L]; M];
        for l in 0..L {
            let row = at_times::<FMA>([s[0][l], s[1][l], s[2][l], s[3][l], s[4][l], s[5][l]]);
            for q in 0..M {
                out[q][l] = row[q] + bias;
            }
        }
        for (q, out) in out.iter().enumerate() {
            y[(M * r + q) * t + base..][..n].copy_from_slice(&out[..n]);
        }
    }
}

vectorised! {
    /// The 16 outputs of every tile, Y = Aᵀ·M·A + bias, into `y` [16, t]
    /// (output (dy, dx) of tile i at `y[(4·dy + dx)·t + i]`), from
    /// position ξ of tile i at `m[ξ·stride + i]`: [`L`] tiles a step, the
    /// 36 values in, the 4x6 intermediate and the 16 out held in arrays
    /// (registers), not written back between the two halves.
    fn output_transform(m: &[f32], stride: usize, t: usize, bias: f32, y: &mut [f32]) -> () {
        let whole = t / L * L;
        for base in (0..whole).step_by(L) {
            output_step::<FMA>(m, stride, t, bias, y, base, L);
        }
        if whole < t {
            output_step::<FMA>(m, stride, t, bias, y, whole, t - whole);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each output of a direct 3x3 conv (padding 1) in f64.
    fn direct(xs: &[f32], ws: &[f32], bias: &[f32], [images, cin, cout, h, w]: [usize; 5]) -> Vec<f64> {
        let mut out = vec![0f64; images * cout * h * w];
        for img in 0..images {
            for co in 0..cout {
                for y in 0..h {
                    for x in 0..w {
                        let mut acc = f64::from(bias[co]);
                        for ci in 0..cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (y as isize + i as isize - 1, x as isize + j as isize - 1);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = xs[((img * cin + ci) * h + iy as usize) * w + ix as usize];
                                    acc += f64::from(xv) * f64::from(ws[((co * cin + ci) * 3 + i) * 3 + j]);
                                }
                            }
                        }
                        out[((img * cout + co) * h + y) * w + x] = acc;
                    }
                }
            }
        }
        out
    }

    /// The written-out rows of [`bt_times`] and [`at_times`] are the
    /// matrices [`BT`] and [`AT`]: applied to each unit vector e_c they
    /// give column c, exactly (every entry is a small dyadic number).
    #[test]
    fn rows_written_out_are_the_matrices() {
        for c in 0..P {
            let mut e = [0f32; P];
            e[c] = 1.0;
            for (fma, bt, at) in [
                (true, bt_times::<true>(e), at_times::<true>(e)),
                (false, bt_times::<false>(e), at_times::<false>(e)),
            ] {
                for j in 0..P {
                    assert_eq!(bt[j], BT[j][c], "Bᵀ[{j}][{c}] (FMA {fma})");
                }
                for j in 0..M {
                    assert_eq!(at[j], AT[j][c], "Aᵀ[{j}][{c}] (FMA {fma})");
                }
            }
        }
    }

    /// U = G·g·Gᵀ, V = Bᵀ·d·B and Aᵀ·(U ⊙ V)·A is the 3x3 correlation of
    /// a 6x6 patch d with g (4x4 outputs), in f64: the matrices are a
    /// Winograd triple (a wrong entry in any of them breaks this by whole
    /// units, where the f32 test above allows 3e-6).
    #[test]
    fn the_matrices_compute_a_correlation() {
        let d: Vec<f64> = (0..36).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
        let g: Vec<f64> = (0..9).map(|i| ((i * 5 % 7) as f64 - 3.0) / 2.0).collect();
        let bt = |i: usize, k: usize| f64::from(BT[i][k]);
        let mut u = [[0f64; P]; P];
        let mut v = [[0f64; P]; P];
        for i in 0..P {
            for j in 0..P {
                u[i][j] = (0..3)
                    .flat_map(|a| (0..3).map(move |b| (a, b)))
                    .map(|(a, b)| G[i][a] * g[3 * a + b] * G[j][b])
                    .sum();
                v[i][j] = (0..P)
                    .flat_map(|a| (0..P).map(move |b| (a, b)))
                    .map(|(a, b)| bt(i, a) * d[6 * a + b] * bt(j, b))
                    .sum();
            }
        }
        for y in 0..M {
            for x in 0..M {
                let mut wino = 0f64;
                for i in 0..P {
                    for j in 0..P {
                        wino += f64::from(AT[y][i]) * u[i][j] * v[i][j] * f64::from(AT[x][j]);
                    }
                }
                let direct: f64 = (0..3)
                    .flat_map(|a| (0..3).map(move |b| (a, b)))
                    .map(|(a, b)| d[6 * (y + a) + x + b] * g[3 * a + b])
                    .sum();
                assert!(
                    (wino - direct).abs() < 1e-12,
                    "output ({y}, {x}): {wino} vs {direct}"
                );
            }
        }
    }

    /// Against a direct conv in f64 on odd and even sizes (7x7, 6x6, 10x5,
    /// 14x14: the last tiles partly outside; 8x8: whole tiles; 3x3 and
    /// 1x1: one tile; 7x10 and 4x13, planes not square), several images
    /// per call and (140 channels at 14x14, 4 images: 64 tiles) input
    /// channels in three slices: within 3e-6 of the largest output (these
    /// cases land at 7e-8 to 1.2e-6; F(2x2, 3x3) was held to 2e-6). (A transform with one sign flipped is off by whole units; a
    /// patch column bounded by h instead of w, by 3 of 4.5 at 7x10.)
    #[test]
    fn matches_a_direct_conv() {
        for &[images, cin, cout, h, w] in &[
            [3, 5, 4, 7, 7],
            [2, 3, 6, 3, 3],
            [2, 4, 3, 6, 6],
            [2, 6, 5, 8, 8],
            [1, 2, 2, 1, 1],
            [2, 5, 3, 7, 10],
            [1, 3, 2, 10, 5],
            [1, 4, 3, 4, 13],
            [4, 140, 9, 14, 14],
        ] {
            let value = |i: usize, k: usize| (((i * 37 + k * 11) % 23) as f32 - 11.0) / 7.0;
            let xs: Vec<f32> = (0..images * cin * h * w).map(|i| value(i, 1)).collect();
            let ws: Vec<f32> = (0..cout * cin * 9).map(|i| value(i, 2) / 5.0).collect();
            let bias: Vec<f32> = (0..cout).map(|i| value(i, 3)).collect();
            let conv = Winograd::new(cin, cout, [h, w], &ws);
            let mut out = vec![f32::NAN; images * cout * h * w];
            let mut scratch = WinogradScratch::default();
            conv.run(&xs, Some(&bias), &mut scratch, &mut out);
            let expected = direct(&xs, &ws, &bias, [images, cin, cout, h, w]);
            let scale = expected.iter().fold(1f64, |a, &b| a.max(b.abs()));
            let worst = out
                .iter()
                .zip(&expected)
                .map(|(&o, &e)| (f64::from(o) - e).abs())
                .fold(0f64, f64::max);
            assert!(
                worst <= 3e-6 * scale,
                "{images}x{cin}→{cout} at {h}x{w}: off by {worst} (scale {scale})"
            );
        }
    }
}
