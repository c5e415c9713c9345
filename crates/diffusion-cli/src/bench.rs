//! `diffusion bench`: training and sampling speed of the reference U-Net
//! on one backend, in the terms of shared/bench/torch_ref/bench.py
//! (synthetic data, Adam steps at batch 128 and 32, 81 images x 35 DDIM
//! steps), so the two can be run side by side.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_core::{sample, BackendNoise, NoiseSchedule, SamplerConfig, SamplerKind};
use diffusion_model::{AttentionImpl, UNet, UNetConfig};
use diffusion_train::{Trainer, TrainerConfig};
use serde::Serialize;

use crate::backend::{dispatch, BackendKind, Task};

/// `diffusion bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Timed training steps at batch 128 (after --warmup untimed ones);
    /// the defaults are shared/bench/torch_ref/bench.py's.
    #[arg(long, default_value_t = 10)]
    pub repeats_128: usize,
    /// Timed training steps at batch 32.
    #[arg(long, default_value_t = 20)]
    pub repeats_32: usize,
    /// Timed training steps at both batch sizes (overrides --repeats-128
    /// and --repeats-32).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Untimed training steps before the timed ones, per batch size.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed sampling runs (81 images x 35 steps each).
    #[arg(long, default_value_t = 3)]
    pub sample_repeats: usize,
    /// Attention: fused (the backend's attention kernel: FlashAttention on
    /// the CPU, burn's attention op elsewhere) or explicit (burn's matmul +
    /// softmax, written out).
    #[arg(long, value_enum, default_value = "fused")]
    pub attention: AttentionArg,
    /// The network: the reference U-Net (what shared/bench/torch_ref
    /// times), or the tiny preset's (a quick check that a backend runs).
    #[arg(long, value_enum, default_value = "reference")]
    pub model: BenchModel,
    /// Skip batch 128 (slow on small CPUs).
    #[arg(long)]
    pub skip_128: bool,
    /// Skip timing 1,000 guided digits (what an evaluation costs; about 3
    /// minutes on a 2-core CPU).
    #[arg(long)]
    pub skip_1000: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    Reference,
    Tiny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionArg {
    Fused,
    Explicit,
}

/// Repeated timings of one row, in seconds: what
/// shared/bench/torch_ref/bench.py's `summary` reports (median, min, max,
/// count), plus the spread max/min, so the variance between repeats is
/// visible beside the median.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
    spread: f64,
    /// Every repeat in the order it ran (an outlier's position tells a
    /// warm-up effect from machine noise).
    times: Vec<f64>,
}

impl Summary {
    /// `None` for no timings. The median of an even count is the mean of
    /// the middle two, as Python's `statistics.median`.
    fn of(in_order: Vec<f64>) -> Option<Summary> {
        if in_order.is_empty() {
            return None;
        }
        let mut times = in_order.clone();
        times.sort_by(|a, b| a.total_cmp(b));
        let n = times.len();
        let median = if n % 2 == 1 {
            times[n / 2]
        } else {
            (times[n / 2 - 1] + times[n / 2]) / 2.0
        };
        let (min, max) = (times[0], times[n - 1]);
        Some(Summary {
            median,
            min,
            max,
            n,
            spread: max / min,
            times: in_order,
        })
    }
}

/// Every row's repeats, as bench.py's `detail`.
#[derive(Debug, Serialize)]
struct Detail {
    train_b128_s: Option<Summary>,
    train_b32_s: Summary,
    sample_81x35_s: Summary,
}

/// The CPU the numbers were measured on (from /proc/cpuinfo, Linux):
/// speed comparisons differ between CPU families, so every result names it.
#[derive(Debug, Default, Serialize)]
struct CpuInfo {
    model_name: String,
    family: String,
    model: String,
    /// The flags that decide which kernels run (ours and oneDNN's).
    flags: Vec<String>,
}

impl CpuInfo {
    const FLAGS: [&'static str; 7] = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "avx_vnni",
    ];

    fn read() -> Option<CpuInfo> {
        Some(CpuInfo::parse(&std::fs::read_to_string("/proc/cpuinfo").ok()?))
    }

