//! `peft-sft push` and `train --push-to-hub` against a recording Hub on 127.0.0.1: the files that
//! arrive equal the local ones byte for byte (and the local ones are untouched), and a wrong token
//! (401), a missing repository (404), a refused connection and 5xx answers (retried, then a clear
//! error) are reported as such.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::*;
use peft_sft::push::{push_folder, PushOptions};
use serde_json::{json, Value};

const TOKEN: &str = "hf_test_token";

/// How the fake Hub answers.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Everything succeeds.
    Ok,
    /// The commit endpoint answers 404 (the repository is gone).
    CommitNotFound,
    /// The commit endpoint answers 503 the first `n` times, then succeeds.
    CommitUnavailable(usize),
}

/// What the fake Hub received.
#[derive(Default)]
struct Record {
    /// (method, path, authorization header) of every request.
    requests: Vec<(String, String, Option<String>)>,
    /// Commits: their header line and the files (path → bytes).
    commits: Vec<(Value, BTreeMap<String, Vec<u8>>)>,
    /// Bodies of `/api/repos/create`.
    created: Vec<Value>,
}

struct FakeHub {
    url: String,
    record: Arc<Mutex<Record>>,
}

impl FakeHub {
    fn start(behaviour: Behaviour) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let record = Arc::new(Mutex::new(Record::default()));
        let rec = record.clone();
        std::thread::spawn(move || {
            let mut unavailable = match behaviour {
                Behaviour::CommitUnavailable(n) => n,
                _ => 0,
            };
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
                serve(stream, &rec, behaviour, &mut unavailable);
            }
        });
        FakeHub { url, record }
    }
}

/// Answers every request on one connection (keep-alive) until the client closes it.
fn serve(stream: TcpStream, rec: &Mutex<Record>, behaviour: Behaviour, unavailable: &mut usize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut length = 0;
        let mut auth = None;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "authorization" => auth = Some(value.trim().to_string()),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        rec.lock()
            .unwrap()
            .requests
            .push((method.clone(), path.clone(), auth.clone()));
        let (status, reply) = if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            (
                401,
                json!({"error": "Invalid credentials in Authorization header"}),
            )
        } else if path == "/api/repos/create" {
            let body: Value = serde_json::from_slice(&body).unwrap();
            let name = format!(
                "{}/{}",
                body["organization"].as_str().unwrap_or(""),
                body["name"].as_str().unwrap()
            );
            rec.lock().unwrap().created.push(body);
            (200, json!({"url": format!("https://hub.example/{name}")}))
        } else if path.contains("/preupload/") {
            let body: Value = serde_json::from_slice(&body).unwrap();
            let files: Vec<Value> = body["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| json!({"path": f["path"], "uploadMode": "regular"}))
                .collect();
            (200, json!({"files": files}))
        } else if path.contains("/commit/") {
            if behaviour == Behaviour::CommitNotFound {
                (404, json!({"error": "Repository not found"}))
            } else if *unavailable > 0 {
                *unavailable -= 1;
                (503, json!({"error": "Service Unavailable"}))
            } else {
                let text = String::from_utf8(body).unwrap();
                let mut lines = text
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap());
                let header = lines.next().unwrap();
                let mut files = BTreeMap::new();
                for op in lines {
                    assert_eq!(op["key"], "file", "{op}");
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(op["value"]["content"].as_str().unwrap())
                        .unwrap();
                    files.insert(op["value"]["path"].as_str().unwrap().to_string(), bytes);
                }
                rec.lock().unwrap().commits.push((header, files));
                (
                    200,
                    json!({"commitUrl": "https://hub.example/commit/1", "commitOid": "1"}),
                )
            }
        } else {
            (404, json!({"error": format!("no route {method} {path}")}))
        };
        let reply = reply.to_string();
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Service Unavailable",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(reply.as_bytes()).is_err()
        {
            return;
        }
    }
}

