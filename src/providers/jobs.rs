//! Batch job wire formats of each dialect, mapped to one neutral view. Pure.
//!
//! Wire structs stay private here; the rest of carpool sees [`JobView`].
//! Status enums are open: a value a provider adds later reads as running
//! (and is logged by the caller), never as an error.

use serde_json::{json, Value};

use crate::model::{Dialect, WindowId};

/// The `metadata` key that carries carpool's window id on every job.
pub const WINDOW_METADATA_KEY: &str = "carpool_window";

/// Where a job stands, in carpool's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    /// Queued, validating, running, finalizing, cancelling, or unknown.
    Running,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A provider batch job, neutral.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub id: String,
    pub phase: JobPhase,
    /// The provider's own status string, for logs and the admin API.
    pub raw_status: String,
    pub output_file: Option<String>,
    pub error_file: Option<String>,
    /// Job-level errors (input validation), as the provider worded them.
    pub errors: Vec<String>,
    /// The errors that name an input line (OpenAI `errors.data[].line`):
    /// the lines the provider refused the whole batch for.
    pub named_lines: Vec<NamedLine>,
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// carpool's window id from the job metadata, if any.
    pub window: Option<String>,
    pub created_at: i64,
}

/// An input line a provider refused a batch for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedLine {
    /// 1-based, in the input file.
    pub line: u64,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// The `errors.data[]` entries of an OpenAI batch that carry a line.
