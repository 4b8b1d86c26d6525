#!/usr/bin/env bash
# The volumed benchmark: fio on a volume against the native file and qemu-storage-daemon's
# FUSE export, and a re-image against qemu-img and dd, in one run on the same file system.
#
#   sudo bench/run.sh [--quick]
#
# --quick       short fio jobs and small files: checks that the script works (a few minutes).
# --reimage-only  skip the fio part: only the re-image comparison.
# BENCH_DIR     where the work directory is created (default /var/tmp/volumed-bench); every
#               file of the run lives there, so that is the file system measured.
# VOLUMED       a volumed binary to use instead of building one with `cargo build --release`;
#               VOLUMED_LABEL says in the report what it is (default: its path and sha256).
# BENCH_REPEAT  rounds of the re-image comparison (default 1); the report keeps the best.
# BENCH_KEEP=1  keep the work directory's logs and raw results (not its big files).
#
# Needs root (FUSE mounts, dropping the page cache), fio, qemu-storage-daemon and qemu-img
# (Debian: fio, qemu-utils), curl, python3 and fallocate. The markdown report goes to stdout
# and to bench/results-<date>.md; progress goes to stderr. Everything the script starts (volumed,
# qemu-storage-daemon, the memory sampler) is stopped by its pid and every mount it made is
# undone, also when it fails or is interrupted; then the work directory is removed.

set -euo pipefail
# Job control: each background job gets its own process group, so the cleanup can stop a
# running step (a pipeline included) by its pid without touching anything else.
set -m

BENCH_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_SRC/.." && pwd)

usage() {
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

QUICK=0
FIO=1
for arg in "$@"; do
    case "$arg" in
    --quick) QUICK=1 ;;
    --reimage-only) FIO=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

GIB=$((1 << 30))
MIB=$((1 << 20))
if [ "$QUICK" = 1 ]; then
    MODE=quick
    FIO_RUNTIME=3                 # seconds per time-based job
    FIO_SIZE=$((256 * MIB))       # each fio target file
    VOLUME_GIB=1                  # the re-imaged volume and qemu-img's target
    DENSE_SIZE=$((256 * MIB))
    SPARSE_CHUNKS=16
    SPARSE_CHUNK=$((8 * MIB))     # 128 MiB of data in a 1 GiB sparse image
else
    MODE=full
    FIO_RUNTIME=10
    FIO_SIZE=$((2 * GIB))
    VOLUME_GIB=8
    DENSE_SIZE=$((2 * GIB))
    SPARSE_CHUNKS=64
    SPARSE_CHUNK=$((16 * MIB))    # 1 GiB of data in an 8 GiB sparse image
fi
VOLUME_SIZE=$((VOLUME_GIB * GIB))
SPARSE_SIZE=$VOLUME_SIZE
REPEAT=${BENCH_REPEAT:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp/volumed-bench}

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ----- what the script started, for the cleanup ---------------------------------------------

WORK=""
CREATED_BENCH_DIR=0
VOLUMED_PID=""
declare -A QSD_PIDS=()      # mount file -> pid
SAMPLER_PID=""
STEP_PID=""                 # the step running now (see `step`)

is_mounted() {
    # /proc/self/mountinfo escapes spaces as \040; our paths have none (checked below).
    awk -v p="$1" '$5 == p { found = 1 } END { exit !found }' /proc/self/mountinfo
}

unmount() {
    local target=$1
    if is_mounted "$target"; then
        umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
    fi
}

