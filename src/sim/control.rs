//! The control API under `/_sim/` (JSON, no auth): everything the
//! [`SimHandle`](super::SimHandle) can do, for tests that run `carpool sim`
//! as a separate process.
//!
//! | route | effect |
//! |---|---|
//! | `GET /_sim/health` | `{"ok":true}` |
//! | `GET /_sim/faults` | the active faults |
//! | `POST /_sim/faults` | add one fault (body: a [`Fault`]) |
//! | `PUT /_sim/faults` | replace all faults (body: a list) |
//! | `DELETE /_sim/faults` | clear faults, let stuck jobs go on and held responses go |
//! | `GET /_sim/calls`, `DELETE /_sim/calls` | the call log, or reset it |
//! | `GET /_sim/jobs` | every job as a [`JobRecord`](super::JobRecord) |
//! | `POST /_sim/jobs/finish` | make every pending job step due now |
//! | `GET /_sim/held`, `POST /_sim/held/release` | responses held by `hold_response`: how many, let them go |
//! | `POST /_sim/streams/hold`, `POST /_sim/streams/release` | the stream gate |
//! | `GET /_sim/options`, `PATCH /_sim/options` | timing and caps (see [`OptionsPatch`]) |

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::faults::Fault;
use super::state::{lock, CallRecord, JobRecord, Sim};
use super::SimOptions;

/// Options changeable at run time; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionsPatch {
    pub latency_ms: Option<u64>,
    pub job_duration_ms: Option<u64>,
    pub line_duration_ms: Option<u64>,
    pub cancel_duration_ms: Option<u64>,
    pub chunk_delay_ms: Option<u64>,
    pub stream_chunks: Option<usize>,
    pub max_requests_per_job: Option<usize>,
    pub max_inline_requests: Option<usize>,
    pub max_file_bytes: Option<u64>,
    pub record_calls: Option<bool>,
    /// [`SimOptions::enqueued_token_limit`]; once set, a patch cannot lift it.
    pub enqueued_token_limit: Option<u64>,
}

impl OptionsPatch {
    pub fn apply(&self, o: &mut SimOptions) {
        let ms = Duration::from_millis;
        if let Some(v) = self.latency_ms {
            o.latency = ms(v);
        }
        if let Some(v) = self.job_duration_ms {
            o.job_duration = ms(v);
        }
        if let Some(v) = self.line_duration_ms {
            o.line_duration = ms(v);
        }
        if let Some(v) = self.cancel_duration_ms {
            o.cancel_duration = ms(v);
        }
        if let Some(v) = self.chunk_delay_ms {
            o.chunk_delay = ms(v);
        }
        if let Some(v) = self.stream_chunks {
            o.stream_chunks = v.max(1);
        }
        if let Some(v) = self.max_requests_per_job {
            o.max_requests_per_job = v;
        }
        if let Some(v) = self.max_inline_requests {
            o.max_inline_requests = v;
        }
        if let Some(v) = self.max_file_bytes {
            o.max_file_bytes = v;
        }
        if let Some(v) = self.record_calls {
            o.record_calls = v;
        }
        if let Some(v) = self.enqueued_token_limit {
            o.enqueued_token_limit = Some(v);
        }
    }

