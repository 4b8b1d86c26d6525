//! `volumed`: the daemon. Runs in the foreground; see `volumed --help`.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
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

/// Plain lines without timestamps under journald (which stamps them), full lines otherwise;
/// colours only on a terminal. Fields that carry user-supplied text (volume and image names,
/// reasons, control lines) are logged with `?`, which quotes and escapes them, so a name
/// cannot forge a line or a field.
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
    if stderr_is_journal() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Whether stderr is the journal's stream: systemd names it in `JOURNAL_STREAM` as
/// `DEVICE:INODE`. A variable inherited by a process whose stderr was redirected elsewhere
/// does not count.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    let stderr = std::io::stderr().as_fd().try_clone_to_owned();
    let meta = stderr.map(std::fs::File::from).and_then(|f| f.metadata());
    meta.is_ok_and(|m| m.dev() == device && m.ino() == inode)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one test that touches `JOURNAL_STREAM`, so no other test sees it change.
    #[test]
    fn journal_is_detected_only_when_the_variable_names_stderr() {
        let stderr = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let meta = std::fs::File::from(stderr).metadata().unwrap();

        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        assert!(stderr_is_journal());
        std::env::set_var(
            "JOURNAL_STREAM",
            format!("{}:{}", meta.dev(), meta.ino() + 1),
        );
        assert!(!stderr_is_journal(), "another stream than stderr");
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
    }
}
