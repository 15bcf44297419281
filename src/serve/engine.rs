//! The continuous-batching engine: one thread owns the backend, the model and
//! the paged KV cache; HTTP handlers hand it sequences over a channel and
//! read tokens back from each request's own event channel.
//!
//! Every step: (1) take new sequences; (2) retire those whose client has gone
//! (event channel closed) or whose deadline passed, freeing their pages at
//! once; (3) admit waiting sequences first come, first served while a slot is
//! free and the pool holds their tokens on top of what the running ones
//! hold; (4) make sure every decoding sequence gets the page its next token
//! may need, preempting the newest running sequence (pages freed, requeued at
//! the head, recomputed later) until they do; (5) build ONE `Model::step`:
//! one row per decoding sequence, then prefill chunks in admission order
//! under `max_batched_tokens` and [`prefill_budget`], so a long prompt never
//! stalls the decodes;
//! (6) sample each sequence whose fed tokens reached its end, with its own
//! seeded `Rng` — its draws depend on its own logits only, so batching
//! cannot change its stream — and stream the token out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::ServeModel;
use super::metrics::Metrics;
use crate::Backend;
use crate::backend::{BackendChoice, BackendJob, run_on, select};
use crate::error::{Error, Result};
use crate::model::sample::{Sampling, next_token};
use crate::model::{InferState, KvCache, Model, Row, Streamer};
use crate::util::rng::Rng;

/// Why a sequence finished (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop string was produced.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What went wrong with a sequence the engine could not finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// Past the request timeout.
    Timeout,
    /// The server is stopping.
    Shutdown,
    /// The backend failed or the logits were not finite.
    Internal,
}

/// One event of a request's stream; `index` is the choice (the prompt's place in the request).
#[derive(Debug)]
pub enum Event {
    /// One generated token: the text it releases (possibly empty, while a
    /// UTF-8 character or a possible stop string is incomplete) and, on the
    /// last one, why the sequence ended with its token counts.
    Token {
        index: usize,
        text: String,
        finish: Option<(Finish, usize, usize)>,
    },
    Error {
        index: usize,
        kind: FailKind,
        message: String,
    },
}

/// A sequence to run, as the HTTP layer validated it.
#[derive(Debug)]
pub struct SeqRequest {
    pub index: usize,
    pub prompt: Vec<u8>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
    pub deadline: Instant,
}

pub enum Msg {
    Submit(Vec<SeqRequest>),
    Shutdown,
}

/// Prefill rows a step may carry next to `decodes` decode rows, with at most
/// `max_tokens` rows in all: everything left when nothing decodes (no one
/// waits on the step), else at most `max(chunk, decodes)` and, when
/// `step_rows` > 0, at most `step_rows − decodes` — but never fewer than
/// `⌈step_rows / 8⌉`, so prompts keep entering however many sequences decode.
///
/// Why: on a compute-bound backend (the CPU) a step of R rows costs about
/// T₀ + R·c (T₀ the weight reads, c the compute of a row), and every decoding
/// sequence waits for the whole step: its inter-token gap *is* the step time.
/// A step carrying a 512-row prompt chunk next to 32 decode rows delays 32
/// tokens by 16× a decode step — those steps set the inter-token p99. Capping
/// the chunk (Sarathi-style stall-free batching) bounds the step at
/// T₀ + step_rows·c. Under a steady load the step's rows split between
/// prefill and decode in the load's own ratio (prompt tokens per generated
/// token) whatever the cap, so generated tokens/s ≈ R / (ratio + 1) / (T₀ + R·c):
/// a smaller cap costs throughput only through T₀ and the per-row efficiency
/// of smaller products, while the queue (time to first token) grows.
pub fn prefill_budget(max_tokens: usize, chunk: usize, step_rows: usize, decodes: usize) -> usize {
    let left = max_tokens.saturating_sub(decodes);
    if decodes == 0 {
        return left;
    }
    let capped = left.min(chunk.max(decodes));
    if step_rows == 0 { capped } else { capped.min(step_rows.saturating_sub(decodes).max(step_rows.div_ceil(8))) }
}

/// Least-squares fit of an engine step's wall time against its rows,
/// `t ≈ T₀ + c·R`, over the recent steps (each older step's weight decays by
/// [`StepCost::DECAY`] per step, so the fit follows the contexts and the
/// machine's load).
#[derive(Clone, Debug, Default)]
pub struct StepCost {
    /// Σw, Σw·R, Σw·R², Σw·t, Σw·R·t.
    s: [f64; 5],
    steps: usize,
}

