//! Resolution: polling submitted jobs, reconciling their result files into
//! stored results, and waking the callers that wait on them; when a job
//! ends badly or a deadline comes first, the failure chain ([`fallback`]:
//! resubmit, realtime, error; [`badlines`] when the provider named the bad
//! lines) and the deadline worker ([`deadline`]); and
//! purging results once `results_ttl` has passed and orphaned provider
//! input files ([`janitor`], [`orphans`]).

pub mod badlines;
pub mod deadline;
pub mod fallback;
pub mod janitor;
pub mod orphans;
pub mod poller;
pub mod reconcile;
pub mod spool;
pub mod waiters;
