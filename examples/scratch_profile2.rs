use candle_core::{DType, Device, Tensor};
use peft_sft::lora::{inject, LoraConfig};
use peft_sft::model::weights::Weights;
use peft_sft::model::{CausalLm, ModelConfig};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from("/tmp/peft-sft-bench/smollm2-135m-random");
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::from_dir(&dir)?;
    let mut model = CausalLm::load(config, &weights, false, DType::F32, &Device::Cpu)?;
    inject(&mut model, &LoraConfig { r: 16, lora_alpha: 32.0, ..Default::default() }, 0)?;
    let ids = Tensor::from_vec((0..512u32).map(|i| (i * 7919) % 49152).collect::<Vec<_>>(), (1, 512), &Device::Cpu)?;
    let ones = Tensor::ones((1, 512), DType::F32, &Device::Cpu)?;
    for _ in 0..2 {
        let s = Instant::now();
        let h = model.forward_hidden(&ids, &[(0..512).collect()], None, None, None)?;
        let t_body = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let g = h.sum_all()?.backward()?;
        let t_body_bwd = s.elapsed().as_secs_f64();
        drop(g);
        let s = Instant::now();
        let out = model.loss(&ids, &ones, &ones, None)?;
        let t_fwd = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let _g = out.loss_sum.backward()?;
        let t_bwd = s.elapsed().as_secs_f64();
        println!("body fwd {t_body:.2}s body bwd {t_body_bwd:.2}s | loss fwd {t_fwd:.2}s loss bwd {t_bwd:.2}s");
    }
    Ok(())
}
