//! Data-parallel gradients on one device: a batch split into shards that
//! run in parallel threads (the first on the calling thread), their
//! gradients merged into the gradient of the whole batch's mean loss.
//!
//! On burn's CPU backend a training step has single-threaded stretches
//! between its parallel kernels, which two or more shards at once overlap;
//! where a step is nearly all parallel kernels (the diffusion U-Net with
//! `diffusion-flex-kernels`), smaller shards only shrink each kernel's
//! work and one shard is faster. Works for any [`AutodiffModule`].

use std::ops::Range;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// The gradients and the loss of a batch of `batch_size` samples, computed
/// as `shards` contiguous pieces in parallel threads.
///
/// `loss(model, range)` must return the *mean* loss of the samples in
/// `range`; each piece's gradient is weighted by its share of the batch, so
/// the result is the gradient of the mean loss over the whole batch (equal
/// to the unsharded one up to float rounding). With one shard, `loss` runs
/// on `model` itself in the calling thread.
pub fn sharded_gradients<B, M, F>(
    model: &M,
    batch_size: usize,
    shards: usize,
    loss: F,
) -> (GradientsParams, Tensor<B::InnerBackend, 1>)
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    F: Fn(&M, Range<usize>) -> Tensor<B, 1> + Sync,
{
    let shards = shards.clamp(1, batch_size.max(1));
    if shards == 1 {
        let l = loss(model, 0..batch_size);
        let grads = GradientsParams::from_grads(l.backward(), model);
        return (grads, l.inner());
    }
    let bounds: Vec<Range<usize>> = (0..shards)
        .map(|k| k * batch_size / shards..(k + 1) * batch_size / shards)
        .collect();
    let loss = &loss;
    let shard = move |copy: M, range: Range<usize>| {
        let weight = range.len() as f64 / batch_size as f64;
        let l = loss(&copy, range);
        let grads = GradientsParams::from_grads(l.backward(), &copy);
        (grads, l.inner(), weight)
    };
    // A copy per shard with leaves of its own (same parameter ids), so the
    // shards' autodiff graphs stay apart.
    let copy = || M::from_inner(model.valid());
    let parts: Vec<(GradientsParams, Tensor<B::InnerBackend, 1>, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds[1..]
            .iter()
            .map(|range| {
                let (copy, range) = (copy(), range.clone());
                scope.spawn(move || shard(copy, range))
            })
            .collect();
        // The first shard runs on the calling thread: where that is a thread
        // of the CPU kernels' pool (`diffusion_flex_kernels::join_global_pool`),
        // blocking in `join` meanwhile would leave that share idle.
        let first = shard(copy(), bounds[0].clone());
        std::iter::once(first)
            .chain(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
            )
            .collect()
    });
    let mut total = None;
    let mut weighted = Vec::with_capacity(parts.len());
    for (grads, l, w) in parts {
        let l = l.mul_scalar(w);
        total = Some(match total {
            Some(acc) => acc + l,
            None => l,
        });
        weighted.push((grads, w));
    }
    let mut merge = Merge {
        parts: weighted,
        merged: GradientsParams::new(),
    };
    model.visit(&mut merge);
    (merge.merged, total.expect("at least one shard"))
}

/// Σ w_k·g_k over the shards' gradients, parameter by parameter, in a fixed
/// order (deterministic).
struct Merge {
    parts: Vec<(GradientsParams, f64)>,
    merged: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Merge {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let mut acc: Option<Tensor<B::InnerBackend, D>> = None;
        for (grads, w) in &mut self.parts {
            if let Some(g) = grads.remove::<B::InnerBackend, D>(param.id) {
                let g = g.mul_scalar(*w);
                acc = Some(match acc {
                    Some(a) => a + g,
                    None => g,
                });
            }
        }
        if let Some(g) = acc {
            self.merged.register(param.id, g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Distribution, Tensor};

    type B = Autodiff<Flex>;

    #[test]
    fn sharded_gradients_equal_the_whole_batch_gradient() {
        let device = Default::default();
        <B as burn::tensor::backend::Backend>::seed(&device, 1);
        let model: Linear<B> = LinearConfig::new(5, 3).init(&device);
        let x = Tensor::<B, 2>::random([10, 5], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<B, 2>::random([10, 3], Distribution::Normal(0.0, 1.0), &device);
        let mse = |m: &Linear<B>, r: Range<usize>| {
            let (a, n) = (r.start, r.len());
            (m.forward(x.clone().narrow(0, a, n)) - y.clone().narrow(0, a, n))
                .powi_scalar(2)
                .mean()
        };
        let grad = |g: &GradientsParams| {
            g.get::<Flex, 2>(model.weight.id)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let (whole, l1) = sharded_gradients(&model, 10, 1, mse);
        // 3 uneven shards (3, 3, 4 samples): weights 0.3, 0.3, 0.4.
        let (split, l3) = sharded_gradients(&model, 10, 3, mse);
        let (a, b) = (grad(&whole), grad(&split));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
        let (l1, l3): (f32, f32) = (l1.into_scalar(), l3.into_scalar());
        assert!((l1 - l3).abs() < 1e-6, "{l1} vs {l3}");
        // The bias gradient is merged too.
        let bias = model.bias.as_ref().unwrap().id;
        assert!(split.get::<Flex, 1>(bias).is_some());
    }
}
