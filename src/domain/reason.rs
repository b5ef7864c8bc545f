//! The failure taxonomy: one reason set for every attempt, target and delivery, each with a
//! fixed retry class and a remediation hint a support agent can read out.

use serde::{Deserialize, Serialize};

use super::string_enum;

/// Why a delivery, target or attempt did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureReason {
    /// The job itself is malformed (a required field is missing or invalid).
    InvalidJob,
    /// A phone number or device is not usable as given (e.g. not E.164).
    InvalidRecipient,
    /// The job has no target that any of its channels can reach.
    NoEligibleTarget,
    /// The code expired before it could be sent.
    CodeExpired,
    /// A block-list entry matched the recipient.
    RecipientBlocked,
    /// The recipient's quiet hours forbid sending now.
    QuietHours,
    /// A rate limit was reached.
    RateLimited,
    /// The tenant may not send to this destination.
    DestinationNotPermitted,
    /// The fraud guard holds the number's range (SMS pumping suspected).
    DestinationSuspended,
    /// The recipient opted out of messages from this sender.
    RecipientOptedOut,
    /// The handset is off, out of coverage or otherwise unreachable.
    RecipientUnreachable,
    /// The carrier does not know this number.
    RecipientUnknown,
    /// The number is a landline or otherwise cannot receive SMS.
    NotMobileNumber,
    /// The carrier filtered the message (spam filter, do-not-disturb).
    CarrierFiltered,
    /// The carrier could not deliver, for no more specific reason.
    Undeliverable,
    /// The push token is malformed or belongs to another app.
    DeviceTokenInvalid,
    /// The app was removed or its push token rotated.
    DeviceUnregistered,
    /// The device cannot show a code (e.g. a watch without the app).
    DeviceCannotDisplayCode,
    /// No device confirmed it showed the code in time.
    PushNotAcknowledged,
    /// The user tapped "Don't Allow" on a device.
    UserDenied,
    /// The provider is down or answered with a server error.
    ProviderUnavailable,
    /// The provider did not answer in time.
    ProviderTimeout,
    /// The provider throttled us.
    ProviderThrottled,
    /// The provider refused the message for a reason of its own.
    ProviderRejected,
    /// The provider refused our credentials or configuration.
    ProviderMisconfigured,
}

string_enum!(FailureReason {
    InvalidJob => "INVALID_JOB",
    InvalidRecipient => "INVALID_RECIPIENT",
    NoEligibleTarget => "NO_ELIGIBLE_TARGET",
    CodeExpired => "CODE_EXPIRED",
    RecipientBlocked => "RECIPIENT_BLOCKED",
    QuietHours => "QUIET_HOURS",
    RateLimited => "RATE_LIMITED",
    DestinationNotPermitted => "DESTINATION_NOT_PERMITTED",
    DestinationSuspended => "DESTINATION_SUSPENDED",
    RecipientOptedOut => "RECIPIENT_OPTED_OUT",
    RecipientUnreachable => "RECIPIENT_UNREACHABLE",
    RecipientUnknown => "RECIPIENT_UNKNOWN",
    NotMobileNumber => "NOT_MOBILE_NUMBER",
    CarrierFiltered => "CARRIER_FILTERED",
    Undeliverable => "UNDELIVERABLE",
    DeviceTokenInvalid => "DEVICE_TOKEN_INVALID",
    DeviceUnregistered => "DEVICE_UNREGISTERED",
    DeviceCannotDisplayCode => "DEVICE_CANNOT_DISPLAY_CODE",
    PushNotAcknowledged => "PUSH_NOT_ACKNOWLEDGED",
    UserDenied => "USER_DENIED",
    ProviderUnavailable => "PROVIDER_UNAVAILABLE",
    ProviderTimeout => "PROVIDER_TIMEOUT",
    ProviderThrottled => "PROVIDER_THROTTLED",
    ProviderRejected => "PROVIDER_REJECTED",
    ProviderMisconfigured => "PROVIDER_MISCONFIGURED",
});

/// What a failure means for the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Worth retrying the same provider after a back-off.
    Transient,
    /// This target will not work: move on to the next target or stage.
    PermanentForTarget,
    /// This provider will not work for this message: try the next provider.
    PermanentForProvider,
}

