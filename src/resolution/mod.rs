//! Resolution: polling submitted jobs, reconciling their result files into
//! stored results, and waking the callers that wait on them.

pub mod poller;
pub mod reconcile;
pub mod waiters;
