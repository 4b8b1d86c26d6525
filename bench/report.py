#!/usr/bin/env python3
"""Helpers of bench/run.sh: record results as JSON lines, read JSON fields, render the report.

    report.py record RESULTS key=value...   append one result (fio and re-image files are
                                            parsed now, so RESULTS stands on its own)
    report.py get PATH < JSON               print a field (dotted path) of a JSON document
    report.py render RESULTS                print the markdown report
    report.py reimage SOCKET VOLUME IMAGE   re-image VOLUME with IMAGE through volumed's
                                            socket, wait for the end; print the seconds
                                            from the request to the end, then the volume

The re-image is asked for and watched from this one process, and timed from the request it
sends: forking curl for every poll would take a share of the CPU from the re-image it
measures, and the interpreter's own start (slow right after the page cache is dropped) is
no part of the re-image.
"""

import datetime
import http.client
import json
import re
import socket
import sys
import time

MIB = 1 << 20
GIB = 1 << 30

# Re-image methods in report order (see run.sh).
METHODS = ["volumed", "cinder", "fastest", "read", "dd"]

# Jobs in report order: (name, direction, shown metric, description).
JOBS = [
    ("seqread", "read", "bw", "seq read 1 MiB, qd 8"),
    ("seqwrite", "write", "bw", "seq write 1 MiB, qd 8"),
    ("randread", "read", "iops", "rand read 4 KiB, qd 32"),
    ("randwrite", "write", "iops", "rand write 4 KiB, qd 32"),
    ("seqread-verify", "read", "bw", "seq read 1 MiB, qd 8, crc32c verify"),
    ("seqwrite-verify", "write", "bw", "seq write 1 MiB, qd 8, crc32c verify"),
    ("randread-verify", "read", "iops", "rand read 4 KiB, qd 32, crc32c verify"),
    ("randwrite-verify", "write", "iops", "rand write 4 KiB, qd 32, crc32c verify"),
]
PRECONDITION = ("precondition", "write", "bw", "precondition: seq write 1 MiB, qd 8 (info)")
SEQ_JOBS = {"seqread", "seqwrite", "seqread-verify", "seqwrite-verify"}
TARGETS = [
    ("native", "native file"),
    ("volumed", "volumed"),
    ("qsd", "qsd FUSE (default)"),
    ("qsd-direct", "qsd FUSE (cache.direct=on, aio=native)"),
]
VERIFY_LINE = re.compile(r"verify failed|verify: bad|bad magic|verify type mismatch")
EILSEQ = 84


