//! A server as a child process (the real binary): its log lines arrive on a channel, read by a
//! thread of their own so the child never blocks on a full pipe, and the addresses it reports
//! at start-up are read from them.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Adds `serve --config CONFIG` with every listener on a free loopback port (the log says which)
/// and blocks kept in `STATE` to `cmd` (a `sluice` binary's command), logging at info level.
pub fn serve_on_free_ports(
    cmd: &mut Command,
    config: impl AsRef<OsStr>,
    state: impl AsRef<OsStr>,
) -> &mut Command {
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--state-file")
        .arg(state)
        .env("RUST_LOG", "info")
}

/// Spawns `cmd` with its stderr (where sluice logs) on the returned channel, line by line. The
/// pipe is read until the child closes it, even once the channel's receiver is gone: a child
/// whose log pipe closed would fail, or die, at its next log line.
pub fn spawn_logged(cmd: &mut Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Reads start-up lines until every marker was seen, returning each one's `addr=` value, and
/// every line read.
pub fn addrs_from_log<const N: usize>(
    rx: &mpsc::Receiver<String>,
    markers: [&str; N],
) -> ([String; N], Vec<String>) {
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    let mut log = Vec::new();
    while found.iter().any(Option::is_none) {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!("start-up lines missing: {markers:?} / {found:?}; log so far: {log:#?}")
            });
        for (m, f) in markers.iter().zip(found.iter_mut()) {
            if line.contains(m) {
                let at = line.find("addr=").unwrap() + 5;
                *f = Some(line[at..].split_whitespace().next().unwrap().to_string());
            }
        }
        log.push(line);
    }
    (found.map(Option::unwrap), log)
}

/// `cmd` (a `sluice` binary's command) serving `config` (blocks in `state`) with every listener on a free loopback
/// port, the admin token [`super::ADMIN_TOKEN`] and the counter-key secret `secret`, and more
/// `args`: the child, its log lines, and its decision, admin and HTTP addresses.
pub fn spawn_server(
    cmd: &mut Command,
    config: impl AsRef<OsStr>,
    state: impl AsRef<OsStr>,
    secret: &str,
    args: &[&str],
) -> (Child, mpsc::Receiver<String>, [String; 3]) {
    serve_on_free_ports(cmd, config, state)
        .args(args)
        .env("SLUICE_KEY_SECRET", secret)
        .env("SLUICE_ADMIN_TOKEN", super::ADMIN_TOKEN)
        .stdin(Stdio::null());
    let (child, rx) = spawn_logged(cmd);
    let (addrs, _) = addrs_from_log(
        &rx,
        [
            "serving RateLimitService",
            "serving Admin",
            "serving /metrics",
        ],
    );
    (child, rx, addrs)
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves no server
/// behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
