//! The Session actor: one per WebSocket. It speaks the wire protocol of API.md, runs the heartbeat,
//! replays what the device missed, writes live notifications and forwards acks. It never touches
//! the database itself: replay pages come from the executor, acks and marks go to the Committer.
//!
//! The socket underneath is [`super::socket`]: the session writes frames into an outbox whose
//! backlog it can see, bounded in bytes and frames; a device that stops reading is closed with
//! 4008 instead of growing memory, and its notifications stay pending. What a device may send is
//! bounded too: frame size, frames per second (the socket is read no faster), bad frames.
//!
//! Ordering: the session registers with Presence *before* it reads its backlog, so a notification
//! committed after that read is pushed live, and one committed before it is in the backlog (a
//! node's commit order is its `seq` order). Live pushes that arrive during replay are held back
//! and sent after it; anything at or below the last `seq` sent is a duplicate and is skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, Frame, Item as WsItem, Message, ProtocolError};
use actix_web::rt::net::TcpStream;
use actix_web::{HttpRequest, HttpResponse};

use super::committer::Committer;
use super::db::{Db, JobError};
use super::handoff;
use super::messages::*;
use super::presence::Presence;
use super::socket::{self, Handover, OpenSockets, SharedOutbox};
use crate::db::queries;
use crate::domain::{new_id, now_ms};
use crate::metrics::Metrics;
use crate::protocol::{self, close, ClientFrame};

/// Notifications read from the database per replay query.
const REPLAY_PAGE: i64 = 500;
/// Live notifications held back during replay; past this they are dropped and re-read from the
/// database instead (they are all committed), so a long replay cannot grow memory without bound.
const MAX_HELD_BACK: usize = 1_000;
/// Bad frames tolerated within `BAD_FRAME_WINDOW` before the session is closed with 1008.
pub const MAX_BAD_FRAMES: u32 = 5;
pub const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);
/// How long registering with Presence may take before the session gives up.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before retrying a replay query that failed.
const REPLAY_RETRY: Duration = Duration::from_millis(500);
/// Replay attempts before the session is closed with 1013 (try again later).
const REPLAY_ATTEMPTS: u32 = 5;
/// How long a session waits for its cluster presence row to be written before giving up (1013).
const PRESENCE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing session waits for its presence row to go before it closes anyway (less
/// than the shutdown's grace, so every session still gets its 1001).
const OFFLINE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a replay waiting for the device to read checks the outbox again.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// The device a session serves, as authenticated at upgrade.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub user_id: String,
    pub name: String,
}

/// Per-session settings.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub heartbeat: Duration,
    pub max_frame_bytes: usize,
    /// Bytes of frames waiting for the socket past which the session is closed with 4008.
    pub max_outbound_bytes: usize,
    /// Frames waiting for the socket past which the session is closed with 4008.
    pub max_outbound_frames: usize,
    /// Live sessions one user may hold (0: no limit).
    pub max_sessions_per_user: usize,
    /// This node is one of several: a session writes its presence row before `hello`.
    pub cluster: bool,
    /// How long a device may leave its outbox full before it is closed with 4008.
    pub slow_grace: Duration,
    /// Frames per second a device may send, with bursts of ten seconds' worth; past it the
    /// session stops reading the socket until the allowance refills (TCP pushes back on the
    /// device). 0: no limit.
    pub max_frames_per_second: u32,
}

/// What the actors a session talks to are.
#[derive(Clone)]
pub struct SessionDeps {
    pub presence: Addr<Presence>,
    pub committer: Addr<Committer>,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// Sockets whose writer is still running, node-wide.
    pub sockets: OpenSockets,
}

enum Phase {
    /// Registering, then sending the backlog; live pushes are held back (bounded in count and
    /// bytes; past that they are dropped and read from the database instead).
    Replaying {
        held: Vec<Outbound>,
        held_bytes: usize,
        overflowed: bool,
    },
    /// Sending live pushes as they come.
    Live,
}