def value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_fio_json(path):
    """fio's JSON output, skipping any warning lines fio writes before it."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None, ""
    # fio's messages share the file and may end without a newline right before the JSON.
    start = re.search(r'\{\s*"fio version"', text)
    if not start:
        return None, text
    try:
        doc, end = json.JSONDecoder().raw_decode(text[start.start():])
    except ValueError:
        return None, text
    return doc, text[: start.start()] + text[start.start() + end:]


def fio_summary(entry):
    doc, stray = load_fio_json(entry["json"])
    try:
        err_text = open(entry["err"], encoding="utf-8", errors="replace").read()
    except OSError:
        err_text = ""
    # fio prints each message to stderr and into its output file: count one copy.
    messages = err_text + stray
    bad_lines = [line for line in messages.splitlines() if VERIFY_LINE.search(line)]
    per_copy = [sum(1 for line in text.splitlines() if VERIFY_LINE.search(line))
                for text in (err_text, stray)]
    out = {"verify_lines": max(per_copy), "first_message": ""}
    if bad_lines:
        out["first_message"] = bad_lines[0].strip()
    elif messages.strip():
        out["first_message"] = messages.strip().splitlines()[0]
    if doc is None or not doc.get("jobs"):
        out["error"] = -1
        return out
    job = doc["jobs"][0]
    out["error"] = job.get("error", 0)
    out["total_err"] = job.get("total_err") or 0
    for direction in ("read", "write"):
        stats = job.get(direction, {})
        out[direction] = {
            "iops": stats.get("iops", 0.0),
            "mibs": stats.get("bw_bytes", 0) / MIB,
            "ios": stats.get("total_ios", 0),
            "runtime_ms": stats.get("runtime", 0),
        }
    verify = out["verify_lines"]
    if out["error"] == EILSEQ:
        verify = max(verify, out["total_err"], 1)
    out["verify_errors"] = verify
    return out


def parse_time(text):
    return datetime.datetime.fromisoformat(text)


def reimage_summary(entry):
    view = json.load(open(entry["view"]))["volume"]
    job = view.get("reimage") or {}
    out = {"state": job.get("state"), "bytes_done": job.get("bytes_done")}
    if job.get("started_at") and job.get("finished_at"):
        span = parse_time(job["finished_at"]) - parse_time(job["started_at"])
        out["api_seconds"] = span.total_seconds()
    samples = []
    for line in open(entry["samples"]):
        line = line.strip()
        if line.isdigit():
            samples.append(int(line))
    out["samples"] = len(samples)
    out["peak_sample_kib"] = max(samples) if samples else 0
    return out


def record(path, pairs):
    entry = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        entry[key] = value(text)
    if entry.get("kind") == "fio":
        entry.update(fio_summary(entry))
    if entry.get("kind") == "reimage" and entry.get("method") == "volumed":
        entry.update(reimage_summary(entry))
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def get(path):
    doc = json.load(sys.stdin)
    for key in path.split("."):
        doc = doc.get(key) if isinstance(doc, dict) else None
    print("" if doc is None else doc)


# ----- rendering ------------------------------------------------------------------------------


def fmt_num(x, digits=0):
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def verdict(ok):
    return "**met**" if ok else "**not met**"


class Report:
    def __init__(self, entries):
        self.entries = entries
        self.machine = next((e for e in entries if e["kind"] == "machine"), {})
        self.fio = {(e["target"], e["job"]): e for e in entries if e["kind"] == "fio"}
        self.reimages = [e for e in entries if e["kind"] == "reimage"]
        self.images = {e["image"]: e for e in entries if e["kind"] == "image"}
        self.imports = {e["image"]: e for e in entries if e["kind"] == "import"}
        self.run = next((e for e in entries if e["kind"] == "run"), {})
        self.lines = []

    def out(self, text=""):
        self.lines.append(text)

    def metric(self, target, job):
        """(iops, MiB/s, failure text) of a job's main direction."""
        name, direction = job[0], job[1]
        e = self.fio.get((target, name))
        if e is None:
            return None, None, "not run"
        if e.get("error", 0) not in (0, EILSEQ):
            return None, None, f"fio error {e['error']}"
        stats = e.get(direction) or {}
        return stats.get("iops"), stats.get("mibs"), None

    def primary(self, target, job):
        iops, mibs, failure = self.metric(target, job)
        if failure:
            return None
        return mibs if job[2] == "bw" else iops

    def render(self):
        m = self.machine
        self.out(f"## volumed benchmark, {m.get('mode', '?')} run of {m.get('date', '?')}")
        self.out()
        self.machine_section()
        self.fio_section()
        self.reimage_section()
        self.targets_section()
        return "\n".join(self.lines) + "\n"

    def machine_section(self):
        m = self.machine
        mem = m.get("memory_kib", 0) / (1 << 20)
        self.out("| machine | |")
        self.out("|---|---|")
        self.out(f"| CPU | {m.get('cores')} x {m.get('cpu')} |")
        self.out(f"| memory | {mem:.1f} GiB |")
        self.out(f"| kernel | {m.get('kernel')} (fuse max_pages_limit {m.get('fuse_max_pages')}) |")
        self.out(f"| work directory file system | {m.get('filesystem')} |")
        self.out(f"| fio | {m.get('fio_version')} |")
        self.out(f"| qemu | {m.get('qemu_version')} |")
        self.out(f"| volumed | {m.get('volumed_commit')} (release build, default config) |")
        loads = [e["load"] for e in self.entries if isinstance(e.get("load"), (int, float))]
        if loads:
            self.out(f"| load average (1 min) during the run | {min(loads):.2f} to "
                     f"{max(loads):.2f} (anything well above 0 means other work competed) |")
        run_seconds = self.run.get("seconds")
        if run_seconds:
            self.out(f"| duration of the run | {run_seconds / 60:.1f} min |")
        self.out()

    def fio_section(self):
        if not self.fio:
            self.out("### fio: not run (`--reimage-only`)")
            self.out()
            return
        m = self.machine
        size = m.get("fio_size", 0) / MIB
        self.out(
            f"### fio (libaio, O_DIRECT, one {size:.0f} MiB file per target, "
            f"{m.get('fio_runtime')} s time-based jobs; page cache dropped before each job)"
        )
        self.out()
        self.out(
            "Each cell: IOPS / MiB/s. Verify reads check the precondition's crc32c headers "
            "(one pass or the runtime); verify writes write "
            "the whole file (seq) or a quarter of it (rand) and then read it all back "
            "(the write phase is shown)."
        )
        self.out()
        head = "| job | " + " | ".join(label for _, label in TARGETS)
        head += " | volumed / native | volumed / qsd | volumed / qsd direct |"
        self.out(head)
        self.out("|---" * (len(TARGETS) + 4) + "|")
        for job in JOBS + [PRECONDITION]:
            cells = []
            for target, _ in TARGETS:
                iops, mibs, failure = self.metric(target, job)
                e = self.fio.get((target, job[0]), {})
                if failure:
                    cells.append(failure)
                    continue
                text = f"{fmt_num(iops)} / {fmt_num(mibs, 1)}"
                if e.get("verify_errors"):
                    text += f" (**{e['verify_errors']} verify errors**)"
                cells.append(text)
            vol = self.primary("volumed", job)
            ratios = [fmt_ratio(ratio(vol, self.primary(t, job)))
                      for t in ("native", "qsd", "qsd-direct")]
            self.out(f"| {job[3]} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        self.out()

        self.out("Verify errors (blocks whose crc32c or header did not match, all verify jobs):")
        self.out()
        self.out("| target | verify errors | first message |")
        self.out("|---|---|---|")
        for target, label in TARGETS:
            total, first = self.verify_errors(target)
            shown = first.replace("|", "\\|") if first else ""
            self.out(f"| {label} | {total} | {shown} |")
        self.out()

    def verify_errors(self, target):
        total, first = 0, ""
        for job in JOBS:
            e = self.fio.get((target, job[0]))
            if not e or "verify" not in job[0]:
                continue
            total += e.get("verify_errors", 0)
            if e.get("verify_errors") and not first:
                first = f"{job[0]}: {e.get('first_message', '')}"
        return total, first

    def best(self, image, method):
        times = [e["seconds"] for e in self.reimages
                 if e["image"] == image and e["method"] == method]
        return (min(times), times) if times else (None, [])

    def reimage_section(self):
        m = self.machine
        vol_gib = m.get("volume_size", 0) / GIB
        self.out(
            f"### Re-image onto a {vol_gib:.0f} GiB volume full of old data "
            "(page cache dropped before each measurement)"
        )
        self.out()
        self.out("| image | format | file MiB | allocated MiB | virtual MiB | data MiB "
                 "| upload to volumed (not timed below) |")
        self.out("|---|---|---|---|---|---|---|")
        for image, info in self.images.items():
            imp = self.imports.get(image)
            upload = "n/a"
            if imp:
                rate = imp["bytes"] / MIB / imp["seconds"]
                upload = f"{imp['seconds']:.1f} s ({rate:.0f} MiB/s)"
            self.out(
                f"| {image} | {info.get('format', 'raw')} | {info['bytes'] / MIB:.0f} "
                f"| {info.get('allocated', info['bytes']) / MIB:.0f} "
                f"| {info.get('virtual', info['bytes']) / MIB:.0f} "
                f"| {info['data'] / MIB:.0f} | {upload} |"
            )
        self.out()
        self.out("Methods: **volumed**: `POST os-reimage` until `reimage.state` is not "
                 "`running`; **Cinder**: `qemu-img convert -n -O raw -S 0 -t none` + fsync; "
                 "**fastest qemu-img**: `fallocate -p` of the target + `qemu-img convert -n "
                 "--target-is-zero -t none` + fsync; **read**: `cat` of the image file; "
                 "**dd**: `dd bs=16M conv=fsync,notrunc` of the image's raw equivalent into "
                 "punched space (the disk's write rate for those bytes). Seconds (best of the "
                 "rounds; all rounds in brackets), and MiB/s of the image's data for volumed.")
        self.out()
        self.out("| image | volumed s | volumed MiB/s of data | Cinder s | fastest qemu-img s "
                 "| read s | dd s | volumed vs Cinder | vs fastest | vs dd |")
        self.out("|---|---|---|---|---|---|---|---|---|---|")
        for image, info in self.images.items():
            cells = []
            for method in METHODS:
                t, times = self.best(image, method)
                if t is None:
                    cells.append("n/a")
                    continue
                shown = f"{t:.2f}"
                if len(times) > 1:
                    shown += " (" + ", ".join(f"{x:.2f}" for x in times) + ")"
                cells.append(shown)
                if method == "volumed":
                    cells.append(f"{info['data'] / MIB / t:.0f}")
            v, _ = self.best(image, "volumed")
            ratios = [fmt_ratio(ratio(self.best(image, other)[0], v))
                      for other in ("cinder", "fastest", "dd")]
            self.out(f"| {image} | " + " | ".join(cells + ratios) + " |")
        self.out()
        self.out("Ratios are speed-ups: the other method's time over volumed's (above 1.00x, "
                 "volumed is faster).")
        self.out()

        vols = [e for e in self.reimages if e["method"] == "volumed"]
        if vols:
            self.out("volumed's own view of each re-image, and its memory (VmRSS sampled every "
                     "50 ms; VmHWM reset with clear_refs before the request):")
            self.out()
            self.out("| image | round | wall s | started_at..finished_at s | idle RSS MiB "
                     "| peak RSS MiB (samples) | VmHWM MiB | peak - idle MiB |")
            self.out("|---|---|---|---|---|---|---|---|")
            for e in vols:
                idle = e["idle_rss_kib"] / 1024
                peak = max(e["peak_sample_kib"], e["hwm_kib"]) / 1024
                api_s = e.get("api_seconds")
                self.out(
                    f"| {e['image']} | {e['round']} | {e['seconds']:.2f} | "
                    f"{'n/a' if api_s is None else f'{api_s:.2f}'} | {idle:.1f} | "
                    f"{e['peak_sample_kib'] / 1024:.1f} ({e['samples']}) | "
                    f"{e['hwm_kib'] / 1024:.1f} | {peak - idle:.1f} |"
                )
            self.out()

    def targets_section(self):
        self.out("### Targets of the issues")
        self.out()
        self.out("| target | measured | verdict |")
        self.out("|---|---|---|")
        if self.fio:
            self.fio_targets()
        else:
            self.out("| (fio targets) | not run | |")
        self.reimage_targets()
        self.out()

    def fio_targets(self):
        worst_qsd = []
        for job in JOBS:
            vol = self.primary("volumed", job)
            for t in ("qsd", "qsd-direct"):
                worst_qsd.append((ratio(vol, self.primary(t, job)), job[0], t))
        known = [w for w in worst_qsd if w[0] is not None]
        low = [w for w in known if w[0] < 1.5]
        text = ", ".join(f"{j} vs {t} {fmt_ratio(r)}" for r, j, t in sorted(low)) or "none below"
        lowest = min(known)[0] if known else None
        self.out(f"| every fio job >= 1.5x qemu-storage-daemon (both configs) | lowest "
                 f"{fmt_ratio(lowest)}; below 1.5x: {text} | "
                 f"{verdict(len(known) == len(worst_qsd) and not low)} |")

        seq = [(ratio(self.primary('volumed', j), self.primary('native', j)), j[0])
               for j in JOBS if j[0] in SEQ_JOBS]
        seq_known = [s for s in seq if s[0] is not None]
        seq_low = [s for s in seq_known if s[0] < 0.7]
        shown = ", ".join(f"{j} {fmt_ratio(r)}" for r, j in seq)
        self.out(f"| sequential I/O >= 0.7x native | {shown} | "
                 f"{verdict(len(seq_known) == len(seq) and not seq_low)} |")

        errors, _ = self.verify_errors("volumed")
        failed = [j[0] for j in JOBS if self.metric("volumed", j)[2]]
        text = f"{errors} verify errors" + (f"; failed jobs: {', '.join(failed)}" if failed else "")
        ok = errors == 0 and not failed
        self.out(f"| zero verify errors on volumed | {text} | {verdict(ok)} |")
        qsd_errors = {t: self.verify_errors(t)[0] for t in ("qsd", "qsd-direct")}
        self.out(f"| (for reference) verify errors of qsd | default {qsd_errors['qsd']}, "
                 f"direct {qsd_errors['qsd-direct']} | |")


    def reimage_targets(self):
        for image in ("dense", "dense-qcow2"):
            v, _ = self.best(image, "volumed")
            dd, _ = self.best(image, "dd")
            r = ratio(dd, v)
            self.out(f"| {image}: re-image >= 0.9x the disk's write rate (dd) | {fmt_ratio(r)} "
                     f"({fmt_num(v, 2)} s vs dd {fmt_num(dd, 2)} s) | "
                     f"{verdict(r is not None and r >= 0.9)} |")

        dense_v, _ = self.best("dense", "volumed")
        dense_data = self.images.get("dense", {}).get("data", 0)
        for image in ("sparse", "sparse-qcow2"):
            v, _ = self.best(image, "volumed")
            info = self.images.get(image, {})
            if v and dense_v and dense_data and info:
                prop = v / (dense_v * info["data"] / dense_data)
                self.out(
                    f"| {image}: re-image in time proportional to its data | {v:.2f} s for "
                    f"{info['data'] / MIB:.0f} MiB of data: {prop:.2f}x the dense raw "
                    f"re-image's time per byte (1.00x = proportional; by virtual size it would "
                    f"be {info['virtual'] / dense_data:.2f}x) | {verdict(prop <= 1.25)} |"
                )
            cinder, _ = self.best(image, "cinder")
            r = ratio(cinder, v)
            self.out(f"| {image}: re-image >= 3x faster than Cinder's copy | {fmt_ratio(r)} "
                     f"({fmt_num(v, 2)} s vs {fmt_num(cinder, 2)} s) | "
                     f"{verdict(r is not None and r >= 3)} |")

        v, _ = self.best("compressed-qcow2", "volumed")
        cinder, _ = self.best("compressed-qcow2", "cinder")
        r = ratio(cinder, v)
        self.out(f"| compressed-qcow2: re-image >= 1.5x faster than Cinder's copy | "
                 f"{fmt_ratio(r)} ({fmt_num(v, 2)} s vs {fmt_num(cinder, 2)} s) | "
                 f"{verdict(r is not None and r >= 1.5)} |")

        for image in self.images:
            v, _ = self.best(image, "volumed")
            f, _ = self.best(image, "fastest")
            r = ratio(f, v)
            self.out(f"| {image}: never slower than the fastest correct qemu-img way | "
                     f"{fmt_ratio(r)} ({fmt_num(v, 2)} s vs {fmt_num(f, 2)} s) | "
                     f"{verdict(r is not None and r >= 1.0)} |")

        vols = [e for e in self.reimages if e["method"] == "volumed"]
        if vols:
            deltas = [(max(e["peak_sample_kib"], e["hwm_kib"]) - e["idle_rss_kib"]) / 1024
                      for e in vols]
            worst = max(deltas)
            self.out(f"| peak RSS during a re-image < 64 MiB above idle | {worst:.1f} MiB "
                     f"(worst re-image) | {verdict(worst < 64)} |")


class UnixConnection(http.client.HTTPConnection):
    """An HTTP connection to a Unix socket."""

    def __init__(self, path):
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def api(conn, method, path, body=None):
    headers = {"OpenStack-API-Version": "volume 3.68", "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    response = conn.getresponse()
    return response.status, response.read().decode()


def reimage(socket_path, volume, image_id, poll=0.02, limit=1800):
    conn = UnixConnection(socket_path)
    conn.connect()
    body = {"os-reimage": {"image_id": image_id, "reimage_reserved": False}}
    started = time.monotonic()
    status, text = api(conn, "POST", f"/v3/volumes/{volume}/action", body)
    if status != 202:
        sys.exit(f"POST os-reimage answered {status}: {text}")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status, text = api(conn, "GET", f"/v3/volumes/{volume}")
        if status != 200:
            sys.exit(f"GET /v3/volumes/{volume} answered {status}: {text}")
        if json.loads(text)["volume"].get("reimage", {}).get("state") != "running":
            print(time.monotonic() - started)
            print(text)
            return
        time.sleep(poll)
    sys.exit(f"the re-image did not finish within {limit} s")


def render(path):
    entries = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    sys.stdout.write(Report(entries).render())


def main(argv):
    if len(argv) >= 3 and argv[1] == "record":
        record(argv[2], argv[3:])
    elif len(argv) == 3 and argv[1] == "get":
        get(argv[2])
    elif len(argv) == 3 and argv[1] == "render":
        render(argv[2])
    elif len(argv) == 5 and argv[1] == "reimage":
        reimage(argv[2], argv[3], argv[4])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
