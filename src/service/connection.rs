//! One decision-listener connection, served on the `h2` crate directly: `--http2 h2`, the
//! fallback to sluice's own HTTP/2 ([`crate::service::http2`], the default), kept for one
//! release in case a client meets a difference between the two.
//!
//! Why not hyper: hyper spawns a task per stream, wraps every body, and checks and strips
//! connection headers on every response; callgrind put that at about a seventh of the server's
//! instructions per call (45,876 -> 40,084), more than the decision itself. Here
//! `ShouldRateLimit` calls are answered inside the connection's own task. The connection reads
//! every frame it has before it hands over new streams, so a call's one message has usually
//! arrived with its headers: with the memory store (which never waits) it is decided and
//! answered on the spot, with no future or task of its own (another -7%: 40,084 -> 37,237). A
//! call whose body is still arriving, or that must wait on Redis, becomes a future in a
//! [`FuturesUnordered`] polled beside the connection: woken on its own, so it holds up no other
//! call, and many slow calls cost nothing on frames that are not theirs. Unary responses go to
//! h2 as one HEADERS, one DATA and one trailers frame. The streams that are ready are taken
//! (up to 64, `ACCEPT_BATCH`) before any is answered, so the answers of a batch leave in one
//! write (answered one by one, each went out in a system call of its own).
//!
//! Every other path (health, reflection) is handed to tonic's router in a task of its own, with
//! the request body and the response body piped through h2's flow control as hyper would.
//!
//! Graceful shutdown: when `stop` fires, the connection sends GOAWAY, keeps serving the calls
//! already open, and returns once they are done (the caller bounds that by its grace period).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt as _;

use crate::limiter::{Rules, RulesCache};
use crate::service::endpoint::{
    BodyBuf, RlsEndpoint, SHOULD_RATE_LIMIT, Unary, check_headers, unreadable,
};
use crate::store::Store;

/// Serves one HTTP/2 connection until the peer closes it, or `stop` resolves and the calls open
/// by then are answered.
pub async fn serve<S, T>(
    io: T,
    endpoint: Arc<RlsEndpoint<S>>,
    routes: tonic::service::Routes,
    stop: impl Future<Output = ()>,
) -> Result<(), h2::Error>
where
    S: Store,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = h2::server::Builder::new()
        // hyper's server defaults, which this listener had before: 1 MiB windows, a 16 KiB
        // bound on a request's headers. No limit on concurrent streams, as tonic.
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_header_list_size(16 * 1024)
        .handshake::<_, Bytes>(io)
        .await?;
    // Calls still waiting for the rest of their body or for the store (Redis). Each is a
    // future woken on its own, so a connection with many slow calls costs nothing per frame
    // for the calls that frame is not for.
    let mut waiting: FuturesUnordered<Later> = FuturesUnordered::new();
    let mut answerer = Answerer {
        endpoint: &endpoint,
        rules: endpoint.rules_cache(),
        routes: &routes,
    };
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.graceful_shutdown();
        }
        loop {
            // Every `poll_accept` first reads every frame there is and flushes every frame
            // queued since the last one; then it hands over one stream. So the ready streams
            // are taken, up to ACCEPT_BATCH, before any is answered: answered one by one
            // between accepts, each answer went out in a write of its own (strace: one
            // `writev` per ~2 calls), and this way the next `poll_accept` writes a batch of
            // answers at once. A batch of up to 16 streams is held inline; a larger one spills
            // to the heap once (one allocation for 17 calls or more) and gives the memory back
            // when answered, so an idle connection holds nothing for the burst it once had.
            let mut accepted: SmallVec<[(Request<RecvStream>, SendResponse<Bytes>); 16]> =
                SmallVec::new();
            while accepted.len() < ACCEPT_BATCH {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok(stream))) => accepted.push(stream),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            let mut progress = !accepted.is_empty();
            if progress {
                // The batch's calls were all taken off the connection now: one clock reading
                // for them, and each call's latency includes its wait behind the others.
                let taken = Instant::now();
                for (request, respond) in accepted {
                    start_call(request, respond, taken, cx, &mut answerer, &mut waiting);
                }
            }
            while let Poll::Ready(Some(())) = waiting.poll_next_unpin(cx) {
                progress = true;
            }
            // Answers queued above are written by the next `poll_accept`; when nothing
            // happened, the last one has written them and registered for more.
            if !progress {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// What a connection answers its calls with.
struct Answerer<'a, S> {
    endpoint: &'a Arc<RlsEndpoint<S>>,
    /// The connection's view of the rules in force.
    rules: RulesCache<'a>,
    /// Every other service of the listener (health, reflection).
    routes: &'a tonic::service::Routes,
}

/// Starts one call taken off the connection at `taken`: a `ShouldRateLimit` call is answered
/// at once when its body is whole and the store decides at once, else it joins `waiting`; any
/// other path goes to tonic's router in a task of its own.
fn start_call<S: Store>(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    taken: Instant,
    cx: &mut Context<'_>,
    answerer: &mut Answerer<'_, S>,
    waiting: &mut FuturesUnordered<Later>,
) {
    let Answerer {
        endpoint,
        rules,
        routes,
    } = answerer;
    if request.uri().path() != SHOULD_RATE_LIMIT {
        tokio::spawn(route(routes.clone(), request, respond));
        return;
    }
    let (parts, body) = request.into_parts();
    if let Err(status) = check_headers(&parts.headers) {
        send(respond, status.into_http());
        return;
    }
    let mut call = Call {
        start: taken,
        body,
        buf: BodyBuf::default(),
        respond,
    };
    // The connection has read every frame it has before handing over a stream, so the one
    // message has usually arrived with the headers: then the call is answered here and now,
    // with no future of its own.
    match call.poll_body(cx) {
        Poll::Ready(Ok(())) => match call.answer_now(endpoint, rules.load()) {
            Ok(()) => {}
            Err(later) => waiting.push(later),
        },
        Poll::Ready(Err(status)) => send(call.respond, status.into_http()),
        Poll::Pending => waiting.push(Box::pin(call.finish(endpoint.clone()))),
    }
}

