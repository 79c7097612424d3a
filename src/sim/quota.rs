//! The enqueued-token limit per key and model
//! ([`SimOptions::enqueued_token_limit`](super::SimOptions)): a create that
//! would take a key's unfinished jobs of one model past it is refused, the
//! way each provider does (reference §0): OpenAI accepts the create and
//! fails the batch with `errors.data[].code = "token_limit_exceeded"`;
//! Mistral (the reference names no equivalent) answers 429 with that code.
//! Tokens are estimated as four bytes of each line's body.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::jobs::{InputError, Job};
use super::state::{lock, Sim};

/// The code both dialects refuse with.
pub const CODE: &str = "token_limit_exceeded";

/// Why a create was refused: the limit, what was enqueued, what it asked.
#[derive(Debug)]
pub struct Refused {
    pub limit: u64,
    pub enqueued: u64,
    pub tokens: u64,
}

impl Refused {
    pub fn message(&self, model: Option<&str>) -> String {
        format!(
            "Enqueued token limit reached for {} in organization sim. Limit: {} enqueued tokens; \
             {} already enqueued, this batch has {}. Please try again once some in-progress batches have been completed.",
            model.unwrap_or("this model"),
            self.limit,
            self.enqueued,
            self.tokens
        )
    }

    /// OpenAI's shape: the batch itself fails with this error.
    pub fn as_job_error(&self, model: Option<&str>) -> InputError {
        InputError::job(CODE, self.message(model))
    }
}

/// Estimated input tokens of a job: four bytes of each line's body.
fn job_tokens(job: &Job) -> u64 {
    job.lines
        .iter()
        .map(|l| (l.body.to_string().len() as u64).div_ceil(4))
        .sum()
}

/// Adds `job` when its key's unfinished jobs of its model leave room for
/// it (or no limit is set); else hands it back with the refusal. Checks
/// and adds under one lock, so two creates never both take the last room.
pub fn add_within_limit(sim: &Sim, job: Job) -> Result<Arc<Mutex<Job>>, Box<(Job, Refused)>> {
    let Some(limit) = sim.opts().enqueued_token_limit else {
        return Ok(sim.add_job(job));
    };
    let _admitting = lock(&sim.quota_lock);
    let now = Instant::now();
    let enqueued: u64 = sim
        .all_jobs()
        .iter()
        .filter_map(|other| {
            let mut other = lock(other);
            let same =
                other.spec.credential == job.spec.credential && other.spec.model == job.spec.model;
            // Jobs refused at validation run nothing and hold no quota.
            let running =
                same && other.errors.is_empty() && !other.advance(sim, now).stage.is_terminal();
            running.then(|| job_tokens(&other))
        })
        .sum();
    let tokens = job_tokens(&job);
    if enqueued + tokens > limit {
        sim.quota_refusals.fetch_add(1, Ordering::Relaxed);
        return Err(Box::new((
            job,
            Refused {
                limit,
                enqueued,
                tokens,
            },
        )));
    }
    Ok(sim.add_job(job))
}
