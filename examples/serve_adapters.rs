//! Serves text generation over HTTP on localhost, one base model and any number of PEFT adapters,
//! the adapter chosen per request (see `peft_sft::serve` for how requests stay apart).
//!
//! cargo run --release --example serve_adapters -- --model DIR [--adapter NAME=DIR ...] [--port P]
//!     [--device cpu|cuda|auto] [--qlora]
//!
//! Endpoints (JSON in and out; errors are `{"error": "..."}` with a 4xx/5xx status):
//! - `POST /generate` `{"prompt": "...", "adapter": "name"|null, "max_new_tokens": N}` (or
//!   `"messages": [...]` for the chat template; optional `temperature`, `top_p`, `seed`) →
//!   `{"text", "adapter", "prompt_tokens", "completion_tokens"}`
//! - `GET /adapters` → `{"adapters": [{"name", "path"}]}`
//! - `POST /adapters` `{"name": "...", "path": "DIR"}` loads (or replaces) an adapter
//! - `DELETE /adapters/NAME` unloads one; requests already running with it finish
//!
//! A plain std server: a thread per connection, one request per connection (`Connection: close`),
//! `Content-Length` bodies of at most [`MAX_BODY_BYTES`]. Put a real HTTP server in front of it
//! before exposing it beyond localhost.

use anyhow::Context;
use clap::{value_parser, Arg, ArgAction, Command};
use peft_sft::device::select_device;
use peft_sft::generate::GenerateOptions;
use peft_sft::model::LoadOptions;
use peft_sft::quant::QuantScheme;
use peft_sft::serve::{AdapterServer, Prompt, ServeError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted (413 above it).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest request line plus headers accepted (431 above it).
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// Most tokens one request may ask for.
pub const MAX_NEW_TOKENS: usize = 4096;
/// How long a connection may sit idle while its request is read.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The command line.
#[derive(Debug)]
pub struct Args {
    /// Base model folder, Hub id or GGUF file.
    pub model: String,
    /// Adapters to load at start: (name, folder).
    pub adapters: Vec<(String, PathBuf)>,
    /// Port on 127.0.0.1 (0: any free one).
    pub port: u16,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Load the base's linear layers in NF4, as `--qlora` training does.
    pub qlora: bool,
}

/// Parses the arguments after the program name.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Args> {
    let m = Command::new("serve_adapters")
        .about("Serve generation over HTTP with LoRA adapters chosen per request")
        .no_binary_name(true)
        .arg(
            Arg::new("model")
                .long("model")
                .required(true)
                .help("Base model folder or Hub id"),
        )
        .arg(
            Arg::new("adapter")
                .long("adapter")
                .action(ArgAction::Append)
                .help("NAME=DIR: a PEFT adapter folder to serve as NAME (repeatable)"),
        )
        .arg(
            Arg::new("port")
                .long("port")
                .default_value("8080")
                .value_parser(value_parser!(u16))
                .help("Port on 127.0.0.1 (0 picks a free one)"),
        )
        .arg(
            Arg::new("device")
                .long("device")
                .default_value("cpu")
                .help("cpu | cuda | cuda:N | auto"),
        )
        .arg(
            Arg::new("qlora")
                .long("qlora")
                .action(ArgAction::SetTrue)
                .help("Load the base's linear layers in 4 bits, as --qlora training did"),
        )
        .try_get_matches_from(args)?;
    let adapters = m
        .get_many::<String>("adapter")
        .unwrap_or_default()
        .map(|spec| match spec.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                Ok((name.to_string(), PathBuf::from(dir)))
            }
            _ => anyhow::bail!(
                "--adapter `{spec}`: expected NAME=DIR, e.g. --adapter qa=out/qa-lora"
            ),
        })
        .collect::<anyhow::Result<_>>()?;
    let text = |name: &str| m.get_one::<String>(name).cloned().unwrap_or_default();
    Ok(Args {
        model: text("model"),
        adapters,
        port: m.get_one::<u16>("port").copied().unwrap_or(8080),
        device: text("device"),
        qlora: m.get_flag("qlora"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    let device = select_device(&args.device)?;
    let options = LoadOptions {
        quantize: args.qlora.then(QuantScheme::qlora),
        ..LoadOptions::default()
    };
    let server = AdapterServer::open(&args.model, options, &device)
        .with_context(|| format!("loading the base model {}", args.model))?;
    for (name, dir) in &args.adapters {
        server
            .load(name, dir)
            .with_context(|| format!("loading adapter `{name}` from {}", dir.display()))?;
    }
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .with_context(|| format!("binding 127.0.0.1:{} (pick another --port)", args.port))?;
    eprintln!(
        "serving {} with adapters [{}] on http://{}",
        args.model,
        server.names().join(", "),
        listener.local_addr()?
    );
    serve(listener, Arc::new(server));
    Ok(())
}

/// Answers connections on `listener` until it fails, each on its own thread.
pub fn serve(listener: TcpListener, server: Arc<AdapterServer>) {
    serve_with_timeout(listener, server, READ_TIMEOUT)
}

/// [`serve`] with `timeout` for a peer that stops sending its request.
pub fn serve_with_timeout(listener: TcpListener, server: Arc<AdapterServer>, timeout: Duration) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let server = server.clone();
                std::thread::spawn(move || handle_connection_within(stream, &server, timeout));
            }
            Err(e) => eprintln!("accepting a connection: {e}"),
        }
    }
}

