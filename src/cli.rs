//! The command line.

mod output;

use anyhow::{Context, anyhow};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::control::client::{Client, ClientError};
use crate::control::{
    DEFAULT_SOCKET, EndSessionRequest, MountRequest, RequestedLimits, SessionRequest, SpaceOwner,
    UnmountRequest, UrlRequest,
};
use crate::daemon::{self, Config};
use crate::error::Invalid;
use crate::grant::Grant;
use crate::human;
use crate::mount::{self, MountSpec};
use crate::space::{SpaceId, SpaceKind, default_data_dir};
use crate::store::StoreConfig;
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
    /// Run the daemon: many mounts, sessions and agent records, controlled through an
    /// HTTP/JSON API on a Unix socket. Runs in the foreground (systemd runs it).
    Serve(ServeArgs),
    /// List the daemon's mounts.
    Mounts(ShowArgs),
    /// Show the daemon's status.
    Status(ShowArgs),
    /// Print the daemon's metrics (Prometheus text, as `GET /metrics` serves them).
    Metrics(SocketArgs),
    /// Create, list, show and end sessions (through the daemon).
    #[command(subcommand)]
    Session(SessionCommand),
    /// Read and write agent records (through the daemon), as the agent SDK's storage does.
    #[command(subcommand)]
    Records(RecordsCommand),
    /// Print a space's events as NDJSON (through the daemon): those retained after --since,
    /// then, with --follow, each new one as it happens.
    Events(EventsArgs),
    /// Print a URL that downloads a file without credentials until it expires (served by the
    /// daemon's http_listen).
    Url(UrlArgs),
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// The room whose events to print.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "session",
        required_unless_present = "session"
    )]
    pub room: Option<String>,
    /// The session whose events to print.
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// Print the events after this seq (0: every event retained). A seq older than what is
    /// retained first prints an `events.gap` line.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub since: u64,
    /// Keep printing new events as they happen (until interrupted).
    #[arg(long)]
    pub follow: bool,
    /// Only the events of paths inside this token's grant.
    #[arg(long, value_name = "JWT")]
    pub token: Option<String>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Args, Debug)]
pub struct UrlArgs {
    /// The room holding the file.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "session",
        required_unless_present = "session"
    )]
    pub room: Option<String>,
    /// The session holding the file.
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// The file, relative to the space's root (e.g. outputs/report.pdf).
    pub path: String,
    /// Make browsers download the file instead of showing it.
    #[arg(long)]
    pub attachment: bool,
    /// How long the URL works: 30s, 15m, 1h, up to 7d [default: 15m, or what is left of
    /// --token's lifetime if less].
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    /// Issue the URL only if this token's grant covers the path.
    #[arg(long, value_name = "JWT")]
    pub token: Option<String>,
    /// A URL of the object store itself (presigned), for rooms on S3.
    #[arg(long)]
    pub direct: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Args, Debug)]
pub struct SocketArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// A command that shows something: a table for people, or the API's JSON.
#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// JSON configuration file (see doc/DAEMON.md, Configuration); every field is optional.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The control socket (overrides the configuration; default /run/roomfs/control.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Where spaces are stored (overrides the configuration).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Create a session space with limits (default: the daemon's session limits).
    Create {
        id: String,
        /// Largest file, e.g. 10M (K/M/G are powers of 1000, Ki/Mi/Gi of 1024), or
        /// `unlimited` (default: the daemon's session_limits).
        #[arg(long, value_name = "SIZE", value_parser = parse_size_limit)]
        max_file_size: Option<Limit>,
        /// Most files, directories and links together, or `unlimited`.
        #[arg(long, value_name = "N", value_parser = parse_count_limit)]
        max_files: Option<Limit>,
        /// Most bytes in all files together, e.g. 50M, or `unlimited`.
        #[arg(long, value_name = "SIZE", value_parser = parse_size_limit)]
        max_bytes: Option<Limit>,
        /// End the session after this long without activity: 30m, 2h, 1d.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Who owns the session's root, so an agent running as that user can write there:
        /// USER, USER:GROUP or UID:GID (default: the daemon's user).
        #[arg(long, value_name = "USER[:GROUP]", value_parser = parse_owner)]
        owner: Option<SpaceOwner>,
        #[command(flatten)]
        show: ShowArgs,
    },
    /// End a session: unmount it and delete its files and records (after exporting paths).
    End {
        id: String,
        /// A path of the session to copy into --to-room first (repeatable), e.g. outputs/.
        #[arg(long = "export", value_name = "PATH", requires = "to_room")]
        export: Vec<String>,
        /// The room exported paths go to.
        #[arg(long, value_name = "ROOM", requires = "export")]
        to_room: Option<String>,
        #[command(flatten)]
        show: ShowArgs,
    },
    /// List sessions with their limits and usage.
    List(ShowArgs),
    /// Show one session.
    Show {
        id: String,
        #[command(flatten)]
        show: ShowArgs,
    },
}

