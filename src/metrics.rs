//! Every Prometheus family carpool exports: names, help, labels and buckets
//! live here and nowhere else. Names follow `carpool_<noun>_<unit>[_total]`;
//! labels are bounded (route template, mode, outcome, upstream name,
//! operation, status), never ids, keys or raw paths.
//!
//! The registry is owned by [`Metrics`], built once in `app` and passed in
//! `AppState`; there are no globals. To add a family: add a field, build and
//! register it in [`Metrics::new`], and record it where the event happens.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Buckets for whole pass-through calls (to the response headers).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for carpool's own share of a call: tens of microseconds upwards.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot register metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

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
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
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
        assert_eq!(m.registry().gather().len(), 4);
    }
}
