//! Replaceable kernels: operations of the U-Net that a binary may swap, per
//! backend, for a faster implementation of the same function.
//!
//! burn composes some operations out of many elementwise passes (under
//! autodiff its attention op becomes matmul, softmax as max/sub/exp/sum/div,
//! matmul, and each of those gets its own backward pass). On a GPU that is
//! cheap; on a CPU each pass over a [batch, 784, 784] score matrix costs as
//! much as a matmul. This crate stays generic over `B: Backend` and never
//! names a backend: the binary that knows its backend installs [`Kernels`]
//! for that backend type once, and the U-Net picks them up. Without an
//! installation the generic burn implementation runs; an installed kernel
//! must compute the same function (to float rounding), so installing one
//! changes speed, not results.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::prelude::*;
//! use diffusion_model::kernels::{self, Kernels};
//!
//! fn my_attention(q: Tensor<Flex, 3>, k: Tensor<Flex, 3>, v: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
//!     kernels::generic_attention(q, k, v) // a faster kernel would go here
//! }
//! kernels::install::<Flex>(Kernels { attention: my_attention, ..Kernels::default() });
//! ```

use std::any::Any;
use std::sync::RwLock;

use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::nn::GroupNorm;
use burn::prelude::*;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::attention::AttentionBlock;
use crate::convnext::ConvNeXtBlock;

/// Single-head attention softmax(q·kᵀ/√d)·v.
///
/// # Shapes
/// - `q`, `k`, `v`: [batch, tokens, d]
/// - returns [batch, tokens, d]
pub type AttentionFn<B> = fn(Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3>;

/// A 2-D convolution module applied to an input, `conv.forward(x)`.
///
/// # Shapes
/// - `x`: [batch, in, h, w]; returns [batch, out, h', w']
pub type Conv2dFn<B> = for<'a> fn(&'a Conv2d<B>, Tensor<B, 4>) -> Tensor<B, 4>;

/// A transposed 2-D convolution module applied to an input, `conv.forward(x)`.
///
/// # Shapes
/// - `x`: [batch, in, h, w]; returns [batch, out, h', w']
pub type ConvTranspose2dFn<B> = for<'a> fn(&'a ConvTranspose2d<B>, Tensor<B, 4>) -> Tensor<B, 4>;

/// A group norm module applied to an input, `norm.forward(x)`.
///
/// # Shapes
/// - `x`: [batch, channels, h, w]; returns the same shape
pub type GroupNormFn<B> = for<'a> fn(&'a GroupNorm<B>, Tensor<B, 4>) -> Tensor<B, 4>;

/// GELU (the exact, erf-based one), elementwise.
pub type GeluFn<B> = fn(Tensor<B, 4>) -> Tensor<B, 4>;

/// A whole attention block applied to an input, `block.forward(x)`:
/// x + Wo·attention(split₃(Wqkv·GN(x))). A kernel may fuse its steps (and
/// skip the transposes between the image layout and the token layout); it
/// must compute what [`AttentionBlock::forward_generic`] computes.
///
/// # Shapes
/// - `x`: [batch, d, h, w]; returns the same shape
pub type AttentionBlockFn<B> = for<'a> fn(&'a AttentionBlock<B>, Tensor<B, 4>) -> Tensor<B, 4>;

/// A whole ConvNeXt block applied to an input and its condition term,
/// `block.forward_generic(x, cond)`: depthwise conv + cond, group norm,
/// conv, GELU, group norm, conv, plus the shortcut. A kernel may fuse its
/// steps (and keep one image's intermediates in cache); it must compute
/// what [`ConvNeXtBlock::forward_generic`] computes.
///
/// # Shapes
/// - `x`: [batch, in, h, w]; `cond`: [batch, in]; returns [batch, out, h, w]
pub type ConvNeXtBlockFn<B> = for<'a> fn(&'a ConvNeXtBlock<B>, Tensor<B, 4>, Tensor<B, 2>) -> Tensor<B, 4>;

