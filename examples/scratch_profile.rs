use candle_core::{Device, Tensor};
use std::time::Instant;
fn t<F: FnMut()>(name: &str, n: usize, mut f: F) {
    f();
    let s = Instant::now();
    for _ in 0..n { f(); }
    println!("{name}: {:.3} ms", s.elapsed().as_secs_f64() / n as f64 * 1e3);
}
fn main() {
    let d = Device::Cpu;
    let a = Tensor::randn(0f32, 1., (512, 1536), &d).unwrap();
    let b = Tensor::randn(0f32, 1., (512, 1536), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (1536,), &d).unwrap();
    t("add", 20, || { (&a + &b).unwrap(); });
    t("affine", 20, || { a.affine(2.0, 0.0).unwrap(); });
    t("mul", 20, || { (&a * &b).unwrap(); });
    t("broadcast_mul row", 20, || { a.broadcast_mul(&w).unwrap(); });
    t("silu", 20, || { candle_nn::ops::silu(&a).unwrap(); });
    t("sigmoid", 20, || { candle_nn::ops::sigmoid(&a).unwrap(); });
    t("sqr", 20, || { a.sqr().unwrap(); });
    t("sum_keepdim(1)", 20, || { a.sum_keepdim(1).unwrap(); });
    t("contiguous of transpose", 20, || { a.t().unwrap().contiguous().unwrap(); });
    t("rms_norm fused", 20, || { candle_nn::ops::rms_norm(&a, &w, 1e-5).unwrap(); });
    let q = Tensor::randn(0f32, 1., (1, 512, 9, 64), &d).unwrap();
    t("transpose(1,2).contiguous q", 20, || { q.transpose(1, 2).unwrap().contiguous().unwrap(); });
}
