//! Twilio, hand-written on reqwest: SMS through the Messages API, voice through the Calls API
//! with TwiML that reads the code digit by digit, twice. HTTP Basic auth with the account SID
//! and auth token. Every Twilio error is classified into a `FailureReason` and retry class,
//! keeping Twilio's own code and message. Adapters classify; they never retry.

mod settings;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use serde::Deserialize;

use super::{OutboundMessage, Provider, ProviderAccept, ProviderError, Recipient};
use crate::domain::{Channel, FailureReason, RetryClass};

pub use settings::TwilioSettings;

/// Longest validity Twilio accepts for a message, in seconds.
const MAX_VALIDITY_SECS: i64 = 36_000;

/// A Twilio account as a provider.
#[derive(Debug)]
pub struct TwilioProvider {
    name: String,
    settings: TwilioSettings,
    client: reqwest::Client,
}

/// Twilio's error body.
#[derive(Debug, Deserialize)]
struct TwilioErrorBody {
    code: Option<i64>,
    message: Option<String>,
}

/// Twilio's success body (the parts used).
#[derive(Debug, Deserialize)]
struct TwilioResource {
    sid: String,
}

/// The reason and retry class of a Twilio error code (API or delivery receipt).
pub fn classify(code: i64) -> (FailureReason, RetryClass) {
    use FailureReason::*;
    use RetryClass::*;
    match code {
        21211 | 21217 => (InvalidRecipient, PermanentForTarget),
        21408 | 21612 => (DestinationNotPermitted, PermanentForProvider),
        21610 => (RecipientOptedOut, PermanentForTarget),
        21614 => (NotMobileNumber, PermanentForTarget),
        30003 => (RecipientUnreachable, PermanentForTarget),
        30004 => (CarrierFiltered, PermanentForTarget),
        30005 => (RecipientUnknown, PermanentForTarget),
        30006 => (NotMobileNumber, PermanentForTarget),
        30007 => (CarrierFiltered, PermanentForProvider),
        30008 => (Undeliverable, Transient),
        20429 | 14107 => (ProviderThrottled, Transient),
        20003 | 20005 | 20404 | 21606 | 21659 => (ProviderMisconfigured, PermanentForProvider),
        _ => (ProviderRejected, PermanentForProvider),
    }
}

