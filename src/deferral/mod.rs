//! The deferred path: intake, window policy, submission.
//!
//! Owns: deciding whether a call is deferred ([`optin`]), when a window is
//! due ([`policy`]), and replaying a result as a stream ([`sse`]).

pub mod optin;
pub mod policy;
pub mod sse;
