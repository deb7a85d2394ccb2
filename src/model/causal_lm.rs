//! The decoder-only causal language model: embedding, decoder layers, final norm, LM head.

use super::bnb;
use super::config::ModelConfig;
use super::layers::{
    Attention, DecoderLayer, ForwardContext, KvCache, Linear, LinearWeight, Mlp, Moe, Norm,
};
use super::param::Param;
use super::selective::{self, checkpointed_stack, stack_applies};
use super::tokens::{SavedModules, TrainableTokens};
use super::weights::Weights;
use crate::data::Batch;
use crate::ops::attention::AttentionMask;
use crate::ops::checkpoint::checkpoint;
use crate::ops::cross_entropy::{lm_head_loss, LossKind, LossOutput, LossTargets};
use crate::ops::graft::grad_enabled;
use crate::ops::linear::dense;
use crate::ops::lora::MAGNITUDE;
use crate::ops::rope::{RopeScaling, RotaryEmbedding};
use crate::ops::router::RouterLoss;
use crate::quant::{gguf, QuantScheme, QuantizedData, QuantizedWeight};
use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

/// A causal LM of one of the supported families.
#[derive(Debug, Clone)]
pub struct CausalLm {
    /// The model's config.json.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Param,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: Norm,
    /// LM head `[vocab, hidden]`; None when tied to the embedding.
    pub lm_head: Option<Param>,
    /// Vocabulary rows that train on their own (new tokens of a chat-format setup).
    pub trainable_tokens: Option<TrainableTokens>,
    /// Trained full copies of the embedding and the LM head (PEFT's `modules_to_save`).
    pub saved_modules: SavedModules,
    /// The rotary embeddings the layers use (one, or Gemma 3's local and global ones).
    ropes: Vec<RotaryEmbedding>,
    /// Which of `ropes` each layer uses.
    layer_ropes: Vec<usize>,
    /// Compute dtype.
    pub dtype: DType,
    /// Device holding the weights.
    pub device: Device,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations. With
    /// a frozen base and selective
    /// checkpointing on, the decoder stack runs as one op that keeps only the layer inputs (in
    /// host memory with `offload_activations` on an accelerator) and runs each MLP by chunks of
    /// rows (see [`super::selective`]).
    pub gradient_checkpointing: bool,
    /// The token loss the model's loss functions compute (TRL's `loss_type`).
    pub loss_kind: LossKind,
    /// NEFTune's alpha: noise on the input embeddings in training forwards (those with a
    /// dropout key), as transformers' `neftune_noise_alpha`; None adds none.
    pub neftune_noise_alpha: Option<f64>,
    /// Rows per MLP chunk under gradient checkpointing; 0 (the default) picks
    /// [`crate::ops::layer::mlp_chunk_rows`] of the intermediate size.
    pub checkpoint_chunk_rows: usize,
    /// Run each LoRA/QLoRA decoder layer as one op that keeps only what its backward needs and
    /// recomputes the elementwise rest (on by default; see [`super::selective`]). Either way
    /// `loss.backward()` returns every trainable tensor's gradient.
    pub selective_checkpointing: bool,
    /// With selective checkpointing, keep each layer's saved tensors in host memory until the
    /// backward (`--offload-activations`; what the model holds on an accelerator shrinks to one
    /// layer's), with gradient checkpointing each layer's input. Also runs the one-op layers off
    /// the CPU, with candle's kernels.
    pub offload_activations: bool,
    /// The weight of the mixture-of-experts routers' load-balancing loss in [`CausalLm::loss`]
    /// (transformers' `router_aux_loss_coef`, added when its config has `output_router_logits`;
    /// the trainer sets it as TRL does). 0 leaves the loss out.
    pub router_aux_loss_coef: f64,
}

/// Where a tensor loads from and whether it trains.
struct Loader<'a> {
    weights: &'a Weights,
    trainable: bool,
    quantize: Option<QuantScheme>,
    dtype: DType,
    device: &'a Device,
    /// What the norms add to their weight (Gemma: 1).
    norm_offset: f64,
    /// The model's config (where a wrapper's text model is stored).
    config: &'a ModelConfig,
}

