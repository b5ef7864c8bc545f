//! Providers: the [`Provider`] trait every adapter implements, the typed error that carries a
//! failure's class, and the registry that builds the configured providers by name.
//! Adapters classify what the provider said; they never retry (the delivery layer decides).

mod apns;
mod fcm;
mod http;
mod sandbox;
mod settings;
mod signing;
pub mod smpp;
mod twilio;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use tokio::sync::mpsc;

use crate::domain::{
    AttemptOutcome, Channel, Code, FailureReason, Platform, RetryClass, SmsShape, Target,
};

pub use apns::{ApnsEnvironment, ApnsProvider, ApnsSettings};
pub use fcm::{FcmProvider, FcmSettings};
pub use http::{HttpProvider, HttpSettings};
pub use sandbox::{SandboxProvider, SandboxSettings};
pub use settings::{
    BreakerConfig, BuildContext, DEFAULT_MAX_CONCURRENT_CALLS, KindSettings, PrefixRoutes,
    ProviderKind, ProviderSettings, RetryConfig, RoutesConfig, SharedSettings,
};
pub use smpp::{SmppProvider, SmppSettings};
pub use twilio::{
    TwilioProvider, TwilioSettings, callback_url as twilio_callback_url,
    classify as classify_twilio,
};

/// Who a message goes to, unmasked: only adapters see this.
#[derive(Debug, Clone, Copy)]
pub enum Recipient<'a> {
    /// A phone number (SMS, voice).
    Phone(&'a str),
    /// A device token (push).
    Device {
        /// The push platform.
        platform: Platform,
        /// The device token.
        token: &'a str,
        /// APNs topic or FCM project.
        topic: Option<&'a str>,
    },
}

impl<'a> Recipient<'a> {
    /// Who a job's target is.
    pub fn of(target: &'a Target) -> Self {
        match target {
            Target::Phone(phone) => Recipient::Phone(&phone.number),
            Target::Device(device) => Recipient::Device {
                platform: device.platform,
                token: &device.token,
                topic: device.topic.as_deref(),
            },
        }
    }
}

/// One message for one recipient on one channel.
#[derive(Debug)]
pub struct OutboundMessage<'a> {
    /// `tenant/job_id`, for idempotency keys and logs.
    pub delivery_id: &'a str,
    /// The channel.
    pub channel: Channel,
    /// The recipient.
    pub recipient: Recipient<'a>,
    /// The recipient as it may be logged.
    pub masked_recipient: &'a str,
    /// The rendered text (contains the code).
    pub text: &'a str,
    /// The text's language (BCP 47 with region, e.g. `de-DE`), for text-to-speech.
    pub language: &'a str,
    /// For SMS: the encoding and segment count the text needs.
    pub sms: Option<SmsShape>,
    /// The code on its own, for push payloads that let the app fill it in.
    pub code: &'a Code,
    /// Nothing may be delivered after this.
    pub expires_at: Timestamp,
    /// For a push: the token the device's acknowledgement (`AcknowledgeDelivery`) must carry.
    pub ack_token: Option<&'a str>,
}

/// What a provider says when it accepts a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderAccept {
    /// The provider's id for the message, if it gives one.
    pub message_id: Option<String>,
}

/// A provider's refusal or failure, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({}): {raw_message}", raw_code.as_deref().unwrap_or("-"))]
pub struct ProviderError {
    /// Where the failure sits in the taxonomy.
    pub reason: FailureReason,
    /// What the delivery layer should do next.
    pub class: RetryClass,
    /// The provider's own error code, verbatim.
    pub raw_code: Option<String>,
    /// The provider's own message, verbatim.
    pub raw_message: String,
    /// How long the provider asked us to wait, if it did.
    pub retry_after: Option<Duration>,
    /// For a dead device token: since when the push service has known it is invalid (APNs'
    /// `timestamp` on a 410).
    pub token_invalid_since: Option<Timestamp>,
}

