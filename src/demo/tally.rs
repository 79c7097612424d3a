//! Counting what the callers saw, then joining it with the simulator's job
//! record and the price table into a [`DemoSummary`]. No I/O.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use crate::config::{ModelPrice, PricesConfig};
use crate::sim::{self, JobRecord};

use super::cost::{batch_cost, realtime_cost, Cost, TokenUsage};
use super::summary::{DemoSummary, ModelSummary, StyleSummary};
use super::traffic::{Outcome, Style, MODELS, RESPONSES};

/// How many problems the summary lists by name.
const PROBLEMS_SHOWN: usize = 10;

/// Per-model counts.
#[derive(Debug, Default)]
pub struct ModelTally {
    pub sent: usize,
    pub answered: usize,
    /// Answered 200 with exactly the provider's answer to that very body.
    pub checked: usize,
    pub served_by_batch: usize,
    /// Answers carrying `Carpool-Served-By: flex` (and `service_tier: "flex"`).
    pub served_by_flex: usize,
    /// Answers carrying `Carpool-Served-By: realtime`.
    pub served_by_realtime: usize,
    pub usage: TokenUsage,
    /// The part of `usage` in answers served by flex, and by realtime
    /// (the rest was served by batch).
    pub flex_usage: TokenUsage,
    pub realtime_usage: TokenUsage,
    /// carpool's request ids of the answers served by batch, i.e. the
    /// `custom_id`s expected in exactly one job.
    pub request_ids: Vec<String>,
    /// Requests answered by flex or realtime, or not at all: not matched
    /// to jobs (a late batch may still hold them).
    pub unbatched: usize,
}

/// Everything the callers saw, folded one outcome at a time.
#[derive(Debug, Default)]
pub struct Tally {
    pub models: BTreeMap<&'static str, ModelTally>,
    /// (sent, answered) per opt-in style.
    pub styles: BTreeMap<Style, (usize, usize)>,
    /// (sent, answered) of the calls sent to the Responses API.
    pub responses: (usize, usize),
    pub turnarounds: Vec<Duration>,
    pub problems: Vec<String>,
    pub problem_count: usize,
}

impl Tally {
    pub fn record(&mut self, outcome: &Outcome) {
        let call = &outcome.call;
        let model = self.models.entry(call.model).or_default();
        let style = self.styles.entry(call.style).or_default();
        model.sent += 1;
        style.0 += 1;
        let responses = call.endpoint == RESPONSES;
        if responses {
            self.responses.0 += 1;
        }
        let answer = match &outcome.answer {
            Ok(answer) => answer,
            Err(err) => {
                model.unbatched += 1;
                self.problem(format!("{} call got no answer: {err}", call.model));
                return;
            }
        };
        let tier = answer.served_by.as_deref();
        match (tier, &outcome.request_id) {
            (Some("batch"), Some(id)) => model.request_ids.push(id.clone()),
            _ => model.unbatched += 1,
        }
        model.answered += 1;
        style.1 += 1;
        if responses {
            self.responses.1 += 1;
        }
        self.turnarounds.push(answer.turnaround);
        let usage = TokenUsage::from_answer(&answer.body).unwrap_or_default();
        model.usage += usage;
        match tier {
            Some("batch") => model.served_by_batch += 1,
            Some("flex") => {
                model.served_by_flex += 1;
                model.flex_usage += usage;
            }
            Some("realtime") => {
                model.served_by_realtime += 1;
                model.realtime_usage += usage;
            }
            _ => {}
        }
        let expected = sim::expected_response(call.endpoint, &call.body);
        if answer.status == 200 && untiered(&answer.body, tier) == expected {
            model.checked += 1;
        } else {
            let id = outcome.request_id.as_deref().unwrap_or("(no id)");
            self.problem(format!(
                "{id}: answered {} with a body that is not the provider's answer to its call",
                answer.status
            ));
        }
    }

    fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_SHOWN {
            self.problems.push(text);
        }
    }

    /// Joins the tally with the simulator's `jobs` and the `prices` table.
    pub fn summarize(
        self,
        jobs: &[JobRecord],
        prices: &PricesConfig,
        flushes: Vec<(String, u64)>,
        elapsed: Duration,
    ) -> DemoSummary {
        let mut jobs_of_id = HashMap::<&str, usize>::new();
        for job in jobs {
            for id in &job.custom_ids {
                *jobs_of_id.entry(id.as_str()).or_default() += 1;
            }
        }
        let (mut in_one_job, mut in_several_jobs, mut in_no_job) = (0, 0, 0);
        let mut models = Vec::new();
        for (model, t) in &self.models {
            for id in &t.request_ids {
                match jobs_of_id.get(id.as_str()).copied().unwrap_or(0) {
                    0 => in_no_job += 1,
                    1 => in_one_job += 1,
                    _ => in_several_jobs += 1,
                }
            }
            // An Anthropic batch names no model: it may hold several.
            let mixed = upstream_of(model) == "anthropic";
            let job_sizes = jobs
                .iter()
                .filter(|j| {
                    j.model.as_deref() == Some(*model)
                        || (mixed && j.dialect == crate::model::Dialect::Anthropic)
                })
                .map(|j| j.custom_ids.len())
                .collect();
            models.push(ModelSummary {
                model: (*model).to_owned(),
                upstream: upstream_of(model).to_owned(),
                requests: t.sent,
                answered: t.answered,
                checked: t.checked,
                served_by_batch: t.served_by_batch,
                served_by_flex: t.served_by_flex,
                served_by_realtime: t.served_by_realtime,
                job_sizes,
                usage: t.usage,
                cost: prices.for_model(model).map(|p| served_cost(t, p)),
            });
        }
        let styles = self
            .styles
            .iter()
            .map(|(style, (sent, answered))| StyleSummary {
                style: *style,
                sent: *sent,
                answered: *answered,
            })
            .collect();
        let mut turnarounds = self.turnarounds;
        turnarounds.sort();
        DemoSummary {
            requests: models.iter().map(|m| m.requests).sum(),
            answered: models.iter().map(|m| m.answered).sum(),
            checked: models.iter().map(|m| m.checked).sum(),
            served_by_batch: models.iter().map(|m| m.served_by_batch).sum(),
            served_by_flex: models.iter().map(|m| m.served_by_flex).sum(),
            served_by_realtime: models.iter().map(|m| m.served_by_realtime).sum(),
            not_batched: self.models.values().map(|t| t.unbatched).sum(),
            styles,
            responses_calls: self.responses.0,
            responses_answered: self.responses.1,
            models,
            batch_jobs: jobs.len(),
            in_one_job,
            in_several_jobs,
            in_no_job,
            flushes,
            turnaround_p50: percentile(&turnarounds, 50),
            turnaround_max: turnarounds.last().copied().unwrap_or_default(),
            elapsed,
            problems: self.problems,
            problem_count: self.problem_count,
        }
    }
}

/// An answer without the `service_tier: "flex"` the provider adds when
/// flex served it (the sim's answer is otherwise the same for every tier);
/// any other answer as it is, so a tier named wrongly does not check out.
fn untiered(body: &Value, tier: Option<&str>) -> Value {
    let mut body = body.clone();
    if tier == Some("flex") && body.get("service_tier") == Some(&Value::from("flex")) {
        if let Some(object) = body.as_object_mut() {
            object.remove("service_tier");
        }
    }
    body
}

/// Realtime price of the model's tokens, and the price as served: each
/// tier's tokens at that tier's discount (realtime at none).
fn served_cost(t: &ModelTally, price: &ModelPrice) -> Cost {
    let at = |usage: TokenUsage| realtime_cost(usage, price.input, price.output);
    let batch_usage = TokenUsage {
        prompt: t.usage.prompt - t.flex_usage.prompt - t.realtime_usage.prompt,
        completion: t.usage.completion - t.flex_usage.completion - t.realtime_usage.completion,
    };
    Cost {
        realtime: at(t.usage),
        batch: batch_cost(at(batch_usage), price.batch_discount)
            + batch_cost(at(t.flex_usage), price.flex_discount)
            + at(t.realtime_usage),
    }
}

fn upstream_of(model: &str) -> &'static str {
    MODELS
        .iter()
        .find(|(m, _)| *m == model)
        .map_or("?", |(_, upstream)| upstream)
}