impl StepCost {
    pub const DECAY: f64 = 0.97;
    /// Steps observed before the fit is used.
    pub const MIN_STEPS: usize = 8;

    pub fn observe(&mut self, rows: usize, secs: f64) {
        if !(secs.is_finite() && secs >= 0.0) || rows == 0 {
            return;
        }
        let r = rows as f64;
        for (x, y) in self.s.iter_mut().zip([1.0, r, r * r, secs, r * secs]) {
            *x = *x * Self::DECAY + y;
        }
        self.steps += 1;
    }

    /// `(T₀, c)` in seconds once [`Self::MIN_STEPS`] steps came in with row
    /// counts that vary (a standard deviation of at least one row); `T₀`
    /// clamped at 0, `c` at 1 ns.
    pub fn fit(&self) -> Option<(f64, f64)> {
        let [s0, s1, s2, sy, sxy] = self.s;
        if self.steps < Self::MIN_STEPS || s0 <= 0.0 {
            return None;
        }
        let var = s2 / s0 - (s1 / s0).powi(2);
        if var < 1.0 {
            return None;
        }
        let c = ((sxy / s0 - (s1 / s0) * (sy / s0)) / var).max(1e-9);
        let t0 = ((sy - c * s1) / s0).max(0.0);
        Some((t0, c))
    }

    /// Most rows of a step whose predicted cost stays within `factor` × the
    /// cost of a one-row step: `T₀ + c·R ≤ factor·(T₀ + c)`, i.e.
    /// `R ≤ factor + (factor − 1)·T₀/c`. `None` before [`Self::fit`] has one.
    pub fn rows_within(&self, factor: f64) -> Option<usize> {
        let (t0, c) = self.fit()?;
        let r = factor + (factor - 1.0) * t0 / c;
        Some(if r.is_finite() { r.clamp(1.0, 1e6) as usize } else { 1_000_000 })
    }
}

/// The step-row cap of the next step: `fixed` (`--step-rows`; 0: no cap),
/// raised with an inter-token target (`factor` > 0) to the most rows the
/// fitted step cost allows when that is more — rows that are cheap next to
/// the per-step cost let more sequences into a step, and the cap never
/// falls below the hand-set one (a noisy fit cannot shrink the batch).
pub fn step_row_cap(cost: &StepCost, factor: f64, fixed: usize) -> usize {
    if factor <= 0.0 || fixed == 0 {
        return fixed;
    }
    cost.rows_within(factor).map_or(fixed, |r| r.max(fixed))
}

/// Engine limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub backend: BackendChoice,
    pub max_batch: usize,
    pub max_batched_tokens: usize,
    /// See [`prefill_budget`].
    pub prefill_chunk: usize,
    /// See [`prefill_budget`] (0: no cap); with `itl_target` > 0, the floor
    /// of the fitted cap (see [`step_row_cap`]).
    pub step_rows: usize,
    /// Inter-token target as a multiple of a one-row step's cost (0: off).
    pub itl_target: f64,
    /// Pool size in pages (already derived from the memory budget).
    pub kv_pages: usize,
    pub kv_page: usize,
    pub context: usize,
}

/// What the engine tells the server once it runs.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub device: String,
    pub backend: String,
}

struct Seq {
    index: usize,
    /// Prompt and generated tokens; all but the last are in the cache while it runs.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    sampling: Sampling,
    rng: Rng,
    streamer: Streamer,
    events: UnboundedSender<Event>,
    arrived: Instant,
    deadline: Instant,
    slot: Option<usize>,
    /// Admission order (the newest is preempted first).
    order: u64,
    last_token_at: Option<Instant>,
    /// Still counted in the handlers' queue counter (never admitted yet).
    queued_new: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

struct Engine<'a, B: Backend> {
    be: &'a B,
    model: Model<B>,
    cache: KvCache<B>,
    st: InferState<B>,
    /// Fitted step cost (rows → seconds), for the step-row cap.
    cost: StepCost,
    cfg: EngineConfig,
    queue: VecDeque<Seq>,
    running: Vec<Seq>,
    free_slots: Vec<usize>,
    next_order: u64,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
}