impl ProviderError {
    /// An error with the reason's default class.
    pub fn new(
        reason: FailureReason,
        raw_code: Option<&str>,
        raw_message: impl Into<String>,
    ) -> Self {
        ProviderError {
            reason,
            class: reason.retry_class(),
            raw_code: raw_code.map(str::to_owned),
            raw_message: crate::domain::scrub(&raw_message.into()),
            retry_after: None,
            token_invalid_since: None,
        }
    }

    /// The same error with another retry class.
    pub fn with_class(mut self, class: RetryClass) -> Self {
        self.class = class;
        self
    }

    /// The same error with the wait the provider asked for.
    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }
}

/// A delivery provider (a carrier, a push service, or the sandbox).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The configured name, as used in routes and reports.
    fn name(&self) -> &str;

    /// Whether it can reach `recipient` at all: push credentials serve their own apps
    /// (APNs topics, FCM projects) only, so a route's providers are filtered by the device.
    fn serves(&self, _recipient: &Recipient<'_>) -> bool {
        true
    }

    /// The app a device without a topic is pushed under by this credential (APNs: its first
    /// topic; FCM: its project); `None` for providers that are not app credentials.
    fn default_app(&self) -> Option<&str> {
        None
    }

    /// Hands one message to the provider.
    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError>;

    /// Whether the provider reports the fate of an accepted message later (a delivery receipt
    /// for `channel`), so that the engine may wait for a failure receipt before letting go.
    fn sends_receipts(&self, _channel: Channel) -> bool {
        false
    }

    /// Whether a delivery receipt for a message accepted on `channel` can reach the gateway at
    /// all, even where the engine does not wait for one: the ledger matches receipts only to
    /// the calls of providers that may send them.
    fn may_send_receipts(&self, channel: Channel) -> bool {
        self.sends_receipts(channel)
    }
}

/// The wait a response's `Retry-After` asks for: seconds, or an HTTP date (its distance from
/// now).
pub(crate) fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Some(
        at.duration_since(Timestamp::now())
            .max(jiff::SignedDuration::ZERO)
            .unsigned_abs(),
    )
}

