//! Hostile input and faults against the `diffusion` binary: each case once
//! crashed it, hung it, lost work or let a broken model through. Every
//! failure must be one `error:` line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[path = "support/mod.rs"]
mod support;
use support::*;

fn sample(run: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.args([
        "sample",
        "--backend",
        "cpu",
        "--n",
        "4",
        "--steps",
        "2",
        "--checkpoint",
    ])
    .arg(run)
    .arg("--out")
    .arg(out.join("grid.png"));
    cmd
}

fn latest_dir(run: &Path) -> PathBuf {
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/latest.json")).unwrap()).unwrap();
    run.join("checkpoints").join(latest["dir"].as_str().unwrap())
}

/// A safetensors file by hand: 8-byte header length, JSON header, data.
fn safetensors(path: &Path, tensors: &[(&str, &str, &[usize], Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn weights_files_are_checked_before_use() {
    let root = scratch("weights");
    let run = root.join("run");
    train_tiny(&run, &["--epochs", "1"]);

    // An integer tensor where a float weight belongs: once a SIGSEGV.
    let bad = root.join("int.safetensors");
    safetensors(
        &bad,
        &[(
            "final_conv.sequential.4.bias",
            "I32",
            &[1],
            7i32.to_le_bytes().to_vec(),
        )],
    );
    let e = fails(
        bin()
            .args(["import", "--backend", "cpu", "--safetensors"])
            .arg(&bad)
            .arg("--out")
            .arg(root.join("i")),
    );
    assert!(
        e.contains("int.safetensors") && e.contains("floating point"),
        "{e}"
    );

    // Reference weights holding a NaN: refused by import.
    let st = root.join("export.safetensors");
    ok(bin()
        .args(["export", "--backend", "cpu", "--checkpoint"])
        .arg(&run)
        .arg("--safetensors")
        .arg(&st));
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    let config = root.join("unet.json");
    let run_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    std::fs::write(&config, run_config["model"].to_string()).unwrap();
    let e = fails(
        bin()
            .args(["import", "--backend", "cpu", "--safetensors"])
            .arg(&st)
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(root.join("nan")),
    );
    assert!(e.contains("NaN or infinite"), "{e}");

    // A byte flipped inside a checkpoint's weights: sample refuses.
    let copy = root.join("flipped");
    copy_dir(&run, &copy);
    let ema = latest_dir(&copy).join("ema.mpk");
    let mut bytes = std::fs::read(&ema).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&ema, &bytes).unwrap();
    let e = fails(&mut sample(&copy, &root));
    assert!(
        e.contains("ema.mpk") && e.contains("changed since it was written"),
        "{e}"
    );

    // Weights of another configuration beside this config.json: sample and
    // --resume refuse (resume once said "already finished" and exited 0).
    let other = root.join("other");
    copy_dir(&run, &other);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("config.json")).unwrap()).unwrap();
    cfg["model"]["widths"] = serde_json::json!([8, 16, 16, 64]);
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    let e = fails(&mut sample(&other, &root));
    assert!(
        e.contains("another model configuration") && e.contains("shape"),
        "{e}"
    );
    let e = fails(bin().args(["train", "--backend", "cpu", "--resume"]).arg(&other));
    assert!(e.contains("another model configuration"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn configs_edited_by_hand_are_validated() {
    let root = scratch("config");
    let run = root.join("run");
    train_tiny(&run, &["--epochs", "1"]);
    let original = std::fs::read_to_string(run.join("config.json")).unwrap();
    for (field, value, said) in [
        ("log_every", serde_json::json!(0), "log_every"),
        ("batch_size", serde_json::json!(0), "batch_size"),
        ("lr", serde_json::json!(-1.0), "lr"),
        ("shards", serde_json::json!(0), "shards"),
    ] {
        let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
        cfg["train"][field] = value;
        std::fs::write(run.join("config.json"), cfg.to_string()).unwrap();
        let e = fails(
            bin()
                .args(["train", "--backend", "cpu", "--epochs", "2", "--resume"])
                .arg(&run),
        );
        assert!(e.contains("config.json") && e.contains(said), "{field}: {e}");
    }
    std::fs::write(run.join("config.json"), &original).unwrap();
    // --resume that does nothing, or fails, leaves config.json as it was.
    let before = std::fs::metadata(run.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    let text = ok(bin()
        .args(["train", "--backend", "cpu", "--epochs", "1", "--resume"])
        .arg(&run));
    assert!(text.contains("already finished"), "{text}");
    fails(
        bin()
            .args(["train", "--backend", "cpu", "--epochs", "0", "--resume"])
            .arg(&run),
    );
    let after = std::fs::metadata(run.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(
        std::fs::read_to_string(run.join("config.json")).unwrap(),
        original
    );
}

#[test]
fn flags_that_make_no_sense_are_refused() {
    let root = scratch("flags");
    let out = root.join("r");
    let train = |extra: &[&str]| {
        let mut cmd = bin();
        cmd.args(["train", "--backend", "cpu", "--preset", "tiny", "--out"])
            .arg(&out)
            .args(extra);
        cmd
    };
    let e = fails(&mut train(&["--shards", "0"]));
    assert!(e.contains("shards"), "{e}");
    let e = fails(&mut train(&["--stop-after", "0"]));
    assert!(e.contains("--stop-after"), "{e}");
    // MNIST files under the Fashion-MNIST name.
    let mnist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist");
    let e = fails(train(&["--dataset", "fashion-mnist", "--data-dir"]).arg(&mnist));
    assert!(e.contains("mnist") && e.contains("fashion-mnist"), "{e}");
    assert!(
        !out.join("config.json").exists(),
        "nothing written for a refused run"
    );

    let run = root.join("run");
    train_tiny(&run, &["--epochs", "1"]);
    let e = fails(sample(&run, &root).args(["--sampler", "dpm-solver++", "--eta", "0.5"]));
    assert!(e.contains("--eta"), "{e}");
    let e = fails(
        bin()
            .args(["sample", "--backend", "cpu", "--n", "100000000", "--checkpoint"])
            .arg(&run),
    );
    assert!(e.contains("--n"), "{e}");
    // Start noise holding a NaN (once an all-NaN .npy and a black grid).
    let noise = root.join("noise.npy");
    let mut values = vec![0.5f32; 2 * 784];
    values[900] = f32::NAN;
    write_npy(&noise, &[2, 1, 28, 28], &values);
    let e = fails(sample(&run, &root).arg("--noise").arg(&noise));
    assert!(e.contains("noise.npy") && e.contains("non-finite"), "{e}");
}

#[test]
fn eval_refuses_nonsense_labels_and_images() {
    let root = scratch("eval");
    let write = |name: &str, shape: &[usize], data: &[f32]| {
        let path = root.join(name);
        write_npy(&path, shape, data);
        path
    };
    let images = write("images.npy", &[3, 1, 28, 28], &vec![0.0; 3 * 784]);
    let eval = |images: &Path, labels: &Path| {
        let mut cmd = bin();
        cmd.args(["eval", "--backend", "cpu", "--npy"])
            .arg(images)
            .arg("--labels")
            .arg(labels);
        cmd
    };
    for (name, shape, labels) in [
        ("minus.npy", vec![3], vec![0.0, -1.0, 2.0]),
        ("nan.npy", vec![3], vec![0.0, f32::NAN, 2.0]),
        ("frac.npy", vec![3], vec![0.0, 3.7, 2.0]),
    ] {
        let l = write(name, &shape, &labels);
        let e = fails(&mut eval(&images, &l));
        assert!(e.contains(name) && e.contains("label 1"), "{name}: {e}");
    }
    let flat = write("two-d.npy", &[3, 1], &[0.0, 1.0, 2.0]);
    let e = fails(&mut eval(&images, &flat));
    assert!(e.contains("one-dimensional"), "{e}");
    let labels = write("ok.npy", &[3], &[0.0, 1.0, 2.0]);
    let mut nan_images = vec![0.0; 3 * 784];
    nan_images[800] = f32::NAN;
    let bad = write("nan-images.npy", &[3, 1, 28, 28], &nan_images);
    let e = fails(&mut eval(&bad, &labels));
    assert!(e.contains("image 1") && e.contains("non-finite"), "{e}");
    let one = write("one.npy", &[1, 1, 28, 28], &vec![0.0; 784]);
    let one_label = write("one-label.npy", &[1], &[3.0]);
    let e = fails(&mut eval(&one, &one_label));
    assert!(e.contains("at least 2"), "{e}");
}

#[test]
fn a_closed_stdout_still_gets_every_file_written() {
    let root = scratch("pipe");
    let run = root.join("run");
    train_tiny(&run, &["--epochs", "1"]);
    let npy = root.join("s.npy");
    let gif = root.join("s.gif");
    let mut child = sample(&run, &root)
        .arg("--npy")
        .arg(&npy)
        .arg("--gif")
        .arg(&gif)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, as with `| head -c0`
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(npy.is_file() && gif.is_file() && root.join("grid.png").is_file());
}

#[test]
fn runs_without_a_checkpoint_are_no_dead_end() {
    let root = scratch("dead-end");
    let run = root.join("run");
    train_tiny(&run, &["--epochs", "1"]);
    // As if killed before its first checkpoint: config.json, no checkpoints.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let e = fails(
        bin()
            .args(["train", "--backend", "cpu", "--preset", "tiny", "--out"])
            .arg(&run),
    );
    assert!(
        e.contains("before its first checkpoint") && e.contains("--resume"),
        "{e}"
    );
    let text = ok(bin().args(["train", "--backend", "cpu", "--resume"]).arg(&run));
    assert!(text.contains("starting it from step 0"), "{text}");
    assert!(run.join("checkpoints/latest.json").is_file());
    // A stale lock left by a killed process is taken over, with a note.
    std::fs::write(run.join(".lock"), "4194311\n").unwrap();
    let text = ok(bin()
        .args(["train", "--backend", "cpu", "--epochs", "2", "--resume"])
        .arg(&run));
    assert!(text.contains("stale lock of process 4194311"), "{text}");
    assert!(!run.join(".lock").exists(), "the lock is released on exit");
}

#[test]
fn two_trainings_into_one_folder_cannot_mix() {
    let root = scratch("two");
    let run = root.join("run");
    let start = |seed: &str| {
        bin()
            .args([
                "train",
                "--backend",
                "cpu",
                "--preset",
                "tiny",
                "--seed",
                seed,
                "--out",
            ])
            .arg(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start("1"), start("2"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let winners: Vec<&Output> = [&a, &b].into_iter().filter(|o| o.status.success()).collect();
    assert_eq!(winners.len(), 1, "exactly one may train: {a:?} {b:?}");
    let loser = if a.status.success() { &b } else { &a };
    let said = String::from_utf8_lossy(&loser.stderr);
    assert!(
        said.contains("is using this run directory") || said.contains("already holds a run"),
        "{said}"
    );
    // The folder is the winner's alone: its seed in config.json, every step in metrics.
    let seed = if a.status.success() { 1 } else { 2 };
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["train"]["seed"], seed);
    let rows = std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows, 1 + 32);
}

#[test]
fn sigterm_saves_a_checkpoint_like_ctrl_c() {
    let root = scratch("sigterm");
    let run = root.join("run");
    let child = bin()
        .args([
            "train",
            "--backend",
            "cpu",
            "--preset",
            "tiny",
            "--epochs",
            "100",
            "--out",
        ])
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is training (a few metrics rows), then send SIGTERM.
    wait_until_training(&run);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("checkpoint saved"), "{stderr}");
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/latest.json")).unwrap()).unwrap();
    assert!(latest["state"]["step"].as_u64().unwrap() >= 3);
}
