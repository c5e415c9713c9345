//! Noise schedules: ᾱ(t) for t = 0..=T, computed in f64 on the host.
//!
//! A schedule is a table of the cumulative signal level ᾱ(t), with ᾱ(0) = 1.
//! Everything else (β, the forward process, the samplers' coefficients) is
//! derived from that table, so all three kinds of schedule behave alike.
//!
//! # The end of the schedule
//!
//! The cosine schedule's ᾱ(T) is 0 up to rounding, which makes
//! x̂0 = (x_t − √(1−ᾱ)·ε)/√ᾱ undefined at t = T. Every schedule here clips
//! the per-step β(t) = 1 − ᾱ(t)/ᾱ(t−1) at [`MAX_BETA`] = 0.999, as Nichol &
//! Dhariwal (2021) do. For the reference cosine schedule (T = 500, s = 0.008)
//! only the very last step is clipped: ᾱ(0..T−1) are exactly the values of
//! the formula, and ᾱ(T) becomes 0.001·ᾱ(T−1) ≈ 9.7e-9 instead of ~1e-33.
//! Samplers starting at t = T therefore see a tiny but positive √ᾱ, and their
//! start noise N(0, I) is still the right distribution to within 1e-8.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// Largest per-step β(t) a schedule may have; see the module docs.
pub const MAX_BETA: f64 = 0.999;

/// The shape of a noise schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Nichol & Dhariwal (2021): f(t) = cos²((π/2)·(t/T + s)/(1 + s)),
    /// ᾱ(t) = f(t)/f(0). The reference uses s = 0.008.
    Cosine {
        /// Small offset s > 0 that keeps β near t = 0 from being too small.
        s: f64,
    },
    /// Ho et al. (2020): β linear from `beta_start` to `beta_end` over
    /// t = 1..=T. The DDPM values (1e-4, 0.02) are for T = 1000; use
    /// [`Schedule::linear_ddpm`] to have them scaled by 1000/T.
    Linear {
        /// β at t = 1, in (0, `beta_end`].
        beta_start: f64,
        /// β at t = T, in [`beta_start`, 1).
        beta_end: f64,
    },
    /// Chen (2023), "On the importance of noise scheduling":
    /// ᾱ(t) = (σ(end/τ) − σ((t/T·(end−start) + start)/τ)) / (σ(end/τ) − σ(start/τ)).
    Sigmoid {
        /// Sigmoid input at t = 0 (before division by τ); must be < `end`.
        start: f64,
        /// Sigmoid input at t = T (before division by τ); must be > `start`.
        end: f64,
        /// Temperature τ > 0: larger values make the schedule closer to linear.
        tau: f64,
    },
}

impl Default for Schedule {
    /// The reference schedule: cosine with s = 0.008.
    fn default() -> Self {
        Schedule::Cosine { s: 0.008 }
    }
}

/// The most diffusion steps a schedule may have (DDPM used 1,000; the
/// bound keeps a mistyped T from allocating gigabytes).
pub const MAX_STEPS: usize = 100_000;

impl Schedule {
    /// DDPM's linear schedule (β from 1e-4 to 0.02 at T = 1000), scaled by
    /// 1000/T as in Nichol & Dhariwal (2021) so that other T keep the same
    /// end-to-end noise level.
    pub fn linear_ddpm(num_steps: usize) -> Self {
        let scale = 1000.0 / num_steps as f64;
        Schedule::Linear {
            beta_start: 1e-4 * scale,
            beta_end: 0.02 * scale,
        }
    }

    /// Chen (2023)'s default sigmoid schedule (start −3, end 3, τ = 1).
    pub fn sigmoid_default() -> Self {
        Schedule::Sigmoid {
            start: -3.0,
            end: 3.0,
            tau: 1.0,
        }
    }