/// Runs the engine on the calling thread until `Shutdown` or until every
/// sender is gone. `ready` gets the device's name once the model and the
/// cache are in place, or the error that kept them from being built.
pub fn run(
    cfg: EngineConfig,
    model: ServeModel,
    rx: Receiver<Msg>,
    ready: std::sync::mpsc::Sender<Result<EngineInfo>>,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
) {
    let sel = match select(cfg.backend) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let job = Job { cfg, model, rx, ready: ready.clone(), metrics, queued };
    if let Err(e) = run_on(&sel.backend, job) {
        // Errors before `ready` was answered go to the caller; later ones end the engine.
        if ready.send(Err(Error::Invalid(e.to_string()))).is_err() {
            log::error!("serve engine stopped: {e}");
        }
    }
}

struct Job {
    cfg: EngineConfig,
    model: ServeModel,
    rx: Receiver<Msg>,
    ready: std::sync::mpsc::Sender<Result<EngineInfo>>,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let Job { cfg, model: sm, rx, ready, metrics, queued } = self;
        let model = Model::from_parts(be, sm.cfg, sm.dtype, &sm.params, &sm.quant)?;
        drop(sm);
        let cache = KvCache::paged(be, &model, cfg.max_batch, cfg.context, cfg.kv_page, cfg.kv_pages)?;
        let page_bytes = KvCache::<B>::page_bytes(&model.cfg, model.dtype, cfg.kv_page);
        metrics.update(|s| {
            s.kv_pages_total = cache.pages_total();
            s.kv_page_tokens = cache.page();
            s.kv_page_bytes = page_bytes;
        });
        let info = EngineInfo { device: be.device_name(), backend: be.kind().to_string() };
        if ready.send(Ok(info)).is_err() {
            return Ok(());
        }
        let mut eng = Engine {
            be,
            model,
            cache,
            st: InferState::default(),
            cost: StepCost::default(),
            free_slots: (0..cfg.max_batch).rev().collect(),
            cfg,
            queue: VecDeque::new(),
            running: Vec::new(),
            next_order: 0,
            metrics,
            queued,
        };
        eng.serve(&rx);
        Ok(())
    }
}

