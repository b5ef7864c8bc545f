//! A Firebase project's settings (`kind = "fcm"`) and their validation.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::FcmProvider;
use crate::domain::{Channel, InvalidSetting, SecretString};
use crate::providers::Provider;
use crate::providers::settings::{BuildContext, ProviderKind, default_push_category};

/// A Firebase project (`kind = "fcm"`): FCM HTTP v1 with an OAuth2 access token obtained from
/// a service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
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
    #[serde(
        default = "default_fcm_base",
        deserialize_with = "crate::domain::http_url"
    )]
    pub base_url: url::Url,
    /// The notification category (iOS, through FCM) or click action.
    #[serde(default = "default_push_category")]
    pub category: String,
    /// CA certificates (PEM) the provider's server is verified against instead of the system's
    /// roots: for a provider (or a proxy in front of it) with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_fcm_base() -> url::Url {
    url::Url::parse("https://fcm.googleapis.com").expect("a URL")
}

#[async_trait]
impl ProviderKind for FcmSettings {
    fn carries(&self, channel: Channel) -> bool {
        channel == Channel::Push
    }

    fn carries_only(&self) -> &'static str {
        "an FCM project, which carries push only"
    }

    fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        let fcm = self;
        let key = |field: &str| format!("providers.{name}.{field}");
        match (&fcm.service_account_file, &fcm.service_account) {
            (None, None) => Err(InvalidSetting::new(
                key("service_account_file"),
                "set `service_account_file` (the JSON key file) or `service_account` (its text)",
            )),
            (Some(_), Some(_)) => Err(InvalidSetting::new(
                key("service_account"),
                "set `service_account_file` or `service_account`, not both",
            )),
            _ => Ok(()),
        }
    }

    async fn build(
        &self,
        name: &str,
        context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        Ok(Arc::new(FcmProvider::new(
            name,
            self.clone(),
            context.provider_timeout,
        )?))
    }
}
