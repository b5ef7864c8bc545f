//! Provider tokens for the push services: JWTs are built by `jsonwebtoken`, signed with `ring`
//! (already linked for TLS) through jsonwebtoken's `CryptoProvider` hook, so no second crypto
//! library is compiled in. Only what the push adapters need: ES256 (the APNs `.p8` key) and
//! RS256 (Google service-account keys), from PEM-encoded PKCS#8 (or PKCS#1 for RSA).

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use serde::Serialize;

/// ES256 with a P-256 key pair.
struct Es256(EcdsaKeyPair);

impl signature::Signer<Vec<u8>> for Es256 {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        self.0
            .sign(&SystemRandom::new(), message)
            .map(|signature| signature.as_ref().to_vec())
            .map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Es256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

/// RS256 (RSASSA-PKCS1-v1_5 with SHA-256).
struct Rs256(RsaKeyPair);

impl signature::Signer<Vec<u8>> for Rs256 {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut signature,
            )
            .map_err(|_| signature::Error::new())?;
        Ok(signature)
    }
}

impl JwtSigner for Rs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

fn es256_pair(der: &[u8]) -> Option<EcdsaKeyPair> {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new()).ok()
}

fn rs256_pair(der: &[u8]) -> Option<RsaKeyPair> {
    RsaKeyPair::from_pkcs8(der)
        .or_else(|_| RsaKeyPair::from_der(der))
        .ok()
}

fn signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    match algorithm {
        Algorithm::ES256 => match es256_pair(key.as_bytes()) {
            Some(pair) => Ok(Box::new(Es256(pair))),
            None => Err(ErrorKind::InvalidEcdsaKey.into()),
        },
        Algorithm::RS256 => match rs256_pair(key.as_bytes()) {
            Some(pair) => Ok(Box::new(Rs256(pair))),
            None => Err(ErrorKind::InvalidRsaKey("not an RSA private key".into()).into()),
        },
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

/// The gateway only signs; verifying is the push services' business.
static RING_SIGNER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: |_, _| Err(ErrorKind::InvalidAlgorithm.into()),
    key_utils: KeyUtils::new_unimplemented(),
};

/// A private key checked to work for its algorithm.
#[derive(Clone)]
pub struct SigningKey {
    algorithm: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?}, •••)", self.algorithm)
    }
}

impl SigningKey {
    /// An ES256 key from an APNs `.p8` file (PEM, PKCS#8, P-256).
    pub fn es256_from_pem(pem_text: &str) -> Result<Self, String> {
        let der = private_key_der(pem_text)?;
        es256_pair(&der)
            .ok_or("not a P-256 (ES256) private key in PKCS#8 form (an APNs .p8 key)")?;
        Ok(SigningKey {
            algorithm: Algorithm::ES256,
            key: EncodingKey::from_ec_der(&der),
        })
    }

    /// An RS256 key from PEM (PKCS#8 `PRIVATE KEY`, as in a service-account JSON, or PKCS#1).
    pub fn rs256_from_pem(pem_text: &str) -> Result<Self, String> {
        let der = private_key_der(pem_text)?;
        rs256_pair(&der).ok_or("not an RSA private key of at least 2048 bits")?;
        Ok(SigningKey {
            algorithm: Algorithm::RS256,
            key: EncodingKey::from_rsa_der(&der),
        })
    }

    /// A signed JWT with `claims`, and `kid` in the header when given.
    pub fn sign(&self, kid: Option<&str>, claims: &impl Serialize) -> Result<String, String> {
        // Installing fails harmlessly once a provider (this one) is in place.
        let _ = RING_SIGNER.install_default();
        let mut header = Header::new(self.algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| e.to_string())
    }
}

/// The DER body of a PEM private key.
fn private_key_der(pem_text: &str) -> Result<Vec<u8>, String> {
    let block = pem::parse(pem_text.trim()).map_err(|e| format!("not a PEM private key: {e}"))?;
    match block.tag() {
        "PRIVATE KEY" | "RSA PRIVATE KEY" => Ok(block.into_contents()),
        "ENCRYPTED PRIVATE KEY" => {
            Err("the private key is encrypted: export it without a passphrase".into())
        }
        other => Err(format!("a PEM `{other}` block, not a private key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, KeyPair, UnparsedPublicKey};

    fn p256_pem() -> (String, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = es256_pair(pkcs8.as_ref()).unwrap();
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
        (pem, pair.public_key().as_ref().to_vec())
    }

    #[test]
    fn es256_tokens_verify_with_the_public_key() {
        let (pem, public) = p256_pem();
        let key = SigningKey::es256_from_pem(&pem).unwrap();
        let jwt = key
            .sign(
                Some("KEY1234567"),
                &serde_json::json!({"iss": "TEAM123456", "iat": 1}),
            )
            .unwrap();
        let (message, signature) = jwt.rsplit_once('.').unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(message.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "KEY1234567");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public)
            .verify(
                message.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).unwrap(),
            )
            .expect("a valid ES256 signature");
    }

    #[test]
    fn keys_that_do_not_fit_are_refused_with_the_reason() {
        assert!(
            SigningKey::es256_from_pem("hello")
                .unwrap_err()
                .contains("not a PEM private key")
        );
        let (pem, _) = p256_pem();
        assert!(
            SigningKey::rs256_from_pem(&pem)
                .unwrap_err()
                .contains("not an RSA private key")
        );
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(
            SigningKey::es256_from_pem(&cert)
                .unwrap_err()
                .contains("CERTIFICATE")
        );
    }
}
