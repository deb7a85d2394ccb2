//! Times LoRA training steps (forward, backward, AdamW) on a model folder with random token ids and
//! prints one JSON line: tokens/s, seconds per step and peak RSS. Used by scripts/bench_vs_peft.sh.
//!
//! cargo run --release --example bench_lora_step -- MODEL_DIR [SEQ_LEN] [STEPS] [RANK] [lora|qlora][+gc][+ops] [BATCH] [LORA_DROPOUT]
//!
//! `qlora` quantizes the decoder's linear weights to NF4 with double quantization while loading;
//! `+gc` turns on gradient checkpointing; `+ops` turns off selective checkpointing (the op-by-op
//! graph, for comparison); `BATCH` rows of `SEQ_LEN` tokens each (default 1); `LORA_DROPOUT`
//! (default 0) draws a new mask per step; `load_rss_mib` is the peak RSS once the model is loaded
//! (before any step). The environment variable `CHUNK_ROWS` sets the rows per MLP chunk under
//! gradient checkpointing (default: the model's automatic size).

use candle_core::{DType, Device, Tensor};
use peft_sft::lora::{inject, LoraConfig};
use peft_sft::model::weights::Weights;
use peft_sft::model::{CausalLm, ModelConfig};
use peft_sft::ops::checkpoint::backward;
use peft_sft::quant::QuantScheme;
use peft_sft::rng::Rng;
use peft_sft::train::optimizer::{clip_grad_norm, AdamW, AdamWParams};
use std::path::PathBuf;
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    peft_sft::alloc::retain_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: MODEL_DIR [SEQ_LEN] [STEPS] [RANK]"))?,
    );
    let seq_len: usize = args.get(2).map_or(Ok(512), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let rank: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;
    let mode = args.get(5).map_or("lora", String::as_str);
    let mut parts = mode.split('+');
    let base = parts.next().unwrap_or("lora");
    let flags: Vec<&str> = parts.collect();
    if let Some(f) = flags.iter().find(|f| !["gc", "ops"].contains(f)) {
        anyhow::bail!("mode suffix `+{f}`: expected +gc or +ops");
    }
    let checkpointing = flags.contains(&"gc");
    let quantize = match base {
        "lora" => None,
        "qlora" => Some(QuantScheme::qlora()),
        other => anyhow::bail!("mode `{other}`: expected lora or qlora"),
    };
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let vocab = config.vocab_size as u64;
    let weights = Weights::from_dir(&dir)?;
    let mut model =
        CausalLm::load_quantized(config, &weights, false, quantize, DType::F32, &Device::Cpu)?;
    let load_rss_mib = peak_rss_mib();
    model.gradient_checkpointing = checkpointing;
    model.selective_checkpointing = !flags.contains(&"ops");
    model.checkpoint_chunk_rows = match std::env::var("CHUNK_ROWS") {
        Ok(rows) => rows.parse()?,
        Err(_) => 0,
    };
    let batch: usize = args.get(6).map_or(Ok(1), |s| s.parse())?;
    let lora_dropout: f64 = args.get(7).map_or(Ok(0.0), |s| s.parse())?;
    let lora = LoraConfig {
        r: rank,
        lora_alpha: 2.0 * rank as f64,
        lora_dropout,
        ..LoraConfig::default()
    };
    inject(&mut model, &lora, 0)?;
    let mut opt = AdamW::new(model.trainable(), AdamWParams::default())?;
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..batch * seq_len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), &Device::Cpu)?;
    let ones = Tensor::ones((batch, seq_len), DType::F32, &Device::Cpu)?;
    let (mut timed, mut cpu) = (Vec::new(), 0.0);
    // The first step warms up allocations and is not timed.
    for step in 0..=steps {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let key = (lora_dropout > 0.0).then_some(step as u64);
        let out = model.loss(&ids, &ones, &ones, key)?;
        let grads = backward(&(&out.loss_sum / out.loss_tokens)?)?;
        let grads: Vec<Tensor> = opt
            .params()
            .iter()
            .map(|(_, v)| grads.get(v).cloned().unwrap_or(v.zeros_like().unwrap()))
            .collect();
        let (_, grads) = clip_grad_norm(grads, 1.0)?;
        opt.step(&grads, 1e-4)?;
        if step > 0 {
            timed.push(start.elapsed().as_secs_f64());
            cpu += cpu_seconds() - cpu_start;
        }
    }
    let step_seconds = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": format!("peft-sft {mode}"),
            "load_rss_mib": load_rss_mib,
            "seq_len": seq_len,
            "batch": batch,
            "lora_dropout": lora_dropout,
            "lora_r": rank,
            "checkpoint_chunk_rows": model.checkpoint_chunk_rows,
            "step_seconds": step_seconds,
            "tokens_per_second": (batch * seq_len) as f64 / step_seconds,
            // Cores kept busy over the timed steps (CPU time / wall time).
            "busy_cores": cpu / timed.iter().sum::<f64>().max(f64::MIN_POSITIVE),
            "peak_rss_mib": peak_rss_mib(),
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    );
    Ok(())
}

/// User + system CPU time of the whole process so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
