//! Training the judge through the library: a LeNet trained on the first
//! 3,000 MNIST digits for 2 epochs already classifies most of the first
//! 1,000 test digits, reports that accuracy after every epoch, and saves
//! into a folder that `Judge::load` reads back to the same predictions.

use std::path::Path;
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use diffusion_data::{load_split, ImageSet, Split};
use diffusion_eval::judge::{set_pixels, train_judge, JudgeTraining};
use diffusion_eval::Judge;

fn first(set: &ImageSet, n: usize) -> ImageSet {
    let pixels = set.height * set.width;
    ImageSet::new(
        set.images[..n * pixels].to_vec(),
        set.labels[..n].to_vec(),
        set.height,
        set.width,
    )
}

#[test]
fn a_judge_trained_on_a_few_digits_classifies_and_reloads() {
    let mnist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist");
    let train = first(&load_split(&mnist, Split::Train).unwrap(), 3_000);
    let test = first(&load_split(&mnist, Split::Test).unwrap(), 1_000);
    let device = Default::default();
    let how = JudgeTraining {
        epochs: 2,
        batch: 64,
        lr: 1e-3,
        seed: 0,
    };
    let batches = std::cell::Cell::new(0);
    let mut reported = Vec::new();
    let judge = train_judge::<Autodiff<Flex>>(
        Arc::new(train),
        &test,
        how,
        "a test".into(),
        &device,
        &|| batches.set(batches.get() + 1),
        &mut |epoch, accuracy| reported.push((epoch, accuracy)),
    )
    .unwrap();
    // 3,000 / 64 = 46 full batches per epoch.
    assert_eq!(batches.get(), 2 * 46);
    assert_eq!(reported.len(), 2);
    let accuracy = judge.info.test_accuracy;
    assert_eq!(reported[1], (1, accuracy));
    // Chance is 10%; a LeNet sees 3,000 digits twice and gets most right.
    assert!(accuracy > 0.85, "test accuracy {accuracy}");

    let dir = std::env::temp_dir().join(format!("judge-training-{}", std::process::id()));
    judge.save(&dir).unwrap();
    let back = Judge::<Flex>::load(&dir, &device).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let json = |i: &diffusion_eval::ClassifierInfo| serde_json::to_value(i).unwrap();
    assert_eq!(json(&back.info), json(&judge.info));
    let pixels = set_pixels(&test, 200);
    let (a, _) = judge.classify(&pixels, [1, 28, 28], 100, &device);
    let (b, _) = back.classify(&pixels, [1, 28, 28], 100, &device);
    assert_eq!(a, b);
}
