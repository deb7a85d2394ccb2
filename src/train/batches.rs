//! Which examples each optimizer step trains on: per-epoch seeded shuffles cut into micro-batches,
//! grouped by gradient accumulation. The plan depends only on its inputs, so a resumed run picks up
//! exactly where an uninterrupted one would be.

use crate::rng::{key, Rng};

/// The micro-batches of every optimizer step.
#[derive(Debug, Clone)]
pub struct StepBatches {
    steps: Vec<Vec<Vec<usize>>>,
    /// Optimizer steps in one epoch.
    pub steps_per_epoch: usize,
}

impl StepBatches {
    /// Plans `max_steps` steps when positive, else `ceil(epochs * steps_per_epoch)`, over `n` examples.
    pub fn new(
        n: usize,
        batch_size: usize,
        accumulation: usize,
        epochs: f64,
        max_steps: i64,
        seed: u64,
    ) -> Self {
        let batches_per_epoch = n.div_ceil(batch_size).max(1);
        let steps_per_epoch = batches_per_epoch.div_ceil(accumulation).max(1);
        let total = if max_steps > 0 {
            max_steps as usize
        } else {
            (epochs * steps_per_epoch as f64).ceil() as usize
        };
        let mut steps = Vec::with_capacity(total);
        let mut epoch = 0u64;
        while steps.len() < total && n > 0 {
            let order = Rng::new(key(&[seed, epoch])).permutation(n);
            let batches: Vec<Vec<usize>> =
                order.chunks(batch_size).map(<[usize]>::to_vec).collect();
            for group in batches.chunks(accumulation) {
                if steps.len() == total {
                    break;
                }
                steps.push(group.to_vec());
            }
            epoch += 1;
        }
        StepBatches {
            steps,
            steps_per_epoch,
        }
    }

    /// Number of optimizer steps.
    pub fn total_steps(&self) -> usize {
        self.steps.len()
    }

    /// The micro-batches (example indices) of step `step`.
    pub fn step(&self, step: usize) -> &[Vec<usize>] {
        &self.steps[step]
    }

    /// Fractional epoch after `steps_done` steps.
    pub fn epoch_at(&self, steps_done: usize) -> f64 {
        steps_done as f64 / self.steps_per_epoch as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_once_per_epoch() {
        let plan = StepBatches::new(10, 3, 2, 2.0, -1, 1);
        assert_eq!(plan.steps_per_epoch, 2);
        assert_eq!(plan.total_steps(), 4);
        let mut first: Vec<usize> = (0..2).flat_map(|s| plan.step(s).concat()).collect();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        assert_eq!(
            plan.step(1).len(),
            2,
            "last step of the epoch holds the remaining batches"
        );
    }

    #[test]
    fn max_steps_overrides_epochs_and_wraps_around() {
        let plan = StepBatches::new(4, 2, 1, 1.0, 5, 3);
        assert_eq!(plan.total_steps(), 5);
        assert_eq!(plan.epoch_at(5), 2.5);
    }
}
