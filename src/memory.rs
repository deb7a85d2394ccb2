//! Memory planner: predicts the peak memory of a training step (CPU RSS, or one accelerator's
//! memory: the same model runs per device) from `config.json` and the training options, by counting
//! what this implementation holds — base weights, trainable state, the tensors each decoder layer
//! keeps for the backward pass, the largest transient buffers, and a fixed process baseline.
//!
//! The counts follow the code: `model/layers.rs` for the layer's dataflow and `ops/*.rs` for what
//! each op's backward captures; the kernels' block and chunk sizes are theirs (`ops::attention::
//! BLOCK`, `ops::cross_entropy::chunk_rows`), not copies. Everything is in the compute dtype
//! except the LoRA weights and their gradients, AdamW's moments and the loss chunks' logits (f32). On the CPU in f32 the ops run native kernels (flash attention,
//! one-buffer linears, SwiGLU, RMSNorm and loss chunks) that keep and allocate less than the
//! candle-op kernels every other device and dtype runs; the counts follow each.

use crate::lora::target::select;
use crate::lora::TargetModules;
use crate::model::ModelConfig;
use crate::ops::attention::{BLOCK as ATTENTION_BLOCK, KEEP_PROBABILITIES_BYTES};
use crate::ops::cross_entropy::chunk_rows as loss_chunk_rows;
use crate::ops::kernel::Kernel;
use crate::{Error, Result};
use candle_core::DType;
use std::collections::HashSet;

const MIB: u64 = 1 << 20;

/// The `peft-sft train` process on CPU without its model: binary, allocator arenas, threads,
/// dataset and a tiny tokenizer — the peak RSS of a LoRA run on the 400-token fixture model (release
/// build, benches/README.md "Memory planner").
pub const CPU_PROCESS_BYTES: u64 = 26 * MIB;

/// Resident bytes of a loaded `tokenizer.json` per vocabulary entry (vocabulary, merges and their
/// maps): 56 MiB measured for a 49,152-entry byte-level BPE.
pub const TOKENIZER_BYTES_PER_ENTRY: u64 = 1200;

/// The CPU baseline of a training run of `c`: the process plus its tokenizer.
pub fn cpu_baseline_bytes(c: &ModelConfig) -> u64 {
    CPU_PROCESS_BYTES + TOKENIZER_BYTES_PER_ENTRY * c.vocab_size as u64
}

/// The process baseline on a CUDA device: context, module images and cuBLAS workspace. An
/// assumption (not measured on candle): CUDA contexts of recent drivers take 300–600 MiB.
pub const CUDA_BASELINE_BYTES: u64 = 512 * MIB;

/// Key chunks per head of the CPU flash backward (`ops/flash.rs`, `backward`): each chunk is a task
/// writing its own dQ part.
fn flash_key_chunks(batch_heads: usize, t_k: usize, threads: usize) -> u64 {
    crate::ops::cpu::flash::key_chunks(batch_heads, t_k, threads) as u64
}

/// Whether the step runs the native CPU kernels (`ops/cpu/`): flash attention, linears writing
/// one buffer, SwiGLU and RMSNorm in one pass, and loss chunks turned into their gradient in
/// place. The answer is the ops' own dispatch rule ([`Kernel::for_run`]); every other device
/// and dtype runs the candle-op kernels.
fn native_cpu(options: &PlanOptions) -> bool {
    Kernel::for_run(options.device == PlanDevice::Cpu, options.dtype).is_cpu()
}

/// Whether each decoder layer runs as one op that keeps only what its backward needs (selective
/// checkpointing, `model/selective.rs`): the native CPU kernels over a frozen base (LoRA, QLoRA).
fn selective(options: &PlanOptions) -> bool {
    native_cpu(options) && options.method != Method::Full
}

/// Whether the decoder stack runs as one checkpointed op (`model/selective.rs`,
/// `checkpointed_stack`): gradient checkpointing over a frozen base (LoRA, QLoRA), on any device.
/// It keeps the layer inputs (with the native CPU kernels also each layer's attention output and
/// log-sum-exp, which its backward would otherwise recompute), rebuilds one layer at a time in the
/// backward and runs each MLP by chunks of rows.
fn stacked(c: &ModelConfig, options: &PlanOptions) -> bool {
    options.gradient_checkpointing && options.method != Method::Full && !c.is_moe()
}

/// Whether layer `layer` runs as one op ([`selective`]): not a mixture of experts, which runs op
/// by op.
fn one_op(c: &ModelConfig, options: &PlanOptions, layer: usize) -> bool {
    selective(options) && c.layer_moe(layer).is_none()
}

/// Whether PEFT's `all-linear` on a mixture of experts: q/k/v/o of every layer, and the router
/// and the experts through `target_parameters` (`lora::target::inject_with`).
fn moe_all_linear(c: &ModelConfig, options: &PlanOptions) -> bool {
    c.is_moe()
        && options.method != Method::Full
        && options.target_modules == TargetModules::Pattern("all-linear".into())
}

/// The LoRA parameters of one mixture of experts under PEFT's all-linear: the router's pair
/// (`r·hidden + experts·r`), the stacked gate-up pair at rank 2r (`2r·E·(hidden + 2·inter)`) and
/// the down pair (`r·E·(inter + hidden)`).
fn moe_lora_params(c: &ModelConfig, m: &crate::model::config::MoeSpec, r: u64) -> u64 {
    let (h, i, e) = (
        c.hidden_size as u64,
        m.intermediate as u64,
        m.experts as u64,
    );
    r * h + e * r + 2 * r * e * (h + 2 * i) + r * e * (i + h)
}

/// How the model trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// LoRA over a full-precision frozen base.
    Lora,
    /// LoRA over a base whose decoder linears are NF4 with double quantization.
    Qlora,
    /// Every base weight trains (no adapters).
    Full,
}

impl Method {
    /// The name used in tables (`LoRA`, `QLoRA`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "LoRA",
            Method::Qlora => "QLoRA",
            Method::Full => "full",
        }
    }
}

/// Where the step runs. Decides the baseline and how quantized weights dequantize (one host loop
/// on CPU; composed tensor ops, with f32 intermediates, on CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanDevice {
    /// Host memory (RSS).
    Cpu,
    /// One CUDA device's memory.
    Cuda,
}

/// What is trained and how, for one device.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// LoRA, QLoRA or full fine-tuning.
    pub method: Method,
    /// Tokens per row (`--max-length`; rows are padded to the longest in the batch, so the worst
    /// case is a full row).
    pub max_length: usize,
    /// Rows per micro-batch (`--per-device-train-batch-size`).
    pub batch_size: usize,
    /// LoRA rank.
    pub lora_r: usize,
    /// Which linear modules get adapters.
    pub target_modules: TargetModules,
    /// LoRA dropout: when positive each adapted linear keeps a mask and the masked input.
    pub lora_dropout: f64,
    /// DoRA: a magnitude per output row of each adapted linear; each adapted projection's
    /// unscaled output is kept for the magnitude's gradient.
    pub use_dora: bool,
    /// Recompute each decoder layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// `--offload-activations`: with gradient checkpointing on an accelerator, the layer inputs
    /// wait in host memory (the CPU has nothing to move).
    pub offload_activations: bool,
    /// Rows per MLP chunk under gradient checkpointing (`CausalLm::checkpoint_chunk_rows`; 0: the
    /// model's automatic size, `ops::layer::mlp_chunk_rows`).
    pub checkpoint_chunk_rows: usize,
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// CPU or CUDA.
    pub device: PlanDevice,
    /// Fixed process memory (binary, allocator, tokenizer; or the CUDA context).
    pub baseline_bytes: u64,
}

impl PlanOptions {
    /// LoRA r=16 on all linear layers, batch 1, no dropout, f32 on CPU with the process baseline
    /// (no tokenizer: see [`cpu_baseline_bytes`]).
    pub fn new(method: Method, max_length: usize) -> Self {
        PlanOptions {
            method,
            max_length,
            batch_size: 1,
            lora_r: 16,
            target_modules: TargetModules::default(),
            lora_dropout: 0.0,
            use_dora: false,
            gradient_checkpointing: false,
            offload_activations: false,
            checkpoint_chunk_rows: 0,
            dtype: DType::F32,
            device: PlanDevice::Cpu,
            baseline_bytes: CPU_PROCESS_BYTES,
        }
    }
}

/// One moment of the step and what is alive then, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breakdown {
    /// Base model weights (dense, or NF4 + double quantization for QLoRA's linears).
    pub weights: u64,
    /// Trainable parameters (LoRA's A and B, or the whole model's gradients when fully
    /// fine-tuning), their gradients and AdamW's two f32 moments, as far as they exist then.
    pub trainable: u64,
    /// Tensors kept for the backward pass.
    pub activations: u64,
    /// Transient buffers of the moment (loss chunks, backward temporaries, a dequantized weight).
    pub workspace: u64,
    /// Fixed process memory.
    pub baseline: u64,
}

impl Breakdown {
    /// The sum of the parts.
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.activations + self.workspace + self.baseline
    }
}

/// The moments of a step whose memory the planner compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading the weights (each tensor is read, converted or quantized, then kept).
    Load,
    /// The end of the forward pass: every saved activation plus the LM head's loss chunks.
    Loss,
    /// The backward pass: saved activations, gradients and one layer's backward temporaries.
    Backward,
    /// Gradient clipping and the AdamW update (activations are freed by then).
    Optimizer,
}

impl Phase {
    /// Lower-case name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// Parameter counts of a model under a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamCounts {
    /// Every base parameter (embedding, decoder, final norm, untied LM head).
    pub total: u64,
    /// Weights of the decoder's linear layers (what QLoRA quantizes).
    pub linear: u64,
    /// Trainable LoRA parameters (0 when fully fine-tuning).
    pub lora: u64,
    /// Elements of the largest decoder linear weight.
    pub largest_linear: u64,
    /// Elements of the largest base tensor.
    pub largest_tensor: u64,
}

