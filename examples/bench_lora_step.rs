//! Times LoRA training steps (forward, backward, AdamW) on a model folder with random token ids and
//! prints one JSON line: tokens/s, seconds per step and peak RSS. Used by scripts/bench_vs_peft.sh.
//!
//! cargo run --release --example bench_lora_step -- MODEL_DIR [SEQ_LEN[,SEQ_LEN...]] [STEPS] [RANK] [lora|qlora][+gc][+ops][+dora] [BATCH] [LORA_DROPOUT]
//!
//! `qlora` quantizes the decoder's linear weights to NF4 with double quantization while loading;
//! `+gc` turns on gradient checkpointing (`+gc+offload`: its layer inputs in host memory); `+ops` turns off selective checkpointing (the op-by-op
//! graph, for comparison); `+dora` trains DoRA adapters; `BATCH` rows of `SEQ_LEN` tokens each (default 1); `LORA_DROPOUT`
//! (default 0) draws a new mask per step; `load_rss_mib` is the peak RSS once the model is loaded
//! (before any step). The environment variable `CHUNK_ROWS` sets the rows per MLP chunk under
//! gradient checkpointing (default: the model's automatic size).
//!
//! On a GPU: `DEVICE=cuda` (default `cpu`), `DTYPE=bf16` (default f32: the base, activations and
//! LoRA weights in that dtype), and `MODEL_DIR` may be a `config.json` file instead of a folder:
//! the weights are then random (normal, std 0.02), drawn on the device as they load, so an
//! 8B-shaped model needs no files. Steps end with a device synchronisation; peak GPU memory is
//! measured from outside (scripts/gpu_mem_peak.py), the same way as for the PyTorch side.

#[path = "common/process.rs"]
mod process;
use candle_core::{DType, Tensor};
use peft_sft::lora::{inject, LoraConfig};
use peft_sft::model::weights::Weights;
use peft_sft::model::{CausalLm, ModelConfig};
use peft_sft::quant::QuantScheme;
use peft_sft::rng::Rng;
use peft_sft::train::optimizer::{clip_grad_norm, AdamW, AdamWParams};
use process::cpu_seconds;
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
    let seq_lens: Vec<usize> = args
        .get(2)
        .map_or("512", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let steps: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let rank: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;
    let mode = args.get(5).map_or("lora", String::as_str);
    let mut parts = mode.split('+');
    let base = parts.next().unwrap_or("lora");
    let flags: Vec<&str> = parts.collect();
    if let Some(f) = flags
        .iter()
        .find(|f| !["gc", "ops", "offload", "dora"].contains(f))
    {
        anyhow::bail!("mode suffix `+{f}`: expected +gc, +ops, +offload or +dora");
    }
    let checkpointing = flags.contains(&"gc");
    let quantize = match base {
        "lora" => None,
        "qlora" => Some(QuantScheme::qlora()),
        other => anyhow::bail!("mode `{other}`: expected lora or qlora"),
    };
    let device =
        peft_sft::device::select_device(&std::env::var("DEVICE").unwrap_or_else(|_| "cpu".into()))?;
    let dtype = match std::env::var("DTYPE").as_deref() {
        Err(_) | Ok("f32") => DType::F32,
        Ok("bf16") => DType::BF16,
        Ok(other) => anyhow::bail!("DTYPE={other}: expected f32 or bf16"),
    };
    let random = dir.extension().is_some_and(|e| e == "json");
    let config_path = if random {
        dir.clone()
    } else {
        dir.join("config.json")
    };
    let config = ModelConfig::from_file(&config_path)?;
    let vocab = config.vocab_size as u64;
    let weights = if random {
        Weights::random(0.02, &device)
    } else {
        Weights::from_dir(&dir)?
    };
    let load_start = Instant::now();
    let mut model = CausalLm::load_quantized(config, &weights, false, quantize, dtype, &device)?;
    device.synchronize()?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let load_rss_mib = peak_rss_mib();
    model.gradient_checkpointing = checkpointing;
    model.offload_activations = flags.contains(&"offload");
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
        use_dora: flags.contains(&"dora"),
        ..LoraConfig::default()
    };
    inject(&mut model, &lora, 0)?;
    let mut opt = AdamW::new(model.trainable(), AdamWParams::default())?;
    let setup = Setup {
        device: &device,
        mode,
        dtype,
        random,
        load_seconds,
        load_rss_mib,
        batch,
        lora_dropout,
        rank,
        steps,
        vocab,
    };
    // Several lengths (`2048,4096,...`) run one after the other on the same model; the first one
    // that fails (out of memory) is reported and ends the run.
    for seq_len in seq_lens {
        if let Err(e) = time_steps(&mut model, &mut opt, &setup, seq_len) {
            println!(
                "{}",
                serde_json::json!({"impl": format!("peft-sft {mode}"), "seq_len": seq_len, "error": e.to_string()})
            );
            break;
        }
    }
    Ok(())
}

