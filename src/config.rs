//! Settings, from flags or `HERALD_*` environment variables. Every setting has a default that
//! works; secrets are never printed (`Secret`'s `Debug` is redacted and `--help` hides env values).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://herald.db";
pub const DEFAULT_DB_POOL_SIZE: u32 = 4;
pub const DEFAULT_DB_QUEUE_LIMIT: u64 = 1024;
pub const DEFAULT_DB_DEADLINE_MS: u64 = 3_000;
pub const DEFAULT_MIN_COMMIT_INTERVAL_US: u64 = 1_000;
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 15_000;
pub const DEFAULT_WS_MAX_FRAME_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_BODY_BYTES: usize = 512 * 1024;
pub const DEFAULT_RETENTION_SECONDS: u64 = 86_400;
pub const DEFAULT_PURGE_INTERVAL_MS: u64 = 60_000;
pub const DEFAULT_WS_OUTBOUND_MAX_BYTES: usize = 512 * 1024;
pub const DEFAULT_WS_OUTBOUND_MAX_FRAMES: usize = 2048;
pub const DEFAULT_WS_SLOW_GRACE_MS: u64 = 10_000;
pub const DEFAULT_WS_MAX_FRAMES_PER_SECOND: u32 = 200;
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 1_000;
pub const DEFAULT_CONNECT_RATE_PER_IP: f64 = 500.0;
pub const DEFAULT_CONNECT_BURST_PER_IP: u32 = 5_000;
pub const DEFAULT_AUTH_FAILURE_RATE_PER_IP: f64 = 1.0;
pub const DEFAULT_AUTH_FAILURE_BURST_PER_IP: u32 = 100;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_NODE_LEASE_MS: u64 = 10_000;

/// A secret from the command line or environment; `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// Database URL: sqlite://PATH (embedded, the default) or postgres://USER@HOST:PORT/DB.
    #[arg(long, env = "HERALD_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "HERALD_BIND", default_value = DEFAULT_BIND)]
    pub bind: String,

    #[command(flatten)]
    pub db: DatabaseArgs,

    /// The admin bearer token. If unset, one is generated on first start into the admin token file.
    #[arg(long, env = "HERALD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Where a generated admin token is kept (mode 0600) [default: herald-admin.token beside the
    /// SQLite file, or in the working directory for PostgreSQL].
    #[arg(long, env = "HERALD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Pooled database connections; the executor runs exactly as many threads (one writer, the
    /// rest readers), so no request ever waits for a connection.
    #[arg(long, env = "HERALD_DB_POOL_SIZE", default_value_t = DEFAULT_DB_POOL_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub db_pool_size: u32,

    /// Database jobs that may wait per executor before new ones are refused with 503.
    #[arg(long, env = "HERALD_DB_QUEUE_LIMIT", default_value_t = DEFAULT_DB_QUEUE_LIMIT)]
    pub db_queue_limit: u64,

    /// How long a request waits for the database before it is answered 503.
    #[arg(long, env = "HERALD_DB_DEADLINE_MS", default_value_t = DEFAULT_DB_DEADLINE_MS)]
    pub db_deadline_ms: u64,

    /// Shortest time between the starts of two write transactions while work someone waits on
    /// (posts, a replay's barrier, presence rows) keeps arriving: what arrives within it shares
    /// the next commit and its disk sync. A post arriving when the last transaction started
    /// longer ago is committed at once; 0 commits whenever the writer is free. At most 100 ms
    /// (100000); the timer's resolution is 1 ms.
    #[arg(long, env = "HERALD_MIN_COMMIT_INTERVAL_US", default_value_t = DEFAULT_MIN_COMMIT_INTERVAL_US,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub min_commit_interval_us: u64,

    /// Interval of server pings; a session silent for two intervals is closed.
    #[arg(long, env = "HERALD_HEARTBEAT_INTERVAL_MS", default_value_t = DEFAULT_HEARTBEAT_INTERVAL_MS)]
    pub heartbeat_interval_ms: u64,

    /// Largest WebSocket message a device may send (close 1009 past it).
    #[arg(long, env = "HERALD_WS_MAX_FRAME_BYTES", default_value_t = DEFAULT_WS_MAX_FRAME_BYTES)]
    pub ws_max_frame_bytes: usize,

    /// Largest HTTP request body (413 past it).
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// How long a notification is kept after it expires (with its delivery states, for the
    /// status API) before it is purged.
    #[arg(long, env = "HERALD_RETENTION_SECONDS", default_value_t = DEFAULT_RETENTION_SECONDS)]
    pub retention_seconds: u64,

    /// How often expired notifications past their retention are purged (in batches).
    #[arg(long, env = "HERALD_PURGE_INTERVAL_MS", default_value_t = DEFAULT_PURGE_INTERVAL_MS)]
    pub purge_interval_ms: u64,

    /// Bytes of frames waiting for a device's socket past which live pushes stop and the session
    /// catches up from the database once the device reads.
    #[arg(long, env = "HERALD_WS_OUTBOUND_MAX_BYTES", default_value_t = DEFAULT_WS_OUTBOUND_MAX_BYTES)]
    pub ws_outbound_max_bytes: usize,

    /// Frames waiting for a device's socket past which the same happens.
    #[arg(long, env = "HERALD_WS_OUTBOUND_MAX_FRAMES", default_value_t = DEFAULT_WS_OUTBOUND_MAX_FRAMES)]
    pub ws_outbound_max_frames: usize,

    /// How long a device may leave its outbound buffer full before it is closed with 4008.
    #[arg(long, env = "HERALD_WS_SLOW_GRACE_MS", default_value_t = DEFAULT_WS_SLOW_GRACE_MS)]
    pub ws_slow_grace_ms: u64,

    /// Frames per second a device may send (bursts of ten seconds' worth); past it its socket is
    /// read no faster. 0: no limit.
    #[arg(long, env = "HERALD_WS_MAX_FRAMES_PER_SECOND", default_value_t = DEFAULT_WS_MAX_FRAMES_PER_SECOND)]
    pub ws_max_frames_per_second: u32,

    /// Devices of one user that may be online at once (429 past it). 0: no limit.
    #[arg(long, env = "HERALD_MAX_SESSIONS_PER_USER", default_value_t = DEFAULT_MAX_SESSIONS_PER_USER)]
    pub max_sessions_per_user: usize,

    /// WebSocket connection attempts per second from one address (429 past it). 0: no limit.
    #[arg(long, env = "HERALD_CONNECT_RATE_PER_IP", default_value_t = DEFAULT_CONNECT_RATE_PER_IP)]
    pub connect_rate_per_ip: f64,

    /// Connection attempts one address may make at once before the rate applies.
    #[arg(long, env = "HERALD_CONNECT_BURST_PER_IP", default_value_t = DEFAULT_CONNECT_BURST_PER_IP)]
    pub connect_burst_per_ip: u32,

    /// Requests with a wrong credential per second from one address once its burst is spent;
    /// past it every authenticated request from the address is answered 429. 0: no limit.
    #[arg(long, env = "HERALD_AUTH_FAILURE_RATE_PER_IP", default_value_t = DEFAULT_AUTH_FAILURE_RATE_PER_IP)]
    pub auth_failure_rate_per_ip: f64,

    /// Requests with a wrong credential one address may make at once.
    #[arg(long, env = "HERALD_AUTH_FAILURE_BURST_PER_IP", default_value_t = DEFAULT_AUTH_FAILURE_BURST_PER_IP)]
    pub auth_failure_burst_per_ip: u32,

    /// Proxies (comma-separated IP addresses) whose `X-Forwarded-For` names the client for the
    /// per-address limits. Unset: the peer address is the client.
    #[arg(long, env = "HERALD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<std::net::IpAddr>,

    /// How long a connection may take to send its request head (a WebSocket upgrade included)
    /// before it is dropped.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT_MS", default_value_t = DEFAULT_HANDSHAKE_TIMEOUT_MS)]
    pub handshake_timeout_ms: u64,

    /// This node's name among several on one PostgreSQL [default: generated at each start].
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,

    /// How long a node's lease lasts (renewed every third of it); a node that stops renewing —
    /// killed, or cut off from the database — has its presence cleared by the others after this.
    #[arg(long, env = "HERALD_NODE_LEASE_MS", default_value_t = DEFAULT_NODE_LEASE_MS)]
    pub node_lease_ms: u64,

    /// HTTP worker threads [default: one per CPU core].
    #[arg(long, env = "HERALD_WORKERS")]
    pub workers: Option<usize>,
}

