//! Configuration: embedded defaults (`config/default.toml`), an optional file, then
//! `OTP_GATEWAY_*` environment variables; validated once at start with errors that name the key.
//! Secrets (the broker password) are redacted in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use jiff::SignedDuration;
use serde::Deserialize;

use crate::domain::{Autofill, Channel, ChannelTemplates, FailureReason, MessageTemplates};

/// The defaults compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The prefix of environment overrides; nested keys are joined with `__`.
pub const ENV_PREFIX: &str = "OTP_GATEWAY_";

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parsed but makes no sense.
    #[error("configuration key `{key}`: {problem}")]
    Invalid {
        /// The dotted key, e.g. `amqp.prefetch`.
        key: String,
        /// What is wrong with the value.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC listener.
    pub grpc: GrpcConfig,
    /// The broker and its topology.
    pub amqp: AmqpConfig,
    /// The ledger.
    pub store: StoreConfig,
    /// Delivery behaviour.
    pub delivery: DeliveryConfig,
    /// Providers per channel.
    pub routes: RoutesConfig,
    /// Named providers.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Logging.
    pub log: LogConfig,
    /// Per-tenant settings, by tenant name.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The receipt (provider callback) listener.
    pub receipts: ReceiptsConfig,
    /// Message templates overriding the built-in ones: `templates.<purpose>.<locale>.<channel>`
    /// (`*` as the purpose matches any).
    #[serde(default)]
    pub templates: BTreeMap<String, BTreeMap<String, ChannelTemplates>>,
}

/// The HTTP listener for provider callbacks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsConfig {
    /// Listen address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The base URL providers reach it at (signatures cover it); empty: `http://<listen>`.
    pub public_url: String,
}

/// Settings of one tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Whether a push stage waits for the device to confirm it showed the code. When false, a
    /// push accepted by APNs/FCM ends the chain as SENT and escalation happens only on failure.
    #[serde(default = "default_true")]
    pub push_acknowledgement: bool,
    /// The countries SMS and voice may go to.
    #[serde(default)]
    pub destinations: DestinationRules,
    /// The app name in this tenant's messages (default: `delivery.app_name`).
    #[serde(default)]
    pub app_name: Option<String>,
    /// How this tenant's SMS let phones fill the code in: `{ format = "origin_bound", domain =
    /// "example.com" }` or `{ format = "android_app_hash", hash = "FA+9qCX9VSu" }`.
    #[serde(default)]
    pub autofill: Autofill,
}

/// Per channel, the countries a tenant may send to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationRules {
    /// For SMS.
    #[serde(default)]
    pub sms: CountryRule,
    /// For voice calls.
    #[serde(default)]
    pub voice: CountryRule,
}

impl DestinationRules {
    /// The rule for `channel` (none for push).
    pub fn for_channel(&self, channel: Channel) -> Option<&CountryRule> {
        match channel {
            Channel::Push => None,
            Channel::Sms => Some(&self.sms),
            Channel::Voice => Some(&self.voice),
        }
    }
}

/// Countries as ISO 3166 alpha-2 codes: `allow` (if not empty) lists the only ones permitted,
/// `deny` the ones refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountryRule {
    /// The only countries permitted (empty: all).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Countries refused.
    #[serde(default)]
    pub deny: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// The gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// The broker connection and topology names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The AMQP URL, password included (redacted when shown).
    pub url: SecretUrl,
    /// Unacknowledged deliveries the broker may push at once.
    pub prefetch: u16,
    /// The connection name shown by the broker.
    pub connection_name: String,
    /// First reconnect delay.
    pub reconnect_initial: SignedDuration,
    /// Longest reconnect delay.
    pub reconnect_max: SignedDuration,
    /// Direct exchange that send-code jobs are published to.
    pub jobs_exchange: String,
    /// Routing key binding the jobs queue to the jobs exchange.
    pub jobs_routing_key: String,
    /// The quorum queue consumed by the gateway.
    pub jobs_queue: String,
    /// Quorum-queue `x-delivery-limit`.
    pub delivery_limit: u32,
    /// Dead-letter exchange (fanout).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Topic exchange for `delivery.<status>` events.
    pub events_exchange: String,
}

/// The ledger location.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH`.
    pub url: String,
}

