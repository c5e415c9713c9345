//! Decoding and verifying MNIST: the 60,000 training images from the
//! bundled .gz (inflate + header checks + SHA-256), the same from an
//! uncompressed copy, and a whole named split (images and labels).
//!
//! `cargo bench -p diffusion-data --bench idx`

// `criterion_group!` defines a public function it gives no doc comment.
#![allow(missing_docs)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diffusion_data::idx::read_idx;
use diffusion_data::{load_named, DatasetName, FileKind, Split};

fn decode(c: &mut Criterion) {
    let gz = bundled_mnist_dir().join("train-images-idx3-ubyte.gz");

    // One timed pass first, printed plainly for reports.
    let t = Instant::now();
    let file = read_idx(&gz, FileKind::Images).expect("bundled MNIST");
    println!(
        "decode+verify {:?}: {} images in {:.1} ms (one pass, one thread)",
        gz.file_name().unwrap(),
        file.dims[0],
        t.elapsed().as_secs_f64() * 1e3
    );

    // An uncompressed copy, to separate inflating from checking and hashing.
    let raw = std::env::temp_dir().join(format!("diffusion-data-bench-{}", std::process::id()));
    let mut bytes = vec![0, 0, 8, 3];
    for d in &file.dims {
        bytes.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(&file.data);
    std::fs::write(&raw, &bytes).unwrap();

    let mut group = c.benchmark_group("mnist-train-images");
    group.sample_size(10);
    group.throughput(Throughput::Elements(file.dims[0] as u64));
    group.bench_function("gz: inflate+check+sha256", |b| {
        b.iter(|| read_idx(&gz, FileKind::Images).unwrap())
    });
    group.bench_function("raw: read+check+sha256", |b| {
        b.iter(|| read_idx(&raw, FileKind::Images).unwrap())
    });
    group.bench_function("load_named(mnist, train)", |b| {
        b.iter(|| load_named(DatasetName::Mnist, &bundled_mnist_dir(), Split::Train).unwrap())
    });
    group.finish();
    let _ = std::fs::remove_file(&raw);
}

criterion_group!(benches, decode);
criterion_main!(benches);

/// The MNIST copy bundled in this repository.
fn bundled_mnist_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")
}
