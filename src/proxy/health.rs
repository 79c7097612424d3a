//! Readiness: can each upstream be reached? A cheap check (any HTTP answer
//! from the base URL counts), cached so probes never hammer an upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::UpstreamConfig;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
const CACHE_FOR: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamHealth {
    pub name: String,
    pub reachable: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReadyReport {
    pub upstreams: Vec<UpstreamHealth>,
}

impl ReadyReport {
    pub fn ready(&self) -> bool {
        self.upstreams.iter().all(|u| u.reachable)
    }
}

pub struct Readiness {
    client: reqwest::Client,
    targets: Vec<(String, String)>,
    cache: Mutex<Option<(Instant, Arc<ReadyReport>)>>,
}

impl Readiness {
    pub fn new(client: reqwest::Client, upstreams: &[UpstreamConfig]) -> Self {
        Self {
            client,
            targets: upstreams
                .iter()
                .map(|u| (u.name.clone(), u.base_url.to_string()))
                .collect(),
            cache: Mutex::new(None),
        }
    }

    /// The latest report, refreshed when older than a few seconds. Concurrent
    /// probes share one refresh.
    pub async fn check(&self) -> Arc<ReadyReport> {
        let mut cache = self.cache.lock().await;
        if let Some((at, report)) = cache.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return report.clone();
            }
        }
        let checks = self.targets.iter().map(|(name, url)| async move {
            let answered = self
                .client
                .get(url)
                .timeout(CHECK_TIMEOUT)
                .send()
                .await
                .is_ok();
            UpstreamHealth {
                name: name.clone(),
                reachable: answered,
            }
        });
        let report = Arc::new(ReadyReport {
            upstreams: join_all(checks).await,
        });
        *cache = Some((Instant::now(), report.clone()));
        report
    }
}
