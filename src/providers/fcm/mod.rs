//! Firebase Cloud Messaging, HTTP v1: `messages:send` over one HTTP/2 connection pool per
//! project, with an OAuth2 access token obtained from the service account (an RS256 JWT
//! assertion to its `token_uri`), cached until shortly before it expires and fetched again
//! once when FCM answers 401.

mod settings;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;
use serde::Deserialize;

use super::apns::collapse_id;
use super::signing::SigningKey;
use super::{
    OutboundMessage, Provider, ProviderAccept, ProviderError, Recipient, http2_client, read_secret,
};
use crate::domain::{FailureReason, Platform, RetryClass};

pub use settings::FcmSettings;

/// The OAuth scope FCM sends need.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// An access token is fetched again this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// How long the assertion is valid (Google's maximum).
const ASSERTION_LIFETIME: i64 = 3600;

/// The fields of a service-account key file that are used.
#[derive(Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    token_uri: String,
    #[serde(default)]
    project_id: Option<String>,
}

/// The token endpoint's answer.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The token endpoint's refusal (RFC 6749 §5.2).
#[derive(Deserialize, Default)]
struct TokenRefusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// A cached access token.
struct AccessToken {
    value: Arc<str>,
    refresh_at: Instant,
}

/// FCM's error body (`google.rpc.Status` with details).
#[derive(Debug, Default, Deserialize)]
struct FcmErrorBody {
    #[serde(default)]
    error: FcmStatus,
}

#[derive(Debug, Default, Deserialize)]
struct FcmStatus {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

impl FcmStatus {
    /// The `FcmError` detail's `errorCode`, e.g. `UNREGISTERED`.
    fn error_code(&self) -> Option<&str> {
        self.details
            .iter()
            .filter(|d| {
                d["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))
            })
            .find_map(|d| d["errorCode"].as_str())
    }

    /// Whether a `BadRequest` detail blames the registration token.
    fn blames_token(&self) -> bool {
        self.details
            .iter()
            .filter_map(|d| d["fieldViolations"].as_array())
            .flatten()
            .any(|v| v["field"].as_str() == Some("message.token"))
            || self.message.contains("registration token")
    }
}

/// One Firebase project's credential.
pub struct FcmProvider {
    name: String,
    settings: FcmSettings,
    project_id: String,
    account: ServiceAccount,
    key: SigningKey,
    client: reqwest::Client,
    token_client: reqwest::Client,
    token: Mutex<Option<AccessToken>>,
    /// One token request at a time: pushes that find no valid token wait for it.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for FcmProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmProvider")
            .field("name", &self.name)
            .field("project_id", &self.project_id)
            .field("client_email", &self.account.client_email)
            .finish()
    }
}

impl FcmProvider {
    /// A provider from validated settings; reads and checks the service account.
    pub fn new(name: &str, settings: FcmSettings, timeout: Duration) -> Result<Self, String> {
        let field = if settings.service_account_file.is_some() {
            "service_account_file"
        } else {
            "service_account"
        };
        let text = read_secret(
            name,
            "service_account_file",
            settings.service_account_file.as_deref(),
            settings.service_account.as_ref(),
        )?;
        let account: ServiceAccount = serde_json::from_str(&text).map_err(|e| {
            format!("providers.{name}.{field}: not a service-account JSON key: {e}")
        })?;
        let key = SigningKey::rs256_from_pem(&account.private_key)
            .map_err(|e| format!("providers.{name}.{field}: private_key: {e}"))?;
        if !(account.token_uri.starts_with("https://") || account.token_uri.starts_with("http://"))
        {
            return Err(format!(
                "providers.{name}.{field}: token_uri `{}` is not an http(s) URL",
                account.token_uri
            ));
        }
        let project_id = settings
            .project_id
            .clone()
            .or_else(|| account.project_id.clone())
            .ok_or_else(|| {
                format!("providers.{name}.project_id: not set, and the service account names none")
            })?;
        let token_client = super::http_client_builder(name, settings.ca_file.as_deref())?
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(FcmProvider {
            name: name.to_owned(),
            project_id,
            account,
            key,
            client: http2_client(name, settings.ca_file.as_deref(), timeout)?,
            token_client,
            settings,
            token: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn cached(&self, now: Instant, refused: Option<&str>) -> Option<Arc<str>> {
        let token = self.token.lock().unwrap_or_else(|p| p.into_inner());
        token
            .as_ref()
            .filter(|t| now < t.refresh_at && Some(&*t.value) != refused)
            .map(|t| Arc::clone(&t.value))
    }

    /// A valid access token: the cached one unless it is about to expire or FCM refused it
    /// (`refused`), else a new one from the token endpoint (one request for all waiting pushes).
    async fn access_token(&self, refused: Option<&str>) -> Result<Arc<str>, ProviderError> {
        if let Some(token) = self.cached(Instant::now(), refused) {
            return Ok(token);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(token) = self.cached(Instant::now(), refused) {
            return Ok(token);
        }
        let (value, lifetime) = self.fetch_token().await?;
        let margin = TOKEN_MARGIN.min(lifetime / 2);
        let value: Arc<str> = value.into();
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(AccessToken {
            value: Arc::clone(&value),
            refresh_at: Instant::now() + lifetime - margin,
        });
        Ok(value)
    }

    async fn fetch_token(&self) -> Result<(String, Duration), ProviderError> {
        let iat = Timestamp::now().as_second();
        let claims = serde_json::json!({
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.account.token_uri,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME,
        });
        let assertion = self
            .key
            .sign(self.account.private_key_id.as_deref(), &claims)
            .map_err(|e| ProviderError::new(FailureReason::ProviderMisconfigured, None, e))?;
        let request = self.token_client.post(&self.account.token_uri).form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ]);
        let response = super::send_traced(request)
            .await
            .map_err(|error| super::unreachable("the OAuth token endpoint", error))?;
        let status = response.status();
        let retry_after = super::retry_after(&response);
        let body = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                ProviderError::new(
                    FailureReason::ProviderUnavailable,
                    None,
                    format!("the OAuth token endpoint answered {status} without a token: {e}"),
                )
            })?;
            let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600).max(60));
            return Ok((token.access_token, lifetime));
        }
        let refusal: TokenRefusal = serde_json::from_slice(&body).unwrap_or_default();
        let code = format!(
            "oauth:{}",
            if refusal.error.is_empty() {
                status.as_str()
            } else {
                &refusal.error
            }
        );
        let message = format!(
            "the OAuth token endpoint refused the service account {} (HTTP {status}): {}",
            self.account.client_email, refusal.error_description
        );
        let reason = match status.as_u16() {
            429 => FailureReason::ProviderThrottled,
            500..=599 => FailureReason::ProviderUnavailable,
            _ => FailureReason::ProviderMisconfigured,
        };
        Err(ProviderError::new(reason, Some(&code), message).with_retry_after(retry_after))
    }

    /// The v1 message: the localized alert, the code and delivery id as data for the app,
    /// Android priority high with `ttl` = the code's time left, and the APNs headers for iOS
    /// devices reached through FCM.
    fn message(&self, message: &OutboundMessage<'_>, token: &str) -> Vec<u8> {
        let left = message
            .expires_at
            .duration_since(Timestamp::now())
            .max(jiff::SignedDuration::ZERO)
            .as_secs();
        let collapse = collapse_id(message.delivery_id);
        let body = serde_json::json!({
            "message": {
                "token": token,
                "notification": {"body": message.text},
                "data": {
                    "code": message.code.expose(),
                    "delivery_id": message.delivery_id,
                    "expires_at": message.expires_at.to_string(),
                    "ack_token": message.ack_token.unwrap_or_default(),
                },
                "android": {
                    "priority": "HIGH",
                    "ttl": format!("{left}s"),
                    "collapse_key": collapse,
                    "notification": {"tag": collapse, "click_action": self.settings.category},
                },
                "apns": {
                    "headers": {
                        "apns-priority": "10",
                        "apns-expiration": message.expires_at.as_second().to_string(),
                        "apns-collapse-id": collapse,
                    },
                    "payload": {"aps": {"category": self.settings.category, "sound": "default"}},
                },
            }
        });
        serde_json::to_vec(&body).expect("JSON values serialize")
    }
}