/// Sends `request` inside an HTTP client span, a child of the provider attempt's span, named
/// and attributed per OpenTelemetry's HTTP conventions when traces are on: the method as its
/// name; `http.request.method`, `server.address`, `server.port` and `url.scheme`; from the
/// answer `http.response.status_code` and `network.protocol.version`; `error.type` (the status
/// code, or `timeout`, `connect` or `request` when no answer came) when it failed. The URL's
/// path and query are left out: they can hold a device token or a phone number.
pub(crate) async fn send_traced(
    request: reqwest::RequestBuilder,
) -> reqwest::Result<reqwest::Response> {
    use tracing::Instrument;
    let (client, request) = request.build_split();
    let request = request?;
    let span = tracing::info_span!(
        "http",
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let url = request.url();
    crate::telemetry::describe(
        &span,
        "client",
        || request.method().as_str().to_owned(),
        || {
            let mut attributes = vec![
                ("http.request.method", request.method().as_str().to_owned()),
                ("url.scheme", url.scheme().to_owned()),
            ];
            if let Some(host) = url.host_str() {
                attributes.push(("server.address", host.to_owned()));
            }
            if let Some(port) = url.port_or_known_default() {
                attributes.push(("server.port", port.to_string()));
            }
            attributes
        },
    );
    let sent = client.execute(request).instrument(span.clone()).await;
    let failed = match &sent {
        Ok(response) => {
            let status = response.status();
            let version = match response.version() {
                reqwest::Version::HTTP_09 => "0.9",
                reqwest::Version::HTTP_10 => "1.0",
                reqwest::Version::HTTP_11 => "1.1",
                reqwest::Version::HTTP_2 => "2",
                reqwest::Version::HTTP_3 => "3",
                _ => "",
            };
            crate::telemetry::annotate(&span, || {
                vec![
                    (
                        "http.response.status_code",
                        i64::from(status.as_u16()).into(),
                    ),
                    ("network.protocol.version", version.into()),
                ]
            });
            (status.is_client_error() || status.is_server_error())
                .then(|| status.as_u16().to_string())
        }
        Err(error) if error.is_timeout() => Some("timeout".to_owned()),
        Err(error) if error.is_connect() => Some("connect".to_owned()),
        Err(_) => Some("request".to_owned()),
    };
    if let Some(kind) = failed {
        crate::telemetry::mark_failed(&span);
        crate::telemetry::annotate(&span, || vec![("error.type", kind.into())]);
    }
    sent
}

/// A request that got no response: `PROVIDER_TIMEOUT` when it timed out, else
/// `PROVIDER_UNAVAILABLE`. The URL is left out of the message: it may hold a device token.
pub(crate) fn unreachable(who: &str, error: reqwest::Error) -> ProviderError {
    let reason = if error.is_timeout() {
        FailureReason::ProviderTimeout
    } else {
        FailureReason::ProviderUnavailable
    };
    let error = error.without_url();
    let mut message = format!("cannot reach {who}: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ProviderError::new(reason, None, message)
}

/// An HTTP client builder with TLS on ring (the one crypto library linked in), trusting the
/// certificates in `ca_file` (provider `name`'s setting) instead of the system's roots when set.
pub(crate) fn http_client_builder(
    name: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::ClientBuilder, String> {
    // Fails harmlessly once installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder();
    let Some(path) = ca_file else {
        return Ok(builder);
    };
    let problem = |what: String| format!("providers.{name}.ca_file: {what}");
    let pem =
        std::fs::read(path).map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| problem(format!("{} holds no PEM certificates: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(problem(format!(
            "{} holds no PEM certificates",
            path.display()
        )));
    }
    Ok(builder.tls_certs_only(certificates))
}

/// An HTTP/2-only client: one connection per host carries every request (no handshake per
/// push), kept open and checked with pings while idle. Over `https://` HTTP/2 is agreed in the
/// TLS handshake (ALPN); over `http://` it is spoken from the first byte (prior knowledge,
/// "h2c"), which is what a local test server or a TLS-terminating sidecar must accept.
pub(crate) fn http2_client(
    name: &str,
    ca_file: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    http_client_builder(name, ca_file)?
        .http2_prior_knowledge()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(None)
        .http2_keep_alive_interval(Duration::from_secs(60))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .build()
        .map_err(|e| e.to_string())
}

/// A secret from a file or inline, as the configuration gives it.
pub(crate) fn read_secret(
    name: &str,
    file_key: &str,
    file: Option<&std::path::Path>,
    inline: Option<&crate::domain::SecretString>,
) -> Result<String, String> {
    match (file, inline) {
        (Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
            format!(
                "providers.{name}.{file_key}: cannot read `{}`: {e}",
                path.display()
            )
        }),
        (None, Some(secret)) => Ok(secret.expose().to_owned()),
        (None, None) => Err(format!("providers.{name}.{file_key} is not set")),
    }
}

/// A provider's later word on a message it accepted: delivered, or failed and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReceipt {
    /// The provider's configured name.
    pub provider: String,
    /// The provider's id of the message (as returned when it accepted it).
    pub message_id: String,
    /// Delivered or failed.
    pub outcome: AttemptOutcome,
    /// Why it failed.
    pub reason: Option<FailureReason>,
    /// The provider's own error code, verbatim.
    pub code: Option<String>,
    /// What the provider said, e.g. `status callback: undelivered` or `deliver_sm: stat UNDELIV`.
    pub detail: String,
}

/// A provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[error("provider `{name}`: {problem}")]
pub struct ProviderBuildError {
    /// The provider's configured name.
    pub name: String,
    /// What went wrong.
    pub problem: String,
}

/// One configured provider with its settings.
#[derive(Clone)]
pub struct ProviderEntry {
    /// The adapter.
    pub provider: Arc<dyn Provider>,
    /// The adapter's kind (`sandbox`, `twilio`, ...).
    pub kind: &'static str,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Circuit-breaker settings.
    pub breaker: BreakerConfig,
    /// One permit per call that may be open at once (`max_concurrent_calls`).
    pub calls: Arc<tokio::sync::Semaphore>,
    /// How many permits `calls` has in all.
    pub call_limit: usize,
}

impl ProviderEntry {
    /// The provider's configured name.
    pub fn name(&self) -> &str {
        self.provider.name()
    }
}

