//! `dynsparse serve`: an OpenAI-compatible HTTP server (axum on tokio) in
//! front of a continuous-batching engine over the paged KV cache.
//!
//! Threads: the engine thread owns the backend, the model and the cache
//! ([`engine`]); a small tokio runtime runs the HTTP side ([`http`]), whose
//! handlers send sequences to the engine over a channel and relay the
//! tokens it sends back on each request's own channel.
//!
//! ```no_run
//! # fn main() -> dynsparse::Result<()> {
//! use dynsparse::serve::{ServeConfig, ServeModel, start};
//! let model = ServeModel::from_checkpoint(std::path::Path::new("run/checkpoint.safetensors"))?;
//! let server = start(ServeConfig::default(), model)?;
//! println!("listening on http://{}", server.addr);
//! server.shutdown();
//! # Ok(()) }
//! ```

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::DType;
use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::model::{KvCache, ModelConfig};

pub use engine::EngineInfo;
pub use metrics::{Metrics, Samples, Snapshot};

/// Weights to serve.
#[derive(Clone, Debug)]
pub struct ServeModel {
    pub cfg: ModelConfig,
    /// Working dtype of weights, activations and the KV cache.
    pub dtype: DType,
    /// f32 values in [`ModelConfig::params`] order (empty where `quant` has the weight).
    pub params: Vec<Vec<f32>>,
    /// Quantized weights by parameter (empty: none; see [`crate::model::Model::from_parts`]).
    pub quant: Vec<Option<crate::quant::QMatrix>>,
    /// The id `/v1/models` lists and requests may name.
    pub name: String,
}

impl ServeModel {
    /// The weights of a training or compressed checkpoint, in its precision, named after the file.
    pub fn from_checkpoint(path: &Path) -> Result<Self> {
        let ck = crate::quant::checkpoint::load_for_inference(path)?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "dynsparse".into());
        Ok(ServeModel { cfg: ck.model, dtype: ck.train.precision, params: ck.params, quant: ck.quant, name })
    }
}

/// Default of [`ServeConfig::step_rows`]: on the CPU backend (2 cores) a
/// step of this many rows of the 26M-parameter model stays within about 3×
/// a single-row decode step (BENCHMARKS.md, "Serving").
pub const DEFAULT_STEP_ROWS: usize = 24;

/// Default of [`ServeConfig::itl_target`]: the issue's inter-token target,
/// p99 at 32 streams ≤ 3× a single stream's.
pub const DEFAULT_ITL_TARGET: f64 = 3.0;

/// Server settings (the `serve` command's flags).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    /// 0: an ephemeral port (see [`ServerHandle::addr`]).
    pub port: u16,
    pub backend: BackendChoice,
    /// Most sequences decoded together (KV slots).
    pub max_batch: usize,
    /// Most query rows (decode tokens + prefill chunks) in one engine step.
    pub max_batched_tokens: usize,
    /// Prefill rows a step may carry while sequences decode: at most
    /// `max(prefill_chunk, decode rows)` (all of `max_batched_tokens` when
    /// none decode). See [`engine::prefill_budget`].
    pub prefill_chunk: usize,
    /// While sequences decode, a step carries at most this many rows (decode
    /// rows first; prompts keep at least an eighth of it); 0: no cap. See
    /// [`engine::prefill_budget`].
    pub step_rows: usize,
    /// Inter-token latency target as a multiple of a one-row step: while
    /// sequences decode, the step-row cap rises from `step_rows` to the most
    /// rows whose cost — fitted online from the steps run so far,
    /// `T₀ + c·rows` — stays within it. 0: `step_rows` always.
    pub itl_target: f64,
    /// Most sequences waiting for admission; beyond it requests get 429 at once.
    pub max_queue: usize,
    /// KV pool size in bytes; `None`: room for `max_batch` full contexts.
    pub kv_memory: Option<u64>,
    /// Tokens per KV page.
    pub kv_page: usize,
    /// Most tokens per sequence (prompt + completion); `None`: the model's context.
    pub context: Option<usize>,
    /// A request still running after this long ends with an error.
    pub request_timeout: Duration,
    /// A stream that gets no token for this long ends with an error.
    pub idle_timeout: Duration,
    /// Largest request body in bytes (413 beyond).
    pub max_body: usize,
    /// Keep raw TTFT and inter-token samples (for `bench serve`).
    pub keep_samples: bool,
    /// Stop on Ctrl-C (SIGINT) as well as on [`ServerHandle::shutdown`].
    pub ctrl_c: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            backend: BackendChoice::Auto,
            max_batch: 32,
            max_batched_tokens: 512,
            prefill_chunk: 32,
            step_rows: DEFAULT_STEP_ROWS,
            itl_target: DEFAULT_ITL_TARGET,
            max_queue: 256,
            kv_memory: None,
            kv_page: crate::model::infer::DEFAULT_PAGE,
            context: None,
            request_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            max_body: 1 << 20,
            keep_samples: false,
            ctrl_c: false,
        }
    }
}

