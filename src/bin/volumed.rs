//! `volumed`: the daemon. Runs in the foreground; see `volumed --help`.

use std::process::ExitCode;

use clap::Parser;
use volumed::daemon_args::DaemonArgs;

fn main() -> ExitCode {
    let args = DaemonArgs::parse();
    let config = match volumed::config::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("volumed: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }

    init_logging(&config.log_level);
    match volumed::daemon::run(config, args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("volumed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Plain lines without timestamps under journald (which stamps them), full lines otherwise.
fn init_logging(level: &str) {
    // fuser warns about every request it answers by default and about our own unmount at
    // stop; keep its errors only, unless the operator asks for it by name.
    let level = if level.contains("fuser") {
        level.to_string()
    } else {
        format!("{level},fuser=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.init();
    }
}
