//! The OpenAI completions API: request parsing and validation, response
//! and stream-chunk bodies, and OpenAI-style errors
//! (`{"error":{"message","type","param","code"}}`).

use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::sample::Sampling;

/// An error answered to the client.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param, code: None }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The request body as sent. Unknown fields are ignored (as OpenAI does);
/// a known field of the wrong type is an error.
#[derive(Deserialize, Debug)]
struct Raw {
    model: Option<String>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    best_of: Option<i64>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    suffix: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
}

#[derive(Deserialize, Debug)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// What the server needs to know to validate a request.
#[derive(Clone, Debug)]
pub struct Limits {
    pub model: String,
    pub context: usize,
    pub kv_page: usize,
    pub kv_pages: usize,
    pub max_prompts: usize,
}

/// A validated completion request.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub prompts: Vec<Vec<u8>>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// OpenAI's default `max_tokens` for completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// OpenAI accepts at most four stop sequences.
pub const MAX_STOPS: usize = 4;

/// Parses and checks a body; every failure is a 400 naming the field, except
/// an unknown model (404).
pub fn parse(body: &[u8], lim: &Limits) -> Result<Completion, ApiError> {
    let raw: Raw = serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "the body is not valid JSON" } else { "invalid request" };
        ApiError::bad(None, format!("{what}: {e}"))
    })?;
    if let Some(m) = &raw.model
        && m != &lim.model
    {
        return Err(ApiError::bad(
            Some("model"),
            format!("the model `{m}` does not exist; this server has `{}`", lim.model),
        )
        .status(404)
        .with_code("model_not_found"));
    }
    let prompts: Vec<Vec<u8>> = match raw.prompt {
        None | Some(Value::Null) => return Err(ApiError::bad(Some("prompt"), "`prompt` is required")),
        Some(Value::String(s)) => vec![s.into_bytes()],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {
            a.into_iter().filter_map(|v| if let Value::String(s) = v { Some(s.into_bytes()) } else { None }).collect()
        }
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad(Some("prompt"), "`prompt` is an empty list"));
        }
        Some(_) => {
            return Err(ApiError::bad(
                Some("prompt"),
                "`prompt` must be a string or a list of strings (token arrays are not supported)",
            ));
        }
    };
    if prompts.len() > lim.max_prompts {
        return Err(ApiError::bad(
            Some("prompt"),
            format!("{} prompts in one request; at most {}", prompts.len(), lim.max_prompts),
        ));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ApiError::bad(Some("prompt"), format!("prompt {i} is empty")));
    }
    if raw.n.is_some_and(|n| n != 1) || raw.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(
            Some("n"),
            "only n = 1 and best_of = 1 are supported (send a list of prompts instead)",
        ));
    }
    if raw.echo == Some(true) {
        return Err(ApiError::bad(Some("echo"), "echo is not supported"));
    }
    if raw.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad(Some("logprobs"), "logprobs are not supported"));
    }
    if raw.suffix.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad(Some("suffix"), "suffix is not supported"));
    }
    for (p, v) in [("presence_penalty", raw.presence_penalty), ("frequency_penalty", raw.frequency_penalty)] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad(Some(p), format!("{p} is not supported (only 0)")));
        }
    }
    let ctx = lim.context;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= ctx {
        return Err(ApiError::bad(
            Some("prompt"),
            format!(
                "the prompt has {longest} tokens; the model's context is {ctx} tokens, so nothing can be generated"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let max_tokens = match raw.max_tokens {
        None => DEFAULT_MAX_TOKENS.min(ctx - longest),
        Some(m) if m <= 0 => {
            return Err(ApiError::bad(Some("max_tokens"), format!("max_tokens {m}: must be at least 1")));
        }
        Some(m) if m as u64 > ctx as u64 => {
            return Err(ApiError::bad(
                Some("max_tokens"),
                format!("max_tokens {m} is beyond the model's context of {ctx}"),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => m as usize,
    };
    if longest + max_tokens > ctx {
        return Err(ApiError::bad(
            Some("max_tokens"),
            format!(
                "this model's maximum context length is {ctx} tokens, however you requested {} tokens ({longest} in your prompt; {max_tokens} for the completion)",
                longest + max_tokens
            ),
        )
        .with_code("context_length_exceeded"));
    }
    // The last generated token is never fed back, so a sequence holds at most prompt + max_tokens − 1 tokens.
    let pages = (longest + max_tokens - 1).div_ceil(lim.kv_page);
    if pages > lim.kv_pages {
        return Err(ApiError::bad(
            Some("max_tokens"),
            format!(
                "{} tokens need {pages} KV pages of {}, more than the server's whole pool of {} (raise --kv-memory)",
                longest + max_tokens - 1,
                lim.kv_page,
                lim.kv_pages
            ),
        ));
    }
    let temperature = raw.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(Some("temperature"), format!("temperature {temperature}: accepted range 0 to 2")));
    }
    let top_p = raw.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(Some("top_p"), format!("top_p {top_p}: accepted range 0 < top_p ≤ 1")));
    }
    let top_k = match raw.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::bad(Some("top_k"), format!("top_k {k}: -1 or 0 (all) or a positive count"))),
    };
    let stop: Vec<String> = match raw.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.into_iter().filter_map(|v| if let Value::String(s) = v { Some(s) } else { None }).collect()
        }
        Some(_) => return Err(ApiError::bad(Some("stop"), "`stop` must be a string or a list of strings")),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad(Some("stop"), format!("{} stop sequences; at most {MAX_STOPS}", stop.len())));
    }
    if let Some(s) = stop.iter().find(|s| s.is_empty() || s.len() > 1024) {
        return Err(ApiError::bad(Some("stop"), format!("stop sequence {s:?}: must have 1 to 1024 bytes")));
    }
    Ok(Completion {
        prompts,
        max_tokens,
        sampling: Sampling { temperature: temperature as f32, top_k, top_p: top_p as f32 },
        seed: raw.seed.map(|s| s as u64),
        stop,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
    })
}

