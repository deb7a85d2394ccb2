//! Each differentiable op's forward and gradients equal those of the same function composed from
//! candle primitives (whose backward candle derives), within 1e-5 relative, in f32.

mod common;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use common::rel_err;
use peft_sft::ops::attention::{
    attention, attention_blocked, attention_keeping_probabilities, attention_tokens, AttentionMask,
    Scores,
};
use peft_sft::ops::cpu::flash::attention_flash_cpu;
use peft_sft::ops::cross_entropy::{lm_head_loss, LossTargets};
use peft_sft::ops::glu::{glu, Activation};
use peft_sft::ops::linear::{frozen_linear, lora_linear, FrozenWeight, LoraBase};
use peft_sft::ops::norm::rms_norm;
use peft_sft::ops::residual::residual_add;
use peft_sft::ops::rope::{apply_rope, apply_rope_tokens, RopeScaling, RotaryEmbedding};

fn randn(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
}

fn var(shape: &[usize]) -> Result<Var> {
    Var::from_tensor(&randn(shape)?)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let e = rel_err(a, b);
    assert!(e < 1e-5, "{what}: relative error {e}");
}

/// Compares `ours` with `reference` (same inputs) on value and on the gradients of
/// `sum(out * probe)` with respect to `inputs`.
fn check(name: &str, inputs: &[&Var], ours: &Tensor, reference: &Tensor) -> Result<()> {
    assert_close(&format!("{name} forward"), ours, reference);
    let probe = randn(ours.dims())?.to_dtype(ours.dtype())?;
    let g_ours = (ours * &probe)?.sum_all()?.backward()?;
    let g_ref = (reference * &probe)?.sum_all()?.backward()?;
    for (i, v) in inputs.iter().enumerate() {
        let a = g_ours
            .get(v)
            .unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        let b = g_ref.get(v).expect("reference gradient");
        assert_close(&format!("{name} grad {i}"), a, b);
    }
    Ok(())
}

#[test]
fn rms_norm_matches_composed() -> Result<()> {
    let (x, w) = (var(&[2, 5, 16])?, var(&[16])?);
    let ours = rms_norm(&x, &w, 1e-6)?;
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
        .sqrt()?
        .recip()?;
    let reference = x.broadcast_mul(&inv)?.broadcast_mul(&w)?;
    check("rms_norm", &[&x, &w], &ours, &reference)
}

#[test]
fn rope_matches_composed() -> Result<()> {
    let x = var(&[2, 3, 7, 8])?;
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 4.0,
    };
    let rope = RotaryEmbedding::new(8, 10000.0, &scaling);
    let (cos, sin) = rope.tables(&[(3..10).collect()], DType::F32, &Device::Cpu)?;
    let ours = apply_rope(&x, &cos, &sin)?;
    let reference = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)?;
    check("rope", &[&x], &ours, &reference)
}

#[test]
fn token_major_rope_and_attention_match_composed() -> Result<()> {
    // The layout training uses on the CPU: [b, t, heads, d], no heads-first copies.
    let (q, k, v) = (
        var(&[2, 70, 4, 8])?,
        var(&[2, 70, 2, 8])?,
        var(&[2, 70, 2, 8])?,
    );
    let rope = RotaryEmbedding::new(8, 10000.0, &RopeScaling::Default);
    let (cos, sin) = rope.tables(&[(0..70).collect()], DType::F32, &Device::Cpu)?;
    let ours = apply_rope_tokens(&q, &cos, &sin)?;
    let heads_first =
        candle_nn::rotary_emb::rope_slow(&q.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
    check("rope tokens", &[&q], &ours, &heads_first.transpose(1, 2)?)?;
    let mask = AttentionMask::new(70, 0, Some(30), None, DType::F32, &Device::Cpu)?;
    let ours = attention_tokens(&q, &k, &v, &mask, 0.35)?;
    let hf = |x: &Var| x.transpose(1, 2).and_then(|x| x.contiguous());
    let reference = composed_attention(
        &hf(&q)?,
        &hf(&k)?,
        &hf(&v)?,
        &mask_bias(70, Some(30), None),
        0.35,
    )?;
    check(
        "attention tokens",
        &[&q, &k, &v],
        &ours,
        &reference.transpose(1, 2)?,
    )
}

#[test]
fn swiglu_matches_composed() -> Result<()> {
    let (g, u) = (var(&[3, 4, 10])?, var(&[3, 4, 10])?);
    let ours = glu(&g, &u, Activation::Silu)?;
    let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
    let reference = ((g.as_tensor() * sigmoid)? * u.as_tensor())?;
    check("swiglu", &[&g, &u], &ours, &reference)
}

/// PyTorch's `gelu(approximate="tanh")` from candle primitives.
fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
    (x * (inner.tanh()? + 1.0)?)? * 0.5
}

