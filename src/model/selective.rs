//! Selective activation checkpointing, the default for LoRA and QLoRA on the CPU: a decoder layer
//! runs as one op that keeps only what its backward cannot rebuild without a frozen matmul — q, k
//! and v as projected, the attention output and its log-sum-exp, the residual stream between
//! attention and MLP, gate and up, and each LoRA branch's r-wide hidden — and recomputes the
//! elementwise rest in the backward: both RMSNorm outputs, Qwen3's q/k norms, RoPE, the SwiGLU
//! product and the LoRA dropout masks. No frozen matmul runs twice, and none of the tensors an
//! op-by-op graph keeps only as some op's input (normalised inputs, rotated q/k, the SwiGLU
//! product, the projections' outputs before each residual add) stays alive.
//!
//! The op's graph inputs are the layer input and one LoRA matrix that anchors it in the graph;
//! the backward hands every LoRA gradient to the store through [`park`], so the loss must be
//! differentiated with [`crate::ops::checkpoint::backward`].

use super::layers::{DecoderLayer, ForwardContext, Linear, Norm};
use crate::lora::layer::LoraLayer;
use crate::ops::attention::{flash_applies, AttentionMask};
use crate::ops::checkpoint::park;
use crate::ops::cpu::{is_cpu_f32, tensor, Held};
use crate::ops::flash::{self, Dims};
use crate::ops::graft::{grad_enabled, graft_anchored, Output};
use crate::ops::linear::{
    dense, input_gradient, lora_input, lora_rows, lora_weight_grads, FrozenWeight, InputShare,
    LoraBase, LoraHidden,
};
use crate::ops::norm::rms_norm_cpu;
use crate::ops::residual::sum_cpu;
use crate::ops::rope::rotate_tokens;
use crate::ops::swiglu::{swiglu_backward_cpu, swiglu_forward_cpu};
use candle_core::{Result, Tensor};

/// Whether `layer` runs as one op on `x`: training (gradients recorded) on the CPU in f32, every
/// weight, bias and norm frozen (LoRA, QLoRA or no adapter), and a mask the flash kernel reads.
pub(crate) fn applies(layer: &DecoderLayer, x: &Tensor, mask: &AttentionMask) -> Result<bool> {
    let frozen =
        layer.linears().iter().all(|l| {
            l.weight.frozen().is_some() && l.bias.as_ref().is_none_or(|b| b.var().is_none())
        }) && layer.norms().iter().all(|n| n.weight.var().is_none());
    Ok(frozen && grad_enabled() && is_cpu_f32(x) && flash_applies(x, mask)?)
}

/// The layer as one op: x `[b, t, hidden]` -> `[b, t, hidden]`, equal to the op-by-op forward.
pub(crate) fn forward(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &ForwardContext<'_>,
) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let plan = LayerPlan::new(layer, ctx, (b, t))?;
    let x_rows = x.detach().reshape((b * t, hidden))?.contiguous()?;
    let (out, saved) = plan.forward(&x_rows)?;
    let out = Output::host(out, (b, t, hidden));
    let anchor = plan
        .projs
        .iter()
        .find_map(|p| p.lora.as_ref())
        .map(|lora| lora.a.as_tensor().clone());
    let backward = move |x: &Tensor, g: &Tensor, needs_x: bool| -> Result<Option<Tensor>> {
        let (x_rows, g) = (x.reshape((b * t, hidden))?, g.reshape((b * t, hidden))?);
        let grad = plan.backward(&saved, &x_rows, &g.contiguous()?, needs_x)?;
        grad.map(|g| g.reshape((b, t, hidden))).transpose()
    };
    // A LoRA matrix anchors the op even when x is not tracked; its gradient is parked like the
    // others, not returned.
    graft_anchored("decoder-layer", x, anchor.as_ref(), out, Box::new(backward))
}

/// One projection as the op reads it: frozen weight and bias, LoRA pair, module name (which keys
/// its dropout draws).
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

    /// This step's dropout mask for `rows` inputs (drawn again in the backward: same key, same
    /// mask), or None.
    fn mask(&self, rows: usize, key: Option<u64>) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(lora) => lora.dropout_mask(&self.name, rows, key),
            None => Ok(None),
        }
    }

    /// x: [n, in] -> ([n, out], the LoRA branch's hidden)
    fn forward(&self, x: &Tensor, key: Option<u64>) -> Result<(Tensor, Option<LoraHidden>)> {
        let Some(lora) = &self.lora else {
            return Ok((dense(x, &self.weight.dense()?, self.bias.as_ref())?, None));
        };
        let base = LoraBase {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            dropout_mask: self.mask(x.dim(0)?, key)?,
        };
        // Detached: nothing the op computes may enter candle's graph (the gradients it parks would
        // otherwise carry this step's graph into the optimizer state).
        let (out, hidden) = lora_rows(
            x,
            &base,
            &lora.a.as_tensor().detach(),
            &lora.b.as_tensor().detach(),
            lora.scale,
        )?;
        Ok((out.into_tensor()?, Some(hidden)))
    }
}

