//! Twilio status callbacks as the receipts listener reads them: any form body parses into a
//! receipt or none without panicking, and a signature check never panics or accepts a
//! signature made under another token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp_gateway::receipts::twilio::{receipt, signature, verify};

fuzz_target!(|data: &[u8]| {
    let params: Vec<(String, String)> = form_urlencoded::parse(data).into_owned().collect();
    let _ = receipt("twilio", &params);
    let url = "https://gateway.example/receipts/twilio/twilio";
    let claimed = String::from_utf8_lossy(data);
    let _ = verify("token", url, &params, &claimed);
    let signed = signature("token", url, &params);
    assert!(verify("token", url, &params, &signed));
    assert!(!verify("other-token", url, &params, &signed));
});
