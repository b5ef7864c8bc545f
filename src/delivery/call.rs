//! One provider call: the message rendered, the attempt recorded before the provider hears of
//! the code, the call bounded by the provider timeout, and its end recorded with the target's.

use jiff::Timestamp;
use tracing::Instrument;

use super::engine::Dispatcher;
use super::progress::Progress;
use crate::domain::{
    AttemptOutcome, Autofill, Channel, FailureReason, Job, MessageContext, Target, mask_phone,
    mask_token,
};
use crate::providers::{OutboundMessage, ProviderEntry, ProviderError, Recipient};
use crate::store::{AttemptEnd, AttemptStart, StoreError, TargetUpdate};

impl AttemptEnd {
    /// A call the provider accepted, as `message_id` if it gave one; `receipts`: whether the
    /// provider reports the fate of what it accepts on this channel.
    pub(super) fn sent(ended_at: Timestamp, message_id: Option<String>, receipts: bool) -> Self {
        AttemptEnd {
            ended_at,
            outcome: AttemptOutcome::Sent,
            reason: None,
            provider_code: None,
            provider_message: None,
            awaits_receipt: receipts && message_id.is_some(),
            provider_message_id: message_id,
            next_retry_at: None,
            token_invalid_since: None,
        }
    }

    pub(super) fn failed(
        ended_at: Timestamp,
        error: &ProviderError,
        next_retry_at: Option<Timestamp>,
    ) -> Self {
        AttemptEnd {
            ended_at,
            outcome: AttemptOutcome::Failed,
            reason: Some(error.reason),
            provider_code: error.raw_code.clone(),
            provider_message: Some(error.raw_message.clone()),
            provider_message_id: None,
            awaits_receipt: false,
            next_retry_at,
            token_invalid_since: error.token_invalid_since,
        }
    }
}

impl Dispatcher {
    /// One provider call, its start recorded; the caller records its end.
    pub(super) async fn call(
        &self,
        job: &Job,
        index: usize,
        channel: Channel,
        entry: &ProviderEntry,
        retry: u32,
        progress: &Progress<'_>,
    ) -> Result<
        (
            crate::store::AttemptKey,
            Result<crate::providers::ProviderAccept, ProviderError>,
        ),
        StoreError,
    > {
        let target = &job.targets[index];
        let recipient = Recipient::of(target);
        let masked = match target {
            Target::Phone(phone) => mask_phone(&phone.number),
            Target::Device(device) => mask_token(&device.token),
        };
        // The number's range, which the fraud guard counts sends and conversions by.
        let range = match target {
            Target::Phone(phone) => {
                crate::policy::destination_range(&phone.number, self.settings.range_depth)
            }
            Target::Device(_) => None,
        };
        let provider = &entry.provider;
        let started_at = progress.now();
        let rendered = self.settings.templates.render(
            channel,
            &MessageContext {
                app_name: self
                    .settings
                    .app_names
                    .get(&job.tenant)
                    .unwrap_or(&self.settings.app_name),
                purpose: &job.purpose,
                locale: &job.locale,
                autofill: self
                    .settings
                    .autofill
                    .get(&job.tenant)
                    .unwrap_or(&Autofill::None),
                code: &job.code,
                expires_at: job.expires_at,
                now: started_at,
            },
        );
        // Committed before the provider hears of the code (see `Progress::start_attempt`).
        let attempt = progress
            .start_attempt(&AttemptStart {
                target: index as u32,
                provider: provider.name().to_owned(),
                channel,
                masked_target: masked.clone(),
                started_at,
                retry,
                sms: rendered.sms,
                range: range.clone(),
            })
            .await?;
        // A push carries the token its device's acknowledgement must show.
        let ack_token = match target {
            Target::Device(device) => {
                Some(progress.ledger.ack_tokens().token(&progress.id, &device.id))
            }
            Target::Phone(_) => None,
        };
        let message = OutboundMessage {
            ack_token: ack_token.as_deref(),
            delivery_id: &progress.id,
            channel,
            recipient,
            masked_recipient: &masked,
            text: &rendered.text,
            language: &rendered.language,
            sms: rendered.sms,
            code: &job.code,
            expires_at: job.expires_at,
        };
        let span = tracing::info_span!(
            "provider",
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
            provider = provider.name(),
            %channel,
            to = %masked,
            retry
        );
        crate::telemetry::describe(
            &span,
            "client",
            || format!("{} {channel}", provider.name()),
            || {
                vec![
                    ("otp.provider", provider.name().to_owned()),
                    ("otp.channel", channel.as_str().to_owned()),
                ]
            },
        );
        let timeout = self.settings.provider_timeout;
        let calling = std::time::Instant::now();
        let result = match tokio::time::timeout(timeout, provider.send(&message))
            .instrument(span)
            .await
        {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(
                FailureReason::ProviderTimeout,
                None,
                format!("no answer within {timeout:?}"),
            )),
        };
        self.metrics.call_ended(
            provider.name(),
            channel,
            result.as_ref().err().map(|error| error.reason),
            calling.elapsed(),
        );
        if let (Ok(_), Target::Phone(phone), Some(shape)) = (&result, target, rendered.sms) {
            let country = self.metrics.country(&phone.number);
            self.metrics.sms_accepted(country.as_deref(), shape);
        }
        if let (Ok(_), Some(range)) = (&result, &range) {
            self.fraud.counter().sent(&job.tenant, range, started_at);
        }
        match &result {
            Ok(_) => {
                tracing::info!(provider = provider.name(), %channel, to = %masked, retry, "accepted by provider")
            }
            Err(error) => tracing::info!(provider = provider.name(), %channel, to = %masked, retry,
                reason = %error.reason, provider_code = error.raw_code.as_deref(), "provider refused"),
        }
        Ok((attempt, result))
    }

    /// Records how a call ended together with its target's new state (SENT, or FAILED with the
    /// call's reason), in one ledger transaction.
    pub(super) async fn finish_call(
        &self,
        attempt: crate::store::AttemptKey,
        end: &AttemptEnd,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        let update = TargetUpdate::after(channel, end);
        progress.finish_attempt(attempt, end, index, &update).await
    }
}