#[test]
fn geglu_matches_composed_natively_and_in_candle_ops() -> Result<()> {
    // f32 on the CPU runs the native kernel; f64 the explicit formula in candle ops.
    let (g, u) = (var(&[3, 4, 10])?, var(&[3, 4, 10])?);
    // Gates out to ±6, where the tanh saturates.
    let g = Var::from_tensor(&(g.as_tensor() * 3.0)?)?;
    let ours = glu(&g, &u, Activation::GeluTanh)?;
    let reference = (gelu_tanh(g.as_tensor())? * u.as_tensor())?;
    check("geglu", &[&g, &u], &ours, &reference)?;
    let (g64, u64) = (
        Var::from_tensor(&g.to_dtype(DType::F64)?)?,
        Var::from_tensor(&u.to_dtype(DType::F64)?)?,
    );
    let ours = glu(&g64, &u64, Activation::GeluTanh)?;
    let reference = (gelu_tanh(g64.as_tensor())? * u64.as_tensor())?;
    check("geglu f64", &[&g64, &u64], &ours, &reference)
}

#[test]
fn soft_capped_attention_matches_composed_in_every_kernel() -> Result<()> {
    // Gemma 2's attn_logit_softcapping, small enough to bend most scores; several flash tiles
    // and runs and blocked-kernel blocks, a window and packed documents.
    let t = 600;
    let docs: Vec<Vec<u32>> = vec![(0..t as u32).map(|i| u32::from(i >= 170)).collect()];
    let scores = Scores {
        scale: 0.35,
        softcap: Some(0.7),
    };
    for (window, documents) in [(None, None), (Some(100), Some(docs.as_slice()))] {
        let (q, k, v) = (
            var(&[1, 4, t, 8])?,
            var(&[1, 2, t, 8])?,
            var(&[1, 2, t, 8])?,
        );
        let mask = AttentionMask::new(t, 0, window, documents, DType::F32, &Device::Cpu)?;
        let reference = {
            let n_rep = 2;
            let rep = |x: &Tensor| -> Result<Tensor> {
                let (b, h, t, d) = x.dims4()?;
                x.unsqueeze(2)?
                    .expand((b, h, n_rep, t, d))?
                    .reshape((b, h * n_rep, t, d))
            };
            let raw = (q.matmul(&rep(&k)?.t()?)? * 0.35)?;
            let capped = ((raw / 0.7)?.tanh()? * 0.7)?;
            let s = capped.broadcast_add(&mask_bias(t, window, documents))?;
            candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&rep(&v)?)?
        };
        let flash = attention_flash_cpu(&q, &k, &v, &mask, scores)?;
        check("capped flash attention", &[&q, &k, &v], &flash, &reference)?;
        let blocked = attention_blocked(&q, &k, &v, &mask, scores)?;
        check(
            "capped blocked attention",
            &[&q, &k, &v],
            &blocked,
            &reference,
        )?;
        let kept = attention_keeping_probabilities(&q, &k, &v, &mask, scores)?;
        check(
            "capped reference attention",
            &[&q, &k, &v],
            &kept,
            &reference,
        )?;
        let uncapped = attention_flash_cpu(&q, &k, &v, &mask, 0.35)?;
        assert!(
            rel_err(&uncapped, &reference) > 1e-2,
            "the cap changes the output"
        );
    }
    Ok(())
}

fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    let rep = |x: &Tensor| -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, h, n_rep, t, d))?
            .reshape((b, h * n_rep, t, d))
    };
    let scores = (q.matmul(&rep(k)?.t()?)? * scale)?.broadcast_add(bias)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&rep(v)?)
}

fn mask_bias(t: usize, window: Option<usize>, docs: Option<&[Vec<u32>]>) -> Tensor {
    let rows = docs.map_or(1, |d| d.len());
    let mut v = Vec::new();
    for r in 0..rows {
        for i in 0..t {
            for j in 0..t {
                let ok = j <= i
                    && window.is_none_or(|w| i - j < w)
                    && docs.is_none_or(|d| d[r][i] == d[r][j]);
                v.push(if ok { 0f32 } else { -1e30 });
            }
        }
    }
    Tensor::from_vec(v, (rows, 1, t, t), &Device::Cpu).unwrap()
}

