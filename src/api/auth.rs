//! API keys: who may call the ingest and query routes.
//!
//! Keys come from `INGEST_API_KEYS`; a request presents one as
//! `Authorization: Bearer <key>` or `X-Api-Key: <key>`. Every configured key
//! is compared, each in time independent of where the bytes differ, so the
//! answer's timing tells nothing about a key's content. Keys never reach a
//! log: `Debug` shows only how many there are.
//!
//! Each key also names a [`Scope`]: the idempotency keys a client sends are
//! its own, apart from those sent with other API keys. The scope is derived
//! from the key by a one-way hash, so that what the database stores cannot
//! give the key back.

use std::fmt;

use sha2::{Digest, Sha256};

/// The configured API keys, each with its scope; empty means the API is
/// open.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<(Vec<u8>, Scope)>);

/// Whose idempotency keys a request's are: empty when the API is open,
/// otherwise the first 16 bytes of the SHA-256 of the API key presented,
/// in hex. Never the key itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope(String);

impl Scope {
    /// The scope of requests made with `key`.
    pub fn of_key(key: &[u8]) -> Scope {
        let digest = Sha256::digest(key);
        Scope(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The scope as text: 32 hex digits, or empty when the API is open.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the open API's scope, shared by every client.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} configured)", self.0.len())
    }
}

impl ApiKeys {
    /// Parses a comma-separated list; surrounding spaces are ignored.
    pub fn parse(list: &str) -> Result<ApiKeys, String> {
        let keys: Vec<Vec<u8>> = list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| k.as_bytes().to_vec())
            .collect();
        if keys
            .iter()
            .any(|k| k.len() < 16 || !k.iter().all(u8::is_ascii_graphic))
        {
            return Err(
                "each key must be at least 16 visible ASCII characters (no spaces or commas)"
                    .into(),
            );
        }
        // Hashed once here, not on every request.
        Ok(ApiKeys(
            keys.into_iter()
                .map(|k| {
                    let scope = Scope::of_key(&k);
                    (k, scope)
                })
                .collect(),
        ))
    }

    /// True when no key is configured and every request is allowed.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// True when the API is open or `presented` is one of the keys.
    pub fn allows(&self, presented: Option<&str>) -> bool {
        self.scope(presented).is_some()
    }

    /// The scope of a request presenting `presented`: the open scope when
    /// no key is configured, the key's own when it is one of the keys, and
    /// `None` when it is refused.
    pub fn scope(&self, presented: Option<&str>) -> Option<Scope> {
        if self.is_open() {
            return Some(Scope::default());
        }
        let presented = presented?;
        // No early exit: every key is compared.
        self.0.iter().fold(None, |found, (key, scope)| {
            let matches = constant_time_eq(key, presented.as_bytes());
            found.or_else(|| matches.then(|| scope.clone()))
        })
    }
}

/// The key a request presents, from `Authorization: Bearer` or `X-Api-Key`.
pub fn presented_key<'a>(
    authorization: Option<&'a str>,
    x_api_key: Option<&'a str>,
) -> Option<&'a str> {
    let bearer = authorization.and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    bearer.or(x_api_key.map(str::trim))
}

/// Compares a configured `secret` with a `presented` value in time that
/// depends only on the secret's length: neither where they differ nor how
/// long the presented value is shows in the timing.
pub fn constant_time_eq(secret: &[u8], presented: &[u8]) -> bool {
    let differ = secret.iter().enumerate().fold(0u8, |acc, (i, s)| {
        acc | (s ^ presented.get(i).copied().unwrap_or(!s))
    });
    differ == 0 && secret.len() == presented.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "k-0123456789abcdef";

    #[test]
    fn keys() {
        let keys = ApiKeys::parse(&format!(" {KEY} , other-key-0123456789 ")).unwrap();
        assert!(!keys.is_open());
        assert!(keys.allows(Some(KEY)));
        assert!(keys.allows(Some("other-key-0123456789")));
        assert!(!keys.allows(Some("k-0123456789abcdeX")));
        assert!(!keys.allows(Some("")));
        assert!(!keys.allows(None));
        assert!(ApiKeys::parse("").unwrap().allows(None));
        assert!(ApiKeys::parse("short").is_err());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 configured)");
    }

    #[test]
    fn scopes() {
        let keys = ApiKeys::parse(&format!("{KEY},other-key-0123456789")).unwrap();
        let one = keys.scope(Some(KEY)).unwrap();
        let other = keys.scope(Some("other-key-0123456789")).unwrap();
        assert_ne!(one, other);
        assert_eq!(one, Scope::of_key(KEY.as_bytes()));
        assert_eq!(keys.scope(Some(KEY)), Some(one.clone()), "stable");
        assert_eq!(keys.scope(Some("k-0123456789abcdeX")), None);
        assert_eq!(keys.scope(None), None);
        // 32 hex digits that do not hold the key.
        assert_eq!(one.as_str().len(), 32);
        assert!(one.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!one.as_str().contains("0123456789abcdef"));
        assert!(!one.is_open());
        // SHA-256("abc") begins ba7816bf8f01cfea414140de5dae2223.
        assert_eq!(
            Scope::of_key(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223"
        );
        let open = ApiKeys::default();
        assert_eq!(open.scope(None), Some(Scope::default()));
        assert_eq!(open.scope(Some(KEY)), Some(Scope::default()));
        assert!(Scope::default().is_open());
    }

    #[test]
    fn presented() {
        assert_eq!(presented_key(Some("Bearer abc"), None), Some("abc"));
        assert_eq!(presented_key(Some("bearer  abc "), None), Some("abc"));
        assert_eq!(presented_key(Some("Basic abc"), Some("xyz")), Some("xyz"));
        assert_eq!(presented_key(None, Some("xyz")), Some("xyz"));
        assert_eq!(presented_key(Some("Bearer"), None), None);
        assert_eq!(presented_key(None, None), None);
    }

    #[test]
    fn comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
