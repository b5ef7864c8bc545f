//! Acknowledgement tokens: each push carries a token for its delivery and device, and
//! `AcknowledgeDelivery` takes an acknowledgement only with it, so only the device that got
//! the push (or its app's backend, which it tells) can say SHOWN or DENIED. The token is a MAC
//! under a key derived from the ledger's secret: every replica checks it without storing it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

/// Makes and checks acknowledgement tokens.
#[derive(Clone)]
pub struct AckTokens(ring::hmac::Key);

impl std::fmt::Debug for AckTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckTokens(redacted)")
    }
}

impl AckTokens {
    /// Tokens under `secret` (32 bytes or more).
    pub fn new(secret: &[u8]) -> Self {
        AckTokens(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The token of `device_id` for the delivery `delivery_id` (128 bits, base64url).
    pub fn token(&self, delivery_id: &str, device_id: &str) -> String {
        let mut signed = Vec::with_capacity(delivery_id.len() + device_id.len() + 1);
        signed.extend_from_slice(delivery_id.as_bytes());
        signed.push(0);
        signed.extend_from_slice(device_id.as_bytes());
        let tag = ring::hmac::sign(&self.0, &signed);
        URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
    }

    /// Whether `token` is the one of `device_id` for `delivery_id` (in constant time).
    pub fn verify(&self, delivery_id: &str, device_id: &str, token: &str) -> bool {
        let expected = self.token(delivery_id, device_id);
        bool::from(expected.as_bytes().ct_eq(token.trim().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_delivery_and_device_only() {
        let tokens = AckTokens::new(&[7; 32]);
        let token = tokens.token("acme/j-1", "ipad-1");
        assert_eq!(token.len(), 22);
        assert!(tokens.verify("acme/j-1", "ipad-1", &token));
        assert!(!tokens.verify("acme/j-1", "phone-2", &token));
        assert!(!tokens.verify("acme/j-2", "ipad-1", &token));
        assert!(!tokens.verify("acme/j-1", "ipad-1", ""));
        // Joined unambiguously: "a/b" + "c" is not "a/" + "bc".
        assert_ne!(tokens.token("a/b", "c"), tokens.token("a/", "bc"));
        assert!(!AckTokens::new(&[8; 32]).verify("acme/j-1", "ipad-1", &token));
    }
}
