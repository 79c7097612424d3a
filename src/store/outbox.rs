//! The webhook outbox: one delivery per request with a callback, enqueued in
//! the same transaction that puts the request in a final state (a result
//! stored without its delivery could be lost by a crash in between), then
//! claimed, retried and finished by the webhook worker.
//!
//! A delivery is `pending` until it is `delivered` or `dead` (a dead letter:
//! attempts exhausted, the receiver answered 410, or its target was refused);
//! an operator's replay makes a dead letter pending again with a fresh
//! attempt count. `next_attempt_at` is both the schedule and the lease: a
//! claim bumps it past the attempt's timeout in the same UPDATE, so a crashed
//! worker's attempt becomes due again and replicas never share one.
//!
//! The SQL is written once in `outbox_ops!` and compiled per backend in
//! `ops.rs`, beside the reads and writes.

use super::ops::Op;
use super::{Store, StoreError};
use crate::model::{DeliveryId, RequestId, RequestStatus};

/// Where a delivery is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Dead]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

/// A delivery row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub id: DeliveryId,
    pub request_id: RequestId,
    pub url: String,
    /// The webhook `type`, e.g. `carpool.request.succeeded`.
    pub event: String,
    pub state: DeliveryState,
    /// Attempts claimed so far (including one in flight).
    pub attempts: u32,
    /// Unix ms: when the next attempt is due (or the current one's lease ends).
    pub next_attempt_at: i64,
    /// Unix ms: when the request reached its final state.
    pub created_at: i64,
    /// Unix ms: delivered or dead-lettered.
    pub finished_at: Option<i64>,
    /// The receiver's last HTTP status, if it answered.
    pub last_status: Option<u16>,
    /// Why the last attempt failed, or why the delivery is dead.
    pub last_error: Option<String>,
}

/// The webhook `type` for a request's final state. SPEC names three types;
/// an expired request is reported as failed (its `data.status` says
/// `expired`). `None` for a state that is not final.
pub fn event_type(status: RequestStatus) -> Option<&'static str> {
    match status {
        RequestStatus::Succeeded => Some("carpool.request.succeeded"),
        RequestStatus::Failed | RequestStatus::Expired => Some("carpool.request.failed"),
        RequestStatus::Cancelled => Some("carpool.request.cancelled"),
        RequestStatus::Queued | RequestStatus::Submitted => None,
    }
}

/// Writes of the outbox.
#[derive(Debug)]
pub(crate) enum OutboxOp {
    /// Claims up to `limit` due pending deliveries: attempts + 1 and the
    /// lease `next_attempt_at = lease_until`, in one UPDATE.
    Claim {
        now: i64,
        lease_until: i64,
        limit: u32,
    },
    /// A 2xx answer: pending → delivered.
    Delivered {
        id: DeliveryId,
        status: u16,
        now: i64,
    },
    /// A failed attempt to retry at `next_at`; only if `attempt` is still
    /// the delivery's latest claim.
    Retry {
        id: DeliveryId,
        attempt: u32,
        next_at: i64,
        status: Option<u16>,
        error: String,
    },
    /// pending → dead, with the reason; only if `attempt` is still the latest.
    Dead {
        id: DeliveryId,
        attempt: u32,
        status: Option<u16>,
        reason: String,
        now: i64,
    },
    /// Gives back a claim that was never attempted (its host was at its
    /// cap): the attempt count goes back down and it is due at `next_at`;
    /// only if `attempt` is still the delivery's latest claim.
    Release {
        id: DeliveryId,
        attempt: u32,
        next_at: i64,
    },
    /// dead → pending, attempts reset, due at once.
    Replay { id: DeliveryId, now: i64 },
    /// Every dead letter → pending.
    ReplayAll { now: i64 },
}

