//! TLS for the gRPC listeners: a rustls server config built from PEM files, and re-built when
//! those files change.
//!
//! The handshake itself is tokio-rustls's, the crate under tonic's own TLS; sluice calls it in
//! [`crate::connections`] rather than through tonic's `ServerTlsConfig`, because that config
//! is fixed when the server is built, and certificates here must be replaced while the server
//! runs (cert-manager and Kubernetes secrets swap files every few weeks or hours). Each new
//! connection takes the acceptor current at its accept; open connections keep the session they
//! have, so a rotation drops nothing.
//!
//! Files are re-read and compared by content every poll, which sees every way a file can be
//! replaced (written in place, renamed over, or a symlink swapped to a new target, as
//! Kubernetes does with its `..data` link). New contents are taken once they have stayed the
//! same for one poll, so that a rotation that renames the key and then the certificate is never
//! caught half done. A set of files that still does not load (a key that does not match its
//! certificate) is refused: the old certificate stays, the failure is logged and counted once,
//! and the files are tried again when they change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// The files of one listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM: a client must present a certificate one of them signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Why a listener's TLS files could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM section of the kind needed, or a broken one.
    #[error("{}: {what}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        what: String,
    },
    /// rustls refused the certificate, key or CA (a key that does not match its certificate, an
    /// unsupported key type, a CA that is not a valid trust anchor).
    #[error("{}: {what}", .path.display())]
    Refused {
        /// The file the error is about.
        path: PathBuf,
        /// rustls's reason.
        what: String,
    },
}

/// One listener's TLS: the acceptor new connections take, and the files it was built from.
#[derive(Debug)]
pub struct TlsListener {
    /// `decisions` or `admin`, for logs and metrics.
    name: &'static str,
    files: TlsFiles,
    config: ArcSwap<rustls::ServerConfig>,
    seen: Mutex<Seen>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    handshake_failures: AtomicU64,
}

impl TlsListener {
    /// Loads `files` for the listener `name`; an error names the file at fault.
    pub fn load(name: &'static str, files: TlsFiles) -> Result<Self, TlsError> {
        let bytes = read_all(&files)?;
        let config = build(&files, &bytes)?;
        Ok(Self {
            name,
            files,
            config: ArcSwap::new(config),
            seen: Mutex::new(Seen {
                applied: bytes,
                settling: None,
                refused: None,
            }),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
        })
    }

    /// The listener's name (`decisions` or `admin`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The files it serves from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Re-reads the files; if they changed and have not changed since the last call, builds
    /// and installs a new config. `Ok(true)` when one was installed, `Ok(false)` when there is
    /// nothing (yet) to install; an error keeps the current config and is counted: a file that
    /// cannot be read, every call; contents that do not load, once.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let bytes = read_all(&self.files).inspect_err(|_| {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        let mut seen = self.seen.lock();
        if seen.applied == bytes || seen.refused.as_ref() == Some(&bytes) {
            seen.settling = None;
            return Ok(false);
        }
        if seen.settling.as_ref() != Some(&bytes) {
            seen.settling = Some(bytes);
            return Ok(false);
        }
        seen.settling = None;
        match build(&self.files, &bytes) {
            Ok(config) => {
                self.config.store(config);
                seen.applied = bytes;
                seen.refused = None;
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                seen.refused = Some(bytes);
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// New certificates installed since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reloads refused (the old certificate stayed).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// Connections whose TLS handshake failed or timed out (no client certificate on an mTLS
    /// listener, an untrusted one, plain text sent to a TLS port).
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn count_handshake_failure(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// The files' contents as last applied, waiting to settle, and last refused.
#[derive(Debug)]
struct Seen {
    applied: [Vec<u8>; 3],
    settling: Option<[Vec<u8>; 3]>,
    refused: Option<[Vec<u8>; 3]>,
}

/// Reloads every listener's files each `every`, off the async workers (file reads block),
/// logging what changed and what was refused; the same error twice in a row is logged once.
/// Runs until dropped.
pub async fn watch(listeners: Vec<Arc<TlsListener>>, every: Duration) {
    if listeners.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_error: Vec<Option<String>> = vec![None; listeners.len()];
    loop {
        tick.tick().await;
        for (l, last_error) in listeners.iter().zip(&mut last_error) {
            let listener = l.clone();
            let error = match tokio::task::spawn_blocking(move || listener.reload()).await {
                Ok(Ok(true)) => {
                    tracing::info!(listener = l.name, cert = %l.files.cert.display(), "TLS certificate reloaded");
                    None
                }
                Ok(Ok(false)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if error.is_some() && error != *last_error {
                let e = error.as_deref().unwrap_or_default();
                tracing::error!(
                    listener = l.name,
                    error = e,
                    "TLS reload refused; the previous certificate stays"
                );
            }
            *last_error = error;
        }
    }
}

fn read_all(files: &TlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok([
        read(&files.cert)?,
        read(&files.key)?,
        files
            .client_ca
            .as_deref()
            .map(read)
            .transpose()?
            .unwrap_or_default(),
    ])
}

fn pem_error(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE section (PEM expected)"));
    }
    Ok(certs)
}

/// The rustls config: TLS 1.2 and 1.3 with ring's defaults, ALPN `h2` (gRPC is HTTP/2 only),
/// and client verification against the CA when one is given.
fn build(
    files: &TlsFiles,
    [cert, key, ca]: &[Vec<u8>; 3],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = certificates(&files.cert, cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        pem_error(
            &files.key,
            format!("no usable private key (PKCS#8, RSA or EC PEM expected): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused {
            path: files.cert.clone(),
            what: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(path, ca)? {
                roots.add(c).map_err(|e| TlsError::Refused {
                    path: path.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Refused {
                    path: path.clone(),
                    what: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Refused {
            path: files.key.clone(),
            what: format!(
                "does not go with the certificate in {}: {e}",
                files.cert.display()
            ),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