pub struct Session {
    id: String,
    device: DeviceIdentity,
    config: SessionConfig,
    deps: SessionDeps,
    phase: Phase,
    /// The highest `seq` written to the socket.
    last_seq: i64,
    /// The last time the device showed any sign of life.
    last_heard: Instant,
    connected_at: i64,
    bad_frames: u32,
    bad_window_start: Instant,
    /// A fragmented text message being reassembled.
    partial: Option<Vec<u8>>,
    replay_failures: u32,
    /// Set once the cleanup has run; it runs once however the session ends.
    left: bool,
    close_reason: &'static str,
    /// The close code the session ended with (1006: the connection dropped without one).
    close_code: u16,
    /// Live deliveries written but not yet reported to the Committer (reported in bursts).
    unreported: Vec<i64>,
    /// Frames waiting for the socket.
    out: SharedOutbox,
    /// Since when a replay has been waiting for the device to read.
    stalled_since: Option<Instant>,
    /// One node of several: answered once the cluster's presence row is gone.
    offline_written: Option<tokio::sync::oneshot::Receiver<bool>>,
}

/// Answers the upgrade: a `101` that carries, as a [`Handover`], what to run on the socket once
/// the upgrade service (see `startup`) has written it.
pub fn start(
    req: &HttpRequest,
    device: DeviceIdentity,
    config: SessionConfig,
    deps: SessionDeps,
) -> Result<HttpResponse, actix_web::Error> {
    let mut res: HttpResponse = actix_http::ws::handshake(req.head())?
        .finish()
        .map_into_boxed_body()
        .into();
    let handover = move |stream: TcpStream, leftover: &[u8]| {
        let (out, frames) = socket::take_over(
            stream,
            leftover,
            config.max_frame_bytes,
            config.max_frames_per_second,
            &deps.sockets,
        );
        Session::create(move |ctx| {
            ctx.add_stream(frames);
            Session {
                id: new_id(),
                device,
                config,
                deps,
                phase: Phase::Replaying {
                    held: Vec::new(),
                    held_bytes: 0,
                    overflowed: false,
                },
                last_seq: 0,
                last_heard: Instant::now(),
                connected_at: now_ms(),
                bad_frames: 0,
                bad_window_start: Instant::now(),
                partial: None,
                replay_failures: 0,
                left: false,
                close_reason: "connection ended",
                close_code: 1006,
                unreported: Vec::new(),
                out,
                stalled_since: None,
                offline_written: None,
            }
        });
    };
    res.extensions_mut().insert(Handover(Box::new(handover)));
    Ok(res)
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        log::info!(
            "session {} started: device {} user {}",
            self.id,
            self.device.device_id,
            self.device.user_id
        );
        self.deps.metrics.connects.inc();
        self.deps.metrics.sessions_open.inc();
        self.start_heartbeat(ctx);
        let (row_written, row_done) = if self.config.cluster {
            let (written, done) = tokio::sync::oneshot::channel();
            (Some(written), Some(done))
        } else {
            (None, None)
        };
        let register = Register {
            session_id: self.id.clone(),
            device_id: self.device.device_id.clone(),
            user_id: self.device.user_id.clone(),
            name: self.device.name.clone(),
            connected_at: self.connected_at,
            addr: ctx.address(),
            max_per_user: self.config.max_sessions_per_user,
            row_written,
        };
        // `wait` pauses this session (and only it) until Presence has registered it, so `hello`
        // is the first frame and a post made after `hello` is routed here.
        self.deps
            .presence
            .send(register)
            .into_actor(self)
            .timeout(REGISTER_TIMEOUT)
            .map(|res, act, ctx| match res {
                Ok(Ok(false)) => {
                    act.end(ctx, close::POLICY, "too many sessions for this user");
                }
                Ok(Ok(true)) => match row_done {
                    Some(written) => act.await_presence_row(ctx, written),
                    None => act.greet(ctx),
                },
                _ => {
                    log::error!("session {}: presence did not register it", act.id);
                    act.end(ctx, close::TRY_AGAIN_LATER, "server busy");
                }
            })
            .wait(ctx);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.leave();
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.out.finish();
        let secs = (now_ms() - self.connected_at) as f64 / 1000.0;
        log::info!(
            "session {} ended: device {} after {secs:.1}s, close {} ({})",
            self.id,
            self.device.device_id,
            self.close_code,
            self.close_reason
        );
        let m = &self.deps.metrics;
        m.sessions_open.dec();
        m.disconnects
            .with_label_values(&[&self.close_code.to_string()])
            .inc();
    }
}

