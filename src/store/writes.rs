//! The state transitions of every backend, written once as the
//! `write_ops!` macro and compiled per backend in `ops.rs`: each runs in the
//! transaction its caller opened and checks its allowed-from states in its
//! `WHERE`.

macro_rules! write_ops {
    ($db:ty) => {
        pub(crate) async fn apply(conn: &mut Conn, op: &Op, horizon: i64) -> Result<Reply, StoreError> {
            Ok(match op {
                Op::Accept(req) => Reply::Accepted(Box::new(accept(conn, req, horizon).await?)),
                Op::Cancel { id, credential_hash, now } => {
                    Reply::Cancel(Box::new(cancel(conn, id, credential_hash, *now).await?))
                }
                Op::Seal { id, reason, now } => Reply::Applied(seal(conn, id, *reason, *now).await?),
                Op::RecordUpload { id, file_id } => Reply::Applied(
                    q(&format!(
                        "UPDATE windows SET state = 'uploaded', file_id = $2 \
                         WHERE id = $1 AND state IN ({})",
                        window_from_sql(WindowState::Uploaded)
                    ))
                    .bind(id.as_str())
                    .bind(file_id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                        == 1,
                ),
                Op::MarkCreating { id } => Reply::Applied(
                    q(&format!(
                        "UPDATE windows SET state = 'creating' WHERE id = $1 AND state IN ({})",
                        window_from_sql(WindowState::Creating)
                    ))
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                        == 1,
                ),
                Op::ClaimLease { on, owner, now, until } => Reply::Applied(claim_lease(conn, on, owner, *now, *until).await?),
                Op::ReleaseLease { on, owner } => {
                    let query = match on {
                        Lease::Window(id) => q("UPDATE windows SET lease_owner = NULL, lease_until = NULL \
                                                WHERE id = $1 AND lease_owner = $2")
                            .bind(id.as_str()),
                        Lease::Request(id) => q("DELETE FROM request_leases WHERE request_id = $1 AND owner = $2")
                            .bind(id.as_str()),
                    };
                    Reply::Applied(query.bind(owner).execute(&mut *conn).await?.rows_affected() == 1)
                }
                Op::ReleaseLeasesOf { owner } => {
                    let windows = q("UPDATE windows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1")
                        .bind(owner.as_str())
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    let requests = q("DELETE FROM request_leases WHERE owner = $1")
                        .bind(owner.as_str())
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    Reply::Count(windows + requests)
                }
                Op::RecordJob { id, job_id, now } => {
                    Reply::Applied(record_job(conn, id, job_id, *now).await?)
                }
                Op::ReturnToSealed { id } => Reply::Applied(return_to_sealed(conn, id).await?),
                Op::RecordJobStatus { id, status } => Reply::Applied(
                    q("UPDATE windows SET provider_status = $2 WHERE id = $1 AND state = 'submitted'")
                        .bind(id.as_str())
                        .bind(status)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                Op::Finish { id, outcome, now } => {
                    let to = outcome.state();
                    Reply::Applied(
                        q(&format!(
                            "UPDATE windows SET state = $2, finished_at = $3, upstream_key = NULL \
                             WHERE id = $1 AND state IN ({})",
                            window_from_sql(to)
                        ))
                        .bind(id.as_str())
                        .bind(to.as_str())
                        .bind(*now)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                            == 1,
                    )
                }
                Op::Resolve { window, resolutions } => Reply::Ids(resolve_many(conn, window, resolutions).await?),
                Op::ResolveOne(r) => {
                    let mut changed = Vec::with_capacity(1);
                    resolve_rows(conn, None, r.status.status(), &[&**r], &mut changed).await?;
                    Reply::Applied(!changed.is_empty())
                }
                Op::FailUnresolved { window, code, message, now } => {
                    let rows = q(&format!(
                        "UPDATE requests SET status = 'failed', error_code = $2, error_message = $3, \
                         completed_at = $4 WHERE window_id = $1 AND status IN ({}) RETURNING id, callback_url",
                        request_from_sql(RequestStatus::Failed)
                    ))
                    .bind(window.as_str())
                    .bind(code)
                    .bind(message)
                    .bind(*now)
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut ids = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let id = RequestId::from_stored(row.try_get("id")?);
                        if let Some(url) = row.try_get::<Option<String>, _>("callback_url")? {
                            enqueue_delivery(conn, &id, &url, RequestStatus::Failed, *now).await?;
                        }
                        ids.push(id);
                    }
                    Reply::Ids(ids)
                }
                Op::Requeue { ids, now, counted } => Reply::Ids(requeue(conn, ids, *now, *counted).await?),
                Op::Resubmit { window, limit, now } => {
                    Reply::Ids(resubmit(conn, window, *limit, *now).await?)
                }
                Op::Purge { older_than } => {
                    let final_states = super::super::model::sql_list(
                        RequestStatus::ALL.into_iter().filter(|s| s.is_final()).map(|s| s.as_str()),
                    );
                    let n = q(&format!(
                        "DELETE FROM requests WHERE completed_at < $1 AND status IN ({final_states})"
                    ))
                    .bind(*older_than)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    q("DELETE FROM windows WHERE finished_at < $1 AND state IN ('completed', 'failed')")
                        .bind(*older_than)
                        .execute(&mut *conn)
                        .await?;
                    // Finished deliveries go with their requests.
                    q("DELETE FROM webhook_deliveries WHERE finished_at < $1 AND state <> 'pending'")
                        .bind(*older_than)
                        .execute(&mut *conn)
                        .await?;
                    // Leases a process that died never gave up.
                    q("DELETE FROM request_leases WHERE until < $1")
                        .bind(*older_than)
                        .execute(&mut *conn)
                        .await?;
                    Reply::Count(n)
                }
                Op::Outbox(o) => apply_outbox(conn, o).await?,
            })
        }


        /// An earlier request this one repeats: same idempotency key (same
        /// body, else a conflict), or an SDK retry of a request that is live
        /// or succeeded. A retry of one that failed, expired or was cancelled
        /// is a new request: the SDK retries a 5xx to get another try.
        pub(crate) async fn existing(conn: &mut Conn, r: &NewRequest, horizon: i64) -> Result<Option<Accepted>, StoreError> {
            if let Some(key) = &r.idempotency_key {
                let sql = concat!(
                    "SELECT ", req_cols!(), ", body_hash FROM requests \
                     WHERE credential_hash = $1 AND idempotency_key = $2"
                );
                let found = q(sql).bind(&r.credential_hash).bind(key).fetch_optional(&mut *conn).await?;
                if let Some(row) = found {
                    let hash: String = row.try_get("body_hash")?;
                    if hash != r.body_hash {
                        return Err(StoreError::IdempotencyConflict);
                    }
                    return Ok(Some(reattach(record(&row)?)));
                }
            }
            if r.sdk_retry {
                let sql = concat!(
                    "SELECT ", req_cols!(), " FROM requests \
                     WHERE retry_tag = $5 AND credential_hash = $1 AND body_hash = $2 AND endpoint = $3 \
                     AND status IN ('queued', 'submitted', 'succeeded') AND created_at >= $4 \
                     ORDER BY seq DESC LIMIT 1"
                );
                let found = q(sql)
                    .bind(&r.credential_hash)
                    .bind(&r.body_hash)
                    .bind(&r.endpoint)
                    .bind(r.now.saturating_sub(horizon))
                    .bind(retry_tag(r))
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = found {
                    return Ok(Some(reattach(record(&row)?)));
                }
            }
            Ok(None)
        }

        async fn accept(conn: &mut Conn, r: &NewRequest, horizon: i64) -> Result<Accepted, StoreError> {
            if let Some(found) = existing(conn, r, horizon).await? {
                return Ok(found);
            }
            let key = r.window_key();
            let len = int(r.body.len() as u64);
            let (slot, sealed_previous) =
                place(conn, &key, len, r.limits, r.upstream_key.as_deref(), r.now).await?;
            q(INSERT_REQUEST)
                .bind(r.id.as_str())
                .bind(&r.credential_hash)
                .bind(&r.upstream)
                .bind(&r.endpoint)
                .bind(&r.model)
                .bind(r.body.as_ref())
                .bind(&r.body_hash)
                .bind(r.idempotency_key.as_deref())
                .bind(r.mode.as_str())
                .bind(r.deadline)
                .bind(r.callback_url.as_deref())
                .bind(slot.id.as_str())
                .bind(r.now)
                .bind(retry_tag(r))
                .bind(r.scope.to_stored())
                .bind(headers_to_stored(&r.forward_headers))
                .execute(&mut *conn)
                .await?;
            let record = queued_record(r, &slot.id);
            Ok(Accepted { record, created: true, window: Some(slot), sealed_previous })
        }

        /// Adds `len` bytes to the open window of `key`, sealing it first if
        /// they would not fit and opening a new one; seals the window the
        /// request lands in when it is then full.
        async fn place(
            conn: &mut Conn,
            key: &WindowKey,
            len: i64,
            limits: WindowLimits,
            upstream_key: Option<&str>,
            now: i64,
        ) -> Result<(WindowSlot, Option<(WindowId, FlushReason)>), StoreError> {
            let limits = sane(limits);
            let scope = key.scope.to_stored();
            let mut previous = None;
            // Postgres, read committed: a window another replica opened may
            // become visible between statements; never seal a window that
            // can still take the request, go back and join it instead.
            let mut rounds = 0;
            let joined = loop {
                rounds += 1;
                let row = q("UPDATE windows SET count = count + 1, bytes = bytes + $5, \
                             upstream_key = COALESCE(upstream_key, $8) \
                             WHERE upstream = $1 AND credential_hash = $2 AND endpoint = $3 AND model = $4 \
                             AND scope = $9 \
                             AND state = 'open' AND count + 1 <= $6 AND (count = 0 OR bytes + $5 <= $7) \
                             RETURNING id, count, bytes, opened_at")
                    .bind(&key.upstream)
                    .bind(&key.credential_hash)
                    .bind(&key.endpoint)
                    .bind(&key.model)
                    .bind(len)
                    .bind(int(limits.max_requests))
                    .bind(int(limits.max_bytes))
                    .bind(upstream_key)
                    .bind(&scope)
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = row {
                    break Some(row);
                }
                let sealed = q("UPDATE windows SET state = 'sealed', sealed_at = $5, \
                                flush_reason = CASE WHEN count + 1 > $6 THEN 'max_requests' ELSE 'max_bytes' END \
                                WHERE upstream = $1 AND credential_hash = $2 AND endpoint = $3 AND model = $4 \
                                AND scope = $9 \
                                AND state = 'open' AND (count + 1 > $6 OR (count > 0 AND bytes + $8 > $7)) \
                                RETURNING id, flush_reason")
                    .bind(&key.upstream)
                    .bind(&key.credential_hash)
                    .bind(&key.endpoint)
                    .bind(&key.model)
                    .bind(now)
                    .bind(int(limits.max_requests))
                    .bind(int(limits.max_bytes))
                    .bind(len)
                    .bind(&scope)
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = sealed {
                    previous = Some((
                        WindowId::from_stored(row.try_get("id")?),
                        parsed("flush_reason", row.try_get("flush_reason")?, FlushReason::parse)?,
                    ));
                    break None;
                }
                let open = q("SELECT id FROM windows WHERE upstream = $1 AND credential_hash = $2 \
                              AND endpoint = $3 AND model = $4 AND scope = $5 AND state = 'open'")
                    .bind(&key.upstream)
                    .bind(&key.credential_hash)
                    .bind(&key.endpoint)
                    .bind(&key.model)
                    .bind(&scope)
                    .fetch_optional(&mut *conn)
                    .await?;
                if open.is_none() || rounds >= 3 {
                    break None;
                }
            };
            let (id, count, bytes, opened_at) = match joined {
                Some(row) => (
                    WindowId::from_stored(row.try_get("id")?),
                    row.try_get::<i64, _>("count")?,
                    row.try_get::<i64, _>("bytes")?,
                    row.try_get::<i64, _>("opened_at")?,
                ),
                None => {
                    let id = WindowId::generate();
                    // A racing insert of the key's open window fails on the
                    // unique index and the whole transaction is retried.
                    q("INSERT INTO windows (id, upstream, credential_hash, endpoint, model, state, count, \
                       bytes, max_requests, max_bytes, opened_at, upstream_key, scope) \
                       VALUES ($1, $2, $3, $4, $5, 'open', 1, $6, $7, $8, $9, $10, $11)")
                        .bind(id.as_str())
                        .bind(&key.upstream)
                        .bind(&key.credential_hash)
                        .bind(&key.endpoint)
                        .bind(&key.model)
                        .bind(len)
                        .bind(int(limits.max_requests))
                        .bind(int(limits.max_bytes))
                        .bind(now)
                        .bind(upstream_key)
                        .bind(&scope)
                        .execute(&mut *conn)
                        .await?;
                    (id, 1, len, now)
                }
            };
            let sealed = filled(count, bytes, limits);
            if let Some(reason) = sealed {
                seal(conn, &id, reason, now).await?;
            }
            let slot = WindowSlot { id, count: uint(count), bytes: uint(bytes), opened_at, sealed };
            Ok((slot, previous))
        }

        async fn seal(conn: &mut Conn, id: &WindowId, reason: FlushReason, now: i64) -> Result<bool, StoreError> {
            Ok(q(&format!(
                "UPDATE windows SET state = 'sealed', sealed_at = $2, flush_reason = $3 \
                 WHERE id = $1 AND state IN ({})",
                window_from_sql(WindowState::Sealed)
            ))
            .bind(id.as_str())
            .bind(now)
            .bind(reason.as_str())
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1)
        }

        async fn cancel(conn: &mut Conn, id: &RequestId, credential_hash: &str, now: i64) -> Result<CancelOutcome, StoreError> {
            let Some(row) = q("SELECT status, window_id, CAST(length(body) AS BIGINT) AS len FROM requests \
                               WHERE id = $1 AND credential_hash = $2")
                .bind(id.as_str())
                .bind(credential_hash)
                .fetch_optional(&mut *conn)
                .await?
            else {
                return Ok(CancelOutcome::NotFound);
            };
            let status = parsed("status", row.try_get("status")?, RequestStatus::parse)?;
            let window: Option<String> = row.try_get("window_id")?;
            let len: i64 = row.try_get("len")?;
            let changed = !status.is_final()
                && q(&format!(
                    "UPDATE requests SET status = 'cancelled', completed_at = $2 \
                     WHERE id = $1 AND status IN ({})",
                    request_from_sql(RequestStatus::Cancelled)
                ))
                .bind(id.as_str())
                .bind(now)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                    == 1;
            if changed && status == RequestStatus::Queued {
                if let Some(window) = window {
                    // Still counted towards a window not yet uploaded: leave
                    // it, and drop a window left empty so the next request
                    // opens a fresh one (its age restarts).
                    q("UPDATE windows SET count = count - 1, bytes = bytes - $2 \
                       WHERE id = $1 AND state IN ('open', 'sealed')")
                        .bind(&window)
                        .bind(len)
                        .execute(&mut *conn)
                        .await?;
                    q("DELETE FROM windows WHERE id = $1 AND state = 'open' AND count <= 0")
                        .bind(&window)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            let record = get(conn, id, credential_hash).await?;
            if let Some(r) = record.as_ref().filter(|_| changed) {
                if let Some(url) = &r.callback_url {
                    enqueue_delivery(conn, id, url, RequestStatus::Cancelled, now).await?;
                }
            }
            Ok(match record {
                Some(r) if changed => CancelOutcome::Cancelled(r),
                Some(r) => CancelOutcome::AlreadyFinal(r),
                None => CancelOutcome::NotFound,
            })
        }

        async fn record_job(conn: &mut Conn, id: &WindowId, job_id: &str, now: i64) -> Result<bool, StoreError> {
            let moved = q(&format!(
                "UPDATE windows SET state = 'submitted', job_id = $2, submitted_at = $3 \
                 WHERE id = $1 AND state IN ({})",
                window_from_sql(WindowState::Submitted)
            ))
            .bind(id.as_str())
            .bind(job_id)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1;
            if moved {
                q(&format!(
                    "UPDATE requests SET status = 'submitted', batch_id = $2, submitted_at = $3 \
                     WHERE window_id = $1 AND status IN ({})",
                    request_from_sql(RequestStatus::Submitted)
                ))
                .bind(id.as_str())
                .bind(job_id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Ok(moved)
        }

        /// creating or submitted → sealed, forgetting the file and job the
        /// provider refused; its submitted requests become queued again.
        async fn return_to_sealed(conn: &mut Conn, id: &WindowId) -> Result<bool, StoreError> {
            let moved = q(&format!(
                "UPDATE windows SET state = 'sealed', file_id = NULL, job_id = NULL, \
                 submitted_at = NULL, provider_status = NULL WHERE id = $1 AND state IN ({})",
                returned_from_sql()
            ))
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1;
            if moved {
                q("UPDATE requests SET status = 'queued', batch_id = NULL, submitted_at = NULL \
                   WHERE window_id = $1 AND status = 'submitted'")
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
            }
            Ok(moved)
        }

        /// Takes or renews a lease: taken if nobody holds it or its lease
        /// ran out, renewed by its holder. Only windows on their way to a
        /// job or with one running are taken; the holder renews its own
        /// whatever the window's state by then.
        async fn claim_lease(conn: &mut Conn, on: &Lease, owner: &str, now: i64, until: i64) -> Result<bool, StoreError> {
            let query = match on {
                Lease::Window(id) => q("UPDATE windows SET lease_owner = $2, lease_until = $4 WHERE id = $1 \
                                        AND (lease_owner = $2 OR (state IN ('sealed', 'uploaded', 'creating', 'submitted') \
                                        AND (lease_until IS NULL OR lease_until <= $3)))")
                    .bind(id.as_str()),
                Lease::Request(id) => q("INSERT INTO request_leases (request_id, owner, until) VALUES ($1, $2, $4) \
                                         ON CONFLICT (request_id) DO UPDATE SET owner = excluded.owner, until = excluded.until \
                                         WHERE request_leases.owner = excluded.owner OR request_leases.until <= $3")
                    .bind(id.as_str()),
            };
            Ok(query.bind(owner).bind(now).bind(until).execute(&mut *conn).await?.rows_affected() == 1)
        }

        /// Applies a window's results with one multi-row `UPDATE … FROM
        /// (VALUES …)` per status and per [`RESOLVE_ROWS`] results, rather
        /// than a statement (and a round trip to the database) per result.
        /// When one request appears twice, its first result wins. (The
        /// SQLite writer runs `sqlite_resolve` instead: a prepared
        /// statement per result costs no round trip there.)
        async fn resolve_many(
            conn: &mut Conn,
            window: &WindowId,
            resolutions: &[Resolution],
        ) -> Result<Vec<RequestId>, StoreError> {
            let mut seen = std::collections::HashSet::with_capacity(resolutions.len());
            let mut by_status: Vec<(RequestStatus, Vec<&Resolution>)> = Vec::new();
            for r in resolutions {
                if !seen.insert(r.id.as_str()) {
                    continue;
                }
                let to = r.status.status();
                match by_status.iter_mut().find(|(s, _)| *s == to) {
                    Some((_, group)) => group.push(r),
                    None => by_status.push((to, vec![r])),
                }
            }
            let mut changed = Vec::with_capacity(seen.len());
            for (to, group) in &by_status {
                for rows in group.chunks(RESOLVE_ROWS) {
                    resolve_rows(conn, Some(window), *to, rows, &mut changed).await?;
                }
            }
            Ok(changed)
        }

        /// Applies results that all move their request to `to`, each only
        /// while its request is still open (and, given a window, still in
        /// it); pushes the ids that changed.
        async fn resolve_rows(
            conn: &mut Conn,
            window: Option<&WindowId>,
            to: RequestStatus,
            rows: &[&Resolution],
            changed: &mut Vec<RequestId>,
        ) -> Result<(), StoreError> {
            // VALUES columns are named column1… in both dialects. Every
            // row moves to the same status, so it is written once.
            let mut sql = String::with_capacity(320 + rows.len() * 40);
            sql.push_str(&format!(
                "UPDATE requests SET status = '{}', served_by = v.column2, \
                 response_status = v.column3, response_body = v.column4, error_code = v.column5, \
                 error_message = v.column6, completed_at = v.column7 FROM (VALUES ",
                to.as_str()
            ));
            let mut n = 0;
            for i in 0..rows.len() {
                sql.push_str(if i == 0 { "(" } else { ",(" });
                for c in 0..7 {
                    if c > 0 {
                        sql.push(',');
                    }
                    n += 1;
                    <$db as Dialect>::param(&mut sql, n);
                }
                sql.push(')');
            }
            sql.push_str(") AS v WHERE requests.id = v.column1");
            if window.is_some() {
                sql.push_str(" AND requests.window_id = ");
                <$db as Dialect>::param(&mut sql, n + 1);
            }
            sql.push_str(&format!(
                " AND requests.status IN ({}) RETURNING requests.id, requests.callback_url, requests.completed_at",
                request_from_sql(to)
            ));
            let mut query = q(&sql);
            for r in rows {
                query = query
                    .bind(r.id.as_str())
                    .bind(r.served_by.map(|s| s.as_str()))
                    .bind(r.response_status.map(i64::from))
                    .bind(r.response_body.as_deref())
                    .bind(r.error_code.as_deref())
                    .bind(r.error_message.as_deref())
                    .bind(r.completed_at);
            }
            if let Some(window) = window {
                query = query.bind(window.as_str());
            }
            let returned = query.fetch_all(&mut *conn).await?;
            for row in &returned {
                let id = RequestId::from_stored(row.try_get("id")?);
                if let Some(url) = row.try_get::<Option<String>, _>("callback_url")? {
                    enqueue_delivery(conn, &id, &url, to, row.try_get("completed_at")?).await?;
                }
                if let Some(r) = rows.iter().find(|r| r.id == id) {
                    record_charge(conn, r).await?;
                }
                changed.push(id);
            }
            if returned.len() < rows.len() {
                let applied = &changed[changed.len() - returned.len()..];
                let applied: std::collections::HashSet<&str> = applied.iter().map(RequestId::as_str).collect();
                for r in rows.iter().filter(|r| !applied.contains(r.id.as_str())) {
                    record_double_paid(conn, r).await?;
                }
            }
            Ok(())
        }

        /// The charge of a paid answer that did not apply, on the ledger
        /// row of the answer that did (none without a charge or a row).
        async fn record_double_paid(conn: &mut Conn, r: &Resolution) -> Result<(), StoreError> {
            let (Some(charge), Some(served_by)) = (&r.charge, r.served_by) else {
                return Ok(());
            };
            q(LEDGER_DOUBLE_PAID)
                .bind(charge.served_nusd)
                .bind(r.id.as_str())
                .bind(served_by.as_str())
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// The ledger row of a result that just applied (none without a
        /// charge); a second one for the same request is ignored.
        pub(crate) async fn record_charge(conn: &mut Conn, r: &Resolution) -> Result<(), StoreError> {
            let (Some(charge), Some(served_by)) = (&r.charge, r.served_by) else {
                return Ok(());
            };
            q(LEDGER_INSERT)
                .bind(r.id.as_str())
                .bind(r.completed_at)
                .bind(served_by.as_str())
                .bind(to_i64(charge.usage.prompt))
                .bind(to_i64(charge.usage.completion))
                .bind(charge.realtime_nusd)
                .bind(charge.served_nusd)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        async fn requeue(conn: &mut Conn, ids: &[RequestId], now: i64, counted: bool) -> Result<Vec<RequestId>, StoreError> {
            let mut moved = Vec::new();
            for id in ids {
                let row = q(&format!(
                    "UPDATE requests SET status = 'queued', batch_id = NULL, submitted_at = NULL, \
                     resubmits = resubmits + $2 \
                     WHERE id = $1 AND status IN ({}) \
                     RETURNING upstream, credential_hash, scope, endpoint, model, window_id, \
                     CAST(length(body) AS BIGINT) AS len",
                    request_from_sql(RequestStatus::Queued)
                ))
                .bind(id.as_str())
                .bind(i64::from(counted))
                .fetch_optional(&mut *conn)
                .await?;
                let Some(row) = row else { continue };
                let key = window_key(&row)?;
                let old: Option<String> = row.try_get("window_id")?;
                // The old window's limits, and (passthrough) its owner's
                // key: the new window's job needs it as much as the old one's.
                let (limits, upstream_key) = match &old {
                    Some(old) => q("SELECT max_requests, max_bytes, upstream_key FROM windows WHERE id = $1")
                        .bind(old)
                        .fetch_optional(&mut *conn)
                        .await?
                        .map(|w| -> Result<(WindowLimits, Option<String>), StoreError> {
                            Ok((
                                WindowLimits {
                                    max_requests: uint(w.try_get("max_requests")?),
                                    max_bytes: uint(w.try_get("max_bytes")?),
                                },
                                w.try_get("upstream_key")?,
                            ))
                        })
                        .transpose()?
                        .unwrap_or((FALLBACK_LIMITS, None)),
                    None => (FALLBACK_LIMITS, None),
                };
                let (slot, _) =
                    place(conn, &key, row.try_get("len")?, limits, upstream_key.as_deref(), now).await?;
                q("UPDATE requests SET window_id = $2 WHERE id = $1")
                    .bind(id.as_str())
                    .bind(slot.id.as_str())
                    .execute(&mut *conn)
                    .await?;
                moved.push(id.clone());
            }
            Ok(moved)
        }

        // ---- failure policies: resubmission, openness, pending counts ----

        /// Requeues the still open requests of a window that were resubmitted
        /// fewer than `limit` times; the others stay where they are for the
        /// next policy.
        async fn resubmit(conn: &mut Conn, window: &WindowId, limit: u32, now: i64) -> Result<Vec<RequestId>, StoreError> {
            let rows = q("SELECT id FROM requests WHERE window_id = $1 \
                          AND status IN ('queued', 'submitted') AND resubmits < $2 ORDER BY seq")
                .bind(window.as_str())
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?;
            let ids = rows
                .iter()
                .map(|row| Ok(RequestId::from_stored(row.try_get("id")?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            requeue(conn, &ids, now, true).await
        }
    };
}

pub(crate) use write_ops;
