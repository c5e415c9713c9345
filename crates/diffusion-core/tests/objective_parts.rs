//! A batch drawn in parts (data-parallel replicas, CPU shards) draws what
//! the whole batch draws. In a test binary of its own: the backend's
//! generator is process-wide, so a draw of any other test running in a
//! parallel thread would land between the seed and this test's draws.

use burn::backend::Flex as B;
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_core::rng::with_backend_seed;
use diffusion_core::{Labels, Objective, NO_CLASS};

fn ints(v: &Tensor<B, 1, Int>) -> Vec<i64> {
    v.clone().into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

#[test]
fn parts_of_a_batch_draw_what_the_whole_batch_draws() {
    let device = Default::default();
    let objective = Objective {
        label_dropout: 0.5,
        ..Objective::default()
    };
    let x0 = Tensor::<B, 4>::random([6, 1, 2, 2], Distribution::Normal(0.0, 1.0), &device);
    let labels = Tensor::<B, 1, Int>::from_ints([0, 1, 2, 3, 4, 5], &device);
    // Seeded under the process-wide lock: other tests draw from the
    // same generator in parallel threads.
    let whole = with_backend_seed::<B, _>(&device, 3, || {
        objective.draw(x0.clone(), Some(labels.clone()), 1000)
    });
    let floats = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
    let label_ints = |l: &Labels<B>| match l {
        Labels::WithDropped(l) => ints(l),
        other => panic!("labels not dropped: {other:?}"),
    };
    let mut t = Vec::new();
    let mut eps = Vec::new();
    let mut dropped = Vec::new();
    for (offset, len) in [(0, 2), (2, 4)] {
        let part = with_backend_seed::<B, _>(&device, 3, || {
            objective.draw_part(
                x0.clone().narrow(0, offset, len),
                Some(labels.clone().narrow(0, offset, len)),
                1000,
                offset,
                6,
            )
        });
        t.extend(ints(&part.t));
        eps.extend(floats(part.eps));
        dropped.extend(label_ints(&part.labels));
    }
    assert_eq!(t, ints(&whole.t));
    assert_eq!(eps, floats(whole.eps));
    assert_eq!(dropped, label_ints(&whole.labels));
    // Seed 3 drops some labels and keeps others, so the cut is tested.
    assert!(
        dropped.contains(&NO_CLASS) && dropped.iter().any(|&c| c != NO_CLASS),
        "{dropped:?}"
    );
}
