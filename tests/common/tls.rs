//! Test certificates made with the real `openssl` at test time (never committed keys): CAs,
//! server certificates for `127.0.0.1`/`localhost`, and client certificates.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::tool;

/// A directory of test CAs and the certificates they signed.
pub struct Pki {
    dir: PathBuf,
    _owned: Option<tempfile::TempDir>,
    openssl: PathBuf,
}

/// A certificate and its key, PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pair {
    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(&self.cert).unwrap()
    }
    pub fn key_pem(&self) -> Vec<u8> {
        std::fs::read(&self.key).unwrap()
    }
}

impl Pki {
    /// A new, empty PKI; `None` (a loud skip) without `openssl`, a panic under `CI=true`.
    pub fn new() -> Option<Pki> {
        let owned = tempfile::tempdir().unwrap();
        Some(Pki {
            dir: owned.path().to_path_buf(),
            _owned: Some(owned),
            openssl: tool("openssl")?,
        })
    }

    /// A PKI writing into `dir`, which the caller keeps.
    pub fn within(dir: &Path) -> Option<Pki> {
        Some(Pki {
            dir: dir.to_path_buf(),
            _owned: None,
            openssl: tool("openssl")?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(&self.openssl)
            .current_dir(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed CA `name` (`name.crt`, `name.key`).
    pub fn ca(&self, name: &str) -> Pair {
        let (cert, key) = (format!("{name}.crt"), format!("{name}.key"));
        self.run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN=sluice test {name}"),
        ]);
        self.pair(&cert, &key)
    }

    /// A server certificate for `127.0.0.1`, `localhost` and `sluice` (the name
    /// `envoy/envoy-tls.yaml` expects), signed by `ca`.
    pub fn server(&self, ca: &Pair, name: &str) -> Pair {
        self.leaf(
            ca,
            name,
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:sluice\nextendedKeyUsage=serverAuth\n",
        )
    }

    /// A client certificate `CN=name`, signed by `ca`.
    pub fn client(&self, ca: &Pair, name: &str) -> Pair {
        self.leaf(
            ca,
            name,
            &format!("subjectAltName=DNS:{name}\nextendedKeyUsage=clientAuth\n"),
        )
    }

    fn leaf(&self, ca: &Pair, name: &str, extensions: &str) -> Pair {
        let (cert, key, csr, ext) = (
            format!("{name}.crt"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
        );
        std::fs::write(self.dir.join(&ext), extensions).unwrap();
        self.run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca.cert.to_str().unwrap(),
            "-CAkey",
            ca.key.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        self.pair(&cert, &key)
    }

    fn pair(&self, cert: &str, key: &str) -> Pair {
        Pair {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }
}
