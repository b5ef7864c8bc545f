//! A message as a submit_sm: the sender's address type, the text as GSM-7 or UCS-2 (in
//! short_message or the message_payload TLV), and the validity period from the code's expiry.

use std::str::FromStr;

use jiff::Timestamp;
use rusmpp::pdus::SubmitSm;
use rusmpp::tlvs::MessageSubmissionRequestTlvValue;
use rusmpp::types::{AnyOctetString, OctetString};
use rusmpp::values::{
    DataCoding, EsmClass, MessagePayload, Npi, RegisteredDelivery, ServiceType, Ton,
};

use super::{SHORT_MESSAGE_MAX, SmppSettings};
use crate::domain::{FailureReason, SmsEncoding, gsm7_septets, measure_sms, ucs2_octets};
use crate::providers::{OutboundMessage, ProviderError};

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
pub(super) fn submit_sm(
    settings: &SmppSettings,
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
