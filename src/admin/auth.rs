//! The admin credential check. Every admin call needs one: the token in `x-admin-token`
//! (compared in constant time so response timing does not reveal how much of a guess was
//! right), or, on an mTLS admin listener, the client certificate its handshake verified. There
//! is no unauthenticated mode: in a pod every container shares the loopback, so "loopback
//! only" would let the service sluice protects unblock itself.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::connections::ConnInfo;

/// Metadata header carrying the admin token.
pub const TOKEN_HEADER: &str = "x-admin-token";

/// Checks each admin call's credential.
#[derive(Clone, Debug)]
pub struct TokenCheck {
    token: Option<Arc<[u8]>>,
    /// Whether a client certificate verified at the handshake is a credential (the admin
    /// listener has a client CA).
    certificates: bool,
}

impl TokenCheck {
    /// A check against `token` and, if `certificates`, verified client certificates.
    pub fn new(token: Option<&str>, certificates: bool) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.as_bytes())),
            certificates,
        }
    }

    /// Whether any call can pass at all: a check with neither credential would refuse every
    /// call, which is a configuration error, not a policy.
    pub fn has_credential(&self) -> bool {
        self.token.is_some() || self.certificates
    }

    /// The interceptor body: `UNAUTHENTICATED` unless the call carries the right token or came
    /// over a connection with a verified client certificate.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.certificates
            && req
                .extensions()
                .get::<ConnInfo>()
                .is_some_and(|c| c.client_verified)
        {
            return Ok(req);
        }
        let Some(expected) = &self.token else {
            return Err(Status::unauthenticated(
                "a client certificate signed by the admin client CA is required",
            ));
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
        let check = TokenCheck::new(Some("s3cret"), false);
        assert!(check.check(with_token(Some("s3cret"))).is_ok());
        for bad in [None, Some("s3cre"), Some("s3cret!"), Some("S3cret")] {
            let err = check.check(with_token(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
    }

    fn over(verified: bool, token: Option<&str>) -> Request<()> {
        let mut r = with_token(token);
        r.extensions_mut().insert(ConnInfo {
            remote: ([127, 0, 0, 1], 1).into(),
            activity: Arc::default(),
            client_verified: verified,
        });
        r
    }

    #[test]
    fn a_verified_certificate_is_a_credential_only_where_certificates_are() {
        let mtls = TokenCheck::new(None, true);
        assert!(mtls.check(over(true, None)).is_ok());
        for unverified in [over(false, None), with_token(Some("anything"))] {
            let err = mtls.check(unverified).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        // A token listener does not take a certificate in place of the token.
        let token = TokenCheck::new(Some("s3cret"), false);
        assert!(token.check(over(true, None)).is_err());
        // With both, either will do.
        let both = TokenCheck::new(Some("s3cret"), true);
        assert!(both.check(over(true, None)).is_ok());
        assert!(both.check(over(false, Some("s3cret"))).is_ok());
        assert!(both.check(over(false, Some("guess"))).is_err());
    }

    #[test]
    fn no_credential_at_all_is_no_open_door() {
        let none = TokenCheck::new(None, false);
        assert!(!none.has_credential());
        assert!(none.check(with_token(None)).is_err());
        assert!(none.check(over(true, None)).is_err());
    }
}
