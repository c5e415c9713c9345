//! The training loop (`Fit`): a run stopped and resumed ends with the same
//! bits as one that never stopped, on one device and on two replicas (the
//! `replicas` example, killed with SIGKILL); epochs, hooks and non-finite
//! losses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use diffusion_core::NoiseSchedule;
use diffusion_data::{BatchLoader, ImageSet};
use diffusion_model::UNet;
use diffusion_train::{
    EpochEnd, Fit, FitConfig, FitError, FitObserver, HookError, LogEvent, Start, Stop, Trainer, TrainerConfig,
};

type B = Autodiff<Flex>;

mod common;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffusion-train-fit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 40 random 8x8 images of 10 classes: 5 batches of 8 per epoch.
fn loader() -> BatchLoader {
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u8
    };
    let images: Vec<u8> = (0..40 * 64).map(|_| next()).collect();
    let labels: Vec<u8> = (0..40).map(|i| i % 10).collect();
    BatchLoader::new(Arc::new(ImageSet::new(images, labels, 8, 8)), 8, 4, 1)
}

fn trainer(lr: f64) -> Trainer<B, UNet<B>> {
    let device = Default::default();
    let model = common::tiny_unet().init_seeded::<B>(&device, 3).unwrap();
    let config = TrainerConfig {
        lr,
        seed: 9,
        ..TrainerConfig::new(15)
    };
    Trainer::new(model, &NoiseSchedule::reference(), config, &device)
}

/// What the hooks saw.
#[derive(Default)]
struct Seen {
    started_at: Vec<u64>,
    logs: Vec<LogEvent>,
    epochs: Vec<EpochEnd>,
    stops: Vec<Stop>,
}

impl FitObserver<B, UNet<B>> for Seen {
    fn on_start(&mut self, t: &Trainer<B, UNet<B>>) -> Result<(), HookError> {
        self.started_at.push(t.state().step);
        Ok(())
    }
    fn on_log(&mut self, _: &Trainer<B, UNet<B>>, log: &LogEvent) -> Result<(), HookError> {
        self.logs.push(*log);
        Ok(())
    }
    fn on_epoch_end(&mut self, _: &Trainer<B, UNet<B>>, end: &EpochEnd) -> Result<(), HookError> {
        self.epochs.push(*end);
        Ok(())
    }
    fn on_stop(&mut self, _: &Trainer<B, UNet<B>>, stop: Stop) -> Result<(), HookError> {
        self.stops.push(stop);
        Ok(())
    }
}

fn fit(dir: &Path, stop_after: Option<u64>) -> Fit {
    Fit::new(
        dir,
        FitConfig {
            log_every: 2,
            stop_after,
            ..FitConfig::new(3)
        },
    )
}

