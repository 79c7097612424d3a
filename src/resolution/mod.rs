//! Resolution: polling submitted jobs, reconciling their result files into
//! stored results, waking the callers that wait on them, and purging
//! results once `results_ttl` has passed.

pub mod janitor;
pub mod poller;
pub mod reconcile;
pub mod waiters;
