//! Observability through the real daemon: `GET /metrics` counting real I/O done through the
//! mount, re-images, fences and errors (every scrape is checked line by line against the text
//! exposition format), who may read it; the event stream `GET /v3/events` (order, sequence
//! numbers, failures, visibility, shutdown) and `volumectl events`; and logs that escape what
//! users name.

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use volumed::client::{EventParser, ServerEvent};

const MIB: u64 = 1 << 20;

/// setpriv credentials of uid nobody with only its primary group, nogroup.
const NOBODY: &str = "--reuid=nobody --regid=nogroup --clear-groups";

/// The owner uid of volumes created for nobody.
const NOBODY_UID: u32 = 65534;

// ----- helpers ------------------------------------------------------------------------------

/// A path quoted for `sh`.
fn q(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// Polls `cond` every 20 ms until it holds; fails after `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Imports `len` bytes of pseudo-random data as a raw image; returns its id.
fn image(d: &Daemon, name: &str, len: u64, seed: u64) -> String {
    let file = d.dir.path().join(format!("{name}.img"));
    random_file(&file, len as usize, seed);
    d.import_image(&file, name)
}

/// Changes the stored bytes of an image without changing its size: its re-image fails when
/// the refill finds the bytes differ from the upload.
fn corrupt_stored_image(d: &Daemon, image_id: &str) {
    let stored = d.state.join("images").join(format!("{image_id}.img"));
    assert!(stored.exists(), "stored image at {}", stored.display());
    sh_ok(&format!(
        "printf 'corrupted' | dd of={} bs=1 seek=100 conv=notrunc status=none",
        q(&stored)
    ));
}

/// Starts a re-image and asserts it was accepted.
fn start_reimage(d: &Daemon, volume: &str, image_id: &str) {
    let r = d.reimage(volume, image_id, false);
    assert_eq!(r.status, 202, "reimage {volume}: {}", r.text());
}

// ----- the exposition format, checked strictly -----------------------------------------------

/// Label names and values of one series.
type Labels = BTreeMap<String, String>;

/// Labels of one series in order, without `le`: what groups the buckets of a histogram.
type LabelList = Vec<(String, String)>;

/// Every series (`name{labels}` as sent) with its metric name, labels and value.
type Series = BTreeMap<String, (String, Labels, f64)>;

/// One scrape.
#[derive(Debug)]
struct Scrape {
    series: Series,
}

impl Scrape {
    /// The value of the one series of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .series
            .values()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, value)| *value)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one series {name} with {labels:?}, found {found:?}"
        );
        found[0]
    }

    /// The value of a series of one volume.
    fn of(&self, name: &str, volume: &str, more: &[(&str, &str)]) -> f64 {
        let mut labels = vec![("volume", volume)];
        labels.extend_from_slice(more);
        self.value(name, &labels)
    }
}

fn valid_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'));
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// Parses `{k="v",...}` at the start of `text`; returns the labels and the rest.
fn parse_labels(text: &str, line: &str) -> (Labels, String) {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').unwrap();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after.to_string());
        }
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label without =\" in {line:?}"));
        assert!(valid_name(key, false), "label name {key:?} in {line:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) => panic!("raw newline in a label of {line:?}"),
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        assert!(
            labels.insert(key.to_string(), value).is_none(),
            "label {key} twice in {line:?}"
        );
        rest = &after[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            assert!(rest.starts_with('}'), "expected , or }} in {line:?}");
        }
    }
}

/// Checks every line of `text` against the text exposition format 0.0.4 and our own rules
/// (HELP and TYPE before a family's samples, once; counters end in `_total`; histogram
/// buckets cumulative with `+Inf` equal to `_count`; no series twice), and returns it parsed.
fn parse_exposition(text: &str) -> Scrape {
    assert!(text.ends_with('\n'), "the exposition ends with a line feed");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut series = BTreeMap::new();

    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in the exposition");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name and text");
            assert!(valid_name(name, true), "{line}");
            assert!(!help.is_empty(), "{line}");
            assert!(helps.insert(name.to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name and kind");
            assert!(valid_name(name, true), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(helps.contains(name), "HELP before TYPE: {line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");

        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = &line[..name_end];
        assert!(valid_name(name, true), "metric name in {line:?}");
        let (labels, rest) = match line[name_end..].starts_with('{') {
            true => parse_labels(&line[name_end..], line),
            false => (BTreeMap::new(), line[name_end..].to_string()),
        };
        let value_text = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("one space before the value in {line:?}"));
        assert!(!value_text.contains(' '), "no timestamp expected: {line:?}");
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            number => number
                .parse()
                .unwrap_or_else(|_| panic!("value {number:?} in {line:?}")),
        };

        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| types.get(*base).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        let kind = types
            .get(family)
            .unwrap_or_else(|| panic!("sample before its TYPE: {line:?}"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter named _total: {line}");
            assert!(value >= 0.0, "{line}");
        }
        if name.ends_with("_bucket") && family != name {
            assert!(labels.contains_key("le"), "bucket without le: {line}");
        }
        let key = line[..line.len() - value_text.len() - 1].to_string();
        assert!(
            series
                .insert(key, (name.to_string(), labels, value))
                .is_none(),
            "series twice: {line}"
        );
    }

    check_histograms(&types, &series);
    Scrape { series }
}

