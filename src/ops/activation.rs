//! The MLP's gate activations, as config.json names them.

/// The MLP's gate activation (config.json `hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `silu(x) = x · sigmoid(x)`: SwiGLU.
    #[default]
    Silu,
    /// PyTorch's `gelu(approximate="tanh")` (`gelu_pytorch_tanh`): GeGLU.
    GeluTanh,
}

impl Activation {
    /// The activation config.json names, if peft-sft has it (`gelu_pytorch_tanh`, and `gelu_new`
    /// and `gelu_fast`, which transformers computes with the same tanh formula).
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
}