impl ServeArgs {
    /// The defaults, with this database; for embedding Herald (and for tests).
    pub fn with_database(database_url: impl Into<String>) -> Self {
        ServeArgs {
            bind: DEFAULT_BIND.into(),
            db: DatabaseArgs {
                database_url: database_url.into(),
            },
            admin_token: None,
            admin_token_file: None,
            db_pool_size: DEFAULT_DB_POOL_SIZE,
            db_queue_limit: DEFAULT_DB_QUEUE_LIMIT,
            db_deadline_ms: DEFAULT_DB_DEADLINE_MS,
            min_commit_interval_us: DEFAULT_MIN_COMMIT_INTERVAL_US,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            ws_max_frame_bytes: DEFAULT_WS_MAX_FRAME_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            retention_seconds: DEFAULT_RETENTION_SECONDS,
            purge_interval_ms: DEFAULT_PURGE_INTERVAL_MS,
            ws_outbound_max_bytes: DEFAULT_WS_OUTBOUND_MAX_BYTES,
            ws_outbound_max_frames: DEFAULT_WS_OUTBOUND_MAX_FRAMES,
            ws_slow_grace_ms: DEFAULT_WS_SLOW_GRACE_MS,
            ws_max_frames_per_second: DEFAULT_WS_MAX_FRAMES_PER_SECOND,
            max_sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
            connect_rate_per_ip: DEFAULT_CONNECT_RATE_PER_IP,
            connect_burst_per_ip: DEFAULT_CONNECT_BURST_PER_IP,
            auth_failure_rate_per_ip: DEFAULT_AUTH_FAILURE_RATE_PER_IP,
            auth_failure_burst_per_ip: DEFAULT_AUTH_FAILURE_BURST_PER_IP,
            trusted_proxies: Vec::new(),
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            node_id: None,
            node_lease_ms: DEFAULT_NODE_LEASE_MS,
            workers: None,
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(10))
    }
}
