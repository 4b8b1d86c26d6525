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
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde_json::{json, Map, Value};
use volumed::client::{path_segment, ApiFault, Client, ClientError, Reply, UploadProgress};
use volumed::daemon_args::DaemonArgs;
use volumed::model::VolumeStatus;

const DEFAULT_SOCKET: &str = "/run/volumed/volumed.sock";
const SOCKET_ENV: &str = "VOLUMED_SOCKET";

/// A request volumed has not answered by then is taken as a hung daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How often `reimage --wait` asks for progress.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How often progress is printed when stderr is not a terminal (logs, CI).
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How often an unchanged progress line is printed again, to show the wait is alive.
const PLAIN_PROGRESS_UNCHANGED_EVERY: Duration = Duration::from_secs(30);

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

// Lines stay within 70 columns: the manual page indents them by 7 and does not refill them.
const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    volumed refused or failed the request, or a local file could
       not be read or written
  2    usage error
  3    volumed could not be reached or did not answer (or an event stream broke off)
  4    the re-image waited for with --wait failed
  5    --wait gave up after --timeout (the re-image goes on in
       volumed)
  130  interrupted by Ctrl-C (an import deletes its queued image; a
       re-image goes on)";

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
    /// Print a shell completion script
    #[command(long_about = COMPLETIONS_ABOUT)]
    Completions(CompletionsArgs),
    /// Write the manual pages of volumectl and volumed into a directory
    Man {
        /// Where to write volumectl.1, one volumectl-COMMAND.1 per command, and volumed.8
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Follow volume events (one line each, or one JSON object each with --json) until
    /// volumed stops
    Events(EventsArgs),
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Only the events of this volume (id or name)
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    volume: Option<String>,
}

const COMPLETIONS_ABOUT: &str = "\
Print a shell completion script on stdout.

For the running shell: `source <(volumectl completions bash)`. Installed for every user: \
bash reads /usr/share/bash-completion/completions/volumectl, zsh a file _volumectl in a \
directory of $fpath, fish ~/.config/fish/completions/volumectl.fish or \
/usr/share/fish/vendor_completions.d/volumectl.fish.";

#[derive(Debug, Args)]
struct CompletionsArgs {
    /// The shell to complete in
    shell: clap_complete::Shell,
    /// The program to complete
    #[arg(long = "for", value_name = "PROGRAM", value_enum, default_value_t = Program::Volumectl)]
    program: Program,
}

/// The programs of this package that have a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Program {
    Volumectl,
    Volumed,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Volumectl => "volumectl",
            Program::Volumed => "volumed",
        }
    }

    fn command(self) -> clap::Command {
        match self {
            Program::Volumectl => <Cli as clap::CommandFactory>::command(),
            Program::Volumed => DaemonArgs::command(),
        }
    }
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

/// What a command was doing when a request failed: the start of its error message, and
/// the kind of resource, which picks the hints.
#[derive(Clone, Debug)]
struct Task {
    context: String,
    subject: Subject,
}

impl Task {
    fn volume(context: impl Into<String>) -> Self {
        Self::about(Subject::Volume, context)
    }

    fn image(context: impl Into<String>) -> Self {
        Self::about(Subject::Image, context)
    }

    fn attachment(context: impl Into<String>) -> Self {
        Self::about(Subject::Attachment, context)
    }

    fn about(subject: Subject, context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            subject,
        }
    }

    /// This task's failure because of `error`.
    fn failed(&self, error: ClientError) -> Failure {
        Failure::client(&self.context, error, self.subject)
    }
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
                io::ErrorKind::PermissionDenied => format!(
                    "only root and the socket's group may use {socket} (`ls -l` shows the \
                     group): ask an administrator to add you to it"
                ),
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
        404 if fault.message.is_some() => Some(format!(
            "see `{listing}` for what exists and is visible to you"
        )),
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
            "{volume} is {status}: re-image needs it available or in error (or reserved, with \
             --reserved)"
        ),
        None => "re-image needs an available volume, or a reserved one with --reserved".to_owned(),
    }
}

/// The hint for `action` (delete, extend, attach) refused because the volume is `status`.
fn volume_status_hint(action: &str, volume: &str, status: &str) -> Option<String> {
    let hint = match status {
        "in-use" | "reserved" | "attaching" | "detaching" => format!(
            "{volume} is {status}: to {action} it, detach it first (find the attachment with \
             `volumectl attachment list`, then `volumectl attachment delete ID`)"
        ),
        "downloading" => format!(
            "{volume} is being re-imaged: wait until `volumectl show {volume}` says it ended"
        ),
        "available" => return None,
        _ => format!(
            "{volume} is {status}: if that status is wrong, an administrator can correct it \
             with `volumectl reset-status {volume} --status available`"
        ),
    };
    Some(hint)
}

/// The hint for a refused `reset-status`: the values volumed accepts.
fn reset_status_hint(fault: &ApiFault) -> Option<String> {
    if fault.status == 403 {
        return Some(
            "by default only administrators (root and members of volumed's admin_group) may \
             reset a status"
                .to_owned(),
        );
    }
    if fault.mentions("field/attribute status") {
        let statuses: Vec<&str> = VolumeStatus::ALL
            .iter()
            .map(|status| status.as_str())
            .filter(|status| !["downloading", "deleting"].contains(status))
            .collect();
        return Some(format!("--status takes one of: {}", statuses.join(", ")));
    }
    if fault.mentions("attach_status") {
        return Some(
            "--attach-status takes detached (which removes the volume's \
                     attachments) or attached"
                .to_owned(),
        );
    }
    None
}

