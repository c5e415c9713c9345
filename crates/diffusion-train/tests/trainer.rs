//! The trainer end to end on a tiny U-Net: exact resume, refusal to save a
//! NaN state, and checkpoints checked on load (integrity, configuration).

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_core::{NoiseSchedule, Objective};
use diffusion_model::{UNet, UNetConfig};
use diffusion_train::checkpoint::{self, CheckpointError};
use diffusion_train::{Trainer, TrainerConfig};

type B = Autodiff<Flex>;

mod common;

fn config() -> UNetConfig {
    common::tiny_unet()
}

fn trainer(lr: f64) -> Trainer<B, UNet<B>> {
    let device = Default::default();
    let model = config().init_seeded::<B>(&device, 3).unwrap();
    let cfg = TrainerConfig {
        lr,
        seed: 9,
        shards: 2,
        objective: Objective {
            label_dropout: 0.2,
            ..Objective::default()
        },
        ..TrainerConfig::new(6)
    };
    Trainer::new(model, &NoiseSchedule::reference(), cfg, &device)
}

/// Batch `k` of a fixed synthetic data set.
fn batch(k: u64) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let device = Default::default();
    <Flex as burn::tensor::backend::Backend>::seed(&device, 1000 + k);
    let x = Tensor::<B, 4>::random([6, 1, 8, 8], Distribution::Uniform(-1.0, 1.0), &device);
    let y = Tensor::<B, 1, Int>::from_ints([0, 1, 2, 3, 4, 5], &device);
    (x, y)
}

fn weights(t: &Trainer<B, UNet<B>>) -> Vec<f32> {
    let m = t.model().valid();
    let mut v = m.head.conv2.weight.val().into_data().to_vec::<f32>().unwrap();
    v.extend(
        t.ema()
            .model
            .stem
            .convnext
            .conv1
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap(),
    );
    v
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffusion-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// One test, run in order: the backend's generator is global, so tests
/// drawing from it in parallel would see each other's seeds.
#[test]
fn trainer_end_to_end() {
    a_resumed_run_equals_an_uninterrupted_one_bit_for_bit();
    a_nan_loss_is_never_saved_and_the_last_good_checkpoint_stays_latest();
    checkpoints_are_checked_on_load();
}

fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let mut whole = trainer(1e-3);
    for k in 0..6 {
        let (x, y) = batch(k);
        whole.step(x, Some(y));
    }
    let dir = scratch("resume");
    let mut first = trainer(1e-3);
    for k in 0..3 {
        let (x, y) = batch(k);
        first.step(x, Some(y));
    }
    first.save(&dir).unwrap();
    drop(first);
    let mut second = trainer(1e-3);
    assert_eq!(second.resume(&dir).unwrap().step, 3);
    for k in 3..6 {
        let (x, y) = batch(k);
        second.step(x, Some(y));
    }
    assert_eq!(weights(&whole), weights(&second));
    assert_eq!(second.state().ema_updates, 6);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn a_nan_loss_is_never_saved_and_the_last_good_checkpoint_stays_latest() {
    let dir = scratch("nan");
    let mut t = trainer(1e-3);
    let (x, y) = batch(0);
    t.step(x, Some(y));
    t.save(&dir).unwrap();
    // NaN data makes a NaN loss.
    let (x, y) = batch(1);
    t.step(x.mul_scalar(f32::NAN), Some(y));
    let err = t.save(&dir).unwrap_err();
    assert!(
        matches!(err, CheckpointError::NonFiniteLoss { step: 2, .. }),
        "{err}"
    );
    // It keeps refusing, and latest.json still names step 1.
    assert!(t.save(&dir).is_err());
    assert_eq!(checkpoint::latest(&dir).unwrap().1.step, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn checkpoints_are_checked_on_load() {
    let dir = scratch("checks");
    let device = Default::default();
    let mut t = trainer(1e-3);
    let (x, y) = batch(0);
    t.step(x, Some(y));
    let ckpt = t.save(&dir).unwrap();
    let ema = ckpt.join(checkpoint::EMA);

    // Another configuration: refused, naming the parameter and both shapes.
    let other = config().with_widths(vec![4, 16]).init::<Flex>(&device).unwrap();
    let err = checkpoint::load_module(other, &ema, &device).unwrap_err();
    assert!(matches!(err, CheckpointError::WrongModel { .. }), "{err}");
    assert!(err.to_string().contains("has shape"), "{err}");

    // One flipped byte: the index's checksum catches it.
    let file = ema.with_extension("mpk");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let err = checkpoint::latest(&dir).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");

    // An index written before checksums existed still loads.
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let index = checkpoint::checkpoints_dir(&dir).join(checkpoint::LATEST);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("files");
    std::fs::write(&index, json.to_string()).unwrap();
    let (found, state) = checkpoint::latest(&dir).unwrap();
    assert_eq!((found, state.step), (ckpt, 1));

    // Leftovers of a failed write (a folder latest.json does not name, a
    // temporary index) are removed by the next checkpoint, before it is
    // written: on a nearly full disk they would leave no room for it.
    let root = checkpoint::checkpoints_dir(&dir);
    std::fs::create_dir_all(root.join("step-00000099")).unwrap();
    std::fs::write(root.join("step-00000099/model.mpk"), b"orphan").unwrap();
    std::fs::write(root.join("latest.json.tmp-4194311"), b"{").unwrap();
    let (x, y) = batch(1);
    t.step(x, Some(y));
    let newer = t.save(&dir).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["latest.json", "step-00000002"]);
    assert_eq!(checkpoint::latest(&dir).unwrap().0, newer);
    std::fs::remove_dir_all(&dir).unwrap();
}
