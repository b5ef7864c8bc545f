//! Apple Push Notification service, token-based, over HTTP/2: one connection pool per
//! credential with every push multiplexed on it, an ES256 provider token cached for about 50
//! minutes, and each APNs reason mapped to the gateway's taxonomy (a dead token's 410 keeps
//! APNs' timestamp).

mod settings;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;
use serde::Deserialize;

use super::signing::SigningKey;
use super::{
    OutboundMessage, Provider, ProviderAccept, ProviderError, Recipient, http2_client, read_secret,
};
use crate::domain::{FailureReason, Platform, RetryClass};

pub use settings::{ApnsEnvironment, ApnsSettings};

/// A provider token is replaced after this long (APNs refuses tokens older than an hour).
const TOKEN_REFRESH: Duration = Duration::from_secs(50 * 60);
/// APNs answers `TooManyProviderTokenUpdates` to a team that re-signs more often than this, so
/// an `ExpiredProviderToken` forces a new token at most once per this period.
const TOKEN_MIN_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// The longest `apns-collapse-id` APNs takes.
const COLLAPSE_ID_MAX: usize = 64;

/// A signed provider token and when it was signed.
struct ProviderToken {
    jwt: Arc<str>,
    signed: Instant,
}

/// The cached provider token.
#[derive(Default)]
struct TokenCache {
    current: Option<ProviderToken>,
    /// When a token was last replaced because APNs called it expired.
    forced: Option<Instant>,
}

impl TokenCache {
    /// The token to use at `now`: the cached one, or a new one when there is none or it is
    /// about 50 minutes old.
    fn token(
        &mut self,
        now: Instant,
        sign: impl FnOnce() -> Result<String, String>,
    ) -> Result<Arc<str>, String> {
        match &self.current {
            Some(token) if now.saturating_duration_since(token.signed) < TOKEN_REFRESH => {
                Ok(Arc::clone(&token.jwt))
            }
            _ => self.replace(now, sign),
        }
    }

    /// After APNs called `rejected` expired: the token to try again with. That is a new one,
    /// unless another request has replaced `rejected` already (then that one), or a token was
    /// forced less than 20 minutes ago (then `None`: re-signing again would not help and
    /// APNs would refuse the updates).
    fn after_expired(
        &mut self,
        rejected: &str,
        now: Instant,
        sign: impl FnOnce() -> Result<String, String>,
    ) -> Result<Option<Arc<str>>, String> {
        if let Some(token) = &self.current
            && *token.jwt != *rejected
        {
            return Ok(Some(Arc::clone(&token.jwt)));
        }
        if self
            .forced
            .is_some_and(|at| now.saturating_duration_since(at) < TOKEN_MIN_INTERVAL)
        {
            return Ok(None);
        }
        self.forced = Some(now);
        self.replace(now, sign).map(Some)
    }

    fn replace(
        &mut self,
        now: Instant,
        sign: impl FnOnce() -> Result<String, String>,
    ) -> Result<Arc<str>, String> {
        let jwt: Arc<str> = sign()?.into();
        self.current = Some(ProviderToken {
            jwt: Arc::clone(&jwt),
            signed: now,
        });
        Ok(jwt)
    }
}

/// The claims of an APNs provider token.
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

/// APNs' error body.
#[derive(Debug, Default, Deserialize)]
struct ApnsError {
    #[serde(default)]
    reason: String,
    /// For 410: when APNs last learnt the token was invalid, in milliseconds since the epoch.
    #[serde(default)]
    timestamp: Option<i64>,
}

/// One APNs credential (team key) for one or more apps, in one environment.
pub struct ApnsProvider {
    name: String,
    settings: ApnsSettings,
    key: SigningKey,
    client: reqwest::Client,
    tokens: Mutex<TokenCache>,
}

impl std::fmt::Debug for ApnsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsProvider")
            .field("name", &self.name)
            .field("endpoint", &self.settings.endpoint())
            .field("topics", &self.settings.topics)
            .finish()
    }
}