/// An adapter-like folder with a nested file, a checkpoint and optimizer state that must stay local.
fn folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let files: BTreeMap<String, Vec<u8>> = [
        ("adapter_config.json", b"{\"r\": 8}".to_vec()),
        (
            "adapter_model.safetensors",
            (0..=255u8).cycle().take(3000).collect(),
        ),
        ("README.md", b"---\nlibrary_name: peft\n---\n".to_vec()),
        ("runs/events.out.tfevents.1", vec![0, 1, 2, 3]),
        ("notes [draft]*.txt", b"glob characters in a name".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (name, bytes) in &files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::create_dir_all(dir.join("checkpoint-2")).unwrap();
    std::fs::write(dir.join("checkpoint-2/adapter_model.safetensors"), b"old").unwrap();
    std::fs::write(dir.join("optimizer.safetensors"), b"state").unwrap();
    files
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(p).unwrap());
            }
        }
    }
    out
}

fn options(hub: &str, token: &str) -> PushOptions {
    PushOptions {
        repo_id: "alice/tiny-sft".into(),
        endpoint: Some(hub.to_string()),
        token: Some(token.into()),
        retries: Some(2),
        retry_delay: Some(Duration::from_millis(5)),
        ..Default::default()
    }
}

#[test]
fn push_sends_the_folder_byte_for_byte_and_changes_nothing_locally() {
    let hub = FakeHub::start(Behaviour::Ok);
    let tmp = tempfile::tempdir().unwrap();
    let expected = folder(tmp.path());
    let before = snapshot(tmp.path());
    let pushed = push_folder(
        tmp.path(),
        &PushOptions {
            private: true,
            commit_message: Some("first".into()),
            ..options(&hub.url, TOKEN)
        },
    )
    .unwrap();
    assert_eq!(pushed.url, "https://hub.example/alice/tiny-sft");
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "a push must not touch local files"
    );
    let record = hub.record.lock().unwrap();
    assert_eq!(record.created.len(), 1);
    assert_eq!(record.created[0]["name"], "tiny-sft");
    assert_eq!(record.created[0]["organization"], "alice");
    assert_eq!(record.created[0]["private"], true);
    assert_eq!(record.commits.len(), 1);
    let (header, files) = &record.commits[0];
    assert_eq!(header["value"]["summary"], "first");
    assert_eq!(
        files, &expected,
        "uploaded files differ from the local ones"
    );
    assert!(record
        .requests
        .iter()
        .all(|(_, _, auth)| auth.as_deref() == Some("Bearer hf_test_token")));
}

#[test]
fn a_rejected_token_a_missing_repo_and_a_refused_connection_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    folder(tmp.path());
    let hub = FakeHub::start(Behaviour::Ok);
    let err = push_folder(tmp.path(), &options(&hub.url, "hf_wrong"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_TOKEN") && err.contains("alice/tiny-sft"),
        "{err}"
    );

    let hub = FakeHub::start(Behaviour::CommitNotFound);
    let err = push_folder(tmp.path(), &options(&hub.url, TOKEN))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot upload to alice/tiny-sft"), "{err}");
    assert!(err.to_lowercase().contains("not found"), "{err}");

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = push_folder(
        tmp.path(),
        &options(&format!("http://127.0.0.1:{port}"), TOKEN),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cannot create alice/tiny-sft") && err.contains("HF_ENDPOINT"),
        "{err}"
    );
}