/// Delivery behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// App name in messages.
    pub app_name: String,
    /// Jobs processed at once.
    pub max_in_flight: usize,
    /// Per provider call.
    pub provider_timeout: SignedDuration,
    /// Grace period for in-flight jobs on shutdown.
    pub shutdown_grace: SignedDuration,
    /// How long a push stage waits for a device to confirm it showed the code.
    pub push_ack_timeout: SignedDuration,
    /// Nothing is attempted later than this before the code expires.
    pub expiry_margin: SignedDuration,
    /// The longest `Retry-After` a provider may impose.
    pub retry_after_max: SignedDuration,
    /// How long an SMS or call accepted by a provider that sends receipts waits for a failure
    /// receipt (to go on with the next number or channel) before the job is let go; 0: never.
    pub receipt_wait: SignedDuration,
    /// How long a target whose every provider has its circuit open waits for a probe to close
    /// one (or another provider to take calls), never past the code's expiry; 0: fail at once.
    pub circuit_wait: SignedDuration,
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

/// Retry settings of one provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay bound before the first retry.
    pub initial_interval: SignedDuration,
    /// Growth of the delay bound per retry.
    pub multiplier: f64,
    /// Largest delay bound.
    pub max_interval: SignedDuration,
    /// Calls per target, the first one included.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_interval: SignedDuration::from_millis(200),
            multiplier: 2.0,
            max_interval: SignedDuration::from_secs(5),
            max_attempts: 3,
        }
    }
}

/// The default of `providers.NAME.max_concurrent_calls`: enough for `delivery.max_in_flight`
/// at its default many times over, few enough that an HTTP/1.1 provider (one connection per
/// call) is not flooded with connections, nor this process with their buffers.
pub const DEFAULT_MAX_CONCURRENT_CALLS: u32 = 1000;

fn default_max_concurrent_calls() -> u32 {
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
    pub cool_down: SignedDuration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            error_rate: 0.5,
            window: 20,
            min_calls: 10,
            cool_down: SignedDuration::from_secs(30),
        }
    }
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

/// One named provider; `kind` selects the adapter.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Appends each message as a JSON line to a file.
    Sandbox {
        /// The outbox file.
        outbox: PathBuf,
        /// Retries.
        #[serde(default)]
        retry: RetryConfig,
        /// Circuit breaking.
        #[serde(default)]
        breaker: BreakerConfig,
        /// Calls open at once.
        #[serde(default = "default_max_concurrent_calls")]
        max_concurrent_calls: u32,
    },
    /// A Twilio account (SMS through Messages, voice through Calls).
    Twilio(TwilioProviderConfig),
    /// A generic HTTP aggregator.
    Http(HttpProviderConfig),
    /// An SMPP 3.4 carrier bind (SMS only).
    Smpp(SmppProviderConfig),
    /// An APNs app credential (push to iOS/macOS devices).
    Apns(ApnsProviderConfig),
    /// A Firebase project (push through FCM HTTP v1).
    Fcm(FcmProviderConfig),
}

/// A Twilio account (`kind = "twilio"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioProviderConfig {
    /// The account SID (`AC…`).
    pub account_sid: String,
    /// The auth token (redacted when shown).
    pub auth_token: SecretString,
    /// Sender number (E.164), for voice and when no messaging service is set.
    #[serde(default)]
    pub from: Option<String>,
    /// Messaging service SID (`MG…`), preferred for SMS.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// API base (tests and the compose stack point it elsewhere).
    #[serde(default = "default_twilio_base")]
    pub base_url: String,
    /// Where Twilio should post status callbacks.
    #[serde(default)]
    pub status_callback: Option<String>,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaking.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Calls open at once (see [`ProviderConfig::max_concurrent_calls`]).
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// Which APNs environment a credential's pushes go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApnsEnvironment {
    /// `api.push.apple.com`: App Store, TestFlight and ad-hoc builds.
    #[default]
    Production,
    /// `api.sandbox.push.apple.com`: development builds.
    Sandbox,
}

/// An APNs app credential (`kind = "apns"`): token-based authentication with the `.p8` key of
/// the team, over one HTTP/2 connection pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsProviderConfig {
    /// The Apple Developer team id (10 characters).
    pub team_id: String,
    /// The key id of the `.p8` key (10 characters).
    pub key_id: String,
    /// The `.p8` key file (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Or the key itself, PEM text (redacted when shown).
    #[serde(default)]
    pub key: Option<SecretString>,
    /// The apps' bundle ids (APNs topics) sent for; a device names its app in `topic`, and a
    /// device without one goes to the first.
    pub topics: Vec<String>,
    /// `production` or `sandbox` (development builds).
    #[serde(default)]
    pub environment: ApnsEnvironment,
    /// Overrides the environment's host (tests and proxies).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The notification category, for the app's Allow / Don't Allow actions.
    #[serde(default = "default_push_category")]
    pub category: String,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaking.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Calls open at once (see [`ProviderConfig::max_concurrent_calls`]).
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

