//! The parsers of what callers name: delivery ids (`tenant/job_id`), tenants, phone numbers,
//! device tokens and API keys. None panics; what parses reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp_gateway::domain::{
    DeliveryId, KeyText, check_tenant, is_apns_token, is_e164, mask_phone, mask_token,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<DeliveryId>() {
        assert_eq!(id.to_string().parse::<DeliveryId>().ok(), Some(id));
    }
    let _ = check_tenant("tenant", text);
    let _ = is_e164(text);
    let _ = is_apns_token(text);
    // A mask shows at most 9 characters of a number and 8 of a token, whatever the input
    // (an input that already looks masked may come back as it was: fuzz crash 8e0b3071…).
    assert!(mask_phone(text).chars().count() <= 12);
    assert!(mask_token(text).chars().count() <= 11);
    if let Some(key) = KeyText::parse(text) {
        assert_eq!(KeyText::parse(&key.reveal()), Some(key));
    }
});