/// The taxonomy's groups, in the order DESIGN.md lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonGroup {
    /// Problems with the job as submitted.
    Input,
    /// A policy rule decided.
    Policy,
    /// The recipient's number or carrier.
    Recipient,
    /// The recipient's device or its push registration.
    Device,
    /// The provider itself.
    Provider,
}

impl FailureReason {
    /// The taxonomy group of this reason.
    pub fn group(self) -> ReasonGroup {
        use FailureReason::*;
        match self {
            InvalidJob | InvalidRecipient | NoEligibleTarget | CodeExpired => ReasonGroup::Input,
            RecipientBlocked
            | QuietHours
            | RateLimited
            | DestinationNotPermitted
            | DestinationSuspended => ReasonGroup::Policy,
            RecipientOptedOut | RecipientUnreachable | RecipientUnknown | NotMobileNumber
            | CarrierFiltered | Undeliverable => ReasonGroup::Recipient,
            DeviceTokenInvalid
            | DeviceUnregistered
            | DeviceCannotDisplayCode
            | PushNotAcknowledged
            | UserDenied => ReasonGroup::Device,
            ProviderUnavailable
            | ProviderTimeout
            | ProviderThrottled
            | ProviderRejected
            | ProviderMisconfigured => ReasonGroup::Provider,
        }
    }

    /// The fixed retry class of this reason.
    pub fn retry_class(self) -> RetryClass {
        use FailureReason::*;
        match self {
            ProviderUnavailable | ProviderTimeout | ProviderThrottled => RetryClass::Transient,
            // A provider that may not send to a destination (e.g. Twilio 21408) is not the last
            // word: another provider or route may. (The gateway's own destination policy is
            // decided before any provider is called.)
            ProviderRejected | ProviderMisconfigured | DestinationNotPermitted => {
                RetryClass::PermanentForProvider
            }
            // A carrier that says "unreachable" may succeed later, but not within a code's
            // lifetime on the same route: the next target is the better bet.
            _ => RetryClass::PermanentForTarget,
        }
    }

    /// Whether this failure of a phone number on one channel closes the number for every
    /// channel of the job. A malformed number, one the carrier does not know, and one whose
    /// owner opted out (a STOP also blocks the number for later jobs) are closed; a landline
    /// (not mobile), a carrier's SMS filter, an undeliverable message or an unreachable handset
    /// close only the channel that failed: voice may still reach the number.
    pub fn closes_number_for_every_channel(self) -> bool {
        use FailureReason::*;
        matches!(
            self,
            InvalidRecipient | RecipientUnknown | RecipientOptedOut
        )
    }

