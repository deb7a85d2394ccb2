//! Where the decoder runs as the one-op layer ([`crate::ops::layer`]): the model decides whether
//! it applies (training, every base weight frozen) and hands the op the layer's weights; the op
//! does the rest. Selective checkpointing (one op per layer) is the default for LoRA and QLoRA
//! on the CPU; `--gradient-checkpointing` runs the whole stack as one checkpointed op.

use super::layers::{DecoderLayer, ForwardContext, Linear, Norm};
use crate::ops::attention::AttentionMask;
use crate::ops::graft::grad_enabled;
use crate::ops::layer::{self, FrozenNorm, LayerContext, LayerWeights, Projection};
use candle_core::{Result, Tensor};

/// Whether `layer` runs as one op on `x`: training (gradients recorded) with every weight, bias
/// and norm frozen (LoRA, QLoRA or no adapter), and either the native kernels apply (CPU f32, a
/// mask the flash kernel reads) or activations are offloaded to the host.
pub(crate) fn applies(
    layer: &DecoderLayer,
    x: &Tensor,
    mask: &AttentionMask,
    offload: bool,
) -> Result<bool> {
    Ok(frozen(layer) && grad_enabled() && (offload || layer::runs_natively(x, mask)?))
}

/// Whether the decoder stack runs as one checkpointed op ([`checkpointed_stack`]): training with
/// every layer's weights, biases and norms frozen, on any device.
pub(crate) fn stack_applies(layers: &[DecoderLayer]) -> bool {
    grad_enabled() && layers.iter().all(frozen)
}

/// Every weight, bias and norm of `layer` is frozen (LoRA, DoRA, QLoRA or no adapter), and its
/// MLP is dense (a mixture of experts runs op by op).
fn frozen(layer: &DecoderLayer) -> bool {
    layer.moe.is_none()
        && layer.linears().iter().all(|l| {
            l.weight.frozen().is_some() && l.bias.as_ref().is_none_or(|b| b.var().is_none())
        })
        && layer.norms().iter().all(|n| n.weight.var().is_none())
}

/// The layer as one op ([`layer::forward`]). x: [b, t, hidden] -> [b, t, hidden]
pub(crate) fn forward(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &ForwardContext<'_>,
) -> Result<Tensor> {
    layer::forward(weights(layer)?, &context(ctx), x, ctx.offload)
}

/// The decoder stack as one checkpointed op ([`layer::checkpointed_stack`]), one context per
/// layer; `chunk_rows` 0 picks [`layer::mlp_chunk_rows`].
pub(crate) fn checkpointed_stack(
    layers: &[DecoderLayer],
    x: &Tensor,
    contexts: &[ForwardContext<'_>],
    offload: bool,
    chunk_rows: usize,
) -> Result<Tensor> {
    let weights = layers.iter().map(weights).collect::<Result<Vec<_>>>()?;
    let contexts: Vec<LayerContext<'_>> = contexts.iter().map(context).collect();
    layer::checkpointed_stack(weights, x, &contexts, offload, chunk_rows)
}

/// The per-forward inputs the op reads.
fn context<'a>(ctx: &ForwardContext<'a>) -> LayerContext<'a> {
    LayerContext {
        mask: ctx.mask,
        cos: ctx.cos,
        sin: ctx.sin,
        dropout_key: ctx.dropout_key,
    }
}

/// `layer`'s weights as the op reads them (shared tensors, nothing copied).
fn weights(layer: &DecoderLayer) -> Result<LayerWeights> {
    let attn = &layer.self_attn;
    Ok(LayerWeights {
        projections: layer
            .linears()
            .into_iter()
            .map(projection)
            .collect::<Result<_>>()?,
        input_norm: frozen_norm(&layer.input_layernorm)?,
        post_norm: frozen_norm(&layer.post_attention_layernorm)?,
        q_norm: attn.q_norm.as_ref().map(frozen_norm).transpose()?,
        k_norm: attn.k_norm.as_ref().map(frozen_norm).transpose()?,
        output_norms: match &layer.output_norms {
            Some((o, down)) => Some((frozen_norm(o)?, frozen_norm(down)?)),
            None => None,
        },
        scores: attn.scores,
        activation: layer.mlp.activation,
        heads: attn.heads,
        kv_heads: attn.kv_heads,
        head_dim: attn.head_dim,
        use_rope: attn.use_rope,
        intermediate: layer.mlp.intermediate,
        layout: layer.layout,
    })
}

fn projection(lin: &Linear) -> Result<Projection> {
    let weight = lin.weight.frozen().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{}: selective checkpointing needs a frozen weight",
            lin.name
        ))
    })?;
    Ok(Projection {
        name: lin.name.clone(),
        weight,
        bias: lin.bias.as_ref().map(|b| b.tensor().clone()),
        lora: lin.lora.clone(),
    })
}

/// The norm with its effective scale (Gemma's `1 + w` computed once per forward).
fn frozen_norm(norm: &Norm) -> Result<FrozenNorm> {
    Ok(FrozenNorm {
        weight: norm.scale()?,
        eps: norm.eps,
    })
}
