//! The decoder layer as one op (selective activation checkpointing, the default for LoRA and QLoRA
//! on the CPU): it that keeps only what its backward cannot rebuild without a frozen matmul — q, k
//! and v as projected, the attention output and its log-sum-exp, the residual stream between
//! attention and MLP, gate and up, and each LoRA branch's r-wide hidden — and recomputes the
//! elementwise rest in the backward: both RMSNorm outputs, Qwen3's q/k norms, RoPE, the gated
//! activation's product and the LoRA dropout masks (Gemma's norms of the o and down outputs keep
//! those outputs, which their backward reads). No frozen matmul runs twice, and none of the tensors an
//! op-by-op graph keeps only as some op's input (normalised inputs, rotated q/k, the gated
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
//! With gradient checkpointing the same code serves [`checkpointed_stack`]: the whole decoder
//! stack is one op that keeps only the layer inputs and, in the backward, rebuilds each layer from
//! its input and differentiates it at once, the MLP by chunks of rows.

//!
//! The op reads plain weights ([`LayerWeights`]: frozen projections with their LoRA pairs, frozen
//! norms, head counts), not the model's types; its steps are [`steps`]' description of the layer,
//! which the model's op-by-op form runs too. Every kernel it calls is picked at that op's
//! dispatch point.

pub mod steps;

use self::steps::{LayerSteps, Layout, NormAt, Proj as StepProj};
use super::attention::{self, AttentionMask, Kept, Scores};
use super::glu::{glu_backward, glu_forward, Activation};
use super::graft::{graft_carrying, park, Output};
use super::kernel::Kernel;
use super::linear::{
    dense, input_gradient, lora_hidden, lora_input, lora_rows, lora_weight_grads, FrozenWeight,
    InputShare, LoraBase, LoraHidden,
};
use super::lora::{dora_backward, dora_rows, LoraLayer};
use super::norm::{rms_norm_forward, rms_norm_grad_x};
use super::residual::sum;
use super::rope::rotate_tokens;
use candle_core::{DType, Device, Result, Tensor};
use std::borrow::Cow;

/// Whether the op runs the native CPU kernels on `x` with `mask`: attention's dispatch point
/// picks its flash kernel, which keeps the log-sum-exp the op's backward reads.
pub fn runs_natively(x: &Tensor, mask: &AttentionMask) -> Result<bool> {
    Ok(attention::kernel(x, mask)?.is_cpu())
}

/// One decoder layer's weights as the op reads them: every base weight frozen.
#[derive(Clone)]
pub struct LayerWeights {
    /// q, k, v, o, gate, up and down (the order of [`steps::Proj`]), or with the fused layout
    /// qkv, o, gate_up and down.
    pub projections: Vec<Projection>,
    /// How the projections are stored.
    pub layout: Layout,
    /// The norm before attention.
    pub input_norm: FrozenNorm,
    /// The norm before the MLP.
    pub post_norm: FrozenNorm,
    /// Qwen3's per-head query norm.
    pub q_norm: Option<FrozenNorm>,
    /// Qwen3's per-head key norm.
    pub k_norm: Option<FrozenNorm>,
    /// Gemma 2/3's norms of the attention and MLP outputs (both or neither).
    pub output_norms: Option<(FrozenNorm, FrozenNorm)>,
    /// How attention forms its scores (scale, soft cap).
    pub scores: Scores,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Whether RoPE is applied.
    pub use_rope: bool,
    /// The MLP's intermediate width.
    pub intermediate: usize,
}

/// A layer's per-forward inputs.
#[derive(Clone, Copy)]
pub struct LayerContext<'a> {
    /// Which keys each query sees.
    pub mask: &'a AttentionMask,
    /// RoPE cos table `[t, d/2]` or `[b, t, d/2]`.
    pub cos: &'a Tensor,
    /// RoPE sin table, like `cos`.
    pub sin: &'a Tensor,
    /// Key of this micro-batch's dropout draws; None disables dropout.
    pub dropout_key: Option<u64>,
}