/// One choice of a response or a stream chunk.
pub fn choice(index: usize, text: &str, finish: Option<&str>) -> Value {
    json!({"text": text, "index": index, "logprobs": null, "finish_reason": finish})
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A `text_completion` object (the whole response, or one stream chunk).
pub fn completion(id: &str, created: u64, model: &str, choices: Vec<Value>, usage: Option<Value>) -> Value {
    let mut v = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices});
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits { model: "m".into(), context: 64, kv_page: 16, kv_pages: 8, max_prompts: 4 }
    }

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes(), &lim()).expect_err(body)
    }

    #[test]
    fn a_full_request_parses_with_openai_defaults() {
        let c = parse(br#"{"prompt":"ab","stop":"x","seed":7,"stream":true,"unknown":[1]}"#, &lim()).unwrap();
        assert_eq!(c.prompts, vec![b"ab".to_vec()]);
        assert_eq!((c.max_tokens, c.seed, c.stream), (16, Some(7), true));
        assert_eq!(c.sampling, Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 });
        assert_eq!(c.stop, vec!["x".to_string()]);
        let c = parse(br#"{"prompt":["a","b"],"max_tokens":62,"temperature":0,"top_k":-1}"#, &lim()).unwrap();
        assert_eq!((c.prompts.len(), c.max_tokens, c.sampling.temperature), (2, 62, 0.0));
    }

    #[test]
    fn every_bad_field_is_a_400_naming_it() {
        for (body, param) in [
            (r#"{"prompt":"a","max_tokens":0}"#, Some("max_tokens")),
            (r#"{"prompt":"a","max_tokens":65}"#, Some("max_tokens")),
            (r#"{"prompt":"a","max_tokens":64}"#, Some("max_tokens")),
            (r#"{"prompt":"a","max_tokens":"3"}"#, None),
            (r#"{"prompt":"a","temperature":3}"#, Some("temperature")),
            (r#"{"prompt":"a","top_p":0}"#, Some("top_p")),
            (r#"{"prompt":"a","top_k":-2}"#, Some("top_k")),
            (r#"{"prompt":"a","stop":["a","b","c","d","e"]}"#, Some("stop")),
            (r#"{"prompt":"a","stop":""}"#, Some("stop")),
            (r#"{"prompt":"a","stop":5}"#, Some("stop")),
            (r#"{"prompt":"a","n":2}"#, Some("n")),
            (r#"{"prompt":[1,2]}"#, Some("prompt")),
            (r#"{"prompt":""}"#, Some("prompt")),
            (r#"{"prompt":[]}"#, Some("prompt")),
            (r#"{"max_tokens":3}"#, Some("prompt")),
            (r#"{"prompt":"a","stream":"yes"}"#, None),
            (r#"{"prompt":"\ud800"}"#, None),
            ("[1,2]", None),
            ("{\"prompt\":", None),
        ] {
            let e = err(body);
            assert_eq!((e.status, e.param), (400, param), "{body}: {e:?}");
        }
        let long = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(64));
        assert_eq!(err(&long).code, Some("context_length_exceeded"));
        assert_eq!(err(r#"{"prompt":"a","model":"other"}"#).status, 404);
    }

    #[test]
    fn a_request_larger_than_the_kv_pool_is_refused() {
        let l = Limits { kv_pages: 2, ..lim() };
        assert!(parse(br#"{"prompt":"a","max_tokens":32}"#, &l).is_ok(), "32 tokens fit 2 pages of 16");
        let e = parse(br#"{"prompt":"ab","max_tokens":32}"#, &l).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("max_tokens")));
    }
}
