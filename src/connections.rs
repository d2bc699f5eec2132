//! The connections a gRPC listener hands tonic, and the limits on them that tonic's `Server`
//! has no setting for: how many may be open, how long a new one may take to start HTTP/2, and
//! how long one may sit without calls. Everything else about a connection (streams, windows,
//! frames, keepalive, message sizes) is hyper's and tonic's, configured in [`crate::server`]
//! from the same [`Limits`].
//!
//! The listener is read here, not by tonic, so that a connection over the cap is closed as soon
//! as it is accepted (and counted), and each accepted one is wrapped in a [`Connection`] that
//! watches its own two deadlines:
//! - **handshake**: the client's preface and first SETTINGS frame, the first 33 bytes plus that
//!   frame's length, must have arrived within [`Limits::handshake_timeout`]. Counting those
//!   bytes is all the HTTP/2 this module knows; hyper checks what they say.
//! - **idle**: a connection with no call open and none started for [`Limits::idle_timeout`] is
//!   closed. Calls are seen by [`ActivityLayer`], around every service of the listener, through
//!   the [`ConnInfo`] tonic puts in each request. Bytes are no measure of activity here: the
//!   server's own keepalive PINGs are answered by idle clients too.
//!
//! Closing is an error from the connection's read, which makes hyper drop the connection
//! without a GOAWAY: only connections that never started HTTP/2, or had no call for the whole
//! idle timeout, are closed this way. A call racing the close fails on the client, and Envoy
//! lets that one request through (its failure mode); the sample Envoy closes idle connections
//! to sluice itself, before sluice would.
//!
//! On a TLS listener ([`crate::tls`]), the TLS handshake comes first, within the same
//! handshake timeout, in a task of the connection's own so that a slow client holds up no
//! other; the two deadlines above then watch the decrypted bytes. A connection whose TLS
//! handshake fails never reaches tonic.
//!
//! Two more things happen here because they concern the connection, not the protocol: the
//! decision listener's connections are [`spread`] over threads that each run a runtime of their
//! own, and a [`Connection`]'s writes are coalesced (its first write after a write yields once
//! to the runtime, so the answers ready by then leave in one `writev`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::tls::TlsListener;

/// Every connection limit of one gRPC listener. The defaults, and why each is what it is, are
/// in the README ("Connections and their limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time from accept to the client's preface and first SETTINGS frame.
    pub handshake_timeout: Duration,
    /// Time without an open call after which a connection is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 streams (calls) open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Bytes of one request message; a larger declared length is refused (`OUT_OF_RANGE`) as
    /// soon as the gRPC prefix has arrived.
    pub max_request_bytes: usize,
    /// Bytes of one request's header list (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_bytes: u32,
    /// Interval of the server's HTTP/2 keepalive PINGs on a connection that reads nothing.
    pub keepalive_interval: Duration,
    /// Time a keepalive PING may wait for its answer before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Limits {
    /// The decision listener's: Envoys (one or a few connections per worker thread each) and
    /// probes.
    pub fn decisions() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 256,
            max_request_bytes: 64 * 1024,
            max_header_list_bytes: 16 * 1024,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }

    /// The admin listener's: operators and their scripts, a handful at a time.
    pub fn admin() -> Self {
        Self {
            max_connections: 64,
            ..Self::decisions()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::decisions()
    }
}

/// What happened to one listener's connections since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_closed: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
    /// Connections accepted and served.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed at once because [`Limits::max_connections`] were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Connections closed because HTTP/2 had not started within the handshake timeout.
    pub fn handshake_timeouts(&self) -> u64 {
        self.handshake_timeouts.load(Ordering::Relaxed)
    }
    /// Connections closed for having no call for the idle timeout.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }
}

/// Connection counts of both gRPC listeners, and their TLS, for `/metrics`.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// The decision listener's.
    pub decisions: Arc<ConnectionStats>,
    /// The admin listener's.
    pub admin: Arc<ConnectionStats>,
    /// The decision listener's TLS, if it has TLS.
    pub grpc_tls: Option<Arc<TlsListener>>,
    /// The admin listener's TLS, if it has TLS.
    pub admin_tls: Option<Arc<TlsListener>>,
}

