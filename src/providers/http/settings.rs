//! A generic HTTP provider's settings (`kind = "http"`) and their validation.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::HttpProvider;
use crate::domain::{FailureReason, InvalidSetting, SecretString};
use crate::providers::Provider;
use crate::providers::settings::{BuildContext, ProviderKind};

/// A generic HTTP provider (`kind = "http"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// HTTP method.
    #[serde(default = "default_method", deserialize_with = "http_method")]
    pub method: reqwest::Method,
    /// Endpoint.
    #[serde(deserialize_with = "crate::domain::http_url")]
    pub url: url::Url,
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
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_method() -> reqwest::Method {
    reqwest::Method::POST
}

/// serde: an HTTP method (`POST`, `PUT`, …).
fn http_method<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<reqwest::Method, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an HTTP method")))
}

fn default_content_type() -> String {
    "application/json".to_owned()
}

fn default_success() -> Vec<u16> {
    vec![200, 201, 202]
}

#[async_trait]
impl ProviderKind for HttpSettings {
    fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        let key = |field: &str| format!("providers.{name}.{field}");
        if self.body.is_empty() {
            return Err(InvalidSetting::new(key("body"), "is empty"));
        }
        for (field, pointer) in [
            ("message_id_field", &self.message_id_field),
            ("error_code_field", &self.error_code_field),
            ("error_message_field", &self.error_message_field),
        ] {
            if pointer.as_deref().is_some_and(|p| !p.starts_with('/')) {
                return Err(InvalidSetting::new(
                    key(field),
                    "must be a JSON pointer, e.g. /error/code",
                ));
            }
        }
        Ok(())
    }

    async fn build(
        &self,
        name: &str,
        context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        Ok(Arc::new(HttpProvider::new(
            name,
            self.clone(),
            context.provider_timeout,
        )?))
    }
}
