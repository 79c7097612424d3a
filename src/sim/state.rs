//! The simulator's memory: options, faults, the call log, files, jobs and the
//! stream gate, shared by every handler behind one `Arc`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use super::faults::FaultBook;
use super::files::StoredFile;
use super::jobs::Job;
use super::SimOptions;
use crate::model::Dialect;

/// One call the simulator received (control routes excluded).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    pub method: String,
    /// The route template, e.g. `/v1/files/{file_id}` (`unmatched` for 404s).
    pub route: String,
    pub path: String,
    /// The bearer token, if one was sent.
    pub credential: Option<String>,
    pub status: u16,
    /// The job the call created or named.
    pub job_id: Option<String>,
    /// The file the call uploaded or named.
    pub file_id: Option<String>,
    /// The request's headers as `(lowercase name, value)`, Authorization
    /// left out (see `credential`); values that are not text are skipped.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

impl CallRecord {
    /// The first value of a request header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One batch job as the simulator sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub dialect: Dialect,
    pub model: Option<String>,
    pub endpoint: String,
    pub metadata: Option<Value>,
    /// The dialect's own status word (`SUCCESS`, `in_progress`, ...).
    pub status: String,
    /// Every custom id submitted, in input order.
    pub custom_ids: Vec<String>,
    pub input_file_ids: Vec<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub credential: Option<String>,
    pub inline: bool,
}

/// Ids a handler attaches to its response so the call log can name them.
#[derive(Clone, Debug, Default)]
pub struct CallIds {
    pub job_id: Option<String>,
    pub file_id: Option<String>,
}

/// Everything the simulator knows.
pub struct Sim {
    pub options: RwLock<SimOptions>,
    pub faults: Mutex<FaultBook>,
    pub calls: Mutex<Vec<CallRecord>>,
    pub files: DashMap<String, StoredFile>,
    pub jobs: Mutex<Vec<Arc<Mutex<Job>>>>,
    pub job_index: DashMap<String, Arc<Mutex<Job>>>,
    /// `true` while streamed completions must pause after their first event.
    pub gate: watch::Sender<bool>,
    /// Responses held by [`Fault::HoldResponse`](super::Fault) right now.
    pub held: AtomicUsize,
    /// Bumped to let every held response go.
    pub release: watch::Sender<u64>,
    seq: AtomicU64,
    /// Held while a create is checked against the enqueued-token limit.
    pub quota_lock: Mutex<()>,
    /// Creates refused for the enqueued-token limit so far.
    pub quota_refusals: AtomicU64,
    /// Jobs left out of the job listings (a listing that lags behind or
    /// misses a job), though each can still be fetched, polled, cancelled.
    pub unlisted: Mutex<HashSet<String>>,
}

impl Sim {
    pub fn new(mut options: SimOptions) -> Arc<Self> {
        let mut book = FaultBook::default();
        book.set(std::mem::take(&mut options.faults));
        let (gate, _) = watch::channel(false);
        let (release, _) = watch::channel(0);
        Arc::new(Self {
            options: RwLock::new(options),
            faults: Mutex::new(book),
            calls: Mutex::new(Vec::new()),
            files: DashMap::new(),
            jobs: Mutex::new(Vec::new()),
            job_index: DashMap::new(),
            gate,
            held: AtomicUsize::new(0),
            release,
            seq: AtomicU64::new(0),
            quota_lock: Mutex::new(()),
            quota_refusals: AtomicU64::new(0),
            unlisted: Mutex::new(HashSet::new()),
        })
    }

    /// A copy of the current options (faults live in the fault book).
    pub fn opts(&self) -> SimOptions {
        self.options
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn update_opts(&self, f: impl FnOnce(&mut SimOptions)) {
        f(&mut self.options.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// A strictly increasing number, for listing order.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Let every held response go.
    pub fn release_held(&self) {
        self.release.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn find_job(&self, id: &str) -> Option<Arc<Mutex<Job>>> {
        self.job_index.get(id).map(|j| Arc::clone(j.value()))
    }

    pub fn all_jobs(&self) -> Vec<Arc<Mutex<Job>>> {
        lock(&self.jobs).clone()
    }

    /// The jobs a listing shows: all but the unlisted ones.
    pub fn listed_jobs(&self) -> Vec<Arc<Mutex<Job>>> {
        let unlisted = lock(&self.unlisted).clone();
        self.all_jobs()
            .into_iter()
            .filter(|j| !unlisted.contains(&lock(j).id))
            .collect()
    }

    pub fn add_job(&self, job: Job) -> Arc<Mutex<Job>> {
        let id = job.id.clone();
        let job = Arc::new(Mutex::new(job));
        lock(&self.jobs).push(Arc::clone(&job));
        self.job_index.insert(id, Arc::clone(&job));
        job
    }
}

/// Lock a mutex; a panic elsewhere never makes the simulator unusable.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A random UUID v4 string, the shape of Mistral's ids.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
