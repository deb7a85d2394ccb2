//! The pre-norm decoder layer's steps, written once. Every form of the layer runs these
//! functions with its own [`LayerSteps`]: the op-by-op graph (`model::layers::DecoderLayer`,
//! tracked tensors, generation's key/value cache), and the one-op and checkpointed forms
//! ([`super`], untracked tensors, keeping what their hand-written backward reads). The backward
//! of the one-op form walks these steps in reverse.
//!
//! ```text
//! x ─ input norm ─┬ q ┐
//!                 ├ k ┼ attend (q/k norms, RoPE, attention) ─ o [─ o norm] ─ + x ═ resid
//!                 └ v ┘
//! resid ─ post norm ─┬ gate ┐
//!                    └ up ──┴ act(gate)·up ═ act ─ down [─ down norm] ─ + resid ═ out
//! ```
//!
//! The bracketed norms are Gemma 2/3's `post_attention_layernorm` and
//! `post_feedforward_layernorm` (there the norm before the MLP is `pre_feedforward_layernorm`).

use candle_core::Result;

/// The layer's RMSNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormAt {
    /// Before attention.
    Input,
    /// Before the MLP.
    PostAttention,
    /// On the attention's output projection, before the residual add (Gemma 2/3).
    AttentionOutput,
    /// On the MLP's down projection, before the residual add (Gemma 2/3).
    MlpOutput,
}

/// The layer's seven projections, in the order of `DecoderLayer::linears`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// Query projection.
    Q = 0,
    /// Key projection.
    K = 1,
    /// Value projection.
    V = 2,
    /// Attention output projection.
    O = 3,
    /// MLP gate projection.
    Gate = 4,
    /// MLP up projection.
    Up = 5,
    /// MLP down projection.
    Down = 6,
}

impl Proj {
    /// The position in `DecoderLayer::linears` of a layer with separate modules.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How a layer stores its seven projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// q, k, v, o, gate, up, down: one module each.
    #[default]
    Separate,
    /// Phi-3: `qkv_proj` (q, k and v stacked by rows), o, `gate_up_proj` (gate then up), down —
    /// one LoRA pair over each fused module, as PEFT adapts them.
    Fused,
}

impl Layout {
    /// Modules per layer.
    pub fn modules(self) -> usize {
        match self {
            Layout::Separate => 7,
            Layout::Fused => 4,
        }
    }

    /// Where projection `which` comes from: the module's position in the layer's list and, for a
    /// piece of a fused module, which piece (q, k, v: 0, 1, 2; gate, up: 0, 1).
    pub fn slot(self, which: Proj) -> (usize, Option<usize>) {
        match self {
            Layout::Separate => (which.index(), None),
            Layout::Fused => match which {
                Proj::Q => (0, Some(0)),
                Proj::K => (0, Some(1)),
                Proj::V => (0, Some(2)),
                Proj::O => (1, None),
                Proj::Gate => (2, Some(0)),
                Proj::Up => (2, Some(1)),
                Proj::Down => (3, None),
            },
        }
    }

    /// The o projection's position.
    pub fn o(self) -> usize {
        self.slot(Proj::O).0
    }

    /// The first MLP module's position (gate, or gate_up).
    pub fn mlp_start(self) -> usize {
        self.slot(Proj::Gate).0
    }

    /// The down projection's position.
    pub fn down(self) -> usize {
        self.slot(Proj::Down).0
    }

    /// The columns `(start, width)` projection `which` takes of its fused module's output: q, k
    /// and v of widths `q` and `kv` (heads × head width) stacked, gate then up, `intermediate`
    /// each.
    pub fn fused_columns(which: Proj, q: usize, kv: usize, intermediate: usize) -> (usize, usize) {
        match which {
            Proj::Q => (0, q),
            Proj::K => (q, kv),
            Proj::V => (q + kv, kv),
            Proj::Gate => (0, intermediate),
            Proj::Up => (intermediate, intermediate),
            Proj::O | Proj::Down => (0, 0),
        }
    }
}

