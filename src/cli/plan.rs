//! `peft-sft plan`: predicts the peak memory of a training step (per device) from a model's
//! config.json and the training flags, with a breakdown, before anything is loaded or downloaded
//! beyond the config.

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::config::SftConfig;
use peft_sft::hub::resolve_config;
use peft_sft::lora::TargetModules;
use peft_sft::memory::{
    cpu_baseline_bytes, largest_max_length, plan, Breakdown, MemoryPlan, Method, Phase, PlanDevice,
    PlanOptions, CUDA_BASELINE_BYTES,
};
use peft_sft::model::load::default_dtype;
use peft_sft::model::ModelConfig;

/// The `plan` subcommand's definition.
pub fn command() -> Command {
    // train's defaults.
    let train = SftConfig::default();
    Command::new("plan")
        .about("Predict the peak memory of a training step (weights, LoRA + optimizer, activations, workspace)")
        .arg(
            Arg::new("model")
                .long("model")
                .required(true)
                .help("config.json, a model folder, or a Hub id (only config.json is downloaded)"),
        )
        .arg(
            Arg::new("qlora")
                .long("qlora")
                .visible_alias("load-in-4bit")
                .action(ArgAction::SetTrue)
                .help("NF4 + double-quantized base linears (LoRA on top)"),
        )
        .arg(
            Arg::new("full")
                .long("full")
                .action(ArgAction::SetTrue)
                .conflicts_with("qlora")
                .help("Full fine-tuning (every weight trains)"),
        )
        .arg(
            Arg::new("max_length")
                .long("max-length")
                .default_value(train.max_length.to_string())
                .value_parser(value_parser!(usize))
                .help("Tokens per row (the planner assumes full rows)"),
        )
        .arg(
            Arg::new("lora_r")
                .long("lora-r")
                .default_value(train.lora_r.to_string())
                .value_parser(value_parser!(usize))
                .help("LoRA rank"),
        )
        .arg(
            Arg::new("batch_size")
                .long("per-device-train-batch-size")
                .default_value(train.per_device_train_batch_size.to_string())
                .value_parser(value_parser!(usize))
                .help("Rows per micro-batch"),
        )
        .arg(
            Arg::new("gradient_checkpointing")
                .long("gradient-checkpointing")
                .action(ArgAction::SetTrue)
                .help("Keep only each layer's input; recompute the layer in the backward pass"),
        )
        .arg(
            Arg::new("offload_activations")
                .long("offload-activations")
                .action(ArgAction::SetTrue)
                .help("With --gradient-checkpointing on cuda: keep the layer inputs in host memory"),
        )
        .arg(
            Arg::new("lora_target_modules")
                .long("lora-target-modules")
                .default_value(train.lora_target_modules.join(","))
                .help("all-linear, a regex, or a comma-separated list of module names"),
        )
        .arg(
            Arg::new("lora_dropout")
                .long("lora-dropout")
                .default_value(train.lora_dropout.to_string())
                .value_parser(value_parser!(f64))
                .help("LoRA dropout (0 keeps no masks)"),
        )
        .arg(
            Arg::new("use_dora")
                .long("use-dora")
                .action(ArgAction::SetTrue)
                .help("DoRA adapters (a magnitude per output row; each adapted projection's unscaled output kept)"),
        )
        .arg(
            Arg::new("device")
                .long("device")
                .default_value("cpu")
                .value_parser(["cpu", "cuda"])
                .help("cpu (RSS) or cuda (one GPU's memory)"),
        )
        .arg(
            Arg::new("dtype")
                .long("dtype")
                .value_parser(["f32", "bf16", "f16"])
                .help("Compute dtype [f32 on cpu; the checkpoint's dtype on cuda, as train picks]"),
        )
        .arg(
            Arg::new("baseline_mib")
                .long("baseline-mib")
                .value_parser(value_parser!(f64))
                .help("Fixed process memory [cpu: 26 + 1.2 KB per vocabulary entry (measured); cuda: 512 (assumed)]"),
        )
        .arg(
            Arg::new("budget_gib")
                .long("budget-gib")
                .value_parser(value_parser!(f64))
                .help("Also report the largest --max-length whose peak fits in this many GiB"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print one JSON object"),
        )
}

/// The plan's options from the flags.
fn options(m: &ArgMatches, config: &ModelConfig) -> anyhow::Result<PlanOptions> {
    let method = if m.get_flag("qlora") {
        Method::Qlora
    } else if m.get_flag("full") {
        Method::Full
    } else {
        Method::Lora
    };
    let device = match super::text(m, "device") {
        "cuda" => PlanDevice::Cuda,
        _ => PlanDevice::Cpu,
    };
    let dtype = match m.get_one::<String>("dtype").map(String::as_str) {
        Some("f32") => candle_core::DType::F32,
        Some("bf16") => candle_core::DType::BF16,
        Some("f16") => candle_core::DType::F16,
        // As `train` picks it.
        _ => default_dtype(config, device == PlanDevice::Cuda),
    };
    let baseline_bytes = match m.get_one::<f64>("baseline_mib") {
        Some(mib) => (mib * 1048576.0) as u64,
        None if device == PlanDevice::Cuda => CUDA_BASELINE_BYTES,
        None => cpu_baseline_bytes(config),
    };
    let targets: Vec<String> = super::text(m, "lora_target_modules")
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    // train's defaults where a flag is absent.
    let train = SftConfig::default();
    Ok(PlanOptions {
        method,
        max_length: m
            .get_one::<usize>("max_length")
            .copied()
            .unwrap_or(train.max_length),
        batch_size: m
            .get_one::<usize>("batch_size")
            .copied()
            .unwrap_or(train.per_device_train_batch_size),
        lora_r: m
            .get_one::<usize>("lora_r")
            .copied()
            .unwrap_or(train.lora_r),
        target_modules: TargetModules::from_names(&targets),
        lora_dropout: m
            .get_one::<f64>("lora_dropout")
            .copied()
            .unwrap_or(train.lora_dropout),
        use_dora: m.get_flag("use_dora"),
        gradient_checkpointing: m.get_flag("gradient_checkpointing"),
        offload_activations: m.get_flag("offload_activations"),
        checkpoint_chunk_rows: 0,
        dtype,
        device,
        baseline_bytes,
    })
}

/// `bytes` as GiB (≥ 1 GiB) or MiB.
fn human(bytes: u64) -> String {
    let mib = bytes as f64 / 1048576.0;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / 1048576.0 * 10.0).round() / 10.0
}

