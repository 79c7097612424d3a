//! `carpool demo` in-process with a smaller burst: every call answered with
//! its own answer, carpooled into fewer jobs than requests, cheaper in batch;
//! the calls whose deadline no batch can meet answered by flex, at the flex
//! price, and the summary says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use carpool::demo::{run_demo, DemoOptions, Style, MODELS};

fn small() -> DemoOptions {
    DemoOptions {
        requests: 90,
        near_deadline: 3,
        concurrency: 20,
        poll_concurrency: 5,
        job_duration: Duration::from_millis(200),
        line_duration: Duration::ZERO,
        provider_latency: Duration::ZERO,
        deadline: Duration::from_secs(30),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_every_call_with_its_own_answer_from_fewer_jobs_than_calls_and_saves_money() {
    let options = small();
    let summary = run_demo(options.clone()).await.unwrap();
    let calls = options.requests + options.near_deadline;
    assert!(summary.all_ok(), "{summary}");
    assert_eq!(summary.requests, calls);
    assert_eq!(summary.answered, calls, "{summary}");
    assert_eq!(summary.checked, calls, "{summary}");
    assert_eq!(summary.served_by_batch, options.requests, "{summary}");
    assert_eq!(summary.served_by_flex, options.near_deadline, "{summary}");
    assert_eq!(summary.served_by_realtime, 0, "{summary}");
    assert_eq!(summary.not_batched, options.near_deadline, "{summary}");
    assert_eq!(summary.in_one_job, options.requests, "{summary}");
    assert_eq!((summary.in_several_jobs, summary.in_no_job), (0, 0));

    for (model, upstream) in MODELS {
        let m = summary.model(model).expect("every model was called");
        assert_eq!(m.upstream, upstream);
        let jobs = m.job_sizes.len();
        assert!(
            jobs > 0 && jobs < m.served_by_batch,
            "{model}: {jobs} jobs for {} requests is not carpooling",
            m.served_by_batch
        );
        assert_eq!(m.job_sizes.iter().sum::<usize>(), m.served_by_batch);
        // Only the OpenAI upstream sells flex, and only its near-deadline
        // calls needed it.
        let flexed = if upstream == "openai" {
            options.near_deadline
        } else {
            0
        };
        assert_eq!(m.served_by_flex, flexed, "{model}: {summary}");
        assert_eq!(m.requests, m.served_by_batch + flexed, "{model}");
        assert!(m.usage.total() > 0);
        let cost = m.cost.expect("the demo config prices both models");
        assert!(cost.savings() > 0.0 && cost.batch < cost.realtime);
    }
    assert!(summary.cost().savings() > 0.0);
    // Some OpenAI calls went to the Responses API, and were answered too.
    assert!(summary.responses_calls > 0, "{summary}");
    assert_eq!(summary.responses_answered, summary.responses_calls);

    let styles: Vec<Style> = summary.styles.iter().map(|s| s.style).collect();
    let mut expected = Style::ALL.to_vec();
    expected.push(Style::NearDeadline);
    assert_eq!(styles, expected);
    for s in &summary.styles {
        let sent = if s.style == Style::NearDeadline {
            options.near_deadline
        } else {
            options.requests / 3
        };
        assert_eq!((s.sent, s.answered), (sent, sent), "{:?}", s.style);
    }
    assert!(summary.turnaround_p50 > Duration::ZERO);
    assert!(summary.turnaround_max >= summary.turnaround_p50);

    let text = summary.to_string();
    assert!(
        text.contains("OK: every caller got its own answer."),
        "{text}"
    );
    assert!(text.contains("per million calls like these"), "{text}");
    assert!(
        text.contains(&format!(
            "served by batch {}, by flex {}, by realtime 0",
            options.requests, options.near_deadline
        )),
        "{text}"
    );
    assert!(text.contains("as served"), "{text}");
}