/// How one form of the layer runs each step. `T` is its activation: a tensor, or rows of one.
pub trait LayerSteps {
    /// An activation.
    type T;
    /// The layer's output (the last residual add's result).
    type Out;

    /// RMSNorm `which` of `x`.
    fn norm(&mut self, which: NormAt, x: &Self::T) -> Result<Self::T>;

    /// Whether the layer normalises its attention and MLP outputs ([`NormAt::AttentionOutput`],
    /// [`NormAt::MlpOutput`]).
    fn output_norms(&self) -> bool;

    /// Projection `which` of `x` (its LoRA branch included).
    fn project(&mut self, which: Proj, x: &Self::T) -> Result<Self::T>;

    /// Attention of the projected q, k and v: per-head q/k norms (Qwen3), RoPE, attention; the
    /// output as the o projection reads it.
    fn attend(&mut self, q: Self::T, k: Self::T, v: Self::T) -> Result<Self::T>;

    /// The gated activation `act(gate) * up` (SwiGLU or GeGLU).
    fn activate(&mut self, gate: &Self::T, up: &Self::T) -> Result<Self::T>;

    /// Whether the layer's MLP is a mixture of experts ([`Self::experts`] replaces gate, up,
    /// activation and down).
    fn sparse(&self) -> bool {
        false
    }

    /// The mixture of experts of the normalised residual stream `x`.
    fn experts(&mut self, _x: &Self::T) -> Result<Self::T> {
        candle_core::bail!("decoder layer: this form of the layer has no mixture of experts")
    }

    /// The residual add `stream + branch` after attention.
    fn add(&mut self, stream: &Self::T, branch: &Self::T) -> Result<Self::T>;

    /// The residual add `stream + branch` after the MLP: the layer's output.
    fn output(&mut self, stream: &Self::T, branch: &Self::T) -> Result<Self::Out>;
}

/// The attention half: `x + o(attend(q(n), k(n), v(n)))` with `n = input_norm(x)` (the output
/// normalised where the layer does): the residual stream between attention and MLP.
pub fn attention_half<S: LayerSteps>(s: &mut S, x: &S::T) -> Result<S::T> {
    let normed = s.norm(NormAt::Input, x)?;
    let q = s.project(Proj::Q, &normed)?;
    let k = s.project(Proj::K, &normed)?;
    let v = s.project(Proj::V, &normed)?;
    drop(normed);
    let attn = s.attend(q, k, v)?;
    let o = s.project(Proj::O, &attn)?;
    drop(attn);
    let o = match s.output_norms() {
        true => s.norm(NormAt::AttentionOutput, &o)?,
        false => o,
    };
    s.add(x, &o)
}

/// The MLP up to the down projection's input: `act(gate(n)) · up(n)` with
/// `n = post_attention_norm(resid)`.
pub fn mlp_activation<S: LayerSteps>(s: &mut S, resid: &S::T) -> Result<S::T> {
    let normed = s.norm(NormAt::PostAttention, resid)?;
    let gate = s.project(Proj::Gate, &normed)?;
    let up = s.project(Proj::Up, &normed)?;
    drop(normed);
    s.activate(&gate, &up)
}

/// The MLP half: `resid + down(mlp_activation(resid))` (normalised where the layer does), the
/// layer's output.
pub fn mlp_half<S: LayerSteps>(s: &mut S, resid: &S::T) -> Result<S::Out> {
    if s.sparse() {
        let normed = s.norm(NormAt::PostAttention, resid)?;
        let out = s.experts(&normed)?;
        drop(normed);
        return s.output(resid, &out);
    }
    let act = mlp_activation(s, resid)?;
    let down = s.project(Proj::Down, &act)?;
    drop(act);
    let down = match s.output_norms() {
        true => s.norm(NormAt::MlpOutput, &down)?,
        false => down,
    };
    s.output(resid, &down)
}

/// The whole layer.
pub fn layer<S: LayerSteps>(s: &mut S, x: &S::T) -> Result<S::Out> {
    let resid = attention_half(s, x)?;
    mlp_half(s, &resid)
}
