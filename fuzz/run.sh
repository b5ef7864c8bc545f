#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each; FUZZ_SECONDS to change it) with
# cargo-fuzz on the nightly toolchain: `bash fuzz/run.sh`. Installs cargo-fuzz when missing.
# A crash stops the script with the target's name; the input that crashed is saved under
# fuzz/artifacts/<target>/ (turn it into a regression test before fixing the bug).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in job_json job_protobuf twilio_callback smpp_receipt identifiers; do
  echo "== fuzzing $target for ${seconds}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
done
echo "no crash found"
