//! `volumectl`: the command-line client of volumed.
//!
//! Every command is one or a few requests to the daemon's socket through
//! [`volumed::client::Client`]. Output is for people by default (tables for lists, `key: value`
//! lines for one resource) and the daemon's JSON with `--json`. Errors are printed once, by
//! `main`, as `volumectl: <what went wrong>` with a hint where there is something to do about
//! it, and mapped to the exit codes listed in [`EXIT_CODES`].

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde_json::{json, Map, Value};
use volumed::client::{path_segment, Client, ClientError, Reply, UploadProgress};

const DEFAULT_SOCKET: &str = "/run/volumed/volumed.sock";
const SOCKET_ENV: &str = "VOLUMED_SOCKET";

/// A request volumed has not answered by then is taken as a hung daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How often `reimage --wait` asks for progress.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How often progress is printed when stderr is not a terminal (logs, CI).
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How long a re-image volumed accepted may go unreported before we stop believing in it.
const REPORT_GRACE: Duration = Duration::from_secs(30);

/// How long `--wait` rides out a daemon that stopped answering (a restart, say).
const UNREACHABLE_GRACE: Duration = Duration::from_secs(10);

/// The span of samples the transfer rate is averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

const BAR_WIDTH: usize = 24;
const MIB: f64 = 1024.0 * 1024.0;
const GIB: u64 = 1 << 30;

/// Exit codes, as documented in `--help`.
mod exit {
    pub const REFUSED: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const REIMAGE_FAILED: u8 = 4;
    pub const TIMED_OUT: u8 = 5;
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    volumed refused or failed the request, or a local file could not be read
  2    usage error
  3    volumed could not be reached or did not answer
  4    the re-image waited for with --wait failed
  5    --wait gave up after --timeout (the re-image goes on in volumed)
  130  an image import was interrupted (its queued image is deleted)";

/// Manage the volumes and images of volumed.
#[derive(Debug, Parser)]
#[command(name = "volumectl", version, after_long_help = EXIT_CODES)]
#[command(
    long_about = "Manage the volumes, images and attachments of volumed.\n\n\
    Talks to volumed's control socket. Volumes and images may be named by id or by name."
)]
struct Cli {
    /// volumed's control socket [default: $VOLUMED_SOCKET, else /run/volumed/volumed.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Print the daemon's JSON (or a JSON object) instead of text, for scripts
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List volumes
    List,
    /// Show one volume
    Show {
        /// Volume id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        volume: String,
    },
    /// Create a volume
    Create(CreateArgs),
    /// Delete a volume
    Delete {
        /// Volume id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        volume: String,
    },
    /// Grow a volume
    Extend {
        /// Volume id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        volume: String,
        /// The new size in GiB
        #[arg(value_name = "NEW_SIZE_GIB", value_parser = clap::value_parser!(u64).range(1..))]
        new_size: u64,
    },
    /// Force a volume's status (administrators)
    ResetStatus(ResetStatusArgs),
    /// Write an image over a volume
    Reimage(ReimageArgs),
    /// Manage images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage attachments
    #[command(subcommand)]
    Attachment(AttachmentCommand),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Name of the new volume
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    name: String,
    /// Size in GiB
    #[arg(long, value_name = "GIB", value_parser = clap::value_parser!(u64).range(1..))]
    size: u64,
    /// Free-form description
    #[arg(long)]
    description: Option<String>,
    /// The owning user, by name or uid (administrators)
    #[arg(long, value_name = "USER_OR_UID", value_parser = parse_owner)]
    owner: Option<Value>,
}

#[derive(Debug, Args)]
struct ResetStatusArgs {
    /// Volume id or name
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    volume: String,
    /// The status to set, e.g. available or error
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    status: String,
    /// The attach status to set, e.g. detached
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    attach_status: Option<String>,
}

#[derive(Debug, Args)]
struct ReimageArgs {
    /// Volume id or name
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    volume: String,
    /// Image id or name
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    image: String,
    /// Also re-image a volume in the reserved status
    #[arg(long)]
    reserved: bool,
    /// Follow the re-image until it ends, showing progress on stderr
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit code 5)
    #[arg(
        long,
        value_name = "SECS",
        requires = "wait",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    timeout: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Create an image and upload a file into it
    Import(ImportArgs),
    /// List images
    List,
    /// Show one image
    Show {
        /// Image id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        image: String,
    },
    /// Delete an image
    Delete {
        /// Image id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        image: String,
    },
    /// Stop an image from being used (administrators)
    Deactivate {
        /// Image id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        image: String,
    },
    /// Make a deactivated image usable again (administrators)
    Reactivate {
        /// Image id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        image: String,
    },
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The file to upload
    file: PathBuf,
    /// Name of the new image
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    name: String,
    /// Disk format of the file
    #[arg(long, default_value = "raw", value_parser = NonEmptyStringValueParser::new())]
    disk_format: String,
    /// Container format of the file
    #[arg(long, default_value = "bare", value_parser = NonEmptyStringValueParser::new())]
    container_format: String,
    /// Smallest volume, in GiB, the image may be written to
    #[arg(long, value_name = "N")]
    min_disk: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum AttachmentCommand {
    /// Attach a volume (reserve it for an instance)
    Create {
        /// Volume id or name
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        volume: String,
        /// The instance the volume is for
        #[arg(long, value_name = "UUID")]
        instance: Option<uuid::Uuid>,
        /// The host connector, as a JSON object
        #[arg(long, value_name = "JSON", value_parser = parse_connector)]
        connector: Option<Value>,
    },
    /// List attachments
    List,
    /// Give an attachment its host connector
    Update {
        /// Attachment id
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        id: String,
        /// The host connector, as a JSON object
        #[arg(long, value_name = "JSON", value_parser = parse_connector)]
        connector: Value,
    },
    /// Mark an attachment complete (the volume becomes in-use)
    Complete {
        /// Attachment id
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        id: String,
    },
    /// Delete an attachment (detach)
    Delete {
        /// Attachment id
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        id: String,
    },
}

/// A user name stays a string; a number is a uid.
fn parse_owner(text: &str) -> Result<Value, String> {
    if text.is_empty() {
        return Err("the owner must be a user name or a uid".to_owned());
    }
    match text.parse::<u32>() {
        Ok(uid) => Ok(Value::from(uid)),
        Err(_) => Ok(Value::from(text)),
    }
}

fn parse_connector(text: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(connector @ Value::Object(_)) => Ok(connector),
        Ok(_) => {
            Err("the connector must be a JSON object, e.g. '{\"host\": \"node1\"}'".to_owned())
        }
        Err(err) => Err(format!("not valid JSON: {err}")),
    }
}