/// The planner's prediction.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// The phase with the highest total.
    pub peak_phase: Phase,
    /// What is alive at the peak.
    pub peak: Breakdown,
    /// Every phase, in step order.
    pub phases: Vec<(Phase, Breakdown)>,
    /// Parameter counts.
    pub params: ParamCounts,
    /// Saved activations of one decoder layer (the first; layers differ only with SmolLM3's
    /// no-RoPE layers or mixed sliding windows); with gradient checkpointing over a frozen base,
    /// what the backward holds for the one layer it rebuilds.
    pub layer_activation_bytes: u64,
    /// Whether attention keeps its `[t, t]` probabilities (small, candle-op kernels) or recomputes
    /// them (blocked kernel, and always the CPU f32 flash kernel).
    pub attention_keeps_probabilities: bool,
}

impl MemoryPlan {
    /// Peak bytes.
    pub fn total(&self) -> u64 {
        self.peak.total()
    }
}

/// Bytes of one NF4 weight of `n` values with double quantization, as `FourBit::bytes` counts
/// them: two codes per byte, one 8-bit absmax code per 64 values, one f32 absmax per 256 codes,
/// the 256-entry f32 code map and the offset. ≈ 0.516 bytes per value.
pub fn nf4_double_quant_bytes(n: u64) -> u64 {
    let blocks = n.div_ceil(64);
    n.div_ceil(2) + blocks + blocks.div_ceil(256) * 4 + 256 * 4 + 4
}

/// The decoder layer's linear modules as `(name, in_features, out_features)`, in the order of
/// `DecoderLayer::linears` (the model's own list, [`ModelConfig::layer_linears`]).
fn linear_shapes(c: &ModelConfig) -> Vec<(&'static str, usize, usize)> {
    c.layer_linears()
        .into_iter()
        .map(|(name, in_f, out_f, _)| (name, in_f, out_f))
        .collect()
}

