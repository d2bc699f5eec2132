//! sluice-load's HTTP/2 client: just enough of RFC 9113 to carry unary gRPC calls of the
//! generated `RateLimitServiceClient`, built on the server's own frame and HPACK code
//! (`sluice::service::http2`).
//!
//! Why not the `h2` crate: the generator shares the benchmark machine's two cores with the
//! server, so what it spends per call is taken from the figures it reports, and h2 was about
//! 45% of it (BENCHMARKS.md, third and fifth passes): a `HeaderMap` and frame structs moved
//! through queues per request, HPACK with Huffman coding both ways, a stream store behind a
//! lock per operation. Here a request's header block is written straight into the connection's
//! output buffer (static-table and literal fields, no Huffman), its one message after it, and
//! a reply's frames are read where they lie in the read buffer.
//!
//! The shape is the one sluice-load had over h2: a [`Connection`] is the `tower::Service` the
//! generated client calls through (each call encodes its request into the shared output from
//! the caller's task), and a [`Driver`] reads and writes the socket; the caller polls the
//! driver in the same task as its calls, after them, so that every request queued in one
//! wake-up leaves in one write. The state they share is behind one `parking_lot::Mutex` per
//! connection (never contended: one thread runs a connection and its calls), because tonic
//! wants response bodies that are `Send`.
//!
//! Handled: the preface and SETTINGS both ways (the server's INITIAL_WINDOW_SIZE,
//! MAX_FRAME_SIZE and MAX_CONCURRENT_STREAMS applied; calls beyond the stream limit wait for a
//! stream to close; no stream is opened before the server's SETTINGS); flow control both ways
//! (a request body the server's windows cannot take waits for WINDOW_UPDATE; the server's DATA
//! is given back by WINDOW_UPDATE as the calls consume it); CONTINUATION and padding; PING;
//! GOAWAY (calls above its last stream fail, no stream is opened after it); RST_STREAM (that
//! call fails); informational (1xx) responses skipped; trailers. A protocol error of the server
//! is answered with GOAWAY and, like an I/O error or the server closing the connection, fails
//! every call not yet answered. Not handled: server push (disabled by our SETTINGS, so a
//! PUSH_PROMISE is a protocol error), priorities (ignored), the dynamic table for our own
//! header blocks (literals only), retrying refused streams (they fail).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body, Frame};
use parking_lot::Mutex;
use sluice::service::http2::frame::{self, Head, Reason, flag, kind, setting};
use sluice::service::http2::hpack;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Our receive window per stream (SETTINGS_INITIAL_WINDOW_SIZE) and for the connection:
/// hyper's client defaults, as sluice-load used with h2.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// Largest frame we take (SETTINGS_MAX_FRAME_SIZE: the default, which we do not change).
const MAX_FRAME: usize = 16_384;
/// Our HPACK decoder's table (SETTINGS_HEADER_TABLE_SIZE: the default).
const HEADER_TABLE: usize = 4096;
/// Largest header block (HEADERS and CONTINUATION together) and decoded header list taken
/// from the server; a larger block is a connection error, a larger list a malformed response.
const MAX_BLOCK: usize = 256 * 1024;
const MAX_HEADER_LIST: usize = 256 * 1024;
/// Read buffer: several frames of the largest size.
const READ_BUF: usize = 64 * 1024;
/// The stream window the server starts with until its SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;
/// Response header names and values kept for reuse (an `HeaderName` or `HeaderValue` made
/// from bytes allocates; the server sends the same few on every call).
const FIELD_CACHE: usize = 32;
const FIELD_CACHE_VALUE_LEN: usize = 64;

/// Why a call failed. Cheap to clone: a connection error is handed to every call it fails.
#[derive(Debug, Clone)]
pub struct ClientError(Arc<str>);

impl ClientError {
    fn new(what: impl Into<String>) -> Self {
        Self(Arc::from(what.into()))
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

/// A connection error of the server's making: answered with GOAWAY and `reason`.
#[derive(Debug)]
struct Violation {
    reason: Reason,
    detail: &'static str,
}

fn violation(reason: Reason, detail: &'static str) -> Violation {
    Violation { reason, detail }
}

/// Opens HTTP/2 on `io` (prior knowledge): the service calls go through, and the driver to
/// poll beside them.
pub fn handshake(io: TcpStream) -> (Connection, Driver) {
    let shared = Arc::new(Mutex::new(Inner::new()));
    (
        Connection {
            shared: shared.clone(),
        },
        Driver {
            io,
            shared,
            rbuf: vec![0; READ_BUF],
            start: 0,
            end: 0,
            done: false,
        },
    )
}

/// The `tower::Service` the generated client calls through. Cloned into every call loop.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Mutex<Inner>>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<ResponseBody>;
    type Error = ClientError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        // A call on a failed connection fails when it is sent.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> ResponseFuture {
        let (parts, body) = request.into_parts();
        ResponseFuture {
            shared: self.shared.clone(),
            state: CallState::Collect {
                parts,
                body,
                data: Bytes::new(),
            },
        }
    }
}

/// A call until its response headers arrive.
pub struct ResponseFuture {
    shared: Arc<Mutex<Inner>>,
    state: CallState,
}

