//! The node's `LISTEN` connection: one libpq connection outside the pool, on its own thread,
//! that waits on its socket (`poll(2)`) for the cluster's signals and hands each to a callback in
//! the order PostgreSQL delivered them — commit order.
//!
//! diesel's `PgConnection::notifications_iter()` only returns what has already arrived; waiting
//! with it means a sleep loop, which either burns CPU or adds its sleep to every cross-node push.
//! libpq (through `pq-sys`, which diesel links anyway) gives the socket to wait on instead.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::cluster::{Signal, CHANNEL};

/// How long one wait on the socket lasts before the thread checks whether it should stop.
const POLL_MS: i32 = 500;
/// Pause before reconnecting after the connection was lost.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// How often the connection is probed with a query: a path that died silently (a NAT or a
/// failover dropping it without a reset) shows up within this plus the TCP user timeout below.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a node waits at start for its liveness lock (held by its previous life's connection
/// until the database notices that connection is gone).
const LOCK_WAIT_AT_START: Duration = Duration::from_secs(30);
/// One libpq connection, closed on drop.
struct Conn(NonNull<pq_sys::PGconn>);

// The connection is used by one thread at a time (it moves into the listener thread).
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the pointer came from PQconnectdb and is finished exactly once.
        unsafe { pq_sys::PQfinish(self.0.as_ptr()) }
    }
}

impl Conn {
    fn error(&self) -> String {
        // SAFETY: PQerrorMessage returns a NUL-terminated string owned by the connection.
        unsafe { CStr::from_ptr(pq_sys::PQerrorMessage(self.0.as_ptr())) }
            .to_string_lossy()
            .trim()
            .to_owned()
    }

    /// Runs one statement; returns the first column of its first row, if any.
    fn exec(&self, sql: &str) -> Result<Option<String>, String> {
        let query = CString::new(sql).map_err(|_| "a statement contains a NUL byte")?;
        // SAFETY: a live connection and a valid query; the value is copied before the result
        // is cleared, once.
        unsafe {
            let res = pq_sys::PQexec(self.0.as_ptr(), query.as_ptr());
            let status = pq_sys::PQresultStatus(res);
            let value = (status == pq_sys::ExecStatusType::PGRES_TUPLES_OK
                && pq_sys::PQntuples(res) > 0
                && pq_sys::PQnfields(res) > 0)
                .then(|| {
                    CStr::from_ptr(pq_sys::PQgetvalue(res, 0, 0))
                        .to_string_lossy()
                        .into_owned()
                });
            pq_sys::PQclear(res);
            match status {
                pq_sys::ExecStatusType::PGRES_COMMAND_OK
                | pq_sys::ExecStatusType::PGRES_TUPLES_OK => Ok(value),
                _ => Err(self.error()),
            }
        }
    }

    /// Tries to take the node's liveness lock (`hold` answers `t` or `f`).
    fn try_hold(&self, hold: &str) -> Result<bool, String> {
        Ok(self.exec(hold)?.as_deref() == Some("t"))
    }

    /// Connects and subscribes to the channel.
    fn open(url: &str) -> Result<Conn, String> {
        let url = super::pg_conninfo(url);
        let info = CString::new(url).map_err(|_| "the database URL contains a NUL byte")?;
        // SAFETY: `info` is a valid C string; a null result means out of memory.
        let raw = unsafe { pq_sys::PQconnectdb(info.as_ptr()) };
        let conn = Conn(NonNull::new(raw).ok_or("libpq could not allocate a connection")?);
        // SAFETY: a live connection; the processor is a plain function that only reads the
        // NUL-terminated message libpq passes it.
        unsafe {
            pq_sys::PQsetNoticeProcessor(conn.0.as_ptr(), Some(log_notice), std::ptr::null_mut());
        }
        // SAFETY: a live connection.
        if unsafe { pq_sys::PQstatus(conn.0.as_ptr()) } != pq_sys::ConnStatusType::CONNECTION_OK {
            return Err(conn.error());
        }
        conn.exec(&format!("LISTEN {CHANNEL}"))?;
        Ok(conn)
    }

