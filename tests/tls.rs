//! TLS and mTLS on both gRPC listeners, certificate rotation while serving, and the admin
//! credential (token, client certificate, or a generated token file), against the real server
//! with `openssl`-made certificates and tonic's and grpcurl's TLS clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{addrs_from_log, serve_on_free_ports, spawn_logged};
use common::tls::{Pair, Pki};
use common::{ADMIN_TOKEN, descriptor, http_get, request, tool};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::config;
use sluice::limiter::Limiter;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::sluice::admin::v1 as pb;
use sluice::proto::sluice::admin::v1::admin_client::AdminClient;
use sluice::server::{self, Listeners, Options};
use sluice::store::MemoryStore;
use sluice::tls::{TlsFiles, TlsListener};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const CONFIG: &str =
    "domains:\n  - name: d\n    endpoints:\n      - path: /x\n        limits: [100/minute]\n";

/// A server with TLS on its listeners, polling its files every 50 ms.
struct Server {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    http_addr: SocketAddr,
    grpc_tls: Option<Arc<TlsListener>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(grpc: Option<TlsFiles>, admin: Option<TlsFiles>, token: Option<&str>) -> Server {
    let cfg = config::parse(CONFIG, "t.yaml", |_| None).unwrap();
    let limiter = Arc::new(Limiter::new(
        cfg.rules,
        MemoryStore::new(Default::default()),
        Arc::new(sluice::clock::SystemClock),
    ));
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let (g, a, h) = (bind().await, bind().await, bind().await);
    let addrs = (
        g.local_addr().unwrap(),
        a.local_addr().unwrap(),
        h.local_addr().unwrap(),
    );
    let grpc_tls = grpc.map(|f| Arc::new(TlsListener::load("decisions", f).unwrap()));
    let admin_tls = admin.map(|f| Arc::new(TlsListener::load("admin", f).unwrap()));
    let options = Options {
        admin_token: token.map(String::from),
        grpc_tls: grpc_tls.clone(),
        admin_tls,
        tls_poll: Duration::from_millis(50),
        ..Options::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc: g,
        admin: Some(a),
        http: Some(h),
    };
    tokio::spawn(async move {
        server::run(listeners, limiter, options, async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    Server {
        addr: addrs.0,
        admin_addr: addrs.1,
        http_addr: addrs.2,
        grpc_tls,
        stop: Some(stop),
    }
}

fn files(server: &Pair, client_ca: Option<&Pair>) -> TlsFiles {
    TlsFiles {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: client_ca.map(|c| c.cert.clone()),
    }
}

/// A TLS channel trusting `ca`, presenting `identity` if given; the connection is made at the
/// first call.
fn channel(addr: SocketAddr, ca: &Pair, identity: Option<&Pair>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(id.cert_pem(), id.key_pem()));
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

async fn decide(channel: Channel) -> Result<i32, tonic::Status> {
    let req = request("d", vec![descriptor(&[("path", "/x")])]);
    RateLimitServiceClient::new(channel)
        .should_rate_limit(req)
        .await
        .map(|r| r.into_inner().overall_code)
}

async fn list_blocks(channel: Channel, token: Option<&str>) -> Result<usize, tonic::Status> {
    let mut req = tonic::Request::new(pb::ListBlocksRequest::default());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("x-admin-token", t.parse().unwrap());
    }
    AdminClient::new(channel)
        .list_blocks(req)
        .await
        .map(|r| r.into_inner().blocks.len())
}

/// The certificate the server presents to a new connection (DER).
async fn served_cert(addr: SocketAddr, ca: &Pair) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&ca.cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pair: &Pair) -> Vec<u8> {
    CertificateDer::from_pem_file(&pair.cert).unwrap().to_vec()
}

async fn metric(addr: SocketAddr, name_and_labels: &str) -> u64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name_and_labels} not in /metrics:\n{body}"))
}

