//! The U-Net of the reference (SPEC.md, "Network"), configurable.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use diffusion_core::{BatchDenoiser, Denoiser, Labels, Prediction};

use crate::attention::AttentionImpl;
use crate::block::{Block, BlockConfig};
use crate::class_embedding::{ClassEmbedding, ClassEmbeddingConfig};
use crate::convnext::{ConvNeXtBlock, ConvNeXtConfig};
use crate::kernels;
use crate::time_embedding;
use crate::ModelError;

/// Builds a [`UNet`]. The default is the reference network of SPEC.md
/// (2,038,132 trainable parameters).
///
/// Level 0 is the input resolution; level i (1..=L) follows the i-th
/// strided conv. `widths[i]` is the channel count at level i, `strides[i]`
/// the stride from level i to i+1, `up_widths[j]` the output width of the
/// j-th up block (coarsest first), `attention[i]` whether the blocks at
/// level i have self-attention.
#[derive(Config, Debug)]
pub struct UNetConfig {
    /// Channels of the images (1 for grey-scale).
    #[config(default = 1)]
    pub image_channels: usize,
    /// Height and width of the (square) images.
    #[config(default = 28)]
    pub image_size: usize,
    /// Channel count at each level 0..=L.
    #[config(default = "vec![16, 32, 64, 128]")]
    pub widths: Vec<usize>,
    /// Stride from level i to i+1; one fewer than `widths`.
    #[config(default = "vec![2, 2, 3]")]
    pub strides: Vec<usize>,
    /// Output width of each up block, coarsest first; one fewer than `widths`.
    #[config(default = "vec![64, 32, 8]")]
    pub up_widths: Vec<usize>,
    /// Whether the blocks at each level have self-attention; one per level.
    #[config(default = "vec![true, true, true, true]")]
    pub attention: Vec<bool>,
    /// ConvNeXt hidden width multiplier m.
    #[config(default = 3)]
    pub mult: usize,
    /// Number of classes; `None` for an unconditional model.
    #[config(default = "Some(10)")]
    pub num_classes: Option<usize>,
    /// Width E of the time and class embeddings (even).
    #[config(default = 112)]
    pub embed_dim: usize,
    /// Number of diffusion steps T (the time table has T + 1 rows).
    #[config(default = 500)]
    pub num_steps: usize,
    /// What the network is trained to predict.
    #[config(default = "Prediction::Epsilon")]
    pub prediction: Prediction,
    /// How the attention blocks compute attention.
    #[config(default = "AttentionImpl::Fused")]
    pub attention_impl: AttentionImpl,
}

/// The U-Net. See [`UNetConfig`] for its shape and [`UNet::forward`].
#[derive(Module, Debug)]
pub struct UNet<B: Backend> {
    /// Fixed sinusoidal table [T + 1, E]; a constant, not a parameter.
    pub time_table: Tensor<B, 2>,
    /// Class embedding table; `None` for an unconditional model.
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// Block(image_channels → `widths[0]`) at level 0.
    pub stem: Block<B>,
    /// Strided 3x3 convs, level i → i+1.
    pub downsamples: Vec<Conv2d<B>>,
    /// Block(widths[i+1] → widths[i+1]) after each downsample.
    pub down_blocks: Vec<Block<B>>,
    /// Transposed 3x3 convs, coarsest first, back to each skip's size.
    pub upsamples: Vec<ConvTranspose2d<B>>,
    /// Block(2·skip width → `up_widths[j]`) after each upsample and concat.
    pub up_blocks: Vec<Block<B>>,
    /// ConvNeXt block (up_widths.last → image_channels), no attention.
    pub head: ConvNeXtBlock<B>,
    /// What the network's output is: ε, x0 or v.
    pub prediction: Prediction,
}

/// Spatial size after a 3x3, padding-1 conv of stride s.
fn down_size(size: usize, stride: usize) -> usize {
    (size - 1) / stride + 1
}

impl UNetConfig {
    /// The `tiny` preset's network for 28x28 digits: widths 8, 16, 16 and
    /// 32, attention at the coarsest level only. An epoch of 512 images
    /// takes seconds on a CPU: for tests and examples, not for good digits.
    pub fn tiny() -> Self {
        Self::new()
            .with_widths(vec![8, 16, 16, 32])
            .with_up_widths(vec![16, 16, 8])
            .with_attention(vec![false, false, false, true])
            .with_mult(2)
            .with_embed_dim(32)
    }