#[test]
fn attention_matches_composed_with_gqa_window_and_documents() -> Result<()> {
    let docs = vec![
        vec![0, 0, 0, 1, 1, 1, 1, 2, 2],
        vec![0, 0, 0, 0, 0, 1, 1, 1, 1],
    ];
    let cases = [(None, None), (Some(3), None), (None, Some(docs.as_slice()))];
    for (window, documents) in cases {
        let (q, k, v) = (
            var(&[2, 4, 9, 8])?,
            var(&[2, 2, 9, 8])?,
            var(&[2, 2, 9, 8])?,
        );
        let mask = AttentionMask::new(9, 0, window, documents, DType::F32, &Device::Cpu)?;
        let ours = attention(&q, &k, &v, &mask, 0.35)?;
        let reference = composed_attention(&q, &k, &v, &mask_bias(9, window, documents), 0.35)?;
        check("attention", &[&q, &k, &v], &ours, &reference)?;
    }
    Ok(())
}

#[test]
fn lora_linear_matches_composed_and_leaves_the_base_alone() -> Result<()> {
    // Rank 4 takes the narrow kernels on the CPU; rank 72 (past their width) candle's ops.
    for rank in [4, 72] {
        lora_linear_case(rank)?;
    }
    Ok(())
}

fn lora_linear_case(rank: usize) -> Result<()> {
    let x = var(&[2, 3, 12])?;
    let (w, bias) = (randn(&[10, 12])?, randn(&[10])?);
    let (a, b) = (var(&[rank, 12])?, var(&[10, rank])?);
    let mask = Tensor::from_vec(
        (0..72)
            .map(|i| if i % 5 == 0 { 0f32 } else { 1.25 })
            .collect::<Vec<_>>(),
        (6, 12),
        &Device::Cpu,
    )?;
    let frozen = FrozenWeight::Dense(w.clone());
    let base = LoraBase {
        weight: &frozen,
        bias: Some(&bias),
        dropout_mask: Some(mask.clone()),
    };
    let ours = lora_linear(&x, base, &a, &b, 0.5)?;
    let x2 = x.reshape((6, 12))?;
    let reference = (x2.matmul(&w.t()?)?.broadcast_add(&bias)?
        + (x2 * &mask)?
            .matmul(&a.t()?)?
            .matmul(&b.t()?)?
            .affine(0.5, 0.0)?)?
    .reshape((2, 3, 10))?;
    check(
        &format!("lora_linear r={rank}"),
        &[&x, &a, &b],
        &ours,
        &reference,
    )?;
    let grads = (ours * 1.0)?.sum_all()?.backward()?;
    assert!(grads.get(&w).is_none() && grads.get(&bias).is_none());
    Ok(())
}

#[test]
fn frozen_linear_returns_only_the_input_gradient() -> Result<()> {
    let x = var(&[3, 2, 6])?;
    let w = randn(&[5, 6])?;
    let ours = frozen_linear(&x, &FrozenWeight::Dense(w.clone()), None)?;
    let reference = x.broadcast_matmul(&w.t()?)?;
    check("frozen_linear", &[&x], &ours, &reference)?;
    let grads = ours.sum_all()?.backward()?;
    assert_eq!(grads.get_ids().count(), 1, "only x has a gradient");
    Ok(())
}

#[test]
fn residual_add_gives_no_gradient_to_an_untracked_side() -> Result<()> {
    let (a, b) = (randn(&[2, 3])?, var(&[2, 3])?);
    let out = residual_add(&a, &b)?;
    let grads = out.sum_all()?.backward()?;
    assert_eq!(grads.get_ids().count(), 1);
    assert_close(
        "residual grad",
        grads.get(&b).unwrap(),
        &Tensor::ones((2, 3), DType::F32, &Device::Cpu)?,
    );
    Ok(())
}

