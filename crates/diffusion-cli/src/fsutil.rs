//! Files written so that a kill at any moment leaves the old version intact
//! ([`diffusion_train::atomic`], with the file named in errors).

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `path` through `write` into a temp file beside it, syncs it, and
/// renames it into place.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    diffusion_train::atomic::write_atomically(path, write)
        .with_context(|| format!("writing {}", path.display()))
}

/// `write_atomically` for bytes.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    diffusion_train::atomic::write_bytes_atomically(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}