#[test]
fn a_run_stopped_mid_epoch_and_resumed_equals_one_that_never_stopped() {
    let device = Default::default();
    let loader = loader();

    let whole_dir = scratch("whole");
    let mut whole = trainer(2e-3);
    let mut seen = Seen::default();
    assert_eq!(fit(&whole_dir, None).open(&mut whole).unwrap(), Start::Fresh);
    let out = fit(&whole_dir, None)
        .run(&mut whole, &loader, &device, &mut seen)
        .unwrap();
    // 3 epochs of 5 batches.
    assert_eq!(out.stop, Stop::Finished);
    assert_eq!(
        (out.state.step, out.state.epoch, out.state.finished),
        (15, 3, true)
    );
    assert_eq!(
        seen.epochs
            .iter()
            .map(|e| (e.epochs_done, e.step))
            .collect::<Vec<_>>(),
        [(1, 5), (2, 10), (3, 15)]
    );
    // A log every 2 steps and at each epoch's last step: 2 4 5 6 8 10 12 14 15.
    let logged: Vec<u64> = seen.logs.iter().map(|l| l.step).collect();
    assert_eq!(logged, [2, 4, 5, 6, 8, 10, 12, 14, 15]);
    assert_eq!(seen.logs.iter().map(|l| l.steps).sum::<u64>(), 15);
    assert!(seen
        .logs
        .iter()
        .all(|l| l.loss.is_finite() && l.loss > 0.0 && l.world == 1));

    // Stopped after step 7 (epoch 2, batch 2 of 5), then resumed by a new
    // trainer from the checkpoint the stop wrote.
    let parts_dir = scratch("parts");
    let mut first = trainer(2e-3);
    let mut seen = Seen::default();
    let out = fit(&parts_dir, Some(7))
        .run(&mut first, &loader, &device, &mut seen)
        .unwrap();
    assert_eq!(
        (
            out.stop,
            out.state.step,
            out.state.epoch,
            out.state.batch_in_epoch
        ),
        (Stop::StepLimit, 7, 1, 2)
    );
    assert_eq!(seen.stops, [Stop::StepLimit]);
    let mut second = trainer(2e-3);
    let start = fit(&parts_dir, None).open(&mut second).unwrap();
    assert!(
        matches!(start, Start::Resumed(s) if s.step == 7 && s.batch_in_epoch == 2),
        "{start:?}"
    );
    let mut seen = Seen::default();
    let out = fit(&parts_dir, None)
        .run(&mut second, &loader, &device, &mut seen)
        .unwrap();
    assert_eq!((out.stop, out.state.step), (Stop::Finished, 15));
    assert_eq!(seen.started_at, [7]);
    assert_eq!(
        seen.epochs.iter().map(|e| e.epochs_done).collect::<Vec<_>>(),
        [2, 3]
    );

    let (a, b) = (common::all_weights(&whole), common::all_weights(&second));
    assert_eq!(a.len(), b.len());
    let differing = common::differing_bits(&a, &b);
    assert_eq!(
        differing,
        0,
        "{differing} of {} weights differ after the resume",
        a.len()
    );

    // Opening the finished run again: nothing left to do.
    let mut third = trainer(2e-3);
    assert!(matches!(fit(&parts_dir, None).open(&mut third).unwrap(), Start::Finished(s) if s.step == 15));
    // With more epochs it continues.
    let more = Fit::new(&parts_dir, FitConfig::new(4));
    assert!(matches!(more.open(&mut third).unwrap(), Start::Resumed(s) if s.epoch == 3));
    let out = more.run(&mut third, &loader, &device, &mut ()).unwrap();
    assert_eq!((out.state.step, out.state.epoch), (20, 4));
}

#[test]
fn adamw_with_clipping_resumes_bit_for_bit_and_is_not_adam() {
    let make = |optimizer| {
        let device = Default::default();
        let model = common::tiny_unet().init_seeded::<B>(&device, 3).unwrap();
        let config = TrainerConfig {
            lr: 2e-3,
            seed: 9,
            optimizer,
            grad_clip: Some(0.5),
            ..TrainerConfig::new(15)
        };
        Trainer::new(model, &NoiseSchedule::reference(), config, &device)
    };
    let adamw = diffusion_train::OptimizerKind::AdamW { weight_decay: 0.05 };
    let (device, loader) = (Default::default(), loader());
    let whole_dir = scratch("adamw-whole");
    let mut whole = make(adamw);
    fit(&whole_dir, None)
        .run(&mut whole, &loader, &device, &mut ())
        .unwrap();
    let parts_dir = scratch("adamw-parts");
    let mut first = make(adamw);
    fit(&parts_dir, Some(6))
        .run(&mut first, &loader, &device, &mut ())
        .unwrap();
    let mut second = make(adamw);
    assert!(matches!(fit(&parts_dir, None).open(&mut second).unwrap(), Start::Resumed(s) if s.step == 6));
    fit(&parts_dir, None)
        .run(&mut second, &loader, &device, &mut ())
        .unwrap();
    let (a, b) = (common::all_weights(&whole), common::all_weights(&second));
    let differing = common::differing_bits(&a, &b);
    assert_eq!(
        differing,
        0,
        "{differing} of {} weights differ after the resume",
        a.len()
    );

    // The same run with Adam: the decay makes AdamW's weights differ.
    let adam_dir = scratch("adam-same");
    let mut adam = make(diffusion_train::OptimizerKind::Adam);
    fit(&adam_dir, None)
        .run(&mut adam, &loader, &device, &mut ())
        .unwrap();
    let c = common::all_weights(&adam);
    let differing = common::differing_bits(&a, &c);
    assert!(
        differing > a.len() / 2,
        "only {differing} of {} weights differ from Adam's",
        a.len()
    );
}

