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

mod session;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backoff::backoff::Backoff;
use jiff::Timestamp;
use rusmpp::Pdu;
use rusmpp::pdus::{BindTransceiver, DeliverSm, SubmitSm};
use rusmpp::tlvs::{MessageSubmissionRequestTlvValue, TlvValue};
use rusmpp::types::{AnyOctetString, COctetString, OctetString};
use rusmpp::values::{
    DataCoding, EsmClass, InterfaceVersion, MessagePayload, MessageState, MessageType, Npi,
    RegisteredDelivery, ServiceType, Ton,
};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::session::{RequestError, Session, SessionTiming};
use super::{OutboundMessage, Provider, ProviderAccept, ProviderError, ProviderReceipt, Recipient};
use crate::config::SmppProviderConfig;
use crate::domain::{
    AttemptOutcome, Channel, FailureReason, RetryClass, SmsEncoding, gsm7_septets, measure_sms,
    ucs2_octets,
};

/// The most octets short_message carries in SMPP 3.4; longer texts use message_payload.
const SHORT_MESSAGE_MAX: usize = 254;

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
    settings: SmppProviderConfig,
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
        settings: SmppProviderConfig,
        receipts: mpsc::UnboundedSender<ProviderReceipt>,
    ) -> Self {
        let duration = |value: jiff::SignedDuration, fallback| {
            crate::config::positive("smpp", value).unwrap_or(fallback)
        };
        let timing = SessionTiming {
            response_timeout: duration(settings.response_timeout, Duration::from_secs(5)),
            enquire_link_interval: duration(
                settings.enquire_link_interval,
                Duration::from_secs(30),
            ),
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

/// The validity_period for a code that expires at `expires_at`: SMPP 3.4 relative time
/// `YYMMDDhhmmss000R`, at least one second.
pub fn relative_validity(expires_at: Timestamp, now: Timestamp) -> String {
    let seconds = expires_at.duration_since(now).as_secs().max(1);
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (hours, rest) = (rest / 3600, rest % 3600);
    let (minutes, seconds) = (rest / 60, rest % 60);
    // SMPP relative times count days in two digits: a code never lives 100 days.
    format!(
        "0000{:02}{hours:02}{minutes:02}{seconds:02}000R",
        days.min(99)
    )
}

/// Source address TON/NPI: international for `+` numbers, alphanumeric for sender names,
/// unknown for short codes.
fn source_address(source: &str) -> (Ton, Npi, &str) {
    if let Some(digits) = source.strip_prefix('+') {
        (Ton::International, Npi::Isdn, digits)
    } else if source.bytes().all(|b| b.is_ascii_digit()) {
        (Ton::Unknown, Npi::Isdn, source)
    } else {
        (Ton::Alphanumeric, Npi::Unknown, source)
    }
}

fn field<T: FromStr>(name: &str, value: &str) -> Result<T, ProviderError> {
    T::from_str(value).map_err(|_| {
        ProviderError::new(
            FailureReason::ProviderMisconfigured,
            None,
            format!("{name} `{value}` does not fit an SMPP field"),
        )
    })
}

/// The submit_sm for `message` to `number`: registered delivery (a receipt for success and
/// failure), the code's remaining lifetime as validity, and the text as GSM-7 or UCS-2.
fn submit_sm(
    settings: &SmppProviderConfig,
    number: &str,
    message: &OutboundMessage<'_>,
    now: Timestamp,
) -> Result<SubmitSm, ProviderError> {
    let (source_ton, source_npi, source) = source_address(&settings.source_addr);
    let destination = number.strip_prefix('+').unwrap_or(number);
    let encoding = message
        .sms
        .map_or_else(|| measure_sms(message.text).encoding, |s| s.encoding);
    let (data_coding, octets) = match (encoding, gsm7_septets(message.text)) {
        (SmsEncoding::Gsm7, Some(septets)) => (DataCoding::McSpecific, septets),
        _ => (DataCoding::Ucs2, ucs2_octets(message.text)),
    };
    let mut builder = SubmitSm::builder()
        .service_type(ServiceType::default())
        .source_addr_ton(source_ton)
        .source_addr_npi(source_npi)
        .source_addr(field("source_addr", source)?)
        .dest_addr_ton(Ton::International)
        .dest_addr_npi(Npi::Isdn)
        .destination_addr(field("destination_addr", destination)?)
        .esm_class(EsmClass::default())
        .validity_period(field(
            "validity_period",
            &relative_validity(message.expires_at, now),
        )?)
        .registered_delivery(RegisteredDelivery::from(0x01))
        .data_coding(data_coding);
    if octets.len() <= SHORT_MESSAGE_MAX {
        let short = OctetString::from_slice(&octets).map_err(|_| {
            ProviderError::new(
                FailureReason::ProviderRejected,
                None,
                "the text does not fit short_message",
            )
        })?;
        builder = builder.short_message(short);
    } else {
        builder = builder.tlvs(vec![MessageSubmissionRequestTlvValue::MessagePayload(
            MessagePayload::new(AnyOctetString::from_slice(&octets)),
        )]);
    }
    Ok(builder.build())
}

/// A command_status's name and what it means for the delivery.
pub fn classify_status(status: u32) -> ProviderError {
    use FailureReason::*;
    let (reason, class, name) = match status {
        0x58 => (
            ProviderThrottled,
            None,
            "ESME_RTHROTTLED: throughput exceeded",
        ),
        0x14 => (ProviderThrottled, None, "ESME_RMSGQFUL: message queue full"),
        0x0B => (
            InvalidRecipient,
            None,
            "ESME_RINVDSTADR: invalid destination address",
        ),
        0x50 => (
            InvalidRecipient,
            None,
            "ESME_RINVDSTTON: invalid destination TON",
        ),
        0x51 => (
            InvalidRecipient,
            None,
            "ESME_RINVDSTNPI: invalid destination NPI",
        ),
        0x0A => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSRCADR: invalid source address",
        ),
        0x48 => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSRCTON: invalid source TON",
        ),
        0x49 => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSRCNPI: invalid source NPI",
        ),
        0x0D => (ProviderMisconfigured, None, "ESME_RBINDFAIL: bind failed"),
        0x0E => (
            ProviderMisconfigured,
            None,
            "ESME_RINVPASWD: invalid password",
        ),
        0x0F => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSYSID: invalid system_id",
        ),
        0x05 => (ProviderMisconfigured, None, "ESME_RALYBND: already bound"),
        0x53 => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSYSTYP: invalid system_type",
        ),
        0x04 => (
            ProviderUnavailable,
            None,
            "ESME_RINVBNDSTS: incorrect bind status",
        ),
        0x08 => (ProviderUnavailable, None, "ESME_RSYSERR: system error"),
        0x45 => (
            ProviderUnavailable,
            None,
            "ESME_RSUBMITFAIL: submit_sm failed",
        ),
        0x64 => (
            ProviderUnavailable,
            None,
            "ESME_RX_T_APPN: temporary error at the SMSC",
        ),
        0xFF => (ProviderUnavailable, None, "ESME_RUNKNOWNERR: unknown error"),
        0x61 => (
            ProviderRejected,
            None,
            "ESME_RINVSCHED: invalid scheduled delivery time",
        ),
        0x62 => (
            ProviderRejected,
            None,
            "ESME_RINVEXPIRY: invalid validity period",
        ),
        0x01 => (
            ProviderRejected,
            None,
            "ESME_RINVMSGLEN: invalid message length",
        ),
        0x66 => (
            ProviderRejected,
            None,
            "ESME_RX_R_APPN: rejected by the SMSC",
        ),
        0x65 => (
            ProviderRejected,
            Some(RetryClass::PermanentForTarget),
            "ESME_RX_P_APPN: permanent error at the SMSC",
        ),
        0x400..=0x4FF => (ProviderRejected, None, "vendor-specific error"),
        _ => (ProviderRejected, None, "refused by the SMSC"),
    };
    let code = format!("0x{status:08X}");
    let mut error = ProviderError::new(reason, Some(&code), name);
    if let Some(class) = class {
        error.class = class;
    }
    error
}

