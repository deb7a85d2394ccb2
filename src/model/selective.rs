//! Selective activation checkpointing, the default for LoRA and QLoRA on the CPU: a decoder layer
//! runs as one op that keeps only what its backward cannot rebuild without a frozen matmul — q, k
//! and v as projected, the attention output and its log-sum-exp, the residual stream between
//! attention and MLP, gate and up, and each LoRA branch's r-wide hidden — and recomputes the
//! elementwise rest in the backward: both RMSNorm outputs, Qwen3's q/k norms, RoPE, the SwiGLU
//! product and the LoRA dropout masks. No frozen matmul runs twice, and none of the tensors an
//! op-by-op graph keeps only as some op's input (normalised inputs, rotated q/k, the SwiGLU
//! product, the projections' outputs before each residual add) stays alive.
//!
//! The op's graph input is the layer input; the backward computes every LoRA gradient with the
//! input's and they reach candle's store through the op's carriers
//! ([`crate::ops::graft::graft_carrying`]): a plain `loss.backward()` holds them all.
//!
//! On the CPU in f32 the op runs the native kernels (flash attention keeps its log-sum-exp). With
//! `--offload-activations` (any device) it runs candle's kernels instead: the saved tensors move
//! to host memory after the forward and back, one layer at a time, in the backward, and attention
//! is recomputed from the saved q, k and v on its own graph.
//!
//! With gradient checkpointing the same code serves `checkpointed_stack`: the whole decoder
//! stack is one op that keeps only the layer inputs and, in the backward, rebuilds each layer from
//! its input and differentiates it at once, the MLP by chunks of rows.

use super::layers::{DecoderLayer, ForwardContext, Linear, Norm};
use crate::ops::attention::{attention_tokens, flash_applies, AttentionMask};
use crate::ops::cpu::{is_cpu_f32, tensor, Held};
use crate::ops::flash::{self, Dims};
use crate::ops::graft::{grad_enabled, graft_carrying, park, without_grad, Output};
use crate::ops::linear::{
    dense, input_gradient, lora_hidden, lora_input, lora_rows, lora_weight_grads, FrozenWeight,
    InputShare, LoraBase, LoraHidden,
};
use crate::ops::lora::LoraLayer;
use crate::ops::norm::{rms_norm_forward, rms_norm_grad_x};
use crate::ops::residual::sum_cpu;
use crate::ops::rope::rotate_tokens;
use crate::ops::swiglu::{swiglu_backward, swiglu_forward};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::borrow::Cow;

/// Whether `layer` runs as one op on `x`: training (gradients recorded) with every weight, bias
/// and norm frozen (LoRA, QLoRA or no adapter), and either the native kernels apply (CPU f32, a
/// mask the flash kernel reads) or activations are offloaded to the host.
pub(crate) fn applies(
    layer: &DecoderLayer,
    x: &Tensor,
    mask: &AttentionMask,
    offload: bool,
) -> Result<bool> {
    Ok(frozen(layer) && grad_enabled() && (offload || native(x, mask)?))
}

/// Whether the decoder stack runs as one checkpointed op ([`checkpointed_stack`]): training with
/// every layer's weights, biases and norms frozen, on any device.
pub(crate) fn stack_applies(layers: &[DecoderLayer]) -> bool {
    grad_enabled() && layers.iter().all(frozen)
}

/// Every weight, bias and norm of `layer` is frozen.
fn frozen(layer: &DecoderLayer) -> bool {
    layer
        .linears()
        .iter()
        .all(|l| l.weight.frozen().is_some() && l.bias.as_ref().is_none_or(|b| b.var().is_none()))
        && layer.norms().iter().all(|n| n.weight.var().is_none())
}

/// Whether the native CPU kernels run the layer.
fn native(x: &Tensor, mask: &AttentionMask) -> Result<bool> {
    Ok(is_cpu_f32(x) && flash_applies(x, mask)?)
}

/// `a + b` of untracked tensors (one parallel pass on the CPU in f32).
fn sum(a: &Tensor, b: &Tensor) -> Result<Output> {
    if is_cpu_f32(a) && is_cpu_f32(b) {
        Ok(Output::host(sum_cpu(a, b)?, a.dims()))
    } else {
        Ok((a + b)?.into())
    }
}

