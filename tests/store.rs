//! The store contract: one suite, run against every backend (SQLite in a
//! temporary directory; Postgres at 127.0.0.1:5432 in a schema of its own,
//! dropped afterwards; set `CARPOOL_SKIP_PG=1` where there is none).

// Tests may unwrap (house rule); helpers outside #[test] fns need saying so.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;

use bytes::Bytes;
use carpool::model::{DeliveryId, RequestId, RequestStatus, ServedBy, WindowId};
use carpool::pricing::{Charge, TokenUsage};
use carpool::store::{
    Accepted, CancelOutcome, DeliveryMode, DeliveryState, DueCursor, FlushReason, Lease,
    LedgerGroup, NewRequest, Resolution, ResolvedStatus, Store, StoreError, StoreOptions,
    WindowLimits, WindowOutcome, WindowState,
};
use futures_util::TryStreamExt;

use support::pg::{self, PG_URL};

const CRED_A: &str = "aaaa";
const CRED_B: &str = "bbbb";
const T0: i64 = 1_700_000_000_000;

struct Harness {
    url: String,
    options: StoreOptions,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    fn sqlite() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("carpool.db").display());
        Harness {
            url,
            options: StoreOptions::default(),
            _dir: Some(dir),
        }
    }

    fn postgres() -> Option<Harness> {
        if pg::skipped() {
            return None;
        }
        let schema = pg::schema_name();
        Some(Harness {
            url: PG_URL.to_owned(),
            options: StoreOptions {
                pg_schema: Some(schema),
                pool_size: 8,
                ..StoreOptions::default()
            },
            _dir: None,
        })
    }

    async fn open(&self) -> Store {
        Store::connect_with(&self.url, self.options.clone())
            .await
            .unwrap()
    }
}

/// Drops a test's Postgres schema even when the test failed.
impl Drop for Harness {
    fn drop(&mut self) {
        let Some(schema) = self.options.pg_schema.clone() else {
            return;
        };
        pg::drop_schema(&schema);
    }
}

fn project_scope(project: &str) -> carpool::model::Scope {
    carpool::model::Scope::new([("openai-project".to_owned(), project.to_owned())])
}

/// Seals an open window and takes it to submitted as `job`.
async fn submit_sealed(store: &Store, window: &WindowId, job: &str) {
    assert!(store
        .seal_window(window, FlushReason::MaxWait, T0)
        .await
        .unwrap());
    submit(store, window, job).await;
}

fn limits(max_requests: u64, max_bytes: u64) -> WindowLimits {
    WindowLimits {
        max_requests,
        max_bytes,
    }
}

fn new_request(cred: &str, model: &str, body: &str, now: i64) -> NewRequest {
    NewRequest {
        id: RequestId::generate(),
        credential_hash: cred.to_owned(),
        upstream: "main".to_owned(),
        endpoint: "/v1/chat/completions".to_owned(),
        model: model.to_owned(),
        scope: carpool::model::Scope::default(),
        forward_headers: Vec::new(),
        body: Bytes::from(body.to_owned()),
        body_hash: format!("hash:{body}"),
        idempotency_key: None,
        sdk_retry: false,
        mode: DeliveryMode::Async,
        deadline: None,
        callback_url: None,
        upstream_key: None,
        limits: limits(1000, 1_000_000),
        now,
    }
}

async fn accept(store: &Store, req: NewRequest) -> Accepted {
    store.accept(req).await.unwrap()
}

async fn lines(store: &Store, window: &WindowId) -> Vec<RequestId> {
    store
        .window_lines(window)
        .map_ok(|(id, _)| id)
        .try_collect()
        .await
        .unwrap()
}

/// Takes a sealed window through upload and create to submitted.
async fn submit(store: &Store, window: &WindowId, job: &str) {
    assert!(store.record_upload(window, "file-1").await.unwrap());
    assert!(store.mark_creating(window).await.unwrap());
    assert!(store.record_job(window, job, T0 + 10).await.unwrap());
}

/// Seals the window of credential A's request `member` and takes it to
/// submitted as `job`; returns the window.
async fn seal_and_submit(store: &Store, member: &RequestId, job: &str) -> WindowId {
    let w = seal(store, member).await;
    submit(store, &w, job).await;
    w
}

/// Seals the window holding `member`; returns the window.
async fn seal(store: &Store, member: &RequestId) -> WindowId {
    let w = store
        .get(member, CRED_A)
        .await
        .unwrap()
        .unwrap()
        .window_id
        .unwrap();
    assert!(store
        .seal_window(&w, FlushReason::MaxWait, T0)
        .await
        .unwrap());
    w
}

fn success(id: &RequestId, body: &str) -> Resolution {
    Resolution {
        id: id.clone(),
        status: ResolvedStatus::Succeeded,
        served_by: Some(ServedBy::Batch),
        response_status: Some(200),
        response_body: Some(Bytes::from(body.to_owned())),
        error_code: None,
        error_message: None,
        completed_at: T0 + 20,
        charge: None,
    }
}

mod cases {
    use super::*;

    pub async fn splits_windows_at_max_requests(h: &Harness) {
        let store = h.open().await;
        let mut sealed_by = Vec::new();
        let mut ids = Vec::new();
        for i in 0..12 {
            let mut r = new_request(CRED_A, "m", &format!("{{\"n\":{i}}}"), T0 + i);
            r.limits = limits(5, 1_000_000);
            let a = accept(&store, r).await;
            assert!(a.created);
            ids.push(a.record.id.clone());
            if let Some(reason) = a.window.unwrap().sealed {
                sealed_by.push(reason);
            }
        }
        assert_eq!(sealed_by, vec![FlushReason::MaxRequests; 2]);
        let windows = store
            .windows_in(&[WindowState::Open, WindowState::Sealed])
            .await
            .unwrap();
        let counts: Vec<u64> = windows.iter().map(|w| w.count).collect();
        assert_eq!(counts, vec![5, 5, 2]);
        assert_eq!(windows[2].state, WindowState::Open);
        let mut streamed = Vec::new();
        for w in &windows {
            let l = lines(&store, &w.id).await;
            assert_eq!(l.len() as u64, w.count);
            streamed.extend(l);
        }
        assert_eq!(streamed, ids, "lines come out in acceptance order");
    }

    pub async fn splits_windows_at_max_bytes(h: &Harness) {
        let store = h.open().await;
        let mut sealed_previous = Vec::new();
        for i in 0..5 {
            let mut r = new_request(CRED_A, "m", &format!("0123456789-{i}"), T0 + i);
            r.limits = limits(100, 30);
            let a = accept(&store, r).await;
            assert!(a.window.as_ref().unwrap().bytes <= 30);
            if let Some((_, reason)) = a.sealed_previous {
                sealed_previous.push(reason);
            }
        }
        assert_eq!(sealed_previous, vec![FlushReason::MaxBytes; 2]);
        let windows = store
            .windows_in(&[WindowState::Open, WindowState::Sealed])
            .await
            .unwrap();
        let counts: Vec<u64> = windows.iter().map(|w| w.count).collect();
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(windows[0].flush_reason, Some(FlushReason::MaxBytes));
    }

    pub async fn keeps_models_and_credentials_in_separate_windows(h: &Harness) {
        let store = h.open().await;
        let mut windows = HashSet::new();
        for cred in [CRED_A, CRED_B] {
            for model in ["m1", "m2"] {
                let a = accept(&store, new_request(cred, model, "{}", T0)).await;
                let b = accept(&store, new_request(cred, model, "{\"x\":1}", T0)).await;
                let (wa, wb) = (a.window.unwrap().id, b.window.unwrap());
                assert_eq!(wa, wb.id);
                assert_eq!(wb.count, 2);
                windows.insert(wa);
            }
        }
        assert_eq!(windows.len(), 4);
        let open = store.open_windows().await.unwrap();
        assert_eq!(open.len(), 4);
        let keys: HashSet<_> = open
            .iter()
            .map(|w| (w.key.credential_hash.clone(), w.key.model.clone()))
            .collect();
        assert_eq!(keys.len(), 4);
    }

