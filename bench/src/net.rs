//! Sockets and the operating system: the loopback-only target check, source addresses,
//! a minimal keep-alive HTTP/1.1 client, the open-files limit and `/proc` readings.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::report::{now_ns, round};

/// Parses `HOST:PORT` and refuses anything outside 127.0.0.0/8: this tool only ever loads a
/// server on the same machine.
pub fn loopback_target(s: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .copied()
        .ok_or_else(|| format!("{s:?} has no IPv4 address; only 127.0.0.0/8 is allowed"))?;
    match addr.ip() {
        IpAddr::V4(ip) if ip.octets()[0] == 127 => {}
        other => {
            return Err(format!(
                "refusing target {other}: only 127.0.0.0/8 is allowed"
            ))
        }
    }
    if addrs.iter().any(|a| {
        !matches!(a.ip(), IpAddr::V4(ip) if ip.octets()[0] == 127) && !a.ip().is_loopback()
    }) {
        return Err(format!(
            "refusing {s:?}: it resolves outside the loopback range"
        ));
    }
    Ok(addr)
}

/// Client source addresses 127.0.0.x, handed out round-robin so that no single source address
/// runs out of ephemeral ports.
pub struct Sources {
    ips: Vec<Ipv4Addr>,
    next: AtomicUsize,
}

impl Sources {
    /// `count` addresses 127.0.0.(2 + (offset + shard * count + k) mod 252); `count == 0` lets
    /// the kernel choose (127.0.0.1). A different `offset` per run keeps a run's connections off
    /// the 4-tuples that the previous run's closed connections still hold in TIME_WAIT (a SYN
    /// that meets one is answered late, and the handshake takes a 1 s retransmission).
    pub fn new(count: usize, shard: usize, offset: usize) -> Sources {
        let ips = (0..count)
            .map(|k| {
                let last = 2 + (offset + shard * count + k) % 252;
                Ipv4Addr::new(127, 0, 0, last as u8)
            })
            .collect();
        Sources {
            ips,
            next: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self) -> Option<Ipv4Addr> {
        if self.ips.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.ips[i % self.ips.len()])
    }

    pub fn list(&self) -> Vec<String> {
        self.ips.iter().map(|ip| ip.to_string()).collect()
    }
}

/// Connects to `target` from `src` (bound before connect, with the port chosen at connect time
/// so that ports are shared across destinations).
pub async fn connect_from(target: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &TcpSocket) {}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard limit; returns the new soft limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur as u64
    }
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((utime + stime) / ticks)
}

/// The load generator's own CPU over its posting phase, started before the posters are (see
/// [`PostingClock::stop`]).
pub struct PostingClock {
    cpu_before: Option<f64>,
    from_ns: u64,
}

impl PostingClock {
    /// Reads this process's CPU now; the phase itself begins at `t0` (ns since the UNIX epoch,
    /// after a `--start-at` wait, if any), or now if that has passed.
    pub fn start(t0: u64) -> Self {
        PostingClock {
            cpu_before: cpu_seconds(std::process::id()),
            from_ns: now_ns().max(t0),
        }
    }

    /// The phase ends at `end_ns`, when every post has been answered or given up on: at
    /// saturation that is well past the nominal duration, while the backlog is worked off, so the
    /// CPU is divided by the phase's real length. The wait before `t0` costs a few cycles and is
    /// counted with the CPU, not with the length.
    pub fn stop(self, end_ns: u64) -> PostingCpu {
        let after = cpu_seconds(std::process::id());
        PostingCpu {
            cpu_s: self.cpu_before.zip(after).map(|(a, b)| b - a),
            elapsed_s: end_ns.saturating_sub(self.from_ns) as f64 / 1e9,
        }
    }
}

/// What [`PostingClock::stop`] read: CPU seconds and the phase's wall time.
pub struct PostingCpu {
    cpu_s: Option<f64>,
    elapsed_s: f64,
}

impl PostingCpu {
    /// Cores used on average over the phase.
    fn cores(&self) -> Option<f64> {
        self.cpu_s
            .filter(|_| self.elapsed_s > 0.0)
            .map(|c| c / self.elapsed_s)
    }

    /// The report's `client` object: the figures above and the process's RSS now.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "cpu_s_posting": self.cpu_s.map(|c| round(c, 3)),
            "posting_s": round(self.elapsed_s, 3),
            "cpu_cores_posting": self.cores().map(|c| round(c, 3)),
            "rss_kib": rss_kib(std::process::id()),
        })
    }
}

/// One HTTP answer.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "HTTP {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A keep-alive HTTP/1.1 connection that reconnects when the server closed it.
pub struct HttpConn {
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    stream: Option<BufReader<TcpStream>>,
    buf: Vec<u8>,
    timeout: Duration,
    /// Requests resent once because a reused connection turned out closed.
    pub retries: u64,
    /// Connections opened.
    pub connects: u64,
}

