//! `dynsparse serve`: the OpenAI-compatible server on a checkpoint.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use dynsparse::Result;
use dynsparse::backend::BackendChoice;
use dynsparse::serve::{ServeConfig, ServeModel, parse_bytes, start};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The checkpoint to serve (from `dynsparse train`); its file stem is the model id.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Address to bind. Loopback by default; any other address exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, logged at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences decoded together (KV slots).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most tokens (decode rows + prefill chunks) in one engine step; long prompts are prefilled in chunks under it.
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Prefill rows per step while sequences decode: at most max(this, decode rows), so a step carrying a prompt
    /// chunk takes about 2× a decode step instead of stalling every stream (lower: steadier inter-token latency;
    /// higher: faster time to first token). With nothing decoding, prompts get all of --max-batched-tokens.
    #[arg(long, default_value_t = 32)]
    pub prefill_chunk: usize,
    /// While sequences decode, most rows (decode + prefill) in one step, so every step — and so every
    /// inter-token gap — stays near the cost of this many rows; prompts keep at least an eighth of it. 0: no cap.
    /// With --itl-target (the default) this is the floor: the cap rises when the measured step cost allows.
    #[arg(long, default_value_t = dynsparse::serve::DEFAULT_STEP_ROWS)]
    pub step_rows: usize,
    /// Inter-token latency target, a multiple of a one-row step's time: the engine fits each step's wall time as
    /// T0 + c·rows over the recent steps and, while sequences decode, caps a step at the most rows whose predicted
    /// time stays within this × (T0 + c), i.e. rows ≤ target + (target − 1)·T0/c, when that is more than
    /// --step-rows: where rows are cheap next to the weight reads (T0/c large) more sequences decode at once.
    /// 0: the fixed --step-rows cap.
    #[arg(long, default_value_t = dynsparse::serve::DEFAULT_ITL_TARGET)]
    pub itl_target: f64,
    /// Most prompts waiting for a slot; a request beyond it gets 429 at once.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// KV cache pool size, e.g. 512MiB or 2GiB (default: room for --max-batch full contexts).
    #[arg(long)]
    pub kv_memory: Option<String>,
    /// Tokens per KV cache page.
    #[arg(long, default_value_t = 16)]
    pub kv_page: usize,
    /// Most tokens per sequence, prompt and completion (default: the model's context).
    #[arg(long)]
    pub context: Option<usize>,
    /// Seconds a request may run in all before it ends with an error.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Seconds a stream may go without a token before it ends with an error.
    #[arg(long, default_value_t = 60.0)]
    pub idle_timeout: f64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
}

fn secs(flag: &str, s: f64) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0 && s <= 1e7) {
        return Err(dynsparse::Error::Invalid(format!("{flag} {s}: accepted range 0 < seconds ≤ 10000000")));
    }
    Ok(Duration::from_secs_f64(s))
}

pub fn run(choice: BackendChoice, a: ServeArgs) -> Result<()> {
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        backend: choice,
        max_batch: a.max_batch,
        max_batched_tokens: a.max_batched_tokens,
        prefill_chunk: a.prefill_chunk,
        step_rows: a.step_rows,
        itl_target: a.itl_target,
        max_queue: a.max_queue,
        kv_memory: a.kv_memory.as_deref().map(parse_bytes).transpose()?,
        kv_page: a.kv_page,
        context: a.context,
        request_timeout: secs("--request-timeout", a.request_timeout)?,
        idle_timeout: secs("--idle-timeout", a.idle_timeout)?,
        max_body: a.max_body,
        keep_samples: false,
        ctrl_c: true,
    };
    let model = ServeModel::from_checkpoint(&a.checkpoint)?;
    let (name, mc, dtype) = (model.name.clone(), model.cfg, model.dtype);
    let server = start(cfg, model)?;
    let ip = server.addr.ip();
    if !ip.is_loopback() {
        log::warn!("listening on {ip}, which is not loopback: anyone who can reach it can use the server");
    }
    log::info!(
        "serving `{name}` ({:.1}M parameters, {dtype}, context {}) on {} ({}); KV pool {} pages × {} tokens = {:.1} MiB",
        mc.n_params() as f64 / 1e6,
        mc.context,
        server.info.device,
        server.info.backend,
        server.kv_pages,
        a.kv_page,
        (server.kv_pages * server.kv_page_bytes) as f64 / (1 << 20) as f64
    );
    log::info!("listening on http://{} (Ctrl-C stops)", server.addr);
    server.wait();
    log::info!("stopped");
    Ok(())
}
