//! The daemon's command line. It lives in the library rather than in `src/bin/volumed.rs` so
//! that `volumectl man` can render volumed's manual page from the very definition the daemon
//! parses.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

/// Serves block-device volumes as files through FUSE and re-images them on request.
#[derive(Parser, Debug)]
#[command(name = "volumed", version, about, long_about = LONG_ABOUT)]
#[command(after_long_help = AFTER_LONG_HELP)]
pub struct DaemonArgs {
    /// Configuration file (TOML); without it, built-in defaults are used.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Check the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
}

const LONG_ABOUT: &str = "\
Serves block-device volumes as regular files through FUSE and re-images them on request, \
following OpenStack Cinder's os-reimage.

Runs in the foreground. Each volume is a file in the mountpoint; the control API (Cinder v3 and \
Glance v2 routes) answers HTTP/1.1 on a Unix socket; volumectl(1) is its command-line client.";

// Lines stay within 70 columns: the manual page indents them by 7 and does not refill them.
const AFTER_LONG_HELP: &str = "\
Signals:
  SIGTERM, SIGINT  stop cleanly: refuse new requests, sync every
                   backing file, unmount, remove the socket, exit 0
  SIGHUP           reload the policies from the configuration file

Exit status:
  0  stopped cleanly, or --check-config found the file valid
  1  failed at start or while running (the reason is printed)
  2  the configuration or the command line is invalid";

impl DaemonArgs {
    /// The clap command, for manual pages and completions.
    pub fn command() -> clap::Command {
        <Self as CommandFactory>::command()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_is_consistent() {
        DaemonArgs::command().debug_assert();
    }

    #[test]
    fn config_and_check_config_parse() {
        let args = DaemonArgs::try_parse_from(["volumed", "--config", "/x.toml", "--check-config"])
            .expect("valid command line");

        assert_eq!(args.config, Some(PathBuf::from("/x.toml")));
        assert!(args.check_config);
    }
}
