//! The reads and row decoding of every backend, written once as the
//! `read_ops!` macro and compiled per backend in `ops.rs`. Reads need no
//! transaction.

macro_rules! read_ops {
    ($db:ty) => {
        use sqlx::Row as _;

        use super::*;

        pub(crate) type Conn = <$db as sqlx::Database>::Connection;
        type DbRow = <$db as sqlx::Database>::Row;

        fn q(sql: &str) -> sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments<'_>> {
            sqlx::query::<$db>(sql)
        }

        pub(crate) fn record(row: &DbRow) -> Result<RequestRecord, StoreError> {
            let response_status = row
                .try_get::<Option<i64>, _>("response_status")?
                .map(|v| {
                    u16::try_from(v).map_err(|_| StoreError::Corrupt {
                        column: "response_status",
                        value: v.to_string(),
                    })
                })
                .transpose()?;
            Ok(RequestRecord {
                id: RequestId::from_stored(row.try_get("id")?),
                status: parsed("status", row.try_get("status")?, RequestStatus::parse)?,
                upstream: row.try_get("upstream")?,
                endpoint: row.try_get("endpoint")?,
                model: row.try_get("model")?,
                mode: parsed("mode", row.try_get("mode")?, DeliveryMode::parse)?,
                created_at: row.try_get("created_at")?,
                submitted_at: row.try_get("submitted_at")?,
                completed_at: row.try_get("completed_at")?,
                batch_id: row.try_get("batch_id")?,
                served_by: parsed_opt("served_by", row.try_get("served_by")?, ServedBy::parse)?,
                response_status,
                response_body: row
                    .try_get::<Option<Vec<u8>>, _>("response_body")?
                    .map(Bytes::from),
                error_code: row.try_get("error_code")?,
                error_message: row.try_get("error_message")?,
                deadline: row.try_get("deadline")?,
                callback_url: row.try_get("callback_url")?,
                window_id: row
                    .try_get::<Option<String>, _>("window_id")?
                    .map(WindowId::from_stored),
            })
        }

        /// From a window's row, or a request's (whose model becomes its
        /// window's, [`crate::model::window_model`]).
        fn window_key(row: &DbRow) -> Result<WindowKey, StoreError> {
            let endpoint: String = row.try_get("endpoint")?;
            let model: String = row.try_get("model")?;
            Ok(WindowKey {
                upstream: row.try_get("upstream")?,
                credential_hash: row.try_get("credential_hash")?,
                scope: scope_from_stored(row.try_get("scope")?)?,
                model: crate::model::window_model(&endpoint, &model).to_owned(),
                endpoint,
            })
        }

        fn window_record(row: &DbRow) -> Result<WindowRecord, StoreError> {
            Ok(WindowRecord {
                id: WindowId::from_stored(row.try_get("id")?),
                key: window_key(row)?,
                state: parsed("state", row.try_get("state")?, WindowState::parse)?,
                count: uint(row.try_get("count")?),
                bytes: uint(row.try_get("bytes")?),
                limits: WindowLimits {
                    max_requests: uint(row.try_get("max_requests")?),
                    max_bytes: uint(row.try_get("max_bytes")?),
                },
                opened_at: row.try_get("opened_at")?,
                sealed_at: row.try_get("sealed_at")?,
                flush_reason: parsed_opt(
                    "flush_reason",
                    row.try_get("flush_reason")?,
                    FlushReason::parse,
                )?,
                upstream_key: row.try_get("upstream_key")?,
                file_id: row.try_get("file_id")?,
                job_id: row.try_get("job_id")?,
                provider_status: row.try_get("provider_status")?,
                submitted_at: row.try_get("submitted_at")?,
                finished_at: row.try_get("finished_at")?,
            })
        }

        /// Runs one write in the caller's transaction.

        // ---- reads (any connection; no transaction needed) ----------------

        pub(crate) async fn get(conn: &mut Conn, id: &RequestId, credential_hash: &str) -> Result<Option<RequestRecord>, StoreError> {
            let sql = concat!("SELECT ", req_cols!(), " FROM requests WHERE id = $1 AND credential_hash = $2");
            q(sql)
                .bind(id.as_str())
                .bind(credential_hash)
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| record(&row))
                .transpose()
        }

        pub(crate) async fn list(
            conn: &mut Conn,
            credential_hash: &str,
            status: Option<RequestStatus>,
            limit: u32,
            after: Option<&RequestId>,
        ) -> Result<Vec<RequestRecord>, StoreError> {
            let sql = concat!(
                "SELECT ", req_cols!(), " FROM requests WHERE credential_hash = $1 \
                 AND ($2 IS NULL OR status = $2) \
                 AND ($3 IS NULL OR seq < (SELECT seq FROM requests WHERE id = $3 AND credential_hash = $1)) \
                 ORDER BY seq DESC LIMIT $4"
            );
            q(sql)
                .bind(credential_hash)
                .bind(status.map(|s| s.as_str()))
                .bind(after.map(|a| a.as_str()))
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(record)
                .collect()
        }

        pub(crate) async fn request_body(conn: &mut Conn, id: &RequestId) -> Result<Option<Bytes>, StoreError> {
            Ok(q("SELECT body FROM requests WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| row.try_get::<Vec<u8>, _>("body"))
                .transpose()?
                .map(Bytes::from))
        }

        pub(crate) async fn request_headers(conn: &mut Conn, id: &RequestId) -> Result<Vec<(String, String)>, StoreError> {
            let stored = q("SELECT forward_headers FROM requests WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| row.try_get::<Option<String>, _>("forward_headers"))
                .transpose()?
                .flatten();
            headers_from_stored(stored)
        }

        pub(crate) async fn due_requests(
            conn: &mut Conn,
            before: i64,
            after: Option<&DueCursor>,
            limit: u32,
        ) -> Result<Vec<DueRequest>, StoreError> {
            let sql = concat!(
                "SELECT ", req_cols!(), ", (SELECT w.state FROM windows w WHERE w.id = requests.window_id) \
                 AS window_state FROM requests WHERE deadline IS NOT NULL AND deadline <= $1 \
                 AND status IN ('queued', 'submitted') AND (deadline > $2 OR (deadline = $2 AND id > $3)) \
                 ORDER BY deadline, id LIMIT $4"
            );
            let (deadline, id) = after.map_or((i64::MIN, ""), |c| (c.deadline, c.id.as_str()));
            q(sql)
                .bind(before)
                .bind(deadline)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|row| {
                    Ok(DueRequest {
                        record: record(row)?,
                        window: parsed_opt("window_state", row.try_get("window_state")?, WindowState::parse)?,
                    })
                })
                .collect()
        }

        pub(crate) async fn queued_deadlines(conn: &mut Conn, window: &WindowId) -> Result<Vec<QueuedDeadline>, StoreError> {
            let rows = q("SELECT id, created_at, deadline FROM requests WHERE window_id = $1 \
                          AND status = 'queued' AND deadline IS NOT NULL ORDER BY deadline")
                .bind(window.as_str())
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(QueuedDeadline {
                        id: RequestId::from_stored(row.try_get("id")?),
                        created_at: row.try_get("created_at")?,
                        deadline: row.try_get("deadline")?,
                    })
                })
                .collect()
        }

        pub(crate) async fn open_request_ids(conn: &mut Conn, window: &WindowId) -> Result<Vec<RequestId>, StoreError> {
            let rows = q("SELECT id FROM requests WHERE window_id = $1 \
                          AND status IN ('queued', 'submitted') ORDER BY seq")
                .bind(window.as_str())
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| Ok(RequestId::from_stored(row.try_get("id")?)))
                .collect()
        }

        pub(crate) async fn open_windows(conn: &mut Conn) -> Result<Vec<WindowSummary>, StoreError> {
            let rows = q("SELECT w.id, w.upstream, w.credential_hash, w.scope, w.endpoint, w.model, w.count, \
                          w.bytes, w.max_requests, w.max_bytes, w.opened_at, (SELECT MIN(r.deadline) FROM requests r \
                          WHERE r.window_id = w.id AND r.status = 'queued' AND r.deadline IS NOT NULL) AS earliest_deadline, \
                          (SELECT MIN((r.deadline + r.created_at) / 2) FROM requests r \
                          WHERE r.window_id = w.id AND r.status = 'queued' AND r.deadline IS NOT NULL) AS earliest_midpoint \
                          FROM windows w WHERE w.state = 'open' ORDER BY w.opened_at")
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(WindowSummary {
                        id: WindowId::from_stored(row.try_get("id")?),
                        key: window_key(row)?,
                        count: uint(row.try_get("count")?),
                        bytes: uint(row.try_get("bytes")?),
                        limits: WindowLimits {
                            max_requests: uint(row.try_get("max_requests")?),
                            max_bytes: uint(row.try_get("max_bytes")?),
                        },
                        opened_at: row.try_get("opened_at")?,
                        earliest_deadline: row.try_get("earliest_deadline")?,
                        earliest_midpoint: row.try_get("earliest_midpoint")?,
                    })
                })
                .collect()
        }

        pub(crate) async fn window(conn: &mut Conn, id: &WindowId) -> Result<Option<WindowRecord>, StoreError> {
            q(concat!("SELECT ", window_cols!(), " FROM windows WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| window_record(&row))
                .transpose()
        }

        pub(crate) async fn windows_in(conn: &mut Conn, states: &[WindowState]) -> Result<Vec<WindowRecord>, StoreError> {
            if states.is_empty() {
                return Ok(Vec::new());
            }
            let list = super::super::model::sql_list(states.iter().map(|s| s.as_str()));
            q(&format!(
                concat!("SELECT ", window_cols!(), " FROM windows WHERE state IN ({}) ORDER BY opened_at, id"),
                list
            ))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(window_record)
            .collect()
        }

        /// How many stored requests are in each status (the operator's
        /// page); statuses with none are absent.
        pub(crate) async fn request_counts(conn: &mut Conn) -> Result<Vec<(RequestStatus, u64)>, StoreError> {
            let rows = q("SELECT status, CAST(COUNT(*) AS BIGINT) AS n FROM requests GROUP BY status")
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok((
                        parsed("status", row.try_get("status")?, RequestStatus::parse)?,
                        uint(row.try_get("n")?),
                    ))
                })
                .collect()
        }

        // ---- failure policies: resubmission, openness, pending counts ----

        /// Requests counted in unfinished windows, by credential: what
        /// intake backpressure weighs. Windows are few, so this is cheap.
        pub(crate) async fn pending_by_credential(conn: &mut Conn) -> Result<Vec<Pending>, StoreError> {
            let rows = q("SELECT credential_hash, upstream, scope, endpoint, model, CAST(SUM(count) AS BIGINT) AS n \
                          FROM windows WHERE state IN ('open', 'sealed', 'uploaded', 'creating', 'submitted') \
                          GROUP BY credential_hash, upstream, scope, endpoint, model")
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(Pending {
                        key: window_key(row)?,
                        count: uint(row.try_get::<Option<i64>, _>("n")?.unwrap_or(0)),
                    })
                })
                .collect()
        }

        /// The savings ledger summed per group, over rows completed in
        /// `[from, to)` (Unix ms), in group order.
        pub(crate) async fn ledger(conn: &mut Conn, by: LedgerGroup, from: i64, to: i64) -> Result<Vec<LedgerSum>, StoreError> {
            let group = match by {
                LedgerGroup::Model => "model",
                LedgerGroup::Upstream => "upstream",
                LedgerGroup::Credential => "credential_hash",
                LedgerGroup::Day => "CAST(completed_at / 86400000 AS TEXT)",
            };
            let rows = q(&format!(
                "SELECT {group} AS grp, COUNT(*) AS requests, \
                 CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
                 CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, \
                 CAST(SUM(realtime_nusd) AS BIGINT) AS realtime_nusd, \
                 CAST(SUM(served_nusd) AS BIGINT) AS served_nusd, \
                 CAST(SUM(CASE WHEN double_paid_nusd > 0 THEN 1 ELSE 0 END) AS BIGINT) AS double_paid, \
                 CAST(SUM(double_paid_nusd) AS BIGINT) AS double_paid_nusd \
                 FROM ledger WHERE completed_at >= $1 AND completed_at < $2 GROUP BY grp ORDER BY grp"
            ))
            .bind(from)
            .bind(to)
            .fetch_all(&mut *conn)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(LedgerSum {
                        group: row.try_get("grp")?,
                        requests: uint(row.try_get("requests")?),
                        input_tokens: uint(row.try_get("input_tokens")?),
                        output_tokens: uint(row.try_get("output_tokens")?),
                        realtime_nusd: row.try_get("realtime_nusd")?,
                        served_nusd: row.try_get("served_nusd")?,
                        double_paid: uint(row.try_get("double_paid")?),
                        double_paid_nusd: row.try_get("double_paid_nusd")?,
                    })
                })
                .collect()
        }

        /// Whether the request is still queued or submitted.
        pub(crate) async fn is_open(conn: &mut Conn, id: &RequestId) -> Result<bool, StoreError> {
            Ok(q("SELECT 1 AS one FROM requests WHERE id = $1 AND status IN ('queued', 'submitted')")
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .is_some())
        }

        async fn lines_page(conn: &mut Conn, window: &WindowId, after: i64) -> Result<Vec<(i64, RequestId, Bytes)>, StoreError> {
            let rows = q("SELECT seq, id, body FROM requests WHERE window_id = $1 \
                          AND status IN ('queued', 'submitted') AND seq > $2 ORDER BY seq LIMIT $3")
                .bind(window.as_str())
                .bind(after)
                .bind(LINES_PAGE)
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok((
                        row.try_get("seq")?,
                        RequestId::from_stored(row.try_get("id")?),
                        Bytes::from(row.try_get::<Vec<u8>, _>("body")?),
                    ))
                })
                .collect()
        }

        /// Streams a window's lines page by page (keyset on `seq`), so at
        /// most one page is in memory and no read transaction stays open.
        pub(crate) fn window_lines(
            pool: sqlx::Pool<$db>,
            window: WindowId,
        ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
            struct Cursor {
                pool: sqlx::Pool<$db>,
                window: WindowId,
                after: i64,
                page: VecDeque<(RequestId, Bytes)>,
                done: bool,
            }
            let start = Cursor { pool, window, after: 0, page: VecDeque::new(), done: false };
            stream::unfold(start, |mut c| async move {
                loop {
                    if let Some(line) = c.page.pop_front() {
                        return Some((Ok(line), c));
                    }
                    if c.done {
                        return None;
                    }
                    let page = match c.pool.acquire().await {
                        Ok(mut conn) => lines_page(&mut conn, &c.window, c.after).await,
                        Err(e) => Err(e.into()),
                    };
                    match page {
                        Ok(rows) => {
                            c.done = (rows.len() as i64) < LINES_PAGE;
                            if let Some((seq, _, _)) = rows.last() {
                                c.after = *seq;
                            }
                            c.page.extend(rows.into_iter().map(|(_, id, body)| (id, body)));
                        }
                        Err(e) => {
                            c.done = true;
                            return Some((Err(e), c));
                        }
                    }
                }
            })
            .boxed()
        }
    };
}

pub(crate) use read_ops;