/// The layer as one op: x `[b, t, hidden]` -> `[b, t, hidden]`, equal to the op-by-op forward.
pub(crate) fn forward(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &ForwardContext<'_>,
) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let op = LayerOp::new(layer, ctx, x, ctx.offload, 0)?;
    let x_rows = x.detach().reshape((b * t, hidden))?.contiguous()?;
    let (out, saved) = op.forward(&x_rows)?;
    let out = out.reshape((b, t, hidden))?;
    let carried = lora_vars(&op.projs);
    let backward = move |x: &Tensor, g: &Tensor, needs_x: bool| -> Result<Option<Tensor>> {
        let (x_rows, g) = (x.reshape((b * t, hidden))?, g.reshape((b * t, hidden))?);
        let moved;
        let saved = if op.offload {
            moved = saved.to_device(x.device())?;
            &moved
        } else {
            &saved
        };
        let grad = op.backward(saved, &x_rows, &g.contiguous()?, needs_x)?;
        grad.map(|g| g.reshape((b, t, hidden))).transpose()
    };
    graft_carrying("decoder-layer", x, &carried, out, Box::new(backward))
}

/// Gradient checkpointing of the whole decoder stack as one op (`--gradient-checkpointing` with a
/// frozen base, any device): the forward keeps only each layer's input — in host memory with
/// `offload` on an accelerator — and the backward rebuilds one layer at a time from its input,
/// last layer first ([`LayerOp::recompute_backward`]); `offload` also runs candle's kernels, as
/// [`forward`] does (the CPU in f32 otherwise runs the native ones). Each layer's MLP runs in
/// chunks of `chunk_rows` rows (0: [`mlp_chunk_rows`]) in both passes, so neither the MLP's
/// activations nor its gradients ever exist for all rows at once; the recomputation skips the
/// down projection's frozen product, whose output the backward never reads. LoRA gradients are
/// parked.
///
/// x `[b, t, hidden]` -> `[b, t, hidden]`, one [`ForwardContext`] per layer.
pub(crate) fn checkpointed_stack(
    layers: &[DecoderLayer],
    x: &Tensor,
    contexts: &[ForwardContext<'_>],
    offload: bool,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let layer_ops = layers
        .iter()
        .zip(contexts)
        .map(|(layer, ctx)| LayerOp::new(layer, ctx, x, offload, chunk_rows))
        .collect::<Result<Vec<_>>>()?;
    let mut h = x.detach().reshape((b * t, hidden))?.contiguous()?;
    let mut inputs = Vec::with_capacity(layer_ops.len());
    for op in &layer_ops {
        let next = op.forward_chunked(&h)?;
        inputs.push(if offload && !h.device().is_cpu() {
            h.to_device(&Device::Cpu)?
        } else {
            h
        });
        h = next;
    }
    let out = h.reshape((b, t, hidden))?;
    let carried: Vec<Tensor> = layer_ops
        .iter()
        .flat_map(|op| lora_vars(&op.projs))
        .collect();
    let backward = move |x: &Tensor, g: &Tensor, needs_x: bool| -> Result<Option<Tensor>> {
        let mut g = g.reshape((b * t, hidden))?.contiguous()?;
        for (i, (op, input)) in layer_ops.iter().zip(&inputs).enumerate().rev() {
            let input = input.to_device(x.device())?;
            match op.recompute_backward(&input, &g, i > 0 || needs_x)? {
                Some(grad) => g = grad,
                None => return Ok(None),
            }
        }
        Ok(Some(g.reshape((b, t, hidden))?))
    };
    graft_carrying("checkpointed-decoder", x, &carried, out, Box::new(backward))
}

/// The LoRA matrices of `projs`, whose gradients the op's backward computes.
fn lora_vars(projs: &[Proj]) -> Vec<Tensor> {
    projs
        .iter()
        .filter_map(|p| p.lora.as_ref())
        .flat_map(|lora| [lora.a.as_tensor().clone(), lora.b.as_tensor().clone()])
        .collect()
}

/// Rows per MLP chunk under `checkpointed_stack`: as many as keep one `[rows, intermediate]`
/// tensor within 2^24 elements (64 MiB in f32), a multiple of 64, at least 64.
pub fn mlp_chunk_rows(intermediate: usize) -> usize {
    ((1usize << 24) / intermediate.max(1) / 64).max(1) * 64
}

/// One projection as the op reads it: frozen weight and bias, LoRA pair, module name (which keys
/// its dropout draws).
#[derive(Clone)]
struct Proj {
    name: String,
    weight: FrozenWeight,
    bias: Option<Tensor>,
    lora: Option<LoraLayer>,
}

impl Proj {
    fn new(lin: &Linear) -> Result<Self> {
        let weight = lin.weight.frozen().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: selective checkpointing needs a frozen weight",
                lin.name
            ))
        })?;
        Ok(Proj {
            name: lin.name.clone(),
            weight,
            bias: lin.bias.as_ref().map(|b| b.tensor().clone()),
            lora: lin.lora.clone(),
        })
    }

    /// This step's dropout mask for input rows `first..first + rows` (drawn again in the
    /// backward: same key, same mask), or None.
    fn mask(
        &self,
        first: usize,
        rows: usize,
        key: Option<u64>,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(lora) => lora.dropout_mask_rows(&self.name, first, rows, key, dtype),
            None => Ok(None),
        }
    }

    /// x: rows `first..` of the input, [n, in] -> ([n, out], the LoRA branch's hidden)
    fn forward(
        &self,
        x: &Tensor,
        first: usize,
        key: Option<u64>,
    ) -> Result<(Tensor, Option<LoraHidden>)> {
        let Some(lora) = &self.lora else {
            return Ok((dense(x, &self.weight.dense()?, self.bias.as_ref())?, None));
        };
        let base = LoraBase {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            dropout_mask: self.mask(first, x.dim(0)?, key, x.dtype())?,
        };
        // Detached: nothing the op computes may enter candle's graph (the gradients it parks would
        // otherwise carry this step's graph into the optimizer state).
        let (out, hidden) = lora_rows(
            x,
            &base,
            &lora.a_in(x.dtype())?,
            &lora.b_in(x.dtype())?,
            lora.scale,
        )?;
        Ok((out.into_tensor()?, Some(hidden)))
    }

    /// The LoRA branch's hidden alone (no frozen product), for a backward that never reads the
    /// projection's output. x: rows `first..` of the input, [n, in]
    fn hidden(&self, x: &Tensor, first: usize, key: Option<u64>) -> Result<Option<LoraHidden>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let mask = self.mask(first, x.dim(0)?, key, x.dtype())?;
        lora_hidden(x, mask.as_ref(), &lora.a_in(x.dtype())?).map(Some)
    }
}

