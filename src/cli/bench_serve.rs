//! `dynsparse bench serve`: the server in-process on an ephemeral loopback
//! port and a closed-loop load generator: N concurrent streams, each sending
//! one streaming completion after another with prompt and output lengths
//! drawn from a fixed seeded distribution, bounded in requests and seconds.
//! Reports requests/s, generated tokens/s, time to first token and
//! inter-token latency (p50/p99, seen by the client: the server sends one SSE
//! chunk per token), and the KV memory the paged pool used against what a
//! contiguous cache (streams × context) reserves.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use dynsparse::backend::BackendChoice;
use dynsparse::model::{AttentionMode, ModelConfig, init_params};
use dynsparse::serve::{ServeConfig, ServeModel, contiguous_kv_bytes, start};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::util::rng::Rng;
use dynsparse::{Error, Result};

use super::bench::parse_dtypes;

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// Serve this checkpoint instead of a random model of the size flags below.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Concurrent client streams, one measurement each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 32, 64])]
    pub streams: Vec<usize>,
    /// Requests per measurement at most.
    #[arg(long, default_value_t = 128)]
    pub requests: usize,
    /// Seconds per measurement at most (no request starts after it; those running finish).
    #[arg(long, default_value_t = 60.0)]
    pub max_secs: f64,
    /// Prompt lengths (bytes = tokens) are drawn uniformly from this range.
    #[arg(long, default_value_t = 16)]
    pub prompt_min: usize,
    #[arg(long, default_value_t = 256)]
    pub prompt_max: usize,
    /// Completion lengths (max_tokens) are drawn uniformly from this range.
    #[arg(long, default_value_t = 16)]
    pub output_min: usize,
    #[arg(long, default_value_t = 128)]
    pub output_max: usize,
    /// Seed of the length and prompt draws (the same seed gives the same load).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Server: most tokens in one engine step.
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Server: prefill rows per step while sequences decode (at most max(this, decode rows)).
    #[arg(long, default_value_t = 32)]
    pub prefill_chunk: usize,
    /// Server: while sequences decode, most rows (decode + prefill) per step; 0: no cap. With --itl-target,
    /// the floor of the fitted cap.
    #[arg(long, default_value_t = dynsparse::serve::DEFAULT_STEP_ROWS)]
    pub step_rows: usize,
    /// Server: inter-token target as a multiple of a one-row step (the step-row cap follows the fitted step
    /// cost T0 + c·rows: rows ≤ target + (target − 1)·T0/c, never below --step-rows); 0: the fixed --step-rows.
    #[arg(long, default_value_t = dynsparse::serve::DEFAULT_ITL_TARGET)]
    pub itl_target: f64,
    /// Server: tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub kv_page: usize,
    /// Random model: layers, width, heads, MLP ratio, context (8 × 512 with ratio 4 ≈ 25M parameters).
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    #[arg(long, default_value_t = 512)]
    pub d_model: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 4)]
    pub mlp_ratio: usize,
    #[arg(long, default_value_t = 1024)]
    pub context: usize,
    /// Random model: dense or sparse (DSA with the block settings below).
    #[arg(long, default_value = "sparse")]
    pub attention: String,
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    #[arg(long, default_value_t = 4)]
    pub keep_blocks: usize,
    #[arg(long, default_value_t = 4)]
    pub index_heads: usize,
    #[arg(long, default_value_t = 32)]
    pub index_dim: usize,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Write the table into this Markdown file (a section replaced on every run), e.g. BENCHMARKS.md.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

/// One measurement.
struct Point {
    streams: usize,
    requests: usize,
    tokens: usize,
    secs: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    peak_pages: usize,
    max_batch_seen: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One streamed completion: (time to first token, gaps between tokens, tokens).
fn one_request(addr: SocketAddr, body: &str) -> Result<(f64, Vec<f64>, usize)> {
    let io = |e: std::io::Error| Error::io("bench serve client", e);
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(300))).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    if !line.contains(" 200 ") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(Error::Invalid(format!("bench serve: the server answered {} {rest}", line.trim())));
    }
    loop {
        line.clear();
        r.read_line(&mut line).map_err(io)?;
        if line.trim().is_empty() {
            break;
        }
    }
    let (mut first, mut last, mut gaps, mut tokens) = (None, t0, Vec::new(), 0);
    // Chunked transfer encoding; each chunk carries one SSE event (one token).
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 {
            break;
        }
        let n = usize::from_str_radix(line.trim(), 16)
            .map_err(|_| Error::Invalid(format!("bench serve: bad chunk size {line:?}")))?;
        if n == 0 {
            break;
        }
        let mut buf = vec![0; n + 2];
        r.read_exact(&mut buf).map_err(io)?;
        let now = Instant::now();
        let ev = String::from_utf8_lossy(&buf[..n]);
        for data in ev.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            if data.starts_with("{\"error\"") {
                return Err(Error::Invalid(format!("bench serve: stream error {data}")));
            }
            if data.contains("\"choices\":[{") {
                tokens += 1;
                match first {
                    None => first = Some(now.duration_since(t0).as_secs_f64()),
                    Some(_) => gaps.push(now.duration_since(last).as_secs_f64()),
                }
                last = now;
            }
        }
    }
    Ok((first.unwrap_or(f64::NAN), gaps, tokens))
}

