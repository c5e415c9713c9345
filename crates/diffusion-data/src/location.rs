//! Where data sets live on disk.
//!
//! The paths are found from this crate's manifest directory at compile
//! time, so they point into the source tree the binary was built from: the
//! bundled MNIST in `<workspace>/data/mnist`, and a downloaded data set in
//! `<workspace>/data/<name>`. A binary moved elsewhere should be given
//! `--data-dir`.

use std::path::{Path, PathBuf};

use crate::name::DatasetName;

/// The workspace root: two levels above this crate's manifest.
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// `<workspace>/data/mnist`: MNIST as shipped in the repository.
pub fn bundled_mnist_dir() -> PathBuf {
    default_dir(DatasetName::Mnist)
}

/// Where a named data set is read from (and downloaded to) when no
/// directory is given: `<workspace>/data/<name>`. For MNIST that is the
/// bundled copy; `data/.gitignore` keeps downloads out of git.
pub fn default_dir(name: DatasetName) -> PathBuf {
    workspace_dir().join("data").join(name.as_str())
}

/// `<workspace>/../shared/data` if it exists: where developers and CI keep
/// a copy of the project's shared files beside the clone (it holds
/// `mnist/` and `fashion-mnist/`). Tests use it for Fashion-MNIST, which is
/// not bundled, and skip with a note when it is absent.
pub fn shared_data_dir() -> Option<PathBuf> {
    let dir = workspace_dir().join("..").join("shared").join("data");
    dir.is_dir().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_mnist_is_in_the_workspace_data_folder() {
        let dir = bundled_mnist_dir();
        assert!(dir.ends_with("data/mnist"), "{}", dir.display());
        assert!(workspace_dir().join("Cargo.toml").is_file());
        assert!(
            crate::is_present(&dir),
            "bundled MNIST missing at {}",
            dir.display()
        );
    }
}