impl Session {
    /// Registered: `hello`, then the backlog.
    fn greet(&mut self, ctx: &mut Context<Self>) {
        let hello = protocol::hello_frame(
            &self.id,
            &self.device.device_id,
            &self.device.user_id,
            self.config.heartbeat.as_millis() as u64,
        );
        self.send(Message::Text(hello.into()));
        handoff::send(
            &self.deps.committer,
            RecordSeen {
                device_id: self.device.device_id.clone(),
                at: self.connected_at,
            },
        );
        self.replay_page(ctx);
    }

    /// One node of several: `hello` waits until the session's presence row (handed to the
    /// Committer by Presence at registration) is committed — replacing, and kicking, a session of
    /// the device on another node — so every node sees the device online once it is greeted.
    fn await_presence_row(
        &mut self,
        ctx: &mut Context<Self>,
        written: tokio::sync::oneshot::Receiver<bool>,
    ) {
        async move { tokio::time::timeout(PRESENCE_WRITE_TIMEOUT, written).await }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(Ok(true)) => act.greet(ctx),
                _ => {
                    log::warn!("session {}: its presence could not be written", act.id);
                    act.end(ctx, close::TRY_AGAIN_LATER, "database unavailable");
                }
            })
            .wait(ctx);
    }

    /// The one cleanup path: presence forgets the session and the device's last-seen is recorded.
    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        self.flush_delivered();
        handoff::send(
            &self.deps.committer,
            RecordSeen {
                device_id: self.device.device_id.clone(),
                at: now_ms(),
            },
        );
        // What this session sent reaches the Committer before its end is known elsewhere (a
        // new session of the device waits for the acks written so far before its replay).
        handoff::flush();
        let row_gone = self.config.cluster.then(|| {
            let (gone, done) = tokio::sync::oneshot::channel();
            self.offline_written = Some(done);
            gone
        });
        self.deps.presence.do_send(Unregister {
            session_id: self.id.clone(),
            device_id: self.device.device_id.clone(),
            row_gone,
        });
    }

    /// Leaves, sends a close frame with `code`, and stops.
    fn end(&mut self, ctx: &mut Context<Self>, code: u16, reason: &'static str) {
        self.leave();
        self.close_reason = reason;
        self.close_code = code;
        let frame = Message::Close(Some(CloseReason {
            code: CloseCode::from(code),
            description: Some(reason.into()),
        }));
        self.close_when_offline(ctx, frame);
    }

    /// Sends the close frame and stops — on one node of several, once the cluster's presence
    /// shows the device offline, so a client that has seen the close finds it offline on every
    /// node (API.md: offline at once).
    fn close_when_offline(&mut self, ctx: &mut Context<Self>, frame: Message) {
        let Some(done) = self.offline_written.take() else {
            self.send(frame);
            ctx.stop();
            return;
        };
        async move {
            let _ = tokio::time::timeout(OFFLINE_WRITE_TIMEOUT, done).await;
        }
        .into_actor(self)
        .map(move |_, act, ctx| {
            act.send(frame);
            ctx.stop();
        })
        .wait(ctx);
    }

    /// Queues a frame for the socket.
    fn send(&self, msg: Message) {
        self.out.push(msg);
    }

    /// Whether a frame of `len` bytes fits in the outbox.
    fn fits(&self, len: usize) -> bool {
        let (bytes, frames) = self.out.backlog();
        // An empty outbox takes any one frame, so a bound set below the largest notification
        // cannot stall a session for good.
        frames == 0
            || (bytes + len <= self.config.max_outbound_bytes
                && frames < self.config.max_outbound_frames)
    }

    /// Queues an answer to the device (a pong, an error frame) if there is room: a device that
    /// sends without reading cannot grow its outbox with answers it does not read.
    fn answer(&self, msg: Message) {
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Pong(b) => b.len(),
            _ => 0,
        };
        if self.fits(len) {
            self.send(msg);
        }
    }

    /// The outbox is full: live pushes stop and the session catches up from the database once
    /// the device has read its backlog (the notifications are committed, so nothing is lost).
    fn fall_behind(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Replaying {
            held: Vec::new(),
            held_bytes: 0,
            overflowed: true,
        };
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            self.wait_for_drain(ctx);
        }
    }

    /// The device does not read: its backlog is dropped (the notifications in it stay pending
    /// and are replayed on its next session) and the session is closed with 4008.
    fn too_slow(&mut self, ctx: &mut Context<Self>) {
        let (bytes, frames) = self.out.backlog();
        log::info!(
            "session {}: device {} is not reading ({frames} frames, {bytes} bytes waiting); closing with 4008",
            self.id,
            self.device.device_id
        );
        self.out.discard();
        self.end(ctx, close::TOO_SLOW, "too slow: outbound buffer full");
    }

    fn start_heartbeat(&self, ctx: &mut Context<Self>) {
        let interval = self.config.heartbeat;
        ctx.run_interval(interval, move |act, ctx| {
            if act.last_heard.elapsed() > interval * 2 {
                log::info!("session {}: no heartbeat for two intervals", act.id);
                act.end(ctx, close::NORMAL, "heartbeat timeout");
            } else {
                act.send(Message::Ping(actix_web::web::Bytes::new()));
            }
        });
    }

    /// Reads the next page of the backlog and sends it; when the backlog is done, goes live.
    fn replay_page(&mut self, ctx: &mut Context<Self>) {
        let device_id = self.device.device_id.clone();
        let after = self.last_seq;
        let db = self.deps.db.clone();
        let deadline = db.deadline();
        // The first read waits for acks still being written (from this device's last session),
        // so an acked notification is never replayed.
        let barrier = (after == 0).then(|| {
            let (reply, done) = tokio::sync::oneshot::channel();
            handoff::send(&self.deps.committer, AfterWrites { reply });
            done
        });
        async move {
            if let Some(done) = barrier {
                let _ = tokio::time::timeout_at(deadline.into(), done).await;
            }
            db.read(deadline, move |c| {
                Ok(queries::pending_for_device(
                    c,
                    &device_id,
                    after,
                    now_ms(),
                    REPLAY_PAGE,
                )?)
            })
            .await
        }
        .into_actor(self)
        .map(|res, act, ctx| match res {
            Ok(rows) => {
                act.replay_failures = 0;
                let full = rows.len() as i64 == REPLAY_PAGE;
                let mut seqs = Vec::with_capacity(rows.len());
                let mut room = true;
                for r in rows {
                    let frame =
                        protocol::notification_frame(&r.id, r.created_at, r.expires_at, &r.payload);
                    // Replay goes no faster than the device reads: what does not fit now is
                    // read again from the database once the outbox drains.
                    if !act.fits(frame.len()) {
                        room = false;
                        break;
                    }
                    act.send(Message::Text(frame.into()));
                    act.last_seq = r.seq;
                    seqs.push(r.seq);
                }
                act.report_delivered(seqs);
                if !room {
                    if act.stalled_since.is_none() {
                        act.stalled_since = Some(Instant::now());
                        act.wait_for_drain(ctx);
                    }
                } else if full {
                    act.replay_page(ctx);
                } else {
                    act.finish_replay(ctx);
                }
            }
            Err(e) => {
                // A busy executor (many sessions catching up at once) is not a failure: wait a
                // little, spread out, and read again. Only real failures count towards 1013.
                let busy = matches!(e, JobError::Overloaded | JobError::Timeout);
                if !busy {
                    act.replay_failures += 1;
                }
                log::warn!(
                    "session {}: replay failed ({e}), attempt {}",
                    act.id,
                    act.replay_failures
                );
                if act.replay_failures >= REPLAY_ATTEMPTS {
                    act.end(ctx, close::TRY_AGAIN_LATER, "database unavailable");
                } else {
                    let spread = Duration::from_millis(u64::from(rand_jitter_ms()));
                    ctx.run_later(REPLAY_RETRY + spread, |act, ctx| act.replay_page(ctx));
                }
            }
        })
        .spawn(ctx);
    }

    /// Resumes the replay once the device has read half of its backlog; a device that does not
    /// within the slow-consumer grace is closed with 4008.
    fn wait_for_drain(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(DRAIN_POLL, |act, ctx| {
            let (bytes, frames) = act.out.backlog();
            if bytes <= act.config.max_outbound_bytes / 2
                && frames <= act.config.max_outbound_frames / 2
            {
                act.stalled_since = None;
                act.replay_page(ctx);
            } else if act
                .stalled_since
                .is_some_and(|t| t.elapsed() > act.config.slow_grace)
            {
                act.too_slow(ctx);
            } else {
                act.wait_for_drain(ctx);
            }
        });
    }

    fn finish_replay(&mut self, ctx: &mut Context<Self>) {
        let Phase::Replaying {
            held, overflowed, ..
        } = std::mem::replace(
            &mut self.phase,
            Phase::Replaying {
                held: Vec::new(),
                held_bytes: 0,
                overflowed: false,
            },
        )
        else {
            return;
        };
        if overflowed {
            // Some live pushes were dropped; they are committed, so read on from the database.
            self.replay_page(ctx);
            return;
        }
        self.phase = Phase::Live;
        let now = now_ms();
        let mut seqs = Vec::new();
        for item in held {
            match self.write_live(item, now) {
                Written::Sent(seq) => seqs.push(seq),
                Written::Skipped => {}
                Written::NoRoom => {
                    self.report_delivered(seqs);
                    return self.fall_behind(ctx);
                }
            }
        }
        self.report_delivered(seqs);
    }

    /// Writes one live notification unless it was already sent or has expired, or there is no
    /// room for it.
    fn write_live(&mut self, item: Outbound, now: i64) -> Written {
        if item.seq <= self.last_seq || item.expires_at <= now {
            return Written::Skipped;
        }
        if !self.fits(item.frame.len()) {
            return Written::NoRoom;
        }
        self.last_seq = item.seq;
        self.send(Message::Text(item.frame));
        self.deps
            .metrics
            .delivery_latency
            .observe(item.committed_at.elapsed().as_secs_f64());
        Written::Sent(item.seq)
    }

    /// Reports the live deliveries gathered so far.
    fn flush_delivered(&mut self) {
        let seqs = std::mem::take(&mut self.unreported);
        self.report_delivered(seqs);
    }

    fn report_delivered(&self, seqs: Vec<i64>) {
        if !seqs.is_empty() {
            handoff::send(
                &self.deps.committer,
                RecordDelivered {
                    device_id: self.device.device_id.clone(),
                    seqs,
                },
            );
        }
    }

    fn text(&mut self, ctx: &mut Context<Self>, text: &str) {
        match protocol::decode_client_frame(text) {
            Ok(ClientFrame::Ping) => self.answer(Message::Text(protocol::PONG_FRAME.into())),
            Ok(ClientFrame::Ack { ids }) => {
                if !ids.is_empty() {
                    // Delivery marks go first, so an acked delivery also has its delivered_at.
                    self.flush_delivered();
                    handoff::send(
                        &self.deps.committer,
                        RecordAck {
                            device_id: self.device.device_id.clone(),
                            ids,
                        },
                    );
                }
            }
            Err(err) => {
                self.answer(Message::Text(protocol::error_frame(&err).into()));
                self.bad_frame(ctx);
            }
        }
    }

    /// Counts a bad frame; too many within the window close the session with 1008.
    fn bad_frame(&mut self, ctx: &mut Context<Self>) {
        if self.bad_window_start.elapsed() > BAD_FRAME_WINDOW {
            self.bad_window_start = Instant::now();
            self.bad_frames = 0;
        }
        self.bad_frames += 1;
        if self.bad_frames >= MAX_BAD_FRAMES {
            self.end(ctx, close::POLICY, "too many bad frames");
        }
    }
}