/// What an FCM refusal means.
fn classify(status: u16, answer: &FcmStatus, retry_after: Option<Duration>) -> ProviderError {
    use FailureReason::*;
    let code = answer.error_code().unwrap_or(&answer.status);
    let (reason, explanation) = match code {
        "UNREGISTERED" => (
            DeviceUnregistered,
            "the registration token is no longer valid (the app was removed or its token rotated)",
        ),
        "SENDER_ID_MISMATCH" => (
            DeviceTokenInvalid,
            "the registration token belongs to another Firebase project",
        ),
        "INVALID_ARGUMENT" if answer.blames_token() => {
            (DeviceTokenInvalid, "the registration token is not valid")
        }
        "INVALID_ARGUMENT" => (ProviderRejected, "FCM refused the message"),
        "THIRD_PARTY_AUTH_ERROR" => (
            ProviderMisconfigured,
            "the APNs credential in the Firebase project was refused",
        ),
        "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" => {
            (ProviderThrottled, "FCM's sending quota is exceeded")
        }
        "UNAVAILABLE" | "INTERNAL" => (ProviderUnavailable, "FCM is unavailable"),
        "PERMISSION_DENIED" | "UNAUTHENTICATED" => (
            ProviderMisconfigured,
            "FCM refused the service account: check its roles and the project id",
        ),
        "NOT_FOUND" => (DeviceUnregistered, "the registration token was not found"),
        _ => match status {
            404 => (DeviceUnregistered, "the registration token was not found"),
            429 => (ProviderThrottled, "FCM is throttling"),
            401 | 403 => (ProviderMisconfigured, "FCM refused the credential"),
            500..=599 => (ProviderUnavailable, "FCM is unavailable"),
            _ => (ProviderRejected, "FCM refused the message"),
        },
    };
    let raw_code = if code.is_empty() {
        status.to_string()
    } else {
        code.to_owned()
    };
    let class = match reason {
        ProviderThrottled | ProviderUnavailable => RetryClass::Transient,
        other => other.retry_class(),
    };
    ProviderError::new(
        reason,
        Some(&raw_code),
        format!(
            "HTTP {status} {raw_code}: {explanation}: {}",
            answer.message
        ),
    )
    .with_class(class)
    .with_retry_after(retry_after)
}