impl ApnsProvider {
    /// A provider from validated settings; reads and checks the `.p8` key.
    pub fn new(name: &str, settings: ApnsSettings, timeout: Duration) -> Result<Self, String> {
        let pem = read_secret(
            name,
            "key_file",
            settings.key_file.as_deref(),
            settings.key.as_ref(),
        )?;
        let key = SigningKey::es256_from_pem(&pem).map_err(|problem| {
            let field = if settings.key_file.is_some() {
                "key_file"
            } else {
                "key"
            };
            format!("providers.{name}.{field}: {problem}")
        })?;
        Ok(ApnsProvider {
            name: name.to_owned(),
            key,
            client: http2_client(name, settings.ca_file.as_deref(), timeout)?,
            settings,
            tokens: Mutex::default(),
        })
    }

    fn sign(&self) -> Result<String, String> {
        let claims = Claims {
            iss: &self.settings.team_id,
            iat: Timestamp::now().as_second(),
        };
        self.key.sign(Some(&self.settings.key_id), &claims)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn misconfigured(&self, problem: String) -> ProviderError {
        ProviderError::new(FailureReason::ProviderMisconfigured, None, problem)
    }

    /// The JSON payload: the localized alert, the category for the app's Allow / Don't Allow
    /// actions, and the code with its delivery id for the app to show and acknowledge.
    fn payload(&self, message: &OutboundMessage<'_>) -> Vec<u8> {
        let payload = serde_json::json!({
            "aps": {
                "alert": {"body": message.text},
                "sound": "default",
                "category": self.settings.category,
                "interruption-level": "time-sensitive",
            },
            "otp": {
                "code": message.code.expose(),
                "delivery_id": message.delivery_id,
                "expires_at": message.expires_at.to_string(),
                "ack_token": message.ack_token,
            },
        });
        serde_json::to_vec(&payload).expect("JSON values serialize")
    }

    async fn post(
        &self,
        token: &str,
        topic: &str,
        jwt: &str,
        message: &OutboundMessage<'_>,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ProviderError> {
        let request = self
            .client
            .post(format!("{}/3/device/{token}", self.settings.endpoint()))
            .header(reqwest::header::AUTHORIZATION, format!("bearer {jwt}"))
            .header("apns-topic", topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header(
                "apns-expiration",
                message.expires_at.as_second().to_string(),
            )
            .header("apns-collapse-id", collapse_id(message.delivery_id))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        super::send_traced(request)
            .await
            .map_err(|error| super::unreachable("APNs", error))
    }
}

/// The delivery id, or its SHA-1 when it is longer than APNs allows: pushes of one delivery
/// replace each other on the device.
pub(super) fn collapse_id(delivery_id: &str) -> String {
    if delivery_id.len() <= COLLAPSE_ID_MAX {
        return delivery_id.to_owned();
    }
    use sha1::Digest;
    sha1::Sha1::digest(delivery_id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an APNs refusal means.
fn classify(status: u16, answer: &ApnsError, retry_after: Option<Duration>) -> ProviderError {
    use FailureReason::*;
    let reason = answer.reason.as_str();
    let (mapped, explanation) = match reason {
        "BadDeviceToken" | "MissingDeviceToken" => (
            DeviceTokenInvalid,
            "the device token is malformed or from the other environment (sandbox/production)",
        ),
        "DeviceTokenNotForTopic" => (
            DeviceTokenInvalid,
            "the device token belongs to another app",
        ),
        "Unregistered" | "ExpiredToken" => (
            DeviceUnregistered,
            "the device token is no longer active for the app (the app was removed or its token rotated)",
        ),
        "TooManyRequests" => (
            ProviderThrottled,
            "too many pushes to this device in a short time",
        ),
        "TooManyProviderTokenUpdates" => (
            ProviderThrottled,
            "the provider token was replaced too often",
        ),
        "InternalServerError" | "ServiceUnavailable" | "Shutdown" | "IdleTimeout" => {
            (ProviderUnavailable, "APNs is unavailable")
        }
        "ExpiredProviderToken" => (
            ProviderMisconfigured,
            "APNs refused a freshly signed provider token: check the server clock, key id and team id",
        ),
        "BadCertificate"
        | "BadCertificateEnvironment"
        | "Forbidden"
        | "InvalidProviderToken"
        | "MissingProviderToken"
        | "UnrelatedKeyIdInToken"
        | "BadEnvironmentKeyInToken" => (
            ProviderMisconfigured,
            "APNs refused the credential: check the .p8 key, key id, team id and environment",
        ),
        "BadTopic" | "TopicDisallowed" | "MissingTopic" => (
            ProviderMisconfigured,
            "APNs refused the topic: check the app's bundle id and that the key may push to it",
        ),
        "BadPath" | "MethodNotAllowed" | "InvalidPushType" => {
            (ProviderMisconfigured, "APNs refused the request")
        }
        _ => match status {
            410 => (DeviceUnregistered, "the device token is no longer active"),
            429 => (ProviderThrottled, "APNs is throttling"),
            403 => (ProviderMisconfigured, "APNs refused the credential"),
            500..=599 => (ProviderUnavailable, "APNs is unavailable"),
            _ => (ProviderRejected, "APNs refused the push"),
        },
    };
    let class = match mapped {
        // APNs' 429 is per device; waiting briefly (or its Retry-After) is the remedy.
        ProviderThrottled | ProviderUnavailable => RetryClass::Transient,
        other => other.retry_class(),
    };
    let since = answer
        .timestamp
        .filter(|_| mapped == DeviceUnregistered)
        .and_then(|ms| Timestamp::from_millisecond(ms).ok());
    let raw_code = if reason.is_empty() {
        status.to_string()
    } else {
        reason.to_owned()
    };
    let mut message = format!("HTTP {status} {raw_code}: {explanation}");
    if let Some(since) = since {
        message.push_str(&format!(" (invalid since {since})"));
    }
    let mut error = ProviderError::new(mapped, Some(&raw_code), message)
        .with_class(class)
        .with_retry_after(retry_after);
    error.token_invalid_since = since;
    error
}

#[async_trait]
impl Provider for ApnsProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn serves(&self, recipient: &Recipient<'_>) -> bool {
        match recipient {
            Recipient::Device {
                platform: Platform::Apns,
                topic,
                ..
            } => topic.is_none_or(|topic| self.settings.topics.iter().any(|t| t == topic)),
            _ => false,
        }
    }

    fn default_app(&self) -> Option<&str> {
        self.settings.topics.first().map(String::as_str)
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let Recipient::Device {
            platform: Platform::Apns,
            token,
            topic,
        } = message.recipient
        else {
            return Err(self.misconfigured(format!(
                "{} is an APNs credential: it sends to APNs device tokens only",
                self.name
            )));
        };
        // APNs device tokens are hexadecimal; anything else would not even make a valid path.
        // A local refusal is an input error of this target, not what APNs said: it teaches
        // the block list nothing and announces no `device.invalidated`.
        if !crate::domain::is_apns_token(token) {
            return Err(ProviderError::new(
                FailureReason::InvalidRecipient,
                None,
                "not an APNs device token (hexadecimal): not sent",
            ));
        }
        let topic = topic.unwrap_or(&self.settings.topics[0]);
        let body = self.payload(message);
        let mut jwt = self
            .cache()
            .token(Instant::now(), || self.sign())
            .map_err(|e| self.misconfigured(e))?;
        let mut re_signed = false;
        loop {
            let response = self.post(token, topic, &jwt, message, body.clone()).await?;
            let status = response.status();
            if status.is_success() {
                let message_id = response
                    .headers()
                    .get("apns-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                return Ok(ProviderAccept { message_id });
            }
            let retry_after = super::retry_after(&response);
            let answer: ApnsError = response
                .bytes()
                .await
                .ok()
                .and_then(|body| serde_json::from_slice(&body).ok())
                .unwrap_or_default();
            if answer.reason == "ExpiredProviderToken" && !re_signed {
                re_signed = true;
                let fresh = self
                    .cache()
                    .after_expired(&jwt, Instant::now(), || self.sign())
                    .map_err(|e| self.misconfigured(e))?;
                if let Some(fresh) = fresh {
                    tracing::info!(provider = %self.name, "APNs called the provider token expired: signed a new one");
                    jwt = fresh;
                    continue;
                }
            }
            return Err(classify(status.as_u16(), &answer, retry_after));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(counter: &std::cell::Cell<u32>) -> impl FnOnce() -> Result<String, String> + '_ {
        move || {
            counter.set(counter.get() + 1);
            Ok(format!("jwt-{}", counter.get()))
        }
    }

    #[test]
    fn the_provider_token_is_reused_for_50_minutes() {
        let signed = std::cell::Cell::new(0);
        let mut cache = TokenCache::default();
        let start = Instant::now();
        let first = cache.token(start, signer(&signed)).unwrap();
        let later = cache
            .token(start + Duration::from_secs(49 * 60), signer(&signed))
            .unwrap();
        assert_eq!((first.as_ref(), later.as_ref()), ("jwt-1", "jwt-1"));
        let renewed = cache
            .token(start + Duration::from_secs(50 * 60), signer(&signed))
            .unwrap();
        assert_eq!(renewed.as_ref(), "jwt-2");
        assert_eq!(signed.get(), 2);
    }

    #[test]
    fn an_expired_token_is_replaced_once_per_20_minutes() {
        let signed = std::cell::Cell::new(0);
        let mut cache = TokenCache::default();
        let start = Instant::now();
        let first = cache.token(start, signer(&signed)).unwrap();
        let fresh = cache
            .after_expired(&first, start, signer(&signed))
            .unwrap()
            .unwrap();
        assert_eq!(fresh.as_ref(), "jwt-2");
        // A request that failed with the old token at the same time uses the new one.
        let same = cache.after_expired(&first, start, signer(&signed)).unwrap();
        assert_eq!(same.as_deref(), Some("jwt-2"));
        // The new one refused too, within 20 minutes: no third token.
        let minute = Duration::from_secs(60);
        assert!(
            cache
                .after_expired(&fresh, start + 19 * minute, signer(&signed))
                .unwrap()
                .is_none()
        );
        assert_eq!(signed.get(), 2);
        let again = cache
            .after_expired(&fresh, start + 20 * minute, signer(&signed))
            .unwrap();
        assert_eq!(again.as_deref(), Some("jwt-3"));
    }

    fn answer(reason: &str, timestamp: Option<i64>) -> ApnsError {
        ApnsError {
            reason: reason.to_owned(),
            timestamp,
        }
    }

    #[test]
    fn every_apns_reason_has_its_place_in_the_taxonomy() {
        use FailureReason::*;
        let cases = [
            (
                400,
                "BadDeviceToken",
                DeviceTokenInvalid,
                RetryClass::PermanentForTarget,
            ),
            (
                400,
                "DeviceTokenNotForTopic",
                DeviceTokenInvalid,
                RetryClass::PermanentForTarget,
            ),
            (
                410,
                "Unregistered",
                DeviceUnregistered,
                RetryClass::PermanentForTarget,
            ),
            (
                410,
                "ExpiredToken",
                DeviceUnregistered,
                RetryClass::PermanentForTarget,
            ),
            (
                429,
                "TooManyRequests",
                ProviderThrottled,
                RetryClass::Transient,
            ),
            (
                500,
                "InternalServerError",
                ProviderUnavailable,
                RetryClass::Transient,
            ),
            (
                503,
                "ServiceUnavailable",
                ProviderUnavailable,
                RetryClass::Transient,
            ),
            (503, "Shutdown", ProviderUnavailable, RetryClass::Transient),
            (
                403,
                "InvalidProviderToken",
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (
                403,
                "BadCertificateEnvironment",
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (
                403,
                "SomethingNew",
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (
                400,
                "BadTopic",
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (
                400,
                "TopicDisallowed",
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (
                413,
                "PayloadTooLarge",
                ProviderRejected,
                RetryClass::PermanentForProvider,
            ),
        ];
        for (status, reason, expected, class) in cases {
            let error = classify(status, &answer(reason, None), None);
            assert_eq!((error.reason, error.class), (expected, class), "{reason}");
            assert_eq!(error.raw_code.as_deref(), Some(reason));
        }
    }

    #[test]
    fn a_410_keeps_the_time_apns_learnt_the_token_was_dead() {
        let error = classify(410, &answer("Unregistered", Some(1_763_700_000_000)), None);
        let since = Timestamp::from_millisecond(1_763_700_000_000).unwrap();
        assert_eq!(error.token_invalid_since, Some(since));
        assert!(error.raw_message.contains(&since.to_string()));
        let throttled = classify(
            429,
            &answer("TooManyRequests", None),
            Some(Duration::from_secs(3)),
        );
        assert_eq!(throttled.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(throttled.token_invalid_since, None);
    }

    #[test]
    fn long_delivery_ids_collapse_to_their_hash() {
        assert_eq!(collapse_id("acme/job-1"), "acme/job-1");
        let long = format!("acme/{}", "x".repeat(80));
        assert_eq!(collapse_id(&long).len(), 40);
        assert_eq!(collapse_id(&long), collapse_id(&long));
    }
}