/// The layer as one op: x `[b, t, hidden]` -> `[b, t, hidden]`, equal to the op-by-op forward.
///
/// `offload` keeps what the backward reads in host memory until then (and runs candle's kernels).
pub fn forward(
    layer: LayerWeights,
    ctx: &LayerContext<'_>,
    x: &Tensor,
    offload: bool,
) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let op = LayerOp::new(layer, ctx, x, offload, 0)?;
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
/// frozen base, any device): the forward keeps each layer's input — in host memory with
/// `offload` on an accelerator — and, with the native CPU kernels, its attention output and
/// log-sum-exp (n × (q width + heads) per layer: attention is most of a long sequence's work,
/// and the rest of the layer is rebuilt around them), and the backward rebuilds one layer at a
/// time from its input, last layer first (`LayerOp::recompute_backward`); `offload` also runs candle's kernels, as
/// [`forward`] does (the CPU in f32 otherwise runs the native ones). Each layer's MLP runs in
/// chunks of `chunk_rows` rows (0: [`mlp_chunk_rows`]) in both passes, so neither the MLP's
/// activations nor its gradients ever exist for all rows at once; the recomputation skips the
/// down projection's frozen product, whose output the backward never reads. LoRA gradients are
/// carried to candle's store like [`forward`]'s.
///
/// x `[b, t, hidden]` -> `[b, t, hidden]`, one [`LayerContext`] per layer.
pub fn checkpointed_stack(
    layers: Vec<LayerWeights>,
    x: &Tensor,
    contexts: &[LayerContext<'_>],
    offload: bool,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let layer_ops = layers
        .into_iter()
        .zip(contexts)
        .map(|(layer, ctx)| LayerOp::new(layer, ctx, x, offload, chunk_rows))
        .collect::<Result<Vec<_>>>()?;
    let mut h = x.detach().reshape((b * t, hidden))?.contiguous()?;
    let mut inputs = Vec::with_capacity(layer_ops.len());
    let mut attentions = Vec::with_capacity(layer_ops.len());
    for op in &layer_ops {
        let (next, attention) = op.forward_chunked(&h)?;
        // Into host memory (a no-op on the CPU).
        inputs.push(if offload {
            h.to_device(&Device::Cpu)?
        } else {
            h
        });
        attentions.push(attention);
        h = next;
    }
    let out = h.reshape((b, t, hidden))?;
    let carried: Vec<Tensor> = layer_ops
        .iter()
        .flat_map(|op| lora_vars(&op.projs))
        .collect();
    let backward = move |x: &Tensor, g: &Tensor, needs_x: bool| -> Result<Option<Tensor>> {
        let mut g = g.reshape((b * t, hidden))?.contiguous()?;
        for (i, ((op, input), attention)) in layer_ops
            .iter()
            .zip(&inputs)
            .zip(&attentions)
            .enumerate()
            .rev()
        {
            let input = input.to_device(x.device())?;
            match op.recompute_backward(&input, &g, i > 0 || needs_x, attention.clone())? {
                Some(grad) => g = grad,
                None => return Ok(None),
            }
        }
        Ok(Some(g.reshape((b, t, hidden))?))
    };
    graft_carrying("checkpointed-decoder", x, &carried, out, Box::new(backward))
}

/// The LoRA matrices of `projs`, whose gradients the op's backward computes.
fn lora_vars(projs: &[Projection]) -> Vec<Tensor> {
    projs
        .iter()
        .filter_map(|p| p.lora.as_ref())
        .flat_map(|lora| lora.vars().into_iter().map(|v| v.as_tensor().clone()))
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
pub struct Projection {
    /// The module's path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// The frozen weight `[out, in]`.
    pub weight: FrozenWeight,
    /// The frozen bias `[out]`.
    pub bias: Option<Tensor>,
    /// The module's adapter.
    pub lora: Option<LoraLayer>,
}

impl Projection {
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
        if lora.dora.is_some() {
            let mask = self.mask(first, x.dim(0)?, key, x.dtype())?;
            let (out, hidden) =
                dora_rows(x, &self.weight, self.bias.as_ref(), mask.as_ref(), lora)?;
            return Ok((out, Some(hidden)));
        }
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
        if lora.dora.is_some() {
            // The magnitude's gradient reads the projection's output: no product to skip.
            return Ok(self.forward(x, first, key)?.1);
        }
        let mask = self.mask(first, x.dim(0)?, key, x.dtype())?;
        lora_hidden(x, mask.as_ref(), &lora.a_in(x.dtype())?).map(Some)
    }
}

/// The gradient of one projection's output and what its forward saved.
struct Back<'a> {
    proj: &'a Projection,
    g: &'a Tensor,
    hidden: Option<&'a LoraHidden>,
}