    pub async fn keeps_scopes_in_separate_windows_and_requeues_within_them(h: &Harness) {
        let store = h.open().await;
        let scoped = |project: &str, body: &str| {
            let mut r = new_request(CRED_A, "m", body, T0);
            r.scope = project_scope(project);
            r.forward_headers = vec![
                ("openai-project".to_owned(), project.to_owned()),
                ("x-request-id".to_owned(), format!("req-{body}")),
            ];
            r
        };
        let a1 = accept(&store, scoped("proj_A", "{\"a\":1}")).await;
        let a2 = accept(&store, scoped("proj_A", "{\"a\":2}")).await;
        let b = accept(&store, scoped("proj_B", "{\"b\":1}")).await;
        let plain = accept(&store, new_request(CRED_A, "m", "{\"p\":1}", T0)).await;
        let wa = a1.window.unwrap().id;
        assert_eq!(a2.window.unwrap().id, wa);
        let (wb, wp) = (b.window.unwrap().id, plain.window.unwrap().id);
        assert!(wa != wb && wa != wp && wb != wp);
        let open = store.open_windows().await.unwrap();
        let scope_of = |w: &WindowId| {
            open.iter()
                .find(|o| &o.id == w)
                .map(|o| o.key.scope.clone())
                .unwrap()
        };
        assert_eq!(scope_of(&wa), project_scope("proj_A"));
        assert_eq!(scope_of(&wb), project_scope("proj_B"));
        assert!(scope_of(&wp).is_empty());
        assert_eq!(
            store.request_headers(&b.record.id).await.unwrap(),
            vec![
                ("openai-project".to_owned(), "proj_B".to_owned()),
                ("x-request-id".to_owned(), "req-{\"b\":1}".to_owned()),
            ]
        );
        assert!(store
            .request_headers(&plain.record.id)
            .await
            .unwrap()
            .is_empty());
        // A's job fails: its requests go back to a window of A's scope only.
        submit_sealed(&store, &wa, "job-a").await;
        let moved = store.resubmit(&wa, 1, T0 + 40).await.unwrap();
        assert_eq!(moved.len(), 2);
        let again = store.get(&a1.record.id, CRED_A).await.unwrap().unwrap();
        let w2 = again.window_id.unwrap();
        assert!(w2 != wa && w2 != wb && w2 != wp);
        let next = store.window(&w2).await.unwrap().unwrap();
        assert_eq!(next.key.scope, project_scope("proj_A"));
        assert_eq!(next.count, 2);
    }

    pub async fn idempotent_repeat_returns_the_same_request(h: &Harness) {
        let store = h.open().await;
        let mut first = new_request(CRED_A, "m", "{\"q\":1}", T0);
        first.idempotency_key = Some("k1".into());
        let a = accept(&store, first.clone()).await;
        let mut again = first.clone();
        again.id = RequestId::generate();
        let b = accept(&store, again).await;
        assert!(a.created && !b.created);
        assert_eq!(a.record.id, b.record.id);
        // The same key under another credential is another request.
        let mut other = first.clone();
        other.id = RequestId::generate();
        other.credential_hash = CRED_B.into();
        assert!(accept(&store, other).await.created);
        let open = store.open_windows().await.unwrap();
        assert_eq!(open.iter().map(|w| w.count).sum::<u64>(), 2);
    }

    pub async fn idempotency_key_with_another_body_conflicts(h: &Harness) {
        let store = h.open().await;
        let mut first = new_request(CRED_A, "m", "{\"q\":1}", T0);
        first.idempotency_key = Some("k1".into());
        accept(&store, first.clone()).await;
        let mut changed = new_request(CRED_A, "m", "{\"q\":2}", T0);
        changed.idempotency_key = Some("k1".into());
        let err = store.accept(changed).await.unwrap_err();
        assert!(matches!(err, StoreError::IdempotencyConflict), "{err:?}");
        assert_eq!(store.list(CRED_A, None, 10, None).await.unwrap().len(), 1);
    }

    pub async fn sdk_retry_reattaches_to_the_queued_request(h: &Harness) {
        let store = h.open().await;
        let original = accept(&store, new_request(CRED_A, "m", "{\"q\":1}", T0)).await;
        let mut retry = new_request(CRED_A, "m", "{\"q\":1}", T0 + 30_000);
        retry.sdk_retry = true;
        let b = accept(&store, retry).await;
        assert!(!b.created);
        assert_eq!(b.record.id, original.record.id);
        // Without the retry header the same body is a new request.
        let fresh = accept(&store, new_request(CRED_A, "m", "{\"q\":1}", T0 + 1)).await;
        assert!(fresh.created);
        // Another credential never re-attaches.
        let mut foreign = new_request(CRED_B, "m", "{\"q\":1}", T0 + 2);
        foreign.sdk_retry = true;
        assert!(accept(&store, foreign).await.created);
    }

