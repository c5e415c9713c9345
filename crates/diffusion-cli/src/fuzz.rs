//! Seeded mutation fuzzing of every reader of outside input: IDX files,
//! .npy files, run configs and checkpoint indexes, and weights (checkpoint
//! .mpk, reference safetensors and PyTorch .pt).
//!
//! Each target starts from valid files (plus the committed corpus in
//! `tests/fuzz-corpus/<target>/`) and feeds mutations of them (bit flips,
//! interesting integers, inserted, deleted and spliced bytes, truncations,
//! huge numbers in text) to the same function the binary uses. A panic or a
//! single input taking over 10 s fails the test and leaves the input in the
//! temp folder; every other outcome (a value, or an error) is fine.
//!
//! The test suite runs a few thousand executions per target. A long run:
//!
//!     DIFFUSION_FUZZ_EXECS=1000000 DIFFUSION_FUZZ_THREADS=2 \
//!         cargo test --release -p diffusion-cli fuzz -- --nocapture --test-threads 1
//!
//! (`DIFFUSION_FUZZ_THREADS` threads per target, each with its own
//! generator; a long run prints its progress every minute;
//! `DIFFUSION_FUZZ_TARGETS=mpk,pt` runs only those targets.)
//!
//! `DIFFUSION_FUZZ_SAVE=DIR` also writes one input per distinct error
//! message to `DIR/<target>/` (how the corpus was made).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::backend::Flex;
use diffusion_core::rng::SplitMix64;

