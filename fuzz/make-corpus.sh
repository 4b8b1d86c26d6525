#!/bin/sh
# Regenerates the qcow2 seed corpus: small images (< 64 KiB each) that cover every
# cluster type the reader supports. Needs qemu-img, qemu-io and python3.
set -eu

out="$(dirname "$0")/corpus/qcow2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

image() { # name options size qemu-io commands...
    name=$1 options=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$options" "$work/$name" "$size"
    for command in "$@"; do
        qemu-io -f qcow2 -c "$command" "$work/$name" >/dev/null
    done
}

# Sets the header's size field (big endian, bytes 24-31).
set_size() {
    python3 -c 'import struct,sys; f=open(sys.argv[1],"r+b"); f.seek(24); f.write(struct.pack(">Q",int(sys.argv[2])))' "$1" "$2"
}

image v2-512.qcow2 compat=0.10,cluster_size=512 64k \
    'write -P 0x11 0 1536' 'write -c -P 0x22 4096 512' 'write -P 0x33 60k 4k'
image v3-512-zlib.qcow2 cluster_size=512 64k \
    'write -P 0x11 256 2k' 'write -z 8k 2k' 'write -P 0x22 12k 1k' 'write -z 12k 1k' \
    'write -c -P 0x33 16k 512' 'write -P 0x44 63k 1k'
image v3-1k-zstd.qcow2 cluster_size=1024,compression_type=zstd 128k \
    'write -c -P 0x11 0 1k' 'write -c -P 0x22 3k 1k' 'write -P 0x33 10k 3k' 'write -z 20k 4k'
image v3-4k-mixed.qcow2 cluster_size=4096 64k \
    'write -P 0x11 1k 6k' 'write -c -P 0x22 16k 4k' 'write -z 24k 8k' 'write -P 0x33 60k 4k'
image v3-512-odd.qcow2 cluster_size=512 10001 'write -P 0x11 9k 1k'
set_size "$work/v3-512-odd.qcow2" 10001
image v3-512-sparse.qcow2 cluster_size=512 64M 'write -P 0x11 0 512' 'write -P 0x22 63M 1k'
image v3-512-snapshot.qcow2 cluster_size=512 32k 'write -P 0x11 0 2k'
qemu-img snapshot -c first "$work/v3-512-snapshot.qcow2"
qemu-io -f qcow2 -c 'write -P 0x22 1k 2k' "$work/v3-512-snapshot.qcow2" >/dev/null

# qemu-img makes extended L2 images of at least six 16 KiB clusters; this one is laid out by
# hand to stay small: header, an empty refcount table, L2 table, data, then the L1 table.
python3 - "$work/extended-16k.qcow2" <<'PY'
import struct, sys
cluster = 16384
header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, 14, 1 << 20, 0, 1,
                     4 * cluster, cluster, 1, 0, 0, 1 << 4, 0, 0, 4, 112)
image = bytearray(header.ljust(cluster, b"\0"))
image += bytes(cluster)
l2 = bytearray(cluster)
# Cluster 0: subclusters 0-1 allocated, 2 zero, 3 allocated; cluster 1: subclusters zero.
l2[0:16] = struct.pack(">QQ", 3 * cluster | 1 << 63, 0b1011 | 0b0100 << 32)
l2[16:32] = struct.pack(">QQ", 0, 0xffff << 32)
image += l2
image += bytes(range(256)) * (cluster // 256)
image += struct.pack(">Q", 2 * cluster | 1 << 63)
open(sys.argv[1], "wb").write(image)
PY

rm -f "$out"/*
cp "$work"/*.qcow2 "$out"/
ls -l "$out"