/// What became of a live notification.
enum Written {
    Sent(i64),
    /// Already sent, or expired.
    Skipped,
    /// The outbox is full: the device is not reading.
    NoRoom,
}

impl StreamHandler<Result<Frame, ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<Frame, ProtocolError>, ctx: &mut Self::Context) {
        // A bug that panics while handling one device's frame ends that session through the
        // usual cleanup (presence forgets it), instead of taking the worker's other sessions down.
        let handled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.frame(msg, ctx)));
        if handled.is_err() {
            log::error!(
                "session {}: a frame handler panicked; closing the session",
                self.id
            );
            self.end(ctx, close::INTERNAL, "internal error");
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The device's side of the connection is gone (TCP closed or reset).
        if !self.left {
            self.close_reason = "connection dropped";
        }
        self.leave();
        ctx.stop();
    }
}

impl Session {
    fn frame(&mut self, msg: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        if self.left {
            return;
        }
        self.last_heard = Instant::now();
        match msg {
            Ok(Frame::Text(bytes)) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.text(ctx, text),
                Err(_) => self.end(ctx, close::POLICY, "text frame is not UTF-8"),
            },
            Ok(Frame::Ping(bytes)) => self.answer(Message::Pong(bytes)),
            Ok(Frame::Pong(_)) => {}
            Ok(Frame::Binary(_)) => {
                self.end(ctx, close::UNSUPPORTED, "binary frames are not supported")
            }
            Ok(Frame::Continuation(item)) => self.continuation(ctx, item),
            Ok(Frame::Close(reason)) => {
                self.leave();
                self.close_reason = "closed by the device";
                self.close_code = reason.as_ref().map_or(1005, |r| u16::from(r.code));
                self.close_when_offline(ctx, Message::Close(reason));
            }
            Err(ProtocolError::Overflow) => self.end(ctx, close::TOO_BIG, "frame too big"),
            Err(e) => {
                log::debug!("session {}: protocol error: {e}", self.id);
                self.end(ctx, close::POLICY, "protocol error");
            }
        }
    }
}

