//! The deferred path: intake, window policy, submission.
//!
//! Owns: deciding whether a call is deferred ([`optin`]), storing it and
//! answering it ([`intake`], [`answer`], [`handles`]), when a window is due
//! ([`policy`]), and turning sealed windows into batch jobs ([`flusher`])
//! as enqueued-token quotas allow ([`quota`]).
//! Results come back through [`crate::resolution`].

pub mod answer;
pub mod backpressure;
pub mod engine;
pub mod flusher;
pub mod handles;
pub mod inline;
pub mod intake;
pub mod lease;
pub mod optin;
pub mod policy;
pub mod quota;
pub mod refusals;
pub mod sse;
pub mod sse_anthropic;
pub mod sse_responses;
pub mod turnaround;

pub use engine::Deferral;
