//! Forward + backward of each differentiable op at SmolLM2-135M sizes (hidden 576, 9 heads of 64,
//! 3 KV heads, MLP 1536, vocab 49152), sequence length 512, batch 1, f32 on CPU.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use peft_sft::ops::attention::{
    attention, attention_blocked, attention_keeping_probabilities, AttentionMask,
};
use peft_sft::ops::cross_entropy::{lm_head_loss, LossTargets};
use peft_sft::ops::glu::{glu, Activation};
use peft_sft::ops::linear::{frozen_linear, lora_linear, FrozenWeight, LoraBase};
use peft_sft::ops::norm::rms_norm;
use peft_sft::ops::rope::{apply_rope, RopeScaling, RotaryEmbedding};
use peft_sft::quant::{QuantScheme, QuantizedData, QuantizedWeight};
use std::sync::Arc;

const T: usize = 512;
const HIDDEN: usize = 576;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize]) -> Var {
    Var::from_tensor(&randn(shape)).unwrap()
}

fn fwd_bwd(out: Tensor) {
    out.sum_all().unwrap().backward().unwrap();
}

fn bench_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("ops_fwd_bwd_t512");
    g.sample_size(10);

    let (x, w) = (var(&[1, T, HIDDEN]), var(&[HIDDEN]));
    g.bench_function("rms_norm", |b| {
        b.iter(|| fwd_bwd(rms_norm(&x, &w, 1e-5).unwrap()))
    });

    let q = var(&[1, 9, T, 64]);
    let rope = RotaryEmbedding::new(64, 100000.0, &RopeScaling::Default);
    let (cos, sin) = rope
        .tables(&[(0..T as u32).collect()], DType::F32, &Device::Cpu)
        .unwrap();
    g.bench_function("rope", |b| {
        b.iter(|| fwd_bwd(apply_rope(&q, &cos, &sin).unwrap()))
    });

    let (k, v) = (var(&[1, 3, T, 64]), var(&[1, 3, T, 64]));
    let mask = AttentionMask::new(T, 0, None, None, DType::F32, &Device::Cpu).unwrap();
    // `attention` runs the flash kernel on the CPU in f32; the two kernels composed of candle ops
    // (what other devices run) for comparison.
    g.bench_function("attention_gqa", |b| {
        b.iter(|| fwd_bwd(attention(&q, &k, &v, &mask, 0.125).unwrap()))
    });
    g.bench_function("attention_gqa_keeping_probabilities", |b| {
        b.iter(|| fwd_bwd(attention_keeping_probabilities(&q, &k, &v, &mask, 0.125).unwrap()))
    });
    g.bench_function("attention_gqa_blocked", |b| {
        b.iter(|| fwd_bwd(attention_blocked(&q, &k, &v, &mask, 0.125).unwrap()))
    });

    let (gate, up) = (var(&[1, T, 1536]), var(&[1, T, 1536]));
    g.bench_function("swiglu", |b| {
        b.iter(|| fwd_bwd(glu(&gate, &up, Activation::Silu).unwrap()))
    });

    let w_frozen = FrozenWeight::Dense(randn(&[1536, HIDDEN]));
    g.bench_function("frozen_linear_576x1536", |b| {
        b.iter(|| fwd_bwd(frozen_linear(&x, &w_frozen, None).unwrap()))
    });
    let (a, bb) = (var(&[16, HIDDEN]), var(&[1536, 16]));
    g.bench_function("lora_linear_576x1536_r16", |b| {
        b.iter(|| {
            let base = LoraBase {
                weight: &w_frozen,
                bias: None,
                dropout_mask: None,
            };
            fwd_bwd(lora_linear(&x, base, &a, &bb, 2.0).unwrap())
        })
    });

    let h = var(&[T, HIDDEN]);
    let head = randn(&[49152, HIDDEN]);
    let targets = LossTargets {
        target_ids: (0..T as u32).map(|i| (i * 97) % 49152).collect(),
        loss_weight: vec![1.0; T],
        entropy_weight: vec![1.0; T],
        kind: Default::default(),
        softcap: None,
    };
    g.bench_function("lm_head_cross_entropy_v49152", |b| {
        b.iter(|| {
            lm_head_loss(&h, &head, &targets)
                .unwrap()
                .loss_sum
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

/// A frozen 1536x576 linear (SmolLM2-135M's MLP up projection) at T=512 in each storage: dense f32,
/// NF4 with double quantization, GGUF Q8_0 and Q4_0 (dequantized per use), and candle's quantized
/// matmul for the GGUF forward as the alternative.
fn bench_quantized_linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("quantized_linear_t512");
    g.sample_size(10);
    let x = var(&[1, T, HIDDEN]);
    let w = randn(&[1536, HIDDEN]);
    let nf4 =
        QuantizedWeight::quantize(&w, QuantScheme::qlora(), DType::F32, &Device::Cpu).unwrap();
    let gguf = |dtype| QuantizedWeight {
        shape: (1536, HIDDEN),
        data: QuantizedData::Gguf(Arc::new(QTensor::quantize(&w, dtype).unwrap())),
        dtype: DType::F32,
    };
    let weights = [
        ("dense_f32", FrozenWeight::Dense(w.clone())),
        ("nf4_dq", FrozenWeight::Quantized(Arc::new(nf4.clone()))),
        (
            "q8_0",
            FrozenWeight::Quantized(Arc::new(gguf(GgmlDType::Q8_0))),
        ),
        (
            "q4_0",
            FrozenWeight::Quantized(Arc::new(gguf(GgmlDType::Q4_0))),
        ),
    ];
    for (name, weight) in &weights {
        g.bench_function(format!("fwd_bwd_{name}"), |b| {
            b.iter(|| fwd_bwd(frozen_linear(&x, weight, None).unwrap()))
        });
    }
    g.bench_function("dequantize_nf4_dq", |b| {
        b.iter(|| nf4.dequantize().unwrap())
    });
    let xs = x.as_tensor().reshape((T, HIDDEN)).unwrap();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let qmm = QMatMul::from_arc(q.clone()).unwrap();
        g.bench_function(format!("fwd_qmatmul_{dtype:?}"), |b| {
            b.iter(|| qmm.forward(&xs).unwrap())
        });
        g.bench_function(format!("fwd_dequant_matmul_{dtype:?}"), |b| {
            b.iter(|| {
                let d = q.dequantize(&Device::Cpu).unwrap();
                xs.matmul(&d.t().unwrap()).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_ops, bench_quantized_linear);
criterion_main!(benches);
