//! One decision-listener connection on our own HTTP/2.
//!
//! Why: with the `h2` crate, h2 was ~25,000 of the ~33,000 instructions the server spent per
//! `ShouldRateLimit` call (BENCHMARKS.md, fourth pass): a `HeaderMap` and a `Uri` built for
//! every request, a stream slab and a mutex per operation, frame structs moved through
//! prioritisation queues, connection headers looked up in every response. A unary gRPC call
//! needs none of that: its request is a header block and one message, its answer three frames
//! whose headers never change. Here a call whose HEADERS and DATA are in the read buffer is
//! decided from the bytes where they lie and answered into the write buffer, with nothing kept
//! for it afterwards; a read's answers leave in one write.
//!
//! What it keeps from HTTP/2 (RFC 9113): the preface and SETTINGS exchange; HPACK with the
//! peer's dynamic table ([`super::hpack`]); CONTINUATION; padding; flow control both ways (an
//! answer the peer's windows cannot take yet is parked until WINDOW_UPDATE); stream states,
//! with stream errors answered by RST_STREAM and connection errors by GOAWAY; PING; at most
//! [`MAX_STREAMS`] streams open at once; a bound on request header lists; graceful shutdown
//! with two GOAWAYs around a PING, as h2 does, so that calls already on the wire are served.
//!
//! Every other path (health, reflection, including reflection's bidirectional stream) goes to
//! tonic's router: its request body is fed from the connection through a channel and its
//! response polled by the connection, frame by frame within the peer's windows. Those calls are
//! rare; they cost an allocation or two each.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tonic::Status;
use tower::ServiceExt as _;

use super::frame::{self, Head, Reason, flag, kind, setting};
use super::hpack;
use crate::limiter::RulesCache;
use crate::service::endpoint::{RlsEndpoint, SHOULD_RATE_LIMIT, Unary};
use crate::store::Store;

/// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS). A call answered
/// as soon as it is read never counts; this bounds the state of calls whose body is still
/// arriving, that wait on Redis, or whose answer waits for a window.
pub const MAX_STREAMS: u32 = 1024;
/// Largest request header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE; hyper's default).
const MAX_HEADER_LIST: usize = 16 * 1024;
/// Our receive windows, connection and streams (hyper's server defaults).
const WINDOW: u32 = 1024 * 1024;
/// Largest frame we accept (SETTINGS_MAX_FRAME_SIZE: the default, which we do not change).
const MAX_FRAME: usize = 16_384;
/// Read buffer: several frames of the largest size, so that a read takes what the kernel has.
const READ_BUF: usize = 64 * 1024;
/// Answers written before the rest of a read is decided: the first answers of a burst leave
/// while the others are decided (BENCHMARKS.md, sixth pass).
const FLUSH_EVERY: usize = 64;
/// Stop reading while this much output waits for the socket.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Bytes of bodies arriving in pieces a connection keeps at once: two of the largest message.
const MAX_HELD: usize = 2 * (crate::service::endpoint::MAX_REQUEST_BYTES + 5);
/// Calls to tonic's router (health, reflection) open at once on a connection.
const MAX_FALLBACKS: usize = 16;
/// Bytes of request body a reflection or health call may have queued unread.
const MAX_QUEUED_BODY: usize = 1024 * 1024;
/// Streams reset by us that are remembered, so that what the client sent on them before it saw
/// the reset is ignored.
const RESET_MEMORY: usize = 256;
/// The PING payload of a graceful shutdown.
const SHUTDOWN_PING: [u8; 8] = *b"sluice\0\x01";

/// `:status: 200`, `content-type: application/grpc`: static table index 8, then a literal
/// without indexing on static name 31.
const OK_HEAD: &[u8] = b"\x88\x0f\x10\x10application/grpc";
/// `grpc-status: 0`, a literal without indexing with a new name.
const OK_TRAILERS: &[u8] = b"\x00\x0bgrpc-status\x010";

/// Why a connection ended other than by the peer closing it.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed.
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol; it was sent GOAWAY with `reason`.
    #[error("{reason}: {detail}")]
    Protocol {
        /// The GOAWAY's error code.
        reason: Reason,
        /// What was wrong.
        detail: &'static str,
    },
}

fn conn_err(reason: Reason, detail: &'static str) -> ConnError {
    ConnError::Protocol { reason, detail }
}

/// Serves one HTTP/2 connection until the peer closes it, or `stop` resolves and the calls open
/// by then are answered.
pub async fn serve<S, T>(
    io: T,
    endpoint: Arc<RlsEndpoint<S>>,
    routes: tonic::service::Routes,
    stop: impl Future<Output = ()>,
) -> Result<(), ConnError>
where
    S: Store,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        io,
        rbuf: vec![0; READ_BUF],
        start: 0,
        end: 0,
        preface_seen: false,
        read_closed: false,
        state: State::new(&endpoint, &routes),
    };
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.state.begin_shutdown();
        }
        conn.poll(cx)
    })
    .await
}

struct Conn<'a, S, T> {
    io: T,
    /// Bytes read and not yet parsed are `rbuf[start..end]`.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    preface_seen: bool,
    read_closed: bool,
    state: State<'a, S>,
}