/// `--socket`, else `$VOLUMED_SOCKET` when set and not empty, else the packaged default.
fn socket_path(flag: Option<PathBuf>, env: Option<OsString>) -> PathBuf {
    flag.or_else(|| env.filter(|value| !value.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Why a command ends with a non-zero exit code, worded for the person who ran it.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
    hint: Option<String>,
}

/// The kind of resource a request was about, to point hints at the right listing.
#[derive(Clone, Copy, Debug)]
enum Subject {
    Volume,
    Image,
    Attachment,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: None,
        }
    }

    fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A stdout that went away (`volumectl list | head`) ends the run quietly and successfully.
    fn broken_pipe() -> Self {
        Self::new(0, "")
    }

    /// Wraps a client error with what we were doing, and the hint that usually fits it.
    fn client(context: &str, error: ClientError, subject: Subject) -> Self {
        let hint = generic_hint(&error, subject);
        let failure = match &error {
            ClientError::Unreachable { .. } | ClientError::TimedOut(_) => {
                Self::new(exit::UNREACHABLE, error.to_string())
            }
            _ => Self::new(exit::REFUSED, format!("{context}: {error}")),
        };
        match hint {
            Some(hint) => failure.with_hint(hint),
            None => failure,
        }
    }
}

fn generic_hint(error: &ClientError, subject: Subject) -> Option<String> {
    let fault = match error {
        ClientError::Unreachable { socket, error } => {
            let socket = socket.display();
            return Some(match error.kind() {
                io::ErrorKind::PermissionDenied => {
                    format!("ask an administrator for access to {socket}")
                }
                _ => format!(
                    "is volumed running? (socket {socket}; choose another with --socket or \
                     {SOCKET_ENV})"
                ),
            });
        }
        ClientError::TimedOut(_) => return Some("volumed seems stuck: see its log".to_owned()),
        ClientError::Api(fault) => fault,
        _ => return None,
    };

    let (owner, listing) = match subject {
        Subject::Volume => ("the volume's owner", "volumectl list"),
        Subject::Image => ("the image's owner", "volumectl image list"),
        Subject::Attachment => ("the volume's owner", "volumectl attachment list"),
    };
    match fault.status {
        403 => Some(format!("ask an administrator or {owner}")),
        404 if fault.message.is_some() => Some(format!("see `{listing}` for what exists")),
        404 => Some("volumed may be older than volumectl and not know this request".to_owned()),
        406 => Some("volumed may be older than volumectl (this needs volume API 3.71)".to_owned()),
        413 => {
            Some("volumed's store has no room for this: free space or ask an administrator".into())
        }
        500..=599 => Some("see volumed's log for the cause".to_owned()),
        _ => None,
    }
}

/// The hint for a re-image refused because of the volume's status.
fn reimage_status_hint(volume: &str, status: Option<&str>, reserved: bool) -> String {
    match status {
        Some("in-use") => {
            format!("{volume} is in-use: detach it, or re-image a reserved volume with --reserved")
        }
        Some("reserved") if !reserved => {
            format!("{volume} is reserved: add --reserved to re-image it anyway")
        }
        Some(status) => format!(
            "{volume} is {status}: re-image needs it available (or reserved, with --reserved)"
        ),
        None => "re-image needs an available volume, or a reserved one with --reserved".to_owned(),
    }
}

/// The hint for a re-image refused because the image does not fit the volume.
fn reimage_size_hint(volume: &str, image: &Value) -> String {
    let min_disk = image.get("min_disk").and_then(Value::as_u64).unwrap_or(0);
    let bytes = ["size", "virtual_size"]
        .iter()
        .filter_map(|key| image.get(*key).and_then(Value::as_u64))
        .max()
        .unwrap_or(0);
    let needed = min_disk.max(bytes.div_ceil(GIB));
    if needed == 0 {
        return format!("extend the volume first: `volumectl extend {volume} NEW_SIZE_GIB`");
    }
    format!("the image needs {needed} GiB: first run `volumectl extend {volume} {needed}`")
}

/// Sizes in binary units with one decimal, the way people read them.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }

    // Step up at 1023.95 so that rounding never prints "1024.0 KiB".
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    let done = u128::from(done.min(total));
    u64::try_from(done * 100 / u128::from(total)).unwrap_or(100)
}

fn clock(seconds: u64) -> String {
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}:{minutes:02}:{seconds:02}")
    } else {
        format!("{minutes}:{seconds:02}")
    }
}

/// The progress line printed every few seconds when stderr is not a terminal.
fn plain_progress_line(label: &str, done: u64, total: u64) -> String {
    if total == 0 {
        return format!("{label}: {}", human_bytes(done));
    }
    format!(
        "{label}: {} of {} ({}%)",
        human_bytes(done),
        human_bytes(total),
        percent(done, total)
    )
}

/// The progress bar redrawn in place on a terminal.
fn bar_progress_line(label: &str, done: u64, total: u64, rate: Option<f64>) -> String {
    let rate_text = match rate {
        Some(rate) => format!("{:.1} MiB/s", rate / MIB),
        None => "-- MiB/s".to_owned(),
    };
    if total == 0 {
        return format!("{label}: {}  {rate_text}", human_bytes(done));
    }

    let shown = done.min(total);
    let filled = usize::try_from(u128::from(shown) * BAR_WIDTH as u128 / u128::from(total))
        .unwrap_or(BAR_WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled));
    let left = match rate {
        Some(rate) if rate > 0.0 => clock(((total - shown) as f64 / rate).ceil() as u64),
        _ => "--:--".to_owned(),
    };
    format!(
        "{label} [{bar}] {:>3}%  {} of {}  {rate_text}  {left} left",
        percent(done, total),
        human_bytes(done),
        human_bytes(total)
    )
}

/// Transfer rate over the last few seconds of samples.
#[derive(Debug, Default)]
struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    fn record(&mut self, at: Instant, bytes: u64) {
        // Fewer bytes than before means a new transfer: the old samples say nothing about it.
        if self.samples.back().is_some_and(|&(_, last)| bytes < last) {
            self.samples.clear();
        }
        self.samples.push_back((at, bytes));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|&(first, _)| at.duration_since(first) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second, once the samples span long enough to mean something.
    fn bytes_per_second(&self) -> Option<f64> {
        let (first_at, first) = *self.samples.front()?;
        let (last_at, last) = *self.samples.back()?;
        let span = last_at.duration_since(first_at);
        if span < Duration::from_millis(500) {
            return None;
        }
        Some((last - first) as f64 / span.as_secs_f64())
    }
}

