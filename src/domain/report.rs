//! Delivery reports: the status of a delivery, each target's fate and each attempt's record,
//! plus the rules that pick the headline reason and write the human summary.

use jiff::Timestamp;
use serde::Serialize;

use super::{Channel, FailureReason, Platform, SmsShape, string_enum};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    /// Known, not yet picked up.
    Accepted,
    /// Being delivered.
    InProgress,
    /// Held back; resumes by itself.
    Deferred,
    /// Accepted by a provider, no receipt yet.
    Sent,
    /// A receipt or the device confirmed it.
    Delivered,
    /// Not delivered.
    Failed,
}

string_enum!(DeliveryStatus {
    Accepted => "ACCEPTED",
    InProgress => "IN_PROGRESS",
    Deferred => "DEFERRED",
    Sent => "SENT",
    Delivered => "DELIVERED",
    Failed => "FAILED",
});

impl DeliveryStatus {
    /// Whether nothing more will happen to the delivery.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Sent | DeliveryStatus::Delivered | DeliveryStatus::Failed
        )
    }
}

/// Where one target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TargetStatus {
    /// Not tried yet.
    Pending,
    /// Not needed: the code already reached the user another way.
    Skipped,
    /// Accepted by a provider.
    Sent,
    /// Confirmed delivered.
    Delivered,
    /// Not delivered or not eligible.
    Failed,
}

string_enum!(TargetStatus {
    Pending => "PENDING",
    Skipped => "SKIPPED",
    Sent => "SENT",
    Delivered => "DELIVERED",
    Failed => "FAILED",
});

/// How one provider call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttemptOutcome {
    /// No answer yet.
    InFlight,
    /// The provider accepted the message.
    Sent,
    /// The provider confirmed delivery.
    Delivered,
    /// The provider refused or failed.
    Failed,
    /// The gateway stopped (a crash, a kill) while the call was open: whether the provider
    /// took the message is not known. A replica that takes the delivery over records this.
    Interrupted,
}

string_enum!(AttemptOutcome {
    InFlight => "IN_FLIGHT",
    Sent => "SENT",
    Delivered => "DELIVERED",
    Failed => "FAILED",
    Interrupted => "INTERRUPTED",
});

/// What a device said about a pushed code (`AcknowledgeDelivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Acknowledgement {
    /// The device showed the code.
    Shown,
    /// The user tapped "Don't Allow".
    Denied,
}

string_enum!(Acknowledgement { Shown => "SHOWN", Denied => "DENIED" });

/// One provider call for one target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    /// The provider's configured name.
    pub provider: String,
    /// The channel used.
    pub channel: Channel,
    /// Masked number or token.
    pub target: String,
    /// When the call started.
    pub started_at: Timestamp,
    /// When it ended; `None` while in flight.
    pub ended_at: Option<Timestamp>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// Why it failed.
    pub reason: Option<FailureReason>,
    /// The provider's own error code.
    pub provider_code: Option<String>,
    /// The provider's own message.
    pub provider_message: Option<String>,
    /// 0 for the first try of this provider for this target.
    pub retry: u32,
    /// The provider's id for the message.
    pub provider_message_id: Option<String>,
    /// When the same provider will be called again, if it will.
    pub next_retry_at: Option<Timestamp>,
    /// For SMS: the text's encoding and segment count.
    pub sms: Option<SmsShape>,
    /// For a dead push token: since when the push service has known it is invalid (APNs).
    pub token_invalid_since: Option<Timestamp>,
}

/// The fate of one target of the job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetResult {
    /// Position in the job's target list.
    pub index: u32,
    /// The channel it was (or would be) reached by.
    pub channel: Channel,
    /// Device id, or masked phone number.
    pub target: String,
    /// Push platform, for devices.
    pub platform: Option<Platform>,
    /// Where it stands.
    pub status: TargetStatus,
    /// Why it failed.
    pub reason: Option<FailureReason>,
    /// What to do about `reason`.
    pub hint: Option<&'static str>,
    /// Why, in words, when it was not eligible.
    pub detail: Option<String>,
    /// What the device said, for a pushed code.
    pub acknowledgement: Option<Acknowledgement>,
    /// Provider calls, oldest first.
    pub attempts: Vec<Attempt>,
}

