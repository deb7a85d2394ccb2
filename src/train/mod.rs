//! Training: the loop, optimizer, step batches, metrics, evaluation, checkpoints and
//! the sanity check. (The memory planner is `crate::memory`.)

pub mod batches;
pub mod checkpoint;
pub mod engine;
pub mod eval;
pub mod metrics;
pub mod optimizer;
pub mod sanity;

pub use engine::{train, Reporting, TrainOutcome};
pub use sanity::{sanity_check, SanityReport};
