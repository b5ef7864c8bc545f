//! A Twilio account's settings (`kind = "twilio"`) and their validation.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{TwilioProvider, callback_url};
use crate::domain::{InvalidSetting, SecretString};
use crate::providers::Provider;
use crate::providers::settings::{BuildContext, ProviderKind};

/// A Twilio account (`kind = "twilio"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioSettings {
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
    #[serde(
        default = "default_twilio_base",
        deserialize_with = "crate::domain::http_url"
    )]
    pub base_url: url::Url,
    /// Where Twilio should post status callbacks.
    #[serde(default)]
    pub status_callback: Option<String>,
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_twilio_base() -> url::Url {
    url::Url::parse("https://api.twilio.com").expect("a URL")
}

#[async_trait]
impl ProviderKind for TwilioSettings {
    fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        let key = |field: &str| format!("providers.{name}.{field}");
        if !self.account_sid.starts_with("AC") {
            return Err(InvalidSetting::new(
                key("account_sid"),
                "must be the account SID (AC…)",
            ));
        }
        if self.auth_token.expose().is_empty() {
            return Err(InvalidSetting::new(key("auth_token"), "is empty"));
        }
        if self.from.is_none() && self.messaging_service_sid.is_none() {
            return Err(InvalidSetting::new(
                key("from"),
                "set `from` (E.164) or `messaging_service_sid`",
            ));
        }
        if let Some(from) = self.from.as_deref().filter(|f| !crate::domain::is_e164(f)) {
            return Err(InvalidSetting::new(
                key("from"),
                format!("`{from}` is not an E.164 number"),
            ));
        }
        Ok(())
    }

    async fn build(
        &self,
        name: &str,
        context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        // Unless set, the status callback is the receipts listener's own URL for this provider
        // (when its public URL is known): then signatures verify.
        let mut settings = self.clone();
        let public_url = context.receipts_public_url;
        if settings.status_callback.is_none() && !public_url.is_empty() {
            settings.status_callback = Some(callback_url(public_url, name));
        }
        Ok(Arc::new(TwilioProvider::new(
            name,
            settings,
            context.provider_timeout,
        )?))
    }
}