impl HttpConn {
    pub fn new(target: SocketAddr, src: Option<Ipv4Addr>, timeout: Duration) -> HttpConn {
        HttpConn {
            target,
            src,
            stream: None,
            buf: Vec::with_capacity(1024),
            timeout,
            retries: 0,
            connects: 0,
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        self.buf.clear();
        self.buf.extend_from_slice(method.as_bytes());
        self.buf.push(b' ');
        self.buf.extend_from_slice(path.as_bytes());
        self.buf.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.buf
            .extend_from_slice(self.target.to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        if let Some(token) = bearer {
            self.buf.extend_from_slice(b"Authorization: Bearer ");
            self.buf.extend_from_slice(token.as_bytes());
            self.buf.extend_from_slice(b"\r\n");
        }
        if let Some(body) = body {
            self.buf.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                )
                .as_bytes(),
            );
        }
        self.buf.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            self.buf.extend_from_slice(body);
        }
        let reused = self.stream.is_some();
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err((e, got_bytes))) => {
                self.stream = None;
                if reused && !got_bytes {
                    // The server closed an idle keep-alive connection: send again once.
                    self.retries += 1;
                    match tokio::time::timeout(self.timeout, self.exchange()).await {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err((e, _))) => {
                            self.stream = None;
                            Err(e)
                        }
                        Err(_) => {
                            self.stream = None;
                            Err(io::Error::new(io::ErrorKind::TimedOut, "HTTP timeout"))
                        }
                    }
                } else {
                    Err(e)
                }
            }
            Err(_) => {
                self.stream = None;
                Err(io::Error::new(io::ErrorKind::TimedOut, "HTTP timeout"))
            }
        }
    }

    /// Sends `self.buf` and reads one answer. The flag tells whether any answer byte arrived.
    async fn exchange(&mut self) -> Result<Response, (io::Error, bool)> {
        if self.stream.is_none() {
            let s = connect_from(self.target, self.src)
                .await
                .map_err(|e| (e, true))?;
            self.connects += 1;
            self.stream = Some(BufReader::with_capacity(4096, s));
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream
            .get_mut()
            .write_all(&self.buf)
            .await
            .map_err(|e| (e, false))?;
        let mut line = String::new();
        let n = stream.read_line(&mut line).await.map_err(|e| (e, false))?;
        if n == 0 {
            return Err((
                io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"),
                false,
            ));
        }
        let bad = |m: &str| {
            (
                io::Error::new(io::ErrorKind::InvalidData, m.to_string()),
                true,
            )
        };
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        loop {
            line.clear();
            let n = stream.read_line(&mut line).await.map_err(|e| (e, true))?;
            if n == 0 {
                return Err(bad("connection closed in headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                stream.read_line(&mut line).await.map_err(|e| (e, true))?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| bad("bad chunk size"))?;
                let start = body.len();
                body.resize(start + size, 0);
                stream
                    .read_exact(&mut body[start..])
                    .await
                    .map_err(|e| (e, true))?;
                line.clear();
                stream.read_line(&mut line).await.map_err(|e| (e, true))?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = content_length {
            body.resize(len, 0);
            stream.read_exact(&mut body).await.map_err(|e| (e, true))?;
        } else if status != 204 && status != 304 {
            // No length: the body runs to the end of the connection.
            stream.read_to_end(&mut body).await.map_err(|e| (e, true))?;
            close = true;
        }
        if close {
            self.stream = None;
        }
        Ok(Response { status, body })
    }
}

/// Whether something accepts TCP connections at `addr` within `wait`.
pub async fn listening(addr: SocketAddr, wait: Duration) -> bool {
    matches!(
        tokio::time::timeout(wait, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posting_cpu_is_divided_by_the_phase_it_was_read_over() {
        let long = PostingCpu {
            cpu_s: Some(21.0),
            elapsed_s: 30.0,
        };
        assert_eq!(long.cores(), Some(0.7));
        let none = PostingCpu {
            cpu_s: None,
            elapsed_s: 30.0,
        };
        assert_eq!(none.cores(), None);
        let instant = PostingCpu {
            cpu_s: Some(1.0),
            elapsed_s: 0.0,
        };
        assert_eq!(instant.cores(), None);
        // Read for real: this process used some CPU over a phase that took some time.
        let started = std::time::Instant::now();
        let clock = PostingClock::start(0);
        let from_ns = clock.from_ns;
        let mut x = 1u64;
        while started.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(3) + 1);
        }
        let real = clock.stop(from_ns + 30_000_000);
        assert_eq!(real.elapsed_s, 0.03);
        assert!(real.cpu_s.is_some_and(|c| c >= 0.0), "{:?}", real.cpu_s);
        let report = real.report();
        assert_eq!(report["posting_s"], 0.03, "{report}");
        assert!(
            report["rss_kib"].as_u64().is_some_and(|k| k > 0),
            "{report}"
        );
        // A phase that has not begun yet (a start time still ahead) has no length, no cores.
        let ahead = PostingClock::start(now_ns() + 2_000_000_000);
        let end = ahead.from_ns - 1_000;
        assert_eq!(ahead.stop(end).cores(), None);
    }
}
