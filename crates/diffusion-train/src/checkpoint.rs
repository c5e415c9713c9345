//! Checkpoints of a training run: model, EMA and optimizer state and the
//! [`TrainState`] (step, epoch, position, random state).
//!
//! Layout inside a run directory:
//!
//! ```text
//! checkpoints/
//!   latest.json            {"dir": "step-00000500", "state": {...}}
//!   step-00000500/
//!     model.mpk  ema.mpk  optimizer.mpk
//! ```
//!
//! Each checkpoint folder is written in full under a temporary name
//! (`step-N.partial`) and then renamed; `latest.json` names the newest
//! complete one, with the SHA-256 of each of its files, and is itself
//! replaced atomically; older folders are removed afterwards. A kill at any
//! moment therefore leaves the last good checkpoint intact and pointed at,
//! and a file changed afterwards (a flipped byte, a truncation) is refused
//! when loaded. Loaded weights are also checked against the model they are
//! loaded into (every parameter's path and shape) and for NaN or infinite
//! values, before anything computes with them.
//!
//! Indexes written before checksums existed (no `files` entry) still load,
//! without the checksum check.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, NamedMpkFileRecorder, Record};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic::write_bytes_atomically;
use crate::params;

/// The recorder of every weights file: named MessagePack, f32.
pub type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// The model's weights file in a checkpoint folder (without `.mpk`).
pub const MODEL: &str = "model";
/// The EMA weights file.
pub const EMA: &str = "ema";
/// The optimizer state file.
pub const OPTIMIZER: &str = "optimizer";
/// The checkpoint index inside `checkpoints/`.
pub const LATEST: &str = "latest.json";

/// Where training stands. Together with the run's seed it is the whole
/// random state: every step seeds the backend's generator with
/// `mix_seed(seed, step)`, and the data order is a function of
/// `(seed, epoch)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch the next step belongs to (from 0).
    pub epoch: u64,
    /// Batch of that epoch the next step uses.
    pub batch_in_epoch: u64,
    /// EMA updates done.
    pub ema_updates: u64,
    /// Whether every epoch is done.
    pub finished: bool,
}

impl TrainState {
    /// The state of a run that has not started.
    pub fn start() -> Self {
        Self {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            ema_updates: 0,
            finished: false,
        }
    }
}

