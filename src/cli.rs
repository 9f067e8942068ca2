//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::mount::{self, MountSpec};
use crate::space::{SpaceId, SpaceKind, default_data_dir};

#[derive(Parser, Debug)]
#[command(
    name = "roomfs",
    version,
    about = "Agent storage as an ordinary directory: mounts rooms and sessions with FUSE; \
             writes are committed atomically on close."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a room or a session and serve it in the foreground until unmounted or signalled
    /// (SIGINT/SIGTERM commit open files and unmount).
    Mount(MountArgs),
    /// Unmount a roomfs mount point (the serving `roomfs mount` then exits).
    Unmount(UnmountArgs),
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Where spaces are stored (default: /var/lib/roomfs for root, else
    /// $XDG_DATA_HOME/roomfs); created if missing.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Mount the room with this id (a durable, shared file store).
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "session",
        required_unless_present = "session"
    )]
    pub room: Option<String>,
    /// Mount the session with this id (an agent's session storage).
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// Make every close durable (fsync of the file and its directory): survives power loss, at
    /// the cost of write speed. Without it, fsync() alone does that.
    #[arg(long)]
    pub sync_on_close: bool,
    /// Seconds the kernel may cache attributes and names.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub cache_ttl: f64,
    /// Threads serving filesystem requests.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
    /// The directory to mount on.
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// Detach even if files are open (they keep working until closed).
    #[arg(long)]
    pub lazy: bool,
    /// The mount point to unmount.
    pub mountpoint: PathBuf,
}

/// Runs a parsed command line; the error is one sentence for the user.
pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Mount(args) => mount::run(&mount_spec(args)?),
        Command::Unmount(args) => unmount(&args),
    }
}

fn mount_spec(args: MountArgs) -> Result<MountSpec, String> {
    let space = match (&args.room, &args.session) {
        (Some(id), None) => SpaceId::new(SpaceKind::Room, id)?,
        (None, Some(id)) => SpaceId::new(SpaceKind::Session, id)?,
        _ => return Err("give exactly one of --room ID or --session ID".into()),
    };
    if !(args.cache_ttl.is_finite() && (0.0..=3600.0).contains(&args.cache_ttl)) {
        return Err(format!(
            "--cache-ttl must be between 0 and 3600 seconds, not {}",
            args.cache_ttl
        ));
    }
    if !(1..=64).contains(&args.threads) {
        return Err(format!(
            "--threads must be between 1 and 64, not {}",
            args.threads
        ));
    }
    Ok(MountSpec {
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        space,
        mountpoint: args.mountpoint,
        sync_on_close: args.sync_on_close,
        cache_ttl: Duration::from_secs_f64(args.cache_ttl),
        threads: args.threads,
    })
}

fn unmount(args: &UnmountArgs) -> Result<(), String> {
    let path = args
        .mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    match mount::mount_at(&path) {
        Some(m) if m.is_roomfs() => mount::unmount(&path, args.lazy),
        Some(m) => Err(format!(
            "{} is not a roomfs mount (it is {} from {})",
            path.display(),
            m.fstype,
            m.source
        )),
        None => Err(format!("{} is not a mount point", path.display())),
    }
}
