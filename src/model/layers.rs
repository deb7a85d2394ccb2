//! The decoder's building blocks: linear projections (optionally LoRA-adapted), RMSNorm,
//! grouped-query attention with RoPE, the gated MLP (SwiGLU, GeGLU), and the pre-norm decoder layer.

use super::param::Param;
use crate::ops::attention::{
    attention, attention_tokens, prefers_token_layout, AttentionMask, Scores,
};
use crate::ops::glu::{glu, Activation};
use crate::ops::layer::steps::{self, LayerSteps, Layout, NormAt, Proj};
use crate::ops::linear::{frozen_linear, lora_linear, FrozenWeight, LoraBase};
use crate::ops::lora::{dora_linear, LoraLayer};
use crate::ops::norm::rms_norm;
use crate::ops::residual::residual_add;
use crate::ops::rope::{apply_rope, apply_rope_tokens};
use crate::ops::router::RouterLoss;
use crate::quant::QuantizedWeight;
use candle_core::{Result, Tensor, Var};
use std::sync::Arc;

/// Per-forward inputs shared by all layers.
pub struct ForwardContext<'a> {
    /// Which keys each query sees.
    pub mask: &'a AttentionMask,
    /// RoPE cos table `[t, d/2]` or `[b, t, d/2]`.
    pub cos: &'a Tensor,
    /// RoPE sin table, like `cos`.
    pub sin: &'a Tensor,
    /// Key of this micro-batch's dropout draws; None disables dropout (evaluation).
    pub dropout_key: Option<u64>,
    /// Run each decoder layer as one op that keeps only what its backward needs, where it applies
    /// (see [`super::selective`]); false builds the op-by-op graph.
    pub selective: bool,
    /// Keep what each one-op layer saves in host memory until its backward (and run such layers
    /// on every device, not only with the native CPU kernels).
    pub offload: bool,
    /// Where the mixture-of-experts layers record their routing for the load-balancing loss
    /// (training with `router_aux_loss_coef`); None routes without recording.
    pub router: Option<&'a RouterLoss>,
}

/// The weight of a linear projection: full precision (frozen or trained) or frozen and quantized.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A full-precision weight.
    Dense(Param),
    /// A frozen quantized weight (QLoRA).
    Quantized(Arc<QuantizedWeight>),
}

impl LinearWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(p) => {
                let d = p.tensor().dims();
                (d[0], d[1])
            }
            LinearWeight::Quantized(q) => q.shape,
        }
    }

    /// The full-precision weight (dequantized when quantized).
    pub fn dense(&self) -> crate::Result<Tensor> {
        match self {
            LinearWeight::Dense(p) => Ok(p.tensor().clone()),
            LinearWeight::Quantized(q) => q.dequantize(),
        }
    }

    /// The weight as a frozen operand, unless it is trained.
    pub fn frozen(&self) -> Option<FrozenWeight> {
        match self {
            LinearWeight::Dense(Param::Frozen(w)) => Some(FrozenWeight::Dense(w.clone())),
            LinearWeight::Dense(Param::Trainable(_)) => None,
            LinearWeight::Quantized(q) => Some(FrozenWeight::Quantized(q.clone())),
        }
    }

    /// The dense parameter, if not quantized.
    pub fn param(&self) -> Option<&Param> {
        match self {
            LinearWeight::Dense(p) => Some(p),
            LinearWeight::Quantized(_) => None,
        }
    }
}

/// A linear projection `y = x W^T + b`, with an optional LoRA branch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The module's path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Weight `[out, in]`.
    pub weight: LinearWeight,
    /// Bias `[out]`.
    pub bias: Option<Param>,
    /// The LoRA adapter on this module, if any.
    pub lora: Option<LoraLayer>,
}