impl Loader<'_> {
    /// The name a module path's tensor has in the weights: itself, or where a multimodal
    /// wrapper's checkpoint stores it (`language_model.model.*`).
    fn stored(&self, name: &str) -> String {
        match self.weights.contains(name) {
            true => name.to_string(),
            false => self.config.stored_name(name),
        }
    }

    fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        let t = self
            .weights
            .get(&self.stored(name), shape, self.dtype, self.device)?;
        Ok(Param::new(t, self.trainable)?)
    }

    /// A decoder linear's weight: read pre-quantized (bitsandbytes 4-bit), quantized as it loads
    /// (one tensor at a time, so the full-precision model never exists), or dense.
    fn linear_weight(&self, name: &str, in_f: usize, out_f: usize) -> Result<LinearWeight> {
        let name = &self.stored(name);
        if let Some(gguf) = self.weights.gguf() {
            let q = gguf.tensor(name, self.device)?;
            if q.shape().dims() != [out_f, in_f] {
                return Err(crate::Error::Tensor {
                    name: name.into(),
                    message: format!(
                        "has shape {:?} in {}, the metadata implies [{out_f}, {in_f}]",
                        q.shape().dims(),
                        gguf.path().display()
                    ),
                });
            }
            if !gguf::is_float(q.dtype()) {
                let q = QuantizedWeight {
                    shape: (out_f, in_f),
                    data: QuantizedData::Gguf(Arc::new(q)),
                    dtype: self.dtype,
                };
                return Ok(LinearWeight::Quantized(Arc::new(q)));
            }
        }
        if bnb::is_four_bit(self.weights, name) {
            let q = bnb::read_four_bit(self.weights, name, (out_f, in_f), self.dtype, self.device)?;
            return Ok(LinearWeight::Quantized(Arc::new(q)));
        }
        match self.quantize {
            Some(scheme) => {
                let full = self
                    .weights
                    .get_stored(name, &[out_f, in_f], &Device::Cpu)?;
                let q = QuantizedWeight::quantize(&full, scheme, self.dtype, self.device)?;
                Ok(LinearWeight::Quantized(Arc::new(q)))
            }
            None => Ok(LinearWeight::Dense(self.param(name, &[out_f, in_f])?)),
        }
    }

    fn linear(&self, name: &str, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            name: name.to_string(),
            weight: self.linear_weight(&format!("{name}.weight"), in_f, out_f)?,
            bias: if bias {
                Some(self.param(&format!("{name}.bias"), &[out_f])?)
            } else {
                None
            },
            lora: None,
        })
    }

    fn norm(&self, name: &str, d: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            name: name.to_string(),
            weight: self.param(&format!("{name}.weight"), &[d])?,
            eps,
            offset: self.norm_offset,
        })
    }
}

impl CausalLm {
    /// Builds the model from its config and weights. With `trainable`, every weight is a `Var`
    /// (full fine-tuning); otherwise all are frozen (LoRA trains adapters injected later).
    pub fn load(
        config: ModelConfig,
        weights: &Weights,
        trainable: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_quantized(config, weights, trainable, None, dtype, device)
    }