impl<B: Backend> Engine<'_, B> {
    fn serve(&mut self, rx: &Receiver<Msg>) {
        loop {
            let idle = self.running.is_empty() && self.queue.is_empty();
            let first = if idle {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return self.shutdown(),
                }
            } else {
                None
            };
            let mut stop = false;
            for m in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match m {
                    Msg::Submit(reqs) => reqs.into_iter().for_each(|r| self.enqueue(r)),
                    Msg::Shutdown => stop = true,
                }
            }
            if stop {
                return self.shutdown();
            }
            self.retire();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish(None);
        }
    }

    fn enqueue(&mut self, r: SeqRequest) {
        self.queue.push_back(Seq {
            index: r.index,
            tokens: r.prompt.iter().map(|&b| b as u32).collect(),
            prompt_len: r.prompt.len(),
            max_tokens: r.max_tokens,
            sampling: r.sampling,
            rng: Rng::new(r.seed),
            streamer: Streamer::new(&r.stop),
            events: r.events,
            arrived: r.arrived,
            deadline: r.deadline,
            slot: None,
            order: 0,
            last_token_at: None,
            queued_new: true,
        });
    }

    /// Frees the slot and pages of `s` (a sequence leaving the running set).
    fn release(&mut self, s: &mut Seq) {
        if let Some(slot) = s.slot.take() {
            self.cache.clear(slot);
            self.free_slots.push(slot);
        }
    }

    fn unqueue(&self, s: &mut Seq) {
        if std::mem::take(&mut s.queued_new) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Drops sequences whose client has gone and fails those past their deadline.
    fn retire(&mut self) {
        let now = Instant::now();
        let (mut cancelled, mut timed_out) = (0, 0);
        // Timeout errors go out after the pages and the metrics are updated, so
        // a client that sees its stream end reads metrics that count it.
        let mut errors = Vec::new();
        let mut keep = |s: &mut Seq, this: &mut Self| -> bool {
            let gone = s.events.is_closed();
            let late = now >= s.deadline;
            if gone || late {
                if late && !gone {
                    errors.push((
                        s.events.clone(),
                        Event::Error {
                            index: s.index,
                            kind: FailKind::Timeout,
                            message: format!(
                                "the request timed out after {:.1} s ({} tokens generated)",
                                now.duration_since(s.arrived).as_secs_f64(),
                                s.generated()
                            ),
                        },
                    ));
                    timed_out += 1;
                } else {
                    cancelled += 1;
                }
                this.release(s);
                this.unqueue(s);
                return false;
            }
            true
        };
        let mut running = std::mem::take(&mut self.running);
        running.retain_mut(|s| keep(s, self));
        self.running = running;
        let mut queue = std::mem::take(&mut self.queue);
        queue.retain_mut(|s| keep(s, self));
        self.queue = queue;
        if cancelled + timed_out > 0 {
            self.metrics.update(|m| {
                m.cancelled += cancelled;
                m.timed_out += timed_out;
            });
            self.publish(None);
        }
        for (tx, ev) in errors {
            let _ = tx.send(ev);
        }
    }

    fn free_pages(&self) -> usize {
        self.cache.pages_total() - self.cache.pages_used()
    }

    /// Pages the running sequences need to hold all the tokens they have now.
    fn committed(&self) -> usize {
        self.running
            .iter()
            .map(|s| {
                let slot = s.slot.expect("running sequences hold a slot");
                self.cache.pages_needed(slot, s.tokens.len() - self.cache.len(slot))
            })
            .sum()
    }

    /// FCFS: the head of the queue enters while a slot is free and the free
    /// pages, less what the running sequences still need for the tokens they
    /// have, hold all its tokens (so an admitted prompt is not starved of
    /// pages by the ones admitted with it).
    fn admit(&mut self) {
        let page = self.cache.page();
        let mut committed = self.committed();
        while let Some(head) = self.queue.front() {
            let need = head.tokens.len().div_ceil(page);
            if self.free_slots.is_empty() || self.free_pages().saturating_sub(committed) < need {
                break;
            }
            let mut s = self.queue.pop_front().expect("front exists");
            s.slot = self.free_slots.pop();
            s.order = self.next_order;
            self.next_order += 1;
            if s.queued_new {
                let n = s.prompt_len as u64;
                self.metrics.update(|m| m.prompt_tokens += n);
            }
            self.unqueue(&mut s);
            committed += need;
            self.running.push(s);
        }
    }

    /// Moves the newest running sequence back to the head of the queue, freeing its pages.
    fn preempt_newest(&mut self) -> bool {
        let Some(i) = self.running.iter().enumerate().max_by_key(|(_, s)| s.order).map(|(i, _)| i) else {
            return false;
        };
        let mut s = self.running.remove(i);
        self.release(&mut s);
        self.queue.push_front(s);
        self.metrics.update(|m| m.preemptions += 1);
        true
    }

    fn step(&mut self) {
        // Rows: (running index, first token, count).
        let plan = loop {
            if self.running.is_empty() {
                return;
            }
            let pending = |s: &Seq, c: &KvCache<B>| s.tokens.len() - c.len(s.slot.expect("running"));
            let decode_pages: usize = self
                .running
                .iter()
                .filter(|s| pending(s, &self.cache) == 1)
                .map(|s| self.cache.pages_needed(s.slot.expect("running"), 1))
                .sum();
            if decode_pages > self.free_pages() {
                self.preempt_newest();
                continue;
            }
            let mut free = self.free_pages() - decode_pages;
            let mut budget = self.cfg.max_batched_tokens;
            let mut plan: Vec<(usize, usize, usize)> = Vec::new();
            for (i, s) in self.running.iter().enumerate() {
                if budget > 0 && pending(s, &self.cache) == 1 {
                    plan.push((i, s.tokens.len() - 1, 1));
                    budget -= 1;
                }
            }
            let cap = step_row_cap(&self.cost, self.cfg.itl_target, self.cfg.step_rows);
            budget = prefill_budget(self.cfg.max_batched_tokens, self.cfg.prefill_chunk, cap, plan.len());
            let page = self.cache.page();
            for (i, s) in self.running.iter().enumerate() {
                let slot = s.slot.expect("running");
                let (cached, left) = (self.cache.len(slot), pending(s, &self.cache));
                if left <= 1 || budget == 0 {
                    continue;
                }
                // The most tokens the free pages take: the slot's pages (whole, from
                // `cached` rounded up) plus `free` more.
                let room = (cached.div_ceil(page) + free) * page - cached;
                let n = left.min(budget).min(room);
                if n == 0 {
                    continue;
                }
                free -= self.cache.pages_needed(slot, n);
                budget -= n;
                plan.push((i, cached, n));
            }
            if plan.is_empty() {
                // Only prompts that cannot get pages: make room by preempting the newest.
                if !self.preempt_newest() {
                    return;
                }
                continue;
            }
            break plan;
        };
        let rows: Vec<Row> = plan
            .iter()
            .flat_map(|&(i, start, n)| {
                let s = &self.running[i];
                let slot = s.slot.expect("running");
                s.tokens[start..start + n].iter().map(move |&token| Row { slot, token })
            })
            .collect();
        let attn = self.model.inference_attention();
        let t0 = Instant::now();
        let res = self.model.step(self.be, &mut self.cache, &mut self.st, &rows, attn);
        self.cost.observe(rows.len(), t0.elapsed().as_secs_f64());
        let logits = match res {
            Ok(l) => l,
            Err(e) => {
                log::error!("serve: a step of {} rows failed: {e}", rows.len());
                let idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                self.fail(&idx, &format!("the engine step failed: {e}"));
                return;
            }
        };
        let now = Instant::now();
        let v = self.model.cfg.vocab;
        let (mut row, mut done, mut failed) = (0, Vec::new(), Vec::new());
        let (mut generated, mut finished_stop, mut finished_length) = (0, 0, 0);
        let mut ttfts = Vec::new();
        let mut itls = Vec::new();
        for &(i, start, n) in &plan {
            row += n;
            let s = &mut self.running[i];
            if start + n != s.tokens.len() {
                continue; // a prefill chunk short of the prompt's end
            }
            let last = &logits[(row - 1) * v..row * v];
            if let Some(j) = last.iter().position(|x| !x.is_finite()) {
                log::error!("serve: logit {j} is {} after {} tokens", last[j], s.tokens.len());
                failed.push(i);
                continue;
            }
            let t = next_token(last, &s.sampling, &mut s.rng);
            s.tokens.push(t);
            generated += 1;
            match s.last_token_at {
                None => ttfts.push(now.duration_since(s.arrived).as_secs_f64()),
                Some(p) => itls.push(now.duration_since(p).as_secs_f64()),
            }
            s.last_token_at = Some(now);
            let (mut out, hit) = s.streamer.push(t as u8);
            let finish = if hit {
                Some(Finish::Stop)
            } else if s.generated() >= s.max_tokens || s.tokens.len() >= self.cache.context {
                Some(Finish::Length)
            } else {
                None
            };
            if finish.is_some() {
                out.extend(s.streamer.finish());
            }
            let text = String::from_utf8_lossy(&out).into_owned();
            let _ = s.events.send(Event::Token {
                index: s.index,
                text,
                finish: finish.map(|f| (f, s.prompt_len, s.generated())),
            });
            match finish {
                Some(Finish::Stop) => finished_stop += 1,
                Some(Finish::Length) => finished_length += 1,
                None => {}
            }
            if finish.is_some() {
                done.push(i);
            }
        }
        if !failed.is_empty() {
            self.fail(&failed, "the logits are not finite (the weights overflow in the working dtype)");
        }
        let seqs = plan.len();
        self.metrics.update(|m| {
            m.generated_tokens += generated;
            m.finished_stop += finished_stop;
            m.finished_length += finished_length;
            m.steps += 1;
            for x in ttfts {
                self.metrics.observe_ttft(m, x);
            }
            for x in itls {
                self.metrics.observe_itl(m, x);
            }
        });
        self.remove(&done);
        self.publish(Some((seqs, rows.len())));
    }

    /// Removes the running sequences at `idx` (indices before any removal) and frees their pages.
    fn remove(&mut self, idx: &[usize]) {
        let mut idx = idx.to_vec();
        idx.sort_unstable_by(|a, b| b.cmp(a));
        idx.dedup();
        for i in idx {
            let mut s = self.running.remove(i);
            self.release(&mut s);
        }
    }

    fn fail(&mut self, idx: &[usize], why: &str) {
        for &i in idx {
            let s = &self.running[i];
            let _ = s.events.send(Event::Error { index: s.index, kind: FailKind::Internal, message: why.to_string() });
        }
        let n = idx.len() as u64;
        self.metrics.update(|m| m.failed += n);
        self.remove(idx);
    }

    fn publish(&self, batch: Option<(usize, usize)>) {
        let used = self.cache.pages_used();
        self.metrics.update(|m| {
            m.running = self.running.len();
            m.waiting = self.queue.len();
            m.kv_pages_used = used;
            m.kv_pages_peak = m.kv_pages_peak.max(used);
            if let Some((s, r)) = batch {
                m.batch_seqs = s;
                m.batch_rows = r;
                m.batch_seqs_peak = m.batch_seqs_peak.max(s);
            } else if self.running.is_empty() {
                m.batch_seqs = 0;
                m.batch_rows = 0;
            }
        });
    }

    /// Tells every sequence the server is stopping and frees everything.
    fn shutdown(&mut self) {
        let mut all: Vec<Seq> = self.running.drain(..).chain(self.queue.drain(..)).collect();
        for s in &mut all {
            let _ = s.events.send(Event::Error {
                index: s.index,
                kind: FailKind::Shutdown,
                message: "the server is shutting down".into(),
            });
            self.release(s);
            self.unqueue(s);
        }
        self.publish(None);
    }
}

