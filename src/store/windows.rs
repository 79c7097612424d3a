//! The store's face to the flusher and the poller: open windows, a window's
//! lines, and each step of a window's life from sealed to finished.

use bytes::Bytes;
use futures_util::stream::BoxStream;

use super::ops::Op;
use super::{
    FlushReason, Store, StoreError, WindowOutcome, WindowRecord, WindowState, WindowSummary,
};
use crate::model::{RequestId, WindowId};

impl Store {
    pub async fn open_windows(&self) -> Result<Vec<WindowSummary>, StoreError> {
        dispatch!(self.open_windows())
    }

    pub async fn window(&self, id: &WindowId) -> Result<Option<WindowRecord>, StoreError> {
        dispatch!(self.window(id))
    }

    /// Windows in any of these states, oldest first.
    pub async fn windows_in(
        &self,
        states: &[WindowState],
    ) -> Result<Vec<WindowRecord>, StoreError> {
        dispatch!(self.windows_in(states))
    }

    /// open → sealed; false if it was not open.
    pub async fn seal_window(
        &self,
        id: &WindowId,
        reason: FlushReason,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Seal {
            id: id.clone(),
            reason,
            now,
        })
        .await?
        .applied()
    }

    /// The window's still open requests as `(custom_id, body)`, in a stable
    /// order, read page by page: memory does not grow with the window.
    pub fn window_lines(
        &self,
        id: &WindowId,
    ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
        match self {
            Store::Sqlite(s) => s.window_lines(id.clone()),
            Store::Postgres(s) => s.window_lines(id.clone()),
        }
    }

    /// sealed → uploaded.
    pub async fn record_upload(&self, id: &WindowId, file_id: &str) -> Result<bool, StoreError> {
        self.write(Op::RecordUpload {
            id: id.clone(),
            file_id: file_id.to_owned(),
        })
        .await?
        .applied()
    }

    /// uploaded → creating: stored before the provider create call, so
    /// recovery knows to look for the job by the window id in its metadata.
    pub async fn mark_creating(&self, id: &WindowId) -> Result<bool, StoreError> {
        self.write(Op::MarkCreating { id: id.clone() })
            .await?
            .applied()
    }

    /// creating → submitted; its queued requests become submitted with this
    /// batch id; the upstream key is forgotten.
    pub async fn record_job(
        &self,
        id: &WindowId,
        job_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::RecordJob {
            id: id.clone(),
            job_id: job_id.to_owned(),
            now,
        })
        .await?
        .applied()
    }

    /// creating or submitted → sealed: the provider refused the window's
    /// job for its enqueued-token quota, so no job runs; the file and job
    /// ids are forgotten and its submitted requests are queued again, to
    /// be submitted once quota allows. Not a resubmission.
    pub async fn return_to_sealed(&self, id: &WindowId) -> Result<bool, StoreError> {
        self.write(Op::ReturnToSealed { id: id.clone() })
            .await?
            .applied()
    }

    /// The provider's last reported status of a submitted window's job.
    pub async fn record_job_status(
        &self,
        id: &WindowId,
        provider_status: &str,
    ) -> Result<bool, StoreError> {
        self.write(Op::RecordJobStatus {
            id: id.clone(),
            status: provider_status.to_owned(),
        })
        .await?
        .applied()
    }

    /// → completed (from submitted, or sealed when empty) or → failed.
    pub async fn finish_window(
        &self,
        id: &WindowId,
        outcome: WindowOutcome,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Finish {
            id: id.clone(),
            outcome,
            now,
        })
        .await?
        .applied()
    }
}
