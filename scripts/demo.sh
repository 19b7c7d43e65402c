#!/bin/sh
# Runs every `shadowvm demo` scenario in turn (narrated; pass --json for
# JSON lines). Needs /dev/kvm.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/shadowvm"
for s in $("$bin" demo | awk '{print $1}'); do
    echo "================ shadowvm demo $s $*"
    "$bin" demo "$s" "$@"
    echo
done
