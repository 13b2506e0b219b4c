#!/usr/bin/env bash
# The test command (CI runs exactly this): installs NVRTC + ptxas from PyPI into .cuda-tools/
# once and SmolLM2-135M-Instruct (scripts/fetch-models.sh) into kvlab's cache, smoke-runs every
# bench so that benches never rot, runs the emulator's kernel tests under AddressSanitizer
# (out-of-bounds reads too), then the whole test suite, then the GPU run's scripts end to end on
# the emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=setup-cuda-tools.sh
source scripts/setup-cuda-tools.sh >/dev/null
scripts/fetch-models.sh
KVLAB_BENCH_QUICK=1 cargo bench
cargo test --release --features emu-asan --test emulator --test cuda_kernels
cargo test --release
# The GPU run's bundle and device script, end to end on the emulator (docs/gpu-run.md).
scripts/gpu-bundle.sh >/dev/null
OUT="$(mktemp -d)" scripts/gpu-run.sh --dry-run
