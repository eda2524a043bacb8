//! The `herald` binary: parses the command line and runs one subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use herald::config::{DatabaseArgs, ServeArgs};
use herald::db::{queries, Backend};
use herald::domain::{self, generate_secret, hash_secret, new_id, now_ms, SecretKind};
use herald::startup::Application;

/// mimalloc instead of glibc's malloc: per-thread free lists without arena locks. Measured in
/// docs/BENCHMARKS.md (eighth pass): glibc's malloc and free were ~8 % of the server's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Herald, a realtime notification server.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage service keys.
    #[command(name = "service-key", subcommand)]
    ServiceKey(ServiceKeyCommand),
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Create a device for a user and print its token (shown once).
    Create {
        /// The user the device belongs to.
        #[arg(long)]
        user: String,
        /// A name for the device.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum ServiceKeyCommand {
    /// Create a service key and print it (shown once).
    Create {
        /// A name for the key, e.g. the service that will use it.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Migrate(db) => migrate(&db),
        Command::Device(DeviceCommand::Create { user, name, db }) => create_device(&db, user, name),
        Command::ServiceKey(ServiceKeyCommand::Create { name, db }) => create_key(&db, name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn serve(args: ServeArgs) -> CliResult {
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(args).await?;
        app.run_until_stopped().await?;
        Ok(())
    })
}

fn open(db: &DatabaseArgs) -> Result<herald::db::DbConn, Box<dyn std::error::Error>> {
    let backend = Backend::from_url(&db.database_url)?;
    backend.migrate()?;
    Ok(backend.connect()?)
}

fn migrate(db: &DatabaseArgs) -> CliResult {
    let backend = Backend::from_url(&db.database_url)?;
    let ran = backend.migrate()?;
    eprintln!("applied {ran} migration(s); the database is up to date");
    Ok(())
}

fn create_device(db: &DatabaseArgs, user: String, name: String) -> CliResult {
    domain::parse_user_id(&user)?;
    domain::parse_device_name(&name)?;
    let (row, token) = herald::http::new_device(user, name);
    queries::insert_device(&mut open(db)?, &row)?;
    eprintln!("device {} created for user {}", row.id, row.user_id);
    println!("{token}");
    Ok(())
}

fn create_key(db: &DatabaseArgs, name: String) -> CliResult {
    domain::parse_key_name(&name)?;
    let key = generate_secret(SecretKind::ServiceKey);
    let row = queries::ServiceKeyRow {
        id: new_id(),
        name,
        key_hash: hash_secret(&key),
        created_at: now_ms(),
        revoked_at: None,
    };
    queries::insert_service_key(&mut open(db)?, &row)?;
    eprintln!("service key {} ({}) created", row.id, row.name);
    println!("{key}");
    Ok(())
}