#[cfg(test)]
mod tests {
    use super::{StepCost, prefill_budget, step_row_cap};

    #[test]
    fn step_cost_fit_recovers_a_linear_cost_and_derives_the_row_cap() {
        let mut c = StepCost::default();
        // Too few steps, then steps of one row count only: no fit.
        for _ in 0..20 {
            assert_eq!(c.fit(), None);
            c.observe(24, 0.005 + 0.0005 * 24.0);
        }
        assert_eq!(c.fit(), None);
        assert_eq!(step_row_cap(&c, 3.0, 24), 24);
        // Varying rows on t = 5 ms + 0.5 ms·R: T₀ and c come back.
        for i in 0..40 {
            let r = 1 + (i * 7) % 40;
            c.observe(r, 0.005 + 0.0005 * r as f64);
        }
        let (t0, k) = c.fit().expect("a fit");
        assert!((t0 - 0.005).abs() < 1e-9 && (k - 0.0005).abs() < 1e-12, "{t0} {k}");
        // R ≤ 3 + 2·T₀/c = 3 + 2·10 = 23 (T₀ + 23c = 16.5 ms = 3 × 5.5 ms).
        // (The fit is exact to ~1e-12 relative, so the floor may land one below.)
        assert!(matches!(c.rows_within(3.0), Some(22..=23)), "{:?}", c.rows_within(3.0));
        assert!(matches!(c.rows_within(2.0), Some(11..=12)), "{:?}", c.rows_within(2.0));
        // The fit raises the hand-set cap, never lowers it; no target or no cap: the fixed one.
        assert!((22..=23).contains(&step_row_cap(&c, 3.0, 8)));
        assert_eq!(step_row_cap(&c, 3.0, 24), 24);
        assert_eq!(step_row_cap(&c, 0.0, 8), 8);
        assert_eq!(step_row_cap(&c, 3.0, 0), 0);
        // A cost that is all per-row work: the fixed cap.
        let mut d = StepCost::default();
        for i in 0..40 {
            let r = 1 + i % 30;
            d.observe(r, 0.001 * r as f64);
        }
        assert_eq!(d.rows_within(1.5), Some(1));
        assert_eq!(step_row_cap(&d, 1.5, 24), 24);
        // Bad samples are ignored.
        let before = format!("{d:?}");
        d.observe(0, 1.0);
        d.observe(3, f64::NAN);
        assert_eq!(format!("{d:?}"), before);
    }

