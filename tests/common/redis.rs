//! Real `redis-server` processes for tests: one server, or a three-master Redis Cluster, on free
//! loopback ports in a temporary directory, without persistence; killed on drop. Readiness is
//! polled with a deadline, never waited for with a fixed sleep.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice::clock::Timestamp;
use sluice::store::{
    Charge, CounterKey, RedisNodes, RedisOptions, RedisStore, Store, StoreError, Tally, TimeSource,
    Verdict,
};

use super::tool;

/// How long a server (or a cluster) may take to come up on a loaded machine.
const READY: Duration = Duration::from_secs(20);

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server` child process.
pub struct RedisServer {
    pub port: u16,
    bus_port: Option<u16>,
    /// TLS only (certificates in `dir`) and a password.
    tls_password: Option<String>,
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port; `None` (after a loud skip message) when redis-server is
    /// not installed, a panic when `CI=true`.
    pub fn start() -> Option<RedisServer> {
        Self::spawn(None)
    }

    fn spawn(bus_port: Option<u16>) -> Option<RedisServer> {
        let binary = tool("redis-server")?;
        let mut server = RedisServer {
            port: free_port(),
            bus_port,
            tls_password: None,
            binary,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        // A port found free can be taken by a parallel test before redis-server binds it:
        // start again on fresh ports a few times before calling it a failure.
        for _ in 0..4 {
            if server.try_launch() {
                return Some(server);
            }
            server.port = free_port();
            if server.bus_port.is_some() {
                server.bus_port = Some(free_port());
            }
        }
        server.launch();
        Some(server)
    }

    /// Like [`Self::launch`], but `false` if redis-server exits while starting.
    fn try_launch(&mut self) -> bool {
        self.spawn_child();
        self.wait_ready_or_exit()
    }

    fn launch(&mut self) {
        self.spawn_child();
        self.wait_ready();
    }

    fn spawn_child(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.current_dir(self.dir.path())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--logfile", "redis.log"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(bus) = self.bus_port {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "5000"])
                .args(["--cluster-port", &bus.to_string()]);
        }
        if let Some(password) = &self.tls_password {
            cmd.args(["--tls-port", &self.port.to_string(), "--port", "0"])
                .args([
                    "--tls-cert-file",
                    "server.crt",
                    "--tls-key-file",
                    "server.key",
                ])
                .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
                .args(["--requirepass", password]);
        }
        self.child = Some(cmd.spawn().expect("redis-server starts"));
    }

    /// Waits for the server; `false` if it exited first (a port taken meanwhile).
    fn wait_ready_or_exit(&mut self) -> bool {
        let deadline = Instant::now() + READY;
        loop {
            let up = if self.tls_password.is_some() {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                ping(self.port)
            };
            if up {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY;
        loop {
            let up = if self.tls_password.is_some() {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                ping(self.port)
            };
            if up {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not ready within {READY:?}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// A server that speaks only TLS (a certificate for 127.0.0.1 signed by a test CA, see
    /// [`super::tls::Pki`]) and requires `password`. Returns the server and the CA file.
    pub fn start_tls(password: &str) -> Option<(RedisServer, PathBuf)> {
        let binary = tool("redis-server")?;
        let dir = tempfile::tempdir().unwrap();
        let pki = super::tls::Pki::within(dir.path())?;
        let ca = pki.ca("ca");
        pki.server(&ca, "server");
        let ca = ca.cert;
        let mut server = RedisServer {
            port: free_port(),
            bus_port: None,
            tls_password: Some(password.to_string()),
            binary,
            dir,
            child: None,
        };
        server.launch();
        Some((server, ca))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to go.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Runs `redis-cli -p <port> <args>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let cli = tool("redis-cli").expect("redis-cli is installed with redis-server");
        let out = Command::new(cli)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a Redis answers PING on `port`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A Redis Cluster of three masters and no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok`. `None` when redis-server is missing.
    pub fn start() -> Option<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::spawn(Some(free_port()))?);
        }
        let cli = tool("redis-cli")?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + READY;
        while !cluster
            .nodes
            .iter()
            .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "cluster not ok within {READY:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(cluster)
    }

    /// The seed URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A [`RedisStore`] together with the servers it talks to, which live as long as it does.
pub struct RedisFixture {
    pub store: RedisStore,
    pub server: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
}

impl RedisFixture {
    /// A store on a fresh single server, with the caller's clock (tests step it).
    pub fn single() -> Option<RedisFixture> {
        let server = RedisServer::start()?;
        let store = RedisStore::connect(&options(RedisNodes::Single(server.url()))).unwrap();
        Some(RedisFixture {
            store,
            server: Some(server),
            cluster: None,
        })
    }

    /// A store on a fresh three-master cluster, with the caller's clock.
    pub fn cluster() -> Option<RedisFixture> {
        let cluster = RedisCluster::start()?;
        let store = RedisStore::connect(&options(RedisNodes::Cluster(cluster.urls()))).unwrap();
        Some(RedisFixture {
            store,
            server: None,
            cluster: Some(cluster),
        })
    }
}

/// Test options: the caller's clock, and a deadline generous enough for a loaded CI machine.
pub fn options(nodes: RedisNodes) -> RedisOptions {
    RedisOptions {
        time: TimeSource::Caller,
        timeout: Duration::from_secs(2),
        ..RedisOptions::new(nodes)
    }
}

impl Store for RedisFixture {
    async fn apply(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.store.apply(charges, verdicts, now).await
    }
    async fn tally(
        &self,
        t: &[Tally<'_>],
        c: &mut [u64],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.store.tally(t, c, now).await
    }
    async fn forget(&self, keys: &[CounterKey]) -> Result<(), StoreError> {
        self.store.forget(keys).await
    }
    fn tracked_keys(&self) -> usize {
        self.store.tracked_keys()
    }
    fn sweep_expired_at(&self, now: Timestamp) -> usize {
        self.store.sweep_expired_at(now)
    }
    fn deadline(&self) -> Option<Duration> {
        self.store.deadline()
    }
}
