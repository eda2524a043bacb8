//! The writer's own cost, without the network: the batches a steady delivery run gives the single
//! writer (`db::batch::commit`), on a fresh SQLite file (and on PostgreSQL when
//! `HERALD_BENCH_PG_URL` names a database this bench may fill).
//!
//! Each round is one transaction holding `K` new posts (one device each, round-robin over the
//! devices), the delivery marks of the previous round's posts and the acks of the round before
//! that — what the Committer gathers when devices ack everything. Prints, per post, the writer
//! thread's CPU time (`getrusage(RUSAGE_THREAD)`) and wall time; the CPU figure includes the
//! kernel's share (WAL writes, the sync's set-up) but not the time spent waiting for the disk.
//!
//! On a noisy machine, count instructions instead, which do not depend on what else runs:
//! `valgrind --tool=callgrind --toggle-collect='herald::db::batch::commit'
//! target/release/deps/writer-<hash>` (the `Ir` total divided by the posts; docs/BENCHMARKS.md
//! has the command and figures).
//!
//! `cargo bench --bench writer` (environment: `WRITER_BENCH_POSTS_PER_BATCH`, default 16;
//! `WRITER_BENCH_ROUNDS`, default 2,000; `WRITER_BENCH_DEVICES`, default 1,000;
//! `WRITER_BENCH_ACKS_OVERTAKE=1`: each post acked in the same round as its mark, so the ack
//! finds it pending and the mark then finds nothing to change — as when devices answer faster
//! than marks are written).

use std::time::Instant;

use herald::db::batch::{self, PostInput, WriteBatch};
use herald::db::queries::{self, DeviceRow};
use herald::db::Backend;
use herald::domain::{hash_secret, new_id, now_ms};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// `(device, notification id, seq)` of one committed post.
type Posted = (String, String, i64);

fn run(label: &str, backend: &Backend, k: usize, rounds: usize, n_devices: usize, overtake: bool) {
    backend.migrate().expect("migrations");
    let mut conn = backend.connect().expect("connect");
    let devices: Vec<String> = (0..n_devices)
        .map(|i| {
            let row = DeviceRow {
                id: new_id(),
                user_id: format!("bench-user-{i}"),
                name: "bench".into(),
                token_hash: hash_secret(&format!("writer-bench-{label}-{i}-{}", new_id())),
                created_at: now_ms(),
                revoked_at: None,
                last_seen: None,
            };
            queries::insert_device(&mut conn, &row).expect("insert device");
            row.id
        })
        .collect();

    // The posts of the last two rounds: the last one's are marked, the one before's acked.
    let mut last: Vec<Posted> = Vec::new();
    let mut before_last: Vec<Posted> = Vec::new();
    let (mut cpu, mut wall, mut posts) = (0.0, 0.0, 0usize);
    let warmup = rounds / 10;
    for round in 0..rounds {
        let mut b = WriteBatch::default();
        for i in 0..k {
            let device = &devices[(round * k + i) % devices.len()];
            b.posts.push(PostInput {
                id: new_id(),
                poster: "admin".into(),
                idempotency_key: None,
                request_hash: None,
                user_ids: Vec::new(),
                device_ids: vec![device.clone()],
                payload: r#"{"title":"writer bench","n":12345,"sent_ns":1764000000000000000}"#
                    .into(),
                ttl_ms: 3_600_000,
            });
        }
        b.delivered = last
            .iter()
            .map(|(d, _, seq)| (d.clone(), vec![*seq]))
            .collect();
        // Acks overtaking their marks: acked in the round they are marked, so each finds its
        // delivery still pending (the batch writes acks first).
        let acked = if overtake { &last } else { &before_last };
        b.acks = acked
            .iter()
            .map(|(d, id, _)| (d.clone(), vec![id.clone()]))
            .collect();

        let (c0, w0) = (thread_cpu_us(), Instant::now());
        let result = batch::commit(&mut conn, &b, now_ms()).expect("commit");
        let (c1, w1) = (thread_cpu_us(), w0.elapsed());
        assert_eq!(result.acked as usize, acked.len(), "every ack lands");
        assert_eq!(
            result.delivered as usize,
            last.len(),
            "every post is delivered once"
        );
        if round >= warmup {
            cpu += c1 - c0;
            wall += w1.as_secs_f64() * 1e6;
            posts += k;
        }

        before_last = std::mem::take(&mut last);
        last = b
            .posts
            .iter()
            .zip(&result.posts)
            .map(|(p, outcome)| match outcome {
                batch::PostOutcome::Created { seq, .. } => {
                    (p.device_ids[0].clone(), p.id.clone(), *seq)
                }
                other => panic!("post not created: {other:?}"),
            })
            .collect();
    }
    println!(
        "writer {label}: {posts} posts in batches of {k} (+ as many marks and acks): \
         Herald's CPU {:.2} µs/post (a database server's own is not counted), wall {:.2} µs/post",
        cpu / posts as f64,
        wall / posts as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let k = env_usize("WRITER_BENCH_POSTS_PER_BATCH", 16).max(1);
    let rounds = env_usize("WRITER_BENCH_ROUNDS", 2_000).max(2);
    let n_devices = env_usize("WRITER_BENCH_DEVICES", 1_000).max(1);
    let overtake = env_usize("WRITER_BENCH_ACKS_OVERTAKE", 0) == 1;

    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("writer.db").display());
    run(
        "sqlite",
        &Backend::from_url(&url).expect("url"),
        k,
        rounds,
        n_devices,
        overtake,
    );
    if let Ok(url) = std::env::var("HERALD_BENCH_PG_URL") {
        run(
            "postgres",
            &Backend::from_url(&url).expect("url"),
            k,
            rounds,
            n_devices,
            overtake,
        );
    }
}
