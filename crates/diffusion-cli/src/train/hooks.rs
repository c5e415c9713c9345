//! What `train` shows and writes around the library's loop: the progress
//! bar, `metrics.csv`, the epoch previews, the quality probe and the plot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use diffusion_core::NoiseSchedule;
use diffusion_model::UNet;
use diffusion_train::{EpochEnd, FitObserver, HookError, LogEvent, Stop, Trainer};

use crate::config::{RunConfig, Weights};
use crate::progress;
use crate::sample::{preview_grid, PreviewRequest};

/// What `train` shows and writes around the library's loop: the progress
/// bar, `metrics.csv`, the epoch previews, the quality probe and the plot.
pub(super) struct Hooks<'a, B: AutodiffBackend> {
    pub(super) config: &'a RunConfig,
    pub(super) schedule: &'a NoiseSchedule,
    pub(super) run_dir: &'a Path,
    pub(super) device: B::Device,
    pub(super) cpu: bool,
    pub(super) total: u64,
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) metrics: Option<(Metrics, Instant)>,
    pub(super) probe: Option<(diffusion_eval::Probe<B::InnerBackend>, Metrics)>,
}

impl<B: AutodiffBackend> Hooks<'_, B> {
    pub(super) fn started(&self) -> Duration {
        self.metrics.as_ref().map_or(Duration::ZERO, |m| m.1.elapsed())
    }

    fn bar(&self) -> &indicatif::ProgressBar {
        self.bar.as_ref().expect("the bar is made in on_start")
    }

    /// The epoch's preview grid, drawn as `sample` draws.
    fn preview(&self, trainer: &Trainer<B, UNet<B>>, epochs_done: u64) -> Result<PathBuf> {
        let grid = self
            .run_dir
            .join("samples")
            .join(format!("epoch-{epochs_done:03}.png"));
        let c = self.config;
        let preview = PreviewRequest {
            sampler: &c.sampler,
            guidance: c.guidance,
            n: c.preview.n,
            seed: c.train.trainer.seed,
            channels: c.model.image_channels,
            size: c.model.image_size,
            num_classes: c.model.num_classes,
        };
        let weights = sampling_model(trainer, c.sample_weights);
        preview_grid::<B::InnerBackend>(&weights, self.schedule, &preview, &grid, &self.device)?;
        Ok(grid)
    }
}

impl<B: AutodiffBackend> FitObserver<B, UNet<B>> for Hooks<'_, B> {
    fn on_start(&mut self, trainer: &Trainer<B, UNet<B>>) -> Result<(), HookError> {
        let step = trainer.state().step;
        self.metrics = Some((Metrics::open(self.run_dir, step)?, Instant::now()));
        if let Some(q) = &self.config.preview.quality {
            let mut quality = Metrics::open_quality(self.run_dir, step)?;
            let probe = crate::eval::probe::<B::InnerBackend>(q, self.config, self.cpu, &self.device)?;
            // Before any training: the floor in the plot from the start.
            if step == 0 {
                let weights = sampling_model(trainer, self.config.sample_weights);
                let r = probe.measure(&weights, self.schedule, &self.device)?;
                quality.quality_row(0, 0, &r, probe.floor)?;
            }
            self.probe = Some((probe, quality));
        }
        let bar = progress::bar(self.total, "steps");
        bar.set_position(step);
        self.bar = Some(bar);
        Ok(())
    }

    fn on_step(&mut self, state: diffusion_train::TrainState) {
        self.bar().set_position(state.step);
    }

    fn on_log(&mut self, _: &Trainer<B, UNet<B>>, log: &LogEvent) -> Result<(), HookError> {
        let world = log.world as f64;
        let reduce_ms = 1e3 * log.all_reduce.as_secs_f64();
        let parallel = if log.world > 1 {
            format!(
                " ({:.0}/replica) · all-reduce {reduce_ms:.0} ms",
                log.images_per_s / world
            )
        } else {
            String::new()
        };
        self.bar().set_message(format!(
            "epoch {}/{} · loss {:.4} · {:.0} img/s{parallel}",
            log.epoch + 1,
            self.config.train.epochs,
            log.loss,
            log.images_per_s
        ));
        let (metrics, started) = self.metrics.as_mut().expect("opened in on_start");
        metrics.row(&MetricsRow {
            step: log.step,
            epoch: log.epoch,
            loss: log.loss,
            lr: log.lr,
            ips: log.images_per_s,
            elapsed: started.elapsed().as_secs_f64(),
            ips_per_replica: log.images_per_s / world,
            reduce_ms,
        })?;
        Ok(())
    }

    fn on_epoch_end(&mut self, trainer: &Trainer<B, UNet<B>>, end: &EpochEnd) -> Result<(), HookError> {
        let grid = self.preview(trainer, end.epochs_done)?;
        let mut quality_note = String::new();
        if let Some((probe, quality)) = &mut self.probe {
            let weights = sampling_model(trainer, self.config.sample_weights);
            let bar = self.bar.as_ref().expect("made in on_start");
            let r = bar.suspend(|| probe.measure(&weights, self.schedule, &self.device))?;
            quality.quality_row(end.step, end.epochs_done, &r, probe.floor)?;
            quality_note = format!(
                "; samples {:.1}% correct, Fréchet {:.1} (floor {:.1})",
                100.0 * r.accuracy,
                r.frechet,
                probe.floor
            );
        }
        crate::plot::draw_run(self.run_dir)?;
        let loss_note = match end.mean_loss {
            Some(l) => format!("mean loss {l:.4}"),
            None => "stopped at its end and resumed (its losses are in metrics.csv)".to_string(),
        };
        self.bar().suspend(|| {
            eprintln!(
                "epoch {}/{}: {loss_note}, {} steps, {:.0} s elapsed{quality_note}; samples: {}",
                end.epochs_done,
                self.config.train.epochs,
                end.step,
                end.elapsed.as_secs_f64(),
                grid.display()
            )
        });
        Ok(())
    }

    fn on_stop(&mut self, _: &Trainer<B, UNet<B>>, _: Stop) -> Result<(), HookError> {
        self.bar().abandon();
        Ok(())
    }
}

