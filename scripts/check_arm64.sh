#!/usr/bin/env bash
# make check-arm64: run the light runtime on an emulated Raspberry Pi 5 (Debian bookworm arm64 under
# qemu-user, Cortex-A76) and check it against this x86 host.
#
#   scripts/check_arm64.sh [--bundle DIR]
#
# Built once and cached under the smoledge cache dir (arm64/), keyed by what they were built from:
#   rootfs-*   debootstrap --arch=arm64 --variant=minbase bookworm, from the Debian archive apt uses here
#   wheels-*   aarch64 wheels of the runtime's dependencies, at this host's installed versions
#   bundles/   the real-text INT4 bundle (unless --bundle), keyed by the recipe and the export code
# Then, inside the chroot: the Paris answer (greedy, text only) byte-identical to this host's, `bundle
# verify`, and one-line errors for a corrupt image and a tampered bundle.  Results go to $ARM64_OUT.
#
# Exit 0: all passed.  77: a prerequisite is missing (not root, no qemu-user-static / debootstrap /
# binfmt_misc, archive unreachable); under CI=true that is exit 1 instead.  Anything else: a failure.
# Mounts are undone on exit, interrupted or not.  Needs root (mount, chroot, binfmt registration).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=${HOST_PY:-$REPO/.venv/bin/python}
PROMPT="What is the capital of France? Answer in one sentence."
MAX_NEW=${ARM64_MAX_NEW_TOKENS:-48}
SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
PLATFORMS=(manylinux2014_aarch64 manylinux_2_17_aarch64 manylinux_2_28_aarch64)
BUNDLE=

while [ $# -gt 0 ]; do
    case $1 in
        --bundle) BUNDLE=$(cd "$2" && pwd); shift 2 ;;
        *) echo "usage: $0 [--bundle DIR]" >&2; exit 2 ;;
    esac
done

log() { echo "check-arm64: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }
skip() {
    log "skipped: $*"
    [ "${CI:-}" = true ] && die "CI=true, so a missing prerequisite is a failure"
    exit 77
}
key() { sha256sum | cut -c1-16; }

renice -n "${ARM64_NICE:-10}" -p $$ >/dev/null  # the box is shared; every child inherits this
export HF_HUB_OFFLINE=1 SMOLEDGE_NO_CLOUD=1  # everything here is offline, the host's runs too

# --- prerequisites -------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (mount, chroot, binfmt_misc)"
[ -x "$HOST_PY" ] || skip "no $HOST_PY: run 'make setup' first"
command -v qemu-aarch64-static >/dev/null || skip "qemu-aarch64-static missing: apt-get install qemu-user-static"
command -v debootstrap >/dev/null || skip "debootstrap missing: apt-get install debootstrap"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
        || skip "cannot mount binfmt_misc (a container without the privilege?)"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then  # no systemd here to do it at boot
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -r "$conf" ] || skip "no $conf from qemu-user-static"
    cat "$conf" > /proc/sys/fs/binfmt_misc/register 2>/dev/null || skip "cannot register the aarch64 binfmt handler"
fi
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || skip "the aarch64 binfmt handler is disabled"

STATE=$("$HOST_PY" -c 'from smoledge.runtime.cache import cache_path; print(cache_path("arm64"))')
OUT=${ARM64_OUT:-$STATE/last-run}
mkdir -p "$STATE" "$OUT"
exec 9>"$STATE/lock"
flock 9  # one check at a time per cache: they share the rootfs