/// The gradient of one projection's output and what its forward saved.
struct Back<'a> {
    proj: &'a Proj,
    g: &'a Tensor,
    hidden: Option<&'a LoraHidden>,
}

/// Backward of the projections that read one input `x: [n, in]`: parks their LoRA gradients and
/// returns the gradient of `x` when asked for.
fn backward_projections(
    parts: &[Back<'_>],
    x: &Tensor,
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
        let mask = part.proj.mask(rows, key)?;
        let lora_in = lora_input(x, mask.as_ref())?;
        let b = lora.b.as_tensor().detach();
        let (grad_hidden, grad_a, grad_b) =
            lora_weight_grads(part.g, &lora_in, (hidden, &b), lora.scale, (true, true))?;
        if let (Some(ga), Some(gb)) = (grad_a, grad_b) {
            park(lora.a.as_tensor(), ga);
            park(lora.b.as_tensor(), gb);
        }
        lora_terms.push(Some((grad_hidden, mask)));
    }
    if !needs_x {
        return Ok(None);
    }
    let a: Vec<Option<Tensor>> = parts
        .iter()
        .map(|part| part.proj.lora.as_ref().map(|l| l.a.as_tensor().detach()))
        .collect();
    let shares: Vec<InputShare<'_>> = parts
        .iter()
        .zip(lora_terms.iter().zip(&a))
        .map(|(part, (term, a))| InputShare {
            g: part.g,
            weight: &part.proj.weight,
            lora: match (term, a) {
                (Some((grad_hidden, mask)), Some(a)) => Some((grad_hidden, a, mask.as_ref())),
                _ => None,
            },
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
        tensor(rms_norm_cpu(x, &self.weight, None, self.eps)?, x.dims())
    }

    /// The gradient of x for the output gradient g (both like x).
    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        tensor(rms_norm_cpu(x, &self.weight, Some(g), self.eps)?, x.dims())
    }
}

/// Everything the op reads besides its input, shared by forward and backward.
struct LayerPlan {
    /// q, k, v, o, gate, up, down.
    projs: Vec<Proj>,
    input_norm: NormPlan,
    post_norm: NormPlan,
    q_norm: Option<NormPlan>,
    k_norm: Option<NormPlan>,
    dims: Dims,
    use_rope: bool,
    scale: f32,
    mask: AttentionMask,
    cos: Tensor,
    sin: Tensor,
    key: Option<u64>,
}

/// What the forward keeps for the backward (the layer input is the op's own graph input).
struct Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    lse: Vec<f32>,
    resid: Tensor,
    gate: Tensor,
    up: Tensor,
    hidden: Vec<Option<LoraHidden>>,
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