#[test]
fn a_diverging_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = scratch("nan");
    let mut t = trainer(1e30);
    let config = FitConfig {
        log_every: 1,
        checkpoint_every: 1,
        ..FitConfig::new(3)
    };
    let err = Fit::new(&dir, config)
        .run(&mut t, &loader(), &Default::default(), &mut ())
        .unwrap_err();
    let FitError::NonFiniteLoss { step, loss } = err else {
        panic!("want NonFiniteLoss, got {err}");
    };
    assert!(!loss.is_finite());
    // Every step before the bad one was checkpointed; the bad one was not.
    let (_, state) = diffusion_train::checkpoint::latest(&dir).unwrap();
    assert_eq!(state.step, step - 1);
}

#[test]
fn a_stop_flag_raised_by_a_hook_saves_and_returns() {
    struct StopAt(Arc<std::sync::atomic::AtomicBool>, u64);
    impl FitObserver<B, UNet<B>> for StopAt {
        fn on_step(&mut self, state: diffusion_train::TrainState) {
            if state.step == self.1 {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    let dir = scratch("flag");
    let fit = fit(&dir, None);
    let mut t = trainer(2e-3);
    let out = fit
        .run(
            &mut t,
            &loader(),
            &Default::default(),
            &mut StopAt(fit.stop_flag().clone(), 3),
        )
        .unwrap();
    assert_eq!((out.stop, out.state.step), (Stop::Requested, 3));
    assert_eq!(diffusion_train::checkpoint::latest(&dir).unwrap().1.step, 3);
}

#[allow(dead_code)] // its main
#[path = "../examples/replicas.rs"]
mod replicas;

/// The `replicas` example in a process of its own: this test binary, run
/// with the test below as its only test.
fn example(run_dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "replicas_example_as_a_child",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    cmd.env("FIT_EXAMPLE_RUN_DIR", run_dir);
    cmd
}

#[test]
#[ignore = "the replicas example, run as a child process by the test below"]
fn replicas_example_as_a_child() {
    let dir = std::env::var("FIT_EXAMPLE_RUN_DIR").expect("FIT_EXAMPLE_RUN_DIR");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist");
    replicas::train(&dir, &data).unwrap();
}

/// The weights of the run's latest checkpoint (a finished run of 64 steps).
fn final_weights(run: &Path) -> Vec<f32> {
    let device = Default::default();
    let unet = diffusion_model::UNetConfig::tiny()
        .init_seeded::<B>(&device, 0)
        .unwrap();
    let mut t = Trainer::new(unet, &NoiseSchedule::reference(), TrainerConfig::new(1), &device);
    let state = t.resume(run).unwrap();
    assert!(state.finished && state.step == 64, "{state:?}");
    common::all_weights(&t)
}

#[test]
fn the_replicas_example_killed_and_resumed_ends_bit_for_bit_like_an_uninterrupted_run() {
    let whole = scratch("example-whole");
    let out = example(&whole).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Finished at step 64"));

    // Killed (SIGKILL: no chance to save) once the first checkpoint is on
    // disk, then run again on the same directory.
    let parts = scratch("example-parts");
    let mut child = example(&parts)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !parts.join("checkpoints/latest.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, killed_at) = diffusion_train::checkpoint::latest(&parts).unwrap();
    let out = example(&parts).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if killed_at.step < 64 {
        assert!(text.contains("Resumed"), "{text}");
    }
    assert!(
        final_weights(&whole) == final_weights(&parts),
        "the resumed run's weights differ"
    );
}
