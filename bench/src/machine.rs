//! A few figures of the machine itself, taken just before a run (the `machine` object of every
//! report), so that runs made on different machines — or on the same one on another day — can
//! be told apart before their figures are compared.
//!
//! Why: one of the project's machines ran the same build at a third of another's rate. Its two
//! vCPUs slowed each other down (a loop took 1.8 s alone and 2.2–3.4 s with the other vCPU
//! busy) and every system call cost more (kernel mitigations), and nothing in the reports said so.
//!
//! - `spin_one_thread_ms`: a fixed integer loop on one thread;
//! - `spin_two_threads_ms`: the same loop on two threads at once (the slower one); their ratio,
//!   `parallel_slowdown`, is ~1 where two cores are really two cores;
//! - `syscall_ns`: one trivial system call (`getppid`), the floor under every socket operation;
//! - `loopback_round_trip_us`: one byte to a thread and back over TCP on 127.0.0.1 (no Nagle),
//!   the path every post, push and ack takes;
//! - `loopback_message_cpu_us`: the CPU time, sender's and receiver's together, that one 200-byte
//!   message costs over loopback TCP when many are in flight (32 connections, each carrying one
//!   message each way per round; both threads' `getrusage(RUSAGE_THREAD)`). On loopback the
//!   receiver's protocol work runs as a softirq inside the sender's system call, and a kernel
//!   built without `CONFIG_IRQ_TIME_ACCOUNTING` (the project's machines) charges it to the
//!   sender, so the figure covers the whole path; with that option on, softirq time is left out
//!   and the figure reads low. A notification is at least four such messages — the post, its
//!   `202`, the push and the ack — so four times this figure is what the transport alone takes
//!   per notification on this machine, before Herald or the load generator runs a line of its
//!   own code; `transport_ceiling_per_s` is the rate at which that alone keeps every core busy.
//!
//! Takes one to two seconds, on an otherwise idle machine: run it before the load starts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::report::round;

/// Iterations of the spin loop: ~0.2–0.5 s on one core of the project's machines.
const SPIN: u64 = 50_000_000;
/// The table `spin` walks: 4 MiB of indices, past the per-core caches.
const TABLE: usize = 1 << 20;
const SYSCALLS: u32 = 200_000;
const ROUND_TRIPS: u32 = 5_000;
/// Connections in flight, rounds and message size of the message-cost figure: 32 × 600 × 2 =
/// 38,400 messages of a post's or a push's size.
const MSG_CONNS: usize = 32;
const MSG_ROUNDS: u32 = 600;
const MSG_BYTES: usize = 200;
/// Messages one notification costs at the least: the post, its answer, the push, the ack.
const MESSAGES_PER_NOTIFICATION: f64 = 4.0;

/// Four independent xorshift chains (they keep several execution units busy, as real code
/// does, so two hardware threads of one core get in each other's way) and a dependent walk
/// through a table larger than a core's caches (memory latency, shared caches).
fn spin(start: &Barrier) -> f64 {
    let mut table: Vec<u32> = (0..TABLE as u32).collect();
    // A fixed shuffle into one long cycle (Sattolo), the same on every run.
    let mut r: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..TABLE).rev() {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        table.swap(i, (r % i as u64) as usize);
    }
    // Both threads' timed loops start together (the shuffle above is not timed).
    start.wait();
    let t = Instant::now();
    let mut x = [0x9e37_79b9_7f4a_7c15u64, 1, 2, 3];
    let mut at = 0usize;
    for i in 0..SPIN {
        for v in &mut x {
            *v ^= *v << 13;
            *v ^= *v >> 7;
            *v ^= *v << 17;
        }
        if i % 16 == 0 {
            at = table[at] as usize;
        }
    }
    std::hint::black_box((x, at));
    t.elapsed().as_secs_f64() * 1e3
}