impl Session {
    /// Reassembles a fragmented text message, bounded by the frame size limit.
    fn continuation(&mut self, ctx: &mut Context<Self>, item: WsItem) {
        let limit = self.config.max_frame_bytes;
        let last = matches!(item, WsItem::Last(_));
        match item {
            WsItem::FirstText(b) => self.partial = Some(b.to_vec()),
            WsItem::FirstBinary(_) => {
                return self.end(ctx, close::UNSUPPORTED, "binary frames are not supported")
            }
            WsItem::Continue(b) | WsItem::Last(b) => match self.partial.as_mut() {
                Some(buf) => buf.extend_from_slice(&b),
                None => return self.end(ctx, close::POLICY, "continuation without a first frame"),
            },
        }
        if self.partial.as_ref().is_some_and(|b| b.len() > limit) {
            return self.end(ctx, close::TOO_BIG, "message too big");
        }
        if last {
            let bytes = self.partial.take().unwrap_or_default();
            match String::from_utf8(bytes) {
                Ok(text) => self.text(ctx, &text),
                Err(_) => self.end(ctx, close::POLICY, "text message is not UTF-8"),
            }
        }
    }
}

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, Deliver(item): Deliver, ctx: &mut Self::Context) {
        match &mut self.phase {
            Phase::Replaying {
                held,
                held_bytes,
                overflowed,
            } => {
                let len = item.frame.len();
                if held.len() < MAX_HELD_BACK && *held_bytes + len <= self.config.max_outbound_bytes
                {
                    *held_bytes += len;
                    held.push(item);
                } else {
                    *overflowed = true;
                }
            }
            Phase::Live => match self.write_live(item, now_ms()) {
                Written::Sent(seq) => {
                    // One report for a burst: the flush runs after the messages already queued.
                    self.unreported.push(seq);
                    if self.unreported.len() == 1 {
                        ctx.notify(FlushDelivered);
                    }
                }
                Written::Skipped => {}
                Written::NoRoom => self.fall_behind(ctx),
            },
        }
    }
}

