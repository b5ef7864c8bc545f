//! Provider settings: what every provider shares (retries, circuit breaking, calls open at
//! once), declared once, and the registry of provider kinds, each of which owns its own
//! settings, their validation and how its adapter is built, next to its adapter. Adding a kind
//! is its own folder and one line in `provider_kinds!` below.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use figment::value::{Dict, Value};
use serde::{Deserialize, Deserializer};
use tokio::sync::mpsc;

use super::apns::ApnsSettings;
use super::fcm::FcmSettings;
use super::http::HttpSettings;
use super::sandbox::SandboxSettings;
use super::smpp::SmppSettings;
use super::twilio::TwilioSettings;
use super::{Provider, ProviderReceipt};
use crate::domain::{Channel, InvalidSetting};

/// One named provider: the settings every provider has, and its kind's own.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// Retries, circuit breaking and calls open at once.
    pub shared: SharedSettings,
    /// The adapter (`kind`) and its own settings.
    pub kind: KindSettings,
}

/// The settings every provider has, whatever its kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedSettings {
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaking.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// The most calls open to it at once (over HTTP/1.1, connections); a call beyond waits for
    /// one to end, up to the provider timeout, and the next provider is tried after that.
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
}

/// The keys of [`SharedSettings`] in a provider's table.
const SHARED_KEYS: [&str; 3] = ["retry", "breaker", "max_concurrent_calls"];

/// What building an adapter may need besides its own settings.
pub struct BuildContext<'a> {
    /// `delivery.provider_timeout`.
    pub provider_timeout: Duration,
    /// Where receipts a provider gets on its own session (SMPP) go.
    pub receipts: &'a mpsc::UnboundedSender<ProviderReceipt>,
    /// `receipts.public_url`: the base URL providers' callbacks reach this gateway at ("" when
    /// unknown).
    pub receipts_public_url: &'a str,
}

/// One kind of provider: its settings, how they are checked, and how its adapter is built.
#[async_trait]
pub trait ProviderKind: Send + Sync {
    /// Whether it can carry `channel` (every channel unless it says otherwise).
    fn carries(&self, _channel: Channel) -> bool {
        true
    }

    /// What it is, for the error when a route gives it a channel it cannot carry.
    fn carries_only(&self) -> &'static str {
        "a provider that carries every channel"
    }

    /// Checks what types alone cannot; keys are named `providers.<name>.…`.
    fn validate(&self, name: &str) -> Result<(), InvalidSetting>;

    /// Builds the adapter for provider `name` (reading key files and the like).
    async fn build(
        &self,
        name: &str,
        context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String>;
}

/// Declares the provider kinds: `"kind" => Variant(Settings)`, one line each.
macro_rules! provider_kinds {
    ($($kind:literal => $variant:ident($settings:ty)),+ $(,)?) => {
        /// A provider kind's own settings; `kind` in the provider's table picks one.
        #[derive(Debug, Clone)]
        pub enum KindSettings {
            $(
                #[doc = concat!("`kind = \"", $kind, "\"`.")]
                $variant($settings),
            )+
        }

        impl KindSettings {
            /// Every kind, as `kind` takes it.
            pub const KINDS: &'static [&'static str] = &[$($kind),+];

            /// The kind's name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(KindSettings::$variant(_) => $kind,)+
                }
            }

            /// The kind's behaviour.
            pub fn provider_kind(&self) -> &dyn ProviderKind {
                match self {
                    $(KindSettings::$variant(settings) => settings,)+
                }
            }

            /// The kind `kind`'s settings from the rest of the provider's table.
            fn read(kind: &str, table: Dict) -> Result<Self, String> {
                match kind {
                    $($kind => Value::from(table)
                        .deserialize()
                        .map(KindSettings::$variant)
                        .map_err(describe),)+
                    other => Err(format!(
                        "unknown kind `{other}`, expected one of {}",
                        Self::KINDS.join(", ")
                    )),
                }
            }
        }
    };
}

provider_kinds! {
    "sandbox" => Sandbox(SandboxSettings),
    "twilio" => Twilio(TwilioSettings),
    "http" => Http(HttpSettings),
    "smpp" => Smpp(SmppSettings),
    "apns" => Apns(ApnsSettings),
    "fcm" => Fcm(FcmSettings),
}

/// A nested settings error with the key it is at (within the provider's table).
fn describe(error: figment::Error) -> String {
    if error.path.is_empty() {
        error.kind.to_string()
    } else {
        format!("`{}`: {}", error.path.join("."), error.kind)
    }
}

impl<'de> Deserialize<'de> for ProviderSettings {
    /// The provider's table split in two: the shared keys for [`SharedSettings`], the rest for
    /// its kind's settings; each refuses keys it does not know.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = Dict::deserialize(deserializer)?;
        let kind = match table.remove("kind") {
            Some(Value::String(_, kind)) => kind,
            Some(_) => return Err(D::Error::custom("`kind` must be a string")),
            None => return Err(D::Error::missing_field("kind")),
        };
        let mut shared = Dict::new();
        for key in SHARED_KEYS {
            if let Some(value) = table.remove(key) {
                shared.insert(key.to_owned(), value);
            }
        }
        let shared = Value::from(shared)
            .deserialize()
            .map_err(|e| D::Error::custom(describe(e)))?;
        let kind = KindSettings::read(&kind, table).map_err(D::Error::custom)?;
        Ok(ProviderSettings { shared, kind })
    }
}

