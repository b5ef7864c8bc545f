//! SMPP 3.4 carrier binds: PDUs and framing from `rusmpp`, the session loop our own
//! ([`session`]).
//!
//! Each configured bind is one transceiver session kept up by a supervisor task: it binds with
//! system_id and password, keeps the session alive with enquire_link, re-binds with back-off when
//! the session drops or is refused, answers deliver_sm and turns delivery receipts into
//! [`ProviderReceipt`]s. Sends share the session: at most `window` submit_sm wait for their
//! response at once, paced to `throughput` per second. Texts go as GSM-7 (data_coding 0) or
//! UCS-2 (data_coding 8), in short_message or, beyond 254 octets, in the message_payload TLV.
//! Errors are classified from the command_status; the adapter never retries.

mod receipts;
mod session;
mod settings;
mod status;
mod submit;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backoff::backoff::Backoff;
use jiff::Timestamp;
use rusmpp::Pdu;
use rusmpp::pdus::{BindTransceiver, DeliverSm};
use rusmpp::types::COctetString;
use rusmpp::values::{InterfaceVersion, Npi, Ton};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::session::{Session, SessionTiming};
use super::{OutboundMessage, Provider, ProviderAccept, ProviderError, ProviderReceipt, Recipient};
use crate::domain::{Channel, FailureReason, RetryClass};

pub use receipts::parse_receipt;
pub use settings::SmppSettings;
use status::classify_error;
pub use status::classify_status;
pub use submit::relative_validity;
use submit::submit_sm;

/// The most octets short_message carries in SMPP 3.4; longer texts use message_payload.
pub(super) const SHORT_MESSAGE_MAX: usize = 254;

/// The state of the bind, as sends see it.
#[derive(Clone)]
enum BindState {
    /// The first bind is under way: sends wait for it (up to the response timeout).
    Binding,
    /// Not bound; why (the last bind error). Sends fail at once: the supervisor knows.
    Down(ProviderError),
    /// Bound as a transceiver.
    Bound(Session),
}

/// What the supervisor and the sends share.
struct Shared {
    name: String,
    settings: SmppSettings,
    state: watch::Sender<BindState>,
    /// Wakes the supervisor from its re-bind back-off when a send found the bind down.
    rebind_now: Notify,
    window: Semaphore,
    /// The earliest instant the next submit may go out (throughput pacing).
    next_slot: Mutex<Instant>,
    interval: Duration,
    timing: SessionTiming,
    receipts: mpsc::UnboundedSender<ProviderReceipt>,
}

/// One SMPP bind, usable as a provider for SMS.
pub struct SmppProvider {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl std::fmt::Debug for SmppProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmppProvider")
            .field("name", &self.shared.name)
            .field("address", &self.shared.settings.address)
            .finish()
    }
}

