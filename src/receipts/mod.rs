//! Delivery receipts: the HTTP listener for provider callbacks (Twilio status callbacks) and the
//! forwarder for receipts providers receive on their own sessions (SMPP deliver_sm). A receipt is
//! verified, applied to the attempt it is about, and, when it settles a finished delivery (SENT
//! to DELIVERED or FAILED), published as an event.

pub mod twilio;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tokio::sync::mpsc;

use crate::config::SecretString;
use crate::delivery::{DeliveryService, ReceiptApplied};
use crate::providers::ProviderReceipt;
use crate::queue::Publisher;
use crate::store::StoreError;

/// What the receipt endpoints need.
pub struct ReceiptsState {
    /// Applies receipts.
    pub service: Arc<DeliveryService>,
    /// Publishes the changed reports.
    pub publisher: Publisher,
    /// Auth tokens of the configured Twilio providers, by provider name.
    pub twilio_tokens: BTreeMap<String, SecretString>,
    /// The base URL providers call (signatures cover the full URL as the provider saw it).
    pub public_url: String,
}

/// Serves the receipt endpoints on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: ReceiptsState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/receipts/twilio/{provider}", post(twilio_callback))
        .with_state(Arc::new(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn twilio_callback(
    State(state): State<Arc<ReceiptsState>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> StatusCode {
    let Some(token) = state.twilio_tokens.get(&provider) else {
        return StatusCode::NOT_FOUND;
    };
    let url = format!(
        "{}/receipts/twilio/{provider}",
        state.public_url.trim_end_matches('/')
    );
    let claimed = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !twilio::verify(token.expose(), &url, &params, claimed) {
        tracing::warn!(%provider, "Twilio callback with a wrong signature refused");
        return StatusCode::FORBIDDEN;
    }
    let Some(receipt) = twilio::receipt(&provider, &params) else {
        return StatusCode::NO_CONTENT;
    };
    match apply(&state.service, Some(&state.publisher), &receipt).await {
        Ok(_) => StatusCode::NO_CONTENT,
        Err(error) => {
            tracing::error!(%error, "receipt not applied: Twilio will retry");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// Applies `receipt` and publishes the report it settled, if any (and if `events` is given).
/// Returns whether the receipt's message was known.
pub async fn apply(
    service: &DeliveryService,
    events: Option<&Publisher>,
    receipt: &ProviderReceipt,
) -> Result<bool, StoreError> {
    match service.apply_receipt(receipt).await? {
        ReceiptApplied::UnknownMessage => Ok(false),
        ReceiptApplied::Recorded => Ok(true),
        ReceiptApplied::Concluded(report) => {
            if let Some(publisher) = events
                && let Err(error) = publisher.publish_event(&report).await
            {
                tracing::warn!(%error, "receipt applied, but its event was not confirmed");
            }
            Ok(true)
        }
    }
}

/// How often, and how far apart, a receipt for a message not recorded yet is tried again: a
/// carrier may answer on its session before the send's own answer has been written down.
const UNKNOWN_RETRIES: u32 = 20;
const UNKNOWN_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Applies the receipts providers receive on their own sessions (SMPP deliver_sm) until `stop`.
/// A receipt whose message is not recorded yet is tried again for a few seconds, then dropped
/// with a log line; a ledger failure is retried the same way.
pub async fn forward(
    mut receipts: mpsc::UnboundedReceiver<ProviderReceipt>,
    service: Arc<DeliveryService>,
    events: Option<Publisher>,
    stop: CancellationToken,
) {
    let pending = tokio_util::task::TaskTracker::new();
    loop {
        let receipt = tokio::select! {
            _ = stop.cancelled() => break,
            receipt = receipts.recv() => match receipt {
                Some(receipt) => receipt,
                None => break,
            },
        };
        let (service, events, stop) = (Arc::clone(&service), events.clone(), stop.clone());
        pending.spawn(async move {
            for attempt in 0..=UNKNOWN_RETRIES {
                match apply(&service, events.as_ref(), &receipt).await {
                    Ok(true) => return,
                    Ok(false) if attempt == UNKNOWN_RETRIES => {
                        tracing::info!(provider = %receipt.provider, message_id = %receipt.message_id,
                            "receipt for an unknown message ignored");
                        return;
                    }
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "receipt not applied yet; trying again"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(UNKNOWN_RETRY_DELAY) => {}
                }
            }
        });
    }
    pending.close();
    pending.wait().await;
}