/// Everything known about one delivery. Serialized as the event body: it never holds the code.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `tenant/job_id`.
    pub delivery_id: String,
    /// The tenant.
    pub tenant: String,
    /// The job id.
    pub job_id: String,
    /// The account.
    pub account: String,
    /// The job's purpose.
    pub purpose: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// The headline reason when it failed.
    pub reason: Option<FailureReason>,
    /// What to do about `reason`.
    pub hint: Option<&'static str>,
    /// Each target's fate in plain words.
    pub summary: String,
    /// When the gateway first saw the job.
    pub created_at: Timestamp,
    /// When the report last changed.
    pub updated_at: Timestamp,
    /// When the code expires.
    pub expires_at: Timestamp,
    /// Per-target results, in job order.
    pub targets: Vec<TargetResult>,
    /// What upstream reported of the user entering the code (`ReportVerification`).
    pub verification: Option<Verification>,
}

/// Whether the user entered the code, as upstream reported it: the conversion signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// The user entered the code (`false`: they tried and failed, or gave up).
    pub verified: bool,
    /// When, as upstream says.
    pub at: Timestamp,
}

/// A push token a provider called dead (unregistered or invalid), as published on
/// `device.invalidated` so that upstream can remove the device. Never holds the token itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInvalidated {
    /// The tenant.
    pub tenant: String,
    /// The account the device belongs to.
    pub account: String,
    /// Upstream's id of the device.
    pub device_id: String,
    /// The push platform.
    pub platform: Platform,
    /// `DEVICE_UNREGISTERED` or `DEVICE_TOKEN_INVALID`.
    pub reason: FailureReason,
    /// What to do about it.
    pub hint: &'static str,
    /// The masked token.
    pub token: String,
    /// The provider that said so.
    pub provider: String,
    /// Its own code (`Unregistered`, `UNREGISTERED`, `BadDeviceToken`, …).
    pub provider_code: Option<String>,
    /// Its own message.
    pub provider_message: Option<String>,
    /// Since when the push service has known the token is invalid (APNs' 410 timestamp).
    pub token_invalid_since: Option<Timestamp>,
    /// When the provider said so.
    pub observed_at: Timestamp,
    /// The delivery during which it was learnt.
    pub delivery_id: String,
}

impl Report {
    /// The devices whose push token a provider called dead during this delivery.
    pub fn invalidated_devices(&self) -> Vec<DeviceInvalidated> {
        self.targets
            .iter()
            .filter_map(|target| {
                let platform = target.platform?;
                // Only what a push service said is dead: an invalid token may be the gateway's
                // wrong environment or app, and a token refused before any request was never
                // judged by a push service at all.
                let attempt = target
                    .attempts
                    .iter()
                    .rev()
                    .find(|a| a.reason == Some(FailureReason::DeviceUnregistered))?;
                let reason = attempt.reason?;
                Some(DeviceInvalidated {
                    tenant: self.tenant.clone(),
                    account: self.account.clone(),
                    device_id: target.target.clone(),
                    platform,
                    reason,
                    hint: reason.hint(),
                    token: attempt.target.clone(),
                    provider: attempt.provider.clone(),
                    provider_code: attempt.provider_code.clone(),
                    provider_message: attempt.provider_message.clone(),
                    token_invalid_since: attempt.token_invalid_since,
                    observed_at: attempt.ended_at.unwrap_or(attempt.started_at),
                    delivery_id: self.delivery_id.clone(),
                })
            })
            .collect()
    }
}

/// The delivery's headline reason among its failed targets' reasons, by
/// [`FailureReason::headline_rank`]; ties go to the earlier target.
pub fn headline_reason(targets: &[TargetResult]) -> Option<FailureReason> {
    targets
        .iter()
        .filter(|t| t.status == TargetStatus::Failed)
        .filter_map(|t| t.reason)
        .min_by_key(|r| r.headline_rank())
}

fn describe_target(target: &TargetResult) -> String {
    match target.platform {
        Some(platform) => format!("device {} ({platform})", target.target),
        None => target.target.clone(),
    }
}

fn channel_words(channel: Channel) -> &'static str {
    match channel {
        Channel::Push => "push",
        Channel::Sms => "SMS",
        Channel::Voice => "voice call",
    }
}

