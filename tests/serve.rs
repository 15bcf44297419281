//! `dynsparse serve` end to end: a server on an ephemeral loopback port, a tiny
//! random model on the CPU backend, and a raw HTTP/1.1 client written here.
//! Streaming and non-streaming completions; 32 concurrent requests; batched
//! output = solo output (greedy and seeded sampling); a pool small enough to
//! force preemption; a client that disconnects mid-stream frees its pages;
//! every bad-request class gets its status and an OpenAI-style JSON error;
//! a full queue answers 429; the pool never exceeds its size and empties.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dynsparse::DType;
use dynsparse::backend::BackendChoice;
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::model::{AttentionMode, GenerateOptions, Model, ModelConfig, init_params, sample::Sampling};
use dynsparse::serve::{ServeConfig, ServeModel, ServerHandle, start};
use serde_json::{Value, json};

const CONTEXT: usize = 128;

fn model_cfg() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 32,
        vocab: 256,
        context: CONTEXT,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 16, keep_blocks: 2, index_heads: 2, index_dim: 8 },
    }
}

fn tiny() -> ServeModel {
    let cfg = model_cfg();
    ServeModel { cfg, dtype: DType::F32, params: init_params(&cfg, 7), quant: Vec::new(), name: "tiny".into() }
}

fn server(f: impl FnOnce(&mut ServeConfig)) -> ServerHandle {
    let mut c = ServeConfig {
        port: 0,
        backend: BackendChoice::Cpu,
        max_batch: 32,
        max_batched_tokens: 64,
        ..Default::default()
    };
    f(&mut c);
    start(c, tiny()).expect("server starts")
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one request and reads the status line and headers.
fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A peer that answers before reading everything (413) may reset the rest: ignore that.
    let _ = s.write_all(body);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, headers, r)
}

/// Reads one piece of a chunked body; `None` at its end.
fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    (n > 0).then_some(buf)
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let (status, headers, mut r) = send(addr, method, path, body);
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut out = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            out.extend(c);
        }
    } else {
        r.read_to_end(&mut out).unwrap();
    }
    Reply { status, body: out }
}

fn complete(addr: SocketAddr, body: &Value) -> Value {
    let r = request(addr, "POST", "/v1/completions", body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).split("\n\n").filter_map(|e| e.strip_prefix("data: ").map(str::to_string)).collect()
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = request(addr, "GET", "/metrics", b"");
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// Polls until no page is held and nothing runs; the pool never exceeded its size.
#[track_caller]
fn assert_pool_drains(addr: SocketAddr) {
    let t0 = Instant::now();
    while metric(addr, "dynsparse_kv_pages_used") != 0.0 || metric(addr, "dynsparse_requests_running") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "KV pages still held 20 s after the load");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (peak, total) = (metric(addr, "dynsparse_kv_pages_used_peak"), metric(addr, "dynsparse_kv_pages_total"));
    assert!(peak > 0.0 && peak <= total, "peak pages {peak} of a pool of {total}");
}

