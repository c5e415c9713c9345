//! Class embedding, with a per-sample "no class" ([`diffusion_core::NO_CLASS`]).

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;

/// Builds a [`ClassEmbedding`].
#[derive(Config, Debug)]
pub struct ClassEmbeddingConfig {
    /// Number of classes (rows of the table); ids run 0..num_classes.
    pub num_classes: usize,
    /// Width of each embedding (the model's embedding width E).
    pub dim: usize,
}

/// A learned table of one row per class.
#[derive(Module, Debug)]
pub struct ClassEmbedding<B: Backend> {
    /// The learned [num_classes, dim] table.
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
    /// Creates the embedding on `device` with a freshly initialised table.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClassEmbedding<B> {
        ClassEmbedding {
            table: EmbeddingConfig::new(self.num_classes, self.dim).init(device),
        }
    }
}

impl<B: Backend> ClassEmbedding<B> {
    /// Embeds class ids (`[B]`, every one in 0..num_classes).
    pub fn forward(&self, classes: Tensor<B, 1, Int>) -> ClassCondition<B> {
        ClassCondition {
            silu_embedding: self.silu_embedding(classes),
            mask: None,
        }
    }

    /// Embeds class ids (`[B]`) some of which may be
    /// [`diffusion_core::NO_CLASS`]; those samples get a mask of 0.
    pub fn forward_with_dropped(&self, classes: Tensor<B, 1, Int>) -> ClassCondition<B> {
        let n = classes.dims()[0];
        let mask = classes.clone().greater_equal_elem(0).float().reshape([n, 1]);
        ClassCondition {
            silu_embedding: self.silu_embedding(classes.clamp_min(0)),
            mask: Some(mask),
        }
    }

    fn silu_embedding(&self, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let n = ids.dims()[0];
        let emb = self
            .table
            .forward(ids.reshape([n, 1]))
            .reshape([n, self.table.weight.dims()[1]]);
        burn::tensor::activation::silu(emb)
    }
}