/// One sentence per target that a support agent can read out, after a delivery-level
/// sentence when the delivery failed as a whole.
pub fn summarize(
    status: DeliveryStatus,
    reason: Option<FailureReason>,
    expires_at: Timestamp,
    targets: &[TargetResult],
) -> String {
    let mut sentences = Vec::new();
    match (status, reason) {
        (DeliveryStatus::Failed, Some(FailureReason::CodeExpired)) => sentences.push(format!(
            "Nothing was sent: the code expired at {expires_at} before delivery could start."
        )),
        (DeliveryStatus::Failed, Some(FailureReason::NoEligibleTarget)) if targets.is_empty() => {
            sentences.push("Nothing was sent: the job lists no trusted device or phone number.".into())
        }
        (DeliveryStatus::Failed, Some(FailureReason::NoEligibleTarget)) => sentences.push(
            "Nothing was sent: no trusted device or phone number can be reached by the requested channels."
                .into(),
        ),
        _ => {}
    }
    for target in targets {
        let who = describe_target(target);
        let last = target.attempts.last();
        let via = last
            .map(|a| format!(" via {}", a.provider))
            .unwrap_or_default();
        let how = channel_words(last.map_or(target.channel, |a| a.channel));
        let sentence = match target.status {
            TargetStatus::Sent => format!("{how} to {who} was accepted{via}."),
            TargetStatus::Delivered => format!("{how} to {who} was delivered{via}."),
            TargetStatus::Pending => match &target.detail {
                Some(detail) => format!("{how} to {who} is {detail}."),
                None => format!("{how} to {who} has not been tried yet."),
            },
            TargetStatus::Skipped => {
                let why = target
                    .detail
                    .as_deref()
                    .unwrap_or("the code already reached the user");
                format!("{who} was not tried: {why}.")
            }
            TargetStatus::Failed => {
                let reason = target.reason.map(|r| r.as_str()).unwrap_or("UNKNOWN");
                let why = target
                    .detail
                    .clone()
                    .or_else(|| last.and_then(|a| a.provider_message.clone()))
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                format!("{how} to {who} failed{via} ({reason}){why}.")
            }
        };
        // A provider's text that ends a sentence of its own does not make it end twice.
        let mut sentence = sentence;
        while sentence.ends_with("..") {
            sentence.pop();
        }
        let mut chars = sentence.chars();
        let capitalised = match chars.next() {
            Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
            None => sentence,
        };
        sentences.push(capitalised);
    }
    sentences.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(status: TargetStatus, reason: Option<FailureReason>) -> TargetResult {
        TargetResult {
            index: 0,
            channel: Channel::Sms,
            target: "+1415•••0101".into(),
            platform: None,
            status,
            reason,
            hint: reason.map(|r| r.hint()),
            detail: None,
            acknowledgement: None,
            attempts: vec![],
        }
    }

    #[test]
    fn headline_prefers_policy_and_recipient_over_provider() {
        let targets = vec![
            target(
                TargetStatus::Failed,
                Some(FailureReason::ProviderUnavailable),
            ),
            target(TargetStatus::Failed, Some(FailureReason::RecipientUnknown)),
            target(TargetStatus::Skipped, Some(FailureReason::RecipientBlocked)),
        ];
        assert_eq!(
            headline_reason(&targets),
            Some(FailureReason::RecipientUnknown)
        );
        assert_eq!(headline_reason(&[]), None);
    }

    #[test]
    fn summary_gives_each_target_a_sentence() {
        let mut failed = target(TargetStatus::Failed, Some(FailureReason::InvalidRecipient));
        failed.detail = Some("not a valid E.164 number".into());
        let text = summarize(
            DeliveryStatus::Failed,
            Some(FailureReason::InvalidRecipient),
            Timestamp::UNIX_EPOCH,
            &[failed],
        );
        assert_eq!(
            text,
            "SMS to +1415•••0101 failed (INVALID_RECIPIENT): not a valid E.164 number."
        );
    }

    #[test]
    fn a_provider_text_ending_in_a_period_ends_the_sentence_once() {
        let mut failed = target(TargetStatus::Failed, Some(FailureReason::InvalidRecipient));
        failed.detail = Some("The 'To' number +1415•••0101 is not a valid phone number.".into());
        let text = summarize(
            DeliveryStatus::Failed,
            Some(FailureReason::InvalidRecipient),
            Timestamp::UNIX_EPOCH,
            &[failed],
        );
        assert!(
            text.ends_with("phone number.") && !text.contains(".."),
            "{text}"
        );
    }
}
