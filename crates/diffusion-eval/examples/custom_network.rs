//! Brings its own network (a small stack of dilated convolutions, not the
//! U-Net), trains it on MNIST with the library's loop, judges its digits
//! with the classifier and writes them as a labelled grid.
//!
//!     cargo run --release -p diffusion-eval --example custom_network -- [STEPS]
//!
//! Checkpoints go to `custom-run/` (run it again to continue), the grid to
//! `custom-grid.png`.
use std::path::Path;
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use diffusion_core::rng::with_backend_seed;
use diffusion_core::{
    BatchDenoiser, Denoiser, Labels, NoiseSchedule, Objective, Prediction, SamplerConfig, SamplerKind,
};
use diffusion_data::{load_split, BatchLoader, Split};
use diffusion_eval::pictures::{write_png, GridLayout};
use diffusion_eval::{generate, score, Generation, Judge, Reference};
use diffusion_train::{Fit, FitConfig, LogEvent, OnLog, Trainer, TrainerConfig};

/// ε-prediction by convolutions dilated 1, 2, 4, 8, 1 (a receptive field
/// of 33 pixels: the whole digit), conditioned on t and the class by a
/// learned embedding of each added to every block.
#[derive(Module, Debug)]
struct DilatedNet<B: Backend> {
    input: Conv2d<B>,
    time: Embedding<B>,
    /// Class c at row c + 1; row 0 is "no class" (dropped labels).
    class: Embedding<B>,
    cond: Vec<Linear<B>>,
    blocks: Vec<Conv2d<B>>,
    output: Conv2d<B>,
}

const WIDTH: usize = 64;

impl<B: Backend> DilatedNet<B> {
    fn new(num_steps: usize, device: &B::Device) -> Self {
        let conv = |cin, cout, d: usize| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_dilation([d, d])
                .with_padding(PaddingConfig2d::Explicit(d, d, d, d))
                .init(device)
        };
        let dilations = [1, 2, 4, 8, 1];
        Self {
            input: conv(1, WIDTH, 1),
            time: EmbeddingConfig::new(num_steps + 1, WIDTH).init(device),
            class: EmbeddingConfig::new(11, WIDTH).init(device),
            cond: dilations
                .iter()
                .map(|_| LinearConfig::new(WIDTH, WIDTH).init(device))
                .collect(),
            blocks: dilations.iter().map(|&d| conv(WIDTH, WIDTH, d)).collect(),
            output: conv(WIDTH, 1, 1),
        }
    }

    fn forward(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1, Int>,
        classes: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 4> {
        let n = x.dims()[0];
        let rows = |ids: Tensor<B, 1, Int>, table: &Embedding<B>| {
            table.forward(ids.reshape([n, 1])).reshape([n, WIDTH])
        };
        let mut e = rows(t, &self.time);
        if let Some(c) = classes {
            e = e + rows(c.add_scalar(1), &self.class);
        }
        let mut h = self.input.forward(x);
        for (block, cond) in self.blocks.iter().zip(&self.cond) {
            let shift = cond.forward(gelu(e.clone())).reshape([n, WIDTH, 1, 1]);
            h = h.clone() + block.forward(gelu(h + shift));
        }
        self.output.forward(gelu(h))
    }
}

impl<B: Backend> BatchDenoiser<B> for DilatedNet<B> {
    fn predict(&self, x_t: Tensor<B, 4>, t: Tensor<B, 1, Int>, labels: Labels<B>) -> Tensor<B, 4> {
        self.forward(x_t, t, labels.ids().cloned())
    }
    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}

impl<B: Backend> Denoiser<B> for DilatedNet<B> {
    fn denoise(&self, x_t: Tensor<B, 4>, t: usize, classes: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        let n = x_t.dims()[0];
        let t = Tensor::<B, 1, Int>::full([n], t as i64, &x_t.device());
        self.forward(x_t, t, classes)
    }
}

type B = Autodiff<Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2000);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    diffusion_flex_kernels::join_global_pool(); // this thread runs a share of each kernel (optional)
    diffusion_flex_kernels::install_for_unet(); // the fast CPU convolutions (optional)
    let device = Default::default();
    let train = Arc::new(load_split(&data.join("mnist"), Split::Train)?);
    let loader = BatchLoader::new(train.clone(), 64, 0, 2);
    let schedule = NoiseSchedule::reference();
    let net = with_backend_seed::<B, _>(&device, 0, || DilatedNet::<B>::new(schedule.num_steps(), &device));
    let mut config = TrainerConfig::new(steps);
    config.lr = 1e-3;
    config.objective = Objective {
        label_dropout: 0.1,
        ..Objective::default()
    };
    // Half the batch on each of two threads (the same gradient): this net's
    // small convolutions leave cores idle inside each kernel, so on a 2-core
    // Xeon it trains 1.5x faster than with one shard (46-50 against 32 img/s).
    config.shards = 2;
    let mut trainer = Trainer::new(net, &schedule, config, &device);
    let epochs = (steps as usize).div_ceil(loader.batches_per_epoch());
    let fit = Fit::new("custom-run", FitConfig::new(epochs).with_stop_after(Some(steps)));
    println!("{:?}", fit.open(&mut trainer)?);
    let mut log = OnLog(|l: &LogEvent| {
        println!(
            "step {:5}  loss {:.4}  {:.0} img/s",
            l.step, l.loss, l.images_per_s
        )
    });
    fit.run(&mut trainer, &loader, &device, &mut log)?;

    // 20 digits of each class from the EMA weights, judged like `eval`.
    let labels: Vec<usize> = (0..10).flat_map(|c| std::iter::repeat_n(c, 20)).collect();
    let how = Generation {
        sampler: SamplerConfig::new(SamplerKind::DpmSolverPp, 20),
        guidance: 2.0,
        batch: 100,
        seed: 1,
        threads: 2,
    };
    let shape = [1, 28, 28];
    let images = generate(
        &trainer.ema().model,
        &schedule,
        &how,
        &labels,
        shape,
        &device,
        &|_| {},
    )?;
    let judge = Judge::<Flex>::load(&data.join("classifier"), &device)?;
    let (judged, features) = judge.classify(&images, shape, 500, &device);
    let reference = Reference::new(&judge, &load_split(&data.join("mnist"), Split::Test)?, &device);
    println!(
        "judged correct {:.1}%, Fréchet distance {:.2} (real images: {:.2})",
        100.0 * score(&labels, &judged, 10).accuracy,
        reference.distance(&features),
        reference.floor(&judge, &train, labels.len(), &device)
    );
    // Every other digit: 10 of each class, a row per class.
    let (grid, grid_labels): (Vec<f32>, Vec<Option<usize>>) = (0..100)
        .map(|i| (i / 10 * 20 + i % 10, Some(i / 10)))
        .map(|(k, l)| (&images[k * 784..(k + 1) * 784], l))
        .fold((Vec::new(), Vec::new()), |(mut g, mut ls), (img, l)| {
            g.extend_from_slice(img);
            ls.push(l);
            (g, ls)
        });
    write_png(
        Path::new("custom-grid.png"),
        &GridLayout::new(100, 1, 28, 28),
        &grid,
        &grid_labels,
    )?;
    println!("wrote custom-grid.png");
    Ok(())
}
