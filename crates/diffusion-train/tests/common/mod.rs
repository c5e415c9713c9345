//! What the trainer tests share.

use diffusion_model::UNetConfig;

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