impl<'a> Back<'a> {
    /// `proj`'s share of a backward: its output gradient g and its saved LoRA hidden.
    fn new(proj: &'a Projection, g: &'a Tensor, hidden: &'a Option<LoraHidden>) -> Self {
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
    // DoRA modules: the gradient of the output before the magnitude scaled it, and with dropout
    // the input-gradient terms that pass W under the mask.
    let mut unscaled_grads: Vec<Option<Tensor>> = Vec::with_capacity(parts.len());
    let mut masked_terms: Vec<(Tensor, &FrozenWeight, Tensor)> = Vec::new();
    for part in parts {
        let (Some(lora), Some(hidden)) = (&part.proj.lora, part.hidden) else {
            lora_terms.push(None);
            unscaled_grads.push(None);
            continue;
        };
        let g_dora = hidden
            .dora
            .as_ref()
            .map(|kept| dora_backward(part.g, kept, lora))
            .transpose()?;
        let g = g_dora.as_ref().unwrap_or(part.g);
        let mask = part.proj.mask(first, rows, key, x.dtype())?;
        let lora_in = lora_input(x, mask.as_ref())?;
        let b = lora.b_in(x.dtype())?;
        let (grad_hidden, grad_a, grad_b) =
            lora_weight_grads(g, &lora_in, (hidden, &b), lora.scale, (true, true))?;
        if let (Some(ga), Some(gb)) = (grad_a, grad_b) {
            park(lora.a.as_tensor(), LoraLayer::grad_of(ga)?)?;
            park(lora.b.as_tensor(), LoraLayer::grad_of(gb)?)?;
        }
        if let (Some(g_dora), Some(mask)) = (&g_dora, &mask) {
            masked_terms.push(((g_dora - part.g)?, &part.proj.weight, mask.clone()));
        }
        lora_terms.push(Some((grad_hidden, lora.a_in(x.dtype())?, mask)));
        unscaled_grads.push(g_dora);
    }
    if !needs_x {
        return Ok(None);
    }
    let shares: Vec<InputShare<'_>> = parts
        .iter()
        .zip(&lora_terms)
        .zip(&unscaled_grads)
        .map(|((part, term), g_dora)| InputShare {
            // With dropout a DoRA input's gradient through W is g's (the masked rest below).
            g: match (g_dora, term) {
                (Some(g_dora), Some((_, _, None))) => g_dora,
                _ => part.g,
            },
            weight: &part.proj.weight,
            lora: term
                .as_ref()
                .map(|(grad_hidden, a, mask)| (grad_hidden, a, mask.as_ref())),
        })
        .collect();
    let mut grad = input_gradient(&shares)?;
    for (g_rest, weight, mask) in &masked_terms {
        let through = input_gradient(&[InputShare {
            g: g_rest,
            weight,
            lora: None,
        }])?;
        grad = (grad + through.mul(mask)?)?;
    }
    Ok(Some(grad))
}

/// A frozen RMSNorm's weight and epsilon.
#[derive(Clone)]
pub struct FrozenNorm {
    /// Scale `[d]`.
    pub weight: Tensor,
    /// Epsilon added to the mean square.
    pub eps: f64,
}

impl FrozenNorm {
    /// x: [.., d] -> [.., d]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm_forward(x, &self.weight, self.eps)?.into_tensor()
    }

    /// The gradient of x for the output gradient g (both like x).
    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        rms_norm_grad_x(&x.contiguous()?, &self.weight, &g.contiguous()?, self.eps)
    }
}

