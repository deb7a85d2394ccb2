//! The CPU flash-attention kernel alone: forward and backward time and GFLOP/s at one length, in
//! the 135M model's attention shape (9 query heads, 3 key/value heads, head width 64), causal.
//!
//! `cargo run --release --example bench_flash -- T [rounds] [heads kv_heads d]`

#[path = "common/process.rs"]
mod process;
use candle_core::{DType, Device};
use peft_sft::ops::cpu::flash::{backward, forward, Dims, Saved};
use peft_sft::ops::mask::AttentionMask;
use process::cpu_seconds;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let t = *args.first().unwrap_or(&2048);
    let rounds = *args.get(1).unwrap_or(&3);
    let (heads, kv_heads, d) = match args.get(2..5) {
        Some(&[h, kv, d]) => (h, kv, d),
        _ => (9, 3, 64),
    };
    let dims = Dims {
        b: 1,
        heads,
        kv_heads,
        t_q: t,
        t_k: t,
        d,
    };
    let fill = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                (x as f32 / (1u32 << 24) as f32) - 0.5
            })
            .collect()
    };
    let q = fill(t * heads * d, 1);
    let k = fill(t * kv_heads * d, 2);
    let v = fill(t * kv_heads * d, 3);
    let g = fill(t * heads * d, 4);
    let mask = AttentionMask::new(t, 0, None, None, DType::F32, &Device::Cpu)?;
    let scale = (1.0 / (d as f64).sqrt()).into();
    // Causal: half of the t × t products; two products forward, five backward (one recomputes).
    let half = (t * t) as f64 / 2.0 * (heads * d) as f64 * 2.0;
    let (fwd_flops, bwd_flops) = (2.0 * half, 5.0 * half);
    for round in 0..rounds {
        let (start, cpu) = (Instant::now(), cpu_seconds());
        let (out, lse) = forward(&q, &k, &v, dims, &mask, scale);
        let f = start.elapsed().as_secs_f64();
        let f_cores = (cpu_seconds() - cpu) / f;
        let (start, cpu) = (Instant::now(), cpu_seconds());
        let saved = Saved {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
        };
        let grads = backward(saved, &g, dims, &mask, scale);
        let b = start.elapsed().as_secs_f64();
        let b_cores = (cpu_seconds() - cpu) / b;
        std::hint::black_box(grads);
        println!(
            "round {round}: T={t} forward {:.1} ms ({:.0} GFLOP/s, {f_cores:.2} cores), backward {:.1} ms ({:.0} GFLOP/s, {b_cores:.2} cores)",
            f * 1e3,
            fwd_flops / f / 1e9,
            b * 1e3,
            bwd_flops / b / 1e9
        );
    }
    Ok(())
}
