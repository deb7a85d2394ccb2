//! Serving several adapters over one base (`peft_sft::serve` and `examples/serve_adapters.rs`):
//! each adapter's output equals a model loaded with only that adapter, requests from many threads
//! get their own adapter's output, unloading is clean, trained vocabulary rows stay with their
//! adapter, and the example answers real HTTP requests.

mod common;
use candle_core::Device;
use common::*;
use peft_sft::generate::{generate, GenerateOptions};
use peft_sft::lora::load_adapter;
use peft_sft::model::layers::LinearWeight;
use peft_sft::model::{load_pretrained, CausalLm};
use peft_sft::serve::{AdapterServer, Prompt, ServeError};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

#[allow(dead_code)]
#[path = "../examples/serve_adapters.rs"]
mod serve_example;

const LLAMA: &str = "tests/fixtures/models/llama";
const PROMPT: &str = "What is the capital of France?";

fn options() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 12,
        ..GenerateOptions::default()
    }
}

/// The PEFT fixture adapter ("a") and one trained for 2 steps by the CLI ("b", under Cargo's
/// scratch folder for tests), made once per run.
fn adapters() -> (&'static Path, &'static Path) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let (a, b) = DIRS.get_or_init(|| {
        let b = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serving-adapter-b");
        if b.exists() {
            std::fs::remove_dir_all(&b).unwrap();
        }
        let (ok, _, err) = run_cli(&[
            "train",
            "--model",
            LLAMA,
            "--dataset",
            "tests/fixtures/data/qa_chat.jsonl",
            "--output-dir",
            b.to_str().unwrap(),
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--learning-rate",
            "1e-2",
        ]);
        assert!(ok, "training adapter b failed: {err}");
        (fixture("peft/llama/adapter"), b)
    });
    (a, b)
}

/// A server on the llama fixture with "a" and "b" loaded.
fn server() -> AdapterServer {
    let (a, b) = adapters();
    let server = AdapterServer::new(load_pretrained(LLAMA, false, &Device::Cpu).unwrap());
    assert!(!server.load("a", a).unwrap());
    assert!(!server.load("b", b).unwrap());
    server
}

/// Greedy ids for `prompt` from a freshly loaded base with only `adapter` on it (as the CLI's
/// `generate --adapter` does it).
fn alone(base: &str, adapter: Option<&Path>, prompt: &Prompt) -> Vec<u32> {
    let mut loaded = load_pretrained(base, false, &Device::Cpu).unwrap();
    if let Some(dir) = adapter {
        load_adapter(&mut loaded.model, dir).unwrap();
        if dir.join("tokenizer.json").exists() {
            loaded.tokenizer = peft_sft::data::ChatTokenizer::from_dir(dir).unwrap();
        }
    }
    let tok = &loaded.tokenizer;
    let ids = match prompt {
        Prompt::Text(text) => tok.encode(text, true).unwrap(),
        Prompt::Chat(messages) => tok
            .encode(&tok.apply_chat_template(messages, true).unwrap(), false)
            .unwrap(),
    };
    let opts = GenerateOptions {
        stop_ids: loaded.stop_ids(),
        ..options()
    };
    generate(&loaded.model, &ids, &opts).unwrap()
}

/// The expected ids with "a", "b" and none, and a check that they all differ (else the switching
/// tests could not fail).
fn expected() -> &'static [(Option<&'static str>, Vec<u32>); 3] {
    static EXPECTED: OnceLock<[(Option<&'static str>, Vec<u32>); 3]> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let (a, b) = adapters();
        let prompt = Prompt::Text(PROMPT.into());
        let out = [
            (Some("a"), alone(LLAMA, Some(a), &prompt)),
            (Some("b"), alone(LLAMA, Some(b), &prompt)),
            (None, alone(LLAMA, None, &prompt)),
        ];
        for i in 0..3 {
            for j in i + 1..3 {
                assert_ne!(
                    out[i].1, out[j].1,
                    "{:?} and {:?} give the same output; the test needs adapters that differ",
                    out[i].0, out[j].0
                );
            }
        }
        out
    })
}

#[test]
fn server_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<AdapterServer>();
}

#[test]
fn each_adapter_through_the_server_equals_a_model_loaded_with_only_it() {
    let server = server();
    assert_eq!(server.names(), ["a", "b"]);
    let prompt = Prompt::Text(PROMPT.into());
    // Twice round, in an order that switches between every pair.
    for (adapter, want) in expected().iter().chain(expected().iter().rev()) {
        let got = server.generate(*adapter, &prompt, &options()).unwrap();
        assert_eq!(&got.token_ids, want, "adapter {adapter:?}");
        let view = server.view(*adapter).unwrap();
        assert_eq!(got.text, view.tokenizer.decode(want, true).unwrap());
    }
    // A chat prompt goes through the chat template.
    let chat = Prompt::Chat(vec![serde_json::json!({"role": "user", "content": PROMPT})]);
    let (a, _) = adapters();
    assert_eq!(
        server
            .generate(Some("a"), &chat, &options())
            .unwrap()
            .token_ids,
        alone(LLAMA, Some(a), &chat)
    );
}

