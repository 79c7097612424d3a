//! carpool: a reverse proxy that carpools deferrable LLM calls into provider
//! batch jobs and passes everything else straight through.
//!
//! # Layout
//! - [`model`]: ids, request states, dialects, batchable endpoints (pure).
//! - [`config`]: raw TOML + env overrides, validated into typed settings.
//! - [`server`]: the HTTP edge: router, handlers, the one error → HTTP mapping.
//! - [`proxy`]: pass-through forwarding and the defer / pass / reject decision.
//! - [`store`]: the durable contract (state transitions) and its backends.
//! - [`providers`]: each dialect's files and batch APIs behind one client.
//! - [`deferral`]: intake, answers, window policy and the flusher.
//! - [`resolution`]: polling jobs, reconciling result files, waking waiters.
//! - [`webhooks`]: signed, retried deliveries of finished requests (outbox worker, SSRF guard).
//! - [`metrics`]: every Prometheus family carpool exports.
//! - [`pricing`]: what calls cost at realtime and batch prices (pure).
//! - [`app`]: builds the shared state, starts workers, serves, shuts down.
//! - [`sim`]: the simulated provider used by tests, benches and the demo.
//! - [`demo`]: `carpool demo`, the deferred path end to end in one process.

pub mod app;
pub mod config;
pub mod deferral;
pub mod demo;
pub mod metrics;
pub mod model;
pub mod pricing;
pub mod providers;
pub mod proxy;
pub mod resolution;
pub mod server;
pub mod sim;
pub mod store;
pub mod webhooks;
