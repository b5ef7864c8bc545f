//! Learning from providers: an opt-out blocks the number for the tenant, a dead push token
//! blocks the token, so later jobs do not try again.

use super::engine::Dispatcher;
use super::progress::Progress;
use crate::domain::{FailureReason, Job, Target};
use crate::policy::{BlockKind, BlockSource, NewBlockEntry};
use crate::providers::ProviderError;
use crate::store::StoreError;

impl Dispatcher {
    /// Turns what a provider said about a recipient into a block entry, so that later jobs do
    /// not try again: an opt-out (e.g. Twilio 21610) blocks the number for the tenant, a dead
    /// push token (unregistered, invalid) blocks the token.
    pub(super) async fn learn_from(
        &self,
        job: &Job,
        index: usize,
        provider: &str,
        error: &ProviderError,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        let (kind, pattern, source) = match (&job.targets[index], error.reason) {
            (Target::Phone(phone), FailureReason::RecipientOptedOut) => {
                (BlockKind::Number, phone.number.clone(), BlockSource::OptOut)
            }
            // Only a token the push service called dead (unregistered) is blocked: an invalid
            // one often means the wrong environment or app (our configuration), not the device.
            (Target::Device(device), FailureReason::DeviceUnregistered) => (
                BlockKind::DeviceToken,
                device.token.clone(),
                BlockSource::ProviderFeedback,
            ),
            _ => return Ok(()),
        };
        let entry = NewBlockEntry {
            tenant: Some(job.tenant.clone()),
            kind,
            pattern,
            source,
            note: format!(
                "{provider} said {} ({}: {})",
                error.reason,
                error.raw_code.as_deref().unwrap_or("-"),
                error.raw_message
            ),
            expires_at: None,
        };
        let (added, new) = self.policy.add_block(&entry, progress.now()).await?;
        if new {
            tracing::info!(entry = added.id, kind = %added.kind, source = %added.source, "block-list entry added from provider feedback");
        }
        Ok(())
    }
}