/// The connections `listener` accepts, for tonic's `serve_with_incoming`: at most
/// `limits.max_connections` at once, each with `TCP_NODELAY` and its deadlines, and over TLS
/// when `tls` is given. Never ends and never yields an error: accept errors (out of file
/// descriptors, say) are logged and retried after a pause, since tonic would otherwise retry at
/// once, in a busy loop.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<ConnectionStats>,
    tls: Option<Arc<TlsListener>>,
) -> impl futures_util::Stream<Item = io::Result<Connection>> + Send + 'static {
    let limits = Arc::new(limits);
    let accepted = futures_util::stream::unfold(
        (listener, limits.clone(), stats),
        |(listener, limits, stats)| async move {
            let (tcp, peer, slot) = accept(&listener, &limits, &stats).await;
            Some(((tcp, peer, slot), (listener, limits, stats)))
        },
    );
    established(accepted, limits, tls)
}

/// Connections ready for tonic from those accepted: as they are over plain TCP; over TLS once
/// their handshake is done, handshakes running side by side (at most one per connection
/// allowed), failures and timeouts counted and dropped.
fn established(
    accepted: impl futures_util::Stream<Item = (TcpStream, SocketAddr, Slot)> + Send + 'static,
    limits: Arc<Limits>,
    tls: Option<Arc<TlsListener>>,
) -> impl futures_util::Stream<Item = io::Result<Connection>> + Send + 'static {
    let most = limits.max_connections.max(1);
    accepted
        .map(move |(tcp, peer, slot)| {
            let limits = limits.clone();
            let tls = tls.clone();
            async move {
                let io = match tls {
                    None => Io::Plain(tcp),
                    Some(tls) => {
                        let handshake = tls.acceptor().accept(tcp);
                        match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                            Ok(Ok(stream)) => Io::Tls(Box::new(stream)),
                            Ok(Err(e)) => {
                                tls.count_handshake_failure();
                                tracing::debug!(%peer, listener = tls.name(), error = %e, "TLS handshake failed");
                                return None;
                            }
                            Err(_) => {
                                tls.count_handshake_failure();
                                slot.stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%peer, listener = tls.name(), "TLS handshake timed out");
                                return None;
                            }
                        }
                    }
                };
                Some(Ok(Connection::new(io, peer, limits, slot)))
            }
        })
        .buffer_unordered(most)
        .filter_map(std::future::ready)
}

/// A listener's connections spread over `threads` threads, for a runtime on each: the accept
/// loop (to run on the caller's runtime until `stop`) hands every connection it accepts to the
/// thread with the fewest open, and each [`Spread`] yields its thread's connections once that
/// thread's runtime polls it (the socket joins the reactor of the runtime that serves it).
pub fn spread(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<ConnectionStats>,
    threads: usize,
    tls: Option<Arc<TlsListener>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> (impl Future<Output = ()> + Send + 'static, Vec<Spread>) {
    let limits = Arc::new(limits);
    let mut spreads = Vec::with_capacity(threads);
    let mut queues = Vec::with_capacity(threads);
    for _ in 0..threads.max(1) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        queues.push((tx, load.clone()));
        spreads.push(Spread {
            rx,
            limits: limits.clone(),
            tls: tls.clone(),
        });
    }
    let accept_loop = async move {
        let mut stop = std::pin::pin!(stop);
        loop {
            let (tcp, peer, mut slot) = tokio::select! {
                accepted = accept(&listener, &limits, &stats) => accepted,
                () = &mut stop => break,
            };
            let Some((tx, load)) = queues
                .iter()
                .min_by_key(|(_, load)| load.load(Ordering::Relaxed))
            else {
                break;
            };
            slot.count_in(load);
            // A connection that cannot be handed over is dropped, and its slot with it.
            match tcp.into_std() {
                Ok(tcp) => {
                    let _ = tx.send((tcp, peer, slot));
                }
                Err(e) => tracing::debug!(%peer, error = %e, "could not hand a connection over"),
            }
        }
    };
    (accept_loop, spreads)
}

/// One thread's share of a [`spread`] listener.
#[derive(Debug)]
pub struct Spread {
    rx: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr, Slot)>,
    limits: Arc<Limits>,
    tls: Option<Arc<TlsListener>>,
}

impl Spread {
    /// The connections handed to this thread, as tonic's `serve_with_incoming` takes them;
    /// ends when the accept loop has stopped. To be polled on the runtime that serves them.
    pub fn into_incoming(self) -> impl futures_util::Stream<Item = io::Result<Connection>> + Send {
        let Self { rx, limits, tls } = self;
        let handed = futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                let (tcp, peer, slot) = rx.recv().await?;
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => return Some(((tcp, peer, slot), rx)),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "could not take a connection over");
                    }
                }
            }
        });
        established(handed, limits, tls)
    }
}

