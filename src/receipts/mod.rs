//! Delivery receipts: the HTTP listener for provider callbacks (Twilio status callbacks so
//! far). A callback is verified, read into a receipt, applied to the attempt it is about, and,
//! when it changes a finished delivery (SENT to DELIVERED or FAILED), published as an event.

pub mod twilio;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::SecretString;
use crate::delivery::DeliveryService;
use crate::queue::Publisher;

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
    let Some(receipt) = twilio::receipt(&params) else {
        return StatusCode::NO_CONTENT;
    };
    let message = format!("status callback: {}", receipt.status);
    let applied = state
        .service
        .apply_receipt(
            &provider,
            &receipt.message_id,
            receipt.outcome,
            receipt.reason,
            receipt.code,
            message,
        )
        .await;
    match applied {
        Ok(Some(report)) => {
            if let Err(error) = state.publisher.publish_event(&report).await {
                tracing::warn!(%error, "receipt applied, but its event was not confirmed");
            }
            StatusCode::NO_CONTENT
        }
        Ok(None) => StatusCode::NO_CONTENT,
        Err(error) => {
            tracing::error!(%error, "receipt not applied: Twilio will retry");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}