impl ProviderSettings {
    /// Checks the shared settings and the kind's own, naming keys `providers.<name>.…`.
    pub fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        if self.shared.max_concurrent_calls == 0 {
            return Err(InvalidSetting::new(
                format!("providers.{name}.max_concurrent_calls"),
                "must be at least 1",
            ));
        }
        self.kind.provider_kind().validate(name)?;
        validate_retry(&format!("providers.{name}.retry"), &self.shared.retry)?;
        validate_breaker(&format!("providers.{name}.breaker"), &self.shared.breaker)
    }

    /// Whether it can carry `channel`: SMPP binds SMS only, push services push only.
    pub fn carries(&self, channel: Channel) -> bool {
        self.kind.provider_kind().carries(channel)
    }

    /// What it is, for the error when a route gives it a channel it cannot carry.
    pub fn carries_only(&self) -> &'static str {
        self.kind.provider_kind().carries_only()
    }
}

/// Retry settings of one provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay bound before the first retry.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub initial_interval: Duration,
    /// Growth of the delay bound per retry.
    pub multiplier: f64,
    /// Largest delay bound.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub max_interval: Duration,
    /// Calls per target, the first one included.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_interval: Duration::from_millis(200),
            multiplier: 2.0,
            max_interval: Duration::from_secs(5),
            max_attempts: 3,
        }
    }
}

/// The default of `providers.NAME.max_concurrent_calls`: enough for `delivery.max_in_flight`
/// at its default many times over, few enough that an HTTP/1.1 provider (one connection per
/// call) is not flooded with connections, nor this process with their buffers.
pub const DEFAULT_MAX_CONCURRENT_CALLS: u32 = 1000;

pub(crate) fn default_max_concurrent_calls() -> u32 {
    DEFAULT_MAX_CONCURRENT_CALLS
}

/// Circuit-breaker settings of one provider (and of each of its prefix routes).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Open after this many failures in a row.
    pub consecutive_failures: u32,
    /// Open when the error rate over the window reaches this (0 < rate <= 1)...
    pub error_rate: f64,
    /// ...over this many most recent calls...
    pub window: u32,
    /// ...once at least this many calls are in the window.
    pub min_calls: u32,
    /// How long an open circuit rejects calls before a probe.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            error_rate: 0.5,
            window: 20,
            min_calls: 10,
            cool_down: Duration::from_secs(30),
        }
    }
}

fn validate_retry(key: &str, retry: &RetryConfig) -> Result<(), InvalidSetting> {
    if retry.max_interval < retry.initial_interval {
        return Err(InvalidSetting::new(
            format!("{key}.max_interval"),
            "must not be shorter than initial_interval",
        ));
    }
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        return Err(InvalidSetting::new(
            format!("{key}.multiplier"),
            "must be a number of at least 1.0",
        ));
    }
    if retry.max_attempts == 0 {
        return Err(InvalidSetting::new(
            format!("{key}.max_attempts"),
            "must be at least 1 (the first call counts)",
        ));
    }
    Ok(())
}

fn validate_breaker(key: &str, breaker: &BreakerConfig) -> Result<(), InvalidSetting> {
    if breaker.consecutive_failures == 0 {
        return Err(InvalidSetting::new(
            format!("{key}.consecutive_failures"),
            "must be at least 1",
        ));
    }
    if !(breaker.error_rate > 0.0 && breaker.error_rate <= 1.0) {
        return Err(InvalidSetting::new(
            format!("{key}.error_rate"),
            "must be above 0 and at most 1",
        ));
    }
    if breaker.window == 0 {
        return Err(InvalidSetting::new(
            format!("{key}.window"),
            "must be at least 1",
        ));
    }
    if breaker.min_calls == 0 || breaker.min_calls > breaker.window {
        return Err(InvalidSetting::new(
            format!("{key}.min_calls"),
            "must be between 1 and window",
        ));
    }
    Ok(())
}

pub(crate) fn default_push_category() -> String {
    "OTP_CODE".to_owned()
}

/// Providers per channel, in the order they are tried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// Push providers.
    pub push: Vec<String>,
    /// SMS providers.
    pub sms: Vec<String>,
    /// Voice providers.
    pub voice: Vec<String>,
    /// Routes for destination prefixes (longest prefix wins), e.g. `"+1" = ["twilio"]`.
    #[serde(default)]
    pub by_prefix: PrefixRoutes,
}

impl RoutesConfig {
    /// The providers configured for `channel`.
    pub fn for_channel(&self, channel: Channel) -> &[String] {
        match channel {
            Channel::Push => &self.push,
            Channel::Sms => &self.sms,
            Channel::Voice => &self.voice,
        }
    }
}

/// Providers per destination prefix, for SMS and voice.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRoutes {
    /// SMS routes by prefix.
    #[serde(default)]
    pub sms: BTreeMap<String, Vec<String>>,
    /// Voice routes by prefix.
    #[serde(default)]
    pub voice: BTreeMap<String, Vec<String>>,
}

impl PrefixRoutes {
    /// The prefix routes of `channel` (none for push).
    pub fn for_channel(&self, channel: Channel) -> Option<&BTreeMap<String, Vec<String>>> {
        match channel {
            Channel::Push => None,
            Channel::Sms => Some(&self.sms),
            Channel::Voice => Some(&self.voice),
        }
    }
}