impl ApnsProviderConfig {
    /// Where requests go: `base_url`, else the environment's host.
    pub fn endpoint(&self) -> &str {
        match (&self.base_url, self.environment) {
            (Some(url), _) => url.trim_end_matches('/'),
            (None, ApnsEnvironment::Production) => "https://api.push.apple.com",
            (None, ApnsEnvironment::Sandbox) => "https://api.sandbox.push.apple.com",
        }
    }
}

/// A Firebase project (`kind = "fcm"`): FCM HTTP v1 with an OAuth2 access token obtained from
/// a service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmProviderConfig {
    /// The service-account JSON key file.
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    /// Or the service-account JSON itself (redacted when shown).
    #[serde(default)]
    pub service_account: Option<SecretString>,
    /// The Firebase project id; by default the service account's. Devices name theirs in
    /// `topic`.
    #[serde(default)]
    pub project_id: Option<String>,
    /// The FCM API base (tests and proxies point it elsewhere).
    #[serde(default = "default_fcm_base")]
    pub base_url: String,
    /// The notification category (iOS, through FCM) or click action.
    #[serde(default = "default_push_category")]
    pub category: String,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaking.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Calls open at once (see [`ProviderConfig::max_concurrent_calls`]).
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_push_category() -> String {
    "OTP_CODE".to_owned()
}

fn default_fcm_base() -> String {
    "https://fcm.googleapis.com".to_owned()
}

/// An SMPP 3.4 bind to a carrier's SMSC (`kind = "smpp"`): one transceiver session that submits
/// messages and receives their delivery receipts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmppProviderConfig {
    /// The SMSC, `host:port`.
    pub address: String,
    /// The ESME's system_id (at most 15 characters).
    pub system_id: String,
    /// The bind password (at most 8 characters; redacted when shown).
    pub password: SecretString,
    /// The system_type the carrier asks for, often empty.
    #[serde(default)]
    pub system_type: String,
    /// The sender: an E.164 number, a short code, or an alphanumeric id (at most 11 characters).
    pub source_addr: String,
    /// Submits waiting for their response at once on the bind.
    #[serde(default = "default_smpp_window")]
    pub window: u32,
    /// Submits per second on the bind.
    #[serde(default = "default_smpp_throughput")]
    pub throughput: f64,
    /// How often the bind is checked with enquire_link.
    #[serde(default = "default_enquire_link")]
    pub enquire_link_interval: SignedDuration,
    /// How long a submit_sm (or bind) may wait for its response.
    #[serde(default = "default_smpp_response_timeout")]
    pub response_timeout: SignedDuration,
    /// Re-bind back-off after the bind is lost or refused.
    #[serde(default = "default_smpp_reconnect_initial")]
    pub reconnect_initial: SignedDuration,
    /// The longest wait between re-bind attempts.
    #[serde(default = "default_smpp_reconnect_max")]
    pub reconnect_max: SignedDuration,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaking.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Calls open at once (see [`ProviderConfig::max_concurrent_calls`]).
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
}

fn default_smpp_window() -> u32 {
    10
}

fn default_smpp_throughput() -> f64 {
    50.0
}

fn default_enquire_link() -> SignedDuration {
    SignedDuration::from_secs(30)
}

fn default_smpp_response_timeout() -> SignedDuration {
    SignedDuration::from_secs(5)
}

fn default_smpp_reconnect_initial() -> SignedDuration {
    SignedDuration::from_secs(1)
}

fn default_smpp_reconnect_max() -> SignedDuration {
    SignedDuration::from_secs(30)
}

/// A generic HTTP provider (`kind = "http"`).
#[derive(Debug, Clone, Deserialize)]
pub struct HttpProviderConfig {
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Endpoint.
    pub url: String,
    /// Request headers (values redacted when shown: they are usually API keys).
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    /// Body template with `{{to}}`, `{{text}}`, `{{code}}`, `{{channel}}`, `{{delivery_id}}`,
    /// `{{expires_at}}`.
    pub body: String,
    /// The body's content type (placeholders are escaped for it).
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Statuses that mean "accepted".
    #[serde(default = "default_success")]
    pub success_status: Vec<u16>,
    /// JSON pointer to the message id in a success body, e.g. `/id`.
    #[serde(default)]
    pub message_id_field: Option<String>,
    /// JSON pointer to the error code in an error body, e.g. `/error/code`.
    #[serde(default)]
    pub error_code_field: Option<String>,
    /// JSON pointer to the error message in an error body.
    #[serde(default)]
    pub error_message_field: Option<String>,
    /// The provider's error codes and the reasons they mean; unmapped codes fall back to the
    /// status (429 throttled, 5xx unavailable, 401/403 misconfigured, else rejected).
    #[serde(default)]
    pub codes: BTreeMap<String, FailureReason>,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaking.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Calls open at once (see [`ProviderConfig::max_concurrent_calls`]).
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_method() -> String {
    "POST".to_owned()
}

fn default_content_type() -> String {
    "application/json".to_owned()
}

fn default_success() -> Vec<u16> {
    vec![200, 201, 202]
}

fn default_twilio_base() -> String {
    "https://api.twilio.com".to_owned()
}

/// A secret from the configuration: shown as `•••`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        SecretString(secret.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"•••\"")
    }
}

