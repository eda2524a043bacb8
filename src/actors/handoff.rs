//! What a worker thread's sessions and HTTP handlers send the Committer, handed over once per
//! turn of the worker's event loop instead of message by message.
//!
//! Why: the Committer lives on another thread and is idle between batches most of the time, so
//! each message sent to it woke that thread — a `write(2)` to its event fd and a cross-CPU wake-up.
//! A profile at 8,000 notifications/s (docs/BENCHMARKS.md, sixth pass) had those writes at 12 %
//! of the worker threads' time: a post, a delivery mark and an ack each woke the Committer. Here
//! the first message of a turn schedules a flush task on the worker (it runs after the tasks the
//! same turn already made ready), and the flush hands everything gathered over in one message.
//!
//! Order is kept: one thread's messages reach the Committer in the order they were sent (one
//! list per thread), so a session's delivery marks still come before its acks, and a barrier
//! ([`AfterWrites`]) still comes after the writes sent before it. A session that ends calls
//! [`flush`], so what it sent is with the Committer before its end is known anywhere else; a
//! thread that ends hands over whatever it still holds.

use std::cell::RefCell;

use actix::prelude::*;

use super::committer::Committer;
use super::messages::{AfterWrites, RecordAck, RecordDelivered, RecordSeen, SubmitPost};

/// One message for the Committer.
pub enum ToCommitter {
    Post(SubmitPost),
    Ack(RecordAck),
    Delivered(RecordDelivered),
    Seen(RecordSeen),
    After(AfterWrites),
}

macro_rules! to_committer {
    ($($msg:ident => $variant:ident),+) => {$(
        impl From<$msg> for ToCommitter {
            fn from(m: $msg) -> Self {
                ToCommitter::$variant(m)
            }
        }
    )+};
}

to_committer!(
    SubmitPost => Post,
    RecordAck => Ack,
    RecordDelivered => Delivered,
    RecordSeen => Seen,
    AfterWrites => After
);

/// Worker → Committer: the messages of one turn, in the order they were sent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Handoff(pub Vec<ToCommitter>);

/// This thread's messages not yet handed over, per Committer (one per server; a process that
/// runs several servers, as the tests do, has one list per server here).
#[derive(Default)]
struct Pending(Vec<(Addr<Committer>, Vec<ToCommitter>)>);

impl Pending {
    fn hand_over(&mut self) {
        for (committer, list) in std::mem::take(&mut self.0) {
            committer.do_send(Handoff(list));
        }
    }
}

/// A thread that ends (a worker stopping with a flush still scheduled) hands over what it held.
impl Drop for Pending {
    fn drop(&mut self) {
        self.hand_over();
    }
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::default();
}

/// Queues `msg` for `committer`; it is handed over at the end of this turn of the thread's event
/// loop (or sooner, by [`flush`]). On a thread without a running arbiter (none of Herald's
/// senders, but a session dropped while its thread shuts down could be) it is handed over at once.
pub fn send(committer: &Addr<Committer>, msg: impl Into<ToCommitter>) {
    let msg = msg.into();
    // The first message since the last flush schedules the next one.
    let schedule = PENDING.with(|p| {
        let lists = &mut p.borrow_mut().0;
        let first = lists.is_empty();
        match lists.iter_mut().find(|(a, _)| a == committer) {
            Some((_, list)) => list.push(msg),
            None => lists.push((committer.clone(), vec![msg])),
        }
        first
    });
    // Through the arbiter, which spawns the flush after the tasks already queued; it never
    // panics (`spawn_local` would, outside a local task set).
    if schedule && !Arbiter::try_current().is_some_and(|a| a.spawn(async { flush() })) {
        flush();
    }
}

/// Hands everything this thread has queued over now.
pub fn flush() {
    // Taken out first: the sends run with the thread's queue free again.
    let mut taken = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    taken.hand_over();
}
