//! An APNs app credential's settings (`kind = "apns"`) and their validation.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::ApnsProvider;
use crate::domain::{Channel, InvalidSetting, SecretString};
use crate::providers::Provider;
use crate::providers::settings::{BuildContext, ProviderKind, default_push_category};

/// An APNs app credential (`kind = "apns"`): token-based authentication with the `.p8` key of
/// the team, over one HTTP/2 connection pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
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
    #[serde(default, deserialize_with = "crate::domain::optional_http_url")]
    pub base_url: Option<url::Url>,
    /// The notification category, for the app's Allow / Don't Allow actions.
    #[serde(default = "default_push_category")]
    pub category: String,
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

impl ApnsSettings {
    /// Where requests go: `base_url`, else the environment's host.
    pub fn endpoint(&self) -> &str {
        match (&self.base_url, self.environment) {
            (Some(url), _) => url.as_str().trim_end_matches('/'),
            (None, ApnsEnvironment::Production) => "https://api.push.apple.com",
            (None, ApnsEnvironment::Sandbox) => "https://api.sandbox.push.apple.com",
        }
    }
}

#[async_trait]
impl ProviderKind for ApnsSettings {
    fn carries(&self, channel: Channel) -> bool {
        channel == Channel::Push
    }

    fn carries_only(&self) -> &'static str {
        "an APNs credential, which carries push only"
    }

    fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        let apns = self;
        let key = |field: &str| format!("providers.{name}.{field}");
        for (field, value) in [("team_id", &apns.team_id), ("key_id", &apns.key_id)] {
            if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(InvalidSetting::new(
                    key(field),
                    format!("`{value}` is not a 10-character Apple id"),
                ));
            }
        }
        match (&apns.key_file, &apns.key) {
            (None, None) => {
                return Err(InvalidSetting::new(
                    key("key_file"),
                    "set `key_file` (the .p8 file) or `key` (its PEM text)",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(InvalidSetting::new(
                    key("key"),
                    "set `key_file` or `key`, not both",
                ));
            }
            _ => {}
        }
        if apns.topics.is_empty() {
            return Err(InvalidSetting::new(
                key("topics"),
                "names no app (bundle id)",
            ));
        }
        if let Some(topic) = apns
            .topics
            .iter()
            .find(|t| t.is_empty() || t.contains(char::is_whitespace))
        {
            return Err(InvalidSetting::new(
                key("topics"),
                format!("`{topic}` is not a bundle id"),
            ));
        }
        Ok(())
    }

    async fn build(
        &self,
        name: &str,
        context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        Ok(Arc::new(ApnsProvider::new(
            name,
            self.clone(),
            context.provider_timeout,
        )?))
    }
}