/// A connection's place among those open: taken at accept, given back when dropped, wherever
/// the connection is by then (accepted, handed to a thread, served).
#[derive(Debug)]
struct Slot {
    stats: Arc<ConnectionStats>,
    /// The open connections of the thread serving it ([`spread`]).
    load: Option<Arc<AtomicUsize>>,
}

impl Slot {
    /// Counts the connection among `load`'s too, until it is dropped.
    fn count_in(&mut self, load: &Arc<AtomicUsize>) {
        load.fetch_add(1, Ordering::Relaxed);
        self.load = Some(load.clone());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(load) = &self.load {
            load.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

async fn accept(
    listener: &TcpListener,
    limits: &Arc<Limits>,
    stats: &Arc<ConnectionStats>,
) -> (TcpStream, SocketAddr, Slot) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Taken before the check, so that two accepts cannot both see room for one.
        if stats.open.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
            stats.open.fetch_sub(1, Ordering::Relaxed);
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, max = limits.max_connections, "connection refused: too many open");
            drop(tcp);
            continue;
        }
        let slot = Slot {
            stats: stats.clone(),
            load: None,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        // Small answers must not wait for delayed ACKs (40 ms tails).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        return (tcp, peer, slot);
    }
}

/// Calls on one connection, as [`ActivityLayer`] sees them.
#[derive(Debug, Default)]
pub struct Activity {
    open: AtomicUsize,
    started: AtomicU64,
}

impl Activity {
    /// Marks a call open until the guard is dropped.
    pub fn call(self: &Arc<Self>) -> CallGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        CallGuard(self.clone())
    }
}

/// A call open on a connection.
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What tonic puts in each request of a [`Connection`] (tonic's `Connected`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The connection's calls.
    pub activity: Arc<Activity>,
    /// Whether the client presented a certificate the listener's client CA verified (only an
    /// mTLS listener asks for one, and its handshake refuses a client without).
    pub client_verified: bool,
}

/// What a connection runs over.
#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection with its handshake and idle deadlines (see the module doc).
#[derive(Debug)]
pub struct Connection {
    io: Io,
    peer: SocketAddr,
    limits: Arc<Limits>,
    /// Its place among the open connections, and the counters it adds to.
    slot: Slot,
    /// Bytes still to come before HTTP/2 has started, and the first frame's header so far;
    /// `None` once it has.
    handshake: Option<Handshake>,
    activity: Arc<Activity>,
    /// The handshake deadline, then the next idle check.
    timer: Pin<Box<Sleep>>,
    /// Idle checks in a row that found no call open and none started.
    idle_checks: u32,
    /// Calls started, as of the last idle check.
    started_seen: u64,
    /// Whether the next write goes to the socket (see [`Connection::coalesce`]).
    write_now: bool,
}

#[derive(Debug, Default)]
struct Handshake {
    /// Bytes of the connection read so far.
    read: usize,
    /// The first frame's 9-byte header, as it arrives.
    header: [u8; 9],
}

/// The client preface's length (RFC 9113, 3.4).
const PREFACE: usize = 24;
/// An HTTP/2 frame header's length.
const FRAME_HEADER: usize = 9;
/// The idle timeout is checked this many times per timeout: a connection is closed between one
/// and 1 + 1/IDLE_CHECKS timeouts after its last call.
const IDLE_CHECKS: u32 = 4;

impl Handshake {
    /// Takes the next bytes read; true once the preface and the whole first frame are in.
    fn read(&mut self, bytes: &[u8]) -> bool {
        for (i, &b) in bytes.iter().enumerate() {
            let at = self.read + i;
            if let Some(slot) = at.checked_sub(PREFACE).and_then(|h| self.header.get_mut(h)) {
                *slot = b;
            }
        }
        self.read += bytes.len();
        if self.read < PREFACE + FRAME_HEADER {
            return false;
        }
        let [a, b, c, ..] = self.header;
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        self.read >= PREFACE + FRAME_HEADER + len
    }
}

impl Connection {
    fn new(io: Io, peer: SocketAddr, limits: Arc<Limits>, slot: Slot) -> Self {
        let timer = Box::pin(tokio::time::sleep(limits.handshake_timeout));
        Self {
            io,
            peer,
            limits,
            slot,
            handshake: Some(Handshake::default()),
            activity: Arc::default(),
            timer,
            idle_checks: 0,
            started_seen: 0,
            write_now: false,
        }
    }

