//! The batch loader: shuffled epochs of [`HostBatch`]es, prepared ahead of
//! time by worker threads.
//!
//! Batch b of epoch e holds the images `perm[b·bs .. (b+1)·bs]`, where
//! `perm` is [`epoch_permutation`]`(len, seed, e)`; the last partial batch
//! is dropped. With W workers, worker w prepares batches start+w,
//! start+w+W, … and hands each over through its own bounded channel; the
//! consumer reads the channels in turn. Batches therefore come out in index
//! order whatever the thread timing, and at most W·(prefetch+1) batches
//! wait in memory.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::batch::HostBatch;
use crate::image_set::ImageSet;
use crate::shuffle::epoch_permutation;

/// How many batches each worker may have ready before it waits.
pub const DEFAULT_PREFETCH: usize = 2;

/// Hands out shuffled batches of an [`ImageSet`].
#[derive(Clone)]
pub struct BatchLoader {
    set: Arc<ImageSet>,
    batch_size: usize,
    seed: u64,
    workers: usize,
    prefetch: usize,
    /// Images in use: the first `used` of the set.
    used: usize,
    /// This replica's share of every batch: (rank, world size).
    part: (usize, usize),
}

impl BatchLoader {
    /// A loader over all of `set`, in batches of `batch_size`, shuffled from
    /// `seed`, with `workers` threads preparing batches (0: prepare each
    /// batch on the calling thread when it is asked for).
    ///
    /// # Panics
    /// If `batch_size` is 0.
    pub fn new(set: Arc<ImageSet>, batch_size: usize, seed: u64, workers: usize) -> Self {
        assert!(batch_size > 0, "BatchLoader: batch_size must be at least 1");
        BatchLoader {
            used: set.len,
            set,
            batch_size,
            seed,
            workers,
            prefetch: DEFAULT_PREFETCH,
            part: (0, 1),
        }
    }

    /// Hands out only replica `rank`'s share of every batch, for
    /// data-parallel training over `world` replicas: batch b of an epoch is
    /// the same set of images as without a split, and replica r gets its
    /// r-th contiguous slice of `batch_size / world` images. Together the
    /// replicas read each epoch once; what a replica reads is a pure
    /// function of `(seed, epoch, rank, world)`.
    ///
    /// # Panics
    /// If `world` is 0, `rank >= world` or `world` does not divide the batch size.
    pub fn part(mut self, rank: usize, world: usize) -> Self {
        assert!(
            world > 0 && rank < world && self.batch_size.is_multiple_of(world),
            "BatchLoader::part: rank {rank} of {world} cannot split batches of {}",
            self.batch_size
        );
        self.part = (rank, world);
        self
    }

    /// Uses only the first `max_images` images of the set (quick presets).
    pub fn limit(mut self, max_images: usize) -> Self {
        self.used = max_images.min(self.set.len);
        self
    }

    /// Sets how many batches each worker may prepare ahead (at least 1).
    pub fn with_prefetch(mut self, batches: usize) -> Self {
        self.prefetch = batches.max(1);
        self
    }

    /// Images drawn from per epoch (before the last partial batch is dropped).
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether there are no images at all.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Images per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The seed the epochs' shuffles derive from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Worker threads preparing batches (0: batches are prepared on the calling thread).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The whole image set, including images beyond [`limit`](Self::limit).
    pub fn set(&self) -> &Arc<ImageSet> {
        &self.set
    }

    /// This loader's share of each batch: `(rank, world)` (`(0, 1)`: all).
    pub fn share(&self) -> (usize, usize) {
        self.part
    }

    /// Full batches per epoch: `len / batch_size`, the rest is dropped.
    pub fn batches_per_epoch(&self) -> usize {
        self.used / self.batch_size
    }

    /// The order in which epoch `epoch` visits the images.
    pub fn permutation(&self, epoch: u64) -> Vec<u32> {
        epoch_permutation(self.used, self.seed, epoch)
    }

