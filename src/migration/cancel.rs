//! How a cancel travels: the sender that is cancelled tells the receiver
//! with an `Abort` whose reason starts with [`BY_SENDER`], so the receiver
//! reports `cancelled` rather than `failed` with no new message kind on
//! the wire.

use crate::migration::phases::SourcePhase;
use crate::util::cancel::Why;

/// The start of an `Abort` reason that means "cancelled", not "failed".
pub const BY_SENDER: &str = "cancelled by the sender";

/// The `Abort` reason a sender cancelled by `why` in `phase` sends.
pub fn abort_reason(why: Why, phase: SourcePhase) -> String {
    format!("{BY_SENDER} ({why} during {})", describe(phase))
}

/// Whether an `Abort` reason is a sender's cancel.
pub fn is_cancel(reason: &str) -> bool {
    reason.starts_with(BY_SENDER)
}

/// A phase as the cancel messages name it.
pub fn describe(phase: SourcePhase) -> String {
    match phase {
        SourcePhase::Setup => "setup".into(),
        SourcePhase::Precopy { round } => format!("pre-copy round {round}"),
        SourcePhase::Switchover { .. } => "the switch-over".into(),
        SourcePhase::Postcopy { .. } => "post-copy".into(),
        SourcePhase::Verify => "verification, the destination running the guest".into(),
        SourcePhase::Done | SourcePhase::Failed | SourcePhase::Cancelled => "the end".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_reason_is_told_apart_from_a_failure() {
        let r = abort_reason(Why::Signal(libc::SIGINT), SourcePhase::Precopy { round: 2 });
        assert_eq!(
            r,
            "cancelled by the sender (SIGINT during pre-copy round 2)"
        );
        assert!(is_cancel(&r));
        assert!(!is_cancel("receiver out of memory"));
    }
}