/// The record collections of the agent storage contract (see `records`).
const RECORD_COLLECTIONS: [&str; 5] = ["session", "message", "part", "sandbox", "setup"];

#[derive(Subcommand, Debug)]
pub enum RecordsCommand {
    /// Send one storage call, e.g. '{"method":"session.get","id":"s1"}'.
    Call {
        json: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Print a record: session, message, part, sandbox or setup.
    Get {
        #[arg(value_parser = RECORD_COLLECTIONS)]
        collection: String,
        id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Store a record from a JSON file (or standard input with `-`).
    Set {
        #[arg(value_parser = RECORD_COLLECTIONS)]
        collection: String,
        id: String,
        #[arg(default_value = "-")]
        file: PathBuf,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// List a session's messages or parts.
    List {
        /// `message` or `part`.
        #[arg(value_parser = ["message", "part"])]
        collection: String,
        #[arg(long, value_name = "ID")]
        session: String,
        #[command(flatten)]
        show: ShowArgs,
    },
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
    /// Take the room and grant from a signed token (see `roomfs token issue`), verified with
    /// --secret-file, or with --daemon by the daemon with its own secret.
    #[arg(long, value_name = "JWT")]
    pub token: Option<String>,
    /// File holding the secret tokens are signed with (not with --daemon).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Where agent records are kept (sessions show them read-only under .meta); default
    /// <data-dir>/records. An experimental-agent `.agent/` directory can be served as is. Not
    /// with --daemon (its config decides).
    #[arg(long, value_name = "DIR")]
    pub records_dir: Option<PathBuf>,
    /// Make every close durable (fsync of the file and its directory): survives power loss, at
    /// the cost of write speed. Without it, fsync() alone does that.
    #[arg(long)]
    pub sync_on_close: bool,
    /// Read large files through roomfs instead of letting the kernel read them from the disk
    /// directly (FUSE passthrough; see doc/PERFORMANCE.md, Levers).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Seconds the kernel may cache attributes and names [default: 1]. Not with --daemon (its
    /// config decides).
    #[arg(long, value_name = "SECONDS")]
    pub cache_ttl: Option<f64>,
    /// Mount read-only: every change fails with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Mount noexec: no file in the mount can be executed (execve fails with EACCES).
    #[arg(long)]
    pub noexec: bool,
    /// Threads serving filesystem requests [default: 4, 16 with an S3 store]. Not with --daemon
    /// (its config decides).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Keep idle CPUs from halting for this many microseconds after each request (a zero
    /// CPU-latency PM QoS request as root, lowest-priority spinning otherwise), and poll for the
    /// next request while requests stream, which cuts request latency on VMs; 0 turns both off
    /// [default: 1000]. Not with --daemon (its config decides).
    #[arg(long, value_name = "MICROSECONDS")]
    pub poll_window_us: Option<u64>,
    /// Where the space is stored: `local` (the data dir), or an S3 bucket,
    /// `s3://BUCKET/PREFIX` (credentials and endpoint the standard AWS ways: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws; options as `?part_size=16Mi&...`, see
    /// doc/S3.md). With --daemon, it must be the daemon's store.
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// Who this mount's changes are made by, in events (default: the token's name, else the
    /// mount point).
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
    /// Ask the daemon (`roomfs serve`) to serve this mount instead of serving it here: it keeps
    /// it across its restarts until it is unmounted. The daemon's config sets its data dir,
    /// secret, cache TTL and threads.
    #[arg(long)]
    pub daemon: bool,
    /// The daemon's control socket [default: /run/roomfs/control.sock].
    #[arg(long, value_name = "PATH", requires = "daemon")]
    pub socket: Option<PathBuf>,
    /// The directory to mount on.
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// Detach even if files are open (they keep working until closed).
    #[arg(long)]
    pub lazy: bool,
    /// The daemon's control socket: mounts it serves are unmounted through it.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The mount point to unmount.
    pub mountpoint: PathBuf,
}

/// Runs a parsed command line; the error is one sentence for the user.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount(args) if args.daemon => mount_via_daemon(&args),
        Command::Mount(args) => {
            // Started in the background by the mount helper: report there too.
            match crate::helper::ReadyPipe::from_env() {
                Some(ready) => match mount_spec(args) {
                    Ok(spec) => mount::run(&spec, Some(ready)),
                    Err(e) => {
                        ready.fail(&e);
                        Err(e)
                    }
                },
                None => mount::run(&mount_spec(args)?, None),
            }
        }
        Command::Unmount(args) => unmount(&args),
        Command::Serve(args) => {
            let mut config = match &args.config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if args.socket.is_some() {
                config.socket = args.socket;
            }
            if args.data_dir.is_some() {
                config.data_dir = args.data_dir;
            }
            daemon::serve(config)
        }
        Command::Mounts(s) => show(&s, "listing mounts", |c| c.mounts(), output::mounts),
        Command::Status(s) => show(&s, "asking for status", |c| c.status(), output::status),
        Command::Metrics(s) => {
            let text = human::waiting("reading metrics", || client(&s).metrics())
                .map_err(anyhow::Error::from)?;
            print!("{text}");
            Ok(())
        }
        Command::Session(cmd) => session(cmd),
        Command::Records(cmd) => records(cmd),
        Command::Events(args) => events(&args),
        Command::Url(args) => url(&args),
        Command::Token(TokenCommand::Issue(args)) => {
            println!("{}", issue_token(&args)?);
            Ok(())
        }
        Command::Token(TokenCommand::Verify(args)) => {
            let secret = token::read_secret_file(&args.secret_file)?;
            let t = token::verify(&args.token, &secret).map_err(anyhow::Error::from)?;
            println!("room: {}", t.room.as_deref().unwrap_or("(none)"));
            println!("grant: {}", t.grant);
            if let Some(exp) = t.exp {
                println!("expires: {exp} (unix seconds)");
            }
            Ok(())
        }
    }
}

fn client(s: &SocketArgs) -> Client {
    Client::new(&s.socket)
}

/// Prints an API answer as pretty JSON, or turns its error into the CLI's message.
fn print_json<T: serde::Serialize>(result: &Result<T, ClientError>) -> anyhow::Result<()> {
    match result {
        Ok(value) => {
            let text = serde_json::to_string_pretty(value).map_err(anyhow::Error::from)?;
            println!("{text}");
            Ok(())
        }
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// Calls the API (`label` is shown on a terminal while it takes long) and prints the answer:
/// the API's JSON with `--json`, else what `human` makes of it.
fn show<T: serde::Serialize>(
    args: &ShowArgs,
    label: &str,
    call: impl FnOnce(&Client) -> Result<T, ClientError>,
    human: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let result = human::waiting(label, || call(&client(&args.socket)));
    if args.json {
        return print_json(&result);
    }
    let value = result.map_err(anyhow::Error::from)?;
    print!("{}", human(&value));
    Ok(())
}

/// Parses sizes like `1048576`, `10M`, `10MB`, `4Ki`, `1GiB`.
/// A limit on the command line: a number, or `None` for `unlimited`.
#[derive(Clone, Copy, Debug)]
pub struct Limit(Option<u64>);

/// `SIZE` (see [`parse_size`]) or `unlimited`.
fn parse_size_limit(text: &str) -> Result<Limit, Invalid> {
    match text {
        "unlimited" => Ok(Limit(None)),
        _ => parse_size(text).map(|n| Limit(Some(n))),
    }
}

/// A whole number or `unlimited`.
fn parse_count_limit(text: &str) -> Result<Limit, Invalid> {
    match text {
        "unlimited" => Ok(Limit(None)),
        _ => text.trim().parse().map(|n| Limit(Some(n))).map_err(|_| {
            Invalid(format!(
                "{text:?} is not a number of entries (or unlimited)"
            ))
        }),
    }
}

/// Parses an owner: `USER`, `USER:GROUP`, `UID:GID` (names looked up in the system's user
/// database; a user alone brings its primary group).
pub fn parse_owner(text: &str) -> Result<SpaceOwner, Invalid> {
    use nix::unistd::{Group, User};
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let bad = |what: String| Invalid(format!("--owner {text:?}: {what}"));
    let lookup_user = |name: &str| match User::from_name(name) {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(bad(format!("no user named {name:?}"))),
        Err(e) => Err(bad(format!("cannot look up user {name:?}: {e}"))),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) if !user.is_empty() => {
            let u = lookup_user(user)?;
            (u.uid.as_raw(), Some(u.gid.as_raw()))
        }
        Err(_) => return Err(bad("give USER, USER:GROUP or UID:GID".into())),
    };
    let gid = match group {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => match Group::from_name(g) {
                Ok(Some(group)) => group.gid.as_raw(),
                Ok(None) => return Err(bad(format!("no group named {g:?}"))),
                Err(e) => return Err(bad(format!("cannot look up group {g:?}: {e}"))),
            },
        },
        Some(_) => return Err(bad("give USER, USER:GROUP or UID:GID".into())),
        None => primary.ok_or_else(|| bad("a numeric user needs its group: UID:GID".into()))?,
    };
    let owner = SpaceOwner { uid, gid };
    owner.check().map_err(|e| bad(e.0))?;
    Ok(owner)
}

pub fn parse_size(text: &str) -> Result<u64, Invalid> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| Invalid(format!("{text:?} is not a size (like 1048576, 10M or 4Ki)")))?;
    let factor: u64 = match unit.trim_end_matches(['B', 'b']) {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(Invalid(format!(
                "{text:?}: unknown unit {unit:?} (use K, M, G, Ki, Mi, Gi)"
            )));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| Invalid(format!("{text:?} is too large")))
}