    /// One line a support agent can read out: what to do about it.
    pub fn hint(self) -> &'static str {
        use FailureReason::*;
        match self {
            InvalidJob => "the sending service submitted a malformed job: check its integration",
            InvalidRecipient => {
                "the trusted phone number or device is malformed: correct it (numbers need the international +country format)"
            }
            NoEligibleTarget => {
                "the account has no trusted device or phone number for the requested channels: add or verify a trusted phone number"
            }
            CodeExpired => {
                "the code expired before it could be sent: ask the user to request a new code"
            }
            RecipientBlocked => {
                "the number or device is on a block list: review the block-list entry"
            }
            QuietHours => {
                "the recipient is in quiet hours: the code is sent when they end, or ask the user to retry later"
            }
            RateLimited => "too many codes were requested recently: wait before requesting another",
            DestinationNotPermitted => {
                "sending to this country is not enabled for this tenant: enable it or use another number"
            }
            DestinationSuspended => {
                "the fraud guard holds this number's range after a surge of codes nobody entered (SMS pumping): use push or another number; if the traffic is genuine, an operator can lift the hold (otp-gateway fraud lift)"
            }
            RecipientOptedOut => {
                "the user opted out of text messages (e.g. replied STOP): ask them to reply START, or use another channel"
            }
            RecipientUnreachable => {
                "the phone is off or out of coverage: ask the user to check signal, or use another number or channel"
            }
            RecipientUnknown => {
                "the carrier does not know this number: it may have changed; verify the trusted phone number"
            }
            NotMobileNumber => {
                "the number cannot receive text messages (landline?): use voice or add a mobile number"
            }
            CarrierFiltered => {
                "the carrier or a do-not-disturb setting blocked the message: ask the user to check spam filters or use another channel"
            }
            Undeliverable => {
                "the carrier could not deliver the message: try another number or channel"
            }
            DeviceTokenInvalid => {
                "the device's push token is invalid or belongs to another app: have the user sign in on the device again"
            }
            DeviceUnregistered => "the app was removed or its token rotated: remove this device",
            DeviceCannotDisplayCode => {
                "this device cannot show codes: use another device or a phone number"
            }
            PushNotAcknowledged => {
                "the device did not confirm it showed the code (offline or notifications off): check the device is online and notifications are allowed"
            }
            UserDenied => {
                "the user tapped \"Don't Allow\": treat this sign-in attempt as suspicious"
            }
            ProviderUnavailable => {
                "the delivery provider is down: retried and failed over automatically; check the provider status"
            }
            ProviderTimeout => {
                "the delivery provider did not answer in time: check the provider status"
            }
            ProviderThrottled => {
                "the delivery provider is throttling us: reduce volume or raise the provider's limits"
            }
            ProviderRejected => {
                "the provider refused the message: see the provider's code and message"
            }
            ProviderMisconfigured => {
                "the gateway's credentials or settings for this provider are wrong: fix the provider configuration"
            }
        }
    }

    /// Precedence when several targets failed for different reasons: the lowest rank becomes
    /// the delivery's headline. `USER_DENIED` first (a security signal), then policy, then
    /// input problems with the recipient, then the recipient's carrier, then devices, then
    /// providers (the gateway's own problem, least actionable for support).
    pub fn headline_rank(self) -> u8 {
        if self == FailureReason::UserDenied {
            return 0;
        }
        match self.group() {
            ReasonGroup::Policy => 1,
            ReasonGroup::Input => 2,
            ReasonGroup::Recipient => 3,
            ReasonGroup::Device => 4,
            ReasonGroup::Provider => 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_text_form() {
        for reason in FailureReason::ALL {
            assert_eq!(reason.as_str().parse::<FailureReason>(), Ok(*reason));
            assert!(!reason.hint().is_empty());
        }
        assert_eq!(FailureReason::ALL.len(), 25);
    }

    #[test]
    fn provider_outages_are_transient_and_recipient_problems_are_not() {
        assert_eq!(
            FailureReason::ProviderUnavailable.retry_class(),
            RetryClass::Transient
        );
        assert_eq!(
            FailureReason::ProviderMisconfigured.retry_class(),
            RetryClass::PermanentForProvider
        );
        assert_eq!(
            FailureReason::RecipientUnknown.retry_class(),
            RetryClass::PermanentForTarget
        );
    }

    #[test]
    fn only_a_wrong_unknown_or_opted_out_number_is_closed_for_every_channel() {
        use FailureReason::*;
        let closing: Vec<_> = FailureReason::ALL
            .iter()
            .copied()
            .filter(|r| r.closes_number_for_every_channel())
            .collect();
        assert_eq!(
            closing,
            [InvalidRecipient, RecipientOptedOut, RecipientUnknown]
        );
        for channel_only in [
            NotMobileNumber,
            CarrierFiltered,
            Undeliverable,
            RecipientUnreachable,
        ] {
            assert!(!channel_only.closes_number_for_every_channel());
        }
    }

    #[test]
    fn the_readme_reason_table_says_what_the_code_does() {
        let readme = include_str!("../../README.md");
        for reason in FailureReason::ALL {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", reason.as_str())))
                .unwrap_or_else(|| panic!("{reason} has a row in the README's reason table"));
            let closes = row.contains("| every channel |");
            assert_eq!(closes, reason.closes_number_for_every_channel(), "{row}");
            assert!(row.contains(reason.hint()), "{row}");
        }
    }

    #[test]
    fn user_denied_outranks_everything() {
        let mut reasons = FailureReason::ALL.to_vec();
        reasons.sort_by_key(|r| r.headline_rank());
        assert_eq!(reasons[0], FailureReason::UserDenied);
        assert_eq!(reasons.last().unwrap().group(), ReasonGroup::Provider);
    }
}
