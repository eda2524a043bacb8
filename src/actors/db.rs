//! The DbExecutor: `SyncArbiter` threads that alone hold pooled database connections.
//!
//! Each handler checks a connection out, runs one closure (one unit of work), and returns the
//! connection before it returns — nothing async ever holds one (DESIGN.md, invariant 1). The pool
//! has exactly as many connections as there are executor threads, so a checkout never waits for
//! another thread (invariant 2). Back-pressure is the mailbox: its depth is bounded, every job
//! carries a deadline, and a full or late mailbox answers [`JobError::Overloaded`] or
//! [`JobError::Timeout`] (an HTTP `503` with `Retry-After`), never a hang.
//!
//! SQLite allows one writer at a time, so writes get their own single thread and reads the rest;
//! PostgreSQL is served the same way, which also keeps the commit order of a node's writes equal
//! to the order of their `seq` numbers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::db::{Backend, ConnectError, DbConn, DbError, DbPool, PoolSnapshot};

/// One executor thread and the pool handle it borrows connections from.
pub struct DbExecutor {
    pool: DbPool,
    /// Time each job holds this thread and its connection.
    job_duration: prometheus::Histogram,
}

impl Actor for DbExecutor {
    type Context = SyncContext<Self>;
}

type Work<R> = Box<dyn FnOnce(&mut DbConn) -> Result<R, DbError> + Send>;

/// One unit of database work: a closure run on an executor thread with a borrowed connection.
pub struct Job<R> {
    /// Past this instant the job is not started (its caller has already answered `503`).
    deadline: Instant,
    /// Taken out when the job runs.
    work: Option<Work<R>>,
    /// The mailbox this job counts against until it is dropped, however that happens.
    queue: Arc<QueueCounters>,
    /// Set for a job whose caller waits for its outcome (`Db::write_to_end`): such a caller never
    /// times out, so if the job is late the handler counts it.
    count_late: bool,
}

impl<R> Drop for Job<R> {
    fn drop(&mut self) {
        self.queue.depth.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<R: Send + 'static> Message for Job<R> {
    type Result = Result<R, JobError>;
}

impl<R: Send + 'static> Handler<Job<R>> for DbExecutor {
    type Result = Result<R, JobError>;

    fn handle(&mut self, mut job: Job<R>, _: &mut SyncContext<Self>) -> Self::Result {
        // A late job's caller has already answered (and counted) the timeout, unless it waits
        // for the outcome (`Db::write_to_end`).
        let work = match job.work.take() {
            Some(work) if Instant::now() < job.deadline => work,
            _ => {
                if job.count_late {
                    job.queue.late.fetch_add(1, Ordering::Relaxed);
                }
                return Err(JobError::Timeout);
            }
        };
        let pool = &self.pool;
        let _timer = self.job_duration.start_timer();
        match catch_unwind(AssertUnwindSafe(|| pool.with_conn(work))) {
            Ok(result) => result.map_err(JobError::from),
            Err(_) => {
                // The connection went back to the pool as it unwound; if it was inside a
                // transaction, the pool's `has_broken` check throws it away.
                log::error!("a database job panicked; the executor thread carries on");
                Err(JobError::Panicked)
            }
        }
    }
}

/// Why a job gave no result.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the database executor is overloaded")]
    Overloaded,
    #[error("the database did not answer within the deadline")]
    Timeout,
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("query failed: {0}")]
    Query(diesel::result::Error),
    #[error("a database job panicked")]
    Panicked,
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => JobError::Unavailable(m),
            DbError::Query(q) => JobError::Query(q),
        }
    }
}

/// Depth and refusals of one executor's mailbox.
#[derive(Debug, Default)]
struct QueueCounters {
    depth: AtomicU64,
    max_depth: AtomicU64,
    rejected: AtomicU64,
    late: AtomicU64,
}

/// `/v1/stats` view of the executors' mailboxes.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct QueueSnapshot {
    /// Jobs waiting or running now.
    pub queue_depth: u64,
    /// The most jobs ever waiting at once.
    pub max_queue_depth: u64,
    /// Jobs refused because the mailbox was full.
    pub rejected: u64,
    /// Jobs that timed out: their caller gave up waiting, or their deadline passed before a
    /// thread took them.
    pub timeouts: u64,
}

/// One executor (its threads share one mailbox) and the counters of that mailbox.
#[derive(Clone)]
struct Executor {
    addr: Addr<DbExecutor>,
    queue: Arc<QueueCounters>,
}

impl Executor {
    fn start(
        name: &'static str,
        threads: usize,
        pool: &DbPool,
        job_duration: &prometheus::Histogram,
    ) -> Self {
        let queue = Arc::new(QueueCounters::default());
        let (pool, job_duration) = (pool.clone(), job_duration.clone());
        let mut n = 0;
        let addr = SyncArbiter::start_with_thread_builder(
            threads,
            || {
                n += 1;
                std::thread::Builder::new().name(format!("herald-db-{name}-{n}"))
            },
            move || DbExecutor {
                pool: pool.clone(),
                job_duration: job_duration.clone(),
            },
        );
        Executor { addr, queue }
    }
}

