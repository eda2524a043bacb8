//! The WebSocket transport under a Session: frames decoded from the request body, and an
//! outbound queue the response body drains. Framing is actix-http's codec; this module only
//! connects it to an actor, in the one way that lets the session see its own write backlog.
//!
//! Why not `actix-web-actors`: its context runs the actor *inside* the response body, which the
//! HTTP dispatcher stops polling while the socket cannot take more bytes. A device that stops
//! reading froze its session — heartbeat included — while pushes piled up in the mailbox without
//! bound. Here the actor runs on its own; it writes into an [`Outbox`] whose size it can read,
//! and the response body drains the outbox as fast as the socket takes bytes. A session whose
//! outbox would pass its limit is closed with 4008 (API.md) instead of growing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{Codec, Frame, Message, ProtocolError};
use actix_web::error::PayloadError;
use actix_web::web::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::Sleep;

/// Bytes encoded per poll of the response body: the dispatcher holds at most about this much on
/// top of its own write buffer, so the outbox's count stays close to the truth.
const BODY_CHUNK: usize = 16 * 1024;

/// Frames written by a session and not yet taken by the socket.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Message>,
    /// Payload bytes in `queue`.
    bytes: usize,
    /// A close frame is queued (nothing is queued after it) or the session is gone: the body
    /// ends once the queue is empty.
    finished: bool,
    /// The response body, waiting for frames.
    waker: Option<Waker>,
}

/// The outbox shared by a session (writer) and its response body (reader). Both live on the
/// same worker thread, so an `Rc` suffices.
#[derive(Clone, Default)]
pub struct SharedOutbox(Rc<RefCell<Outbox>>);

impl SharedOutbox {
    /// Queues a frame (unless the outbox is finished) and wakes the body.
    pub fn push(&self, msg: Message) {
        let mut out = self.0.borrow_mut();
        if out.finished {
            return;
        }
        out.bytes += weight(&msg);
        if matches!(msg, Message::Close(_)) {
            out.finished = true;
        }
        out.queue.push_back(msg);
        if let Some(w) = out.waker.take() {
            w.wake();
        }
    }

    /// Payload bytes and frames waiting for the socket.
    pub fn backlog(&self) -> (usize, usize) {
        let out = self.0.borrow();
        (out.bytes, out.queue.len())
    }

    /// Drops every frame not yet taken by the socket (a session closed for being too slow
    /// frees its backlog at once; the notifications in it stay pending in the database).
    pub fn discard(&self) {
        let mut out = self.0.borrow_mut();
        out.queue.clear();
        out.bytes = 0;
    }

    /// No more frames: the body ends once what is queued is written.
    pub fn finish(&self) {
        let mut out = self.0.borrow_mut();
        out.finished = true;
        if let Some(w) = out.waker.take() {
            w.wake();
        }
    }

    /// The response body that writes this outbox to the socket.
    pub fn body(&self) -> OutboundBody {
        OutboundBody {
            outbox: self.clone(),
            codec: Codec::new(),
            buf: BytesMut::new(),
        }
    }
}

/// What a queued frame counts for against the byte limit.
fn weight(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        _ => 0,
    }
}

/// The response body of a WebSocket: encodes the outbox's frames as the socket takes them.
pub struct OutboundBody {
    outbox: SharedOutbox,
    codec: Codec,
    buf: BytesMut,
}

impl Stream for OutboundBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut out = this.outbox.0.borrow_mut();
        while this.buf.len() < BODY_CHUNK {
            let Some(msg) = out.queue.pop_front() else {
                break;
            };
            out.bytes -= weight(&msg);
            if let Err(e) = this.codec.encode(msg, &mut this.buf) {
                return Poll::Ready(Some(Err(e.into())));
            }
        }
        if !this.buf.is_empty() {
            return Poll::Ready(Some(Ok(this.buf.split().freeze())));
        }
        if out.finished {
            return Poll::Ready(None);
        }
        out.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Frames decoded from the upgraded request's body, at most `per_second` of them per second
/// (bursts of ten seconds' worth): past that the stream waits, so the socket is not read and
/// TCP pushes back on a flooding device.
pub struct FrameStream<S> {
    payload: S,
    codec: Codec,
    buf: BytesMut,
    ended: bool,
    per_second: f64,
    tokens: f64,
    tokens_at: Instant,
    pause: Option<Pin<Box<Sleep>>>,
}

impl<S> FrameStream<S> {
    /// Frames larger than `max_frame_bytes` are a `ProtocolError::Overflow`; `per_second` 0
    /// means no rate limit.
    pub fn new(payload: S, max_frame_bytes: usize, per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        FrameStream {
            payload,
            codec: Codec::new().max_size(max_frame_bytes),
            buf: BytesMut::new(),
            ended: false,
            per_second,
            tokens: per_second * BURST_SECONDS,
            tokens_at: Instant::now(),
            pause: None,
        }
    }

    /// Ready when a frame may be taken (and takes its token); pending while paused.
    fn poll_allowance(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.per_second <= 0.0 {
            return Poll::Ready(());
        }
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            let now = Instant::now();
            let refill = now.duration_since(self.tokens_at).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + refill).min(self.per_second * BURST_SECONDS);
            self.tokens_at = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return Poll::Ready(());
            }
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / self.per_second);
            self.pause = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }
}

/// Seconds of frames a device may send at once before the rate limit applies.
const BURST_SECONDS: f64 = 10.0;

impl<S> Stream for FrameStream<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Frame, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        ready!(this.poll_allowance(cx));
        // The token is taken; give it back if no frame comes out of this poll.
        let frame = this.next_frame(cx);
        if !matches!(frame, Poll::Ready(Some(_))) && this.per_second > 0.0 {
            this.tokens += 1.0;
        }
        frame
    }
}

impl<S> FrameStream<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, ProtocolError>>> {
        let this = self;
        if let Some(frame) = this.codec.decode(&mut this.buf)? {
            return Poll::Ready(Some(Ok(frame)));
        }
        while !this.ended {
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.buf.extend_from_slice(&chunk);
                    if let Some(frame) = this.codec.decode(&mut this.buf)? {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(std::io::Error::other(
                        e.to_string(),
                    )))));
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(None)
    }
}