/// One line of `metrics.csv`.
pub(super) struct MetricsRow {
    step: u64,
    epoch: u64,
    loss: f64,
    lr: f64,
    /// Images per second, all replicas together.
    ips: f64,
    elapsed: f64,
    ips_per_replica: f64,
    /// Mean time of a step's gradient all-reduce (0 on one device).
    reduce_ms: f64,
}

/// `metrics.csv`: step, epoch, loss, lr, img/s, elapsed seconds, img/s per
/// replica, all-reduce milliseconds per step.
pub(super) struct Metrics {
    log: diffusion_train::CsvLog,
}

impl Metrics {
    /// Opens the run's metrics, dropping rows past `step` (written after
    /// the checkpoint a resumed run starts from).
    fn open(run_dir: &Path, step: u64) -> Result<Self> {
        Self::open_csv(
            run_dir,
            "metrics.csv",
            "step,epoch,loss,lr,img_per_s,elapsed_s,img_per_s_per_replica,allreduce_ms",
            step,
        )
    }

    /// `quality.csv`: the probe's accuracy and Fréchet distance per epoch.
    fn open_quality(run_dir: &Path, step: u64) -> Result<Self> {
        Self::open_csv(
            run_dir,
            "quality.csv",
            "step,epoch,accuracy,frechet,frechet_floor",
            step,
        )
    }

    fn open_csv(run_dir: &Path, name: &str, header: &str, step: u64) -> Result<Self> {
        let path = run_dir.join(name);
        let log = diffusion_train::CsvLog::open(&path, header, step)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { log })
    }

    fn write(&mut self, row: String) -> Result<()> {
        self.log
            .row(&row)
            .with_context(|| format!("writing {}", self.log.path().display()))
    }

    fn quality_row(
        &mut self,
        step: u64,
        epoch: u64,
        r: &diffusion_eval::ProbeResult,
        floor: f64,
    ) -> Result<()> {
        self.write(format!(
            "{step},{epoch},{:.4},{:.3},{floor:.3}",
            r.accuracy, r.frechet
        ))
    }

    fn row(&mut self, r: &MetricsRow) -> Result<()> {
        self.write(format!(
            "{},{},{:.6},{:.6e},{:.1},{:.2},{:.1},{:.1}",
            r.step,
            r.epoch + 1,
            r.loss,
            r.lr,
            r.ips,
            r.elapsed,
            r.ips_per_replica,
            r.reduce_ms
        ))
    }
}

/// The weights the run samples with by default (`sample_weights`): the
/// epoch previews and quality probes judge what `sample` and `eval` will
/// draw.
pub(super) fn sampling_model<B: AutodiffBackend>(
    trainer: &Trainer<B, UNet<B>>,
    weights: Weights,
) -> UNet<B::InnerBackend> {
    match weights {
        Weights::Ema => trainer.ema().model.clone(),
        Weights::Model => trainer.model().valid(),
    }
}
