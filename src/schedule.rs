//! Learning-rate schedules as transformers defines them (`get_scheduler`): a multiplier of the
//! peak rate for each optimizer step.

use crate::{Error, Result};

/// The schedule's shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0.
    Cosine,
    /// Constant, ignoring warm-up.
    Constant,
    /// Linear warm-up, then constant.
    ConstantWithWarmup,
}

impl Schedule {
    /// Parses `--lr-scheduler-type`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            "constant_with_warmup" => Ok(Schedule::ConstantWithWarmup),
            other => Err(Error::Config(format!(
                "--lr-scheduler-type `{other}` is not supported (linear, cosine, constant, constant_with_warmup)"
            ))),
        }
    }

    /// The multiplier for step `step` (0-based) of `total` with `warmup` warm-up steps.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if self != Schedule::Constant && step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// Warm-up steps: `warmup_steps` if set, else `ceil(warmup_ratio * total)` as transformers does.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total as f64).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warms_up_then_decays_to_zero() {
        let s = Schedule::Linear;
        assert_eq!(s.factor(0, 2, 10), 0.0);
        assert_eq!(s.factor(1, 2, 10), 0.5);
        assert_eq!(s.factor(2, 2, 10), 1.0);
        assert_eq!(s.factor(6, 2, 10), 0.5);
        assert_eq!(s.factor(10, 2, 10), 0.0);
    }

    #[test]
    fn cosine_is_half_at_the_middle() {
        let s = Schedule::Cosine;
        assert!((s.factor(5, 0, 10) - 0.5).abs() < 1e-12);
        assert!((s.factor(0, 0, 10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn constant_ignores_warmup_and_warmup_variant_does_not() {
        assert_eq!(Schedule::Constant.factor(0, 5, 10), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(0, 5, 10), 0.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(7, 5, 10), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(warmup_steps(0, 0.1, 15), 2);
        assert_eq!(warmup_steps(3, 0.1, 15), 3);
    }
}