    /// Checks the configuration and returns the spatial size at each level.
    pub fn level_sizes(&self) -> Result<Vec<usize>, ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(msg));
        let levels = self.widths.len();
        if levels == 0 || self.widths.contains(&0) {
            return bad("widths must be non-empty and positive".into());
        }
        if self.strides.len() + 1 != levels {
            return bad(format!(
                "{} widths need {} strides, got {}",
                levels,
                levels - 1,
                self.strides.len()
            ));
        }
        if self.up_widths.len() != levels - 1 || self.up_widths.contains(&0) {
            return bad(format!(
                "{} widths need {} positive up widths, got {:?}",
                levels,
                levels - 1,
                self.up_widths
            ));
        }
        if self.attention.len() != levels {
            return bad(format!(
                "attention needs one flag per level ({levels}), got {}",
                self.attention.len()
            ));
        }
        if self.strides.contains(&0) {
            return bad("strides must be at least 1".into());
        }
        if self.image_channels == 0 || self.image_size == 0 || self.mult == 0 || self.num_steps == 0 {
            return bad("image channels and size, mult and num_steps must be positive".into());
        }
        // Bounds far above any sensible network, so that a mistyped number
        // is an error instead of an allocation of gigabytes.
        let too_big = [
            ("image_size", self.image_size, 4096),
            ("image_channels", self.image_channels, 64),
            ("mult", self.mult, 64),
            ("embed_dim", self.embed_dim, 8192),
            ("num_steps", self.num_steps, 100_000),
            ("num_classes", self.num_classes.unwrap_or(1), 1_000_000),
            (
                "widths",
                self.widths
                    .iter()
                    .chain(&self.up_widths)
                    .copied()
                    .max()
                    .unwrap_or(1),
                8192,
            ),
            ("levels", levels, 16),
        ];
        for (name, value, max) in too_big {
            if value > max {
                return bad(format!("{name} must be at most {max}, got {value}"));
            }
        }
        if self.embed_dim == 0 || !self.embed_dim.is_multiple_of(2) {
            return bad(format!(
                "embed_dim must be even and positive (sin/cos pairs), got {}",
                self.embed_dim
            ));
        }
        if self.num_classes == Some(0) {
            return bad("num_classes must be at least 1, or none for an unconditional model".into());
        }
        let mut sizes = vec![self.image_size];
        for (i, &s) in self.strides.iter().enumerate() {
            let size = down_size(sizes[i], s);
            if size < 2 && i + 1 < self.strides.len() {
                return bad(format!(
                    "image size {} shrinks to {size} at level {} before the last stride; use a larger image or smaller strides",
                    self.image_size,
                    i + 1
                ));
            }
            sizes.push(size);
        }
        Ok(sizes)
    }

    /// Output padding of the transposed conv from level i+1 back to level i,
    /// so that it returns exactly to the skip's size (always in 0..stride for
    /// a 3x3, padding-1 down conv).
    fn output_padding(&self, sizes: &[usize], i: usize) -> usize {
        let (src, dst, s) = (sizes[i + 1], sizes[i], self.strides[i]);
        dst - ((src - 1) * s + 1)
    }

    /// Builds the network with weights drawn from the backend's generator
    /// seeded with `seed`, every parameter drawn now in a fixed order (burn
    /// otherwise draws them lazily, at first use), so the same seed gives
    /// the same weights on a backend. Reseeds the backend's generator.
    pub fn init_seeded<B: Backend>(&self, device: &B::Device, seed: u64) -> Result<UNet<B>, ModelError> {
        diffusion_core::rng::with_backend_seed::<B, _>(device, seed, || {
            let model = self.init(device)?;
            materialize(&model);
            Ok(model)
        })
    }

    /// Builds the network on `device`, or says what is wrong with the config.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<UNet<B>, ModelError> {
        let sizes = self.level_sizes()?;
        let levels = self.widths.len();
        let conditional = self.num_classes.is_some();
        let convnext = |cin, cout| {
            ConvNeXtConfig::new(cin, cout, self.embed_dim)
                .with_mult(self.mult)
                .with_conditional(conditional)
        };
        let block = |cin, cout, level: usize| {
            BlockConfig::new(convnext(cin, cout))
                .with_attention(self.attention[level].then_some(self.attention_impl))
                .init(device)
        };
        let pad1 = PaddingConfig2d::Explicit(1, 1, 1, 1);

        let mut downsamples = Vec::new();
        let mut down_blocks = Vec::new();
        for i in 0..levels - 1 {
            let (lo, hi, s) = (self.widths[i], self.widths[i + 1], self.strides[i]);
            downsamples.push(
                Conv2dConfig::new([lo, hi], [3, 3])
                    .with_stride([s, s])
                    .with_padding(pad1.clone())
                    .init(device),
            );
            down_blocks.push(block(hi, hi, i + 1));
        }
        let mut upsamples = Vec::new();
        let mut up_blocks = Vec::new();
        let mut current = self.widths[levels - 1];
        for (j, i) in (0..levels - 1).rev().enumerate() {
            let (skip, s) = (self.widths[i], self.strides[i]);
            let op = self.output_padding(&sizes, i);
            upsamples.push(
                ConvTranspose2dConfig::new([current, skip], [3, 3])
                    .with_stride([s, s])
                    .with_padding([1, 1])
                    .with_padding_out([op, op])
                    .init(device),
            );
            up_blocks.push(block(2 * skip, self.up_widths[j], i));
            current = self.up_widths[j];
        }
        Ok(UNet {
            time_table: time_embedding::time_table(self.num_steps, self.embed_dim, device),
            class_embedding: self
                .num_classes
                .map(|n| ClassEmbeddingConfig::new(n, self.embed_dim).init(device)),
            stem: block(self.image_channels, self.widths[0], 0),
            downsamples,
            down_blocks,
            upsamples,
            up_blocks,
            head: convnext(current, self.image_channels).init(device),
            prediction: self.prediction,
        })
    }
}