impl ProviderConfig {
    /// The adapter's name.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Sandbox { .. } => "sandbox",
            ProviderConfig::Twilio(_) => "twilio",
            ProviderConfig::Http(_) => "http",
            ProviderConfig::Smpp(_) => "smpp",
            ProviderConfig::Apns(_) => "apns",
            ProviderConfig::Fcm(_) => "fcm",
        }
    }

    /// Its retry settings.
    pub fn retry(&self) -> &RetryConfig {
        match self {
            ProviderConfig::Sandbox { retry, .. } => retry,
            ProviderConfig::Twilio(twilio) => &twilio.retry,
            ProviderConfig::Http(http) => &http.retry,
            ProviderConfig::Smpp(smpp) => &smpp.retry,
            ProviderConfig::Apns(apns) => &apns.retry,
            ProviderConfig::Fcm(fcm) => &fcm.retry,
        }
    }

    /// The most calls open to it at once (over HTTP/1.1, connections); a call beyond waits for
    /// one to end, up to the provider timeout, and the next provider is tried after that.
    pub fn max_concurrent_calls(&self) -> u32 {
        match self {
            ProviderConfig::Sandbox {
                max_concurrent_calls,
                ..
            } => *max_concurrent_calls,
            ProviderConfig::Twilio(twilio) => twilio.max_concurrent_calls,
            ProviderConfig::Http(http) => http.max_concurrent_calls,
            ProviderConfig::Smpp(smpp) => smpp.max_concurrent_calls,
            ProviderConfig::Apns(apns) => apns.max_concurrent_calls,
            ProviderConfig::Fcm(fcm) => fcm.max_concurrent_calls,
        }
    }

    /// The CA file its HTTPS client trusts instead of the system's roots (HTTP providers).
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        match self {
            ProviderConfig::Twilio(twilio) => twilio.ca_file.as_deref(),
            ProviderConfig::Http(http) => http.ca_file.as_deref(),
            ProviderConfig::Apns(apns) => apns.ca_file.as_deref(),
            ProviderConfig::Fcm(fcm) => fcm.ca_file.as_deref(),
            ProviderConfig::Sandbox { .. } | ProviderConfig::Smpp(_) => None,
        }
    }

    /// Its circuit-breaker settings.
    pub fn breaker(&self) -> &BreakerConfig {
        match self {
            ProviderConfig::Sandbox { breaker, .. } => breaker,
            ProviderConfig::Twilio(twilio) => &twilio.breaker,
            ProviderConfig::Http(http) => &http.breaker,
            ProviderConfig::Smpp(smpp) => &smpp.breaker,
            ProviderConfig::Apns(apns) => &apns.breaker,
            ProviderConfig::Fcm(fcm) => &fcm.breaker,
        }
    }

    /// The channels it can carry: SMPP binds SMS only, push services push only.
    pub fn carries(&self, channel: Channel) -> bool {
        match self {
            ProviderConfig::Smpp(_) => channel == Channel::Sms,
            ProviderConfig::Apns(_) | ProviderConfig::Fcm(_) => channel == Channel::Push,
            _ => true,
        }
    }

    /// Why it cannot carry `channel`, for the configuration error.
    fn carries_only(&self) -> &'static str {
        match self {
            ProviderConfig::Smpp(_) => "an SMPP bind, which carries SMS only",
            ProviderConfig::Apns(_) => "an APNs credential, which carries push only",
            ProviderConfig::Fcm(_) => "an FCM project, which carries push only",
            _ => "a provider that carries every channel",
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A tracing filter directive.
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A URL that may carry a password: shown with the password replaced by `•••`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, for logs and messages.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.clone();
        };
        let authority_end = url[scheme_end..]
            .find('/')
            .map_or(url.len(), |i| scheme_end + i);
        match url[scheme_end..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &url[scheme_end..scheme_end + at];
                let user = userinfo.split(':').next().unwrap_or_default();
                let masked = if userinfo.contains(':') {
                    format!("{user}:•••")
                } else {
                    user.into()
                };
                format!("{}{masked}{}", &url[..scheme_end], &url[scheme_end + at..])
            }
            None => url.clone(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn validate_retry(key: &str, retry: &RetryConfig) -> Result<(), ConfigError> {
    let initial = positive(&format!("{key}.initial_interval"), retry.initial_interval)?;
    let max = positive(&format!("{key}.max_interval"), retry.max_interval)?;
    if max < initial {
        return Err(invalid(
            format!("{key}.max_interval"),
            "must not be shorter than initial_interval",
        ));
    }
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        return Err(invalid(
            format!("{key}.multiplier"),
            "must be a number of at least 1.0",
        ));
    }
    if retry.max_attempts == 0 {
        return Err(invalid(
            format!("{key}.max_attempts"),
            "must be at least 1 (the first call counts)",
        ));
    }
    Ok(())
}