fn tensor_ids(model: &CausalLm) -> Vec<candle_core::TensorId> {
    let mut ids = vec![model.embed_tokens.tensor().id()];
    for lin in model.linears() {
        match &lin.weight {
            LinearWeight::Dense(p) => ids.push(p.tensor().id()),
            LinearWeight::Quantized(_) => panic!("the fixture is not quantized"),
        }
    }
    ids
}

#[test]
fn adapter_views_share_the_base_weights() {
    let server = server();
    let base = server.view(None).unwrap();
    let a = server.view(Some("a")).unwrap();
    assert_eq!(tensor_ids(&a.model), tensor_ids(&base.model));
    assert!(a.model.linears().iter().any(|l| l.lora.is_some()));
    assert!(base.model.linears().iter().all(|l| l.lora.is_none()));
}

#[test]
fn concurrent_requests_each_get_their_own_adapter() {
    let server = server();
    let expected = expected();
    let prompt = Prompt::Text(PROMPT.into());
    std::thread::scope(|s| {
        for t in 0..6 {
            let (server, prompt) = (&server, &prompt);
            s.spawn(move || {
                for k in 0..3 {
                    let (adapter, want) = &expected[(t + k) % 3];
                    let got = server.generate(*adapter, prompt, &options()).unwrap();
                    assert_eq!(&got.token_ids, want, "thread {t}, request {k}, {adapter:?}");
                }
            });
        }
        // Loading and unloading another adapter meanwhile disturbs none of them.
        s.spawn(|| {
            let (a, _) = adapters();
            for _ in 0..3 {
                server.load("extra", a).unwrap();
                server.unload("extra").unwrap();
            }
        });
    });
    assert_eq!(server.names(), ["a", "b"]);
}