/// The outbox SQL of one backend; expands beside `read_ops!` (it uses its
/// `q`, `Conn` and `record`).
macro_rules! outbox_ops {
    ($db:ty) => {
        use super::super::outbox::{event_type, DeliveryRecord, DeliveryState, OutboxOp};
        use crate::model::DeliveryId;

        macro_rules! delivery_cols {
            () => {
                "id, request_id, url, event, state, attempts, next_attempt_at, created_at, \
                 finished_at, last_status, last_error"
            };
        }

        fn delivery(row: &DbRow) -> Result<DeliveryRecord, StoreError> {
            let last_status = row
                .try_get::<Option<i64>, _>("last_status")?
                .map(|v| u16::try_from(v).map_err(|_| StoreError::Corrupt {
                    column: "last_status",
                    value: v.to_string(),
                }))
                .transpose()?;
            Ok(DeliveryRecord {
                id: DeliveryId::from_stored(row.try_get("id")?),
                request_id: RequestId::from_stored(row.try_get("request_id")?),
                url: row.try_get("url")?,
                event: row.try_get("event")?,
                state: parsed("state", row.try_get("state")?, DeliveryState::parse)?,
                attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                next_attempt_at: row.try_get("next_attempt_at")?,
                created_at: row.try_get("created_at")?,
                finished_at: row.try_get("finished_at")?,
                last_status,
                last_error: row.try_get("last_error")?,
            })
        }

        /// Enqueues the delivery of a request that just reached `status`, in
        /// the caller's transaction. A second enqueue of the same request
        /// finds its row and does nothing.
        pub(crate) async fn enqueue_delivery(
            conn: &mut Conn,
            request: &RequestId,
            url: &str,
            status: RequestStatus,
            now: i64,
        ) -> Result<(), StoreError> {
            let Some(event) = event_type(status) else {
                return Ok(());
            };
            q("INSERT INTO webhook_deliveries (id, request_id, url, event, state, attempts, \
               next_attempt_at, created_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5) \
               ON CONFLICT (id) DO NOTHING")
                .bind(DeliveryId::for_request(request).as_str())
                .bind(request.as_str())
                .bind(url)
                .bind(event)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        pub(crate) async fn apply_outbox(conn: &mut Conn, op: &OutboxOp) -> Result<Reply, StoreError> {
            Ok(match op {
                OutboxOp::Claim { now, lease_until, limit } => {
                    let rows = q(concat!(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = $2 \
                         WHERE state = 'pending' AND next_attempt_at <= $1 AND id IN (\
                         SELECT id FROM webhook_deliveries WHERE state = 'pending' \
                         AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $3) \
                         RETURNING ", delivery_cols!()
                    ))
                    .bind(*now)
                    .bind(*lease_until)
                    .bind(i64::from(*limit))
                    .fetch_all(&mut *conn)
                    .await?;
                    Reply::Deliveries(rows.iter().map(delivery).collect::<Result<_, _>>()?)
                }
                OutboxOp::Delivered { id, status, now } => Reply::Applied(
                    q("UPDATE webhook_deliveries SET state = 'delivered', finished_at = $3, \
                       last_status = $2, last_error = NULL WHERE id = $1 AND state = 'pending'")
                        .bind(id.as_str())
                        .bind(i64::from(*status))
                        .bind(*now)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                OutboxOp::Retry { id, attempt, next_at, status, error } => Reply::Applied(
                    q("UPDATE webhook_deliveries SET next_attempt_at = $3, last_status = $4, \
                       last_error = $5 WHERE id = $1 AND state = 'pending' AND attempts = $2")
                        .bind(id.as_str())
                        .bind(i64::from(*attempt))
                        .bind(*next_at)
                        .bind(status.map(i64::from))
                        .bind(error)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                OutboxOp::Dead { id, attempt, status, reason, now } => Reply::Applied(
                    q("UPDATE webhook_deliveries SET state = 'dead', finished_at = $5, \
                       last_status = $3, last_error = $4 \
                       WHERE id = $1 AND state = 'pending' AND attempts = $2")
                        .bind(id.as_str())
                        .bind(i64::from(*attempt))
                        .bind(status.map(i64::from))
                        .bind(reason)
                        .bind(*now)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                OutboxOp::Release { id, attempt, next_at } => Reply::Applied(
                    q("UPDATE webhook_deliveries SET attempts = attempts - 1, next_attempt_at = $3 \
                       WHERE id = $1 AND state = 'pending' AND attempts = $2 AND attempts > 0")
                        .bind(id.as_str())
                        .bind(i64::from(*attempt))
                        .bind(*next_at)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                OutboxOp::Replay { id, now } => Reply::Applied(
                    q("UPDATE webhook_deliveries SET state = 'pending', attempts = 0, \
                       next_attempt_at = $2, finished_at = NULL WHERE id = $1 AND state = 'dead'")
                        .bind(id.as_str())
                        .bind(*now)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                OutboxOp::ReplayAll { now } => Reply::Count(
                    q("UPDATE webhook_deliveries SET state = 'pending', attempts = 0, \
                       next_attempt_at = $1, finished_at = NULL WHERE state = 'dead'")
                        .bind(*now)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected(),
                ),
            })
        }

        /// Dead letters, most recently dead first.
        pub(crate) async fn dead_letters(conn: &mut Conn, limit: u32) -> Result<Vec<DeliveryRecord>, StoreError> {
            q(concat!(
                "SELECT ", delivery_cols!(), " FROM webhook_deliveries WHERE state = 'dead' \
                 ORDER BY finished_at DESC, id LIMIT $1"
            ))
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(delivery)
            .collect()
        }

        pub(crate) async fn delivery_by_id(conn: &mut Conn, id: &DeliveryId) -> Result<Option<DeliveryRecord>, StoreError> {
            q(concat!("SELECT ", delivery_cols!(), " FROM webhook_deliveries WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| delivery(&row))
                .transpose()
        }

        /// Pending deliveries (the outbox's size) and the earliest due time.
        pub(crate) async fn outbox_pending(conn: &mut Conn) -> Result<(u64, Option<i64>), StoreError> {
            let row = q("SELECT CAST(COUNT(*) AS BIGINT) AS n, MIN(next_attempt_at) AS due \
                         FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(&mut *conn)
                .await?;
            Ok((uint(row.try_get("n")?), row.try_get("due")?))
        }

        /// A request by id alone (the worker renders its webhook body).
        pub(crate) async fn request_by_id(conn: &mut Conn, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
            q(concat!("SELECT ", req_cols!(), " FROM requests WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| record(&row))
                .transpose()
        }
    };
}

pub(crate) use outbox_ops;

// ---- the store's face to the webhook worker --------------------------------
// A delivery is enqueued by `resolve`, `resolve_one`, `fail_unresolved`
// and `cancel` themselves, in their transaction, for a request with a
// callback URL.

impl Store {
    // and `cancel` themselves, in their transaction, for a request with a

    /// Claims up to `limit` due deliveries for one attempt each: their
    /// attempt count goes up by one and they are leased until `lease_until`
    /// (due again then if the attempt never reports).
    pub async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.write(Op::Outbox(OutboxOp::Claim {
            now,
            lease_until,
            limit,
        }))
        .await?
        .deliveries()
    }

    /// pending → delivered.
    pub async fn delivery_succeeded(
        &self,
        id: &DeliveryId,
        status: u16,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Delivered {
            id: id.clone(),
            status,
            now,
        }))
        .await?
        .applied()
    }

    /// Schedules the next attempt after a failed `attempt` (ignored if the
    /// delivery was claimed again since).
    pub async fn delivery_retry(
        &self,
        id: &DeliveryId,
        attempt: u32,
        next_at: i64,
        status: Option<u16>,
        error: &str,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Retry {
            id: id.clone(),
            attempt,
            next_at,
            status,
            error: error.to_owned(),
        }))
        .await?
        .applied()
    }

    /// Gives back the claim of `attempt` without making it (its target host
    /// had enough attempts in flight): not counted, due again at `next_at`.
    pub async fn delivery_release(
        &self,
        id: &DeliveryId,
        attempt: u32,
        next_at: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Release {
            id: id.clone(),
            attempt,
            next_at,
        }))
        .await?
        .applied()
    }

    /// pending → dead (a dead letter), with the reason.
    pub async fn delivery_dead(
        &self,
        id: &DeliveryId,
        attempt: u32,
        status: Option<u16>,
        reason: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Dead {
            id: id.clone(),
            attempt,
            status,
            reason: reason.to_owned(),
            now,
        }))
        .await?
        .applied()
    }

    /// dead → pending with a fresh attempt count, due at `now`; false if it
    /// is not a dead letter.
    pub async fn replay_dead_letter(&self, id: &DeliveryId, now: i64) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Replay {
            id: id.clone(),
            now,
        }))
        .await?
        .applied()
    }

    /// Every dead letter → pending; returns how many.
    pub async fn replay_dead_letters(&self, now: i64) -> Result<u64, StoreError> {
        self.write(Op::Outbox(OutboxOp::ReplayAll { now }))
            .await?
            .count()
    }

    /// Dead letters, most recently dead first.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeliveryRecord>, StoreError> {
        dispatch!(self.dead_letters(limit))
    }

    pub async fn delivery(&self, id: &DeliveryId) -> Result<Option<DeliveryRecord>, StoreError> {
        dispatch!(self.delivery(id))
    }

    /// The number of pending deliveries and the earliest `next_attempt_at`.
    pub async fn outbox_pending(&self) -> Result<(u64, Option<i64>), StoreError> {
        dispatch!(self.outbox_pending())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_final_state_has_one_of_the_three_spec_types() {
        for s in RequestStatus::ALL {
            match event_type(s) {
                Some(t) => {
                    assert!(s.is_final());
                    assert!([
                        "carpool.request.succeeded",
                        "carpool.request.failed",
                        "carpool.request.cancelled"
                    ]
                    .contains(&t));
                }
                None => assert!(!s.is_final()),
            }
        }
        assert_eq!(
            event_type(RequestStatus::Expired),
            Some("carpool.request.failed")
        );
    }

    #[test]
    fn delivery_states_round_trip() {
        for s in [
            DeliveryState::Pending,
            DeliveryState::Delivered,
            DeliveryState::Dead,
        ] {
            assert_eq!(DeliveryState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn a_request_has_one_stable_delivery_id() {
        let r = RequestId::generate();
        let d = DeliveryId::for_request(&r);
        assert_eq!(d, DeliveryId::for_request(&r));
        assert_eq!(DeliveryId::parse(d.as_str()), Some(d.clone()));
        assert!(!d.as_str().contains('.'));
    }
}
