//! The demo's result: what was sent, what came back, which jobs carried it,
//! how long it took and what it would have cost; printed as plain text.

use std::fmt;
use std::time::Duration;

use super::cost::{Cost, TokenUsage};
use super::traffic::Style;

#[derive(Clone, Debug)]
pub struct DemoSummary {
    pub requests: usize,
    /// Calls that got a final answer (any status).
    pub answered: usize,
    /// Answers equal to the provider's own answer to that very call.
    pub checked: usize,
    /// Answers carrying `Carpool-Served-By: batch`.
    pub served_by_batch: usize,
    /// Answers carrying `Carpool-Served-By: flex`: the calls whose
    /// deadline no batch could meet, on an upstream that sells flex.
    pub served_by_flex: usize,
    /// Answers carrying `Carpool-Served-By: realtime`.
    pub served_by_realtime: usize,
    /// Calls not served by batch (flex, realtime, or no answer): left out
    /// of the placement counts below.
    pub not_batched: usize,
    pub styles: Vec<StyleSummary>,
    /// Calls sent to (and answered by) OpenAI's Responses API
    /// (`/v1/responses`) rather than chat completions.
    pub responses_calls: usize,
    pub responses_answered: usize,
    pub models: Vec<ModelSummary>,
    /// Jobs the simulated provider received.
    pub batch_jobs: usize,
    /// The demo's batch-served requests found in exactly one job, in
    /// several, in none.
    pub in_one_job: usize,
    pub in_several_jobs: usize,
    pub in_no_job: usize,
    /// carpool's window flushes by reason.
    pub flushes: Vec<(String, u64)>,
    /// Accept to answer (held calls: from sending).
    pub turnaround_p50: Duration,
    pub turnaround_max: Duration,
    /// From the first call sent to the last answer.
    pub elapsed: Duration,
    /// The first few problems, and how many there were in all.
    pub problems: Vec<String>,
    pub problem_count: usize,
}

#[derive(Clone, Debug)]
pub struct StyleSummary {
    pub style: Style,
    pub sent: usize,
    pub answered: usize,
}

#[derive(Clone, Debug)]
pub struct ModelSummary {
    pub model: String,
    /// The upstream its calls are routed to.
    pub upstream: String,
    pub requests: usize,
    pub answered: usize,
    pub checked: usize,
    pub served_by_batch: usize,
    pub served_by_flex: usize,
    pub served_by_realtime: usize,
    /// Requests in each of its jobs, in submission order.
    pub job_sizes: Vec<usize>,
    pub usage: TokenUsage,
    /// `None` when the price table has no entry for the model. Its
    /// `batch` is the price as served: batch and flex answers at their
    /// discounts, realtime ones at the full price.
    pub cost: Option<Cost>,
}

impl DemoSummary {
    /// Every call answered with its own answer, none submitted twice.
    pub fn all_ok(&self) -> bool {
        self.requests > 0
            && self.answered == self.requests
            && self.checked == self.requests
            && self.in_several_jobs == 0
    }

    /// Cost over every priced model.
    pub fn cost(&self) -> Cost {
        let mut total = Cost::default();
        for cost in self.models.iter().filter_map(|m| m.cost) {
            total += cost;
        }
        total
    }