    /// ᾱ(t) of the formula itself for t = 0..=T, before β clipping.
    fn raw_alpha_bar(&self, num_steps: usize) -> Vec<f64> {
        let big_t = num_steps as f64;
        match *self {
            Schedule::Cosine { s } => {
                let f = |t: f64| {
                    let c = (std::f64::consts::FRAC_PI_2 * (t / big_t + s) / (1.0 + s)).cos();
                    c * c
                };
                let f0 = f(0.0);
                (0..=num_steps).map(|t| f(t as f64) / f0).collect()
            }
            Schedule::Linear { beta_start, beta_end } => {
                let mut out = Vec::with_capacity(num_steps + 1);
                let mut acc = 1.0;
                out.push(acc);
                for t in 1..=num_steps {
                    let frac = if num_steps == 1 {
                        0.0
                    } else {
                        (t - 1) as f64 / (big_t - 1.0)
                    };
                    acc *= 1.0 - (beta_start + frac * (beta_end - beta_start));
                    out.push(acc);
                }
                out
            }
            Schedule::Sigmoid { start, end, tau } => {
                let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
                let v_start = sig(start / tau);
                let v_end = sig(end / tau);
                (0..=num_steps)
                    .map(|t| {
                        let u = t as f64 / big_t;
                        (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
                    })
                    .collect()
            }
        }
    }

    fn validate(&self, num_steps: usize) -> Result<(), CoreError> {
        let bad = |what: String| Err(CoreError::InvalidSchedule(what));
        if num_steps == 0 || num_steps > MAX_STEPS {
            return bad(format!(
                "the number of diffusion steps T must be in 1..={MAX_STEPS}, got {num_steps}"
            ));
        }
        match *self {
            Schedule::Cosine { s } if !(s.is_finite() && s > 0.0) => {
                bad(format!("cosine offset s must be positive and finite, got {s}"))
            }
            Schedule::Linear { beta_start, beta_end }
                if !(beta_start > 0.0 && beta_end >= beta_start && beta_end < 1.0) =>
            {
                bad(format!(
                    "linear betas must satisfy 0 < start <= end < 1, got {beta_start}..{beta_end}"
                ))
            }
            Schedule::Sigmoid { start, end, tau } if !(end > start && tau > 0.0) => bad(format!(
                "sigmoid schedule needs end > start and tau > 0, got {start}, {end}, {tau}"
            )),
            _ => Ok(()),
        }
    }
}

/// A schedule evaluated on t = 0..=T: the table every other part reads.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    kind: Schedule,
    alpha_bar: Vec<f64>,
}

impl NoiseSchedule {
    /// Evaluates `kind` on t = 0..=`num_steps` (1..=[`MAX_STEPS`]),
    /// clipping β at [`MAX_BETA`].
    pub fn new(kind: Schedule, num_steps: usize) -> Result<Self, CoreError> {
        kind.validate(num_steps)?;
        let raw = kind.raw_alpha_bar(num_steps);
        // ᾱ(t) = Π (1 − min(β_raw, MAX_BETA)). Written as raw ᾱ(t) times the
        // product of the corrections made so far, so that where no β is
        // clipped the values are exactly those of the formula.
        let mut alpha_bar = Vec::with_capacity(raw.len());
        alpha_bar.push(raw[0]);
        let mut correction = 1.0;
        for t in 1..raw.len() {
            let beta = 1.0 - raw[t] / raw[t - 1];
            if beta > MAX_BETA || !beta.is_finite() {
                let clipped = alpha_bar[t - 1] * (1.0 - MAX_BETA);
                correction = clipped / raw[t].max(f64::MIN_POSITIVE);
                alpha_bar.push(clipped);
            } else {
                alpha_bar.push(raw[t] * correction);
            }
        }
        Ok(Self { kind, alpha_bar })
    }

    /// The reference schedule: cosine, s = 0.008, T = 500.
    pub fn reference() -> Self {
        Self::new(Schedule::default(), 500).expect("the reference schedule is valid")
    }

    /// What kind of schedule this is.
    pub fn kind(&self) -> Schedule {
        self.kind
    }

    /// T, the number of diffusion steps; t runs over 1..=T.
    pub fn num_steps(&self) -> usize {
        self.alpha_bar.len() - 1
    }

