//! Checkpoints of a run ([`diffusion_train::checkpoint`]), and loading a
//! U-Net from one.

use std::path::Path;

use anyhow::Result;
use burn::tensor::backend::Backend;
use diffusion_model::{UNet, UNetConfig};
pub use diffusion_train::checkpoint::{latest, save_module, write, EMA, MODEL};
pub use diffusion_train::TrainState;

/// Loads weights saved by [`save_module`] into a freshly built U-Net.
pub fn load_unet<B: Backend>(config: &UNetConfig, file: &Path, device: &B::Device) -> Result<UNet<B>> {
    let model = config.init::<B>(device)?;
    Ok(diffusion_train::checkpoint::load_module(model, file, device)?)
}