/// The status a refusal names, as Cinder words it: "... but current status is: in-use."
fn status_in_message(message: &str) -> Option<String> {
    let (_, rest) = message.rsplit_once("status is")?;
    let word = rest
        .trim_start_matches([':', ' '])
        .split_whitespace()
        .next()?;
    let word = word.trim_end_matches(['.', ',', ';']);
    (!word.is_empty()).then(|| word.to_owned())
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
        Some(last.saturating_sub(first) as f64 / span.as_secs_f64())
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
        } else if self.last_plain.is_none_or(|(printed_at, printed)| {
            let pause = match printed == done {
                true => PLAIN_PROGRESS_UNCHANGED_EVERY,
                false => PLAIN_PROGRESS_EVERY,
            };
            at.duration_since(printed_at) >= pause
        }) {
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
            Command::Completions(args) => self.print_completions(args),
            Command::Man { dir } => self.write_manual_pages(&dir),
            Command::Events(args) => self.follow_events(args).await,
        }
    }

    fn print_completions(&mut self, args: CompletionsArgs) -> Result<(), Failure> {
        let name = args.program.name();
        let mut script = Vec::new();
        clap_complete::generate(args.shell, &mut args.program.command(), name, &mut script);
        let script = String::from_utf8_lossy(&script).into_owned();
        if self.json {
            let shell = args.shell.to_string();
            return self
                .emit(&json!({"program": name, "shell": shell, "script": script}).to_string());
        }
        self.emit(&script)
    }

    fn write_manual_pages(&mut self, dir: &Path) -> Result<(), Failure> {
        let unwritable = |err: io::Error| {
            Failure::new(
                exit::REFUSED,
                format!("cannot write manual pages into {}: {err}", dir.display()),
            )
        };
        std::fs::create_dir_all(dir).map_err(unwritable)?;

        let mut written = Vec::new();
        let mut volumectl = Program::Volumectl.command().disable_help_subcommand(true);
        volumectl.build();
        write_manual_page(volumectl, "1", dir, &mut written).map_err(unwritable)?;
        write_manual_page(Program::Volumed.command(), "8", dir, &mut written)
            .map_err(unwritable)?;

        let files: Vec<String> = written
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        if self.json {
            return self.emit(&json!({ "written": files }).to_string());
        }
        self.emit(&files.join("\n"))
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

    /// Sends one request; anything but a 2xx answer becomes the failure of `task`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        task: &Task,
    ) -> Result<Reply, Failure> {
        let outcome = self.client.request(method, path, body.as_ref(), &[]).await;
        outcome
            .and_then(Reply::success)
            .map_err(|error| task.failed(error))
    }

    /// Like [`App::call`], for a request that needs a volume in the right status: a refusal
    /// because of its status gets a hint that names the way out.
    async fn call_on_volume(
        &self,
        request: (Method, &str, Option<Value>),
        task: &Task,
        volume: &str,
        action: &str,
    ) -> Result<Reply, Failure> {
        let (method, path, body) = request;
        let outcome = self.client.request(method, path, body.as_ref(), &[]).await;
        let error = match outcome.and_then(Reply::success) {
            Ok(reply) => return Ok(reply),
            Err(error) => error,
        };

        let fault = error.fault().cloned();
        let failure = task.failed(error);
        if fault
            .as_ref()
            .is_some_and(|fault| fault.status == 409 && fault.mentions("re-imaged"))
        {
            return Err(failure.with_hint(format!(
                "wait until `volumectl show {volume}` says the re-image ended"
            )));
        }
        if fault
            .as_ref()
            .is_some_and(|fault| fault.status == 409 && fault.mentions("is open"))
        {
            return Err(failure.with_hint(
                "`losetup -l` lists loop devices and their files (`losetup -d DEVICE` detaches \
                 one); `fuser -v FILE` names the processes that hold the file open",
            ));
        }
        let Some(fault) = fault.filter(|fault| fault.status == 400 && fault.mentions("status"))
        else {
            return Err(failure);
        };
        let status = match self.volume_status(volume).await {
            Some(status) => Some(status),
            None => fault.message.as_deref().and_then(status_in_message),
        };
        match status.and_then(|status| volume_status_hint(action, volume, &status)) {
            Some(hint) => Err(failure.with_hint(hint)),
            None => Err(failure),
        }
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
        let task = Task::volume("cannot list volumes");
        let reply = self
            .call(Method::GET, "/v3/volumes/detail", None, &task)
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"volumes": []}));
        }

        let volumes = listed(&reply, "volumes").map_err(|err| task.failed(err))?;
        let rows: Vec<Vec<String>> = volumes.iter().map(volume_row).collect();
        let headers = [
            "ID", "NAME", "STATUS", "SIZE", "BOOTABLE", "ATTACHED", "RE-IMAGE",
        ];
        self.emit(&table(&headers, &rows))
    }

    async fn get_volume(&self, volume: &str, task: &Task) -> Result<(Reply, Value), Failure> {
        let reply = self
            .call(Method::GET, &volume_path(volume), None, task)
            .await?;
        let detail = reply.member("volume").map_err(|err| task.failed(err))?;
        Ok((reply, detail))
    }

    async fn show_volume(&mut self, volume: &str) -> Result<(), Failure> {
        let task = Task::volume(format!("cannot show volume {volume}"));
        let (reply, detail) = self.get_volume(volume, &task).await?;
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

        let task = Task::volume(format!("cannot create volume {}", args.name));
        let body = json!({ "volume": spec });
        let outcome = self
            .client
            .request(Method::POST, "/v3/volumes", Some(&body), &[])
            .await;
        let reply = match outcome.and_then(Reply::success) {
            Ok(reply) => reply,
            Err(error) => {
                let taken = error.fault().is_some_and(|fault| fault.status == 409);
                let failure = task.failed(error);
                if taken {
                    return Err(failure.with_hint(format!(
                        "choose another name; `volumectl show {}` shows the existing volume",
                        args.name
                    )));
                }
                return Err(failure);
            }
        };
        if self.json {
            return self.emit_json_reply(&reply, json!({"volume": {"name": args.name}}));
        }

        // The volume is accepted; a reply we cannot read should not make that look failed.
        let line = match reply.member("volume") {
            Ok(volume) => format!(
                "volume {} ({} GiB): id {}, status {}",
                display_name(&volume, &args.name),
                args.size,
                cell(volume.get("id")),
                cell(volume.get("status")),
            ),
            Err(_) => format!("volume {} ({} GiB) accepted", args.name, args.size),
        };
        self.emit(&line)
    }

    async fn delete_volume(&mut self, volume: &str) -> Result<(), Failure> {
        let task = Task::volume(format!("cannot delete volume {volume}"));
        let path = volume_path(volume);
        let reply = self
            .call_on_volume((Method::DELETE, &path, None), &task, volume, "delete")
            .await?;
        if self.json {
            let ack = json!({"action": "delete", "volume": volume, "accepted": true});
            return self.emit_json_reply(&reply, ack);
        }
        self.emit(&format!("deleting volume {volume}"))
    }

    async fn extend_volume(&mut self, volume: &str, new_size: u64) -> Result<(), Failure> {
        let task = Task::volume(format!("cannot extend {volume} to {new_size} GiB"));
        let body = json!({"os-extend": {"new_size": new_size}});
        let path = volume_action_path(volume);
        let reply = self
            .call_on_volume((Method::POST, &path, Some(body)), &task, volume, "extend")
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

        let task = Task::volume(format!("cannot reset the status of {}", args.volume));
        let path = volume_action_path(&args.volume);
        let body = json!({ "os-reset_status": reset });
        let outcome = self
            .client
            .request(Method::POST, &path, Some(&body), &[])
            .await;
        let reply = match outcome.and_then(Reply::success) {
            Ok(reply) => reply,
            Err(error) => {
                let hint = error.fault().and_then(reset_status_hint);
                let failure = task.failed(error);
                return Err(match hint {
                    Some(hint) => failure.with_hint(hint),
                    None => failure,
                });
            }
        };
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

    async fn find_image(&self, image: &str, task: &Task) -> Result<Value, Failure> {
        let reply = self
            .call(Method::GET, &image_path(image), None, task)
            .await?;
        reply.json().map_err(|err| task.failed(err))
    }

    async fn reimage(&mut self, args: ReimageArgs) -> Result<(), Failure> {
        let task = Task::volume(format!("cannot re-image {}", args.volume));

        // The action takes an image id only, so a name is looked up first.
        let image_task = Task::image(task.context.clone());
        let image = self.find_image(&args.image, &image_task).await?;
        let image_id = text_field(&image, "id").map_err(|err| image_task.failed(err))?;
        let image_name = display_name(&image, &args.image);

        // Remember the last run, so that waiting can tell the new one from it.
        let before = if args.wait {
            Some(self.get_volume(&args.volume, &task).await?.1)
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
            Err(error) => return Err(self.reimage_refused(&args, &task, &image, error).await),
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
        task: &Task,
        image: &Value,
        error: ClientError,
    ) -> Failure {
        let fault = error.fault().cloned();
        let failure = task.failed(error);
        let Some(fault) = fault else {
            return failure;
        };

        match fault.status {
            400 if fault.mentions("status") => {
                let status = match self.volume_status(&args.volume).await {
                    Some(status) => Some(status),
                    None => fault.message.as_deref().and_then(status_in_message),
                };
                failure.with_hint(reimage_status_hint(
                    &args.volume,
                    status.as_deref(),
                    args.reserved,
                ))
            }
            400 if ["min_disk", "mindisk", "size", "larger", "fit"]
                .iter()
                .any(|word| fault.mentions(word)) =>
            {
                failure.with_hint(reimage_size_hint(&args.volume, image))
            }
            400 if fault.mentions("not active") => failure.with_hint(format!(
                "see `volumectl image show {0}`; a deactivated image needs \
                 `volumectl image reactivate {0}`",
                args.image
            )),
            409 if fault.mentions("re-imaged") => failure.with_hint(format!(
                "wait for the running re-image: `volumectl show {}`",
                args.volume
            )),
            404 if fault.message.is_none() => Failure::new(
                exit::REFUSED,
                format!(
                    "{}: volumed does not know the os-reimage action",
                    task.context
                ),
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
        let client = self.client.clone();
        let path = volume_path(target.volume);
        let mut view = ProgressView::new(target.label, self.progress_bar);
        let mut unreachable_since: Option<Instant> = None;
        let mut latest: Option<(Reply, Option<ReimageRun>)> = None;
        let lost = Task::volume(format!("lost track of the re-image of {}", target.label));
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);

        loop {
            let polled = tokio::select! {
                polled = client.get_json(&path) => Some(polled),
                _ = &mut interrupt => None,
            };
            let Some(polled) = polled else {
                return Err(self.stop_waiting(target, &mut view, latest.as_ref()));
            };

            match polled {
                Ok(reply) => {
                    unreachable_since = None;
                    let detail = reply.member("volume").map_err(|err| lost.failed(err))?;
                    let run = ReimageRun::of(&detail).filter(|run| target.owns(run));
                    match &run {
                        Some(run) => {
                            view.update(
                                &mut *self.progress,
                                Instant::now(),
                                run.bytes_done,
                                run.bytes_total,
                            );
                            if run.state == "succeeded" || run.state == "failed" {
                                view.finish(&mut *self.progress, run.bytes_done, run.bytes_total);
                                return self.report_end(target, &reply, &detail, run, started);
                            }
                        }
                        None if started.elapsed() >= REPORT_GRACE => {
                            return Err(Failure::new(
                                exit::REFUSED,
                                format!(
                                    "volumed accepted the re-image of {} but does not report it",
                                    target.label
                                ),
                            )
                            .with_hint(format!("check `volumectl show {}`", target.volume)));
                        }
                        None => {}
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
                        return Err(lost.failed(error));
                    }
                }
                Err(error) => {
                    view.finish(&mut *self.progress, 0, 0);
                    return Err(lost.failed(error));
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
            let interrupted = tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                _ = &mut interrupt => true,
            };
            if interrupted {
                return Err(self.stop_waiting(target, &mut view, latest.as_ref()));
            }
        }
    }

    /// Ctrl-C while waiting stops the wait, not the re-image.
    fn stop_waiting(
        &mut self,
        target: &WaitTarget<'_>,
        view: &mut ProgressView,
        latest: Option<&(Reply, Option<ReimageRun>)>,
    ) -> Failure {
        let run = latest.and_then(|(_, run)| run.as_ref());
        let (done, total) = run.map_or((0, 0), |run| (run.bytes_done, run.bytes_total));
        view.finish(&mut *self.progress, done, total);
        Failure::new(
            exit::INTERRUPTED,
            format!(
                "stopped waiting; the re-image of {} goes on in volumed",
                target.label
            ),
        )
        .with_hint(format!("follow it with `volumectl show {}`", target.volume))
    }

    fn report_end(
        &mut self,
        target: &WaitTarget<'_>,
        reply: &Reply,
        detail: &Value,
        run: &ReimageRun,
        started: Instant,
    ) -> Result<(), Failure> {
        if run.state == "failed" {
            return self.report_reimage_failed(target, reply, detail, run);
        }
        self.report_reimaged(target, reply, detail, started)
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
            Some(run) if run.bytes_total > 0 => format!(
                "still running, {} of {} ({}%)",
                human_bytes(run.bytes_done),
                human_bytes(run.bytes_total),
                percent(run.bytes_done, run.bytes_total)
            ),
            Some(run) => format!("still running, {} written", human_bytes(run.bytes_done)),
            None => "volumed has not started it yet".to_owned(),
        };
        Err(Failure::new(
            exit::TIMED_OUT,
            format!(
                "gave up waiting for the re-image of {} after {} s: {state}",
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
        let task = Task::image("cannot list images");
        let reply = self.call(Method::GET, "/v2/images", None, &task).await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"images": []}));
        }

        let images = listed(&reply, "images").map_err(|err| task.failed(err))?;
        let rows: Vec<Vec<String>> = images.iter().map(image_row).collect();
        let headers = ["ID", "NAME", "STATUS", "FORMAT", "SIZE", "MIN DISK"];
        self.emit(&table(&headers, &rows))
    }

    async fn show_image(&mut self, image: &str) -> Result<(), Failure> {
        let task = Task::image(format!("cannot show image {image}"));
        let reply = self
            .call(Method::GET, &image_path(image), None, &task)
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({}));
        }
        let detail = reply.json().map_err(|err| task.failed(err))?;
        self.emit(&show_image(&detail))
    }

    /// Looks an image up by id or name and returns its id, for routes that take only ids.
    async fn image_id(&self, image: &str, task: &Task) -> Result<String, Failure> {
        let detail = self.find_image(image, task).await?;
        text_field(&detail, "id").map_err(|err| task.failed(err))
    }

    async fn delete_image(&mut self, image: &str) -> Result<(), Failure> {
        let task = Task::image(format!("cannot delete image {image}"));
        let id = self.image_id(image, &task).await?;
        let reply = self
            .call(Method::DELETE, &image_path(&id), None, &task)
            .await?;
        if self.json {
            let ack = json!({"action": "delete", "image": image, "image_id": id});
            return self.emit_json_reply(&reply, ack);
        }
        self.emit(&format!("deleted image {image} ({id})"))
    }

    async fn image_action(&mut self, image: &str, action: &str) -> Result<(), Failure> {
        let task = Task::image(format!("cannot {action} image {image}"));
        let id = self.image_id(image, &task).await?;
        let path = format!("{}/actions/{action}", image_path(&id));
        let reply = self.call(Method::POST, &path, None, &task).await?;
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

        let task = Task::image(format!("cannot create image {}", args.name));
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
            .call(Method::POST, "/v2/images", Some(Value::Object(spec)), &task)
            .await?;
        let created = reply.json().map_err(|err| task.failed(err))?;
        let id = text_field(&created, "id").map_err(|err| task.failed(err))?;

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

        let task = Task::image(format!("uploading {shown_file} into image {name} failed"));
        match outcome.and_then(Reply::success) {
            Ok(_) => Ok(()),
            Err(ClientError::Upload(err)) => Err(Failure::new(
                exit::REFUSED,
                format!("cannot read {shown_file}: {err}"),
            )),
            Err(error) => Err(task.failed(error)),
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
        let task = Task::volume(format!("cannot attach {volume}"));

        // Attachments name volumes by id only.
        let (_, detail) = self.get_volume(volume, &task).await?;
        let volume_id = text_field(&detail, "id").map_err(|err| task.failed(err))?;

        let mut spec = Map::new();
        spec.insert("volume_uuid".into(), Value::from(volume_id));
        if let Some(instance) = instance {
            spec.insert("instance_uuid".into(), Value::from(instance.to_string()));
        }
        if let Some(connector) = connector {
            spec.insert("connector".into(), connector);
        }
        let body = json!({ "attachment": spec });
        let request = (Method::POST, "/v3/attachments", Some(body));
        let reply = self
            .call_on_volume(request, &task, volume, "attach")
            .await?;
        self.print_attachment(&reply, &task)
    }

    fn print_attachment(&mut self, reply: &Reply, task: &Task) -> Result<(), Failure> {
        if self.json {
            return self.emit_json_reply(reply, json!({}));
        }
        let attachment = reply.member("attachment").map_err(|err| task.failed(err))?;
        self.emit(&show_attachment(&attachment))
    }

    async fn list_attachments(&mut self) -> Result<(), Failure> {
        let task = Task::attachment("cannot list attachments");
        let reply = self
            .call(Method::GET, "/v3/attachments", None, &task)
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"attachments": []}));
        }

        let attachments = listed(&reply, "attachments").map_err(|err| task.failed(err))?;
        let rows: Vec<Vec<String>> = attachments.iter().map(attachment_row).collect();
        let headers = ["ID", "VOLUME", "STATUS", "INSTANCE", "MODE"];
        self.emit(&table(&headers, &rows))
    }

    async fn update_attachment(&mut self, id: &str, connector: Value) -> Result<(), Failure> {
        let task = Task::attachment(format!("cannot update attachment {id}"));
        let body = json!({"attachment": {"connector": connector}});
        let reply = self
            .call(Method::PUT, &attachment_path(id), Some(body), &task)
            .await?;
        self.print_attachment(&reply, &task)
    }

    async fn complete_attachment(&mut self, id: &str) -> Result<(), Failure> {
        let task = Task::attachment(format!("cannot complete attachment {id}"));
        let path = format!("{}/action", attachment_path(id));
        let body = json!({"os-complete": null});
        let reply = self.call(Method::POST, &path, Some(body), &task).await?;
        if self.json {
            return self
                .emit_json_reply(&reply, json!({"action": "os-complete", "attachment": id}));
        }
        self.emit(&format!("completed attachment {id}"))
    }

    async fn delete_attachment(&mut self, id: &str) -> Result<(), Failure> {
        let task = Task::attachment(format!("cannot delete attachment {id}"));
        let reply = self
            .call(Method::DELETE, &attachment_path(id), None, &task)
            .await?;
        if self.json {
            return self.emit_json_reply(&reply, json!({"action": "delete", "attachment": id}));
        }
        self.emit(&format!("deleted attachment {id}"))
    }

    /// Prints events as they come; ends (exit 0) when volumed ends the stream.
    async fn follow_events(&mut self, args: EventsArgs) -> Result<(), Failure> {
        // The filter matches events by id or name on this side. A volume that does not exist
        // yet may be about to be created, but may as well be a typo that would show nothing
        // forever: say so, and follow anyway.
        if let Some(volume) = &args.volume {
            let task = Task::volume(format!("cannot follow the events of volume {volume}"));
            let reply = self.call(Method::GET, "/v3/volumes", None, &task).await?;
            let listed = reply.member("volumes").map_err(|err| task.failed(err))?;
            let exists = listed.as_array().is_some_and(|volumes| {
                volumes
                    .iter()
                    .any(|v| v["id"] == volume.as_str() || v["name"] == volume.as_str())
            });
            if !exists {
                let _ = writeln!(
                    self.progress,
                    "volumectl: no volume {volume} exists now; its events show once it is \
                     created (check the name with `volumectl list`)"
                );
            }
        }
        let client = self.client.clone();
        let mut stopped_by_output = None;
        let followed = client
            .follow("/v3/events", |message| {
                let Ok(event) = serde_json::from_str::<Value>(&message.data) else {
                    return true;
                };
                if args
                    .volume
                    .as_deref()
                    .is_some_and(|volume| !volumed::events::concerns(&event, volume))
                {
                    return true;
                }
                let line = match self.json {
                    true => message.data,
                    false => volumed::events::describe(&event),
                };
                self.emit(&line)
                    .map_err(|failure| stopped_by_output = Some(failure))
                    .is_ok()
            })
            .await;

        match (followed, stopped_by_output) {
            (_, Some(failure)) => Err(failure),
            (Ok(()), None) => {
                if !self.json {
                    let _ = writeln!(self.progress, "volumectl: volumed ended the event stream");
                }
                Ok(())
            }
            (Err(ClientError::Transport(error)), None) => Err(Failure::new(
                exit::UNREACHABLE,
                format!("the event stream from volumed broke off: {error}"),
            )
            .with_hint("see volumed's log; run `volumectl events` again once it serves")),
            (Err(error), None) => Err(Task::volume("cannot follow events").failed(error)),
        }
    }
}

