//! A small LeNet-style digit classifier: the judge of sample quality.
//!
//! conv 5x5 (1 → 32) → ReLU → max-pool 2 → conv 5x5 (32 → 64) → ReLU →
//! max-pool 2 → Linear (64·7·7 → 128) → ReLU → Linear (128 → classes).
//! The 128 ReLU outputs are the features the Fréchet distance compares.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// Builds a [`Classifier`].
#[derive(Config, Debug)]
pub struct ClassifierConfig {
    /// Channels of the input images (1 for grey-scale).
    #[config(default = 1)]
    pub image_channels: usize,
    /// Height and width of the (square) input images.
    #[config(default = 28)]
    pub image_size: usize,
    /// Number of output classes (logits).
    #[config(default = 10)]
    pub num_classes: usize,
    /// Width of the penultimate (feature) layer.
    #[config(default = 128)]
    pub features: usize,
}

/// See the module docs.
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    /// Conv 5x5, image channels → 32, padding 2.
    pub conv1: Conv2d<B>,
    /// Conv 5x5, 32 → 64, padding 2.
    pub conv2: Conv2d<B>,
    /// 2x2 max-pool with stride 2, used after each conv.
    pub pool: MaxPool2d,
    /// Linear(64·(size/4)² → features).
    pub fc1: Linear<B>,
    /// Linear(features → classes): the logits.
    pub fc2: Linear<B>,
}

impl ClassifierConfig {
    /// Creates the classifier on `device` with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Classifier<B> {
        let pad = PaddingConfig2d::Explicit(2, 2, 2, 2);
        let flat = 64 * (self.image_size / 4) * (self.image_size / 4);
        Classifier {
            conv1: Conv2dConfig::new([self.image_channels, 32], [5, 5])
                .with_padding(pad.clone())
                .init(device),
            conv2: Conv2dConfig::new([32, 64], [5, 5]).with_padding(pad).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(flat, self.features).init(device),
            fc2: LinearConfig::new(self.features, self.num_classes).init(device),
        }
    }
}

impl<B: Backend> Classifier<B> {
    /// Penultimate-layer features.
    ///
    /// # Shapes
    /// `x`: [B, C, H, W] in [−1, 1]; returns [B, features].
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.pool.forward(relu(self.conv1.forward(x))); // [B, 32, H/2, W/2]
        let x = self.pool.forward(relu(self.conv2.forward(x))); // [B, 64, H/4, W/4]
        let x: Tensor<B, 2> = x.flatten(1, 3);
        relu(self.fc1.forward(x))
    }

    /// Class logits from features: [B, features] → [B, classes].
    pub fn logits_from_features(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(features)
    }

    /// Class logits: [B, C, H, W] → [B, classes].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.logits_from_features(self.features(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestBackend;

    #[test]
    fn shapes() {
        let device = Default::default();
        let c = ClassifierConfig::new().init::<TestBackend>(&device);
        let x = Tensor::<TestBackend, 4>::zeros([3, 1, 28, 28], &device);
        assert_eq!(c.features(x.clone()).dims(), [3, 128]);
        assert_eq!(c.forward(x).dims(), [3, 10]);
        // 32·25 + 32 + 64·32·25 + 64 + 3136·128 + 128 + 128·10 + 10
        assert_eq!(c.num_params(), 832 + 51_264 + 401_536 + 1_290);
    }
}
