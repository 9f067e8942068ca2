use clap::Parser;
use clap::error::ErrorKind;

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,fuser::mnt=error"),
    )
    .format_timestamp_millis()
    .init();
    let args: Vec<String> = std::env::args().collect();
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
        eprintln!("roomfs: error: {message}");
        std::process::exit(1);
    }
}
