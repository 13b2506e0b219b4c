#!/usr/bin/env bash
# Registers, spills, stack and shared memory of every kernel for sm_80 and sm_90: each
# kernels/*.cu compiled by NVRTC, then `ptxas -v` (nvrtc::kernel_report in the library).
# Installs NVRTC and ptxas into .cuda-tools/ first if needed.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup-cuda-tools.sh" >/dev/null
cd "$repo_root"
# The ptxas test prints the table and fails if a kernel is missing from it.
if ! output="$(cargo test --release --quiet --test nvrtc -- --exact ptxas_reports_every_kernel --nocapture 2>&1)"; then
    echo "$output" >&2
    exit 1
fi
echo "$output" | awk '/^kernel +arch +registers/ { printing = 1 } printing && /^$/ { exit } printing'
