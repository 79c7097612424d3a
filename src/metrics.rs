//! Every Prometheus family carpool exports: names, help, labels and buckets
//! live here and nowhere else. Names follow `carpool_<noun>_<unit>[_total]`;
//! labels are bounded (route template, mode, outcome, upstream name,
//! operation, status), never ids, keys or raw paths.
//!
//! The registry is owned by [`Metrics`], built once in `app` and passed in
//! `AppState`; there are no globals. To add a family: add a field, build and
//! register it in [`Metrics::new`], and record it where the event happens.

use std::sync::Arc;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Pattern;
use crate::model::ServedBy;
use crate::pricing::Charge;
use crate::providers::RetryObserver;
use crate::store::{ResolvedStatus, WindowSummary};

/// Buckets for whole pass-through calls (to the response headers).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for deferred work: seconds to a day.
const DEFERRED_BUCKETS: &[f64] = &[
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

/// Buckets for carpool's own share of a call: tens of microseconds upwards.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot register metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Distinct model names that get a metric label of their own; later ones
/// share [`OTHER_MODELS`]. Only names the operator configured can take one
/// (see [`ModelLabels`]), and a glob there can match many names, so the
/// count is bounded too: carpool's memory does not grow with them.
pub const MAX_MODEL_LABELS: usize = 100;

/// The label of every model without one of its own.
pub const OTHER_MODELS: &str = "_other";

/// The model names that have a label of their own. Model names come from
/// callers' bodies and `/metrics` is unauthenticated, so a name is shown
/// only when it matches a model the operator named in the config
/// (`[[batching.models]]` or `[[prices.models]]`): a made-up or fine-tuned
/// id (`ft:…:acme:secret-project:…`) stays `_other`, and no caller can take
/// the labels meant for the configured models. Among configured names,
/// first come first served up to [`MAX_MODEL_LABELS`].
#[derive(Default)]
struct ModelLabels {
    configured: Vec<Pattern>,
    named: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ModelLabels {
    fn label<'a>(&self, model: &'a str) -> &'a str {
        if !self.configured.iter().any(|p| p.matches(model)) {
            return OTHER_MODELS;
        }
        let Ok(mut named) = self.named.lock() else {
            return OTHER_MODELS;
        };
        if named.contains(model) {
            return model;
        }
        if named.len() < MAX_MODEL_LABELS {
            named.insert(model.to_owned());
            return model;
        }
        OTHER_MODELS
    }
}

