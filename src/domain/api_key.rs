//! API keys: what a key may do (scopes), inside which tenant, and the key's text. A key reads
//! `otpk_<id>_<secret>`: the id (public, in listings and logs) finds the stored record, the
//! secret (256 random bits) is checked against the stored SHA-256 of it in constant time. The
//! secret itself is shown once, when the key is made, and never stored.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use subtle::ConstantTimeEq;

use super::string_enum;

/// What a key may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `SendCode`, `Explain`.
    Send,
    /// `GetDelivery`, `WatchDelivery`, `ListDeliveries`.
    Read,
    /// `AcknowledgeDelivery` (the app's backend, for its devices).
    Ack,
    /// `PolicyAdmin`: block lists, rules, API keys.
    Admin,
    /// `Providers` (the provider status).
    Status,
}

string_enum!(Scope {
    Send => "send",
    Read => "read",
    Ack => "ack",
    Admin => "admin",
    Status => "status",
});

/// Parses `send,read,ack` (order and repeats do not matter; at least one scope).
pub fn parse_scopes(text: &str) -> Result<Vec<Scope>, String> {
    let mut scopes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let scope: Scope = part.parse().map_err(|_| {
            format!("unknown scope `{part}` (scopes: send, read, ack, admin, status)")
        })?;
        scopes.push(scope);
    }
    normalize(&mut scopes);
    if scopes.is_empty() {
        return Err("at least one scope is needed (send, read, ack, admin, status)".into());
    }
    Ok(scopes)
}

/// The scopes in one order, each once.
pub fn normalize(scopes: &mut Vec<Scope>) {
    scopes.sort();
    scopes.dedup();
}

/// `send,read`: the stored and shown form of a set of scopes.
pub fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A stored key: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The public part of the key's text.
    pub id: String,
    /// The tenant it acts in; `None`: every tenant (admin and status keys only).
    pub tenant: Option<String>,
    /// What it may call, each scope once, in order.
    pub scopes: Vec<Scope>,
    /// What the key is for, as its maker said.
    pub label: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it was revoked: from then on it opens nothing.
    pub revoked_at: Option<Timestamp>,
}

impl ApiKey {
    /// Whether the key allows `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether `secret` is this key's (in constant time).
    pub fn opens_with(&self, secret: &str) -> bool {
        let presented = hash_secret(secret);
        bool::from(presented.as_bytes().ct_eq(self.secret_hash.as_bytes()))
    }
}

/// A key's text as a caller presents it: the id and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyText {
    /// The public part: finds the stored record.
    pub id: String,
    /// The secret part (base64url of 32 random bytes).
    pub secret: String,
}

/// The prefix of every key's text: a leaked key is recognisable (secret scanners match it).
pub const KEY_PREFIX: &str = "otpk_";

impl KeyText {
    /// A new random key: a 48-bit id and a 256-bit secret from the system's generator.
    pub fn generate() -> KeyText {
        use ring::rand::SecureRandom;
        let random = ring::rand::SystemRandom::new();
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        random
            .fill(&mut id)
            .and_then(|()| random.fill(&mut secret))
            .expect("the system's random generator works");
        KeyText {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            secret: URL_SAFE_NO_PAD.encode(secret),
        }
    }

    /// Reads `otpk_<id>_<secret>`; `None` for anything else (the caller says no more than
    /// "not a valid key").
    pub fn parse(text: &str) -> Option<KeyText> {
        let rest = text.trim().strip_prefix(KEY_PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let id_ok = id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let secret_ok = secret.len() == 43
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (id_ok && secret_ok).then(|| KeyText {
            id: id.to_ascii_lowercase(),
            secret: secret.to_owned(),
        })
    }

    /// The text to hand over, once.
    pub fn reveal(&self) -> String {
        format!("{KEY_PREFIX}{}_{}", self.id, self.secret)
    }

    /// What is stored of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_PREFIX}{}_•••", self.id)
    }
}

fn hash_secret(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &KeyText, scopes: &[Scope]) -> ApiKey {
        ApiKey {
            id: text.id.clone(),
            tenant: Some("acme".into()),
            scopes: scopes.to_vec(),
            label: String::new(),
            secret_hash: text.secret_hash(),
            created_at: Timestamp::UNIX_EPOCH,
            revoked_at: None,
        }
    }

    #[test]
    fn a_generated_key_reads_back_and_opens_only_its_record() {
        let text = KeyText::generate();
        let shown = text.reveal();
        assert!(shown.starts_with("otpk_"));
        let parsed = KeyText::parse(&shown).expect("a generated key parses");
        assert_eq!(parsed, text);
        let record = key(&text, &[Scope::Send]);
        assert!(record.opens_with(&parsed.secret));
        let other = KeyText::generate();
        assert_ne!(other.id, text.id);
        assert!(!record.opens_with(&other.secret));
        // The stored hash is not the secret.
        assert!(!record.secret_hash.contains(&text.secret));
        assert!(!format!("{text:?}").contains(&text.secret));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let good = KeyText::generate().reveal();
        for bad in [
            "",
            "otpk_",
            "Bearer x",
            &good[1..],
            &good[..good.len() - 1],
            &good.replace("otpk_", "otpx_"),
            &format!("{good}x"),
        ] {
            assert!(KeyText::parse(bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn scopes_parse_in_any_order_once_each_and_unknown_ones_are_named() {
        assert_eq!(
            parse_scopes("read, send,read").unwrap(),
            vec![Scope::Send, Scope::Read]
        );
        assert_eq!(
            scopes_text(&parse_scopes("status,admin").unwrap()),
            "admin,status"
        );
        let error = parse_scopes("send,write").unwrap_err();
        assert!(error.contains("`write`"), "{error}");
        assert!(parse_scopes(" , ").is_err());
    }
}