/// Polls `cond` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn decisions_over_tls_and_no_plain_text() {
    let Some(pki) = Pki::new() else { return };
    let ca = pki.ca("ca");
    let server_pair = pki.server(&ca, "server");
    let srv = start(Some(files(&server_pair, None)), None, Some(ADMIN_TOKEN)).await;
    assert_eq!(decide(channel(srv.addr, &ca, None)).await.unwrap(), 1);
    // The admin listener stays plain text: each listener has its own TLS.
    let admin = Channel::from_shared(format!("http://{}", srv.admin_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(list_blocks(admin, Some(ADMIN_TOKEN)).await.unwrap(), 0);
    // Plain text to the TLS port is no HTTP/2 at all.
    let plain = Channel::from_shared(format!("http://{}", srv.addr))
        .unwrap()
        .connect_lazy();
    assert!(decide(plain).await.is_err());
    // A client that does not trust the server's CA refuses it.
    let other = pki.ca("other");
    assert!(decide(channel(srv.addr, &other, None)).await.is_err());
    eventually("handshake failures counted", async || {
        metric(
            srv.http_addr,
            "sluice_tls_handshake_failures_total{listener=\"decisions\"}",
        )
        .await
            >= 2
    })
    .await;
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_the_ca_signed() {
    let Some(pki) = Pki::new() else { return };
    let ca = pki.ca("ca");
    let clients = pki.ca("clients");
    let server_pair = pki.server(&ca, "server");
    let envoy = pki.client(&clients, "envoy");
    let rogue_ca = pki.ca("rogue");
    let rogue = pki.client(&rogue_ca, "intruder");
    let srv = start(
        Some(files(&server_pair, Some(&clients))),
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        decide(channel(srv.addr, &ca, Some(&envoy))).await.unwrap(),
        1
    );
    for (who, identity) in [("no certificate", None), ("another CA's", Some(&rogue))] {
        let refused = decide(channel(srv.addr, &ca, identity)).await;
        assert!(refused.is_err(), "{who}: {refused:?}");
    }
    let failures = srv.grpc_tls.as_ref().unwrap().handshake_failures();
    assert!(failures >= 2, "{failures} handshake failures");
    // Refused at the handshake: no call reached the service.
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    let decisions: u64 = body
        .lines()
        .filter(|l| l.starts_with("sluice_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(decisions, 1, "{body}");
}

// Multi-threaded: grpcurl runs as a blocking child process while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_admin_listener_takes_the_client_certificate_as_the_credential() {
    let Some(pki) = Pki::new() else { return };
    let ca = pki.ca("ca");
    let operators = pki.ca("operators");
    let server_pair = pki.server(&ca, "server");
    let operator = pki.client(&operators, "operator");
    // No token at all: the certificate is the only credential.
    let srv = start(None, Some(files(&server_pair, Some(&operators))), None).await;
    let with_cert = channel(srv.admin_addr, &ca, Some(&operator));
    assert_eq!(list_blocks(with_cert, None).await.unwrap(), 0);
    let without = channel(srv.admin_addr, &ca, None);
    assert!(list_blocks(without, Some(ADMIN_TOKEN)).await.is_err());

    // grpcurl, as the README shows it.
    let Some(grpcurl) = tool("grpcurl") else {
        return;
    };
    let out = Command::new(grpcurl)
        .arg("-cacert")
        .arg(&ca.cert)
        .arg("-cert")
        .arg(&operator.cert)
        .arg("-key")
        .arg(&operator.key)
        .arg(srv.admin_addr.to_string())
        .arg("sluice.admin.v1.Admin/ListBlocks")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `pair` over `dir/cert.pem` and `dir/key.pem` by rename, as most tools rotate files.
fn rename_into(dir: &Path, pair: &Pair) {
    for (from, to) in [(&pair.key, "key.pem"), (&pair.cert, "cert.pem")] {
        let tmp = dir.join(format!(".{to}.tmp"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(to)).unwrap();
    }
}

/// Swaps `dir/..data` to a new directory holding `pair`, as Kubernetes updates a mounted
/// secret: `cert.pem -> ..data/cert.pem` never changes, the `..data` link does, atomically.
fn kubernetes_swap(dir: &Path, pair: &Pair, version: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(&pair.cert, data.join("cert.pem")).unwrap();
    std::fs::copy(&pair.key, data.join("key.pem")).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["cert.pem", "key.pem"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
    }
}

#[tokio::test]
async fn certificates_rotate_by_rename_and_symlink_swap_without_dropping_connections() {
    let Some(pki) = Pki::new() else { return };
    let ca = pki.ca("ca");
    let (one, two, three) = (
        pki.server(&ca, "one"),
        pki.server(&ca, "two"),
        pki.server(&ca, "three"),
    );
    let live = tempfile::tempdir().unwrap();
    kubernetes_swap(live.path(), &one, "v1");
    let srv = start(
        Some(TlsFiles {
            cert: live.path().join("cert.pem"),
            key: live.path().join("key.pem"),
            client_ca: None,
        }),
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    let tls = srv.grpc_tls.clone().unwrap();
    assert_eq!(served_cert(srv.addr, &ca).await, der(&one));
    let open = channel(srv.addr, &ca, None);
    assert_eq!(decide(open.clone()).await.unwrap(), 1);

    // Kubernetes' symlink swap.
    kubernetes_swap(live.path(), &two, "v2");
    eventually("the swapped certificate served", async || {
        served_cert(srv.addr, &ca).await == der(&two)
    })
    .await;
    assert!(tls.reloads() >= 1);

    // A rename over the files (key first, then certificate: the poll may see the pair half
    // rotated, which is refused and then taken once whole).
    let plain = tempfile::tempdir().unwrap();
    std::fs::copy(&two.cert, plain.path().join("cert.pem")).unwrap();
    std::fs::copy(&two.key, plain.path().join("key.pem")).unwrap();
    let srv2 = start(
        Some(TlsFiles {
            cert: plain.path().join("cert.pem"),
            key: plain.path().join("key.pem"),
            client_ca: None,
        }),
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    rename_into(plain.path(), &three);
    eventually("the renamed certificate served", async || {
        served_cert(srv2.addr, &ca).await == der(&three)
    })
    .await;

    // The connection opened before the rotations still serves calls, and is the same
    // connection: nothing new was accepted for it.
    let accepted = "sluice_connections_accepted_total{listener=\"decisions\"}";
    let before = metric(srv.http_addr, accepted).await;
    assert_eq!(decide(open.clone()).await.unwrap(), 1);
    assert_eq!(metric(srv.http_addr, accepted).await, before);

    // A broken certificate is refused and counted; the last good one stays.
    let failures = tls.reload_failures();
    let broken = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(broken.path(), "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    kubernetes_swap(
        live.path(),
        &Pair {
            cert: broken.path().to_path_buf(),
            key: two.key.clone(),
        },
        "v3",
    );
    eventually("the broken certificate refused", async || {
        tls.reload_failures() > failures
    })
    .await;
    assert_eq!(served_cert(srv.addr, &ca).await, der(&two));
    let refused = metric(
        srv.http_addr,
        "sluice_tls_reload_failures_total{listener=\"decisions\"}",
    )
    .await;
    assert!(refused > failures, "{refused}");
    assert_eq!(decide(open).await.unwrap(), 1);
}

#[test]
fn bad_tls_files_are_refused_naming_the_file() {
    let Some(pki) = Pki::new() else { return };
    let ca = pki.ca("ca");
    let (one, two) = (pki.server(&ca, "one"), pki.server(&ca, "two"));
    let load = |cert: &Path, key: &Path, ca: Option<&Path>| {
        TlsListener::load(
            "decisions",
            TlsFiles {
                cert: cert.into(),
                key: key.into(),
                client_ca: ca.map(Into::into),
            },
        )
        .unwrap_err()
        .to_string()
    };
    let missing = pki.dir().join("missing.pem");
    let err = load(&missing, &one.key, None);
    assert!(err.contains("missing.pem"), "{err}");
    // A key that is not the certificate's.
    let err = load(&one.cert, &two.key, None);
    assert!(err.contains("two.key") && err.contains("one.crt"), "{err}");
    // A key where the certificate should be, and the reverse.
    let err = load(&one.key, &one.key, None);
    assert!(
        err.contains("one.key") && err.contains("CERTIFICATE"),
        "{err}"
    );
    let err = load(&one.cert, &one.cert, None);
    assert!(
        err.contains("one.crt") && err.contains("private key"),
        "{err}"
    );
    let err = load(&one.cert, &one.key, Some(&one.key));
    assert!(err.contains("one.key"), "{err}");

    // The binary says which flag's file, and exits non-zero.
    let dir = tempfile::tempdir().unwrap();
    let out = serve_on_free_ports(
        &mut Command::new(env!("CARGO_BIN_EXE_sluice")),
        common::repo_path("config/sluice.yaml"),
        dir.path().join("state.json"),
    )
    .arg("--grpc-tls-cert")
    .arg(&missing)
    .arg("--grpc-tls-key")
    .arg(&one.key)
    .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("TLS of the decisions listener") && stderr.contains("missing.pem"),
        "{stderr}"
    );
}

/// With no token and no admin client CA, `serve` makes a token, writes it beside the state file
/// for its owner only, logs where, and takes nothing else.
#[tokio::test]
async fn serve_without_an_admin_credential_generates_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    serve_on_free_ports(
        &mut cmd,
        common::repo_path("config/sluice.yaml"),
        dir.path().join("state.json"),
    )
    .env_remove("SLUICE_ADMIN_TOKEN")
    .env_remove("SLUICE_ADMIN_TOKEN_FILE");
    let (mut child, rx) = spawn_logged(&mut cmd);
    let ([admin], log) = addrs_from_log(&rx, ["serving Admin"]);
    let _ = child.kill();
    let file = dir.path().join("sluice-admin-token");
    assert!(
        log.iter()
            .any(|l| l.contains("generated an admin token") && l.contains(&*file.to_string_lossy())),
        "{log:#?}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let token = std::fs::read_to_string(&file).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64, "{token}");
    assert!(
        !log.iter().any(|l| l.contains(token)),
        "the token is logged"
    );
    // A second start makes a new one.
    let mut again = Command::new(env!("CARGO_BIN_EXE_sluice"));
    serve_on_free_ports(
        &mut again,
        common::repo_path("config/sluice.yaml"),
        dir.path().join("state.json"),
    )
    .env_remove("SLUICE_ADMIN_TOKEN")
    .env_remove("SLUICE_ADMIN_TOKEN_FILE");
    let (mut second, rx2) = spawn_logged(&mut again);
    let ([admin2], _) = addrs_from_log(&rx2, ["serving Admin"]);
    let token2 = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_ne!(token, token2);
    let channel = Channel::from_shared(format!("http://{admin2}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        list_blocks(channel.clone(), Some(&token2)).await.unwrap(),
        0
    );
    for wrong in [None, Some(token)] {
        let err = list_blocks(channel.clone(), wrong).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    let _ = second.kill();
    let _ = second.wait();
    let _ = child.wait();
    let _ = admin;
}

/// A rotation caught between its two renames is neither taken nor counted: new contents are
/// taken once they hold still for a poll. A set that still does not load is refused, counted
/// once, and tried again only when it changes.
#[test]
fn a_half_done_rotation_is_never_taken_and_a_bad_set_is_counted_once() {
    let Some(pki) = Pki::new() else { return };
    let ca = pki.ca("ca");
    let (one, two) = (pki.server(&ca, "one"), pki.server(&ca, "two"));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&one.cert, &cert).unwrap();
    std::fs::copy(&one.key, &key).unwrap();
    let tls = TlsListener::load(
        "decisions",
        TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        },
    )
    .unwrap();
    assert!(!tls.reload().unwrap(), "nothing changed");
    std::fs::copy(&two.key, &key).unwrap();
    assert!(!tls.reload().unwrap(), "half rotated: waits");
    std::fs::copy(&two.cert, &cert).unwrap();
    assert!(!tls.reload().unwrap(), "whole, but just changed: waits");
    assert!(tls.reload().unwrap(), "held still for a poll: taken");
    assert_eq!((tls.reloads(), tls.reload_failures()), (1, 0));

    std::fs::copy(&one.cert, &cert).unwrap();
    assert!(!tls.reload().unwrap());
    assert!(tls.reload().is_err(), "one.crt with two.key");
    for _ in 0..3 {
        assert!(!tls.reload().unwrap(), "the same refused set again");
    }
    assert_eq!((tls.reloads(), tls.reload_failures()), (1, 1));
    std::fs::copy(&one.key, &key).unwrap();
    assert!(!tls.reload().unwrap());
    assert!(tls.reload().unwrap(), "mended");
    assert_eq!((tls.reloads(), tls.reload_failures()), (2, 1));
}