/// Progress of one transfer on stderr: a bar on a terminal, occasional lines elsewhere.
struct ProgressView {
    label: String,
    bar: bool,
    meter: RateMeter,
    last_plain: Option<(Instant, u64)>,
    drawn: bool,
}

impl ProgressView {
    fn new(label: &str, bar: bool) -> Self {
        Self {
            label: label.to_owned(),
            bar,
            meter: RateMeter::default(),
            last_plain: None,
            drawn: false,
        }
    }

    fn update(&mut self, sink: &mut dyn Write, at: Instant, done: u64, total: u64) {
        self.meter.record(at, done);

        // Progress is a courtesy: a stderr that fails must not fail the command.
        if self.bar {
            let line = bar_progress_line(&self.label, done, total, self.meter.bytes_per_second());
            let _ = write!(sink, "\r{line}\x1b[K");
            let _ = sink.flush();
            self.drawn = true;
        } else if self
            .last_plain
            .is_none_or(|(printed, _)| at.duration_since(printed) >= PLAIN_PROGRESS_EVERY)
        {
            let _ = writeln!(sink, "{}", plain_progress_line(&self.label, done, total));
            self.last_plain = Some((at, done));
        }
    }

    /// Leaves the bar's last state on its own line, or logs the final count.
    fn finish(&mut self, sink: &mut dyn Write, done: u64, total: u64) {
        if self.bar {
            if self.drawn {
                let _ = writeln!(sink);
            }
        } else if self.last_plain.is_some_and(|(_, printed)| printed != done) {
            let _ = writeln!(sink, "{}", plain_progress_line(&self.label, done, total));
        }
    }
}

/// Column-aligned text with a header row; the last column is not padded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let mut text = String::new();
    let header_row: Vec<String> = headers.iter().map(|header| (*header).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A JSON value as one cell of text.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) if text.is_empty() => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) if items.is_empty() => "-".to_owned(),
        Some(Value::Object(fields)) if fields.is_empty() => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// Links between API documents: useful to programs, noise to people.
const NAVIGATION_KEYS: &[&str] = &["links", "self", "file", "schema"];

/// `key: value` lines, nested objects and lists flattened into dotted keys. `preferred` keys
/// come first in that order, the rest alphabetically; `format` may render a key its own way.
fn show_lines(
    resource: &Value,
    preferred: &[&str],
    format: &dyn Fn(&str, &Value) -> Option<String>,
) -> String {
    let Some(fields) = resource.as_object() else {
        return format!("{}\n", cell(Some(resource)));
    };

    let mut keys: Vec<&String> = preferred
        .iter()
        .filter_map(|key| fields.get_key_value(*key).map(|(key, _)| key))
        .collect();
    keys.extend(fields.keys().filter(|key| {
        !preferred.contains(&key.as_str()) && !NAVIGATION_KEYS.contains(&key.as_str())
    }));

    let mut pairs = Vec::new();
    for key in keys {
        if let Some(value) = fields.get(key) {
            flatten(key, value, format, &mut pairs);
        }
    }

    let width = pairs
        .iter()
        .map(|(key, _)| key.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut text = String::new();
    for (key, value) in pairs {
        let label = format!("{key}:");
        let _ = writeln!(text, "{label:<width$} {value}");
    }
    text
}

fn flatten(
    key: &str,
    value: &Value,
    format: &dyn Fn(&str, &Value) -> Option<String>,
    pairs: &mut Vec<(String, String)>,
) {
    if let Some(text) = format(key, value) {
        pairs.push((key.to_owned(), text));
        return;
    }
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (name, inner) in fields {
                flatten(&format!("{key}.{name}"), inner, format, pairs);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (index, inner) in items.iter().enumerate() {
                flatten(&format!("{key}.{index}"), inner, format, pairs);
            }
        }
        _ => pairs.push((key.to_owned(), cell(Some(value)))),
    }
}

fn bytes_with_unit(value: &Value) -> Option<String> {
    let bytes = value.as_u64()?;
    Some(format!("{bytes} ({})", human_bytes(bytes)))
}

const VOLUME_KEYS: &[&str] = &[
    "id",
    "name",
    "description",
    "status",
    "status_reason",
    "size",
    "bootable",
    "user_id",
    "owner_uid",
    "attachments",
    "volume_image_metadata",
    "reimage",
    "created_at",
    "updated_at",
];

const IMAGE_KEYS: &[&str] = &[
    "id",
    "name",
    "status",
    "disk_format",
    "container_format",
    "size",
    "virtual_size",
    "min_disk",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "visibility",
    "protected",
    "owner",
    "created_at",
    "updated_at",
];

const ATTACHMENT_KEYS: &[&str] = &[
    "id",
    "status",
    "volume_id",
    "instance",
    "attach_mode",
    "connection_info",
];

fn show_volume(volume: &Value) -> String {
    let format = |key: &str, value: &Value| match key {
        "size" => value.as_u64().map(|size| format!("{size} GiB")),
        "reimage.bytes_done" => {
            let total = volume
                .pointer("/reimage/bytes_total")
                .and_then(Value::as_u64);
            let done = value.as_u64()?;
            match total {
                Some(total) if total > 0 => Some(format!(
                    "{done} ({} of {}, {}%)",
                    human_bytes(done),
                    human_bytes(total),
                    percent(done, total)
                )),
                _ => bytes_with_unit(value),
            }
        }
        "reimage.bytes_total" => bytes_with_unit(value),
        _ => None,
    };
    show_lines(volume, VOLUME_KEYS, &format)
}

fn show_image(image: &Value) -> String {
    let format = |key: &str, value: &Value| match key {
        "size" | "virtual_size" => bytes_with_unit(value),
        "min_disk" => value.as_u64().map(|size| format!("{size} GiB")),
        _ => None,
    };
    show_lines(image, IMAGE_KEYS, &format)
}

fn show_attachment(attachment: &Value) -> String {
    show_lines(attachment, ATTACHMENT_KEYS, &|key, value| match key {
        // One line of JSON reads better than a dozen dotted keys of connection details.
        "connection_info" | "connector" if value.is_object() => Some(value.to_string()),
        _ => None,
    })
}

/// The `reimage` member of a volume detail.
#[derive(Clone, Debug, PartialEq)]
struct ReimageRun {
    image_id: String,
    state: String,
    bytes_done: u64,
    bytes_total: u64,
    message: Option<String>,
    started_at: Option<String>,
}