/// Sizes of the layer's attention: batch rows, tokens per row, query heads, head width.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    d: usize,
}

/// Everything the op reads besides its input, shared by forward and backward.
struct LayerOp {
    /// q, k, v, o, gate, up, down (or qkv, o, gate_up, down).
    projs: Vec<Projection>,
    layout: Layout,
    /// Key/value heads.
    kv_heads: usize,
    /// The MLP's intermediate width.
    intermediate: usize,
    input_norm: FrozenNorm,
    post_norm: FrozenNorm,
    q_norm: Option<FrozenNorm>,
    k_norm: Option<FrozenNorm>,
    output_norms: Option<(FrozenNorm, FrozenNorm)>,
    dims: Dims,
    use_rope: bool,
    scores: Scores,
    activation: Activation,
    mask: AttentionMask,
    cos: Tensor,
    sin: Tensor,
    key: Option<u64>,
    /// Attention's kernel: the native one, or (offloading, or off the CPU in f32) candle's,
    /// recomputed in the backward.
    attention: Kernel,
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
    /// What attention's kernel keeps besides its output (the flash kernel's log-sum-exp).
    lse: Kept,
    /// The residual stream between attention and MLP.
    resid: Tensor,
    /// The o projection's output, where the layer normalises it (its norm's backward reads it).
    o: Option<Tensor>,
    /// LoRA hiddens of the attention's modules (q, k, v and o, or qkv and o).
    hidden: Vec<Option<LoraHidden>>,
}

/// What the MLP keeps for the backward, for all rows or one chunk of them.
struct MlpSaved {
    gate: Tensor,
    up: Tensor,
    /// The down projection's output, where the layer normalises it.
    down: Option<Tensor>,
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
                o: a.o.as_ref().map(moved).transpose()?,
                hidden: hiddens_to(&a.hidden, device)?,
            },
            mlp: MlpSaved {
                gate: moved(&m.gate)?,
                up: moved(&m.up)?,
                down: m.down.as_ref().map(moved).transpose()?,
                hidden: hiddens_to(&m.hidden, device)?,
            },
        })
    }
}

impl LayerOp {
    /// The op of `layer` for input `x`; `offload` moves what [`Self::forward`] keeps to the
    /// host (and runs candle's kernels); `chunk_rows` as [`checkpointed_stack`] reads it.
    fn new(
        layer: LayerWeights,
        ctx: &LayerContext<'_>,
        x: &Tensor,
        offload: bool,
        chunk_rows: usize,
    ) -> Result<Self> {
        let (b, t, _) = x.dims3()?;
        if layer.projections.len() != layer.layout.modules() {
            candle_core::bail!(
                "decoder layer op: {} projections, expected {} ({:?})",
                layer.projections.len(),
                layer.layout.modules(),
                layer.layout
            );
        }
        Ok(LayerOp {
            projs: layer.projections,
            layout: layer.layout,
            kv_heads: layer.kv_heads,
            intermediate: layer.intermediate,
            input_norm: layer.input_norm,
            post_norm: layer.post_norm,
            q_norm: layer.q_norm,
            k_norm: layer.k_norm,
            output_norms: layer.output_norms,
            dims: Dims {
                b,
                t,
                heads: layer.heads,
                d: layer.head_dim,
            },
            use_rope: layer.use_rope,
            scores: layer.scores,
            activation: layer.activation,
            mask: ctx.mask.clone(),
            cos: ctx.cos.clone(),
            sin: ctx.sin.clone(),
            key: ctx.dropout_key,
            // Offloading runs candle's kernels everywhere (on the CPU, where activations are in
            // host memory already, only tests ask for it).
            attention: match runs_natively(x, ctx.mask)? && !offload {
                true => Kernel::Cpu,
                false => Kernel::Composed,
            },
            offload,
            chunk_rows: match chunk_rows {
                0 => mlp_chunk_rows(layer.intermediate),
                rows => rows,
            },
        })
    }

