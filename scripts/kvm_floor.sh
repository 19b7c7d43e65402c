#!/usr/bin/env bash
# kvm_floor.sh - time `shadowvm run hello` against the floor, a bare
# hand-written KVM loop (kvm_floor.c), in the same run.
#
#   scripts/kvm_floor.sh [RUNS]          (default 30)
#
# Uses $SHADOWVM if set, else target/release/shadowvm under
# $CARGO_TARGET_DIR (or ./target), building it if missing. Prints medians
# of (1) VM creation -> first serial byte, measured in-process (shadowvm's
# --json first_serial_byte_us; kvm_floor's own clock from opening /dev/kvm),
# and (2) whole-process wall time (hyperfine if installed, else a date loop).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
target=${CARGO_TARGET_DIR:-target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

floor="$work/kvm_floor"
gcc -O2 -Wall -Wextra -o "$floor" scripts/kvm_floor.c

svm=${SHADOWVM:-$target/release/shadowvm}
if [[ ! -x $svm ]]; then
    cargo build --release --bin shadowvm >&2
fi

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) {print "nan"; exit} m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.1f\n", m}'; }
minimum() { sort -g | awk 'NR == 1 {printf "%.1f\n", $1}'; }

# Warm up both (page cache, KVM module state).
for _ in 1 2 3; do "$floor" >/dev/null 2>&1; "$svm" run hello >/dev/null 2>&1; done

# (1) In-process: VM creation -> first serial byte.
for _ in $(seq "$runs"); do
    "$floor" 2>&1 >/dev/null | sed -n 's/^first_serial_byte_us=\([0-9.]*\).*/\1/p' >>"$work/floor_first"
    "$svm" run hello --json 2>&1 >/dev/null | sed -n 's/.*"first_serial_byte_us":\([0-9.]*\).*/\1/p' >>"$work/svm_first"
done
floor_first=$(median <"$work/floor_first")
svm_first=$(median <"$work/svm_first")
floor_first_min=$(minimum <"$work/floor_first")
svm_first_min=$(minimum <"$work/svm_first")

# (2) Whole process.
if command -v hyperfine >/dev/null; then
    hyperfine -N --warmup 3 --runs "$runs" --export-json "$work/hf.json" \
        "$floor" "$svm run hello" >&2
    read -r floor_wall svm_wall floor_wall_min svm_wall_min < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["results"]
print(" ".join("%.1f" % (x[k] * 1e6) for k in ("median", "min") for x in r))' "$work/hf.json")
    how="hyperfine -N, median of $runs"
else
    for _ in $(seq "$runs"); do
        s=$(date +%s%N); "$floor" >/dev/null 2>&1; e=$(date +%s%N); echo $(((e - s) / 1000)) >>"$work/floor_wall"
        s=$(date +%s%N); "$svm" run hello >/dev/null 2>&1; e=$(date +%s%N); echo $(((e - s) / 1000)) >>"$work/svm_wall"
    done
    floor_wall=$(median <"$work/floor_wall")
    svm_wall=$(median <"$work/svm_wall")
    floor_wall_min=$(minimum <"$work/floor_wall")
    svm_wall_min=$(minimum <"$work/svm_wall")
    how="date +%s%N loop, median of $runs"
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fx", a / b }'; }
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-46s %12s %12s %7s\n' "measure ($runs runs)" "kvm_floor" "shadowvm" "ratio"
printf '%-46s %9s us %9s us %7s\n' \
    "VM creation -> first serial byte, median" "$floor_first" "$svm_first" "$(ratio "$svm_first" "$floor_first")" \
    "VM creation -> first serial byte, min" "$floor_first_min" "$svm_first_min" "$(ratio "$svm_first_min" "$floor_first_min")" \
    "whole process, median" "$floor_wall" "$svm_wall" "$(ratio "$svm_wall" "$floor_wall")" \
    "whole process, min" "$floor_wall_min" "$svm_wall_min" "$(ratio "$svm_wall_min" "$floor_wall_min")"
echo "(whole process: $how)"
