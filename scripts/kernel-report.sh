#!/usr/bin/env bash
# Registers, spills, stack and shared memory of every kernel for sm_80 and sm_90: each
# kernels/*.cu compiled by NVRTC, then `ptxas -v`. Installs NVRTC and ptxas into .cuda-tools/
# first if needed.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup-cuda-tools.sh" >/dev/null
cd "$repo_root"
cargo run --release --quiet -- kernel-report