fn model_of(a: &ServeBenchArgs) -> Result<ServeModel> {
    if let Some(p) = &a.checkpoint {
        return ServeModel::from_checkpoint(p);
    }
    let attention = match a.attention.as_str() {
        "dense" => AttentionMode::Dense,
        "sparse" => AttentionMode::Sparse {
            block: a.block,
            keep_blocks: a.keep_blocks,
            index_heads: a.index_heads,
            index_dim: a.index_dim,
        },
        o => return Err(Error::Invalid(format!("--attention `{o}`: expected dense or sparse"))),
    };
    let cfg = ModelConfig {
        n_layers: a.layers,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        d_model: a.d_model,
        vocab: 256,
        context: a.context,
        mlp_ratio: a.mlp_ratio,
        rope_theta: 10000.0,
        attention,
    };
    cfg.check(&|f: &str| format!("--{}", f.trim_start_matches("n_").replace('_', "-")))?;
    let dtype = parse_dtypes(std::slice::from_ref(&a.dtype))?[0];
    Ok(ServeModel { cfg, dtype, params: init_params(&cfg, 3), quant: Vec::new(), name: "bench".into() })
}

pub fn run(choice: BackendChoice, a: ServeBenchArgs) -> Result<()> {
    let bad = |m: &str| Err(Error::Invalid(m.into()));
    if a.streams.is_empty() || a.streams.contains(&0) || a.streams.iter().any(|&s| s > 1024) {
        return bad("--streams needs counts in 1..=1024, e.g. --streams 1,4,16,32,64");
    }
    if a.requests == 0 || !(a.max_secs.is_finite() && a.max_secs > 0.0) {
        return bad("--requests and --max-secs must be positive");
    }
    if a.prompt_min == 0 || a.prompt_min > a.prompt_max || a.output_min == 0 || a.output_min > a.output_max {
        return bad("--prompt-min ≤ --prompt-max and --output-min ≤ --output-max, all positive");
    }
    let model = model_of(&a)?;
    let (mc, dtype) = (model.cfg, model.dtype);
    if a.prompt_max + a.output_max > mc.context {
        return Err(Error::Invalid(format!(
            "--prompt-max {} + --output-max {} exceeds the model's context {}",
            a.prompt_max, a.output_max, mc.context
        )));
    }
    let max_streams = *a.streams.iter().max().expect("non-empty");
    let cfg = ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        backend: choice,
        max_batch: max_streams,
        max_batched_tokens: a.max_batched_tokens.max(max_streams),
        prefill_chunk: a.prefill_chunk.min(a.max_batched_tokens.max(max_streams)),
        step_rows: a.step_rows,
        itl_target: a.itl_target,
        max_queue: max_streams * 2,
        kv_page: a.kv_page,
        keep_samples: false,
        ..Default::default()
    };
    let server = start(cfg, model)?;
    let addr = server.addr;
    log::info!("bench serve: server on http://{addr}, {} ({})", server.info.device, server.info.backend);
    // Warm-up: buffers and caches of the first steps.
    one_request(addr, r#"{"prompt":"warm up","max_tokens":4,"stream":true}"#)?;

    let mut points = Vec::new();
    for &n in &a.streams {
        server.metrics.update(|s| {
            s.kv_pages_peak = s.kv_pages_used;
            s.batch_seqs_peak = 0;
        });
        let started = Arc::new(AtomicUsize::new(0));
        let results = Arc::new(Mutex::new((Vec::new(), Vec::new(), 0usize, 0usize)));
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(a.max_secs);
        let errors: Vec<Error> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|_| {
                    let (started, results, a) = (started.clone(), results.clone(), &a);
                    sc.spawn(move || -> Result<()> {
                        loop {
                            let i = started.fetch_add(1, Ordering::Relaxed);
                            if i >= a.requests || Instant::now() >= deadline {
                                return Ok(());
                            }
                            // Request i's lengths and prompt depend on the seed and i only.
                            let mut rng = Rng::new(a.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
                            let plen = a.prompt_min + rng.below((a.prompt_max - a.prompt_min + 1) as u64) as usize;
                            let olen = a.output_min + rng.below((a.output_max - a.output_min + 1) as u64) as usize;
                            let prompt: String = (0..plen).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
                            let body = format!(
                                r#"{{"prompt":"{prompt}","max_tokens":{olen},"temperature":0.8,"seed":{i},"stream":true}}"#
                            );
                            let (ttft, gaps, toks) = one_request(addr, &body)?;
                            let mut g = results.lock().unwrap_or_else(|e| e.into_inner());
                            g.0.push(ttft);
                            g.1.extend(gaps);
                            g.2 += toks;
                            g.3 += 1;
                        }
                    })
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok().and_then(|r| r.err())).collect()
        });
        let secs = t0.elapsed().as_secs_f64();
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        let (ttft, itl, tokens, requests) = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
        let snap = server.metrics.snapshot();
        let p = Point {
            streams: n,
            requests,
            tokens,
            secs,
            ttft,
            itl,
            peak_pages: snap.kv_pages_peak,
            max_batch_seen: snap.batch_seqs_peak,
        };
        eprintln!(
            "{n} streams: {requests} requests, {tokens} tokens in {secs:.1} s = {:.1} tokens/s",
            tokens as f64 / secs
        );
        points.push(p);
    }
    let page_bytes = server.kv_page_bytes;
    let info = server.info.clone();
    server.shutdown();

    let kind = info.backend.clone();
    let list = a.streams.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let model_desc = match &a.checkpoint {
        Some(p) => format!("checkpoint {}", p.display()),
        None => format!(
            "random weights, {} layers × d_model {} ({} heads, {} KV heads, MLP ×{}), {} attention, context {}",
            mc.n_layers, mc.d_model, mc.n_heads, mc.n_kv_heads, mc.mlp_ratio, a.attention, mc.context
        ),
    };
    let mut md = format!(
        "Machine: {} — device: {} ({kind}).\n\n\
         Command: `dynsparse --backend {kind} bench serve --streams {list} --requests {} --max-secs {} --prompt-min {} --prompt-max {} --output-min {} --output-max {} --max-batched-tokens {} --prefill-chunk {} --step-rows {} --itl-target {} --kv-page {}{}`\n\n\
         Model: {:.1}M parameters, {dtype}, {model_desc}. Load: each stream sends one streaming completion after another \
         (closed loop) over loopback HTTP; prompt lengths uniform in {}..={} bytes, max_tokens uniform in {}..={}, temperature 0.8, \
         seeded; at most {} requests or {} s per row. Latencies as the client sees them (one SSE chunk per token). \
         Server: --max-batch {max_streams}, --max-batched-tokens {}, --prefill-chunk {}, --step-rows {}, --itl-target {}, --kv-page {}.\n\n\
         | streams | requests | req/s | generated tok/s | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms | largest step (seqs) | KV peak (paged) MiB | KV contiguous MiB |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        host_description(),
        info.device,
        a.requests,
        a.max_secs,
        a.prompt_min,
        a.prompt_max,
        a.output_min,
        a.output_max,
        a.max_batched_tokens,
        a.prefill_chunk,
        a.step_rows,
        a.itl_target,
        a.kv_page,
        if a.checkpoint.is_some() { " --checkpoint …".to_string() } else { String::new() },
        mc.n_params() as f64 / 1e6,
        a.prompt_min,
        a.prompt_max,
        a.output_min,
        a.output_max,
        a.requests,
        a.max_secs,
        a.max_batched_tokens.max(max_streams),
        a.prefill_chunk,
        a.step_rows,
        a.itl_target,
        a.kv_page,
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut stats = Vec::new();
    for p in &mut points {
        let tps = p.tokens as f64 / p.secs;
        let (t50, t99) = (pct(&mut p.ttft, 0.5) * 1e3, pct(&mut p.ttft, 0.99) * 1e3);
        let (i50, i99) = (pct(&mut p.itl, 0.5) * 1e3, pct(&mut p.itl, 0.99) * 1e3);
        let contiguous = contiguous_kv_bytes(&mc, dtype, p.streams, mc.context);
        md.push_str(&format!(
            "| {} | {} | {:.2} | {tps:.1} | {t50:.0} | {t99:.0} | {i50:.1} | {i99:.1} | {} | {:.1} | {:.1} |\n",
            p.streams,
            p.requests,
            p.requests as f64 / p.secs,
            p.max_batch_seen,
            mib(p.peak_pages * page_bytes),
            mib(contiguous),
        ));
        stats.push((p.streams, tps, i99));
    }
    if let Some(&(_, tps1, i99_1)) = stats.iter().find(|s| s.0 == 1) {
        for &(n, tps, i99) in stats.iter().filter(|s| s.0 > 1) {
            md.push_str(&format!(
                "\n{n} streams vs 1: generated tokens/s {:.1}×, inter-token p99 {:.2}×.",
                tps / tps1,
                i99 / i99_1
            ));
        }
        md.push('\n');
    }
    println!("{md}");
    if let Some(path) = &a.write {
        update_markdown_section(path, &format!("bench serve {kind}"), &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}
