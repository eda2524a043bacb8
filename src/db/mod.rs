//! The database layer: backend selection, the r2d2 pool, migrations and every SQL statement.
//!
//! Nothing outside `db/` and `actors/db.rs` names a pool or a pooled connection (DESIGN.md,
//! invariant 1). Callers hand the executor a closure over `&mut DbConn`; the connection is
//! borrowed for the length of that synchronous call and returned when it ends.

pub mod batch;
pub mod cluster;
mod fixed;
pub mod listener;
pub mod queries;
pub mod schema;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// How long SQLite waits on a lock held by another process (the CLI, say) before giving up.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;
/// PostgreSQL aborts any statement running longer than this, so no executor thread hangs on one.
const PG_STATEMENT_TIMEOUT_MS: u32 = 10_000;
/// How long r2d2 may spend (re)connecting before `get()` fails; with pool size equal to the
/// executor's thread count a checkout never waits for another thread, only for a reconnect.
const POOL_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// libpq connection settings for every PostgreSQL connection Herald opens, each unless the URL
/// sets it: give up connecting after 5 s; keepalives and a TCP user timeout so a dead path fails
/// a connection's reads and writes within seconds, not the OS default of many minutes (the
/// writer waits for its batch's outcome however long it takes, so a job must not hang forever).
const PG_CONN_OPTIONS: &[(&str, &str)] = &[
    ("connect_timeout", "5"),
    ("keepalives", "1"),
    ("keepalives_idle", "5"),
    ("keepalives_interval", "2"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
];

/// The options a libpq connection string sets, as libpq itself reads it (URL or `key=value`
/// form, percent-decoded); `None` if libpq cannot parse it.
fn pg_conninfo_options(conninfo: &str) -> Option<Vec<(String, String)>> {
    use std::ffi::{CStr, CString};
    let c = CString::new(conninfo).ok()?;
    let mut err: *mut std::os::raw::c_char = std::ptr::null_mut();
    // SAFETY: `c` is a valid C string; libpq returns an array ended by a null keyword (or null
    // on failure, with `err` set to a message we must free), and we free it exactly once.
    unsafe {
        let opts = pq_sys::PQconninfoParse(c.as_ptr(), &mut err);
        if !err.is_null() {
            pq_sys::PQfreemem(err.cast());
        }
        if opts.is_null() {
            return None;
        }
        let mut set = Vec::new();
        let mut p = opts;
        while !(*p).keyword.is_null() {
            if !(*p).val.is_null() {
                set.push((
                    CStr::from_ptr((*p).keyword).to_string_lossy().into_owned(),
                    CStr::from_ptr((*p).val).to_string_lossy().into_owned(),
                ));
            }
            p = p.add(1);
        }
        pq_sys::PQconninfoFree(opts);
        Some(set)
    }
}

/// The connection string Herald gives libpq for `url`: what the URL sets, plus each of
/// [`PG_CONN_OPTIONS`] it does not set, in libpq's `key='value'` form. A URL libpq cannot parse
/// is passed on as it is, for libpq to report (the URL may hold a password, so it is not shown).
pub fn pg_conninfo(url: &str) -> String {
    let Some(mut set) = pg_conninfo_options(url) else {
        return url.to_owned();
    };
    for (k, v) in PG_CONN_OPTIONS {
        if !set.iter().any(|(key, _)| key == k) {
            set.push(((*k).to_owned(), (*v).to_owned()));
        }
    }
    set.iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A connection to either backend. Queries in [`queries`] are written once against it.
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

/// Which database a URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file at this path.
    Sqlite(PathBuf),
    /// A PostgreSQL URL, passed to libpq as it is.
    Postgres(String),
}

impl Backend {
    /// Parses `HERALD_DATABASE_URL`: `sqlite://path`, `sqlite:path`, or `postgres://…`/`postgresql://…`.
    pub fn from_url(url: &str) -> Result<Self, ConnectError> {
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if rest.is_empty() || rest.starts_with(":memory:") {
                return Err(ConnectError::BadUrl(
                    "SQLite needs a file path (an in-memory database would differ per connection)"
                        .into(),
                ));
            }
            return Ok(Backend::Sqlite(PathBuf::from(rest)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Backend::Postgres(url.to_owned()));
        }
        Err(ConnectError::BadUrl(
            "expected sqlite://PATH or postgres://… (the URL itself is not shown: it may hold a password)"
                .into(),
        ))
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self, Backend::Sqlite(_))
    }

    /// Opens one bare connection; [`apply_settings`] must run on it before use.
    fn open(&self) -> Result<DbConn, ConnectError> {
        match self {
            Backend::Sqlite(path) => {
                let path = path
                    .to_str()
                    .ok_or_else(|| ConnectError::BadUrl("path is not UTF-8".into()))?;
                Ok(DbConn::Sqlite(SqliteConnection::establish(path)?))
            }
            Backend::Postgres(url) => Ok(DbConn::Pg(PgConnection::establish(&pg_conninfo(url))?)),
        }
    }

    /// Opens one connection outside any pool (CLI, migrations), with the backend's settings applied.
    pub fn connect(&self) -> Result<DbConn, ConnectError> {
        let mut conn = self.open()?;
        apply_settings(&mut conn)?;
        Ok(conn)
    }

    /// Applies every embedded migration not yet applied; returns how many ran.
    pub fn migrate(&self) -> Result<usize, ConnectError> {
        let ran = match self.connect()? {
            DbConn::Sqlite(mut c) => c.run_pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len()),
            DbConn::Pg(mut c) => {
                // Nodes starting together must not run the same migration twice: the first
                // takes the lock, the others find nothing left to do.
                cluster::lock_migrations(&mut c)
                    .map_err(|e| ConnectError::Migration(e.to_string()))?;
                let ran = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|v| v.len());
                let _ = cluster::unlock_migrations(&mut c);
                ran
            }
        };
        ran.map_err(|e| ConnectError::Migration(e.to_string()))
    }
}

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad database URL: {0}")]
    BadUrl(String),
    #[error("cannot connect to the database: {0}")]
    Connection(#[from] diesel::ConnectionError),
    #[error("cannot set up the connection: {0}")]
    Setup(#[from] diesel::result::Error),
    #[error("cannot open the connection pool: {0}")]
    Pool(String),
    #[error("migration failed: {0}")]
    Migration(String),
}

/// Per-connection settings. SQLite: the busy timeout first (so the WAL switch itself waits out a
/// lock), then WAL so readers never block the writer, full fsync on commit (a `202` survives power
/// loss), and foreign keys. PostgreSQL: timeouts so no executor thread can hang on a statement.
fn apply_settings(conn: &mut DbConn) -> Result<(), ConnectError> {
    let sql = match conn {
        DbConn::Sqlite(_) => format!(
            "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS};
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;"
        ),
        DbConn::Pg(_) => format!(
            "SET statement_timeout = {PG_STATEMENT_TIMEOUT_MS};
             SET lock_timeout = {PG_STATEMENT_TIMEOUT_MS};
             SET idle_in_transaction_session_timeout = {PG_STATEMENT_TIMEOUT_MS};"
        ),
    };
    conn.batch_execute(&sql)?;
    Ok(())
}

/// Applies [`apply_settings`] to every connection the pool opens.
#[derive(Debug)]
struct Customizer;
impl r2d2::CustomizeConnection<DbConn, ConnectError> for Customizer {
    fn on_acquire(&self, conn: &mut DbConn) -> Result<(), ConnectError> {
        apply_settings(conn)
    }
}

/// Runs `f` in one write transaction. On SQLite it is `BEGIN IMMEDIATE`, so the write lock is
/// taken up front and a read-then-write transaction cannot fail half-way with "database is locked".
pub fn write_tx<R>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> QueryResult<R>,
) -> QueryResult<R> {
    match conn {
        DbConn::Sqlite(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?,
        DbConn::Pg(c) => AnsiTransactionManager::begin_transaction(c)?,
    }
    let result = f(conn);
    match (result, conn) {
        (Ok(r), DbConn::Sqlite(c)) => AnsiTransactionManager::commit_transaction(c).map(|_| r),
        (Ok(r), DbConn::Pg(c)) => AnsiTransactionManager::commit_transaction(c).map(|_| r),
        (Err(e), DbConn::Sqlite(c)) => {
            let _ = AnsiTransactionManager::rollback_transaction(c);
            Err(e)
        }
        (Err(e), DbConn::Pg(c)) => {
            let _ = AnsiTransactionManager::rollback_transaction(c);
            Err(e)
        }
    }
}

thread_local! {
    /// Set by a job on this thread whose connection was lost; consumed by `has_broken` when the
    /// connection is handed back (which happens on the same thread, as the job ends).
    static CONNECTION_LOST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a query failed because the connection itself is gone (the server stopped, restarted
/// or the network dropped): "not now", not a bug. libpq reports these without a SQLSTATE, so
/// besides diesel's kinds this looks at libpq's own messages.
pub fn is_connection_lost(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error as Q};
    match e {
        Q::DatabaseError(K::ClosedConnection | K::UnableToSendCommand, _) => true,
        Q::DatabaseError(_, info) => {
            let m = info.message();
            [
                "server closed the connection",
                "terminating connection",
                "no connection to the server",
                "could not receive data from server",
                "could not send data to server",
                "connection to server",
                "SSL connection has been closed",
                "SSL SYSCALL error",
                "EOF detected",
                "Connection reset",
                "Broken pipe",
            ]
            .iter()
            .any(|needle| m.contains(needle))
        }
        _ => false,
    }
}

/// Counters of the pool, shared with `/v1/stats`. `in_use`/`idle` come from r2d2's own state.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Checkouts that found no idle connection and had to wait for one to be made.
    pub waits: AtomicU64,
    /// Checkouts that gave up after `POOL_CONNECTION_TIMEOUT`.
    pub timeouts: AtomicU64,
    /// Connections checked out right now (tracked here to keep the high-water mark).
    pub in_use: AtomicU64,
    /// The most connections ever checked out at once.
    pub max_in_use: AtomicU64,
}

/// A snapshot of the pool for `/v1/stats`.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = DbPoolStats)]
pub struct PoolSnapshot {
    pub size: u32,
    pub idle: u32,
    pub in_use: u32,
    pub max_in_use: u64,
    pub waits: u64,
    pub timeouts: u64,
}

struct Manager {
    backend: Backend,
}

impl r2d2::ManageConnection for Manager {
    type Connection = DbConn;
    type Error = ConnectError;

    fn connect(&self) -> Result<DbConn, ConnectError> {
        self.backend.open()
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), ConnectError> {
        conn.batch_execute("SELECT 1").map_err(ConnectError::Setup)
    }

    /// A connection is thrown away rather than reused when the job that used it lost the
    /// connection itself (the server went away), or handed it back inside a transaction (a
    /// handler that panicked half-way) or with a broken transaction state. This replaces a
    /// `SELECT 1` on every checkout: a dead connection costs one failed job, then is replaced.
    fn has_broken(&self, conn: &mut DbConn) -> bool {
        use diesel::connection::TransactionManagerStatus;
        if CONNECTION_LOST.with(|lost| lost.replace(false)) {
            return true;
        }
        match <DbConn as Connection>::TransactionManager::transaction_manager_status_mut(conn) {
            TransactionManagerStatus::Valid(v) => v.transaction_depth().is_some(),
            TransactionManagerStatus::InError => true,
        }
    }
}

#[derive(Debug)]
struct PoolEvents(Arc<PoolCounters>);

impl r2d2::HandleEvent for PoolEvents {
    fn handle_checkout(&self, _event: r2d2::event::CheckoutEvent) {
        let now = self.0.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.0.max_in_use.fetch_max(now, Ordering::Relaxed);
    }
    fn handle_checkin(&self, _event: r2d2::event::CheckinEvent) {
        self.0.in_use.fetch_sub(1, Ordering::Relaxed);
    }
    fn handle_timeout(&self, _event: r2d2::event::TimeoutEvent) {
        self.0.timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct QuietErrors;
impl r2d2::HandleError<ConnectError> for QuietErrors {
    fn handle_error(&self, error: ConnectError) {
        log::warn!("database connection failed: {error}");
    }
}

/// The pool. Only the executor (`actors/db.rs`) holds it; it checks a connection out inside a
/// synchronous handler and returns it when the handler returns.
#[derive(Clone)]
pub struct DbPool {
    pool: r2d2::Pool<Manager>,
    counters: Arc<PoolCounters>,
}

impl fmt::Debug for DbPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbPool")
            .field("state", &self.pool.state())
            .finish()
    }
}

/// Why a unit of database work did not run or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection: {0}")]
    Unavailable(String),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
}

