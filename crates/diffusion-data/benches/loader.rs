//! Loader throughput: host batches of 128 from the 60,000 MNIST training
//! images (gather + scale to [-1, 1]), with 0 (inline), 1 and 2 workers.
//!
//! `cargo bench -p diffusion-data --bench loader`

// `criterion_group!` defines a public function it gives no doc comment.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diffusion_data::{load_split, BatchLoader, Split};

const BATCH: usize = 128;

fn loader(c: &mut Criterion) {
    let set = Arc::new(load_split(&bundled_mnist_dir(), Split::Train).expect("bundled MNIST"));
    let mut group = c.benchmark_group("loader-batch-128");
    group.sample_size(10);
    for workers in [0, 1, 2] {
        let loader = BatchLoader::new(set.clone(), BATCH, 0, workers);
        let images = (loader.batches_per_epoch() * BATCH) as u64;

        // A plain measurement over three epochs, printed for reports.
        let t = Instant::now();
        let mut n = 0usize;
        for epoch in 0..3 {
            for batch in loader.epoch(epoch, 0) {
                n += batch.len;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "loader: batch {BATCH}, {workers} worker(s): {:.0} img/s ({n} images in {:.1} ms)",
            n as f64 / secs,
            secs * 1e3
        );

        group.throughput(Throughput::Elements(images));
        group.bench_function(format!("epoch/{workers}-workers"), |b| {
            b.iter(|| loader.epoch(0, 0).map(|batch| batch.len).sum::<usize>())
        });
    }
    group.finish();
}

criterion_group!(benches, loader);
criterion_main!(benches);

/// The MNIST copy bundled in this repository.
fn bundled_mnist_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")
}