/// What a request that got no answer means: a timeout, or a lost session.
fn classify_error(e: RequestError) -> ProviderError {
    match e {
        RequestError::Timeout { .. } => {
            ProviderError::new(FailureReason::ProviderTimeout, None, e.to_string())
        }
        RequestError::Closed(_) => {
            ProviderError::new(FailureReason::ProviderUnavailable, None, e.to_string())
        }
    }
}

/// Keeps the bind up until `stop`: bind, watch the session, and re-bind with back-off (cut
/// short when a send finds the bind down).
async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let (mut backoff, max) = crate::config::reconnect_backoff(
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

/// The value after `key:` in a receipt text (`id:123 sub:001 … stat:DELIVRD err:000 text:…`),
/// matched without regard to case, up to the next space.
fn receipt_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let lower = text.to_ascii_lowercase();
    let needle = format!("{key}:");
    let mut from = 0;
    while let Some(found) = lower[from..].find(&needle) {
        let start = from + found;
        // A whole word: `id:` must not match inside another key.
        let boundary = start == 0 || !lower.as_bytes()[start - 1].is_ascii_alphanumeric();
        let value_start = start + needle.len();
        if boundary {
            let value = text[value_start..].split_whitespace().next()?;
            return Some(value);
        }
        from = value_start;
    }
    None
}

