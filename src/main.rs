use clap::Parser;

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,fuser::mnt=error"),
    )
    .format_timestamp_millis()
    .init();
    let cli = roomfs::cli::Cli::parse();
    if let Err(message) = roomfs::cli::run(cli) {
        eprintln!("roomfs: error: {message}");
        std::process::exit(1);
    }
}
