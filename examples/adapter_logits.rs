//! Writes `input_ids` and the logits of base + adapter for them, for scripts/check_peft_loads.py.
//!
//! cargo run --example adapter_logits -- BASE_DIR ADAPTER_DIR OUT.safetensors

use candle_core::{Device, Tensor};
use peft_sft::lora::load_adapter;
use peft_sft::model::load_pretrained;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, adapter, out] = args.as_slice() else {
        anyhow::bail!("usage: BASE_DIR ADAPTER_DIR OUT.safetensors");
    };
    let mut loaded = load_pretrained(base, false, &Device::Cpu)?;
    load_adapter(&mut loaded.model, std::path::Path::new(adapter))?;
    let ids = loaded
        .tokenizer
        .encode("What is the capital of France? Paris.", true)?;
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = loaded.model.forward(&ids)?;
    peft_sft::io::write_safetensors(
        std::path::Path::new(out),
        &[
            ("input_ids".into(), ids.to_dtype(candle_core::DType::I64)?),
            ("logits".into(), logits),
        ],
    )?;
    Ok(())
}