/// The gradient of one projection's output and what its forward saved.
struct Back<'a> {
    proj: &'a Proj,
    g: &'a Tensor,
    hidden: Option<&'a LoraHidden>,
}

impl<'a> Back<'a> {
    /// `proj`'s share of a backward: its output gradient g and its saved LoRA hidden.
    fn new(proj: &'a Proj, g: &'a Tensor, hidden: &'a Option<LoraHidden>) -> Self {
        Back {
            proj,
            g,
            hidden: hidden.as_ref(),
        }
    }
}

/// Backward of the projections that read one input `x: [n, in]` (rows `first..` of it): parks
/// their LoRA gradients and returns the gradient of `x` when asked for.
fn backward_projections(
    parts: &[Back<'_>],
    x: &Tensor,
    first: usize,
    key: Option<u64>,
    needs_x: bool,
) -> Result<Option<Tensor>> {
    let rows = x.dim(0)?;
    let mut lora_terms = Vec::with_capacity(parts.len());
    for part in parts {
        let (Some(lora), Some(hidden)) = (&part.proj.lora, part.hidden) else {
            lora_terms.push(None);
            continue;
        };
        let mask = part.proj.mask(first, rows, key, x.dtype())?;
        let lora_in = lora_input(x, mask.as_ref())?;
        let b = lora.b_in(x.dtype())?;
        let (grad_hidden, grad_a, grad_b) =
            lora_weight_grads(part.g, &lora_in, (hidden, &b), lora.scale, (true, true))?;
        if let (Some(ga), Some(gb)) = (grad_a, grad_b) {
            park(lora.a.as_tensor(), LoraLayer::grad_of(ga)?)?;
            park(lora.b.as_tensor(), LoraLayer::grad_of(gb)?)?;
        }
        lora_terms.push(Some((grad_hidden, lora.a_in(x.dtype())?, mask)));
    }
    if !needs_x {
        return Ok(None);
    }
    let shares: Vec<InputShare<'_>> = parts
        .iter()
        .zip(&lora_terms)
        .map(|(part, term)| InputShare {
            g: part.g,
            weight: &part.proj.weight,
            lora: term
                .as_ref()
                .map(|(grad_hidden, a, mask)| (grad_hidden, a, mask.as_ref())),
        })
        .collect();
    input_gradient(&shares).map(Some)
}

/// A frozen RMSNorm's weight and epsilon.
struct NormPlan {
    weight: Tensor,
    eps: f64,
}

impl NormPlan {
    fn new(norm: &Norm) -> Self {
        NormPlan {
            weight: norm.weight.tensor().clone(),
            eps: norm.eps,
        }
    }

    /// x: [.., d] -> [.., d]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm_forward(x, &self.weight, self.eps)?.into_tensor()
    }

    /// The gradient of x for the output gradient g (both like x).
    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        rms_norm_grad_x(&x.contiguous()?, &self.weight, &g.contiguous()?, self.eps)
    }
}