// One per call, made in place inside tonic's call future: boxing `Collect` would allocate
// for every call to save the copies of a few hundred bytes that never happen.
#[allow(clippy::large_enum_variant)]
enum CallState {
    /// Taking the request's message from tonic's body (ready at once for a unary call).
    Collect {
        parts: http::request::Parts,
        body: tonic::body::Body,
        /// The message so far (one chunk, for a unary call: kept, not copied).
        data: Bytes,
    },
    /// Sent, or waiting for a stream: slot `0` of the connection's calls.
    Sent(u32),
    Done,
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                CallState::Collect { body, data, .. } => match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // A unary request has no trailers; any would be dropped.
                        if let Ok(chunk) = frame.into_data() {
                            if data.is_empty() {
                                *data = chunk;
                            } else {
                                let mut joined = BytesMut::with_capacity(data.len() + chunk.len());
                                joined.extend_from_slice(data);
                                joined.extend_from_slice(&chunk);
                                *data = joined.freeze();
                            }
                        }
                    }
                    Poll::Ready(Some(Err(status))) => {
                        this.state = CallState::Done;
                        return Poll::Ready(Err(ClientError::new(format!(
                            "request body failed: {status}"
                        ))));
                    }
                    Poll::Ready(None) => {
                        let CallState::Collect { parts, data, .. } =
                            std::mem::replace(&mut this.state, CallState::Done)
                        else {
                            unreachable!("state checked above");
                        };
                        let mut inner = this.shared.lock();
                        match inner.submit(&parts, data) {
                            Ok(slot) => {
                                inner.nudge();
                                this.state = CallState::Sent(slot);
                            }
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    Poll::Pending => return Poll::Pending,
                },
                CallState::Sent(slot) => {
                    let slot = *slot;
                    let mut inner = this.shared.lock();
                    let call = &mut inner.calls[slot as usize];
                    if let Some((status, headers)) = call.head.take() {
                        this.state = CallState::Done;
                        let mut response = http::Response::new(ResponseBody {
                            shared: this.shared.clone(),
                            slot,
                        });
                        *response.status_mut() = status;
                        *response.version_mut() = http::Version::HTTP_2;
                        *response.headers_mut() = headers;
                        return Poll::Ready(Ok(response));
                    }
                    if let Some(e) = call.error.clone() {
                        this.state = CallState::Done;
                        inner.release(slot);
                        inner.nudge();
                        return Poll::Ready(Err(e));
                    }
                    set_waker(&mut call.waker, cx);
                    return Poll::Pending;
                }
                CallState::Done => {
                    return Poll::Ready(Err(ClientError::new(
                        "response polled after it completed",
                    )));
                }
            }
        }
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if let CallState::Sent(slot) = self.state {
            let mut inner = self.shared.lock();
            inner.release(slot);
            inner.nudge();
        }
    }
}

