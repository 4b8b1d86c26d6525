//! The daemon's counters, and their rendering for `GET /metrics` in Prometheus' text format.
//!
//! Two kinds of counting, kept apart by how hot their path is:
//!
//! - The FUSE data path counts into [`VolumeMetrics`], owned by each volume's
//!   [`VolumeFile`]: plain atomics updated with relaxed ordering, and latency histograms whose
//!   buckets are fixed arrays of atomics. A request costs two clock reads and four atomic adds;
//!   no lock is taken. The errno of every failed FUSE reply is counted the same way in
//!   [`Metrics`].
//! - Everything else (API faults, re-image outcomes) happens a few times a minute and uses a
//!   mutex where a map is simpler.
//!
//! Rendering reads the atomics without stopping the writers, so the counters of one scrape
//! may be a request apart from each other; each one on its own only ever grows.
//!
//! Label values are escaped as the exposition format asks (`\\`, `\"`, `\n`). Volume names
//! cannot hold any of those characters, and no other label carries text a user chose.
//!
//! [`VolumeFile`]: crate::volume::VolumeFile

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::error::fault_name_for_status;
use crate::model::VolumeStatus;
use crate::volume::VolumeFile;

/// The media type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the I/O latency buckets, in nanoseconds (50 µs to 10 s).
const IO_LATENCY_BOUNDS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds of the refill duration buckets, in nanoseconds (100 ms to 1 h).
const REFILL_DURATION_BOUNDS: &[u64] = &[
    100_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
    300_000_000_000,
    600_000_000_000,
    1_800_000_000_000,
    3_600_000_000_000,
];

/// The kinds of data request a volume counts.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum IoOp {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `fallocate`: discards (punch hole, zero range) and allocations.
    Fallocate,
    /// `fsync` and `fdatasync`.
    Flush,
}

impl IoOp {
    const ALL: [IoOp; 4] = [IoOp::Read, IoOp::Write, IoOp::Fallocate, IoOp::Flush];

