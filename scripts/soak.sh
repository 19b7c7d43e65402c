#!/usr/bin/env bash
# Runs `shadowvm stress` back to back for MINUTES minutes (default 60) and
# keeps every failing run's output: the long form of issue 9's gate.
#
#   scripts/soak.sh [MINUTES] [-- extra stress options]
#   SECONDS_PER_RUN=20 scripts/soak.sh 120
#
# Prints one line per run and a summary; exits 1 if any run failed. Failing
# runs' outputs are kept in $SOAK_DIR (default: a new directory under
# /tmp) and named on the way. Needs /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-60}
shift || true
[[ ${1:-} == -- ]] && shift
if ! [[ $minutes =~ ^[0-9]+$ ]] || (( minutes == 0 )); then
    echo "soak: MINUTES must be a positive whole number, not '$minutes'" >&2
    exit 2
fi
per_run=${SECONDS_PER_RUN:-20}
dir=${SOAK_DIR:-$(mktemp -d /tmp/shadowvm-soak.XXXXXX)}
mkdir -p "$dir"

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/shadowvm

end=$(( $(date +%s) + minutes * 60 ))
runs=0
failed=0
while (( $(date +%s) < end )); do
    runs=$(( runs + 1 ))
    out="$dir/run-$runs.txt"
    # A run that hangs is a failure too: allow its budget plus two minutes.
    if timeout $(( per_run + 120 )) "$bin" stress --seconds "$per_run" "$@" >"$out" 2>&1; then
        echo "soak: run $runs: $(tail -n 1 "$out")"
        rm -f "$out"
    else
        failed=$(( failed + 1 ))
        echo "soak: run $runs FAILED (output kept in $out): $(tail -n 1 "$out")"
    fi
done
echo "soak: $runs run(s) of ${per_run}s in ${minutes} min, $failed failed"
(( failed == 0 ))