/// A delivery receipt from a deliver_sm, read leniently: the receipted_message_id and
/// message_state TLVs when present, otherwise the `id: … stat: … err: …` text. `None` for a
/// deliver_sm that is no receipt (an incoming message) or an intermediate state.
pub fn parse_receipt(provider: &str, deliver: &DeliverSm) -> Option<ProviderReceipt> {
    let mut tlv_id = None;
    let mut tlv_state = None;
    let mut network_error = None;
    let mut payload = None;
    for tlv in deliver.tlvs() {
        match tlv.value() {
            Some(TlvValue::ReceiptedMessageId(id)) => tlv_id = Some(id.as_str().to_owned()),
            Some(TlvValue::MessageState(state)) => tlv_state = Some(*state),
            Some(TlvValue::NetworkErrorCode(code)) => {
                network_error = Some(format!(
                    "network error {:?} {}",
                    code.network_type, code.error_code
                ))
            }
            Some(TlvValue::MessagePayload(p)) => payload = Some(p.value.as_ref().to_vec()),
            _ => {}
        }
    }
    let is_receipt = deliver.esm_class.message_type
        == MessageType::ShortMessageContainsMCDeliveryReceipt
        || tlv_id.is_some();
    if !is_receipt {
        return None;
    }
    let bytes: &[u8] = match &payload {
        Some(p) if deliver.short_message().is_empty() => p,
        _ => deliver.short_message().as_ref(),
    };
    let text = String::from_utf8_lossy(bytes);
    let message_id = tlv_id.or_else(|| receipt_field(&text, "id").map(str::to_owned))?;
    let stat = receipt_field(&text, "stat").map(str::to_ascii_uppercase);
    let err = receipt_field(&text, "err")
        .filter(|e| !e.trim_start_matches('0').is_empty())
        .map(str::to_owned);
    let state = match (tlv_state, stat.as_deref()) {
        (Some(state), _) => state,
        (None, Some(stat)) => match stat {
            "DELIVRD" => MessageState::Delivered,
            "EXPIRED" => MessageState::Expired,
            "DELETED" => MessageState::Deleted,
            "UNDELIV" => MessageState::Undeliverable,
            "ACCEPTD" => MessageState::Accepted,
            "REJECTD" => MessageState::Rejected,
            "ENROUTE" => MessageState::Enroute,
            _ => MessageState::Unknown,
        },
        (None, None) => return None,
    };
    let (outcome, reason) = match state {
        MessageState::Delivered => (AttemptOutcome::Delivered, None),
        MessageState::Expired => (
            AttemptOutcome::Failed,
            Some(FailureReason::RecipientUnreachable),
        ),
        MessageState::Deleted | MessageState::Undeliverable => {
            (AttemptOutcome::Failed, Some(FailureReason::Undeliverable))
        }
        MessageState::Rejected => (AttemptOutcome::Failed, Some(FailureReason::CarrierFiltered)),
        // Scheduled, en route, accepted, unknown: not the last word.
        _ => return None,
    };
    let stat_word = stat.unwrap_or_else(|| format!("{state:?}").to_ascii_uppercase());
    let mut detail = format!("deliver_sm receipt: stat {stat_word}");
    if let Some(err) = &err {
        detail.push_str(&format!(", err {err}"));
    }
    if let Some(network) = network_error {
        detail.push_str(&format!(", {network}"));
    }
    Some(ProviderReceipt {
        provider: provider.to_owned(),
        message_id,
        outcome,
        reason,
        code: err.or(Some(stat_word)),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusmpp::tlvs::MessageDeliveryRequestTlvValue;

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