impl Linear {
    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// x: [.., in] -> [.., out]
    pub fn forward(&self, x: &Tensor, dropout_key: Option<u64>) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(Param::tensor);
        let bias_frozen = self.bias.as_ref().is_none_or(|b| b.var().is_none());
        match (self.weight.frozen(), &self.lora) {
            (Some(w), Some(lora)) if lora.dora.is_some() => {
                let rows = x.elem_count() / self.in_features();
                let base = LoraBase {
                    weight: &w,
                    bias,
                    dropout_mask: lora.dropout_mask(&self.name, rows, dropout_key, x.dtype())?,
                };
                dora_linear(x, base, lora)
            }
            (Some(w), Some(lora)) => {
                let rows = x.elem_count() / self.in_features();
                let base = LoraBase {
                    weight: &w,
                    bias,
                    dropout_mask: lora.dropout_mask(&self.name, rows, dropout_key, x.dtype())?,
                };
                // Tracked casts: over a bf16 base the f32 adapter's gradients come back in f32.
                let a = lora.a.as_tensor().to_dtype(x.dtype())?;
                let b = lora.b.as_tensor().to_dtype(x.dtype())?;
                lora_linear(x, base, &a, &b, lora.scale)
            }
            (Some(w), None) if bias_frozen => frozen_linear(x, &w, bias),
            _ => {
                // Full fine-tuning: the weight is a Var, so candle's own matmul is what we want.
                let w = self
                    .weight
                    .dense()
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let y = x.broadcast_matmul(&w.t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// RMSNorm over the last dimension: `x / rms(x) · (offset + w)`.
#[derive(Debug, Clone)]
pub struct Norm {
    /// The module's path.
    pub name: String,
    /// The stored weight `[d]`, as the checkpoint holds it.
    pub weight: Param,
    /// Epsilon added to the mean square.
    pub eps: f64,
    /// Added to the weight: 0, or 1 for Gemma, whose norms scale by `1 + w`.
    pub offset: f64,
}

impl Norm {
    /// The scale the norm multiplies by, `offset + w` (differentiable in a trained `w`).
    pub fn scale(&self) -> Result<Tensor> {
        let w = self.weight.tensor();
        match self.offset {
            0.0 => Ok(w.clone()),
            offset => w.affine(1.0, offset),
        }
    }

    /// x: [.., d] -> [.., d]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.scale()?, self.eps)
    }
}

/// Grouped-query self-attention (its projections are the layer's [`DecoderLayer::linears`]).
#[derive(Debug, Clone)]
pub struct Attention {
    /// Qwen3's per-head query norm.
    pub q_norm: Option<Norm>,
    /// Qwen3's per-head key norm.
    pub k_norm: Option<Norm>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Whether RoPE is applied (SmolLM3 skips it in some layers).
    pub use_rope: bool,
    /// How the scores are formed: `1/√head_dim` (Gemma: `query_pre_attn_scalar^-½`), and
    /// Gemma 2's soft cap.
    pub scores: Scores,
}

/// Keys and values of earlier positions, kept during generation: `[b, kv_heads, t, d]` each.
pub type KvCache = Option<(Tensor, Tensor)>;

impl Attention {
    /// Attention of the projected `q: [b, t, heads · d]`, `k`, `v: [b, t, kv_heads · d]`: per-head
    /// q/k norms, RoPE, attention, and the output `[b, t, heads · d]` as o_proj reads it. `cache`
    /// (generation) holds earlier keys and values. Without a cache, where attention's kernel reads
    /// the token-major layout (see [`prefers_token_layout`]), q, k and v stay as the projections
    /// produce them (`[b, t, heads, d]` views) and the output is o_proj's input as is; otherwise
    /// they go heads-first.
    pub fn attend(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        ctx: &ForwardContext<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let scale = self.scores;
        let split = |x: &Tensor, heads: usize, norm: Option<&Norm>| -> Result<Tensor> {
            let x = x.reshape((b, t, heads, self.head_dim))?;
            match norm {
                Some(n) => n.forward(&x),
                None => Ok(x),
            }
        };
        let q = split(&q, self.heads, self.q_norm.as_ref())?;
        let k = split(&k, self.kv_heads, self.k_norm.as_ref())?;
        let v = split(&v, self.kv_heads, None)?;
        if cache.is_none() && prefers_token_layout(&q) {
            let (q, k) = if self.use_rope {
                (
                    apply_rope_tokens(&q, ctx.cos, ctx.sin)?,
                    apply_rope_tokens(&k, ctx.cos, ctx.sin)?,
                )
            } else {
                (q, k)
            };
            let out = attention_tokens(&q, &k, &v, ctx.mask, scale)?;
            return out.reshape((b, t, self.heads * self.head_dim));
        }
        let heads_first = |x: Tensor| x.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
        let (q, k) = if self.use_rope {
            (
                apply_rope(&q, ctx.cos, ctx.sin)?,
                apply_rope(&k, ctx.cos, ctx.sin)?,
            )
        } else {
            (q, k)
        };
        let (k, v) = match cache {
            Some(cache) => {
                let (k, v) = match cache.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *cache = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        attention(&q, &k, &v, ctx.mask, scale)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))
    }
}

/// The gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU, or Gemma's GeGLU; its projections are
/// the layer's [`DecoderLayer::linears`]).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// The gate's activation.
    pub activation: Activation,
    /// The intermediate width.
    pub intermediate: usize,
}

/// A LoRA pair over a mixture of experts' stacked weights, as PEFT's `ParamWrapper` adapts
/// transformers 5's 3-D expert parameters (`target_parameters`): `a [r·E, in]`, `b [out, r·E]`;
/// expert e's pair is rows `e·r..(e+1)·r` of `a` and columns `e, E + e, …` of `b`. The router
/// (`gate.weight`, one "expert") is the plain `B A` of rank r.
#[derive(Debug, Clone)]
pub struct ExpertLora {
    /// `[rank · experts, in]`.
    pub a: Var,
    /// `[out, rank · experts]`.
    pub b: Var,
    /// Rank per expert.
    pub rank: usize,
    /// `alpha / rank`.
    pub scale: f64,
}

impl ExpertLora {
    /// Expert `e`'s `(A [r, in], B [out, r])` of `experts`.
    pub fn factors(&self, e: usize, experts: usize) -> Result<(Tensor, Tensor)> {
        let r = self.rank;
        let a = self.a.as_tensor().narrow(0, e * r, r)?;
        let columns: Vec<u32> = (0..r).map(|j| (j * experts + e) as u32).collect();
        let b = self
            .b
            .as_tensor()
            .index_select(&Tensor::new(columns.as_slice(), self.b.device())?, 1)?;
        Ok((a, b))
    }

    /// Expert `e`'s update for input `x: [n, in]`: `scale · x Aᵀ Bᵀ` (`[n, out]`).
    pub fn delta(&self, x: &Tensor, e: usize, experts: usize) -> Result<Tensor> {
        let (a, b) = self.factors(e, experts)?;
        let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
        x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale
    }

    /// Expert `e`'s weight update `scale · B A` (`[out, in]`).
    pub fn weight_delta(&self, e: usize, experts: usize) -> Result<Tensor> {
        let (a, b) = self.factors(e, experts)?;
        b.matmul(&a)? * self.scale
    }
}

/// The LoRA pairs of a mixture of experts: router, the experts' gate-up and down weights.
#[derive(Debug, Clone, Default)]
pub struct MoeLora {
    /// On the router (`gate.weight`).
    pub router: Option<ExpertLora>,
    /// On the experts' gate and up weights, stacked (`gate_up_proj`: gate rows, then up rows).
    pub gate_up: Option<ExpertLora>,
    /// On the experts' down weights (`down_proj`).
    pub down: Option<ExpertLora>,
}

/// A mixture of experts (Mixtral, Qwen3-MoE): the router and every expert's gate, up and down
/// projections (frozen, or all trained when fully fine-tuning). Each token goes to the `top_k`
/// experts its router probabilities rank first, weighed by those probabilities (renormalised to
/// sum to 1 when `normalize`), as transformers routes it; gradients reach the input through the
/// experts and the routing weights, and the LoRA pairs (or the weights themselves).
#[derive(Debug, Clone)]
pub struct Moe {
    /// The router's module path, e.g. `model.layers.0.mlp.gate`.
    pub name: String,
    /// The router `[experts, hidden]` (trained only when fully fine-tuning).
    pub router: Param,
    /// Each expert's gate, up and down weights (dense or quantized).
    pub experts: Vec<[Linear; 3]>,
    /// Experts per token.
    pub top_k: usize,
    /// Whether the top-k weights are renormalised.
    pub normalize: bool,
    /// The experts' activation.
    pub activation: Activation,
    /// LoRA pairs on the router and the experts (PEFT's `target_parameters`).
    pub lora: MoeLora,
    /// PEFT's module path of the block (`model.layers.0.mlp`), which its adapter keys name.
    pub peft_path: String,
}

impl Moe {
    /// The block's LoRA tensors under PEFT's names (without `base_model.model.`):
    /// `…mlp.gate`, `…mlp.experts.base_layer` (gate_up) and `…mlp.experts` (down).
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let p = &self.peft_path;
        let mut out = Vec::new();
        for (module, lora) in [
            (format!("{p}.gate"), &self.lora.router),
            (format!("{p}.experts.base_layer"), &self.lora.gate_up),
            (format!("{p}.experts"), &self.lora.down),
        ] {
            if let Some(l) = lora {
                out.push((format!("{module}.lora_A.weight"), l.a.clone()));
                out.push((format!("{module}.lora_B.weight"), l.b.clone()));
            }
        }
        out
    }

    /// With `router`, the routing is recorded for the load-balancing loss and the output carries
    /// its gradient.
    ///
    /// x: [.., hidden] -> [.., hidden]
    pub fn forward(&self, x: &Tensor, router: Option<&RouterLoss>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let rows = x.reshape(((), hidden))?;
        let n = rows.dim(0)?;
        let experts = self.experts.len();
        let k = self.top_k.min(experts);
        // Router probabilities in f32 (transformers' softmax dtype), differentiable in x.
        let mut logits = match self.router.var() {
            // Full fine-tuning trains the router too.
            Some(v) => rows.matmul(&v.as_tensor().to_dtype(rows.dtype())?.t()?)?,
            None => {
                let weight = FrozenWeight::Dense(self.router.tensor().clone());
                frozen_linear(&rows, &weight, None)?
            }
        };
        if let Some(l) = &self.lora.router {
            logits = (logits + l.delta(&rows, 0, 1)?)?;
        }
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        let probs = candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?;
        // The top k per row, chosen on the host (the choice has no gradient).
        let host = probs.detach().to_vec2::<f32>()?;
        let mut chosen = Vec::with_capacity(n * k);
        for row in &host {
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            chosen.extend(order[..k].iter().map(|&e| e as u32));
        }
        // With the load-balancing loss, the probabilities also carry its gradient.
        let probs = match router {
            Some(router) => router.route(probs, &host, &chosen)?,
            None => probs,
        };
        let index = Tensor::from_vec(chosen.clone(), (n, k), x.device())?;
        let mut weights = probs.gather(&index, 1)?;
        if self.normalize {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let weights = weights.to_dtype(x.dtype())?;
        // Each expert's tokens and their slots in `chosen`, in one pass.
        let mut routed: Vec<(Vec<u32>, Vec<u32>)> = vec![Default::default(); experts];
        for (i, &c) in chosen.iter().enumerate() {
            routed[c as usize].0.push((i / k) as u32);
            routed[c as usize].1.push(i as u32);
        }
        // The experts' outputs one after the other, then put back in slot order and summed with
        // the routing weights: the graph keeps O(n·k) rows, not one [n, hidden] sum per expert.
        let mut outputs = Vec::with_capacity(experts);
        let mut at = vec![0u32; n * k];
        let mut row = 0u32;
        for (e, ([gate, up, down], (token, slot))) in self.experts.iter().zip(&routed).enumerate() {
            if token.is_empty() {
                continue;
            }
            let tokens = Tensor::new(token.as_slice(), x.device())?;
            let xe = rows.index_select(&tokens, 0)?;
            let (mut g, mut u) = (gate.forward(&xe, None)?, up.forward(&xe, None)?);
            if let Some(l) = &self.lora.gate_up {
                // One product for both: gate's columns, then up's.
                let (d, i) = (l.delta(&xe, e, experts)?, g.dim(1)?);
                g = (g + d.narrow(1, 0, i)?)?;
                u = (u + d.narrow(1, i, i)?)?;
            }
            let act = glu(&g, &u, self.activation)?;
            let mut ye = down.forward(&act, None)?;
            if let Some(l) = &self.lora.down {
                ye = (ye + l.delta(&act, e, experts)?)?;
            }
            for &s in slot {
                at[s as usize] = row;
                row += 1;
            }
            outputs.push(ye);
        }
        let stacked = Tensor::cat(&outputs, 0)?;
        let by_slot = stacked.index_select(&Tensor::from_vec(at, n * k, x.device())?, 0)?;
        let out = by_slot
            .reshape((n, k, hidden))?
            .broadcast_mul(&weights.unsqueeze(2)?)?
            .sum(1)?;
        out.reshape(dims)
    }

    /// Every expert's gate, up and down projections.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.experts.iter().flatten()
    }

    /// Mutable access to every expert's projections.
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.experts.iter_mut().flatten()
    }
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: Norm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP (Gemma 2/3: `pre_feedforward_layernorm`).
    pub post_attention_layernorm: Norm,
    /// The MLP.
    pub mlp: Mlp,
    /// Gemma 2/3's norms of the attention output (`post_attention_layernorm`) and of the MLP
    /// output (`post_feedforward_layernorm`), before each residual add.
    pub output_norms: Option<(Norm, Norm)>,
    /// The linear modules: q, k, v, o, gate, up, down, or with the fused layout (Phi-3) qkv, o,
    /// gate_up, down.
    pub linears: Vec<Linear>,
    /// How the projections are stored.
    pub layout: Layout,
    /// The mixture of experts that replaces the MLP (Mixtral, Qwen3-MoE's sparse layers); the
    /// layer's `linears` are then the attention's q, k, v and o.
    pub moe: Option<Moe>,
}

