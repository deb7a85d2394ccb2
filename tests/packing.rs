//! Packing: a packed, padding-free row of several documents gives each token the same logits (so
//! the same per-token losses) as running each document alone, and the batch loss is the sum of the
//! documents' losses; `--packing` trains end to end.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use peft_sft::data::{collate, pack_bfd, Example};

fn docs() -> Vec<Example> {
    docs_of(&[9, 5, 12, 3, 7])
}

fn docs_of(lens: &[usize]) -> Vec<Example> {
    lens.iter()
        .enumerate()
        .map(|(d, &len)| {
            let ids = (0..len)
                .map(|i| ((d * 37 + i * 11) % 390 + 5) as u32)
                .collect();
            let mask = (0..len).map(|i| u8::from(i >= 2)).collect();
            Example::new(ids, mask)
        })
        .collect()
}

#[test]
fn packed_documents_see_only_themselves() {
    for name in [
        "llama",
        "mistral",
        "qwen3",
        "smollm3",
        "gemma2",
        "gemma3",
        "phi3",
        "mixtral",
        "qwen3_moe",
    ] {
        let model = load_model(&fixture(&format!("models/{name}")), false);
        // LongRoPE (phi3, original context 8) picks its factors by the batch's largest position,
        // as transformers does: documents that all stay within it.
        let docs = match name {
            "phi3" => docs_of(&[6, 5, 8, 3, 7]),
            _ => docs(),
        };
        let rows = pack_bfd(&docs, 20);
        assert!(rows.len() < docs.len(), "{name}: nothing was packed");
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = collate(&refs, 0, &device()).unwrap();
        let hidden = model
            .forward_hidden(
                &batch.input_ids,
                &batch.positions,
                batch.documents.as_deref(),
                None,
                None,
                None,
            )
            .unwrap();
        let packed = model.logits(&hidden).unwrap().i(0).unwrap();
        // Walk the packed row document by document and compare with each document alone.
        let mut start = 0;
        for row in &rows {
            for (k, &len) in row.seq_lengths.iter().enumerate() {
                let offset: usize = row.seq_lengths[..k].iter().sum();
                let ids = &row.input_ids[offset..offset + len];
                let alone = model
                    .forward(&Tensor::new(ids, &device()).unwrap().unsqueeze(0).unwrap())
                    .unwrap()
                    .i(0)
                    .unwrap();
                let err = rel_err(&packed.narrow(0, start, len).unwrap(), &alone);
                assert!(
                    err < 1e-5,
                    "{name}: document of {len} tokens differs by {err}"
                );
                start += len;
            }
        }

        // The batch loss is the sum of the documents' own losses.
        let out = model.batch_loss(&batch, None).unwrap();
        let mut expected = 0f64;
        let mut targets = 0;
        for d in &docs {
            let b = collate(&[d], 0, &device()).unwrap();
            let o = model.batch_loss(&b, None).unwrap();
            expected += o
                .loss_sum
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            targets += b.num_loss_tokens;
        }
        let got = out
            .loss_sum
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(batch.num_loss_tokens, targets);
        assert!(
            (got - expected).abs() < 1e-4 * expected,
            "{name}: {got} vs {expected}"
        );
    }
}

#[test]
fn packing_trains_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("packed");
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--eval-dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out.to_str().unwrap(),
        "--packing",
        "--max-length",
        "128",
        "--max-steps",
        "12",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "5e-3",
        "--logging-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let losses = logged(&out, "loss");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

#[test]
fn a_packed_trl_batch_has_transformers_loss() {
    // Two bfd rows of 128 (four documents) collated padding-free by TRL, and the per-token losses
    // transformers computes for them (equal to each document run alone).
    let f = tensors(&fixture("trl_packing/loss_qa_chat_bfd_128.safetensors"));
    let model = load_model(&fixture("models/qwen2"), false);
    let ids = f["input_ids"].to_dtype(DType::U32).unwrap();
    let positions: Vec<u32> = f["position_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut documents = Vec::with_capacity(positions.len());
    let mut doc = 0u32;
    for (i, &p) in positions.iter().enumerate() {
        if p == 0 && i > 0 {
            doc += 1;
        }
        documents.push(doc);
    }
    assert_eq!(doc, 3);
    let labels: Vec<i64> = f["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let mask: Vec<f32> = labels
        .iter()
        .map(|&l| if l == -100 { 0.0 } else { 1.0 })
        .collect();
    let n = mask.len();
    let mask = Tensor::from_vec(mask, (1, n), &device()).unwrap();
    let ones = mask.ones_like().unwrap();
    let out = model
        .loss_with(&ids, &mask, &ones, &[positions], Some(&[documents]), None)
        .unwrap();
    assert_eq!(out.loss_tokens, 252.0);
    let mean = out.loss_sum.to_scalar::<f32>().unwrap() / out.loss_tokens as f32;
    let expected: Vec<f32> = f["per_token_loss_packed"].to_vec1().unwrap();
    let expected_mean = expected.iter().sum::<f32>() / 252.0;
    assert!(
        (mean - expected_mean).abs() < 1e-5 * expected_mean,
        "mean loss {mean} vs transformers {expected_mean}"
    );
}
