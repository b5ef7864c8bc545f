//! Twilio status callbacks: the `X-Twilio-Signature` check (HMAC-SHA1, keyed with the auth
//! token, over the full URL followed by every POST parameter sorted by name, name then value,
//! base64; compared in constant time) and the reading of a callback into a receipt.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::domain::{AttemptOutcome, FailureReason};
use crate::providers::{ProviderReceipt, classify_twilio};

/// The HMAC over the URL and the sorted parameters.
fn mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The signature Twilio sends for a callback to `url` with `params`, under `auth_token`.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(mac(auth_token, url, params).finalize().into_bytes())
}

/// Whether `claimed` is the signature of this callback (constant-time comparison).
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], claimed: &str) -> bool {
    match base64::engine::general_purpose::STANDARD.decode(claimed.trim()) {
        Ok(claimed) => mac(auth_token, url, params).verify_slice(&claimed).is_ok(),
        Err(_) => false,
    }
}

/// A receipt from a callback's parameters, when the status is final (`delivered`,
/// `undelivered`, `failed`); `None` for intermediate ones (`queued`, `sent`, …).
pub fn receipt(provider: &str, params: &[(String, String)]) -> Option<ProviderReceipt> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let message_id = get("MessageSid")
        .or(get("SmsSid"))
        .or(get("CallSid"))?
        .to_owned();
    let status = get("MessageStatus")
        .or(get("SmsStatus"))
        .or(get("CallStatus"))?
        .to_ascii_lowercase();
    let code = get("ErrorCode")
        .filter(|c| !c.is_empty())
        .map(str::to_owned);
    let (outcome, reason) = match status.as_str() {
        "delivered" | "completed" => (AttemptOutcome::Delivered, None),
        "undelivered" | "failed" | "busy" | "no-answer" | "canceled" => {
            let reason = code
                .as_deref()
                .and_then(|c| c.parse::<i64>().ok())
                .map_or(FailureReason::Undeliverable, |c| classify_twilio(c).0);
            (AttemptOutcome::Failed, Some(reason))
        }
        _ => return None,
    };
    Some(ProviderReceipt {
        provider: provider.to_owned(),
        message_id,
        outcome,
        reason,
        code,
        detail: format!("status callback: {status}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_twilios_published_test_vector() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let form = params(&[
            ("Digits", "1234"),
            ("To", "+18005551212"),
            ("From", "+14158675309"),
            ("Caller", "+14158675309"),
            ("CallSid", "CA1234567890ABCDE"),
        ]);
        assert_eq!(
            signature("12345", url, &form),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(verify("12345", url, &form, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        assert!(!verify(
            "12345",
            &format!("{url}&extra=1"),
            &form,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!verify("54321", url, &form, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        assert!(!verify("12345", url, &form, "not base64 !"));
    }

    #[test]
    fn final_statuses_become_receipts() {
        let delivered = receipt(
            "twilio",
            &params(&[("MessageSid", "SM1"), ("MessageStatus", "delivered")]),
        )
        .unwrap();
        assert_eq!(
            (delivered.outcome, delivered.reason),
            (AttemptOutcome::Delivered, None)
        );
        let failed = receipt(
            "twilio",
            &params(&[
                ("MessageSid", "SM2"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "30005"),
            ]),
        )
        .unwrap();
        assert_eq!(failed.reason, Some(FailureReason::RecipientUnknown));
        assert_eq!(
            receipt(
                "twilio",
                &params(&[("MessageSid", "SM3"), ("MessageStatus", "sent")])
            ),
            None
        );
    }
}