impl Drop for SmppProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SmppProvider {
    /// Starts the bind's supervisor (it binds in the background and keeps the bind up); receipts
    /// go to `receipts`. `settings` were validated by `Config`.
    pub fn start(
        name: &str,
        settings: SmppSettings,
        receipts: mpsc::UnboundedSender<ProviderReceipt>,
    ) -> Self {
        let timing = SessionTiming {
            response_timeout: settings.response_timeout,
            enquire_link_interval: settings.enquire_link_interval,
        };
        let (state, _) = watch::channel(BindState::Binding);
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            window: Semaphore::new(settings.window.max(1) as usize),
            next_slot: Mutex::new(Instant::now()),
            interval: Duration::from_secs_f64(1.0 / settings.throughput.max(f64::MIN_POSITIVE)),
            timing,
            state,
            rebind_now: Notify::new(),
            settings,
            receipts,
        });
        let stop = CancellationToken::new();
        let span = tracing::info_span!("smpp", provider = name);
        tokio::spawn(tracing::Instrument::instrument(
            supervise(Arc::clone(&shared), stop.clone()),
            span,
        ));
        SmppProvider { shared, stop }
    }

    /// The bound session. While the first bind is under way it is awaited (up to the response
    /// timeout); a bind known to be down fails at once with why, and asks the supervisor to
    /// re-bind now rather than at the end of its back-off.
    async fn bound_session(&self) -> Result<Session, ProviderError> {
        let mut state = self.shared.state.subscribe();
        let wait = async {
            loop {
                match &*state.borrow_and_update() {
                    BindState::Bound(session) if !session.is_over() => {
                        return Ok(session.clone());
                    }
                    BindState::Bound(_) => {
                        return Err(ProviderError::new(
                            FailureReason::ProviderUnavailable,
                            None,
                            "the SMPP session is closing",
                        ));
                    }
                    BindState::Down(why) => return Err(why.clone()),
                    BindState::Binding => {}
                }
                if state.changed().await.is_err() {
                    return Err(ProviderError::new(
                        FailureReason::ProviderUnavailable,
                        None,
                        "the SMPP provider is stopping",
                    ));
                }
            }
        };
        let result = tokio::time::timeout(self.shared.timing.response_timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::new(
                    FailureReason::ProviderUnavailable,
                    None,
                    format!(
                        "not bound to the SMSC at {} yet (waited {:?})",
                        self.shared.settings.address, self.shared.timing.response_timeout
                    ),
                ))
            });
        if result.is_err() {
            self.shared.rebind_now.notify_one();
        }
        result
    }

    /// Waits for this submit's slot under the throughput limit.
    async fn pace(&self) {
        let slot = {
            let mut next = self
                .shared
                .next_slot
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + self.shared.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[async_trait]
impl Provider for SmppProvider {
    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let Recipient::Phone(number) = message.recipient else {
            return Err(ProviderError::new(
                FailureReason::ProviderMisconfigured,
                None,
                "an SMPP bind carries SMS to phone numbers only: check the routes",
            ));
        };
        if message.channel != Channel::Sms {
            return Err(ProviderError::new(
                FailureReason::ProviderMisconfigured,
                None,
                format!(
                    "an SMPP bind carries SMS only, not {}: check the routes",
                    message.channel
                ),
            ));
        }
        let submit = submit_sm(&self.shared.settings, number, message, Timestamp::now())?;
        let session = self.bound_session().await?;
        let _permit = self
            .shared
            .window
            .acquire()
            .await
            .expect("the window semaphore is never closed");
        self.pace().await;
        let response = session
            .request(
                submit,
                "submit_sm_resp",
                self.shared.timing.response_timeout,
            )
            .await
            .map_err(classify_error)?;
        if response.status != 0 {
            return Err(classify_status(response.status));
        }
        let message_id = match response.pdu {
            Some(Pdu::SubmitSmResp(resp)) => Some(resp.message_id().as_str().to_owned()),
            _ => None,
        };
        Ok(ProviderAccept {
            message_id: message_id.filter(|id| !id.is_empty()),
        })
    }

    fn sends_receipts(&self, channel: Channel) -> bool {
        channel == Channel::Sms
    }
}

/// Keeps the bind up until `stop`: bind, watch the session, and re-bind with back-off (cut
/// short when a send finds the bind down).
async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let (mut backoff, max) = crate::domain::reconnect_backoff(
        shared.settings.reconnect_initial,
        shared.settings.reconnect_max,
    );
    let (delivered_tx, mut delivered) = mpsc::unbounded_channel::<DeliverSm>();
    let receipts = {
        let shared = Arc::clone(&shared);
        async move {
            while let Some(deliver) = delivered.recv().await {
                forward_receipt(&shared, &deliver);
            }
        }
    };
    let work = async {
        loop {
            let bound = tokio::select! {
                _ = stop.cancelled() => return,
                bound = bind(&shared, delivered_tx.clone()) => bound,
            };
            match bound {
                Ok(session) => {
                    backoff.reset();
                    tracing::info!(address = %shared.settings.address, "SMPP bound (transceiver)");
                    shared.state.send_replace(BindState::Bound(session.clone()));
                    let lost = tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = session
                                .request(Pdu::Unbind, "unbind_resp", shared.timing.response_timeout)
                                .await;
                            session.close("unbound: the gateway is stopping");
                            return;
                        }
                        lost = session.ended() => lost,
                    };
                    tracing::warn!(address = %shared.settings.address, why = %lost, "SMPP bind lost; re-binding");
                    shared
                        .state
                        .send_replace(BindState::Down(ProviderError::new(
                            FailureReason::ProviderUnavailable,
                            None,
                            format!("the SMPP bind was lost ({lost}) and is being re-established"),
                        )));
                }
                Err(why) => {
                    tracing::warn!(address = %shared.settings.address, reason = %why.reason,
                        code = why.raw_code.as_deref(), problem = %why.raw_message, "SMPP bind failed");
                    shared.state.send_replace(BindState::Down(why));
                }
            }
            let delay = backoff.next_backoff().unwrap_or(max);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = shared.rebind_now.notified() => {}
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = receipts => {}
    }
}