/// Buckets of every histogram series rise with `le` and end at `+Inf` = `_count`.
fn check_histograms(types: &BTreeMap<String, String>, series: &Series) {
    for (family, _) in types.iter().filter(|(_, kind)| *kind == "histogram") {
        let bucket_name = format!("{family}_bucket");
        let mut groups: BTreeMap<LabelList, Vec<(f64, f64)>> = BTreeMap::new();
        for (name, labels, value) in series.values() {
            if *name != bucket_name {
                continue;
            }
            let le: f64 = match labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                le => le.parse().expect("le is a number"),
            };
            let rest: LabelList = labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            groups.entry(rest).or_default().push((le, *value));
        }
        for (labels, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} {labels:?} buckets not cumulative: {buckets:?}"
            );
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "{family} {labels:?} lacks +Inf");
            let count = series
                .values()
                .find(|(n, l, _)| {
                    *n == format!("{family}_count")
                        && l.iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                            == labels
                })
                .map(|(_, _, v)| *v);
            assert_eq!(count, Some(last.1), "{family} {labels:?}: +Inf != _count");
        }
    }
}

/// `GET /metrics` as root, checked strictly.
fn scrape(d: &Daemon) -> Scrape {
    let r = http(&d.socket, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let content_type = r.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse_exposition(&r.text())
}

// ----- event streams --------------------------------------------------------------------------

/// A follower of `GET /v3/events` on a raw socket, as root.
struct EventStream {
    reader: BufReader<UnixStream>,
    parser: EventParser,
    pending: VecDeque<ServerEvent>,
    ended: bool,
}

impl EventStream {
    /// Connects and reads the response head; from then on no event is missed.
    fn open(socket: &Path) -> Self {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(b"GET /v3/events HTTP/1.1\r\nHost: volumed\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(stream);

        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            headers.push(line.trim().to_ascii_lowercase());
        }
        assert!(
            headers.contains(&"content-type: text/event-stream".to_string()),
            "{headers:?}"
        );
        assert!(
            headers.contains(&"transfer-encoding: chunked".to_string()),
            "{headers:?}"
        );
        Self {
            reader,
            parser: EventParser::default(),
            pending: VecDeque::new(),
            ended: false,
        }
    }

    /// The next message; `None` once the daemon ended the response properly.
    fn next(&mut self) -> Option<ServerEvent> {
        while self.pending.is_empty() && !self.ended {
            let mut size_line = String::new();
            self.reader
                .read_line(&mut size_line)
                .expect("a chunk arrives in time");
            assert!(!size_line.is_empty(), "the stream broke off mid-response");
            let size = usize::from_str_radix(size_line.trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size {size_line:?}"));
            let mut chunk = vec![0u8; size + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            assert_eq!(&chunk[size..], b"\r\n");
            if size == 0 {
                self.ended = true;
            }
            check_stream_lines(&chunk[..size]);
            self.pending.extend(self.parser.push(&chunk[..size]));
        }
        self.pending.pop_front()
    }

    /// Events (as JSON) until one satisfies `last`, which is included.
    fn until(&mut self, mut last: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let message = self.next().expect("the stream ended early");
            let event: Value = serde_json::from_str(&message.data).unwrap();
            assert_eq!(message.event.as_deref(), event["type"].as_str(), "{event}");
            if let Some(seq) = event.get("seq") {
                assert_eq!(message.id, Some(seq.to_string()), "{event}");
            }
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

/// Every line of the stream is a field the SSE format knows, a comment or a separator.
fn check_stream_lines(bytes: &[u8]) {
    let text = std::str::from_utf8(bytes).expect("the stream is UTF-8");
    for line in text.split('\n') {
        let known = line.is_empty()
            || line.starts_with(": ")
            || line.starts_with("id: ")
            || line.starts_with("event: ")
            || line
                .strip_prefix("data: ")
                .is_some_and(|data| serde_json::from_str::<Value>(data).is_ok());
        assert!(known, "unexpected stream line {line:?}");
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// Waits until the daemon counts `n` followers of the event stream.
fn wait_for_followers(d: &Daemon, n: f64) {
    wait_until(Duration::from_secs(10), "event followers", || {
        scrape(d).value("volumed_event_subscribers", &[]) == n
    });
}

/// A process we spawned, killed (by pid) and reaped when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `script` with bash as `creds` in the background, its stdout into `out`.
fn spawn_as(creds: &str, script: &str, out: &Path) -> Spawned {
    let file = std::fs::File::create(out).unwrap();
    let child = Command::new("setpriv")
        .args(creds.split(' '))
        .args(["bash", "-c", script])
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn setpriv");
    Spawned(child)
}

/// `volumectl events ARGS` in the background, stdout and stderr into files.
fn spawn_volumectl_events(d: &Daemon, args: &[&str], name: &str) -> (Spawned, PathBuf, PathBuf) {
    let out = d.dir.path().join(format!("{name}.out"));
    let err = d.dir.path().join(format!("{name}.err"));
    let child = Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn volumectl");
    (Spawned(child), out, err)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

// ----- metrics ---------------------------------------------------------------------------------

/// Bytes and operations written, read, fsynced and punched through the mount are counted
/// exactly, with one latency observation per operation.
#[test]
fn metrics_count_exactly_the_io_done_through_the_mount() {
    require("dd");
    require("fallocate");
    let d = Daemon::start();
    d.create_volume("vol1", 1);
    let vol = d.vol("vol1");
    let before = scrape(&d);
    let io = |s: &Scrape, name: &str, op: &str| s.of(name, "vol1", &[("op", op)]);
    for op in ["read", "write", "fallocate", "flush"] {
        assert_eq!(io(&before, "volumed_volume_io_operations_total", op), 0.0);
    }

    // 48 writes of 64 KiB, then one fsync.
    sh_ok(&format!(
        "dd if=/dev/urandom of={} bs=64K count=48 oflag=direct conv=notrunc,fsync status=none",
        q(&vol)
    ));
    let written = scrape(&d);
    assert_eq!(
        io(&written, "volumed_volume_io_bytes_total", "write"),
        (48 * 64 * 1024) as f64
    );
    assert_eq!(
        io(&written, "volumed_volume_io_operations_total", "write"),
        48.0
    );
    assert_eq!(
        io(&written, "volumed_volume_io_operations_total", "flush"),
        1.0
    );
    assert_eq!(
        io(&written, "volumed_volume_io_latency_seconds_count", "write"),
        48.0
    );

    // 3 MiB read back in 1 MiB requests.
    sh_ok(&format!(
        "dd if={} of=/dev/null bs=1M count=3 iflag=direct status=none",
        q(&vol)
    ));
    let read_back = scrape(&d);
    assert_eq!(
        io(&read_back, "volumed_volume_io_bytes_total", "read"),
        (3 * MIB) as f64
    );
    assert_eq!(
        io(&read_back, "volumed_volume_io_operations_total", "read"),
        3.0
    );
    assert_eq!(
        io(
            &read_back,
            "volumed_volume_io_latency_seconds_count",
            "read"
        ),
        3.0
    );
    assert_eq!(
        io(&read_back, "volumed_volume_io_bytes_total", "write"),
        (48 * 64 * 1024) as f64,
        "reads add no written bytes"
    );

    // One discard of 1 MiB.
    sh_ok(&format!(
        "fallocate --punch-hole --offset 0 --length 1MiB {}",
        q(&vol)
    ));
    let punched = scrape(&d);
    assert_eq!(
        io(&punched, "volumed_volume_io_operations_total", "fallocate"),
        1.0
    );
    assert_eq!(
        io(&punched, "volumed_volume_io_bytes_total", "fallocate"),
        MIB as f64
    );
}

/// A successful and a failed re-image show in the counts, the bytes refilled, the duration
/// histogram and the failures by kind.
#[test]
fn metrics_count_reimages_bytes_durations_and_failures() {
    let d = Daemon::start();
    d.create_volume("vol1", 1);
    let good = image(&d, "good", 3 * MIB, 1);
    let bad = image(&d, "bad", 2 * MIB, 2);
    corrupt_stored_image(&d, &bad);

    d.reimage_and_wait("vol1", &good);
    let after_good = scrape(&d);
    let count = |s: &Scrape, name: &str| s.of(name, "vol1", &[]);
    assert_eq!(
        count(&after_good, "volumed_volume_reimages_started_total"),
        1.0
    );
    assert_eq!(
        count(&after_good, "volumed_volume_reimages_succeeded_total"),
        1.0
    );
    assert_eq!(
        count(&after_good, "volumed_volume_reimages_failed_total"),
        0.0
    );
    assert_eq!(
        count(&after_good, "volumed_volume_refill_bytes_total"),
        (3 * MIB) as f64
    );
    let durations = |s: &Scrape, outcome: &str| {
        s.value(
            "volumed_refill_duration_seconds_count",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(durations(&after_good, "succeeded"), 1.0);
    assert!(
        after_good.value(
            "volumed_refill_duration_seconds_sum",
            &[("outcome", "succeeded")]
        ) > 0.0
    );
    assert_eq!(after_good.value("volumed_reimages_running", &[]), 0.0);

    start_reimage(&d, "vol1", &bad);
    let view = d.wait_reimage("vol1", Duration::from_secs(60));
    assert_eq!(view["reimage"]["state"], "failed", "{view}");
    let after_bad = scrape(&d);
    assert_eq!(
        count(&after_bad, "volumed_volume_reimages_started_total"),
        2.0
    );
    assert_eq!(
        count(&after_bad, "volumed_volume_reimages_succeeded_total"),
        1.0
    );
    assert_eq!(
        count(&after_bad, "volumed_volume_reimages_failed_total"),
        1.0
    );
    assert_eq!(durations(&after_bad, "failed"), 1.0);
    assert_eq!(
        after_bad.value(
            "volumed_reimage_failures_total",
            &[("reason", "image_corrupt")]
        ),
        1.0
    );
    assert_eq!(
        after_bad.value("volumed_volumes", &[("status", "error")]),
        1.0
    );
    assert_eq!(
        after_bad.value("volumed_volumes", &[("status", "available")]),
        0.0
    );
}

/// During a rate-limited refill the volume's fenced time grows, the refill counts as running
/// and a read waits parked; afterwards the fenced time stands still.
#[test]
fn fenced_time_grows_during_a_rate_limited_refill() {
    require("dd");
    let d = Daemon::start_with("refill_rate_limit = 2\nrefill_window_mib = 1");
    d.create_volume("vol1", 1);
    let slow = image(&d, "slow", 6 * MIB, 3);

    start_reimage(&d, "vol1", &slow);
    let reader = spawn_as(
        "--reuid=root --regid=root --clear-groups",
        &format!(
            "dd if={} of=/dev/null bs=4K count=1 iflag=direct status=none",
            q(&d.vol("vol1"))
        ),
        &d.dir.path().join("reader.out"),
    );
    wait_until(Duration::from_secs(5), "a parked read", || {
        scrape(&d).of("volumed_volume_parked_requests", "vol1", &[]) == 1.0
    });
    let first = scrape(&d);
    std::thread::sleep(Duration::from_millis(700));
    let second = scrape(&d);
    let fenced = |s: &Scrape| s.of("volumed_volume_fenced_seconds_total", "vol1", &[]);
    assert!(fenced(&first) > 0.0, "{}", fenced(&first));
    assert!(
        fenced(&second) >= fenced(&first) + 0.5,
        "fenced time grows: {} then {}",
        fenced(&first),
        fenced(&second)
    );
    assert_eq!(second.value("volumed_reimages_running", &[]), 1.0);
    assert_eq!(
        second.value("volumed_volumes", &[("status", "downloading")]),
        1.0
    );

    let view = d.wait_reimage("vol1", Duration::from_secs(60));
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    drop(reader);
    let done = scrape(&d);
    std::thread::sleep(Duration::from_millis(300));
    let later = scrape(&d);
    assert_eq!(
        fenced(&done),
        fenced(&later),
        "an open volume adds no fenced time"
    );
    assert!(
        fenced(&done) >= 2.0,
        "6 MiB at 2 MiB/s is fenced about 3 s: {}",
        fenced(&done)
    );
    assert_eq!(done.of("volumed_volume_parked_requests", "vol1", &[]), 0.0);
    assert_eq!(done.value("volumed_reimages_running", &[]), 0.0);
}

/// Errors are counted by kind: a 404 of the API by status and fault name, a write past the
/// end by its errno.
#[test]
fn errors_are_counted_by_kind() {
    require("dd");
    let d = Daemon::start();
    d.create_volume("vol1", 1);
    let faults = |s: &Scrape| {
        s.series
            .values()
            .filter(|(n, l, _)| n == "volumed_api_faults_total" && l["status"] == "404")
            .map(|(_, _, v)| *v)
            .sum::<f64>()
    };
    let before = faults(&scrape(&d));

    let r = d.api("GET", "/v3/volumes/no-such-volume", None);
    assert_eq!(r.status, 404);
    let after = scrape(&d);
    assert_eq!(faults(&after), before + 1.0);
    assert_eq!(
        after.value(
            "volumed_api_faults_total",
            &[("status", "404"), ("fault", "itemNotFound")]
        ),
        before + 1.0
    );

    let out = sh(&format!(
        "dd if=/dev/zero of={} bs=4K count=1 seek=262144 oflag=direct conv=notrunc status=none",
        q(&d.vol("vol1"))
    ));
    assert!(!out.status.success(), "a write at the end fails");
    let after = scrape(&d);
    assert_eq!(
        after.value("volumed_fuse_errors_total", &[("errno", "ENOSPC")]),
        1.0
    );
    assert_eq!(
        after.of(
            "volumed_volume_io_operations_total",
            "vol1",
            &[("op", "write")]
        ),
        1.0,
        "the failed write is an operation"
    );
    assert_eq!(
        after.of("volumed_volume_io_bytes_total", "vol1", &[("op", "write")]),
        0.0,
        "that moved nothing"
    );
}

/// `/metrics` is refused (403) to a user who is not an administrator, until a policy
/// reload grants `volumed:metrics`.
#[test]
fn metrics_are_refused_to_a_non_admin_until_the_policy_allows() {
    require("setpriv");
    require("curl");
    let d = Daemon::start();
    let curl = format!(
        "curl -sS --unix-socket {} -w '\\n%{{http_code}}' http://localhost/metrics",
        q(&d.socket)
    );
    let as_nobody = || {
        let out = sh_ok(&format!("setpriv {NOBODY} bash -c {}", q(Path::new(&curl))));
        let (body, code) = out.rsplit_once('\n').expect("curl printed a status");
        (code.trim().to_string(), body.to_string())
    };

    let (code, body) = as_nobody();
    assert_eq!(code, "403", "{body}");
    let fault: Value = serde_json::from_str(&body).expect("a fault body");
    assert_eq!(fault["forbidden"]["code"], 403, "{body}");
    scrape(&d);

    let mut config = std::fs::read_to_string(&d.config).unwrap();
    config.push_str("[policy]\n\"volumed:metrics\" = \"@\"\n");
    std::fs::write(&d.config, config).unwrap();
    d.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(10), "the policy reload", || {
        d.log_text().contains("policy changed")
    });
    let (code, body) = as_nobody();
    assert_eq!(code, "200", "{body}");
    parse_exposition(&body);
}

// ----- events ----------------------------------------------------------------------------------

/// A follower connected before a re-image receives started, progress and succeeded in order,
/// with the status changes between them and rising sequence numbers.
#[test]
fn events_follow_a_reimage_in_order_with_rising_sequence_numbers() {
    let d = Daemon::start_with("refill_rate_limit = 2\nrefill_window_mib = 1");
    let slow = image(&d, "slow", 4 * MIB, 4);
    let mut stream = EventStream::open(&d.socket);

    let volume = d.create_volume("vol1", 1);
    start_reimage(&d, "vol1", &slow);
    let events = stream.until(|e| e["type"] == "volume.status" && e["to"] == "available");

    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "root sees every event, numbered one by one: {seqs:?}"
    );
    let kinds = types(&events);
    let progress = kinds.iter().filter(|k| **k == "reimage.progress").count();
    assert!(progress >= 1, "a 2 s refill reports progress: {kinds:?}");
    let mut expected = vec!["volume.created", "reimage.started", "volume.status"];
    expected.extend(std::iter::repeat_n("reimage.progress", progress));
    expected.extend(["reimage.succeeded", "volume.status"]);
    assert_eq!(kinds, expected);

    for event in &events {
        assert_eq!(event["volume_id"], volume["id"], "{event}");
        assert_eq!(event["volume_name"], "vol1", "{event}");
        assert!(
            event["time"].as_str().is_some_and(|t| !t.is_empty()),
            "{event}"
        );
    }
    assert_eq!(events[1]["image_id"], slow.as_str());
    assert_eq!(events[1]["bytes_total"], 4 * MIB);
    assert_eq!(
        (&events[2]["from"], &events[2]["to"]),
        (&json!("available"), &json!("downloading"))
    );
    let done: Vec<u64> = events[3..3 + progress]
        .iter()
        .map(|e| e["bytes_done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] < w[1]), "{done:?}");
    assert!(done.iter().all(|&b| b > 0 && b <= 4 * MIB), "{done:?}");
    let succeeded = &events[3 + progress];
    assert_eq!(succeeded["bytes_done"], 4 * MIB, "{succeeded}");
    assert!(
        succeeded["duration_seconds"].as_f64().unwrap() >= 1.0,
        "{succeeded}"
    );
}

/// A failed re-image emits `reimage.failed` with its reason, then the change to `error`.
#[test]
fn a_failed_reimage_emits_failed_with_its_reason() {
    let d = Daemon::start();
    d.create_volume("vol1", 1);
    let bad = image(&d, "bad", 2 * MIB, 5);
    corrupt_stored_image(&d, &bad);
    let mut stream = EventStream::open(&d.socket);

    start_reimage(&d, "vol1", &bad);
    let events = stream.until(|e| e["type"] == "volume.status" && e["to"] == "error");
    let kinds = types(&events);
    assert_eq!(kinds.first(), Some(&"reimage.started"), "{kinds:?}");
    let failed = events
        .iter()
        .find(|e| e["type"] == "reimage.failed")
        .unwrap_or_else(|| panic!("no reimage.failed in {kinds:?}"));
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("corrupt"), "{failed}");
    assert_eq!(failed["image_id"], bad.as_str());
    assert!(failed["duration_seconds"].as_f64().is_some(), "{failed}");
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["reimage.failed", "volume.status"],
        "the outcome, then the status it leads to"
    );
    assert_eq!(events.last().unwrap()["from"], "downloading");
}

/// A user who is not an administrator follows only the events of their own volumes; root
/// sees both users' volumes.
#[test]
fn a_non_owner_does_not_see_another_users_volume_events() {
    require("setpriv");
    require("curl");
    let d = Daemon::start();
    let out = d.dir.path().join("nobody-events.txt");
    let follower = spawn_as(
        NOBODY,
        &format!(
            "exec curl -sN --unix-socket {} http://localhost/v3/events",
            q(&d.socket)
        ),
        &out,
    );
    let mut root_stream = EventStream::open(&d.socket);
    wait_for_followers(&d, 2.0);

    // Root's volume changes first, nobody's last: once nobody has the last event, any
    // event of root's volume would have come before it.
    d.create_volume("roots", 1);
    assert_eq!(d.api("DELETE", "/v3/volumes/roots", None).status, 202);
    let r = d.api(
        "POST",
        "/v3/volumes",
        Some(json!({"volume": {"name": "mine", "size": 1, "owner": NOBODY_UID}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_until(Duration::from_secs(10), "nobody's event", || {
        read(&out).contains("\"volume_name\":\"mine\"")
    });
    drop(follower);

    let seen = read(&out);
    assert!(!seen.contains("roots"), "nobody saw root's volume:\n{seen}");
    let nobody_events: Vec<Value> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert_eq!(types(&nobody_events), ["volume.created"], "{seen}");

    let root_events = root_stream.until(|e| e["volume_name"] == "mine");
    let names: Vec<&str> = root_events
        .iter()
        .map(|e| e["volume_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["roots", "roots", "mine"]);
    assert_eq!(
        types(&root_events),
        ["volume.created", "volume.deleted", "volume.created"]
    );
}

/// `volumectl events --json` prints one JSON object per event and the human form honours
/// `--volume`; both exit 0 when SIGTERM ends the daemon, which stops without waiting for them.
#[test]
fn volumectl_events_prints_events_and_exits_0_when_the_daemon_stops() {
    let mut d = Daemon::start();
    let (mut json_follower, json_out, json_err) =
        spawn_volumectl_events(&d, &["--json", "events"], "json");
    let (mut text_follower, text_out, _) =
        spawn_volumectl_events(&d, &["events", "--volume", "vol2"], "text");
    wait_for_followers(&d, 2.0);

    d.create_volume("vol1", 1);
    d.create_volume("vol2", 2);
    assert_eq!(d.api("DELETE", "/v3/volumes/vol1", None).status, 202);
    wait_until(Duration::from_secs(10), "three JSON lines", || {
        read(&json_out).lines().count() == 3
    });
    wait_until(Duration::from_secs(10), "one text line", || {
        read(&text_out).lines().count() == 1
    });

    let started = Instant::now();
    let status = d.stop();
    assert!(status.success(), "volumed exits 0: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "open event streams do not hold the stop for the 5 s grace: {:?}",
        started.elapsed()
    );
    for (name, follower) in [("json", &mut json_follower), ("text", &mut text_follower)] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let exit = loop {
            if let Some(exit) = follower.0.try_wait().unwrap() {
                break exit;
            }
            assert!(Instant::now() < deadline, "volumectl {name} still follows");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(exit.code(), Some(0), "volumectl {name}");
    }

    let lines: Vec<Value> = read(&json_out)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(
        types(&lines),
        ["volume.created", "volume.created", "volume.deleted"]
    );
    assert_eq!(lines[1]["volume_name"], "vol2");
    assert_eq!(lines[1]["size_gib"], 2);
    assert!(read(&json_err).is_empty(), "{}", read(&json_err));

    let text = read(&text_out);
    assert!(
        text.trim_end().ends_with("  vol2  created, 2 GiB"),
        "one line about vol2 only: {text:?}"
    );
}

/// `volumectl events` on a socket nobody listens on says so and exits 3.
#[test]
fn volumectl_events_exits_3_when_the_socket_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new("timeout")
        .args(["-k", "5", "30", env!("CARGO_BIN_EXE_volumectl"), "--socket"])
        .arg(&socket)
        .arg("events")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot connect to volumed"), "{stderr}");
    assert!(stderr.contains("hint: is volumed running?"), "{stderr}");
    assert!(out.stdout.is_empty());
}

// ----- logs --------------------------------------------------------------------------------------

/// Names users choose are escaped in the log: quotes cannot forge a field, and a name or
/// line with a newline never reaches the log as a line of its own. Lifecycle events log
/// one line each with their fields.
#[test]
fn logs_escape_user_supplied_names_and_record_lifecycle_events() {
    require("bash");
    let d = Daemon::start();
    let forged = "x\" level=ERROR msg=\"forged";
    let r = d.api(
        "POST",
        "/v2/images",
        Some(json!({"name": forged, "disk_format": "raw", "container_format": "bare"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = d.api(
        "POST",
        "/v2/images",
        Some(json!({"name": "a\nERROR forged line", "disk_format": "raw"})),
    );
    assert_eq!(
        r.status,
        400,
        "a name with a newline is refused: {}",
        r.text()
    );
    let r = d.api(
        "POST",
        "/v3/volumes",
        Some(json!({"volume": {"name": "v\"1\nERROR forged", "size": 1}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let out = sh(&format!(
        "printf 'reimage \"quoted\" base\\n' > {}",
        q(&d.mnt.join(".control"))
    ));
    assert!(!out.status.success(), "the control line is refused");

    d.create_volume("vol1", 1);
    assert_eq!(d.api("DELETE", "/v3/volumes/vol1", None).status, 202);
    wait_until(Duration::from_secs(5), "the delete in the log", || {
        d.log_text().contains("volume deleted")
    });

    let log = d.log_text();
    assert!(
        log.contains(r#"name=Some("x\" level=ERROR msg=\"forged")"#),
        "the quoted name is escaped:\n{log}"
    );
    assert!(
        log.contains(r#"line="reimage \"quoted\" base""#),
        "the control line is escaped:\n{log}"
    );
    for line in log.lines() {
        assert!(!line.starts_with("ERROR forged"), "forged line:\n{log}");
        assert!(
            !line.contains("\u{1b}["),
            "no colours in a log file: {line:?}"
        );
    }
    for (event, fields) in [
        ("mounted", &["mountpoint="][..]),
        (
            "volume created",
            &["volume=\"vol1\"", "id=", "size_gib=1"][..],
        ),
        ("volume deleted", &["volume=\"vol1\"", "id="][..]),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(event)).collect();
        assert_eq!(lines.len(), 1, "one line for {event}:\n{log}");
        for field in fields {
            assert!(lines[0].contains(field), "{field} in {:?}", lines[0]);
        }
    }
}

/// Re-image outcomes log one line each with the volume, image, duration and, on failure,
/// the reason and its kind; nothing is logged per I/O at info.
#[test]
fn reimage_outcomes_log_one_line_with_duration_and_reason() {
    require("dd");
    let d = Daemon::start();
    d.create_volume("vol1", 1);
    let good = image(&d, "good", MIB, 6);
    let bad = image(&d, "bad", MIB, 7);
    corrupt_stored_image(&d, &bad);

    d.reimage_and_wait("vol1", &good);
    start_reimage(&d, "vol1", &bad);
    d.wait_reimage("vol1", Duration::from_secs(60));
    sh_ok(&format!(
        "dd if=/dev/zero of={} bs=4K count=64 oflag=direct conv=notrunc status=none",
        q(&d.vol("vol1"))
    ));
    wait_until(Duration::from_secs(5), "the failure in the log", || {
        d.log_text().contains("re-image failed")
    });

    let log = d.log_text();
    let accepted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("re-image accepted"))
        .collect();
    assert_eq!(accepted.len(), 2, "{log}");
    let finished: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("re-image finished"))
        .collect();
    assert_eq!(finished.len(), 1, "{log}");
    for field in [
        "volume=\"vol1\"",
        &format!("image={good}"),
        "seconds=",
        "bytes=1048576",
    ] {
        assert!(finished[0].contains(field), "{field} in {:?}", finished[0]);
    }
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("re-image failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
    for field in [
        "ERROR",
        "volume=\"vol1\"",
        &format!("image={bad}"),
        "seconds=",
        "kind=\"image_corrupt\"",
        "reason=\"",
    ] {
        assert!(failed[0].contains(field), "{field} in {:?}", failed[0]);
    }
    let info_lines = log.lines().filter(|l| l.contains(" INFO ")).count();
    assert!(info_lines < 20, "64 writes log nothing at info:\n{log}");
}

/// `volumectl events` exits 3 with a clear message when the stream breaks off without an
/// end, as when volumed is killed.
#[test]
fn volumectl_events_exits_3_when_the_stream_breaks_off() {
    let mut d = Daemon::start();
    let (mut follower, out, err) = spawn_volumectl_events(&d, &["events"], "broken");
    wait_for_followers(&d, 1.0);
    d.create_volume("vol1", 1);
    wait_until(Duration::from_secs(10), "the event line", || {
        read(&out).contains("vol1  created")
    });

    d.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = follower.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "volumectl still follows a dead daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = read(&err);
    assert_eq!(exit.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the event stream from volumed broke off"),
        "{stderr}"
    );
}

/// Opens an event stream by hand and returns the socket once the status line has arrived.
fn open_follower(socket: &Path) -> (UnixStream, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the socket");
    stream
        .write_all(b"GET /v3/events HTTP/1.1\r\nHost: volumed\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).expect("the status line");
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// Idle followers take at most their own share of the connections: past it a new stream
/// gets 503 at once, requests (and the watchdog's probe) keep answering, and a slot frees
/// when a follower leaves.
#[test]
fn event_followers_are_capped_and_never_lock_requests_out() {
    let d = Daemon::start();
    let mut followers: Vec<UnixStream> = (0..volumed::api::MAX_FOLLOWERS)
        .map(|i| {
            let (stream, head) = open_follower(&d.socket);
            assert_eq!(head, "HTTP/1.1 200", "follower {i}");
            stream
        })
        .collect();

    let r = http(&d.socket, "GET", "/v3/events", &[], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    let fault = &r.json()["serviceUnavailable"];
    assert_eq!(fault["code"], 503, "{}", r.text());
    assert!(
        fault["message"].as_str().unwrap().contains("event streams"),
        "{}",
        r.text()
    );

    // Well past the connection limit: every extra client gets its answer.
    for _ in 0..300 {
        assert_eq!(http(&d.socket, "GET", "/v3/events", &[], b"").status, 503);
    }
    let started = Instant::now();
    assert_eq!(d.api("GET", "/v3/volumes", None).status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    drop(followers.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_stream, head) = open_follower(&d.socket);
        if head == "HTTP/1.1 200" {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed: {head}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `volumectl events --volume` with a volume that does not exist says so at once (a typo
/// would otherwise show nothing forever), and shows the volume's events once it is created.
#[test]
fn volumectl_events_for_an_unknown_volume_warns_and_follows_it() {
    let d = Daemon::start();
    let (_follower, out, err) =
        spawn_volumectl_events(&d, &["events", "--volume", "later"], "later");
    wait_until(Duration::from_secs(10), "the warning", || {
        read(&err).contains("no volume later exists now")
    });
    wait_for_followers(&d, 1.0);

    d.create_volume("later", 1);
    wait_until(Duration::from_secs(10), "the volume's first event", || {
        read(&out).contains("later")
    });
}
