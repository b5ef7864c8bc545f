//! The sandbox provider: stands in for the handset by appending one JSON line per message
//! (masked recipient, channel, rendered text) to an outbox file. It is the one place the code
//! may appear. Twilio's documented magic test numbers, and device tokens starting with
//! `invalid` or `unregistered`, fail the way the real providers would, so failure
//! explanations can be tried without a carrier.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::settings::{BuildContext, ProviderKind};
use super::{OutboundMessage, Provider, ProviderAccept, ProviderError, Recipient};
use crate::domain::{Channel, FailureReason, InvalidSetting};

/// The sandbox's settings (`kind = "sandbox"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// The outbox file.
    pub outbox: PathBuf,
}

#[async_trait]
impl ProviderKind for SandboxSettings {
    fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        if self.outbox.as_os_str().is_empty() {
            return Err(InvalidSetting::new(
                format!("providers.{name}.outbox"),
                "is empty",
            ));
        }
        Ok(())
    }

    async fn build(
        &self,
        name: &str,
        _context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        let provider = SandboxProvider::open(name, &self.outbox)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(provider))
    }
}

/// Appends messages to an outbox file.
#[derive(Debug)]
pub struct SandboxProvider {
    name: String,
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

#[derive(Serialize)]
struct OutboxLine<'a> {
    at: Timestamp,
    provider: &'a str,
    delivery_id: &'a str,
    channel: &'a str,
    to: &'a str,
    message: &'a str,
    message_id: &'a str,
    /// A push's acknowledgement token, as the app would get it.
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_token: Option<&'a str>,
}

impl SandboxProvider {
    /// Opens (creating if needed) the outbox file at `path`.
    pub async fn open(name: &str, path: &Path) -> std::io::Result<Self> {
        let path = path.to_path_buf();
        let opened = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            if let Some(parent) = opened.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&opened)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(SandboxProvider {
            name: name.to_owned(),
            path,
            file: Mutex::new(file),
        })
    }

    /// The outbox file.
    pub fn outbox(&self) -> &Path {
        &self.path
    }
}

/// What the sandbox does for Twilio's magic test numbers and tagged tokens (`+15005550009` is
/// a landline: SMS to it fails, a call goes through).
fn scripted_failure(recipient: Recipient<'_>, channel: Channel) -> Option<ProviderError> {
    let (reason, code, message) = match recipient {
        Recipient::Phone("+15005550001") => (
            FailureReason::InvalidRecipient,
            "21211",
            "The 'To' number +15005550001 is not a valid phone number.",
        ),
        Recipient::Phone("+15005550003") => (
            FailureReason::DestinationNotPermitted,
            "21408",
            "Permission to send an SMS has not been enabled for the region indicated by the 'To' number",
        ),
        Recipient::Phone("+15005550004") => (
            FailureReason::RecipientOptedOut,
            "21610",
            "Attempt to send to unsubscribed recipient",
        ),
        Recipient::Phone("+15005550009") if channel == Channel::Sms => (
            FailureReason::NotMobileNumber,
            "21614",
            "'To' number is not a valid mobile number",
        ),
        Recipient::Device { token, .. } if token.starts_with("unregistered") => {
            (FailureReason::DeviceUnregistered, "410", "Unregistered")
        }
        Recipient::Device { token, .. } if token.starts_with("invalid") => {
            (FailureReason::DeviceTokenInvalid, "400", "BadDeviceToken")
        }
        _ => return None,
    };
    Some(ProviderError::new(reason, Some(code), message))
}

#[async_trait]
impl Provider for SandboxProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        if let Some(failure) = scripted_failure(message.recipient, message.channel) {
            return Err(failure);
        }
        let message_id = format!("SB{}", uuid::Uuid::new_v4().simple());
        let mut line = serde_json::to_vec(&OutboxLine {
            at: Timestamp::now(),
            provider: &self.name,
            delivery_id: message.delivery_id,
            channel: message.channel.as_str(),
            to: message.masked_recipient,
            message: message.text,
            message_id: &message_id,
            ack_token: message.ack_token,
        })
        .map_err(|e| ProviderError::new(FailureReason::ProviderRejected, None, e.to_string()))?;
        line.push(b'\n');
        // One short append to the page cache (no fsync): cheaper on this thread than a hop to
        // the blocking pool and back.
        let written = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .write_all(&line);
        written.map_err(|e| {
            ProviderError::new(
                FailureReason::ProviderUnavailable,
                None,
                format!("cannot write the outbox {}: {e}", self.path.display()),
            )
        })?;
        Ok(ProviderAccept {
            message_id: Some(message_id),
        })
    }
}
