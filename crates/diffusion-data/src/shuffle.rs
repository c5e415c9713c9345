//! A small, seedable shuffle that gives the same order on every platform.
//!
//! SplitMix64 (Steele, Lea and Flood 2014; the generator Java's
//! `SplittableRandom` and xoshiro's seeding use) drives a Fisher–Yates
//! shuffle, with Lemire's unbiased multiply-and-reject for the bounded
//! draws. Only integer arithmetic, so the order is a pure function of the
//! seed on any machine.

/// The SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` without modulo bias (Lemire 2019).
    ///
    /// # Panics
    /// If `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }
}

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
    fn splitmix64_matches_the_reference_sequence() {
        // The reference C implementation (Vigna, splitmix64.c) from state 0
        // gives e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn below_stays_in_range_and_is_roughly_uniform() {
        let mut rng = SplitMix64::new(7);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[rng.below(3) as usize] += 1;
        }
        for c in counts {
            // Binomial(30000, 1/3): sd ≈ 82, so ±500 is > 6 sd.
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

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
