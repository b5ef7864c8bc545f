//! The engine's decisions that need no I/O, as plain functions: where a target stands after a
//! failure, what follows a failed call, how a provider chain ended, and the final outcome.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::engine::{TargetEnd, Verdict};
use crate::domain::{
    Acknowledgement, Channel, DeliveryStatus, FailureReason, Job, Report, RetryClass, Target,
    TargetStatus, headline_reason, summarize,
};
use crate::providers::{ProviderError, Recipient};
use crate::store::Outcome;

/// A target's standing during one dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// Not tried yet.
    Open,
    /// Failed for provider reasons on a channel: may be tried on the next channel.
    Tried,
    /// Accepted by a provider.
    Reached,
    /// Settled: not tried again.
    Closed,
}

/// The first earlier target of `job` with the same recipient as target `index` (the same
/// number, or the same platform and token).
pub(super) fn earlier_twin(job: &Job, index: usize) -> Option<usize> {
    let same = |a: &Target, b: &Target| match (a, b) {
        (Target::Phone(a), Target::Phone(b)) => a.number == b.number,
        (Target::Device(a), Target::Device(b)) => a.platform == b.platform && a.token == b.token,
        _ => false,
    };
    job.targets[..index]
        .iter()
        .position(|earlier| same(earlier, &job.targets[index]))
}

/// Where a number stands after `reason` failed it on one channel: closed for the job, or open
/// to the next channel (a landline can take a call).
pub(super) fn standing_after(reason: FailureReason) -> Standing {
    if reason.closes_number_for_every_channel() {
        Standing::Closed
    } else {
        Standing::Tried
    }
}

pub(super) fn channel_of(target: &Target) -> Channel {
    match target {
        Target::Device(_) => Channel::Push,
        Target::Phone(_) => Channel::Sms,
    }
}

/// How often `provider` was already tried on `channel` for target `index` (by a worker that
/// was interrupted): the retry number of the next attempt.
pub(super) fn earlier_tries(prior: &Report, index: usize, provider: &str, channel: Channel) -> u32 {
    prior.targets.get(index).map_or(0, |target| {
        target
            .attempts
            .iter()
            .filter(|a| a.provider == provider && a.channel == channel)
            .count() as u32
    })
}

/// The final status, headline reason and summary from the targets' results.
pub(super) fn decide(report: &Report, verdict: Verdict) -> Outcome {
    // A "Don't Allow" is a security signal: it decides the outcome even when it came in while
    // the engine was already escalating.
    let denied = report
        .targets
        .iter()
        .any(|t| t.acknowledgement == Some(Acknowledgement::Denied));
    let verdict = if denied {
        Verdict::Failed(Some(FailureReason::UserDenied))
    } else {
        verdict
    };
    let (status, reason) = match verdict {
        Verdict::Reached => (DeliveryStatus::Sent, None),
        Verdict::Failed(Some(reason)) => (DeliveryStatus::Failed, Some(reason)),
        Verdict::Failed(None) => {
            let reason =
                headline_reason(&report.targets).unwrap_or(FailureReason::NoEligibleTarget);
            (DeliveryStatus::Failed, Some(reason))
        }
        Verdict::Deferred(_) => (DeliveryStatus::Deferred, Some(FailureReason::QuietHours)),
    };
    let status = if status == DeliveryStatus::Sent
        && report
            .targets
            .iter()
            .any(|t| t.status == TargetStatus::Delivered)
    {
        DeliveryStatus::Delivered
    } else {
        status
    };
    let summary = summarize(status, reason, report.expires_at, &report.targets);
    Outcome {
        status,
        reason,
        summary,
    }
}

/// What follows a failed provider call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterFailure {
    /// The recipient cannot be reached this way: the target's chain ends here.
    EndTarget,
    /// Call the same provider again after `delay` (due at `at`, before the deadline).
    Retry { delay: Duration, at: Timestamp },
    /// Give way to the next provider of the route; `past_deadline` when a retry was due but
    /// would come after the deadline (the chain then ends as expired unless another provider
    /// takes the message).
    NextProvider { past_deadline: bool },
}

/// What follows a call that failed with `class` at `now`: `delay` is the back-off before a
/// retry when the provider's policy allows one more (transient failures only).
pub(super) fn after_failure(
    class: RetryClass,
    delay: Option<Duration>,
    now: Timestamp,
    deadline: Timestamp,
) -> AfterFailure {
    match (class, delay) {
        (RetryClass::PermanentForTarget, _) => AfterFailure::EndTarget,
        (RetryClass::Transient, Some(delay)) => {
            let at = now + SignedDuration::try_from(delay).unwrap_or(SignedDuration::MAX);
            if at < deadline {
                AfterFailure::Retry { delay, at }
            } else {
                AfterFailure::NextProvider {
                    past_deadline: true,
                }
            }
        }
        _ => AfterFailure::NextProvider {
            past_deadline: false,
        },
    }
}

