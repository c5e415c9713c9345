//! A small, seedable shuffle that gives the same order on every platform.
//!
//! SplitMix64 ([`diffusion_core::rng`]) drives a Fisher–Yates
//! shuffle, with Lemire's unbiased multiply-and-reject for the bounded
//! draws. Only integer arithmetic, so the order is a pure function of the
//! seed on any machine.

pub use diffusion_core::rng::SplitMix64;

/// The order in which epoch `epoch` visits the indices `0..len`: a
/// Fisher–Yates shuffle from a generator seeded by `(seed, epoch)`.
///
/// # Panics
/// If `len` exceeds `u32::MAX`.
pub fn epoch_permutation(len: usize, seed: u64, epoch: u64) -> Vec<u32> {
    assert!(len <= u32::MAX as usize, "cannot shuffle {len} indices");
    // Derive a per-epoch seed by running the seed and the epoch through the
    // generator's mixer, so nearby (seed, epoch) pairs give unrelated orders.
    let key = SplitMix64::new(seed).next_u64() ^ SplitMix64::new(!epoch).next_u64();
    let mut rng = SplitMix64::new(key);
    let mut order: Vec<u32> = (0..len as u32).collect();
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_is_a_pure_function_of_seed_and_epoch() {
        let a = epoch_permutation(1000, 42, 3);
        assert_eq!(a, epoch_permutation(1000, 42, 3));
        assert_ne!(a, epoch_permutation(1000, 42, 4));
        assert_ne!(a, epoch_permutation(1000, 43, 3));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn the_order_is_pinned() {
        // A change here changes every training run's batch order, so it must
        // be deliberate. The expected orders come from this Python transcription:
        //
        //     M = (1 << 64) - 1
        //     class SM:
        //         def __init__(s, x): s.s = x & M
        //         def next(s):
        //             s.s = (s.s + 0x9E3779B97F4A7C15) & M; z = s.s
        //             z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        //             z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        //             return z ^ (z >> 31)
        //         def below(s, n):
        //             m = s.next() * n
        //             if (m & M) < n:
        //                 t = ((1 << 64) - n) % n
        //                 while (m & M) < t: m = s.next() * n
        //             return m >> 64
        //     def perm(n, seed, epoch):
        //         r = SM(SM(seed).next() ^ SM(~epoch & M).next()); o = list(range(n))
        //         for i in range(n - 1, 0, -1):
        //             j = r.below(i + 1); o[i], o[j] = o[j], o[i]
        //         return o
        assert_eq!(epoch_permutation(10, 0, 0), [3, 7, 0, 6, 5, 9, 8, 1, 4, 2]);
        assert_eq!(epoch_permutation(10, 42, 3), [7, 6, 2, 3, 0, 8, 1, 5, 4, 9]);
        assert!(epoch_permutation(0, 1, 1).is_empty());
        assert_eq!(epoch_permutation(1, 1, 1), [0]);
    }
}
