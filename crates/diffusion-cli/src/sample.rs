//! `diffusion sample`: draw images from a trained run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::{sample, Guided, NoiseSchedule, NoiseSource, SamplerConfig, SeededNoise};
use diffusion_model::UNet;

use crate::backend::{dispatch, BackendKind, Task};
use crate::config::{SamplingFlags, Weights};
use crate::npy;
use crate::progress;
use diffusion_eval::pictures::{write_png, GifWriter, GridLayout};
use diffusion_train::Run;

/// `diffusion sample` flags. Flags left out take the run's defaults.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Run directory written by `train`.
    #[arg(long, value_name = "RUN_DIR")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// Classes to draw, cycled over the images: "0,3,7" or "all".
    #[arg(long, default_value = "all")]
    pub classes: String,
    /// Number of images (default 81, or the count in --noise).
    #[arg(long)]
    pub n: Option<usize>,
    /// Seed of all the noise, drawn on the host: the same seed gives the
    /// same images on every backend.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Grid PNG to write (default: RUN_DIR/samples/grid.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the reverse trajectory as an animated GIF (one frame per step).
    #[arg(long)]
    pub gif: Option<PathBuf>,
    /// Also write the final samples as a .npy of f32 [n, c, h, w].
    #[arg(long)]
    pub npy: Option<PathBuf>,
    /// Start from this noise (.npy, f32 [n, c, h, w]) instead of drawing it.
    #[arg(long)]
    pub noise: Option<PathBuf>,
}

pub use diffusion_eval::judge::host_values;

/// Parses "all" or a comma-separated class list.
pub fn parse_classes(text: &str, num_classes: Option<usize>) -> Result<Option<Vec<usize>>> {
    let Some(n) = num_classes else {
        if text != "all" {
            bail!("--classes: this model is unconditional; leave --classes out");
        }
        return Ok(None);
    };
    if text == "all" {
        return Ok(Some((0..n).collect()));
    }
    let list: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--classes {text}: use a comma-separated list like 0,3,7, or all"))?;
    if list.is_empty() {
        bail!("--classes: give at least one class");
    }
    if let Some(bad) = list.iter().find(|&&c| c >= n) {
        bail!(
            "--classes: class {bad} does not exist; the model has classes 0..{}",
            n - 1
        );
    }
    Ok(Some(list))
}

/// The most images one `sample` draws: a grid, a GIF or a .npy of more
/// would not be looked at, and memory grows with the count.
pub use diffusion_train::run::MAX_SAMPLES;

pub fn run(args: SampleArgs) -> Result<i32> {
    let backend = BackendKind::resolve(args.backend);
    let run = Run::open(&args.checkpoint)?;
    let config = &run.config;
    let sampler = args.sampling.sampler(config)?;
    let classes = parse_classes(&args.classes, config.model.num_classes)?;
    let noise = match &args.noise {
        Some(path) => {
            let array = npy::read(path)?;
            let m = &config.model;
            let want = [m.image_channels, m.image_size, m.image_size];
            if array.shape.len() != 4 || array.shape[1..] != want {
                bail!(
                    "{}: noise of shape {:?} does not fit the model; need [n, {}, {}, {}]",
                    path.display(),
                    array.shape,
                    want[0],
                    want[1],
                    want[2]
                );
            }
            if let Some(i) = array.data.iter().position(|v| !v.is_finite()) {
                bail!(
                    "{}: the noise holds a non-finite value ({} at index {i}); sampling needs finite numbers",
                    path.display(),
                    array.data[i]
                );
            }
            if args.n.is_some_and(|n| n != array.shape[0]) {
                bail!(
                    "--n {} disagrees with the {} images in {}",
                    args.n.unwrap(),
                    array.shape[0],
                    path.display()
                );
            }
            Some(array)
        }
        None => None,
    };
    let n = noise.as_ref().map(|a| a.shape[0]).or(args.n).unwrap_or(81);
    if n == 0 || n > MAX_SAMPLES {
        bail!("--n must be between 1 and {MAX_SAMPLES} (for more, run again with another --seed)");
    }
    let guidance = args.sampling.guidance(config)?;
    let weights = args.sampling.weights(config);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.checkpoint.join("samples").join("grid.png"));
    let step = run.state.step;
    let task = SampleTask {
        run,
        sampler,
        guidance,
        classes,
        n,
        seed: args.seed,
        weights,
        noise,
        out,
        gif: args.gif,
        npy: args.npy,
    };
    eprintln!(
        "sampling {n} images from step {} of {} ({:?} weights)",
        step,
        args.checkpoint.display(),
        weights
    );
    dispatch(backend, task)
}

struct SampleTask {
    run: Run,
    sampler: SamplerConfig,
    guidance: f64,
    classes: Option<Vec<usize>>,
    n: usize,
    seed: u64,
    weights: Weights,
    noise: Option<npy::Array>,
    out: PathBuf,
    gif: Option<PathBuf>,
    npy: Option<PathBuf>,
}

impl Task for SampleTask {
    type Output = i32;

