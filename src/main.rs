use clap::Parser;
use clap::error::ErrorKind;

/// Buffers of 4 MiB and more (an S3 store's read windows and upload parts) are mapped and
/// unmapped by glibc's malloc instead of kept in its heaps. Left to itself, glibc raises this
/// threshold (up to 32 MiB) after the first such buffer is freed, and then keeps freed windows
/// in its per-thread arenas: a cold read of a large S3 file kept about 350 MiB resident instead
/// of about 55 MiB (scripts/bench-s3-memory). Smaller buffers (FUSE's 1 MiB reads) stay in the
/// heaps, as before.
fn bound_malloc_heaps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of malloc; called first thing in main, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Raises the soft limit of open files to the hard one, as the daemon holds a descriptor per
/// open file, per passthrough backing file and per cached S3 object (bounded by it, see
/// `store::s3::cache`): a `roomfs mount` started from a shell would otherwise have 1,024,
/// however many the system allows. (systemd's unit sets both; nothing else is changed.)
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a struct of ours.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() {
    bound_malloc_heaps();
    raise_open_files_limit();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,fuser::mnt=error"),
    )
    .format_timestamp_millis()
    .init();
    // Arguments are bytes: a path (a mount point, a socket, a file) may be any, and an argument
    // that must be text is refused by name (`cli::usage_error`), never a panic.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // /sbin/mount.fuse.roomfs, run by mount(8).
    if args.first().is_some_and(|a| roomfs::helper::is_helper(a)) {
        std::process::exit(roomfs::helper::main(&args[1..]));
    }
    let cli = match roomfs::cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            eprintln!("roomfs: error: {}", roomfs::cli::usage_error(&e, &args));
            std::process::exit(2);
        }
    };
    if let Err(message) = roomfs::cli::run(cli) {
        eprintln!("roomfs: error: {message:#}");
        std::process::exit(1);
    }
}