/// A route: the matched destination prefix (if any) and its providers in failover order.
pub struct Route<'a> {
    /// The destination prefix whose route was chosen; `None` for the channel's default route.
    pub prefix: Option<&'a str>,
    /// Providers, in the order to try them.
    pub providers: Vec<&'a ProviderEntry>,
    /// For a device without a topic: the app it is pushed under (the first serving
    /// credential's default app); every provider in the route serves that app.
    pub app: Option<&'a str>,
}

impl<'a> Route<'a> {
    /// The recipient as the route's providers must address it (a topic-less device under the
    /// route's app).
    pub fn recipient<'r>(&self, recipient: Recipient<'r>) -> Recipient<'r>
    where
        'a: 'r,
    {
        match (recipient, self.app) {
            (
                Recipient::Device {
                    platform,
                    token,
                    topic: None,
                },
                Some(app),
            ) => Recipient::Device {
                platform,
                token,
                topic: Some(app),
            },
            _ => recipient,
        }
    }
}

/// The configured providers by name, and the routes per channel and destination prefix.
#[derive(Clone)]
pub struct ProviderRegistry {
    by_name: BTreeMap<String, ProviderEntry>,
    /// The routes resolved to providers (names checked when built).
    routes: ResolvedRoutes,
    /// Receipts that arrive on provider sessions (SMPP deliver_sm), until taken.
    receipts: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<ProviderReceipt>>>>,
}

impl std::fmt::Debug for ProviderRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderRegistry")
            .field("providers", &self.by_name.keys())
            .finish()
    }
}

impl ProviderRegistry {
    /// Builds every provider in `providers` (validated settings) and takes the `routes`;
    /// `provider_timeout` bounds each call, `receipts_public_url` is where providers' callbacks
    /// reach this gateway ("" when unknown). The providers named in `replacements` use the
    /// given implementations (with their settings and routes): tests plug in here.
    pub async fn build(
        providers: &BTreeMap<String, ProviderSettings>,
        routes: &RoutesConfig,
        provider_timeout: Duration,
        receipts_public_url: &str,
        mut replacements: BTreeMap<String, Arc<dyn Provider>>,
    ) -> Result<Self, ProviderBuildError> {
        let (receipts, receipt_rx) = mpsc::unbounded_channel();
        let context = BuildContext {
            provider_timeout,
            receipts: &receipts,
            receipts_public_url,
        };
        let mut by_name = BTreeMap::new();
        for (name, settings) in providers {
            let provider = match replacements.remove(name) {
                Some(replacement) => replacement,
                None => settings
                    .kind
                    .provider_kind()
                    .build(name, &context)
                    .await
                    .map_err(|problem| ProviderBuildError {
                        name: name.clone(),
                        problem,
                    })?,
            };
            let call_limit = settings.shared.max_concurrent_calls as usize;
            let entry = ProviderEntry {
                provider,
                kind: settings.kind.name(),
                retry: settings.shared.retry.clone(),
                breaker: settings.shared.breaker.clone(),
                calls: Arc::new(tokio::sync::Semaphore::new(call_limit)),
                call_limit,
            };
            by_name.insert(name.clone(), entry);
        }
        if let Some(name) = replacements.keys().next() {
            return Err(ProviderBuildError {
                name: name.clone(),
                problem: "replaces no configured provider".into(),
            });
        }
        let routes = ResolvedRoutes::resolve(routes, &by_name)?;
        Ok(ProviderRegistry {
            by_name,
            routes,
            receipts: Arc::new(std::sync::Mutex::new(Some(receipt_rx))),
        })
    }

