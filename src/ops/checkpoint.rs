//! Gradient checkpointing: a block (one decoder layer) runs its forward without keeping any of
//! its intermediate tensors; only its input is saved, and the backward pass recomputes the block
//! with gradients and back-propagates through the recomputed graph.
//!
//! candle's custom ops return gradients only for their declared inputs, while a layer's trainable
//! weights (LoRA pairs, or all weights when fully fine-tuning) are many: the recomputation's weight
//! gradients are parked here and [`backward`] adds them to the store. Use [`backward`] instead of
//! `Tensor::backward` whenever checkpointing may be on.

use super::graft::{graft_anchored, without_grad};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::cell::RefCell;

thread_local! {
    /// Weight gradients produced by recomputations during the running backward pass.
    static PARKED: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `block` on `x` keeping only `x` for the backward pass. `vars` are the trainable tensors
/// `block` uses: their gradients from the recomputation reach the store through [`backward`].
///
/// x: any shape -> block's output
pub fn checkpoint<F>(x: &Tensor, vars: Vec<Var>, block: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let out = without_grad(|| block(&x.detach()))?;
    let anchor = vars.first().map(|v| v.as_tensor().clone());
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
    // A trainable weight anchors the op in the graph even when `x` itself is not tracked; its
    // gradient is parked, not returned.
    graft_anchored("checkpoint", x, anchor.as_ref(), out, Box::new(recompute))
}

/// Hands the gradient of `var` (a trainable tensor) from a backward that computed it outside
/// candle's graph to the running [`backward`], which adds it to the store. A second gradient of
/// the same tensor (chunks of rows, [`crate::model::selective`]) is added to the parked one at
/// once, so parked gradients never take more than one copy per tensor.
pub(crate) fn park(var: &Tensor, grad: Tensor) -> Result<()> {
    PARKED.with(|p| {
        let mut parked = p.borrow_mut();
        match parked.iter_mut().find(|(v, _)| v.id() == var.id()) {
            Some((_, total)) => *total = (&*total + &grad)?,
            None => parked.push((var.clone(), grad)),
        }
        Ok(())
    })
}

/// `loss.backward()` plus the weight gradients of checkpointed blocks and of the decoder layers
/// that run as one op (selective checkpointing, [`crate::model::selective`]): the only complete
/// backward for a model.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    PARKED.with(|p| p.borrow_mut().clear());
    let mut store = loss.backward()?;
    let parked = PARKED.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (var, grad) in parked {
        let total = match store.get(&var) {
            Some(existing) => (existing + grad)?,
            None => grad,
        };
        store.insert(&var, total);
    }
    Ok(store)
}