impl DbPool {
    /// Builds a pool of exactly `size` connections, all opened now (so a dead database is reported
    /// at start-up, and no early request waits for a connection to be made). Connections are kept
    /// for good: no idle timeout or lifetime that would have the pool replace them under load.
    pub fn build(backend: &Backend, size: u32) -> Result<Self, ConnectError> {
        let counters = Arc::new(PoolCounters::default());
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(size))
            .connection_timeout(POOL_CONNECTION_TIMEOUT)
            .test_on_check_out(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connection_customizer(Box::new(Customizer))
            .error_handler(Box::new(QuietErrors))
            .event_handler(Box::new(PoolEvents(counters.clone())))
            .build(Manager {
                backend: backend.clone(),
            })
            .map_err(|e| ConnectError::Pool(e.to_string()))?;
        Ok(DbPool { pool, counters })
    }

    /// Checks a connection out, runs `f`, and returns the connection — all on this thread.
    pub fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<R, DbError>,
    ) -> Result<R, DbError> {
        if self.pool.state().idle_connections == 0 {
            self.counters.waits.fetch_add(1, Ordering::Relaxed);
        }
        let mut conn = self
            .pool
            .get()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        let result = f(&mut conn);
        if let Err(DbError::Query(e)) = &result {
            if is_connection_lost(e) {
                // Read by `has_broken` when `conn` is dropped below, on this same thread.
                CONNECTION_LOST.with(|lost| lost.set(true));
            }
        }
        drop(conn);
        result
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let state = self.pool.state();
        let in_use = self.counters.in_use.load(Ordering::Relaxed) as u32;
        PoolSnapshot {
            size: self.pool.max_size(),
            idle: state.idle_connections,
            in_use,
            max_in_use: self.counters.max_in_use.load(Ordering::Relaxed),
            waits: self.counters.waits.load(Ordering::Relaxed),
            timeouts: self.counters.timeouts.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pooled SQLite connection gets the busy timeout, WAL and full fsync.
    #[test]
    fn every_pooled_sqlite_connection_is_tuned() {
        #[derive(QueryableByName)]
        struct Pragma {
            #[diesel(sql_type = diesel::sql_types::Text)]
            value: String,
        }
        let dir = tempfile::tempdir().unwrap();
        let backend =
            Backend::from_url(&format!("sqlite://{}", dir.path().join("t.db").display())).unwrap();
        backend.migrate().unwrap();
        let pool = DbPool::build(&backend, 3).unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.pool.get().unwrap());
        }
        for conn in &mut held {
            let mut pragma = |sql: &str| {
                diesel::sql_query(format!("SELECT CAST(({sql}) AS TEXT) AS value"))
                    .get_result::<Pragma>(&mut **conn)
                    .unwrap()
                    .value
            };
            assert_eq!(pragma("SELECT * FROM pragma_busy_timeout"), "5000");
            assert_eq!(pragma("SELECT * FROM pragma_journal_mode"), "wal");
            assert_eq!(pragma("SELECT * FROM pragma_synchronous"), "2");
            assert_eq!(pragma("SELECT * FROM pragma_foreign_keys"), "1");
        }
        assert_eq!(pool.snapshot().in_use, 3);
        drop(held);
        assert_eq!(pool.snapshot().in_use, 0);
    }

    #[test]
    fn a_lost_server_is_not_a_bug() {
        use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error};
        struct Msg(&'static str);
        impl DatabaseErrorInformation for Msg {
            fn message(&self) -> &str {
                self.0
            }
            fn details(&self) -> Option<&str> {
                None
            }
            fn hint(&self) -> Option<&str> {
                None
            }
            fn table_name(&self) -> Option<&str> {
                None
            }
            fn column_name(&self) -> Option<&str> {
                None
            }
            fn constraint_name(&self) -> Option<&str> {
                None
            }
            fn statement_position(&self) -> Option<i32> {
                None
            }
        }
        let err = |m| Error::DatabaseError(DatabaseErrorKind::Unknown, Box::new(Msg(m)));
        assert!(is_connection_lost(&err("SSL SYSCALL error: EOF detected")));
        assert!(is_connection_lost(&err(
            "server closed the connection unexpectedly"
        )));
        assert!(is_connection_lost(&err(
            "could not receive data from server: Connection reset by peer"
        )));
        assert!(!is_connection_lost(&err(
            "duplicate key value violates unique constraint"
        )));
        assert!(!is_connection_lost(&Error::NotFound));
    }

    #[test]
    fn postgres_urls_get_timeouts_they_do_not_set() {
        let options = |url: &str| -> std::collections::HashMap<String, String> {
            pg_conninfo_options(&pg_conninfo(url))
                .expect("the result parses")
                .into_iter()
                .collect()
        };
        let o = options("postgres://u@h:5433/db");
        assert_eq!(o["user"], "u");
        assert_eq!(o["host"], "h");
        assert_eq!(o["port"], "5433");
        assert_eq!(o["dbname"], "db");
        assert_eq!(o["keepalives"], "1");
        assert_eq!(o["keepalives_idle"], "5");
        assert_eq!(o["tcp_user_timeout"], "10000");
        assert_eq!(o["connect_timeout"], "5");
        // Settings the URL makes are kept; a trailing `?` is no trouble.
        let o = options("postgres://u@h/db?sslmode=disable&tcp_user_timeout=0&connect_timeout=30");
        assert_eq!(o["sslmode"], "disable");
        assert_eq!(o["tcp_user_timeout"], "0");
        assert_eq!(o["connect_timeout"], "30");
        assert_eq!(o["keepalives_count"], "3");
        assert_eq!(options("postgres://u@h/db?")["dbname"], "db");
        // A password with quotes, backslashes and an encoded `?` survives the quoting.
        let o = options("postgresql://u:p%27%5C%3Fw@h/db");
        assert_eq!(o["password"], "p'\\?w");
        assert_eq!(o["dbname"], "db");
        // What libpq cannot parse goes to libpq as it is, to be refused there.
        assert_eq!(
            pg_conninfo("postgres://h/db?nosuch=1"),
            "postgres://h/db?nosuch=1"
        );
    }

    #[test]
    fn database_urls_are_recognised_or_refused() {
        assert_eq!(
            Backend::from_url("sqlite://herald.db").unwrap(),
            Backend::Sqlite("herald.db".into())
        );
        assert_eq!(
            Backend::from_url("sqlite:///var/lib/h.db").unwrap(),
            Backend::Sqlite("/var/lib/h.db".into())
        );
        assert!(Backend::from_url("postgres://u@h/db").unwrap() != Backend::Sqlite("x".into()));
        assert!(Backend::from_url("sqlite://:memory:").is_err());
        let err = Backend::from_url("mysql://root:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