/// Two image batches joined along channels, `Tensor::cat(vec![a, b], 1)`
/// (the U-Net's up path: the up conv's output, then the skip).
///
/// # Shapes
/// - `a`: [batch, ca, h, w]; `b`: [batch, cb, h, w]; returns [batch, ca + cb, h, w]
pub type CatChannelsFn<B> = fn(Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>;

/// The replaceable kernels of one backend type.
pub struct Kernels<B: Backend> {
    /// Single-head attention, used by [`AttentionImpl::Fused`](crate::AttentionImpl::Fused).
    pub attention: AttentionFn<B>,
    /// 2-D convolution of a `Conv2d` module.
    pub conv2d: Conv2dFn<B>,
    /// Group norm of a `GroupNorm` module.
    pub group_norm: GroupNormFn<B>,
    /// Exact GELU.
    pub gelu: GeluFn<B>,
    /// The attention block around [`Kernels::attention`].
    pub attention_block: AttentionBlockFn<B>,
    /// The ConvNeXt block around [`Kernels::conv2d`], [`Kernels::group_norm`]
    /// and [`Kernels::gelu`].
    pub convnext_block: ConvNeXtBlockFn<B>,
    /// Transposed 2-D convolution of a `ConvTranspose2d` module (the U-Net's up convs).
    pub conv_transpose2d: ConvTranspose2dFn<B>,
    /// The channel concatenation of the up path's input and its skip.
    pub cat_channels: CatChannelsFn<B>,
}

impl<B: Backend> Clone for Kernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Kernels<B> {}

impl<B: Backend> Default for Kernels<B> {
    fn default() -> Self {
        Kernels {
            attention: generic_attention::<B>,
            conv2d: generic_conv2d::<B>,
            group_norm: generic_group_norm::<B>,
            gelu: burn::tensor::activation::gelu::<4, B>,
            attention_block: generic_attention_block::<B>,
            convnext_block: generic_convnext_block::<B>,
            conv_transpose2d: generic_conv_transpose2d::<B>,
            cat_channels: generic_cat_channels::<B>,
        }
    }
}

/// A process-wide table holding at most one value of each type: behind
/// [`install`] and [`get`] (one [`Kernels<B>`] per backend type), and
/// public so that other crates' kernel tables (`diffusion_train::kernels`)
/// work the same way.
pub struct Registry(RwLock<Vec<Box<dyn Any + Send + Sync>>>);

impl Registry {
    /// An empty table (usable in a `static`).
    pub const fn new() -> Self {
        Registry(RwLock::new(Vec::new()))
    }

    /// Makes `value` the table's `T`, replacing any earlier one.
    pub fn set<T: Any + Send + Sync>(&self, value: T) {
        let mut table = self.0.write().unwrap_or_else(|e| e.into_inner());
        table.retain(|k| !k.is::<T>());
        table.push(Box::new(value));
    }

    /// The table's `T`, if one was set.
    pub fn get<T: Any + Copy>(&self) -> Option<T> {
        let table = self.0.read().unwrap_or_else(|e| e.into_inner());
        table.iter().find_map(|k| k.downcast_ref::<T>()).copied()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// The installed `Kernels<B>`, one per backend type.
static INSTALLED: Registry = Registry::new();

/// Makes `kernels` the ones used for backend `B` from now on (replacing
/// any earlier installation for `B`).
pub fn install<B: Backend>(kernels: Kernels<B>) {
    INSTALLED.set(kernels);
}

/// The kernels in use for backend `B`.
pub fn get<B: Backend>() -> Kernels<B> {
    INSTALLED.get().unwrap_or_default()
}

/// Attention through the installed kernel for `B`.
pub fn attention<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
    (get::<B>().attention)(q, k, v)
}

/// `conv.forward(x)` through the installed kernel for `B`.
pub fn conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    (get::<B>().conv2d)(conv, x)
}

/// burn's conv2d.
pub fn generic_conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv.forward(x)
}