    /// Queries or keys as attention reads them: `[b, t, heads, d]`, per-head normalised (Qwen3)
    /// and rotated. x: [n, heads * d]
    fn rotated(&self, x: &Tensor, norm: Option<&FrozenNorm>) -> Result<Tensor> {
        let Dims { b, t, d, .. } = self.dims;
        let x = x.reshape((b, t, (), d))?;
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
    fn unrotated(&self, x: &Tensor, g: &Tensor, norm: Option<&FrozenNorm>) -> Result<Tensor> {
        let Dims { b, t, d, .. } = self.dims;
        let x = x.reshape((b, t, (), d))?;
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
    fn mlp_projections(&self, n: usize) -> Result<Cow<'_, [Projection]>> {
        let mlp = self.mlp();
        let quantized = mlp
            .iter()
            .any(|p| matches!(p.weight, FrozenWeight::Quantized(_)));
        if !quantized || self.chunks(n).nth(1).is_none() {
            return Ok(Cow::Borrowed(mlp));
        }
        let dense = mlp
            .iter()
            .map(|p| {
                Ok(Projection {
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

    /// The MLP's modules: gate, up and down (or gate_up and down).
    fn mlp(&self) -> &[Projection] {
        &self.projs[self.layout.mlp_start()..]
    }

    /// x: [n, hidden] -> (the output's elements, what the backward keeps)
    fn forward(&self, x: &Tensor) -> Result<(Output, Saved)> {
        let mut steps = Recorder::new(self, self.mlp(), 0, true);
        let resid = steps::attention_half(&mut steps, x)?;
        let attention = steps.attention_saved(resid.clone())?;
        let out = steps::mlp_half(&mut steps, &resid)?;
        let saved = Saved {
            attention,
            mlp: steps.mlp_saved(true)?,
        };
        let saved = if self.offload {
            saved.to_device(&Device::Cpu)?
        } else {
            saved
        };
        Ok((out, saved))
    }

    /// The layer's output, the MLP by chunks of rows; with the native CPU kernels also
    /// attention's output and log-sum-exp, which spare [`Self::recompute_backward`] its costliest
    /// recomputation (attention is most of a long sequence's work). x: [n, hidden]
    fn forward_chunked(&self, x: &Tensor) -> Result<(Tensor, Option<(Kept, Tensor)>)> {
        let mut steps = Recorder::new(self, &[], 0, false);
        steps.capture = self.attention.is_cpu();
        let resid = steps::attention_half(&mut steps, x)?;
        let attention = steps.attention.take();
        drop(steps);
        let n = resid.dim(0)?;
        let mlp = self.mlp_projections(n)?;
        let mut outs = Vec::new();
        for (first, rows) in self.chunks(n) {
            let r = resid.narrow(0, first, rows)?;
            let mut steps = Recorder::new(self, &mlp, first, false);
            outs.push(steps::mlp_half(&mut steps, &r)?.into_tensor()?);
        }
        Ok((concat_rows(outs)?, attention))
    }

    /// Under [`checkpointed_stack`]: the layer rebuilt from its input `x: [n, hidden]` and
    /// differentiated for its output gradient `g` — attention whole, then the MLP chunk by chunk
    /// (each chunk's activations rebuilt and differentiated before the next) — parking the LoRA
    /// gradients and returning x's gradient when `needs_x`.
    fn recompute_backward(
        &self,
        x: &Tensor,
        g: &Tensor,
        needs_x: bool,
        attention: Option<(Kept, Tensor)>,
    ) -> Result<Option<Tensor>> {
        let mut steps = Recorder::new(self, &[], 0, true);
        steps.reuse = attention;
        let resid = steps::attention_half(&mut steps, x)?;
        let attention = steps.attention_saved(resid)?;
        drop(steps);
        let n = x.dim(0)?;
        let mlp = self.mlp_projections(n)?;
        let mut grads = Vec::new();
        for (first, rows) in self.chunks(n) {
            let r = attention.resid.narrow(0, first, rows)?;
            let mut steps = Recorder::new(self, &mlp, first, true);
            let act = steps::mlp_activation(&mut steps, &r)?;
            let mut saved = steps.mlp_saved(false)?;
            let down = mlp
                .last()
                .ok_or_else(|| candle_core::Error::Msg("no MLP".into()))?;
            if self.output_norms.is_some() {
                // The output norm's backward reads the down projection's output.
                let (out, hidden) = down.forward(&act, first, self.key)?;
                saved.down = Some(out);
                saved.hidden.push(hidden);
            } else {
                // The down projection's frozen product is skipped: only its LoRA hidden is needed.
                saved.hidden.push(down.hidden(&act, first, self.key)?);
            }
            let g = g.narrow(0, first, rows)?;
            grads.push(self.mlp_backward(&mlp, &saved, Some(act), &r, &g, first)?);
        }
        let grad_resid = concat_rows(grads)?;
        self.attention_half_backward(&attention, x, &grad_resid, needs_x)
    }

    /// Attention over rotated q `[b, t, heads, d]`, k and v `[b, t, kv_heads, d]`: what the
    /// kernel keeps for the backward and the output `[n, heads · d]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Kept, Tensor)> {
        let Dims { b, t, heads, d } = self.dims;
        let (out, kept) =
            attention::forward_untracked(self.attention, (q, k, v), &self.mask, self.scores)?;
        Ok((kept, out.reshape((b * t, heads * d))?.contiguous()?))
    }

    /// `(dq, dk, dv)` (like q, k, v) for the output gradient `g: [n, heads · d]`: the flash
    /// backward from the saved log-sum-exp, or attention recomputed on its own graph.
    fn attention_backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        s: &AttentionSaved,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let shape = qkv.0.dims();
        attention::backward_untracked(
            self.attention,
            qkv,
            (&s.attn.reshape(shape)?, &s.lse),
            &g.reshape(shape)?,
            &self.mask,
            self.scores,
        )
    }

    /// The gradient of the MLP's input rows `first..` (`resid: [rows, hidden]`, the residual
    /// stream) for the layer output's gradient `g` on those rows (`mlp` as [`steps::mlp_half`]
    /// reads it; `act`, the gated activation's product, when the caller has it, else rebuilt from gate and
    /// up); the MLP's LoRA gradients parked.
    fn mlp_backward(
        &self,
        mlp: &[Projection],
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
            None => glu_forward(&m.gate, &m.up, self.activation)?.into_tensor()?,
        };
        let g_down = match (&self.output_norms, &m.down) {
            (Some((_, norm)), Some(down)) => Cow::Owned(norm.backward(down, g)?),
            (Some(_), None) => return Err(missing("the MLP output norm's input")),
            (None, _) => Cow::Borrowed(g),
        };
        let last = mlp.len() - 1;
        let down = [Back::new(&mlp[last], &g_down, &m.hidden[last])];
        let grad_act = backward_projections(&down, &act, first, key, true)?
            .ok_or_else(|| missing("the MLP"))?;
        drop((act, g_down));
        let (grad_gate, grad_up) =
            glu_backward(&m.gate, &m.up, &grad_act, [true, true], self.activation)?;
        let (grad_gate, grad_up) = (
            grad_gate.ok_or_else(|| missing("gate"))?,
            grad_up.ok_or_else(|| missing("up"))?,
        );
        drop(grad_act);
        let normed = self.post_norm.forward(resid)?;
        let fused;
        let parts: Vec<Back<'_>> = match self.layout {
            Layout::Separate => vec![
                Back::new(&mlp[0], &grad_gate, &m.hidden[0]),
                Back::new(&mlp[1], &grad_up, &m.hidden[1]),
            ],
            Layout::Fused => {
                fused = Tensor::cat(&[&grad_gate, &grad_up], 1)?;
                vec![Back::new(&mlp[0], &fused, &m.hidden[0])]
            }
        };
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
        // The o norm, o_proj, attention, RoPE and q/k norms, q/k/v, the input norm.
        let g_o = match (&self.output_norms, &s.o) {
            (Some((norm, _)), Some(o)) => Cow::Owned(norm.backward(o, grad_resid)?),
            (Some(_), None) => return Err(missing("the attention output norm's input")),
            (None, _) => Cow::Borrowed(grad_resid),
        };
        let o_at = self.layout.o();
        let o = [Back::new(&self.projs[o_at], &g_o, &s.hidden[o_at])];
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
        let fused;
        let parts: Vec<Back<'_>> = match self.layout {
            Layout::Separate => vec![
                Back::new(&self.projs[0], &dq, &s.hidden[0]),
                Back::new(&self.projs[1], &dk, &s.hidden[1]),
                Back::new(&self.projs[2], &dv, &s.hidden[2]),
            ],
            Layout::Fused => {
                fused = Tensor::cat(&[&dq, &dk, &dv], 1)?;
                vec![Back::new(&self.projs[0], &fused, &s.hidden[0])]
            }
        };
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
        let grad_resid = self.mlp_backward(self.mlp(), &s.mlp, None, &s.attention.resid, g, 0)?;
        self.attention_half_backward(&s.attention, x, &grad_resid, needs_x)
    }
}

/// The one-op and checkpointed forms of the layer's steps ([`super::steps`]): untracked rows
/// `[n, width]` (rows `first..` of the op's input), run with the kernels the ops' dispatch points
/// pick, keeping (when `keep`) what the hand-written backward reads: the projected q, k and v,
/// attention's output and what its kernel kept, gate and up, and each LoRA branch's hidden.
struct Recorder<'a> {
    op: &'a LayerOp,
    /// The MLP's modules as this pass reads them ([`LayerOp::mlp_projections`]).
    mlp: &'a [Projection],
    first: usize,
    keep: bool,
    /// Each module's LoRA hidden, by position.
    hidden: Vec<Option<LoraHidden>>,
    /// The output of the fused module whose pieces are being read (qkv, gate_up).
    fused: Option<Tensor>,
    qkv: Vec<Tensor>,
    /// The o and down projections' outputs (kept where the layer normalises them).
    o: Option<Tensor>,
    down: Option<Tensor>,
    attention: Option<(Kept, Tensor)>,
    gate_up: Option<(Tensor, Tensor)>,
    /// Keep attention's output and log-sum-exp even when nothing else is kept (the checkpointed
    /// stack's forward).
    capture: bool,
    /// Attention's output and log-sum-exp from the forward, used instead of running it again.
    reuse: Option<(Kept, Tensor)>,
}

