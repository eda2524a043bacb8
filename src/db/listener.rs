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
use std::time::Duration;

use super::cluster::{Signal, CHANNEL};

/// How long one wait on the socket lasts before the thread checks whether it should stop.
const POLL_MS: i32 = 500;
/// Pause before reconnecting after the connection was lost.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

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

    /// Runs one statement that returns nothing of interest.
    fn exec(&self, sql: &str) -> Result<(), String> {
        let query = CString::new(sql).map_err(|_| "a statement contains a NUL byte")?;
        // SAFETY: a live connection and a valid query; the result is cleared once.
        unsafe {
            let res = pq_sys::PQexec(self.0.as_ptr(), query.as_ptr());
            let status = pq_sys::PQresultStatus(res);
            pq_sys::PQclear(res);
            match status {
                pq_sys::ExecStatusType::PGRES_COMMAND_OK
                | pq_sys::ExecStatusType::PGRES_TUPLES_OK => Ok(()),
                _ => Err(self.error()),
            }
        }
    }

    /// Connects, runs `hold` (the node's liveness lock) and subscribes to the channel.
    fn open(url: &str, hold: &str) -> Result<Conn, String> {
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
        conn.exec(hold)?;
        conn.exec(&format!("LISTEN {CHANNEL}"))?;
        Ok(conn)
    }

    /// Waits for signals until the connection fails or `stop` is set; hands each to `deliver`.
    fn serve(&self, stop: &AtomicBool, deliver: &(dyn Fn(Signal) + Send)) -> Result<(), String> {
        let conn = self.0.as_ptr();
        // SAFETY: a live connection.
        let fd = unsafe { pq_sys::PQsocket(conn) };
        if fd < 0 {
            return Err("the connection has no socket".into());
        }
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
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
    let first = Conn::open(url, &hold)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let url = url.to_owned();
    thread::Builder::new()
        .name("herald-listen".into())
        .spawn(move || {
            let mut conn = Some(first);
            while !flag.load(Ordering::Relaxed) {
                let c = match conn.take() {
                    Some(c) => c,
                    None => match Conn::open(&url, &hold) {
                        Ok(c) => {
                            log::info!("listening for cluster signals again");
                            resumed();
                            c
                        }
                        Err(e) => {
                            log::warn!("cannot reconnect the cluster listener: {e}");
                            thread::sleep(RECONNECT_PAUSE);
                            continue;
                        }
                    },
                };
                if let Err(e) = c.serve(&flag, &deliver) {
                    log::warn!("cluster listener lost its connection: {e}");
                    thread::sleep(RECONNECT_PAUSE);
                }
            }
        })
        .map_err(|e| format!("cannot start the listener thread: {e}"))?;
    Ok(Listener { stop })
}
