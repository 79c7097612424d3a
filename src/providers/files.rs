//! Batch input files at the provider: the name carpool gives a window's
//! input, and the files listing (`GET /v1/files`) in both dialects, so
//! copies of an input that carpool uploaded but never recorded (a timed
//! out upload that went through, a crash before the file id was stored)
//! can be found and deleted (review L12).

use serde_json::Value;

use crate::model::{Dialect, WindowId};

/// What a window's input file is called at the provider: the window id,
/// so a file carpool uploaded is known for its own and for whose.
pub fn input_filename(window: &WindowId) -> String {
    format!("{window}.jsonl")
}

/// The window whose input `filename` is, when carpool named it: exactly
/// a window id (of a window id's shape) and `.jsonl`, nothing else.
pub fn window_of_input(filename: &str) -> Option<WindowId> {
    WindowId::parse(filename.strip_suffix(".jsonl")?)
}

/// One file of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileView {
    pub id: String,
    pub filename: String,
    /// Unix seconds; 0 when the provider did not say.
    pub created_at: i64,
}

pub struct FilePage {
    pub files: Vec<FileView>,
    /// The cursor of the next page, if any.
    pub next: Option<String>,
}

/// Page size asked for: Mistral's default, and within OpenAI's 1..=10,000.
const PAGE: u64 = 100;

/// The query for a page of batch files; `cursor` is what [`FilePage::next`]
/// gave. Mistral pages by number; OpenAI by the last id seen, newest first.
pub fn list_query(dialect: Dialect, cursor: Option<&str>) -> String {
    match (dialect, cursor) {
        (Dialect::Mistral, page) => format!(
            "?purpose=batch&page={}&page_size={PAGE}",
            page.unwrap_or("0")
        ),
        (Dialect::Openai | Dialect::Anthropic, None) => {
            format!("?purpose=batch&order=desc&limit={PAGE}")
        }
        (Dialect::Openai | Dialect::Anthropic, Some(after)) => {
            format!("?purpose=batch&order=desc&limit={PAGE}&after={after}")
        }
    }
}

/// A listing page: Mistral `{data, object, total}`, OpenAI `{data, object,
/// first_id, last_id, has_more}`.
pub fn parse_list(dialect: Dialect, v: &Value, cursor: Option<&str>) -> FilePage {
    let data = v.get("data").and_then(Value::as_array);
    let files: Vec<FileView> = data
        .map(|data| data.iter().filter_map(parse_file).collect())
        .unwrap_or_default();
    let listed = data.map_or(0, Vec::len) as u64;
    let next = match dialect {
        Dialect::Mistral => {
            let page: u64 = cursor.and_then(|c| c.parse().ok()).unwrap_or(0);
            let total = v.get("total").and_then(Value::as_u64);
            // Without a total, a full page may be followed by another.
            let more = match total {
                Some(total) => total > (page + 1) * PAGE,
                None => listed >= PAGE,
            };
            (more && listed > 0).then(|| (page + 1).to_string())
        }
        Dialect::Openai | Dialect::Anthropic => {
            let more = v.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            let last = v
                .get("last_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| files.last().map(|f| f.id.clone()));
            if more {
                last
            } else {
                None
            }
        }
    };
    FilePage { files, next }
}

fn parse_file(v: &Value) -> Option<FileView> {
    Some(FileView {
        id: v.get("id")?.as_str()?.to_owned(),
        filename: v.get("filename")?.as_str()?.to_owned(),
        created_at: v.get("created_at").and_then(Value::as_i64).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_names_of_a_window_ids_shape_are_carpools() {
        let window = WindowId::generate();
        let name = input_filename(&window);
        assert_eq!(window_of_input(&name), Some(window.clone()));
        for other in [
            "batch.jsonl".to_owned(),
            window.to_string(),
            format!("{window}.jsonl.bak"),
            format!("x{window}.jsonl"),
            "cpw_zz.jsonl".to_owned(),
            "batch_abc_output.jsonl".to_owned(),
        ] {
            assert_eq!(window_of_input(&other), None, "{other}");
        }
    }

    #[test]
    fn pages_follow_each_dialects_pagination() {
        let file = json!({"id": "f1", "filename": "a.jsonl", "created_at": 5});
        let mistral = json!({"object": "list", "data": [file], "total": 101});
        let page = parse_list(Dialect::Mistral, &mistral, None);
        assert_eq!(page.next.as_deref(), Some("1"));
        assert_eq!(page.files[0].created_at, 5);
        assert_eq!(parse_list(Dialect::Mistral, &mistral, Some("1")).next, None);
        let openai = json!({"object": "list", "data": [file], "last_id": "f1", "has_more": true});
        assert_eq!(
            parse_list(Dialect::Openai, &openai, None).next.as_deref(),
            Some("f1")
        );
        let end = json!({"object": "list", "data": [], "has_more": false});
        assert_eq!(parse_list(Dialect::Openai, &end, Some("f1")).next, None);
    }
}
