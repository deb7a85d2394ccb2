//! bitsandbytes parity: NF4/FP4 quantization (packed bytes, absmax, double-quantized statistics)
//! and dequantization equal what bitsandbytes produced for the same inputs (fixtures written by
//! `scripts/make_qlora_fixtures.py`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, tensors};
use peft_sft::quant::blockwise::quantize_8bit;
use peft_sft::quant::codebook::{dynamic_map, FP4, NF4};
use peft_sft::quant::{Absmax, FourBit, FourBitType};
use std::collections::HashMap;

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Panics with the first differing position, if any.
fn same<T: PartialEq + std::fmt::Debug>(what: &str, ours: &[T], expected: &[T]) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
    let bad: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i] != expected[i])
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} values differ; first at {i}: ours {:?}, expected {:?}",
            bad.len(),
            ours.len(),
            ours[i],
            expected[i]
        );
    }
}

fn nf4_fixture() -> HashMap<String, Tensor> {
    tensors(&fixture("qlora/nf4.safetensors"))
}

/// Cases present in the fixture: `<case>.input`.
fn cases(f: &HashMap<String, Tensor>) -> Vec<String> {
    let mut c: Vec<String> = f
        .keys()
        .filter_map(|k| k.strip_suffix(".input").map(str::to_string))
        .filter(|c| c != "blockwise8")
        .collect();
    c.sort();
    assert!(c.len() >= 4, "fixture has too few cases: {c:?}");
    c
}

#[test]
fn code_tables_equal_bitsandbytes() {
    let f = nf4_fixture();
    same("nf4", &NF4, &f32s(&f["nf4.code"]));
    same("fp4", &FP4, &f32s(&f["fp4.code"]));
    same("dynamic", &dynamic_map(), &f32s(&f["dynamic.code"]));
}

#[test]
fn four_bit_quantization_is_bit_exact() {
    let f = nf4_fixture();
    for case in cases(&f) {
        let input = &f[&format!("{case}.input")];
        let values = f32s(input);
        for q in [FourBitType::Nf4, FourBitType::Fp4] {
            let key = |s: &str| format!("{case}.{}.{s}", q.name());
            for double in [false, true] {
                let w =
                    FourBit::quantize(&values, input.dtype(), q, 64, double, &Device::Cpu).unwrap();
                let packed_key = if double {
                    key("dq.packed")
                } else {
                    key("packed")
                };
                let what = format!("{case} {} double={double}", q.name());
                same(
                    &format!("{what} packed"),
                    &bytes(&w.packed),
                    &bytes(&f[&packed_key]),
                );
                let dequant_key = if double {
                    key("dq.dequant")
                } else {
                    key("dequant")
                };
                match &w.absmax {
                    Absmax::Plain(a) => same(
                        &format!("{what} absmax"),
                        &f32s(a),
                        &f32s(&f[&key("absmax")]),
                    ),
                    Absmax::Nested(n) => {
                        same(
                            &format!("{what} offset"),
                            &[n.offset],
                            &f32s(&f[&key("dq.offset")]),
                        );
                        same(
                            &format!("{what} nested absmax"),
                            &f32s(&n.absmax),
                            &f32s(&f[&key("dq.nested_absmax")]),
                        );
                        same(
                            &format!("{what} absmax codes"),
                            &bytes(&n.codes),
                            &bytes(&f[&key("dq.absmax")]),
                        );
                    }
                }
                let ours = w.dequantize(values.len()).unwrap();
                let expected = &f[&dequant_key];
                assert_eq!(ours.dtype(), expected.dtype(), "{case}");
                same(
                    &format!("{what} dequantized"),
                    &f32s(&ours),
                    &f32s(expected),
                );
            }
        }
    }
}

#[test]
fn candle_op_dequantization_equals_the_cpu_kernel() {
    // The device-generic path (index_select on a byte table) is what non-CPU devices run; on the
    // CPU it must compute exactly the same values.
    let f = nf4_fixture();
    for case in cases(&f) {
        let values = f32s(&f[&format!("{case}.input")]);
        let w = FourBit::quantize(
            &values,
            DType::F32,
            FourBitType::Nf4,
            64,
            true,
            &Device::Cpu,
        )
        .unwrap();
        let fast = w.dequantize(values.len()).unwrap();
        let generic = w.dequantize_composed(values.len()).unwrap();
        same(&case, &f32s(&fast), &f32s(&generic));
    }
}

#[test]
fn eight_bit_blockwise_quantization_follows_the_lookup_table() {
    // bitsandbytes' CPU kernel bins values into a 65536-entry table instead of searching the
    // nearest code exactly; the fixture has values where the two disagree.
    let f = nf4_fixture();
    let values = f32s(&f["blockwise8.input"]);
    let (codes, absmax) = quantize_8bit(&values, 256, &dynamic_map());
    same("absmax", &absmax, &f32s(&f["blockwise8.absmax"]));
    same("codes", &codes, &bytes(&f["blockwise8.codes"]));
    let exact = bytes(&f["blockwise8.exact_nearest_codes"]);
    assert!(
        codes.iter().zip(&exact).any(|(a, b)| a != b),
        "the fixture should contain values where the table and an exact search disagree"
    );
}

#[test]
fn nf4_with_double_quantization_costs_about_4_13_bits_per_weight() {
    let values: Vec<f32> = (0..1024 * 1024u64)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let w = FourBit::quantize(
        &values,
        DType::F32,
        FourBitType::Nf4,
        64,
        true,
        &Device::Cpu,
    )
    .unwrap();
    let bits = w.bytes() as f64 * 8.0 / values.len() as f64;
    assert!((4.12..4.14).contains(&bits), "{bits} bits per weight");
    let plain = FourBit::quantize(
        &values,
        DType::F32,
        FourBitType::Nf4,
        64,
        false,
        &Device::Cpu,
    )
    .unwrap();
    let bits = plain.bytes() as f64 * 8.0 / values.len() as f64;
    assert!(
        (4.49..4.51).contains(&bits),
        "{bits} bits per weight without double quantization"
    );
}