impl DecoderLayer {
    /// The layer op by op ([`steps::layer`] on tracked tensors). x: [b, t, hidden] ->
    /// [b, t, hidden]; `cache` (generation) holds earlier keys and values.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardContext<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut tracked = Tracked {
            layer: self,
            ctx,
            cache,
            fused: None,
        };
        steps::layer(&mut tracked, x)
    }

    /// Every trainable tensor the layer uses: LoRA pairs, and its weights when fully fine-tuning.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(lora) = &lin.lora {
                out.extend(lora.vars().into_iter().cloned());
            }
            out.extend(lin.weight.param().and_then(Param::var).cloned());
            out.extend(lin.bias.as_ref().and_then(Param::var).cloned());
        }
        out.extend(
            self.norms()
                .into_iter()
                .filter_map(|n| n.weight.var().cloned()),
        );
        if let Some(moe) = &self.moe {
            out.extend(moe.lora_vars().into_iter().map(|(_, v)| v));
            out.extend(moe.router.var().cloned());
            for lin in moe.linears() {
                out.extend(lin.weight.param().and_then(Param::var).cloned());
            }
        }
        out
    }

    /// The layer's linear modules, in the order of [`Self::layout`].
    pub fn linears(&self) -> Vec<&Linear> {
        self.linears.iter().collect()
    }

    /// Mutable access to the layer's linear modules.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.linears.iter_mut().collect()
    }

    /// The layer's norms.
    pub fn norms(&self) -> Vec<&Norm> {
        let mut n = vec![&self.input_layernorm, &self.post_attention_layernorm];
        n.extend(self.self_attn.q_norm.iter());
        n.extend(self.self_attn.k_norm.iter());
        if let Some((o, down)) = &self.output_norms {
            n.extend([o, down]);
        }
        n
    }
}