fn validate_smpp(name: &str, smpp: &SmppProviderConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("providers.{name}.{field}");
    let (host, port) = smpp.address.rsplit_once(':').unwrap_or_default();
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(
            key("address"),
            format!("`{}` is not host:port", smpp.address),
        ));
    }
    // SMPP 3.4 field sizes (C-octet strings, without the terminating NUL).
    for (field, value, max) in [
        ("system_id", smpp.system_id.as_str(), 15),
        ("password", smpp.password.expose(), 8),
        ("system_type", smpp.system_type.as_str(), 12),
        ("source_addr", smpp.source_addr.as_str(), 20),
    ] {
        if value.len() > max || !value.is_ascii() {
            return Err(invalid(
                key(field),
                format!("must be at most {max} ASCII characters (SMPP 3.4)"),
            ));
        }
    }
    if smpp.system_id.is_empty() {
        return Err(invalid(key("system_id"), "is empty"));
    }
    if smpp.source_addr.is_empty() {
        return Err(invalid(key("source_addr"), "is empty"));
    }
    if smpp.window == 0 {
        return Err(invalid(key("window"), "must be at least 1"));
    }
    if !(smpp.throughput.is_finite() && smpp.throughput > 0.0) {
        return Err(invalid(
            key("throughput"),
            "must be a positive number of submits per second",
        ));
    }
    positive(&key("enquire_link_interval"), smpp.enquire_link_interval)?;
    positive(&key("response_timeout"), smpp.response_timeout)?;
    let initial = positive(&key("reconnect_initial"), smpp.reconnect_initial)?;
    if positive(&key("reconnect_max"), smpp.reconnect_max)? < initial {
        return Err(invalid(
            key("reconnect_max"),
            "must not be shorter than reconnect_initial",
        ));
    }
    Ok(())
}

fn validate_apns(name: &str, apns: &ApnsProviderConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("providers.{name}.{field}");
    for (field, value) in [("team_id", &apns.team_id), ("key_id", &apns.key_id)] {
        if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(invalid(
                key(field),
                format!("`{value}` is not a 10-character Apple id"),
            ));
        }
    }
    match (&apns.key_file, &apns.key) {
        (None, None) => {
            return Err(invalid(
                key("key_file"),
                "set `key_file` (the .p8 file) or `key` (its PEM text)",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(invalid(key("key"), "set `key_file` or `key`, not both"));
        }
        _ => {}
    }
    if apns.topics.is_empty() {
        return Err(invalid(key("topics"), "names no app (bundle id)"));
    }
    if let Some(topic) = apns
        .topics
        .iter()
        .find(|t| t.is_empty() || t.contains(char::is_whitespace))
    {
        return Err(invalid(
            key("topics"),
            format!("`{topic}` is not a bundle id"),
        ));
    }
    if let Some(url) = apns.base_url.as_deref()
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(invalid(key("base_url"), "must be an http(s) URL"));
    }
    Ok(())
}

fn validate_fcm(name: &str, fcm: &FcmProviderConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("providers.{name}.{field}");
    match (&fcm.service_account_file, &fcm.service_account) {
        (None, None) => Err(invalid(
            key("service_account_file"),
            "set `service_account_file` (the JSON key file) or `service_account` (its text)",
        )),
        (Some(_), Some(_)) => Err(invalid(
            key("service_account"),
            "set `service_account_file` or `service_account`, not both",
        )),
        _ if !(fcm.base_url.starts_with("https://") || fcm.base_url.starts_with("http://")) => {
            Err(invalid(key("base_url"), "must be an http(s) URL"))
        }
        _ => Ok(()),
    }
}

