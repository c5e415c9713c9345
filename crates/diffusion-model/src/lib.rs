//! The reference diffusion U-Net (ConvNeXt blocks + self-attention) for
//! burn, as reusable blocks, each built from a `Config` with defaults.
//!
//! The default [`UNetConfig`] is the reference network of SPEC.md: widths
//! 16/32/64/128, strides 2/2/3, up widths 64/32/8, m = 3, E = 112, T = 500,
//! 10 classes, 1x28x28, 2,038,132 parameters. Everything is configurable:
//!
//! ```
//! use burn::backend::Flex;
//! use burn::module::Module;
//! use burn::tensor::{Int, Tensor};
//! use diffusion_model::UNetConfig;
//!
//! type B = Flex;
//! let device = Default::default();
//!
//! // The reference network.
//! let unet = UNetConfig::new().init::<B>(&device).unwrap();
//! assert_eq!(unet.num_params(), 2_038_132);
//!
//! // A custom one: RGB 32x32, four down levels, attention only at the two
//! // coarsest, unconditional.
//! let config = UNetConfig::new()
//!     .with_image_channels(3)
//!     .with_image_size(32)
//!     .with_widths(vec![16, 32, 64, 64, 128])
//!     .with_strides(vec![2, 2, 2, 2])
//!     .with_up_widths(vec![64, 64, 32, 16])
//!     .with_attention(vec![false, false, false, true, true])
//!     .with_num_classes(None);
//! let unet = config.init::<B>(&device).unwrap();
//! let x = Tensor::<B, 4>::zeros([2, 3, 32, 32], &device);
//! let t = Tensor::<B, 1, Int>::from_ints([10, 400], &device);
//! assert_eq!(unet.forward(x, t, None).dims(), [2, 3, 32, 32]);
//!
//! // An impossible configuration is refused with a clear error.
//! assert!(UNetConfig::new().with_strides(vec![2, 2]).init::<B>(&device).is_err());
//! ```
//!
//! The U-Net implements [`diffusion_core::Denoiser`] (one t for the batch),
//! so it plugs straight into the samplers of `diffusion-core`, and
//! [`diffusion_core::BatchDenoiser`] (one t per sample), so it trains with
//! `diffusion-core`'s objective and the `diffusion-train` crate.

pub mod attention;
pub mod block;
pub mod class_embedding;
pub mod classifier;
pub mod convnext;
#[cfg(feature = "pytorch")]
pub mod interop;
pub mod kernels;
pub mod params;
pub mod time_embedding;
pub mod unet;

#[cfg(test)]
pub(crate) mod test_util;

pub use attention::{AttentionBlock, AttentionConfig, AttentionImpl};
pub use block::{Block, BlockConfig};
pub use class_embedding::{ClassCondition, ClassEmbedding, ClassEmbeddingConfig};
pub use classifier::{Classifier, ClassifierConfig};
pub use convnext::{ConvNeXtBlock, ConvNeXtConfig};
pub use unet::{materialize, UNet, UNetConfig};

/// A model that cannot be built as configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The U-Net configuration is inconsistent; the message says how.
    #[error("invalid U-Net configuration: {0}")]
    InvalidConfig(String),
}
