//! Helpers shared by the unit tests.

use burn::tensor::Tensor;

pub type TestBackend = burn::backend::Flex;

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor<TestBackend, 4>, b: &Tensor<TestBackend, 4>) -> f32 {
    let (a, b) = (
        a.clone().into_data().to_vec::<f32>().unwrap(),
        b.clone().into_data().to_vec::<f32>().unwrap(),
    );
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
