//! A result file spooled to an unnamed temporary file and indexed by the
//! request each line names, so reconciliation can apply it in the store's
//! order instead of the provider's. Applied in the provider's (shuffled)
//! order, every result rewrote a random page of the requests table; in the
//! store's order consecutive results share their pages.
//!
//! The file itself stays on disk; memory holds 32 bytes of index per line.
//! The temporary file has no name and disappears with the spool, even when
//! the process dies.

use std::borrow::Cow;
use std::collections::HashMap;
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
    index: HashMap<u128, Span>,
    /// Lines whose request was already indexed: the first one wins.
    pub repeated: u64,
}

/// The 128 bits of one of our request ids; `None` for anything else
/// (including upper-case hex, which carpool never writes).
fn key(custom_id: &str) -> Option<u128> {
    let hex = custom_id.strip_prefix(RequestId::PREFIX)?;
    if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
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
        let mut index = HashMap::new();
        let mut repeated = 0;
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
            if index.contains_key(&k) {
                repeated += 1;
                continue;
            }
            index.insert(k, Span { offset, len });
            out.write_all(&line).await?;
            offset += u64::from(len);
        }
        out.flush().await?;
        let file = out.into_inner().into_std().await;
        Ok(Self {
            file: Arc::new(file),
            index,
            repeated,
        })
    }

    /// Takes the lines of these requests out of the spool, in the order
    /// given; a request without a line is left out.
    pub async fn take(&mut self, ids: &[RequestId]) -> Result<Vec<Vec<u8>>, SpoolError> {
        let spans: Vec<Span> = ids
            .iter()
            .filter_map(|id| key(id.as_str()).and_then(|k| self.index.remove(&k)))
            .collect();
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        let file = Arc::clone(&self.file);
        // One blocking hop per page: the reads come from the page cache.
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

    /// Lines indexed and not yet taken.
    pub fn left(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reader(
        text: &'static str,
    ) -> LineReader<impl Stream<Item = Result<Bytes, ProviderError>> + Unpin> {
        LineReader::new(futures_util::stream::iter(
            text.as_bytes()
                .chunks(7)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        ))
    }

    #[tokio::test]
    async fn lines_come_back_in_the_order_asked_and_only_once() {
        let a = RequestId::generate();
        let b = RequestId::generate();
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
        let other = RequestId::generate();
        let lines = spool.take(&[a.clone(), other, b.clone()]).await.unwrap();
        let lines: Vec<String> = lines
            .into_iter()
            .map(|l| String::from_utf8(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                format!("{{\"custom_id\":\"{a}\",\"n\":2}}"),
                format!("{{\"custom_id\":\"{b}\",\"n\":1}}"),
            ]
        );
        assert_eq!(spool.left(), 0);
        assert!(spool.take(&[a, b]).await.unwrap().is_empty());
    }

    #[test]
    fn only_our_lower_case_ids_have_a_key() {
        let id = RequestId::generate();
        assert!(key(id.as_str()).is_some());
        assert!(key("cpr_0123456789abcdef0123456789abcdef").is_some());
        assert!(key("cpr_0123456789ABCDEF0123456789ABCDEF").is_none());
        assert!(key("cpr_123").is_none());
        assert!(key("req_00000000000000000000000000000000").is_none());
    }
}
