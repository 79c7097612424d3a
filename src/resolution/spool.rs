//! A result file spooled to an unnamed temporary file and indexed by the
//! request each line names, so reconciliation can apply it in the store's
//! order instead of the provider's. Applied in the provider's (shuffled)
//! order, every result rewrote a random page of the requests table; in the
//! store's order consecutive results share their pages.
//!
//! The file itself stays on disk; memory holds 40 bytes of index per line.
//! The store's order is the order of request ids, which lead with their
//! creation time, so no read of the window is needed to find it.
//! The temporary file has no name and disappears with the spool, even when
//! the process dies.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use futures_util::Stream;
use serde::Deserialize;
use tokio::io::{AsyncWriteExt as _, BufWriter};

use crate::model::RequestId;
use crate::providers::{LineReader, ProviderError};

/// Bytes written to the temporary file per blocking write.
const WRITE_BUFFER: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("spooling a result file to a temporary file: {0}")]
    Io(#[from] io::Error),
}

/// Where one line sits in the temporary file.
#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    len: u32,
}

/// A line that could not be indexed, for the caller to count and log.
#[derive(Debug)]
pub struct Skipped {
    pub reason: String,
}

pub struct Spool {
    file: Arc<File>,
    /// One entry per request, in id order: ids lead with their creation
    /// time, so this is (within a millisecond) the order of the store.
    lines: Vec<((u128, u64), Span)>,
    next: usize,
    /// Lines whose request had an earlier line: the first one wins.
    pub repeated: u64,
}

/// One of our request ids as a sortable number: its hex after the prefix
/// (44 digits today, 32 for ids made before ids had 128 random bits), the
/// first 32 digits then the rest, so keys sort as the ids do. `None` for
/// anything else (including upper-case hex, which carpool never writes).
fn key(custom_id: &str) -> Option<(u128, u64)> {
    let hex = custom_id.strip_prefix(RequestId::PREFIX)?;
    if !matches!(hex.len(), 32 | 44) || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let (high, low) = hex.split_at(32);
    let low = if low.is_empty() {
        0
    } else {
        u64::from_str_radix(low, 16).ok()?
    };
    Some((u128::from_str_radix(high, 16).ok()?, low))
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    custom_id: Option<Cow<'a, str>>,
}

impl Spool {
    /// Reads a whole result file into a temporary file, indexing each line
    /// by the request it names. Lines naming none of our requests go to
    /// `skipped` (called once per such line).
    pub async fn fill<S>(
        reader: &mut LineReader<S>,
        mut skipped: impl FnMut(Skipped),
    ) -> Result<Self, SpoolError>
    where
        S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Unpin,
    {
        let file = tokio::task::spawn_blocking(tempfile::tempfile)
            .await
            .map_err(io::Error::other)??;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(file));
        let mut lines = Vec::new();
        let mut offset = 0u64;
        while let Some(line) = reader.next_line().await? {
            let named = match serde_json::from_slice::<Named<'_>>(&line) {
                Ok(named) => named.custom_id,
                Err(e) => {
                    skipped(Skipped {
                        reason: format!("invalid JSON: {e}"),
                    });
                    continue;
                }
            };
            let Some(k) = named.as_deref().and_then(key) else {
                skipped(Skipped {
                    reason: match named {
                        None => "no custom_id".to_owned(),
                        Some(_) => "foreign custom_id".to_owned(),
                    },
                });
                continue;
            };
            let len = u32::try_from(line.len()).map_err(io::Error::other)?;
            lines.push((k, Span { offset, len }));
            out.write_all(&line).await?;
            offset += u64::from(len);
        }
        out.flush().await?;
        let file = out.into_inner().into_std().await;
        // Stable: of a request's lines, the one that came first stays first.
        lines.sort_by_key(|&(k, _)| k);
        let before = lines.len();
        lines.dedup_by_key(|&mut (k, _)| k);
        Ok(Self {
            file: Arc::new(file),
            repeated: (before - lines.len()) as u64,
            lines,
            next: 0,
        })
    }

    /// The next `n` lines, in id order.
    pub async fn take(&mut self, n: usize) -> Result<Vec<Vec<u8>>, SpoolError> {
        let end = self.lines.len().min(self.next + n);
        let spans: Vec<Span> = self.lines[self.next..end].iter().map(|&(_, s)| s).collect();
        self.next = end;
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        let file = Arc::clone(&self.file);
        // One blocking hop per chunk: the reads come from the page cache.
        let lines = tokio::task::spawn_blocking(move || {
            spans
                .iter()
                .map(|span| {
                    let mut line = vec![0; span.len as usize];
                    file.read_exact_at(&mut line, span.offset)?;
                    Ok(line)
                })
                .collect::<io::Result<Vec<_>>>()
        })
        .await
        .map_err(io::Error::other)??;
        Ok(lines)
    }

    /// Lines not yet taken.
    pub fn left(&self) -> usize {
        self.lines.len() - self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reader(
        text: &'static str,
    ) -> LineReader<impl Stream<Item = Result<Bytes, ProviderError>> + Unpin> {
        LineReader::new(
            futures_util::stream::iter(
                text.as_bytes()
                    .chunks(7)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>(),
            ),
            1 << 20,
        )
    }

    #[tokio::test]
    async fn lines_come_back_in_id_order_the_first_of_each_request_once() {
        let a = RequestId::parse("cpr_0000019ad1e1a0b0aaaaaaaaaaaaaaaa").unwrap();
        let b = RequestId::parse("cpr_0000019ad1e1a0b10000000000000000").unwrap();
        let text = format!(
            "{{\"custom_id\":\"{b}\",\"n\":1}}\n{{\"custom_id\":\"x\"}}\nnot json\n\
             {{\"custom_id\":\"{a}\",\"n\":2}}\n{{\"custom_id\":\"{b}\",\"n\":3}}\n{{}}\n"
        );
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut reasons = Vec::new();
        let mut spool = Spool::fill(&mut reader(text), |s| reasons.push(s.reason))
            .await
            .unwrap();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert_eq!(spool.repeated, 1);
        assert_eq!(spool.left(), 2);
        let first = spool.take(1).await.unwrap();
        assert_eq!(
            first,
            [format!("{{\"custom_id\":\"{a}\",\"n\":2}}").into_bytes()]
        );
        let rest = spool.take(10).await.unwrap();
        assert_eq!(
            rest,
            [format!("{{\"custom_id\":\"{b}\",\"n\":1}}").into_bytes()]
        );
        assert_eq!(spool.left(), 0);
        assert!(spool.take(10).await.unwrap().is_empty());
    }

    #[test]
    fn only_our_lower_case_ids_have_a_key() {
        let id = RequestId::generate();
        assert!(key(id.as_str()).is_some());
        assert!(key("cpr_0123456789abcdef0123456789abcdef").is_some());
        assert!(key("cpr_0123456789ABCDEF0123456789ABCDEF").is_none());
        assert!(key("cpr_123").is_none());
        assert!(key("cpr_0123456789abcdef0123456789abcdef0123456789ab").is_some());
        let (legacy, new) = (
            key("cpr_0123456789abcdef0123456789abcdef").unwrap(),
            key("cpr_0123456789abcdef0123456789abcdef000000000001").unwrap(),
        );
        assert!(legacy < new, "keys sort as the ids do");
        assert!(key("req_00000000000000000000000000000000").is_none());
    }
}