    pub fn model(&self, model: &str) -> Option<&ModelSummary> {
        self.models.iter().find(|m| m.model == model)
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "carpool demo: {} deferred calls over {} models and {} opt-in styles, through carpool to a simulated provider",
            self.requests,
            self.models.len(),
            self.styles.len()
        )?;
        writeln!(f)?;
        writeln!(f, "Requests")?;
        writeln!(
            f,
            "  sent {}, answered {}: served by batch {}, by flex {}, by realtime {}",
            self.requests,
            self.answered,
            self.served_by_batch,
            self.served_by_flex,
            self.served_by_realtime
        )?;
        for s in &self.styles {
            writeln!(
                f,
                "    {:<38} {:>5} sent, {:>5} answered",
                s.style.label(),
                s.sent,
                s.answered
            )?;
        }
        writeln!(
            f,
            "    {:<38} {:>5} sent, {:>5} answered",
            "of them, Responses API (/v1/responses)", self.responses_calls, self.responses_answered
        )?;
        writeln!(
            f,
            "  answers checked: {} of {} equal the provider's answer to that very call",
            self.checked, self.requests
        )?;
        writeln!(f)?;
        let placement = if self.in_several_jobs == 0 && self.in_no_job == 0 {
            "every batch-served request in exactly one job".to_owned()
        } else {
            format!(
                "{} in one job, {} in several, {} in none",
                self.in_one_job, self.in_several_jobs, self.in_no_job
            )
        };
        writeln!(
            f,
            "Batch jobs: {} for {} requests served by batch ({placement})",
            self.batch_jobs,
            self.requests - self.not_batched
        )?;
        for m in &self.models {
            let sizes: Vec<String> = m.job_sizes.iter().map(ToString::to_string).collect();
            let others = if m.served_by_flex + m.served_by_realtime > 0 {
                format!(
                    " (and {} by flex, {} by realtime)",
                    m.served_by_flex, m.served_by_realtime
                )
            } else {
                String::new()
            };
            writeln!(
                f,
                "  {:<22} {:<10} {:>5} requests in {} jobs: {}{others}",
                m.model,
                format!("({})", m.upstream),
                m.served_by_batch,
                m.job_sizes.len(),
                sizes.join(", ")
            )?;
        }
        if !self.flushes.is_empty() {
            let reasons: Vec<String> = self
                .flushes
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            writeln!(f, "  windows flushed by reason: {}", reasons.join(", "))?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Turnaround (accept to answer): p50 {}, max {}; whole run {}",
            secs(self.turnaround_p50),
            secs(self.turnaround_max),
            secs(self.elapsed)
        )?;
        writeln!(f)?;
        self.fmt_cost(f)?;
        writeln!(f)?;
        if self.all_ok() {
            writeln!(f, "OK: every caller got its own answer.")
        } else {
            writeln!(
                f,
                "FAILED: {} problem(s), {} of {} calls checked out.",
                self.problem_count.max(1),
                self.checked,
                self.requests
            )?;
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
            Ok(())
        }
    }
}

impl DemoSummary {
    fn fmt_cost(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Cost in USD, from the answers' token usage and the [prices] table"
        )?;
        writeln!(
            f,
            "  (as served: batch and flex answers at their discounts, realtime ones at full price)"
        )?;
        writeln!(
            f,
            "  {:<22} {:>18} {:>12} {:>12} {:>12}",
            "model", "tokens in / out", "realtime", "as served", "saved"
        )?;
        for m in &self.models {
            let tokens = format!(
                "{} / {}",
                thousands(m.usage.prompt),
                thousands(m.usage.completion)
            );
            match m.cost {
                Some(c) => writeln!(
                    f,
                    "  {:<22} {:>18} {:>12} {:>12} {:>12} ({:.0}%)",
                    m.model,
                    tokens,
                    usd(c.realtime),
                    usd(c.batch),
                    usd(c.savings()),
                    c.savings_fraction() * 100.0
                )?,
                None => writeln!(f, "  {:<22} {:>18}   (no price)", m.model, tokens)?,
            }
        }
        let total = self.cost();
        writeln!(
            f,
            "  {:<22} {:>18} {:>12} {:>12} {:>12} ({:.0}%)",
            "total",
            "",
            usd(total.realtime),
            usd(total.batch),
            usd(total.savings()),
            total.savings_fraction() * 100.0
        )?;
        let million = total.scaled(self.requests as u64, 1_000_000);
        writeln!(
            f,
            "  {:<41} {:>12} {:>12} {:>12}",
            "per million calls like these",
            usd(million.realtime),
            usd(million.batch),
            usd(million.savings())
        )
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// Dollars with as many decimals as small amounts need.
fn usd(x: f64) -> String {
    if x.abs() >= 1.0 {
        format!("${x:.2}")
    } else {
        format!("${x:.6}")
    }
}

/// `12345` → `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn small_amounts_keep_their_decimals() {
        assert_eq!(usd(0.0042), "$0.004200");
        assert_eq!(usd(12.345), "$12.35");
    }
}