#[test]
fn lm_head_loss_matches_composed_cross_entropy() -> Result<()> {
    let (h, w) = (var(&[7, 8])?, var(&[11, 8])?);
    let targets = LossTargets {
        target_ids: vec![1, 4, 10, 0, 3, 3, 9],
        loss_weight: vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
        entropy_weight: vec![1.0; 7],
        kind: Default::default(),
        softcap: None,
    };
    let out = lm_head_loss(&h, &w, &targets)?;
    let logits = h.matmul(&w.t()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let ids = Tensor::new(targets.target_ids.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
    let weights = Tensor::new(targets.loss_weight.as_slice(), &Device::Cpu)?;
    let reference = (logp.gather(&ids, 1)?.squeeze(1)?.neg()? * &weights)?.sum_all()?;
    assert_close("loss", &out.loss_sum, &reference);
    let g_ours = out.loss_sum.backward()?;
    let g_ref = reference.backward()?;
    assert_close(
        "loss grad h",
        g_ours.get(&h).unwrap(),
        g_ref.get(&h).unwrap(),
    );
    assert_close(
        "loss grad w",
        g_ours.get(&w).unwrap(),
        g_ref.get(&w).unwrap(),
    );
    assert_eq!(out.loss_tokens, 5.0);
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let entropy = (probs * logp)?.sum_all()?.neg()?.to_scalar::<f32>()? as f64;
    assert!((out.entropy_sum - entropy).abs() < 1e-4 * entropy.abs().max(1.0));
    let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let correct = (0..7)
        .filter(|&i| targets.loss_weight[i] > 0.0 && argmax[i] == targets.target_ids[i])
        .count();
    assert_eq!(out.correct_tokens, correct as f64);
    Ok(())
}

#[test]
fn attention_matches_composed_across_several_blocks() -> Result<()> {
    // Longer than two of the kernel's 256-row blocks, so key ranges, windows that cross block
    // edges and the key-block backward are all exercised.
    let t = 549;
    let docs: Vec<Vec<u32>> = vec![(0..t as u32).map(|i| i / 200).collect()];
    let cases = [
        (None, None),
        (Some(300), None),
        (Some(40), Some(docs.as_slice())),
    ];
    for (window, documents) in cases {
        let (q, k, v) = (
            var(&[1, 4, t, 8])?,
            var(&[1, 2, t, 8])?,
            var(&[1, 2, t, 8])?,
        );
        let mask = AttentionMask::new(t, 0, window, documents, DType::F32, &Device::Cpu)?;
        let reference = composed_attention(&q, &k, &v, &mask_bias(t, window, documents), 0.35)?;
        let blocked = attention_blocked(&q, &k, &v, &mask, 0.35)?;
        check("blocked attention", &[&q, &k, &v], &blocked, &reference)?;
        let kept = attention_keeping_probabilities(&q, &k, &v, &mask, 0.35)?;
        check("reference attention", &[&q, &k, &v], &kept, &reference)?;
    }
    Ok(())
}

#[test]
fn flash_attention_matches_composed_on_several_shapes_and_masks() -> Result<()> {
    // Lengths around the kernel's 128-row tiles and 512-row runs (one partial tile, several tiles,
    // several runs, tails), GQA and plain heads, head widths 8 and 64, batches of one and two;
    // causal, windows that end inside and on tile edges, packed documents whose boundaries fall
    // inside tiles and runs, and both together.
    let packed = |t: usize, cuts: &[usize]| -> Vec<u32> {
        (0..t)
            .map(|i| cuts.iter().filter(|&&c| i >= c).count() as u32)
            .collect()
    };
    struct Case {
        b: usize,
        heads: usize,
        kv: usize,
        t: usize,
        d: usize,
        window: Option<usize>,
        docs: Option<Vec<Vec<u32>>>,
    }
    let cases = [
        Case {
            b: 1,
            heads: 3,
            kv: 1,
            t: 40,
            d: 8,
            window: None,
            docs: None,
        },
        Case {
            b: 2,
            heads: 4,
            kv: 2,
            t: 150,
            d: 8,
            window: None,
            docs: None,
        },
        Case {
            b: 1,
            heads: 2,
            kv: 2,
            t: 200,
            d: 64,
            window: None,
            docs: None,
        },
        Case {
            b: 1,
            heads: 4,
            kv: 2,
            t: 190,
            d: 8,
            window: Some(64),
            docs: None,
        },
        Case {
            b: 2,
            heads: 2,
            kv: 1,
            t: 130,
            d: 8,
            window: Some(17),
            docs: None,
        },
        Case {
            b: 2,
            heads: 4,
            kv: 2,
            t: 170,
            d: 8,
            window: None,
            docs: Some(vec![packed(170, &[30, 100, 101]), packed(170, &[64, 128])]),
        },
        Case {
            b: 1,
            heads: 2,
            kv: 1,
            t: 160,
            d: 16,
            window: Some(40),
            docs: Some(vec![packed(160, &[70])]),
        },
        // Three query and key tiles, the last ragged; a window and documents across tile edges.
        Case {
            b: 1,
            heads: 2,
            kv: 1,
            t: 333,
            d: 8,
            window: Some(150),
            docs: Some(vec![packed(333, &[40, 250])]),
        },
        // Two runs of queries and keys, the second ragged.
        Case {
            b: 2,
            heads: 2,
            kv: 1,
            t: 600,
            d: 16,
            window: None,
            docs: None,
        },
        // A window wider than a tile and documents whose boundaries fall inside the second run.
        Case {
            b: 1,
            heads: 2,
            kv: 1,
            t: 700,
            d: 8,
            window: Some(300),
            docs: Some(vec![packed(700, &[100, 530, 531])]),
        },
    ];
    for c in cases {
        let (q, k, v) = (
            var(&[c.b, c.heads, c.t, c.d])?,
            var(&[c.b, c.kv, c.t, c.d])?,
            var(&[c.b, c.kv, c.t, c.d])?,
        );
        let docs = c.docs.as_deref();
        let mask = AttentionMask::new(c.t, 0, c.window, docs, DType::F32, &Device::Cpu)?;
        let scale = 1.0 / (c.d as f64).sqrt();
        let reference = composed_attention(&q, &k, &v, &mask_bias(c.t, c.window, docs), scale)?;
        let ours = attention_flash_cpu(&q, &k, &v, &mask, scale)?;
        let name = format!(
            "flash attention b={} h={}/{} t={} d={} window={:?} docs={}",
            c.b,
            c.heads,
            c.kv,
            c.t,
            c.d,
            c.window,
            docs.is_some()
        );
        check(&name, &[&q, &k, &v], &ours, &reference)?;
    }
    Ok(())
}

#[test]
fn flash_attention_with_a_cache_offset_matches_the_full_computation() -> Result<()> {
    // New queries at positions 90..160 over 160 keys, and 500..700 over 700 (more than a run of
    // keys): tiles start mid-sequence.
    for (t, start) in [(160, 90), (700, 500)] {
        let (q, k, v) = (
            randn(&[1, 4, t, 8])?,
            randn(&[1, 2, t, 8])?,
            randn(&[1, 2, t, 8])?,
        );
        for window in [None, Some(50), Some(260)] {
            let full_mask = AttentionMask::new(t, 0, window, None, DType::F32, &Device::Cpu)?;
            let full = attention_keeping_probabilities(&q, &k, &v, &full_mask, 0.5)?;
            let new = t - start;
            let tail_mask = AttentionMask::new(new, start, window, None, DType::F32, &Device::Cpu)?;
            let tail = attention_flash_cpu(&q.narrow(2, start, new)?, &k, &v, &tail_mask, 0.5)?;
            assert_close(
                "cached flash attention",
                &tail,
                &full.narrow(2, start, new)?,
            );
        }
    }
    Ok(())
}

#[test]
fn flash_attention_refuses_a_mask_of_another_length() -> Result<()> {
    let (q, k) = (randn(&[1, 2, 10, 8])?, randn(&[1, 2, 10, 8])?);
    let mask = AttentionMask::new(12, 0, None, None, DType::F32, &Device::Cpu)?;
    let err = attention_flash_cpu(&q, &k, &k, &mask, 0.5).unwrap_err();
    assert!(err.to_string().contains("mask is for 12 queries"), "{err}");
    Ok(())
}

#[test]
fn attention_with_a_cache_offset_matches_the_full_computation() -> Result<()> {
    // Generation: 3 new queries at positions 7..10 over 10 cached + new keys.
    let (q, k, v) = (
        randn(&[1, 4, 10, 8])?,
        randn(&[1, 2, 10, 8])?,
        randn(&[1, 2, 10, 8])?,
    );
    let full_mask = AttentionMask::new(10, 0, Some(4), None, DType::F32, &Device::Cpu)?;
    let full = attention_keeping_probabilities(&q, &k, &v, &full_mask, 0.5)?;
    let tail_mask = AttentionMask::new(3, 7, Some(4), None, DType::F32, &Device::Cpu)?;
    let tail_q = q.narrow(2, 7, 3)?;
    let tail = attention_blocked(&tail_q, &k, &v, &tail_mask, 0.5)?;
    assert_close("cached blocked attention", &tail, &full.narrow(2, 7, 3)?);
    let tail = attention(&tail_q, &k, &v, &tail_mask, 0.5)?;
    assert_close("cached attention", &tail, &full.narrow(2, 7, 3)?);
    Ok(())
}