/// Renders the manual page of `command` and, for section 1, one page per visible subcommand
/// (`volumectl-image-import.1`), adding the files to `written`.
fn write_manual_page(
    command: clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let subcommands: Vec<clap::Command> = command
        .get_subcommands()
        .filter(|subcommand| !subcommand.is_hide_set())
        .cloned()
        .collect();
    let page = clap_mangen::Man::new(command)
        .section(section)
        .manual("volumed");
    written.push(page.generate_to(dir)?);
    for subcommand in subcommands {
        write_manual_page(subcommand, section, dir, written)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use clap::CommandFactory;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::net::UnixListener;
    use volumed::client::ApiFault;

    use super::*;

    const MIB_BYTES: u64 = 1 << 20;

    /// One request as the fake daemon saw it.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        body: Vec<u8>,
    }

    impl Seen {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or(Value::Null)
        }
    }

    type Answer = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

    /// A fake volumed on a socket in a fresh temp dir, answering with `answer`.
    struct FakeDaemon {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl FakeDaemon {
        fn start(answer: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static) -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let socket = dir.path().join("volumed.sock");
            let listener = UnixListener::bind(&socket).expect("bind fake daemon");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let answer: Arc<Answer> = Arc::new(answer);

            let log = seen.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (log, answer) = (log.clone(), answer.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        respond(request, log.clone(), answer.clone())
                    });
                    let connection =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::spawn(connection);
                }
            });
            Self {
                _dir: dir,
                socket,
                seen,
            }
        }

        fn app(&self) -> App<Vec<u8>> {
            test_app(Client::new(&self.socket))
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("log lock").clone()
        }
    }

    async fn respond(
        request: Request<Incoming>,
        log: Arc<Mutex<Vec<Seen>>>,
        answer: Arc<Answer>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let body = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes().to_vec(),
            Err(_) => Vec::new(),
        };
        let seen = Seen { method, path, body };

        let (status, text) = answer(&seen);
        log.lock().expect("log lock").push(seen);
        let response = Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(text)))
            .expect("canned response");
        Ok(response)
    }

    fn test_app(client: Client) -> App<Vec<u8>> {
        App {
            client,
            json: false,
            out: Vec::new(),
            progress: Box::new(io::sink()),
            progress_bar: false,
            poll_every: Duration::from_millis(10),
        }
    }

    fn output(app: &App<Vec<u8>>) -> String {
        String::from_utf8_lossy(&app.out).into_owned()
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("volumectl").chain(args.iter().copied()))
    }

    fn volume_with(reimage: Value) -> String {
        json!({"volume": {"id": "0b7e-vol", "name": "vol1", "status": "available",
            "size": 2, "reimage": reimage}})
        .to_string()
    }

    fn run_state(state: &str, done: u64) -> Value {
        json!({"image_id": "img-1", "state": state, "bytes_done": done,
            "bytes_total": 4 * MIB_BYTES, "message": "disk on fire",
            "started_at": "2026-01-02T03:04:05.000006", "finished_at": null})
    }

    /// A daemon with image `cirros` whose volume `vol1` moves through `states` on each GET
    /// after the re-image request, staying on the last one.
    fn reimage_daemon(states: Vec<Value>) -> FakeDaemon {
        let polls = AtomicUsize::new(0);
        let requested = AtomicUsize::new(0);
        FakeDaemon::start(
            move |seen| match (seen.method.as_str(), seen.path.as_str()) {
                ("GET", "/v2/images/cirros") => {
                    (200, json!({"id": "img-1", "name": "cirros"}).to_string())
                }
                ("GET", "/v3/volumes/vol1") if requested.load(Ordering::SeqCst) == 0 => {
                    (200, volume_with(Value::Null))
                }
                ("GET", "/v3/volumes/vol1") => {
                    let poll = polls.fetch_add(1, Ordering::SeqCst);
                    let state = states[poll.min(states.len() - 1)].clone();
                    (200, volume_with(state))
                }
                ("POST", "/v3/volumes/vol1/action") => {
                    requested.fetch_add(1, Ordering::SeqCst);
                    (202, String::new())
                }
                _ => (404, String::new()),
            },
        )
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn long_help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();

        assert!(help.contains("Exit codes:"), "{help}");
        assert!(help.contains("5    --wait gave up"), "{help}");
    }

    #[test]
    fn parse_reimage_with_wait_and_timeout() {
        let cli = parse(&[
            "reimage",
            "vol1",
            "cirros",
            "--wait",
            "--timeout",
            "30",
            "--json",
        ])
        .expect("valid command line");

        assert!(cli.json);
        let Command::Reimage(args) = cli.command else {
            panic!("not a reimage: {:?}", cli.command);
        };
        assert_eq!(
            (args.volume.as_str(), args.image.as_str()),
            ("vol1", "cirros")
        );
        assert!(args.wait && !args.reserved);
        assert_eq!(args.timeout, Some(30));
    }

    #[test]
    fn parse_timeout_without_wait_is_a_usage_error() {
        let error = parse(&["reimage", "vol1", "cirros", "--timeout", "5"]).expect_err("usage");

        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn parse_refuses_zero_sizes_and_empty_names() {
        assert!(parse(&["create", "vol1", "--size", "0"]).is_err());
        assert!(parse(&["extend", "vol1", "0"]).is_err());
        assert!(parse(&["show", ""]).is_err());
        assert!(parse(&["create", "vol1"]).is_err());
    }

    #[test]
    fn parse_owner_as_uid_or_user_name() {
        let uid = parse(&["create", "v", "--size", "1", "--owner", "1000"]).expect("uid");
        let name = parse(&["create", "v", "--size", "1", "--owner", "alice"]).expect("name");

        let owner = |cli: Cli| match cli.command {
            Command::Create(args) => args.owner,
            other => panic!("not a create: {other:?}"),
        };
        assert_eq!(owner(uid), Some(json!(1000)));
        assert_eq!(owner(name), Some(json!("alice")));
    }

    #[test]
    fn parse_connector_must_be_a_json_object() {
        let good = parse(&[
            "attachment",
            "update",
            "a1",
            "--connector",
            r#"{"host": "n1"}"#,
        ]);
        let list = parse(&["attachment", "update", "a1", "--connector", "[1]"]);
        let broken = parse(&["attachment", "update", "a1", "--connector", "{host"]);

        assert!(good.is_ok());
        assert!(list.is_err());
        assert!(broken.is_err());
    }

    #[test]
    fn parse_instance_must_be_a_uuid() {
        let bad = parse(&["attachment", "create", "vol1", "--instance", "not-a-uuid"]);
        let good = parse(&[
            "attachment",
            "create",
            "vol1",
            "--instance",
            "4d2a8c3e-9b1f-4c55-8f0e-1a2b3c4d5e6f",
        ]);

        assert!(bad.is_err());
        assert!(good.is_ok());
    }

    #[test]
    fn socket_flag_beats_env_which_beats_default() {
        let flag = Some(PathBuf::from("/tmp/a.sock"));
        let env = Some(OsString::from("/tmp/b.sock"));

        assert_eq!(socket_path(flag, env.clone()), PathBuf::from("/tmp/a.sock"));
        assert_eq!(socket_path(None, env), PathBuf::from("/tmp/b.sock"));
        assert_eq!(
            socket_path(None, Some(OsString::new())),
            PathBuf::from(DEFAULT_SOCKET)
        );
        assert_eq!(socket_path(None, None), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(MIB_BYTES - 1), "1.0 MiB");
        assert_eq!(human_bytes(512 * MIB_BYTES), "512.0 MiB");
        assert_eq!(human_bytes(3 * GIB / 2), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn plain_progress_line_reads_as_sentence() {
        assert_eq!(
            plain_progress_line("vol1", 512 * MIB_BYTES, 2 * GIB),
            "vol1: 512.0 MiB of 2.0 GiB (25%)"
        );
        assert_eq!(plain_progress_line("vol1", 1536, 0), "vol1: 1.5 KiB");
    }

    #[test]
    fn bar_progress_line_shows_rate_and_time_left() {
        let line = bar_progress_line("vol1", GIB, 2 * GIB, Some(64.0 * MIB));

        assert!(
            line.starts_with("vol1 [############------------]  50%"),
            "{line}"
        );
        assert!(line.contains("1.0 GiB of 2.0 GiB"), "{line}");
        assert!(line.contains("64.0 MiB/s"), "{line}");
        assert!(line.ends_with("0:16 left"), "{line}");
    }

    #[test]
    fn bar_progress_line_without_rate_has_no_estimate() {
        let line = bar_progress_line("vol1", 0, GIB, None);

        assert!(line.contains("[------------------------]   0%"), "{line}");
        assert!(line.ends_with("-- MiB/s  --:-- left"), "{line}");
    }

    #[test]
    fn percent_is_capped_and_safe_on_zero() {
        assert_eq!(percent(5, 0), 0);
        assert_eq!(percent(3, 4), 75);
        assert_eq!(percent(9, 4), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }

    #[test]
    fn clock_switches_to_hours() {
        assert_eq!(clock(5), "0:05");
        assert_eq!(clock(125), "2:05");
        assert_eq!(clock(3725), "1:02:05");
    }

    #[test]
    fn rate_meter_averages_and_restarts() {
        let start = Instant::now();
        let mut meter = RateMeter::default();

        meter.record(start, 0);
        meter.record(start + Duration::from_millis(100), MIB_BYTES);
        assert_eq!(meter.bytes_per_second(), None);
        meter.record(start + Duration::from_secs(2), 20 * MIB_BYTES);
        assert_eq!(meter.bytes_per_second(), Some(10.0 * MIB));

        meter.record(start + Duration::from_secs(3), 0);
        assert_eq!(meter.bytes_per_second(), None);
    }

    #[test]
    fn plain_progress_prints_every_two_seconds_and_the_end() {
        let start = Instant::now();
        let mut view = ProgressView::new("vol1", false);
        let mut sink = Vec::new();

        view.update(&mut sink, start, 0, 4 * MIB_BYTES);
        view.update(
            &mut sink,
            start + Duration::from_secs(1),
            MIB_BYTES,
            4 * MIB_BYTES,
        );
        view.update(
            &mut sink,
            start + Duration::from_secs(2),
            2 * MIB_BYTES,
            4 * MIB_BYTES,
        );
        view.finish(&mut sink, 4 * MIB_BYTES, 4 * MIB_BYTES);

        let text = String::from_utf8_lossy(&sink);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "vol1: 0 B of 4.0 MiB (0%)",
                "vol1: 2.0 MiB of 4.0 MiB (50%)",
                "vol1: 4.0 MiB of 4.0 MiB (100%)"
            ]
        );
    }

    #[test]
    fn plain_progress_repeats_an_unchanged_line_only_after_a_while() {
        let start = Instant::now();
        let mut view = ProgressView::new("vol1", false);
        let mut sink = Vec::new();

        for second in [0, 2, 4, 6, 31, 33] {
            let at = start + Duration::from_secs(second);
            view.update(&mut sink, at, MIB_BYTES, 4 * MIB_BYTES);
        }
        view.finish(&mut sink, MIB_BYTES, 4 * MIB_BYTES);

        let text = String::from_utf8_lossy(&sink);
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn terminal_progress_redraws_one_line() {
        let start = Instant::now();
        let mut view = ProgressView::new("vol1", true);
        let mut sink = Vec::new();

        view.update(&mut sink, start, 0, MIB_BYTES);
        view.update(
            &mut sink,
            start + Duration::from_secs(1),
            MIB_BYTES,
            MIB_BYTES,
        );
        view.finish(&mut sink, MIB_BYTES, MIB_BYTES);

        let text = String::from_utf8_lossy(&sink);
        assert_eq!(text.matches('\r').count(), 2, "{text:?}");
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(
            text.contains("100%  1.0 MiB of 1.0 MiB  1.0 MiB/s  0:00 left"),
            "{text:?}"
        );
    }

    #[test]
    fn table_aligns_columns_and_trims_the_last() {
        let rows = vec![
            vec!["1".to_owned(), "a-long-name".to_owned(), "x".to_owned()],
            vec!["22".to_owned(), "b".to_owned(), "".to_owned()],
        ];

        let text = table(&["ID", "NAME", "STATUS"], &rows);

        assert_eq!(text, "ID  NAME         STATUS\n1   a-long-name  x\n22  b\n");
    }

    #[test]
    fn show_volume_orders_flattens_and_hides_links() {
        let volume = json!({
            "updated_at": "later", "id": "v-1", "name": "vol1", "size": 2,
            "links": [{"rel": "self"}], "attachments": [],
            "reimage": {"image_id": "img-1", "state": "running",
                "bytes_done": MIB_BYTES, "bytes_total": 4 * MIB_BYTES},
        });

        let text = show_volume(&volume);

        let expected = "\
id:                  v-1
name:                vol1
size:                2 GiB
attachments:         -
reimage.bytes_done:  1048576 (1.0 MiB of 4.0 MiB, 25%)
reimage.bytes_total: 4194304 (4.0 MiB)
reimage.image_id:    img-1
reimage.state:       running
updated_at:          later
";
        assert_eq!(text, expected);
    }

    #[test]
    fn show_image_renders_sizes() {
        let image = json!({"id": "i-1", "size": 3 * GIB / 2, "min_disk": 2, "self": "/x"});

        let text = show_image(&image);

        assert_eq!(
            text,
            "id:       i-1\nsize:     1610612736 (1.5 GiB)\nmin_disk: 2 GiB\n"
        );
    }

    #[test]
    fn volume_row_summarises_reimage() {
        let volume = json!({"id": "v", "name": "n", "status": "downloading", "size": 1,
            "bootable": "false", "attachments": [{}],
            "reimage": {"image_id": "i", "state": "running", "bytes_done": 1, "bytes_total": 4}});

        let row = volume_row(&volume);

        assert_eq!(
            row,
            [
                "v",
                "n",
                "downloading",
                "1 GiB",
                "false",
                "1",
                "running 25%"
            ]
        );
    }

    #[test]
    fn status_hints_name_the_way_out() {
        assert_eq!(
            reimage_status_hint("vol1", Some("in-use"), false),
            "vol1 is in-use: detach it, or re-image a reserved volume with --reserved"
        );
        assert!(reimage_status_hint("vol1", Some("reserved"), false).contains("--reserved"));
        assert!(reimage_status_hint("vol1", Some("error"), true).starts_with("vol1 is error"));
        assert!(reimage_status_hint("vol1", None, false).contains("available"));
    }

    #[test]
    fn volume_status_hints_say_how_to_get_out() {
        let reserved = volume_status_hint("delete", "vol1", "reserved").expect("a hint");
        let running = volume_status_hint("extend", "vol1", "downloading").expect("a hint");
        let error = volume_status_hint("extend", "vol1", "error").expect("a hint");

        assert!(reserved.starts_with("vol1 is reserved: to delete it, detach it first"));
        assert!(
            reserved.contains("`volumectl attachment delete ID`"),
            "{reserved}"
        );
        assert!(running.contains("`volumectl show vol1`"), "{running}");
        assert!(error.contains("`volumectl reset-status vol1 --status available`"));
        assert_eq!(volume_status_hint("delete", "vol1", "available"), None);
    }

    #[test]
    fn reset_status_hints_list_the_accepted_values() {
        let fault = |status, message: &str| {
            let body = json!({"badRequest": {"code": status, "message": message}});
            ApiFault::parse(status, body.to_string().as_bytes())
        };

        let status = reset_status_hint(&fault(400, "Invalid input for field/attribute status."));
        let attach = reset_status_hint(&fault(400, "... attach_status. Value: x."));
        let denied = reset_status_hint(&fault(403, "Policy doesn't allow it"));

        let status = status.expect("a hint");
        assert!(status.contains("available, error"), "{status}");
        assert!(!status.contains("downloading"), "{status}");
        assert!(attach.is_some_and(|hint| hint.contains("detached")));
        assert!(denied.is_some_and(|hint| hint.contains("administrators")));
    }

    #[test]
    fn status_is_read_from_a_cinder_message() {
        let message = "Invalid volume: Volume status must be available or reserved, but \
                       current status is: in-use.";

        assert_eq!(status_in_message(message).as_deref(), Some("in-use"));
        assert_eq!(status_in_message("Invalid volume"), None);
        assert_eq!(status_in_message("the status is: "), None);
    }

    #[test]
    fn size_hint_computes_the_needed_size() {
        let image = json!({"size": GIB + 1, "min_disk": 1});

        let hint = reimage_size_hint("vol1", &image);

        assert!(hint.contains("`volumectl extend vol1 2`"), "{hint}");
    }

    #[test]
    fn forbidden_and_unreachable_get_hints() {
        let forbidden = ClientError::Api(ApiFault::parse(403, b""));
        let missing = ClientError::Unreachable {
            socket: PathBuf::from("/run/x.sock"),
            error: io::Error::from(io::ErrorKind::NotFound),
        };

        let forbidden = Failure::client("cannot delete volume vol1", forbidden, Subject::Volume);
        let missing = Failure::client("cannot list volumes", missing, Subject::Volume);

        assert_eq!(forbidden.code, 1);
        assert_eq!(
            forbidden.message,
            "cannot delete volume vol1: permission denied"
        );
        assert_eq!(
            forbidden.hint.as_deref(),
            Some("ask an administrator or the volume's owner")
        );
        assert_eq!(missing.code, 3);
        assert!(missing
            .hint
            .is_some_and(|hint| hint.starts_with("is volumed running?")));
    }

    #[test]
    fn a_new_run_is_told_from_an_old_one() {
        let old = ReimageRun::of(&json!({"reimage": run_state("succeeded", 4)}));
        let target = WaitTarget {
            volume: "vol1",
            label: "vol1",
            image_id: "img-1",
            image_name: "cirros",
            earlier: old.clone(),
            timeout: None,
        };
        let mut newer = run_state("running", 0);
        newer["started_at"] = json!("2026-01-02T03:04:09.000001");
        let newer = ReimageRun::of(&json!({ "reimage": newer }));
        let other_image = ReimageRun::of(&json!({"reimage": {"image_id": "img-2",
            "state": "running"}}));

        assert!(!target.owns(&old.expect("old run")));
        assert!(target.owns(&newer.expect("new run")));
        assert!(!target.owns(&other_image.expect("other run")));
    }

    #[test]
    fn broken_pipe_ends_quietly() {
        struct ClosedPipe;
        impl Write for ClosedPipe {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut app = App {
            client: Client::new("/nonexistent"),
            json: false,
            out: ClosedPipe,
            progress: Box::new(io::sink()),
            progress_bar: false,
            poll_every: POLL_INTERVAL,
        };

        let failure = app.emit("hello").expect_err("the pipe is closed");

        assert_eq!((failure.code, failure.message.as_str()), (0, ""));
    }

    #[tokio::test]
    async fn unreachable_daemon_exits_3_with_hint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut app = test_app(Client::new(dir.path().join("none.sock")));

        let failure = app.run(Command::List).await.expect_err("nothing listens");

        assert_eq!(failure.code, exit::UNREACHABLE);
        assert!(
            failure.message.contains("no socket at"),
            "{}",
            failure.message
        );
        assert!(failure.hint.is_some_and(|hint| hint.contains("none.sock")));
    }

    #[tokio::test]
    async fn list_prints_a_table() {
        let daemon = FakeDaemon::start(|_| {
            let volume = json!({"id": "v-1", "name": "vol1", "status": "available",
                "size": 10, "bootable": "true", "attachments": [], "reimage": null});
            (200, json!({ "volumes": [volume] }).to_string())
        });
        let mut app = daemon.app();

        app.run(Command::List).await.expect("list");

        let expected = "\
ID   NAME  STATUS     SIZE    BOOTABLE  ATTACHED  RE-IMAGE
v-1  vol1  available  10 GiB  true      0         -
";
        assert_eq!(output(&app), expected);
        assert_eq!(daemon.seen()[0].path, "/v3/volumes/detail");
    }

    #[tokio::test]
    async fn json_mode_acknowledges_an_empty_reply() {
        let daemon = FakeDaemon::start(|_| (202, String::new()));
        let mut app = daemon.app();
        app.json = true;

        app.run(Command::Delete {
            volume: "my vol".to_owned(),
        })
        .await
        .expect("delete");

        let printed: Value = serde_json::from_str(&output(&app)).expect("one JSON object");
        assert_eq!(printed["volume"], "my vol");
        assert_eq!(daemon.seen()[0].path, "/v3/volumes/my%20vol");
    }

    #[tokio::test]
    async fn reimage_wait_follows_the_run_to_success() {
        let daemon = reimage_daemon(vec![
            run_state("running", MIB_BYTES),
            run_state("running", 3 * MIB_BYTES),
            run_state("succeeded", 4 * MIB_BYTES),
        ]);
        let mut app = daemon.app();
        let args = parse(&["reimage", "vol1", "cirros", "--wait", "--reserved"])
            .expect("valid command line");

        app.run(args.command).await.expect("re-image succeeds");

        let text = output(&app);
        assert!(
            text.starts_with("vol1: re-imaged with image cirros (img-1)"),
            "{text}"
        );
        let seen = daemon.seen();
        let action = seen
            .iter()
            .find(|seen| seen.method == "POST")
            .expect("an action");
        assert_eq!(
            action.json(),
            json!({"os-reimage": {"image_id": "img-1", "reimage_reserved": true}})
        );
    }

    #[tokio::test]
    async fn reimage_wait_reports_failure_with_exit_4() {
        let daemon = reimage_daemon(vec![run_state("failed", MIB_BYTES)]);
        let mut app = daemon.app();
        let args = parse(&["reimage", "vol1", "cirros", "--wait"]).expect("valid command line");

        let failure = app.run(args.command).await.expect_err("re-image fails");

        assert_eq!(failure.code, exit::REIMAGE_FAILED);
        assert!(
            failure.message.ends_with("failed: disk on fire"),
            "{}",
            failure.message
        );
    }

    #[tokio::test]
    async fn reimage_wait_gives_up_with_exit_5() {
        let daemon = reimage_daemon(vec![run_state("running", MIB_BYTES)]);
        let mut app = daemon.app();
        let args = parse(&["reimage", "vol1", "cirros", "--wait", "--timeout", "1"])
            .expect("valid command line");

        let failure = app.run(args.command).await.expect_err("still running");

        assert_eq!(failure.code, exit::TIMED_OUT);
        let expected = ": still running, 1.0 MiB of 4.0 MiB (25%)";
        assert!(failure.message.ends_with(expected), "{}", failure.message);
    }

    #[tokio::test]
    async fn reimage_of_in_use_volume_hints_at_detach() {
        let daemon = FakeDaemon::start(|seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("GET", "/v2/images/cirros") => (200, json!({"id": "img-1"}).to_string()),
            ("GET", "/v3/volumes/vol1") => {
                (200, json!({"volume": {"status": "in-use"}}).to_string())
            }
            _ => {
                let fault = json!({"badRequest": {"code": 400,
                    "message": "Invalid volume: status must be available or reserved"}});
                (400, fault.to_string())
            }
        });
        let mut app = daemon.app();
        let args = parse(&["reimage", "vol1", "cirros"]).expect("valid command line");

        let failure = app.run(args.command).await.expect_err("refused");

        assert_eq!(failure.code, exit::REFUSED);
        assert_eq!(
            failure.message,
            "cannot re-image vol1: Invalid volume: status must be available or reserved"
        );
        assert_eq!(
            failure.hint.as_deref(),
            Some("vol1 is in-use: detach it, or re-image a reserved volume with --reserved")
        );
    }

    #[tokio::test]
    async fn import_streams_the_file_and_prints_the_result() {
        let daemon = FakeDaemon::start(|seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("POST", "/v2/images") => (201, json!({"id": "img-9", "status": "queued"}).to_string()),
            ("PUT", "/v2/images/img-9/file") => (204, String::new()),
            _ => {
                let image = json!({"id": "img-9", "name": "disk", "status": "active",
                    "size": 3 * MIB_BYTES + 7, "checksum": "abc", "min_disk": 0});
                (200, image.to_string())
            }
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.raw");
        std::fs::write(&file, vec![0x5a; 3 * MIB_BYTES as usize + 7]).expect("write file");
        let mut app = daemon.app();
        let file_arg = file.to_str().expect("utf-8 path");
        let args = parse(&[
            "image",
            "import",
            file_arg,
            "--name",
            "disk",
            "--min-disk",
            "1",
        ])
        .expect("valid command line");

        app.run(args.command).await.expect("import");

        let seen = daemon.seen();
        assert_eq!(
            seen[0].json(),
            json!({"name": "disk", "disk_format": "raw", "container_format": "bare",
                "min_disk": 1})
        );
        assert_eq!(seen[1].body.len(), 3 * MIB_BYTES as usize + 7);
        let text = output(&app);
        assert!(text.contains("id:       img-9"), "{text}");
        assert!(text.contains("checksum: abc"), "{text}");
    }

    #[tokio::test]
    async fn failed_import_deletes_the_queued_image() {
        let daemon = FakeDaemon::start(|seen| match seen.method.as_str() {
            "POST" => (201, json!({"id": "img-9", "status": "queued"}).to_string()),
            "PUT" => {
                let fault = json!({"overLimit": {"code": 413, "message": "Image too large"}});
                (413, fault.to_string())
            }
            _ => (204, String::new()),
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.raw");
        std::fs::write(&file, b"data").expect("write file");
        let mut app = daemon.app();
        let command = Command::Image(ImageCommand::Import(ImportArgs {
            file,
            name: "disk".to_owned(),
            disk_format: "raw".to_owned(),
            container_format: "bare".to_owned(),
            min_disk: None,
        }));

        let failure = app.run(command).await.expect_err("upload refused");

        assert_eq!(failure.code, exit::REFUSED);
        assert!(
            failure.message.contains("Image too large"),
            "{}",
            failure.message
        );
        assert!(failure
            .message
            .ends_with("(deleted the queued image img-9)"));
        let seen = daemon.seen();
        assert_eq!(seen.last().map(|seen| seen.method.as_str()), Some("DELETE"));
        assert_eq!(
            seen.last().map(|seen| seen.path.as_str()),
            Some("/v2/images/img-9")
        );
    }

    #[tokio::test]
    async fn import_of_missing_file_creates_nothing() {
        let daemon = FakeDaemon::start(|_| (500, String::new()));
        let mut app = daemon.app();
        let args = parse(&["image", "import", "/nonexistent/disk.raw", "--name", "d"])
            .expect("valid command line");

        let failure = app.run(args.command).await.expect_err("no such file");

        assert_eq!(failure.code, exit::REFUSED);
        assert!(failure
            .message
            .starts_with("cannot read /nonexistent/disk.raw"));
        assert!(daemon.seen().is_empty());
    }

    #[tokio::test]
    async fn attachment_create_resolves_the_volume_name() {
        let daemon = FakeDaemon::start(|seen| match seen.method.as_str() {
            "GET" => (
                200,
                json!({"volume": {"id": "v-uuid", "name": "vol1"}}).to_string(),
            ),
            _ => {
                let attachment = json!({"id": "a-1", "status": "reserved",
                    "volume_id": "v-uuid", "connection_info": {"driver": "local"}});
                (200, json!({ "attachment": attachment }).to_string())
            }
        });
        let mut app = daemon.app();
        let args = parse(&[
            "attachment",
            "create",
            "vol1",
            "--connector",
            r#"{"host":"n1"}"#,
        ])
        .expect("valid command line");

        app.run(args.command).await.expect("attach");

        let seen = daemon.seen();
        assert_eq!(
            seen[1].json(),
            json!({"attachment": {"volume_uuid": "v-uuid", "connector": {"host": "n1"}}})
        );
        let text = output(&app);
        assert!(
            text.contains("connection_info: {\"driver\":\"local\"}"),
            "{text}"
        );
    }
}