fn validate_breaker(key: &str, breaker: &BreakerConfig) -> Result<(), ConfigError> {
    if breaker.consecutive_failures == 0 {
        return Err(invalid(
            format!("{key}.consecutive_failures"),
            "must be at least 1",
        ));
    }
    if !(breaker.error_rate > 0.0 && breaker.error_rate <= 1.0) {
        return Err(invalid(
            format!("{key}.error_rate"),
            "must be above 0 and at most 1",
        ));
    }
    if breaker.window == 0 {
        return Err(invalid(format!("{key}.window"), "must be at least 1"));
    }
    if breaker.min_calls == 0 || breaker.min_calls > breaker.window {
        return Err(invalid(
            format!("{key}.min_calls"),
            "must be between 1 and window",
        ));
    }
    positive(&format!("{key}.cool_down"), breaker.cool_down)?;
    Ok(())
}

/// A reconnect schedule that never gives up: exponential (with the crate's jitter) from
/// `initial` up to `max`, both validated settings. Returns the schedule and its ceiling.
pub fn reconnect_backoff(
    initial: SignedDuration,
    max: SignedDuration,
) -> (backoff::ExponentialBackoff, Duration) {
    let initial = positive("reconnect_initial", initial).unwrap_or(Duration::from_millis(500));
    let max = positive("reconnect_max", max)
        .unwrap_or(Duration::from_secs(30))
        .max(initial);
    let schedule = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(initial)
        .with_max_interval(max)
        .with_max_elapsed_time(None)
        .build();
    (schedule, max)
}

/// A positive duration from the configuration, as a `std` duration.
pub fn positive(key: &str, value: SignedDuration) -> Result<Duration, ConfigError> {
    if value.is_positive() {
        Ok(value.unsigned_abs())
    } else {
        Err(invalid(
            key,
            format!("must be a positive duration, got {value:#}"),
        ))
    }
}