    /// The current options in patch form (every field set).
    pub fn of(o: &SimOptions) -> Self {
        let ms = |d: Duration| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            latency_ms: ms(o.latency),
            job_duration_ms: ms(o.job_duration),
            line_duration_ms: ms(o.line_duration),
            cancel_duration_ms: ms(o.cancel_duration),
            chunk_delay_ms: ms(o.chunk_delay),
            stream_chunks: Some(o.stream_chunks),
            max_requests_per_job: Some(o.max_requests_per_job),
            max_inline_requests: Some(o.max_inline_requests),
            max_file_bytes: Some(o.max_file_bytes),
            record_calls: Some(o.record_calls),
            enqueued_token_limit: o.enqueued_token_limit,
        }
    }
}

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/_sim/health", get(|| async { Json(json!({"ok": true})) }))
        .route(
            "/_sim/faults",
            get(list_faults)
                .post(add_fault)
                .put(set_faults)
                .delete(clear_faults),
        )
        .route("/_sim/calls", get(calls).delete(clear_calls))
        .route("/_sim/jobs", get(jobs))
        .route("/_sim/jobs/finish", post(finish_jobs))
        .route("/_sim/held", get(held))
        .route("/_sim/held/release", post(release_held))
        .route("/_sim/streams/hold", post(hold))
        .route("/_sim/streams/release", post(release))
        .route("/_sim/options", get(options).patch(patch_options))
}

async fn list_faults(State(sim): State<Arc<Sim>>) -> Json<Vec<Fault>> {
    Json(lock(&sim.faults).list())
}

async fn add_fault(State(sim): State<Arc<Sim>>, Json(fault): Json<Fault>) -> Json<Vec<Fault>> {
    lock(&sim.faults).add(fault);
    list_faults(State(sim)).await
}

async fn set_faults(
    State(sim): State<Arc<Sim>>,
    Json(faults): Json<Vec<Fault>>,
) -> Json<Vec<Fault>> {
    lock(&sim.faults).set(faults);
    list_faults(State(sim)).await
}

async fn clear_faults(State(sim): State<Arc<Sim>>) -> Json<Vec<Fault>> {
    clear(&sim);
    Json(Vec::new())
}

/// Clear every fault, let stuck jobs go on and held responses go.
pub fn clear(sim: &Sim) {
    lock(&sim.faults).clear();
    sim.release_held();
    let now = Instant::now();
    for job in sim.all_jobs() {
        lock(&job).unstick(now);
    }
}

async fn calls(State(sim): State<Arc<Sim>>) -> Json<Vec<CallRecord>> {
    Json(lock(&sim.calls).clone())
}

async fn clear_calls(State(sim): State<Arc<Sim>>) -> Json<Value> {
    lock(&sim.calls).clear();
    Json(json!({"ok": true}))
}

/// Every job, brought up to now.
pub fn job_records(sim: &Sim) -> Vec<JobRecord> {
    let now = Instant::now();
    sim.all_jobs()
        .iter()
        .map(|j| lock(j).record(sim, now))
        .collect()
}

async fn jobs(State(sim): State<Arc<Sim>>) -> Json<Vec<JobRecord>> {
    Json(job_records(&sim))
}

/// Make every pending step of every job due now.
pub fn finish(sim: &Sim) {
    let now = Instant::now();
    for job in sim.all_jobs() {
        lock(&job).hurry(now);
    }
}

async fn finish_jobs(State(sim): State<Arc<Sim>>) -> Json<Vec<JobRecord>> {
    finish(&sim);
    Json(job_records(&sim))
}

async fn held(State(sim): State<Arc<Sim>>) -> Json<Value> {
    Json(json!({"held": sim.held.load(std::sync::atomic::Ordering::SeqCst)}))
}

async fn release_held(State(sim): State<Arc<Sim>>) -> Json<Value> {
    sim.release_held();
    held(State(sim)).await
}

async fn hold(State(sim): State<Arc<Sim>>) -> Json<Value> {
    sim.gate.send_replace(true);
    Json(json!({"held": true}))
}

async fn release(State(sim): State<Arc<Sim>>) -> Json<Value> {
    sim.gate.send_replace(false);
    Json(json!({"held": false}))
}

async fn options(State(sim): State<Arc<Sim>>) -> Json<OptionsPatch> {
    Json(OptionsPatch::of(&sim.opts()))
}

async fn patch_options(
    State(sim): State<Arc<Sim>>,
    Json(patch): Json<OptionsPatch>,
) -> Json<OptionsPatch> {
    sim.update_opts(|o| patch.apply(o));
    options(State(sim)).await
}