/// TwiML that says `text` (the voice message, which reads the code digit by digit, twice) in
/// `language` (e.g. `de-DE`).
pub fn voice_twiml(text: &str, language: &str) -> String {
    format!(
        "<Response><Say language=\"{}\">{}</Say></Response>",
        xml_escape(language),
        xml_escape(text)
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl TwilioProvider {
    /// A provider for one Twilio account.
    pub fn new(name: &str, settings: TwilioSettings, timeout: Duration) -> Result<Self, String> {
        let client = super::http_client_builder(name, settings.ca_file.as_deref())?
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(TwilioProvider {
            name: name.to_owned(),
            settings,
            client,
        })
    }

    fn url(&self, resource: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/{resource}.json",
            self.settings.base_url.as_str().trim_end_matches('/'),
            self.settings.account_sid
        )
    }

    fn form(
        &self,
        message: &OutboundMessage<'_>,
        to: &str,
    ) -> Result<Vec<(&'static str, String)>, ProviderError> {
        let mut form = vec![("To", to.to_owned())];
        match (
            message.channel,
            &self.settings.messaging_service_sid,
            &self.settings.from,
        ) {
            (Channel::Sms, Some(service), _) => form.push(("MessagingServiceSid", service.clone())),
            (_, _, Some(from)) => form.push(("From", from.clone())),
            _ => {
                return Err(ProviderError::new(
                    FailureReason::ProviderMisconfigured,
                    None,
                    format!(
                        "provider `{}` has neither `from` nor `messaging_service_sid`",
                        self.name
                    ),
                ));
            }
        }
        match message.channel {
            Channel::Sms => {
                form.push(("Body", message.text.to_owned()));
                let left = message
                    .expires_at
                    .duration_since(Timestamp::now())
                    .as_secs();
                form.push((
                    "ValidityPeriod",
                    left.clamp(1, MAX_VALIDITY_SECS).to_string(),
                ));
            }
            Channel::Voice => form.push(("Twiml", voice_twiml(message.text, message.language))),
            Channel::Push => unreachable!("checked by send"),
        }
        if let Some(callback) = &self.settings.status_callback {
            form.push(("StatusCallback", callback.clone()));
        }
        Ok(form)
    }
}

/// The status-callback URL of Twilio provider `provider` under the receipts listener's public
/// base URL: where Twilio posts, and the URL its signatures cover.
pub fn callback_url(public_url: &str, provider: &str) -> String {
    format!(
        "{}/receipts/twilio/{provider}",
        public_url.trim_end_matches('/')
    )
}

/// Classifies an HTTP error answer from Twilio.
fn error_from_response(
    status: reqwest::StatusCode,
    retry_after: Option<Duration>,
    body: &str,
) -> ProviderError {
    let parsed: Option<TwilioErrorBody> = serde_json::from_str(body).ok();
    let code = parsed.as_ref().and_then(|b| b.code);
    let message = parsed.and_then(|b| b.message).unwrap_or_else(|| {
        format!(
            "HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        )
    });
    let (reason, class) = match (status.as_u16(), code) {
        (429, _) => (FailureReason::ProviderThrottled, RetryClass::Transient),
        (401 | 403, None) => (
            FailureReason::ProviderMisconfigured,
            RetryClass::PermanentForProvider,
        ),
        (500..=599, _) => (FailureReason::ProviderUnavailable, RetryClass::Transient),
        (_, Some(code)) => classify(code),
        _ => (
            FailureReason::ProviderRejected,
            RetryClass::PermanentForProvider,
        ),
    };
    ProviderError {
        reason,
        class,
        raw_code: Some(code.map_or_else(|| status.as_u16().to_string(), |c| c.to_string())),
        raw_message: crate::domain::scrub(&message),
        retry_after,
        token_invalid_since: None,
    }
}

#[async_trait]
impl Provider for TwilioProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Twilio reports each message's fate to the status callback, when one is configured.
    fn sends_receipts(&self, _channel: Channel) -> bool {
        self.settings.status_callback.is_some()
    }

    /// Without a `status_callback` of the gateway's, Twilio still calls back where the
    /// account's Messaging Service has a status callback URL of its own.
    fn may_send_receipts(&self, _channel: Channel) -> bool {
        true
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let Recipient::Phone(to) = message.recipient else {
            return Err(ProviderError::new(
                FailureReason::ProviderMisconfigured,
                None,
                "Twilio sends SMS and calls, not push",
            ));
        };
        let resource = match message.channel {
            Channel::Sms => "Messages",
            Channel::Voice => "Calls",
            Channel::Push => {
                return Err(ProviderError::new(
                    FailureReason::ProviderMisconfigured,
                    None,
                    "Twilio does not send push",
                ));
            }
        };
        let form = self.form(message, to)?;
        let response = super::send_traced(
            self.client
                .post(self.url(resource))
                .basic_auth(
                    &self.settings.account_sid,
                    Some(self.settings.auth_token.expose()),
                )
                .form(&form),
        )
        .await
        .map_err(|error| super::unreachable("Twilio", error))?;
        let status = response.status();
        let retry_after = super::retry_after(&response);
        let body = response.text().await.unwrap_or_default();
        if status.is_success() {
            let resource: TwilioResource = serde_json::from_str(&body).map_err(|e| {
                ProviderError::new(
                    FailureReason::ProviderRejected,
                    Some(&status.as_u16().to_string()),
                    format!("unreadable answer: {e}"),
                )
            })?;
            return Ok(ProviderAccept {
                message_id: Some(resource.sid),
            });
        }
        Err(error_from_response(status, retry_after, &body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mapped_code_has_its_reason_and_class() {
        use FailureReason::*;
        let cases = [
            (21211, InvalidRecipient, RetryClass::PermanentForTarget),
            (
                21408,
                DestinationNotPermitted,
                RetryClass::PermanentForProvider,
            ),
            (21610, RecipientOptedOut, RetryClass::PermanentForTarget),
            (21614, NotMobileNumber, RetryClass::PermanentForTarget),
            (30003, RecipientUnreachable, RetryClass::PermanentForTarget),
            (30004, CarrierFiltered, RetryClass::PermanentForTarget),
            (30005, RecipientUnknown, RetryClass::PermanentForTarget),
            (30006, NotMobileNumber, RetryClass::PermanentForTarget),
            (30007, CarrierFiltered, RetryClass::PermanentForProvider),
            (30008, Undeliverable, RetryClass::Transient),
            (20429, ProviderThrottled, RetryClass::Transient),
            (
                20003,
                ProviderMisconfigured,
                RetryClass::PermanentForProvider,
            ),
        ];
        for (code, reason, class) in cases {
            assert_eq!(classify(code), (reason, class), "{code}");
        }
        let throttled = error_from_response(
            reqwest::StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(3)),
            "{}",
        );
        assert_eq!(
            (throttled.reason, throttled.retry_after),
            (ProviderThrottled, Some(Duration::from_secs(3)))
        );
        let outage = error_from_response(
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            None,
            "<html>down</html>",
        );
        assert_eq!(
            (outage.reason, outage.class),
            (ProviderUnavailable, RetryClass::Transient)
        );
        assert_eq!(outage.raw_code.as_deref(), Some("503"));
    }

    #[test]
    fn voice_twiml_escapes_the_text() {
        assert_eq!(
            voice_twiml("A&B: 4, 8.", "de-DE"),
            "<Response><Say language=\"de-DE\">A&amp;B: 4, 8.</Say></Response>"
        );
    }
}
