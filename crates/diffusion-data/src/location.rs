//! Where data sets live on disk when the caller names no folder.
//!
//! Every loading function takes the folder as an argument; this module
//! only answers "where by default", the way burn's own MNIST data set does:
//! the folder named by the environment variable [`DATA_DIR_ENV`] if set,
//! else a per-user cache folder (`$XDG_CACHE_HOME/diffusion-rs`, or
//! `~/.cache/diffusion-rs`), each holding one sub-folder per data set
//! (`mnist/`, `fashion-mnist/`). [`crate::download()`] fills it. Nothing
//! here depends on where this crate's source lives, so it works the same
//! when the crate is a dependency of another project.

use std::path::PathBuf;

use crate::name::DatasetName;

/// The environment variable that overrides the data root.
pub const DATA_DIR_ENV: &str = "DIFFUSION_DATA_DIR";

/// The folder that holds one sub-folder per data set: `$DIFFUSION_DATA_DIR`,
/// else `$XDG_CACHE_HOME/diffusion-rs`, else `$HOME/.cache/diffusion-rs`,
/// else `./data` when no home folder is known.
pub fn data_root() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var(DATA_DIR_ENV) {
        return dir;
    }
    if let Some(cache) = var("XDG_CACHE_HOME") {
        return cache.join("diffusion-rs");
    }
    if let Some(home) = var("HOME").or_else(|| var("USERPROFILE")) {
        return home.join(".cache").join("diffusion-rs");
    }
    PathBuf::from("data")
}

/// Where a named data set is read from (and downloaded to) when no folder
/// is given: `<data_root()>/<name>`.
pub fn default_dir(name: DatasetName) -> PathBuf {
    data_root().join(name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_folder_is_the_root_plus_the_data_set_name() {
        let dir = default_dir(DatasetName::FashionMnist);
        assert_eq!(dir, data_root().join("fashion-mnist"));
        // Never inside this crate's source tree.
        assert!(!dir.starts_with(env!("CARGO_MANIFEST_DIR")), "{}", dir.display());
    }
}
