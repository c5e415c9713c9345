//! Which timesteps a sampler visits.
//!
//! A sampler's timesteps are a strictly decreasing list `t[0] > t[1] > … >
//! t[n]`: it starts from noise at `t[0]`, and step i moves x from `t[i]` to
//! `t[i+1]`, evaluating the denoiser at `t[i]`. So n steps cost n evaluations
//! and the result is x at `t[n]`.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// How `steps` timesteps are chosen out of 0..=T.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// The reference notebook's list: stride k = T div n, τ = 1, 1+k, 1+2k, …
    /// (all values ≤ T); sampling starts at `τ[n−1]` and stops at `τ[0] = 1`.
    /// It makes n − 1 evaluations and never reaches t = 0 or t = T (for the
    /// reference, n = 35: 477, 463, …, 15 → 1, 34 evaluations).
    Reference,
    /// Evenly spaced from T down to 0, rounded: `t[i]` = round(T·(n − i)/n) for
    /// i = 0..=n. Starts at pure noise (t = T) and ends on clean data (t = 0)
    /// in exactly n evaluations (Lin et al. 2024, "trailing").
    #[default]
    Trailing,
}

impl Spacing {
    /// The decreasing timestep list for `steps` steps of a T-step schedule.
    pub fn timesteps(self, num_train_steps: usize, steps: usize) -> Result<Vec<usize>, CoreError> {
        if steps == 0 || steps > num_train_steps {
            return Err(CoreError::InvalidSampler(format!(
                "the number of sampling steps must be in 1..={num_train_steps}, got {steps}"
            )));
        }
        match self {
            Spacing::Reference => {
                let stride = num_train_steps / steps;
                let tau: Vec<usize> = (0..)
                    .map(|i| 1 + i * stride)
                    .take_while(|&t| t <= num_train_steps)
                    .collect();
                if steps < 2 || tau.len() < steps {
                    return Err(CoreError::InvalidSampler(format!(
                        "the reference spacing needs 2..={num_train_steps} steps, got {steps}"
                    )));
                }
                Ok(tau[..steps].iter().rev().copied().collect())
            }
            Spacing::Trailing => {
                let big_t = num_train_steps as f64;
                Ok((0..=steps)
                    .map(|i| (big_t * (steps - i) as f64 / steps as f64).round() as usize)
                    .collect())
            }
        }
    }
}

/// Checks that a hand-made timestep list is usable: at least two entries,
/// strictly decreasing, and within 0..=T.
pub fn validate(timesteps: &[usize], num_train_steps: usize) -> Result<(), CoreError> {
    if timesteps.len() < 2 {
        return Err(CoreError::InvalidSampler(
            "a timestep list needs at least two entries".into(),
        ));
    }
    if timesteps[0] > num_train_steps {
        return Err(CoreError::InvalidSampler(format!(
            "timestep {} is past T = {num_train_steps}",
            timesteps[0]
        )));
    }
    if timesteps.windows(2).any(|w| w[1] >= w[0]) {
        return Err(CoreError::InvalidSampler(format!(
            "timesteps must strictly decrease, got {timesteps:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_spacing_is_the_notebooks() {
        let ts = Spacing::Reference.timesteps(500, 35).unwrap();
        // τ = 1 + 14·i; the loop runs i = 34 down to 1, stepping τ[i] → τ[i−1].
        let expect: Vec<usize> = (0..35).rev().map(|i| 1 + 14 * i).collect();
        assert_eq!(ts, expect);
        assert_eq!((ts[0], ts[34], ts.len()), (477, 1, 35));
    }

    #[test]
    fn trailing_spacing_spans_t_to_zero() {
        assert_eq!(
            Spacing::Trailing.timesteps(500, 10).unwrap(),
            vec![500, 450, 400, 350, 300, 250, 200, 150, 100, 50, 0]
        );
        assert_eq!(
            Spacing::Trailing.timesteps(500, 3).unwrap(),
            vec![500, 333, 167, 0]
        );
        let all = Spacing::Trailing.timesteps(500, 500).unwrap();
        assert_eq!(all, (0..=500).rev().collect::<Vec<_>>());
    }

    #[test]
    fn bad_step_counts_are_refused() {
        assert!(Spacing::Trailing.timesteps(500, 0).is_err());
        assert!(Spacing::Trailing.timesteps(500, 501).is_err());
        assert!(Spacing::Reference.timesteps(500, 1).is_err());
        assert!(validate(&[5, 5, 0], 10).is_err());
        assert!(validate(&[11, 0], 10).is_err());
        assert!(validate(&[10, 3, 0], 10).is_ok());
    }
}