/// The op-by-op form of the layer's steps: tracked tensors, each step a differentiable op.
struct Tracked<'a, 'c> {
    layer: &'a DecoderLayer,
    ctx: &'a ForwardContext<'a>,
    cache: Option<&'c mut KvCache>,
    /// The output of the fused module whose pieces are being read.
    fused: Option<Tensor>,
}

impl LayerSteps for Tracked<'_, '_> {
    type T = Tensor;
    type Out = Tensor;

    fn norm(&mut self, which: NormAt, x: &Tensor) -> Result<Tensor> {
        let outputs = self.layer.output_norms.as_ref();
        let missing = || candle_core::Error::Msg(format!("decoder layer: no {which:?} norm"));
        match which {
            NormAt::Input => self.layer.input_layernorm.forward(x),
            NormAt::PostAttention => self.layer.post_attention_layernorm.forward(x),
            NormAt::AttentionOutput => outputs.ok_or_else(missing)?.0.forward(x),
            NormAt::MlpOutput => outputs.ok_or_else(missing)?.1.forward(x),
        }
    }

    fn output_norms(&self) -> bool {
        self.layer.output_norms.is_some()
    }

    fn project(&mut self, which: Proj, x: &Tensor) -> Result<Tensor> {
        let layer = self.layer;
        let (i, piece) = layer.layout.slot(which);
        let Some(piece) = piece else {
            return layer.linears[i].forward(x, self.ctx.dropout_key);
        };
        if piece == 0 {
            self.fused = Some(layer.linears[i].forward(x, self.ctx.dropout_key)?);
        }
        let fused = self.fused.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!("decoder layer: {which:?} before its module"))
        })?;
        let a = &layer.self_attn;
        let (at, width) = Layout::fused_columns(
            which,
            a.heads * a.head_dim,
            a.kv_heads * a.head_dim,
            layer.mlp.intermediate,
        );
        let y = fused.narrow(candle_core::D::Minus1, at, width)?;
        if matches!(which, Proj::V | Proj::Up) {
            self.fused = None;
        }
        Ok(y)
    }

    fn attend(&mut self, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let cache = self.cache.as_deref_mut();
        self.layer.self_attn.attend((q, k, v), self.ctx, cache)
    }

    fn activate(&mut self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        glu(gate, up, self.layer.mlp.activation)
    }

    fn sparse(&self) -> bool {
        self.layer.moe.is_some()
    }

    fn experts(&mut self, x: &Tensor) -> Result<Tensor> {
        match &self.layer.moe {
            Some(moe) => moe.forward(x, self.ctx.router),
            None => candle_core::bail!("decoder layer: no mixture of experts"),
        }
    }

    fn add(&mut self, stream: &Tensor, branch: &Tensor) -> Result<Tensor> {
        residual_add(stream, branch)
    }

    fn output(&mut self, stream: &Tensor, branch: &Tensor) -> Result<Tensor> {
        residual_add(stream, branch)
    }
}
