//! Forward + backward of each differentiable op at SmolLM2-135M sizes (hidden 576, 9 heads of 64,
//! 3 KV heads, MLP 1536, vocab 49152), sequence length 512, batch 1, f32 on CPU.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use peft_sft::ops::attention::{attention, AttentionMask};
use peft_sft::ops::cross_entropy::{lm_head_loss, LossTargets};
use peft_sft::ops::linear::{frozen_linear, lora_linear, FrozenWeight, LoraBase};
use peft_sft::ops::norm::rms_norm;
use peft_sft::ops::rope::{apply_rope, RopeScaling, RotaryEmbedding};
use peft_sft::ops::swiglu::swiglu;

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
    g.bench_function("attention_gqa", |b| {
        b.iter(|| fwd_bwd(attention(&q, &k, &v, &mask, 0.125).unwrap()))
    });

    let (gate, up) = (var(&[1, T, 1536]), var(&[1, T, 1536]));
    g.bench_function("swiglu", |b| {
        b.iter(|| fwd_bwd(swiglu(&gate, &up).unwrap()))
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

criterion_group!(benches, bench_ops);
criterion_main!(benches);