impl ReimageRun {
    fn of(volume: &Value) -> Option<Self> {
        let run = volume.get("reimage")?.as_object()?;
        let text = |key: &str| run.get(key).and_then(Value::as_str).map(str::to_owned);
        let count = |key: &str| run.get(key).and_then(Value::as_u64).unwrap_or(0);
        Some(Self {
            image_id: text("image_id")?,
            state: text("state")?,
            bytes_done: count("bytes_done"),
            bytes_total: count("bytes_total"),
            message: text("message").filter(|message| !message.is_empty()),
            started_at: text("started_at"),
        })
    }

    /// True when `self` is the same run as `earlier`, seen again.
    fn same_run(&self, earlier: &Self) -> bool {
        self.image_id == earlier.image_id
            && self.started_at.is_some()
            && self.started_at == earlier.started_at
    }

    fn summary(&self) -> String {
        match self.state.as_str() {
            "running" if self.bytes_total > 0 => {
                format!("running {}%", percent(self.bytes_done, self.bytes_total))
            }
            state => state.to_owned(),
        }
    }
}

fn volume_row(volume: &Value) -> Vec<String> {
    let size = match volume.get("size").and_then(Value::as_u64) {
        Some(size) => format!("{size} GiB"),
        None => cell(volume.get("size")),
    };
    let attachments = volume
        .get("attachments")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let reimage = ReimageRun::of(volume).map_or_else(|| "-".to_owned(), |run| run.summary());
    vec![
        cell(volume.get("id")),
        cell(volume.get("name")),
        cell(volume.get("status")),
        size,
        cell(volume.get("bootable")),
        attachments.to_string(),
        reimage,
    ]
}

fn image_row(image: &Value) -> Vec<String> {
    let format = format!(
        "{}/{}",
        cell(image.get("disk_format")),
        cell(image.get("container_format"))
    );
    let size = image
        .get("size")
        .and_then(Value::as_u64)
        .map_or_else(|| "-".to_owned(), human_bytes);
    let min_disk = match image.get("min_disk").and_then(Value::as_u64) {
        Some(gib) if gib > 0 => format!("{gib} GiB"),
        _ => "-".to_owned(),
    };
    vec![
        cell(image.get("id")),
        cell(image.get("name")),
        cell(image.get("status")),
        format,
        size,
        min_disk,
    ]
}

fn attachment_row(attachment: &Value) -> Vec<String> {
    vec![
        cell(attachment.get("id")),
        cell(attachment.get("volume_id")),
        cell(attachment.get("status")),
        cell(attachment.get("instance")),
        cell(attachment.get("attach_mode")),
    ]
}

/// The list under `key` of a reply such as `{"volumes": [...]}`.
fn listed(reply: &Reply, key: &str) -> Result<Vec<Value>, ClientError> {
    match reply.member(key)? {
        Value::Array(items) => Ok(items),
        _ => Err(ClientError::InvalidReply(format!(
            "\"{key}\" is not a list"
        ))),
    }
}

fn text_field(resource: &Value, key: &str) -> Result<String, ClientError> {
    resource
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ClientError::InvalidReply(format!("no \"{key}\" in the reply")))
}

/// The name of a resource for messages, falling back to what the user typed.
fn display_name(resource: &Value, typed: &str) -> String {
    match resource.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => typed.to_owned(),
    }
}

fn volume_path(volume: &str) -> String {
    format!("/v3/volumes/{}", path_segment(volume))
}

fn volume_action_path(volume: &str) -> String {
    format!("/v3/volumes/{}/action", path_segment(volume))
}

fn image_path(image: &str) -> String {
    format!("/v2/images/{}", path_segment(image))
}

fn attachment_path(id: &str) -> String {
    format!("/v3/attachments/{}", path_segment(id))
}

/// One run of the CLI: where output goes and how the daemon is reached.
struct App<O: Write> {
    client: Client,
    json: bool,
    out: O,
    progress: Box<dyn Write>,
    progress_bar: bool,
    poll_every: Duration,
}

impl<O: Write> App<O> {
    async fn run(&mut self, command: Command) -> Result<(), Failure> {
        match command {
            Command::List => self.list_volumes().await,
            Command::Show { volume } => self.show_volume(&volume).await,
            Command::Create(args) => self.create_volume(args).await,
            Command::Delete { volume } => self.delete_volume(&volume).await,
            Command::Extend { volume, new_size } => self.extend_volume(&volume, new_size).await,
            Command::ResetStatus(args) => self.reset_status(args).await,
            Command::Reimage(args) => self.reimage(args).await,
            Command::Image(command) => self.run_image(command).await,
            Command::Attachment(command) => self.run_attachment(command).await,
        }
    }

    async fn run_image(&mut self, command: ImageCommand) -> Result<(), Failure> {
        match command {
            ImageCommand::Import(args) => self.import_image(args).await,
            ImageCommand::List => self.list_images().await,
            ImageCommand::Show { image } => self.show_image(&image).await,
            ImageCommand::Delete { image } => self.delete_image(&image).await,
            ImageCommand::Deactivate { image } => self.image_action(&image, "deactivate").await,
            ImageCommand::Reactivate { image } => self.image_action(&image, "reactivate").await,
        }
    }

    async fn run_attachment(&mut self, command: AttachmentCommand) -> Result<(), Failure> {
        match command {
            AttachmentCommand::Create {
                volume,
                instance,
                connector,
            } => self.create_attachment(&volume, instance, connector).await,
            AttachmentCommand::List => self.list_attachments().await,
            AttachmentCommand::Update { id, connector } => {
                self.update_attachment(&id, connector).await
            }
            AttachmentCommand::Complete { id } => self.complete_attachment(&id).await,
            AttachmentCommand::Delete { id } => self.delete_attachment(&id).await,
        }
    }

