//! The WebSocket transport under a Session: the upgraded TCP socket itself, read by the session's
//! frame stream and written by a small writer task that drains the session's outbox. Framing is
//! actix-http's codec; this module only connects it to an actor, in the one way that lets the
//! session see its own write backlog.
//!
//! Why the socket is taken from the HTTP dispatcher (`startup`'s upgrade service hands it over
//! after the `101`): actix-http's dispatcher keeps two 8 KiB buffers per connection for as long as
//! it runs, and a WebSocket is a connection that never ends — most of an idle session's memory.
//! Here an idle session holds no buffer at all: the read buffer exists only while a read or a
//! partial frame needs it; the write buffer exists only while frames are waiting for the socket.
//!
//! Why not `actix-web-actors`: its context runs the actor *inside* the response body, which the
//! HTTP dispatcher stops polling while the socket cannot take more bytes. A device that stops
//! reading froze its session — heartbeat included — while pushes piled up in the mailbox without
//! bound. Here the actor runs on its own; it writes into an [`Outbox`] whose size it can read,
//! and the writer drains it as fast as the socket takes bytes. A session whose outbox would pass
//! its limit is closed with 4008 (API.md) instead of growing.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{Codec, Frame, Message, ProtocolError};
use actix_web::rt::net::TcpStream;
use actix_web::web::{Buf, BytesMut};
use futures_util::Stream;
use tokio::io::Interest;
use tokio::time::Sleep;

/// Bytes encoded per write: the writer holds at most about this much beyond the outbox's count,
/// so the count stays close to the truth.
const WRITE_CHUNK: usize = 16 * 1024;
/// Room made in the frame buffer for one read (given back once the buffer is empty again).
const READ_CHUNK: usize = 8 * 1024;
/// How long the frames queued before a close (the close frame last) may take to reach a device
/// that does not read; then the socket is dropped.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Frames written by a session and not yet taken by the socket.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Message>,
    /// Payload bytes in `queue`.
    bytes: usize,
    /// A close frame is queued (nothing is queued after it) or the session is gone: the writer
    /// ends once the queue is empty.
    finished: bool,
    /// The writer, waiting for frames.
    waker: Option<Waker>,
}

impl Outbox {
    /// Drops every queued frame and its memory.
    fn clear(&mut self) {
        self.queue = VecDeque::new();
        self.bytes = 0;
    }
}

/// One upgraded connection: the socket, shared by the session's frame stream (reads) and the
/// writer (writes), and the outbox between the session and the writer. Everything lives on one
/// worker thread, so an `Rc` suffices and tokio's `&self` readiness API serves both directions.
pub struct Conn {
    stream: TcpStream,
    out: RefCell<Outbox>,
    /// The socket failed or was shut down: reads end too.
    broken: Cell<bool>,
}

/// Sockets handed over to sessions whose writer has not finished yet, node-wide, and whether the
/// node is shutting down: a graceful stop refuses new sessions, then waits for the count to reach
/// zero so every device gets its close frame.
#[derive(Clone, Default)]
pub struct OpenSockets(Arc<SocketCount>);

#[derive(Default)]
pub struct SocketCount {
    open: AtomicUsize,
    closing: AtomicBool,
}

impl OpenSockets {
    pub fn get(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// From now on the node takes no new sessions.
    pub fn close(&self) {
        self.0.closing.store(true, Ordering::Release);
    }

    pub fn closing(&self) -> bool {
        self.0.closing.load(Ordering::Acquire)
    }
}

/// Counts one socket for as long as its writer lives.
struct OpenGuard(OpenSockets);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        (self.0).0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Put on a request by the upgrade service: the socket can be handed over after this request.
pub struct UpgradeRequest;

/// Starts a session on a socket, given what the client sent after its handshake.
pub type StartSession = dyn FnOnce(TcpStream, &[u8]);

/// Put on a `101` response by the `/v1/ws` handler: what to run on the socket once the upgrade
/// service has written the `101` (the socket, and what the client sent after its handshake).
pub struct Handover(pub Box<StartSession>);

/// The session's handle on its connection's outbox.
#[derive(Clone)]
pub struct SharedOutbox(Rc<Conn>);

/// Takes over an upgraded socket: `leftover` is what the client sent after its handshake and
/// the HTTP layer had already read. Returns the session's outbox and its frame stream, and spawns
/// the writer on the current thread.
pub fn take_over(
    stream: TcpStream,
    leftover: &[u8],
    max_frame_bytes: usize,
    per_second: u32,
    open: &OpenSockets,
) -> (SharedOutbox, FrameStream) {
    if let Err(e) = stream.set_nodelay(true) {
        log::debug!("cannot set TCP_NODELAY: {e}");
    }
    let conn = Rc::new(Conn {
        stream,
        out: RefCell::new(Outbox::default()),
        broken: Cell::new(false),
    });
    open.0.open.fetch_add(1, Ordering::AcqRel);
    let guard = OpenGuard(open.clone());
    let writer = conn.clone();
    actix_web::rt::spawn(async move {
        let _guard = guard;
        write_loop(&writer).await;
    });
    let frames = FrameStream::new(conn.clone(), leftover, max_frame_bytes, per_second);
    (SharedOutbox(conn), frames)
}

impl SharedOutbox {
    /// Queues a frame (unless the outbox is finished) and wakes the writer.
    pub fn push(&self, msg: Message) {
        let mut out = self.0.out.borrow_mut();
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
        let out = self.0.out.borrow();
        (out.bytes, out.queue.len())
    }

    /// Drops every frame not yet taken by the socket (a session closed for being too slow
    /// frees its backlog at once; the notifications in it stay pending in the database).
    pub fn discard(&self) {
        self.0.out.borrow_mut().clear();
    }

