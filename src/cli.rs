//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::grant::Grant;
use crate::mount::{self, MountSpec};
use crate::space::{SpaceId, SpaceKind, default_data_dir};
use crate::token;

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
    /// Issue or check grant tokens (JWT, HS256, MeshAgent participant-token format).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a signed token granting path prefixes of a room.
    Issue(TokenIssueArgs),
    /// Verify a token and print the room and grant it carries.
    Verify(TokenVerifyArgs),
}

#[derive(Args, Debug)]
pub struct TokenIssueArgs {
    /// File holding the daemon's signing secret.
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
    /// The room the token is for.
    #[arg(long, value_name = "ID")]
    pub room: String,
    /// A granted prefix, PATH:ro or PATH:rw (repeatable); none means no storage access,
    /// `--path /:rw` the whole room.
    #[arg(long = "path", value_name = "PATH[:ro|:rw]")]
    pub paths: Vec<String>,
    /// How long the token is valid: 30s, 15m, 1h, 7d.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub ttl: String,
    /// The participant name recorded in the token.
    #[arg(long, default_value = "agent")]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct TokenVerifyArgs {
    /// File holding the daemon's signing secret.
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
    /// The token.
    pub token: String,
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
        required_unless_present_any = ["session", "token"]
    )]
    pub room: Option<String>,
    /// Mount the session with this id (an agent's session storage).
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// Limit the mount to a path prefix, PATH:ro or PATH:rw (repeatable). Anything outside the
    /// granted prefixes is refused with EACCES. Without --grant and --token the mount has full
    /// access (the operator's own mount).
    #[arg(long = "grant", value_name = "PATH[:ro|:rw]", conflicts_with = "token")]
    pub grants: Vec<String>,
    /// Take the room and grant from a signed token (see `roomfs token issue`); needs
    /// --secret-file.
    #[arg(long, value_name = "JWT", requires = "secret_file")]
    pub token: Option<String>,
    /// File holding the secret tokens are signed with.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Where agent records are kept (sessions show them read-only under .meta); default
    /// <data-dir>/records. An experimental-agent `.agent/` directory can be served as is.
    #[arg(long, value_name = "DIR")]
    pub records_dir: Option<PathBuf>,
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
        Command::Token(TokenCommand::Issue(args)) => {
            println!("{}", issue_token(&args)?);
            Ok(())
        }
        Command::Token(TokenCommand::Verify(args)) => {
            let secret = token::read_secret_file(&args.secret_file)?;
            let t = token::verify(&args.token, &secret).map_err(|e| e.to_string())?;
            println!("room: {}", t.room.as_deref().unwrap_or("(none)"));
            println!("grant: {}", t.grant);
            if let Some(exp) = t.exp {
                println!("expires: {exp} (unix seconds)");
            }
            Ok(())
        }
    }
}

fn issue_token(args: &TokenIssueArgs) -> Result<String, String> {
    SpaceId::new(SpaceKind::Room, &args.room)?;
    let secret = token::read_secret_file(&args.secret_file)?;
    let ttl = token::parse_duration(&args.ttl).map_err(|e| format!("--ttl: {e}"))?;
    let grant = if args.paths.is_empty() {
        Grant::none()
    } else {
        Grant::parse_cli(&args.paths).map_err(|e| format!("--path: {e}"))?
    };
    token::issue(&secret, &args.name, &args.room, &grant, ttl).map_err(|e| e.to_string())
}

/// The space and grant of a mount: from a verified token, or from --room/--session and --grant.
fn space_and_grant(args: &MountArgs) -> Result<(SpaceId, Grant), String> {
    if let Some(tok) = &args.token {
        let secret_file = args
            .secret_file
            .as_ref()
            .ok_or("--token needs --secret-file")?;
        let secret = token::read_secret_file(secret_file)?;
        let verified = token::verify(tok, &secret).map_err(|e| format!("token refused: {e}"))?;
        let room = verified
            .room
            .ok_or("token refused: it names no room (no \"room\" grant)")?;
        if args.session.is_some() {
            return Err("a token grants a room: use it without --session".into());
        }
        if let Some(wanted) = &args.room
            && *wanted != room
        {
            return Err(format!(
                "token refused: it is for room {room:?}, not {wanted:?}"
            ));
        }
        return Ok((SpaceId::new(SpaceKind::Room, &room)?, verified.grant));
    }
    let space = match (&args.room, &args.session) {
        (Some(id), None) => SpaceId::new(SpaceKind::Room, id)?,
        (None, Some(id)) => SpaceId::new(SpaceKind::Session, id)?,
        _ => return Err("give exactly one of --room ID or --session ID".into()),
    };
    let grant = Grant::parse_cli(&args.grants).map_err(|e| format!("--grant: {e}"))?;
    Ok((space, grant))
}

fn mount_spec(args: MountArgs) -> Result<MountSpec, String> {
    let (space, grant) = space_and_grant(&args)?;
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
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    Ok(MountSpec {
        records_dir: args.records_dir.unwrap_or_else(|| data_dir.join("records")),
        limits: None,
        data_dir,
        space,
        mountpoint: args.mountpoint,
        sync_on_close: args.sync_on_close,
        cache_ttl: Duration::from_secs_f64(args.cache_ttl),
        threads: args.threads,
        grant,
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