#[test]
fn unavailable_answers_are_retried_with_backoff_then_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = folder(tmp.path());
    // Two 503s, then success: the retries carry the push through.
    let hub = FakeHub::start(Behaviour::CommitUnavailable(2));
    push_folder(tmp.path(), &options(&hub.url, TOKEN)).unwrap();
    let record = hub.record.lock().unwrap();
    let commits = record
        .requests
        .iter()
        .filter(|(_, p, _)| p.contains("/commit/"))
        .count();
    assert_eq!(commits, 3);
    assert_eq!(record.commits[0].1, expected);
    drop(record);
    // Always 503: after the first try and 2 retries, a clear error.
    let hub = FakeHub::start(Behaviour::CommitUnavailable(usize::MAX));
    let err = push_folder(tmp.path(), &options(&hub.url, TOKEN))
        .unwrap_err()
        .to_string();
    assert!(err.contains("503") && err.contains("retried"), "{err}");
    let record = hub.record.lock().unwrap();
    let commits = record
        .requests
        .iter()
        .filter(|(_, p, _)| p.contains("/commit/"))
        .count();
    assert_eq!(commits, 3);
}

#[test]
fn cli_push_and_train_push_to_hub_upload_the_adapter() {
    let hub = FakeHub::start(Behaviour::Ok);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_TOKEN", TOKEN)
            .env("NO_PROXY", "127.0.0.1")
            .env("PEFT_SFT_CACHE", tmp.path().join("cache"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--device",
        "cpu",
        "--push-to-hub",
        "true",
        "--hub-model-id",
        "alice/tiny-sft",
    ]);
    assert!(ok, "{err}");
    {
        let record = hub.record.lock().unwrap();
        let (header, files) = record.commits.last().unwrap();
        assert_eq!(header["value"]["summary"], "End of training");
        for name in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "README.md",
        ] {
            assert_eq!(
                files[name],
                std::fs::read(out.join(name)).unwrap(),
                "{name} differs from the local file"
            );
        }
        assert!(
            !files.keys().any(|k| k.starts_with("checkpoint-")),
            "{:?}",
            files.keys()
        );
        let card = String::from_utf8(files["README.md"].clone()).unwrap();
        assert!(
            card.contains("library_name: peft") && card.contains("alice/tiny-sft"),
            "{card}"
        );
    }
    let (ok, err) = run(&[
        "push",
        "--path",
        out.to_str().unwrap(),
        "--repo-id",
        "alice/tiny-sft",
        "--commit-message",
        "again",
    ]);
    assert!(ok, "{err}");
    let record = hub.record.lock().unwrap();
    assert_eq!(
        record.commits.last().unwrap().0["value"]["summary"],
        "again"
    );
    // A wrong token through the CLI: non-zero exit and the hint.
    drop(record);
    let out2 = std::process::Command::new(bin())
        .args([
            "push",
            "--path",
            out.to_str().unwrap(),
            "--repo-id",
            "alice/tiny-sft",
        ])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", "hf_wrong")
        .output()
        .unwrap();
    assert!(!out2.status.success());
    assert!(String::from_utf8_lossy(&out2.stderr).contains("HF_TOKEN"));
}

#[test]
fn the_token_never_reaches_a_file_a_log_or_an_error() {
    let hub = FakeHub::start(Behaviour::Ok);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let wrong = "hf_secret_wrong_token";
    let run = |token: &str, args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_TOKEN", token)
            .env("NO_PROXY", "127.0.0.1")
            .env("PEFT_SFT_CACHE", tmp.path().join("cache"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let train = [
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--device",
        "cpu",
        "--push-to-hub",
        "true",
        "--hub-model-id",
        "alice/tiny-sft",
        "--hub-strategy",
        "every_save",
    ];
    let (ok, text) = run(TOKEN, &train);
    assert!(ok, "{text}");
    assert!(!text.contains(TOKEN), "the token in the output: {text}");
    // A refused token: the error says what to do, never the token.
    let (ok, text) = run(wrong, &train);
    assert!(!ok);
    assert!(text.contains("HF_TOKEN") && !text.contains(wrong), "{text}");
    for (name, bytes) in snapshot(&out) {
        let content = String::from_utf8_lossy(&bytes);
        assert!(
            !content.contains(TOKEN) && !content.contains(wrong),
            "{name} holds the token"
        );
    }
}