    fn run<AB: AutodiffBackend>(self, device: AB::Device) -> Result<i32> {
        type B<AB> = <AB as AutodiffBackend>::InnerBackend;
        let model: UNet<B<AB>> = self.run.model(self.weights, &device)?;
        let schedule = self.run.noise_schedule()?;
        let m = &self.run.config.model;
        let shape = [self.n, m.image_channels, m.image_size, m.image_size];
        // All noise (the start when --noise is absent, then every step's)
        // comes from one host stream of the seed, so a seed draws the same
        // images on every backend.
        let start = self
            .noise
            .as_ref()
            .map(|a| Tensor::from_data(TensorData::new(a.data.clone(), shape), &device));
        let labels: Vec<Option<usize>> = (0..self.n)
            .map(|i| self.classes.as_ref().map(|c| c[i % c.len()]))
            .collect();
        let layout = GridLayout::new(self.n, m.image_channels, m.image_size, m.image_size);
        let mut gif = self.gif.as_ref().map(|_| GifWriter::new(layout, labels.clone()));
        let started = Instant::now();
        let draw = Draw {
            sampler: &self.sampler,
            guidance: self.guidance,
            seed: self.seed,
        };
        let out = draw.run(&model, &schedule, start, shape, &labels, &device, gif.as_mut())?;
        let secs = started.elapsed().as_secs_f64();
        let values = host_values(out);
        write_png(&self.out, &layout, &values, &labels)?;
        say!(
            "wrote {} ({} images, {} steps of {:?}, {secs:.1} s)",
            self.out.display(),
            self.n,
            self.sampler.steps,
            self.sampler.kind
        );
        if let (Some(path), Some(gif)) = (&self.gif, &gif) {
            gif.write(path)?;
            say!("wrote {} ({} frames)", path.display(), gif.len());
        }
        if let Some(path) = &self.npy {
            npy::write(path, &shape, &values)?;
            say!("wrote {} (f32 {:?})", path.display(), shape);
        }
        Ok(0)
    }
}

/// How `sample` draws, and the epoch previews with it: the sampler, the
/// guidance scale and the seed of all the noise (the start, unless given,
/// and every step's), drawn on the host so that a seed gives the same
/// images on every backend.
pub struct Draw<'a> {
    pub sampler: &'a SamplerConfig,
    pub guidance: f64,
    pub seed: u64,
}

impl Draw<'_> {
    /// Draws images of `shape` (from `start` if given) for `labels`; with
    /// `gif`, records the start and x after every step as frames.
    #[allow(clippy::too_many_arguments)]
    pub fn run<B: Backend>(
        &self,
        model: &UNet<B>,
        schedule: &NoiseSchedule,
        start: Option<Tensor<B, 4>>,
        shape: [usize; 4],
        labels: &[Option<usize>],
        device: &B::Device,
        gif: Option<&mut GifWriter>,
    ) -> Result<Tensor<B, 4>> {
        let mut rng = SeededNoise::new(self.seed);
        let x = match start {
            Some(x) => x,
            None => NoiseSource::<B>::sample(&mut rng, shape, device),
        };
        run_sampler(
            model,
            schedule,
            self.sampler,
            self.guidance,
            x,
            labels,
            device,
            &mut rng,
            gif,
        )
    }
}

/// Runs a sampler with a progress bar; with `gif`, records the start noise
/// and x after every step as frames.
#[allow(clippy::too_many_arguments)]
fn run_sampler<B: Backend>(
    model: &UNet<B>,
    schedule: &NoiseSchedule,
    config: &SamplerConfig,
    guidance: f64,
    x: Tensor<B, 4>,
    labels: &[Option<usize>],
    device: &B::Device,
    noise: &mut impl NoiseSource<B>,
    mut gif: Option<&mut GifWriter>,
) -> Result<Tensor<B, 4>> {
    let mut sampler = config.build::<B>(schedule)?;
    let classes = labels.first().copied().flatten().map(|_| {
        let ids: Vec<i32> = labels.iter().map(|l| l.unwrap_or(0) as i32).collect();
        Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [labels.len()]), device)
    });
    if let Some(g) = gif.as_deref_mut() {
        g.push(&host_values(x.clone()));
    }
    let bar = progress::bar(sampler.num_steps() as u64, "steps");
    let guided = Guided::new(model, guidance);
    let out = sample(&guided, sampler.as_mut(), x, classes, noise, |step, x| {
        bar.set_position(step.index as u64 + 1);
        bar.set_message(format!("t = {}", step.t_next));
        if let Some(g) = gif.as_deref_mut() {
            g.push(&host_values(x.clone()));
        }
    });
    bar.finish_and_clear();
    Ok(out)
}

/// The grid drawn after each epoch of training.
pub struct PreviewRequest<'a> {
    pub sampler: &'a SamplerConfig,
    /// The run's guidance scale (what `sample` uses by default).
    pub guidance: f64,
    pub n: usize,
    /// The run's seed: the preview is what `sample --seed SEED --n N`
    /// draws from the same weights.
    pub seed: u64,
    /// Image channels and (square) size.
    pub channels: usize,
    pub size: usize,
    pub num_classes: Option<usize>,
}

/// Samples a preview grid (classes 0, 1, 2, … in turn) with `model`, as
/// `sample` draws ([`Draw`]), and writes it to `path`.
pub fn preview_grid<B: Backend>(
    model: &UNet<B>,
    schedule: &NoiseSchedule,
    request: &PreviewRequest<'_>,
    path: &Path,
    device: &B::Device,
) -> Result<()> {
    let labels: Vec<Option<usize>> = (0..request.n)
        .map(|i| request.num_classes.map(|c| i % c))
        .collect();
    let shape = [request.n, request.channels, request.size, request.size];
    let draw = Draw {
        sampler: request.sampler,
        guidance: request.guidance,
        seed: request.seed,
    };
    let out = draw.run(model, schedule, None, shape, &labels, device, None)?;
    let values = host_values(out);
    Ok(write_png(
        path,
        &GridLayout::new(request.n, request.channels, request.size, request.size),
        &values,
        &labels,
    )?)
}