impl<'a> Recorder<'a> {
    fn new(op: &'a LayerOp, mlp: &'a [Projection], first: usize, keep: bool) -> Self {
        Recorder {
            op,
            mlp,
            first,
            keep,
            hidden: (0..op.projs.len()).map(|_| None).collect(),
            fused: None,
            qkv: Vec::new(),
            o: None,
            down: None,
            attention: None,
            gate_up: None,
            capture: false,
            reuse: None,
        }
    }

    /// What the attention half kept, with `resid`, its result.
    fn attention_saved(&mut self, resid: Tensor) -> Result<AttentionSaved> {
        let missing = || candle_core::Error::Msg("decoder layer: attention did not run".into());
        let (lse, attn) = self.attention.take().ok_or_else(missing)?;
        let [q, k, v]: [Tensor; 3] = std::mem::take(&mut self.qkv)
            .try_into()
            .map_err(|_| missing())?;
        let hidden = (0..=self.op.layout.o())
            .map(|i| self.hidden[i].take())
            .collect();
        Ok(AttentionSaved {
            q,
            k,
            v,
            attn,
            lse,
            resid,
            o: self.o.take(),
            hidden,
        })
    }

    /// What the MLP kept: gate, up, and the LoRA hiddens of gate, up and (`with_down`) down.
    fn mlp_saved(&mut self, with_down: bool) -> Result<MlpSaved> {
        let (gate, up) = self
            .gate_up
            .take()
            .ok_or_else(|| candle_core::Error::Msg("decoder layer: the MLP did not run".into()))?;
        let layout = self.op.layout;
        let mut hidden: Vec<_> = (layout.mlp_start()..layout.down())
            .map(|i| self.hidden[i].take())
            .collect();
        if with_down {
            hidden.push(self.hidden[layout.down()].take());
        }
        Ok(MlpSaved {
            gate,
            up,
            down: self.down.take(),
            hidden,
        })
    }
}