/// Everything the op reads besides its input, shared by forward and backward.
struct LayerOp {
    /// q, k, v, o, gate, up, down.
    projs: Vec<Proj>,
    input_norm: NormPlan,
    post_norm: NormPlan,
    q_norm: Option<NormPlan>,
    k_norm: Option<NormPlan>,
    dims: Dims,
    use_rope: bool,
    scale: f64,
    mask: AttentionMask,
    cos: Tensor,
    sin: Tensor,
    key: Option<u64>,
    /// Native CPU kernels (else candle ops, attention recomputed in the backward).
    native: bool,
    /// Move what the forward keeps to host memory until the backward.
    offload: bool,
    /// Rows per MLP chunk in [`Self::forward_chunked`] and [`Self::recompute_backward`].
    chunk_rows: usize,
}

/// What the attention half keeps for the backward (the layer input is the op's own graph input).
struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    /// The flash kernel's log-sum-exp (native kernels only).
    lse: Vec<f32>,
    /// The residual stream between attention and MLP.
    resid: Tensor,
    /// LoRA hiddens of q, k, v and o.
    hidden: Vec<Option<LoraHidden>>,
}

/// What the MLP keeps for the backward, for all rows or one chunk of them.
struct MlpSaved {
    gate: Tensor,
    up: Tensor,
    /// LoRA hiddens of gate, up and down.
    hidden: Vec<Option<LoraHidden>>,
}

/// What the one-op layer's forward keeps for its backward.
struct Saved {
    attention: AttentionSaved,
    mlp: MlpSaved,
}

/// The LoRA hiddens on `device`.
fn hiddens_to(hidden: &[Option<LoraHidden>], device: &Device) -> Result<Vec<Option<LoraHidden>>> {
    hidden
        .iter()
        .map(|h| h.as_ref().map(|h| h.to_device(device)).transpose())
        .collect()
}

