//! Dataset preparation: 4,000 synthetic two-turn chats (the shape of `scripts/bench_trl_data_prep.py
//! --make-synthetic`) tokenized with the qwen2 fixture's ChatML template and TRL's masks, on all
//! cores; the same rows read back from the on-disk cache (memory-mapped); and TRL's bfd packing of
//! the result into rows of 1024 tokens.

use criterion::{criterion_group, criterion_main, Criterion};
use peft_sft::data::{prepare_dataset, ChatTokenizer, TokenizeOptions};
use std::io::Write;
use std::path::Path;

const ROWS: usize = 4000;

fn synthetic(path: &Path) {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "train", "data",
        "loss", "token", "chat", "answer", "question",
    ];
    let mut state = 1u64;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize % n
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..ROWS {
        let mut sentence = |lo: usize, hi: usize| {
            let n = lo + next(hi - lo);
            (0..n)
                .map(|_| words[next(words.len())])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (q, a) = (sentence(5, 30), sentence(10, 60));
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}
        ]});
        writeln!(f, "{row}").unwrap();
    }
}

fn bench_data(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    synthetic(&path);
    let tok = ChatTokenizer::from_dir(Path::new("tests/fixtures/models/qwen2")).unwrap();
    let mut g = c.benchmark_group("data_4000_chats");
    g.sample_size(10);
    g.bench_function("tokenize", |b| {
        b.iter(|| prepare_dataset(&path, &tok, &TokenizeOptions::default()).unwrap())
    });
    let cached = TokenizeOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..TokenizeOptions::default()
    };
    prepare_dataset(&path, &tok, &cached).unwrap();
    g.bench_function("from_cache", |b| {
        b.iter(|| {
            let d = prepare_dataset(&path, &tok, &cached).unwrap();
            assert!(d.from_cache);
            d
        })
    });
    let prepared = prepare_dataset(&path, &tok, &TokenizeOptions::default()).unwrap();
    g.bench_function("pack_bfd_1024", |b| b.iter(|| prepared.examples.pack(1024)));
    g.finish();
}

criterion_group!(benches, bench_data);
criterion_main!(benches);