impl LayerSteps for Recorder<'_> {
    type T = Tensor;
    type Out = Output;

    fn norm(&mut self, which: NormAt, x: &Tensor) -> Result<Tensor> {
        let outputs = self.op.output_norms.as_ref();
        let missing = || candle_core::Error::Msg(format!("decoder layer: no {which:?} norm"));
        match which {
            NormAt::Input => self.op.input_norm.forward(x),
            NormAt::PostAttention => self.op.post_norm.forward(x),
            NormAt::AttentionOutput => outputs.ok_or_else(missing)?.0.forward(x),
            NormAt::MlpOutput => outputs.ok_or_else(missing)?.1.forward(x),
        }
    }

    fn output_norms(&self) -> bool {
        self.op.output_norms.is_some()
    }

    fn project(&mut self, which: StepProj, x: &Tensor) -> Result<Tensor> {
        let layout = self.op.layout;
        let (i, piece) = layout.slot(which);
        let start = layout.mlp_start();
        let proj = if i >= start {
            &self.mlp[i - start]
        } else {
            &self.op.projs[i]
        };
        if piece.is_none_or(|p| p == 0) {
            let (y, hidden) = proj.forward(x, self.first, self.op.key)?;
            if self.keep {
                self.hidden[i] = hidden;
            }
            self.fused = Some(y);
        }
        // A whole module, or a fused one's last piece: its output is not needed again.
        let last = piece.is_none() || matches!(which, StepProj::V | StepProj::Up);
        let module_out = match last {
            true => self.fused.take(),
            false => self.fused.clone(),
        }
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("decoder layer: {which:?} before its module"))
        })?;
        let y = match piece {
            None => module_out,
            Some(_) => {
                let Dims { heads, d, .. } = self.op.dims;
                let (at, width) = Layout::fused_columns(
                    which,
                    heads * d,
                    self.op.kv_heads * d,
                    self.op.intermediate,
                );
                module_out.narrow(1, at, width)?.contiguous()?
            }
        };
        if self.keep {
            let normalised = self.op.output_norms.is_some();
            match which {
                StepProj::Q | StepProj::K | StepProj::V => self.qkv.push(y.clone()),
                StepProj::O if normalised => self.o = Some(y.clone()),
                StepProj::Down if normalised => self.down = Some(y.clone()),
                _ => {}
            }
        }
        Ok(y)
    }

    fn attend(&mut self, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        if let Some((kept, out)) = self.reuse.take() {
            if self.keep {
                self.attention = Some((kept, out.clone()));
            }
            return Ok(out);
        }
        let op = self.op;
        let q_rot = op.rotated(&q, op.q_norm.as_ref())?;
        let k_rot = op.rotated(&k, op.k_norm.as_ref())?;
        let v4 = v.reshape(k_rot.dims())?;
        let (kept, out) = op.attention(&q_rot, &k_rot, &v4)?;
        if self.keep || self.capture {
            self.attention = Some((kept, out.clone()));
        }
        Ok(out)
    }

    fn activate(&mut self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.keep {
            self.gate_up = Some((gate.clone(), up.clone()));
        }
        glu_forward(gate, up, self.op.activation)?.into_tensor()
    }

    fn add(&mut self, stream: &Tensor, branch: &Tensor) -> Result<Tensor> {
        sum(stream, branch)?.into_tensor()
    }

    fn output(&mut self, stream: &Tensor, branch: &Tensor) -> Result<Output> {
        sum(stream, branch)
    }
}

/// Chunks of rows as one `[n, width]` tensor (the one chunk itself when there is one).
fn concat_rows(mut chunks: Vec<Tensor>) -> Result<Tensor> {
    if chunks.len() == 1 {
        return Ok(chunks.remove(0));
    }
    Tensor::cat(&chunks, 0)
}