/// Connects and binds as a transceiver.
async fn bind(
    shared: &Shared,
    delivered: mpsc::UnboundedSender<DeliverSm>,
) -> Result<Session, ProviderError> {
    let settings = &shared.settings;
    let timeout = shared.timing.response_timeout;
    let unreachable = |problem: String| {
        ProviderError::new(
            FailureReason::ProviderUnavailable,
            None,
            format!("cannot reach the SMSC at {}: {problem}", settings.address),
        )
    };
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&settings.address))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let misconfigured = |field: &str| {
        ProviderError::new(
            FailureReason::ProviderMisconfigured,
            None,
            format!("{field} does not fit the bind PDU"),
        )
    };
    let request = BindTransceiver::builder()
        .system_id(
            COctetString::from_str(&settings.system_id).map_err(|_| misconfigured("system_id"))?,
        )
        .password(
            COctetString::from_str(settings.password.expose())
                .map_err(|_| misconfigured("password"))?,
        )
        .system_type(
            COctetString::from_str(&settings.system_type)
                .map_err(|_| misconfigured("system_type"))?,
        )
        .interface_version(InterfaceVersion::Smpp3_4)
        .addr_ton(Ton::Unknown)
        .addr_npi(Npi::Unknown)
        .address_range(COctetString::empty())
        .build();
    let session = Session::start(stream, shared.timing, delivered);
    let refused = match session
        .request(request, "bind_transceiver_resp", timeout)
        .await
    {
        Ok(response) if response.status == 0 => return Ok(session),
        Ok(response) => {
            let mut why = classify_status(response.status);
            // Any refused bind is the account's settings, whatever the SMSC calls it.
            why.reason = FailureReason::ProviderMisconfigured;
            why.class = RetryClass::PermanentForProvider;
            why.raw_message = format!(
                "bind_transceiver refused as system_id `{}`: {}",
                settings.system_id, why.raw_message
            );
            why
        }
        Err(e) => classify_error(e),
    };
    session.close("the bind failed");
    Err(refused)
}

/// Turns a deliver_sm into a receipt for the delivery layer (other deliver_sm are ignored).
fn forward_receipt(shared: &Shared, deliver: &DeliverSm) {
    match parse_receipt(&shared.name, deliver) {
        Some(receipt) => {
            tracing::info!(message_id = %receipt.message_id, outcome = %receipt.outcome,
                reason = receipt.reason.map(|r| r.as_str()), "SMPP delivery receipt");
            let _ = shared.receipts.send(receipt);
        }
        None => tracing::debug!("deliver_sm that is not a delivery receipt ignored"),
    }
}

#[cfg(test)]
mod tests {
    use rusmpp::tlvs::MessageDeliveryRequestTlvValue;
    use rusmpp::types::OctetString;
    use rusmpp::values::{EsmClass, MessageState};

    use super::*;
    use crate::domain::AttemptOutcome;

