//! Helpers shared by the unit tests.

use burn::tensor::{Tensor, TensorData};

pub type TestBackend = burn::backend::Flex;

/// A tensor from f32 values.
pub fn tensor(values: &[f32], shape: [usize; 4]) -> Tensor<TestBackend, 4> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
}

/// Host copy of a tensor's values.
pub fn values(x: &Tensor<TestBackend, 4>) -> Vec<f32> {
    x.clone().into_data().to_vec::<f32>().unwrap()
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor<TestBackend, 4>, b: &Tensor<TestBackend, 4>) -> f32 {
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