    /// No more frames: the writer ends once what is queued is written.
    pub fn finish(&self) {
        let mut out = self.0.out.borrow_mut();
        out.finished = true;
        if let Some(w) = out.waker.take() {
            w.wake();
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

/// Writes the outbox to the socket until the session finishes it (then shuts the socket's
/// sending side, so the device sees the end after the close frame) or the socket fails (then
/// shuts both sides, so the session's reads end and it cleans up). Once the session has finished,
/// what is left must be written within [`CLOSE_FLUSH_TIMEOUT`], however little the device reads.
async fn write_loop(conn: &Conn) {
    let mut codec = Codec::new();
    // Exists only while there is something to write: an idle session holds no buffer.
    let mut buf = BytesMut::new();
    let mut close_by: Option<Pin<Box<Sleep>>> = None;
    let done = poll_fn(|cx| {
        let mut chunks = 0;
        loop {
            if buf.is_empty() {
                let mut out = conn.out.borrow_mut();
                while buf.len() < WRITE_CHUNK {
                    let Some(msg) = out.queue.pop_front() else {
                        break;
                    };
                    out.bytes -= weight(&msg);
                    if let Err(e) = codec.encode(msg, &mut buf) {
                        log::debug!("cannot encode a frame: {e}");
                    }
                }
                if buf.is_empty() {
                    if out.finished || conn.broken.get() {
                        return Poll::Ready(Ok(()));
                    }
                    buf = BytesMut::new();
                    out.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            if chunks == 4 {
                // Let the thread's other sessions run between large bursts.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if close_by.is_none() && conn.out.borrow().finished {
                close_by = Some(Box::pin(tokio::time::sleep(CLOSE_FLUSH_TIMEOUT)));
            }
            match conn.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => match conn.stream.try_write(&buf) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        buf.advance(n);
                        chunks += 1;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                },
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // The socket is full. Wake up as well when the session finishes (from then
                    // on the close deadline runs).
                    conn.out.borrow_mut().waker = Some(cx.waker().clone());
                    if let Some(t) = close_by.as_mut() {
                        if t.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the device did not read its close frame",
                            )));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await;
    match done {
        // Everything, the close frame last, is written: tell the device we are done sending.
        Ok(()) if !conn.broken.get() => {
            let _ = socket2::SockRef::from(&conn.stream).shutdown(Shutdown::Write);
        }
        Ok(()) => {}
        Err(e) => {
            log::debug!("WebSocket write failed: {e}");
            conn.fail();
        }
    }
}

impl Conn {
    /// The socket is unusable: drop what is queued and make the reading side end as well.
    fn fail(&self) {
        self.broken.set(true);
        {
            let mut out = self.out.borrow_mut();
            out.clear();
            out.finished = true;
        }
        let _ = socket2::SockRef::from(&self.stream).shutdown(Shutdown::Both);
    }
}

/// Frames decoded from the socket, at most `per_second` of them per second (bursts of ten
/// seconds' worth): past that the stream waits, so the socket is not read and TCP pushes back on
/// a flooding device.
pub struct FrameStream {
    conn: Rc<Conn>,
    codec: Codec,
    /// A partial frame (empty, with no allocation, between frames).
    buf: BytesMut,
    ended: bool,
    per_second: f64,
    tokens: f64,
    tokens_at: Instant,
    pause: Option<Pin<Box<Sleep>>>,
}

impl FrameStream {
    /// Frames larger than `max_frame_bytes` are a `ProtocolError::Overflow`; `per_second` 0
    /// means no rate limit.
    fn new(conn: Rc<Conn>, leftover: &[u8], max_frame_bytes: usize, per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        FrameStream {
            conn,
            codec: Codec::new().max_size(max_frame_bytes),
            buf: BytesMut::from(leftover),
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

    /// The next complete frame in the buffer; an emptied buffer gives its memory back.
    fn decode(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let frame = self.codec.decode(&mut self.buf)?;
        self.release_if_empty();
        Ok(frame)
    }

    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, ProtocolError>>> {
        if let Some(frame) = self.decode()? {
            return Poll::Ready(Some(Ok(frame)));
        }
        while !self.ended {
            if self.conn.broken.get() {
                self.ended = true;
                break;
            }
            if let Err(e) = ready!(self.conn.stream.poll_read_ready(cx)) {
                self.ended = true;
                return Poll::Ready(Some(Err(ProtocolError::Io(e))));
            }
            // Room for a read only now: between frames the buffer holds no memory.
            self.buf.reserve(READ_CHUNK);
            let room = self.buf.capacity() - self.buf.len();
            // The read runs inside `try_io`, whose readiness snapshot is taken before it: a read
            // shorter than the room given has emptied the socket, and answering `WouldBlock`
            // clears that snapshot's readiness (as tokio's own `poll_read` does) instead of
            // learning it from one more read. Data that comes after the snapshot is a newer
            // readiness event, which this does not clear.
            let mut got = None;
            let read = self.conn.stream.try_io(Interest::READABLE, || {
                let n = self.conn.stream.try_read_buf(&mut self.buf)?;
                got = Some(n);
                if n > 0 && n < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            let read = match (read, got) {
                (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
                (read, _) => read,
            };
            match read {
                Ok(0) => self.ended = true,
                Ok(_) => {
                    if let Some(frame) = self.decode()? {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.release_if_empty(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(e))));
                }
            }
        }
        Poll::Ready(None)
    }
}

/// Seconds of frames a device may send at once before the rate limit applies.
const BURST_SECONDS: f64 = 10.0;

impl Stream for FrameStream {
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