/// Executions per target: `DIFFUSION_FUZZ_EXECS`, else `default`.
fn execs(default: u64) -> u64 {
    std::env::var("DIFFUSION_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fresh temp folder for one target.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffusion-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    60_000,
];
const HUGE_TEXT: [&str; 6] = ["-1", "0", "1e309", "NaN", "18446744073709551616", "4294967296"];

/// One to four mutations of `input` (splicing from `seeds`).
fn mutate(rng: &mut SplitMix64, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len() as u64;
        let at = |rng: &mut SplitMix64| if len == 0 { 0 } else { rng.below(len) as usize };
        match rng.below(8) {
            0 if len > 0 => {
                let i = at(rng);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = at(rng);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'-', b'9'][rng.below(6) as usize];
            }
            2 => {
                let i = at(rng);
                let n = 1 + rng.below(16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 1 => {
                let i = at(rng);
                let n = (1 + rng.below(64) as usize).min(v.len() - i);
                v.drain(i..i + n);
            }
            4 if len > 0 => v.truncate(at(rng)),
            5 if len >= 4 => {
                let i = rng.below(len - 3) as usize;
                let x = INTERESTING_U32[rng.below(INTERESTING_U32.len() as u64) as usize];
                let b = if rng.below(2) == 0 {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                };
                v[i..i + 4].copy_from_slice(&b);
            }
            6 if !seeds.is_empty() => {
                let other = &seeds[rng.below(seeds.len() as u64) as usize];
                if !other.is_empty() {
                    let from = rng.below(other.len() as u64) as usize;
                    let n = (1 + rng.below(256) as usize).min(other.len() - from);
                    let i = at(rng);
                    let end = (i + n).min(v.len());
                    v.splice(i..end, other[from..from + n].iter().copied());
                }
            }
            7 => {
                // A run of ASCII digits becomes a huge or odd number.
                if let Some(i) = v.iter().position(|b| b.is_ascii_digit()).map(|first| {
                    let skip = at(rng).max(first);
                    v[skip..]
                        .iter()
                        .position(|b| b.is_ascii_digit())
                        .map_or(first, |p| skip + p)
                }) {
                    let end = v[i..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(v.len(), |p| i + p);
                    let text = HUGE_TEXT[rng.below(HUGE_TEXT.len() as u64) as usize];
                    v.splice(i..end, text.bytes());
                }
            }
            _ => {}
        }
    }
    v
}

/// The committed corpus of a target.
fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz-corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

/// An error message's kind: its words, without paths, numbers or quoted
/// values.
fn kind(message: &str) -> String {
    message
        .split_whitespace()
        .filter(|w| {
            !w.contains('/')
                && !w.contains('"')
                && !w.contains('\'')
                && !w.chars().any(|c| c.is_ascii_digit())
        })
        .take(8)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether to run target `name`: `DIFFUSION_FUZZ_TARGETS` (a comma-separated
/// list of names: idx, npy, config, mpk, safetensors, pt), else all.
fn wanted(name: &str) -> bool {
    std::env::var("DIFFUSION_FUZZ_TARGETS").map_or(true, |list| list.split(',').any(|t| t.trim() == name))
}

/// Threads per target: `DIFFUSION_FUZZ_THREADS`, else 1 (the test suite
/// runs targets side by side already).
fn threads() -> usize {
    std::env::var("DIFFUSION_FUZZ_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// Error kinds seen so far, with how many inputs gave each.
#[derive(Default)]
struct Kinds {
    counts: BTreeMap<String, u64>,
    saved: usize,
}

/// Runs `target` on `execs` mutations of `seeds` and the corpus, in
/// [`threads`] threads (thread `k` gets its own generator and passes `k`
/// to `target`, which keeps its files apart by it). Returns the number of
/// distinct error kinds seen, or `None` when [`wanted`] leaves the target
/// out.
fn fuzz(
    name: &str,
    seeds: Vec<Vec<u8>>,
    execs: u64,
    target: impl Fn(usize, &[u8]) -> Result<(), String> + Sync,
) -> Option<usize> {
    if !wanted(name) {
        return None;
    }
    let mut seeds = seeds;
    seeds.extend(corpus(name));
    assert!(!seeds.is_empty());
    let save = std::env::var_os("DIFFUSION_FUZZ_SAVE").map(|d| PathBuf::from(d).join(name));
    let kinds = std::sync::Mutex::new(Kinds::default());
    let done = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    let threads = threads();
    let run = |k: usize| {
        let share = execs / threads as u64 + u64::from((k as u64) < execs % threads as u64);
        let mut rng = SplitMix64::new((0x5eed ^ name.len() as u64).wrapping_add(k as u64 * 0x9e37_79b9));
        let mut last_report = Instant::now();
        for i in 0..share {
            let base = &seeds[rng.below(seeds.len() as u64) as usize];
            let input = if k == 0 && i < seeds.len() as u64 {
                seeds[i as usize].clone()
            } else {
                mutate(&mut rng, base, &seeds)
            };
            let t0 = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| target(k, &input)));
            let took = t0.elapsed();
            if result.is_err() || took > Duration::from_secs(10) {
                let path = std::env::temp_dir().join(format!("diffusion-fuzz-{name}-crash-{k}-{i}"));
                std::fs::write(&path, &input).unwrap();
                panic!(
                    "{name}: input {i} of thread {k} {} (took {took:?}); saved to {}",
                    if result.is_err() { "panicked" } else { "hung" },
                    path.display()
                );
            }
            if let Ok(Err(message)) = result {
                let mut kinds = kinds.lock().unwrap();
                let Kinds { counts, saved } = &mut *kinds;
                let count = counts.entry(kind(&message)).or_insert(0);
                if *count == 0 && *saved < 40 {
                    *saved += 1;
                    if let Some(dir) = &save {
                        std::fs::create_dir_all(dir).unwrap();
                        std::fs::write(dir.join(format!("{k}-{i:08}")), &input).unwrap();
                    }
                }
                *count += 1;
            }
            let total = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if k == 0 && last_report.elapsed() > Duration::from_secs(60) {
                last_report = Instant::now();
                let s = started.elapsed().as_secs_f64();
                println!(
                    "fuzz {name}: {total} of {execs} executions, {s:.0} s, {:.0}/s",
                    total as f64 / s
                );
            }
        }
    };
    std::thread::scope(|scope| {
        for k in 1..threads {
            let run = &run;
            scope.spawn(move || run(k));
        }
        run(0);
    });
    let kinds = kinds.into_inner().unwrap().counts;
    let ok = execs - kinds.values().sum::<u64>();
    println!(
        "fuzz {name}: {execs} executions in {:.1} s ({threads} threads), {ok} accepted, {} distinct errors",
        started.elapsed().as_secs_f64(),
        kinds.len()
    );
    Some(kinds.len())
}

#[test]
fn fuzz_idx_reader() {
    use diffusion_data::idx::read_idx;
    use diffusion_data::FileKind;
    let dir = workdir("idx");
    let images = {
        let mut v = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 4];
        v.extend((0..48).map(|i| i as u8));
        v
    };
    let labels = vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3];
    let gz = |b: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    let real = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist/t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let seeds = vec![images.clone(), labels.clone(), gz(&images), gz(&labels), real];
    let kinds = fuzz("idx", seeds, execs(3_000), |k, bytes| {
        let file = dir.join(format!("f{k}"));
        std::fs::write(&file, bytes).unwrap();
        match (
            read_idx(&file, FileKind::Images),
            read_idx(&file, FileKind::Labels),
        ) {
            (Err(a), Err(_)) => Err(a.to_string()),
            _ => Ok(()),
        }
    });
    assert!(
        kinds.is_none_or(|k| k >= 4),
        "the mutations should reach several kinds of error, got {kinds:?}"
    );
}

#[test]
fn fuzz_npy_reader() {
    let dir = workdir("npy");
    let f = dir.join("a.npy");
    crate::npy::write(&f, &[2, 1, 2, 2], &[0.5; 8]).unwrap();
    let mut seeds = vec![std::fs::read(&f).unwrap()];
    crate::npy::write(&f, &[3], &[1.0, 2.0, 3.0]).unwrap();
    seeds.push(std::fs::read(&f).unwrap());
    // An int64 label file as numpy writes it.
    let mut labels = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }";
    let header = format!("{header}{}\n", " ".repeat(64 - (10 + header.len() + 1) % 64));
    labels.extend_from_slice(&(header.len() as u16).to_le_bytes());
    labels.extend_from_slice(header.as_bytes());
    labels.extend_from_slice(&7i64.to_le_bytes());
    labels.extend_from_slice(&3i64.to_le_bytes());
    seeds.push(labels);
    let kinds = fuzz("npy", seeds, execs(20_000), |_, bytes| {
        crate::npy::parse(bytes).map(|_| ()).map_err(|e| format!("{e:#}"))
    });
    assert!(kinds.is_none_or(|k| k >= 4), "{kinds:?}");
}

#[test]
fn fuzz_run_config_and_checkpoint_index() {
    use crate::config::{Preset, RunConfig};
    let dir = workdir("config");
    let config = RunConfig::preset(Preset::Tiny);
    // A run folder per thread, each with a real checkpoint for the index
    // to point at.
    let state = crate::checkpoint::TrainState {
        step: 3,
        epoch: 0,
        batch_in_epoch: 3,
        ema_updates: 3,
        finished: false,
    };
    let device = Default::default();
    let model = config.model.init::<Flex>(&device).unwrap();
    let runs: Vec<PathBuf> = (0..threads()).map(|k| dir.join(format!("run{k}"))).collect();
    for run in &runs {
        std::fs::create_dir_all(run).unwrap();
        crate::checkpoint::write(run, state, |d| {
            crate::checkpoint::save_module(model.clone(), &d.join("ema"))
        })
        .unwrap();
    }
    let seeds = vec![
        serde_json::to_vec_pretty(&config).unwrap(),
        serde_json::to_vec_pretty(&RunConfig::preset(Preset::Quick)).unwrap(),
        std::fs::read(runs[0].join("checkpoints/latest.json")).unwrap(),
    ];
    let kinds = fuzz("config", seeds, execs(10_000), |k, bytes| {
        let run = &runs[k];
        std::fs::write(run.join("config.json"), bytes).unwrap();
        std::fs::write(run.join("checkpoints/latest.json"), bytes).unwrap();
        let a = RunConfig::load(run).map(|_| ()).map_err(|e| format!("{e:#}"));
        let b = crate::checkpoint::latest(run)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"));
        a.or(b)
    });
    assert!(kinds.is_none_or(|k| k >= 4), "{kinds:?}");
}

/// `model` with every parameter initialised. burn initialises parameters
/// lazily, and a clone of a parameter not yet initialised initialises its
/// own copy again: reading every value once here makes the clones copies.
fn materialised(model: diffusion_model::UNet<Flex>) -> diffusion_model::UNet<Flex> {
    assert_eq!(diffusion_train::params::first_non_finite(&model), None);
    model
}

#[test]
fn fuzz_weights_files() {
    use crate::config::{Preset, RunConfig};
    let dir = workdir("weights");
    let device = Default::default();
    // Checkpoint weights (.mpk) of the tiny preset's U-Net.
    let tiny = RunConfig::preset(Preset::Tiny).model;
    let model = tiny.init::<Flex>(&device).unwrap();
    crate::checkpoint::save_module(model, &dir.join("seed")).unwrap();
    let mpk_seed = std::fs::read(dir.join("seed.mpk")).unwrap();
    // One model built up front and cloned for every input: `load_unet` is
    // `init` then `load_module`, and the random initialisation (not the
    // reading) took most of an execution's time.
    let blank = materialised(tiny.init::<Flex>(&device).unwrap());
    let kinds = fuzz("mpk", vec![mpk_seed], execs(300), |k, bytes| {
        let mpk = dir.join(format!("w{k}"));
        std::fs::write(mpk.with_extension("mpk"), bytes).unwrap();
        diffusion_train::checkpoint::load_module(blank.clone(), &mpk, &device)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    });
    assert!(kinds.is_none_or(|k| k >= 2), "{kinds:?}");

    // Reference weights: the PyTorch fixture and its safetensors export.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference_small");
    let reference: diffusion_model::UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("unet.json")).unwrap()).unwrap();
    let pt_seed = std::fs::read(fixtures.join("model.pt")).unwrap();
    let loaded =
        crate::interop::load_reference::<Flex>(&reference, &fixtures.join("model.pt"), &device).unwrap();
    let st_file = dir.join("seed.safetensors");
    crate::interop::save_reference(&loaded, &st_file).unwrap();
    let st_seed = std::fs::read(&st_file).unwrap();
    let blank = materialised(reference.init::<Flex>(&device).unwrap());
    for (name, seed, ext) in [("safetensors", st_seed, "safetensors"), ("pt", pt_seed, "pt")] {
        let kinds = fuzz(name, vec![seed], execs(300), |k, bytes| {
            let file = dir.join(format!("in{k}.{ext}"));
            std::fs::write(&file, bytes).unwrap();
            diffusion_model::interop::load_reference_into(blank.clone(), &file)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
        assert!(kinds.is_none_or(|k| k >= 2), "{name}: {kinds:?}");
    }
}