impl LayerPlan {
    fn new(layer: &DecoderLayer, ctx: &ForwardContext<'_>, (b, t): (usize, usize)) -> Result<Self> {
        let attn = &layer.self_attn;
        Ok(LayerPlan {
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
            scale: (1.0 / (attn.head_dim as f64).sqrt()) as f32,
            mask: ctx.mask.clone(),
            cos: ctx.cos.clone(),
            sin: ctx.sin.clone(),
            key: ctx.dropout_key,
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
    fn unrotated(&self, x: &Tensor, g: Vec<f32>, norm: Option<&NormPlan>) -> Result<Tensor> {
        let Dims { b, t_q, d, .. } = self.dims;
        let x = x.reshape((b, t_q, (), d))?;
        let mut g = tensor(g, x.dims())?;
        if self.use_rope {
            g = rotate_tokens(&g, &self.cos, &self.sin, true)?;
        }
        if let Some(n) = norm {
            g = n.backward(&x, &g)?;
        }
        g.reshape(((), x.dim(2)? * d))
    }

    /// x: [n, hidden] -> (the output's elements, what the backward keeps)
    fn forward(&self, x: &Tensor) -> Result<(Vec<f32>, Saved)> {
        let p = &self.projs;
        let key = self.key;
        let mut hidden: Vec<Option<LoraHidden>> = Vec::with_capacity(p.len());
        let mut project = |i: usize, x: &Tensor| -> Result<Tensor> {
            let (y, h) = p[i].forward(x, key)?;
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
            let held = [Held::new(&q_rot)?, Held::new(&k_rot)?, Held::new(&v)?];
            let (out, lse) = flash::forward(
                held[0].slice()?,
                held[1].slice()?,
                held[2].slice()?,
                self.dims,
                &self.mask,
                self.scale,
            );
            (
                lse,
                tensor(out, &[x.dim(0)?, self.dims.heads * self.dims.d])?,
            )
        };
        let o = project(O, &attn)?;
        let resid = tensor(sum_cpu(x, &o)?, x.dims())?;
        drop(o);
        let normed = self.post_norm.forward(&resid)?;
        let gate = project(GATE, &normed)?;
        let up = project(UP, &normed)?;
        drop(normed);
        let act = swiglu_forward_cpu(&gate, &up)?.into_tensor()?;
        let down = project(DOWN, &act)?;
        drop(act);
        let out = sum_cpu(&resid, &down)?;
        let saved = Saved {
            q,
            k,
            v,
            attn,
            lse,
            resid,
            gate,
            up,
            hidden,
        };
        Ok((out, saved))
    }

    /// Projection `i`'s share of a backward: its output gradient g and its saved hidden.
    fn part<'a>(&'a self, s: &'a Saved, i: usize, g: &'a Tensor) -> Back<'a> {
        Back {
            proj: &self.projs[i],
            g,
            hidden: s.hidden[i].as_ref(),
        }
    }

    /// The gradient of the layer input x `[n, hidden]` for the output gradient g (when
    /// `needs_x`); every LoRA gradient is parked.
    fn backward(&self, s: &Saved, x: &Tensor, g: &Tensor, needs_x: bool) -> Result<Option<Tensor>> {
        let key = self.key;
        // MLP: down, SwiGLU, gate and up, the post-attention norm.
        let grad_resid = {
            let act = swiglu_forward_cpu(&s.gate, &s.up)?.into_tensor()?;
            let grad_act = backward_projections(&[self.part(s, DOWN, g)], &act, key, true)?
                .ok_or_else(|| candle_core::Error::Msg("no gradient for the MLP".into()))?;
            drop(act);
            let (grad_gate, grad_up) = swiglu_backward_cpu(&s.gate, &s.up, &grad_act)?;
            drop(grad_act);
            let normed = self.post_norm.forward(&s.resid)?;
            let grad_normed = backward_projections(
                &[self.part(s, GATE, &grad_gate), self.part(s, UP, &grad_up)],
                &normed,
                key,
                true,
            )?
            .ok_or_else(|| candle_core::Error::Msg("no gradient for the MLP input".into()))?;
            let through_norm = self.post_norm.backward(&s.resid, &grad_normed)?;
            tensor(sum_cpu(g, &through_norm)?, g.dims())?
        };
        // Attention: o_proj, flash attention, RoPE and q/k norms, q/k/v, the input norm.
        let grad_attn = backward_projections(&[self.part(s, O, &grad_resid)], &s.attn, key, true)?
            .ok_or_else(|| candle_core::Error::Msg("no gradient for attention".into()))?
            .contiguous()?;
        let (dq, dk, dv) = {
            let q_rot = self.rotated(&s.q, self.q_norm.as_ref())?;
            let k_rot = self.rotated(&s.k, self.k_norm.as_ref())?;
            let held = [
                Held::new(&q_rot)?,
                Held::new(&k_rot)?,
                Held::new(&s.v)?,
                Held::new(&s.attn)?,
                Held::new(&grad_attn)?,
            ];
            let [q, k, v, out, ga] = [0, 1, 2, 3, 4].map(|i| held[i].slice());
            flash::backward(
                flash::Saved {
                    q: q?,
                    k: k?,
                    v: v?,
                    out: out?,
                    lse: &s.lse,
                },
                ga?,
                self.dims,
                &self.mask,
                self.scale,
            )
        };
        drop(grad_attn);
        let dq = self.unrotated(&s.q, dq, self.q_norm.as_ref())?;
        let dk = self.unrotated(&s.k, dk, self.k_norm.as_ref())?;
        let dv = tensor(dv, s.v.dims())?;
        let normed = self.input_norm.forward(x)?;
        let grad_normed = backward_projections(
            &[
                self.part(s, Q, &dq),
                self.part(s, K, &dk),
                self.part(s, V, &dv),
            ],
            &normed,
            key,
            needs_x,
        )?;
        match grad_normed {
            Some(gn) => {
                let through_norm = self.input_norm.backward(x, &gn)?;
                Ok(Some(tensor(
                    sum_cpu(&grad_resid, &through_norm)?,
                    x.dims(),
                )?))
            }
            None => Ok(None),
        }
    }
}
