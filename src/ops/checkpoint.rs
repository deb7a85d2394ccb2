//! Gradient checkpointing: a block (one decoder layer) runs its forward without keeping any of
//! its intermediate tensors; only its input is saved, and the backward pass recomputes the block
//! with gradients and back-propagates through the recomputed graph.
//!
//! candle's custom ops return gradients only for their declared inputs, while a layer's trainable
//! weights (all weights when fully fine-tuning) are many: the recomputation's weight gradients go
//! to candle's store through the op's carriers ([`graft_carrying`]), so `loss.backward()` holds
//! them like any other.

use super::graft::{graft_carrying, park, without_grad};
use candle_core::{Result, Tensor, Var};

/// Runs `block` on `x` keeping only `x` for the backward pass. `vars` are the trainable tensors
/// `block` uses: their gradients from the recomputation reach `loss.backward()`'s store.
///
/// x: any shape -> block's output
pub fn checkpoint<F>(x: &Tensor, vars: Vec<Var>, block: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let out = without_grad(|| block(&x.detach()))?;
    let carried: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let recompute = move |x: &Tensor, g: &Tensor, x_tracked: bool| -> Result<Option<Tensor>> {
        let input = Var::from_tensor(&x.detach())?;
        let y = block(input.as_tensor())?;
        let grads = (y * g.detach())?.sum_all()?.backward()?;
        for v in &vars {
            if let Some(gv) = grads.get(v) {
                park(v.as_tensor(), gv.clone())?;
            }
        }
        Ok(if x_tracked {
            grads.get(input.as_tensor()).cloned()
        } else {
            None
        })
    };
    graft_carrying("checkpoint", x, &carried, out, Box::new(recompute))
}