impl<B: Backend> UNet<B> {
    /// The prediction (ε, x0 or v per [`UNet::prediction`]) for a batch
    /// whose class ids (if any) are all valid; `None` leaves the class term
    /// out for the whole batch, as the reference does.
    ///
    /// # Shapes
    /// - `x`: [B, C, H, W] (C, H, W as configured)
    /// - `t`: `[B]`, integers in 0..=T
    /// - `classes`: `[B]`, in 0..num_classes
    /// - returns [B, C, H, W]
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1, Int>,
        classes: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 4> {
        let labels = match classes {
            Some(c) => Labels::Classes(c),
            None => Labels::None,
        };
        self.forward_labels(x, t, labels)
    }

    /// [`UNet::forward`] with labels that may hold
    /// [`diffusion_core::NO_CLASS`] (label dropout, guidance): such a
    /// sample takes the unconditional branch.
    pub fn forward_labels(&self, x: Tensor<B, 4>, t: Tensor<B, 1, Int>, labels: Labels<B>) -> Tensor<B, 4> {
        let time = silu(time_embedding::lookup(&self.time_table, t)); // [B, E]
        let class = match (&self.class_embedding, labels) {
            (Some(emb), Labels::Classes(c)) => Some(emb.forward(c)),
            (Some(emb), Labels::WithDropped(c)) => Some(emb.forward_with_dropped(c)),
            _ => None,
        };
        let class = class.as_ref();
        let mut x = self.stem.forward(x, &time, class);
        let mut skips = Vec::with_capacity(self.downsamples.len());
        for (down, block) in self.downsamples.iter().zip(&self.down_blocks) {
            skips.push(x.clone());
            x = block.forward(kernels::conv2d(down, x), &time, class);
        }
        for (up, block) in self.upsamples.iter().zip(&self.up_blocks) {
            let skip = skips.pop().expect("one skip per level");
            x = kernels::cat_channels(kernels::conv_transpose2d(up, x), skip); // [B, 2·skip, H, W]
            x = block.forward(x, &time, class);
        }
        self.head.forward(x, &time, class)
    }

    /// T, the number of diffusion steps the time table covers.
    pub fn num_steps(&self) -> usize {
        self.time_table.dims()[0] - 1
    }
}

impl<B: Backend> Denoiser<B> for UNet<B> {
    fn denoise(&self, x_t: Tensor<B, 4>, t: usize, classes: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        let n = x_t.dims()[0];
        let t = Tensor::<B, 1, Int>::full([n], t as i64, &x_t.device());
        // Ids may be NO_CLASS when the caller mixes branches (guidance).
        let labels = match classes {
            Some(c) => Labels::WithDropped(c),
            None => Labels::None,
        };
        self.forward_labels(x_t, t, labels)
    }

    fn prediction(&self) -> Prediction {
        self.prediction
    }
}

impl<B: Backend> BatchDenoiser<B> for UNet<B> {
    fn predict(&self, x_t: Tensor<B, 4>, t: Tensor<B, 1, Int>, labels: Labels<B>) -> Tensor<B, 4> {
        self.forward_labels(x_t, t, labels)
    }

    fn prediction(&self) -> Prediction {
        self.prediction
    }
}

/// Touches every parameter of `module` once, in visit order, so that burn's
/// lazy initialisation draws them now (from the backend's generator as it
/// stands) rather than at first use.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}