/// The flags of `roomfs mount` that a mount served by the daemon cannot honour: the daemon's
/// config sets them, and the API takes no such field. `None` if none is given.
fn refused_with_daemon(args: &MountArgs) -> Option<String> {
    let given: Vec<(&str, &str)> = [
        (args.data_dir.is_some(), "--data-dir", "data_dir"),
        (args.records_dir.is_some(), "--records-dir", "records_dir"),
        (args.secret_file.is_some(), "--secret-file", "secret_file"),
        (args.cache_ttl.is_some(), "--cache-ttl", "cache_ttl_secs"),
        (args.threads.is_some(), "--threads", "threads"),
        (
            args.poll_window_us.is_some(),
            "--poll-window-us",
            "poll_window_us",
        ),
    ]
    .into_iter()
    .filter(|(given, _, _)| *given)
    .map(|(_, flag, field)| (flag, field))
    .collect();
    let list = |names: Vec<&str>| match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    };
    let (flags, fields): (Vec<&str>, Vec<&str>) = given.into_iter().unzip();
    let verb = if flags.len() == 1 { "is" } else { "are" };
    let tokens = if args.secret_file.is_some() {
        " (the daemon verifies tokens with its own secret_file)"
    } else {
        ""
    };
    (!flags.is_empty()).then(|| {
        format!(
            "{} {verb} for mounts served here: with --daemon, the daemon's config sets \
             {}{tokens}; leave {} out",
            list(flags.clone()),
            list(fields),
            if flags.len() == 1 { "it" } else { "them" }
        )
    })
}