    pub async fn sdk_retry_never_reattaches_to_a_cancelled_or_old_request(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{\"q\":1}", T0)).await;
        store.cancel(&a.record.id, CRED_A, T0 + 1).await.unwrap();
        let mut retry = new_request(CRED_A, "m", "{\"q\":1}", T0 + 2);
        retry.sdk_retry = true;
        let b = accept(&store, retry).await;
        assert!(b.created);
        let mut late = new_request(CRED_A, "m", "{\"q\":1}", T0 + 2 * 3_600_000);
        late.sdk_retry = true;
        assert!(accept(&store, late).await.created);
    }

    pub async fn counts_requests_by_status_and_lists_open_window_limits(h: &Harness) {
        let store = h.open().await;
        assert!(store.request_counts().await.unwrap().is_empty());
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut r = new_request(CRED_A, "m", &format!("{{\"n\":{i}}}"), T0 + i);
            r.limits = limits(5, 1_000_000);
            ids.push(accept(&store, r).await.record.id);
        }
        let open = store.open_windows().await.unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].limits, limits(5, 1_000_000));
        assert!(matches!(
            store.cancel(&ids[0], CRED_A, T0 + 5).await.unwrap(),
            CancelOutcome::Cancelled(_)
        ));
        let mut counts = store.request_counts().await.unwrap();
        counts.sort_by_key(|(s, _)| s.as_str());
        assert_eq!(
            counts,
            vec![(RequestStatus::Cancelled, 1), (RequestStatus::Queued, 2)]
        );
    }

    pub async fn cancel_before_flush_keeps_the_request_out_of_the_window(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{\"a\":1}", T0)).await;
        let b = accept(&store, new_request(CRED_A, "m", "{\"b\":22}", T0)).await;
        let window = b.window.unwrap();
        assert_eq!(
            store.cancel(&a.record.id, CRED_B, T0).await.unwrap(),
            CancelOutcome::NotFound
        );
        let CancelOutcome::Cancelled(rec) =
            store.cancel(&a.record.id, CRED_A, T0 + 5).await.unwrap()
        else {
            panic!("expected a cancellation")
        };
        assert_eq!(rec.status, RequestStatus::Cancelled);
        assert_eq!(rec.completed_at, Some(T0 + 5));
        let w = store.window(&window.id).await.unwrap().unwrap();
        assert_eq!((w.count, w.bytes), (1, 8));
        assert!(store
            .seal_window(&window.id, FlushReason::Operator, T0 + 6)
            .await
            .unwrap());
        assert_eq!(lines(&store, &window.id).await, vec![b.record.id.clone()]);
        assert!(matches!(
            store.cancel(&a.record.id, CRED_A, T0 + 7).await.unwrap(),
            CancelOutcome::AlreadyFinal(_)
        ));
    }

    pub async fn cancelling_every_member_drops_the_open_window(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{}", T0)).await;
        store.cancel(&a.record.id, CRED_A, T0 + 1).await.unwrap();
        assert!(store.open_windows().await.unwrap().is_empty());
        let b = accept(&store, new_request(CRED_A, "m", "{}", T0 + 50)).await;
        let slot = b.window.unwrap();
        assert_ne!(Some(slot.id), a.record.window_id);
        assert_eq!(slot.opened_at, T0 + 50);
    }

    pub async fn a_submitted_request_cancels_and_its_late_result_is_discarded(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{}", T0)).await;
        let w = a.window.unwrap().id;
        store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap();
        submit(&store, &w, "job-1").await;
        assert!(matches!(
            store.cancel(&a.record.id, CRED_A, T0 + 11).await.unwrap(),
            CancelOutcome::Cancelled(_)
        ));
        let changed = store
            .resolve(&w, vec![success(&a.record.id, "{}")])
            .await
            .unwrap();
        assert!(changed.is_empty());
        let rec = store.get(&a.record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(rec.status, RequestStatus::Cancelled);
        assert_eq!(rec.response_body, None);
    }

    pub async fn another_credential_never_sees_a_request(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{}", T0)).await;
        assert!(store.get(&a.record.id, CRED_B).await.unwrap().is_none());
        assert!(store.list(CRED_B, None, 10, None).await.unwrap().is_empty());
        let got = store.get(&a.record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(got, a.record);
    }

    pub async fn list_is_newest_first_filtered_and_paged(h: &Harness) {
        let store = h.open().await;
        let mut ids = Vec::new();
        for i in 0..5 {
            let a = accept(
                &store,
                new_request(CRED_A, "m", &format!("{{\"i\":{i}}}"), T0 + i),
            )
            .await;
            ids.push(a.record.id);
        }
        store.cancel(&ids[1], CRED_A, T0 + 9).await.unwrap();
        let all: Vec<_> = store
            .list(CRED_A, None, 10, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        let newest_first: Vec<_> = ids.iter().rev().cloned().collect();
        assert_eq!(all, newest_first);
        let page: Vec<_> = store
            .list(CRED_A, None, 2, Some(&ids[3]))
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(page, vec![ids[2].clone(), ids[1].clone()]);
        let cancelled = store
            .list(CRED_A, Some(RequestStatus::Cancelled), 10, None)
            .await
            .unwrap();
        assert_eq!(cancelled.len(), 1);
        assert_eq!(cancelled[0].id, ids[1]);
        // A cursor of another credential yields nothing rather than leaking.
        let foreign = accept(&store, new_request(CRED_B, "m", "{}", T0)).await;
        assert!(store
            .list(CRED_A, None, 10, Some(&foreign.record.id))
            .await
            .unwrap()
            .is_empty());
    }

    pub async fn submission_moves_queued_requests_and_the_upstream_key_lives_until_the_window_finishes(
        h: &Harness,
    ) {
        let store = h.open().await;
        let mut r = new_request(CRED_A, "m", "{}", T0);
        r.upstream_key = Some("sk-secret".into());
        let a = accept(&store, r).await;
        let w = a.window.unwrap().id;
        let rec = store.window(&w).await.unwrap().unwrap();
        assert_eq!(rec.upstream_key.as_deref(), Some("sk-secret"));
        assert!(
            !format!("{rec:?}").contains("sk-secret"),
            "key in Debug output"
        );
        // Transitions out of order are refused.
        assert!(!store.record_upload(&w, "f").await.unwrap());
        assert!(!store.mark_creating(&w).await.unwrap());
        assert!(store
            .seal_window(&w, FlushReason::Shutdown, T0 + 1)
            .await
            .unwrap());
        assert!(!store
            .seal_window(&w, FlushReason::MaxWait, T0 + 1)
            .await
            .unwrap());
        assert!(!store.record_job(&w, "job", T0).await.unwrap());
        submit(&store, &w, "job-7").await;
        let rec = store.window(&w).await.unwrap().unwrap();
        assert_eq!(rec.state, WindowState::Submitted);
        // Polling and downloading the job need the owner's key (passthrough).
        assert_eq!(rec.upstream_key.as_deref(), Some("sk-secret"));
        assert_eq!(rec.job_id.as_deref(), Some("job-7"));
        assert_eq!(rec.flush_reason, Some(FlushReason::Shutdown));
        let req = store.get(&a.record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(req.status, RequestStatus::Submitted);
        assert_eq!(req.batch_id.as_deref(), Some("job-7"));
        assert_eq!(req.submitted_at, Some(T0 + 10));
        assert!(store.record_job_status(&w, "RUNNING").await.unwrap());
        assert!(store
            .finish_window(&w, WindowOutcome::Completed, T0 + 30)
            .await
            .unwrap());
        let rec = store.window(&w).await.unwrap().unwrap();
        assert_eq!(rec.upstream_key, None, "key kept after the window finished");
        assert!(!store
            .finish_window(&w, WindowOutcome::Failed, T0 + 31)
            .await
            .unwrap());
        assert!(!store.record_job_status(&w, "SUCCESS").await.unwrap());
    }

    pub async fn the_ledger_counts_each_request_once_and_sums_by_group(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{\"a\":1}", T0)).await;
        let b = accept(&store, new_request(CRED_A, "m", "{\"b\":1}", T0)).await;
        let c = accept(&store, new_request(CRED_B, "n", "{\"c\":1}", T0)).await;
        let w = a.window.unwrap().id;
        store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap();
        submit(&store, &w, "job-1").await;
        let charged = |id: &RequestId, prompt: u64, realtime: i64, served: i64| Resolution {
            charge: Some(Charge {
                usage: TokenUsage {
                    prompt,
                    completion: 1,
                },
                realtime_nusd: realtime,
                served_nusd: served,
            }),
            ..success(id, "{}")
        };
        let results = vec![
            charged(&a.record.id, 10, 1_000, 500),
            charged(&b.record.id, 20, 2_000, 1_000),
        ];
        assert_eq!(store.resolve(&w, results.clone()).await.unwrap().len(), 2);
        // The same file again (a re-download after a crash), and a late
        // realtime answer: nothing counted twice.
        assert!(store.resolve(&w, results).await.unwrap().is_empty());
        assert!(!store
            .resolve_one(charged(&a.record.id, 99, 9_999, 9_999))
            .await
            .unwrap());
        // A realtime answer of another credential's request, a day later.
        let realtime = Resolution {
            served_by: Some(ServedBy::Realtime),
            completed_at: T0 + 86_400_000,
            ..charged(&c.record.id, 5, 300, 300)
        };
        assert!(store.resolve_one(realtime).await.unwrap());
        // Its batch line comes back after all (paid twice), and once more
        // (a re-download): its price is added to its row once.
        for _ in 0..2 {
            assert!(!store
                .resolve_one(charged(&c.record.id, 5, 300, 150))
                .await
                .unwrap());
        }

        let by_model = store
            .ledger(LedgerGroup::Model, i64::MIN, i64::MAX)
            .await
            .unwrap();
        let sums: Vec<_> = by_model
            .iter()
            .map(|s| {
                (
                    s.group.as_str(),
                    s.requests,
                    s.input_tokens,
                    s.output_tokens,
                    s.realtime_nusd,
                    s.served_nusd,
                )
            })
            .collect();
        assert_eq!(
            sums,
            vec![("m", 2, 30, 2, 3_000, 1_500), ("n", 1, 5, 1, 300, 300)]
        );
        let doubles: Vec<_> = by_model
            .iter()
            .map(|s| (s.double_paid, s.double_paid_nusd))
            .collect();
        assert_eq!(doubles, vec![(0, 0), (1, 150)]);
        let by_credential = store
            .ledger(LedgerGroup::Credential, i64::MIN, i64::MAX)
            .await
            .unwrap();
        let groups: Vec<_> = by_credential
            .iter()
            .map(|s| (s.group.as_str(), s.requests))
            .collect();
        assert_eq!(groups, vec![(CRED_A, 2), (CRED_B, 1)]);
        // By UTC day; and a range that ends before the second day.
        let by_day = store
            .ledger(LedgerGroup::Day, i64::MIN, i64::MAX)
            .await
            .unwrap();
        let day0 = (T0 + 20) / 86_400_000;
        let days: Vec<_> = by_day
            .iter()
            .map(|s| (s.group.clone(), s.requests))
            .collect();
        assert_eq!(
            days,
            vec![(day0.to_string(), 2), ((day0 + 1).to_string(), 1)]
        );
        let first_day = store
            .ledger(LedgerGroup::Upstream, T0, T0 + 86_400_000)
            .await
            .unwrap();
        assert_eq!(first_day.len(), 1);
        assert_eq!(first_day[0].requests, 2);
        // Kept past the results' retention.
        store.purge_finished(T0 + 10 * 86_400_000).await.unwrap();
        let kept = store
            .ledger(LedgerGroup::Model, i64::MIN, i64::MAX)
            .await
            .unwrap();
        assert_eq!(kept, by_model);
        store.close().await;
    }

    pub async fn resolves_each_request_once_and_only_from_its_window(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, new_request(CRED_A, "m", "{\"a\":1}", T0)).await;
        let b = accept(&store, new_request(CRED_A, "m", "{\"b\":1}", T0)).await;
        let w = a.window.unwrap().id;
        store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap();
        submit(&store, &w, "job-1").await;
        let changed = store
            .resolve(&w, vec![success(&a.record.id, "{\"ok\":1}")])
            .await
            .unwrap();
        assert_eq!(changed, vec![a.record.id.clone()]);
        let again = store
            .resolve(&w, vec![success(&a.record.id, "{\"ok\":2}")])
            .await
            .unwrap();
        assert!(again.is_empty());
        let rec = store.get(&a.record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(rec.status, RequestStatus::Succeeded);
        assert_eq!(rec.response_body.as_deref(), Some(&b"{\"ok\":1}"[..]));
        assert_eq!(rec.response_status, Some(200));
        assert_eq!(rec.served_by, Some(ServedBy::Batch));
        // b is resubmitted: a late line of the old job must not clobber it.
        let moved = store
            .requeue(vec![b.record.id.clone(), a.record.id.clone()], T0 + 40)
            .await
            .unwrap();
        assert_eq!(moved, vec![b.record.id.clone()]);
        let requeued = store.get(&b.record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(requeued.status, RequestStatus::Queued);
        assert_eq!(requeued.batch_id, None);
        let new_window = requeued.window_id.clone().unwrap();
        assert_ne!(new_window, w);
        assert!(store
            .resolve(&w, vec![success(&b.record.id, "{}")])
            .await
            .unwrap()
            .is_empty());
        assert_eq!(lines(&store, &new_window).await, vec![b.record.id.clone()]);
        // A realtime fallback answers it; the batch result that follows is dropped.
        let mut realtime = success(&b.record.id, "{\"rt\":1}");
        realtime.served_by = Some(ServedBy::Realtime);
        assert!(store.resolve_one(realtime.clone()).await.unwrap());
        assert!(!store.resolve_one(realtime).await.unwrap());
        assert!(store
            .resolve(&new_window, vec![success(&b.record.id, "{}")])
            .await
            .unwrap()
            .is_empty());
        let rec = store.get(&b.record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(rec.served_by, Some(ServedBy::Realtime));
        assert_eq!(rec.response_body.as_deref(), Some(&b"{\"rt\":1}"[..]));
    }

    /// More results than one statement takes, in an order unlike the
    /// store's, with mixed outcomes, a repeated line, a foreign window's
    /// request and callbacks: each open request of the window is answered
    /// once, from its first line, and every callback gets one delivery.
    pub async fn a_large_mixed_resolve_answers_each_open_member_once(h: &Harness) {
        const N: usize = 1_203;
        let store = h.open().await;
        let mut ids = Vec::new();
        for i in 0..N {
            let mut r = new_request(CRED_A, "m", &format!("{{\"i\":{i}}}"), T0);
            r.limits = limits(10_000, 100_000_000);
            if i % 100 == 0 {
                r.callback_url = Some(format!("https://hooks.example/{i}"));
            }
            ids.push(accept(&store, r).await.record.id);
        }
        let other = accept(&store, new_request(CRED_B, "m", "{}", T0)).await;
        let w = seal_and_submit(&store, &ids[0], "job").await;
        let mut results: Vec<Resolution> = ids
            .iter()
            .enumerate()
            .rev()
            .map(|(i, id)| {
                let mut r = success(id, &format!("{{\"answer\":{i}}}"));
                if i % 3 == 0 {
                    r.status = ResolvedStatus::Failed;
                    r.response_status = Some(400);
                    r.error_code = Some("upstream_400".to_owned());
                }
                r
            })
            .collect();
        results.push(success(&ids[7], "{\"answer\":\"repeated\"}"));
        results.push(success(&other.record.id, "{}"));
        // Already answered before the file arrives: left as it was.
        let early = store
            .resolve(&w, vec![success(&ids[5], "{\"early\":1}")])
            .await
            .unwrap();
        assert_eq!(early, vec![ids[5].clone()]);

        let changed: HashSet<RequestId> = store
            .resolve(&w, results)
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(changed.len(), N - 1);
        assert!(!changed.contains(&ids[5]) && !changed.contains(&other.record.id));
        for (i, id) in ids.iter().enumerate() {
            let rec = store.get(id, CRED_A).await.unwrap().unwrap();
            let body = String::from_utf8(rec.response_body.unwrap().to_vec()).unwrap();
            if i == 5 {
                assert_eq!(body, "{\"early\":1}");
                continue;
            }
            assert_eq!(body, format!("{{\"answer\":{i}}}"), "request {i}");
            let (status, code) = if i % 3 == 0 {
                (RequestStatus::Failed, Some(400))
            } else {
                (RequestStatus::Succeeded, Some(200))
            };
            assert_eq!(
                (rec.status, rec.response_status),
                (status, code),
                "request {i}"
            );
            assert_eq!(rec.completed_at, Some(T0 + 20));
        }
        let theirs = store.get(&other.record.id, CRED_B).await.unwrap().unwrap();
        assert_eq!(theirs.status, RequestStatus::Queued);
        for i in (0..N).step_by(100) {
            let delivery = store
                .delivery(&DeliveryId::for_request(&ids[i]))
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("request {i} has no delivery"));
            assert_eq!(delivery.url, format!("https://hooks.example/{i}"));
        }
        assert_eq!(
            store.outbox_pending().await.unwrap().0,
            (N as u64).div_ceil(100)
        );
        assert_eq!(store.open_request_ids(&w).await.unwrap(), vec![]);
        store.close().await;
    }

    pub async fn fail_unresolved_fails_only_what_is_still_open(h: &Harness) {
        let store = h.open().await;
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                accept(
                    &store,
                    new_request(CRED_A, "m", &format!("{{\"i\":{i}}}"), T0),
                )
                .await,
            );
        }
        let w = ids[0].window.clone().unwrap().id;
        store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap();
        submit(&store, &w, "job").await;
        store
            .resolve(&w, vec![success(&ids[0].record.id, "{}")])
            .await
            .unwrap();
        let mut failed_line = success(&ids[1].record.id, "{\"error\":{}}");
        failed_line.status = ResolvedStatus::Failed;
        failed_line.response_status = Some(400);
        store.resolve(&w, vec![failed_line]).await.unwrap();
        let failed = store
            .fail_unresolved(&w, "missing_result", "in neither file", T0 + 50)
            .await
            .unwrap();
        assert_eq!(failed, vec![ids[2].record.id.clone()]);
        let rec = store.get(&ids[2].record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(rec.status, RequestStatus::Failed);
        assert_eq!(rec.error_code.as_deref(), Some("missing_result"));
        let line = store.get(&ids[1].record.id, CRED_A).await.unwrap().unwrap();
        assert_eq!(
            (line.status, line.response_status),
            (RequestStatus::Failed, Some(400))
        );
        assert!(store.open_request_ids(&w).await.unwrap().is_empty());
    }

    pub async fn reports_earliest_deadline_and_due_requests(h: &Harness) {
        let store = h.open().await;
        for deadline in [T0 + 9_000, T0 + 5_000, T0 + 7_000] {
            let mut r = new_request(CRED_A, "m", &format!("{{\"d\":{deadline}}}"), T0);
            r.deadline = Some(deadline);
            accept(&store, r).await;
        }
        let open = store.open_windows().await.unwrap();
        assert_eq!(open[0].earliest_deadline, Some(T0 + 5_000));
        assert_eq!(open[0].earliest_midpoint, Some(T0 + 2_500));
        let due = store.due_requests(T0 + 7_000, None, 10).await.unwrap();
        let deadlines: Vec<_> = due.iter().map(|r| r.record.deadline).collect();
        assert_eq!(deadlines, vec![Some(T0 + 5_000), Some(T0 + 7_000)]);
        assert!(due.iter().all(|r| r.window == Some(WindowState::Open)));
        let body = store
            .request_body(&due[0].record.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&body[..], format!("{{\"d\":{}}}", T0 + 5_000).as_bytes());
        // Paged by (deadline, id): the next page starts after the last one.
        let first = store.due_requests(T0 + 9_000, None, 1).await.unwrap();
        let cursor = DueCursor {
            deadline: first[0].record.deadline.unwrap(),
            id: first[0].record.id.clone(),
        };
        let rest = store
            .due_requests(T0 + 9_000, Some(&cursor), 10)
            .await
            .unwrap();
        let deadlines: Vec<_> = rest.iter().map(|r| r.record.deadline).collect();
        assert_eq!(deadlines, vec![Some(T0 + 7_000), Some(T0 + 9_000)]);
    }

    pub async fn purge_removes_only_results_past_their_ttl(h: &Harness) {
        let store = h.open().await;
        let old = accept(&store, new_request(CRED_A, "m", "{\"o\":1}", T0)).await;
        let pending = accept(&store, new_request(CRED_A, "m", "{\"p\":1}", T0)).await;
        store.cancel(&old.record.id, CRED_A, T0 + 1).await.unwrap();
        assert_eq!(store.purge_finished(T0 + 1).await.unwrap(), 0);
        assert_eq!(store.purge_finished(T0 + 2).await.unwrap(), 1);
        assert!(store.get(&old.record.id, CRED_A).await.unwrap().is_none());
        assert!(store
            .get(&pending.record.id, CRED_A)
            .await
            .unwrap()
            .is_some());
    }

    pub async fn everything_survives_a_restart(h: &Harness) {
        let store = h.open().await;
        let mut r = new_request(CRED_A, "m", "{\"x\":1}", T0);
        r.limits = limits(2, 1_000_000);
        r.upstream_key = Some("sk-pass".into());
        let a = accept(&store, r.clone()).await;
        r.id = RequestId::generate();
        r.body = Bytes::from_static(b"{\"x\":2}");
        r.body_hash = "hash:2".into();
        accept(&store, r.clone()).await;
        let sealed = a.window.unwrap().id;
        store.record_upload(&sealed, "file-9").await.unwrap();
        store.mark_creating(&sealed).await.unwrap();
        let lone = accept(&store, new_request(CRED_A, "other", "{}", T0 + 5)).await;
        // No close: a dropped store is what a crash leaves behind.
        drop(store);

        let store = h.open().await;
        let creating = store.windows_in(&[WindowState::Creating]).await.unwrap();
        assert_eq!(creating.len(), 1);
        assert_eq!(creating[0].id, sealed);
        assert_eq!(creating[0].file_id.as_deref(), Some("file-9"));
        assert_eq!(creating[0].upstream_key.as_deref(), Some("sk-pass"));
        assert_eq!(lines(&store, &sealed).await.len(), 2);
        let open = store.open_windows().await.unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].id, lone.window.clone().unwrap().id);
        assert_eq!(
            store.get(&lone.record.id, CRED_A).await.unwrap().unwrap(),
            lone.record
        );
        // Intake resumes into the surviving open window.
        let next = accept(&store, new_request(CRED_A, "other", "{\"y\":1}", T0 + 6)).await;
        assert_eq!(next.window.unwrap().count, 2);
        store.close().await;
    }

    pub async fn concurrent_repeats_make_one_request(h: &Harness) {
        let store = h.open().await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = new_request(CRED_A, "m", "{\"same\":1}", T0 + i);
                if i % 2 == 0 {
                    r.idempotency_key = Some("one".into());
                } else {
                    r.sdk_retry = i > 1;
                }
                store.accept(r).await.unwrap()
            }));
        }
        let mut keyed = HashSet::new();
        let mut retried = HashSet::new();
        let mut created = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let a = t.await.unwrap();
            created += usize::from(a.created);
            if i % 2 == 0 {
                keyed.insert(a.record.id);
            } else if i > 1 {
                retried.insert(a.record.id);
            }
        }
        assert_eq!(keyed.len(), 1, "one request per idempotency key");
        let stored: HashSet<_> = store
            .list(CRED_A, None, 1000, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(stored.len(), created);
        assert!(retried.is_subset(&stored));
        // The keyed call, the plain call, and at most one retry that ran
        // before either was committed: 99 retries never make 99 requests.
        assert!(created <= 3, "{created} requests for three distinct calls");
    }

    pub async fn one_failing_accept_does_not_fail_its_group(h: &Harness) {
        let store = h.open().await;
        let clash = RequestId::generate();
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (store, clash) = (store.clone(), clash.clone());
            tasks.push(tokio::spawn(async move {
                let mut r = new_request(CRED_A, "m", &format!("{{\"i\":{i}}}"), T0 + i);
                // Two requests under one id: the store must refuse one.
                if i == 40 || i == 41 {
                    r.id = clash;
                }
                store.accept(r).await
            }));
        }
        let mut ok = HashSet::new();
        let mut failed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => assert!(ok.insert(a.record.id)),
                Err(StoreError::Database(_)) => failed += 1,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!((ok.len(), failed), (99, 1));
        let stored: HashSet<_> = store
            .list(CRED_A, None, 1000, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(stored, ok);
        let open = store.open_windows().await.unwrap();
        assert_eq!(open.iter().map(|w| w.count).sum::<u64>(), 99);
    }

    pub async fn concurrent_accepts_are_all_durable_and_distinct(h: &Harness) {
        let store = h.open().await;
        let mut tasks = Vec::new();
        for i in 0..1000 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = new_request(
                    CRED_A,
                    ["m1", "m2"][i % 2],
                    &format!("{{\"i\":{i}}}"),
                    T0 + i as i64,
                );
                r.limits = limits(300, 1_000_000);
                // Every tenth reuses one key with its own body: one wins,
                // the rest conflict without failing their group.
                if i % 10 == 0 {
                    r.idempotency_key = Some("shared".into());
                }
                (i, store.accept(r).await)
            }));
        }
        let mut ids = HashSet::new();
        let mut conflicts = 0;
        for t in tasks {
            match t.await.unwrap() {
                (_, Ok(a)) => {
                    assert!(a.created);
                    assert!(ids.insert(a.record.id));
                }
                (i, Err(StoreError::IdempotencyConflict)) => {
                    assert_eq!(i % 10, 0);
                    conflicts += 1;
                }
                (_, Err(e)) => panic!("accept failed: {e}"),
            }
        }
        assert_eq!((ids.len(), conflicts), (901, 99));
        drop(store);
        let store = h.open().await;
        let listed = store.list(CRED_A, None, 5_000, None).await.unwrap();
        let stored: HashSet<_> = listed.into_iter().map(|r| r.id).collect();
        assert_eq!(stored, ids);
        let windows = store
            .windows_in(&[WindowState::Open, WindowState::Sealed])
            .await
            .unwrap();
        assert!(windows.iter().all(|w| w.count <= 300));
        assert_eq!(windows.iter().map(|w| w.count).sum::<u64>(), 901);
        let mut streamed = HashSet::new();
        for w in &windows {
            for id in lines(&store, &w.id).await {
                assert!(streamed.insert(id), "a request is in two windows");
            }
        }
        assert_eq!(streamed, ids);
    }

    // ---- failure policies: resubmission, openness, pending counts ----

    pub async fn resubmit_moves_only_open_requests_under_the_limit_with_the_window_key(
        h: &Harness,
    ) {
        let store = h.open().await;
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut r = new_request(CRED_A, "m", &format!("{{\"r\":{i}}}"), T0);
            r.upstream_key = Some("sk-owner".into());
            ids.push(accept(&store, r).await.record.id);
        }
        let w = seal_and_submit(&store, &ids[0], "job-1").await;
        // The job finished one line before it failed.
        store
            .resolve(&w, vec![success(&ids[0], "{}")])
            .await
            .unwrap();
        let moved = store.resubmit(&w, 1, T0 + 40).await.unwrap();
        assert_eq!(moved, ids[1..].to_vec());
        assert!(store.open_request_ids(&w).await.unwrap().is_empty());
        let again = store.get(&ids[1], CRED_A).await.unwrap().unwrap();
        assert_eq!(again.status, RequestStatus::Queued);
        let w2 = again.window_id.unwrap();
        assert_ne!(w2, w);
        let next = store.window(&w2).await.unwrap().unwrap();
        assert_eq!(next.count, 2);
        assert_eq!(
            next.upstream_key.as_deref(),
            Some("sk-owner"),
            "the resubmission's job needs the owner's key"
        );
        // The second job fails too: both are at the limit and stay put.
        store
            .seal_window(&w2, FlushReason::MaxWait, T0 + 50)
            .await
            .unwrap();
        submit(&store, &w2, "job-2").await;
        assert!(store.resubmit(&w2, 1, T0 + 60).await.unwrap().is_empty());
        assert_eq!(
            store.open_request_ids(&w2).await.unwrap(),
            ids[1..].to_vec()
        );
        // A higher limit lets them go once more.
        assert_eq!(
            store.resubmit(&w2, 2, T0 + 70).await.unwrap(),
            ids[1..].to_vec()
        );
    }

    /// Pending counts as `credential/model/count`, sorted.
    async fn pending(store: &Store) -> Vec<String> {
        let mut counts: Vec<_> = store
            .pending_by_credential()
            .await
            .unwrap()
            .into_iter()
            .map(|p| format!("{}/{}/{}", p.key.credential_hash, p.key.model, p.count))
            .collect();
        counts.sort();
        counts
    }

    pub async fn pending_counts_and_openness_follow_the_requests(h: &Harness) {
        let store = h.open().await;
        assert!(store.pending_by_credential().await.unwrap().is_empty());
        let a1 = accept(&store, new_request(CRED_A, "m", "{\"a\":1}", T0)).await;
        accept(&store, new_request(CRED_A, "m2", "{\"a\":2}", T0)).await;
        accept(&store, new_request(CRED_B, "m", "{\"b\":1}", T0)).await;
        let counts = pending(&store).await;
        assert_eq!(
            counts,
            [
                format!("{CRED_A}/m/1"),
                format!("{CRED_A}/m2/1"),
                format!("{CRED_B}/m/1")
            ]
        );
        assert!(store.is_open(&a1.record.id).await.unwrap());
        let w = a1.window.unwrap().id;
        store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap();
        submit(&store, &w, "job-1").await;
        store
            .resolve(&w, vec![success(&a1.record.id, "{}")])
            .await
            .unwrap();
        assert!(!store.is_open(&a1.record.id).await.unwrap());
        store
            .finish_window(&w, WindowOutcome::Completed, T0 + 30)
            .await
            .unwrap();
        let counts = pending(&store).await;
        assert_eq!(counts, [format!("{CRED_A}/m2/1"), format!("{CRED_B}/m/1")]);
        assert!(!store.is_open(&RequestId::generate()).await.unwrap());
    }

    // ---- webhook outbox -----------------------------------------------------

    fn with_callback(body: &str, now: i64) -> NewRequest {
        let mut r = new_request(CRED_A, "m", body, now);
        r.mode = DeliveryMode::Callback;
        r.callback_url = Some(format!("https://hooks.example/{body}"));
        r
    }

    pub async fn every_final_state_of_a_callback_request_enqueues_one_delivery(h: &Harness) {
        let store = h.open().await;
        let ok = accept(&store, with_callback("ok", T0)).await;
        let expired = accept(&store, with_callback("expired", T0)).await;
        let missing = accept(&store, with_callback("missing", T0)).await;
        let cancelled = accept(&store, with_callback("cancelled", T0)).await;
        let plain = accept(&store, new_request(CRED_A, "m", "plain", T0)).await;
        assert_eq!(
            ok.record.callback_url.as_deref(),
            Some("https://hooks.example/ok")
        );
        assert_eq!(ok.record.mode, DeliveryMode::Callback);
        assert!(matches!(
            store
                .cancel(&cancelled.record.id, CRED_A, T0 + 1)
                .await
                .unwrap(),
            CancelOutcome::Cancelled(_)
        ));
        let w = ok.window.clone().unwrap().id;
        store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap();
        submit(&store, &w, "job").await;
        let mut late = success(&expired.record.id, "{}");
        late.status = ResolvedStatus::Expired;
        let changed = store
            .resolve(
                &w,
                vec![
                    success(&ok.record.id, "{}"),
                    success(&plain.record.id, "{}"),
                    late,
                ],
            )
            .await
            .unwrap();
        assert_eq!(changed.len(), 3);
        // A repeat of the same result changes nothing and enqueues nothing.
        store
            .resolve(&w, vec![success(&ok.record.id, "{}")])
            .await
            .unwrap();
        store
            .fail_unresolved(&w, "missing_result", "gone", T0 + 30)
            .await
            .unwrap();
        // No close: a dropped store is what a crash leaves behind.
        drop(store);

        let store = h.open().await;
        assert_eq!(store.outbox_pending().await.unwrap(), (4, Some(T0 + 1)));
        let mut claimed = store
            .claim_deliveries(T0 + 100, T0 + 200, 10)
            .await
            .unwrap();
        claimed.sort_by_key(|d| d.url.clone());
        let got: Vec<(&str, &str, u32)> = claimed
            .iter()
            .map(|d| (d.url.as_str(), d.event.as_str(), d.attempts))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "https://hooks.example/cancelled",
                    "carpool.request.cancelled",
                    1
                ),
                ("https://hooks.example/expired", "carpool.request.failed", 1),
                ("https://hooks.example/missing", "carpool.request.failed", 1),
                ("https://hooks.example/ok", "carpool.request.succeeded", 1),
            ]
        );
        assert!(claimed.iter().any(|d| d.request_id == missing.record.id));
        let ok_delivery = claimed
            .iter()
            .find(|d| d.request_id == ok.record.id)
            .unwrap();
        assert_eq!(ok_delivery.id, DeliveryId::for_request(&ok.record.id));
        assert_eq!(
            ok_delivery.created_at,
            T0 + 20,
            "created when the result was stored"
        );
        assert_eq!(
            store
                .request_by_id(&ok.record.id)
                .await
                .unwrap()
                .unwrap()
                .status,
            RequestStatus::Succeeded
        );
        store.close().await;
    }

    pub async fn deliveries_are_leased_retried_dead_lettered_and_replayed(h: &Harness) {
        let store = h.open().await;
        let a = accept(&store, with_callback("a", T0)).await;
        store
            .resolve_one(success(&a.record.id, "{}"))
            .await
            .unwrap();
        let id = DeliveryId::for_request(&a.record.id);
        assert!(
            store
                .claim_deliveries(T0, T0 + 50, 10)
                .await
                .unwrap()
                .is_empty(),
            "not due yet"
        );
        let first = store
            .claim_deliveries(T0 + 20, T0 + 1_000, 10)
            .await
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].attempts, 1);
        // Leased: nobody else takes it while the attempt runs.
        assert!(store
            .claim_deliveries(T0 + 500, T0 + 2_000, 10)
            .await
            .unwrap()
            .is_empty());
        // The lease ran out (the worker died): the next claim takes it again.
        let second = store
            .claim_deliveries(T0 + 1_000, T0 + 3_000, 10)
            .await
            .unwrap();
        assert_eq!(second[0].attempts, 2);
        // The first attempt reports late: ignored.
        assert!(!store
            .delivery_retry(&id, 1, T0 + 9_000, Some(500), "late")
            .await
            .unwrap());
        assert!(store
            .delivery_retry(&id, 2, T0 + 5_000, Some(503), "busy")
            .await
            .unwrap());
        assert!(store
            .claim_deliveries(T0 + 4_999, T0 + 9_000, 10)
            .await
            .unwrap()
            .is_empty());
        let third = store
            .claim_deliveries(T0 + 5_000, T0 + 9_000, 10)
            .await
            .unwrap();
        assert_eq!(third[0].attempts, 3);
        assert_eq!(third[0].last_status, Some(503));
        assert!(store
            .delivery_dead(&id, 3, Some(410), "gone", T0 + 6_000)
            .await
            .unwrap());
        assert_eq!(store.outbox_pending().await.unwrap(), (0, None));
        let dead = store.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].state, DeliveryState::Dead);
        assert_eq!(dead[0].last_error.as_deref(), Some("gone"));
        assert_eq!(dead[0].finished_at, Some(T0 + 6_000));

        assert!(!store
            .replay_dead_letter(&DeliveryId::generate(), T0)
            .await
            .unwrap());
        assert!(store.replay_dead_letter(&id, T0 + 7_000).await.unwrap());
        assert!(
            !store.replay_dead_letter(&id, T0 + 7_000).await.unwrap(),
            "pending again"
        );
        let replayed = store
            .claim_deliveries(T0 + 7_000, T0 + 8_000, 10)
            .await
            .unwrap();
        assert_eq!(replayed[0].attempts, 1, "a replay starts a fresh count");
        assert_eq!(replayed[0].id, id, "and keeps its webhook-id");
        assert!(store
            .delivery_succeeded(&id, 200, T0 + 7_500)
            .await
            .unwrap());
        assert!(!store
            .delivery_succeeded(&id, 200, T0 + 7_600)
            .await
            .unwrap());
        let done = store.delivery(&id).await.unwrap().unwrap();
        assert_eq!(done.state, DeliveryState::Delivered);
        assert!(store.dead_letters(10).await.unwrap().is_empty());
        assert_eq!(store.replay_dead_letters(T0 + 8_000).await.unwrap(), 0);
        store.close().await;
    }

    pub async fn replicas_never_claim_the_same_delivery(h: &Harness) {
        let store = h.open().await;
        for i in 0..40 {
            let r = accept(&store, with_callback(&format!("r{i}"), T0)).await;
            store
                .resolve_one(success(&r.record.id, "{}"))
                .await
                .unwrap();
        }
        let replicas: Vec<Store> = vec![store.clone(), h.open().await, h.open().await];
        let mut tasks = Vec::new();
        for s in replicas {
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for _ in 0..10 {
                    mine.extend(s.claim_deliveries(T0 + 100, T0 + 10_000, 3).await.unwrap());
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap().into_iter().map(|d| d.id));
        }
        let distinct: HashSet<_> = all.iter().cloned().collect();
        assert_eq!(all.len(), 40);
        assert_eq!(distinct.len(), 40);
        store.close().await;
    }

    pub async fn window_leases_keep_replicas_off_each_others_submissions(h: &Harness) {
        let store = h.open().await;
        let other = h.open().await;
        let r = accept(&store, new_request(CRED_A, "m", "{}", T0)).await;
        let w = store
            .get(&r.record.id, CRED_A)
            .await
            .unwrap()
            .unwrap()
            .window_id
            .unwrap();
        // An open window is not on its way to a job: nobody leases it.
        assert!(!store
            .claim_lease(&Lease::Window(w.clone()), "a", T0, T0 + 10_000)
            .await
            .unwrap());
        assert!(store
            .seal_window(&w, FlushReason::MaxWait, T0)
            .await
            .unwrap());
        assert!(store
            .claim_lease(&Lease::Window(w.clone()), "a", T0, T0 + 10_000)
            .await
            .unwrap());
        // Another replica cannot take it while the lease runs.
        assert!(!other
            .claim_lease(&Lease::Window(w.clone()), "b", T0 + 5_000, T0 + 15_000)
            .await
            .unwrap());
        // The holder renews it, in any state its work takes it to.
        assert!(store.record_upload(&w, "file-1").await.unwrap());
        assert!(store.mark_creating(&w).await.unwrap());
        assert!(store
            .claim_lease(&Lease::Window(w.clone()), "a", T0 + 5_000, T0 + 15_000)
            .await
            .unwrap());
        assert!(!other
            .claim_lease(&Lease::Window(w.clone()), "b", T0 + 14_000, T0 + 24_000)
            .await
            .unwrap());
        // Run out (the holder died): the other replica takes it up.
        assert!(other
            .claim_lease(&Lease::Window(w.clone()), "b", T0 + 15_000, T0 + 25_000)
            .await
            .unwrap());
        assert!(!store
            .claim_lease(&Lease::Window(w.clone()), "a", T0 + 16_000, T0 + 26_000)
            .await
            .unwrap());
        // Only the holder gives it up; then it is free at once.
        assert!(!store
            .release_lease(&Lease::Window(w.clone()), "a")
            .await
            .unwrap());
        assert!(other
            .release_lease(&Lease::Window(w.clone()), "b")
            .await
            .unwrap());
        assert!(store
            .claim_lease(&Lease::Window(w.clone()), "a", T0 + 16_000, T0 + 26_000)
            .await
            .unwrap());
        // A window with its job running is leased too (to poll it); a
        // finished one never again.
        assert!(store.record_job(&w, "job-1", T0 + 17_000).await.unwrap());
        assert!(store
            .release_lease(&Lease::Window(w.clone()), "a")
            .await
            .unwrap());
        assert!(other
            .claim_lease(&Lease::Window(w.clone()), "b", T0 + 30_000, T0 + 40_000)
            .await
            .unwrap());
        assert!(!store
            .claim_lease(&Lease::Window(w.clone()), "a", T0 + 31_000, T0 + 41_000)
            .await
            .unwrap());
        assert!(other
            .release_lease(&Lease::Window(w.clone()), "b")
            .await
            .unwrap());
        assert!(store
            .finish_window(&w, WindowOutcome::Completed, T0 + 32_000)
            .await
            .unwrap());
        assert!(!other
            .claim_lease(&Lease::Window(w.clone()), "b", T0 + 33_000, T0 + 43_000)
            .await
            .unwrap());
        store.close().await;
        other.close().await;
    }

    pub async fn request_leases_keep_replicas_off_each_others_realtime_calls(h: &Harness) {
        let store = h.open().await;
        let other = h.open().await;
        let id = accept(&store, new_request(CRED_A, "m", "{}", T0))
            .await
            .record
            .id;
        assert!(store
            .claim_lease(&Lease::Request(id.clone()), "a", T0, T0 + 10_000)
            .await
            .unwrap());
        assert!(!other
            .claim_lease(&Lease::Request(id.clone()), "b", T0 + 1, T0 + 10_001)
            .await
            .unwrap());
        // The holder renews it; run out, it is the other's.
        assert!(store
            .claim_lease(&Lease::Request(id.clone()), "a", T0 + 5_000, T0 + 15_000)
            .await
            .unwrap());
        assert!(!other
            .claim_lease(&Lease::Request(id.clone()), "b", T0 + 14_999, T0 + 24_999)
            .await
            .unwrap());
        assert!(other
            .claim_lease(&Lease::Request(id.clone()), "b", T0 + 15_000, T0 + 25_000)
            .await
            .unwrap());
        assert!(!store
            .claim_lease(&Lease::Request(id.clone()), "a", T0 + 15_001, T0 + 25_001)
            .await
            .unwrap());
        // Only the holder gives it up; then it is free at once.
        assert!(!store
            .release_lease(&Lease::Request(id.clone()), "a")
            .await
            .unwrap());
        assert!(other
            .release_lease(&Lease::Request(id.clone()), "b")
            .await
            .unwrap());
        assert!(store
            .claim_lease(&Lease::Request(id.clone()), "a", T0 + 16_000, T0 + 26_000)
            .await
            .unwrap());
        assert!(store
            .release_lease(&Lease::Request(id.clone()), "a")
            .await
            .unwrap());
        // A lease its holder died with goes with the janitor's purge.
        assert!(store
            .claim_lease(
                &Lease::Request(id.clone()),
                "dead",
                T0 + 30_000,
                T0 + 40_000
            )
            .await
            .unwrap());
        store.purge_finished(T0 + 39_999).await.unwrap();
        assert!(!other
            .claim_lease(&Lease::Request(id.clone()), "b", T0 + 30_001, T0 + 40_001)
            .await
            .unwrap());
        store.purge_finished(T0 + 40_001).await.unwrap();
        assert!(other
            .claim_lease(&Lease::Request(id.clone()), "b", T0 + 30_002, T0 + 40_002)
            .await
            .unwrap());
        store.close().await;
        other.close().await;
    }

    pub async fn a_process_on_its_way_out_gives_up_every_lease_it_holds(h: &Harness) {
        let store = h.open().await;
        let other = h.open().await;
        let mut windows = Vec::new();
        for model in ["m1", "m2"] {
            let r = accept(&store, new_request(CRED_A, model, "{}", T0)).await;
            windows.push(seal(&store, &r.record.id).await);
        }
        let id = accept(&store, new_request(CRED_A, "m3", "{}", T0))
            .await
            .record
            .id;
        let (mine, theirs) = (
            Lease::Window(windows[0].clone()),
            Lease::Window(windows[1].clone()),
        );
        let request = Lease::Request(id);
        for lease in [&mine, &request] {
            assert!(store
                .claim_lease(lease, "a", T0, T0 + 10_000)
                .await
                .unwrap());
        }
        assert!(other
            .claim_lease(&theirs, "b", T0, T0 + 10_000)
            .await
            .unwrap());
        assert_eq!(store.release_leases_of("a").await.unwrap(), 2);
        // Free at once, long before they would have run out; b's stays b's.
        for lease in [&mine, &request] {
            assert!(other
                .claim_lease(lease, "b", T0 + 1, T0 + 10_001)
                .await
                .unwrap());
        }
        assert!(!store
            .claim_lease(&theirs, "a", T0 + 1, T0 + 10_001)
            .await
            .unwrap());
        assert_eq!(store.release_leases_of("a").await.unwrap(), 0);
        store.close().await;
        other.close().await;
    }
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let h = super::Harness::sqlite();
                    super::cases::$case(&h).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(h) = super::Harness::postgres() else { return };
                    super::cases::$case(&h).await;
                }
            )*
        }
    };
}

