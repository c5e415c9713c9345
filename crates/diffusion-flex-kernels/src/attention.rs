//! Attention on the CPU backend through the flash kernel (`flash.rs`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::f32s;
use super::flash::{self, Dims};

/// burn's own attention op, used for shapes the flash kernel does not
/// cover (and as the reference in the tests).
pub fn generic<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
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

/// Attention through the flash kernel on `Flex`: no score matrix is materialised.
pub fn inference(q: Tensor<Flex, 3>, k: Tensor<Flex, 3>, v: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
    let Some(dims) = flash_dims(&q, &k, &v) else {
        return generic(q, k, v);
    };
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor().to_contiguous());
    let (o, _) = forward(&q, &k, &v, dims);
    Tensor::from_primitive(TensorPrimitive::Float(o))
}

/// Attention through the flash kernel under autodiff: the forward pass keeps q, k,
/// v, the output and one log-sum-exp per row; the backward pass recomputes
/// the probabilities block by block.
pub fn autodiff(
    q: Tensor<Autodiff<Flex>, 3>,
    k: Tensor<Autodiff<Flex>, 3>,
    v: Tensor<Autodiff<Flex>, 3>,
) -> Tensor<Autodiff<Flex>, 3> {
    let Some(dims) = flash_dims(&q, &k, &v) else {
        return generic(q, k, v);
    };
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
    let [qf, kf, vf] = [&q, &k, &v].map(|t| t.primitive.to_contiguous());
    let (o, lse) = forward(&qf, &kf, &vf, dims);
    let out = match FlashBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            FlashState {
                q: qf,
                k: kf,
                v: vf,
                o: o.clone(),
                lse,
                dims,
            },
            o,
        ),
        OpsKind::UnTracked(prep) => prep.finish(o),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The shapes when the kernel applies (f32 self-attention: q, k and v of
/// one shape); None otherwise.
fn flash_dims<B: Backend>(q: &Tensor<B, 3>, k: &Tensor<B, 3>, v: &Tensor<B, 3>) -> Option<Dims> {
    let [batch, len, d] = q.dims();
    let same = k.dims() == [batch, len, d] && v.dims() == [batch, len, d];
    (q.dtype() == DType::F32 && same).then_some(Dims { batch, len, d })
}

/// [`flash::forward`] on contiguous tensors: the output and the
/// log-sum-exp of each score row.
fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, dims: Dims) -> (FlexTensor, Vec<f32>) {
    let (o, lse) = flash::forward(f32s(q), f32s(k), f32s(v), dims);
    (
        FlexTensor::from_data(TensorData::new(o, [dims.batch, dims.len, dims.d])),
        lse,
    )
}

#[derive(Debug, Clone)]
struct FlashState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    o: FlexTensor,
    lse: Vec<f32>,
    dims: Dims,
}

#[derive(Debug)]
struct FlashBackward;

impl Backward<Flex, 3> for FlashBackward {
    type State = FlashState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dq, dk, dv) = flash::backward(
            f32s(&st.q),
            f32s(&st.k),
            f32s(&st.v),
            f32s(&st.o),
            &st.lse,
            f32s(&grad),
            st.dims,
        );
        let shape = [st.dims.batch, st.dims.len, st.dims.d];
        for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(g, shape)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff as max_diff, values};
    use burn::tensor::Distribution;

    #[test]
    fn flash_attention_and_its_gradients_match_the_generic_kernel() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        // Lengths below, at and across the 64-row block; 784 as at 28x28.
        for (batch, len, d) in [(2, 50, 8), (3, 64, 4), (2, 130, 16), (1, 784, 16)] {
            let make =
                |sd: f64| Tensor::<Flex, 3>::random([batch, len, d], Distribution::Normal(0.0, sd), &device);
            let (q, k, v) = (make(2.0), make(2.0), make(1.0));
            let n = batch * len * d;
            let w: Vec<f32> = (0..n).map(|i| 0.1 * (1 + i % 9) as f32).collect();
            let w = Tensor::<Ad, 1>::from_floats(w.as_slice(), &device).reshape([batch, len, d]);
            let run = |f: fn(Tensor<Ad, 3>, Tensor<Ad, 3>, Tensor<Ad, 3>) -> Tensor<Ad, 3>| {
                let [q, k, v] = [&q, &k, &v].map(|t| Tensor::<Ad, 3>::from_inner(t.clone()).require_grad());
                let y = f(q.clone(), k.clone(), v.clone());
                let out = values(y.clone());
                let grads = (y * w.clone()).sum().backward();
                let g: Vec<Vec<f32>> = [q, k, v]
                    .iter()
                    .map(|t| values(t.grad(&grads).unwrap()))
                    .collect();
                (out, g)
            };
            let (ours, ours_g) = run(autodiff);
            let (generic, generic_g) = run(crate::attention::generic::<Ad>);
            let what = format!("batch {batch} len {len} d {d}");
            assert!(
                max_diff(&ours, &generic) < 2e-5,
                "{what}: output {}",
                max_diff(&ours, &generic)
            );
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(ours_g.iter().zip(&generic_g)) {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(
                    max_diff(a, b) < 2e-5 * scale.max(1.0),
                    "{what}: {name} {} (max {scale})",
                    max_diff(a, b)
                );
            }
            let inference = values(inference(q.clone(), k.clone(), v.clone()));
            assert!(max_diff(&inference, &generic) < 2e-5, "{what}: inference");
        }
    }
}
