//! Builds a running node from settings: migrations, the executor, the actors, the HTTP server.
//! `Application::build` binds the listener first, so tests can bind port 0 and ask `port()`.

use std::fs;
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_http::HttpService;
use actix_server::Server;
use actix_service::{IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::Service;
use actix_web::{web, App};

use crate::actors::committer::Committer;
use crate::actors::db::Db;
use crate::actors::messages::SetCommitter;
use crate::actors::node::NodeKeeper;
use crate::actors::presence::Presence;
use crate::actors::purger::Purger;
use crate::actors::router::{Heard, ListenerResumed, Router};
use crate::actors::session::SessionConfig;
use crate::actors::socket::OpenSockets;
use crate::config::ServeArgs;
use crate::db::listener::Listener;
use crate::db::DbError;
use crate::db::{Backend, ConnectError};
use crate::domain::{generate_secret, SecretKind};
use crate::http::limits::{Limits, RateLimiter};
use crate::http::{self, AdminCredential, AppState, AuthCache};
use crate::metrics::Metrics;
use crate::stats::Counters;

/// Name of the generated admin token file.
const ADMIN_TOKEN_FILE: &str = "herald-admin.token";
/// Pending TCP connections the kernel may queue for us (a reconnect storm arrives at once).
const LISTEN_BACKLOG: u32 = 4096;
/// How long open connections get to finish when the server stops.
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Database(#[from] ConnectError),
    #[error("cannot listen: {0}")]
    Listen(#[from] io::Error),
    #[error("admin token: {0}")]
    AdminToken(String),
    #[error("{0}")]
    AlreadyServed(String),
    #[error("cluster: {0}")]
    Cluster(String),
}

pub struct Application {
    /// On PostgreSQL: the database and this node's id, to leave the cluster on stop.
    cluster: Option<(Db, String)>,
    /// On SQLite, the lock that keeps a second node off this database file (held while the
    /// node lives; the kernel releases it however the process ends).
    _node_lock: Option<fs::File>,
    /// On PostgreSQL, the thread listening for the other nodes' signals (stopped on drop).
    _listener: Option<Listener>,
    port: u16,
    server: Server,
    presence: Addr<Presence>,
    committer: Addr<Committer>,
    sockets: OpenSockets,
}

impl Application {
    /// Migrates the database, starts the actors and binds the listener. Must run inside an actix
    /// `System`.
    pub async fn build(args: ServeArgs) -> Result<Self, StartError> {
        let backend = Backend::from_url(&args.db.database_url)?;
        let node_lock = match &backend {
            Backend::Sqlite(path) => Some(lock_sqlite_file(path)?),
            Backend::Postgres(_) => None,
        };
        let ran = backend.migrate()?;
        if ran > 0 {
            log::info!("applied {ran} migration(s)");
        }
        let admin = admin_credential(&args, &backend)?;
        let metrics = Arc::new(Metrics::new());
        let db = Db::start(
            &backend,
            args.db_pool_size,
            args.db_queue_limit,
            Duration::from_millis(args.db_deadline_ms),
            &metrics.job_duration,
        )?;
        let counters = Arc::new(Counters::default());
        let min_commit_interval = Duration::from_micros(args.min_commit_interval_us);
        let auth_cache: Arc<AuthCache> = Arc::default();
        // On PostgreSQL a node is one of possibly several: presence lives in the database,
        // commits are announced over LISTEN/NOTIFY and published in the cluster's commit order.
        let mut cluster = None;
        let mut signals = None;
        let (presence, committer) = match &backend {
            Backend::Sqlite(_) => {
                let presence = Presence::default().start();
                let committer = Committer::new(db.clone(), presence.clone(), counters.clone())
                    .min_interval(min_commit_interval)
                    .start();
                (presence, committer)
            }
            Backend::Postgres(url) => {
                let node = args
                    .node_id
                    .clone()
                    .filter(|n| !n.trim().is_empty())
                    .unwrap_or_else(|| {
                        format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
                    });
                if !crate::db::cluster::valid_node_id(&node) {
                    return Err(StartError::Cluster(format!(
                        "HERALD_NODE_ID must be 1-64 characters of A-Z a-z 0-9 . _ : - (got {node:?})"
                    )));
                }
                let lease = Duration::from_millis(args.node_lease_ms.max(300));
                let lease_ms = lease.as_millis() as i64;
                let presence = Presence::for_cluster(db.clone()).start();
                // A random number per process: its batches' signals are told from an earlier
                // process's with the same node id.
                let run = uuid::Uuid::new_v4().as_u64_pair().0;
                let router = Router::new(
                    node.clone(),
                    run,
                    db.clone(),
                    presence.clone(),
                    auth_cache.clone(),
                )
                .start();
                let (heard, resumed) = (router.clone(), router.clone());
                // Listening (and holding the node's liveness lock) before the node's row exists,
                // so no other node takes the row for a dead one's.
                signals = Some(
                    crate::db::listener::start(
                        url,
                        &node,
                        move |signal| heard.do_send(Heard(signal)),
                        move || resumed.do_send(ListenerResumed),
                    )
                    .map_err(|e| StartError::Cluster(format!("cannot LISTEN: {e}")))?,
                );
                let n = node.clone();
                db.write(db.deadline(), move |c| {
                    crate::db::cluster::start_node(c, &n, lease_ms)?;
                    // A node that died just now (this one's last life, say) goes at once.
                    crate::db::cluster::reap(c, true)?;
                    Ok(())
                })
                .await
                .map_err(|e| StartError::Cluster(format!("cannot register node {node}: {e}")))?;
                let committer = Committer::new(db.clone(), presence.clone(), counters.clone())
                    .min_interval(min_commit_interval)
                    .in_cluster(node.clone(), run, router)
                    .start();
                presence.do_send(SetCommitter(committer.clone()));
                NodeKeeper::new(
                    node.clone(),
                    lease,
                    db.clone(),
                    presence.clone(),
                    committer.clone(),
                )
                .start();
                log::info!("node {node} (lease {} ms)", lease.as_millis());
                cluster = Some((db.clone(), node));
                (presence, committer)
            }
        };
        Purger::new(
            db.clone(),
            metrics.clone(),
            Duration::from_millis(args.purge_interval_ms.max(10)),
            Duration::from_secs(args.retention_seconds),
        )
        .start();
        let sockets = OpenSockets::default();
        let state = web::Data::new(AppState {
            sockets: sockets.clone(),
            db,
            presence: presence.clone(),
            committer: committer.clone(),
            admin,
            auth_cache,
            counters,
            metrics: metrics.clone(),
            session: SessionConfig {
                heartbeat: args.heartbeat(),
                max_frame_bytes: args.ws_max_frame_bytes,
                max_outbound_bytes: args.ws_outbound_max_bytes.max(1024),
                max_outbound_frames: args.ws_outbound_max_frames.max(16),
                max_sessions_per_user: args.max_sessions_per_user,
                cluster: cluster.is_some(),
                slow_grace: Duration::from_millis(args.ws_slow_grace_ms),
                max_frames_per_second: args.ws_max_frames_per_second,
            },
            max_body_bytes: args.max_body_bytes,
            limits: Arc::new(Limits {
                connects: RateLimiter::new(args.connect_rate_per_ip, args.connect_burst_per_ip),
                auth_failures: RateLimiter::new(
                    args.auth_failure_rate_per_ip,
                    args.auth_failure_burst_per_ip,
                ),
                trusted_proxies: args.trusted_proxies.clone(),
            }),
        });
        // A peer that stops acknowledging what it was sent (gone, or a zero receive window) is
        // dropped by the kernel after this long, so a stalled connection cannot live forever.
        let tcp_user_timeout = (args.heartbeat() * 2).max(Duration::from_secs(5));

        let listener = TcpListener::bind(&args.bind)?;
        let local = listener.local_addr()?;
        let port = local.port();
        let handshake_timeout = Duration::from_millis(args.handshake_timeout_ms.max(1));
        // Every worker gets two instances of the same App: one for plain requests, one inside
        // the upgrade service, which runs WebSocket handshakes through it and then takes the
        // socket away from the HTTP layer (`http::upgrade`).
        let make_app = move || {
            let metrics = metrics.clone();
            App::new()
                .wrap_fn(move |req, srv| {
                    // Label by route pattern, never by raw path: bounded and free of ids.
                    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                    let metrics = metrics.clone();
                    let answer = srv.call(req);
                    async move {
                        let res = answer.await?;
                        metrics
                            .http_requests
                            .with_label_values(&[&route, res.status().as_str()])
                            .inc();
                        Ok(res)
                    }
                })
                .app_data(state.clone())
                .app_data(http::query_config())
                .configure(http::routes)
        };
        let mut server = actix_server::Server::build()
            .backlog(LISTEN_BACKLOG)
            .disable_signals()
            .shutdown_timeout(SHUTDOWN_TIMEOUT_SECS);
        if let Some(n) = args.workers {
            server = server.workers(n.max(1));
        }
        // Tells keep-alive connections to close at a graceful stop.
        let graceful = server.graceful_shutdown_signal();
        let server = server
            .listen("herald-http", listener, move || {
                let graceful = graceful.clone();
                let app = actix_service::map_config(
                    make_app()
                        .into_factory()
                        .map_err(|e: actix_web::Error| e.error_response()),
                    |_| actix_web::dev::AppConfig::default(),
                );
                HttpService::build()
                    .graceful_shutdown_signal(move || {
                        let signal = graceful.clone();
                        async move { signal.notified().await }
                    })
                    .client_request_timeout(handshake_timeout)
                    .client_disconnect_timeout(Duration::from_secs(1))
                    .local_addr(local)
                    .on_connect_ext(move |tcp: &actix_web::rt::net::TcpStream, _| {
                        let sock = socket2::SockRef::from(tcp);
                        if let Err(e) = sock.set_tcp_user_timeout(Some(tcp_user_timeout)) {
                            log::debug!("cannot set TCP_USER_TIMEOUT: {e}");
                        }
                    })
                    .upgrade(http::upgrade::service(make_app()))
                    .finish(app)
                    .tcp()
            })?
            .run();
        log::info!(
            "herald listening on {} ({} database, pool of {})",
            args.bind.replace(":0", &format!(":{port}")),
            if backend.is_sqlite() {
                "SQLite"
            } else {
                "PostgreSQL"
            },
            args.db_pool_size
        );
        Ok(Application {
            _node_lock: node_lock,
            _listener: signals,
            cluster,
            port,
            server,
            presence,
            committer,
            sockets,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that shuts the node down gracefully, as SIGTERM does.
    pub fn handle(&self) -> StopHandle {
        StopHandle {
            server: self.server.handle(),
            presence: self.presence.clone(),
            committer: self.committer.clone(),
            cluster: self.cluster.clone(),
            sockets: self.sockets.clone(),
        }
    }

    /// Serves until SIGTERM or SIGINT (or [`StopHandle::stop`]), then shuts down gracefully.
    pub async fn run_until_stopped(self) -> io::Result<()> {
        let stop = self.handle();
        actix_web::rt::spawn(async move {
            wait_for_signal().await;
            stop.stop().await;
        });
        self.server.await
    }
}

/// SQLite is single-node: one `herald serve` per database file. The node holds an exclusive lock
/// on `<file>.lock` while it lives; a second node on the same file is refused with an error that
/// says so (the command-line tools do not take the lock and work beside a running node).
fn lock_sqlite_file(db: &std::path::Path) -> Result<fs::File, StartError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            StartError::AlreadyServed(format!("cannot open lock file {}: {e}", path.display()))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StartError::AlreadyServed(format!(
            "another herald node is already serving {} (it holds {}); SQLite is single-node — \
             run several nodes on PostgreSQL instead",
            db.display(),
            path.display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(StartError::AlreadyServed(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// The admin credential: `HERALD_ADMIN_TOKEN` if set; otherwise the token in the admin token
/// file, generated (mode 0600) on first start. Only the file's path is ever logged.
fn admin_credential(args: &ServeArgs, backend: &Backend) -> Result<AdminCredential, StartError> {
    if let Some(token) = &args.admin_token {
        if token.expose().len() < 16 {
            log::warn!("HERALD_ADMIN_TOKEN is shorter than 16 characters; use a long random token");
        }
        log::info!("admin token taken from HERALD_ADMIN_TOKEN");
        return Ok(AdminCredential::from_token(token.expose()));
    }
    let path = args
        .admin_token_file
        .clone()
        .unwrap_or_else(|| match backend {
            Backend::Sqlite(db) => db
                .parent()
                .unwrap_or(std::path::Path::new(""))
                .join(ADMIN_TOKEN_FILE),
            Backend::Postgres(_) => PathBuf::from(ADMIN_TOKEN_FILE),
        });
    let fail = |what: &str, e: io::Error| {
        StartError::AdminToken(format!("{what} {}: {e}", path.display()))
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim();
            if token.is_empty() {
                return Err(StartError::AdminToken(format!(
                    "{} is empty",
                    path.display()
                )));
            }
            log::info!("admin token read from {}", path.display());
            Ok(AdminCredential::from_token(token))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let token = generate_secret(SecretKind::Admin);
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(|e| fail("cannot create", e))?;
            writeln!(file, "{token}").map_err(|e| fail("cannot write", e))?;
            log::info!(
                "admin token generated and written to {} (mode 0600)",
                path.display()
            );
            Ok(AdminCredential::from_token(&token))
        }
        Err(e) => Err(fail("cannot read", e)),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot listen for signals; stop herald with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Stops a node: no new connections, every session closed with 1001 (so devices show offline at
/// once and reconnect elsewhere), in-flight requests finished, gathered writes written.
#[derive(Clone)]
pub struct StopHandle {
    server: actix_web::dev::ServerHandle,
    presence: Addr<Presence>,
    committer: Addr<Committer>,
    cluster: Option<(Db, String)>,
    sockets: OpenSockets,
}

impl StopHandle {
    pub async fn stop(&self) {
        use crate::actors::messages::{CloseAll, IsIdle};
        // No new connections (those already in the listen backlog wait for the stop: a few
        // milliseconds, unless a device is slow to take its close frame) and no new sessions;
        // every session gets its 1001. Only once the sockets the sessions took over have
        // written their close frames are the workers stopped (a worker stops as soon as no HTTP
        // request is in flight, and would drop its sessions with it).
        self.sockets.close();
        self.server.pause().await;
        let closed = self.presence.send(CloseAll).await.unwrap_or(0);
        log::info!("closed {closed} session(s) with 1001");
        let deadline = std::time::Instant::now() + Duration::from_secs(SHUTDOWN_TIMEOUT_SECS);
        let mut waited = 0u32;
        while std::time::Instant::now() < deadline && self.sockets.get() > 0 {
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
            if waited.is_multiple_of(20) {
                // A session whose handshake was in flight at the first round.
                let _ = self.presence.send(CloseAll).await;
            }
        }
        // In-flight requests are answered, idle keep-alive connections closed.
        let stopping = self.server.stop(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(SHUTDOWN_TIMEOUT_SECS);
        while std::time::Instant::now() < deadline
            && !self.committer.send(IsIdle).await.unwrap_or(true)
        {
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some((db, node)) = &self.cluster {
            // The others need not wait for the lease: this node's presence goes now.
            let node = node.clone();
            if let Err(e) = db
                .write(db.deadline(), move |c| {
                    crate::db::cluster::leave(c, &node).map_err(DbError::from)
                })
                .await
            {
                log::warn!("could not remove this node's presence: {e}");
            }
        }
        stopping.await;
        log::info!("herald stopped");
    }
}