impl Saved {
    /// The same tensors on `device` (a copy where they are elsewhere).
    fn to_device(&self, device: &Device) -> Result<Saved> {
        let moved = |t: &Tensor| t.to_device(device);
        let (a, m) = (&self.attention, &self.mlp);
        Ok(Saved {
            attention: AttentionSaved {
                q: moved(&a.q)?,
                k: moved(&a.k)?,
                v: moved(&a.v)?,
                attn: moved(&a.attn)?,
                lse: a.lse.clone(),
                resid: moved(&a.resid)?,
                hidden: hiddens_to(&a.hidden, device)?,
            },
            mlp: MlpSaved {
                gate: moved(&m.gate)?,
                up: moved(&m.up)?,
                hidden: hiddens_to(&m.hidden, device)?,
            },
        })
    }
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;

impl LayerOp {
    /// The op of `layer` for input `x`; `offload` moves what [`Self::forward`] keeps to the
    /// host (and runs candle's kernels); `chunk_rows` as [`checkpointed_stack`] reads it.
    fn new(
        layer: &DecoderLayer,
        ctx: &ForwardContext<'_>,
        x: &Tensor,
        offload: bool,
        chunk_rows: usize,
    ) -> Result<Self> {
        let (b, t, _) = x.dims3()?;
        let attn = &layer.self_attn;
        let intermediate = layer.mlp.gate_proj.weight.dims().0;
        Ok(LayerOp {
            projs: layer
                .linears()
                .into_iter()
                .map(Proj::new)
                .collect::<Result<_>>()?,
            input_norm: NormPlan::new(&layer.input_layernorm),
            post_norm: NormPlan::new(&layer.post_attention_layernorm),
            q_norm: attn.q_norm.as_ref().map(NormPlan::new),
            k_norm: attn.k_norm.as_ref().map(NormPlan::new),
            dims: Dims {
                b,
                heads: attn.heads,
                kv_heads: attn.kv_heads,
                t_q: t,
                t_k: t,
                d: attn.head_dim,
            },
            use_rope: attn.use_rope,
            scale: 1.0 / (attn.head_dim as f64).sqrt(),
            mask: ctx.mask.clone(),
            cos: ctx.cos.clone(),
            sin: ctx.sin.clone(),
            key: ctx.dropout_key,
            // Offloading runs candle's kernels everywhere (on the CPU, where activations are in
            // host memory already, only tests ask for it).
            native: native(x, ctx.mask)? && !offload,
            offload,
            chunk_rows: match chunk_rows {
                0 => mlp_chunk_rows(intermediate),
                rows => rows,
            },
        })
    }

    /// Queries or keys as attention reads them: `[b, t, heads, d]`, per-head normalised (Qwen3)
    /// and rotated. x: [n, heads * d]
    fn rotated(&self, x: &Tensor, norm: Option<&NormPlan>) -> Result<Tensor> {
        let Dims { b, t_q, d, .. } = self.dims;
        let x = x.reshape((b, t_q, (), d))?;
        let x = match norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        if self.use_rope {
            rotate_tokens(&x, &self.cos, &self.sin, false)
        } else {
            Ok(x)
        }
    }

    /// The gradient of the projection output `x: [n, heads * d]` for the gradient `g` of
    /// [`Self::rotated`]'s result (token-major elements).
    fn unrotated(&self, x: &Tensor, g: &Tensor, norm: Option<&NormPlan>) -> Result<Tensor> {
        let Dims { b, t_q, d, .. } = self.dims;
        let x = x.reshape((b, t_q, (), d))?;
        let mut g = g.reshape(x.dims())?;
        if self.use_rope {
            g = rotate_tokens(&g, &self.cos, &self.sin, true)?;
        }
        if let Some(n) = norm {
            g = n.backward(&x, &g)?;
        }
        g.reshape(((), x.dim(2)? * d))
    }