fn mount_via_daemon(args: &MountArgs) -> anyhow::Result<()> {
    if let Some(refused) = refused_with_daemon(args) {
        return Err(anyhow!(refused));
    }
    // Resolved as the daemon will (through root's own symlinks only, when root), so that a
    // path through another's symlink is refused here with the daemon's reason.
    let shown = args.mountpoint.display();
    let absolute =
        std::path::absolute(&args.mountpoint).with_context(|| format!("mount point {shown}"))?;
    let mountpoint = match mount::path::resolve_as_me(&absolute) {
        Ok(r) if r.missing.is_empty() => r.existing,
        Ok(_) => return Err(anyhow!("mount point {shown} does not exist")),
        Err(e) => return Err(anyhow!("mount point {shown} is refused: {e}")),
    };
    let req = MountRequest {
        mountpoint: crate::control::api_path(&mountpoint)
            .map_err(|e| anyhow!("mount point {e} (without --daemon, any path can be one)"))?
            .to_owned(),
        room: args.room.clone(),
        session: args.session.clone(),
        grant: (!args.grants.is_empty()).then(|| args.grants.clone()),
        token: args.token.clone(),
        sync_on_close: args.sync_on_close.then_some(true),
        passthrough: args.no_passthrough.then_some(false),
        label: args.label.clone(),
        read_only: args.read_only.then_some(true),
        noexec: args.noexec.then_some(true),
        store: args.store.clone(),
    };
    let socket = args.socket.as_deref().unwrap_or(Path::new(DEFAULT_SOCKET));
    let info = Client::new(socket)
        .add_mount(&req)
        .map_err(anyhow::Error::from)?;
    println!(
        "mounted {} {} at {} (grant: {})",
        info.kind,
        info.id,
        info.mountpoint,
        info.access()
    );
    Ok(())
}

