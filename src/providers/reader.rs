//! Reading a result file line by line, with a bound on a line's length.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::json;

use super::ProviderError;

/// The error code of a request whose result line was longer than the cap.
pub const RESULT_TOO_LARGE: &str = "result_too_large";

/// Bytes kept from the start of an over-long line, to find its `custom_id`
/// (which providers write first).
const HEAD: usize = 4096;

/// Splits a byte stream into lines without holding more than one line, and
/// never more than `max_line` bytes of it: a longer line is dropped as it
/// arrives and stands in the output as a per-line error
/// (`{"custom_id":…,"response":null,"error":{"code":"result_too_large",…}}`,
/// the shape providers use for a failed line), so only its request fails.
/// Each byte is scanned for a newline once.
pub struct LineReader<S> {
    inner: S,
    buf: Vec<u8>,
    /// Where the current line starts in `buf`.
    start: usize,
    /// Bytes of `buf` from `start` already scanned (no newline among them).
    scanned: usize,
    /// Set while dropping an over-long line: its head and length so far.
    dropping: Option<(Vec<u8>, u64)>,
    max_line: usize,
    done: bool,
}

impl<S> LineReader<S>
where
    S: Stream<Item = Result<Bytes, ProviderError>> + Unpin,
{
    pub fn new(inner: S, max_line: u64) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            dropping: None,
            max_line: usize::try_from(max_line).unwrap_or(usize::MAX).max(1),
            done: false,
        }
    }

    /// The next non-empty line (without its newline), or `None` at the end.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, ProviderError> {
        loop {
            let from = self.start + self.scanned;
            if let Some(pos) = self.buf[from..].iter().position(|b| *b == b'\n') {
                let end = from + pos;
                let line = self.take(end, end + 1);
                match line {
                    Some(line) => return Ok(Some(line)),
                    None => continue,
                }
            }
            self.scanned = self.buf.len() - self.start;
            if self.done {
                let end = self.buf.len();
                return Ok(self.take(end, end));
            }
            if self.scanned > self.max_line {
                self.drop_pending();
            }
            self.buf.drain(..self.start);
            self.start = 0;
            match self.inner.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None => self.done = true,
            }
        }
    }

    /// The line `buf[start..end]` (continuing the one being dropped, if
    /// any), moving on to `next`; `None` for a blank line.
    fn take(&mut self, end: usize, next: usize) -> Option<Bytes> {
        let line = &self.buf[self.start..end];
        let taken = match self.dropping.take() {
            Some((head, len)) => Some(too_large(&head, len + line.len() as u64)),
            None if line.len() > self.max_line => Some(too_large(line, line.len() as u64)),
            None => {
                let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
                (!trimmed.iter().all(u8::is_ascii_whitespace))
                    .then(|| Bytes::copy_from_slice(trimmed))
            }
        };
        self.start = next;
        self.scanned = 0;
        taken
    }

    /// Lets go of the buffered part of an over-long line, keeping its head.
    fn drop_pending(&mut self) {
        let pending = &self.buf[self.start..];
        let (head, len) = self.dropping.get_or_insert_with(|| (Vec::new(), 0));
        if head.is_empty() {
            head.extend_from_slice(&pending[..pending.len().min(HEAD)]);
        }
        *len += pending.len() as u64;
        self.start = self.buf.len();
        self.scanned = 0;
    }
}

/// The per-line error standing for an over-long line that began with `head`.
fn too_large(head: &[u8], len: u64) -> Bytes {
    let message = format!("the result line ({len} bytes) is longer than carpool accepts");
    let line = match custom_id(head) {
        Some(id) => json!({"custom_id": id, "response": null,
            "error": {"code": RESULT_TOO_LARGE, "message": message}}),
        None => json!({"response": null,
            "error": {"code": RESULT_TOO_LARGE, "message": message}}),
    };
    Bytes::from(line.to_string())
}

/// The `custom_id` string in the start of a JSON line, if it is there.
fn custom_id(head: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"custom_id\"";
    let at = head.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = head[at..].trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = rest.iter().position(|b| *b == b'"' || *b == b'\\')?;
    (rest.get(end) == Some(&b'"'))
        .then(|| String::from_utf8(rest[..end].to_vec()).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(chunks: &[&'static [u8]], max_line: u64) -> Vec<String> {
        let chunks: Vec<Result<Bytes, ProviderError>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        let mut reader = LineReader::new(futures_util::stream::iter(chunks), max_line);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(String::from_utf8(line.to_vec()).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn line_reader_joins_chunks_and_skips_blank_lines() {
        let got = lines(&[b"{\"a\":1}\n{\"b\"", b":2}\r\n\n", b"{\"c\":3}"], 1 << 20).await;
        assert_eq!(got, vec!["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
    }

    #[tokio::test]
    async fn an_over_long_line_becomes_a_per_line_error_for_its_request() {
        let got = lines(
            &[
                b"{\"custom_id\": \"r1\", \"pad\":\"",
                b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n{\"custom_id\":\"r2\"}\n",
                b"{\"x\":\"yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\"}",
            ],
            40,
        )
        .await;
        assert_eq!(got.len(), 3, "{got:?}");
        let first: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(first["custom_id"], "r1");
        assert_eq!(first["error"]["code"], RESULT_TOO_LARGE);
        assert_eq!(got[1], "{\"custom_id\":\"r2\"}");
        let last: serde_json::Value = serde_json::from_str(&got[2]).unwrap();
        assert!(last.get("custom_id").is_none());
    }
}
