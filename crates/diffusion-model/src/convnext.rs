//! The ConvNeXt block of the reference (SPEC.md, "ConvNeXt block").

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use crate::class_embedding::ClassCondition;
use crate::kernels;

/// Builds a [`ConvNeXtBlock`].
#[derive(Config, Debug)]
pub struct ConvNeXtConfig {
    /// Input channels, in.
    pub in_channels: usize,
    /// Output channels, out.
    pub out_channels: usize,
    /// Width of the time and class embeddings, E.
    pub embed_dim: usize,
    /// Hidden width multiplier m (hidden = out·m).
    #[config(default = 3)]
    pub mult: usize,
    /// Whether the block has a class projection (false for unconditional models).
    #[config(default = true)]
    pub conditional: bool,
}

/// h = dwconv7x7(x) + Linear(SiLU(t_emb)) [+ Linear(SiLU(c_emb))];
/// h = Conv3x3(GELU(Conv3x3(GN(h)))) with a GroupNorm between;
/// return h + shortcut(x).
#[derive(Module, Debug)]
pub struct ConvNeXtBlock<B: Backend> {
    /// Depthwise 7x7 conv (groups = in, padding 3).
    pub depthwise: Conv2d<B>,
    /// Linear(E → in) of SiLU(time embedding).
    pub time_proj: Linear<B>,
    /// Linear(E → in) of SiLU(class embedding).
    pub class_proj: Option<Linear<B>>,
    /// GroupNorm with one group over the in channels, before `conv1`.
    pub norm1: GroupNorm<B>,
    /// Conv 3x3, in → out·m.
    pub conv1: Conv2d<B>,
    /// GroupNorm with one group over the out·m channels, after the GELU.
    pub norm2: GroupNorm<B>,
    /// Conv 3x3, out·m → out.
    pub conv2: Conv2d<B>,
    /// 1x1 conv when in ≠ out; identity otherwise.
    pub shortcut: Option<Conv2d<B>>,
}

impl ConvNeXtConfig {
    /// Creates the block on `device` with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ConvNeXtBlock<B> {
        let (cin, cout, hidden) = (self.in_channels, self.out_channels, self.out_channels * self.mult);
        let pad = |p| PaddingConfig2d::Explicit(p, p, p, p);
        ConvNeXtBlock {
            depthwise: Conv2dConfig::new([cin, cin], [7, 7])
                .with_groups(cin)
                .with_padding(pad(3))
                .init(device),
            time_proj: LinearConfig::new(self.embed_dim, cin).init(device),
            class_proj: self
                .conditional
                .then(|| LinearConfig::new(self.embed_dim, cin).init(device)),
            norm1: GroupNormConfig::new(1, cin).init(device),
            conv1: Conv2dConfig::new([cin, hidden], [3, 3])
                .with_padding(pad(1))
                .init(device),
            norm2: GroupNormConfig::new(1, hidden).init(device),
            conv2: Conv2dConfig::new([hidden, cout], [3, 3])
                .with_padding(pad(1))
                .init(device),
            shortcut: (cin != cout).then(|| Conv2dConfig::new([cin, cout], [1, 1]).init(device)),
        }
    }
}

impl<B: Backend> ConvNeXtBlock<B> {
    /// # Shapes
    /// - `x`: [B, in, H, W]
    /// - `time`: SiLU(time embedding), [B, E]
    /// - `class`: SiLU(class embedding) [B, E] and its mask, or `None`
    /// - returns [B, out, H, W]
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        time: &Tensor<B, 2>,
        class: Option<&ClassCondition<B>>,
    ) -> Tensor<B, 4> {
        let cond = self.condition(time, class);
        kernels::convnext_block(self, x, cond)
    }

    /// The per-channel term added after the depthwise conv:
    /// Linear(SiLU(t_emb)) [+ Linear(SiLU(c_emb)), masked], [B, in].
    pub fn condition(&self, time: &Tensor<B, 2>, class: Option<&ClassCondition<B>>) -> Tensor<B, 2> {
        let mut cond = self.time_proj.forward(time.clone()); // [B, in]
        if let (Some(proj), Some(class)) = (&self.class_proj, class) {
            let mut term = proj.forward(class.silu_embedding.clone());
            if let Some(mask) = &class.mask {
                term = term * mask.clone(); // [B, in] · [B, 1]: drops the term for "no class"
            }
            cond = cond + term;
        }
        cond
    }

    /// The block after its [`condition`](Self::condition) term is known,
    /// composed of burn operations and the installed conv2d, group norm
    /// and GELU kernels (what a fused [`kernels::convnext_block`] must
    /// compute).
    ///
    /// # Shapes
    /// - `x`: [B, in, H, W]; `cond`: [B, in]; returns [B, out, H, W]
    pub fn forward_generic(&self, x: Tensor<B, 4>, cond: Tensor<B, 2>) -> Tensor<B, 4> {
        let [b, c, _, _] = x.dims();
        let h = kernels::conv2d(&self.depthwise, x.clone()) + cond.reshape([b, c, 1, 1]);
        let h = kernels::conv2d(&self.conv1, kernels::group_norm(&self.norm1, h));
        let h = kernels::conv2d(&self.conv2, kernels::group_norm(&self.norm2, kernels::gelu(h)));
        let skip = match &self.shortcut {
            Some(conv) => kernels::conv2d(conv, x),
            None => x,
        };
        h + skip
    }
}