    /// Like [`CausalLm::load`], quantizing the decoder's linear weights with `quantize` as they
    /// load (embeddings, norms and the LM head stay full precision, as transformers + bitsandbytes
    /// do). Weights stored pre-quantized by bitsandbytes are read as they are, with or without it.
    pub fn load_quantized(
        config: ModelConfig,
        weights: &Weights,
        trainable: bool,
        quantize: Option<QuantScheme>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.family()?;
        if trainable && (quantize.is_some() || weights.names().any(|n| n.contains(".quant_state.")))
        {
            return Err(crate::Error::Config(
                "full fine-tuning needs full-precision weights: use --lora, or --qlora to train \
                 adapters over a quantized base"
                    .into(),
            ));
        }
        let l = Loader {
            weights,
            trainable,
            quantize,
            dtype,
            device,
            norm_offset: config.norm_offset(),
            config: &config,
        };
        let activation = config.activation().ok_or_else(|| {
            crate::Error::Config(format!(
                "the MLP activation of {} is not supported",
                config.model_type
            ))
        })?;
        let (h, hd) = (config.hidden_size, config.head_dim());
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        let eps = config.rms_norm_eps;
        let prefix = config.module_prefix();
        let embed_tokens = l.param(
            &format!("{prefix}.embed_tokens.weight"),
            &[config.vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("{prefix}.layers.{i}");
            let qk_norm = config.qk_norm();
            let moe_spec = config.layer_moe(i);
            // A mixture-of-experts layer's linears are the attention's four.
            let own = if moe_spec.is_some() { 4 } else { usize::MAX };
            let linears = config
                .layer_linears()
                .into_iter()
                .take(own)
                .map(|(name, in_f, out_f, bias)| {
                    l.linear(&format!("{p}.{name}"), in_f, out_f, bias)
                })
                .collect::<Result<Vec<_>>>()?;
            let moe = match moe_spec {
                None => None,
                Some(spec) => {
                    let [router, list, gate, up, down] = spec.names;
                    let router_name = format!("{p}.{router}");
                    let router_weight = l.weights.get(
                        &l.stored(&format!("{router_name}.weight")),
                        &[spec.experts, h],
                        dtype,
                        device,
                    )?;
                    let experts = (0..spec.experts)
                        .map(|e| -> Result<[Linear; 3]> {
                            let at = |m: &str| format!("{p}.{list}.{e}.{m}");
                            let i = spec.intermediate;
                            Ok([
                                l.linear(&at(gate), h, i, false)?,
                                l.linear(&at(up), h, i, false)?,
                                l.linear(&at(down), i, h, false)?,
                            ])
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Some(Moe {
                        name: router_name,
                        router: Param::new(router_weight, l.trainable)?,
                        experts,
                        top_k: spec.top_k,
                        normalize: spec.normalize,
                        activation,
                        lora: Default::default(),
                        peft_path: format!("{p}.mlp"),
                    })
                }
            };
            let self_attn = Attention {
                q_norm: qk_norm
                    .then(|| l.norm(&format!("{p}.self_attn.q_norm"), hd, eps))
                    .transpose()?,
                k_norm: qk_norm
                    .then(|| l.norm(&format!("{p}.self_attn.k_norm"), hd, eps))
                    .transpose()?,
                heads,
                kv_heads: kv,
                head_dim: hd,
                use_rope: config.layer_uses_rope(i),
                scores: config.attention_scores(),
            };
            let mlp = Mlp {
                activation,
                intermediate: config.intermediate_size,
            };
            // Gemma 2/3 normalise the attention output with `post_attention_layernorm`; their
            // norm before the MLP is `pre_feedforward_layernorm`.
            let output_norms = config.output_norms();
            let pre_mlp = match output_norms {
                true => "pre_feedforward_layernorm",
                false => "post_attention_layernorm",
            };
            let output_norms = output_norms
                .then(|| -> Result<(Norm, Norm)> {
                    Ok((
                        l.norm(&format!("{p}.post_attention_layernorm"), h, eps)?,
                        l.norm(&format!("{p}.post_feedforward_layernorm"), h, eps)?,
                    ))
                })
                .transpose()?;
            layers.push(DecoderLayer {
                input_layernorm: l.norm(&format!("{p}.input_layernorm"), h, eps)?,
                self_attn,
                post_attention_layernorm: l.norm(&format!("{p}.{pre_mlp}"), h, eps)?,
                mlp,
                output_norms,
                linears,
                layout: config.layout(),
                moe,
            });
        }
        let norm = l.norm(&format!("{prefix}.norm"), h, eps)?;
        // Some tied checkpoints also store lm_head.weight; the tie decides.
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(l.param("lm_head.weight", &[config.vocab_size, h])?)
        };
        // One rotary embedding per distinct (base, scaling) among the layers.
        let mut kinds: Vec<(f64, RopeScaling)> = Vec::new();
        let mut layer_ropes = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let kind = config.layer_rope(i)?;
            let at = match kinds.iter().position(|k| *k == kind) {
                Some(at) => at,
                None => {
                    kinds.push(kind);
                    kinds.len() - 1
                }
            };
            layer_ropes.push(at);
        }
        let ropes = kinds
            .iter()
            .map(|(theta, scaling)| RotaryEmbedding::new(config.rotary_dim(), *theta, scaling))
            .collect();
        let router_aux_loss_coef = config.default_router_aux_loss_coef();
        Ok(CausalLm {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            trainable_tokens: None,
            saved_modules: SavedModules::default(),
            ropes,
            layer_ropes,
            dtype,
            device: device.clone(),
            gradient_checkpointing: false,
            loss_kind: LossKind::Nll,
            neftune_noise_alpha: None,
            checkpoint_chunk_rows: 0,
            selective_checkpointing: true,
            offload_activations: false,
            router_aux_loss_coef,
        })
    }

    /// Runs the decoder. `positions` has one row (shared) or one row per batch element; `documents`
    /// (packed rows) keeps attention within each document; `offset` and `caches` serve generation.
    ///
    /// input_ids: [b, t] -> hidden states [b, t, hidden]
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &[Vec<u32>],
        documents: Option<&[Vec<u32>]>,
        dropout_key: Option<u64>,
        mut caches: Option<&mut [KvCache]>,
        router: Option<&RouterLoss>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let offset = positions
            .first()
            .and_then(|p| p.first())
            .copied()
            .unwrap_or(0) as usize;
        let offset = if caches.is_some() { offset } else { 0 };
        // One mask per distinct window (full attention, sliding window), shared by the layers.
        let windows: Vec<Option<usize>> = (0..self.layers.len())
            .map(|i| self.config.layer_window(i))
            .collect();
        let mut masks: Vec<(Option<usize>, AttentionMask)> = Vec::new();
        for w in &windows {
            if !masks.iter().any(|(m, _)| m == w) {
                let mask = AttentionMask::new(t, offset, *w, documents, self.dtype, &self.device)?;
                masks.push((*w, mask));
            }
        }
        let tables = self
            .ropes
            .iter()
            .map(|rope| rope.tables(positions, self.dtype, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ids = input_ids.flatten_all()?;
        let mut x = self.embed(&ids)?.reshape((b, t, self.config.hidden_size))?;
        if let Some(scale) = self.config.embed_scale() {
            // As transformers: the factor in the compute dtype, times the embeddings.
            x = x.affine(scale, 0.0)?;
        }
        if let (Some(alpha), Some(key)) = (self.neftune_noise_alpha, dropout_key) {
            x = crate::ops::noise::neftune(&x, alpha, key)?;
        }
        let mut contexts = Vec::with_capacity(self.layers.len());
        for (w, &rope) in windows.iter().zip(&self.layer_ropes) {
            let mask = masks.iter().find(|(m, _)| m == w).map(|(_, m)| m);
            let (cos, sin) = &tables[rope];
            contexts.push(ForwardContext {
                mask: mask.ok_or_else(|| candle_core::Error::Msg("no attention mask".into()))?,
                cos,
                sin,
                dropout_key,
                selective: self.selective_checkpointing,
                offload: self.offload_activations,
                router,
            });
        }
        let checkpointing = self.gradient_checkpointing && caches.is_none() && grad_enabled();
        if checkpointing && self.selective_checkpointing && stack_applies(&self.layers) {
            let x = checkpointed_stack(
                &self.layers,
                &x,
                &contexts,
                self.offload_activations,
                self.checkpoint_chunk_rows,
            )?;
            return Ok(self.norm.forward(&x)?);
        }
        for (i, (layer, ctx)) in self.layers.iter().zip(&contexts).enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = if checkpointing {
                let layer = layer.clone();
                let (mask, cos, sin) = (ctx.mask.clone(), ctx.cos.clone(), ctx.sin.clone());
                let (selective, offload) = (ctx.selective, ctx.offload);
                let router = ctx.router.cloned();
                checkpoint(&x, layer.trainable_vars(), move |h| {
                    let ctx = ForwardContext {
                        mask: &mask,
                        cos: &cos,
                        sin: &sin,
                        dropout_key,
                        selective,
                        offload,
                        router: router.as_ref(),
                    };
                    layer_forward(&layer, h, &ctx, None)
                })?
            } else {
                layer_forward(layer, &x, ctx, cache)?
            };
        }
        Ok(self.norm.forward(&x)?)
    }

    /// LongRoPE's original context: sequences longer than this rotate with the long frequencies
    /// (so keys cached before a sequence grows past it no longer fit).
    pub fn rope_long_from(&self) -> Option<usize> {
        self.ropes
            .iter()
            .filter_map(RotaryEmbedding::long_from)
            .min()
    }

    /// Logits of hidden states (soft-capped where the model caps them), outside autograd.
    /// hidden: [.., h] -> [.., vocab]
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits =
            dense(&hidden.detach(), &self.head_weight()?.detach(), None)?.to_dtype(DType::F32)?;
        Ok(match self.config.final_softcap() {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// Logits for a batch of unpadded sequences, positions 0..t (evaluation, parity checks).
    /// input_ids: [b, t] -> [b, t, vocab]
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        crate::ops::graft::without_grad(|| {
            let positions = [(0..t as u32).collect()];
            let hidden = self.forward_hidden(input_ids, &positions, None, None, None, None)?;
            self.logits(&hidden)
        })
    }

    /// Loss over a batch: summed cross-entropy of the targets the shifted `loss_mask` selects, with
    /// positions and document boundaries from the batch (packed batches).
    pub fn batch_loss(&self, batch: &Batch, dropout_key: Option<u64>) -> Result<LossOutput> {
        self.loss_with(
            &batch.input_ids,
            &batch.loss_mask,
            &batch.attention_mask,
            &batch.positions,
            batch.documents.as_deref(),
            dropout_key,
        )
    }

    /// The summed next-token cross-entropy of a padded batch: position i predicts token i + 1
    /// where `loss_mask[i + 1]` is 1; entropy is averaged over attended positions, as TRL does.
    ///
    /// input_ids: [b, t] u32, loss_mask and attention_mask: [b, t] f32
    pub fn loss(
        &self,
        input_ids: &Tensor,
        loss_mask: &Tensor,
        attention_mask: &Tensor,
        dropout_key: Option<u64>,
    ) -> Result<LossOutput> {
        let t = input_ids.dim(1)?;
        let positions = [(0..t as u32).collect()];
        self.loss_with(
            input_ids,
            loss_mask,
            attention_mask,
            &positions,
            None,
            dropout_key,
        )
    }

    /// [`CausalLm::loss`] with explicit RoPE positions (one shared row or one per row) and
    /// per-token document ids (attention stays within a document).
    pub fn loss_with(
        &self,
        input_ids: &Tensor,
        loss_mask: &Tensor,
        attention_mask: &Tensor,
        positions: &[Vec<u32>],
        documents: Option<&[Vec<u32>]>,
        dropout_key: Option<u64>,
    ) -> Result<LossOutput> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_vec2::<u32>()?;
        let loss_mask = loss_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let attention = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut targets = LossTargets {
            target_ids: Vec::with_capacity(b * t),
            loss_weight: Vec::with_capacity(b * t),
            entropy_weight: Vec::with_capacity(b * t),
            kind: self.loss_kind,
            softcap: self.config.final_softcap(),
        };
        for row in 0..b {
            for i in 0..t {
                let next = i + 1 < t;
                targets
                    .target_ids
                    .push(if next { ids[row][i + 1] } else { 0 });
                targets
                    .loss_weight
                    .push(if next { loss_mask[row][i + 1] } else { 0.0 });
                targets.entropy_weight.push(attention[row][i]);
            }
        }
        // The routers' load-balancing loss over the attended tokens, as transformers masks it.
        let router = (self.router_aux_loss_coef != 0.0 && self.config.is_moe())
            .then(|| RouterLoss::new(self.router_aux_loss_coef, attention.concat()));
        let hidden = self.forward_hidden(
            input_ids,
            positions,
            documents,
            dropout_key,
            None,
            router.as_ref(),
        )?;
        let hidden = hidden.reshape((b * t, self.config.hidden_size))?;
        let mut out = lm_head_loss(&hidden, &self.head_weight()?, &targets)?;
        out.router = router;
        Ok(out)
    }

    /// Every linear module of the base, the experts of mixture-of-experts layers included (what
    /// quantization, dequantization and saving cover; [`Self::linears`] are the LoRA targets).
    pub fn base_linears(&self) -> Vec<&Linear> {
        let mut out = self.linears();
        for layer in &self.layers {
            out.extend(layer.moe.iter().flat_map(|m| m.linears()));
        }
        out
    }

    /// Mutable access to [`Self::base_linears`].
    pub fn base_linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            let DecoderLayer { linears, moe, .. } = layer;
            out.extend(linears.iter_mut());
            out.extend(moe.iter_mut().flat_map(|m| m.linears_mut()));
        }
        out
    }

    /// Every linear module (decoder layers only; the LM head is not a LoRA target, nor are the
    /// experts of a mixture of experts, which PEFT's `all-linear` does not select either).
    pub fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }

    /// Mutable access to every linear module.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect()
    }

    /// Every full-precision base weight with its HF name (for saving a full or merged model);
    /// quantized linear weights are not listed (see [`CausalLm::dequantize`]).
    pub fn named_weights(&self) -> Vec<(String, &Param)> {
        let prefix = self.config.module_prefix();
        let mut out = vec![(format!("{prefix}.embed_tokens.weight"), &self.embed_tokens)];
        for layer in &self.layers {
            for lin in layer.linears() {
                if let Some(w) = lin.weight.param() {
                    out.push((format!("{}.weight", lin.name), w));
                }
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.name), b));
                }
            }
            for n in layer.norms() {
                out.push((format!("{}.weight", n.name), &n.weight));
            }
            if let Some(moe) = &layer.moe {
                out.push((format!("{}.weight", moe.name), &moe.router));
                for lin in moe.linears() {
                    if let Some(w) = lin.weight.param() {
                        out.push((format!("{}.weight", lin.name), w));
                    }
                }
            }
        }
        out.push((format!("{prefix}.norm.weight"), &self.norm.weight));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }

    /// `(trainable, all)` parameter counts, as PEFT's `print_trainable_parameters` reports them:
    /// every base weight (quantized ones by their logical size) plus what trains beside them
    /// (LoRA pairs, DoRA magnitudes, trained copies and vocabulary rows).
    pub fn parameter_counts(&self) -> (usize, usize) {
        let named = self.named_weights();
        let base: usize = named
            .iter()
            .map(|(_, p)| p.tensor().elem_count())
            .sum::<usize>()
            + self
                .base_linears()
                .iter()
                .filter_map(|l| match &l.weight {
                    LinearWeight::Quantized(q) => Some(q.shape.0 * q.shape.1),
                    LinearWeight::Dense(_) => None,
                })
                .sum::<usize>();
        let base_vars: std::collections::HashSet<_> = named
            .iter()
            .filter_map(|(_, p)| p.var().map(|v| v.as_tensor().id()))
            .collect();
        let trainable = self.trainable();
        let count =
            |vars: &[(String, Var)]| vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>();
        let beside: Vec<(String, Var)> = trainable
            .iter()
            .filter(|(_, v)| !base_vars.contains(&v.as_tensor().id()))
            .cloned()
            .collect();
        (count(&trainable), base + count(&beside))
    }

    /// Names of the linear modules whose weight is quantized.
    pub fn quantized_modules(&self) -> Vec<String> {
        self.base_linears()
            .into_iter()
            .filter(|l| matches!(l.weight, LinearWeight::Quantized(_)))
            .map(|l| l.name.clone())
            .collect()
    }

    /// Replaces every quantized linear weight by its dequantized full-precision value (frozen).
    pub fn dequantize(&mut self) -> Result<usize> {
        let mut n = 0;
        for lin in self.base_linears_mut() {
            if let LinearWeight::Quantized(q) = &lin.weight {
                lin.weight = LinearWeight::Dense(Param::Frozen(q.dequantize()?));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every trainable tensor with its name: base weights when fully fine-tuning, plus LoRA pairs.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .named_weights()
            .into_iter()
            .filter_map(|(n, p)| p.var().map(|v| (n, v.clone())))
            .collect();
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((format!("{}.lora_A.weight", lin.name), l.a.clone()));
                out.push((format!("{}.lora_B.weight", lin.name), l.b.clone()));
                if let Some(dora) = &l.dora {
                    let name = format!("{}.{MAGNITUDE}", lin.name);
                    out.push((name, dora.magnitude.clone()));
                }
            }
        }
        for layer in &self.layers {
            out.extend(layer.moe.iter().flat_map(|m| m.lora_vars()));
        }
        out.extend(self.trainable_token_tensors());
        out.extend(self.saved_module_tensors());
        out
    }
}

/// One decoder layer: as one op (selective checkpointing, [`super::selective`]) when it applies,
/// else op by op. x: [b, t, hidden] -> [b, t, hidden]
fn layer_forward(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &ForwardContext<'_>,
    cache: Option<&mut KvCache>,
) -> candle_core::Result<Tensor> {
    if ctx.selective && cache.is_none() && selective::applies(layer, x, ctx.mask, ctx.offload)? {
        return selective::forward(layer, x, ctx);
    }
    layer.forward(x, ctx, cache)
}