fn breakdown_json(b: &Breakdown) -> serde_json::Value {
    serde_json::json!({
        "weights_mib": mib(b.weights),
        "trainable_mib": mib(b.trainable),
        "activations_mib": mib(b.activations),
        "workspace_mib": mib(b.workspace),
        "baseline_mib": mib(b.baseline),
        "total_mib": mib(b.total()),
    })
}

fn print_table(spec: &str, o: &PlanOptions, p: &MemoryPlan, fit: Option<(f64, Option<usize>)>) {
    let dtype = format!("{:?}", o.dtype).to_lowercase();
    let device = match o.device {
        PlanDevice::Cpu => "cpu (peak RSS)",
        PlanDevice::Cuda => "cuda (one device's memory)",
    };
    let method = match o.method {
        Method::Full => o.method.name().to_string(),
        _ if o.use_dora => format!("{} (DoRA) r={}", o.method.name(), o.lora_r),
        _ => format!("{} r={}", o.method.name(), o.lora_r),
    };
    println!(
        "{spec}: {method}, --max-length {}, batch {}{}, {dtype} on {device}",
        o.max_length,
        o.batch_size,
        match (o.gradient_checkpointing, o.offload_activations) {
            (true, true) => ", gradient checkpointing, layer inputs offloaded",
            (true, false) => ", gradient checkpointing",
            _ => "",
        }
    );
    let b = &p.peak;
    let trainable = if o.method == Method::Full {
        format!(
            "{:.1} M params: gradients + AdamW moments",
            p.params.total as f64 / 1e6
        )
    } else {
        let grads = if p.peak_phase == Phase::Loss {
            ""
        } else {
            " + gradients"
        };
        format!(
            "{:.2} M LoRA params{grads} + AdamW moments",
            p.params.lora as f64 / 1e6
        )
    };
    let weights = if o.method == Method::Qlora {
        format!(
            "{:.1} M linear params in NF4+DQ, {:.1} M in {dtype}",
            p.params.linear as f64 / 1e6,
            (p.params.total - p.params.linear) as f64 / 1e6
        )
    } else {
        format!("{:.1} M params in {dtype}", p.params.total as f64 / 1e6)
    };
    let attention = if p.attention_keeps_probabilities {
        "attention probabilities kept"
    } else {
        "attention probabilities recomputed"
    };
    let activations = if o.gradient_checkpointing {
        let inputs = if o.offload_activations && o.device == PlanDevice::Cuda {
            "first layer input (the rest in host memory)"
        } else {
            "layer inputs"
        };
        format!(
            "{inputs} + one recomputed layer of {}; {attention}",
            human(p.layer_activation_bytes)
        )
    } else {
        format!("{} per layer; {attention}", human(p.layer_activation_bytes))
    };
    let baseline = match o.device {
        PlanDevice::Cpu => "process: binary, allocator, dataset, tokenizer",
        PlanDevice::Cuda => "CUDA context and cuBLAS workspace (assumed)",
    };
    let rows = [
        ("base weights", b.weights, weights),
        ("LoRA + optimizer", b.trainable, trainable),
        ("activations", b.activations, activations),
        (
            "workspace",
            b.workspace,
            format!("transient buffers of the {} phase", p.peak_phase.name()),
        ),
        ("baseline", b.baseline, baseline.into()),
    ];
    for (name, bytes, note) in rows {
        println!("  {name:<18} {:>11}   {note}", human(bytes));
    }
    println!(
        "  {:<18} {:>11}   peak in the {} phase",
        "total",
        human(b.total()),
        p.peak_phase.name()
    );
    let others: Vec<String> = p
        .phases
        .iter()
        .map(|(ph, b)| format!("{} {}", ph.name(), human(b.total())))
        .collect();
    println!("  phases: {}", others.join(", "));
    if let Some((gib, longest)) = fit {
        match longest {
            Some(t) => println!("  largest --max-length that fits in {gib} GiB: {t}"),
            None => println!("  nothing fits in {gib} GiB: the weights alone are larger"),
        }
    }
}