    /// Waits for signals until the connection fails or `stop` is set; hands each to `deliver`.
    /// Until `held`, it keeps trying to take the liveness lock `hold`.
    fn serve(
        &self,
        stop: &AtomicBool,
        hold: &str,
        mut held: bool,
        deliver: &(dyn Fn(Signal) + Send),
    ) -> Result<(), String> {
        let conn = self.0.as_ptr();
        // SAFETY: a live connection.
        let fd = unsafe { pq_sys::PQsocket(conn) };
        if fd < 0 {
            return Err("the connection has no socket".into());
        }
        let mut probed = Instant::now();
        // Statements before this loop may have read signals into libpq's buffer already.
        let mut drain_first = true;
        while !stop.load(Ordering::Relaxed) {
            let mut wait_ms = if std::mem::take(&mut drain_first) {
                0
            } else {
                POLL_MS
            };
            if probed.elapsed() >= PROBE_EVERY {
                // Signals that arrived during the probe are already read into libpq's buffer:
                // look at them without waiting on the socket.
                wait_ms = 0;
                probed = Instant::now();
                if held {
                    self.exec("SELECT 1")?;
                } else if self.try_hold(hold)? {
                    log::info!("cluster listener holds the node's liveness lock again");
                    held = true;
                }
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            // SAFETY: a live connection; each notify is freed once after its fields are read.
            unsafe {
                if pq_sys::PQconsumeInput(conn) == 0 {
                    return Err(self.error());
                }
                loop {
                    let note = pq_sys::PQnotifies(conn);
                    if note.is_null() {
                        break;
                    }
                    let extra = CStr::from_ptr((*note).extra).to_string_lossy().into_owned();
                    pq_sys::PQfreemem(note.cast());
                    match serde_json::from_str::<Signal>(&extra) {
                        Ok(signal) => deliver(signal),
                        Err(e) => log::warn!("ignored a signal that does not parse ({e})"),
                    }
                }
                if pq_sys::PQstatus(conn) != pq_sys::ConnStatusType::CONNECTION_OK {
                    return Err(self.error());
                }
            }
        }
        Ok(())
    }
}

/// Server notices on the listener's connection (e.g. "terminating connection due to
/// administrator command") go to the log, not to stderr, which libpq would use by default.
unsafe extern "C" fn log_notice(_: *mut std::ffi::c_void, message: *const std::ffi::c_char) {
    if !message.is_null() {
        // SAFETY: libpq passes a NUL-terminated message valid for this call.
        let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
        log::debug!("cluster listener: {}", text.trim());
    }
}

/// Stops the listener thread when dropped (within one poll interval).
pub struct Listener {
    stop: Arc<AtomicBool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts listening for `node`. Returns once the first `LISTEN` is in place (so no signal committed after
/// this returns is missed), or the error if the first connection fails. After a lost
/// connection the thread reconnects and calls `resumed`: signals sent meanwhile are lost, and
/// the node must catch up from the database.
pub fn start(
    url: &str,
    node: &str,
    deliver: impl Fn(Signal) + Send + 'static,
    resumed: impl Fn() + Send + 'static,
) -> Result<Listener, String> {
    // The listener's session also holds the node's liveness lock: it lives exactly as long as
    // the node (or until the connection is lost, when it is taken again on reconnecting).
    let hold = super::cluster::liveness_lock_sql(node);
    let first = Conn::open(url)?;
    let waited = Instant::now();
    let mut told = None::<Instant>;
    while !first.try_hold(&hold)? {
        if waited.elapsed() > LOCK_WAIT_AT_START {
            return Err(format!(
                "node id {node} is in use: another live node holds it (or PostgreSQL has not yet \
                 dropped this node's previous connection)"
            ));
        }
        if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            told = Some(Instant::now());
            log::warn!("waiting for node id {node}'s liveness lock (held by another connection)");
        }
        thread::sleep(Duration::from_millis(500));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let url = url.to_owned();
    thread::Builder::new()
        .name("herald-listen".into())
        .spawn(move || {
            let mut conn = Some(first);
            while !flag.load(Ordering::Relaxed) {
                let (c, held) = match conn.take() {
                    Some(c) => (c, true),
                    // Listening first; the lock may still be held by the lost connection's
                    // backend until the database notices, so it is retried while serving.
                    None => match Conn::open(&url) {
                        Ok(c) => {
                            log::info!("listening for cluster signals again");
                            resumed();
                            let held = c.try_hold(&hold).unwrap_or(false);
                            (c, held)
                        }
                        Err(e) => {
                            log::warn!("cannot reconnect the cluster listener: {e}");
                            thread::sleep(RECONNECT_PAUSE);
                            continue;
                        }
                    },
                };
                if let Err(e) = c.serve(&flag, &hold, held, &deliver) {
                    log::warn!("cluster listener lost its connection: {e}");
                    thread::sleep(RECONNECT_PAUSE);
                }
            }
        })
        .map_err(|e| format!("cannot start the listener thread: {e}"))?;
    Ok(Listener { stop })
}