    /// Sends one request; anything but a 2xx answer becomes a [`Failure`] about `context`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        context: &str,
        subject: Subject,
    ) -> Result<Reply, Failure> {
        let outcome = self.client.request(method, path, body.as_ref(), &[]).await;
        outcome
            .and_then(Reply::success)
            .map_err(|error| Failure::client(context, error, subject))
    }

    fn emit(&mut self, text: &str) -> Result<(), Failure> {
        let written = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| {
                if text.ends_with('\n') {
                    Ok(())
                } else {
                    self.out.write_all(b"\n")
                }
            })
            .and_then(|()| self.out.flush());
        match written {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Err(Failure::broken_pipe()),
            Err(err) => Err(Failure::new(
                exit::REFUSED,
                format!("cannot write output: {err}"),
            )),
        }
    }

    /// In JSON mode the daemon's body as it came; an empty body gets `fallback` instead.
    fn emit_json_reply(&mut self, reply: &Reply, fallback: Value) -> Result<(), Failure> {
        if reply.body.is_empty() {
            return self.emit(&fallback.to_string());
        }
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        self.emit(&text)
    }

    async fn list_volumes(&mut self) -> Result<(), Failure> {
        let context = "cannot list volumes";
        let reply = self
            .call(
                Method::GET,
                "/v3/volumes/detail",
                None,
                context,
                Subject::Volume,
            )
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"volumes": []}));
        }

        let volumes = listed(&reply, "volumes")
            .map_err(|err| Failure::client(context, err, Subject::Volume))?;
        let rows: Vec<Vec<String>> = volumes.iter().map(volume_row).collect();
        let headers = [
            "ID", "NAME", "STATUS", "SIZE", "BOOTABLE", "ATTACHED", "RE-IMAGE",
        ];
        self.emit(&table(&headers, &rows))
    }

    async fn get_volume(&self, volume: &str, context: &str) -> Result<(Reply, Value), Failure> {
        let reply = self
            .call(
                Method::GET,
                &volume_path(volume),
                None,
                context,
                Subject::Volume,
            )
            .await?;
        let detail = reply
            .member("volume")
            .map_err(|err| Failure::client(context, err, Subject::Volume))?;
        Ok((reply, detail))
    }

    async fn show_volume(&mut self, volume: &str) -> Result<(), Failure> {
        let context = format!("cannot show volume {volume}");
        let (reply, detail) = self.get_volume(volume, &context).await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({}));
        }
        self.emit(&show_volume(&detail))
    }

    async fn create_volume(&mut self, args: CreateArgs) -> Result<(), Failure> {
        let mut spec = Map::new();
        spec.insert("name".into(), Value::from(args.name.as_str()));
        spec.insert("size".into(), Value::from(args.size));
        if let Some(description) = args.description {
            spec.insert("description".into(), Value::from(description));
        }
        if let Some(owner) = args.owner {
            spec.insert("owner".into(), owner);
        }

        let context = format!("cannot create volume {}", args.name);
        let body = json!({ "volume": spec });
        let reply = self
            .call(
                Method::POST,
                "/v3/volumes",
                Some(body),
                &context,
                Subject::Volume,
            )
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"volume": {"name": args.name}}));
        }

        // The volume is accepted; a reply we cannot read should not make that look failed.
        let line = match reply.member("volume") {
            Ok(volume) => format!(
                "creating volume {} ({} GiB), id {}, status {}",
                display_name(&volume, &args.name),
                args.size,
                cell(volume.get("id")),
                cell(volume.get("status")),
            ),
            Err(_) => format!("creating volume {} ({} GiB)", args.name, args.size),
        };
        self.emit(&line)
    }

    async fn delete_volume(&mut self, volume: &str) -> Result<(), Failure> {
        let context = format!("cannot delete volume {volume}");
        let reply = self
            .call(
                Method::DELETE,
                &volume_path(volume),
                None,
                &context,
                Subject::Volume,
            )
            .await?;
        if self.json {
            let ack = json!({"action": "delete", "volume": volume, "accepted": true});
            return self.emit_json_reply(&reply, ack);
        }
        self.emit(&format!("deleting volume {volume}"))
    }

    async fn extend_volume(&mut self, volume: &str, new_size: u64) -> Result<(), Failure> {
        let context = format!("cannot extend {volume} to {new_size} GiB");
        let body = json!({"os-extend": {"new_size": new_size}});
        let path = volume_action_path(volume);
        let reply = self
            .call(Method::POST, &path, Some(body), &context, Subject::Volume)
            .await?;
        if self.json {
            let ack = json!({"action": "os-extend", "volume": volume, "new_size": new_size,
                "accepted": true});
            return self.emit_json_reply(&reply, ack);
        }
        self.emit(&format!("extending {volume} to {new_size} GiB"))
    }

    async fn reset_status(&mut self, args: ResetStatusArgs) -> Result<(), Failure> {
        let mut reset = Map::new();
        reset.insert("status".into(), Value::from(args.status.as_str()));
        if let Some(attach_status) = &args.attach_status {
            reset.insert("attach_status".into(), Value::from(attach_status.as_str()));
        }

        let context = format!("cannot reset the status of {}", args.volume);
        let path = volume_action_path(&args.volume);
        let body = json!({ "os-reset_status": reset });
        let reply = self
            .call(Method::POST, &path, Some(body), &context, Subject::Volume)
            .await?;
        if self.json {
            let ack = json!({"action": "os-reset_status", "volume": args.volume,
                "status": args.status, "attach_status": args.attach_status, "accepted": true});
            return self.emit_json_reply(&reply, ack);
        }

        let mut line = format!("{}: status reset to {}", args.volume, args.status);
        if let Some(attach_status) = args.attach_status {
            let _ = write!(line, ", attach status {attach_status}");
        }
        self.emit(&line)
    }

    async fn find_image(&self, image: &str, context: &str) -> Result<Value, Failure> {
        let reply = self
            .call(
                Method::GET,
                &image_path(image),
                None,
                context,
                Subject::Image,
            )
            .await?;
        reply
            .json()
            .map_err(|err| Failure::client(context, err, Subject::Image))
    }

    async fn reimage(&mut self, args: ReimageArgs) -> Result<(), Failure> {
        let context = format!("cannot re-image {}", args.volume);

        // The action takes an image id only, so a name is looked up first.
        let image = self.find_image(&args.image, &context).await?;
        let image_id = text_field(&image, "id")
            .map_err(|err| Failure::client(&context, err, Subject::Image))?;
        let image_name = display_name(&image, &args.image);

        // Remember the last run, so that waiting can tell the new one from it.
        let before = if args.wait {
            Some(self.get_volume(&args.volume, &context).await?.1)
        } else {
            None
        };

        let body = json!({"os-reimage": {"image_id": image_id, "reimage_reserved": args.reserved}});
        let path = volume_action_path(&args.volume);
        let outcome = self
            .client
            .request(Method::POST, &path, Some(&body), &[])
            .await;
        let reply = match outcome.and_then(Reply::success) {
            Ok(reply) => reply,
            Err(error) => return Err(self.reimage_refused(&args, &context, &image, error).await),
        };

        let Some(before) = before else {
            if self.json {
                let ack = json!({"action": "os-reimage", "volume": args.volume,
                    "image_id": image_id, "reimage_reserved": args.reserved, "accepted": true});
                return self.emit_json_reply(&reply, ack);
            }
            return self.emit(&format!(
                "re-imaging {} with image {image_name} ({image_id}); follow it with \
                 `volumectl show {}` or use --wait",
                args.volume, args.volume
            ));
        };

        let label = display_name(&before, &args.volume);
        let target = WaitTarget {
            volume: &args.volume,
            label: &label,
            image_id: &image_id,
            image_name: &image_name,
            earlier: ReimageRun::of(&before),
            timeout: args.timeout.map(Duration::from_secs),
        };
        self.wait_for_reimage(&target).await
    }

    /// Turns a refused `os-reimage` into a failure with a hint about what to change.
    async fn reimage_refused(
        &self,
        args: &ReimageArgs,
        context: &str,
        image: &Value,
        error: ClientError,
    ) -> Failure {
        let fault = error.fault().cloned();
        let failure = Failure::client(context, error, Subject::Volume);
        let Some(fault) = fault else {
            return failure;
        };

        match fault.status {
            400 if fault.mentions("status") => {
                let status = self.volume_status(&args.volume).await;
                failure.with_hint(reimage_status_hint(
                    &args.volume,
                    status.as_deref(),
                    args.reserved,
                ))
            }
            400 if ["min_disk", "size", "larger", "fit"]
                .iter()
                .any(|word| fault.mentions(word)) =>
            {
                failure.with_hint(reimage_size_hint(&args.volume, image))
            }
            404 if fault.message.is_none() => Failure::new(
                exit::REFUSED,
                format!("{context}: volumed does not know the os-reimage action"),
            )
            .with_hint("volumed may be older than volumectl (re-image needs volume API 3.68)"),
            _ => failure,
        }
    }

    /// The volume's status if it can be had; only used to word a hint.
    async fn volume_status(&self, volume: &str) -> Option<String> {
        let reply = self.client.get_json(&volume_path(volume)).await.ok()?;
        let detail = reply.member("volume").ok()?;
        detail
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    async fn wait_for_reimage(&mut self, target: &WaitTarget<'_>) -> Result<(), Failure> {
        let started = Instant::now();
        let path = volume_path(target.volume);
        let mut view = ProgressView::new(target.label, self.progress_bar);
        let mut unreachable_since: Option<Instant> = None;
        let mut latest: Option<(Reply, Option<ReimageRun>)> = None;

        loop {
            match self.client.get_json(&path).await {
                Ok(reply) => {
                    unreachable_since = None;
                    let detail = reply.member("volume").map_err(|err| {
                        Failure::client("cannot follow the re-image", err, Subject::Volume)
                    })?;
                    let run = ReimageRun::of(&detail).filter(|run| target.owns(run));
                    if let Some(run) = &run {
                        match run.state.as_str() {
                            "succeeded" => {
                                view.finish(&mut *self.progress, run.bytes_done, run.bytes_total);
                                return self.report_reimaged(target, &reply, &detail, started);
                            }
                            "failed" => {
                                view.finish(&mut *self.progress, run.bytes_done, run.bytes_total);
                                return self.report_reimage_failed(target, &reply, &detail, run);
                            }
                            _ => {
                                let now = Instant::now();
                                view.update(
                                    &mut *self.progress,
                                    now,
                                    run.bytes_done,
                                    run.bytes_total,
                                )
                            }
                        }
                    } else if started.elapsed() >= REPORT_GRACE {
                        return Err(Failure::new(
                            exit::REFUSED,
                            format!(
                                "volumed accepted the re-image of {} but does not report it",
                                target.label
                            ),
                        )
                        .with_hint(format!("check `volumectl show {}`", target.volume)));
                    }
                    latest = Some((reply, run));
                }
                Err(error)
                    if error.is_unreachable() || matches!(error, ClientError::Transport(_)) =>
                {
                    // A daemon restart is survivable; a daemon gone for good is not.
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNREACHABLE_GRACE {
                        view.finish(&mut *self.progress, 0, 0);
                        let context = format!("lost track of the re-image of {}", target.label);
                        return Err(Failure::client(&context, error, Subject::Volume));
                    }
                }
                Err(error) => {
                    view.finish(&mut *self.progress, 0, 0);
                    let context = format!("lost track of the re-image of {}", target.label);
                    return Err(Failure::client(&context, error, Subject::Volume));
                }
            }

            let mut pause = self.poll_every;
            if let Some(limit) = target.timeout {
                let waited = started.elapsed();
                if waited >= limit {
                    return self.report_wait_timed_out(target, &mut view, latest.as_ref(), limit);
                }
                pause = pause.min(limit - waited);
            }
            tokio::time::sleep(pause).await;
        }
    }

    fn report_reimaged(
        &mut self,
        target: &WaitTarget<'_>,
        reply: &Reply,
        detail: &Value,
        started: Instant,
    ) -> Result<(), Failure> {
        if self.json {
            return self.emit_json_reply(reply, json!({}));
        }
        let seconds = started.elapsed().as_secs();
        self.emit(&format!(
            "{}: re-imaged with image {} ({}) after {}; status {}",
            target.label,
            target.image_name,
            target.image_id,
            clock(seconds),
            cell(detail.get("status"))
        ))
    }

    fn report_reimage_failed(
        &mut self,
        target: &WaitTarget<'_>,
        reply: &Reply,
        detail: &Value,
        run: &ReimageRun,
    ) -> Result<(), Failure> {
        if self.json {
            self.emit_json_reply(reply, json!({}))?;
        }
        let reason = run.message.as_deref().unwrap_or("volumed gave no reason");
        Err(Failure::new(
            exit::REIMAGE_FAILED,
            format!(
                "re-imaging {} with image {} failed: {reason}",
                target.label, target.image_name
            ),
        )
        .with_hint(format!(
            "{} is now {}; see `volumectl show {}`",
            target.label,
            cell(detail.get("status")),
            target.volume
        )))
    }

    fn report_wait_timed_out(
        &mut self,
        target: &WaitTarget<'_>,
        view: &mut ProgressView,
        latest: Option<&(Reply, Option<ReimageRun>)>,
        limit: Duration,
    ) -> Result<(), Failure> {
        let run = latest.and_then(|(_, run)| run.as_ref());
        let (done, total) = run.map_or((0, 0), |run| (run.bytes_done, run.bytes_total));
        view.finish(&mut *self.progress, done, total);
        if self.json {
            if let Some((reply, _)) = latest {
                self.emit_json_reply(reply, json!({}))?;
            }
        }

        let state = match run {
            Some(run) => plain_progress_line("still running", run.bytes_done, run.bytes_total),
            None => "not started yet".to_owned(),
        };
        Err(Failure::new(
            exit::TIMED_OUT,
            format!(
                "gave up waiting for the re-image of {} after {} s ({state})",
                target.label,
                limit.as_secs()
            ),
        )
        .with_hint(format!(
            "it goes on in volumed: follow it with `volumectl show {}`",
            target.volume
        )))
    }

    async fn list_images(&mut self) -> Result<(), Failure> {
        let context = "cannot list images";
        let reply = self
            .call(Method::GET, "/v2/images", None, context, Subject::Image)
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"images": []}));
        }

        let images = listed(&reply, "images")
            .map_err(|err| Failure::client(context, err, Subject::Image))?;
        let rows: Vec<Vec<String>> = images.iter().map(image_row).collect();
        let headers = ["ID", "NAME", "STATUS", "FORMAT", "SIZE", "MIN DISK"];
        self.emit(&table(&headers, &rows))
    }

    async fn show_image(&mut self, image: &str) -> Result<(), Failure> {
        let context = format!("cannot show image {image}");
        let reply = self
            .call(
                Method::GET,
                &image_path(image),
                None,
                &context,
                Subject::Image,
            )
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({}));
        }
        let detail = reply
            .json()
            .map_err(|err| Failure::client(&context, err, Subject::Image))?;
        self.emit(&show_image(&detail))
    }

    /// Looks an image up by id or name and returns its id, for routes that take only ids.
    async fn image_id(&self, image: &str, context: &str) -> Result<String, Failure> {
        let detail = self.find_image(image, context).await?;
        text_field(&detail, "id").map_err(|err| Failure::client(context, err, Subject::Image))
    }

    async fn delete_image(&mut self, image: &str) -> Result<(), Failure> {
        let context = format!("cannot delete image {image}");
        let id = self.image_id(image, &context).await?;
        let reply = self
            .call(
                Method::DELETE,
                &image_path(&id),
                None,
                &context,
                Subject::Image,
            )
            .await?;
        if self.json {
            let ack = json!({"action": "delete", "image": image, "image_id": id});
            return self.emit_json_reply(&reply, ack);
        }
        self.emit(&format!("deleted image {image} ({id})"))
    }

    async fn image_action(&mut self, image: &str, action: &str) -> Result<(), Failure> {
        let context = format!("cannot {action} image {image}");
        let id = self.image_id(image, &context).await?;
        let path = format!("{}/actions/{action}", image_path(&id));
        let reply = self
            .call(Method::POST, &path, None, &context, Subject::Image)
            .await?;
        if self.json {
            let ack = json!({"action": action, "image": image, "image_id": id});
            return self.emit_json_reply(&reply, ack);
        }
        self.emit(&format!("{action}d image {image} ({id})"))
    }

    async fn import_image(&mut self, args: ImportArgs) -> Result<(), Failure> {
        let shown_file = args.file.display().to_string();

        // Open the file before creating anything, so a typo leaves no queued image behind.
        let unreadable = |err: io::Error| {
            Failure::new(exit::REFUSED, format!("cannot read {shown_file}: {err}"))
        };
        let file = tokio::fs::File::open(&args.file)
            .await
            .map_err(unreadable)?;
        let metadata = file.metadata().await.map_err(unreadable)?;
        if metadata.is_dir() {
            return Err(Failure::new(
                exit::REFUSED,
                format!("{shown_file} is a directory"),
            ));
        }
        // Only a regular file has a length to announce; a pipe or device is sent chunked.
        let length = metadata.is_file().then_some(metadata.len());

        let context = format!("cannot create image {}", args.name);
        let mut spec = Map::new();
        spec.insert("name".into(), Value::from(args.name.as_str()));
        spec.insert("disk_format".into(), Value::from(args.disk_format.as_str()));
        spec.insert(
            "container_format".into(),
            Value::from(args.container_format.as_str()),
        );
        if let Some(min_disk) = args.min_disk {
            spec.insert("min_disk".into(), Value::from(min_disk));
        }
        let reply = self
            .call(
                Method::POST,
                "/v2/images",
                Some(Value::Object(spec)),
                &context,
                Subject::Image,
            )
            .await?;
        let created = reply
            .json()
            .map_err(|err| Failure::client(&context, err, Subject::Image))?;
        let id = text_field(&created, "id")
            .map_err(|err| Failure::client(&context, err, Subject::Image))?;

        let uploaded = self
            .upload_file(file, length, &id, &args.name, &shown_file)
            .await;
        if let Err(failure) = uploaded {
            return Err(self.discard_queued_image(&id, failure).await);
        }

        // The data is in; a failed look at the result must not make the import look failed.
        let path = image_path(&id);
        match self.client.get_json(&path).await {
            Ok(reply) if self.json => self.emit_json_reply(&reply, json!({"id": id})),
            Ok(reply) => {
                let image = reply.json().unwrap_or_else(|_| json!({"id": id}));
                let mut summary = Map::new();
                for key in ["id", "name", "status", "size", "checksum"] {
                    if let Some(value) = image.get(key) {
                        summary.insert(key.to_owned(), value.clone());
                    }
                }
                let text = format!(
                    "imported {shown_file}\n{}",
                    show_image(&Value::Object(summary))
                );
                self.emit(&text)
            }
            Err(_) if self.json => self.emit(&json!({"id": id, "name": args.name}).to_string()),
            Err(_) => self.emit(&format!("imported {shown_file}\nid: {id}")),
        }
    }

    /// Streams the file into the image, drawing progress, until done, refused or Ctrl-C.
    async fn upload_file(
        &mut self,
        file: tokio::fs::File,
        length: Option<u64>,
        id: &str,
        name: &str,
        shown_file: &str,
    ) -> Result<(), Failure> {
        let client = self.client.clone();
        let progress = UploadProgress::default();
        let path = format!("{}/file", image_path(id));
        let total = length.unwrap_or(0);
        let mut view = ProgressView::new(name, self.progress_bar);
        let mut ticks = tokio::time::interval(self.poll_every);

        let upload = client.upload(&path, file, length, &progress);
        tokio::pin!(upload);
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);

        let outcome = loop {
            tokio::select! {
                outcome = &mut upload => break outcome,
                _ = ticks.tick() => {
                    let sent = progress.bytes_sent();
                    view.update(&mut *self.progress, Instant::now(), sent, total);
                }
                _ = &mut interrupt => {
                    view.finish(&mut *self.progress, progress.bytes_sent(), total);
                    return Err(Failure::new(exit::INTERRUPTED, "interrupted during the upload"));
                }
            }
        };
        view.finish(&mut *self.progress, progress.bytes_sent(), total);

        let context = format!("uploading {shown_file} into image {name} failed");
        match outcome.and_then(Reply::success) {
            Ok(_) => Ok(()),
            Err(ClientError::Upload(err)) => Err(Failure::new(
                exit::REFUSED,
                format!("cannot read {shown_file}: {err}"),
            )),
            Err(error) => Err(Failure::client(&context, error, Subject::Image)),
        }
    }

    /// Deletes the image a failed import created and says so in `failure`.
    async fn discard_queued_image(&self, id: &str, mut failure: Failure) -> Failure {
        let path = image_path(id);
        let mut outcome = Err(ClientError::InvalidRequest("not tried".to_owned()));

        // The daemon may still be winding down the aborted upload and refuse for a moment.
        for _ in 0..5 {
            outcome = self
                .client
                .request(Method::DELETE, &path, None, &[])
                .await
                .and_then(Reply::success);
            match &outcome {
                Err(ClientError::Api(fault)) if fault.status == 409 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => break,
            }
        }

        match outcome {
            Ok(_) => {
                let _ = write!(failure.message, " (deleted the queued image {id})");
            }
            Err(error) => {
                failure.hint = Some(format!(
                    "the queued image {id} could not be deleted ({error}): \
                     delete it with `volumectl image delete {id}`"
                ));
            }
        }
        failure
    }

    async fn create_attachment(
        &mut self,
        volume: &str,
        instance: Option<uuid::Uuid>,
        connector: Option<Value>,
    ) -> Result<(), Failure> {
        let context = format!("cannot attach {volume}");

        // Attachments name volumes by id only.
        let (_, detail) = self.get_volume(volume, &context).await?;
        let volume_id = text_field(&detail, "id")
            .map_err(|err| Failure::client(&context, err, Subject::Volume))?;

        let mut spec = Map::new();
        spec.insert("volume_uuid".into(), Value::from(volume_id));
        if let Some(instance) = instance {
            spec.insert("instance_uuid".into(), Value::from(instance.to_string()));
        }
        if let Some(connector) = connector {
            spec.insert("connector".into(), connector);
        }
        let body = json!({ "attachment": spec });
        let reply = self
            .call(
                Method::POST,
                "/v3/attachments",
                Some(body),
                &context,
                Subject::Attachment,
            )
            .await?;
        self.print_attachment(&reply, &context)
    }

    fn print_attachment(&mut self, reply: &Reply, context: &str) -> Result<(), Failure> {
        if self.json {
            return self.emit_json_reply(reply, json!({}));
        }
        let attachment = reply
            .member("attachment")
            .map_err(|err| Failure::client(context, err, Subject::Attachment))?;
        self.emit(&show_attachment(&attachment))
    }

    async fn list_attachments(&mut self) -> Result<(), Failure> {
        let context = "cannot list attachments";
        let reply = self
            .call(
                Method::GET,
                "/v3/attachments",
                None,
                context,
                Subject::Attachment,
            )
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"attachments": []}));
        }

        let attachments = listed(&reply, "attachments")
            .map_err(|err| Failure::client(context, err, Subject::Attachment))?;
        let rows: Vec<Vec<String>> = attachments.iter().map(attachment_row).collect();
        let headers = ["ID", "VOLUME", "STATUS", "INSTANCE", "MODE"];
        self.emit(&table(&headers, &rows))
    }

    async fn update_attachment(&mut self, id: &str, connector: Value) -> Result<(), Failure> {
        let context = format!("cannot update attachment {id}");
        let body = json!({"attachment": {"connector": connector}});
        let reply = self
            .call(
                Method::PUT,
                &attachment_path(id),
                Some(body),
                &context,
                Subject::Attachment,
            )
            .await?;
        self.print_attachment(&reply, &context)
    }

    async fn complete_attachment(&mut self, id: &str) -> Result<(), Failure> {
        let context = format!("cannot complete attachment {id}");
        let path = format!("{}/action", attachment_path(id));
        let body = json!({"os-complete": null});
        let reply = self
            .call(
                Method::POST,
                &path,
                Some(body),
                &context,
                Subject::Attachment,
            )
            .await?;
        if self.json {
            return self
                .emit_json_reply(&reply, json!({"action": "os-complete", "attachment": id}));
        }
        self.emit(&format!("completed attachment {id}"))
    }

    async fn delete_attachment(&mut self, id: &str) -> Result<(), Failure> {
        let context = format!("cannot delete attachment {id}");
        let reply = self
            .call(
                Method::DELETE,
                &attachment_path(id),
                None,
                &context,
                Subject::Attachment,
            )
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"action": "delete", "attachment": id}));
        }
        self.emit(&format!("deleted attachment {id}"))
    }
}