/// A running server.
pub struct ServerHandle {
    /// Where it listens (the real port when 0 was asked for).
    pub addr: SocketAddr,
    pub info: EngineInfo,
    pub metrics: Arc<Metrics>,
    /// Pages in the KV pool and bytes of one page.
    pub kv_pages: usize,
    pub kv_page_bytes: usize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<()>>,
    engine: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting, ends every running request (their streams get an
    /// error event), stops the engine and waits for both threads.
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join();
    }

    /// Waits until the server stops (Ctrl-C when `ctrl_c` was set).
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join();
    }
}

/// Parses a byte count: `1073741824`, `512MiB`, `2GiB`, `64KiB`, `1.5GB`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(Error::Invalid(format!("`{s}`: not a size (e.g. 512MiB, 2GiB, 1000000)"))),
    };
    let n: f64 = num.parse().map_err(|_| Error::Invalid(format!("`{s}`: not a size (e.g. 512MiB, 2GiB, 1000000)")))?;
    let v = n * mult as f64;
    if !(v.is_finite() && v >= 1.0 && v < u64::MAX as f64) {
        return Err(Error::Invalid(format!("`{s}`: out of range")));
    }
    Ok(v as u64)
}

/// Starts the engine and the HTTP server; returns once both run (or the
/// error that kept either from starting: a bad setting, an unusable
/// backend, a port in use).
pub fn start(cfg: ServeConfig, model: ServeModel) -> Result<ServerHandle> {
    let mc = model.cfg;
    mc.validate()?;
    let bad = |m: String| Err(Error::Invalid(m));
    if cfg.max_batch == 0 || cfg.max_batch > 4096 {
        return bad(format!("--max-batch {}: accepted range 1..=4096", cfg.max_batch));
    }
    if cfg.max_batched_tokens < cfg.max_batch || cfg.max_batched_tokens > 1 << 16 {
        return bad(format!(
            "--max-batched-tokens {} must be at least --max-batch {} (one decode row per sequence) and at most 65536",
            cfg.max_batched_tokens, cfg.max_batch
        ));
    }
    if cfg.prefill_chunk == 0 {
        return bad("--prefill-chunk must be at least 1".into());
    }
    if !(cfg.itl_target == 0.0 || (cfg.itl_target > 1.0 && cfg.itl_target <= 1000.0)) {
        return bad(format!("--itl-target {}: 0 (off) or a factor in (1, 1000]", cfg.itl_target));
    }
    if cfg.max_queue == 0 {
        return bad("--max-queue must be at least 1".into());
    }
    if cfg.kv_page == 0 || cfg.kv_page > 4096 {
        return bad(format!("--kv-page {}: accepted range 1..=4096 tokens", cfg.kv_page));
    }
    let context = cfg.context.unwrap_or(mc.context);
    if context < 2 || context > mc.context {
        return bad(format!("--context {context}: accepted range 2..={} (the model's)", mc.context));
    }
    let page_bytes = KvCache::<crate::backend::cpu::CpuBackend>::page_bytes(&mc, model.dtype, cfg.kv_page).max(1);
    let per_seq = context.div_ceil(cfg.kv_page);
    let kv_pages = match cfg.kv_memory {
        None => cfg.max_batch * per_seq,
        Some(b) => (b / page_bytes as u64).min(u32::MAX as u64 / 4) as usize,
    };
    if kv_pages < per_seq {
        return bad(format!(
            "--kv-memory holds {kv_pages} pages of {} tokens ({page_bytes} bytes each); one sequence of {context} tokens needs {per_seq} ({} bytes)",
            cfg.kv_page,
            per_seq * page_bytes
        ));
    }
    let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
        .map_err(|e| Error::io(format!("binding {}:{}", cfg.host, cfg.port), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("reading the bound address", e))?;
    listener.set_nonblocking(true).map_err(|e| Error::io("setting the socket non-blocking", e))?;

    let metrics = Arc::new(Metrics::new(cfg.keep_samples));
    let queued = Arc::new(AtomicUsize::new(0));
    let (etx, erx) = std::sync::mpsc::channel();
    let (rtx, rrx) = std::sync::mpsc::channel();
    let ecfg = engine::EngineConfig {
        backend: cfg.backend,
        max_batch: cfg.max_batch,
        max_batched_tokens: cfg.max_batched_tokens,
        prefill_chunk: cfg.prefill_chunk.min(cfg.max_batched_tokens),
        step_rows: cfg.step_rows,
        itl_target: cfg.itl_target,
        kv_pages,
        kv_page: cfg.kv_page,
        context,
    };
    let name = model.name.clone();
    let (m2, q2) = (metrics.clone(), queued.clone());
    let engine = std::thread::Builder::new()
        .name("dynsparse-engine".into())
        .spawn(move || engine::run(ecfg, model, erx, rtx, m2, q2))
        .map_err(|e| Error::io("starting the engine thread", e))?;
    let info = match rrx.recv() {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            let _ = engine.join();
            return Err(e);
        }
        Err(_) => {
            let _ = engine.join();
            return Err(Error::Device("the engine thread ended before it was ready".into()));
        }
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let app = Arc::new(http::App {
        limits: api::Limits {
            model: name,
            context,
            kv_page: cfg.kv_page,
            kv_pages,
            max_prompts: cfg.max_queue.min(1024),
        },
        engine: etx.clone(),
        metrics: metrics.clone(),
        queued,
        max_queue: cfg.max_queue,
        max_body: cfg.max_body,
        request_timeout: cfg.request_timeout,
        idle_timeout: cfg.idle_timeout,
        next_id: AtomicU64::new(0),
        created,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dynsparse-http")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::io("starting the HTTP runtime", e))?;
    let ctrl_c = cfg.ctrl_c;
    let http = std::thread::Builder::new()
        .name("dynsparse-http-main".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("serve: {e}");
                        let _ = etx.send(engine::Msg::Shutdown);
                        return;
                    }
                };
                let etx2 = etx.clone();
                let stop = async move {
                    if ctrl_c {
                        tokio::select! {
                            _ = stop_rx => {}
                            _ = tokio::signal::ctrl_c() => log::info!("Ctrl-C: shutting down"),
                        }
                    } else {
                        let _ = stop_rx.await;
                    }
                    // The engine ends every request first, so open streams finish and
                    // the graceful shutdown below does not wait on them.
                    let _ = etx2.send(engine::Msg::Shutdown);
                };
                if let Err(e) = axum::serve(listener, http::router(app)).with_graceful_shutdown(stop).await {
                    log::error!("serve: {e}");
                }
                let _ = etx.send(engine::Msg::Shutdown);
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        })
        .map_err(|e| Error::io("starting the HTTP thread", e))?;
    Ok(ServerHandle {
        addr,
        info,
        metrics,
        kv_pages,
        kv_page_bytes: page_bytes,
        stop: Some(stop_tx),
        http: Some(http),
        engine: Some(engine),
    })
}

/// Bytes a contiguous cache would reserve: `max_batch` sequences of `context` tokens.
pub fn contiguous_kv_bytes(cfg: &ModelConfig, dtype: DType, max_batch: usize, context: usize) -> usize {
    max_batch * KvCache::<crate::backend::cpu::CpuBackend>::page_bytes(cfg, dtype, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for bad in ["", "MiB", "12 parsecs", "-1", "0", "1e999"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