fn session(cmd: SessionCommand) -> anyhow::Result<()> {
    match cmd {
        SessionCommand::Create {
            id,
            max_file_size,
            max_files,
            max_bytes,
            ttl,
            owner,
            show: args,
        } => {
            // What is not given is the daemon's default.
            let limits = (max_file_size.is_some() || max_files.is_some() || max_bytes.is_some())
                .then_some(RequestedLimits {
                    max_file_bytes: max_file_size.map(|l| l.0),
                    max_files: max_files.map(|l| l.0),
                    max_bytes: max_bytes.map(|l| l.0),
                });
            let ttl_secs = ttl
                .map(|t| token::parse_duration(&t).map(|d| d.as_secs()))
                .transpose()
                .context("--ttl")?;
            let req = SessionRequest {
                id,
                limits,
                ttl_secs,
                owner,
            };
            show(
                &args,
                "creating the session",
                |c| c.create_session(&req),
                output::session_created,
            )
        }
        SessionCommand::End {
            id,
            export,
            to_room,
            show: args,
        } => {
            let label = if export.is_empty() {
                format!("ending session {id}")
            } else {
                format!("exporting and ending session {id}")
            };
            let req = EndSessionRequest { export, to_room };
            show(
                &args,
                &label,
                |c| c.end_session(&id, &req),
                output::session_ended,
            )
        }
        SessionCommand::List(args) => show(
            &args,
            "listing sessions",
            |c| c.sessions(),
            |s| output::sessions(s, human::now_ms()),
        ),
        SessionCommand::Show { id, show: args } => show(
            &args,
            "reading the session",
            |c| c.session(&id),
            |s| output::session(s, human::now_ms()),
        ),
    }
}

fn records(cmd: RecordsCommand) -> anyhow::Result<()> {
    // What a call that answers nothing (`null`) did, said instead.
    let mut done = None;
    let (envelope, socket) = match cmd {
        RecordsCommand::Call { json, socket } => {
            (serde_json::from_str(&json).context("not JSON")?, socket)
        }
        RecordsCommand::Get {
            collection,
            id,
            socket,
        } => (
            serde_json::json!({"method": format!("{collection}.get"), "id": id}),
            socket,
        ),
        RecordsCommand::Set {
            collection,
            id,
            file,
            socket,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(anyhow::Error::from)?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            done = Some(format!("stored {collection} {id:?}"));
            (
                serde_json::json!({"method": format!("{collection}.set"), "id": id, "value": value}),
                socket,
            )
        }
        RecordsCommand::List {
            collection,
            session,
            show: args,
        } => {
            let envelope = serde_json::json!({
                "method": format!("{collection}.listBySession"),
                "sessionId": session,
            });
            return show(
                &args,
                "listing records",
                |c| c.storage(&envelope),
                |records| output::records(&collection, records),
            );
        }
    };
    let answer = human::waiting("calling the daemon", || client(&socket).storage(&envelope));
    match (answer, done) {
        (Ok(serde_json::Value::Null), Some(done)) => {
            println!("{done}");
            Ok(())
        }
        (answer, _) => print_json(&answer),
    }
}

fn issue_token(args: &TokenIssueArgs) -> anyhow::Result<String> {
    SpaceId::new(SpaceKind::Room, &args.room)?;
    let secret = token::read_secret_file(&args.secret_file)?;
    let ttl = token::parse_duration(&args.ttl).context("--ttl")?;
    let grant = if args.paths.is_empty() {
        Grant::none()
    } else {
        Grant::parse_cli(&args.paths).context("--path")?
    };
    token::issue(&secret, &args.name, &args.room, &grant, ttl).map_err(anyhow::Error::from)
}