fn text(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

fn prompt(i: usize) -> String {
    // Different lengths (1 to 40 bytes) so prefill chunks and decodes mix.
    let words = ["key ", "value ", "the ", "lorem ", "x", "sparse ", "attention "];
    (0..=i % 9).map(|j| words[(i + j) % words.len()]).collect::<String>()
}

#[test]
fn streaming_and_non_streaming_completions_agree_with_generate() {
    let srv = server(|_| {});
    let addr = srv.addr;
    let req = json!({"model": "tiny", "prompt": "key value ", "max_tokens": 12, "temperature": 0});
    let v = complete(addr, &req);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], 22);
    // The same greedy text as the library's own generation loop (contiguous cache, batch 1).
    let be = CpuBackend::new();
    let m = tiny();
    let model = Model::from_values(&be, m.cfg, m.dtype, &m.params).unwrap();
    let mut want = Vec::new();
    let opts = GenerateOptions {
        sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 },
        max_tokens: 12,
        ..Default::default()
    };
    model
        .generate(&be, b"key value ", &opts, |b| {
            want.extend_from_slice(b);
            Ok(true)
        })
        .unwrap();
    assert_eq!(text(&v, 0), String::from_utf8_lossy(&want));

    // Streaming: one chunk per token, the last with its finish_reason, a usage chunk, then [DONE].
    let sreq = json!({"prompt": "key value ", "max_tokens": 12, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = request(addr, "POST", "/v1/completions", sreq.to_string().as_bytes());
    assert_eq!(r.status, 200);
    let ev = sse_events(&r.body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks.len(), 13, "12 token chunks + usage: {ev:?}");
    let streamed: String = chunks[..12].iter().map(|c| text(c, 0)).collect();
    assert_eq!(streamed, text(&v, 0));
    assert!(chunks[..11].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[11]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[12]["usage"]["completion_tokens"], 12);

    // Seeded sampling: the same seed gives the same text, streamed or not.
    let sampled =
        json!({"prompt": "the ", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 42});
    let a = text(&complete(addr, &sampled), 0);
    let mut s2 = sampled.clone();
    s2["stream"] = json!(true);
    let r = request(addr, "POST", "/v1/completions", s2.to_string().as_bytes());
    let ev = sse_events(&r.body);
    let b: String = ev[..ev.len() - 1].iter().map(|e| text(&serde_json::from_str(e).unwrap(), 0)).collect();
    assert_eq!(a, b);

    // A stop string ends the text before it with finish_reason "stop".
    let full = text(&complete(addr, &json!({"prompt": "lorem ", "max_tokens": 40, "temperature": 0})), 0);
    if let Some((at, c)) = full.char_indices().skip(1).find(|(_, c)| c.is_ascii()) {
        let v =
            complete(addr, &json!({"prompt": "lorem ", "max_tokens": 40, "temperature": 0, "stop": [c.to_string()]}));
        assert_eq!(text(&v, 0), full[..full.find(c).unwrap()], "stop {c:?} at {at} in {full:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    } else {
        eprintln!("no ASCII character in the greedy text {full:?}: stop-string check skipped");
    }

    // A list of prompts gives one choice per prompt, in order.
    let v = complete(addr, &json!({"prompt": ["key ", "the "], "max_tokens": 5, "temperature": 0}));
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 10);
    let solo = complete(addr, &json!({"prompt": "the ", "max_tokens": 5, "temperature": 0}));
    assert_eq!(text(&v, 1), text(&solo, 0));

    let models = request(addr, "GET", "/v1/models", b"").json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(request(addr, "GET", "/health", b"").status, 200);
    assert!(metric(addr, "dynsparse_generation_tokens_total") >= 12.0 + 12.0 + 40.0);
    assert_pool_drains(addr);
    srv.shutdown();
}

fn solo_then_together(addr: SocketAddr, reqs: &[Value]) {
    let solo: Vec<Value> = reqs.iter().map(|r| complete(addr, r)).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = reqs.iter().map(|r| s.spawn(move || complete(addr, r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(text(a, 0), text(b, 0), "request {i} ({}) alone vs batched", reqs[i]);
        assert_eq!(a["usage"], b["usage"]);
    }
}

#[test]
fn thirty_two_concurrent_requests_complete_with_their_solo_output() {
    let srv = server(|_| {});
    let addr = srv.addr;
    let reqs: Vec<Value> = (0..32)
        .map(|i| {
            let mut r = json!({"prompt": prompt(i), "max_tokens": 8 + i % 13});
            // Greedy for most; seeded sampling for every fourth (its own RNG: batching cannot change it).
            r["temperature"] = if i % 4 == 3 { json!(0.8) } else { json!(0) };
            r["seed"] = json!(i);
            r
        })
        .collect();
    solo_then_together(addr, &reqs);
    // They did run together: some step held many of them.
    let peak = metric(addr, "dynsparse_batch_sequences_peak");
    assert!(peak >= 8.0, "at most {peak} sequences per step");
    assert_pool_drains(addr);
    srv.shutdown();
}

#[test]
fn a_kv_pool_too_small_for_the_load_preempts_and_still_gives_the_solo_output() {
    // 10 pages of 16 tokens; 8 sequences of up to 75 tokens (5 pages each) cannot all fit.
    let srv = server(|c| {
        c.max_batch = 8;
        c.kv_page = 16;
        c.kv_memory =
            Some(10 * dynsparse::model::KvCache::<CpuBackend>::page_bytes(&model_cfg(), DType::F32, 16) as u64);
    });
    let addr = srv.addr;
    assert_eq!(metric(addr, "dynsparse_kv_pages_total"), 10.0);
    let reqs: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": format!("{} {i}", prompt(i + 3)), "max_tokens": 40, "temperature": 0}))
        .collect();
    solo_then_together(addr, &reqs);
    assert!(metric(addr, "dynsparse_preemptions_total") > 0.0, "the load should have forced a preemption");
    assert_pool_drains(addr);
    srv.shutdown();
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_kv_pages() {
    let srv = server(|_| {});
    let addr = srv.addr;
    let body = json!({"prompt": "key value the ", "max_tokens": 110, "stream": true}).to_string();
    let (status, _, mut r) = send(addr, "POST", "/v1/completions", body.as_bytes());
    assert_eq!(status, 200);
    let first = read_chunk(&mut r).expect("a first chunk");
    assert!(first.starts_with(b"data: {"), "{}", String::from_utf8_lossy(&first));
    drop(r); // the client goes away with ~100 tokens still to generate
    assert_pool_drains(addr);
    let t0 = Instant::now();
    while metric(addr, "dynsparse_requests_finished_total{reason=\"cancelled\"}") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the disconnect was not counted as a cancel");
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.shutdown();
}

#[test]
fn every_bad_request_class_gets_its_status_and_an_openai_error() {
    let srv = server(|c| c.max_body = 4096);
    let addr = srv.addr;
    let long = "x".repeat(CONTEXT);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"prompt\": \"a\",".to_vec(), 400),
        ("not an object", b"[1, 2]".to_vec(), 400),
        ("wrong type", br#"{"prompt": "a", "max_tokens": "ten"}"#.to_vec(), 400),
        ("wrong type of stream", br#"{"prompt": "a", "stream": 1}"#.to_vec(), 400),
        ("no prompt", br#"{"max_tokens": 3}"#.to_vec(), 400),
        ("max_tokens 0", br#"{"prompt": "a", "max_tokens": 0}"#.to_vec(), 400),
        ("max_tokens negative", br#"{"prompt": "a", "max_tokens": -5}"#.to_vec(), 400),
        (
            "max_tokens beyond the context",
            format!(r#"{{"prompt": "a", "max_tokens": {}}}"#, CONTEXT + 1).into_bytes(),
            400,
        ),
        ("prompt + max_tokens beyond the context", br#"{"prompt": "abc", "max_tokens": 126}"#.to_vec(), 400),
        ("prompt longer than the context", format!(r#"{{"prompt": "{long}"}}"#).into_bytes(), 400),
        ("non-UTF-8 bytes", b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400),
        ("a lone surrogate", br#"{"prompt": "\ud800"}"#.to_vec(), 400),
        ("n = 2", br#"{"prompt": "a", "n": 2}"#.to_vec(), 400),
        ("temperature out of range", br#"{"prompt": "a", "temperature": -1}"#.to_vec(), 400),
        ("top_p 0", br#"{"prompt": "a", "top_p": 0}"#.to_vec(), 400),
        ("stop of the wrong type", br#"{"prompt": "a", "stop": {"x": 1}}"#.to_vec(), 400),
        ("oversized body", format!(r#"{{"prompt": "{}"}}"#, "y".repeat(8192)).into_bytes(), 413),
        ("unknown model", br#"{"prompt": "a", "model": "gpt-9"}"#.to_vec(), 404),
    ];
    for (what, body, status) in cases {
        let r = request(addr, "POST", "/v1/completions", &body);
        assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        let err = &e["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {e}");
        assert!(err["type"].is_string() && err.get("param").is_some() && err.get("code").is_some(), "{what}: {e}");
    }
    let r = request(addr, "GET", "/v1/nothing", b"");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    // The server is still fine afterwards.
    complete(addr, &json!({"prompt": "a", "max_tokens": 2}));
    assert_pool_drains(addr);
    srv.shutdown();
}

#[test]
fn a_full_queue_answers_429_at_once_and_everything_else_completes() {
    let srv = server(|c| {
        c.max_batch = 1;
        c.max_batched_tokens = 16;
        c.max_queue = 3;
    });
    let addr = srv.addr;
    // More prompts in one request than the queue can ever hold: a bad request, not a busy server.
    let r = request(
        addr,
        "POST",
        "/v1/completions",
        json!({"prompt": ["a", "b", "c", "d"], "max_tokens": 2}).to_string().as_bytes(),
    );
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("prompt")));
    // 24 requests at once against one slot and a queue of 3: some are refused, the rest complete.
    let replies: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..24)
            .map(|i| {
                s.spawn(move || {
                    let body = json!({"prompt": prompt(i), "max_tokens": 60, "temperature": 0});
                    let r = request(addr, "POST", "/v1/completions", body.to_string().as_bytes());
                    (r.status, r.json())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = replies.iter().filter(|(s, _)| *s == 429).count();
    let done = replies.iter().filter(|(s, v)| *s == 200 && v["usage"]["completion_tokens"] == 60).count();
    assert_eq!(refused + done, 24, "{replies:?}");
    assert!(refused > 0 && done > 0, "{refused} refused, {done} done");
    assert!(replies.iter().filter(|(s, _)| *s == 429).all(|(_, v)| v["error"]["code"] == "queue_full"));
    assert_pool_drains(addr);
    srv.shutdown();
}

#[test]
fn a_request_past_its_timeout_ends_with_an_error_and_frees_its_pages() {
    let srv = server(|c| c.request_timeout = Duration::from_nanos(1));
    let addr = srv.addr;
    let body = json!({"prompt": "key ", "max_tokens": 50}).to_string();
    let r = request(addr, "POST", "/v1/completions", body.as_bytes());
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "timeout");
    // A stream has begun (200) when the deadline passes: an error event, then [DONE].
    let body = json!({"prompt": "key ", "max_tokens": 50, "stream": true}).to_string();
    let r = request(addr, "POST", "/v1/completions", body.as_bytes());
    assert_eq!(r.status, 200);
    let ev = sse_events(&r.body);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(serde_json::from_str::<Value>(&ev[0]).unwrap()["error"]["code"], "timeout");
    assert_eq!(ev[1], "[DONE]");
    assert_eq!(metric(addr, "dynsparse_requests_finished_total{reason=\"timeout\"}"), 2.0);
    assert_eq!(metric(addr, "dynsparse_kv_pages_used"), 0.0);
    srv.shutdown();
}
