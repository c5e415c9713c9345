//! Single-head self-attention over all spatial positions (SPEC.md,
//! "Attention block").

use burn::module::Module;
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

/// How softmax(q·kᵀ/√d)·v is computed. Both give the same numbers (to
/// float rounding); they differ in speed and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    /// The installed attention kernel of the backend ([`crate::kernels`]);
    /// by default burn's attention op: a native kernel where the backend has
    /// one (Flex: tiled flash-style on the CPU; CUDA/wgpu: flash kernel), and
    /// burn's own matmul + softmax decomposition elsewhere (under autodiff).
    #[default]
    Fused,
    /// softmax(q·kᵀ/√d)·v written out with matmul and softmax.
    Explicit,
}

/// Builds an [`AttentionBlock`].
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Channels d of the input, also the width of q, k and v.
    pub channels: usize,
    /// How the attention itself is computed.
    #[config(default = "AttentionImpl::Fused")]
    pub implementation: AttentionImpl,
}

/// x + Wo·attention(split₃(Wx·GN(x))) over the H·W positions.
#[derive(Module, Debug)]
pub struct AttentionBlock<B: Backend> {
    /// GroupNorm with one group over the d channels, before the projection.
    pub norm: GroupNorm<B>,
    /// Linear(d → 3d); output features split into q, k, v in that order.
    pub qkv: Linear<B>,
    /// Linear(d → d).
    pub out: Linear<B>,
    /// How the attention itself is computed.
    pub implementation: AttentionImpl,
}

impl AttentionConfig {
    /// Creates the block on `device` with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> AttentionBlock<B> {
        let d = self.channels;
        AttentionBlock {
            norm: GroupNormConfig::new(1, d).init(device),
            qkv: LinearConfig::new(d, 3 * d).init(device),
            out: LinearConfig::new(d, d).init(device),
            implementation: self.implementation,
        }
    }
}

impl<B: Backend> AttentionBlock<B> {
    /// Through the installed attention-block kernel of `B`
    /// ([`crate::kernels`]; by default [`Self::forward_generic`]).
    ///
    /// # Shapes
    /// `x`: [B, d, H, W]; returns [B, d, H, W].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::kernels::attention_block(self, x)
    }

    /// The block composed of burn operations (group norm, linear layers,
    /// the installed attention kernel), in the token layout [B, H·W, d].
    ///
    /// # Shapes
    /// `x`: [B, d, H, W]; returns [B, d, H, W].
    pub fn forward_generic(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, d, h, w] = x.dims();
        let l = h * w;
        // [B, d, H, W] → [B, L, d]
        let tokens = crate::kernels::group_norm(&self.norm, x.clone())
            .reshape([b, d, l])
            .swap_dims(1, 2);
        let qkv = self.qkv.forward(tokens); // [B, L, 3d]
        let q = qkv.clone().narrow(2, 0, d);
        let k = qkv.clone().narrow(2, d, d);
        let v = qkv.narrow(2, 2 * d, d);
        let y = match self.implementation {
            AttentionImpl::Fused => crate::kernels::attention(q, k, v),
            AttentionImpl::Explicit => {
                let scores = q.mul_scalar(1.0 / (d as f64).sqrt()).matmul(k.swap_dims(1, 2)); // [B, L, L]
                softmax(scores, 2).matmul(v) // [B, L, d]
            }
        };
        let y = self.out.forward(y); // [B, L, d]
        x + y.swap_dims(1, 2).reshape([b, d, h, w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, TestBackend};
    use burn::tensor::Distribution;

    #[test]
    fn fused_and_explicit_agree() {
        let device = Default::default();
        for (d, hw) in [(16, 28), (32, 14), (64, 7), (8, 3)] {
            let block = AttentionConfig::new(d).init::<TestBackend>(&device);
            let x = Tensor::<TestBackend, 4>::random([3, d, hw, hw], Distribution::Normal(0.0, 1.0), &device);
            let fused = block.forward(x.clone());
            let explicit = AttentionBlock {
                implementation: AttentionImpl::Explicit,
                ..block
            }
            .forward(x);
            let diff = max_abs_diff(&fused, &explicit);
            assert!(diff < 1e-5, "d={d} hw={hw}: fused and explicit differ by {diff}");
        }
    }
}
