//! `join_global_pool`: the calling thread becomes thread 0 of rayon's
//! global pool, and a kernel gives the same bits whether a member or an
//! outside thread calls it. A test binary of its own: the global pool is
//! made once per process, and this one test must be the first to use it.

use burn::backend::Flex;
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Distribution, Tensor};
use rayon::prelude::*;

/// The pool's size as rayon picks it: `RAYON_NUM_THREADS`, else the CPUs.
fn expected_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[test]
fn the_calling_thread_joins_the_pool_and_kernels_keep_their_bits() {
    assert_eq!(rayon::current_thread_index(), None, "not a pool thread before");
    assert!(diffusion_flex_kernels::join_global_pool());
    assert_eq!(rayon::current_thread_index(), Some(0));
    assert_eq!(rayon::current_num_threads(), expected_threads());
    // A second call finds the pool made and changes nothing.
    assert!(!diffusion_flex_kernels::join_global_pool());
    assert_eq!(rayon::current_thread_index(), Some(0));

    // A parallel loop started here runs its first part on this thread
    // (without membership it would be handed to the pool's threads).
    let me = std::thread::current().id();
    let ran_on: Vec<_> = (0..64)
        .into_par_iter()
        .map(|_| std::thread::current().id())
        .collect();
    assert_eq!(ran_on[0], me);

    // A 3x3 conv at 14x14 (Winograd's range) over 81 images, from this member
    // thread and from an outside one whose loops are handed to the pool:
    // the tasks split differently, the bits do not.
    let device = Default::default();
    let conv = Conv2dConfig::new([32, 48], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init::<Flex>(&device);
    let x = Tensor::<Flex, 4>::random([81, 32, 14, 14], Distribution::Normal(0.0, 1.0), &device);
    let here = diffusion_flex_kernels::conv::inference(&conv, x.clone())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let outside = std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(rayon::current_thread_index(), None);
            diffusion_flex_kernels::conv::inference(&conv, x.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        })
        .join()
        .unwrap()
    });
    assert_eq!(here.len(), 81 * 48 * 14 * 14);
    assert!(here.iter().all(|v| v.is_finite()));
    assert!(
        here == outside,
        "a member thread's conv differs from an outside thread's"
    );
}
