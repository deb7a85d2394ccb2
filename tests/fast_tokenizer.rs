//! The byte-level BPE fast path (`data::fast_bpe`) gives exactly the `tokenizers` crate's ids:
//! on every fixture tokenizer it applies to (GPT-2's pattern; Qwen2's split pattern with NFC) and
//! on the real SmolLM2-135M tokenizer (49,152 entries, from its GGUF file, when fetched), over the
//! data fixtures' texts and thousands of generated texts mixing the cases the patterns treat
//! apart: contractions in both cases, letters, digits, punctuation runs, every kind of whitespace
//! run (spaces, tabs, `\r\n`, no-break and ideographic spaces, line separators), accents and
//! combining marks, CJK, emoji, added tokens and their prefixes.

mod common;
use common::*;
use peft_sft::data::fast_bpe::FastBpe;
use peft_sft::data::ChatTokenizer;
use std::path::PathBuf;

/// `n` texts of up to 40 pieces drawn from tricky pieces (deterministic).
fn texts(n: usize, seed: u64) -> Vec<String> {
    let pieces = [
        "Hello",
        " world",
        "'s",
        "'S",
        "'ll",
        "'LL",
        "'re",
        "'ve",
        "'m",
        "'d",
        "don't",
        "I'M",
        " ",
        "  ",
        "   ",
        "\t",
        "\n",
        "\n\n",
        "\r\n",
        " \n",
        "\n ",
        " \t ",
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        "\u{85}",
        "123",
        "4567",
        " 89",
        "٣٤",
        "3.14",
        "!!",
        "?!.",
        " ...",
        "—",
        "\"",
        "(",
        ")",
        "#",
        "$5",
        "café",
        "naïve",
        "e\u{301}",
        "Ärger",
        "über",
        "日本語",
        "中文",
        "한국어",
        "Привет",
        "🙂",
        "👍🏽",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_",
        "|>",
        "<",
        ">",
        "user",
        "assistant",
        "\nassistant\n",
        "x",
        "A",
        "z9",
        "_",
        "__init__",
        "a\u{200b}b",
        "ﬁ",
        "Ⅻ",
        "½",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = next() % 40;
            (0..len).map(|_| pieces[next() % pieces.len()]).collect()
        })
        .collect()
}

/// Every data fixture's lines, as raw text.
fn fixture_texts() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixture("data")).unwrap() {
        let path = entry.unwrap().path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.extend(text.lines().map(str::to_string));
        }
    }
    out
}

/// The fast path applies to `tok` and gives its ids on every text, with and without special
/// tokens; returns how many encodings took the fast path.
fn assert_same_ids(tok: &ChatTokenizer, what: &str, texts: &[String]) -> usize {
    let mut fast = FastBpe::new(tok).unwrap_or_else(|| panic!("{what}: no fast path"));
    let mut taken = 0;
    for text in texts {
        for special in [false, true] {
            if let Some(ids) = fast.encode(text, special) {
                taken += 1;
                assert_eq!(
                    ids.unwrap(),
                    tok.encode(text, special).unwrap(),
                    "{what}: {text:?} (special tokens {special})"
                );
            }
        }
    }
    taken
}

#[test]
fn the_fast_path_gives_the_tokenizers_ids() {
    let mut corpus = fixture_texts();
    corpus.extend(texts(3000, 7));
    for dir in [
        "tokenizers/chatml",
        "tokenizers/llama3",
        "tokenizers/toolchat",
        "models/qwen2",
        "models/gemma2",
    ] {
        let tok = ChatTokenizer::from_dir(&fixture(dir)).unwrap();
        let taken = assert_same_ids(&tok, dir, &corpus);
        // Under NFC only ASCII texts take the fast path; with a post-processor that adds
        // tokens, only encodings without them.
        assert!(
            taken > corpus.len() / 8,
            "{dir}: only {taken} fast encodings"
        );
    }
}

#[test]
fn the_fast_path_gives_the_real_smollm2_tokenizers_ids() {
    let dir = std::env::var_os("PEFT_SFT_MODELS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peft-sft/models"))
        });
    let Some(path) = dir
        .map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .filter(|p| p.is_file())
    else {
        eprintln!("skipped: the SmolLM2 GGUF file is absent; run scripts/fetch_smollm2_gguf.sh");
        return;
    };
    let loaded =
        peft_sft::model::load_pretrained(path.to_str().unwrap(), false, &candle_core::Device::Cpu)
            .unwrap();
    let mut corpus = fixture_texts();
    corpus.extend(texts(5000, 11));
    let taken = assert_same_ids(&loaded.tokenizer, "SmolLM2-135M", &corpus);
    assert!(taken > corpus.len());
}