fn syscall_ns() -> f64 {
    let t = Instant::now();
    for _ in 0..SYSCALLS {
        // SAFETY: getppid has no preconditions and cannot fail.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    t.elapsed().as_secs_f64() * 1e9 / f64::from(SYSCALLS)
}

/// A measuring socket: every small write goes out at once (no Nagle), and a read that waits 5 s
/// fails rather than hangs, so one side's failure ends the other's loop.
fn tuned(s: TcpStream) -> Result<TcpStream, std::io::Error> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn loopback_round_trip_us() -> Result<f64, std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> Result<(), std::io::Error> {
        let mut s = tuned(listener.accept()?.0)?;
        let mut b = [0u8; 1];
        for _ in 0..ROUND_TRIPS {
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
        }
        Ok(())
    });
    // Should the connect fail, the echo thread stays in `accept` until the process ends: a
    // parked thread, nothing more.
    let mut c = tuned(TcpStream::connect(addr)?)?;
    let mut b = [7u8; 1];
    let t = Instant::now();
    for _ in 0..ROUND_TRIPS {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS);
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    Ok(us)
}

/// The calling thread's CPU time (user and system) in µs, on Linux.
#[cfg(target_os = "linux")]
fn thread_cpu_us() -> Option<f64> {
    // SAFETY: `rusage` is plain integers, so all-zero is a valid value; getrusage writes one
    // into the struct it is given and touches nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return None;
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    Some(us(u.ru_utime) + us(u.ru_stime))
}

/// Elsewhere there is no per-thread figure to read (and Herald is measured on Linux).
#[cfg(not(target_os = "linux"))]
fn thread_cpu_us() -> Option<f64> {
    None
}

/// Both threads' CPU time over the timed rounds of [`loopback_messages`].
struct MessageCpu {
    client_us: f64,
    echo_us: f64,
}

impl MessageCpu {
    const MESSAGES: f64 = 2.0 * MSG_CONNS as f64 * MSG_ROUNDS as f64;

    fn per_message_us(&self) -> f64 {
        (self.client_us + self.echo_us) / Self::MESSAGES
    }
}

/// Runs the message-cost rounds (see the module's notes): a client thread writes one message on
/// each of `MSG_CONNS` connections, then reads each one's echo; an echo thread reads and writes
/// back connection by connection. At most one message is in flight per connection and
/// direction, far below the socket buffers, so neither side can block the other for good.
fn loopback_messages() -> Result<MessageCpu, std::io::Error> {
    let unavailable = || std::io::Error::other("no per-thread CPU time on this system");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> Result<f64, std::io::Error> {
        let mut conns = (0..MSG_CONNS)
            .map(|_| tuned(listener.accept()?.0))
            .collect::<Result<Vec<_>, _>>()?;
        let mut b = [0u8; MSG_BYTES];
        let start = thread_cpu_us().ok_or_else(unavailable)?;
        for _ in 0..MSG_ROUNDS {
            for s in &mut conns {
                s.read_exact(&mut b)?;
                s.write_all(&b)?;
            }
        }
        Ok(thread_cpu_us().ok_or_else(unavailable)? - start)
    });
    // As in `loopback_round_trip_us`: should this side fail, the echo thread ends on its read
    // timeout or stays parked in `accept`.
    let mut conns = (0..MSG_CONNS)
        .map(|_| tuned(TcpStream::connect(addr)?))
        .collect::<Result<Vec<_>, _>>()?;
    let mut b = [7u8; MSG_BYTES];
    let start = thread_cpu_us().ok_or_else(unavailable)?;
    for _ in 0..MSG_ROUNDS {
        for c in &mut conns {
            c.write_all(&b)?;
        }
        for c in &mut conns {
            c.read_exact(&mut b)?;
        }
    }
    let client_us = thread_cpu_us().ok_or_else(unavailable)? - start;
    let echo_us = echo
        .join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    Ok(MessageCpu { client_us, echo_us })
}

/// Notifications per second at which four messages each, at `message_cpu_us` apiece, would keep
/// all `cpus` busy: a ceiling the transport alone puts on the rate. None without a usable figure.
fn transport_ceiling_per_s(message_cpu_us: f64, cpus: usize) -> Option<u64> {
    (message_cpu_us.is_finite() && message_cpu_us > 0.0 && cpus > 0)
        .then(|| (cpus as f64 * 1e6 / (MESSAGES_PER_NOTIFICATION * message_cpu_us)).round() as u64)
}

fn cpu_model() -> Value {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| json!(v.trim()))
        })
        .unwrap_or(Value::Null)
}