    /// The batches of epoch `epoch` in order, from batch `start` on (to
    /// resume mid-epoch; `start >= batches_per_epoch()` gives none). The
    /// shuffle is a pure function of `(seed, epoch)`, so a resumed epoch
    /// yields exactly the batches the interrupted one had left.
    pub fn epoch(&self, epoch: u64, start: usize) -> Epoch {
        let end = self.batches_per_epoch();
        let start = start.min(end);
        let plan = Arc::new(Plan {
            set: Arc::clone(&self.set),
            order: self.permutation(epoch),
            batch_size: self.batch_size,
            part: self.part,
        });
        let mut epoch = Epoch {
            plan,
            next: start,
            start,
            end,
            receivers: Vec::new(),
            handles: Vec::new(),
        };
        let workers = self.workers.min(end - start);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.prefetch);
            let plan = Arc::clone(&epoch.plan);
            let spawned = std::thread::Builder::new()
                .name(format!("diffusion-data-{w}"))
                .spawn(move || {
                    for b in (start + w..end).step_by(workers) {
                        // The consumer went away: stop quietly.
                        if tx.send(plan.batch(b)).is_err() {
                            break;
                        }
                    }
                });
            match spawned {
                Ok(handle) => {
                    epoch.receivers.push(rx);
                    epoch.handles.push(handle);
                }
                // No threads to be had: stop those started and prepare the
                // batches on the calling thread instead (same order).
                Err(_) => {
                    epoch.stop_workers();
                    break;
                }
            }
        }
        epoch
    }
}

impl std::fmt::Debug for BatchLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLoader")
            .field("set", &self.set)
            .field("used", &self.used)
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("workers", &self.workers)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

/// What an epoch's workers share.
struct Plan {
    set: Arc<ImageSet>,
    order: Vec<u32>,
    batch_size: usize,
    part: (usize, usize),
}

impl Plan {
    fn batch(&self, b: usize) -> HostBatch {
        let (rank, world) = self.part;
        let share = self.batch_size / world;
        let start = b * self.batch_size + rank * share;
        HostBatch::gather(&self.set, &self.order[start..start + share])
    }
}

/// One epoch's batches, in order. Dropping it early stops its workers.
pub struct Epoch {
    plan: Arc<Plan>,
    next: usize,
    start: usize,
    end: usize,
    receivers: Vec<Receiver<HostBatch>>,
    handles: Vec<JoinHandle<()>>,
}

impl Iterator for Epoch {
    type Item = HostBatch;

