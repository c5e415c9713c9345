//! 3x3 convs (stride 1, padding 1, ungrouped) as Winograd F(2x2, 3x3)
//! (Lavin and Gray 2016): each 2x2 block of outputs comes from a 4x4
//! patch of the input through 16 products per channel pair instead of 36,
//! so the matrix products, most of a conv's work, do 16 multiply-adds
//! where im2col does 36: 2.25x fewer at 14x14, 1.7x at 7x7 (4x4 tiles
//! over 7x7 outputs), 1.3x at 3x3.
//!
//! With V = Bᵀ·d·B the transformed 4x4 input patch d of one channel and
//! U = G·g·Gᵀ the transformed 3x3 filter g (once per conv call), the
//! output block is Aᵀ·(Σ over input channels U ⊙ V)·A; the sum over input
//! channels is, for each of the 16 positions ξ of the 4x4 transform, one
//! matrix product M[ξ] [cout, tiles] = U[ξ] [cout, cin] · V[ξ] [cin, tiles]
//! over the tiles of a group of images. The transforms use only sums,
//! differences and halvings, so the rounding stays close to a direct
//! conv's (tested against a direct conv in f64, to 2e-6 of the largest
//! output, and against burn's conv, values and gradients, to 1e-5).

use super::conv::gather_into;
use super::matmul::{matmul, View};
use super::{grown, par_new_chunks, vectorised};

/// Floats of transformed input held at once (16·channels·tiles): the
/// products run over slices of input channels this size, so V stays in
/// the core's cache between its transform and its products. Each slice
/// after the first reads and writes all of M again (16·cout·tiles, 1.5 MB
/// for 192 outputs of 128 tiles), so fewer, larger slices pay: 512 KB
/// (half of a 1 MB L2) against 256 KB measured 8-15% faster on the convs
/// with 64 to 128 input channels at batch 81 and sampling 2-3% faster (6
/// alternating pairs, 2-core Intel Xeon family 6 model 167); 1 MB was no
/// faster again.
const V_SLICE: usize = 128 * 1024;

/// A 3x3 conv, stride 1, padding 1, cin → cout channels on h×w images,
/// with its transformed filters.
#[derive(Debug, Clone)]
pub(crate) struct Winograd {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    /// Tiles down and across: ⌈h/2⌉, ⌈w/2⌉.
    th: usize,
    tw: usize,
    /// U [cout, 16, cin]: position ξ = 4·i + j of every transformed
    /// filter (U[ξ] is the [cout, cin] matrix at stride 16·cin).
    u: Vec<f32>,
    /// The four columns c of the tiles' patches, row by row of the padded
    /// plane, the even rows apart from the odd ones: at ((2·c + py mod 2)·
    /// (th + 1) + ⌊py/2⌋)·tw + tx, the index in the input plane of padded
    /// row py, column 2·tx + c, or h·w (a zero after the plane) in the
    /// padding. A patch's 4x4 values are rows 2·ty to 2·ty + 3 of these, so
    /// each padded row's values are gathered once, not twice (8·(th + 1)·tw
    /// values, not 16·th·tw: 448 for 784 at 14x14).
    patch: Vec<u32>,
    /// For each output position of a plane, its index in the tiles'
    /// outputs [4, tiles] ([`output_transform`]).
    place: Vec<u32>,
}

/// Buffers one task of [`Winograd::run`] reuses from call to call.
#[derive(Default)]
pub(crate) struct WinogradScratch {
    /// An input plane and a zero.
    plane: Vec<f32>,
    /// The patches' columns ([`Winograd::patch`]), then their transform
    /// along the rows, in the same layout.
    d: Vec<f32>,
    rows: Vec<f32>,
    /// The output transform's rows [8, n] and results [4, n] for the n
    /// tiles of the task's images.
    s: Vec<f32>,
    y: Vec<f32>,
    /// V [16, channels of a slice, tiles of the task's images].
    v: Vec<f32>,
    /// M [16, cout, tiles of the task's images].
    m: Vec<f32>,
    /// [`Winograd::place`] for outputs [4, n].
    place: Vec<u32>,
}

