//! Driving the real Envoy from tests: child processes whose output is kept in a log file (and
//! printed when a test fails), Envoy started on a config with its admin address read back, and a
//! minimal blocking HTTP/1.1 client to send requests through it. Shared by the tests that run
//! Envoy (`envoy_e2e`, `rlqs_envoy`), which declare `mod common;` beside it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::common::tool;

/// How long any one process may take to start.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long any one HTTP exchange may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, killed (and reaped) when dropped.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `sig` (`TERM`, `INT`) with kill(1), as an operator would.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Waits for the process to exit on its own, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `reader`'s lines to `log` and to the returned channel, until end of file.
pub fn tee_lines(reader: impl Read + Send + 'static, log: &Path) -> Receiver<String> {
    let mut file = File::create(log).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for the first line containing `needle` and returns it.
pub fn wait_for_line(proc: &mut Proc, lines: &Receiver<String>, needle: &str) -> String {
    let [line] = wait_for_lines(proc, lines, [needle]);
    line
}

/// Waits for a line containing each of `needles`, in any order, and returns the first of each
/// in the order of `needles`.
pub fn wait_for_lines<const N: usize>(
    proc: &mut Proc,
    lines: &Receiver<String>,
    needles: [&str; N],
) -> [String; N] {
    let deadline = Instant::now() + START_DEADLINE;
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                for (needle, slot) in needles.iter().zip(found.iter_mut()) {
                    if slot.is_none() && line.contains(needle) {
                        *slot = Some(line.clone());
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    proc.is_running(),
                    "{} exited during start-up:\n{}",
                    proc.name,
                    tail(&proc.log)
                );
                assert!(
                    Instant::now() < deadline,
                    "{} printed no {needles:?} within {START_DEADLINE:?}:\n{}",
                    proc.name,
                    tail(&proc.log)
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{} closed its output:\n{}", proc.name, tail(&proc.log))
            }
        }
    }
    found.map(Option::unwrap)
}