#[test]
fn unloading_refuses_later_requests_and_lets_running_ones_finish() {
    let server = server();
    let prompt = Prompt::Text(PROMPT.into());
    // What a running request holds: the view it started on.
    let running = server.view(Some("a")).unwrap();
    server.unload("a").unwrap();
    assert_eq!(server.names(), ["b"]);
    let err = server.generate(Some("a"), &prompt, &options()).unwrap_err();
    assert!(matches!(err, ServeError::UnknownAdapter { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("`a`") && message.contains("loaded: b") && message.contains("load it"),
        "{message}"
    );
    assert_eq!(
        running.generate(&prompt, &options()).unwrap().token_ids,
        expected()[0].1
    );
    assert!(matches!(
        server.unload("a"),
        Err(ServeError::UnknownAdapter { .. })
    ));
    // The base and the other adapter are untouched.
    for (adapter, want) in &expected()[1..] {
        assert_eq!(
            &server
                .generate(*adapter, &prompt, &options())
                .unwrap()
                .token_ids,
            want
        );
    }
    // Loading it again serves it again.
    server.load("a", adapters().0).unwrap();
    assert_eq!(
        server
            .generate(Some("a"), &prompt, &options())
            .unwrap()
            .token_ids,
        expected()[0].1
    );
}

#[test]
fn bad_names_folders_and_requests_are_refused_clearly() {
    let server = server();
    for name in ["", "a/b", "a b", &"x".repeat(65)] {
        let err = server.load(name, adapters().0).unwrap_err();
        assert!(matches!(err, ServeError::BadName(_)), "{name:?}: {err:?}");
    }
    let missing = server.load("m", Path::new("no/such/adapter")).unwrap_err();
    assert!(missing.to_string().contains("no/such/adapter"), "{missing}");
    // Matrices that do not fit the base (a config saying r = 8 for rank-4 matrices).
    let tmp = tempfile::tempdir().unwrap();
    let a = adapters().0;
    std::fs::copy(
        a.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(a.join("adapter_config.json")).unwrap();
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        config.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    let other = server.load("misfit", tmp.path()).unwrap_err();
    assert!(other.to_string().contains("different base"), "{other}");
    let zero = GenerateOptions {
        max_new_tokens: 0,
        ..options()
    };
    let err = server
        .generate(None, &Prompt::Text(PROMPT.into()), &zero)
        .unwrap_err();
    assert!(err.to_string().contains("max_new_tokens"), "{err}");
    assert_eq!(server.names(), ["a", "b"]);
}

#[test]
fn trained_vocabulary_rows_stay_with_their_adapter() {
    let base_dir = "tests/fixtures/chatml_setup/base";
    let chatml = fixture("chatml_setup/peft_adapter");
    let server = AdapterServer::new(load_pretrained(base_dir, false, &Device::Cpu).unwrap());
    let prompt = Prompt::Text("Hello there".into());
    let plain_before = server.generate(None, &prompt, &options()).unwrap();
    server.load("chatml", &chatml).unwrap();

    // The adapter's view has the new rows and its own tokenizer: ChatML turns use ids 400/401.
    let chat = Prompt::Chat(vec![serde_json::json!({"role": "user", "content": "Hi"})]);
    let view = server.view(Some("chatml")).unwrap();
    assert_eq!(view.model.config.vocab_size, 402);
    assert!(view.encode(&chat).unwrap().contains(&400));
    assert!(view.stop_ids.contains(&401), "{:?}", view.stop_ids);
    let got = server.generate(Some("chatml"), &chat, &options()).unwrap();
    assert_eq!(got.token_ids, alone(base_dir, Some(&chatml), &chat));

    // The base never sees them.
    let base = server.view(None).unwrap();
    assert_eq!(base.model.config.vocab_size, 400);
    assert_eq!(base.model.embed_tokens.tensor().dims()[0], 400);
    assert_eq!(
        server.generate(None, &prompt, &options()).unwrap(),
        plain_before
    );
    assert_eq!(plain_before.token_ids, alone(base_dir, None, &prompt));
}

/// Sends `raw` to the example server and returns (status, JSON body).
fn http(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(raw).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(head.contains("Content-Type: application/json"), "{head}");
    (status, serde_json::from_str(body).unwrap())
}

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn the_example_serves_generation_over_http() {
    let server = Arc::new(server());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = server.clone();
    std::thread::spawn(move || serve_example::serve(listener, shared));

    let (status, body) = http(addr, &request("GET", "/adapters", ""));
    assert_eq!(status, 200);
    let names: Vec<&str> = body["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);

    let view = |name: Option<&str>| server.view(name).unwrap();
    for (adapter, want) in expected() {
        let adapter_json = serde_json::to_string(adapter).unwrap();
        let body =
            format!(r#"{{"prompt": "{PROMPT}", "adapter": {adapter_json}, "max_new_tokens": 12}}"#);
        let (status, out) = http(addr, &request("POST", "/generate", &body));
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            out["text"].as_str().unwrap(),
            view(*adapter).tokenizer.decode(want, true).unwrap()
        );
        assert_eq!(out["adapter"], serde_json::json!(adapter));
        assert_eq!(out["completion_tokens"], want.len());
    }

    // Load, list, unload, and the errors a client can make.
    let load = format!(r#"{{"name": "c", "path": "{}"}}"#, adapters().1.display());
    let (status, out) = http(addr, &request("POST", "/adapters", &load));
    assert_eq!(
        (status, &out["replaced"]),
        (200, &serde_json::json!(false)),
        "{out}"
    );
    assert_eq!(server.names(), ["a", "b", "c"]);
    let generate_c =
        r#"{"prompt": "What is the capital of France?", "adapter": "c", "max_new_tokens": 12}"#;
    let (status, out) = http(addr, &request("POST", "/generate", generate_c));
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["text"].as_str().unwrap(),
        view(Some("b"))
            .tokenizer
            .decode(&expected()[1].1, true)
            .unwrap()
    );
    assert_eq!(http(addr, &request("DELETE", "/adapters/c", "")).0, 200);
    let (status, out) = http(addr, &request("POST", "/generate", generate_c));
    assert_eq!(status, 404);
    assert!(out["error"].as_str().unwrap().contains("`c`"), "{out}");
    assert_eq!(http(addr, &request("DELETE", "/adapters/c", "")).0, 404);

    let refused = [
        (
            request("POST", "/generate", "{not json"),
            400,
            "invalid JSON",
        ),
        (
            request("POST", "/generate", r#"{"prompt": "x", "max_tokens": 3}"#),
            400,
            "max_tokens",
        ),
        (
            request("POST", "/generate", r#"{"adapter": "a"}"#),
            400,
            "exactly one of",
        ),
        (
            request(
                "POST",
                "/adapters",
                r#"{"name": "d", "path": "no/such/dir"}"#,
            ),
            400,
            "no/such/dir",
        ),
        (request("GET", "/nowhere", ""), 404, "no endpoint"),
        (request("GET", "/generate", ""), 405, "use POST"),
        (
            b"POST /generate HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
            "at most",
        ),
        (
            b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            411,
            "Content-Length",
        ),
        (b"garbage\r\n\r\n".to_vec(), 400, "malformed request line"),
    ];
    for (raw, want_status, want_message) in refused {
        let (status, out) = http(addr, &raw);
        let message = out["error"].as_str().unwrap_or_default();
        assert_eq!(status, want_status, "{message}");
        assert!(message.contains(want_message), "{message}");
    }
    assert_eq!(server.names(), ["a", "b"]);
}

#[test]
fn the_example_reads_its_command_line() {
    let args = |list: &[&str]| serve_example::parse_args(list.iter().map(|s| s.to_string()));
    let parsed = args(&[
        "--model",
        "m",
        "--adapter",
        "x=dir1",
        "--adapter",
        "y=dir2",
        "--port",
        "0",
    ])
    .unwrap();
    assert_eq!(parsed.model, "m");
    assert_eq!(
        parsed.adapters,
        [
            ("x".to_string(), PathBuf::from("dir1")),
            ("y".to_string(), PathBuf::from("dir2"))
        ]
    );
    assert_eq!(parsed.port, 0);
    let err = args(&["--model", "m", "--adapter", "dir1"]).unwrap_err();
    assert!(err.to_string().contains("NAME=DIR"), "{err}");
    assert!(args(&["--adapter", "x=d"]).is_err(), "--model is required");
}

/// The example under load (loopback only): 200 requests from 20 client threads over three adapters
/// and the base — "c" being adapter b's folder loaded again — while a fourth adapter is loaded and
/// unloaded over and over, and two peers that stop mid-request. Every answer equals the one its
/// adapter gives alone (no cross-talk), the stalled peers get a 400 once the read timeout passes
/// without holding anyone else up, and an unloaded adapter's view is freed once its last
/// request ends. Prints requests/s and latency percentiles (not asserted).
#[test]
fn the_example_under_load_answers_every_request_with_its_own_adapter() {
    let server = Arc::new(server());
    server.load("c", adapters().1).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = server.clone();
    let timeout = std::time::Duration::from_secs(2);
    std::thread::spawn(move || serve_example::serve_with_timeout(listener, shared, timeout));
    let c_view = Arc::downgrade(&server.view(Some("c")).unwrap());

    let text = |adapter: Option<&str>, ids: &[u32]| {
        server
            .view(adapter)
            .unwrap()
            .tokenizer
            .decode(ids, true)
            .unwrap()
    };
    let expected: Vec<(Option<&str>, String)> = vec![
        (Some("a"), text(Some("a"), &expected()[0].1)),
        (Some("b"), text(Some("b"), &expected()[1].1)),
        (Some("c"), text(Some("b"), &expected()[1].1)),
        (None, text(None, &expected()[2].1)),
    ];
    // Two peers that stop sending: one mid-body, one before its first byte.
    let stalled: Vec<TcpStream> = [
        &b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"[..],
        b"",
    ]
    .iter()
    .map(|raw| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(raw).unwrap();
        s
    })
    .collect();
    let started = std::time::Instant::now();
    let mut latencies: Vec<f64> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..20)
            .map(|t| {
                let expected = &expected;
                s.spawn(move || {
                    (0..10)
                        .map(|k| {
                            let (adapter, want) = &expected[(t + k) % 4];
                            let adapter_json = serde_json::to_string(adapter).unwrap();
                            let body = format!(
                                r#"{{"prompt": "{PROMPT}", "adapter": {adapter_json}, "max_new_tokens": 12}}"#
                            );
                            let sent = std::time::Instant::now();
                            let (status, out) = http(addr, &request("POST", "/generate", &body));
                            let took = sent.elapsed().as_secs_f64();
                            assert_eq!(status, 200, "{out}");
                            assert_eq!(out["text"].as_str().unwrap(), want, "client {t}, request {k}, {adapter:?}");
                            took
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        s.spawn(|| {
            let (a, _) = adapters();
            for _ in 0..10 {
                server.load("d", a).unwrap();
                server.unload("d").unwrap();
            }
        });
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(latencies.len(), 200);
    latencies.sort_by(f64::total_cmp);
    eprintln!(
        "200 requests in {wall:.2} s: {:.1} requests/s, latency p50 {:.1} ms, p99 {:.1} ms",
        200.0 / wall,
        latencies[100] * 1e3,
        latencies[197] * 1e3
    );

    for (i, mut peer) in stalled.into_iter().enumerate() {
        let mut answer = String::new();
        peer.set_read_timeout(Some(timeout * 5)).unwrap();
        peer.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "stalled peer {i}: {answer:?}"
        );
    }

    // Unloaded, and no request holds it: the view and its adapter tensors are gone.
    server.unload("c").unwrap();
    assert!(
        c_view.upgrade().is_none(),
        "the unloaded adapter's view is still alive"
    );
    assert_eq!(server.names(), ["a", "b"]);
}