/// What `reimage --wait` is waiting for.
struct WaitTarget<'a> {
    /// The volume as the user named it, for requests and suggested commands.
    volume: &'a str,
    /// The volume's name, for messages and progress.
    label: &'a str,
    image_id: &'a str,
    image_name: &'a str,
    /// The run the volume reported before our request, if any.
    earlier: Option<ReimageRun>,
    timeout: Option<Duration>,
}

impl WaitTarget<'_> {
    /// True when `run` is the re-image we asked for, not an older one still on display.
    fn owns(&self, run: &ReimageRun) -> bool {
        run.image_id == self.image_id
            && !self
                .earlier
                .as_ref()
                .is_some_and(|earlier| run.same_run(earlier))
    }
}

fn report(failure: &Failure) -> ExitCode {
    if !failure.message.is_empty() {
        let mut stderr = io::stderr().lock();
        let _ = writeln!(stderr, "volumectl: {}", failure.message);
        if let Some(hint) = &failure.hint {
            let _ = writeln!(stderr, "hint: {hint}");
        }
    }
    ExitCode::from(failure.code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return report(&Failure::new(
                exit::REFUSED,
                format!("cannot start the async runtime: {err}"),
            ))
        }
    };

    let socket = socket_path(cli.socket, std::env::var_os(SOCKET_ENV));
    let stderr_is_terminal = io::stderr().is_terminal();
    let mut app = App {
        client: Client::new(socket).with_timeout(REQUEST_TIMEOUT),
        json: cli.json,
        out: io::stdout(),
        progress: Box::new(io::stderr()),
        progress_bar: stderr_is_terminal,
        poll_every: POLL_INTERVAL,
    };
    match runtime.block_on(app.run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(&failure),
    }
}