contract!(
    splits_windows_at_max_requests,
    counts_requests_by_status_and_lists_open_window_limits,
    splits_windows_at_max_bytes,
    keeps_models_and_credentials_in_separate_windows,
    keeps_scopes_in_separate_windows_and_requeues_within_them,
    idempotent_repeat_returns_the_same_request,
    idempotency_key_with_another_body_conflicts,
    sdk_retry_reattaches_to_the_queued_request,
    sdk_retry_never_reattaches_to_a_cancelled_or_old_request,
    cancel_before_flush_keeps_the_request_out_of_the_window,
    cancelling_every_member_drops_the_open_window,
    a_submitted_request_cancels_and_its_late_result_is_discarded,
    another_credential_never_sees_a_request,
    list_is_newest_first_filtered_and_paged,
    submission_moves_queued_requests_and_the_upstream_key_lives_until_the_window_finishes,
    resolves_each_request_once_and_only_from_its_window,
    the_ledger_counts_each_request_once_and_sums_by_group,
    a_large_mixed_resolve_answers_each_open_member_once,
    fail_unresolved_fails_only_what_is_still_open,
    reports_earliest_deadline_and_due_requests,
    purge_removes_only_results_past_their_ttl,
    everything_survives_a_restart,
    concurrent_repeats_make_one_request,
    one_failing_accept_does_not_fail_its_group,
    concurrent_accepts_are_all_durable_and_distinct,
    resubmit_moves_only_open_requests_under_the_limit_with_the_window_key,
    pending_counts_and_openness_follow_the_requests,
    every_final_state_of_a_callback_request_enqueues_one_delivery,
    deliveries_are_leased_retried_dead_lettered_and_replayed,
    replicas_never_claim_the_same_delivery,
    window_leases_keep_replicas_off_each_others_submissions,
    request_leases_keep_replicas_off_each_others_realtime_calls,
    a_process_on_its_way_out_gives_up_every_lease_it_holds,
);

#[tokio::test]
async fn refuses_an_unknown_url_scheme() {
    let err = Store::connect("mysql://x").await.unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl { ref scheme } if scheme == "mysql"));
    let err = Store::connect("sqlite::memory:").await.unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl { .. }));
}