fn named_lines(v: &Value) -> Vec<NamedLine> {
    v.pointer("/errors/data")
        .and_then(Value::as_array)
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| {
                    Some(NamedLine {
                        line: e.get("line").and_then(Value::as_u64).filter(|l| *l >= 1)?,
                        code: text(e, "code").unwrap_or_else(|| "invalid_request".to_owned()),
                        message: text(e, "message").unwrap_or_default(),
                        param: text(e, "param"),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn jobs_path(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Mistral => "/v1/batch/jobs",
        Dialect::Openai => "/v1/batches",
        Dialect::Anthropic => super::anthropic::BATCHES_PATH,
    }
}

/// What a job is created for, beside its file.
pub struct JobTerms<'a> {
    pub model: &'a str,
    pub endpoint: &'a str,
    /// The openai dialect's `completion_window` (e.g. `24h`, `48h`).
    pub completion_window: &'a str,
}

/// The body of the create call.
pub fn create_body(
    dialect: Dialect,
    file_id: &str,
    terms: &JobTerms<'_>,
    window: &WindowId,
) -> Value {
    let metadata = json!({ WINDOW_METADATA_KEY: window.as_str() });
    match dialect {
        Dialect::Mistral => json!({
            "input_files": [file_id],
            "model": terms.model,
            "endpoint": terms.endpoint,
            "metadata": metadata,
            "timeout_hours": 24,
        }),
        Dialect::Openai => json!({
            "input_file_id": file_id,
            "endpoint": terms.endpoint,
            "completion_window": terms.completion_window,
            "metadata": metadata,
        }),
        // Its requests go inline, streamed (`BatchClient::create_inline`).
        Dialect::Anthropic => Value::Null,
    }
}

/// A job's phase from its provider status, read without regard to case
/// (compatible providers write `COMPLETED` or `Completed`) and open-ended:
/// a status not known here is still running.
pub fn phase_of(dialect: Dialect, status: &str) -> JobPhase {
    let status = status.trim().to_ascii_lowercase();
    match (dialect, status.as_str()) {
        (Dialect::Mistral, "success") | (Dialect::Openai, "completed") => JobPhase::Completed,
        (_, "failed") => JobPhase::Failed,
        (Dialect::Mistral, "timeout_exceeded") | (Dialect::Openai, "expired") => JobPhase::Expired,
        (_, "cancelled" | "canceled") => JobPhase::Cancelled,
        _ => JobPhase::Running,
    }
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Reads a job object; `None` when it has no id. Some compatible
/// providers wrap it (`{"job": {…}}`): the wrapper is taken off.
pub fn parse_job(dialect: Dialect, v: &Value) -> Option<JobView> {
    if dialect == Dialect::Anthropic {
        return super::anthropic::parse_batch(v);
    }
    let v = match v.get("job") {
        Some(inner) if v.get("id").is_none() && inner.is_object() => inner,
        _ => v,
    };
    let id = text(v, "id")?;
    let raw_status = text(v, "status").unwrap_or_default();
    let window = v
        .get("metadata")
        .and_then(|m| m.get(WINDOW_METADATA_KEY))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let created_at = v.get("created_at").and_then(Value::as_i64).unwrap_or(0);
    let view = match dialect {
        Dialect::Mistral => JobView {
            phase: phase_of(dialect, &raw_status),
            output_file: text(v, "output_file"),
            error_file: text(v, "error_file"),
            errors: v
                .get("errors")
                .and_then(Value::as_array)
                .map(|errors| errors.iter().filter_map(|e| text(e, "message")).collect())
                .unwrap_or_default(),
            // Mistral's job errors are `{message, count}`: no line named.
            named_lines: Vec::new(),
            total: count(v, "total_requests"),
            succeeded: count(v, "succeeded_requests"),
            failed: count(v, "failed_requests"),
            id,
            raw_status,
            window,
            created_at,
        },
        Dialect::Openai | Dialect::Anthropic => {
            let counts = v.get("request_counts").cloned().unwrap_or(Value::Null);
            JobView {
                phase: phase_of(dialect, &raw_status),
                output_file: text(v, "output_file_id"),
                error_file: text(v, "error_file_id"),
                errors: v
                    .get("errors")
                    .and_then(|e| e.get("data"))
                    .and_then(Value::as_array)
                    .map(|errors| {
                        errors
                            .iter()
                            .filter_map(|e| {
                                let message = text(e, "message")?;
                                Some(match text(e, "code") {
                                    Some(code) => format!("{code}: {message}"),
                                    None => message,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                named_lines: named_lines(v),
                total: count(&counts, "total"),
                succeeded: count(&counts, "completed"),
                failed: count(&counts, "failed"),
                id,
                raw_status,
                window,
                created_at,
            }
        }
    };
    Some(view)
}

/// One page of a job listing and how to ask for the next.
#[derive(Debug, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    pub next: Option<String>,
}

/// The query for a listing page; `cursor` is what [`JobPage::next`] gave.
pub fn list_query(dialect: Dialect, cursor: Option<&str>) -> String {
    match (dialect, cursor) {
        (Dialect::Mistral, page) => format!(
            "?page={}&page_size=100&order_by=-created",
            page.unwrap_or("0")
        ),
        (Dialect::Openai, None) => "?limit=100".to_owned(),
        (Dialect::Openai, Some(after)) => format!("?limit=100&after={after}"),
        (Dialect::Anthropic, None) => "?limit=100".to_owned(),
        (Dialect::Anthropic, Some(after)) => format!("?limit=100&after_id={after}"),
    }
}

pub fn parse_list(dialect: Dialect, v: &Value, cursor: Option<&str>) -> JobPage {
    if dialect == Dialect::Anthropic {
        let (jobs, next) = super::anthropic::parse_list(v);
        return JobPage { jobs, next };
    }
    let jobs: Vec<JobView> = v
        .get("data")
        .and_then(Value::as_array)
        .map(|data| data.iter().filter_map(|j| parse_job(dialect, j)).collect())
        .unwrap_or_default();
    let next = match dialect {
        Dialect::Mistral => {
            let page: u64 = cursor.and_then(|c| c.parse().ok()).unwrap_or(0);
            let seen = (page + 1) * 100;
            (count(v, "total") > seen && !jobs.is_empty()).then(|| (page + 1).to_string())
        }
        Dialect::Openai | Dialect::Anthropic => {
            let more = v.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            match (more, jobs.last()) {
                (true, Some(last)) => Some(last.id.clone()),
                _ => None,
            }
        }
    };
    JobPage { jobs, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_terminal_status_of_both_dialects() {
        use JobPhase::*;
        let cases = [
            (Dialect::Mistral, "QUEUED", Running),
            (Dialect::Mistral, "RUNNING", Running),
            (Dialect::Mistral, "CANCELLATION_REQUESTED", Running),
            (Dialect::Mistral, "SUCCESS", Completed),
            (Dialect::Mistral, "FAILED", Failed),
            (Dialect::Mistral, "TIMEOUT_EXCEEDED", Expired),
            (Dialect::Mistral, "CANCELLED", Cancelled),
            (Dialect::Openai, "validating", Running),
            (Dialect::Openai, "finalizing", Running),
            (Dialect::Openai, "cancelling", Running),
            (Dialect::Openai, "completed", Completed),
            (Dialect::Openai, "failed", Failed),
            (Dialect::Openai, "expired", Expired),
            (Dialect::Openai, "cancelled", Cancelled),
            (Dialect::Openai, "some_new_state", Running),
            // Compatible providers: any case, either spelling of cancelled.
            (Dialect::Openai, "COMPLETED", Completed),
            (Dialect::Openai, "Failed", Failed),
            (Dialect::Openai, "canceled", Cancelled),
            (Dialect::Openai, " In_Progress ", Running),
            (Dialect::Mistral, "success", Completed),
        ];
        for (dialect, status, phase) in cases {
            assert_eq!(phase_of(dialect, status), phase, "{dialect:?} {status}");
        }
    }

    #[test]
    fn a_create_answer_wrapped_in_job_is_unwrapped() {
        let wrapped = json!({"job": {"id": "b1", "status": "VALIDATING", "created_at": 3}});
        let job = parse_job(Dialect::Openai, &wrapped).unwrap();
        assert_eq!(
            (job.id.as_str(), job.phase, job.created_at),
            ("b1", JobPhase::Running, 3)
        );
        // A job that merely has a field named `job` is read as it is.
        let plain = json!({"id": "b2", "status": "completed", "job": {"id": "other"}});
        assert_eq!(parse_job(Dialect::Openai, &plain).unwrap().id, "b2");
    }

    #[test]
    fn create_bodies_carry_the_upstreams_completion_window() {
        let terms = JobTerms {
            model: "m",
            endpoint: "/v1/chat/completions",
            completion_window: "48h",
        };
        let window = WindowId::from_stored("cpw_1".to_owned());
        let body = create_body(Dialect::Openai, "file-1", &terms, &window);
        assert_eq!(body["completion_window"], "48h");
        assert!(create_body(Dialect::Mistral, "file-1", &terms, &window)
            .get("completion_window")
            .is_none());
    }

    #[test]
    fn reads_an_openai_batch_with_validation_errors() {
        let job = parse_job(
            Dialect::Openai,
            &json!({
                "id": "batch_1", "status": "failed", "created_at": 5,
                "output_file_id": null, "error_file_id": null,
                "request_counts": {"total": 3, "completed": 0, "failed": 0},
                "metadata": {"carpool_window": "cpw_x"},
                "errors": {"object": "list", "data": [{"code": "model_mismatch", "line": 2, "message": "one model per file"}]}
            }),
        )
        .unwrap();
        assert_eq!(job.phase, JobPhase::Failed);
        assert_eq!(job.errors, vec!["model_mismatch: one model per file"]);
        assert_eq!(job.window.as_deref(), Some("cpw_x"));
        assert_eq!(job.output_file, None);
    }

    #[test]
    fn reads_a_mistral_job_with_files_and_counts() {
        let job = parse_job(
            Dialect::Mistral,
            &json!({
                "id": "j", "status": "SUCCESS", "created_at": 1, "input_files": ["f"],
                "output_file": "o", "error_file": "e", "errors": [],
                "total_requests": 4, "succeeded_requests": 3, "failed_requests": 1, "completed_requests": 4
            }),
        )
        .unwrap();
        assert_eq!((job.total, job.succeeded, job.failed), (4, 3, 1));
        assert_eq!(job.output_file.as_deref(), Some("o"));
        assert_eq!(job.error_file.as_deref(), Some("e"));
    }

    #[test]
    fn paginates_by_page_number_and_by_cursor() {
        let mistral = parse_list(
            Dialect::Mistral,
            &json!({"data": [{"id": "a", "status": "RUNNING"}], "total": 150}),
            None,
        );
        assert_eq!(mistral.next.as_deref(), Some("1"));
        let openai = parse_list(
            Dialect::Openai,
            &json!({"data": [{"id": "b1", "status": "completed"}], "has_more": true}),
            None,
        );
        assert_eq!(openai.next.as_deref(), Some("b1"));
        assert_eq!(
            list_query(Dialect::Openai, Some("b1")),
            "?limit=100&after=b1"
        );
    }
}
