//! "Block(in, out)": a ConvNeXt block followed by an optional attention block.

use burn::module::Module;
use burn::prelude::*;

use crate::attention::{AttentionBlock, AttentionConfig, AttentionImpl};
use crate::class_embedding::ClassCondition;
use crate::convnext::{ConvNeXtBlock, ConvNeXtConfig};

/// Builds a [`Block`].
#[derive(Config, Debug)]
pub struct BlockConfig {
    /// The ConvNeXt block, which sets the input and output channels.
    pub convnext: ConvNeXtConfig,
    /// Attention after the ConvNeXt block (over `out_channels`), or none.
    pub attention: Option<AttentionImpl>,
}

/// ConvNeXt block, then self-attention when enabled at this level.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// The ConvNeXt block, in → out channels.
    pub convnext: ConvNeXtBlock<B>,
    /// Self-attention over the out channels, if enabled at this level.
    pub attention: Option<AttentionBlock<B>>,
}

impl BlockConfig {
    /// Creates the block on `device` with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Block<B> {
        Block {
            convnext: self.convnext.init(device),
            attention: self.attention.map(|imp| {
                AttentionConfig::new(self.convnext.out_channels)
                    .with_implementation(imp)
                    .init(device)
            }),
        }
    }
}

impl<B: Backend> Block<B> {
    /// # Shapes
    /// `x`: [B, in, H, W]; returns [B, out, H, W].
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        time: &Tensor<B, 2>,
        class: Option<&ClassCondition<B>>,
    ) -> Tensor<B, 4> {
        let x = self.convnext.forward(x, time, class);
        match &self.attention {
            Some(attn) => attn.forward(x),
            None => x,
        }
    }
}