    /// ᾱ(t) for t in 0..=T.
    ///
    /// # Panics
    /// If t > T.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alpha_bar[t]
    }

    /// The whole table ᾱ(0..=T).
    pub fn alpha_bars(&self) -> &[f64] {
        &self.alpha_bar
    }

    /// β(t) = 1 − ᾱ(t)/ᾱ(t−1) for t in 1..=T (after clipping).
    pub fn beta(&self, t: usize) -> f64 {
        assert!(t >= 1, "beta(t) is defined for t >= 1");
        1.0 - self.alpha_bar[t] / self.alpha_bar[t - 1]
    }

    /// Signal-to-noise ratio ᾱ/(1 − ᾱ) at t (infinite at t = 0).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alpha_bar[t];
        a / (1.0 - a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_spec_values() {
        let s = NoiseSchedule::reference();
        // SPEC.md: ᾱ(1) ≈ 0.9999126, ᾱ(250) ≈ 0.4938436, ᾱ(477) ≈ 0.0051305.
        // The formula, evaluated independently here in f64:
        let f = |t: f64| {
            ((std::f64::consts::PI / 2.0) * (t / 500.0 + 0.008) / 1.008)
                .cos()
                .powi(2)
        };
        for t in [1usize, 250, 477] {
            assert!((s.alpha_bar(t) - f(t as f64) / f(0.0)).abs() < 1e-12, "t = {t}");
        }
        assert!((s.alpha_bar(1) - 0.9999126).abs() < 1e-7);
        assert!((s.alpha_bar(250) - 0.4938436).abs() < 1e-7);
        assert!((s.alpha_bar(477) - 0.0051305).abs() < 1e-7);
        // Only the last step is clipped, so every t < T is the formula itself.
        for t in 0..500 {
            assert_eq!(s.alpha_bar(t), f(t as f64) / f(0.0), "t = {t}");
        }
    }

    #[test]
    fn cosine_end_is_clipped_not_zero() {
        let s = NoiseSchedule::reference();
        assert_eq!(s.alpha_bar(0), 1.0);
        assert!((s.beta(500) - MAX_BETA).abs() < 1e-12);
        let expected = s.alpha_bar(499) * (1.0 - MAX_BETA);
        assert!((s.alpha_bar(500) - expected).abs() < 1e-20);
        assert!(
            s.alpha_bar(500) > 9e-9 && s.alpha_bar(500) < 1.1e-8,
            "{}",
            s.alpha_bar(500)
        );
    }

    #[test]
    fn all_schedules_start_at_one_and_decrease() {
        for kind in [
            Schedule::default(),
            Schedule::linear_ddpm(500),
            Schedule::sigmoid_default(),
        ] {
            for steps in [10, 500, 1000] {
                let s = NoiseSchedule::new(kind, steps).unwrap();
                assert_eq!(s.alpha_bar(0), 1.0, "{kind:?}");
                for t in 1..=steps {
                    assert!(s.alpha_bar(t) < s.alpha_bar(t - 1), "{kind:?} T={steps} t={t}");
                    assert!(s.alpha_bar(t) > 0.0, "{kind:?} T={steps} t={t}");
                    assert!(s.beta(t) <= MAX_BETA + 1e-12);
                }
            }
        }
    }

    #[test]
    fn linear_matches_closed_form() {
        // T = 1000, β_t = 1e-4 + (t−1)/999·(0.02 − 1e-4); ᾱ(t) = Π(1 − β_s).
        let s = NoiseSchedule::new(Schedule::linear_ddpm(1000), 1000).unwrap();
        assert!((s.alpha_bar(1) - (1.0 - 1e-4)).abs() < 1e-15);
        let b2 = 1e-4 + (0.02 - 1e-4) / 999.0;
        assert!((s.alpha_bar(2) - (1.0 - 1e-4) * (1.0 - b2)).abs() < 1e-15);
        // ln ᾱ(T) = Σ ln(1 − β_t); ᾱ(1000) of DDPM is about 4.04e-5.
        let log_sum: f64 = (1..=1000)
            .map(|t| (1.0 - (1e-4 + (t - 1) as f64 / 999.0 * (0.02 - 1e-4))).ln())
            .sum();
        assert!((s.alpha_bar(1000).ln() - log_sum).abs() < 1e-9);
        assert!(
            (s.alpha_bar(1000) - 4.035e-5).abs() < 1e-7,
            "{}",
            s.alpha_bar(1000)
        );
        for t in 1..=1000 {
            let beta = 1e-4 + (t - 1) as f64 / 999.0 * (0.02 - 1e-4);
            assert!((s.beta(t) - beta).abs() < 1e-12, "t = {t}");
        }
        // Scaled for T = 500: β runs from 2e-4 to 0.04.
        let s = NoiseSchedule::new(Schedule::linear_ddpm(500), 500).unwrap();
        assert!((s.beta(1) - 2e-4).abs() < 1e-12);
        assert!((s.beta(500) - 0.04).abs() < 1e-12);
    }

    #[test]
    fn sigmoid_matches_closed_form() {
        let s = NoiseSchedule::new(Schedule::sigmoid_default(), 100).unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        // At t = T/2 the argument is 0: ᾱ = (σ(3) − 1/2)/(σ(3) − σ(−3)) = 1/2 by symmetry.
        assert!((s.alpha_bar(50) - 0.5).abs() < 1e-12);
        let expect = |u: f64| (sig(3.0) - sig(6.0 * u - 3.0)) / (sig(3.0) - sig(-3.0));
        for t in [1usize, 10, 37, 90] {
            assert!(
                (s.alpha_bar(t) - expect(t as f64 / 100.0)).abs() < 1e-12,
                "t = {t}"
            );
        }
        // The formula's ᾱ(T) is exactly 0, so the last β is clipped.
        assert!((s.beta(100) - MAX_BETA).abs() < 1e-9);
    }

    #[test]
    fn invalid_schedules_are_refused() {
        assert!(NoiseSchedule::new(Schedule::default(), 0).is_err());
        assert!(NoiseSchedule::new(Schedule::Cosine { s: -1.0 }, 10).is_err());
        assert!(NoiseSchedule::new(
            Schedule::Linear {
                beta_start: 0.1,
                beta_end: 0.01
            },
            10
        )
        .is_err());
        assert!(NoiseSchedule::new(
            Schedule::Sigmoid {
                start: 3.0,
                end: -3.0,
                tau: 1.0
            },
            10
        )
        .is_err());
    }
}