    #[test]
    fn prefill_budget_is_capped_by_the_decode_rows_only_while_some_decode() {
        // Nothing decodes: the whole step budget.
        assert_eq!(prefill_budget(512, 32, 0, 0), 512);
        // A few decode: the chunk; many: as many prefill rows as decode rows.
        assert_eq!(prefill_budget(512, 32, 0, 3), 32);
        assert_eq!(prefill_budget(512, 32, 0, 100), 100);
        // Never past the step budget.
        assert_eq!(prefill_budget(512, 32, 0, 300), 212);
        assert_eq!(prefill_budget(64, 32, 0, 64), 0);
    }

    #[test]
    fn step_rows_cap_the_step_but_leave_prompts_a_floor() {
        // Nothing decodes: the cap does not apply (no one waits).
        assert_eq!(prefill_budget(512, 32, 24, 0), 512);
        // Decode rows plus prefill rows stay within the cap ...
        assert_eq!(prefill_budget(512, 32, 24, 4), 20);
        assert_eq!(prefill_budget(512, 32, 40, 4), 32);
        // ... down to ⌈24/8⌉ = 3 prefill rows when the decode rows fill it.
        assert_eq!(prefill_budget(512, 32, 24, 23), 3);
        assert_eq!(prefill_budget(512, 32, 24, 30), 3);
        // And never past the step budget.
        assert_eq!(prefill_budget(32, 32, 24, 31), 1);
    }
}