/// The space and grant of a mount: from a verified token (with the token's name), or from
/// --room/--session and --grant.
fn space_and_grant(args: &MountArgs) -> anyhow::Result<(SpaceId, Grant, Option<String>)> {
    if let Some(tok) = &args.token {
        let secret_file = args.secret_file.as_ref().ok_or_else(|| {
            anyhow!(
                "--token needs --secret-file FILE (the secret it was signed with), or --daemon \
                 to have the daemon verify it with its own"
            )
        })?;
        let secret = token::read_secret_file(secret_file)?;
        let verified = token::verify(tok, &secret).context("token refused")?;
        let room = verified
            .room
            .ok_or_else(|| anyhow!("token refused: it names no room (no \"room\" grant)"))?;
        if args.session.is_some() {
            return Err(anyhow!("a token grants a room: use it without --session"));
        }
        if let Some(wanted) = &args.room
            && *wanted != room
        {
            return Err(anyhow!(
                "token refused: it is for room {room:?}, not {wanted:?}"
            ));
        }
        let room = SpaceId::new(SpaceKind::Room, &room)?;
        return Ok((room, verified.grant, verified.name));
    }
    let space = match (&args.room, &args.session) {
        (Some(id), None) => SpaceId::new(SpaceKind::Room, id)?,
        (None, Some(id)) => SpaceId::new(SpaceKind::Session, id)?,
        _ => return Err(anyhow!("give exactly one of --room ID or --session ID")),
    };
    let grant = Grant::parse_cli(&args.grants).context("--grant")?;
    Ok((space, grant, None))
}

fn mount_spec(args: MountArgs) -> anyhow::Result<MountSpec> {
    let (space, grant, token_name) = space_and_grant(&args)?;
    let cache_ttl = args.cache_ttl.unwrap_or(1.0);
    if !(cache_ttl.is_finite() && (0.0..=3600.0).contains(&cache_ttl)) {
        return Err(anyhow!(
            "--cache-ttl must be between 0 and 3600 seconds, not {cache_ttl}"
        ));
    }
    let poll_window_us = args.poll_window_us.unwrap_or(1000);
    if poll_window_us > 1_000_000 {
        return Err(anyhow!(
            "--poll-window-us must be at most 1000000 (one second), not {poll_window_us}"
        ));
    }
    let store = match &args.store {
        Some(s) => StoreConfig::parse(s).map_err(|e| Invalid(format!("--store: {e}")))?,
        None => StoreConfig::Local,
    };
    let threads = args.threads.unwrap_or_else(|| store.default_threads());
    if !(1..=64).contains(&threads) {
        return Err(anyhow!("--threads must be between 1 and 64, not {threads}"));
    }
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let records_dir = match args.records_dir {
        Some(dir) => crate::daemon::config::named_records_dir(&dir, "--records-dir")?.to_owned(),
        None => data_dir.join("records"),
    };
    Ok(MountSpec {
        store,
        records_dir,
        limits: None,
        data_dir,
        space,
        mountpoint: args.mountpoint,
        sync_on_close: args.sync_on_close,
        passthrough: !args.no_passthrough,
        cache_ttl: Duration::from_secs_f64(cache_ttl),
        threads,
        poll_window: Duration::from_micros(poll_window_us),
        grant,
        participant: match args.label {
            Some(label) => {
                crate::events::check_label(&label).context("--label")?;
                token_name.or(Some(label))
            }
            None => token_name,
        },
        read_only: args.read_only,
        no_exec: args.noexec,
    })
}

