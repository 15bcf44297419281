//! HTTP routes (axum): `POST /v1/completions` (JSON or Server-Sent Events),
//! `GET /v1/models`, `GET /health`, `GET /metrics`. Handlers validate, hand
//! the sequences to the engine thread and relay its events.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use super::api::{self, ApiError, Completion, Limits};
use super::engine::{Event, FailKind, Msg, SeqRequest};
use super::metrics::Metrics;

/// What every handler shares.
pub struct App {
    pub limits: Limits,
    pub engine: std::sync::mpsc::Sender<Msg>,
    pub metrics: Arc<Metrics>,
    /// Sequences handed to the engine and not yet admitted.
    pub queued: Arc<AtomicUsize>,
    pub max_queue: usize,
    pub max_body: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub next_id: AtomicU64,
    pub created: u64,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(app)
}

fn json_response(status: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], v.to_string()).into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.status, &e.body())
}

async fn not_found(req: Request) -> Response {
    let e = ApiError::bad(None, format!("no route for {} {}", req.method(), req.uri().path()))
        .status(404)
        .with_code("not_found");
    error_response(&e)
}

async fn health() -> Response {
    json_response(200, &json!({"status": "ok"}))
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let m = json!({"object": "list", "data": [{
        "id": app.limits.model, "object": "model", "created": app.created, "owned_by": "dynsparse",
        "max_model_len": app.limits.context,
    }]});
    json_response(200, &m)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let ct = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    (StatusCode::OK, [(header::CONTENT_TYPE, ct)], app.metrics.render()).into_response()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    match start_completion(&app, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn start_completion(app: &Arc<App>, req: Request) -> Result<Response, ApiError> {
    let too_big = || {
        ApiError::bad(None, format!("the body is larger than {} bytes", app.max_body))
            .status(413)
            .with_code("body_too_large")
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body as u64) {
        return Err(too_big());
    }
    let body = axum::body::to_bytes(req.into_body(), app.max_body).await.map_err(|_| too_big())?;
    let c = api::parse(&body, &app.limits)?;
    let k = c.prompts.len();
    // Queue admission: reserve k places or refuse at once.
    let before = app.queued.fetch_add(k, Ordering::AcqRel);
    if before + k > app.max_queue {
        app.queued.fetch_sub(k, Ordering::AcqRel);
        return Err(ApiError::bad(
            None,
            format!("the server's queue is full ({before} waiting, at most {}); retry later", app.max_queue),
        )
        .status(429)
        .kind("rate_limit_exceeded")
        .with_code("queue_full"));
    }
    let id = format!("cmpl-{}", app.next_id.fetch_add(1, Ordering::Relaxed));
    let seed = c.seed.unwrap_or_else(|| {
        // No seed given: a fresh one per request (time and counter mixed).
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        t ^ app.next_id.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let arrived = Instant::now();
    let seqs: Vec<SeqRequest> = c
        .prompts
        .iter()
        .enumerate()
        .map(|(index, p)| SeqRequest {
            index,
            prompt: p.clone(),
            max_tokens: c.max_tokens,
            sampling: c.sampling,
            seed,
            stop: c.stop.clone(),
            events: tx.clone(),
            arrived,
            deadline: arrived + app.request_timeout,
        })
        .collect();
    drop(tx);
    let sent = app.engine.send(Msg::Submit(seqs));
    if sent.is_err() {
        app.queued.fetch_sub(k, Ordering::AcqRel);
        return Err(ApiError::bad(None, "the engine has stopped").status(503).kind("server_error"));
    }
    let created = now_secs();
    if c.stream {
        Ok(stream_response(app, id, created, c, rx))
    } else {
        collect_response(app, id, created, c, rx).await
    }
}

fn fail_error(kind: FailKind, message: String) -> ApiError {
    let (status, code) = match kind {
        FailKind::Timeout => (408, "timeout"),
        FailKind::Shutdown => (503, "shutting_down"),
        FailKind::Internal => (500, "internal_error"),
    };
    ApiError::bad(None, message).status(status).kind("server_error").with_code(code)
}

/// Non-streaming: waits for every choice, answers one JSON body with `usage`.
async fn collect_response(
    app: &Arc<App>,
    id: String,
    created: u64,
    c: Completion,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let k = c.prompts.len();
    let mut text = vec![String::new(); k];
    let mut finish: Vec<Option<&'static str>> = vec![None; k];
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    while finish.iter().any(Option::is_none) {
        match rx.recv().await {
            Some(Event::Token { index, text: t, finish: f }) => {
                text[index].push_str(&t);
                if let Some((why, p, g)) = f {
                    finish[index] = Some(why.as_str());
                    prompt_tokens += p;
                    completion_tokens += g;
                }
            }
            Some(Event::Error { kind, message, .. }) => return Err(fail_error(kind, message)),
            None => return Err(fail_error(FailKind::Internal, "the engine dropped the request".into())),
        }
    }
    let choices = (0..k).map(|i| api::choice(i, &text[i], finish[i])).collect();
    let body =
        api::completion(&id, created, &app.limits.model, choices, Some(api::usage(prompt_tokens, completion_tokens)));
    Ok(json_response(200, &body))
}

/// A response body fed from a channel of ready-made SSE bytes.
struct ChanBody(mpsc::Receiver<Bytes>);

impl futures_core::Stream for ChanBody {
    type Item = Result<Bytes, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streaming: one `data:` chunk per generated token (its text may be empty
/// while a character or a possible stop string is incomplete), the last of
/// each choice with its `finish_reason`, a usage chunk when asked for, then
/// `data: [DONE]`. When the client goes away the body is dropped, the relay
/// task ends and drops the engine's receiver, and the engine frees the
/// sequences' pages in its next step.
fn stream_response(
    app: &Arc<App>,
    id: String,
    created: u64,
    c: Completion,
    mut rx: UnboundedReceiver<Event>,
) -> Response {
    let (btx, brx) = mpsc::channel::<Bytes>(64);
    let model = app.limits.model.clone();
    let idle = app.idle_timeout;
    let k = c.prompts.len();
    let include_usage = c.include_usage;
    tokio::spawn(async move {
        let mut open: HashSet<usize> = (0..k).collect();
        let (mut p_tok, mut g_tok) = (0, 0);
        while !open.is_empty() {
            let ev = match tokio::time::timeout(idle, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => Event::Error {
                    index: 0,
                    kind: FailKind::Internal,
                    message: "the engine dropped the request".into(),
                },
                Err(_) => Event::Error {
                    index: 0,
                    kind: FailKind::Timeout,
                    message: format!("no token for {:.0} s (idle timeout)", idle.as_secs_f64()),
                },
            };
            let chunk = match ev {
                Event::Token { index, text, finish } => {
                    if let Some((_, p, g)) = finish {
                        open.remove(&index);
                        p_tok += p;
                        g_tok += g;
                    }
                    let f = finish.map(|(why, _, _)| why.as_str());
                    api::completion(&id, created, &model, vec![api::choice(index, &text, f)], None)
                }
                Event::Error { kind, message, .. } => {
                    // The stream has begun (status 200): the error travels as an event.
                    let _ = btx.send(sse(&fail_error(kind, message).body())).await;
                    break;
                }
            };
            if btx.send(sse(&chunk)).await.is_err() {
                return; // client gone: dropping `rx` cancels the sequences
            }
        }
        if open.is_empty() && include_usage {
            let u = api::completion(&id, created, &model, Vec::new(), Some(api::usage(p_tok, g_tok)));
            let _ = btx.send(sse(&u)).await;
        }
        let _ = btx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(ChanBody(brx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
