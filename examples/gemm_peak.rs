//! Measures candle's f32 matmul throughput on this machine (GFLOP/s) for the shapes of a
//! SmolLM2-135M LoRA step: `cargo run --release --example gemm_peak [T]`.

use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let t: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    for (k, n) in [(576, 1536), (1536, 576), (576, 576), (576, 49152 / 8)] {
        let a = Tensor::randn(0f32, 1.0, (t, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
        for _ in 0..3 {
            a.matmul(&b)?;
        }
        let reps = 50;
        let start = Instant::now();
        for _ in 0..reps {
            a.matmul(&b)?;
        }
        let secs = start.elapsed().as_secs_f64();
        let gflops = 2.0 * (t * k * n * reps) as f64 / secs / 1e9;
        println!("[{t}x{k}]·[{k}x{n}]: {gflops:.1} GFLOP/s");
    }
    Ok(())
}
