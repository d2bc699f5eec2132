//! The admin token check: every admin call carries `x-admin-token`, compared in constant time so
//! response timing does not reveal how much of a guess was right.

use std::sync::Arc;

use tonic::{Request, Status};

/// Metadata header carrying the admin token.
pub const TOKEN_HEADER: &str = "x-admin-token";

/// Checks the admin token; `None` accepts every call (only allowed on a loopback listener).
#[derive(Clone, Debug)]
pub struct TokenCheck {
    token: Option<Arc<[u8]>>,
}

impl TokenCheck {
    /// A check against `token`.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    /// Whether a token is required.
    pub fn required(&self) -> bool {
        self.token.is_some()
    }

    /// The interceptor body: `UNAUTHENTICATED` when the token is missing or wrong.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(req);
        };
        match req.metadata().get(TOKEN_HEADER) {
            None => Err(Status::unauthenticated(format!(
                "missing {TOKEN_HEADER} metadata"
            ))),
            Some(given) if constant_time_eq(given.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated(format!("wrong {TOKEN_HEADER}"))),
        }
    }
}

/// Compares without an early exit on the first differing byte. (The length is not secret.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(t: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = t {
            r.metadata_mut().insert(TOKEN_HEADER, t.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_must_match_exactly() {
        let check = TokenCheck::new(Some("s3cret"));
        assert!(check.check(with_token(Some("s3cret"))).is_ok());
        for bad in [None, Some("s3cre"), Some("s3cret!"), Some("S3cret")] {
            let err = check.check(with_token(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn no_token_configured_accepts_all() {
        assert!(TokenCheck::new(None).check(with_token(None)).is_ok());
    }
}