    fn next(&mut self) -> Option<HostBatch> {
        if self.next >= self.end {
            return None;
        }
        let b = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(self.plan.batch(b));
        }
        let w = (b - self.start) % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => Some(batch),
            // The worker ended without sending: it panicked. Re-raise its
            // panic here rather than end the epoch short.
            Err(_) => {
                let handle = self.handles.remove(w);
                match handle.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(()) => unreachable!("a loader worker stopped before its last batch"),
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Epoch {}

impl Epoch {
    fn stop_workers(&mut self) {
        // Closing the channels makes every blocked `send` fail, so the
        // workers finish the batch in hand and return.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch")
            .field("next", &self.next)
            .field("end", &self.end)
            .field("workers", &self.handles.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 images of 2×3; image i is filled with i and labelled i mod 10.
    fn numbered_set(n: usize) -> Arc<ImageSet> {
        let images = (0..n).flat_map(|i| [i as u8; 6]).collect();
        let labels = (0..n).map(|i| (i % 10) as u8).collect();
        Arc::new(ImageSet::new(images, labels, 2, 3))
    }

    /// Which image each batch holds, read back from its pixels.
    fn ids(batch: &HostBatch) -> Vec<u32> {
        batch
            .images
            .chunks(6)
            .map(|img| ((img[0] + 1.0) * 127.5).round() as u32)
            .collect()
    }

    #[test]
    fn an_epoch_is_the_permutation_cut_into_full_batches() {
        let loader = BatchLoader::new(numbered_set(100), 16, 5, 0);
        assert_eq!(loader.batches_per_epoch(), 6);
        let batches: Vec<HostBatch> = loader.epoch(0, 0).collect();
        assert_eq!(batches.len(), 6);
        let seen: Vec<u32> = batches.iter().flat_map(ids).collect();
        assert_eq!(seen, loader.permutation(0)[..96]);
        for b in &batches {
            assert_eq!((b.len, b.height, b.width), (16, 2, 3));
            assert_eq!(b.images.len(), 16 * 6);
            let want: Vec<i32> = ids(b).iter().map(|&i| (i % 10) as i32).collect();
            assert_eq!(b.labels, want);
        }
    }

    #[test]
    fn replicas_split_every_batch_and_read_the_epoch_once() {
        let set = numbered_set(100);
        let whole: Vec<Vec<u32>> = BatchLoader::new(set.clone(), 12, 3, 0)
            .epoch(1, 0)
            .map(|b| ids(&b))
            .collect();
        let world = 3;
        let parts: Vec<Vec<Vec<u32>>> = (0..world)
            .map(|r| {
                BatchLoader::new(set.clone(), 12, 3, 2)
                    .part(r, world)
                    .epoch(1, 0)
                    .map(|b| ids(&b))
                    .collect()
            })
            .collect();
        assert_eq!(whole.len(), 8);
        for (b, batch) in whole.iter().enumerate() {
            // Replica r holds the r-th third of batch b, in order.
            let joined: Vec<u32> = (0..world).flat_map(|r| parts[r][b].clone()).collect();
            assert_eq!(&joined, batch);
            assert!(parts.iter().all(|p| p[b].len() == 4));
        }
        // Resuming mid-epoch resumes each replica's share.
        let resumed: Vec<Vec<u32>> = BatchLoader::new(set, 12, 3, 0)
            .part(1, world)
            .epoch(1, 5)
            .map(|b| ids(&b))
            .collect();
        assert_eq!(resumed, parts[1][5..]);
    }

    #[test]
    fn workers_do_not_change_the_order() {
        let set = numbered_set(250);
        let reference: Vec<HostBatch> = BatchLoader::new(set.clone(), 8, 11, 0).epoch(2, 0).collect();
        for workers in [1, 2, 3, 7, 64] {
            let loader = BatchLoader::new(set.clone(), 8, 11, workers).with_prefetch(1);
            let got: Vec<HostBatch> = loader.epoch(2, 0).collect();
            assert_eq!(got, reference, "{workers} workers");
        }
    }

    #[test]
    fn epochs_differ_and_repeat() {
        let loader = BatchLoader::new(numbered_set(64), 64, 1, 2);
        let e0: Vec<_> = loader.epoch(0, 0).collect();
        let e1: Vec<_> = loader.epoch(1, 0).collect();
        assert_ne!(ids(&e0[0]), ids(&e1[0]));
        assert_eq!(e0, loader.epoch(0, 0).collect::<Vec<_>>());
    }

    #[test]
    fn resuming_mid_epoch_gives_the_rest_of_it() {
        let loader = BatchLoader::new(numbered_set(100), 10, 3, 3);
        let all: Vec<_> = loader.epoch(4, 0).collect();
        let rest: Vec<_> = loader.epoch(4, 7).collect();
        assert_eq!(rest, all[7..]);
        assert_eq!(loader.epoch(4, 7).len(), 3);
        assert_eq!(loader.epoch(4, 10).count(), 0);
        assert_eq!(loader.epoch(4, 99).count(), 0);
    }

    #[test]
    fn limit_uses_only_the_first_images() {
        let loader = BatchLoader::new(numbered_set(100), 4, 0, 2).limit(10);
        assert_eq!((loader.len(), loader.batches_per_epoch()), (10, 2));
        let seen: Vec<u32> = loader.epoch(0, 0).flat_map(|b| ids(&b)).collect();
        assert_eq!(seen.len(), 8);
        assert!(seen.iter().all(|&i| i < 10), "{seen:?}");
    }

    #[test]
    fn dropping_an_epoch_early_stops_its_workers() {
        let loader = BatchLoader::new(numbered_set(100), 1, 0, 4);
        let mut epoch = loader.epoch(0, 0);
        assert!(epoch.next().is_some());
        drop(epoch); // joins the workers; hangs here if they did not stop
    }

    #[test]
    fn fewer_images_than_a_batch_give_no_batches() {
        let loader = BatchLoader::new(numbered_set(5), 8, 0, 2);
        assert_eq!(loader.batches_per_epoch(), 0);
        assert_eq!(loader.epoch(0, 0).count(), 0);
    }
}