/// Session → itself: report the live deliveries gathered since the last report.
#[derive(Message)]
#[rtype(result = "()")]
struct FlushDelivered;

impl Handler<FlushDelivered> for Session {
    type Result = ();

    fn handle(&mut self, _: FlushDelivered, _: &mut Self::Context) {
        self.flush_delivered();
    }
}

impl Handler<CloseSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: CloseSession, ctx: &mut Self::Context) {
        if !self.left {
            self.end(ctx, msg.code, msg.reason);
        }
    }
}

impl Handler<CatchUp> for Session {
    type Result = ();

    /// A cluster signal may have been missed: read whatever was committed after the last
    /// notification sent (a replay from `last_seq`), then go on live.
    fn handle(&mut self, _: CatchUp, ctx: &mut Self::Context) {
        if self.left {
            return;
        }
        match &mut self.phase {
            Phase::Replaying { overflowed, .. } => *overflowed = true,
            Phase::Live => {
                self.phase = Phase::Replaying {
                    held: Vec::new(),
                    held_bytes: 0,
                    overflowed: false,
                };
                if self.stalled_since.is_none() {
                    self.replay_page(ctx);
                }
            }
        }
    }
}

/// Up to a second of jitter, so retries of many sessions do not come back together.
fn rand_jitter_ms() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b) % 1000
}
