//! What the trainer tests share.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use diffusion_model::{UNet, UNetConfig};
use diffusion_train::Trainer;

/// A U-Net small enough to train a few steps in a test: 8x8 images, two
/// levels of 4 and 8 channels, attention at the lower one.
pub fn tiny_unet() -> UNetConfig {
    UNetConfig::new()
        .with_image_size(8)
        .with_widths(vec![4, 8])
        .with_strides(vec![2])
        .with_up_widths(vec![4])
        .with_attention(vec![false, true])
        .with_mult(1)
        .with_embed_dim(8)
}

/// Every float of the model and of its EMA, in visiting order.
#[allow(dead_code)] // not every test file compares weights
pub fn all_weights<B: AutodiffBackend>(t: &Trainer<B, UNet<B>>) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0
                .extend(p.val().into_data().convert::<f32>().to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    t.model().valid().visit(&mut c);
    t.ema().model.visit(&mut c);
    c.0
}

/// How many of two equally long weight lists differ in any bit.
#[allow(dead_code)]
pub fn differing_bits(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len(), "weight lists of different lengths");
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}
