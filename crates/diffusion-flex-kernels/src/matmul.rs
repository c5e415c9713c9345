//! Single-threaded f32 matrix products on slices through the `gemm` crate
//! (the kernel Flex's own matmul uses); callers parallelise over tasks.

use gemm::{gemm, Parallelism};

/// A strided matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }
    pub(crate) fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len(),
                "matrix view out of bounds"
            );
        }
    }
}

/// dst (row-major m×n) = [dst +] scale·(lhs (m×k) · rhs (k×n)).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    scale: f32,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n);
    lhs.check(m, k);
    rhs.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every index gemm touches lies inside the slices (checked
    // above); dst does not alias lhs or rhs (it is a distinct &mut).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
