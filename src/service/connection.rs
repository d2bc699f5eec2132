//! One decision-listener connection, served on the `h2` crate directly.
//!
//! Why not hyper: hyper spawns a task per stream, wraps every body, and checks and strips
//! connection headers on every response; callgrind put that at about a sixth of the server's
//! instructions per call, more than the decision itself. Here `ShouldRateLimit` calls run
//! inside the connection's own task (a [`FuturesUnordered`] polled beside the connection, so a
//! call that waits on Redis does not hold up the others), and their unary responses go to h2 as
//! one HEADERS, one DATA and one trailers frame.
//!
//! Every other path (health, reflection) is handed to tonic's router in a task of its own, with
//! the request body and the response body piped through h2's flow control as hyper would.
//!
//! Graceful shutdown: when `stop` fires, the connection sends GOAWAY, keeps serving the calls
//! already open, and returns once they are done (the caller bounds that by its grace period).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt as _;

use crate::service::endpoint::{RlsEndpoint, SHOULD_RATE_LIMIT, Unary};
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
    // As tonic and the hyper server before: no limit on concurrent streams, h2's windows.
    let mut conn = h2::server::Builder::new().handshake::<_, Bytes>(io).await?;
    let mut calls = FuturesUnordered::new();
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    loop {
        tokio::select! {
            // Answers first: their frames are flushed by the next poll of the connection.
            biased;
            Some(()) = calls.next(), if !calls.is_empty() => {}
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    if request.uri().path() == SHOULD_RATE_LIMIT {
                        calls.push(Box::pin(should_rate_limit(endpoint.clone(), request, respond)));
                    } else {
                        tokio::spawn(route(routes.clone(), request, respond));
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            () = &mut stop, if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
        }
    }
}

/// One `ShouldRateLimit` call: the endpoint's answer, sent as h2 frames.
async fn should_rate_limit<S: Store>(
    endpoint: Arc<RlsEndpoint<S>>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let response = endpoint.handle(request.map(RequestBody)).await;
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
    let request = request.map(|b| tonic::body::Body::new(RequestBody(b)));
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
                // The service failed mid-body: end the call with its status, as tonic does.
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

/// An h2 request body as an [`http_body::Body`]: data is released back to the peer's flow
/// control window as soon as it is handed on.
pub struct RequestBody(RecvStream);

impl Body for RequestBody {
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

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestBody")
    }
}