/// `conv.forward(x)` of a transposed conv through the installed kernel for `B`.
pub fn conv_transpose2d<B: Backend>(conv: &ConvTranspose2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    (get::<B>().conv_transpose2d)(conv, x)
}

/// burn's conv_transpose2d.
pub fn generic_conv_transpose2d<B: Backend>(conv: &ConvTranspose2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv.forward(x)
}

/// `norm.forward(x)` through the installed kernel for `B`.
pub fn group_norm<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    (get::<B>().group_norm)(norm, x)
}

/// burn's group norm.
pub fn generic_group_norm<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    norm.forward(x)
}

/// GELU through the installed kernel for `B`.
pub fn gelu<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    (get::<B>().gelu)(x)
}

/// `Tensor::cat(vec![a, b], 1)` through the installed kernel for `B`.
pub fn cat_channels<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    (get::<B>().cat_channels)(a, b)
}

/// burn's `Tensor::cat` along channels.
pub fn generic_cat_channels<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::cat(vec![a, b], 1)
}

/// `block.forward(x)` through the installed kernel for `B`.
pub fn attention_block<B: Backend>(block: &AttentionBlock<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    (get::<B>().attention_block)(block, x)
}

/// The attention block composed of burn operations and the installed
/// [`attention`] kernel.
pub fn generic_attention_block<B: Backend>(block: &AttentionBlock<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    block.forward_generic(x)
}

/// `block.forward_generic(x, cond)` through the installed kernel for `B`.
pub fn convnext_block<B: Backend>(
    block: &ConvNeXtBlock<B>,
    x: Tensor<B, 4>,
    cond: Tensor<B, 2>,
) -> Tensor<B, 4> {
    (get::<B>().convnext_block)(block, x, cond)
}

/// The ConvNeXt block composed of burn operations and the installed
/// conv2d, group norm and GELU kernels.
pub fn generic_convnext_block<B: Backend>(
    block: &ConvNeXtBlock<B>,
    x: Tensor<B, 4>,
    cond: Tensor<B, 2>,
) -> Tensor<B, 4> {
    block.forward_generic(x, cond)
}

/// burn's attention op (a fused kernel where the backend has one).
pub fn generic_attention<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, l, d] = q.dims();
    let lk = k.dims()[1];
    let y = burn_attention(
        q.reshape([b, 1, l, d]),
        k.reshape([b, 1, lk, d]),
        v.reshape([b, 1, lk, d]),
        None,
        None,
        AttentionModuleOptions::default(),
    );
    y.reshape([b, l, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestBackend;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;

    // A backend type no other test uses, so installing for it cannot race
    // with tests running in parallel.
    type Own = Autodiff<TestBackend, BalancedCheckpointing>;

    fn zeros_attention(q: Tensor<Own, 3>, _: Tensor<Own, 3>, _: Tensor<Own, 3>) -> Tensor<Own, 3> {
        q.zeros_like()
    }

    fn sum_abs<B: Backend>(x: Tensor<B, 3>) -> f32 {
        x.abs().sum().into_scalar().elem()
    }

    #[test]
    fn installed_kernel_is_used_for_its_backend_only() {
        let device = Default::default();
        let q = Tensor::<Own, 3>::random([2, 5, 4], Distribution::Normal(0.0, 1.0), &device);
        let generic = attention(q.clone(), q.clone(), q.clone());
        assert!(sum_abs(generic.clone()) > 0.0);
        install::<Own>(Kernels {
            attention: zeros_attention,
            ..Kernels::default()
        });
        assert_eq!(sum_abs(attention(q.clone(), q.clone(), q.clone())), 0.0);
        // Other backend types are unaffected.
        let qf = Tensor::<TestBackend, 3>::from_data(q.to_data(), &device);
        assert!(sum_abs(attention(qf.clone(), qf.clone(), qf)) > 0.0);
        install::<Own>(Kernels::default());
        let again = attention(q.clone(), q.clone(), q);
        assert_eq!(again.into_data(), generic.into_data());
    }
}