#[async_trait]
impl Provider for FcmProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn serves(&self, recipient: &Recipient<'_>) -> bool {
        match recipient {
            Recipient::Device {
                platform: Platform::Fcm,
                topic,
                ..
            } => topic.is_none_or(|project| project == self.project_id),
            _ => false,
        }
    }

    fn default_app(&self) -> Option<&str> {
        Some(&self.project_id)
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let Recipient::Device {
            platform: Platform::Fcm,
            token,
            ..
        } = message.recipient
        else {
            return Err(ProviderError::new(
                FailureReason::ProviderMisconfigured,
                None,
                format!(
                    "{} is an FCM project: it sends to FCM registration tokens only",
                    self.name
                ),
            ));
        };
        let url = format!(
            "{}/v1/projects/{}/messages:send",
            self.settings.base_url.as_str().trim_end_matches('/'),
            self.project_id
        );
        let body = self.message(message, token);
        let mut access = self.access_token(None).await?;
        let mut refreshed = false;
        loop {
            let request = self
                .client
                .post(&url)
                .bearer_auth(&access)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            let response = super::send_traced(request)
                .await
                .map_err(|error| super::unreachable("FCM", error))?;
            let status = response.status();
            if status.is_success() {
                let name = response
                    .bytes()
                    .await
                    .ok()
                    .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .and_then(|v| v["name"].as_str().map(str::to_owned));
                return Ok(ProviderAccept { message_id: name });
            }
            let retry_after = super::retry_after(&response);
            let answer: FcmErrorBody = response
                .bytes()
                .await
                .ok()
                .and_then(|body| serde_json::from_slice(&body).ok())
                .unwrap_or_default();
            // 401 is our access token (unless it is about the app's APNs credential): a new one,
            // once.
            if status == reqwest::StatusCode::UNAUTHORIZED
                && answer.error.error_code() != Some("THIRD_PARTY_AUTH_ERROR")
                && !refreshed
            {
                refreshed = true;
                tracing::info!(provider = %self.name, "FCM refused the access token: fetching a new one");
                access = self.access_token(Some(&access)).await?;
                continue;
            }
            return Err(classify(status.as_u16(), &answer.error, retry_after));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(value: serde_json::Value) -> FcmStatus {
        serde_json::from_value::<FcmErrorBody>(value).unwrap().error
    }

    fn fcm_error(http: u16, status_text: &str, code: &str) -> FcmStatus {
        status(
            json!({"error": {"code": http, "message": "m", "status": status_text, "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]}}),
        )
    }

    #[test]
    fn every_fcm_error_has_its_place_in_the_taxonomy() {
        use FailureReason::*;
        let cases = [
            (
                404,
                "NOT_FOUND",
                "UNREGISTERED",
                DeviceUnregistered,
                RetryClass::PermanentForTarget,
            ),
            (
                403,
                "PERMISSION_DENIED",
                "SENDER_ID_MISMATCH",
                DeviceTokenInvalid,
                RetryClass::PermanentForTarget,
            ),
            (
                401,
                "UNAUTHENTICATED",
                "THIRD_PARTY_AUTH_ERROR",
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (
                429,
                "RESOURCE_EXHAUSTED",
                "QUOTA_EXCEEDED",
                ProviderThrottled,
                RetryClass::Transient,
            ),
            (
                503,
                "UNAVAILABLE",
                "UNAVAILABLE",
                ProviderUnavailable,
                RetryClass::Transient,
            ),
            (
                500,
                "INTERNAL",
                "INTERNAL",
                ProviderUnavailable,
                RetryClass::Transient,
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "INVALID_ARGUMENT",
                ProviderRejected,
                RetryClass::PermanentForProvider,
            ),
        ];
        for (http, text, code, reason, class) in cases {
            let error = classify(
                http,
                &fcm_error(http, text, code),
                Some(Duration::from_secs(7)),
            );
            assert_eq!((error.reason, error.class), (reason, class), "{code}");
            assert_eq!(error.raw_code.as_deref(), Some(code));
            assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
        }
    }

    #[test]
    fn an_invalid_argument_about_the_token_is_the_device_s_problem() {
        let answer = status(json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "The registration token is not a valid FCM registration token",
            "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"},
                {"@type": "type.googleapis.com/google.rpc.BadRequest",
                 "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]}]}}));
        let error = classify(400, &answer, None);
        assert_eq!(error.reason, FailureReason::DeviceTokenInvalid);
        let no_details = classify(404, &FcmStatus::default(), None);
        assert_eq!(no_details.reason, FailureReason::DeviceUnregistered);
        assert_eq!(no_details.raw_code.as_deref(), Some("404"));
    }
}