/// Nearest-rank percentile of `sorted` (ascending); zero when empty.
pub fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (pct.min(100) * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelPrice, Pattern};
    use crate::demo::traffic::{plan, Answer, CallError, CHAT};
    use crate::model::Dialect;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=10).map(ms).collect();
        assert_eq!(percentile(&v, 50), ms(5));
        assert_eq!(percentile(&v, 90), ms(9));
        assert_eq!(percentile(&v, 100), ms(10));
        assert_eq!(percentile(&v, 0), ms(1));
        assert_eq!(percentile(&[ms(7)], 50), ms(7));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    fn outcome(i: usize, id: &str, answer: Result<Answer, CallError>) -> Outcome {
        Outcome {
            call: plan(i + 1).remove(i),
            request_id: Some(id.to_owned()),
            answer,
        }
    }

    fn right_answer(i: usize) -> Answer {
        let call = plan(i + 1).remove(i);
        Answer {
            status: 200,
            body: sim::expected_response(call.endpoint, &call.body),
            served_by: Some("batch".to_owned()),
            turnaround: ms(100 * (i as u64 + 1)),
        }
    }

    fn job(model: &str, ids: &[&str]) -> JobRecord {
        JobRecord {
            id: format!("job-{}", ids.join("-")),
            dialect: Dialect::Mistral,
            model: Some(model.to_owned()),
            endpoint: CHAT.to_owned(),
            metadata: None,
            status: "SUCCESS".to_owned(),
            custom_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            input_file_ids: Vec::new(),
            output_file_id: None,
            error_file_id: None,
            credential: None,
            inline: false,
        }
    }

    fn prices() -> PricesConfig {
        PricesConfig {
            batch_discount: 0.5,
            flex_discount: 0.5,
            models: vec![ModelPrice {
                model: Pattern::new("mistral-*").unwrap(),
                input: 1.0,
                output: 1.0,
                batch_discount: 0.5,
                flex_discount: 0.5,
                upstream: None,
            }],
        }
    }

    #[test]
    fn right_answers_check_out_and_requests_are_matched_to_their_jobs() {
        let mut tally = Tally::default();
        // Calls 0 and 3 go to the first model, 1 and 4 to the second.
        for (i, id) in [(0, "a"), (1, "b"), (3, "c"), (4, "d")] {
            tally.record(&outcome(i, id, Ok(right_answer(i))));
        }
        let (m0, m1) = (MODELS[0].0, MODELS[1].0);
        let jobs = [job(m0, &["a", "c"]), job(m1, &["b"]), job(m1, &["d"])];
        let s = tally.summarize(&jobs, &prices(), Vec::new(), ms(1));
        assert_eq!((s.requests, s.answered, s.checked), (4, 4, 4));
        assert_eq!((s.in_one_job, s.in_several_jobs, s.in_no_job), (4, 0, 0));
        assert_eq!(s.models[0].model, m0.min(m1));
        let first = s.models.iter().find(|m| m.model == m0).unwrap();
        assert_eq!(first.job_sizes, vec![2]);
        assert!(first.cost.unwrap().savings() > 0.0);
        let second = s.models.iter().find(|m| m.model == m1).unwrap();
        assert_eq!(second.job_sizes, vec![1, 1]);
        assert!(second.cost.is_none(), "no price for the second model here");
        assert_eq!(s.turnaround_p50, ms(200));
        assert_eq!(s.turnaround_max, ms(500));
        assert!(s.all_ok());
    }

    #[test]
    fn someone_elses_answer_does_not_check_out() {
        let mut tally = Tally::default();
        let mut wrong = right_answer(0);
        wrong.body = right_answer(2).body;
        tally.record(&outcome(0, "a", Ok(wrong)));
        let s = tally.summarize(&[job(MODELS[0].0, &["a"])], &prices(), Vec::new(), ms(1));
        assert_eq!((s.answered, s.checked), (1, 0));
        assert_eq!(s.problem_count, 1);
        assert!(!s.all_ok());
    }

    #[test]
    fn a_request_in_two_jobs_or_none_is_counted_and_fails_the_run() {
        let mut tally = Tally::default();
        tally.record(&outcome(0, "a", Ok(right_answer(0))));
        tally.record(&outcome(2, "c", Ok(right_answer(2))));
        let m0 = MODELS[0].0;
        let jobs = [job(m0, &["a"]), job(m0, &["a"])];
        let s = tally.summarize(&jobs, &prices(), Vec::new(), ms(1));
        assert_eq!((s.in_one_job, s.in_several_jobs, s.in_no_job), (0, 1, 1));
        assert!(!s.all_ok());
    }

    #[test]
    fn a_call_without_an_answer_fails_the_run() {
        let mut tally = Tally::default();
        tally.record(&outcome(0, "a", Err(CallError::Deadline)));
        let s = tally.summarize(&[], &prices(), Vec::new(), ms(1));
        assert_eq!((s.requests, s.answered), (1, 0));
        assert!(s.problems[0].contains("no answer"));
        assert!(!s.all_ok());
    }
}