/// The handle the rest of Herald uses to run database work. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    writer: Executor,
    reader: Executor,
    pool: DbPool,
    backend: Backend,
    /// Most jobs one executor's mailbox may hold before new ones are refused.
    queue_limit: u64,
    /// How long a caller waits for a job by default.
    deadline: Duration,
}

impl Db {
    /// Opens the pool (`pool_size` connections) and starts as many executor threads: one writer
    /// and `pool_size - 1` readers; with a pool of 1 the one thread does both.
    pub fn start(
        backend: &Backend,
        pool_size: u32,
        queue_limit: u64,
        deadline: Duration,
        job_duration: &prometheus::Histogram,
    ) -> Result<Db, ConnectError> {
        let pool_size = pool_size.max(1);
        let pool = DbPool::build(backend, pool_size)?;
        let writer = Executor::start("writer", 1, &pool, job_duration);
        let reader = if pool_size == 1 {
            writer.clone()
        } else {
            Executor::start("reader", (pool_size - 1) as usize, &pool, job_duration)
        };
        Ok(Db {
            writer,
            reader,
            pool,
            backend: backend.clone(),
            queue_limit,
            deadline,
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The default deadline for a job started now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.deadline
    }

    /// Runs read-only work on a reader thread.
    pub async fn read<R, F>(&self, deadline: Instant, work: F) -> Result<R, JobError>
    where
        R: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<R, DbError> + Send + 'static,
    {
        Self::run(&self.reader, self.queue_limit, deadline, work).await
    }

    /// Runs one write transaction's worth of work on the writer thread.
    pub async fn write<R, F>(&self, deadline: Instant, work: F) -> Result<R, JobError>
    where
        R: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<R, DbError> + Send + 'static,
    {
        Self::run(&self.writer, self.queue_limit, deadline, work).await
    }

    /// Like [`Db::write`], but once the writer has started the work this waits for its outcome
    /// however long it takes, so `Ok` means committed; an error means not committed, except a
    /// connection lost during the commit itself (then nobody can tell). Only work still queued at
    /// `deadline` is given up (`Timeout`). For a caller that must act on
    /// what was committed (the Committer publishes a batch's notifications); it relies on the
    /// connection's own timeouts to bound a job.
    pub async fn write_to_end<R, F>(&self, deadline: Instant, work: F) -> Result<R, JobError>
    where
        R: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<R, DbError> + Send + 'static,
    {
        let mut job = Self::job(&self.writer, self.queue_limit, deadline, work)?;
        job.count_late = true;
        match self.writer.addr.send(job).await {
            Ok(result) => result,
            Err(_mailbox) => Err(JobError::Unavailable("executor stopped".into())),
        }
    }

    /// Counts a job against `ex`'s mailbox, or refuses it when the mailbox is full.
    fn job<R, F>(ex: &Executor, limit: u64, deadline: Instant, work: F) -> Result<Job<R>, JobError>
    where
        R: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<R, DbError> + Send + 'static,
    {
        let q = &ex.queue;
        let depth = q.depth.fetch_add(1, Ordering::Relaxed) + 1;
        if depth > limit {
            q.depth.fetch_sub(1, Ordering::Relaxed);
            q.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(JobError::Overloaded);
        }
        q.max_depth.fetch_max(depth, Ordering::Relaxed);
        Ok(Job {
            deadline,
            work: Some(Box::new(work)),
            queue: q.clone(),
            count_late: false,
        })
    }

    async fn run<R, F>(ex: &Executor, limit: u64, deadline: Instant, work: F) -> Result<R, JobError>
    where
        R: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<R, DbError> + Send + 'static,
    {
        let job = Self::job(ex, limit, deadline, work)?;
        let q = &ex.queue;
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, ex.addr.send(job)).await {
            Ok(Ok(result)) => result,
            // The executor is gone only while the system shuts down.
            Ok(Err(_mailbox)) => Err(JobError::Unavailable("executor stopped".into())),
            Err(_elapsed) => {
                q.late.fetch_add(1, Ordering::Relaxed);
                Err(JobError::Timeout)
            }
        }
    }

    /// Whether the database answers a trivial query within `timeout` (for `/readyz`).
    pub async fn ping(&self, timeout: Duration) -> Result<(), JobError> {
        self.read(Instant::now() + timeout, |c| {
            crate::db::queries::ping(c).map_err(DbError::from)
        })
        .await
    }

    pub fn pool_snapshot(&self) -> PoolSnapshot {
        self.pool.snapshot()
    }

    /// The readers' and the writer's mailboxes, summed.
    pub fn queue_snapshot(&self) -> QueueSnapshot {
        let mut s = QueueSnapshot::default();
        let mut add = |q: &QueueCounters| {
            s.queue_depth += q.depth.load(Ordering::Relaxed);
            s.max_queue_depth = s.max_queue_depth.max(q.max_depth.load(Ordering::Relaxed));
            s.rejected += q.rejected.load(Ordering::Relaxed);
            s.timeouts += q.late.load(Ordering::Relaxed);
        };
        add(&self.writer.queue);
        if !Arc::ptr_eq(&self.writer.queue, &self.reader.queue) {
            add(&self.reader.queue);
        }
        s
    }
}