/// An HTTP response: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

impl Response {
    fn ok(body: Value) -> Self {
        Response { status: 200, body }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Response {
            status,
            body: json!({ "error": message.into() }),
        }
    }

    fn write_to(&self, stream: &mut impl Write) -> std::io::Result<()> {
        let body = self.body.to_string();
        let reason = match self.status {
            100 => "Continue",
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            411 => "Length Required",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        write!(
            stream,
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )?;
        stream.flush()
    }
}

/// A request as the router sees it.
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Reads one request, or the response that refuses it; `Ok(None)` when the peer sent nothing.
fn read_request(stream: &mut TcpStream) -> std::io::Result<Result<Option<Request>, Response>> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut head_bytes = 0usize;
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let budget = (MAX_HEADER_BYTES - head_bytes) as u64;
        let n = (&mut reader).take(budget).read_until(b'\n', &mut line)?;
        head_bytes += n;
        if n == 0 && lines.is_empty() {
            return Ok(Ok(None));
        }
        if !line.ends_with(b"\n") {
            return Ok(Err(if head_bytes >= MAX_HEADER_BYTES {
                Response::error(
                    431,
                    format!("request line and headers exceed {MAX_HEADER_BYTES} bytes"),
                )
            } else {
                Response::error(400, "the connection closed in the middle of the headers")
            }));
        }
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let mut request_line = lines[0].split_whitespace();
    let (Some(method), Some(path), Some(version)) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Ok(Err(Response::error(
            400,
            format!(
                "malformed request line `{}`; expected `METHOD /path HTTP/1.1`",
                lines[0]
            ),
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Ok(Err(Response::error(
            400,
            format!("unsupported protocol `{version}`; speak HTTP/1.1"),
        )));
    }
    let mut content_length = 0usize;
    let mut expect_continue = false;
    for header in &lines[1..] {
        let Some((name, value)) = header.split_once(':') else {
            return Ok(Err(Response::error(
                400,
                format!("malformed header line `{header}`"),
            )));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => match value.parse() {
                Ok(n) => content_length = n,
                Err(_) => {
                    return Ok(Err(Response::error(400, format!("Content-Length `{value}` is not a number"))))
                }
            },
            "transfer-encoding" => {
                return Ok(Err(Response::error(
                    411,
                    format!("Transfer-Encoding `{value}` is not supported; send the body with a Content-Length"),
                )))
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Ok(Err(Response::error(
            413,
            format!("the body has {content_length} bytes; at most {MAX_BODY_BYTES} are accepted"),
        )));
    }
    if expect_continue && content_length > 0 {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = vec![0u8; content_length];
    if reader.read_exact(&mut body).is_err() {
        return Ok(Err(Response::error(
            400,
            format!("the body ended before its Content-Length of {content_length} bytes"),
        )));
    }
    Ok(Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })))
}

/// Reads one request from `stream`, answers it and closes the connection.
pub fn handle_connection(stream: TcpStream, server: &AdapterServer) {
    handle_connection_within(stream, server, READ_TIMEOUT)
}

/// [`handle_connection`] giving a peer that stops sending `timeout` before it is answered 400.
pub fn handle_connection_within(mut stream: TcpStream, server: &AdapterServer, timeout: Duration) {
    // A peer that stops sending must not hold the thread forever; a failed setting only loses that.
    let _ = stream.set_read_timeout(Some(timeout));
    let response = match read_request(&mut stream) {
        Ok(Ok(Some(request))) => route(server, &request.method, &request.path, &request.body),
        Ok(Ok(None)) => return,
        Ok(Err(refusal)) => refusal,
        Err(e) => Response::error(400, format!("reading the request: {e}")),
    };
    if let Err(e) = response.write_to(&mut stream) {
        eprintln!("writing a response: {e}");
    }
}

/// `POST /generate`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    adapter: Option<String>,
    max_new_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
}

/// `POST /adapters`' body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    name: String,
    path: PathBuf,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], expected: &str) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid JSON body ({e}); expected {expected}")))
}

