//! `carpool demo` in-process with a smaller burst: every call answered with
//! its own answer, carpooled into fewer jobs than requests, cheaper in batch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use carpool::demo::{run_demo, DemoOptions, Style, MODELS};

fn small() -> DemoOptions {
    DemoOptions {
        requests: 90,
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
    assert!(summary.all_ok(), "{summary}");
    assert_eq!(summary.requests, options.requests);
    assert_eq!(summary.answered, options.requests, "{summary}");
    assert_eq!(summary.checked, options.requests, "{summary}");
    assert_eq!(summary.served_by_batch, options.requests, "{summary}");
    assert_eq!(summary.in_one_job, options.requests, "{summary}");
    assert_eq!((summary.in_several_jobs, summary.in_no_job), (0, 0));

    for (model, upstream) in MODELS {
        let m = summary.model(model).expect("every model was called");
        assert_eq!(m.upstream, upstream);
        let jobs = m.job_sizes.len();
        assert!(
            jobs > 0 && jobs < m.requests,
            "{model}: {jobs} jobs for {} requests is not carpooling",
            m.requests
        );
        assert_eq!(m.job_sizes.iter().sum::<usize>(), m.requests);
        assert!(m.usage.total() > 0);
        let cost = m.cost.expect("the demo config prices both models");
        assert!(cost.savings() > 0.0 && cost.batch < cost.realtime);
    }
    assert!(summary.cost().savings() > 0.0);
    // Some OpenAI calls went to the Responses API, and were answered too.
    assert!(summary.responses_calls > 0, "{summary}");
    assert_eq!(summary.responses_answered, summary.responses_calls);

    let styles: Vec<Style> = summary.styles.iter().map(|s| s.style).collect();
    assert_eq!(styles, Style::ALL.to_vec());
    assert!(summary
        .styles
        .iter()
        .all(|s| s.sent == options.requests / 3 && s.answered == s.sent));
    assert!(summary.turnaround_p50 > Duration::ZERO);
    assert!(summary.turnaround_max >= summary.turnaround_p50);

    let text = summary.to_string();
    assert!(
        text.contains("OK: every caller got its own answer."),
        "{text}"
    );
    assert!(text.contains("per million calls like these"), "{text}");
}
