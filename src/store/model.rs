//! The states the store moves requests and windows through, and the one
//! table of allowed transitions each. The SQL of every transition takes its
//! "allowed from" list from here, so the table and the database cannot drift.

use crate::model::RequestStatus;

/// Where a window is in its life: filled while `Open`, then sealed, uploaded,
/// marked as being created (recorded before the provider create call),
/// submitted, and finally completed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WindowState {
    Open,
    Sealed,
    Uploaded,
    Creating,
    Submitted,
    Completed,
    Failed,
}

impl WindowState {
    pub const ALL: [WindowState; 7] = [
        Self::Open,
        Self::Sealed,
        Self::Uploaded,
        Self::Creating,
        Self::Submitted,
        Self::Completed,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Sealed => "sealed",
            Self::Uploaded => "uploaded",
            Self::Creating => "creating",
            Self::Submitted => "submitted",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The states a window may enter `self` from. `Open` is entered only by
    /// creation.
    pub fn allowed_from(self) -> &'static [WindowState] {
        use WindowState::*;
        match self {
            Open => &[],
            Sealed => &[Open],
            Uploaded => &[Sealed],
            Creating => &[Uploaded],
            Submitted => &[Creating],
            // An empty sealed window (every member cancelled) completes
            // without a job.
            Completed => &[Sealed, Submitted],
            Failed => &[Sealed, Uploaded, Creating, Submitted],
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// The states a window goes back to `Sealed` from when the provider
    /// refused its job for its own enqueued-token quota: no job runs, so the
    /// window waits for quota and is submitted again (`deferral::quota`).
    pub const RETURNED_FROM: [WindowState; 2] = [Self::Creating, Self::Submitted];
}

/// Why a window was sealed (SPEC section 3); recorded on the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlushReason {
    MaxRequests,
    MaxBytes,
    MaxWait,
    Deadline,
    Operator,
    Shutdown,
    /// Requests put back after their batch was refused for other lines.
    Resubmit,
}

impl FlushReason {
    pub const ALL: [FlushReason; 7] = [
        Self::MaxRequests,
        Self::MaxBytes,
        Self::MaxWait,
        Self::Deadline,
        Self::Operator,
        Self::Shutdown,
        Self::Resubmit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::MaxBytes => "max_bytes",
            Self::MaxWait => "max_wait",
            Self::Deadline => "deadline",
            Self::Operator => "operator",
            Self::Shutdown => "shutdown",
            Self::Resubmit => "resubmit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// How the caller of a deferred request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    Wait,
    Async,
    Callback,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::Async => "async",
            Self::Callback => "callback",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Wait, Self::Async, Self::Callback]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// The final states a result can put a request in (cancelling is its own
/// transition, so it cannot be smuggled in through a result).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResolvedStatus {
    Succeeded,
    Failed,
    Expired,
}

impl ResolvedStatus {
    pub fn status(self) -> RequestStatus {
        match self {
            Self::Succeeded => RequestStatus::Succeeded,
            Self::Failed => RequestStatus::Failed,
            Self::Expired => RequestStatus::Expired,
        }
    }
}

/// How a submitted window ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WindowOutcome {
    Completed,
    Failed,
}

impl WindowOutcome {
    pub fn state(self) -> WindowState {
        match self {
            Self::Completed => WindowState::Completed,
            Self::Failed => WindowState::Failed,
        }
    }
}

/// The states a request may enter `to` from. `Queued` is entered by
/// creation and by requeueing an open request for resubmission.
pub fn request_allowed_from(to: RequestStatus) -> &'static [RequestStatus] {
    use RequestStatus::*;
    match to {
        Queued => &[Queued, Submitted],
        Submitted => &[Queued],
        Succeeded | Failed | Expired | Cancelled => &[Queued, Submitted],
    }
}

/// `'a','b'` for an SQL `IN (...)` list; the values are our own constants.
pub(crate) fn sql_list<I: IntoIterator<Item = &'static str>>(items: I) -> String {
    items
        .into_iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn request_from_sql(to: RequestStatus) -> String {
    sql_list(request_allowed_from(to).iter().map(|s| s.as_str()))
}

/// [`WindowState::RETURNED_FROM`] as an SQL list.
pub(crate) fn returned_from_sql() -> String {
    sql_list(WindowState::RETURNED_FROM.iter().map(|s| s.as_str()))
}

pub(crate) fn window_from_sql(to: WindowState) -> String {
    sql_list(to.allowed_from().iter().map(|s| s.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_request_states_are_never_left() {
        for to in RequestStatus::ALL {
            for from in request_allowed_from(to) {
                assert!(!from.is_final(), "{from:?} -> {to:?} leaves a final state");
            }
        }
    }

    #[test]
    fn final_window_states_are_never_left() {
        for to in WindowState::ALL {
            for from in to.allowed_from() {
                assert!(!from.is_final(), "{from:?} -> {to:?} leaves a final state");
            }
        }
    }

    #[test]
    fn every_window_state_is_reachable_from_open() {
        let mut reached = vec![WindowState::Open];
        let mut grew = true;
        while grew {
            grew = false;
            for to in WindowState::ALL {
                if !reached.contains(&to) && to.allowed_from().iter().any(|f| reached.contains(f)) {
                    reached.push(to);
                    grew = true;
                }
            }
        }
        assert_eq!(reached.len(), WindowState::ALL.len());
    }

    #[test]
    fn names_round_trip() {
        for s in WindowState::ALL {
            assert_eq!(WindowState::parse(s.as_str()), Some(s));
        }
        for r in FlushReason::ALL {
            assert_eq!(FlushReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(
            DeliveryMode::parse("callback"),
            Some(DeliveryMode::Callback)
        );
        assert_eq!(DeliveryMode::parse("now"), None);
    }

    #[test]
    fn sql_lists_quote_each_state() {
        assert_eq!(request_from_sql(RequestStatus::Submitted), "'queued'");
        assert_eq!(window_from_sql(WindowState::Sealed), "'open'");
    }
}
