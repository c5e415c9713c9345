//! The fixed sinusoidal time table (not a trained parameter).

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// The reference's time table, computed in f64 and stored as f32:
/// `num_steps + 1` rows of width `dim`. Row r encodes position p = r + 1;
/// for k = 1..=dim/2 the frequency is w_k = (1e-4)^(2k/dim), column 2k − 2
/// holds sin(w_k·p) and column 2k − 1 holds cos(w_k·p).
pub fn time_table_values(num_steps: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity((num_steps + 1) * dim);
    for r in 0..=num_steps {
        let p = (r + 1) as f64;
        for col in 0..dim {
            let k = (col / 2 + 1) as f64;
            let w = 1e-4_f64.powf(2.0 * k / dim as f64);
            out.push(if col % 2 == 0 {
                (w * p).sin()
            } else {
                (w * p).cos()
            } as f32);
        }
    }
    out
}

/// The table as a device tensor, shape [num_steps + 1, dim]. Held as a plain
/// tensor field of the U-Net, so burn treats it as a constant: it is not a
/// parameter, gets no gradient and is not saved (it is rebuilt by `init`).
pub fn time_table<B: Backend>(num_steps: usize, dim: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(time_table_values(num_steps, dim), [num_steps + 1, dim]),
        device,
    )
}

/// Looks up row t of the table for each sample: `[B]` → `[B, dim]`.
pub fn lookup<B: Backend>(table: &Tensor<B, 2>, t: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    table.clone().select(0, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_values_match_the_formula() {
        let dim = 112;
        let v = time_table_values(500, dim);
        assert_eq!(v.len(), 501 * dim);
        // Row 0 is position 1; column 0 is sin(w_1), w_1 = 1e-4^(2/112).
        let w1 = 1e-4_f64.powf(2.0 / 112.0);
        assert!((v[0] as f64 - w1.sin()).abs() < 1e-7);
        assert!((v[1] as f64 - w1.cos()).abs() < 1e-7);
        // Row 249 (t = 249, position 250), columns 10 and 11: k = 6.
        let w6 = 1e-4_f64.powf(12.0 / 112.0);
        assert!((v[249 * dim + 10] as f64 - (w6 * 250.0).sin()).abs() < 1e-6);
        assert!((v[249 * dim + 11] as f64 - (w6 * 250.0).cos()).abs() < 1e-6);
        // Row 500 (position 501), last column: k = 56, w = 1e-4.
        assert!((v[500 * dim + 111] as f64 - (1e-4_f64 * 501.0).cos()).abs() < 1e-7);
        // Hand-checked values: sin(w_1) with w_1 = 0.848342898 is 0.7501857
        assert!((w1 - 0.848_342_898_244_072).abs() < 1e-12);
        assert!((v[0] - 0.750_185_7).abs() < 1e-6, "{}", v[0]);
    }
}
