//! API keys: who may call the ingest and query routes.
//!
//! Keys come from `INGEST_API_KEYS`; a request presents one as
//! `Authorization: Bearer <key>` or `X-Api-Key: <key>`. Every configured key
//! is compared, each in time independent of where the bytes differ, so the
//! answer's timing tells nothing about a key's content. Keys never reach a
//! log: `Debug` shows only how many there are.

use std::fmt;

/// The configured API keys; empty means the API is open.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<Vec<u8>>);

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
        Ok(ApiKeys(keys))
    }

    /// True when no key is configured and every request is allowed.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// True when the API is open or `presented` is one of the keys.
    pub fn allows(&self, presented: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(presented) = presented else {
            return false;
        };
        // No early exit: every key is compared.
        self.0.iter().fold(false, |found, key| {
            found | constant_time_eq(key, presented.as_bytes())
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