fn unmount(args: &UnmountArgs) -> anyhow::Result<()> {
    // A mount the daemon serves is unmounted through it, so it forgets the mount too (the
    // daemon's mount points are text: those of its API and its config).
    // Resolved as root may: through root's own symlinks only (an agent's link on the way
    // would have root unmount another mount, see `mount::path`).
    let resolved = match mount::path::existing_as_me(&args.mountpoint) {
        Ok(path) => Some(path),
        Err(e @ mount::path::Refused::Untrusted { .. }) => {
            return Err(anyhow!("not unmounting {}: {e}", args.mountpoint.display()));
        }
        Err(mount::path::Refused::Io(_)) => None,
    };
    let target = resolved.clone().unwrap_or(args.mountpoint.clone());
    if args.socket.exists()
        && let Some(target) = target.to_str()
    {
        let req = UnmountRequest {
            mountpoint: target.to_owned(),
            lazy: args.lazy,
        };
        match Client::new(&args.socket).remove_mount(&req) {
            Ok(()) => return Ok(()),
            Err(
                ClientError::Api { status: 404, .. }
                | ClientError::NoDaemon { .. }
                | ClientError::NotASocket { .. },
            ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let path = match resolved {
        Some(path) => path,
        None => mount::path::existing_as_me(&args.mountpoint)
            .map_err(|e| anyhow!("{}: {e}", args.mountpoint.display()))?,
    };
    match mount::mount_at(&path) {
        Some(m) if m.is_roomfs() => mount::unmount(&path, m.dev, args.lazy),
        Some(m) => Err(anyhow!(
            "{} is not a roomfs mount (it is {} from {})",
            path.display(),
            m.fstype,
            m.source
        )),
        None => Err(anyhow!("{} is not a mount point", path.display())),
    }
}

/// `--room` or `--session` as a space.
fn space_of(room: &Option<String>, session: &Option<String>) -> anyhow::Result<SpaceId> {
    match (room, session) {
        (Some(id), None) => Ok(SpaceId::new(SpaceKind::Room, id)?),
        (None, Some(id)) => Ok(SpaceId::new(SpaceKind::Session, id)?),
        _ => Err(anyhow!("give exactly one of --room ID or --session ID")),
    }
}

fn events(args: &EventsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let space = space_of(&args.room, &args.session)?;
    let path = format!(
        "/v1/events?space={}&since={}&follow={}",
        crate::control::client::encode_segment(&space.name()),
        args.since,
        args.follow
    );
    let mut out = std::io::stdout().lock();
    // Where to resume, and why the stream ended (its `events.end` line), when following.
    let (mut last, mut end) = (args.since, None);
    let mut reader_gone = false;
    client(&args.socket)
        .stream_lines(&path, args.token.as_deref(), |line| {
            if args.follow
                && let Ok(event) = serde_json::from_slice::<serde_json::Value>(line)
            {
                if let Some(seq) = event.get("seq").and_then(|s| s.as_u64()) {
                    last = seq;
                }
                if event["type"] == "events.end" {
                    end = event["reason"].as_str().map(str::to_owned);
                    last = event["last_seq"].as_u64().unwrap_or(last);
                }
            }
            // Stops when the reader goes away (a closed pipe).
            let written =
                out.write_all(line).is_ok() && out.write_all(b"\n").is_ok() && out.flush().is_ok();
            reader_gone = !written;
            written
        })
        .map_err(|e| match e {
            // Cut while following (the daemon killed, the connection lost): where to resume.
            ClientError::Io { .. } | ClientError::Protocol { .. } | ClientError::Gone { .. }
                if args.follow =>
            {
                let mut cause: &dyn std::error::Error = &e;
                while let Some(next) = cause.source() {
                    cause = next;
                }
                anyhow!(
                    "the stream of events was cut ({cause}): once the daemon answers again, \
                     resume with --since {last}"
                )
            }
            e => anyhow::Error::from(e),
        })?;
    if !args.follow || reader_gone {
        return Ok(());
    }
    match end.as_deref() {
        Some("deleted") => {
            eprintln!(
                "roomfs events: {} was deleted: no more events",
                space.name()
            );
            Ok(())
        }
        Some("stopping") => Err(anyhow!(
            "the daemon is stopping: once it is back, resume with --since {last}"
        )),
        _ => Err(anyhow!(
            "the daemon closed the stream: resume with --since {last}"
        )),
    }
}

fn url(args: &UrlArgs) -> anyhow::Result<()> {
    let space = space_of(&args.room, &args.session)?;
    let ttl = args
        .ttl
        .as_deref()
        .map(token::parse_duration)
        .transpose()
        .context("--ttl")?;
    let req = UrlRequest {
        room: (space.kind == SpaceKind::Room).then(|| space.id.clone()),
        session: (space.kind == SpaceKind::Session).then(|| space.id.clone()),
        path: args.path.clone(),
        attachment: args.attachment,
        ttl_secs: ttl.map(|t| t.as_secs()),
        token: args.token.clone(),
        direct: args.direct,
    };
    let signed = client(&args.socket)
        .sign_url(&req)
        .map_err(anyhow::Error::from)?;
    println!("{}", signed.url);
    Ok(())
}

/// A command-line mistake as one line: what is wrong, clap's tip if it has one, and which
/// `--help` to read (clap's own message spans several lines). `args` is the command line.
pub fn usage_error(err: &clap::Error, args: &[OsString]) -> String {
    let text = err.render().to_string();
    let mut what = Vec::new();
    let mut tips = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(tip) = line.strip_prefix("tip: ") {
            tips.push(tip.to_string());
        } else if !line.starts_with("Usage: ") && !line.starts_with("For more information") {
            what.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    let mut out = what.join(" ");
    // clap says only that some argument is not UTF-8: say which.
    if err.kind() == clap::error::ErrorKind::InvalidUtf8
        && let Some(named) = not_text(args)
    {
        out = named;
    }
    if out.is_empty() {
        out = "invalid command line".into();
    }
    for tip in tips {
        out.push_str(&format!(" ({tip})"));
    }
    // The subcommands named on the command line: `roomfs session create`.
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut path = vec!["roomfs".to_string()];
    for arg in args.iter().skip(1).map(|a| a.to_str().unwrap_or("")) {
        match command.find_subcommand(arg) {
            Some(sub) => {
                path.push(arg.to_string());
                command = sub.clone();
            }
            None if arg.starts_with('-') => continue,
            None => break,
        }
    }
    format!("{out}; see `{} --help`", path.join(" "))
}

/// The first argument of `args` that is not UTF-8, named as clap names arguments (`--room
/// <ID>`, `<PATH>`): paths of this host take any bytes, but ids, grants, tokens and the paths
/// sent to the daemon's JSON API are text.
fn not_text(args: &[OsString]) -> Option<String> {
    let bad = args.iter().position(|a| a.to_str().is_none())?;
    let bytes = args[bad].as_encoded_bytes();
    // `--room=VALUE`: the value.
    let value = match bytes.iter().position(|&b| b == b'=') {
        Some(eq) if bytes.starts_with(b"--") => &bytes[eq + 1..],
        _ => bytes,
    };
    let shown = format!("{:?}", std::ffi::OsStr::from_bytes(value));
    let shown = shown.trim_matches('"');
    let mut command = <Cli as clap::CommandFactory>::command();
    // Built, as clap builds it to parse: arguments are named only then.
    command.build();
    // Before `bad`, every argument is text: walk them as clap does to see what `bad` is.
    let takes_value = |cmd: &clap::Command, flag: &str| {
        let arg = match flag.strip_prefix("--") {
            Some(long) => cmd.get_arguments().find(|a| a.get_long() == Some(long)),
            None => {
                let short = flag.chars().nth(1);
                cmd.get_arguments().find(|a| a.get_short() == short)
            }
        };
        arg.is_some_and(|a| a.get_action().takes_values())
    };
    let (mut positionals, mut skip_value) = (0, false);
    for arg in args[1..bad].iter().filter_map(|a| a.to_str()) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg.starts_with('-') && arg.len() > 1 {
            skip_value = !arg.contains('=')
                && (arg.starts_with("--") || arg.len() == 2)
                && takes_value(&command, arg);
        } else if let Some(sub) = command.find_subcommand(arg).filter(|_| positionals == 0) {
            command = sub.clone();
        } else {
            positionals += 1;
        }
    }
    let name = if skip_value {
        let flag = args[bad - 1].to_str().unwrap_or_default();
        command
            .get_arguments()
            .find(|a| a.get_long() == flag.strip_prefix("--"))
            .map(|a| a.to_string())
            .or(Some(flag.to_string()))
    } else if bytes.starts_with(b"--")
        && let Some(eq) = bytes.iter().position(|&b| b == b'=')
    {
        let flag = String::from_utf8_lossy(&bytes[..eq]).into_owned();
        command
            .get_arguments()
            .find(|a| a.get_long() == flag.strip_prefix("--"))
            .map(|a| a.to_string())
            .or(Some(flag))
    } else {
        command
            .get_positionals()
            .nth(positionals)
            .map(|a| a.to_string())
    };
    let why = "not UTF-8 text (ids, grants, tokens and the paths the daemon's API takes are text)";
    Some(match name {
        Some(name) => format!("invalid value '{shown}' for '{name}': {why}"),
        None => format!("argument '{shown}' is {why}"),
    })
}
