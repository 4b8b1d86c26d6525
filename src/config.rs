//! `daemon.toml`: where the daemon keeps things and who may do what.
//!
//! Every key is optional; a missing file means all defaults. Unknown keys and invalid values
//! stop the daemon at start with a message that names the key, so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The daemon's configuration after validation.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory where the volumes appear as files.
    pub mountpoint: PathBuf,
    /// Path of the control socket.
    pub socket: PathBuf,
    /// Octal permission bits of the socket file (never world-writable unless asked).
    pub socket_mode: String,
    /// Group that owns the socket file; by default the admin group if it exists.
    pub socket_group: Option<String>,
    /// Directory of backing files, images and the state file.
    pub state_dir: PathBuf,
    /// Members of this group are administrators, like root.
    pub admin_group: String,
    /// Largest volume in GiB a create or extend may ask for.
    pub max_volume_size: u64,
    /// Largest image upload in bytes.
    pub max_image_size: u64,
    /// FUSE request threads.
    pub fuse_threads: usize,
    /// Size in MiB of each window of the image mapped during a refill.
    pub refill_window_mib: u64,
    /// Upper bound of a refill's rate in MiB/s, so a re-image leaves disk bandwidth to the
    /// other volumes; 0 means unlimited.
    pub refill_rate_limit: u64,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace` or a tracing directive).
    pub log_level: String,
    /// Policy rules: action names (`volume:reimage`) and rule aliases (`admin_or_owner`) to
    /// check strings.
    pub policy: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mountpoint: PathBuf::from("/run/volumed/volumes"),
            socket: PathBuf::from("/run/volumed/volumed.sock"),
            socket_mode: "0660".to_string(),
            socket_group: None,
            state_dir: PathBuf::from("/var/lib/volumed"),
            admin_group: "volumed-admin".to_string(),
            max_volume_size: 16 * 1024,
            max_image_size: 1 << 40,
            fuse_threads: 4,
            refill_window_mib: 16,
            refill_rate_limit: 0,
            log_level: "info".to_string(),
            policy: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Reads and validates `path`; `None` means built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let config = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating values.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_string() + &key_hint(&e))
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, path) in [
            ("mountpoint", &self.mountpoint),
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
        ] {
            if !path.is_absolute() {
                return Err(format!("{key}: must be an absolute path, got {path:?}"));
            }
        }
        if self.mountpoint.starts_with(&self.state_dir)
            || self.state_dir.starts_with(&self.mountpoint)
        {
            return Err("mountpoint: must not be inside state_dir or contain it".to_string());
        }
        let mode = self.socket_mode_bits()?;
        if mode & 0o002 != 0 {
            tracing::warn!(
                "socket_mode {:o} lets every local user write to the socket",
                mode
            );
        }
        // A byte count of the largest volume must fit comfortably in 64 bits.
        if !(1..=MAX_VOLUME_GIB).contains(&self.max_volume_size) {
            return Err(format!(
                "max_volume_size: must be 1 to {MAX_VOLUME_GIB} (GiB), got {}",
                self.max_volume_size
            ));
        }
        if self.socket.starts_with(&self.mountpoint) || self.socket.starts_with(&self.state_dir) {
            return Err("socket: must not be inside mountpoint or state_dir".to_string());
        }
        if let Some(group) = &self.socket_group {
            if crate::identity::group_id(group).is_none() {
                return Err(format!("socket_group: no group named {group:?}"));
            }
        }
        if self.max_image_size == 0 {
            return Err("max_image_size: must be at least 1 (byte)".to_string());
        }
        if !(1..=64).contains(&self.fuse_threads) {
            return Err(format!(
                "fuse_threads: must be 1 to 64, got {}",
                self.fuse_threads
            ));
        }
        if !(1..=1024).contains(&self.refill_window_mib) {
            return Err(format!(
                "refill_window_mib: must be 1 to 1024, got {}",
                self.refill_window_mib
            ));
        }
        if self.admin_group.is_empty() {
            return Err("admin_group: must not be empty".to_string());
        }
        validate_log_level(&self.log_level)?;
        crate::policy::Policy::new(&self.admin_group, &self.policy)
            .map_err(|e| format!("policy: {e}"))?;
        Ok(())
    }

    /// The socket's permission bits.
    pub fn socket_mode_bits(&self) -> Result<u32, String> {
        let digits = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 => Ok(mode),
            _ => Err(format!(
                "socket_mode: must be octal permission bits like \"0660\", got {:?}",
                self.socket_mode
            )),
        }
    }
}

/// Largest `max_volume_size` in GiB (1 PiB).
pub const MAX_VOLUME_GIB: u64 = 1 << 20;

/// Accepts a level name, or comma-separated `target=level` directives.
fn validate_log_level(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let valid = !text.is_empty()
        && text.split(',').all(|directive| {
            let (target, level) = directive.rsplit_once('=').unwrap_or(("x", directive));
            LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
                && !target.is_empty()
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
        });
    if !valid {
        return Err(format!(
            "log_level: expected one of {} or target=level directives, got {text:?}",
            LEVELS.join(", ")
        ));
    }
    Ok(())
}

/// Adds the position toml reports, so "unknown field" errors also say where.
fn key_hint(err: &toml::de::Error) -> String {
    match err.span() {
        Some(span) => format!(" (at byte {})", span.start),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("").unwrap();
        config.validate().unwrap();
        assert_eq!(config.mountpoint, PathBuf::from("/run/volumed/volumes"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("mountpont = \"/x\"").unwrap_err();
        assert!(err.contains("mountpont"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("fuse_threads = \"four\"").unwrap_err();
        assert!(
            err.contains("fuse_threads") || err.contains("invalid type"),
            "{err}"
        );
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("mountpoint = \"relative\"", "mountpoint"),
            ("socket_mode = \"999\"", "socket_mode"),
            ("fuse_threads = 0", "fuse_threads"),
            ("max_volume_size = 0", "max_volume_size"),
            ("[policy]\n\"volume:reimage\" = \"rule:nope\"", "policy"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).and_then(|c| c.validate()).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