    #[test]
    fn validity_is_the_codes_remaining_lifetime_in_relative_form() {
        let now = Timestamp::UNIX_EPOCH;
        let at = |s| now + jiff::SignedDuration::from_secs(s);
        assert_eq!(relative_validity(at(300), now), "000000000500000R");
        assert_eq!(relative_validity(at(3_725), now), "000000010205000R");
        assert_eq!(relative_validity(at(90_061), now), "000001010101000R");
        assert_eq!(relative_validity(now, now), "000000000001000R");
    }

    #[test]
    fn command_statuses_map_to_reasons_and_classes() {
        let throttled = classify_status(0x58);
        assert_eq!(
            (throttled.reason, throttled.class),
            (FailureReason::ProviderThrottled, RetryClass::Transient)
        );
        assert_eq!(throttled.raw_code.as_deref(), Some("0x00000058"));
        assert_eq!(classify_status(0x14).class, RetryClass::Transient);
        let destination = classify_status(0x0B);
        assert_eq!(
            (destination.reason, destination.class),
            (
                FailureReason::InvalidRecipient,
                RetryClass::PermanentForTarget
            )
        );
        assert_eq!(
            classify_status(0x0E).reason,
            FailureReason::ProviderMisconfigured
        );
        assert_eq!(classify_status(0x08).class, RetryClass::Transient);
        assert_eq!(
            classify_status(0x0431).class,
            RetryClass::PermanentForProvider
        );
    }

    fn receipt(text: &str, esm: u8, tlvs: Vec<MessageDeliveryRequestTlvValue>) -> DeliverSm {
        DeliverSm::builder()
            .esm_class(EsmClass::from(esm))
            .short_message(OctetString::from_slice(text.as_bytes()).unwrap())
            .tlvs(tlvs)
            .build()
    }

    #[test]
    fn receipts_are_read_from_the_text_leniently() {
        let text = "id:0A1B2C sub:001 dlvrd:001 submit date:2611211000 done date:2611211001 stat:DELIVRD err:000 text:";
        let r = parse_receipt("carrier", &receipt(text, 0x04, vec![])).unwrap();
        assert_eq!(r.message_id, "0A1B2C");
        assert_eq!(r.outcome, AttemptOutcome::Delivered);
        assert_eq!(r.reason, None);

        let text = "ID:77 SUB:001 DLVRD:000 SUBMIT DATE:2611211000 DONE DATE:2611211001 STAT:UNDELIV ERR:0b1 Text:hello";
        let r = parse_receipt("carrier", &receipt(text, 0x04, vec![])).unwrap();
        assert_eq!(r.message_id, "77");
        assert_eq!(
            (r.outcome, r.reason),
            (AttemptOutcome::Failed, Some(FailureReason::Undeliverable))
        );
        assert_eq!(r.code.as_deref(), Some("0b1"));
        assert!(r.detail.contains("stat UNDELIV"), "{}", r.detail);

        let r = parse_receipt("c", &receipt("id:9 stat:EXPIRED err:000", 0x04, vec![])).unwrap();
        assert_eq!(r.reason, Some(FailureReason::RecipientUnreachable));
        assert_eq!(r.code.as_deref(), Some("EXPIRED"));
        // Intermediate states and incoming messages are not receipts.
        assert!(parse_receipt("c", &receipt("id:9 stat:ENROUTE", 0x04, vec![])).is_none());
        assert!(parse_receipt("c", &receipt("id:9 stat:DELIVRD", 0x00, vec![])).is_none());
    }

    #[test]
    fn receipt_tlvs_win_over_the_text() {
        let tlvs = vec![
            MessageDeliveryRequestTlvValue::ReceiptedMessageId(
                COctetString::from_str("abc").unwrap(),
            ),
            MessageDeliveryRequestTlvValue::MessageState(MessageState::Rejected),
        ];
        // Even without the receipt bit in esm_class, and with a text that says otherwise.
        let r = parse_receipt("c", &receipt("id:zzz stat:DELIVRD", 0x00, tlvs)).unwrap();
        assert_eq!(r.message_id, "abc");
        assert_eq!(r.reason, Some(FailureReason::CarrierFiltered));
    }
}
