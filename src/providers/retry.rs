//! Retrying upstream calls on files and jobs: exponential backoff with
//! jitter, honouring `Retry-After`, bounded. Each retry is logged and
//! reported to an observer (the metrics), once, here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::ProviderError;

/// Called before each retry with the operation and the status (or
/// `"connect"`/`"timeout"`) that caused it.
pub type RetryObserver = Arc<dyn Fn(&'static str, &str) + Send + Sync>;

#[derive(Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub observer: Option<RetryObserver>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            observer: None,
        }
    }
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("base_delay", &self.base_delay)
            .field("max_delay", &self.max_delay)
            .finish()
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based): the provider's
    /// `Retry-After` when it gave one (never less), else base × 2ⁿ capped,
    /// with ±20% jitter.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.max_delay);
        let jittered = exp.mul_f64(rand::thread_rng().gen_range(0.8..=1.2));
        match retry_after {
            Some(hint) => hint.max(jittered.min(hint + self.base_delay)),
            None => jittered,
        }
    }

    /// Runs `call` until it succeeds, fails in a way a retry cannot help,
    /// or the attempts run out.
    pub async fn run<T, F, Fut>(
        &self,
        operation: &'static str,
        mut call: F,
    ) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let mut retry = 0;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                // A wait longer than the policy's longest is left to the
                // caller's own pacing rather than slept here.
                Err(err)
                    if err.is_retryable()
                        && retry + 1 < self.max_attempts
                        && err.retry_after().map_or(true, |w| w <= self.max_delay) =>
                {
                    let wait = self.delay(retry, err.retry_after());
                    tracing::warn!(
                        operation,
                        attempt = retry + 1,
                        cause = %err.cause_label(),
                        wait_ms = wait.as_millis() as u64,
                        "upstream call failed; retrying"
                    );
                    if let Some(observer) = &self.observer {
                        observer(operation, &err.cause_label());
                    }
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_is_capped_and_honours_retry_after() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            observer: None,
        };
        let first = policy.delay(0, None);
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let capped = policy.delay(10, None);
        assert!(capped <= Duration::from_millis(1200));
        let hinted = policy.delay(0, Some(Duration::from_secs(3)));
        assert!(hinted >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_on_temporary_error_then_succeeds() {
        let policy = RetryPolicy::default();
        let mut calls = 0;
        let result = policy
            .run("upload", || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(ProviderError::Status {
                            operation: "upload",
                            status: 429,
                            message: "slow down".into(),
                            retry_after: Some(Duration::from_secs(1)),
                        })
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_a_client_error() {
        let policy = RetryPolicy::default();
        let mut calls = 0;
        let result: Result<(), _> = policy
            .run("create", || {
                calls += 1;
                async {
                    Err(ProviderError::Status {
                        operation: "create",
                        status: 400,
                        message: "bad".into(),
                        retry_after: None,
                    })
                }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }
}
