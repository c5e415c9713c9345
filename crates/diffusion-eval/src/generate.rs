//! Seeded generation of labelled samples, in batches over threads: the
//! images depend only on the seed, the batch size and the labels, never on
//! the thread count or timing.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::rng::mix_seed;
use diffusion_core::{sample, Denoiser, Guided, NoiseSchedule, NoiseSource, SamplerConfig, SeededNoise};

use crate::judge::host_values;
use crate::EvalError;

/// How [`generate`] draws: the sampler, the guidance scale, the batch size
/// and the seed (batch k takes all its noise from
/// `SeededNoise(mix_seed(seed, k))`).
#[derive(Debug, Clone)]
pub struct Generation {
    /// The sampler and its step count.
    pub sampler: SamplerConfig,
    /// Classifier-free guidance scale (1 = plain conditional sampling).
    pub guidance: f64,
    /// Images per batch.
    pub batch: usize,
    /// Seed of all the noise.
    pub seed: u64,
    /// Threads drawing batches at once (on a CPU backend, so that the
    /// single-threaded stretches between parallel kernels overlap; 1 on a GPU).
    pub threads: usize,
}

/// Draws one image per entry of `labels` (`shape` = [c, h, w]) with `model`
/// and returns them as [−1, 1] floats, `[n, c, h, w]` row-major.
/// `progress` is called with the images done after each batch.
pub fn generate<B, D>(
    model: &D,
    schedule: &NoiseSchedule,
    how: &Generation,
    labels: &[usize],
    shape: [usize; 3],
    device: &B::Device,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<f32>, EvalError>
where
    B: Backend,
    D: Denoiser<B> + Clone + Send,
{
    if how.batch == 0 {
        return Err(EvalError::Invalid(
            "a generation batch must hold at least 1 image".into(),
        ));
    }
    let chunks: Vec<&[usize]> = labels.chunks(how.batch).collect();
    let threads = how.threads.clamp(1, chunks.len().max(1));
    let mut results: Vec<Option<Result<Vec<f32>, EvalError>>> = (0..chunks.len()).map(|_| None).collect();
    // Worker `w` draws batches w, w + threads, ...
    let work = |model: &D, w: usize| {
        let mut done = Vec::new();
        for k in (w..chunks.len()).step_by(threads) {
            let out = generate_batch(model, schedule, how, chunks[k], shape, k, device);
            progress(chunks[k].len());
            done.push((k, out));
        }
        done
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads)
            .map(|w| {
                let model = model.clone();
                let work = &work;
                scope.spawn(move || work(&model, w))
            })
            .collect();
        // Worker 0 is the calling thread: where it is a thread of the
        // CPU kernels' pool (`diffusion_flex_kernels::join_global_pool`),
        // blocking in `join` meanwhile would leave that share idle.
        let mine = work(model, 0);
        for done in std::iter::once(mine).chain(
            handles
                .into_iter()
                .map(|h| h.join().expect("a sampling thread panicked")),
        ) {
            for (k, out) in done {
                results[k] = Some(out);
            }
        }
    });
    let mut images = Vec::with_capacity(labels.len() * shape.iter().product::<usize>());
    for r in results {
        images.extend(r.expect("every batch ran")?);
    }
    Ok(images)
}

/// Batch `k`: noise from `SeededNoise(mix_seed(seed, k))`.
fn generate_batch<B: Backend, D: Denoiser<B>>(
    model: &D,
    schedule: &NoiseSchedule,
    how: &Generation,
    classes: &[usize],
    shape: [usize; 3],
    k: usize,
    device: &B::Device,
) -> Result<Vec<f32>, EvalError> {
    let m = classes.len();
    let mut noise = SeededNoise::new(mix_seed(how.seed, k as u64));
    let x: Tensor<B, 4> = noise.sample([m, shape[0], shape[1], shape[2]], device);
    let ids: Vec<i32> = classes.iter().map(|&c| c as i32).collect();
    let classes = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [m]), device);
    let mut sampler = how.sampler.build::<B>(schedule)?;
    let guided = Guided::new(model, how.guidance);
    let x = sample(&guided, sampler.as_mut(), x, Some(classes), &mut noise, |_, _| {});
    Ok(host_values(x.clamp(-1.0, 1.0)))
}