impl Config {
    /// Loads defaults, then `file` (if given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment(file))
    }

    /// The layered sources, for callers that add their own (tests).
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// Extracts and validates a configuration from `figment`.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// A route (at `key`) for `channel`: not empty, only configured providers, each able to
    /// carry the channel.
    fn validate_route(
        &self,
        key: &str,
        channel: Channel,
        route: &[String],
    ) -> Result<(), ConfigError> {
        if route.is_empty() {
            return Err(invalid(key, "names no provider"));
        }
        for name in route {
            match self.providers.get(name) {
                None => {
                    return Err(invalid(
                        key,
                        format!("names `{name}`, which is not under [providers]"),
                    ));
                }
                Some(provider) if !provider.carries(channel) => {
                    return Err(invalid(
                        key,
                        format!("`{name}` is {}", provider.carries_only()),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        let uri = amqp
            .url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| invalid("amqp.url", format!("not an AMQP URL ({e}): {}", amqp.url)))?;
        if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
            return Err(invalid(
                "amqp.url",
                "amqps:// (TLS) is not built into this release yet: use amqp:// (or a local TLS-terminating proxy)",
            ));
        }
        if amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        let initial = positive("amqp.reconnect_initial", amqp.reconnect_initial)?;
        let max = positive("amqp.reconnect_max", amqp.reconnect_max)?;
        if max < initial {
            return Err(invalid(
                "amqp.reconnect_max",
                "must not be shorter than amqp.reconnect_initial",
            ));
        }
        for (key, name) in [
            ("amqp.jobs_exchange", &amqp.jobs_exchange),
            ("amqp.jobs_queue", &amqp.jobs_queue),
            ("amqp.dead_letter_exchange", &amqp.dead_letter_exchange),
            ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
            ("amqp.events_exchange", &amqp.events_exchange),
        ] {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                return Err(invalid(
                    key,
                    "must be 1 to 255 bytes and not start with `amq.`",
                ));
            }
        }
        if amqp.delivery_limit == 0 {
            return Err(invalid("amqp.delivery_limit", "must be at least 1"));
        }
        if !self.store.url.starts_with("sqlite:") {
            return Err(invalid(
                "store.url",
                format!(
                    "only sqlite://PATH is supported so far, got `{}`",
                    self.store.url
                ),
            ));
        }
        if self.delivery.max_in_flight == 0 {
            return Err(invalid("delivery.max_in_flight", "must be at least 1"));
        }
        positive("delivery.provider_timeout", self.delivery.provider_timeout)?;
        positive("delivery.shutdown_grace", self.delivery.shutdown_grace)?;
        for channel in Channel::DEFAULT_ORDER {
            let key = format!("routes.{channel}");
            self.validate_route(&key, channel, self.routes.for_channel(channel))?;
        }
        for (name, provider) in &self.providers {
            if provider.max_concurrent_calls() == 0 {
                return Err(invalid(
                    format!("providers.{name}.max_concurrent_calls"),
                    "must be at least 1",
                ));
            }
            match provider {
                ProviderConfig::Sandbox { outbox, .. } if outbox.as_os_str().is_empty() => {
                    return Err(invalid(format!("providers.{name}.outbox"), "is empty"));
                }
                ProviderConfig::Sandbox { .. } => {}
                ProviderConfig::Http(http) => {
                    let key = |field: &str| format!("providers.{name}.{field}");
                    if !(http.url.starts_with("https://") || http.url.starts_with("http://")) {
                        return Err(invalid(key("url"), "must be an http(s) URL"));
                    }
                    if http.method.parse::<axum::http::Method>().is_err() {
                        return Err(invalid(
                            key("method"),
                            format!("`{}` is not an HTTP method", http.method),
                        ));
                    }
                    if http.body.is_empty() {
                        return Err(invalid(key("body"), "is empty"));
                    }
                    for (field, pointer) in [
                        ("message_id_field", &http.message_id_field),
                        ("error_code_field", &http.error_code_field),
                        ("error_message_field", &http.error_message_field),
                    ] {
                        if pointer.as_deref().is_some_and(|p| !p.starts_with('/')) {
                            return Err(invalid(
                                key(field),
                                "must be a JSON pointer, e.g. /error/code",
                            ));
                        }
                    }
                }
                ProviderConfig::Twilio(TwilioProviderConfig {
                    account_sid,
                    auth_token,
                    from,
                    messaging_service_sid,
                    base_url,
                    ..
                }) => {
                    let key = |field: &str| format!("providers.{name}.{field}");
                    if !account_sid.starts_with("AC") {
                        return Err(invalid(key("account_sid"), "must be the account SID (AC…)"));
                    }
                    if auth_token.expose().is_empty() {
                        return Err(invalid(key("auth_token"), "is empty"));
                    }
                    if from.is_none() && messaging_service_sid.is_none() {
                        return Err(invalid(
                            key("from"),
                            "set `from` (E.164) or `messaging_service_sid`",
                        ));
                    }
                    if let Some(from) = from.as_deref().filter(|f| !crate::domain::is_e164(f)) {
                        return Err(invalid(
                            key("from"),
                            format!("`{from}` is not an E.164 number"),
                        ));
                    }
                    if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
                        return Err(invalid(key("base_url"), "must be an http(s) URL"));
                    }
                }
                ProviderConfig::Smpp(smpp) => validate_smpp(name, smpp)?,
                ProviderConfig::Apns(apns) => validate_apns(name, apns)?,
                ProviderConfig::Fcm(fcm) => validate_fcm(name, fcm)?,
            }
            validate_retry(&format!("providers.{name}.retry"), provider.retry())?;
            validate_breaker(&format!("providers.{name}.breaker"), provider.breaker())?;
        }
        for channel in [Channel::Sms, Channel::Voice] {
            let routes = self
                .routes
                .by_prefix
                .for_channel(channel)
                .into_iter()
                .flatten();
            for (prefix, providers) in routes {
                let key = format!("routes.by_prefix.{channel}.\"{prefix}\"");
                let digits = prefix.strip_prefix('+').unwrap_or_default();
                if digits.is_empty()
                    || digits.len() > 7
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(invalid(
                        key,
                        "a prefix is + and 1 to 7 digits, e.g. \"+1\" or \"+4915\"",
                    ));
                }
                self.validate_route(&key, channel, providers)?;
            }
        }
        MessageTemplates::new(&self.templates).map_err(|e| invalid(e.key, e.problem))?;
        for (tenant, settings) in &self.tenants {
            if let Some(problem) = settings.autofill.problem() {
                return Err(invalid(format!("tenants.{tenant}.autofill"), problem));
            }
            if settings
                .app_name
                .as_deref()
                .is_some_and(|n| n.trim().is_empty())
            {
                return Err(invalid(
                    format!("tenants.{tenant}.app_name"),
                    "must not be empty",
                ));
            }
            for channel in [Channel::Sms, Channel::Voice] {
                let rule = settings
                    .destinations
                    .for_channel(channel)
                    .expect("sms and voice have rules");
                for (list, codes) in [("allow", &rule.allow), ("deny", &rule.deny)] {
                    if let Some(bad) = codes.iter().find(|c| {
                        !crate::policy::destination::is_known_country(&c.to_ascii_uppercase())
                    }) {
                        return Err(invalid(
                            format!("tenants.{tenant}.destinations.{channel}.{list}"),
                            format!(
                                "`{bad}` is not an ISO 3166 country code (e.g. \"US\", \"DE\")"
                            ),
                        ));
                    }
                }
            }
        }
        positive("delivery.push_ack_timeout", self.delivery.push_ack_timeout)?;
        positive("delivery.retry_after_max", self.delivery.retry_after_max)?;
        if self.delivery.circuit_wait.is_negative() {
            return Err(invalid("delivery.circuit_wait", "must not be negative"));
        }
        if self.delivery.receipt_wait.is_negative() {
            return Err(invalid("delivery.receipt_wait", "must not be negative"));
        }
        if self.delivery.expiry_margin.is_negative() {
            return Err(invalid("delivery.expiry_margin", "must not be negative"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    #[test]
    fn the_embedded_defaults_are_valid() {
        let config = Config::from_figment(Figment::from(Toml::string(DEFAULT_TOML))).unwrap();
        assert_eq!(config.amqp.jobs_queue, "otp.send-code");
        assert_eq!(config.routes.sms, ["sandbox"]);
        assert_eq!(
            config.delivery.shutdown_grace,
            SignedDuration::from_secs(10)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.prefetch", 0));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("amqp.prefetch"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("routes.sms", ["twilio"]));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(
            err.contains("routes.sms") && err.contains("twilio"),
            "{err}"
        );

        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.url", "amqps://u:p@broker/%2f"));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("amqp.url") && err.contains("TLS"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "providers.sandbox.retry.multiplier",
            0.5,
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("providers.sandbox.retry.multiplier"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "routes.by_prefix.sms",
            serde_json::json!({"1": ["sandbox"]}),
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("routes.by_prefix.sms"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "tenants.acme.destinations.sms.allow",
            ["US", "Germany"],
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(
            err.contains("tenants.acme.destinations.sms.allow") && err.contains("Germany"),
            "{err}"
        );

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "providers.sandbox.max_concurrent_calls",
            0,
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(
            err.contains("providers.sandbox.max_concurrent_calls"),
            "{err}"
        );

        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.prefetch", "many"));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("prefetch"), "{err}");
    }

    #[test]
    fn push_providers_are_checked_and_kept_to_push() {
        let apns = serde_json::json!({
            "kind": "apns", "team_id": "TEAM123456", "key_id": "KEY1234567",
            "key_file": "/run/secrets/AuthKey.p8", "topics": ["com.example.app"],
        });
        let with = |key: &str, value: serde_json::Value| {
            let mut provider = apns.clone();
            provider[key] = value;
            Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("providers.apns", provider))
        };
        let config = Config::from_figment(with("environment", "sandbox".into())).unwrap();
        match &config.providers["apns"] {
            ProviderConfig::Apns(apns) => {
                assert_eq!(apns.endpoint(), "https://api.sandbox.push.apple.com")
            }
            other => panic!("{other:?}"),
        }
        for (key, value, named) in [
            ("team_id", "TEAM".into(), "providers.apns.team_id"),
            (
                "key_file",
                serde_json::Value::Null,
                "providers.apns.key_file",
            ),
            (
                "key",
                "-----BEGIN PRIVATE KEY-----".into(),
                "providers.apns.key",
            ),
            ("topics", serde_json::json!([]), "providers.apns.topics"),
            ("environment", "staging".into(), "staging"),
        ] {
            let err = Config::from_figment(with(key, value))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}: {err}");
        }
        let err = Config::from_figment(
            with("environment", "production".into())
                .merge(Serialized::default("routes.sms", ["apns"])),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("routes.sms") && err.contains("carries push only"),
            "{err}"
        );
        let err = Config::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(
            Serialized::default("providers.fcm", serde_json::json!({"kind": "fcm"})),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("providers.fcm.service_account_file"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OTP_GATEWAY_AMQP__PREFETCH", "7");
            jail.set_env("OTP_GATEWAY_DELIVERY__MAX_IN_FLIGHT", "3");
            let config = Config::load(None).unwrap();
            assert_eq!(config.amqp.prefetch, 7);
            assert_eq!(config.delivery.max_in_flight, 3);
            Ok(())
        });
    }

    #[test]
    fn the_broker_password_never_shows() {
        let url = SecretUrl::new("amqp://guest:hunter2@broker:5672/%2f");
        assert_eq!(url.redacted(), "amqp://guest:•••@broker:5672/%2f");
        let config = Config::from_figment(
            Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("amqp.url", "amqp://u:hunter2@h/%2f")),
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(SecretUrl::new("amqp://h:5672").redacted(), "amqp://h:5672");
    }
}