/// Why a checkpoint could not be written or read. Each message is one line
/// that names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No `latest.json`: the run has no checkpoint yet.
    #[error("{}: no checkpoint found; train first, or point at a run directory made by `train`", .path.display())]
    NotFound {
        /// The index that is missing.
        path: PathBuf,
    },
    /// `latest.json` is not what a checkpoint index looks like.
    #[error("{}: corrupt checkpoint index ({reason})", .path.display())]
    CorruptIndex {
        /// The index.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The folder `latest.json` names is gone.
    #[error("{}: the checkpoint named by latest.json is missing", .path.display())]
    Missing {
        /// The folder.
        path: PathBuf,
    },
    /// A weights or optimizer file that does not load.
    #[error("{}: cannot load the {what} ({reason}); the checkpoint is corrupt or from another model", .path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// `weights` or `optimizer state`.
        what: &'static str,
        /// The recorder's message.
        reason: String,
    },
    /// A file that could not be written.
    #[error("{}: cannot save the {what}: {reason}", .path.display())]
    Save {
        /// The file.
        path: PathBuf,
        /// What was being saved.
        what: &'static str,
        /// The recorder's message.
        reason: String,
    },
    /// Weights whose parameters differ from the model's (another
    /// configuration).
    #[error("{}: these weights are for another model configuration: {detail}", .path.display())]
    WrongModel {
        /// The weights file.
        path: PathBuf,
        /// The first difference.
        detail: String,
    },
    /// Weights holding NaN or infinite values.
    #[error("{}: the weights hold NaN or infinite values (first in {param}); they cannot be used", .path.display())]
    NonFiniteWeights {
        /// The weights file.
        path: PathBuf,
        /// The first parameter with such a value.
        param: String,
    },
    /// A file whose bytes changed since the checkpoint was written.
    #[error("{}: the file changed since it was written (SHA-256 {actual}, the index recorded {expected}); the checkpoint is corrupt", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The checksum in `latest.json`.
        expected: String,
        /// The checksum of the file now.
        actual: String,
    },
    /// The loss became NaN or infinite: the state is not saved.
    #[error("the loss became {loss} by step {step}; no checkpoint of this state was written, the last good one stays latest")]
    NonFiniteLoss {
        /// The step by which it happened.
        step: u64,
        /// The value read back.
        loss: f64,
    },
    /// A file-system error (a full disk, say).
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error (part of the message, so not a separate `source`).
        error: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Latest {
    dir: String,
    state: TrainState,
    /// SHA-256 (hex) of each file of the checkpoint folder, by file name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    files: BTreeMap<String, String>,
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `RUN_DIR/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint for `state` through `save(dir)` (which writes the
/// files into the new folder `dir`), then points `latest.json` at it and
/// removes older checkpoints. Returns the new folder.
pub fn write(
    run_dir: &Path,
    state: TrainState,
    save: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    let root = checkpoints_dir(run_dir);
    let name = format!("step-{:08}", state.step);
    let final_dir = root.join(&name);
    let tmp_dir = root.join(format!("{name}.partial"));
    // Leftovers of earlier failures (folders latest.json does not name,
    // partial ones, temporary index files) go first, so that a disk with
    // room for two checkpoints always has room for the next one. The
    // caller holds the run's lock: nobody else writes here.
    // Only when the index names a folder are other complete folders
    // removed (an unreadable index removes nothing but partial leftovers).
    let named = fs::read_to_string(root.join(LATEST))
        .ok()
        .and_then(|t| serde_json::from_str::<Latest>(&t).ok())
        .map(|l| l.dir);
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            let file_name = entry.file_name().to_string_lossy().to_string();
            let orphan = file_name.starts_with("step-")
                && (file_name.ends_with(".partial") || named.as_deref().is_some_and(|n| n != file_name));
            if orphan && path.is_dir() {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            } else if file_name.starts_with(&format!("{LATEST}.tmp-")) {
                let _ = fs::remove_file(&path);
            }
        }
    }
    fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
    let files = save(&tmp_dir).and_then(|()| {
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(&tmp_dir).map_err(io_err(&tmp_dir))? {
            let path = entry.map_err(io_err(&tmp_dir))?.path();
            // Written files reach the disk before the index names them.
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
            let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
            files.insert(name, sha256_file(&path)?);
        }
        Ok(files)
    });
    let files = match files {
        Ok(f) => f,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(e);
        }
    };
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    fs::rename(&tmp_dir, &final_dir).map_err(io_err(&tmp_dir))?;
    let latest = serde_json::to_string_pretty(&Latest {
        dir: name.clone(),
        state,
        files,
    })
    .expect("a checkpoint index serialises");
    let index = root.join(LATEST);
    if let Err(e) = write_bytes_atomically(&index, latest.as_bytes()) {
        // Not pointed at: it would only take space.
        let _ = fs::remove_dir_all(&final_dir);
        return Err(io_err(&index)(e));
    }
    // Older checkpoints (and partial leftovers of killed runs) go.
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().to_string();
            if file_name.starts_with("step-") && file_name != name && entry.path().is_dir() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(final_dir)
}

/// The newest complete checkpoint of a run: its folder and its state.
pub fn latest(run_dir: &Path) -> Result<(PathBuf, TrainState), CheckpointError> {
    let path = checkpoints_dir(run_dir).join(LATEST);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CheckpointError::NotFound { path }),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let latest: Latest = serde_json::from_str(&text).map_err(|e| CheckpointError::CorruptIndex {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if latest.dir.is_empty() || latest.dir.contains(['/', '\\']) || latest.dir.starts_with('.') {
        return Err(CheckpointError::CorruptIndex {
            path,
            reason: format!("it names {:?}, not a checkpoint folder", latest.dir),
        });
    }
    let dir = checkpoints_dir(run_dir).join(&latest.dir);
    if !dir.is_dir() {
        return Err(CheckpointError::Missing { path: dir });
    }
    for (name, expected) in &latest.files {
        let file = dir.join(name);
        if !file.is_file() {
            return Err(CheckpointError::Missing { path: file });
        }
        let actual = sha256_file(&file)?;
        if &actual != expected {
            return Err(CheckpointError::Corrupt {
                path: file,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok((dir, latest.state))
}

/// Saves a module's weights as `file`.mpk.
pub fn save_module<B: Backend, M: Module<B>>(module: M, file: &Path) -> Result<(), CheckpointError> {
    save_record::<B, _>(module.into_record(), file, "weights")
}

/// Saves a record (weights, optimizer state) as `file`.mpk in the format
/// of [`Recorder`]: encoded in memory first, so that a failed write (a full
/// disk) is reported as the file-system error it is.
pub fn save_record<B: Backend, R: Record<B>>(
    record: R,
    file: &Path,
    what: &'static str,
) -> Result<(), CheckpointError> {
    let path = file.with_extension("mpk");
    let bytes = burn::record::Recorder::<B>::record(
        &NamedMpkBytesRecorder::<FullPrecisionSettings>::new(),
        record,
        (),
    )
    .map_err(|e| CheckpointError::Save {
        path: path.clone(),
        what,
        reason: e.to_string(),
    })?;
    fs::write(&path, bytes).map_err(io_err(&path))
}

/// Loads weights saved by [`save_module`] (`file`.mpk) into `module`, and
/// checks them: every parameter's path and shape as in `module`, every
/// value finite.
pub fn load_module<B: Backend, M: Module<B>>(
    module: M,
    file: &Path,
    device: &B::Device,
) -> Result<M, CheckpointError> {
    let path = file.with_extension("mpk");
    if !path.is_file() {
        return Err(CheckpointError::Missing { path });
    }
    let expected = params::describe(&module);
    let loaded = decode_guarded(&path, "weights", || {
        module.load_file(file.to_path_buf(), &Recorder::new(), device)
    })?
    .map_err(|e| CheckpointError::Load {
        path: path.clone(),
        what: "weights",
        reason: recorder_reason(&e.to_string()),
    })?;
    check_loaded(&expected, loaded, &path)
}

/// Runs a decoder of file contents, turning a panic inside it into an
/// error naming the file ([`params::decode_guarded`]: burn 0.21's record
/// decoding panics on some malformed files instead of returning an error).
pub fn decode_guarded<T>(
    path: &Path,
    what: &'static str,
    decode: impl FnOnce() -> T,
) -> Result<T, CheckpointError> {
    params::decode_guarded(decode).map_err(|message| CheckpointError::Load {
        path: path.to_path_buf(),
        what,
        reason: format!("{message} (the file is corrupt)"),
    })
}

/// Checks weights just loaded into a module built as `expected` describes.
pub fn check_loaded<B: Backend, M: Module<B>>(
    expected: &[params::ParamInfo],
    loaded: M,
    path: &Path,
) -> Result<M, CheckpointError> {
    if let Some(detail) = params::mismatch(expected, &params::describe(&loaded)) {
        return Err(CheckpointError::WrongModel {
            path: path.to_path_buf(),
            detail,
        });
    }
    if let Some(param) = params::first_non_finite(&loaded) {
        return Err(CheckpointError::NonFiniteWeights {
            path: path.to_path_buf(),
            param,
        });
    }
    Ok(loaded)
}

/// The recorder's message, first line only; a truncated file makes the
/// decoder talk about its own internals, which helps nobody.
fn recorder_reason(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    if first.contains("feature") || first.contains("unexpected end") || first.is_empty() {
        "the file is truncated or not a weights file".to_string()
    } else {
        first.to_string()
    }
}
