//! API keys: bearer tokens compared in constant time, never logged.

use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Ask for recommendations.
    Read,
    /// Post events or change the catalog.
    Write,
}

/// The configured keys. An empty list leaves that access open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    read: Vec<Vec<u8>>,
    write: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("read", &self.read.len())
            .field("write", &self.write.len())
            .finish()
    }
}

impl ApiKeys {
    /// Keys for reading and for writing; write keys may read too.
    pub fn new(read: &[String], write: &[String]) -> Self {
        let bytes = |keys: &[String]| keys.iter().map(|k| k.trim().as_bytes().to_vec()).collect();
        Self {
            read: bytes(read),
            write: bytes(write),
        }
    }

    /// Checks an `Authorization` header value for `access`.
    pub fn check(&self, access: Access, authorization: Option<&str>) -> Result<(), ApiError> {
        let required = match access {
            Access::Read if self.read.is_empty() => return Ok(()),
            Access::Write if self.write.is_empty() => return Ok(()),
            Access::Read => [&self.read, &self.write],
            Access::Write => [&self.write, &self.write],
        };
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = authorization
            .and_then(|h| h.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(ApiError::Unauthenticated)?;
        // Every key is compared, so the time taken does not tell which key nearly matched.
        let matched = required
            .iter()
            .flat_map(|keys| keys.iter())
            .fold(subtle::Choice::from(0), |acc, key| {
                acc | key.as_slice().ct_eq(token.as_bytes())
            });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_keys() {
        let keys = ApiKeys::new(&[], &[]);
        assert!(keys.check(Access::Read, None).is_ok());
        assert!(keys.check(Access::Write, None).is_ok());
    }

    #[test]
    fn write_keys_guard_writes_and_may_read() {
        let keys = ApiKeys::new(&["r".into()], &["w".into()]);
        assert!(keys.check(Access::Write, Some("Bearer w")).is_ok());
        assert!(keys.check(Access::Write, Some("BEARER w")).is_ok());
        assert!(keys.check(Access::Write, Some("bearer  w ")).is_ok());
        assert!(keys.check(Access::Write, Some("Basic w")).is_err());
        assert!(keys.check(Access::Write, Some("Bearerw")).is_err());
        assert!(keys.check(Access::Write, Some("Bearer r")).is_err());
        assert!(keys.check(Access::Write, None).is_err());
        assert!(keys.check(Access::Write, Some("w")).is_err());
        assert!(keys.check(Access::Read, Some("Bearer r")).is_ok());
        assert!(keys.check(Access::Read, Some("Bearer w")).is_ok());
        assert!(keys.check(Access::Read, Some("Bearer x")).is_err());
    }

    #[test]
    fn read_stays_open_when_only_write_keys_are_set() {
        let keys = ApiKeys::new(&[], &["w".into()]);
        assert!(keys.check(Access::Read, None).is_ok());
        assert!(keys.check(Access::Write, Some("Bearer nope")).is_err());
        assert!(!format!("{keys:?}").contains('w'.to_string().repeat(2).as_str()));
    }
}