/// What one target's run through its route's providers saw, when none took the message.
#[derive(Debug, Default)]
pub(super) struct ChainSeen {
    /// The provider that failed last, and how.
    pub(super) last_error: Option<(String, ProviderError)>,
    /// Providers not tried because a circuit was open.
    pub(super) skipped_open: Vec<String>,
    /// Providers not tried because every call slot stayed busy.
    pub(super) skipped_busy: Vec<String>,
    /// Whether the deadline stopped the chain.
    pub(super) stopped_by_deadline: bool,
}

/// How a target's chain ended without a provider taking the message: expired (the deadline
/// stopped it), the last provider's failure, every circuit open, every call slot busy, or no
/// provider routed for the recipient. The last failure says most, so it heads the detail.
pub(super) fn chain_failure(
    seen: ChainSeen,
    recipient: &Recipient<'_>,
    channel: Channel,
    slot_wait: Duration,
) -> TargetEnd {
    let last = seen.last_error.as_ref().map(|(name, e)| {
        format!(
            "{name} said {} ({}: {})",
            e.reason,
            e.raw_code.as_deref().unwrap_or("-"),
            e.raw_message
        )
    });
    if seen.stopped_by_deadline {
        let detail = match &last {
            Some(last) => format!("no provider accepted the code before it expired; last, {last}"),
            None => "no provider accepted the code before it expired".to_owned(),
        };
        return TargetEnd::Expired { detail };
    }
    let mut skipped = String::new();
    if !seen.skipped_open.is_empty() {
        skipped += &format!(
            " (circuit open, not tried: {})",
            seen.skipped_open.join(", ")
        );
    }
    if !seen.skipped_busy.is_empty() {
        skipped += &format!(
            " (every call slot busy for {slot_wait:?}, not tried: {})",
            seen.skipped_busy.join(", ")
        );
    }
    match (seen.last_error, last) {
        (Some((_, error)), Some(last)) => TargetEnd::Providers {
            reason: error.reason,
            detail: format!("every provider failed; last, {last}{skipped}"),
        },
        _ if !seen.skipped_open.is_empty() => TargetEnd::Providers {
            reason: FailureReason::ProviderUnavailable,
            detail: format!("every provider's circuit is open{skipped}"),
        },
        _ if !seen.skipped_busy.is_empty() => TargetEnd::Providers {
            reason: FailureReason::ProviderThrottled,
            detail: format!(
                "no provider could be called: as many calls as each allows \
                 (max_concurrent_calls) were open{skipped}"
            ),
        },
        _ => TargetEnd::Providers {
            reason: FailureReason::ProviderMisconfigured,
            detail: match recipient {
                Recipient::Device {
                    platform,
                    topic: Some(topic),
                    ..
                } => format!("no {channel} provider in the route serves {platform} app `{topic}`"),
                Recipient::Device { platform, .. } => {
                    format!("no {channel} provider in the route serves {platform} devices")
                }
                Recipient::Phone(_) => format!("no provider is routed for {channel}"),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Platform, TargetResult};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(seconds)
    }

    fn target(status: TargetStatus, reason: Option<FailureReason>) -> TargetResult {
        TargetResult {
            index: 0,
            channel: Channel::Sms,
            target: "+1415•••0101".into(),
            platform: None,
            status,
            reason,
            hint: None,
            detail: None,
            acknowledgement: None,
            attempts: Vec::new(),
        }
    }

    fn report(targets: Vec<TargetResult>) -> Report {
        Report {
            verification: None,
            delivery_id: "acme/j1".into(),
            tenant: "acme".into(),
            job_id: "j1".into(),
            account: "user-42".into(),
            purpose: "sign_in".into(),
            status: DeliveryStatus::InProgress,
            reason: None,
            hint: None,
            summary: String::new(),
            created_at: at(0),
            updated_at: at(0),
            expires_at: at(300),
            targets,
        }
    }

    #[test]
    fn a_failed_call_moves_on_by_its_class_and_the_deadline() {
        let second = Duration::from_secs(1);
        assert_eq!(
            after_failure(RetryClass::PermanentForTarget, None, at(0), at(60)),
            AfterFailure::EndTarget,
            "a recipient-level failure ends the target's chain"
        );
        assert_eq!(
            after_failure(RetryClass::Transient, Some(second), at(0), at(60)),
            AfterFailure::Retry {
                delay: second,
                at: at(1)
            }
        );
        assert_eq!(
            after_failure(RetryClass::Transient, Some(second * 90), at(0), at(60)),
            AfterFailure::NextProvider {
                past_deadline: true
            },
            "a retry that would land after the deadline is not planned"
        );
        assert_eq!(
            after_failure(RetryClass::Transient, None, at(0), at(60)),
            AfterFailure::NextProvider {
                past_deadline: false
            },
            "retries used up: the next provider"
        );
        assert_eq!(
            after_failure(
                RetryClass::PermanentForProvider,
                Some(second),
                at(0),
                at(60)
            ),
            AfterFailure::NextProvider {
                past_deadline: false
            },
            "a provider's own refusal is not retried there"
        );
    }

    #[test]
    fn a_chain_that_ended_without_a_provider_says_why() {
        let phone = Recipient::Phone("+14155550101");
        let wait = Duration::from_secs(10);
        let error = ProviderError::new(FailureReason::ProviderUnavailable, Some("503"), "down");

        let TargetEnd::Expired { detail } = chain_failure(
            ChainSeen {
                last_error: Some(("twilio".into(), error.clone())),
                stopped_by_deadline: true,
                ..ChainSeen::default()
            },
            &phone,
            Channel::Sms,
            wait,
        ) else {
            panic!("the deadline stopped it");
        };
        assert!(
            detail
                .contains("before it expired; last, twilio said PROVIDER_UNAVAILABLE (503: down)"),
            "{detail}"
        );

        let TargetEnd::Providers { reason, detail } = chain_failure(
            ChainSeen {
                last_error: Some(("twilio".into(), error)),
                skipped_open: vec!["smpp".into()],
                ..ChainSeen::default()
            },
            &phone,
            Channel::Sms,
            wait,
        ) else {
            panic!("providers failed");
        };
        assert_eq!(
            reason,
            FailureReason::ProviderUnavailable,
            "the last failure heads it"
        );
        assert!(
            detail.ends_with("(circuit open, not tried: smpp)"),
            "{detail}"
        );

        let open = chain_failure(
            ChainSeen {
                skipped_open: vec!["twilio".into()],
                skipped_busy: vec!["smpp".into()],
                ..ChainSeen::default()
            },
            &phone,
            Channel::Sms,
            wait,
        );
        assert!(matches!(
            open,
            TargetEnd::Providers {
                reason: FailureReason::ProviderUnavailable,
                ..
            }
        ));
        let busy = chain_failure(
            ChainSeen {
                skipped_busy: vec!["smpp".into()],
                ..ChainSeen::default()
            },
            &phone,
            Channel::Sms,
            wait,
        );
        assert!(matches!(
            busy,
            TargetEnd::Providers {
                reason: FailureReason::ProviderThrottled,
                ..
            }
        ));

        let device = Recipient::Device {
            platform: Platform::Apns,
            token: "a1b2",
            topic: Some("com.example.app"),
        };
        let TargetEnd::Providers { reason, detail } =
            chain_failure(ChainSeen::default(), &device, Channel::Push, wait)
        else {
            panic!("nothing routed");
        };
        assert_eq!(reason, FailureReason::ProviderMisconfigured);
        assert_eq!(
            detail,
            "no push provider in the route serves apns app `com.example.app`"
        );
    }

    #[test]
    fn a_number_closes_for_every_channel_only_for_reasons_about_the_number() {
        assert_eq!(
            standing_after(FailureReason::InvalidRecipient),
            Standing::Closed
        );
        assert_eq!(
            standing_after(FailureReason::RecipientOptedOut),
            Standing::Closed
        );
        assert_eq!(
            standing_after(FailureReason::ProviderUnavailable),
            Standing::Tried
        );
        assert_eq!(
            standing_after(FailureReason::Undeliverable),
            Standing::Tried
        );
    }

    #[test]
    fn the_outcome_follows_the_verdict_and_a_denial_overrides_it() {
        let sent = report(vec![target(TargetStatus::Sent, None)]);
        let outcome = decide(&sent, Verdict::Reached);
        assert_eq!(
            (outcome.status, outcome.reason),
            (DeliveryStatus::Sent, None)
        );

        let delivered = report(vec![target(TargetStatus::Delivered, None)]);
        assert_eq!(
            decide(&delivered, Verdict::Reached).status,
            DeliveryStatus::Delivered
        );

        let failed = report(vec![
            target(
                TargetStatus::Failed,
                Some(FailureReason::ProviderUnavailable),
            ),
            target(TargetStatus::Failed, Some(FailureReason::InvalidRecipient)),
        ]);
        let outcome = decide(&failed, Verdict::Failed(None));
        assert_eq!(outcome.status, DeliveryStatus::Failed);
        assert_eq!(
            outcome.reason,
            headline_reason(&failed.targets),
            "the headline rule decides"
        );
        let expired = decide(&failed, Verdict::Failed(Some(FailureReason::CodeExpired)));
        assert_eq!(
            expired.reason,
            Some(FailureReason::CodeExpired),
            "the delivery's own reason wins"
        );

        let mut denied = report(vec![target(TargetStatus::Sent, None)]);
        denied.targets[0].acknowledgement = Some(Acknowledgement::Denied);
        let outcome = decide(&denied, Verdict::Reached);
        assert_eq!(
            (outcome.status, outcome.reason),
            (DeliveryStatus::Failed, Some(FailureReason::UserDenied))
        );

        let deferred = decide(
            &report(vec![target(TargetStatus::Pending, None)]),
            Verdict::Deferred(at(60)),
        );
        assert_eq!(
            (deferred.status, deferred.reason),
            (DeliveryStatus::Deferred, Some(FailureReason::QuietHours))
        );
    }
}