/// A response's body: its DATA, then its trailers.
pub struct ResponseBody {
    shared: Arc<Mutex<Inner>>,
    slot: u32,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let mut inner = self.shared.lock();
        let call = &mut inner.calls[self.slot as usize];
        if let Some(data) = call.data.pop_front() {
            let n = data.len();
            inner.consumed(self.slot, n);
            inner.nudge();
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(e) = &call.error {
            return Poll::Ready(Some(Err(e.clone())));
        }
        if let Some(trailers) = call.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if call.remote_done {
            return Poll::Ready(None);
        }
        set_waker(&mut call.waker, cx);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let inner = self.shared.lock();
        let call = &inner.calls[self.slot as usize];
        call.remote_done && call.data.is_empty() && call.trailers.is_none() && call.error.is_none()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.release(self.slot);
        inner.nudge();
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Reads and writes the connection's socket. Poll it in the task of its calls, after them (see
/// `beside` in main.rs), and call [`Driver::will_poll`] before polling the calls: their output
/// is then written by the driver's next poll without waking the task again. It completes when
/// the connection has ended (every call not answered by then has failed).
pub struct Driver {
    io: TcpStream,
    shared: Arc<Mutex<Inner>>,
    /// Bytes read and not yet parsed are `rbuf[start..end]`.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    done: bool,
}

impl Driver {
    /// Says the driver is polled after the calls about to be polled, in the same task.
    pub fn will_poll(&self) {
        if !self.done {
            self.shared.lock().will_poll = true;
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Driver {
            io,
            shared,
            rbuf,
            start,
            end,
            done,
        } = &mut *self;
        if *done {
            return Poll::Ready(());
        }
        let mut inner = shared.lock();
        inner.will_poll = false;
        set_waker(&mut inner.driver, cx);
        loop {
            // Write what there is; a full socket keeps the rest for the next wake-up.
            if let Err(e) = inner.write(io, cx) {
                inner.fail_all(ClientError::new(format!("HTTP/2 connection: write: {e}")));
                *done = true;
                return Poll::Ready(());
            }
            if inner.error.is_some() {
                // A connection error: its GOAWAY, if any, is written or left; the end.
                let _ = Pin::new(&mut *io).poll_shutdown(cx);
                *done = true;
                return Poll::Ready(());
            }
            if inner.goaway.is_some() && inner.active == 0 && inner.out.is_empty() {
                let e = inner.after_goaway();
                inner.fail_all(e);
                continue;
            }
            if *start == *end {
                (*start, *end) = (0, 0);
            } else if rbuf.len() - *end < MAX_FRAME + frame::HEAD_LEN {
                rbuf.copy_within(*start..*end, 0);
                (*start, *end) = (0, *end - *start);
            }
            let mut read = ReadBuf::new(&mut rbuf[*end..]);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        inner.fail_all(ClientError::new("HTTP/2 connection: the server closed it"));
                        continue;
                    }
                    *end += n;
                    if let Err(v) = inner.parse(rbuf, start, *end) {
                        inner.protocol_error(v);
                    }
                }
                Poll::Ready(Err(e)) => {
                    inner.fail_all(ClientError::new(format!("HTTP/2 connection: read: {e}")));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if inner.error.is_none() {
            inner.fail_all(ClientError::new("HTTP/2 connection: closed by the client"));
        }
    }
}

/// What the calls and the driver share.
struct Inner {
    /// Output not yet written is `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// A request's header block while it is encoded.
    scratch: Vec<u8>,
    /// Calls, by slot; `free` lists the unused slots.
    calls: Vec<Call>,
    free: Vec<u32>,
    /// Open streams, to their calls' slots.
    streams: HashMap<u32, u32, BuildHasherDefault<frame::StreamIdHasher>>,
    /// Streams open (counted against the server's MAX_CONCURRENT_STREAMS).
    active: usize,
    /// Calls waiting for a stream, in order.
    waiting: VecDeque<u32>,
    /// Open streams whose request body waits for a window.
    blocked: VecDeque<u32>,
    next_stream: u32,
    /// The server's SETTINGS have arrived (no stream is opened before).
    got_settings: bool,
    max_streams: usize,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// What the server lets us send on the connection.
    send_window: i64,
    /// What the server may still send us on the connection.
    recv_window: i64,
    /// Consumed and not yet given back by WINDOW_UPDATE.
    recv_unacked: u32,
    decoder: hpack::Decoder,
    fields: FieldCache,
    /// A header block being received: its stream and whether it ends the stream.
    block: Option<(u32, bool)>,
    block_buf: Vec<u8>,
    /// The last stream of the server's GOAWAY: no stream is opened after it.
    goaway: Option<u32>,
    /// What the GOAWAY said, for the calls it fails.
    goaway_what: String,
    /// The connection has failed: every call fails with this.
    error: Option<ClientError>,
    /// The driver's waker, and whether the driver is polled after the calls now being polled.
    driver: Option<Waker>,
    will_poll: bool,
}

/// A call, from its request to the end of its response body.
#[derive(Default)]
struct Call {
    used: bool,
    /// Its stream, once opened; `open` while the stream is.
    stream: u32,
    open: bool,
    /// In `waiting`, with its header block in `head_block`.
    queued: bool,
    head_block: Vec<u8>,
    /// In `blocked`, with the rest of its request message in `body`.
    blocked: bool,
    body: Bytes,
    /// END_STREAM sent / received.
    local_done: bool,
    remote_done: bool,
    /// The stream's send window as a difference from the server's initial window (WINDOW_UPDATEs
    /// received less DATA sent), so that a new initial window moves it.
    send_window: i64,
    /// What the server may still send on the stream, and what was consumed since our last
    /// WINDOW_UPDATE for it.
    recv_window: i64,
    recv_unacked: u32,
    got_head: bool,
    head: Option<(StatusCode, HeaderMap)>,
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<ClientError>,
    waker: Option<Waker>,
}

impl Call {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn fail(&mut self, e: ClientError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
        self.wake();
    }
}

impl Inner {
    fn new() -> Self {
        let mut out = Vec::with_capacity(16 * 1024);
        out.extend_from_slice(frame::PREFACE);
        frame::put_settings(
            &mut out,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            ],
        );
        frame::put_window_update(&mut out, 0, CONN_WINDOW - DEFAULT_WINDOW as u32);
        Inner {
            out,
            out_pos: 0,
            scratch: Vec::with_capacity(256),
            calls: Vec::new(),
            free: Vec::new(),
            streams: HashMap::default(),
            active: 0,
            waiting: VecDeque::new(),
            blocked: VecDeque::new(),
            next_stream: 1,
            got_settings: false,
            max_streams: usize::MAX,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: 16_384,
            send_window: DEFAULT_WINDOW,
            recv_window: i64::from(CONN_WINDOW),
            recv_unacked: 0,
            decoder: hpack::Decoder::new(HEADER_TABLE),
            fields: FieldCache::default(),
            block: None,
            block_buf: Vec::new(),
            goaway: None,
            goaway_what: String::new(),
            error: None,
            driver: None,
            will_poll: false,
        }
    }

    /// Wakes the driver to write what a call queued, unless it is polled after the calls
    /// anyway.
    fn nudge(&mut self) {
        if !self.will_poll
            && self.out.len() > self.out_pos
            && let Some(w) = &self.driver
        {
            w.wake_by_ref();
        }
    }

    /// Writes the output until done or the socket is full.
    fn write(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> std::io::Result<()> {
        while self.out_pos < self.out.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.out_pos += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }

    /// Why no new call can be sent, if none can.
    fn refusal(&self) -> Option<ClientError> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        if self.goaway.is_some() {
            return Some(self.after_goaway());
        }
        if self.next_stream > frame::STREAM_MASK {
            return Some(ClientError::new(
                "HTTP/2 connection: its stream identifiers are used up",
            ));
        }
        None
    }

    fn after_goaway(&self) -> ClientError {
        ClientError::new(format!(
            "HTTP/2 connection: {}; no new calls on it",
            self.goaway_what
        ))
    }

    fn can_open(&self) -> bool {
        self.got_settings
            && self.active < self.max_streams
            && self.error.is_none()
            && self.goaway.is_none()
            && self.next_stream <= frame::STREAM_MASK
    }

    fn alloc(&mut self) -> u32 {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.calls.push(Call::default());
                (self.calls.len() - 1) as u32
            }
        };
        self.calls[slot as usize].used = true;
        slot
    }