    /// Gate, up and down for a pass over `n` rows: when they take several chunks, quantized
    /// weights dequantized once for all of them (each chunk would dequantize them twice again).
    fn mlp_projections(&self, n: usize) -> Result<Cow<'_, [Proj]>> {
        let mlp = &self.projs[GATE..];
        let quantized = mlp
            .iter()
            .any(|p| matches!(p.weight, FrozenWeight::Quantized(_)));
        if !quantized || self.chunks(n).nth(1).is_none() {
            return Ok(Cow::Borrowed(mlp));
        }
        let dense = mlp
            .iter()
            .map(|p| {
                Ok(Proj {
                    weight: FrozenWeight::Dense(p.weight.dense()?),
                    ..p.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cow::Owned(dense))
    }

    /// `(first, rows)` of each MLP chunk of `n` rows.
    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.chunk_rows.max(1);
        (0..n)
            .step_by(step)
            .map(move |first| (first, step.min(n - first)))
    }

    /// x: [n, hidden] -> (the output's elements, what the backward keeps)
    fn forward(&self, x: &Tensor) -> Result<(Output, Saved)> {
        let attention = self.attention_forward(x)?;
        let (down, mlp) = self.mlp_forward(&self.projs[GATE..], &attention.resid, 0)?;
        let out = sum(&attention.resid, &down)?;
        let saved = Saved { attention, mlp };
        let saved = if self.offload {
            saved.to_device(&Device::Cpu)?
        } else {
            saved
        };
        Ok((out, saved))
    }

    /// The layer's output alone, keeping nothing, the MLP by chunks of rows. x: [n, hidden]
    fn forward_chunked(&self, x: &Tensor) -> Result<Tensor> {
        let resid = self.attention_forward(x)?.resid;
        let n = resid.dim(0)?;
        let mlp = self.mlp_projections(n)?;
        let mut outs = Vec::new();
        for (first, rows) in self.chunks(n) {
            let r = resid.narrow(0, first, rows)?;
            let (down, _) = self.mlp_forward(&mlp, &r, first)?;
            outs.push(sum(&r, &down)?.into_tensor()?);
        }
        concat_rows(outs)
    }

    /// Under [`checkpointed_stack`]: the layer rebuilt from its input `x: [n, hidden]` and
    /// differentiated for its output gradient `g` — attention whole, then the MLP chunk by chunk
    /// (each chunk's activations rebuilt and differentiated before the next) — parking the LoRA
    /// gradients and returning x's gradient when `needs_x`.
    fn recompute_backward(&self, x: &Tensor, g: &Tensor, needs_x: bool) -> Result<Option<Tensor>> {
        let attention = self.attention_forward(x)?;
        let n = x.dim(0)?;
        let mlp = self.mlp_projections(n)?;
        let mut grads = Vec::new();
        for (first, rows) in self.chunks(n) {
            let r = attention.resid.narrow(0, first, rows)?;
            // The down projection's frozen product is skipped: only its LoRA hidden is needed.
            let (act, mut saved) = self.mlp_activation(&mlp, &r, first)?;
            saved.hidden.push(mlp[2].hidden(&act, first, self.key)?);
            let g = g.narrow(0, first, rows)?;
            grads.push(self.mlp_backward(&mlp, &saved, Some(act), &r, &g, first)?);
        }
        let grad_resid = concat_rows(grads)?;
        self.attention_half_backward(&attention, x, &grad_resid, needs_x)
    }

    /// Norm, q/k/v, attention, o and the residual add. x: [n, hidden]
    fn attention_forward(&self, x: &Tensor) -> Result<AttentionSaved> {
        let p = &self.projs;
        let key = self.key;
        let mut hidden: Vec<Option<LoraHidden>> = Vec::with_capacity(4);
        let mut project = |i: usize, x: &Tensor| -> Result<Tensor> {
            let (y, h) = p[i].forward(x, 0, key)?;
            hidden.push(h);
            Ok(y)
        };
        let normed = self.input_norm.forward(x)?;
        let q = project(Q, &normed)?;
        let k = project(K, &normed)?;
        let v = project(V, &normed)?;
        drop(normed);
        let (lse, attn) = {
            let q_rot = self.rotated(&q, self.q_norm.as_ref())?;
            let k_rot = self.rotated(&k, self.k_norm.as_ref())?;
            let v4 = v.reshape(k_rot.dims())?;
            self.attention(&q_rot, &k_rot, &v4)?
        };
        let o = project(O, &attn)?;
        let resid = sum(x, &o)?.into_tensor()?;
        Ok(AttentionSaved {
            q,
            k,
            v,
            attn,
            lse,
            resid,
            hidden,
        })
    }

    /// The MLP (`mlp`: gate, up and down, see [`Self::mlp_projections`]) on rows `first..` of
    /// the residual stream, `resid: [rows, hidden]`: the down projection's output and what the
    /// backward keeps.
    fn mlp_forward(
        &self,
        mlp: &[Proj],
        resid: &Tensor,
        first: usize,
    ) -> Result<(Tensor, MlpSaved)> {
        let (act, mut saved) = self.mlp_activation(mlp, resid, first)?;
        let (down, down_hidden) = mlp[2].forward(&act, first, self.key)?;
        saved.hidden.push(down_hidden);
        Ok((down, saved))
    }

    /// The MLP up to the down projection's input, the SwiGLU product `[rows, intermediate]`,
    /// with gate and up and their LoRA hiddens (the down projection's still to come).
    fn mlp_activation(
        &self,
        mlp: &[Proj],
        resid: &Tensor,
        first: usize,
    ) -> Result<(Tensor, MlpSaved)> {
        let key = self.key;
        let normed = self.post_norm.forward(resid)?;
        let (gate, gate_hidden) = mlp[0].forward(&normed, first, key)?;
        let (up, up_hidden) = mlp[1].forward(&normed, first, key)?;
        drop(normed);
        let act = swiglu_forward(&gate, &up)?.into_tensor()?;
        let hidden = vec![gate_hidden, up_hidden];
        Ok((act, MlpSaved { gate, up, hidden }))
    }

    /// Attention over rotated q `[b, t, heads, d]`, k and v `[b, t, kv_heads, d]`: the flash
    /// kernel's log-sum-exp (native kernels; empty otherwise) and the output `[n, heads · d]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Vec<f32>, Tensor)> {
        let width = self.dims.heads * self.dims.d;
        let n = self.dims.b * self.dims.t_q;
        if !self.native {
            let out = without_grad(|| attention_tokens(q, k, v, &self.mask, self.scale))?;
            return Ok((Vec::new(), out.reshape((n, width))?.contiguous()?));
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let held = [Held::new(&q)?, Held::new(&k)?, Held::new(&v)?];
        let (out, lse) = flash::forward(
            held[0].slice()?,
            held[1].slice()?,
            held[2].slice()?,
            self.dims,
            &self.mask,
            self.scale as f32,
        );
        Ok((lse, tensor(out, &[n, width])?))
    }

    /// `(dq, dk, dv)` (like q, k, v) for the output gradient `g: [n, heads · d]`: the flash
    /// backward from the saved log-sum-exp, or attention recomputed on its own graph.
    fn attention_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        s: &AttentionSaved,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if !self.native {
            let vars = [q, k, v].map(|t| Var::from_tensor(&t.detach()));
            let [qv, kv, vv] = vars;
            let (qv, kv, vv) = (qv?, kv?, vv?);
            let out = attention_tokens(&qv, &kv, &vv, &self.mask, self.scale)?;
            let grads = (out * g.reshape(q.dims())?.detach())?
                .sum_all()?
                .backward()?;
            let grad = |var: &Var| {
                grads.get(var).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("attention recomputation: no gradient".into())
                })
            };
            return Ok((grad(&qv)?, grad(&kv)?, grad(&vv)?));
        }
        let (q, k, v, g) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            g.contiguous()?,
        );
        let held = [
            Held::new(&q)?,
            Held::new(&k)?,
            Held::new(&v)?,
            Held::new(&s.attn)?,
            Held::new(&g)?,
        ];
        let [qs, ks, vs, os, gs] = [0, 1, 2, 3, 4].map(|i| held[i].slice());
        let (dq, dk, dv) = flash::backward(
            flash::Saved {
                q: qs?,
                k: ks?,
                v: vs?,
                out: os?,
                lse: &s.lse,
            },
            gs?,
            self.dims,
            &self.mask,
            self.scale as f32,
        );
        Ok((
            tensor(dq, q.dims())?,
            tensor(dk, k.dims())?,
            tensor(dv, v.dims())?,
        ))
    }

    /// The gradient of the MLP's input rows `first..` (`resid: [rows, hidden]`, the residual
    /// stream) for the layer output's gradient `g` on those rows (`mlp` as [`Self::mlp_forward`]
    /// reads it; `act`, the SwiGLU product, when the caller has it, else rebuilt from gate and
    /// up); the MLP's LoRA gradients parked.
    fn mlp_backward(
        &self,
        mlp: &[Proj],
        m: &MlpSaved,
        act: Option<Tensor>,
        resid: &Tensor,
        g: &Tensor,
        first: usize,
    ) -> Result<Tensor> {
        let key = self.key;
        let missing = |what: &str| candle_core::Error::Msg(format!("no gradient for {what}"));
        let act = match act {
            Some(act) => act,
            None => swiglu_forward(&m.gate, &m.up)?.into_tensor()?,
        };
        let down = [Back::new(&mlp[2], g, &m.hidden[2])];
        let grad_act = backward_projections(&down, &act, first, key, true)?
            .ok_or_else(|| missing("the MLP"))?;
        drop(act);
        let (grad_gate, grad_up) = swiglu_backward(&m.gate, &m.up, &grad_act, [true, true])?;
        let (grad_gate, grad_up) = (
            grad_gate.ok_or_else(|| missing("gate"))?,
            grad_up.ok_or_else(|| missing("up"))?,
        );
        drop(grad_act);
        let normed = self.post_norm.forward(resid)?;
        let parts = [
            Back::new(&mlp[0], &grad_gate, &m.hidden[0]),
            Back::new(&mlp[1], &grad_up, &m.hidden[1]),
        ];
        let grad_normed = backward_projections(&parts, &normed, first, key, true)?
            .ok_or_else(|| missing("the MLP input"))?;
        let through_norm = self.post_norm.backward(resid, &grad_normed)?;
        sum(g, &through_norm)?.into_tensor()
    }

    /// The gradient of the layer input x `[n, hidden]` (when `needs_x`) for the gradient
    /// `grad_resid` of the residual stream between attention and MLP; the attention's LoRA
    /// gradients parked.
    fn attention_half_backward(
        &self,
        s: &AttentionSaved,
        x: &Tensor,
        grad_resid: &Tensor,
        needs_x: bool,
    ) -> Result<Option<Tensor>> {
        let key = self.key;
        let missing = |what: &str| candle_core::Error::Msg(format!("no gradient for {what}"));
        // o_proj, attention, RoPE and q/k norms, q/k/v, the input norm.
        let o = [Back::new(&self.projs[O], grad_resid, &s.hidden[O])];
        let grad_attn =
            backward_projections(&o, &s.attn, 0, key, true)?.ok_or_else(|| missing("attention"))?;
        let (dq, dk, dv) = {
            let q_rot = self.rotated(&s.q, self.q_norm.as_ref())?;
            let k_rot = self.rotated(&s.k, self.k_norm.as_ref())?;
            let v = s.v.reshape(k_rot.dims())?;
            self.attention_backward((&q_rot, &k_rot, &v), s, &grad_attn)?
        };
        drop(grad_attn);
        let dq = self.unrotated(&s.q, &dq, self.q_norm.as_ref())?;
        let dk = self.unrotated(&s.k, &dk, self.k_norm.as_ref())?;
        let dv = dv.reshape(s.v.dims())?;
        let normed = self.input_norm.forward(x)?;
        let parts = [
            Back::new(&self.projs[Q], &dq, &s.hidden[Q]),
            Back::new(&self.projs[K], &dk, &s.hidden[K]),
            Back::new(&self.projs[V], &dv, &s.hidden[V]),
        ];
        match backward_projections(&parts, &normed, 0, key, needs_x)? {
            Some(gn) => {
                let through_norm = self.input_norm.backward(x, &gn)?;
                Ok(Some(sum(grad_resid, &through_norm)?.into_tensor()?))
            }
            None => Ok(None),
        }
    }

    /// The gradient of the layer input x `[n, hidden]` for the output gradient g (when
    /// `needs_x`); every LoRA gradient is parked.
    fn backward(&self, s: &Saved, x: &Tensor, g: &Tensor, needs_x: bool) -> Result<Option<Tensor>> {
        let grad_resid =
            self.mlp_backward(&self.projs[GATE..], &s.mlp, None, &s.attention.resid, g, 0)?;
        self.attention_half_backward(&s.attention, x, &grad_resid, needs_x)
    }
}

/// Chunks of rows as one `[n, width]` tensor (the one chunk itself when there is one).
fn concat_rows(mut chunks: Vec<Tensor>) -> Result<Tensor> {
    if chunks.len() == 1 {
        return Ok(chunks.remove(0));
    }
    Tensor::cat(&chunks, 0)
}