# --- cleanup: every mount under $STATE, deepest first; partial builds removed only when unmounted ---
PARTIAL=
unmount_all() {
    local mnt
    for mnt in $(awk -v p="$STATE/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r); do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" || log "could not unmount $mnt"
    done
}
unmount_all  # what a killed run (SIGKILL: no trap) left behind
cleanup() {
    local rc=$?
    unmount_all
    if [ -n "$PARTIAL" ] && ! awk -v p="$PARTIAL" 'index($2, p) == 1 {f=1} END {exit !f}' /proc/self/mounts; then
        rm -rf --one-file-system "$PARTIAL"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

timed() {  # timed NAME CMD...: run CMD, and note how long it took under NAME
    local name=$1 start=$SECONDS; shift
    "$@"
    echo "$name $((SECONDS - start))s" >> "$OUT/timings.txt"
}
: > "$OUT/timings.txt"

# --- the arm64 userland --------------------------------------------------------------------------
mirror() {  # the first Debian archive apt uses here (deb822 or one-line sources)
    [ -n "${ARM64_MIRROR:-}" ] && { echo "$ARM64_MIRROR"; return; }
    cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '/^URIs:|^deb / && !/security/ {print $2; exit}' || true
}
MIRROR=$(mirror)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
ROOT=$STATE/rootfs-$(echo "$SUITE $INCLUDE $MIRROR" | key)

build_rootfs() {
    "$HOST_PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)' \
        "$MIRROR/dists/$SUITE/Release" 2>/dev/null || skip "the Debian archive $MIRROR is unreachable"
    PARTIAL=$ROOT.partial
    rm -rf --one-file-system "$PARTIAL"
    log "debootstrap $SUITE arm64 from $MIRROR (first stage)"
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$INCLUDE" "$SUITE" "$PARTIAL" "$MIRROR" \
        > "$STATE/debootstrap.log" 2>&1 || die "debootstrap failed: see $STATE/debootstrap.log"
    log "second stage inside the chroot (emulated; several minutes)"
    chroot "$PARTIAL" /debootstrap/debootstrap --second-stage >> "$STATE/debootstrap.log" 2>&1 \
        || die "debootstrap second stage failed: see $STATE/debootstrap.log"
    mv "$PARTIAL" "$ROOT"
    PARTIAL=
}
[ -x "$ROOT/usr/bin/python3" ] || timed rootfs build_rootfs

# --- aarch64 wheels of the light runtime, pinned to what this host runs ---------------------------
runtime_requirements() {  # the [project] dependencies of pyproject, each at the version installed here
    "$HOST_PY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
from importlib.metadata import version
from packaging.requirements import Requirement
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for dep in deps:
    name = Requirement(dep).name
    print(f"{name}=={version(name)}")
EOF
}
runtime_requirements > "$OUT/requirements.txt"
"$HOST_PY" -m pip freeze --exclude-editable 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' > "$OUT/constraints.txt"
WHEELS=$STATE/wheels-$(cat "$OUT/requirements.txt" "$OUT/constraints.txt" | key)

download_wheels() {
    PARTIAL=$WHEELS.partial
    rm -rf "$PARTIAL"
    local plats=() p
    for p in "${PLATFORMS[@]}"; do plats+=(--platform "$p"); done
    log "downloading aarch64 wheels"
    # --isolated: this host's pip config adds x86-only local indexes
    "$HOST_PY" -m pip download --isolated --quiet --cert "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${plats[@]}" \
        -r "$OUT/requirements.txt" -c "$OUT/constraints.txt" -d "$PARTIAL" \
        || die "pip download of the aarch64 wheels failed"
    mv "$PARTIAL" "$WHEELS"
    PARTIAL=
}
[ -d "$WHEELS" ] || timed wheels download_wheels

# --- mounts for the run: proc, dev, an arm64 cpuinfo, wheels, bundle, work dir --------------------
# qemu-user passes the host's x86 /proc/cpuinfo through and onnxruntime's CPU detection segfaults on
# it; a Raspberry Pi 5's (Cortex-A76) goes over it, with as many cores as this host has (onnxruntime pins
# a thread to each core it sees, and the emulated threads run on the host's cores).
CORES=$(nproc)
: > "$STATE/cpuinfo"
for cpu in $(seq 0 $((CORES - 1))); do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' \
        "$cpu" >> "$STATE/cpuinfo"
done
# and its CPU lists, as plain files in the chroot's (unmounted) /sys: without them cpuinfo warns on stderr
mkdir -p "$ROOT/sys/devices/system/cpu"
for list in possible present online; do echo "0-$((CORES - 1))" > "$ROOT/sys/devices/system/cpu/$list"; done
mkdir -p "$ROOT/mnt/wheels" "$ROOT/mnt/bundle" "$ROOT/mnt/work"
mount -t proc proc "$ROOT/proc"
mount --bind "$STATE/cpuinfo" "$ROOT/proc/cpuinfo"
mount --bind /dev "$ROOT/dev"
mount --bind "$WHEELS" "$ROOT/mnt/wheels"
WORK=$ROOT/mnt/work
find "$WORK" -mindepth 1 -delete

inside() {  # inside CMD...: run in the emulated Pi 5, offline, no cloud
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/smoledge/bin:/usr/bin:/bin LANG=C.UTF-8 \
        QEMU_CPU=cortex-a76 HF_HUB_OFFLINE=1 SMOLEDGE_NO_CLOUD=1 SMOLEDGE_CACHE_DIR=/mnt/work/cache "$@"
}

# --- the light runtime inside: dependencies once per wheel set, smoledge itself every run ----------
install_runtime() {
    log "installing the light runtime in the chroot"
    rm -rf "$ROOT/opt/smoledge"
    inside python3 -m venv /opt/smoledge
    inside pip install --quiet --no-compile --no-index --find-links /mnt/wheels -r /mnt/work/requirements.txt
    basename "$WHEELS" > "$ROOT/opt/smoledge/.wheels"
}
cp "$OUT/requirements.txt" "$WORK/requirements.txt"
[ "$(cat "$ROOT/opt/smoledge/.wheels" 2>/dev/null)" = "$(basename "$WHEELS")" ] || timed venv install_runtime
"$HOST_PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$REPO" > "$OUT/wheel.log" 2>&1 \
    || die "could not build the smoledge wheel: see $OUT/wheel.log"
inside pip install --quiet --no-index --no-deps --force-reinstall "/mnt/work/dist/$(cd "$WORK/dist" && ls smoledge-*.whl)"
inside python -c 'import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)' \
    > "$OUT/machine.txt"
log "inside: $(cat "$OUT/machine.txt")"

# --- the real-text INT4 bundle, keyed by the recipe and the export code ---------------------------
export_bundle() {
    local model
    model=$("$HOST_PY" -m smoledge.cli demo-model)
    PARTIAL=$1.partial
    rm -rf "$PARTIAL"
    log "exporting the real-text INT4 bundle (a few minutes)"
    "$HOST_PY" -m smoledge.cli export "$model" --quant int4 --out "$PARTIAL" >/dev/null \
        || die "export failed"
    mkdir -p "$(dirname "$1")"
    mv "$PARTIAL" "$1"
    PARTIAL=
}
if [ -z "$BUNDLE" ]; then
    BUNDLE=$STATE/bundles/realtext-int4-$(cd "$REPO" && cat quantize/recipes/int4.json export/*.py quantize/*.py | key)
    [ -f "$BUNDLE/manifest.json" ] || timed export export_bundle "$BUNDLE"
fi
mount --bind -o ro "$BUNDLE" "$ROOT/mnt/bundle"

# --- the checks ----------------------------------------------------------------------------------
check() {  # check NAME CMD...: keep stdout, stderr and the exit code in $OUT/NAME.{out,err,rc}
    local name=$1 rc=0; shift
    "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
    echo "$rc" > "$OUT/$name.rc"
}
one_line_error() {  # a non-zero exit and exactly one line on stderr
    [ "$(cat "$OUT/$1.rc")" != 0 ] && [ "$(grep -c . "$OUT/$1.err")" = 1 ]
}
ask=(--prompt "$PROMPT" --max-new-tokens "$MAX_NEW" --temperature 0)  # greedy: the two answers compared byte for byte

log "x86 answer on this host"
timed x86-answer check x86-answer "$HOST_PY" -m smoledge.cli run "$BUNDLE" "${ask[@]}"
log "arm64 answer (emulated; under a minute)"
timed arm64-answer check arm64-answer inside smoledge run /mnt/bundle "${ask[@]}"
timed verify check verify inside smoledge bundle verify /mnt/bundle

head -c 4096 /dev/urandom > "$WORK/corrupt.png"
timed corrupt-image check corrupt-image inside smoledge run /mnt/bundle --image /mnt/work/corrupt.png \
    --prompt "What is in this image?"

# a tampered copy: hard links (the cached bundle stays untouched) with one file rewritten, same size
# and one byte changed, so only the sha256 can tell
cp -al "$BUNDLE" "$WORK/tampered" 2>/dev/null || cp -a "$BUNDLE" "$WORK/tampered"
victim=$(cd "$BUNDLE" && find . -type f ! -name manifest.json -printf '%s %P\n' | sort -n | head -n1 | cut -d' ' -f2-)
last=$(tail -c1 "$BUNDLE/$victim")
{ head -c -1 "$BUNDLE/$victim"; [ "$last" = x ] && printf y || printf x; } > "$WORK/tampered.new"
rm "$WORK/tampered/$victim" && mv "$WORK/tampered.new" "$WORK/tampered/$victim"
timed tampered check tampered inside smoledge bundle verify /mnt/work/tampered

# --- verdict -------------------------------------------------------------------------------------
failed=0
fail() { log "FAILED: $*"; failed=1; }
[ "$(cat "$OUT/x86-answer.rc")" = 0 ] || fail "x86 answer: $(tail -n1 "$OUT/x86-answer.err")"
[ "$(cat "$OUT/arm64-answer.rc")" = 0 ] || fail "arm64 answer: $(tail -n1 "$OUT/arm64-answer.err")"
cmp -s "$OUT/x86-answer.out" "$OUT/arm64-answer.out" \
    || fail "answers differ: x86 $(head -c 200 "$OUT/x86-answer.out") / arm64 $(head -c 200 "$OUT/arm64-answer.out")"
[ "$(cat "$OUT/verify.rc")" = 0 ] || fail "bundle verify: $(tail -n1 "$OUT/verify.err")"
one_line_error corrupt-image || fail "corrupt image: want one line and a non-zero exit, got: $(cat "$OUT/corrupt-image.err")"
one_line_error tampered || fail "tampered bundle: want one line and a non-zero exit, got: $(cat "$OUT/tampered.err")"
log "answer: $(cat "$OUT/arm64-answer.out")"
log "timings: $(tr '\n' ' ' < "$OUT/timings.txt")"
[ "$failed" = 0 ] || exit 1
log "passed ($(cat "$OUT/machine.txt"))"
