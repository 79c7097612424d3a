//! The store's face to intake and the request handle: accepting a deferred
//! request, reading requests back (by the caller's credential, or
//! internally by id) and cancelling one.

use bytes::Bytes;

use super::ops::Op;
use super::{
    Accepted, CancelOutcome, DueCursor, DueRequest, NewRequest, Pending, QueuedDeadline,
    RequestRecord, Store, StoreError,
};
use crate::model::{RequestId, RequestStatus, WindowId};

impl Store {
    /// Commits a deferred request into the open window of its key (one
    /// transaction), or re-attaches an idempotent repeat / SDK retry.
    pub async fn accept(&self, req: NewRequest) -> Result<Accepted, StoreError> {
        self.write(Op::Accept(Box::new(req))).await?.accepted()
    }

    /// The request, if it exists and belongs to this credential.
    pub async fn get(
        &self,
        id: &RequestId,
        credential_hash: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        dispatch!(self.get(id, credential_hash))
    }

    /// The credential's requests, newest first, strictly older than `after`.
    pub async fn list(
        &self,
        credential_hash: &str,
        status: Option<RequestStatus>,
        limit: u32,
        after: Option<&RequestId>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        dispatch!(self.list(credential_hash, status, limit, after))
    }

    /// The caller's original body (for a realtime fallback). Internal: no
    /// credential check.
    pub async fn request_body(&self, id: &RequestId) -> Result<Option<Bytes>, StoreError> {
        dispatch!(self.request_body(id))
    }

    /// The caller's end-to-end headers stored with the request (for a
    /// realtime fallback); empty for none. Internal: no credential check.
    pub async fn request_headers(
        &self,
        id: &RequestId,
    ) -> Result<Vec<(String, String)>, StoreError> {
        dispatch!(self.request_headers(id))
    }

    /// Open (queued or submitted) requests whose deadline is at or before
    /// `before`, earliest first (by deadline, then id), from just past
    /// `after`: a page at a time, so requests a pass leaves alone never
    /// hide the ones behind them.
    pub async fn due_requests(
        &self,
        before: i64,
        after: Option<&DueCursor>,
        limit: u32,
    ) -> Result<Vec<DueRequest>, StoreError> {
        dispatch!(self.due_requests(before, after, limit))
    }

    /// The queued members of a window that have a deadline, earliest first.
    pub async fn queued_deadlines(
        &self,
        window: &WindowId,
    ) -> Result<Vec<QueuedDeadline>, StoreError> {
        dispatch!(self.queued_deadlines(window))
    }

    /// Ids of the still open requests of a window.
    pub async fn open_request_ids(&self, window: &WindowId) -> Result<Vec<RequestId>, StoreError> {
        dispatch!(self.open_request_ids(window))
    }

    /// Cancels a queued or submitted request of this credential. A queued one
    /// leaves its window's count and bytes and is never submitted.
    pub async fn cancel(
        &self,
        id: &RequestId,
        credential_hash: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        self.write(Op::Cancel {
            id: id.clone(),
            credential_hash: credential_hash.to_owned(),
            now,
        })
        .await?
        .cancel()
    }

    /// Stored requests per status (statuses with none are absent).
    pub async fn request_counts(&self) -> Result<Vec<(RequestStatus, u64)>, StoreError> {
        dispatch!(self.request_counts())
    }

    /// Whether the request is still open (queued or submitted). Internal: no
    /// credential check.
    pub async fn is_open(&self, id: &RequestId) -> Result<bool, StoreError> {
        dispatch!(self.is_open(id))
    }

    /// Requests counted in unfinished windows, per credential hash and
    /// window key (an estimate that can only run high: members answered
    /// early, e.g. by a realtime fallback, count until their window finishes).
    pub async fn pending_by_credential(&self) -> Result<Vec<Pending>, StoreError> {
        dispatch!(self.pending_by_credential())
    }

    /// A request by id alone. Internal: no credential check.
    pub async fn request_by_id(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        dispatch!(self.request_by_id(id))
    }
}