    /// The first processor's entry of a /proc/cpuinfo text.
    fn parse(text: &str) -> CpuInfo {
        let mut info = CpuInfo::default();
        for line in text.lines() {
            if line.trim().is_empty() && !info.model_name.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "model name" => info.model_name = value.to_string(),
                "cpu family" => info.family = value.to_string(),
                "model" => info.model = value.to_string(),
                "flags" => {
                    let has: Vec<&str> = value.split_whitespace().collect();
                    info.flags = CpuInfo::FLAGS
                        .iter()
                        .filter(|f| has.contains(f))
                        .map(|f| f.to_string())
                        .collect();
                }
                _ => {}
            }
        }
        info
    }
}

/// The 1-minute load average (Linux): a loaded machine explains a spread.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Debug, Serialize)]
struct BenchResult {
    backend: &'static str,
    model: String,
    threads: usize,
    attention: String,
    /// Whose kernels ran: the CPU kernels of this project, or burn's own.
    kernels: &'static str,
    /// On the CPU backend, the vector instructions of those kernels and of
    /// gemm's matrix products.
    simd: Option<crate::backend::CpuSimd>,
    params: usize,
    train_ms_per_step_b128: Option<f64>,
    train_ms_per_step_b32: f64,
    train_images_per_s_b128: Option<f64>,
    train_images_per_s_b32: f64,
    sample_81x35_s: f64,
    /// Seconds for 1,000 digits (100 per class) as `eval` makes them:
    /// DPM-Solver++(2M), 20 steps, guidance 1.6 (conditional and
    /// unconditional branches in one doubled batch), batches of 250.
    sample_1000_dpm20_guided_s: Option<f64>,
    /// The same 1,000 digits in 4 unguided DDIM steps: a distilled run.
    sample_1000_distilled4_s: Option<f64>,
    peak_rss_mib: Option<f64>,
    detail: Detail,
    cpu: Option<CpuInfo>,
    loadavg_start_end: [Option<f64>; 2],
}

pub fn run(mut args: BenchArgs) -> Result<i32> {
    if let Some(n) = args.repeats {
        args.repeats_128 = n;
        args.repeats_32 = n;
    }
    if args.repeats_128 == 0 || args.repeats_32 == 0 || args.sample_repeats == 0 {
        bail!("--repeats, --repeats-128, --repeats-32 and --sample-repeats must be at least 1");
    }
    let backend = BackendKind::resolve(args.backend);
    dispatch(backend, BenchTask { args, backend })
}

struct BenchTask {
    args: BenchArgs,
    backend: BackendKind,
}

