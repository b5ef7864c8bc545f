//! Providers: the [`Provider`] trait every adapter implements, the typed error that carries a
//! failure's class, and the registry that builds the configured providers by name.
//! Adapters classify what the provider said; they never retry (the delivery layer decides).

mod sandbox;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::config::{Config, ProviderConfig};
use crate::domain::{Channel, Code, FailureReason, Platform, RetryClass};

pub use sandbox::SandboxProvider;

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
    /// The code on its own, for push payloads that let the app fill it in.
    pub code: &'a Code,
    /// Nothing may be delivered after this.
    pub expires_at: Timestamp,
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
            raw_message: raw_message.into(),
            retry_after: None,
        }
    }
}

/// A delivery provider (a carrier, a push service, or the sandbox).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The configured name, as used in routes and reports.
    fn name(&self) -> &str;

    /// Hands one message to the provider.
    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError>;
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

/// The configured providers by name, and the route for each channel.
#[derive(Clone)]
pub struct ProviderRegistry {
    by_name: BTreeMap<String, Arc<dyn Provider>>,
    routes: BTreeMap<Channel, Vec<Arc<dyn Provider>>>,
}

impl std::fmt::Debug for ProviderRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderRegistry")
            .field("providers", &self.by_name.keys())
            .finish()
    }
}

impl ProviderRegistry {
    /// Builds every configured provider and resolves the routes (validated by `Config`).
    pub async fn from_config(config: &Config) -> Result<Self, ProviderBuildError> {
        let mut by_name: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        for (name, provider) in &config.providers {
            let built: Arc<dyn Provider> = match provider {
                ProviderConfig::Sandbox { outbox } => {
                    Arc::new(SandboxProvider::open(name, outbox).await.map_err(|e| {
                        ProviderBuildError {
                            name: name.clone(),
                            problem: e.to_string(),
                        }
                    })?)
                }
            };
            by_name.insert(name.clone(), built);
        }
        Self::with_routes(by_name, |channel| {
            config.routes.for_channel(channel).to_vec()
        })
    }

    /// A registry from ready-made providers (tests plug in their own here).
    pub fn with_routes(
        by_name: BTreeMap<String, Arc<dyn Provider>>,
        route: impl Fn(Channel) -> Vec<String>,
    ) -> Result<Self, ProviderBuildError> {
        let mut routes = BTreeMap::new();
        for channel in Channel::DEFAULT_ORDER {
            let mut providers = Vec::new();
            for name in route(channel) {
                let provider = by_name
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| ProviderBuildError {
                        name: name.clone(),
                        problem: format!("named in routes.{channel} but not configured"),
                    })?;
                providers.push(provider);
            }
            routes.insert(channel, providers);
        }
        Ok(ProviderRegistry { by_name, routes })
    }

    /// The providers for `channel`, in the order to try them.
    pub fn route(&self, channel: Channel) -> &[Arc<dyn Provider>] {
        self.routes
            .get(&channel)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// A provider by its configured name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.by_name.get(name)
    }
}
