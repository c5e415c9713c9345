//! Helpers shared by the end-to-end tests (`cli.rs`, `faults.rs`): running
//! the real `diffusion` binary and checking how it ends.
#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `diffusion` binary of this build, or `$DIFFUSION_BIN` when set (a
/// prebuilt binary carried to a machine without cargo, such as
/// scripts/gpu-check.sh's).
pub fn bin() -> Command {
    let path = std::env::var_os("DIFFUSION_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_diffusion").into());
    let mut cmd = Command::new(path);
    cmd.env("NO_COLOR", "1");
    cmd
}

/// A fresh scratch folder under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command; it must not panic, whatever else it does.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the diffusion binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal failure"),
        "a panic: {stderr}"
    );
    out
}

/// Runs a command that must succeed; returns stdout and stderr.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "command failed: {text}");
    text
}

/// The error line of a command that must fail: exactly one line starting
/// with "error:" (clap's usage errors included), a non-zero exit status
/// (not a signal).
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        matches!(out.status.code(), Some(c) if c != 0),
        "command should fail with an exit status: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "want one error line, got: {stderr}");
    errors[0].to_string()
}

/// `diffusion train --preset tiny --out DIR` plus `extra`.
pub fn train_tiny(dir: &Path, extra: &[&str]) -> String {
    ok(bin()
        .args(["train", "--backend", "cpu", "--preset", "tiny", "--out"])
        .arg(dir)
        .args(extra))
}

/// Whether a run in `run_dir` is training: a header and three rows in
/// its metrics.csv.
pub fn is_training(run_dir: &Path) -> bool {
    std::fs::read_to_string(run_dir.join("metrics.csv")).is_ok_and(|t| t.lines().count() >= 4)
}

/// Waits until a run in `run_dir` is training ([`is_training`]); fails the
/// test after 2 minutes.
pub fn wait_until_training(run_dir: &Path) {
    let start = std::time::Instant::now();
    while !is_training(run_dir) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Writes a little-endian f32 .npy file (the format numpy.save writes).
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Reads the values of a little-endian f32 .npy file written by
/// `diffusion sample --npy` (version 1 header).
pub fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x93NUMPY\x01\x00",
        "{}: not a version 1 .npy",
        path.display()
    );
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