    /// Coalesces writes: the first attempt to write after a write yields to the runtime once
    /// (wakes itself and returns `Pending`), so that the calls whose tasks are ready to answer
    /// answer first and leave in the same write. hyper answers each call in a task of its own
    /// and writes as soon as one answer is ready; without this, a busy connection made one
    /// `writev` per one or two answers, each costing more than the answer. The cost is one
    /// more turn of the scheduler before a write.
    fn coalesce(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.write_now {
            return Poll::Ready(());
        }
        self.write_now = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn wrote<T>(&mut self, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.write_now = false;
        }
        written
    }

    fn idle_check_every(&self) -> Duration {
        self.limits.idle_timeout / IDLE_CHECKS
    }

    /// Polls the connection's deadline: an error once it has passed with nothing to show.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.handshake.is_some() {
                self.slot
                    .stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, timeout = ?self.limits.handshake_timeout, "closing a connection that did not start HTTP/2 in time");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP/2 preface and SETTINGS not received in time",
                ));
            }
            let started = self.activity.started.load(Ordering::Relaxed);
            let open = self.activity.open.load(Ordering::Relaxed);
            if open == 0 && started == self.started_seen {
                self.idle_checks += 1;
            } else {
                self.idle_checks = 0;
            }
            self.started_seen = started;
            if self.idle_checks >= IDLE_CHECKS {
                self.slot.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, timeout = ?self.limits.idle_timeout, "closing an idle connection");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no call within the idle timeout",
                ));
            }
            let next = Instant::now() + self.idle_check_every();
            self.timer.as_mut().reset(next);
        }
        Ok(())
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        let client_verified = match &self.io {
            Io::Plain(_) => false,
            Io::Tls(tls) => tls.get_ref().1.peer_certificates().is_some(),
        };
        ConnInfo {
            remote: self.peer,
            activity: self.activity.clone(),
            client_verified,
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.poll_deadline(cx)?;
        let before = buf.filled().len();
        ready!(this.io.poll_read(cx, buf))?;
        if let Some(handshake) = &mut this.handshake {
            let fresh = buf.filled().get(before..).unwrap_or_default();
            if handshake.read(fresh) {
                this.handshake = None;
                // From now on the timer paces the idle checks.
                let next = Instant::now() + this.idle_check_every();
                this.timer.as_mut().reset(next);
                this.started_seen = this.activity.started.load(Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.coalesce(cx));
        let written = this.io.poll_write(cx, buf);
        this.wrote(written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.coalesce(cx));
        let written = this.io.poll_write_vectored(cx, bufs);
        this.wrote(written)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Io {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// Marks every call of a [`Connection`] open while its service works on it, for the idle
/// timeout. Requests without a [`ConnInfo`] (none in the server) pass untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ActivityService(inner)
    }
}

/// See [`ActivityLayer`].
#[derive(Debug, Clone)]
pub struct ActivityService<S>(S);

impl<S, B> tower::Service<http::Request<B>> for ActivityService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.activity.call());
        Tracked {
            inner: self.0.call(req),
            _guard: guard,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future, holding the call open until it completes or is dropped (a client's
    /// reset drops it).
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        _guard: Option<CallGuard>,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preface_and_settings(payload: usize) -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let len = u32::try_from(payload).unwrap().to_be_bytes();
        bytes.extend_from_slice(&[len[1], len[2], len[3], 0x4, 0, 0, 0, 0, 0]);
        bytes.extend(std::iter::repeat_n(0u8, payload));
        bytes
    }

    #[test]
    fn the_handshake_ends_with_the_first_frame_whatever_the_reads() {
        for payload in [0, 6, 18, 300] {
            let bytes = preface_and_settings(payload);
            for split in [1, 2, 7, 24, 25, 33, 100] {
                let mut h = Handshake::default();
                let chunks: Vec<&[u8]> = bytes.chunks(split).collect();
                let (last, rest) = chunks.split_last().unwrap();
                for c in rest {
                    assert!(
                        !h.read(c),
                        "payload {payload}, reads of {split}: done early"
                    );
                }
                assert!(
                    h.read(last),
                    "payload {payload}, reads of {split}: not done"
                );
            }
        }
    }

    #[test]
    fn ten_bytes_of_preface_are_no_handshake() {
        let mut h = Handshake::default();
        assert!(!h.read(&preface_and_settings(0)[..10]));
    }
}