    /// Sends a request, or queues it for a stream; its slot.
    fn submit(&mut self, parts: &http::request::Parts, body: Bytes) -> Result<u32, ClientError> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let mut block = std::mem::take(&mut self.scratch);
        block.clear();
        encode_request(parts, &mut block);
        let slot = self.alloc();
        self.calls[slot as usize].body = body;
        if self.waiting.is_empty() && self.can_open() {
            self.open(slot, &block);
        } else {
            let call = &mut self.calls[slot as usize];
            call.head_block.clear();
            call.head_block.extend_from_slice(&block);
            call.queued = true;
            self.waiting.push_back(slot);
        }
        self.scratch = block;
        Ok(slot)
    }

    /// Opens a stream for the call in `slot`: its HEADERS, then as much of its message as the
    /// windows take.
    fn open(&mut self, slot: u32, block: &[u8]) {
        let id = self.next_stream;
        self.next_stream += 2;
        self.active += 1;
        self.streams.insert(id, slot);
        let call = &mut self.calls[slot as usize];
        call.stream = id;
        call.open = true;
        call.queued = false;
        call.send_window = 0;
        call.recv_window = i64::from(STREAM_WINDOW);
        let end = call.body.is_empty();
        put_headers(&mut self.out, id, block, end, self.peer_max_frame);
        if end {
            call.local_done = true;
        } else {
            self.send_body(slot);
        }
    }

    /// Opens streams for waiting calls while the server's limit allows.
    fn open_waiting(&mut self) {
        while self.can_open() {
            let Some(slot) = self.waiting.pop_front() else {
                return;
            };
            let block = std::mem::take(&mut self.calls[slot as usize].head_block);
            self.open(slot, &block);
            let call = &mut self.calls[slot as usize];
            call.head_block = block;
            call.head_block.clear();
        }
        if self.next_stream > frame::STREAM_MASK {
            let e = ClientError::new("HTTP/2 connection: its stream identifiers are used up");
            while let Some(slot) = self.waiting.pop_front() {
                let call = &mut self.calls[slot as usize];
                call.queued = false;
                call.fail(e.clone());
            }
        }
    }

    /// Sends what the windows allow of a call's request message; true once all of it is sent.
    fn send_body(&mut self, slot: u32) -> bool {
        let call = &mut self.calls[slot as usize];
        while !call.local_done {
            let room = self
                .send_window
                .min(self.peer_initial_window + call.send_window)
                .max(0) as usize;
            let len = call.body.len().min(room).min(self.peer_max_frame);
            let last = len == call.body.len();
            if len == 0 && !last {
                break;
            }
            let flags = if last { flag::END_STREAM } else { 0 };
            frame::put_head(&mut self.out, len, kind::DATA, flags, call.stream);
            self.out.extend_from_slice(&call.body[..len]);
            call.body.advance(len);
            self.send_window -= len as i64;
            call.send_window -= len as i64;
            call.local_done = last;
        }
        if !call.local_done && !call.blocked {
            call.blocked = true;
            self.blocked.push_back(slot);
        }
        call.local_done
    }

    /// Sends what the windows now allow of the blocked request messages.
    fn flush_blocked(&mut self) {
        let mut i = 0;
        while i < self.blocked.len() && self.send_window > 0 {
            let slot = self.blocked[i];
            if self.send_body(slot) {
                self.calls[slot as usize].blocked = false;
                self.blocked.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Forgets a call's stream (closed, reset, or failed) and opens waiting ones in its place.
    fn close(&mut self, slot: u32) {
        let call = &mut self.calls[slot as usize];
        if !call.open {
            return;
        }
        call.open = false;
        self.streams.remove(&call.stream);
        self.active -= 1;
        if call.blocked {
            call.blocked = false;
            call.body = Bytes::new();
            self.blocked.retain(|&s| s != slot);
        }
        self.open_waiting();
    }

    /// The server ended a call's stream.
    fn remote_end(&mut self, slot: u32) {
        let call = &mut self.calls[slot as usize];
        call.remote_done = true;
        call.wake();
        if !call.local_done {
            // The answer came before all of the request: the rest is not needed.
            frame::put_reset(&mut self.out, call.stream, Reason::CANCEL);
        }
        self.close(slot);
    }

    /// A stream error: RST_STREAM with `reason`, and the call fails.
    fn stream_error(&mut self, slot: u32, reason: Reason, what: &str) {
        let call = &mut self.calls[slot as usize];
        frame::put_reset(&mut self.out, call.stream, reason);
        call.fail(ClientError::new(format!(
            "HTTP/2 stream {}: {what} (reset with {reason})",
            call.stream
        )));
        self.close(slot);
    }

    /// A connection error of the server's: GOAWAY, and every call not yet answered fails.
    fn protocol_error(&mut self, v: Violation) {
        frame::put_goaway(&mut self.out, 0, v.reason, v.detail.as_bytes());
        self.fail_all(ClientError::new(format!(
            "HTTP/2 protocol error by the server: {}: {}",
            v.reason, v.detail
        )));
    }

    /// The connection has ended: every call not yet answered fails with `e`, and so do new
    /// ones.
    fn fail_all(&mut self, e: ClientError) {
        if self.error.is_none() {
            self.error = Some(e.clone());
        }
        for call in &mut self.calls {
            if call.used && !call.remote_done {
                call.fail(e.clone());
            }
            call.open = false;
            call.queued = false;
            call.blocked = false;
        }
        self.streams.clear();
        self.active = 0;
        self.waiting.clear();
        self.blocked.clear();
    }

    /// A call's handle is gone (its response body was dropped, or its response future before
    /// it completed): its stream is reset if still open, and its slot freed.
    fn release(&mut self, slot: u32) {
        let Some(call) = self.calls.get_mut(slot as usize) else {
            return;
        };
        if !call.used {
            return;
        }
        if call.open {
            frame::put_reset(&mut self.out, call.stream, Reason::CANCEL);
            self.close(slot);
        }
        let call = &mut self.calls[slot as usize];
        if call.queued {
            call.queued = false;
            self.waiting.retain(|&s| s != slot);
        }
        let call = &mut self.calls[slot as usize];
        let unread: usize = call.data.iter().map(Bytes::len).sum();
        let mut data = std::mem::take(&mut call.data);
        data.clear();
        let mut head_block = std::mem::take(&mut call.head_block);
        head_block.clear();
        *call = Call {
            data,
            head_block,
            ..Call::default()
        };
        self.free.push(slot);
        self.credit_connection(unread);
    }

    /// `n` bytes of a call's DATA were consumed: their windows go back to the server.
    fn consumed(&mut self, slot: u32, n: usize) {
        self.credit_connection(n);
        let call = &mut self.calls[slot as usize];
        call.recv_unacked = call.recv_unacked.saturating_add(n as u32);
        if call.open && !call.remote_done && call.recv_unacked >= STREAM_WINDOW / 2 {
            frame::put_window_update(&mut self.out, call.stream, call.recv_unacked);
            call.recv_window += i64::from(call.recv_unacked);
            call.recv_unacked = 0;
        }
    }

    /// `n` bytes of received DATA are done with: they go back to the connection's window.
    fn credit_connection(&mut self, n: usize) {
        if n == 0 || self.error.is_some() {
            return;
        }
        self.recv_unacked = self.recv_unacked.saturating_add(n as u32);
        if self.recv_unacked >= CONN_WINDOW / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unacked);
            self.recv_window += i64::from(self.recv_unacked);
            self.recv_unacked = 0;
        }
    }

    /// Handles every whole frame in `rbuf[*start..end]`.
    fn parse(&mut self, rbuf: &[u8], start: &mut usize, end: usize) -> Result<(), Violation> {
        loop {
            let buf = &rbuf[*start..end];
            let Some(head) = buf.first_chunk::<{ frame::HEAD_LEN }>().map(Head::parse) else {
                return Ok(());
            };
            if head.len > MAX_FRAME {
                return Err(violation(
                    Reason::FRAME_SIZE_ERROR,
                    "frame larger than 16384 bytes",
                ));
            }
            let Some(payload) = buf.get(frame::HEAD_LEN..frame::HEAD_LEN + head.len) else {
                return Ok(());
            };
            self.on_frame(head, payload)?;
            *start += frame::HEAD_LEN + head.len;
            if self.error.is_some() {
                return Ok(());
            }
        }
    }

    fn on_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        if !self.got_settings && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(violation(
                Reason::PROTOCOL_ERROR,
                "the server's first frame is not SETTINGS",
            ));
        }
        if let Some((stream, _)) = self.block
            && (head.kind != kind::CONTINUATION || head.stream != stream)
        {
            return Err(violation(
                Reason::PROTOCOL_ERROR,
                "a header block was interrupted by another frame",
            ));
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload),
            kind::HEADERS => self.on_headers(head, payload),
            kind::CONTINUATION => self.on_continuation(head, payload),
            kind::RST_STREAM => self.on_reset(head, payload),
            kind::SETTINGS => self.on_settings(head, payload),
            kind::PING => self.on_ping(head, payload),
            kind::GOAWAY => self.on_goaway(head, payload),
            kind::WINDOW_UPDATE => self.on_window_update(head, payload),
            kind::PUSH_PROMISE => Err(violation(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE with push disabled",
            )),
            // PRIORITY is advisory; unknown frame types are ignored (RFC 9113 4.1, 5.5).
            _ => Ok(()),
        }
    }

    /// Checks a frame's stream is one we opened (streams of the server's would be pushed, and
    /// push is disabled).
    fn our_stream(&self, id: u32, detail: &'static str) -> Result<(), Violation> {
        if id == 0 || id.is_multiple_of(2) || id >= self.next_stream {
            return Err(violation(Reason::PROTOCOL_ERROR, detail));
        }
        Ok(())
    }

    fn on_data(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        self.our_stream(head.stream, "DATA on a stream the client did not open")?;
        // All of a DATA frame counts against the windows, padding included (RFC 9113 6.9.1).
        let n = payload.len();
        if n as i64 > self.recv_window {
            return Err(violation(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            ));
        }
        self.recv_window -= n as i64;
        let data = frame::data_content(&head, payload).map_err(|(r, d)| violation(r, d))?;
        let Some(&slot) = self.streams.get(&head.stream) else {
            // A stream closed or reset: the frame only gives its window back.
            self.credit_connection(n);
            return Ok(());
        };
        let call = &mut self.calls[slot as usize];
        if !call.got_head {
            self.stream_error(slot, Reason::PROTOCOL_ERROR, "DATA before response headers");
            self.credit_connection(n);
            return Ok(());
        }
        if n as i64 > call.recv_window {
            self.stream_error(
                slot,
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the stream window",
            );
            self.credit_connection(n);
            return Ok(());
        }
        call.recv_window -= n as i64;
        if !data.is_empty() {
            call.data.push_back(Bytes::copy_from_slice(data));
            call.wake();
        }
        // Padding and the pad length are consumed here.
        let overhead = n - data.len();
        if overhead > 0 {
            self.consumed(slot, overhead);
        }
        if head.has(flag::END_STREAM) {
            self.remote_end(slot);
        }
        Ok(())
    }

    fn on_headers(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        self.our_stream(head.stream, "HEADERS on a stream the client did not open")?;
        let fragment = frame::header_fragment(&head, payload).map_err(|(r, d)| violation(r, d))?;
        let end = head.has(flag::END_STREAM);
        if head.has(flag::END_HEADERS) {
            self.on_block(head.stream, end, fragment)
        } else {
            if fragment.len() > MAX_BLOCK {
                return Err(violation(Reason::PROTOCOL_ERROR, "header block too large"));
            }
            self.block = Some((head.stream, end));
            self.block_buf.clear();
            self.block_buf.extend_from_slice(fragment);
            Ok(())
        }
    }

    fn on_continuation(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        let Some((stream, end)) = self.block else {
            return Err(violation(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without a header block",
            ));
        };
        if self.block_buf.len() + payload.len() > MAX_BLOCK {
            return Err(violation(Reason::PROTOCOL_ERROR, "header block too large"));
        }
        self.block_buf.extend_from_slice(payload);
        if !head.has(flag::END_HEADERS) {
            return Ok(());
        }
        self.block = None;
        let block = std::mem::take(&mut self.block_buf);
        let result = self.on_block(stream, end, &block);
        self.block_buf = block;
        result
    }

    /// A whole header block: response headers, or trailers.
    fn on_block(&mut self, stream: u32, end: bool, block: &[u8]) -> Result<(), Violation> {
        // Decoded whatever becomes of the stream: the dynamic table must stay in step.
        let fields = decode_fields(&mut self.decoder, &mut self.fields, block).map_err(|_| {
            violation(
                Reason::COMPRESSION_ERROR,
                "response header block does not decode",
            )
        })?;
        let Some(&slot) = self.streams.get(&stream) else {
            // A stream reset lately.
            return Ok(());
        };
        let call = &mut self.calls[slot as usize];
        if !call.got_head {
            let status = match fields.status {
                Some(status) if !fields.malformed => status,
                _ => {
                    self.stream_error(slot, Reason::PROTOCOL_ERROR, "malformed response headers");
                    return Ok(());
                }
            };
            if status.is_informational() {
                if end {
                    self.stream_error(
                        slot,
                        Reason::PROTOCOL_ERROR,
                        "an informational response ends the stream",
                    );
                }
                // Otherwise skipped: the final response follows.
                return Ok(());
            }
            call.got_head = true;
            call.head = Some((status, fields.headers));
            call.wake();
            if end {
                self.remote_end(slot);
            }
        } else {
            if !end {
                self.stream_error(slot, Reason::PROTOCOL_ERROR, "trailers without END_STREAM");
                return Ok(());
            }
            if fields.status.is_some() || fields.malformed {
                self.stream_error(slot, Reason::PROTOCOL_ERROR, "malformed trailers");
                return Ok(());
            }
            call.trailers = Some(fields.headers);
            self.remote_end(slot);
        }
        Ok(())
    }

    fn on_reset(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        self.our_stream(
            head.stream,
            "RST_STREAM on a stream the client did not open",
        )?;
        let Some(code) = frame::be_u32(payload).filter(|_| payload.len() == 4) else {
            return Err(violation(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM length is not 4",
            ));
        };
        if let Some(&slot) = self.streams.get(&head.stream) {
            let call = &mut self.calls[slot as usize];
            call.fail(ClientError::new(format!(
                "HTTP/2 stream {}: reset by the server with {}",
                head.stream,
                Reason(code)
            )));
            self.close(slot);
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        let settings = frame::settings(&head, payload).map_err(|(r, d)| violation(r, d))?;
        if settings.ack {
            return Ok(());
        }
        if settings.enable_push.is_some_and(|v| v != 0) {
            return Err(violation(
                Reason::PROTOCOL_ERROR,
                "a server's ENABLE_PUSH is not 0",
            ));
        }
        if let Some(value) = settings.max_concurrent_streams {
            self.max_streams = usize::try_from(value).unwrap_or(usize::MAX);
        }
        if let Some(value) = settings.initial_window_size {
            let calls = &self.calls;
            let windows = self
                .streams
                .values()
                .map(|&slot| calls[slot as usize].send_window);
            self.peer_initial_window =
                frame::moved_initial_window(value, windows).map_err(|(r, d)| violation(r, d))?;
        }
        if let Some(value) = settings.max_frame_size {
            self.peer_max_frame = value as usize;
        }
        // HEADER_TABLE_SIZE: our header blocks use no dynamic table.
        frame::put_head(&mut self.out, 0, kind::SETTINGS, flag::ACK, 0);
        self.got_settings = true;
        self.flush_blocked();
        self.open_waiting();
        Ok(())
    }

    fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        frame::check_ping(&head, payload).map_err(|(r, d)| violation(r, d))?;
        if !head.has(flag::ACK) {
            frame::put_head(&mut self.out, 8, kind::PING, flag::ACK, 0);
            self.out.extend_from_slice(payload);
        }
        Ok(())
    }

    fn on_goaway(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        if head.stream != 0 {
            return Err(violation(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
        }
        let (Some(last), Some(code)) = (
            frame::be_u32(payload),
            payload.get(4..).and_then(frame::be_u32),
        ) else {
            return Err(violation(
                Reason::FRAME_SIZE_ERROR,
                "GOAWAY shorter than 8 bytes",
            ));
        };
        let last = last & frame::STREAM_MASK;
        let reason = Reason(code);
        let debug = String::from_utf8_lossy(payload.get(8..).unwrap_or_default());
        let what = if debug.is_empty() {
            format!("the server sent GOAWAY ({reason})")
        } else {
            format!("the server sent GOAWAY ({reason}: {debug})")
        };
        self.goaway = Some(self.goaway.map_or(last, |before| before.min(last)));
        // Streams above `last` were not processed, and waiting calls will get none.
        let gone: Vec<u32> = self
            .streams
            .iter()
            .filter(|&(&id, _)| id > last)
            .map(|(_, &slot)| slot)
            .collect();
        self.goaway_what.clone_from(&what);
        for slot in gone {
            let call = &mut self.calls[slot as usize];
            call.fail(ClientError::new(format!(
                "HTTP/2 stream {}: not processed: {what}",
                call.stream
            )));
            self.close(slot);
        }
        while let Some(slot) = self.waiting.pop_front() {
            let call = &mut self.calls[slot as usize];
            call.queued = false;
            call.fail(ClientError::new(format!(
                "HTTP/2 connection: no stream for the call: {what}"
            )));
        }
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), Violation> {
        let Some(raw) = frame::be_u32(payload).filter(|_| payload.len() == 4) else {
            return Err(violation(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE length is not 4",
            ));
        };
        let increment = i64::from(raw & frame::STREAM_MASK);
        if head.stream == 0 {
            if increment == 0 {
                return Err(violation(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(violation(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window above 2^31-1",
                ));
            }
        } else {
            self.our_stream(
                head.stream,
                "WINDOW_UPDATE on a stream the client did not open",
            )?;
            let Some(&slot) = self.streams.get(&head.stream) else {
                // A closed stream: windows may still arrive for it (RFC 9113 6.9).
                return Ok(());
            };
            if increment == 0 {
                self.stream_error(slot, Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0");
                return Ok(());
            }
            let call = &mut self.calls[slot as usize];
            call.send_window += increment;
            if self.peer_initial_window + call.send_window > frame::MAX_WINDOW {
                self.stream_error(
                    slot,
                    Reason::FLOW_CONTROL_ERROR,
                    "stream window above 2^31-1",
                );
                return Ok(());
            }
        }
        self.flush_blocked();
        Ok(())
    }
}

/// Appends a request's header block: pseudo-header fields from the static table where they
/// are there, the rest as literals without indexing.
fn encode_request(parts: &http::request::Parts, out: &mut Vec<u8>) {
    // Static table indices (RFC 7541 appendix A) as indexed fields.
    match parts.method {
        http::Method::POST => out.push(0x80 | 3),
        http::Method::GET => out.push(0x80 | 2),
        ref m => hpack::encode_literal(b":method", m.as_str().as_bytes(), out),
    }
    match parts.uri.scheme_str() {
        None | Some("http") => out.push(0x80 | 6),
        Some("https") => out.push(0x80 | 7),
        Some(s) => hpack::encode_literal(b":scheme", s.as_bytes(), out),
    }
    if let Some(authority) = parts.uri.authority() {
        hpack::encode_literal(b":authority", authority.as_str().as_bytes(), out);
    }
    match parts.uri.path_and_query().map(|p| p.as_str()) {
        None | Some("" | "/") => out.push(0x80 | 4),
        Some(path) => hpack::encode_literal(b":path", path.as_bytes(), out),
    }
    for (name, value) in &parts.headers {
        // Connection-specific fields have no place in HTTP/2 (RFC 9113 8.2.2); tonic sets
        // none, but a caller's metadata might.
        if is_connection_specific(name, value) {
            continue;
        }
        hpack::encode_literal(name.as_str().as_bytes(), value.as_bytes(), out);
    }
}

fn is_connection_specific(name: &HeaderName, value: &HeaderValue) -> bool {
    use http::header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
    (name == TE && value != "trailers")
        || name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == HOST
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Writes a header block as HEADERS and, beyond the server's frame size, CONTINUATION frames.
fn put_headers(out: &mut Vec<u8>, id: u32, block: &[u8], end_stream: bool, max_frame: usize) {
    let first = block.len().min(max_frame);
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if first == block.len() {
        flags |= flag::END_HEADERS;
    }
    frame::put_head(out, first, kind::HEADERS, flags, id);
    out.extend_from_slice(&block[..first]);
    let mut pos = first;
    while pos < block.len() {
        let len = (block.len() - pos).min(max_frame);
        let flags = if pos + len == block.len() {
            flag::END_HEADERS
        } else {
            0
        };
        frame::put_head(out, len, kind::CONTINUATION, flags, id);
        out.extend_from_slice(&block[pos..pos + len]);
        pos += len;
    }
}

/// A decoded response header block.
struct Fields {
    status: Option<StatusCode>,
    headers: HeaderMap,
    /// A field that HTTP/2 or `http` does not allow (RFC 9113 8.2, 8.3): a malformed response.
    malformed: bool,
}

fn decode_fields(
    decoder: &mut hpack::Decoder,
    cache: &mut FieldCache,
    block: &[u8],
) -> Result<Fields, hpack::HpackError> {
    let mut fields = Fields {
        status: None,
        headers: HeaderMap::new(),
        malformed: false,
    };
    let mut regular = false;
    let mut list_size = 0usize;
    decoder.decode(block, |name, value| {
        list_size += name.len() + value.len() + 32;
        if list_size > MAX_HEADER_LIST || fields.malformed {
            fields.malformed = true;
            return;
        }
        if name.first() == Some(&b':') {
            // Pseudo-header fields come first, and a response has only `:status`.
            if regular || name != b":status" || fields.status.is_some() {
                fields.malformed = true;
                return;
            }
            fields.status = StatusCode::from_bytes(value).ok();
            fields.malformed |= fields.status.is_none();
            return;
        }
        regular = true;
        match (cache.name(name), cache.value(value)) {
            (Some(name), Some(value)) => {
                fields.headers.append(name, value);
            }
            _ => fields.malformed = true,
        }
    })?;
    Ok(fields)
}

/// Header names and values seen before, so that the same fields do not allocate again.
#[derive(Default)]
struct FieldCache {
    names: Vec<HeaderName>,
    values: Vec<HeaderValue>,
}

impl FieldCache {
    fn name(&mut self, bytes: &[u8]) -> Option<HeaderName> {
        if let Some(name) = self.names.iter().find(|n| n.as_str().as_bytes() == bytes) {
            return Some(name.clone());
        }
        // Field names are lowercase in HTTP/2 (RFC 9113 8.2.1); `http` would fold them.
        if bytes.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        let name = HeaderName::from_bytes(bytes).ok()?;
        if self.names.len() < FIELD_CACHE {
            self.names.push(name.clone());
        }
        Some(name)
    }

    fn value(&mut self, bytes: &[u8]) -> Option<HeaderValue> {
        if let Some(value) = self.values.iter().find(|v| v.as_bytes() == bytes) {
            return Some(value.clone());
        }
        let value = HeaderValue::from_bytes(bytes).ok()?;
        if self.values.len() < FIELD_CACHE && bytes.len() <= FIELD_CACHE_VALUE_LEN {
            self.values.push(value.clone());
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_header_block_is_split_into_continuations() {
        let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        put_headers(&mut out, 5, &block, true, 16_384);
        let mut pos = 0;
        let mut got = Vec::new();
        let mut heads = Vec::new();
        while pos < out.len() {
            let head = Head::parse(out[pos..pos + 9].try_into().unwrap());
            got.extend_from_slice(&out[pos + 9..pos + 9 + head.len]);
            pos += 9 + head.len;
            heads.push(head);
        }
        assert_eq!(got, block);
        assert_eq!(heads.len(), 3);
        assert_eq!(heads[0].kind, kind::HEADERS);
        assert_eq!(heads[0].flags, flag::END_STREAM);
        assert_eq!(heads[1].kind, kind::CONTINUATION);
        assert_eq!(heads[1].flags, 0);
        assert_eq!(heads[2].flags, flag::END_HEADERS);
    }

    #[test]
    fn a_request_block_decodes_to_what_tonic_set() {
        let request = http::Request::builder()
            .method("POST")
            .uri(
                "http://127.0.0.1:8081/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            )
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .header("connection", "close")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let mut block = Vec::new();
        encode_request(&parts, &mut block);
        let mut fields = Vec::new();
        hpack::Decoder::new(4096)
            .decode(&block, |n, v| fields.push((n.to_vec(), v.to_vec())))
            .unwrap();
        let want: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"127.0.0.1:8081"),
            (
                b":path",
                b"/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            ),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ];
        let want: Vec<(Vec<u8>, Vec<u8>)> = want
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(fields, want);
    }

    #[test]
    fn response_fields_are_checked() {
        let mut decoder = hpack::Decoder::new(4096);
        let mut cache = FieldCache::default();
        let mut block = Vec::new();
        hpack::encode_literal(b":status", b"200", &mut block);
        hpack::encode_literal(b"content-type", b"application/grpc", &mut block);
        let fields = decode_fields(&mut decoder, &mut cache, &block).unwrap();
        assert_eq!(fields.status, Some(StatusCode::OK));
        assert!(!fields.malformed);
        assert_eq!(fields.headers["content-type"], "application/grpc");

        for bad in [
            &[(&b"content-type"[..], &b"x"[..]), (b":status", b"200")][..],
            &[(b":status", b"2000")],
            &[(b":path", b"/")],
            &[(b"Upper", b"x")],
            &[(b"ok", b"bad\nvalue")],
        ] {
            let mut block = Vec::new();
            for (n, v) in bad {
                hpack::encode_literal(n, v, &mut block);
            }
            let fields = decode_fields(&mut decoder, &mut cache, &block).unwrap();
            assert!(fields.malformed, "{bad:?}");
        }
    }
}
