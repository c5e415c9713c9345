//! The learning-rate schedule: linear warm-up, then constant or cosine decay.

use serde::{Deserialize, Serialize};

/// How the learning rate moves during training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Linear warm-up from 0 over this many steps (0 = none).
    pub warmup_steps: u64,
    /// Cosine decay from the peak to `min_factor`·peak at the last step.
    pub cosine_decay: bool,
    /// The floor of the cosine decay, as a fraction of the peak.
    pub min_factor: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self::constant()
    }
}

impl LrSchedule {
    /// The constant learning rate of the reference.
    pub fn constant() -> Self {
        Self {
            warmup_steps: 0,
            cosine_decay: false,
            min_factor: 0.0,
        }
    }

    /// The learning rate at `step` (from 0) of `total`, for peak `peak`.
    pub fn at(&self, peak: f64, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if !self.cosine_decay || total <= self.warmup_steps {
            return peak;
        }
        let progress = (step - self.warmup_steps) as f64 / (total - self.warmup_steps).max(1) as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        peak * (self.min_factor + (1.0 - self.min_factor) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_warmup_and_cosine() {
        let s = LrSchedule {
            warmup_steps: 10,
            cosine_decay: true,
            min_factor: 0.0,
        };
        assert!((s.at(1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((s.at(1.0, 9, 110) - 1.0).abs() < 1e-12);
        assert!((s.at(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert!(s.at(1.0, 110, 110).abs() < 1e-12);
        assert_eq!(LrSchedule::constant().at(0.3, 5, 10), 0.3);
        let floor = LrSchedule {
            min_factor: 0.05,
            ..s
        };
        assert!((floor.at(2.0, 110, 110) - 0.1).abs() < 1e-12);
    }
}