/// Which of each layer's linears carry an adapter (none when fully fine-tuning).
fn adapted_linears(c: &ModelConfig, options: &PlanOptions) -> Result<Vec<Vec<bool>>> {
    let shapes = linear_shapes(c);
    let per_layer = shapes.len();
    if options.method == Method::Full {
        return Ok(vec![vec![false; per_layer]; c.num_hidden_layers]);
    }
    let names: Vec<String> = (0..c.num_hidden_layers)
        .flat_map(|l| {
            shapes
                .iter()
                .map(move |(n, _, _)| format!("{}.layers.{l}.{n}", c.module_prefix()))
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let attention = c.layout().o();
    let chosen: HashSet<&str> = match moe_all_linear(c, options) {
        true => (0..c.num_hidden_layers)
            .flat_map(|l| (0..=attention).map(move |k| l * per_layer + k))
            .map(|i| refs[i])
            .collect(),
        false => select(&options.target_modules, &refs)?
            .into_iter()
            .collect(),
    };
    // A mixture of experts' layer has the attention's linears only (its experts are adapted
    // through target_parameters, counted apart).
    Ok((0..c.num_hidden_layers)
        .map(|l| {
            (0..per_layer)
                .map(|k| {
                    chosen.contains(&refs[l * per_layer + k])
                        && (k <= attention || c.layer_moe(l).is_none())
                })
                .collect()
        })
        .collect())
}

/// Parameter counts of the base model: its tensors as `CausalLm::load` creates them.
fn base_counts(c: &ModelConfig) -> ParamCounts {
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let layers = c.num_hidden_layers as u64;
    let linear: u64 = (0..c.num_hidden_layers)
        .flat_map(|l| layer_linear_shapes(c, l))
        .map(|(i, o)| i * o)
        .sum();
    // Each router: experts × hidden.
    let routers: u64 = (0..c.num_hidden_layers)
        .filter_map(|l| c.layer_moe(l))
        .map(|m| m.experts as u64 * h)
        .sum();
    let bias_per_layer: u64 = c
        .layer_linears()
        .iter()
        .filter(|(_, _, _, bias)| *bias)
        .map(|(_, _, o, _)| *o as u64)
        .sum();
    let mut norms_per_layer = 2 * h;
    if c.qk_norm() {
        norms_per_layer += 2 * c.head_dim() as u64;
    }
    if c.output_norms() {
        norms_per_layer += 2 * h;
    }
    let embed = v * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    let largest_linear = (0..c.num_hidden_layers)
        .flat_map(|l| layer_linear_shapes(c, l))
        .map(|(i, o)| i * o)
        .max()
        .unwrap_or(0);
    ParamCounts {
        total: embed + linear + routers + layers * (bias_per_layer + norms_per_layer) + h + head,
        linear,
        lora: 0,
        largest_linear,
        largest_tensor: largest_linear.max(embed),
    }
}

/// The `(in, out)` of layer `layer`'s linear weights: the model's list, or for a mixture of
/// experts the attention's and every expert's gate, up and down.
fn layer_linear_shapes(c: &ModelConfig, layer: usize) -> Vec<(u64, u64)> {
    let shapes = linear_shapes(c);
    match c.layer_moe(layer) {
        None => shapes
            .iter()
            .map(|(_, i, o)| (*i as u64, *o as u64))
            .collect(),
        Some(m) => {
            let (h, i) = (c.hidden_size as u64, m.intermediate as u64);
            let mut out: Vec<(u64, u64)> = shapes[..=c.layout().o()]
                .iter()
                .map(|(_, i, o)| (*i as u64, *o as u64))
                .collect();
            for _ in 0..m.experts {
                out.extend([(h, i), (h, i), (i, h)]);
            }
            out
        }
    }
}

/// Parameter counts: the base model's tensors and the LoRA pairs (`r * (in + out)` per adapted
/// linear, and `out` more with DoRA; PEFT's all-linear pairs on mixtures of experts; none when
/// fully fine-tuning).
pub fn param_counts(c: &ModelConfig, options: &PlanOptions) -> Result<ParamCounts> {
    let shapes = linear_shapes(c);
    let r = options.lora_r as u64;
    let lora = adapted_linears(c, options)?
        .iter()
        .flat_map(|adapted| {
            shapes
                .iter()
                .zip(adapted)
                .filter(|(_, &a)| a)
                .map(|((_, i, o), _)| r * (i + o) as u64 + options.use_dora as u64 * *o as u64)
        })
        .sum::<u64>()
        + match moe_all_linear(c, options) {
            true => (0..c.num_hidden_layers)
                .filter_map(|l| c.layer_moe(l))
                .map(|m| moe_lora_params(c, &m, r))
                .sum(),
            false => 0,
        };
    Ok(ParamCounts {
        lora,
        ..base_counts(c)
    })
}

/// Base weight bytes: every tensor in the compute dtype, except QLoRA's decoder linears in NF4
/// with double quantization (embeddings, norms, biases and the LM head stay full precision).
pub fn weight_bytes(c: &ModelConfig, method: Method, dtype: DType) -> u64 {
    let dt = dtype.size_in_bytes() as u64;
    let p = base_counts(c);
    match method {
        Method::Lora | Method::Full => p.total * dt,
        Method::Qlora => {
            let quantized: u64 = (0..c.num_hidden_layers)
                .flat_map(|l| layer_linear_shapes(c, l))
                .map(|(i, o)| nf4_double_quant_bytes(i * o))
                .sum();
            (p.total - p.linear) * dt + quantized
        }
    }
}

/// Sizes of the step, shared by the counting functions.
struct Step<'a> {
    c: &'a ModelConfig,
    o: &'a PlanOptions,
    /// Rows: batch × tokens.
    n: u64,
    /// Compute dtype bytes.
    dt: u64,
}

impl Step<'_> {
    fn heads(&self) -> u64 {
        self.c.num_attention_heads as u64
    }
    fn qd(&self) -> u64 {
        (self.c.num_attention_heads * self.c.head_dim()) as u64
    }
    fn kvd(&self) -> u64 {
        (self.c.kv_heads() * self.c.head_dim()) as u64
    }
    /// Keys one query block of the blocked kernel meets in `layer` (all of them, or the sliding
    /// window plus the block).
    fn block_keys(&self, layer: usize) -> u64 {
        let t = self.o.max_length;
        self.c
            .layer_window(layer)
            .map_or(t, |w| (w + ATTENTION_BLOCK).min(t)) as u64
    }
    /// Bytes of the `[b, heads, t, t]` probabilities the reference kernel would keep.
    fn probability_bytes(&self) -> u64 {
        self.o.batch_size as u64 * self.heads() * (self.o.max_length as u64).pow(2) * self.dt
    }
    /// Whether attention keeps its probabilities (the reference kernel; never the CPU flash one).
    fn keeps_probabilities(&self) -> bool {
        !native_cpu(self.o) && self.probability_bytes() <= KEEP_PROBABILITIES_BYTES as u64
    }

    /// Elements (per row) a decoder layer keeps for the backward pass, beyond its probabilities.
    ///
    /// On the CPU in f32 with a frozen base (LoRA, QLoRA) each layer is one op (selective
    /// checkpointing, `model/selective.rs`) that keeps, per row, its input and the mid-layer
    /// residual (2 × hidden), gate and up (2 × intermediate), q, k and v as projected, the
    /// attention output, an f32 log-sum-exp per head and r per adapted linear.
    ///
    /// Op by op, per row: the layer input, both norm outputs, the o-projection and down-projection outputs,
    /// and the mid-layer residual (6 × hidden); gate, up and their SwiGLU product (3 ×
    /// intermediate), or a mixture of experts' routed tensors ([`Self::mlp_row_elements`]; such
    /// layers always run op by op). On the CPU in f32 attention runs token-major: q as projected and rotated
    /// (2 × q width, plus one for the q-norm of Qwen3 and Gemma 3), k likewise, v as projected, the output (also
    /// o_proj's input) and the flash kernel's per-head f32 log-sum-exp. Elsewhere: q as projected,
    /// made heads-first (a copy) and rotated (3 × q width, plus one for the q-norm of Qwen3 and Gemma 3), k
    /// likewise, v as projected and heads-first; the attention output as returned and as reshaped
    /// for o_proj (2 × q width). The candle-op
    /// kernels keep k and v repeated to the query heads when grouped (2 × q width), and the blocked
    /// one its own copy of the output and the per-head log-sum-exp. Then r per adapted linear (its
    /// `x A^T`), and with dropout the mask and masked input (2 × in).
    fn layer_row_elements(&self, layer: usize, adapted: &[bool]) -> u64 {
        let c = self.c;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (qd, kvd) = (self.qd(), self.kvd());
        let r = self.o.lora_r as u64;
        let adapters = adapted.iter().filter(|&&a| a).count() as u64;
        if one_op(c, self.o, layer) {
            // One op per layer: its input and the mid-layer residual, gate and up, q/k/v as
            // projected, the attention output and its f32 log-sum-exp, r per adapted linear
            // (dropout masks are drawn again in the backward), and with DoRA each adapted
            // projection's unscaled output.
            let dora: u64 = if self.o.use_dora {
                linear_shapes(c)
                    .iter()
                    .zip(adapted)
                    .filter(|(_, &a)| a)
                    .map(|((_, _, o), _)| *o as u64)
                    .sum()
            } else {
                0
            };
            // Gemma 2/3: the o and down outputs, which their norms' backward reads.
            let outputs = 2 * h * u64::from(c.output_norms());
            return 2 * h + 2 * i + 2 * qd + 2 * kvd + self.heads() + r * adapters + dora + outputs;
        }
        let norm = u64::from(c.qk_norm());
        let rope = u64::from(c.layer_uses_rope(layer));
        let mut e = 6 * h + self.mlp_row_elements(layer);
        if native_cpu(self.o) {
            // Token-major path: q and k as projected (viewed per head), normed, rotated; v as
            // projected; the output is o_proj's input as is; the flash kernel's f32 lse.
            e += qd * (1 + norm + rope) + kvd * (1 + norm + rope) + kvd;
            e += qd + self.heads();
        } else {
            e += qd * (2 + norm + rope) + kvd * (2 + norm + rope) + 2 * kvd;
            e += 2 * qd;
            if c.kv_heads() != c.num_attention_heads {
                e += 2 * qd;
            }
            if !self.keeps_probabilities() {
                e += qd + self.heads();
            }
        }
        for ((_, fan_in, fan_out), &a) in linear_shapes(c).iter().zip(adapted) {
            if a {
                e += r;
                if self.o.use_dora {
                    // DoRA's op keeps the projection's output before the magnitude scales it,
                    // and with dropout the mask alone (the masked input is rebuilt).
                    e += *fan_out as u64;
                    if self.o.lora_dropout > 0.0 {
                        e += *fan_in as u64;
                    }
                } else if self.o.lora_dropout > 0.0 {
                    e += 2 * *fan_in as u64;
                }
            }
        }
        if self.o.method == Method::Full {
            // A trained linear with a bias keeps its matmul output for the bias add.
            e += c
                .layer_linears()
                .iter()
                .filter(|(_, _, _, bias)| *bias)
                .map(|(_, _, o, _)| *o as u64)
                .sum::<u64>();
        }
        e
    }

    /// Elements (per row) the MLP of layer `layer` keeps op by op: gate, up and their product
    /// (3 × intermediate); for a mixture of experts, the router's f32 logits and probabilities
    /// with its LoRA's product and update, and per routed slot (top k per row) the expert's input
    /// rows, gate, up, their product and output, the outputs' concatenation, its slot-order copy
    /// and the weighted copy (5 × hidden + 3 × intermediate); with LoRA on the experts each slot
    /// also keeps the gate-up pair's `x A^T` (2r), update and its scaled copy (4 ×
    /// intermediate), the updated gate and up, and the down pair's `x A^T`, update, scaled copy
    /// and sum (r + 3 × hidden).
    fn mlp_row_elements(&self, layer: usize) -> u64 {
        let c = self.c;
        let Some(m) = c.layer_moe(layer) else {
            return 3 * c.intermediate_size as u64;
        };
        let (h, i, e, k) = (
            c.hidden_size as u64,
            m.intermediate as u64,
            m.experts as u64,
            m.top_k as u64,
        );
        let r = self.o.lora_r as u64;
        let experts_adapted = moe_all_linear(c, self.o);
        let mut router = 4 * e;
        let mut slot = 5 * h + 3 * i;
        if experts_adapted {
            router += r + 2 * e;
            slot += 3 * r + 6 * i + 3 * h;
        }
        router + k * slot
    }

    /// Bytes a mixture of experts' layer keeps whatever the length: with LoRA on the experts,
    /// each expert's slices of the stacked pairs (`[2r, hidden]` and `[2·inter, 2r]` for gate-up,
    /// `[r, inter]` and `[hidden, r]` for down, f32).
    fn moe_fixed_bytes(&self, layer: usize) -> u64 {
        match (self.c.layer_moe(layer), moe_all_linear(self.c, self.o)) {
            (Some(m), true) => {
                let (h, i, r) = (
                    self.c.hidden_size as u64,
                    m.intermediate as u64,
                    self.o.lora_r as u64,
                );
                m.experts as u64 * (2 * r * h + 4 * i * r + r * i + h * r) * 4
            }
            _ => 0,
        }
    }

    /// Rows of one MLP chunk of the checkpointed stack (at most all rows).
    fn chunk_rows(&self) -> u64 {
        let rows = match self.o.checkpoint_chunk_rows {
            0 => crate::ops::layer::mlp_chunk_rows(self.c.intermediate_size),
            rows => rows,
        };
        (rows as u64).min(self.n)
    }

    /// What the checkpointed stack's backward holds for the layer it rebuilds (one at a time)
    /// besides the layer inputs: the attention half's q, k and v as projected, its output (and
    /// the flash kernel's f32 log-sum-exp with the native kernels), the residual stream between
    /// attention and MLP, r per adapted attention linear; with offloading, the layer input
    /// copied back to the device.
    fn stack_recomputed_bytes(&self, adapted: &[bool]) -> u64 {
        let h = self.c.hidden_size as u64;
        let r = self.o.lora_r as u64;
        let attention_adapters = adapted[..=self.c.layout().o()]
            .iter()
            .filter(|&&a| a)
            .count() as u64;
        let mut e = 2 * self.qd() + 2 * self.kvd() + h + r * attention_adapters;
        if self.c.output_norms() {
            // Gemma 2/3: the o projection's output, which its norm's backward reads.
            e += h;
        }
        if self.offloads_inputs() {
            e += h;
        }
        let lse = if native_cpu(self.o) {
            self.n * self.heads() * 4
        } else {
            0
        };
        self.n * e * self.dt + lse
    }

    /// Whether the layer inputs wait in host memory (gradient checkpointing with
    /// `--offload-activations` on an accelerator).
    fn offloads_inputs(&self) -> bool {
        stacked(self.c, self.o) && self.o.offload_activations && self.o.device == PlanDevice::Cuda
    }

    /// QLoRA's MLP weights dequantized once for all of a layer's chunks when there are several
    /// (gate, up and down in the compute dtype, each counted at the largest linear's size).
    fn dense_mlp_bytes(&self, params: &ParamCounts) -> u64 {
        if self.o.method == Method::Qlora && self.chunk_rows() < self.n {
            3 * params.largest_linear * self.dt
        } else {
            0
        }
    }

    /// Forward temporaries of one layer of the checkpointed stack (nothing is kept but its
    /// output): the attention half's live set ([`Self::graphless_attention_bytes`]), or the
    /// MLP's — the residual stream, the output chunks and their concatenation (3 × hidden per
    /// row) plus one chunk's norm output, gate, up, SwiGLU product and down output (the candle-op
    /// projections add their base and LoRA outputs: 2 × hidden + 5 × intermediate per chunk row)
    /// and QLoRA's dequantized MLP weights.
    fn stack_forward_bytes(&self, params: &ParamCounts) -> u64 {
        let (h, i) = (self.c.hidden_size as u64, self.c.intermediate_size as u64);
        let chunk_elements = if native_cpu(self.o) {
            2 * h + 3 * i
        } else {
            2 * h + 5 * i
        };
        let mlp = (3 * self.n * h + self.chunk_rows() * chunk_elements) * self.dt
            + self.dense_mlp_bytes(params);
        self.graphless_attention_bytes().max(mlp) + self.dequantized_bytes(params)
    }

    /// The attention live set of a layer run without a graph (gradient checkpointing's forward).
    /// Native kernels, per row: norm output, q and k heads-first and rotated, v heads-first, the
    /// output, its log-sum-exp and its reshape for o_proj, the o-projection's output. Candle-op
    /// kernels: norm output, q/k/v heads-first and rotated, repeated k/v, the output, plus the
    /// kernel's probabilities or blocks ([`Self::candle_attention_kernel_bytes`]).
    fn graphless_attention_bytes(&self) -> u64 {
        let c = self.c;
        let h = c.hidden_size as u64;
        let (n, qd, kvd, dt) = (self.n, self.qd(), self.kvd(), self.dt);
        let norm = u64::from(c.qk_norm());
        if native_cpu(self.o) {
            return n * (2 * h + qd * (4 + norm) + kvd * (3 + norm) + self.heads()) * dt;
        }
        let grouped = u64::from(c.kv_heads() != c.num_attention_heads);
        let heads = h + qd * (2 + norm) + kvd * (3 + norm) + 2 * grouped * qd + qd;
        let kept = if self.keeps_probabilities() {
            self.probability_bytes()
        } else {
            n * qd * dt
        };
        n * heads * dt + kept + self.candle_attention_kernel_bytes()
    }

    /// The candle-op attention kernel's transient buffers: the reference kernel's scores, scaled
    /// and masked, and the mask (3 probability-sized tensors plus `[t, t]`), or the blocked
    /// kernel's per-block outputs and 3 score blocks.
    fn candle_attention_kernel_bytes(&self) -> u64 {
        let t = self.o.max_length as u64;
        if self.keeps_probabilities() {
            3 * self.probability_bytes() + t * t * self.dt
        } else {
            self.n * self.qd() * self.dt + self.attention_blocks(3)
        }
    }

    /// Temporaries of the attention backward: the one-op layer's flash backward with q and k
    /// rotated again (native kernels), or the candle-op kernels' — the output gradient made
    /// contiguous, dQ/dK/dV and their concatenations (≈ 6 × q width per row) plus 4 probability
    /// blocks, or 3 full probability-sized tensors when they are kept.
    fn attention_backward_bytes(&self) -> u64 {
        let (n, qd, dt) = (self.n, self.qd(), self.dt);
        if native_cpu(self.o) {
            let norm = u64::from(self.c.qk_norm());
            self.flash_backward_bytes() + n * (qd + self.kvd()) * (1 + norm) * dt
        } else if self.keeps_probabilities() {
            5 * n * qd * dt + 3 * self.probability_bytes()
        } else {
            6 * n * qd * dt + self.attention_blocks(4)
        }
    }

    /// Backward temporaries of one layer of the checkpointed stack beyond
    /// [`Self::stack_recomputed_bytes`]: the layer output's gradient and the residual stream's
    /// (2 × hidden per row, also the chunks' gradients before their concatenation) with either one
    /// MLP chunk's backward — gate, up, the SwiGLU product's gradient and the two it writes,
    /// norm output and its gradient (5 × intermediate + 2 × hidden per chunk row; the candle-op
    /// SwiGLU backward holds 4 × intermediate more; a dropout mask and masked input 2 ×
    /// intermediate; QLoRA's dequantized MLP weights) — or the attention backward
    /// ([`Self::attention_backward_bytes`]), and a dequantized weight when the base is quantized.
    fn stack_backward_bytes(&self, params: &ParamCounts) -> u64 {
        let c = self.c;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (n, dt) = (self.n, self.dt);
        let mut chunk_elements = 5 * i + 2 * h;
        if c.output_norms() {
            // Gemma 2/3: the down projection's output and its norm's gradient.
            chunk_elements += 2 * h;
        }
        if !native_cpu(self.o) {
            chunk_elements += 4 * i;
        }
        if self.o.lora_dropout > 0.0 {
            chunk_elements += 2 * i;
        }
        let mlp = self.chunk_rows() * chunk_elements * dt + self.dense_mlp_bytes(params);
        2 * n * h * dt + mlp.max(self.attention_backward_bytes()) + self.dequantized_bytes(params)
    }

    /// Bytes a decoder layer keeps for the backward pass.
    fn layer_saved_bytes(&self, layer: usize, adapted: &[bool]) -> u64 {
        let probs = if self.keeps_probabilities() {
            self.probability_bytes()
        } else {
            0
        };
        self.n * self.layer_row_elements(layer, adapted) * self.dt
            + probs
            + self.moe_fixed_bytes(layer)
    }

    /// Bytes alive outside the layers: the last layer's output, the final norm's output and the
    /// LM head's input gradient (computed in the forward pass), and the RoPE tables. The attention
    /// mask is kept as rules; kernels build the bias of each block they compute.
    fn top_level_bytes(&self) -> u64 {
        let t = self.o.max_length as u64;
        3 * self.n * self.c.hidden_size as u64 * self.dt + t * self.c.head_dim() as u64 * self.dt
    }

    /// The loss chunks. On the CPU in f32 one f32 logits buffer of a chunk's rows × vocab, turned
    /// into the gradient in place, serves every chunk, plus the head's f32 gradient when it trains.
    /// Elsewhere each chunk holds f32 logits, their exponentials, probabilities and the weighted
    /// gradient with its scatter copy (5 × rows × vocab; one more in the compute dtype when it is
    /// not f32).
    fn loss_workspace_bytes(&self) -> u64 {
        let (v, h) = (self.c.vocab_size as u64, self.c.hidden_size as u64);
        let rows = (loss_chunk_rows(self.c.vocab_size) as u64).min(self.n);
        if native_cpu(self.o) {
            let head_grad = if self.o.method == Method::Full {
                v * h * 4
            } else {
                0
            };
            return rows * v * 4 + head_grad;
        }
        let extra = if self.dt == 4 { 0 } else { self.dt };
        rows * v * (5 * 4 + extra)
    }

    /// A dequantized frozen weight (QLoRA dequantizes each linear for its forward and again for
    /// its backward): on CPU a host loop writes f32 values (cast when computing in another dtype);
    /// on CUDA composed ops hold f32 code values, f32 per-value scales and their f32 product.
    fn dequantized_bytes(&self, params: &ParamCounts) -> u64 {
        if self.o.method != Method::Qlora {
            return 0;
        }
        let cast = if self.dt == 4 { 0 } else { self.dt };
        let f32_copies = match self.o.device {
            PlanDevice::Cpu => 1,
            PlanDevice::Cuda => 3,
        };
        params.largest_linear * (4 * f32_copies + cast)
    }

    /// Bytes of the blocked kernel's probability-sized blocks (256 query rows × the keys they
    /// meet, all heads), `count` of them.
    fn attention_blocks(&self, count: u64) -> u64 {
        let keys = (0..self.c.num_hidden_layers)
            .map(|l| self.block_keys(l))
            .max()
            .unwrap_or(0);
        let rows = (ATTENTION_BLOCK as u64).min(self.o.max_length as u64);
        count * self.o.batch_size as u64 * self.heads() * rows * keys * self.dt
    }

    /// Temporaries of one layer's forward pass beyond what it keeps. Freed memory stays with the
    /// process (glibc keeps it for reuse, `alloc.rs`), so the last layer's temporaries are still
    /// resident when the loss chunks are allocated.
    ///
    /// With the graph kept: the larger of a LoRA projection to the MLP width (base output, LoRA
    /// output and their sum: 3 × intermediate per row) and attention (the reference kernel's
    /// scores, scaled and masked, and the mask: 3 probability-sized tensors plus `[t, t]`; the
    /// blocked kernel's per-block outputs and 3 score blocks). With gradient checkpointing the
    /// layer runs without a graph and everything it computes is transient: its live set peaks in
    /// attention (norm output, q/k/v heads-first and rotated, repeated k/v, the output and its
    /// blocks) or in the MLP (residual, norm output, gate, up and the up projection's three
    /// temporaries).
    fn forward_workspace_bytes(&self, params: &ParamCounts) -> u64 {
        if stacked(self.c, self.o) {
            return self.stack_forward_bytes(params);
        }
        if native_cpu(self.o) {
            return self.native_forward_temporaries() + self.dequantized_bytes(params);
        }
        let (h, i) = (self.c.hidden_size as u64, self.c.intermediate_size as u64);
        let (n, dt) = (self.n, self.dt);
        let ws = if self.o.gradient_checkpointing {
            let mlp = n * (2 * h + 5 * i) * dt;
            self.graphless_attention_bytes().max(mlp)
        } else {
            (3 * n * i * dt).max(self.candle_attention_kernel_bytes())
        };
        ws + self.dequantized_bytes(params)
    }

    /// Forward temporaries of one layer with the native CPU f32 kernels: every op writes only its
    /// output, so with the graph kept nothing is transient. With gradient checkpointing the layer
    /// runs without a graph and its live set peaks in attention (norm output, q and k heads-first
    /// and rotated, v heads-first, the output, its log-sum-exp and its reshape for o_proj, the
    /// o-projection's output) or in the MLP (mid residual, norm output, gate, up, their SwiGLU
    /// product and the down projection's output).
    fn native_forward_temporaries(&self) -> u64 {
        let c = self.c;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (qd, kvd) = (self.qd(), self.kvd());
        let norm = u64::from(c.qk_norm());
        if !self.o.gradient_checkpointing {
            if !selective(self.o) || c.is_moe() {
                return 0;
            }
            // The one-op layer: q and k normalised and rotated for the kernel, or the SwiGLU
            // product with the down projection's output.
            let attention = (qd + kvd) * (1 + norm);
            return self.n * attention.max(i + h) * self.dt;
        }
        let mlp = 3 * h + 3 * i;
        self.graphless_attention_bytes().max(self.n * mlp * self.dt)
    }

    /// Temporaries of the attention backward with the CPU flash kernel: the o-projection's input
    /// gradient and its contiguous copy in heads-first order, one dQ part per key chunk, dK and dV
    /// per query head, then dQ (q width each per row; dK and dV at the key/value heads come after
    /// the per-head ones are summed and dropped), and the keys and values transposed by tiles.
    fn flash_backward_bytes(&self) -> u64 {
        let t = self.o.max_length;
        let batch_heads = self.o.batch_size * self.c.num_attention_heads;
        let chunks = flash_key_chunks(batch_heads, t, rayon::current_num_threads());
        ((5 + chunks) * self.qd() + 2 * self.kvd()) * self.n * self.dt
    }

    /// Temporaries of one layer's backward pass: the larger of the SwiGLU backward and the
    /// attention backward, plus the residual stream's gradient, and a dequantized weight when the
    /// base is quantized. On the CPU in f32 the SwiGLU backward holds its incoming gradient and
    /// the two it writes, and candle adds each of them to a zero tensor before storing it (a
    /// zeros and a sum alive with both: 6 × intermediate per row); attention is the flash backward
    /// ([`Self::flash_backward_bytes`]). With the candle ops the SwiGLU backward holds sigmoid,
    /// its complement, the silu derivative, both gradients and products (7 × intermediate per row)
    /// and the attention backward the output gradient made contiguous, dQ/dK/dV and their
    /// concatenations (≈ 6 × q width per row) plus 4 probability blocks of 256 query rows, or 3
    /// full probability-sized tensors when they are kept.
    fn backward_workspace_bytes(&self, params: &ParamCounts) -> u64 {
        if stacked(self.c, self.o) {
            return self.stack_backward_bytes(params);
        }
        let c = self.c;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (mlp, attention) = if selective(self.o) && !c.is_moe() {
            // The one-op layer writes the SwiGLU gradients itself (no zeros + sum): the product's
            // gradient and the two it writes; attention rebuilds rotated q and k for the kernel.
            (3 * self.n * i * self.dt, self.attention_backward_bytes())
        } else if native_cpu(self.o) {
            (6 * self.n * i * self.dt, self.flash_backward_bytes())
        } else {
            (7 * self.n * i * self.dt, self.attention_backward_bytes())
        };
        // A mixture of experts' backward (op by op): per routed slot the gradients of the
        // expert's output, its copies and the concatenation, and of gate, up and their product
        // (4 × hidden + 4 × intermediate).
        let moe = (0..c.num_hidden_layers)
            .filter_map(|l| c.layer_moe(l))
            .map(|m| {
                let (k, i) = (m.top_k as u64, m.intermediate as u64);
                self.n * k * (4 * h + 4 * i) * self.dt
            })
            .max();
        let mlp = moe.unwrap_or(mlp);
        let mut ws = mlp.max(attention) + 2 * self.n * h * self.dt;
        ws += self.dequantized_bytes(params);
        if self.o.method == Method::Full {
            // candle's matmul gradient of a trained weight before it is added to the store.
            ws += 2 * params.largest_linear * self.dt;
        }
        if self.o.gradient_checkpointing {
            // The recomputation's input variable (a copy) and `y * grad` seeding its backward.
            ws += 2 * self.n * h * self.dt;
        }
        ws
    }
}