impl<S: Store, T: AsyncRead + AsyncWrite + Unpin> Conn<'_, S, T> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        loop {
            let mut progress = false;
            if self.state.error.is_none()
                && !self.read_closed
                && self.state.pending_out() < OUT_HIGH_WATER
            {
                if self.start == self.end {
                    (self.start, self.end) = (0, 0);
                } else if self.rbuf.len() - self.end < MAX_FRAME + frame::HEAD_LEN {
                    self.rbuf.copy_within(self.start..self.end, 0);
                    (self.start, self.end) = (0, self.end - self.start);
                }
                let mut read = ReadBuf::new(&mut self.rbuf[self.end..]);
                match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            self.read_closed = true;
                        } else {
                            self.end += n;
                            progress = true;
                            self.state.taken = Instant::now();
                            if let Err(e) = self.parse(cx) {
                                self.state.fail(e);
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => {}
                }
            }
            if self.state.error.is_none() {
                progress |= self.state.poll_waiting(cx);
                progress |= self.state.poll_fallbacks(cx);
            }
            match self.write(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if self.state.pending_out() == 0 {
                if let Some(e) = self.state.error.take() {
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    return Poll::Ready(Err(e));
                }
                if self.read_closed || self.state.drained() {
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    return Poll::Ready(Ok(()));
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Handles every whole frame in the read buffer.
    fn parse(&mut self, cx: &mut Context<'_>) -> Result<(), ConnError> {
        if !self.preface_seen {
            let have = &self.rbuf[self.start..self.end];
            let want = &frame::PREFACE[..have.len().min(frame::PREFACE.len())];
            if have.get(..want.len()) != Some(want) {
                // Not HTTP/2 (or not prior knowledge): nothing to say in HTTP/2 terms.
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "not an HTTP/2 client preface",
                ));
            }
            if have.len() < frame::PREFACE.len() {
                return Ok(());
            }
            self.start += frame::PREFACE.len();
            self.preface_seen = true;
        }
        loop {
            let buf = &self.rbuf[self.start..self.end];
            let Some(head) = buf.first_chunk::<{ frame::HEAD_LEN }>().map(Head::parse) else {
                return Ok(());
            };
            if head.len > MAX_FRAME {
                return Err(conn_err(
                    Reason::FRAME_SIZE_ERROR,
                    "frame larger than 16384 bytes",
                ));
            }
            let Some(payload) = buf.get(frame::HEAD_LEN..frame::HEAD_LEN + head.len) else {
                return Ok(());
            };
            self.state.on_frame(head, payload, cx)?;
            self.start += frame::HEAD_LEN + head.len;
            if self.state.answered >= FLUSH_EVERY {
                self.state.answered = 0;
                // The rest of the read is decided while these leave; a full socket just
                // keeps them for later.
                if let Poll::Ready(Err(e)) = self.write(cx) {
                    return Err(e);
                }
            }
        }
    }

    /// Writes what output there is, until done or the socket is full.
    fn write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        let out = &mut self.state.out;
        while self.state.out_pos < out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &out[self.state.out_pos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(ConnError::Io(std::io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => self.state.out_pos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
        out.clear();
        self.state.out_pos = 0;
        Pin::new(&mut self.io)
            .poll_flush(cx)
            .map_err(ConnError::from)
    }
}

/// Everything about a connection but its socket and read buffer.
struct State<'a, S> {
    endpoint: &'a Arc<RlsEndpoint<S>>,
    /// The connection's view of the rules in force.
    rules: RulesCache<'a>,
    /// Every other service of the listener (health, reflection).
    routes: &'a tonic::service::Routes,
    /// Output not yet written is `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    decoder: hpack::Decoder,
    fields: Fields,
    /// The header block being received: its stream, whether it ends the stream, its bytes.
    block: Option<(u32, bool)>,
    block_buf: Vec<u8>,
    got_settings: bool,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// What the peer lets us send on the connection.
    send_window: i64,
    /// What the peer may still send us on the connection.
    recv_window: i64,
    /// Received and not yet given back by WINDOW_UPDATE.
    recv_unacked: u32,
    /// Highest stream the peer opened.
    last_stream: u32,
    streams: HashMap<u32, Stream, BuildHasherDefault<frame::StreamIdHasher>>,
    /// Streams whose answer waits for a window, in the order they stopped.
    parked: VecDeque<u32>,
    /// Streams we reset lately: frames the client sent on them before it saw the reset are
    /// ignored (RFC 9113 5.1), not answered with another reset.
    reset_lately: VecDeque<u32>,
    /// Calls waiting on the store (Redis), by stream.
    waiting: FuturesUnordered<Later>,
    fallbacks: usize,
    /// Bytes of request bodies kept until whole, over all streams.
    held: usize,
    /// When the current read arrived: each call's latency starts there.
    taken: Instant,
    /// Calls answered since output was last written.
    answered: usize,
    shutdown: Shutdown,
    /// A connection error: GOAWAY is queued, and the connection ends once it is written.
    error: Option<ConnError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    Running,
    /// GOAWAY(2^31-1) and a PING sent; the PING's ACK says every stream the client opened
    /// before it saw the GOAWAY has arrived.
    Announced,
    /// The final GOAWAY sent with this last stream: later streams are refused.
    Final(u32),
}

/// A stream that outlives the read that opened it.
enum Stream {
    /// A `ShouldRateLimit` call whose body is still arriving; `length` is its content-length,
    /// if it sent one.
    Call {
        start: Instant,
        body: Vec<u8>,
        window: i64,
        length: Option<u64>,
    },
    /// A call waiting on the store; its answer comes from `State::waiting`.
    Waiting { window: i64 },
    /// An answer waiting for the peer's windows: DATA from `pos`, then trailers (if any).
    Parked {
        window: i64,
        data: Vec<u8>,
        pos: usize,
        trailers: Option<Vec<u8>>,
    },
    /// A call to tonic's router.
    Fallback(Box<Fallback>),
}

impl Stream {
    /// What the stream's send window differs from the peer's initial window by: WINDOW_UPDATEs
    /// received, less DATA sent.
    fn window(&mut self) -> &mut i64 {
        match self {
            Stream::Call { window, .. }
            | Stream::Waiting { window }
            | Stream::Parked { window, .. } => window,
            Stream::Fallback(f) => &mut f.window,
        }
    }
}

/// A call the store answers later: its stream, and the answer.
type Later = Pin<Box<dyn Future<Output = (u32, Response<Unary>)> + Send>>;

impl<'a, S: Store> State<'a, S> {
    fn new(endpoint: &'a Arc<RlsEndpoint<S>>, routes: &'a tonic::service::Routes) -> Self {
        let mut out = Vec::with_capacity(16 * 1024);
        // Our SETTINGS, then the connection window opened to WINDOW.
        frame::put_settings(
            &mut out,
            &[
                (setting::MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (setting::INITIAL_WINDOW_SIZE, WINDOW),
                (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        frame::put_window_update(&mut out, 0, WINDOW - 65_535);
        State {
            endpoint,
            rules: endpoint.rules_cache(),
            routes,
            out,
            out_pos: 0,
            decoder: hpack::Decoder::new(4096),
            fields: Fields::default(),
            block: None,
            block_buf: Vec::new(),
            got_settings: false,
            peer_initial_window: 65_535,
            peer_max_frame: 16_384,
            send_window: 65_535,
            recv_window: i64::from(WINDOW),
            recv_unacked: 0,
            last_stream: 0,
            streams: HashMap::default(),
            parked: VecDeque::new(),
            reset_lately: VecDeque::with_capacity(RESET_MEMORY),
            waiting: FuturesUnordered::new(),
            fallbacks: 0,
            held: 0,
            taken: Instant::now(),
            answered: 0,
            shutdown: Shutdown::Running,
            error: None,
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Shutting down and nothing left to answer.
    fn drained(&self) -> bool {
        matches!(self.shutdown, Shutdown::Final(_)) && self.streams.is_empty()
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown == Shutdown::Running && self.error.is_none() {
            frame::put_goaway(&mut self.out, frame::STREAM_MASK, Reason::NO_ERROR, b"");
            frame::put_head(&mut self.out, 8, kind::PING, 0, 0);
            self.out.extend_from_slice(&SHUTDOWN_PING);
            self.shutdown = Shutdown::Announced;
        }
    }

    /// Queues GOAWAY for a connection error; nothing more is read.
    fn fail(&mut self, e: ConnError) {
        if let ConnError::Protocol { reason, detail } = &e {
            frame::put_goaway(&mut self.out, self.last_stream, *reason, detail.as_bytes());
        }
        tracing::debug!(error = %e, "decision connection: protocol error");
        self.error = Some(e);
    }

    fn on_frame(
        &mut self,
        head: Head,
        payload: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        if !self.got_settings {
            if head.kind != kind::SETTINGS || head.has(flag::ACK) {
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "first frame is not SETTINGS",
                ));
            }
            self.got_settings = true;
        }
        if let Some((stream, _)) = self.block
            && (head.kind != kind::CONTINUATION || head.stream != stream)
        {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "a header block was interrupted by another frame",
            ));
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload, cx),
            kind::HEADERS => self.on_headers(head, payload, cx),
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if payload.len() != 5 {
                    if self.idle(head.stream) {
                        return Err(conn_err(
                            Reason::FRAME_SIZE_ERROR,
                            "PRIORITY length is not 5",
                        ));
                    }
                    self.reset(head.stream, Reason::FRAME_SIZE_ERROR);
                }
                Ok(())
            }
            kind::RST_STREAM => self.on_reset(head, payload),
            kind::SETTINGS => self.on_settings(head, payload),
            kind::PUSH_PROMISE => Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => self.on_ping(head, payload),
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if payload.len() < 8 {
                    return Err(conn_err(Reason::FRAME_SIZE_ERROR, "GOAWAY shorter than 8"));
                }
                // A client going away opens no more streams; the ones open are still
                // answered, and the connection ends when it closes its side.
                Ok(())
            }
            kind::WINDOW_UPDATE => self.on_window_update(head, payload, cx),
            kind::CONTINUATION => self.on_continuation(head, payload, cx),
            // Unknown frame types are ignored (RFC 9113 4.1).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let settings = frame::settings(&head, payload).map_err(|(r, d)| conn_err(r, d))?;
        if settings.ack {
            return Ok(());
        }
        if let Some(value) = settings.initial_window_size {
            let windows = self.streams.values_mut().map(|s| *s.window());
            self.peer_initial_window =
                frame::moved_initial_window(value, windows).map_err(|(r, d)| conn_err(r, d))?;
        }
        if let Some(value) = settings.max_frame_size {
            self.peer_max_frame = value as usize;
        }
        // MAX_CONCURRENT_STREAMS: a server opens none.
        frame::put_head(&mut self.out, 0, kind::SETTINGS, flag::ACK, 0);
        self.flush_parked();
        Ok(())
    }

    fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        frame::check_ping(&head, payload).map_err(|(r, d)| conn_err(r, d))?;
        if head.has(flag::ACK) {
            if payload == SHUTDOWN_PING && self.shutdown == Shutdown::Announced {
                // Every stream the client opened before it saw our first GOAWAY is here.
                frame::put_goaway(&mut self.out, self.last_stream, Reason::NO_ERROR, b"");
                self.shutdown = Shutdown::Final(self.last_stream);
            }
            return Ok(());
        }
        frame::put_head(&mut self.out, 8, kind::PING, flag::ACK, 0);
        self.out.extend_from_slice(payload);
        Ok(())
    }

    fn on_window_update(
        &mut self,
        head: Head,
        payload: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(conn_err(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE length is not 4",
            ));
        }
        let increment = i64::from(frame::be_u32(payload).unwrap_or(0) & frame::STREAM_MASK);
        if head.stream == 0 {
            if increment == 0 {
                return Err(conn_err(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(conn_err(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window above 2^31-1",
                ));
            }
        } else {
            if self.idle(head.stream) {
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on an idle stream",
                ));
            }
            let initial = self.peer_initial_window;
            let Some(stream) = self.streams.get_mut(&head.stream) else {
                // A closed stream: windows may still arrive for it (RFC 9113 6.9).
                return Ok(());
            };
            if increment == 0 {
                self.reset_open(head.stream, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            let window = stream.window();
            *window += increment;
            if initial + *window > frame::MAX_WINDOW {
                self.reset_open(head.stream, Reason::FLOW_CONTROL_ERROR);
                return Ok(());
            }
        }
        self.flush_parked();
        if self.fallbacks > 0 {
            cx.waker().wake_by_ref();
        }
        Ok(())
    }

    fn on_reset(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err(conn_err(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM length is not 4",
            ));
        }
        if self.idle(head.stream) {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        self.forget(head.stream);
        Ok(())
    }

    fn on_data(
        &mut self,
        head: Head,
        payload: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if self.idle(head.stream) {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        // All of a DATA frame counts against the windows, padding included (RFC 9113 6.9.1).
        self.recv_window -= payload.len() as i64;
        if self.recv_window < 0 {
            return Err(conn_err(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            ));
        }
        self.recv_unacked += payload.len() as u32;
        if self.recv_unacked >= WINDOW / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unacked);
            self.recv_window += i64::from(self.recv_unacked);
            self.recv_unacked = 0;
        }
        let data = frame::data_content(&head, payload).map_err(|(r, d)| conn_err(r, d))?;
        let end = head.has(flag::END_STREAM);
        let id = head.stream;
        match self.streams.get_mut(&id) {
            Some(Stream::Call { body, length, .. }) if !end => {
                if self.held + data.len() > MAX_HELD {
                    // Bodies arriving in pieces are kept until whole: bounded per connection,
                    // or a client could hold 1,024 streams of 4 MiB each.
                    self.reset_open(id, Reason::ENHANCE_YOUR_CALM);
                    return Ok(());
                }
                body.extend_from_slice(data);
                self.held += data.len();
                let len = body.len();
                // Refused as soon as its prefix declares too much, as the h2 path does.
                let size = crate::service::endpoint::check_size(body);
                if length.is_some_and(|n| len as u64 > n) {
                    self.reset_open(id, Reason::PROTOCOL_ERROR);
                } else if let Err(status) = size {
                    self.remove(id);
                    self.send_status(id, 0, status, false);
                } else if !payload.is_empty() {
                    // The body is buffered here, so its window goes straight back.
                    frame::put_window_update(&mut self.out, id, payload.len() as u32);
                }
            }
            Some(Stream::Call { .. }) => {
                if let Some(Stream::Call {
                    start,
                    mut body,
                    window,
                    length,
                }) = self.remove(id)
                {
                    if length.is_some_and(|n| (body.len() + data.len()) as u64 != n) {
                        // A request whose DATA is not its content-length is malformed
                        // (RFC 9113 8.1.1).
                        self.reset(id, Reason::PROTOCOL_ERROR);
                    } else if body.is_empty() {
                        // The whole message in this frame: decided where it lies.
                        self.answer_call(id, start, data, window);
                    } else {
                        body.extend_from_slice(data);
                        self.answer_call(id, start, &body, window);
                    }
                }
            }
            Some(Stream::Fallback(f)) => {
                let refuse = if f.remote_closed {
                    Some(Reason::STREAM_CLOSED)
                } else if f.queued.fetch_add(data.len(), Ordering::AcqRel) + data.len()
                    > MAX_QUEUED_BODY
                {
                    Some(Reason::ENHANCE_YOUR_CALM)
                } else {
                    if let Some(tx) = &f.body_tx
                        && !data.is_empty()
                    {
                        let _ = tx.send(Bytes::copy_from_slice(data));
                    }
                    if end {
                        f.remote_closed = true;
                        f.body_tx = None;
                    }
                    None
                };
                match refuse {
                    Some(reason) => self.reset_open(id, reason),
                    None => {
                        if !end && !payload.is_empty() {
                            frame::put_window_update(&mut self.out, id, payload.len() as u32);
                        }
                        cx.waker().wake_by_ref();
                    }
                }
            }
            // The call is already decided (or waits on the store): its body is complete.
            Some(_) => self.reset_open(id, Reason::STREAM_CLOSED),
            None => {
                if !self.was_reset(id) {
                    self.reset(id, Reason::STREAM_CLOSED);
                }
            }
        }
        Ok(())
    }

    fn on_headers(
        &mut self,
        head: Head,
        payload: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        let id = head.stream;
        if id == 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let fragment = frame::header_fragment(&head, payload).map_err(|(r, d)| conn_err(r, d))?;
        let end = head.has(flag::END_STREAM);
        if head.has(flag::END_HEADERS) {
            self.on_header_block(id, end, fragment, cx)
        } else {
            self.block = Some((id, end));
            self.block_buf.clear();
            self.block_buf.extend_from_slice(fragment);
            Ok(())
        }
    }

    fn on_continuation(
        &mut self,
        head: Head,
        payload: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        let Some((id, end)) = self.block else {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        };
        // Bounded: a block that already holds more than the header list bound (compressed
        // fields are never larger than their decoded size plus a few bytes) is refused.
        if self.block_buf.len() + payload.len() > MAX_HEADER_LIST + MAX_FRAME {
            return Err(conn_err(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        self.block_buf.extend_from_slice(payload);
        if head.has(flag::END_HEADERS) {
            self.block = None;
            let block = std::mem::take(&mut self.block_buf);
            let result = self.on_header_block(id, end, &block, cx);
            self.block_buf = block;
            result
        } else {
            Ok(())
        }
    }

    /// A whole header block: a new stream's request, or trailers of an open one.
    fn on_header_block(
        &mut self,
        id: u32,
        end: bool,
        block: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        // Decoded whatever becomes of the stream: the peer's dynamic table must stay in step.
        self.fields.clear();
        let fields = &mut self.fields;
        self.decoder
            .decode(block, |name, value| fields.push(name, value))
            .map_err(|_| conn_err(Reason::COMPRESSION_ERROR, "undecodable header block"))?;

        if id.is_multiple_of(2) {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "a client opened an even stream",
            ));
        }
        if id <= self.last_stream {
            return self.on_trailers(id, end, cx);
        }
        self.last_stream = id;
        if let Shutdown::Final(last) = self.shutdown
            && id > last
        {
            self.reset(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if self.streams.len() >= MAX_STREAMS as usize {
            self.reset(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if self.fields.list_size > MAX_HEADER_LIST {
            let status = Status::resource_exhausted(format!(
                "request headers of {} bytes, more than the {MAX_HEADER_LIST} accepted",
                self.fields.list_size
            ));
            self.send_status(id, 0, status, end);
            return Ok(());
        }
        let request = match self.fields.request() {
            Ok(request) => request,
            Err(_) => {
                self.reset(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        if !request.rls {
            return self.start_fallback(id, end, cx);
        }
        if let Some(encoding) = request.encoding
            && encoding != b"identity"
        {
            let status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(encoding)
            ));
            self.send_status(id, 0, status, end);
            return Ok(());
        }
        let length = request.content_length;
        if end {
            if length.is_some_and(|n| n != 0) {
                self.reset(id, Reason::PROTOCOL_ERROR);
            } else {
                // No body at all: refused by the endpoint as such.
                self.answer_call(id, self.taken, &[], 0);
            }
        } else {
            self.streams.insert(
                id,
                Stream::Call {
                    start: self.taken,
                    body: Vec::new(),
                    window: 0,
                    length,
                },
            );
        }
        Ok(())
    }

    /// A header block on a stream already open: the request's trailers, which must end it.
    fn on_trailers(&mut self, id: u32, end: bool, cx: &mut Context<'_>) -> Result<(), ConnError> {
        if !self.streams.contains_key(&id) {
            if self.was_reset(id) {
                return Ok(());
            }
            return Err(conn_err(
                Reason::STREAM_CLOSED,
                "HEADERS on a closed stream",
            ));
        }
        if !end {
            self.reset_open(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        match self.streams.get_mut(&id) {
            Some(Stream::Call { .. }) => {
                if let Some(Stream::Call {
                    start,
                    body,
                    window,
                    length,
                }) = self.remove(id)
                {
                    if length.is_some_and(|n| body.len() as u64 != n) {
                        self.reset(id, Reason::PROTOCOL_ERROR);
                    } else {
                        self.answer_call(id, start, &body, window);
                    }
                }
            }
            Some(Stream::Fallback(f)) => {
                f.remote_closed = true;
                f.body_tx = None;
                cx.waker().wake_by_ref();
            }
            _ => self.reset_open(id, Reason::STREAM_CLOSED),
        }
        Ok(())
    }

    /// Decides a `ShouldRateLimit` call whose body is whole, and answers it (or hands it to
    /// `waiting`, with Redis). `window`: the stream's send window beyond the initial one.
    fn answer_call(&mut self, id: u32, start: Instant, body: &[u8], window: i64) {
        let head_at = self.out.len();
        frame::put_head(
            &mut self.out,
            OK_HEAD.len(),
            kind::HEADERS,
            flag::END_HEADERS,
            id,
        );
        self.out.extend_from_slice(OK_HEAD);
        let data_at = self.out.len();
        frame::put_head(&mut self.out, 0, kind::DATA, 0, id);
        let rules = self.rules.load();
        match self
            .endpoint
            .answer_now_into(body, start, rules, &mut self.out)
        {
            Some(Ok(())) => {
                let len = self.out.len() - data_at - frame::HEAD_LEN;
                let room = self.send_window.min(self.peer_initial_window + window);
                if len as i64 <= room && len <= self.peer_max_frame {
                    frame::patch_len(&mut self.out, data_at, len);
                    self.send_window -= len as i64;
                    frame::put_head(
                        &mut self.out,
                        OK_TRAILERS.len(),
                        kind::HEADERS,
                        flag::END_HEADERS | flag::END_STREAM,
                        id,
                    );
                    self.out.extend_from_slice(OK_TRAILERS);
                } else {
                    let data = self.out[data_at + frame::HEAD_LEN..].to_vec();
                    self.out.truncate(data_at);
                    self.park(id, window, data, Some(OK_TRAILERS.to_vec()));
                }
                self.answered += 1;
            }
            Some(Err(status)) => {
                self.out.truncate(head_at);
                self.send_status(id, window, status, true);
            }
            None => {
                self.out.truncate(head_at);
                let endpoint = self.endpoint.clone();
                let body = Bytes::copy_from_slice(body);
                self.waiting.push(Box::pin(
                    async move { (id, endpoint.answer(body, start).await) },
                ));
                self.streams.insert(id, Stream::Waiting { window });
            }
        }
    }

    /// Polls the calls waiting on the store; true if any finished.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while let Poll::Ready(Some((id, response))) = self.waiting.poll_next_unpin(cx) {
            progress = true;
            // Gone if the client reset it meanwhile.
            if let Some(Stream::Waiting { window }) = self.streams.remove(&id) {
                self.send_unary(id, window, response);
                self.answered += 1;
            }
        }
        progress
    }

    /// Answers with a gRPC error, as a trailers-only response. `remote_closed`: whether the
    /// client has ended its side; if not, the stream is reset with NO_ERROR after the answer,
    /// so that it sends no more (RFC 9113 8.1).
    fn send_status(&mut self, id: u32, window: i64, status: Status, remote_closed: bool) {
        self.send_unary(id, window, status.into_http());
        if !remote_closed {
            self.reset(id, Reason::NO_ERROR);
        }
    }

    /// Sends a whole unary response: headers, its message, its trailers.
    fn send_unary(&mut self, id: u32, window: i64, response: Response<Unary>) {
        let (parts, body) = response.into_parts();
        let (data, trailers) = body.into_parts();
        let end = data.is_none() && trailers.is_none();
        let mut block = Vec::with_capacity(64);
        encode_head(parts.status, &parts.headers, &mut block);
        self.put_block(id, end, &block);
        if end {
            return;
        }
        let trailers = trailers.map(|t| {
            let mut block = Vec::with_capacity(32);
            encode_fields(&t, &mut block);
            block
        });
        self.park(
            id,
            window,
            data.map(Vec::from).unwrap_or_default(),
            trailers,
        );
        self.flush_parked();
    }

    /// Appends a header block as HEADERS and, beyond the peer's frame size, CONTINUATION.
    fn put_block(&mut self, id: u32, end: bool, block: &[u8]) {
        let mut chunks = block.chunks(self.peer_max_frame).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let last = chunks.peek().is_none();
            let mut flags = if last { flag::END_HEADERS } else { 0 };
            let kind = if first {
                if end {
                    flags |= flag::END_STREAM;
                }
                kind::HEADERS
            } else {
                kind::CONTINUATION
            };
            frame::put_head(&mut self.out, chunk.len(), kind, flags, id);
            self.out.extend_from_slice(chunk);
            first = false;
            if last {
                return;
            }
        }
    }

    /// Keeps an answer's DATA (and trailers) until the peer's windows take it.
    fn park(&mut self, id: u32, window: i64, data: Vec<u8>, trailers: Option<Vec<u8>>) {
        self.streams.insert(
            id,
            Stream::Parked {
                window,
                data,
                pos: 0,
                trailers,
            },
        );
        self.parked.push_back(id);
    }

    /// Sends what the windows allow of the parked answers, in the order they were parked.
    fn flush_parked(&mut self) {
        let mut i = 0;
        while i < self.parked.len() && self.send_window > 0 {
            let id = self.parked[i];
            let (done, trailers) = match self.streams.get_mut(&id) {
                Some(Stream::Parked {
                    window,
                    data,
                    pos,
                    trailers,
                }) => {
                    *pos += send_data(
                        &mut self.out,
                        &mut self.send_window,
                        self.peer_initial_window,
                        self.peer_max_frame,
                        id,
                        window,
                        data.get(*pos..).unwrap_or_default(),
                        trailers.is_none(),
                    );
                    if *pos < data.len() {
                        (false, None)
                    } else {
                        (true, trailers.take())
                    }
                }
                // Reset meanwhile.
                _ => (true, None),
            };
            if done {
                if let Some(Stream::Parked { .. }) = self.streams.get(&id) {
                    self.streams.remove(&id);
                }
                if let Some(block) = trailers {
                    self.put_block(id, true, &block);
                }
                self.parked.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// A stream the client has not opened: above the last it opened, or even (a server's,
    /// and this server opens none).
    fn idle(&self, id: u32) -> bool {
        id > self.last_stream || id.is_multiple_of(2)
    }

    /// Sends RST_STREAM for a stream that has no state here.
    fn reset(&mut self, id: u32, reason: Reason) {
        frame::put_reset(&mut self.out, id, reason);
        if self.reset_lately.len() == RESET_MEMORY {
            self.reset_lately.pop_front();
        }
        self.reset_lately.push_back(id);
    }

    /// Whether we reset this (closed) stream lately.
    fn was_reset(&self, id: u32) -> bool {
        self.reset_lately.contains(&id)
    }

    /// Resets an open stream and drops its state.
    fn reset_open(&mut self, id: u32, reason: Reason) {
        self.forget(id);
        self.reset(id, reason);
    }

    /// Drops a stream's state (the client reset it, or we did).
    fn forget(&mut self, id: u32) {
        self.remove(id);
    }

    /// Removes a stream's state, and what it counted for: the bytes of a body kept, a router
    /// call.
    fn remove(&mut self, id: u32) -> Option<Stream> {
        let stream = self.streams.remove(&id);
        match &stream {
            Some(Stream::Call { body, .. }) => self.held -= body.len(),
            Some(Stream::Fallback(_)) => self.fallbacks -= 1,
            _ => {}
        }
        stream
    }

    /// Hands a stream to tonic's router (health, reflection).
    fn start_fallback(
        &mut self,
        id: u32,
        end: bool,
        cx: &mut Context<'_>,
    ) -> Result<(), ConnError> {
        if self.fallbacks >= MAX_FALLBACKS {
            self.reset(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let request = match self.fields.http_request() {
            Ok(request) => request,
            Err(()) => {
                self.reset(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let body = tonic::body::Body::new(ChannelBody {
            rx,
            queued: queued.clone(),
        });
        let call = self.routes.clone().oneshot(request.map(|()| body));
        self.streams.insert(
            id,
            Stream::Fallback(Box::new(Fallback {
                window: 0,
                body_tx: (!end).then_some(tx),
                queued,
                remote_closed: end,
                state: FallbackState::Calling(Box::pin(async move {
                    match call.await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                })),
                pending: Bytes::new(),
                pending_end: false,
            })),
        );
        self.fallbacks += 1;
        cx.waker().wake_by_ref();
        Ok(())
    }

    /// Polls the router's calls; true if any sent something.
    fn poll_fallbacks(&mut self, cx: &mut Context<'_>) -> bool {
        if self.fallbacks == 0 {
            return false;
        }
        let ids: SmallVec<[u32; 8]> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s, Stream::Fallback(_)))
            .map(|(id, _)| *id)
            .collect();
        let mut progress = false;
        for id in ids {
            let Some(Stream::Fallback(mut f)) = self.streams.remove(&id) else {
                continue;
            };
            let before = self.out.len();
            let done = self.poll_fallback(id, &mut f, cx);
            progress |= self.out.len() != before;
            if done {
                self.fallbacks -= 1;
                if !f.remote_closed {
                    self.reset(id, Reason::NO_ERROR);
                }
            } else {
                self.streams.insert(id, Stream::Fallback(f));
            }
        }
        progress
    }

    /// Moves one router call on; true once its response has ended.
    fn poll_fallback(&mut self, id: u32, f: &mut Fallback, cx: &mut Context<'_>) -> bool {
        loop {
            if !f.pending.is_empty() || f.pending_end {
                let sent = send_data(
                    &mut self.out,
                    &mut self.send_window,
                    self.peer_initial_window,
                    self.peer_max_frame,
                    id,
                    &mut f.window,
                    &f.pending,
                    f.pending_end,
                );
                drop(f.pending.split_to(sent));
                if !f.pending.is_empty() {
                    return false;
                }
                if f.pending_end {
                    return true;
                }
            }
            match &mut f.state {
                FallbackState::Calling(call) => match call.as_mut().poll(cx) {
                    Poll::Ready(response) => {
                        let (parts, body) = response.into_parts();
                        let end = body.is_end_stream();
                        let mut block = Vec::with_capacity(128);
                        encode_head(parts.status, &parts.headers, &mut block);
                        self.put_block(id, end, &block);
                        if end {
                            return true;
                        }
                        f.state = FallbackState::Body(body);
                    }
                    Poll::Pending => return false,
                },
                FallbackState::Body(body) => match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => f.pending = data,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                let mut block = Vec::with_capacity(64);
                                encode_fields(&trailers, &mut block);
                                self.put_block(id, true, &block);
                                return true;
                            }
                        }
                    },
                    Poll::Ready(Some(Err(status))) => {
                        tracing::debug!(error = %status, "response body failed");
                        self.reset(id, Reason::INTERNAL_ERROR);
                        f.remote_closed = true;
                        return true;
                    }
                    Poll::Ready(None) => f.pending_end = true,
                    Poll::Pending => return false,
                },
            }
        }
    }
}

/// Sends as much of `data` as the windows and the peer's frame size allow, as DATA frames;
/// `end` marks the last with END_STREAM once all of it is sent. Returns the bytes sent.
#[allow(clippy::too_many_arguments)]
fn send_data(
    out: &mut Vec<u8>,
    conn_window: &mut i64,
    initial: i64,
    max_frame: usize,
    id: u32,
    window: &mut i64,
    data: &[u8],
    end: bool,
) -> usize {
    let mut sent = 0;
    loop {
        let room = (*conn_window).min(initial + *window).max(0) as usize;
        let len = (data.len() - sent).min(room).min(max_frame);
        let last = sent + len == data.len();
        if len == 0 && !(last && end) {
            return sent;
        }
        let flags = if last && end { flag::END_STREAM } else { 0 };
        frame::put_head(out, len, kind::DATA, flags, id);
        out.extend_from_slice(&data[sent..sent + len]);
        *conn_window -= len as i64;
        *window -= len as i64;
        sent += len;
        if last {
            return sent;
        }
    }
}

/// A call to tonic's router.
struct Fallback {
    window: i64,
    /// Feeds the request body; dropped when the client ends its side.
    body_tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Request bytes sent down `body_tx` and not yet taken by the service.
    queued: Arc<AtomicUsize>,
    remote_closed: bool,
    state: FallbackState,
    /// DATA taken from the response body and not yet sent (the windows were short).
    pending: Bytes,
    /// The response body has ended: END_STREAM goes out after `pending`.
    pending_end: bool,
}

enum FallbackState {
    Calling(Pin<Box<dyn Future<Output = Response<tonic::body::Body>> + Send>>),
    Body(tonic::body::Body),
}

/// A router call's request body, fed by the connection.
struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(data)) => {
                self.queued.fetch_sub(data.len(), Ordering::AcqRel);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Appends a response's `:status` and fields, as HPACK literals.
fn encode_head(status: http::StatusCode, headers: &HeaderMap, out: &mut Vec<u8>) {
    if status == http::StatusCode::OK {
        out.push(0x88);
    } else {
        // Literal without indexing, name `:status` (static index 8), then the code.
        out.push(0x08);
        let code = status.as_str().as_bytes();
        out.push(code.len() as u8);
        out.extend_from_slice(code);
    }
    encode_fields(headers, out);
}

fn encode_fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        hpack::encode_literal(name.as_str().as_bytes(), value.as_bytes(), out);
    }
}

/// A request header block, checked as it is decoded, with what the connection needs of it.
///
/// A `ShouldRateLimit` call's regular fields are checked and dropped: only its pseudo-header
/// fields and `grpc-encoding` are kept (copying every field was ~10% of the server's CPU per
/// call under h2load). Any other call keeps every field, for tonic's router. Pseudo-header
/// fields come first (RFC 9113 8.3), so `:path` is known before the first regular field. One
/// buffer, reused from call to call.
#[derive(Default)]
struct Fields {
    bytes: Vec<u8>,
    /// The fields kept: each one's start in `bytes`, name length, value length.
    spans: Vec<[u32; 3]>,
    /// The header list's size as HTTP/2 counts it (RFC 9113 6.5.2).
    list_size: usize,
    /// Broken by RFC 9113 8.2 or 8.3: the stream is reset with PROTOCOL_ERROR.
    malformed: bool,
    path: Option<bool>,
    method: bool,
    scheme: bool,
    regular: bool,
    /// Index in `spans` of `grpc-encoding`.
    encoding: Option<usize>,
    content_length: Option<u64>,
}

/// What the decision listener needs of a request's headers.
struct RequestHead<'f> {
    /// `:path` is `ShouldRateLimit`'s.
    rls: bool,
    encoding: Option<&'f [u8]>,
    content_length: Option<u64>,
}

impl Fields {
    fn clear(&mut self) {
        self.bytes.clear();
        self.spans.clear();
        self.list_size = 0;
        self.malformed = false;
        self.path = None;
        self.method = false;
        self.scheme = false;
        self.regular = false;
        self.encoding = None;
        self.content_length = None;
    }

    fn push(&mut self, name: &[u8], value: &[u8]) {
        self.list_size += name.len() + value.len() + 32;
        // Past the bound nothing is kept: the request is refused for its size anyway.
        if self.list_size > MAX_HEADER_LIST || self.malformed {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            let repeated = match pseudo {
                _ if self.regular => true,
                b"path" => {
                    let rls = value == SHOULD_RATE_LIMIT.as_bytes();
                    self.path.replace(rls).is_some() || value.is_empty()
                }
                b"method" => std::mem::replace(&mut self.method, true),
                b"scheme" => std::mem::replace(&mut self.scheme, true),
                b"authority" => false,
                _ => true,
            };
            self.malformed = repeated;
            self.keep(name, value);
            return;
        }
        self.regular = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            self.malformed = true;
            return;
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => self.malformed = true,
            b"te" => self.malformed = value != b"trailers",
            b"grpc-encoding" => {
                self.encoding = Some(self.spans.len());
                self.keep(name, value);
                return;
            }
            b"content-length" => {
                let n = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                match (n, self.content_length) {
                    (Some(n), None) => self.content_length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => self.malformed = true,
                }
            }
            _ => {}
        }
        if self.path != Some(true) {
            self.keep(name, value);
        }
    }

    fn keep(&mut self, name: &[u8], value: &[u8]) {
        let at = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
        self.spans.push([at, name.len() as u32, value.len() as u32]);
    }

    fn field(&self, &[at, name, value]: &[u32; 3]) -> (&[u8], &[u8]) {
        let (at, name, value) = (at as usize, name as usize, value as usize);
        let field = self.bytes.get(at..at + name + value).unwrap_or_default();
        field.split_at(name.min(field.len()))
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|span| self.field(span))
    }

    /// What a decision needs, if the request is well formed (RFC 9113 8.2, 8.3). `Err` means
    /// malformed: the stream is reset with PROTOCOL_ERROR.
    fn request(&self) -> Result<RequestHead<'_>, ()> {
        match (self.malformed, self.path, self.method, self.scheme) {
            (false, Some(rls), true, true) => Ok(RequestHead {
                rls,
                encoding: self
                    .encoding
                    .and_then(|i| self.spans.get(i))
                    .map(|span| self.field(span).1),
                content_length: self.content_length,
            }),
            _ => Err(()),
        }
    }

    /// The request as tonic's router takes it. `Err` when a field is not a valid HTTP field.
    fn http_request(&self) -> Result<Request<()>, ()> {
        let mut builder = Request::builder().version(http::Version::HTTP_2);
        let (mut scheme, mut authority, mut path) = (None, None, None);
        for (name, value) in self.iter() {
            match name {
                b":method" => {
                    builder = builder.method(http::Method::from_bytes(value).map_err(|_| ())?)
                }
                b":scheme" => scheme = Some(value),
                b":authority" => authority = Some(value),
                b":path" => path = Some(value),
                _ => {
                    let name = http::HeaderName::from_bytes(name).map_err(|_| ())?;
                    let value = http::HeaderValue::from_bytes(value).map_err(|_| ())?;
                    builder = builder.header(name, value);
                }
            }
        }
        let mut uri = http::Uri::builder().path_and_query(path.ok_or(())?);
        if let (Some(scheme), Some(authority)) = (scheme, authority) {
            uri = uri.scheme(scheme).authority(authority);
        }
        builder
            .uri(uri.build().map_err(|_| ())?)
            .body(())
            .map_err(|_| ())
    }
}