/// Runs `peft-sft plan`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let spec = super::text(m, "model");
    let config = ModelConfig::from_file(&resolve_config(spec)?)?;
    let o = options(m, &config)?;
    if o.offload_activations && !o.gradient_checkpointing {
        anyhow::bail!(
            "--offload-activations is planned with --gradient-checkpointing only (the layer inputs \
             wait in host memory); add --gradient-checkpointing or drop --offload-activations"
        );
    }
    let p = plan(&config, &o)?;
    let fit = match m.get_one::<f64>("budget_gib") {
        Some(&gib) => Some((
            gib,
            largest_max_length(&config, &o, (gib * 1073741824.0) as u64)?,
        )),
        None => None,
    };
    if m.get_flag("json") {
        let phases: serde_json::Map<String, serde_json::Value> = p
            .phases
            .iter()
            .map(|(ph, b)| (ph.name().to_string(), breakdown_json(b)))
            .collect();
        let mut out = serde_json::json!({
            "model": spec,
            "method": o.method.name(),
            "max_length": o.max_length,
            "per_device_train_batch_size": o.batch_size,
            "lora_r": o.lora_r,
            "gradient_checkpointing": o.gradient_checkpointing,
            "offload_activations": o.offload_activations,
            "lora_dropout": o.lora_dropout,
            "use_dora": o.use_dora,
            "device": if o.device == PlanDevice::Cuda { "cuda" } else { "cpu" },
            "dtype": format!("{:?}", o.dtype).to_lowercase(),
            "params": p.params.total,
            "quantized_params": if o.method == Method::Qlora { p.params.linear } else { 0 },
            "lora_params": p.params.lora,
            "layer_activations_mib": mib(p.layer_activation_bytes),
            "attention_keeps_probabilities": p.attention_keeps_probabilities,
            "peak_phase": p.peak_phase.name(),
            "peak": breakdown_json(&p.peak),
            "total_mib": mib(p.total()),
            "phases": phases,
        });
        if let Some((gib, longest)) = fit {
            out["budget_gib"] = serde_json::json!(gib);
            out["largest_max_length"] = serde_json::json!(longest);
        }
        println!("{out}");
    } else {
        print_table(spec, &o, &p, fit);
    }
    Ok(())
}