/// Measures the machine (see the module's notes).
pub fn measure() -> Value {
    let one = spin(&Barrier::new(1));
    let two = {
        let start = std::sync::Arc::new(Barrier::new(2));
        let theirs = start.clone();
        let other = std::thread::spawn(move || spin(&theirs));
        let mine = spin(&start);
        // A thread that cannot panic; were it to, the figure is missing rather than wrong.
        other.join().map(|o| mine.max(o)).unwrap_or(f64::NAN)
    };
    let loopback = loopback_round_trip_us()
        .map_err(|e| eprintln!("herald-bench: loopback round trip not measured: {e}"))
        .ok();
    let message = loopback_messages()
        .map(|m| m.per_message_us())
        .map_err(|e| eprintln!("herald-bench: loopback message cost not measured: {e}"))
        .ok();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({
        "cpu_model": cpu_model(),
        "cpus": cpus,
        "spin_one_thread_ms": round(one, 1),
        "spin_two_threads_ms": round(two, 1),
        "parallel_slowdown": round(two / one, 2),
        "syscall_ns": round(syscall_ns(), 0),
        "loopback_round_trip_us": loopback.map(|v| round(v, 1)),
        "loopback_message_cpu_us": message.map(|v| round(v, 2)),
        "transport_ceiling_per_s": message.and_then(|v| transport_ceiling_per_s(v, cpus)),
    })
}

/// `machine: …` for the summary line's neighbour on stderr.
pub fn line(m: &Value) -> String {
    format!(
        "machine: {} × {}; spin {} ms on one thread, {} ms on two (×{}); syscall {} ns; loopback round trip {} µs; {} µs CPU per loopback message (transport alone fills the cores at {} notifications/s)",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["spin_one_thread_ms"],
        m["spin_two_threads_ms"],
        m["parallel_slowdown"],
        m["syscall_ns"],
        m["loopback_round_trip_us"],
        m["loopback_message_cpu_us"],
        m["transport_ceiling_per_s"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_figures_are_measured_and_named_in_the_line() {
        let ns = syscall_ns();
        assert!(ns > 0.0 && ns < 1e6, "{ns}");
        let rtt = loopback_round_trip_us().expect("loopback echo");
        assert!(rtt > 0.0 && rtt < 1e5, "{rtt}");
        let m = json!({"cpus": 2, "cpu_model": "X", "spin_one_thread_ms": 1.0,
            "spin_two_threads_ms": 2.0, "parallel_slowdown": 2.0, "syscall_ns": ns.round(),
            "loopback_round_trip_us": rtt, "loopback_message_cpu_us": 5.0,
            "transport_ceiling_per_s": 100_000});
        let l = line(&m);
        assert!(
            l.starts_with("machine: 2 × X; spin 1.0 ms on one thread, 2.0 ms on two (×2.0)"),
            "{l}"
        );
        assert!(
            l.ends_with("5.0 µs CPU per loopback message (transport alone fills the cores at 100000 notifications/s)"),
            "{l}"
        );
    }

    #[test]
    fn a_message_costs_both_threads_cpu_time() {
        let m = loopback_messages().expect("loopback messages");
        // Each side did its share of 38,400 sends and receives: CPU time, not wall time, so a
        // busy machine does not inflate it; a microsecond-scale figure either way.
        assert!(
            m.client_us > 0.0 && m.echo_us > 0.0,
            "{} / {}",
            m.client_us,
            m.echo_us
        );
        let per = m.per_message_us();
        assert!(per > 0.1 && per < 1_000.0, "{per} µs per message");
    }

    #[test]
    fn thread_cpu_time_is_this_threads_alone() {
        let before = thread_cpu_us().expect("RUSAGE_THREAD");
        // Another thread burns 30 ms of its own CPU time while this one waits in `join`: a
        // process-wide figure would grow by at least that much.
        std::thread::spawn(|| {
            let start = thread_cpu_us().expect("RUSAGE_THREAD");
            let mut x = 1u64;
            while thread_cpu_us().expect("RUSAGE_THREAD") - start < 30_000.0 {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                }
            }
        })
        .join()
        .expect("spinner");
        let grew = thread_cpu_us().expect("RUSAGE_THREAD") - before;
        assert!(grew < 15_000.0, "this thread's CPU time grew by {grew} µs");
    }

    #[test]
    fn the_ceiling_needs_a_usable_figure() {
        assert_eq!(transport_ceiling_per_s(5.0, 2), Some(100_000));
        assert_eq!(transport_ceiling_per_s(f64::NAN, 2), None);
        assert_eq!(transport_ceiling_per_s(0.0, 2), None);
        assert_eq!(transport_ceiling_per_s(5.0, 0), None);
    }
}
