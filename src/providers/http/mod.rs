//! The generic HTTP provider, for aggregators without a dedicated adapter: method, URL,
//! headers and a body template from the configuration, and a mapping from the response's
//! status and JSON fields to outcomes. Placeholders in the template are `{{to}}`, `{{text}}`,
//! `{{code}}`, `{{channel}}`, `{{delivery_id}}`, `{{expires_at}}` and `{{language}}`, escaped for the body's
//! content type (JSON strings, form encoding).

mod settings;
use std::time::Duration;

use async_trait::async_trait;

use super::{OutboundMessage, Provider, ProviderAccept, ProviderError, Recipient};
use crate::domain::{FailureReason, RetryClass, fill_placeholders};

pub use settings::HttpSettings;

/// One configured HTTP provider.
#[derive(Debug)]
pub struct HttpProvider {
    name: String,
    settings: HttpSettings,
    method: reqwest::Method,
    client: reqwest::Client,
}

/// A JSON value at a JSON pointer, as text.
fn field(body: &serde_json::Value, pointer: &str) -> Option<String> {
    match body.pointer(pointer)? {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// `value` escaped for a body of `content_type`.
fn escape(content_type: &str, value: &str) -> String {
    if content_type.contains("json") {
        let quoted = serde_json::to_string(value).expect("strings serialize");
        quoted[1..quoted.len() - 1].to_owned()
    } else if content_type.contains("x-www-form-urlencoded") {
        form_urlencoded::byte_serialize(value.as_bytes()).collect()
    } else {
        value.to_owned()
    }
}

impl HttpProvider {
    /// A provider from validated settings.
    pub fn new(name: &str, settings: HttpSettings, timeout: Duration) -> Result<Self, String> {
        let method = settings.method.clone();
        let client = super::http_client_builder(name, settings.ca_file.as_deref())?
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(HttpProvider {
            name: name.to_owned(),
            settings,
            method,
            client,
        })
    }

    fn render(&self, message: &OutboundMessage<'_>, to: &str) -> String {
        let content_type = &self.settings.content_type;
        fill_placeholders(&self.settings.body, |name| {
            let value = match name {
                "to" => to.to_owned(),
                "text" => message.text.to_owned(),
                "code" => message.code.expose().to_owned(),
                "channel" => message.channel.as_str().to_owned(),
                "delivery_id" => message.delivery_id.to_owned(),
                "expires_at" => message.expires_at.to_string(),
                "language" => message.language.to_owned(),
                _ => return None,
            };
            Some(escape(content_type, &value))
        })
    }

    fn classify(
        &self,
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        body: &str,
    ) -> ProviderError {
        let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
        let code = json
            .as_ref()
            .zip(self.settings.error_code_field.as_deref())
            .and_then(|(b, p)| field(b, p));
        let message = json
            .as_ref()
            .zip(self.settings.error_message_field.as_deref())
            .and_then(|(b, p)| field(b, p))
            .unwrap_or_else(|| {
                format!(
                    "HTTP {status}: {}",
                    body.chars().take(200).collect::<String>()
                )
            });
        let mapped = code
            .as_deref()
            .and_then(|c| self.settings.codes.get(c))
            .copied();
        let (reason, class) = match (mapped, status.as_u16()) {
            (Some(reason), _) => (reason, reason.retry_class()),
            (None, 429) => (FailureReason::ProviderThrottled, RetryClass::Transient),
            (None, 401 | 403) => (
                FailureReason::ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
            (None, 408 | 500..=599) => (FailureReason::ProviderUnavailable, RetryClass::Transient),
            (None, _) => (
                FailureReason::ProviderRejected,
                RetryClass::PermanentForProvider,
            ),
        };
        ProviderError {
            reason,
            class,
            raw_code: Some(code.unwrap_or_else(|| status.as_u16().to_string())),
            raw_message: crate::domain::scrub(&message),
            retry_after,
            token_invalid_since: None,
        }
    }
}

#[async_trait]
impl Provider for HttpProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let to = match message.recipient {
            Recipient::Phone(number) => number,
            Recipient::Device { token, .. } => token,
        };
        let mut request = self
            .client
            .request(self.method.clone(), self.settings.url.clone())
            .header(reqwest::header::CONTENT_TYPE, &self.settings.content_type)
            .body(self.render(message, to));
        for (name, value) in &self.settings.headers {
            request = request.header(name.as_str(), value.expose());
        }
        let response = super::send_traced(request)
            .await
            .map_err(|error| super::unreachable(&self.name, error))?;
        let status = response.status();
        let retry_after = super::retry_after(&response);
        let body = response.text().await.unwrap_or_default();
        if self.settings.success_status.contains(&status.as_u16()) {
            let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
            let message_id = json
                .as_ref()
                .zip(self.settings.message_id_field.as_deref())
                .and_then(|(b, p)| field(b, p));
            return Ok(ProviderAccept { message_id });
        }
        Err(self.classify(status, retry_after, &body))
    }
}