/// Seconds of each timed training step at `batch` on synthetic data: the
/// same `Trainer::step` that `train` runs (Adam, EMA, ε-MSE), unsharded.
fn time_training<B: AutodiffBackend>(
    config: &UNetConfig,
    schedule: &NoiseSchedule,
    batch: usize,
    warmup: usize,
    repeats: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let model: UNet<B> = config.init_seeded(device, 0)?;
    let mut trainer = Trainer::new(
        model,
        schedule,
        TrainerConfig::new((warmup + repeats) as u64),
        device,
    );
    let x0 = Tensor::<B, 4>::random([batch, 1, 28, 28], Distribution::Uniform(-1.0, 1.0), device);
    let classes = Tensor::<B, 1>::random([batch], Distribution::Uniform(0.0, 10.0), device).int();
    let mut times = Vec::new();
    for i in 0..warmup + repeats {
        let start = Instant::now();
        trainer.step(x0.clone(), Some(classes.clone()));
        // Wait for the device: read one parameter value back.
        let _ = trainer.model().valid().head.conv2.weight.val().sum().into_data();
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// Seconds of each run sampling 81 images with 35 DDIM(η = 0) steps.
fn time_sampling<B: Backend>(
    model: &UNet<B>,
    schedule: &NoiseSchedule,
    repeats: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let config = SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 35);
    let classes = Tensor::<B, 1, Int>::arange(0..81, device).remainder_scalar(10);
    // One warm-up forward pass at the sampling batch size.
    let x = Tensor::<B, 4>::random([81, 1, 28, 28], Distribution::Normal(0.0, 1.0), device);
    let t = Tensor::<B, 1, Int>::full([81], 250, device);
    let _ = model.forward(x, t, Some(classes.clone())).into_data();
    let mut times = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        let mut sampler = config.build::<B>(schedule)?;
        let x = Tensor::<B, 4>::random([81, 1, 28, 28], Distribution::Normal(0.0, 1.0), device);
        let out = sample(
            model,
            sampler.as_mut(),
            x,
            Some(classes.clone()),
            &mut BackendNoise,
            |_, _| {},
        );
        let _ = out.into_data();
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Seconds to generate 1,000 digits the way `eval --per-class 100` does,
/// with `sampler` and `guidance`: the teacher's DPM-Solver++ 20 steps with
/// guidance 1.6, or a distilled student's 4 DDIM steps without.
fn time_eval_sampling<B: Backend>(
    model: &UNet<B>,
    schedule: &NoiseSchedule,
    (sampler, guidance): (SamplerConfig, f64),
    cpu: bool,
    device: &B::Device,
) -> Result<f64> {
    let labels: Vec<usize> = (0..10).flat_map(|c| std::iter::repeat_n(c, 100)).collect();
    let how = diffusion_eval::Generation {
        sampler,
        guidance,
        batch: 250,
        seed: 0,
        threads: crate::backend::sampling_threads(cpu),
    };
    let start = Instant::now();
    let images = diffusion_eval::generate(model, schedule, &how, &labels, [1, 28, 28], device, &|_| {})?;
    let took = start.elapsed().as_secs_f64();
    if images.len() != labels.len() * 784 {
        bail!("generated {} values for {} digits", images.len(), labels.len());
    }
    Ok(took)
}

/// Peak resident memory of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The table a person reads: medians, and each row's min-max and spread
/// over its repeats.
fn report(result: &BenchResult) {
    say!(
        "backend {} ({} threads), {} attention, kernels: {}, {} parameters",
        result.backend,
        result.threads,
        result.attention,
        result.kernels,
        result.params
    );
    if let Some(cpu) = &result.cpu {
        say!(
            "cpu {} (family {}, model {}; {})",
            cpu.model_name,
            cpu.family,
            cpu.model,
            cpu.flags.join(" ")
        );
    }
    if let Some(simd) = &result.simd {
        say!(
            "simd         {} (our kernels), {} (gemm)",
            simd.kernels,
            simd.gemm
        );
    }
    let spread = |s: &Summary, scale: f64, unit: &str| {
        let digits = if unit == "s" { 2 } else { 1 };
        format!(
            "(min {:.digits$}, max {:.digits$} {unit} of {}: spread {:.2}x)",
            s.min * scale,
            s.max * scale,
            s.n,
            s.spread
        )
    };
    if let Some(s) = &result.detail.train_b128_s {
        say!(
            "train b128   {:>9.1} ms/step  {:>8.1} img/s  {}",
            s.median * 1e3,
            128.0 / s.median,
            spread(s, 1e3, "ms")
        );
    }
    let s = &result.detail.train_b32_s;
    say!(
        "train b32    {:>9.1} ms/step  {:>8.1} img/s  {}",
        s.median * 1e3,
        32.0 / s.median,
        spread(s, 1e3, "ms")
    );
    let s = &result.detail.sample_81x35_s;
    say!("sample 81x35 {:>9.2} s  {}", s.median, spread(s, 1.0, "s"));
    if let Some(t) = result.sample_1000_dpm20_guided_s {
        say!("1000 digits  {t:>9.1} s (DPM-Solver++ 20 steps, guidance 1.6: an eval)");
    }
    if let Some(t) = result.sample_1000_distilled4_s {
        say!("1000 digits  {t:>9.1} s (4 steps, guidance folded in: a distilled run)");
    }
    if let Some(m) = result.peak_rss_mib {
        say!("peak RSS     {m:>9.0} MiB (host)");
    }
    if let [Some(a), Some(b)] = result.loadavg_start_end {
        say!("load average {a:.2} at the start, {b:.2} at the end");
    }
}

impl Task for BenchTask {
    type Output = i32;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<i32> {
        let args = self.args;
        let attention = match args.attention {
            AttentionArg::Fused => AttentionImpl::Fused,
            AttentionArg::Explicit => AttentionImpl::Explicit,
        };
        let config = match args.model {
            BenchModel::Reference => UNetConfig::new(),
            BenchModel::Tiny => crate::config::RunConfig::preset(crate::config::Preset::Tiny).model,
        }
        .with_attention_impl(attention);
        let schedule = NoiseSchedule::reference();
        let threads = crate::backend::cpu_threads();
        let load_start = loadavg();
        eprintln!("timing training at batch 32 ...");
        let t32 = time_training::<B>(&config, &schedule, 32, args.warmup, args.repeats_32, &device)?;
        let t128 = if args.skip_128 {
            None
        } else {
            eprintln!("timing training at batch 128 ...");
            Some(time_training::<B>(
                &config,
                &schedule,
                128,
                args.warmup,
                args.repeats_128,
                &device,
            )?)
        };
        eprintln!("timing sampling of 81 images x 35 DDIM steps ...");
        B::seed(&device, 0);
        let model: UNet<B::InnerBackend> = config.init(&device)?;
        let ts = time_sampling(&model, &schedule, args.sample_repeats, &device)?;
        let (t1000, t1000_distilled) = if args.skip_1000 {
            (None, None)
        } else {
            let cpu = self.backend.is_cpu();
            eprintln!("timing 1,000 digits as eval makes them (DPM-Solver++ 20 steps, guidance 1.6) ...");
            let teacher = (SamplerConfig::new(SamplerKind::DpmSolverPp, 20), 1.6);
            let t = time_eval_sampling(&model, &schedule, teacher, cpu, &device)?;
            eprintln!(
                "timing 1,000 digits as a 4-step distilled run makes them (DDIM 4 steps, no guidance) ..."
            );
            let student = (SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 4), 1.0);
            let d = time_eval_sampling(&model, &schedule, student, cpu, &device)?;
            (Some(t), Some(d))
        };
        let detail = Detail {
            train_b128_s: t128.and_then(Summary::of),
            train_b32_s: Summary::of(t32).context("no timed step at batch 32")?,
            sample_81x35_s: Summary::of(ts).context("no timed sampling run")?,
        };
        let b128 = detail.train_b128_s.as_ref().map(|s| s.median);
        let result = BenchResult {
            backend: self.backend.name(),
            model: format!("{:?}", args.model).to_lowercase(),
            threads,
            attention: format!("{attention:?}").to_lowercase(),
            kernels: if self.backend.is_cpu() {
                "flex_kernels"
            } else {
                "burn"
            },
            simd: self.backend.cpu_simd(),
            params: burn::module::Module::num_params(&model),
            train_ms_per_step_b128: b128.map(|t| t * 1e3),
            train_ms_per_step_b32: detail.train_b32_s.median * 1e3,
            train_images_per_s_b128: b128.map(|t| 128.0 / t),
            train_images_per_s_b32: 32.0 / detail.train_b32_s.median,
            sample_81x35_s: detail.sample_81x35_s.median,
            sample_1000_dpm20_guided_s: t1000,
            sample_1000_distilled4_s: t1000_distilled,
            peak_rss_mib: peak_rss_mib(),
            detail,
            cpu: CpuInfo::read(),
            loadavg_start_end: [load_start, loadavg()],
        };
        report(&result);
        say!("{}", serde_json::to_string(&result)?);
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_python_statistics() {
        // statistics.median([0.4, 0.1, 0.3]) == 0.3;
        // statistics.median([0.4, 0.1, 0.3, 0.2]) == 0.25.
        let odd = Summary::of(vec![0.4, 0.1, 0.3]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max, odd.n), (0.3, 0.1, 0.4, 3));
        assert!((odd.spread - 4.0).abs() < 1e-12);
        assert_eq!(
            odd.times,
            vec![0.4, 0.1, 0.3],
            "the repeats in the order they ran"
        );
        let even = Summary::of(vec![0.4, 0.1, 0.3, 0.2]).unwrap();
        assert!((even.median - 0.25).abs() < 1e-12);
        assert_eq!(Summary::of(vec![2.0]).unwrap().spread, 1.0);
        assert_eq!(Summary::of(vec![]), None);
    }

    #[test]
    fn cpu_info_reads_the_first_processor() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\
                    model\t\t: 106\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n\
                    flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n\n\
                    processor\t: 1\nmodel name\t: other\n";
        let info = CpuInfo::parse(text);
        assert_eq!(info.model_name, "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz");
        assert_eq!((info.family.as_str(), info.model.as_str()), ("6", "106"));
        assert_eq!(info.flags, ["avx2", "fma", "avx512f", "avx512_vnni"]);
    }
}
