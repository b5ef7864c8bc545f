//! Delivery receipts: a deliver_sm's receipt text (`id:… stat:DELIVRD err:000 …`) or TLVs
//! as a [`ProviderReceipt`].

use rusmpp::pdus::DeliverSm;
use rusmpp::tlvs::TlvValue;
use rusmpp::values::{MessageState, MessageType};

use crate::domain::{AttemptOutcome, FailureReason};
use crate::providers::ProviderReceipt;

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
