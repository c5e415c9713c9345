//! Class embedding, with a per-sample "no class".

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;

/// Class id meaning "no class" for one sample of a batch: that sample takes
/// the unconditional branch (its class term is left out), as classifier-free
/// guidance needs.
pub const NO_CLASS: i64 = diffusion_core::NULL_CLASS;

/// Builds a [`ClassEmbedding`].
#[derive(Config, Debug)]
pub struct ClassEmbeddingConfig {
    pub num_classes: usize,
    pub dim: usize,
}

/// A learned table of one row per class.
#[derive(Module, Debug)]
pub struct ClassEmbedding<B: Backend> {
    pub table: Embedding<B>,
}

/// The class input of a forward pass after embedding: SiLU(embedding) per
/// sample, and a 0/1 mask (1 = has a class) when some samples have none.
#[derive(Debug, Clone)]
pub struct ClassCondition<B: Backend> {
    /// [B, dim]
    pub silu_embedding: Tensor<B, 2>,
    /// [B, 1]; `None` when every sample has a class.
    pub mask: Option<Tensor<B, 2>>,
}

impl ClassEmbeddingConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClassEmbedding<B> {
        ClassEmbedding {
            table: EmbeddingConfig::new(self.num_classes, self.dim).init(device),
        }
    }
}

impl<B: Backend> ClassEmbedding<B> {
    /// Embeds class ids (`[B]`, in 0..num_classes or [`NO_CLASS`]).
    ///
    /// `has_null` says whether any id may be [`NO_CLASS`]; when false the
    /// mask is skipped (the common, cheaper case).
    pub fn forward(&self, classes: Tensor<B, 1, Int>, has_null: bool) -> ClassCondition<B> {
        let n = classes.dims()[0];
        let ids = if has_null {
            classes.clone().clamp_min(0)
        } else {
            classes.clone()
        };
        let emb = self
            .table
            .forward(ids.reshape([n, 1]))
            .reshape([n, self.table.weight.dims()[1]]);
        let silu_embedding = burn::tensor::activation::silu(emb);
        let mask = has_null.then(|| classes.greater_equal_elem(0).float().reshape([n, 1]));
        ClassCondition { silu_embedding, mask }
    }
}