impl Winograd {
    /// The conv of inputs [_, cin, h, w] with the weight `ws` [cout, cin, 3, 3].
    pub fn new(cin: usize, cout: usize, [h, w]: [usize; 2], ws: &[f32]) -> Self {
        // In parallel over output channels: once per conv call, and on the
        // calling thread alone it held up the other cores.
        let (u, _) = par_new_chunks(cout * 16 * cin, 16 * cin, |co, u| {
            for ci in 0..cin {
                let g = &ws[(co * cin + ci) * 9..][..9];
                // t = G·g [4, 3], then U = t·Gᵀ [4, 4], with
                // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
                let mut t = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                    t[0][j] = g0;
                    t[1][j] = (g0 + g1 + g2) * 0.5;
                    t[2][j] = (g0 - g1 + g2) * 0.5;
                    t[3][j] = g2;
                }
                for (i, t) in t.iter().enumerate() {
                    let row = [t[0], (t[0] + t[1] + t[2]) * 0.5, (t[0] - t[1] + t[2]) * 0.5, t[2]];
                    for (j, value) in row.into_iter().enumerate() {
                        u[(i * 4 + j) * cin + ci] = value;
                    }
                }
            }
        });
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        let index = |v: usize| u32::try_from(v).expect("plane below 2^32 values");
        let mut patch = vec![0u32; 8 * (th + 1) * tw];
        for c in 0..4 {
            for py in 0..2 * (th + 1) {
                for tx in 0..tw {
                    // Padded row py is input row py − 1, padded column
                    // 2·tx + c input column 2·tx + c − 1.
                    let y = py.checked_sub(1).filter(|&y| y < h);
                    let x = (2 * tx + c).checked_sub(1).filter(|&x| x < w);
                    let at = match (y, x) {
                        (Some(y), Some(x)) => y * w + x,
                        _ => h * w,
                    };
                    patch[((2 * c + py % 2) * (th + 1) + py / 2) * tw + tx] = index(at);
                }
            }
        }
        let place = (0..h * w)
            .map(|p| {
                let (y, x) = (p / w, p % w);
                index((2 * (y % 2) + x % 2) * tiles + (y / 2) * tw + x / 2)
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

    /// Tiles (2x2 output blocks) of one image.
    pub fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// out [images, cout, h, w] = conv(xs [images, cin, h, w]) + bias.
    pub fn run(&self, xs: &[f32], bias: Option<&[f32]>, s: &mut WinogradScratch, out: &mut [f32]) {
        let Winograd { cin, cout, h, w, .. } = *self;
        let (hw, tiles) = (h * w, self.tiles());
        let images = out.len() / (cout * hw);
        let n = images * tiles;
        let plane = grown(&mut s.plane, hw + 1);
        plane[hw] = 0.0;
        let (d, rows) = (
            grown(&mut s.d, self.patch.len()),
            grown(&mut s.rows, self.patch.len()),
        );
        let slice = (V_SLICE / (16 * n).max(1)).clamp(1, cin.max(1));
        let v = grown(&mut s.v, 16 * slice * n);
        let m = grown(&mut s.m, 16 * cout * n);
        for c0 in (0..cin).step_by(slice) {
            let k = slice.min(cin - c0);
            for img in 0..images {
                for c in 0..k {
                    plane[..hw].copy_from_slice(&xs[(img * cin + c0 + c) * hw..][..hw]);
                    // SAFETY: every index of `patch` is at most h·w (built
                    // in `new`), and the plane has h·w + 1 values.
                    unsafe { gather_into(d, plane, &self.patch) };
                    input_transform(d, self.th, self.tw, rows, &mut v[c * n + img * tiles..], k * n);
                }
            }
            for xi in 0..16 {
                // M[ξ] (+)= U[ξ][:, c0 .. c0 + k] · V[ξ]
                let lhs = View {
                    data: &self.u[xi * cin + c0..],
                    rs: 16 * cin,
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
        // Y for every tile of every image at once per output channel (one
        // image at a time, 16 tiles at 7x7, the passes were too short to
        // pay for themselves: 14% of a 7x7 conv), then each image's planes
        // put in place from y [4, n].
        let (st, y) = (grown(&mut s.s, 8 * n), grown(&mut s.y, 4 * n));
        s.place.clear();
        s.place.extend(self.place.iter().map(|&at| {
            let (q, tile) = (at as usize / tiles, at as usize % tiles);
            u32::try_from(q * n + tile).expect("below 2^32 values")
        }));
        for co in 0..cout {
            output_transform(&m[co * n..], cout * n, n, st, y);
            let bias = bias.map_or(0.0, |bs| bs[co]);
            for img in 0..images {
                let dst = &mut out[(img * cout + co) * hw..][..hw];
                // SAFETY: every index of `s.place` is at most 3·n + tiles − 1
                // (`self.place`'s are below 4·tiles), below the 4·n −
                // img·tiles values from img·tiles on since (img + 1)·tiles ≤ n.
                unsafe { gather_into(dst, &y[img * tiles..], &s.place) };
                add_bias(dst, bias);
            }
        }
    }
}

vectorised! {
    /// V = Bᵀ·d·B for all th·tw tiles of a plane at once, from `d`, the
    /// patches' columns ([`Winograd::patch`]), with Bᵀ = [[1, 0, −1, 0],
    /// [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]: position ξ goes to
    /// `v[ξ·stride..][..th·tw]`. Every step is a pass over all the padded
    /// rows' or all the tiles' values, so it runs in full vectors (one tile
    /// at a time, with its 4x4 patch read value by value, this took more
    /// time than the products).
    fn input_transform(d: &[f32], th: usize, tw: usize, rows: &mut [f32], v: &mut [f32], stride: usize) -> () {
        let (len, t) = ((th + 1) * tw, th * tw);
        // Along the rows first, h = d·B, for the even and the odd padded
        // rows: column j of every padded row's tiles at rows[(2·j + parity)·len..].
        for parity in 0..2 {
            let col = |c: usize| &d[(2 * c + parity) * len..][..len];
            let (d0, d1, d2, d3) = (col(0), col(1), col(2), col(3));
            let (h01, h23) = rows[..8 * len].split_at_mut(4 * len);
            let (h0, h1) = h01.split_at_mut(2 * len);
            let (h2, h3) = h23.split_at_mut(2 * len);
            let (h0, h1, h2, h3) = (
                &mut h0[parity * len..][..len],
                &mut h1[parity * len..][..len],
                &mut h2[parity * len..][..len],
                &mut h3[parity * len..][..len],
            );
            for i in 0..len {
                h0[i] = d0[i] - d2[i];
                h1[i] = d1[i] + d2[i];
                h2[i] = d2[i] - d1[i];
                h3[i] = d1[i] - d3[i];
            }
        }
        // Then down the columns, V = Bᵀ·h: tile (ty, tx)'s patch rows are
        // the even and odd padded rows ty and ty + 1, tw values apart.
        for j in 0..4 {
            let even = &rows[2 * j * len..][..len];
            let odd = &rows[(2 * j + 1) * len..][..len];
            let (e0, e1, o0, o1) = (&even[..t], &even[tw..][..t], &odd[..t], &odd[tw..][..t]);
            let (v0, rest) = v[j * stride..].split_at_mut(4 * stride);
            let (v1, rest) = rest.split_at_mut(4 * stride);
            let (v2, v3) = rest.split_at_mut(4 * stride);
            let (v0, v1, v2, v3) = (&mut v0[..t], &mut v1[..t], &mut v2[..t], &mut v3[..t]);
            for i in 0..t {
                v0[i] = e0[i] - e1[i];
                v1[i] = o0[i] + e1[i];
                v2[i] = e1[i] - o0[i];
                v3[i] = o0[i] - o1[i];
            }
        }
    }
}

vectorised! {
    /// The four outputs of every tile of one plane, Y = Aᵀ·M·A with
    /// Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]], into `y` [4, t] (output
    /// (dy, dx) of tile i at `y[(2·dy + dx)·t + i]`), from position ξ of
    /// tile i at `m[ξ·stride + i]`; passes over the tiles, as
    /// [`input_transform`].
    fn output_transform(m: &[f32], stride: usize, t: usize, s: &mut [f32], y: &mut [f32]) -> () {
        let at = |i: usize, c: usize| &m[(i * 4 + c) * stride..][..t];
        // Rows: s = Aᵀ·M [2, 4], at s[(r·4 + c)·t..].
        let (s0, s1) = s[..8 * t].split_at_mut(4 * t);
        for c in 0..4 {
            let (m0, m1, m2, m3) = (at(0, c), at(1, c), at(2, c), at(3, c));
            let (s0, s1) = (&mut s0[c * t..][..t], &mut s1[c * t..][..t]);
            for i in 0..t {
                s0[i] = m0[i] + m1[i] + m2[i];
                s1[i] = m1[i] - m2[i] - m3[i];
            }
        }
        // Columns: Y = s·A.
        for (r, s) in [&*s0, &*s1].into_iter().enumerate() {
            let col = |c: usize| &s[c * t..][..t];
            let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
            let (y0, y1) = y[2 * r * t..][..2 * t].split_at_mut(t);
            for i in 0..t {
                y0[i] = c0[i] + c1[i] + c2[i];
                y1[i] = c1[i] - c2[i] - c3[i];
            }
        }
    }
}

vectorised! {
    /// out[k] += bias.
    fn add_bias(out: &mut [f32], bias: f32) -> () {
        for o in out.iter_mut() {
            *o += bias;
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

    /// Against a direct conv in f64 on odd and even sizes (7x7: the last
    /// tiles half outside; 3x3; 6x6; 1x1; 7x10 and 10x5, planes not
    /// square), several images per call and (140 channels at 14x14, 4
    /// images) input channels in four slices: within 2e-6 of the largest
    /// output. (A transform with one sign flipped is off by whole units; a
    /// patch column bounded by h instead of w, by 3 of 4.5 at 7x10.)
    #[test]
    fn matches_a_direct_conv() {
        for &[images, cin, cout, h, w] in &[
            [3, 5, 4, 7, 7],
            [2, 3, 6, 3, 3],
            [2, 4, 3, 6, 6],
            [1, 2, 2, 1, 1],
            [2, 5, 3, 7, 10],
            [1, 3, 2, 10, 5],
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
                worst <= 2e-6 * scale,
                "{images}x{cin}→{cout} at {h}x{w}: off by {worst} (scale {scale})"
            );
        }
    }
}