/// What every length's record repeats.
struct Setup<'a> {
    device: &'a candle_core::Device,
    mode: &'a str,
    dtype: DType,
    random: bool,
    load_seconds: f64,
    load_rss_mib: f64,
    batch: usize,
    lora_dropout: f64,
    rank: usize,
    steps: usize,
    vocab: u64,
}

/// Runs `steps + 1` steps of `seq_len` tokens per row (the first one untimed) and prints the record.
fn time_steps(
    model: &mut CausalLm,
    opt: &mut AdamW,
    s: &Setup,
    seq_len: usize,
) -> anyhow::Result<()> {
    let (batch, device) = (s.batch, s.device);
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..batch * seq_len)
        .map(|_| (rng.next_u64() % s.vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), device)?;
    let ones = Tensor::ones((batch, seq_len), DType::F32, device)?;
    let (mut timed, mut cpu) = (Vec::new(), 0.0);
    let mut timed_start = 0.0;
    let mut loss = f64::NAN;
    // The first step warms up allocations and is not timed.
    for step in 0..=s.steps {
        // STEPS=0 times the warm-up step itself (one step per length: a memory measurement).
        let first_timed = usize::from(s.steps > 0);
        if step == first_timed {
            timed_start = epoch_seconds();
        }
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let key = (s.lora_dropout > 0.0).then_some(step as u64);
        let out = model.loss(&ids, &ones, &ones, key)?;
        let mean = (&out.loss_sum / out.loss_tokens)?;
        let grads = mean.backward()?;
        let grads: Vec<Tensor> = opt
            .params()
            .iter()
            .map(|(name, v)| {
                grads
                    .get(v)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no gradient reached {name}"))
            })
            .collect::<anyhow::Result<_>>()?;
        let (_, grads) = clip_grad_norm(grads, 1.0)?;
        opt.step(&grads, 1e-4)?;
        device.synchronize()?;
        loss = mean.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if step >= first_timed {
            timed.push(start.elapsed().as_secs_f64());
            cpu += cpu_seconds() - cpu_start;
        }
    }
    let timed_end = epoch_seconds();
    let step_seconds = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
    let mut sorted = timed.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "impl": format!("peft-sft {}", s.mode),
            "device": format!("{:?}", device.location()),
            "dtype": format!("{:?}", s.dtype),
            "random_weights": s.random,
            "load_seconds": s.load_seconds,
            "load_rss_mib": s.load_rss_mib,
            "seq_len": seq_len,
            "batch": batch,
            "lora_dropout": s.lora_dropout,
            "lora_r": s.rank,
            "checkpoint_chunk_rows": model.checkpoint_chunk_rows,
            "step_seconds": step_seconds,
            "step_seconds_median": median,
            "step_seconds_all": timed,
            "tokens_per_second": (batch * seq_len) as f64 / step_seconds,
            "loss": loss,
            // Cores kept busy over the timed steps (CPU time / wall time).
            "busy_cores": cpu / timed.iter().sum::<f64>().max(f64::MIN_POSITIVE),
            "peak_rss_mib": peak_rss_mib(),
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            // The timed steps' wall-clock window, for an outside GPU memory sampler.
            "timed_start": timed_start,
            "timed_end": timed_end,
        })
    );
    Ok(())
}

/// Seconds since the Unix epoch.
fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
