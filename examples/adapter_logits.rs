//! Writes `input_ids` and the logits of base + adapter for them, for scripts/check_peft_loads.py.
//!
//! cargo run --example adapter_logits -- BASE_DIR ADAPTER_DIR OUT.safetensors [--qlora]
//!
//! `--qlora` loads the base as `--qlora` training does (NF4 + double quantization).

use candle_core::{Device, Tensor};
use peft_sft::lora::load_adapter;
use peft_sft::model::{load_pretrained_with, LoadOptions};
use peft_sft::quant::QuantScheme;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (base, adapter, out, qlora) = match args.as_slice() {
        [_, b, a, o] => (b, a, o, false),
        [_, b, a, o, flag] if flag == "--qlora" => (b, a, o, true),
        _ => anyhow::bail!("usage: BASE_DIR ADAPTER_DIR OUT.safetensors [--qlora]"),
    };
    let options = LoadOptions {
        quantize: qlora.then(QuantScheme::qlora),
        ..LoadOptions::default()
    };
    let mut loaded = load_pretrained_with(base, options, &Device::Cpu)?;
    load_adapter(&mut loaded.model, std::path::Path::new(adapter))?;
    let adapter_dir = std::path::Path::new(adapter);
    let ids = if adapter_dir.join("tokenizer.json").exists() {
        // The adapter brought its own tokenizer (new tokens): a conversation uses them.
        let tok = peft_sft::data::ChatTokenizer::from_dir(adapter_dir)?;
        let chat = serde_json::json!([
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}
        ]);
        let text = tok.apply_chat_template(chat.as_array().unwrap(), false)?;
        tok.encode(&text, false)?
    } else {
        loaded
            .tokenizer
            .encode("What is the capital of France? Paris.", true)?
    };
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