/// Predicts the peak memory of one training step (see the module docs).
///
/// Phases compared: loading (weights plus the tensor being read and converted), the end of
/// the forward pass (all saved activations plus the loss chunks), the backward pass (saved
/// activations, gradients, one layer's temporaries; with gradient checkpointing, the layer inputs
/// plus one recomputed layer) and the optimizer step (a clipped copy of the gradients and AdamW's
/// temporaries, activations freed).
pub fn plan(c: &ModelConfig, options: &PlanOptions) -> Result<MemoryPlan> {
    if options.max_length == 0 || options.batch_size == 0 {
        return Err(Error::Config(
            "--max-length and --per-device-train-batch-size must be positive".into(),
        ));
    }
    if options.method != Method::Full && options.lora_r == 0 {
        return Err(Error::Config("--lora-r must be positive".into()));
    }
    let params = param_counts(c, options)?;
    let adapted = adapted_linears(c, options)?;
    let dt = options.dtype.size_in_bytes() as u64;
    let step = Step {
        c,
        o: options,
        n: (options.batch_size * options.max_length) as u64,
        dt,
    };
    let weights = weight_bytes(c, options.method, options.dtype);
    // Parameters + AdamW's two f32 moments; the gradient exists from the backward pass to the
    // update, twice while clipping makes its scaled copy. Full fine-tuning trains the weights in
    // the compute dtype (counted with the weights); adapters are f32 whatever the base's dtype
    // (`ops::lora::ADAPTER_DTYPE`), and so are their gradients.
    let adapter_bytes = crate::ops::lora::ADAPTER_DTYPE.size_in_bytes() as u64;
    let (trainable_params, param_bytes, grad_bytes) = match options.method {
        Method::Full => (params.total, 0, dt),
        _ => (params.lora, params.lora * adapter_bytes, adapter_bytes),
    };
    let state = param_bytes + trainable_params * 8;
    let grads = trainable_params * grad_bytes;
    // On the CPU freed memory stays with the process (`alloc.rs`), and each AdamW update writes
    // fresh moments into the heap the step's activations have just freed: from the second step
    // on, the step's own tensors sit above them, so its phases hold the moments twice. Counted for
    // adapters only: full fine-tuning's moments outgrow the freed activations (its peak is the
    // update), and the candle-op model was calibrated without it.
    let moved_moments = if native_cpu(options) && options.method != Method::Full {
        trainable_params * 8
    } else {
        0
    };
    let largest_trainable = match options.method {
        Method::Full => params.largest_tensor,
        _ => {
            let r = options.lora_r as u64;
            let widest = linear_shapes(c)
                .iter()
                .map(|(_, i, o)| *i.max(o) as u64)
                .max()
                .unwrap_or(0);
            r * widest
        }
    };

    let layer_bytes: Vec<u64> = adapted
        .iter()
        .enumerate()
        .map(|(l, a)| step.layer_saved_bytes(l, a))
        .collect();
    let top = step.top_level_bytes();
    let hidden_bytes = step.n * c.hidden_size as u64 * dt;
    let saved = if options.gradient_checkpointing {
        // Each layer keeps only its input (offloaded: only the first, the op's graph input, stays
        // on the device); one layer is recomputed at a time.
        let inputs = if step.offloads_inputs() {
            1
        } else {
            c.num_hidden_layers as u64
        };
        // With the native kernels the stack also keeps each layer's attention output and its f32
        // log-sum-exp per head, so the backward does not run attention's forward again.
        let attention = match stacked(c, options) && native_cpu(options) {
            true => c.num_hidden_layers as u64 * step.n * (step.qd() * dt + step.heads() * 4),
            false => 0,
        };
        inputs * hidden_bytes + attention + top
    } else {
        layer_bytes.iter().sum::<u64>() + top
    };
    let recomputed = if stacked(c, options) {
        adapted
            .iter()
            .map(|a| step.stack_recomputed_bytes(a))
            .max()
            .unwrap_or(0)
    } else if options.gradient_checkpointing {
        layer_bytes.iter().copied().max().unwrap_or(0)
    } else {
        0
    };
    let baseline = options.baseline_bytes;
    let forward_workspace = step.forward_workspace_bytes(&params);
    // Loading reads each tensor's file bytes and converts them (two copies of the tensor); the
    // embedding comes first, when little else is resident, the LM head (untied) or the last
    // decoder linear last, when everything else is. Quantizing also holds the f32 values.
    let first_read = 2 * params.largest_tensor * 4;
    let last_read = match (options.method, c.tie_word_embeddings) {
        (_, false) => 2 * c.vocab_size as u64 * c.hidden_size as u64 * 4,
        (Method::Qlora, true) => 3 * params.largest_linear * 4,
        (_, true) => 2 * params.largest_linear * 4,
    };
    let load_workspace = match options.device {
        PlanDevice::Cpu => first_read.saturating_sub(weights).max(last_read),
        // Files are read and quantized on the host; the device holds the upload and, when the
        // file's dtype differs, its cast.
        PlanDevice::Cuda => params.largest_tensor * dt,
    };
    let phases = vec![
        (
            Phase::Load,
            Breakdown {
                weights,
                trainable: 0,
                activations: 0,
                workspace: load_workspace,
                baseline,
            },
        ),
        (
            Phase::Loss,
            Breakdown {
                weights,
                trainable: state + moved_moments,
                activations: saved,
                workspace: forward_workspace + step.loss_workspace_bytes(),
                baseline,
            },
        ),
        (
            Phase::Backward,
            Breakdown {
                weights,
                trainable: state + moved_moments + grads,
                activations: saved + recomputed,
                workspace: step
                    .backward_workspace_bytes(&params)
                    .max(forward_workspace),
                baseline,
            },
        ),
        (
            Phase::Optimizer,
            Breakdown {
                weights,
                trainable: state + 2 * grads,
                activations: 0,
                workspace: 7 * largest_trainable * 4,
                baseline,
            },
        ),
    ];
    let (peak_phase, peak) = phases
        .iter()
        .copied()
        .max_by_key(|(_, b)| b.total())
        .unwrap_or((Phase::Load, Breakdown::default()));
    Ok(MemoryPlan {
        peak_phase,
        peak,
        phases,
        params,
        layer_activation_bytes: if stacked(c, options) {
            recomputed
        } else {
            layer_bytes.first().copied().unwrap_or(0)
        },
        attention_keeps_probabilities: step.keeps_probabilities(),
    })
}

