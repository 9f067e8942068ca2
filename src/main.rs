use clap::Parser;
use clap::error::ErrorKind;

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,fuser::mnt=error"),
    )
    .format_timestamp_millis()
    .init();
    let args: Vec<String> = std::env::args().collect();
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