fn serve_error(e: ServeError) -> Response {
    let status = match e {
        ServeError::UnknownAdapter { .. } => 404,
        ServeError::BadName(_) | ServeError::BadRequest(_) => 400,
        ServeError::Model(_) => 500,
    };
    Response::error(status, e.to_string())
}

/// Answers one request.
pub fn route(server: &AdapterServer, method: &str, path: &str, body: &[u8]) -> Response {
    let result = match (method, path) {
        ("POST", "/generate") => generate(server, body),
        ("GET", "/adapters") => Ok(list(server)),
        ("POST", "/adapters") => load(server, body),
        ("DELETE", p) if p.starts_with("/adapters/") => {
            let name = &p["/adapters/".len()..];
            server
                .unload(name)
                .map(|()| Response::ok(json!({ "unloaded": name })))
                .map_err(serve_error)
        }
        (_, "/generate") => Err(Response::error(405, format!("{method} /generate: use POST"))),
        (_, "/adapters") => Err(Response::error(405, format!("{method} /adapters: use GET or POST"))),
        (_, p) if p.starts_with("/adapters/") => {
            Err(Response::error(405, format!("{method} {p}: use DELETE")))
        }
        _ => Err(Response::error(
            404,
            format!("no endpoint {method} {path}; try POST /generate, GET|POST /adapters, DELETE /adapters/NAME"),
        )),
    };
    result.unwrap_or_else(|refusal| refusal)
}

fn generate(server: &AdapterServer, body: &[u8]) -> Result<Response, Response> {
    let expected = r#"{"prompt": "...", "adapter": "name"|null, "max_new_tokens": N}"#;
    let request: GenerateBody = parse(body, expected)?;
    let prompt = match (request.prompt, request.messages) {
        (Some(text), None) => Prompt::Text(text),
        (None, Some(messages)) => Prompt::Chat(messages),
        _ => {
            return Err(Response::error(
                400,
                "send exactly one of `prompt` (text) and `messages` (chat)",
            ))
        }
    };
    let defaults = GenerateOptions::default();
    let max_new_tokens = request.max_new_tokens.unwrap_or(defaults.max_new_tokens);
    if max_new_tokens > MAX_NEW_TOKENS {
        return Err(Response::error(
            400,
            format!(
                "max_new_tokens {max_new_tokens} is above this server's limit of {MAX_NEW_TOKENS}"
            ),
        ));
    }
    let options = GenerateOptions {
        max_new_tokens,
        temperature: request.temperature.unwrap_or(defaults.temperature),
        top_p: request.top_p.unwrap_or(defaults.top_p),
        seed: request.seed.unwrap_or(defaults.seed),
        stop_ids: Vec::new(),
    };
    let out = server
        .generate(request.adapter.as_deref(), &prompt, &options)
        .map_err(serve_error)?;
    Ok(Response::ok(json!({
        "text": out.text,
        "adapter": request.adapter,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.token_ids.len(),
    })))
}

fn list(server: &AdapterServer) -> Response {
    let adapters: Vec<Value> = server
        .adapter_dirs()
        .into_iter()
        .map(|(name, dir)| json!({ "name": name, "path": dir.display().to_string() }))
        .collect();
    Response::ok(json!({ "adapters": adapters }))
}

fn load(server: &AdapterServer, body: &[u8]) -> Result<Response, Response> {
    let request: LoadBody = parse(body, r#"{"name": "...", "path": "ADAPTER_DIR"}"#)?;
    let replaced = server
        .load(&request.name, &request.path)
        .map_err(|e| match e {
            // The folder is the client's choice: a missing or mismatched adapter is its error.
            ServeError::Model(e) => {
                Response::error(400, format!("cannot load adapter `{}`: {e}", request.name))
            }
            other => serve_error(other),
        })?;
    Ok(Response::ok(json!({
        "name": request.name,
        "path": request.path.display().to_string(),
        "replaced": replaced,
    })))
}