    /// The receipts providers receive on their own sessions (SMPP deliver_sm), for the
    /// receipts module to apply; `None` once taken.
    pub fn take_receipts(&self) -> Option<mpsc::UnboundedReceiver<ProviderReceipt>> {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The route for `channel` to `recipient`: for a number the longest matching prefix route,
    /// else the channel's default route; only the providers that serve the recipient (a
    /// device's push credential for its app).
    pub fn route(&self, channel: Channel, recipient: &Recipient<'_>) -> Route<'_> {
        let number = match recipient {
            Recipient::Phone(number) => Some(*number),
            Recipient::Device { .. } => None,
        };
        let (prefix, route) = self.routes.for_recipient(channel, number);
        let serving = |recipient: &Recipient<'_>| -> Vec<&ProviderEntry> {
            route
                .iter()
                .filter(|entry| entry.provider.serves(recipient))
                .collect()
        };
        let providers = serving(recipient);
        // A device without a topic belongs to one app all the same: the platform's default
        // app, that of the first credential in the route serving the platform. Failover stays
        // within credentials of that app (another app's key would be refused by the push
        // service as DeviceTokenNotForTopic / SENDER_ID_MISMATCH).
        if let Recipient::Device {
            platform,
            token,
            topic: None,
        } = *recipient
            && let Some(app) = providers.first().and_then(|e| e.provider.default_app())
        {
            let scoped = Recipient::Device {
                platform,
                token,
                topic: Some(app),
            };
            return Route {
                prefix,
                providers: serving(&scoped),
                app: Some(app),
            };
        }
        Route {
            prefix,
            providers,
            app: None,
        }
    }

    /// Every provider, by name.
    pub fn entries(&self) -> impl Iterator<Item = &ProviderEntry> {
        self.by_name.values()
    }

    /// A provider by its configured name.
    pub fn get(&self, name: &str) -> Option<&ProviderEntry> {
        self.by_name.get(name)
    }
}

/// The routes with their providers looked up once: per channel the default route, and for SMS
/// and voice the prefix routes, longest prefix first.
#[derive(Clone)]
struct ResolvedRoutes {
    /// Push, SMS, voice.
    default: [Vec<ProviderEntry>; 3],
    /// SMS and voice: (prefix, providers), longest prefix first.
    by_prefix: [Vec<(String, Vec<ProviderEntry>)>; 2],
}

impl ResolvedRoutes {
    fn resolve(
        routes: &RoutesConfig,
        by_name: &BTreeMap<String, ProviderEntry>,
    ) -> Result<Self, ProviderBuildError> {
        let entries = |names: &[String]| -> Result<Vec<ProviderEntry>, ProviderBuildError> {
            names
                .iter()
                .map(|name| {
                    by_name
                        .get(name)
                        .cloned()
                        .ok_or_else(|| ProviderBuildError {
                            name: name.clone(),
                            problem: "is routed but not configured".into(),
                        })
                })
                .collect()
        };
        let prefixes =
            |channel: Channel| -> Result<Vec<(String, Vec<ProviderEntry>)>, ProviderBuildError> {
                let mut routes = routes
                    .by_prefix
                    .for_channel(channel)
                    .into_iter()
                    .flatten()
                    .map(|(prefix, names)| Ok((prefix.clone(), entries(names)?)))
                    .collect::<Result<Vec<_>, ProviderBuildError>>()?;
                routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
                Ok(routes)
            };
        Ok(ResolvedRoutes {
            default: [
                entries(routes.for_channel(Channel::Push))?,
                entries(routes.for_channel(Channel::Sms))?,
                entries(routes.for_channel(Channel::Voice))?,
            ],
            by_prefix: [prefixes(Channel::Sms)?, prefixes(Channel::Voice)?],
        })
    }

    /// The route for `channel` to `number` (none for a device): the longest matching prefix
    /// route, else the channel's default route.
    fn for_recipient(
        &self,
        channel: Channel,
        number: Option<&str>,
    ) -> (Option<&str>, &[ProviderEntry]) {
        let (default, by_prefix) = match channel {
            Channel::Push => (&self.default[0], None),
            Channel::Sms => (&self.default[1], Some(&self.by_prefix[0])),
            Channel::Voice => (&self.default[2], Some(&self.by_prefix[1])),
        };
        let matched = number.zip(by_prefix).and_then(|(number, routes)| {
            routes
                .iter()
                .find(|(prefix, _)| number.starts_with(prefix.as_str()))
        });
        match matched {
            Some((prefix, providers)) => (Some(prefix.as_str()), providers),
            None => (None, default),
        }
    }
}