/// The last 40 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Calls `f` every 50 ms until it returns `Some`, while `proc` runs, for [`START_DEADLINE`].
pub fn poll<T>(proc: &mut Proc, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            proc.is_running(),
            "{} exited while waiting for {what}:\n{}",
            proc.name,
            tail(&proc.log)
        );
        assert!(
            Instant::now() < deadline,
            "{} gave no {what} within {START_DEADLINE:?}:\n{}",
            proc.name,
            tail(&proc.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The socket address following `marker` in a log line.
pub fn parse_after(line: &str, marker: &str) -> SocketAddr {
    let at = line
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in {line:?}"))
        + marker.len();
    line[at..]
        .split(|c: char| c.is_whitespace() || c == '/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("address after {marker} in {line:?}: {e}"))
}

/// Replaces each `from` with its `to`. Each must occur exactly once, so that a change to a
/// sample config which these replacements would silently stop covering fails loudly.
pub fn replace_each_once(yaml: &str, pairs: &[(&str, String)]) -> String {
    let mut yaml = yaml.to_string();
    for (from, to) in pairs {
        let n = yaml.matches(from).count();
        assert_eq!(n, 1, "{from:?} occurs {n} times in the config");
        yaml = yaml.replace(from, to);
    }
    yaml
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one request per connection (`Connection: close`), read until the
// response is complete.

/// A request.
#[derive(Clone)]
pub struct Req {
    pub method: &'static str,
    pub path: String,
    /// Values as bytes: a test may send what is not UTF-8.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Send the body chunked instead of with Content-Length.
    pub chunked: bool,
    /// Local address to connect from (another client), instead of 127.0.0.1.
    pub from: Option<IpAddr>,
}

impl Req {
    pub fn new(method: &'static str, path: &str) -> Req {
        Req {
            method,
            path: path.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            chunked: false,
            from: None,
        }
    }

    pub fn get(path: &str) -> Req {
        Req::new("GET", path)
    }

    pub fn post(path: &str) -> Req {
        Req::new("POST", path)
    }

    pub fn header(self, name: &str, value: &str) -> Req {
        self.header_bytes(name, value.as_bytes())
    }

    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Req {
        self.headers.push((name.to_string(), value.to_vec()));
        self
    }

    pub fn user_agent(self, ua: &str) -> Req {
        self.header("user-agent", ua)
    }

    pub fn body(mut self, body: Vec<u8>) -> Req {
        self.body = body;
        self
    }

    pub fn chunked(mut self) -> Req {
        self.chunked = true;
        self
    }

    pub fn from(mut self, ip: &str) -> Req {
        self.from = Some(ip.parse().unwrap());
        self
    }

    /// The whole request, written with one `write_all`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nhost: sluice-e2e\r\nconnection: close\r\n",
            self.method, self.path
        )
        .into_bytes();
        for (k, v) in &self.headers {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        if self.chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            for chunk in self.body.chunks(16 * 1024) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            if self.method != "GET" || !self.body.is_empty() {
                out.extend_from_slice(
                    format!("content-length: {}\r\n", self.body.len()).as_bytes(),
                );
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A response.
pub struct Resp {
    pub status: u16,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = self.text();
        let body: String = body.chars().take(300).collect();
        f.debug_struct("Resp")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Resp {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Header `name` as a number.
    pub fn num(&self, name: &str) -> u64 {
        let v = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"));
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

pub fn connect(to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = from else {
        return TcpStream::connect_timeout(&to, IO_TIMEOUT);
    };
    // std cannot bind before connecting; tokio's TcpSocket can.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(ip, 0))?;
        let stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(to))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
        stream.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Opens a connection, ready to send `req` on.
pub fn open(to: SocketAddr, req: &Req) -> std::io::Result<TcpStream> {
    let stream = connect(to, req.from)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `req` on `stream` and reads the response.
pub fn exchange(mut stream: TcpStream, req: &Req) -> std::io::Result<Resp> {
    // A server may answer (413) and stop reading before the body is all written: carry on
    // and read the answer.
    let _ = stream.write_all(&req.to_bytes());
    // Read until the response is complete rather than until EOF: after a 413 Envoy keeps the
    // connection open for a second (delayed close) to read what the client still sends.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    while !response_complete(&raw) {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    Ok(parse_response(&raw))
}

/// Whether `raw` holds a whole response: headers, then the body its headers announce.
pub fn response_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if head.contains("\r\ntransfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    match head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
    {
        Some(n) => body.len() >= n.trim().parse::<usize>().unwrap_or(usize::MAX),
        // Neither: the body ends with the connection.
        None => false,
    }
}

pub fn try_send(to: SocketAddr, req: &Req) -> std::io::Result<Resp> {
    exchange(open(to, req)?, req)
}

pub fn send(to: SocketAddr, req: &Req) -> Resp {
    try_send(to, req).unwrap_or_else(|e| panic!("{} {} to {to}: {e}", req.method, req.path))
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&data[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy

/// Starts an Envoy on `yaml` (written to `dir/name.yaml`) with extra `args`; returns it and its
/// admin address once it is ready. Its log is `dir/name.log`.
pub fn start_envoy(
    dir: &Path,
    name: &'static str,
    yaml: &str,
    args: &[&str],
) -> (Proc, SocketAddr) {
    let envoy_bin = tool("envoy").expect("envoy");
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    let admin_file = dir.join(format!("{name}-admin-address"));
    let log = dir.join(format!("{name}.log"));
    let log_file = File::create(&log).unwrap();
    let child = Command::new(envoy_bin)
        .arg("-c")
        .arg(&config)
        .arg("--admin-address-path")
        .arg(&admin_file)
        // No hot restart, so no shared memory to clash over between parallel tests.
        .arg("--disable-hot-restart")
        .args(["--log-level", "warning"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let mut proc = Proc { name, child, log };
    let admin: SocketAddr = poll(&mut proc, "its admin address", || {
        let text = std::fs::read_to_string(&admin_file).ok()?;
        text.trim().parse().ok()
    });
    poll(&mut proc, "admin /ready = LIVE", || {
        let r = try_send(admin, &Req::get("/ready")).ok()?;
        (r.status == 200).then_some(())
    });
    (proc, admin)
}

/// The port of Envoy's first listener, from its admin `/listeners`.
pub fn first_listener(admin: SocketAddr) -> SocketAddr {
    let listeners = send(admin, &Req::get("/listeners?format=json")).json();
    let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        .as_u64()
        .expect("listener port in /listeners");
    SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()))
}