pub struct Metrics {
    registry: Registry,
    /// `carpool_requests_total{route, mode, outcome}`: every call answered.
    pub requests: IntCounterVec,
    /// `carpool_passthrough_duration_seconds{route, upstream}`: from the
    /// request arriving to the upstream's response headers going out.
    pub passthrough_duration: HistogramVec,
    /// `carpool_proxy_overhead_seconds{route}`: the same span minus the time
    /// spent waiting on the upstream, i.e. what carpool itself added.
    pub proxy_overhead: HistogramVec,
    /// `carpool_upstream_errors_total{upstream, operation, status}`: upstream
    /// answers >= 400 (status is the code) and failures to get one
    /// (`connect`, `timeout`, `io`).
    pub upstream_errors: IntCounterVec,
    /// `carpool_deferred_accepted_total{mode, outcome}`: deferred calls
    /// stored (`new`) or re-attached to a stored one (`reattached`).
    pub deferred_accepted: IntCounterVec,
    /// `carpool_deferred_answer_seconds{mode}`: accept to answer.
    pub deferred_answer: HistogramVec,
    /// `carpool_window_requests{model}`, `_bytes`, `_oldest_age_seconds`:
    /// open windows, refreshed by each flusher pass.
    pub window_requests: IntGaugeVec,
    pub window_bytes: IntGaugeVec,
    pub window_oldest_age: IntGaugeVec,
    /// `carpool_windows_waiting_for_quota{upstream, model}`: sealed windows
    /// held back by `max_enqueued_tokens` or a provider's enqueued-token
    /// refusal (`deferral::quota`), set at each flusher pass and scrape.
    pub windows_waiting_for_quota: IntGaugeVec,
    /// `carpool_flushes_total{reason}`.
    pub flushes: IntCounterVec,
    /// `carpool_batch_jobs_total{upstream, model, status}`: jobs submitted
    /// and the terminal status each reached.
    pub batch_jobs: IntCounterVec,
    /// `carpool_batch_turnaround_seconds`: job created to reconciled.
    pub batch_turnaround: Histogram,
    /// `carpool_submit_failures_total`: window submissions that will be retried.
    pub submit_failures: IntCounter,
    /// `carpool_replicas_listening`: 1 while this process hears the results
    /// other replicas store (Postgres), else 0.
    pub replicas_listening: IntGauge,
    models: ModelLabels,
    /// `carpool_results_total{outcome}`: results stored from batch files.
    pub results: IntCounterVec,
    /// `carpool_tokens_total{model, served_by, kind}`.
    pub tokens: IntCounterVec,
    /// `carpool_upstream_retries_total{operation, cause}`: files and jobs calls retried.
    pub upstream_retries: IntCounterVec,
    /// `carpool_estimated_savings_usd_total{model}`: deferred requests'
    /// tokens priced at realtime minus the price of the tier that served
    /// them (batch, flex), from `[prices]`: the ledger's own figures.
    pub savings: CounterVec,
    /// `carpool_fallbacks_total{reason}`: deferred requests sent as realtime
    /// calls (`deadline`, or the batch `failed` / `expired` / `cancelled`).
    pub fallbacks: IntCounterVec,
    /// `carpool_double_paid_total{upstream, model}`: requests answered
    /// realtime while their line was in a live batch (the batch line is
    /// billed too): only callers still waiting at their fallback time.
    pub double_paid: IntCounterVec,
    /// `carpool_flex_calls_total{outcome}`: flex attempts of realtime calls
    /// for deferred requests (`served`, `refused`, `timeout`, `error`).
    pub flex_calls: IntCounterVec,
    /// `carpool_resubmissions_total{reason}`: requests put back in a window
    /// after their batch `failed` / `expired` / `cancelled`.
    pub resubmissions: IntCounterVec,
    /// `carpool_requests_expired_total{reason}`: requests answered 504
    /// `expired` (`deadline`, or `batch` for expired lines).
    pub requests_expired: IntCounterVec,
    /// `carpool_intake_refused_total{scope}`: deferred calls refused with
    /// 429 at an intake ceiling (`global`, `client` or `client_windows`).
    pub intake_refused: IntCounterVec,
    /// `carpool_webhook_deliveries_total{outcome}`: deliveries that ended:
    /// `delivered`, `gone` (410), `refused` (SSRF guard), `exhausted`
    /// (max_attempts), `dropped` (request no longer stored, or no secret).
    pub webhook_deliveries: IntCounterVec,
    /// `carpool_webhook_attempts_total{result}`: `success`, `gone`,
    /// `http_error`, `timeout`, `transport_error`, `refused`, `dropped`.
    pub webhook_attempts: IntCounterVec,
    /// `carpool_webhook_outbox_pending`: deliveries not yet delivered or dead.
    pub webhook_outbox_pending: IntGauge,
    /// `carpool_webhook_delivery_seconds`: result stored to delivery accepted.
    pub webhook_delivery_latency: Histogram,
}

impl Metrics {
    /// Builds every family; no model gets a label of its own.
    pub fn new() -> Result<Self, MetricsError> {
        Self::with_models(Vec::new())
    }

