//! Pure domain types: jobs, targets, channels, attempts, reports and the failure taxonomy.
//! Nothing here does I/O; time comes in as an argument or through [`Clock`].

mod ack_token;
mod api_key;
mod clock;
mod job;
mod mask;
mod message;
mod reason;
mod report;
mod setting;
mod sms;

pub use ack_token::AckTokens;
pub use api_key::{
    ApiKey, KEY_PREFIX, KeyText, Scope, normalize as normalize_scopes, parse_scopes, scopes_text,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use job::{
    Channel, Code, DeliveryId, DeviceTarget, Job, JobError, MAX_JOB_ID_LEN, PhoneTarget, Platform,
    Target, check_tenant, is_apns_token, is_e164,
};
pub use mask::{mask_phone, mask_token, scrub};
pub use message::{
    Autofill, ChannelTemplates, MessageContext, MessageTemplates, RenderedMessage, TemplateError,
    fill_placeholders,
};
pub use reason::{FailureReason, RetryClass};
pub use report::{
    Acknowledgement, Attempt, AttemptOutcome, DeliveryStatus, DeviceInvalidated, Report,
    TargetResult, TargetStatus, Verification, headline_reason, summarize,
};
pub use setting::{
    InvalidSetting, SecretString, SecretUrl, http_url, non_negative_duration, optional_http_url,
    positive_duration, reconnect_backoff, secret_setting,
};
pub use sms::{
    SmsEncoding, SmsShape, gsm7_septets, gsm7_text, measure as measure_sms, ucs2_octets, ucs2_text,
};

/// Generates `as_str`, `ALL` and `FromStr` for a fieldless enum whose stored and wire form is
/// the variant name in SCREAMING_SNAKE_CASE.
macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The stable text form (stored in the ledger, used in JSON).
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(format!("unknown {} `{other}`", stringify!($ty))),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;