/// Most streams taken before they are answered: bounds how long the first of a flood of calls
/// waits for its answer to be written, and the memory of the list. 64 rather than a client's
/// whole window (256 at first): with hundreds of calls in flight, the first 64 answers leave
/// while the next 64 are decided, so the client reads them and sends more in the meantime,
/// where a batch of the whole window made client and server wait for each other in turn.
/// Measured in BENCHMARKS.md (sixth pass): h2load +13% with 2 workers, sluice-load at 512 in
/// flight +11–31%; still one `writev` per ~64 answers.
const ACCEPT_BATCH: usize = 64;

/// What a call still to be answered does: one boxed future per call that has to wait.
type Later = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A `ShouldRateLimit` call whose request body is arriving.
struct Call {
    start: Instant,
    body: RecvStream,
    buf: BodyBuf,
    respond: SendResponse<Bytes>,
}

impl Call {
    /// Takes what has arrived of the body: ready once it is whole, or refused.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        loop {
            match ready!(self.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone, when there is nothing to return.
                    let _ = self.body.flow_control().release_capacity(data.len());
                    self.buf.push(data)?;
                }
                Some(Err(e)) => return Poll::Ready(Err(unreadable(e))),
                // The data has ended (request trailers, if any, carry nothing we use).
                None => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Answers a call whose body is whole, at once if the store decides at once; otherwise
    /// returns the future that waits on the store.
    fn answer_now<S: Store>(
        self,
        endpoint: &Arc<RlsEndpoint<S>>,
        rules: Rules<'_>,
    ) -> Result<(), Later> {
        match endpoint.answer_now(self.buf.finish(), self.start, rules) {
            Ok(response) => {
                send(self.respond, response);
                Ok(())
            }
            Err(body) => {
                let (endpoint, respond, start) = (endpoint.clone(), self.respond, self.start);
                Err(Box::pin(async move {
                    send(respond, endpoint.answer(body, start).await);
                }))
            }
        }
    }

    /// Waits for the rest of the body, then answers.
    async fn finish<S: Store>(mut self, endpoint: Arc<RlsEndpoint<S>>) {
        match poll_fn(|cx| self.poll_body(cx)).await {
            Ok(()) => send(
                self.respond,
                endpoint.answer(self.buf.finish(), self.start).await,
            ),
            Err(status) => send(self.respond, status.into_http()),
        }
    }
}

/// Sends a `ShouldRateLimit` answer; a peer that has gone away gets nothing.
fn send(respond: SendResponse<Bytes>, response: Response<Unary>) {
    if let Err(e) = send_unary(respond, response) {
        tracing::debug!(error = %e, "ShouldRateLimit response not sent");
    }
}

/// Sends a unary response: headers, its one message, `grpc-status: 0` trailers; or, for an
/// error (a trailers-only response), the headers alone, ending the stream.
fn send_unary(
    mut respond: SendResponse<Bytes>,
    response: Response<Unary>,
) -> Result<(), h2::Error> {
    let (parts, body) = response.into_parts();
    let (data, trailers) = body.into_parts();
    let head = Response::from_parts(parts, ());
    if data.is_none() && trailers.is_none() {
        respond.send_response(head, true)?;
        return Ok(());
    }
    let mut stream = respond.send_response(head, false)?;
    if let Some(data) = data {
        stream.send_data(data, trailers.is_none())?;
    }
    if let Some(trailers) = trailers {
        stream.send_trailers(trailers)?;
    }
    Ok(())
}

/// Any other call: tonic's router, with both bodies piped through h2's flow control.
async fn route(
    routes: tonic::service::Routes,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let request = request.map(|b| tonic::body::Body::new(H2Body(b)));
    let response = match routes.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let result = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) if !end => pipe(body, stream).await,
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "response not sent");
    }
}

/// Sends a response body's frames, each DATA frame within the window the peer grants.
async fn pipe(mut body: tonic::body::Body, mut stream: SendStream<Bytes>) -> Result<(), h2::Error> {
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(status) => {
                // The service failed mid-body (tonic's bodies carry errors as trailers, so this
                // is rare): reset the stream, as hyper does.
                tracing::debug!(error = %status, "response body failed");
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return Ok(());
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(granted) => granted?,
                        None => return Ok(()), // the stream was reset
                    };
                    if granted > 0 {
                        stream.send_data(data.split_to(granted.min(data.len())), false)?;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return stream.send_trailers(trailers);
                }
            }
        }
    }
    stream.send_data(Bytes::new(), true)
}

/// A request's h2 body as an [`http_body::Body`]: data is released back to the peer's
/// flow-control window as soon as it is handed on.
struct H2Body(RecvStream);

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.0.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                // Only fails once the stream is gone, when there is no window left to return.
                let _ = self.0.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        match self.0.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H2Body")
    }
}