# Sends SIGTERM to `pid`, waits up to `grace` seconds, then SIGKILL.
stop_pid() {
    local pid=$1 grace=$2 waited=0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt $((grace * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop within ${grace}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

stop_sampler() {
    if [ -n "$SAMPLER_PID" ]; then
        stop_pid "$SAMPLER_PID" 2
        SAMPLER_PID=""
    fi
}

stop_volumed() {
    if [ -n "$VOLUMED_PID" ]; then
        stop_pid "$VOLUMED_PID" 120
        VOLUMED_PID=""
    fi
    [ -n "$WORK" ] && unmount "$WORK/volumed/mnt"
    return 0
}

stop_qsd() {
    local mnt=$1
    if [ -n "${QSD_PIDS[$mnt]:-}" ]; then
        stop_pid "${QSD_PIDS[$mnt]}" 30
        unset "QSD_PIDS[$mnt]"
    fi
    unmount "$mnt"
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$STEP_PID" ]; then
        kill -TERM -- "-$STEP_PID" 2>/dev/null
        wait "$STEP_PID" 2>/dev/null
    fi
    stop_sampler
    stop_volumed
    for mnt in "${!QSD_PIDS[@]}"; do
        stop_qsd "$mnt"
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if awk -v w="$WORK/" 'index($5, w) == 1 { found = 1 } END { exit !found }' \
            /proc/self/mountinfo; then
            log "something is still mounted under $WORK; leaving it in place"
        elif [ "${BENCH_KEEP:-0}" = 1 ]; then
            rm -rf "$WORK/images" "$WORK/volumed/state" "$WORK"/*.img "$WORK"/*.raw
            log "kept the logs and raw results in $WORK (BENCH_KEEP=1)"
        else
            rm -rf "$WORK"
            [ "$CREATED_BENCH_DIR" = 1 ] && rmdir "$BENCH_DIR" 2>/dev/null
        fi
    fi
    [ "$status" != 0 ] && log "failed (exit $status); everything started was stopped"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ----- checks and setup ---------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "run as root (sudo $0): FUSE mounts and dropping the page cache need it"
[ -e /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"
for tool in fio qemu-storage-daemon qemu-img curl python3 fallocate timeout findmnt base64; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "needs $tool (Debian: apt-get install fio qemu-utils curl python3 util-linux)"
done

if [ ! -d "$BENCH_DIR" ]; then
    mkdir -p "$BENCH_DIR"
    CREATED_BENCH_DIR=1
fi
WORK=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
case "$WORK" in *[[:space:]]*) die "BENCH_DIR must not contain spaces: $BENCH_DIR" ;; esac
mkdir -p "$WORK/fio" "$WORK/volumed/mnt" "$WORK/images"
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
log "mode $MODE, work directory $WORK"

# Space: fio files, the images (dense, compressible and their qcow2 copies; the sparse ones
# hold their data only), volumed's stored copies, the volume and qemu-img's target.
need=$(((4 * FIO * FIO_SIZE + 8 * DENSE_SIZE + 4 * SPARSE_CHUNKS * SPARSE_CHUNK
    + 2 * VOLUME_SIZE) / GIB + 2))
avail=$(($(df --output=avail -B1 "$WORK" | tail -n 1) / GIB))
[ "$avail" -ge "$need" ] || die "$WORK has ${avail} GiB free; this mode needs about ${need} GiB"

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Appends one JSON object (from key=value pairs; numbers stay numbers) to the results.
# Each result carries the 1-minute load average: other work on the machine skews figures.
record() {
    python3 "$BENCH_SRC/report.py" record "$RESULTS" "$@" load="$(cut -d ' ' -f 1 /proc/loadavg)"
}

now() { printf '%s' "$EPOCHREALTIME"; }
since() { python3 -c "print($(now) - $1)"; }

# step COMMAND...: runs a long step as a background job and waits for it, so that Ctrl-C or
# SIGTERM reaches the cleanup at once (bash defers traps until a foreground child ends).
step() {
    local rc=0
    "$@" &
    STEP_PID=$!
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    return "$rc"
}

# ----- volumed ------------------------------------------------------------------------------

build_as_self() { cd "$REPO" && cargo build --release --quiet; }

if [ -n "${VOLUMED:-}" ]; then
    [ -x "$VOLUMED" ] || die "VOLUMED=$VOLUMED is not an executable"
    cp "$VOLUMED" "$WORK/volumed/volumed"
else
    log "building volumed (cargo build --release)"
    if command -v cargo >/dev/null 2>&1; then
        step build_as_self >&2 || die "cargo build --release failed"
    elif [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        # sudo's PATH rarely has ~/.cargo/bin: build as the invoking user, in a login shell.
        step runuser -u "$SUDO_USER" -- bash -lc "cd '$REPO' && cargo build --release --quiet" \
            >&2 || die "cargo build --release (as $SUDO_USER) failed"
    else
        die "cargo is not on PATH; build first and pass VOLUMED=path/to/volumed"
    fi
    # A copy: the binary measured stays the same even if the tree is rebuilt meanwhile.
    cp "$REPO/target/release/volumed" "$WORK/volumed/volumed"
fi

VD="$WORK/volumed"
cat >"$VD/daemon.toml" <<EOF
mountpoint = "$VD/mnt"
socket = "$VD/volumed.sock"
state_dir = "$VD/state"
socket_mode = "0600"
log_level = "info"
EOF

start_volumed() {
    "$VD/volumed" --config "$VD/daemon.toml" >>"$VD/volumed.log" 2>&1 &
    VOLUMED_PID=$!
    local tries=0
    until [ -S "$VD/volumed.sock" ] && [ -e "$VD/mnt/.control" ]; do
        kill -0 "$VOLUMED_PID" 2>/dev/null ||
            die "volumed exited at start; its log:$(printf '\n'; tail -n 20 "$VD/volumed.log")"
        tries=$((tries + 1))
        [ "$tries" -lt 200 ] || die "volumed did not become ready in 20 s"
        sleep 0.1
    done
    log "volumed running (pid $VOLUMED_PID)"
}

# api METHOD PATH [JSON]: prints the body, then a last line with the HTTP status.
api() {
    local method=$1 path=$2 body=${3:-}
    local args=(-sS --unix-socket "$VD/volumed.sock" -X "$method" -w '\n%{http_code}'
        -H 'OpenStack-API-Version: volume 3.68' -H 'Content-Type: application/json')
    [ -n "$body" ] && args+=(-d "$body")
    curl "${args[@]}" "http://localhost$path"
}

# api_ok METHOD PATH JSON EXPECTED_STATUS: prints the body; dies on another status.
api_ok() {
    local out status
    out=$(api "$1" "$2" "${3:-}")
    status=${out##*$'\n'}
    [ "$status" = "$4" ] || die "$1 $2 answered $status, expected $4: ${out%$'\n'*}"
    printf '%s' "${out%$'\n'*}"
}

json_get() { python3 "$BENCH_SRC/report.py" get "$1"; }

create_volume() {
    local name=$1 gib=$2 tries=0
    api_ok POST /v3/volumes "{\"volume\": {\"name\": \"$name\", \"size\": $gib}}" 202 >/dev/null
    until [ "$(api_ok GET "/v3/volumes/$name" "" 200 | json_get volume.status)" = available ]; do
        tries=$((tries + 1))
        [ "$tries" -lt 600 ] || die "volume $name did not become available"
        sleep 0.1
    done
    [ -e "$VD/mnt/$name" ] || die "volume $name has no file in the mount"
}

# import_image NAME FILE FORMAT: creates an image, uploads FILE, writes its id to NAME.id.
import_image() {
    local name=$1 file=$2 format=$3 id status started
    id=$(api_ok POST /v2/images \
        "{\"name\": \"$name\", \"disk_format\": \"$format\", \"container_format\": \"bare\"}" \
        201 | json_get id)
    started=$(now)
    status=$(curl -sS --unix-socket "$VD/volumed.sock" -o /dev/null -w '%{http_code}' \
        -H 'Content-Type: application/octet-stream' -H 'Expect:' -T "$file" \
        "http://localhost/v2/images/$id/file")
    [ "$status" = 204 ] || die "upload of $file answered $status"
    record kind=import image="$name" seconds="$(since "$started")" \
        bytes="$(stat -c %s "$file")"
    printf '%s' "$id" >"$WORK/images/$name.id"
}

# ----- qemu-storage-daemon ------------------------------------------------------------------

# start_qsd MOUNTFILE BACKING EXTRA_FILE_OPTIONS
start_qsd() {
    local mnt=$1 backing=$2 opts=$3 tries=0
    : >"$mnt"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$backing$opts" \
        --export "type=fuse,id=e,node-name=f,mountpoint=$mnt,writable=on" \
        >>"$mnt.log" 2>&1 &
    QSD_PIDS[$mnt]=$!
    until is_mounted "$mnt"; do
        kill -0 "${QSD_PIDS[$mnt]}" 2>/dev/null ||
            die "qemu-storage-daemon exited at start: $(tail -n 5 "$mnt.log")"
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || die "qemu-storage-daemon did not mount $mnt in 10 s"
        sleep 0.1
    done
    log "qemu-storage-daemon exporting $backing at $mnt (pid ${QSD_PIDS[$mnt]})"
}

# ----- part 1: fio --------------------------------------------------------------------------

FIO_COMMON=(--ioengine=libaio --direct=1 --size="$FIO_SIZE" --verify_state_save=0
    --randrepeat=0 --output-format=json)
SEQ=(--bs=1M --iodepth=8)
RAND=(--bs=4k --iodepth=32)
TIMED=(--time_based --runtime="$FIO_RUNTIME")
# Reads verify the headers the precondition wrote (one per 4 KiB, so both block sizes can
# check them) and count every bad block; a verify read runs one pass or the runtime.
VERIFY_READ=(--verify=crc32c --verify_interval=4k --continue_on_error=verify
    --runtime="$FIO_RUNTIME")
# Writes write a fixed amount, then read it all back (a time-based write never verifies).
VERIFY_WRITE=(--verify=crc32c --do_verify=1 --verify_fatal=1)

declare -A TARGET_FILE=()
TARGETS=(native volumed qsd qsd-direct)

# fio_job FILE JOB OUTPUT_BASE ARGS...: one fio run in the fio directory (its state files stay
# there), output in OUTPUT_BASE.json and .err. --foreground keeps fio in the step's process
# group, where the cleanup finds it.
fio_job() {
    local file=$1 job=$2 base=$3
    shift 3
    cd "$WORK/fio"
    exec 2>"$base.err"
    timeout --foreground -k 10 900 fio --name="$job" --filename="$file" "${FIO_COMMON[@]}" \
        "$@" --output="$base.json"
}

# run_fio TARGET JOB ARGS...: one fio job from a cold page cache; a failure is a result.
run_fio() {
    local target=$1 job=$2
    shift 2
    local base="$WORK/fio/$target.$job" rc=0
    drop_caches
    step fio_job "${TARGET_FILE[$target]}" "$job" "$base" "$@" || rc=$?
    record kind=fio target="$target" job="$job" rc="$rc" json="$base.json" err="$base.err"
    if [ "$rc" != 0 ]; then
        log "fio $job on $target exited $rc: $(grep -m 1 -i -e verify -e error "$base.err" || true)"
    fi
}

fio_part() {
    TARGET_FILE[native]="$WORK/native.img"
    TARGET_FILE[volumed]="$VD/mnt/fio"
    TARGET_FILE[qsd]="$WORK/qsd.mnt"
    TARGET_FILE[qsd-direct]="$WORK/qsd-direct.mnt"

    truncate -s "$FIO_SIZE" "$WORK/native.img" "$WORK/qsd.img" "$WORK/qsd-direct.img"
    create_volume fio $(((FIO_SIZE + GIB - 1) / GIB))
    start_qsd "$WORK/qsd.mnt" "$WORK/qsd.img" ""
    start_qsd "$WORK/qsd-direct.mnt" "$WORK/qsd-direct.img" ",cache.direct=on,aio=native"

    local target job
    for target in "${TARGETS[@]}"; do
        log "fio: preconditioning $target (writing all of it with verify headers)"
        run_fio "$target" precondition --rw=write "${SEQ[@]}" --verify=crc32c \
            --verify_interval=4k --do_verify=0
    done

    # Each job on every target in turn, so drifting disk speed hits all targets alike. Reads
    # first: they rely on the precondition's headers, which the write jobs overwrite.
    local jobs=(seqread randread seqread-verify randread-verify
        seqwrite randwrite seqwrite-verify randwrite-verify)
    for job in "${jobs[@]}"; do
        for target in "${TARGETS[@]}"; do
            log "fio: $job on $target"
            case "$job" in
            seqread) run_fio "$target" "$job" --rw=read "${SEQ[@]}" "${TIMED[@]}" ;;
            randread) run_fio "$target" "$job" --rw=randread "${RAND[@]}" "${TIMED[@]}" ;;
            seqwrite) run_fio "$target" "$job" --rw=write "${SEQ[@]}" "${TIMED[@]}" ;;
            randwrite) run_fio "$target" "$job" --rw=randwrite "${RAND[@]}" "${TIMED[@]}" ;;
            seqread-verify) run_fio "$target" "$job" --rw=read "${SEQ[@]}" "${VERIFY_READ[@]}" ;;
            randread-verify)
                run_fio "$target" "$job" --rw=randread "${RAND[@]}" "${VERIFY_READ[@]}"
                ;;
            seqwrite-verify)
                run_fio "$target" "$job" --rw=write "${SEQ[@]}" "${VERIFY_WRITE[@]}"
                ;;
            randwrite-verify)
                # A quarter of the file in random 4 KiB writes, then all of it read back.
                run_fio "$target" "$job" --rw=randwrite "${RAND[@]}" "${VERIFY_WRITE[@]}" \
                    --io_size=$((FIO_SIZE / 4))
                ;;
            esac
        done
    done

    # Free the space for the re-image part.
    stop_qsd "$WORK/qsd.mnt"
    stop_qsd "$WORK/qsd-direct.mnt"
    api_ok DELETE /v3/volumes/fio "" 202 >/dev/null
    rm -f "$WORK/native.img" "$WORK/qsd.img" "$WORK/qsd-direct.img"
}

# ----- part 2: re-image ---------------------------------------------------------------------

# Old content: a non-zero pattern over the whole file, written and synced.
fill_old() {
    local file=$1 size=$2
    # tr ends with SIGPIPE when dd has enough; that is not a failure.
    { tr '\000' '\252' </dev/zero 2>/dev/null || true; } |
        dd of="$file" bs=16M count=$((size / (16 * MIB))) iflag=fullblock oflag=direct \
            conv=notrunc status=none
    sync "$file"
}

# The images: three raw ones (dense random data, sparse, compressible text) and a qcow2 copy
# of each (the compressible one with compressed clusters). IMAGES lists them in run order;
# FORMAT and RAW_OF give each one's format and its raw equivalent (what `dd` copies).
IMAGES=(dense sparse compressible dense-qcow2 sparse-qcow2 compressed-qcow2)
declare -A FORMAT=([dense]=raw [sparse]=raw [compressible]=raw
    [dense-qcow2]=qcow2 [sparse-qcow2]=qcow2 [compressed-qcow2]=qcow2)
declare -A RAW_OF=([dense]=dense [sparse]=sparse [compressible]=compressible
    [dense-qcow2]=dense [sparse-qcow2]=sparse [compressed-qcow2]=compressible)

image_file() {
    case "${FORMAT[$1]}" in
    raw) printf '%s' "$WORK/images/$1.raw" ;;
    *) printf '%s' "$WORK/images/$1.qcow2" ;;
    esac
}

make_images() {
    local dir="$WORK/images"
    log "images: dense $((DENSE_SIZE / MIB)) MiB of random data"
    head -c "$DENSE_SIZE" /dev/urandom >"$dir/dense.raw"
    log "images: sparse $((SPARSE_SIZE / MIB)) MiB with $SPARSE_CHUNKS chunks of" \
        "$((SPARSE_CHUNK / MIB)) MiB of random data"
    truncate -s "$SPARSE_SIZE" "$dir/sparse.raw"
    local stride=$((SPARSE_SIZE / SPARSE_CHUNKS)) i
    for ((i = 0; i < SPARSE_CHUNKS; i++)); do
        head -c "$SPARSE_CHUNK" /dev/urandom |
            dd of="$dir/sparse.raw" bs=1M seek=$((i * stride / MIB)) conv=notrunc \
                status=none iflag=fullblock
    done
    # Text compresses about as well as a cloud image's files do (deflate: ~0.75 here).
    log "images: compressible $((DENSE_SIZE / MIB)) MiB of base64 text"
    { base64 -w 0 </dev/urandom 2>/dev/null || true; } | head -c "$DENSE_SIZE" >"$dir/compressible.raw"

    log "images: qcow2 copies (qemu-img convert; -c for the compressed one)"
    qemu-img convert -f raw -O qcow2 "$dir/dense.raw" "$dir/dense-qcow2.qcow2"
    qemu-img convert -f raw -O qcow2 "$dir/sparse.raw" "$dir/sparse-qcow2.qcow2"
    qemu-img convert -c -f raw -O qcow2 "$dir/compressible.raw" "$dir/compressed-qcow2.qcow2"
    sync

    local image data file
    for image in "${IMAGES[@]}"; do
        file=$(image_file "$image")
        case "${RAW_OF[$image]}" in
        sparse) data=$((SPARSE_CHUNKS * SPARSE_CHUNK)) ;;
        *) data=$DENSE_SIZE ;;
        esac
        record kind=image image="$image" format="${FORMAT[$image]}" bytes="$(stat -c %s "$file")" \
            virtual="$(stat -c %s "$dir/${RAW_OF[$image]}.raw")" data="$data" \
            allocated=$(($(stat -c %b "$file") * 512))
    done
}

# Samples the daemon's resident memory every 50 ms into FILE (KiB per line).
start_sampler() {
    local file=$1 pid=$VOLUMED_PID
    (
        trap 'exit 0' TERM # a normal end, not a job killed by a signal
        while [ -e "/proc/$pid/status" ]; do
            while read -r key value _; do
                if [ "$key" = VmRSS: ]; then echo "$value"; fi
            done <"/proc/$pid/status"
            sleep 0.05
        done
    ) >"$file" 2>/dev/null &
    SAMPLER_PID=$!
}

status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

reimage_volumed() {
    local image=$1 image_id=$2 round=$3
    local vol="$VD/mnt/reimage" samples="$WORK/rss.$image.$round" view
    local seconds out

    log "re-image ($image, round $round): filling the volume with old data"
    step fill_old "$vol" "$VOLUME_SIZE"
    drop_caches

    local idle hwm
    idle=$(status_kib "$VOLUMED_PID" VmRSS)
    echo 5 >"/proc/$VOLUMED_PID/clear_refs" # VmHWM := VmRSS
    start_sampler "$samples"

    log "re-image ($image, round $round): volumed"
    out=$(python3 "$BENCH_SRC/report.py" reimage "$VD/volumed.sock" reimage "$image_id") ||
        die "the re-image with $image could not be followed"
    seconds=${out%%$'\n'*}
    out=${out#*$'\n'}
    hwm=$(status_kib "$VOLUMED_PID" VmHWM)
    stop_sampler

    view="$WORK/reimage.$image.$round.json"
    printf '%s' "$out" >"$view"
    [ "$(json_get volume.reimage.state <<<"$out")" = succeeded ] ||
        die "the re-image with $image failed: $(json_get volume.reimage.message <<<"$out")"
    record kind=reimage image="$image" method=volumed round="$round" \
        seconds="$seconds" view="$view" idle_rss_kib="$idle" hwm_kib="$hwm" samples="$samples"
}

# timed IMAGE METHOD ROUND COMMAND...: times COMMAND from a cold page cache.
timed() {
    local image=$1 method=$2 round=$3 started seconds
    shift 3
    drop_caches
    log "re-image ($image, round $round): $method"
    started=$(now)
    step "$@" || die "$method failed: $*"
    seconds=$(since "$started")
    record kind=reimage image="$image" method="$method" round="$round" seconds="$seconds"
}

# cinder_copy FORMAT IMAGE TARGET
cinder_copy() {
    timeout --foreground 3600 qemu-img convert -n -f "$1" -O raw -S 0 -t none "$2" "$3" &&
        sync "$3"
}

# fastest_qemu_img FORMAT IMAGE TARGET
fastest_qemu_img() {
    fallocate -p -o 0 -l "$VOLUME_SIZE" "$3" &&
        timeout --foreground 3600 \
            qemu-img convert -n --target-is-zero -f "$1" -O raw -t none "$2" "$3" &&
        sync "$3"
}

read_alone() { cat "$1" >/dev/null; }

dd_copy() { dd if="$1" of="$2" bs=16M conv=fsync,notrunc status=none; }

reimage_part() {
    step make_images
    create_volume reimage "$VOLUME_GIB"
    local target="$WORK/target.raw" image id round
    truncate -s "$VOLUME_SIZE" "$target"

    declare -A ids=()
    for image in "${IMAGES[@]}"; do
        log "importing the $image image into volumed"
        step import_image "$image" "$(image_file "$image")" "${FORMAT[$image]}"
        ids[$image]=$(cat "$WORK/images/$image.id")
    done

    for ((round = 1; round <= REPEAT; round++)); do
        for image in "${IMAGES[@]}"; do
            local file format=${FORMAT[$image]} raw="$WORK/images/${RAW_OF[$image]}.raw"
            file=$(image_file "$image")
            reimage_volumed "$image" "${ids[$image]}" "$round"

            step fill_old "$target" "$VOLUME_SIZE"
            timed "$image" cinder "$round" cinder_copy "$format" "$file" "$target"

            step fill_old "$target" "$VOLUME_SIZE"
            timed "$image" fastest "$round" fastest_qemu_img "$format" "$file" "$target"

            timed "$image" read "$round" read_alone "$file"

            # dd writes the image's bytes (its raw equivalent for a qcow2) into freshly
            # punched space, as a refill into a discarded volume would.
            fallocate -p -o 0 -l "$VOLUME_SIZE" "$target"
            timed "$image" dd "$round" dd_copy "$raw" "$target"
        done
    done
}

# ----- the run ------------------------------------------------------------------------------

volumed_version() {
    if [ -n "${VOLUMED:-}" ]; then
        printf '%s' "${VOLUMED_LABEL:-prebuilt $VOLUMED}, sha256 "
        sha256sum "$VD/volumed" | cut -c 1-12
    else
        git -C "$REPO" describe --always --dirty 2>/dev/null || echo "unknown"
    fi
}

machine_info() {
    local fs
    fs=$(findmnt -n -o FSTYPE,SOURCE,OPTIONS -T "$WORK" | tr -s ' ')
    record kind=machine mode="$MODE" \
        date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
        cores="$(nproc)" \
        memory_kib="$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)" \
        kernel="$(uname -r)" \
        filesystem="$fs" \
        work_dir="$WORK" \
        fio_version="$(fio --version)" \
        qemu_version="$(qemu-img --version | head -n 1)" \
        volumed_commit="$(volumed_version)" \
        fio_runtime="$FIO_RUNTIME" fio_size="$FIO_SIZE" volume_size="$VOLUME_SIZE" \
        repeat="$REPEAT" \
        fuse_max_pages="$(cat /proc/sys/fs/fuse/max_pages_limit 2>/dev/null || echo '?')"
}

started_run=$(now)
machine_info
start_volumed
if [ "$FIO" = 1 ]; then
    fio_part
else
    log "skipping the fio part (--reimage-only)"
fi
reimage_part
record kind=run seconds="$(since "$started_run")"
stop_volumed

report="$REPO/bench/results-$(date +%Y-%m-%d-%H%M).md"
python3 "$BENCH_SRC/report.py" render "$RESULTS" >"$report.tmp"
mv "$report.tmp" "$report"
cat "$report"
log "report written to $report"
