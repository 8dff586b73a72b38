//! API keys as SHA-256 digests: the config may hold a key or only its digest, a presented key is
//! hashed once and compared with every configured digest in constant time, and logs and the ledger
//! see a key id (a hash of the digest), never the key.
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 of an API key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyDigest({})", self.id())
    }
}

impl KeyDigest {
    /// The digest of a key as a client sends it.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// A configured key: `sha256:<64 hex digits>` (the digest only), or the key itself.
    pub fn parse(configured: &str) -> Result<Self, String> {
        if let Some(hex_digest) = configured.strip_prefix("sha256:") {
            let bytes = hex::decode(hex_digest.trim())
                .map_err(|e| format!("`sha256:` key is not hex: {e}"))?;
            let digest: [u8; 32] = bytes
                .try_into()
                .map_err(|_| "`sha256:` key must be 64 hex digits".to_string())?;
            return Ok(Self(digest));
        }
        if configured.is_empty() || configured.chars().any(char::is_whitespace) {
            return Err("an API key must be non-empty and contain no whitespace".into());
        }
        Ok(Self::of(configured))
    }

    /// Constant-time equality (no early exit on the first differing byte).
    pub fn matches(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// A short, stable, non-reversible name for the key (12 hex digits of a hash of its digest),
    /// for logs and the usage ledger.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..6])
    }
}

/// The key of an `Authorization: Bearer KEY` header value (scheme case-insensitive), if any.
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, key) = authorization.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_digest_forms_name_the_same_key() {
        let plain = KeyDigest::parse("sk-team-a-1").unwrap();
        let hexed = format!("sha256:{}", hex::encode(Sha256::digest(b"sk-team-a-1")));
        assert!(KeyDigest::parse(&hexed).unwrap().matches(&plain));
        assert!(KeyDigest::of("sk-team-a-1").matches(&plain));
        assert!(!KeyDigest::of("sk-team-a-2").matches(&plain));
        assert_eq!(plain.id().len(), 12);
        assert!(!format!("{plain:?}").contains("sk-"));
        for bad in ["", "sk a", "sha256:zz", "sha256:abcd"] {
            assert!(KeyDigest::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_key() {
        assert_eq!(bearer("Bearer sk-1"), Some("sk-1"));
        assert_eq!(bearer("bearer   sk-1 "), Some("sk-1"));
        assert_eq!(bearer("Basic sk-1"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("sk-1"), None);
    }
}