    /// Builds every family; model names matching `configured` (the models
    /// the config names) may get a `model` label of their own.
    pub fn with_models(configured: Vec<Pattern>) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "carpool_requests_total",
                "Calls answered, by route template, mode and outcome.",
            ),
            &["route", "mode", "outcome"],
        )?;
        let passthrough_duration = HistogramVec::new(
            HistogramOpts::new(
                "carpool_passthrough_duration_seconds",
                "Pass-through latency until the upstream's response headers are sent on.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "upstream"],
        )?;
        let proxy_overhead = HistogramVec::new(
            HistogramOpts::new(
                "carpool_proxy_overhead_seconds",
                "Time carpool itself added to a pass-through call (total minus upstream wait).",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "carpool_upstream_errors_total",
                "Upstream error answers and failures, by upstream, operation and status.",
            ),
            &["upstream", "operation", "status"],
        )?;
        let deferred_accepted = IntCounterVec::new(
            Opts::new(
                "carpool_deferred_accepted_total",
                "Deferred calls stored (new) or re-attached to a stored request (reattached).",
            ),
            &["mode", "outcome"],
        )?;
        let deferred_answer = HistogramVec::new(
            HistogramOpts::new(
                "carpool_deferred_answer_seconds",
                "Deferred calls: time from acceptance to the answer, for answers given on a held connection.",
            )
            .buckets(DEFERRED_BUCKETS.to_vec()),
            &["mode"],
        )?;
        let window_requests = IntGaugeVec::new(
            Opts::new(
                "carpool_window_requests",
                "Requests in open windows, by model.",
            ),
            &["model"],
        )?;
        let window_bytes = IntGaugeVec::new(
            Opts::new(
                "carpool_window_bytes",
                "Bytes of request bodies in open windows, by model.",
            ),
            &["model"],
        )?;
        let window_oldest_age = IntGaugeVec::new(
            Opts::new(
                "carpool_window_oldest_age_seconds",
                "Age of the oldest request in an open window, by model.",
            ),
            &["model"],
        )?;
        let windows_waiting_for_quota = IntGaugeVec::new(
            Opts::new(
                "carpool_windows_waiting_for_quota",
                "Sealed windows waiting for enqueued-token quota, by upstream and model.",
            ),
            &["upstream", "model"],
        )?;
        let flushes = IntCounterVec::new(
            Opts::new(
                "carpool_flushes_total",
                "Windows sealed for submission, by reason.",
            ),
            &["reason"],
        )?;
        let batch_jobs = IntCounterVec::new(
            Opts::new(
                "carpool_batch_jobs_total",
                "Batch jobs submitted, and the terminal status each reached, by upstream and model.",
            ),
            &["upstream", "model", "status"],
        )?;
        let batch_turnaround = Histogram::with_opts(
            HistogramOpts::new(
                "carpool_batch_turnaround_seconds",
                "Batch jobs: from submission to results stored.",
            )
            .buckets(DEFERRED_BUCKETS.to_vec()),
        )?;
        let submit_failures = IntCounter::new(
            "carpool_submit_failures_total",
            "Window submissions that failed and will be retried.",
        )?;
        let replicas_listening = IntGauge::new(
            "carpool_replicas_listening",
            "1 while this process hears results other replicas store (Postgres LISTEN), else 0.",
        )?;
        let results = IntCounterVec::new(
            Opts::new(
                "carpool_results_total",
                "Results stored from batch result files, by outcome.",
            ),
            &["outcome"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "carpool_tokens_total",
                "Tokens in deferred answers, by model, who served them and kind (input or output).",
            ),
            &["model", "served_by", "kind"],
        )?;
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "carpool_upstream_retries_total",
                "Files and batch calls retried, by operation and cause (status, connect or timeout).",
            ),
            &["operation", "cause"],
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "carpool_fallbacks_total",
                "Deferred requests sent as realtime calls, by reason (deadline, failed, expired, cancelled).",
            ),
            &["reason"],
        )?;
        let double_paid = IntCounterVec::new(
            Opts::new(
                "carpool_double_paid_total",
                "Requests answered realtime while their line was in a live batch (paid twice), by upstream and model.",
            ),
            &["upstream", "model"],
        )?;
        let flex_calls = IntCounterVec::new(
            Opts::new(
                "carpool_flex_calls_total",
                "Flex-tier attempts of realtime calls made for deferred requests, by outcome (served, refused, timeout, error).",
            ),
            &["outcome"],
        )?;
        let resubmissions = IntCounterVec::new(
            Opts::new(
                "carpool_resubmissions_total",
                "Requests put back in a window after their batch job ended badly, by reason.",
            ),
            &["reason"],
        )?;
        let requests_expired = IntCounterVec::new(
            Opts::new(
                "carpool_requests_expired_total",
                "Deferred requests answered as expired (504), by reason (deadline, batch).",
            ),
            &["reason"],
        )?;
        let intake_refused = IntCounterVec::new(
            Opts::new(
                "carpool_intake_refused_total",
                "Deferred calls refused with 429 at an intake ceiling, by scope (global, client, client_windows).",
            ),
            &["scope"],
        )?;
        registry.register(Box::new(fallbacks.clone()))?;
        registry.register(Box::new(double_paid.clone()))?;
        registry.register(Box::new(flex_calls.clone()))?;
        registry.register(Box::new(resubmissions.clone()))?;
        registry.register(Box::new(requests_expired.clone()))?;
        registry.register(Box::new(intake_refused.clone()))?;
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "carpool_webhook_deliveries_total",
                "Webhook deliveries that ended, by outcome (delivered, gone, refused, exhausted, dropped).",
            ),
            &["outcome"],
        )?;
        let webhook_attempts = IntCounterVec::new(
            Opts::new(
                "carpool_webhook_attempts_total",
                "Webhook delivery attempts, by result.",
            ),
            &["result"],
        )?;
        let webhook_outbox_pending = IntGauge::new(
            "carpool_webhook_outbox_pending",
            "Webhook deliveries waiting to be delivered (not yet delivered or dead).",
        )?;
        let webhook_delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "carpool_webhook_delivery_seconds",
                "Webhooks: from the result being stored to the receiver accepting it.",
            )
            .buckets(DEFERRED_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(webhook_deliveries.clone()))?;
        registry.register(Box::new(webhook_attempts.clone()))?;
        registry.register(Box::new(webhook_outbox_pending.clone()))?;
        registry.register(Box::new(webhook_delivery_latency.clone()))?;
        registry.register(Box::new(deferred_accepted.clone()))?;
        registry.register(Box::new(deferred_answer.clone()))?;
        registry.register(Box::new(window_requests.clone()))?;
        registry.register(Box::new(window_bytes.clone()))?;
        registry.register(Box::new(window_oldest_age.clone()))?;
        registry.register(Box::new(windows_waiting_for_quota.clone()))?;
        registry.register(Box::new(flushes.clone()))?;
        registry.register(Box::new(batch_jobs.clone()))?;
        registry.register(Box::new(batch_turnaround.clone()))?;
        registry.register(Box::new(submit_failures.clone()))?;
        registry.register(Box::new(replicas_listening.clone()))?;
        registry.register(Box::new(results.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        let savings = CounterVec::new(
            Opts::new(
                "carpool_estimated_savings_usd_total",
                "Estimated USD saved by answering from batches instead of realtime, by model (from [prices]).",
            ),
            &["model"],
        )?;
        registry.register(Box::new(savings.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(passthrough_duration.clone()))?;
        registry.register(Box::new(proxy_overhead.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        Ok(Self {
            registry,
            requests,
            passthrough_duration,
            proxy_overhead,
            upstream_errors,
            deferred_accepted,
            deferred_answer,
            window_requests,
            window_bytes,
            window_oldest_age,
            windows_waiting_for_quota,
            flushes,
            batch_jobs,
            batch_turnaround,
            submit_failures,
            replicas_listening,
            models: ModelLabels {
                configured,
                named: Default::default(),
            },
            results,
            tokens,
            upstream_retries,
            savings,
            fallbacks,
            double_paid,
            flex_calls,
            resubmissions,
            requests_expired,
            intake_refused,
            webhook_deliveries,
            webhook_attempts,
            webhook_outbox_pending,
            webhook_delivery_latency,
        })
    }

    /// The `model` label for a model name: its own when the config names
    /// it and it is among the first [`MAX_MODEL_LABELS`] such names seen,
    /// else [`OTHER_MODELS`].
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        self.models.label(model)
    }

    /// Sets the open-window gauges from a fresh listing: requests, bytes
    /// and the oldest age per model (models with no open window drop out).
    pub fn observe_open_windows(&self, open: &[WindowSummary], now_ms: i64) {
        let mut by_model: std::collections::BTreeMap<&str, (i64, i64, i64)> = Default::default();
        for w in open {
            let entry = by_model.entry(self.model_label(&w.key.model)).or_default();
            entry.0 += w.count as i64;
            entry.1 += w.bytes as i64;
            entry.2 = entry.2.max((now_ms - w.opened_at).max(0) / 1000);
        }
        self.window_requests.reset();
        self.window_bytes.reset();
        self.window_oldest_age.reset();
        for (model, (count, bytes, age)) in by_model {
            self.window_requests.with_label_values(&[model]).set(count);
            self.window_bytes.with_label_values(&[model]).set(bytes);
            self.window_oldest_age.with_label_values(&[model]).set(age);
        }
    }

    /// Counts a result that was stored: its outcome, the tokens its answer
    /// used, and for a batch-served answer what it saved against realtime
    /// prices (`price` from `[prices]`, when the model has one).
    pub fn record_result(
        &self,
        model: &str,
        status: ResolvedStatus,
        served_by: ServedBy,
        charge: Option<&Charge>,
    ) {
        let model = self.model_label(model);
        let outcome = match status {
            ResolvedStatus::Succeeded => "succeeded",
            ResolvedStatus::Failed => "failed",
            ResolvedStatus::Expired => {
                self.requests_expired.with_label_values(&["batch"]).inc();
                "expired"
            }
        };
        self.results.with_label_values(&[outcome]).inc();
        let Some(charge) = charge else { return };
        let usage = charge.usage;
        let served = served_by.as_str();
        self.tokens
            .with_label_values(&[model, served, "input"])
            .inc_by(usage.prompt);
        self.tokens
            .with_label_values(&[model, served, "output"])
            .inc_by(usage.completion);
        // The ledger's own figure for the same request (a realtime answer
        // saves nothing).
        let saved = charge.saved_usd();
        if saved > 0.0 {
            self.savings.with_label_values(&[model]).inc_by(saved);
        }
    }

    /// Counts each retry of a files or jobs call.
    pub fn upstream_retry_observer(&self) -> RetryObserver {
        let retries = self.upstream_retries.clone();
        Arc::new(move |operation: &'static str, cause: &str| {
            retries.with_label_values(&[operation, cause]).inc();
        })
    }

    /// The registry, for families registered by other modules.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_model_labels_are_bounded_first_come_first_served() {
        let m = Metrics::with_models(vec![Pattern::new("m*").unwrap()]).unwrap();
        let names: Vec<String> = (0..MAX_MODEL_LABELS + 5).map(|i| format!("m{i}")).collect();
        for name in &names[..MAX_MODEL_LABELS] {
            assert_eq!(m.model_label(name), name);
        }
        for name in &names[MAX_MODEL_LABELS..] {
            assert_eq!(m.model_label(name), OTHER_MODELS);
        }
        // A name that has a label keeps it; one the config does not name
        // never gets one.
        assert_eq!(m.model_label("m0"), "m0");
        assert_eq!(m.model_label("ft:gpt-4o:acme:secret"), OTHER_MODELS);
        m.record_result(
            "made-up",
            ResolvedStatus::Succeeded,
            ServedBy::Batch,
            Some(&Charge::of(
                crate::pricing::TokenUsage {
                    prompt: 3,
                    completion: 4,
                },
                None,
                ServedBy::Batch,
            )),
        );
        let text = m.render();
        assert!(text.contains(r#"model="_other""#));
        assert!(!text.contains("made-up"));
    }

    #[test]
    fn every_family_is_prefixed_and_rendered() {
        let m = Metrics::new().unwrap();
        m.requests
            .with_label_values(&["/v1/chat/completions", "passthrough", "ok"])
            .inc();
        m.passthrough_duration
            .with_label_values(&["/v1/chat/completions", "up"])
            .observe(0.1);
        m.proxy_overhead
            .with_label_values(&["/v1/chat/completions"])
            .observe(0.0001);
        m.upstream_errors
            .with_label_values(&["up", "passthrough", "500"])
            .inc();
        let text = m.render();
        for family in m.registry().gather() {
            assert!(family.name().starts_with("carpool_"));
            assert!(text.contains(family.name()));
        }
        assert!(m.registry().gather().len() >= 4);
    }
}
