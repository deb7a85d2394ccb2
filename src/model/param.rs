//! A weight that is either frozen or trainable.

use candle_core::{Tensor, Var};

/// A model weight. Frozen weights are plain tensors that only ever enter custom ops (so candle never
/// computes a gradient for them); trainable weights are candle `Var`s.
#[derive(Debug, Clone)]
pub enum Param {
    /// Not trained.
    Frozen(Tensor),
    /// Trained: gradients are collected for it.
    Trainable(Var),
}

impl Param {
    /// The weight's current value.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }

    /// The variable, when trainable.
    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Frozen(_) => None,
            Param::Trainable(v) => Some(v),
        }
    }

    /// Wraps `t` as trainable or frozen.
    pub fn new(t: Tensor, trainable: bool) -> candle_core::Result<Self> {
        Ok(if trainable {
            Param::Trainable(candle_core::Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        })
    }
}
