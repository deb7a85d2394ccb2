//! How attention turns queries and keys into scores (scale, soft cap), shared by every
//! attention kernel.

/// How scores come from queries and keys: `scale · q k^T`, then, with `softcap` (Gemma 2's
/// `attn_logit_softcapping`), `cap · tanh(s / cap)`, before the mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The factor on `q k^T` (`1/√d`, or Gemma's `query_pre_attn_scalar^-½`).
    pub scale: f64,
    /// The soft cap, if any.
    pub softcap: Option<f64>,
}

impl From<f64> for Scores {
    fn from(scale: f64) -> Self {
        Scores {
            scale,
            softcap: None,
        }
    }
}