    fn label(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Fallocate => "fallocate",
            IoOp::Flush => "flush",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A histogram with fixed buckets, safe to observe from any thread without a lock.
pub struct Histogram {
    /// Upper bounds in nanoseconds, ascending.
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds.partition_point(|&bound| bound < nanos);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Counters of one volume's data path and re-images.
pub struct VolumeMetrics {
    ops: [AtomicU64; 4],
    bytes: [AtomicU64; 4],
    latency: [Histogram; 4],
    /// Re-images accepted.
    pub reimages_started: AtomicU64,
    /// Re-images that ended with the new content in place.
    pub reimages_succeeded: AtomicU64,
    /// Re-images that ended with the content discarded.
    pub reimages_failed: AtomicU64,
    /// Image bytes refilled by finished re-images, successful or not.
    pub refill_bytes: AtomicU64,
}

impl Default for VolumeMetrics {
    fn default() -> Self {
        Self {
            ops: Default::default(),
            bytes: Default::default(),
            latency: std::array::from_fn(|_| Histogram::new(IO_LATENCY_BOUNDS)),
            reimages_started: AtomicU64::new(0),
            reimages_succeeded: AtomicU64::new(0),
            reimages_failed: AtomicU64::new(0),
            refill_bytes: AtomicU64::new(0),
        }
    }
}

impl VolumeMetrics {
    /// Counts one answered request of `op` that moved `bytes` and took `elapsed`, time
    /// parked behind a fence included.
    pub fn record_io(&self, op: IoOp, bytes: u64, elapsed: Duration) {
        let i = op.index();
        self.ops[i].fetch_add(1, Ordering::Relaxed);
        if bytes > 0 {
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        }
        self.latency[i].observe(elapsed);
    }

    /// Requests of `op` answered so far.
    pub fn ops(&self, op: IoOp) -> u64 {
        self.ops[op.index()].load(Ordering::Relaxed)
    }

    /// Bytes moved by requests of `op` so far.
    pub fn bytes(&self, op: IoOp) -> u64 {
        self.bytes[op.index()].load(Ordering::Relaxed)
    }
}

/// How a re-image ended, for the refill duration histogram.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// The new content is in place.
    Succeeded,
    /// The content was discarded.
    Failed,
}

/// Counters that are not about one volume.
pub struct Metrics {
    /// Failed FUSE replies by errno (index = errno; the last slot gathers larger values).
    fuse_errors: Box<[AtomicU64]>,
    api_faults: Mutex<BTreeMap<u16, u64>>,
    refill_durations: [Histogram; 2],
    failures: Mutex<BTreeMap<&'static str, u64>>,
}

/// Errnos counted one by one; anything larger (or negative) shares the last slot, `other`.
const ERRNO_SLOTS: usize = 160;

impl Default for Metrics {
    fn default() -> Self {
        Self {
            fuse_errors: (0..ERRNO_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            api_faults: Mutex::new(BTreeMap::new()),
            refill_durations: std::array::from_fn(|_| Histogram::new(REFILL_DURATION_BOUNDS)),
            failures: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Counts one FUSE request answered with `errno`.
    pub fn count_fuse_error(&self, errno: i32) {
        let slot = usize::try_from(errno)
            .unwrap_or(ERRNO_SLOTS - 1)
            .min(ERRNO_SLOTS - 1);
        self.fuse_errors[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one API response with an error `status` (4xx or 5xx).
    pub fn count_api_fault(&self, status: u16) {
        *lock(&self.api_faults).entry(status).or_insert(0) += 1;
    }

    /// Counts one finished refill and how long it ran.
    pub fn count_refill(&self, outcome: Outcome, elapsed: Duration) {
        self.refill_durations[outcome as usize].observe(elapsed);
    }

    /// Counts one failed re-image by the kind of its reason.
    pub fn count_failure(&self, kind: &'static str) {
        *lock(&self.failures).entry(kind).or_insert(0) += 1;
    }
}

/// Picks one counter out of a volume's metrics.
type CounterOf = fn(&VolumeMetrics) -> &AtomicU64;

/// What the rendering needs to know of one volume.
pub struct VolumeSample {
    /// The volume's id.
    pub id: Uuid,
    /// The volume's name.
    pub name: String,
    /// Its current status.
    pub status: VolumeStatus,
    /// Its data path, with the counters.
    pub file: Option<Arc<VolumeFile>>,
}

/// Renders every metric in the text exposition format.
pub fn render(volumes: &[VolumeSample], metrics: &Metrics, event_subscribers: usize) -> String {
    let mut out = Exposition::default();
    let files: Vec<(&VolumeSample, &VolumeFile)> = volumes
        .iter()
        .filter_map(|v| v.file.as_deref().map(|f| (v, f)))
        .collect();
    let id_labels: Vec<String> = files.iter().map(|(v, _)| v.id.to_string()).collect();
    let volume_labels = |i: usize| -> [(&str, &str); 2] {
        [
            ("volume_id", id_labels[i].as_str()),
            ("volume", files[i].0.name.as_str()),
        ]
    };

    // The data path.
    out.family(
        "volumed_volume_io_operations_total",
        "counter",
        "Data requests answered through the mount, by volume and kind.",
    );
    for (i, (_, file)) in files.iter().enumerate() {
        for op in IoOp::ALL {
            let [id, name] = volume_labels(i);
            let labels = [id, name, ("op", op.label())];
            out.sample(
                "volumed_volume_io_operations_total",
                &labels,
                file.metrics.ops(op),
            );
        }
    }
    out.family(
        "volumed_volume_io_bytes_total",
        "counter",
        "Bytes read, written or covered by fallocate through the mount.",
    );
    for (i, (_, file)) in files.iter().enumerate() {
        for op in [IoOp::Read, IoOp::Write, IoOp::Fallocate] {
            let [id, name] = volume_labels(i);
            let labels = [id, name, ("op", op.label())];
            out.sample(
                "volumed_volume_io_bytes_total",
                &labels,
                file.metrics.bytes(op),
            );
        }
    }
    out.family(
        "volumed_volume_io_latency_seconds",
        "histogram",
        "Time from a data request's arrival to its answer, time parked behind a fence included.",
    );
    for (i, (_, file)) in files.iter().enumerate() {
        for op in IoOp::ALL {
            let [id, name] = volume_labels(i);
            let labels = [id, name, ("op", op.label())];
            let histogram = &file.metrics.latency[op.index()];
            out.histogram("volumed_volume_io_latency_seconds", &labels, histogram);
        }
    }
    out.family(
        "volumed_volume_fenced_seconds_total",
        "counter",
        "Time the volume's I/O was fenced by re-images, a running fence included.",
    );
    for (i, (_, file)) in files.iter().enumerate() {
        let seconds = file.gate.fenced_time().as_secs_f64();
        out.sample(
            "volumed_volume_fenced_seconds_total",
            &volume_labels(i),
            seconds,
        );
    }
    out.family(
        "volumed_volume_parked_requests",
        "gauge",
        "Data requests waiting for the volume's fence to lift.",
    );
    for (i, (_, file)) in files.iter().enumerate() {
        let parked = file.gate.parked_len();
        out.sample("volumed_volume_parked_requests", &volume_labels(i), parked);
    }

    // Re-images.
    let reimage_counters: [(&str, &str, CounterOf); 4] = [
        (
            "volumed_volume_reimages_started_total",
            "Re-images accepted.",
            |m| &m.reimages_started,
        ),
        (
            "volumed_volume_reimages_succeeded_total",
            "Re-images that ended with the image in place.",
            |m| &m.reimages_succeeded,
        ),
        (
            "volumed_volume_reimages_failed_total",
            "Re-images that failed; the volume's content was discarded.",
            |m| &m.reimages_failed,
        ),
        (
            "volumed_volume_refill_bytes_total",
            "Image bytes written or punched by finished re-images.",
            |m| &m.refill_bytes,
        ),
    ];
    for (name, help, counter) in reimage_counters {
        out.family(name, "counter", help);
        for (i, (_, file)) in files.iter().enumerate() {
            let value = counter(&file.metrics).load(Ordering::Relaxed);
            out.sample(name, &volume_labels(i), value);
        }
    }
    out.family(
        "volumed_refill_duration_seconds",
        "histogram",
        "Time from a re-image's acceptance to its outcome, by outcome.",
    );
    for (outcome, label) in [
        (Outcome::Succeeded, "succeeded"),
        (Outcome::Failed, "failed"),
    ] {
        let histogram = &metrics.refill_durations[outcome as usize];
        out.histogram(
            "volumed_refill_duration_seconds",
            &[("outcome", label)],
            histogram,
        );
    }
    out.family(
        "volumed_reimage_failures_total",
        "counter",
        "Failed re-images by the kind of their reason.",
    );
    for (kind, count) in lock(&metrics.failures).iter() {
        out.sample("volumed_reimage_failures_total", &[("reason", kind)], count);
    }

    // Errors.
    out.family(
        "volumed_api_faults_total",
        "counter",
        "Control API responses with an error status, by status and fault name.",
    );
    for (status, count) in lock(&metrics.api_faults).iter() {
        let code = status.to_string();
        let labels = [
            ("status", code.as_str()),
            ("fault", fault_name_for_status(*status)),
        ];
        out.sample("volumed_api_faults_total", &labels, count);
    }
    out.family(
        "volumed_fuse_errors_total",
        "counter",
        "FUSE requests answered with an error, by errno.",
    );
    for (errno, counter) in metrics.fuse_errors.iter().enumerate() {
        let count = counter.load(Ordering::Relaxed);
        if count > 0 {
            let name = errno_name(errno);
            out.sample("volumed_fuse_errors_total", &[("errno", &name)], count);
        }
    }

    // Gauges of the whole daemon.
    out.family("volumed_volumes", "gauge", "Volumes by status.");
    for status in VolumeStatus::ALL {
        let count = volumes.iter().filter(|v| v.status == status).count();
        out.sample("volumed_volumes", &[("status", status.as_str())], count);
    }
    out.family(
        "volumed_reimages_running",
        "gauge",
        "Re-images whose refill is running.",
    );
    let running = files.iter().filter(|(_, f)| f.refill_running()).count();
    out.sample("volumed_reimages_running", &[], running);
    out.family(
        "volumed_event_subscribers",
        "gauge",
        "Clients following GET /v3/events.",
    );
    out.sample("volumed_event_subscribers", &[], event_subscribers);

    out.text
}

/// The text being built, one family after the other.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.text, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0u64;
        let bounds = histogram.bounds.iter().map(|&b| seconds(b));
        let bounds = bounds.chain(std::iter::once("+Inf".to_string()));
        for (count, bound) in histogram.counts.iter().zip(bounds) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = write!(self.text, "{name}_bucket");
            self.labels(labels, Some(&bound));
            let _ = writeln!(self.text, " {cumulative}");
        }
        let sum = histogram.sum_nanos.load(Ordering::Relaxed);
        let _ = write!(self.text, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.text, " {}", seconds(sum));
        let _ = write!(self.text, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.text, " {cumulative}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.text.push('{');
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (key, value)) in all.enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            let _ = write!(self.text, "{key}=\"{}\"", escape_label(value));
        }
        self.text.push('}');
    }
}

/// Nanoseconds as decimal seconds, exactly.
fn seconds(nanos: u64) -> String {
    let text = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A label value as the exposition format wants it between double quotes.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A `# HELP` text: backslashes and line feeds escaped.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The symbolic name of an errno, or its number for rare ones.
fn errno_name(errno: usize) -> String {
    let name = match i32::try_from(errno).unwrap_or(-1) {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EDQUOT => "EDQUOT",
        libc::ENOTCONN => "ENOTCONN",
        _ if errno == ERRNO_SLOTS - 1 => "other",
        _ => return format!("E{errno}"),
    };
    name.to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label("plain-name_1.0"), "plain-name_1.0");
        assert_eq!(escape_label("a\"b"), "a\\\"b");
        assert_eq!(escape_label("a\\b"), "a\\\\b");
        assert_eq!(escape_label("line1\nline2"), "line1\\nline2");
        assert_eq!(
            escape_label("x\"} 1\nforged{y=\"z"),
            "x\\\"} 1\\nforged{y=\\\"z"
        );
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(50_000), "0.00005");
        assert_eq!(seconds(1_000_000_000), "1");
        assert_eq!(seconds(2_500_000_000), "2.5");
        assert_eq!(seconds(3_600_000_000_123), "3600.000000123");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let histogram = Histogram::new(&[1_000, 1_000_000]);
        histogram.observe(Duration::from_nanos(1_000));
        histogram.observe(Duration::from_nanos(1_001));
        histogram.observe(Duration::from_secs(5));
        assert_eq!(histogram.count(), 3);

        let mut out = Exposition::default();
        out.histogram("h", &[("op", "read")], &histogram);
        assert_eq!(
            out.text,
            "h_bucket{op=\"read\",le=\"0.000001\"} 1\n\
             h_bucket{op=\"read\",le=\"0.001\"} 2\n\
             h_bucket{op=\"read\",le=\"+Inf\"} 3\n\
             h_sum{op=\"read\"} 5.000002001\n\
             h_count{op=\"read\"} 3\n"
        );
    }

    #[test]
    fn errno_counters_name_common_errnos_and_clamp_the_rest() {
        let metrics = Metrics::default();
        metrics.count_fuse_error(libc::ENOSPC);
        metrics.count_fuse_error(100_000);
        metrics.count_fuse_error(-1);
        let text = render(&[], &metrics, 0);
        assert!(
            text.contains("volumed_fuse_errors_total{errno=\"ENOSPC\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("volumed_fuse_errors_total{errno=\"other\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let metrics = Metrics::default();
        metrics.count_api_fault(404);
        metrics.count_failure("cancelled");
        let text = render(&[], &metrics, 2);
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| declared.contains(*base))
                .unwrap_or(name);
            assert!(declared.contains(family), "{line}");
        }
        assert!(text.contains("volumed_api_faults_total{status=\"404\",fault=\"itemNotFound\"} 1"));
        assert!(text.contains("volumed_volumes{status=\"available\"} 0"));
        assert!(text.contains("volumed_event_subscribers 2"));
    }
}