/// The longest `max_length` at which attention still keeps its probabilities (0 when none does,
/// as on the CPU in f32, where the flash kernel never keeps them): up to it the step's memory grows
/// with the length; just past it, it drops, as the blocked kernel keeps no `[t, t]` matrix.
pub fn kept_probabilities_limit(c: &ModelConfig, options: &PlanOptions) -> usize {
    if native_cpu(options) {
        return 0;
    }
    let per_t2 =
        (options.batch_size * c.num_attention_heads * options.dtype.size_in_bytes()).max(1);
    (KEEP_PROBABILITIES_BYTES / per_t2).isqrt()
}

/// The largest `max_length` whose planned peak fits in `budget_bytes` (None when not even one
/// token fits). The plan grows with the length on each side of [`kept_probabilities_limit`], so
/// the longer side is searched first, by bisection.
pub fn largest_max_length(
    c: &ModelConfig,
    options: &PlanOptions,
    budget_bytes: u64,
) -> Result<Option<usize>> {
    let fits = |t: usize| -> Result<bool> {
        let o = PlanOptions {
            max_length: t,
            ..options.clone()
        };
        Ok(plan(c, &o)?.total() <= budget_bytes)
    };
    // The largest fitting length in [lo, hi) given that lo fits and the plan grows on it.
    let bisect = |mut lo: usize, mut hi: usize| -> Result<usize> {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    };
    let switch = kept_probabilities_limit(c, options);
    let first_blocked = switch + 1;
    if fits(first_blocked)? {
        let (mut lo, mut hi) = (first_blocked, 2 * first_blocked);
        while fits(hi)? {
            lo = hi;
            hi *= 2;
            if hi > 1 << 24 {
                return Ok(Some(lo));
            }
        }
        return Ok(Some(bisect(lo, hi)?));
    }
    if switch == 0 || !fits(1)? {
        return Ok(None);
    }
    Ok(Some(bisect(1, switch + 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{inject, LoraConfig};
    use crate::model::layers::LinearWeight;
    use crate::model::weights::Weights;
    use crate::model::CausalLm;
    use crate::quant::QuantScheme;
    use candle_core::Device;
    use std::path::Path;

    const FIXTURES: [&str; 7] = [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "smollm3",
        "mixtral",
        "qwen3_moe",
    ];

    fn fixture(name: &str) -> (ModelConfig, Weights) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        (config, Weights::from_dir(&dir).unwrap())
    }

    /// A SmolLM2-shaped config.json (`scripts/bench_peft.py` SHAPES): hidden, intermediate,
    /// layers, heads, key/value heads; vocabulary 49,152, tied embeddings.
    fn smollm2(shape: (usize, usize, usize, usize, usize)) -> ModelConfig {
        let (hidden, inter, layers, heads, kv) = shape;
        ModelConfig::from_value(
            serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                "intermediate_size": inter, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 49152,
                "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "rope_theta": 100000.0
            }),
            Path::new("smollm2"),
        )
        .unwrap()
    }

    const SMOLLM2_135M: (usize, usize, usize, usize, usize) = (576, 1536, 30, 9, 3);
    const SMOLLM2_360M: (usize, usize, usize, usize, usize) = (960, 2560, 32, 15, 5);
    const SMOLLM2_1_7B: (usize, usize, usize, usize, usize) = (2048, 8192, 24, 32, 32);

    /// SmolLM2-135M's config.json (the shape benches/README.md measures).
    fn smollm2_135m() -> ModelConfig {
        smollm2(SMOLLM2_135M)
    }

    /// Bytes the loaded model holds: dense tensors plus quantized linears' codes and statistics.
    fn loaded_bytes(model: &CausalLm) -> u64 {
        let dense: usize = model
            .named_weights()
            .iter()
            .map(|(_, p)| p.tensor().elem_count() * p.tensor().dtype().size_in_bytes())
            .sum();
        let quantized: usize = model
            .base_linears()
            .iter()
            .filter_map(|l| match &l.weight {
                LinearWeight::Quantized(q) => Some(q.bytes()),
                LinearWeight::Dense(_) => None,
            })
            .sum();
        (dense + quantized) as u64
    }

    #[test]
    fn plan_weight_bytes_equal_the_loaded_fixtures() {
        for name in FIXTURES {
            let (config, weights) = fixture(name);
            for (method, quant) in [
                (Method::Lora, None),
                (Method::Qlora, Some(QuantScheme::qlora())),
            ] {
                let model = CausalLm::load_quantized(
                    config.clone(),
                    &weights,
                    false,
                    quant,
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
                assert_eq!(
                    weight_bytes(&config, method, DType::F32),
                    loaded_bytes(&model),
                    "{name} {method:?}"
                );
            }
        }
    }

    #[test]
    fn plan_param_counts_equal_the_fixture_files() {
        for name in FIXTURES {
            let (config, weights) = fixture(name);
            // Tied checkpoints may store lm_head.weight too; the model does not load it.
            let stored: usize = weights
                .names()
                .filter(|n| !(config.tie_word_embeddings && n.as_str() == "lm_head.weight"))
                .map(|n| weights.get_raw(n, &Device::Cpu).unwrap().elem_count())
                .sum();
            let counts = param_counts(&config, &PlanOptions::new(Method::Full, 1)).unwrap();
            assert_eq!(counts.total, stored as u64, "{name}");
        }
    }

    #[test]
    fn plan_lora_params_equal_the_injected_adapters() {
        // The LoRA parameters `inject` creates on fixture `name` and the planner's count.
        let counts = |name: &str, targets: &TargetModules, use_dora: bool| {
            let (config, weights) = fixture(name);
            let mut model =
                CausalLm::load(config.clone(), &weights, false, DType::F32, &Device::Cpu).unwrap();
            let lora = LoraConfig {
                r: 4,
                target_modules: targets.clone(),
                use_dora,
                // A mixture's router and experts take no dropout.
                lora_dropout: 0.0,
                ..LoraConfig::default()
            };
            inject(&mut model, &lora, 0).unwrap();
            let injected: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
            let options = PlanOptions {
                lora_r: 4,
                target_modules: targets.clone(),
                use_dora,
                ..PlanOptions::new(Method::Lora, 8)
            };
            let planned = param_counts(&config, &options).unwrap().lora;
            (injected as u64, planned)
        };
        for (targets, use_dora) in [
            (TargetModules::default(), false),
            (TargetModules::default(), true),
            (
                TargetModules::List(vec!["q_proj".into(), "down_proj".into()]),
                true,
            ),
            (
                TargetModules::Pattern(r"model\.layers\.1\..*_proj".into()),
                false,
            ),
        ] {
            let (injected, planned) = counts("qwen3", &targets, use_dora);
            assert_eq!(planned, injected, "{targets:?}");
        }
        // Mixtures of experts: PEFT's all-linear (attention, router, stacked experts; Qwen3-MoE's
        // dense layer keeps its MLP unadapted) and a module list.
        for name in ["mixtral", "qwen3_moe"] {
            for targets in [
                TargetModules::default(),
                TargetModules::List(vec!["q_proj".into(), "o_proj".into()]),
            ] {
                let (injected, planned) = counts(name, &targets, false);
                assert_eq!(planned, injected, "{name} {targets:?}");
            }
        }
    }

    #[test]
    fn plan_nf4_costs_bitsandbytes_bits_per_parameter() {
        // 4 bits + 8 bits per 64 values + 32 bits per 256 × 64 values = 4.127 bits.
        let n = 2048 * 8192;
        let bytes_per_param = nf4_double_quant_bytes(n) as f64 / n as f64;
        assert!((bytes_per_param - 0.5159).abs() < 1e-3, "{bytes_per_param}");
    }

    /// The larger of the loss and backward phases: what the step itself needs.
    fn step_bytes(c: &ModelConfig, o: &PlanOptions) -> u64 {
        let p = plan(c, o).unwrap();
        p.phases
            .iter()
            .filter(|(ph, _)| matches!(ph, Phase::Loss | Phase::Backward))
            .map(|(_, b)| b.total())
            .max()
            .unwrap()
    }

    #[test]
    fn plan_grows_with_length_batch_and_rank() {
        let c = smollm2_135m();
        for (method, gc, device) in [Method::Lora, Method::Qlora, Method::Full]
            .into_iter()
            .flat_map(|m| [(m, false), (m, true)])
            .flat_map(|(m, gc)| [(m, gc, PlanDevice::Cpu), (m, gc, PlanDevice::Cuda)])
        {
            let base = PlanOptions {
                gradient_checkpointing: gc,
                device,
                ..PlanOptions::new(method, 256)
            };
            // (step bytes, peak) must grow: the step strictly, the peak (which may be the
            // load or the optimizer update) never shrinking.
            let check = |what: &str, options: Vec<PlanOptions>| {
                let mut last = (0, 0);
                for o in options {
                    let now = (step_bytes(&c, &o), plan(&c, &o).unwrap().total());
                    assert!(
                        now.0 > last.0 && now.1 >= last.1,
                        "{method:?} gc={gc} {device:?} {what}: {now:?} after {last:?}"
                    );
                    last = now;
                }
            };
            // On each side of the attention kernels' switch (T = 682 here in f32 on CUDA); the
            // CPU flash kernel has none.
            let switch = kept_probabilities_limit(&c, &base);
            let sides: Vec<Vec<usize>> = if device == PlanDevice::Cpu {
                assert_eq!(switch, 0);
                vec![vec![16, 64, 256, 512, 682, 683, 1024, 2048, 4096, 8192]]
            } else {
                assert_eq!(switch, 682);
                vec![
                    vec![16, 64, 256, 512, 682],
                    vec![683, 1024, 2048, 4096, 8192],
                ]
            };
            for lengths in sides {
                check(
                    "max_length",
                    lengths
                        .iter()
                        .map(|&t| PlanOptions {
                            max_length: t,
                            ..base.clone()
                        })
                        .collect(),
                );
            }
            check(
                "batch",
                [1, 2, 4, 8]
                    .iter()
                    .map(|&b| PlanOptions {
                        batch_size: b,
                        ..base.clone()
                    })
                    .collect(),
            );
            if method != Method::Full {
                check(
                    "rank",
                    [4, 8, 16, 64, 256]
                        .iter()
                        .map(|&r| PlanOptions {
                            lora_r: r,
                            ..base.clone()
                        })
                        .collect(),
                );
            }
        }
    }

    #[test]
    fn plan_orders_qlora_lora_full_and_checkpointing() {
        let c = smollm2_135m();
        for t in [128, 512, 2048] {
            let total = |method, gc| {
                let o = PlanOptions {
                    gradient_checkpointing: gc,
                    ..PlanOptions::new(method, t)
                };
                (step_bytes(&c, &o), plan(&c, &o).unwrap().total())
            };
            assert!(
                total(Method::Qlora, false).1 < total(Method::Lora, false).1,
                "T={t}"
            );
            assert!(
                total(Method::Lora, false).1 < total(Method::Full, false).1,
                "T={t}"
            );
            for method in [Method::Lora, Method::Qlora, Method::Full] {
                let (with, without) = (total(method, true), total(method, false));
                assert!(
                    with.0 < without.0 && with.1 <= without.1,
                    "{method:?} T={t}"
                );
            }
        }
    }

    #[test]
    fn plan_counts_dropout_masks_and_attention_probabilities() {
        let c = smollm2_135m();
        let on = |device, t, dropout| {
            let o = PlanOptions {
                lora_dropout: dropout,
                device,
                ..PlanOptions::new(Method::Lora, t)
            };
            plan(&c, &o).unwrap()
        };
        let at = |t, dropout| on(PlanDevice::Cuda, t, dropout);
        // Op by op, dropout keeps a mask and the masked input per adapted linear: 2 × Σ
        // in_features per row. The CPU's one-op layers draw the masks again in the backward.
        let extra = at(512, 0.05).layer_activation_bytes - at(512, 0.0).layer_activation_bytes;
        assert_eq!(extra, 512 * 2 * (3 * 576 + 576 + 2 * 576 + 1536) * 4);
        let cpu = |dropout| on(PlanDevice::Cpu, 512, dropout).layer_activation_bytes;
        assert_eq!(cpu(0.05), cpu(0.0));
        // On the CPU each layer is one op (selective checkpointing) that keeps, at every length,
        // per row: its input and the mid-layer residual (2 × 576), gate and up (2 × 1536), q as
        // projected and the attention output (2 × 576), k and v as projected (2 × 192), an f32
        // log-sum-exp per head (9) and the LoRA hiddens (7 × 16).
        let flash_row = 2 * 576 + 2 * 1536 + 2 * 576 + 2 * 192 + 9 + 7 * 16;
        for t in [512, 682, 683, 2048] {
            let p = on(PlanDevice::Cpu, t, 0.0);
            assert!(!p.attention_keeps_probabilities);
            assert_eq!(p.layer_activation_bytes, t as u64 * flash_row * 4);
        }
        assert!(on(PlanDevice::Cpu, 683, 0.0).total() > on(PlanDevice::Cpu, 682, 0.0).total());
        // With the candle-op kernels (CUDA here, in f32): 9 heads × 512² × 4 bytes = 9 MiB of
        // probabilities are kept; at 2048 they are recomputed.
        assert!(at(512, 0.0).attention_keeps_probabilities);
        assert!(!at(2048, 0.0).attention_keeps_probabilities);
        // Past the switch a layer keeps its output twice and the log-sum-exp instead of the
        // probabilities (the implementation's own drop, which the plan shows).
        // Per row: 6 × 576 + 3 × 1536 (residual stream, norms, MLP) + 3 × 576 (q) + 3 × 192 (k)
        // + 2 × 192 (v) + 2 × 576 (k, v repeated) + 2 × 576 (attention output) + 7 × 16 (LoRA).
        let row = 6 * 576 + 3 * 1536 + 3 * 576 + 3 * 192 + 2 * 192 + 2 * 576 + 2 * 576 + 7 * 16;
        let (kept, blocked) = (at(682, 0.0), at(683, 0.0));
        assert_eq!(kept.layer_activation_bytes, (682 * row + 9 * 682 * 682) * 4);
        assert_eq!(blocked.layer_activation_bytes, 683 * (row + 576 + 9) * 4);
        assert!(blocked.total() < kept.total());
    }

    /// Gradient checkpointing over a frozen base runs the decoder stack as one op: on a GPU with
    /// `--offload-activations` the layer inputs leave the device, and smaller MLP chunks shrink
    /// the backward's workspace but not what is saved; full fine-tuning keeps the per-layer
    /// recomputation (the offload flag does not apply to it).
    #[test]
    fn plan_checkpointed_stack_offloads_inputs_and_chunks_the_mlp() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs/llama-3.1-8b.json");
        let c = ModelConfig::from_file(&path).unwrap();
        let o = |t: usize, gc: bool, offload: bool, chunk_rows: usize| PlanOptions {
            lora_r: 32,
            gradient_checkpointing: gc,
            offload_activations: offload,
            checkpoint_chunk_rows: chunk_rows,
            dtype: DType::BF16,
            device: PlanDevice::Cuda,
            baseline_bytes: CUDA_BASELINE_BYTES,
            ..PlanOptions::new(Method::Qlora, t)
        };
        let t = 16384;
        let (gc, offloaded) = (
            plan(&c, &o(t, true, false, 0)).unwrap(),
            plan(&c, &o(t, true, true, 0)).unwrap(),
        );
        let inputs = 31 * t as u64 * 4096 * 2;
        let phase = |p: &MemoryPlan, ph: Phase| p.phases.iter().find(|(x, _)| *x == ph).unwrap().1;
        // 31 of the 32 layer inputs (all but the op's own graph input) move to the host; the
        // rebuilt layer holds its input copied back.
        let (a, b) = (phase(&gc, Phase::Loss), phase(&offloaded, Phase::Loss));
        assert_eq!(a.activations - b.activations, inputs);
        let (a, b) = (
            phase(&gc, Phase::Backward),
            phase(&offloaded, Phase::Backward),
        );
        assert_eq!(a.activations - b.activations, inputs - t as u64 * 4096 * 2);
        // The default chunk of a 14336-wide MLP is 1152 rows; 128-row chunks leave the saved
        // tensors alone and shrink the MLP backward's workspace.
        assert_eq!(crate::ops::layer::mlp_chunk_rows(14336), 1152);
        let small = plan(&c, &o(t, true, false, 128)).unwrap();
        let explicit = plan(&c, &o(t, true, false, 1152)).unwrap();
        assert_eq!(explicit.total(), gc.total());
        assert_eq!(
            phase(&small, Phase::Backward).activations,
            phase(&gc, Phase::Backward).activations
        );
        assert!(phase(&small, Phase::Backward).workspace <= phase(&gc, Phase::Backward).workspace);
        // One chunk of all rows costs more than 1152-row chunks at this length.
        let whole = plan(&c, &o(t, true, false, t)).unwrap();
        assert!(phase(&whole, Phase::Backward).workspace > phase(&gc, Phase::Backward).workspace);
        // Longer fits with each: none < checkpointing < checkpointing with offloading.
        let budget = 16 << 30;
        let longest = |gc, offload| {
            largest_max_length(&c, &o(1, gc, offload, 0), budget)
                .unwrap()
                .unwrap()
        };
        let (none, ckpt, off) = (
            longest(false, false),
            longest(true, false),
            longest(true, true),
        );
        assert!(none < ckpt && ckpt < off, "{none} {ckpt} {off}");
        // Full fine-tuning recomputes layer by layer: offloading changes nothing there.
        let full = |offload| PlanOptions {
            method: Method::Full,
            ..o(2048, true, offload, 0)
        };
        assert_eq!(
            plan(&c, &full(true)).unwrap().total(),
            plan(&c, &full(false)).unwrap().total()
        );
    }

    #[test]
    fn plan_largest_max_length_is_the_boundary() {
        let c = smollm2_135m();
        let cpu = PlanOptions::new(Method::Qlora, 1);
        let t = largest_max_length(&c, &cpu, 2 << 30).unwrap().unwrap();
        let at_cpu = |t| {
            plan(
                &c,
                &PlanOptions {
                    max_length: t,
                    ..cpu.clone()
                },
            )
            .unwrap()
            .total()
        };
        assert!(at_cpu(t) <= 2 << 30 && at_cpu(t + 1) > 2 << 30, "T={t}");
        let o = PlanOptions {
            device: PlanDevice::Cuda,
            ..PlanOptions::new(Method::Qlora, 1)
        };
        let at = |t| {
            plan(
                &c,
                &PlanOptions {
                    max_length: t,
                    ..o.clone()
                },
            )
            .unwrap()
            .total()
        };
        let longest = |budget| largest_max_length(&c, &o, budget).unwrap();
        // With the candle-op kernels: budgets answered past the kernel switch, before it, and in
        // the gap where T = 682 does not fit but T = 683 does (the blocked kernel needs less).
        assert!(at(683) < at(682));
        for budget in [2u64 << 30, at(300), (at(683) + at(682)) / 2] {
            let t = longest(budget).unwrap();
            assert!(at(t) <= budget && at(t + 1) > budget, "T={t}");
            if budget < at(682) && budget >= at(683) {
                assert!(t >= 683, "T={t}");
            }
        }
        assert_eq!(longest(1 << 20), None);
    }

    /// Peak RSS (VmHWM) measured on the 2-core CPU machine with selective checkpointing (after
    /// commit 4cd4007; each LoRA/QLoRA decoder layer one op; the gradient-checkpointing rows again
    /// with the checkpointed stack, `model/selective.rs`) with `cargo run
    /// --release --example bench_lora_step -- DIR T STEPS R MODE` on random f32 models written by
    /// `scripts/bench_peft.py --make-model DIR --shape 135m|360m|1.7b`: batch 1, LoRA all-linear,
    /// no dropout, 2 steps (1 for 1.7B); the example's baseline (no tokenizer) is 9 MiB. A single
    /// step does not yet hold AdamW's moments twice (see `plan`), so those runs are compared with
    /// the plan less 8 bytes per LoRA parameter. The chunked rows set `CHUNK_ROWS` (rows per MLP
    /// chunk; the automatic size is one chunk at these lengths). benches/README.md, "Memory
    /// planner", has the table and the commands.
    /// A config.json of `base` with `extra`'s fields set.
    fn shaped(mut base: serde_json::Value, extra: &serde_json::Value) -> ModelConfig {
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        ModelConfig::from_value(base, Path::new("shaped")).unwrap()
    }

    /// The plan of a `bench_lora_step CONFIG T 2 16 MODE` run (r=16, batch 1, no dropout, the
    /// example's 9 MiB baseline) is within 10% of its measured peak `mib`.
    fn within_ten_percent(
        config: &ModelConfig,
        t: usize,
        method: Method,
        gc: bool,
        mib: f64,
    ) -> MemoryPlan {
        let o = PlanOptions {
            lora_r: 16,
            lora_dropout: 0.0,
            gradient_checkpointing: gc,
            baseline_bytes: 9 * MIB,
            ..PlanOptions::new(method, t)
        };
        let p = plan(config, &o).unwrap();
        let predicted = p.total() as f64 / MIB as f64;
        let error = (predicted - mib) / mib;
        assert!(
            error.abs() < 0.10,
            "{:?} T={t} {method:?} gc={gc}: predicted {predicted:.0} MiB, measured {mib}",
            config.family()
        );
        p
    }

    #[test]
    fn plan_matches_measured_peaks_within_ten_percent() {
        // The gradient-checkpointing rows (here, chunked, DoRA and the families') re-measured
        // 2026-12-03 when the checkpointed stack began keeping each layer's attention output.
        let measured = [
            (SMOLLM2_135M, 512, 16, Method::Lora, false, 2, 1015.6),
            (SMOLLM2_135M, 512, 16, Method::Qlora, false, 2, 679.2),
            (SMOLLM2_135M, 682, 16, Method::Lora, false, 2, 1135.3),
            (SMOLLM2_135M, 683, 16, Method::Lora, false, 2, 1134.7),
            (SMOLLM2_135M, 2048, 16, Method::Lora, false, 2, 2078.6),
            (SMOLLM2_135M, 2048, 16, Method::Lora, true, 2, 999.8),
            (SMOLLM2_135M, 2048, 16, Method::Qlora, false, 2, 1716.6),
            (SMOLLM2_135M, 2048, 16, Method::Qlora, true, 2, 647.9),
            (SMOLLM2_360M, 512, 16, Method::Lora, false, 2, 2240.3),
            (SMOLLM2_360M, 512, 16, Method::Qlora, false, 2, 1196.1),
            (SMOLLM2_360M, 1024, 64, Method::Qlora, false, 2, 2304.3),
            (SMOLLM2_360M, 2048, 16, Method::Lora, true, 2, 2205.6),
            (SMOLLM2_1_7B, 256, 16, Method::Lora, false, 1, 7581.7),
            (SMOLLM2_1_7B, 256, 16, Method::Qlora, false, 1, 2293.3),
            (SMOLLM2_1_7B, 1024, 16, Method::Qlora, true, 1, 2247.1),
            (SMOLLM2_135M, 4096, 16, Method::Lora, true, 2, 1383.1),
        ];
        // Gradient checkpointing with the MLP in chunks of `CHUNK_ROWS` rows.
        let chunked = [
            (SMOLLM2_135M, 2048, Method::Lora, 2, 256, 984.3),
            (SMOLLM2_135M, 2048, Method::Qlora, 2, 256, 666.8),
            (SMOLLM2_135M, 4096, Method::Lora, 2, 512, 1303.8),
            (SMOLLM2_360M, 2048, Method::Lora, 2, 256, 2161.9),
            (SMOLLM2_1_7B, 1024, Method::Qlora, 1, 256, 2239.7),
        ];
        // Batch > 1 with LoRA dropout 0.05 (bench_lora_step's BATCH and LORA_DROPOUT, 4d1dd61).
        let batched = [
            (SMOLLM2_135M, 512, 2, Method::Lora, 1373.6),
            (SMOLLM2_135M, 256, 4, Method::Qlora, 1034.3),
        ];
        // DoRA (`MODE+dora`, r=16, one op per layer), 2026-12-02.
        let dora = [
            (SMOLLM2_135M, 512, Method::Lora, false, 0.0, 1341.1),
            (SMOLLM2_135M, 1024, Method::Lora, false, 0.0, 1993.6),
            (SMOLLM2_135M, 512, Method::Qlora, false, 0.0, 982.7),
            (SMOLLM2_135M, 1024, Method::Lora, true, 0.0, 845.2),
            (SMOLLM2_135M, 512, Method::Lora, false, 0.05, 1367.7),
        ];
        let cases = measured
            .iter()
            .map(|&(shape, t, r, method, gc, steps, mib)| {
                (shape, t, r, 1, 0.0, method, gc, 0, steps, mib, false)
            })
            .chain(batched.iter().map(|&(shape, t, b, method, mib)| {
                (shape, t, 16, b, 0.05, method, false, 0, 2, mib, false)
            }))
            .chain(chunked.iter().map(|&(shape, t, method, steps, rows, mib)| {
                (shape, t, 16, 1, 0.0, method, true, rows, steps, mib, false)
            }))
            .chain(dora.iter().map(|&(shape, t, method, gc, dropout, mib)| {
                (shape, t, 16, 1, dropout, method, gc, 0, 2, mib, true)
            }));
        // A Gemma 2 and a Phi-3 of SmolLM2-135M's shape, `bench_lora_step DIR T 2 16 MODE`,
        // 2026-12-03: Gemma 2 (head_dim 64, window 256, soft caps 50/30) keeps two more
        // hidden-wide tensors per layer for its output norms; Phi-3 (fused qkv_proj and
        // gate_up_proj, partial rotary 0.75, LongRoPE) has one LoRA pair per fused module.
        let gemma2 = serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"], "head_dim": 64, "query_pre_attn_scalar": 64,
            "sliding_window": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0
        });
        let phi3 = serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 16384,
            "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75
        });
        // all-linear on Phi-3: 4 modules per layer (qkv, o, gate_up, down), r (in + out) each.
        let phi3_lora =
            30 * 16 * ((576 + 576 + 2 * 192) + (576 + 576) + (576 + 2 * 1536) + (1536 + 576));
        let families = [
            (gemma2, [1103.2, 1502.0, 751.4, 835.4], None),
            (phi3, [1008.7, 1372.8, 666.4, 815.9], Some(phi3_lora)),
        ];
        for (extra, peaks, lora_params) in families {
            let base = serde_json::json!({
                "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "tie_word_embeddings": true
            });
            let config = shaped(base, &extra);
            let runs = [
                (512, Method::Lora, false),
                (1024, Method::Lora, false),
                (512, Method::Qlora, false),
                (1024, Method::Lora, true),
            ];
            for ((t, method, gc), mib) in runs.into_iter().zip(peaks) {
                let p = within_ten_percent(&config, t, method, gc, mib);
                if let Some(n) = lora_params {
                    assert_eq!(p.params.lora, n as u64);
                }
            }
        }
        // Mixtures of experts (op by op; random weights from config.json,
        // `bench_lora_step CONFIG T 2 16 MODE`, all-linear: attention, router and experts),
        // 2026-12-03: a Qwen3-MoE of 64 experts (top 8, width 256) and a Mixtral of 8 (top 2,
        // width 1024), hidden 512, 4 layers, vocabulary 32000.
        let qwen3_moe = serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"], "intermediate_size": 1024,
            "moe_intermediate_size": 256, "head_dim": 64, "num_experts": 64,
            "num_experts_per_tok": 8, "norm_topk_prob": true
        });
        let mixtral = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "intermediate_size": 1024,
            "num_local_experts": 8, "num_experts_per_tok": 2
        });
        let moe_runs = [
            (&qwen3_moe, 512, Method::Lora, false, 1364.3),
            (&qwen3_moe, 1024, Method::Lora, false, 1862.1),
            (&qwen3_moe, 512, Method::Qlora, false, 1016.7),
            (&qwen3_moe, 1024, Method::Lora, true, 1181.0),
            (&qwen3_moe, 2048, Method::Lora, true, 1573.9),
            (&qwen3_moe, 1024, Method::Qlora, true, 840.5),
            (&mixtral, 512, Method::Lora, false, 745.7),
            (&mixtral, 1024, Method::Lora, false, 1021.4),
            (&mixtral, 1024, Method::Qlora, false, 848.6),
            (&mixtral, 2048, Method::Lora, true, 861.2),
        ];
        for (extra, t, method, gc, mib) in moe_runs {
            let base = serde_json::json!({
                "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": false
            });
            within_ten_percent(&shaped(base, extra), t, method, gc, mib);
        }
        for (shape, t, r, batch, dropout, method, gc, chunk_rows, steps, mib, use_dora) in cases {
            let o = PlanOptions {
                lora_r: r,
                batch_size: batch,
                lora_dropout: dropout,
                use_dora,
                gradient_checkpointing: gc,
                checkpoint_chunk_rows: chunk_rows,
                baseline_bytes: 9 * MIB,
                ..PlanOptions::new(method, t)
            };
            let p = plan(&smollm2(shape), &o).unwrap();
            let first_step = if steps == 1 { 8 * p.params.lora } else { 0 };
            let predicted = (p.total() - first_step) as f64 / MIB as f64;
            let error = (predicted - mib) / mib;
            assert!(
                error.abs() < 0.10,
                "{shape:?} T={t} r={r} B={batch} p={dropout} {method:?} gc={gc} chunks of {chunk_rows} DoRA {use_dora}: predicted {predicted:.0} MiB, measured {mib}"
            );
        }
    }
}
