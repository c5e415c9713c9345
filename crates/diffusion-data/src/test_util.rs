//! Helpers for this crate's unit tests: temporary directories and small
//! IDX files made on the spot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use flate2::write::GzEncoder;
use flate2::Compression;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("diffusion-data-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` inside the directory; returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An unsigned-byte IDX file with these dimensions and data.
pub fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// gzip-compressed `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes a small data set of `n` images of `h`×`w` into `dir` (all four
/// files, gzipped): image i is filled with the value i mod 256 and has
/// label i mod 10.
pub fn write_tiny_set(dir: &Path, n_train: usize, n_test: usize, h: usize, w: usize) {
    for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
        let images: Vec<u8> = (0..n)
            .flat_map(|i| std::iter::repeat_n((i % 256) as u8, h * w))
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let img = idx_bytes(&[n as u32, h as u32, w as u32], &images);
        let lab = idx_bytes(&[n as u32], &labels);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte.gz")), gzip(&img)).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), gzip(&lab)).unwrap();
    }
}

/// The MNIST copy bundled in this repository (tests only: a crate used as
/// a dependency has no such folder).
pub fn bundled_mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")
}

/// The real Fashion-MNIST in the default data folder, or `None` (with a
/// note) when it is not there.
pub fn real_fashion_mnist(check: &str) -> Option<PathBuf> {
    let dir = crate::default_dir(crate::DatasetName::FashionMnist);
    if crate::is_present(&dir) {
        Some(dir)
    } else {
        println!(
            "note: no Fashion-MNIST in {} (set {} or run `diffusion download fashion-mnist`); skipping {check}",
            dir.display(),
            crate::DATA_DIR_ENV
        );
        None
    }
}
