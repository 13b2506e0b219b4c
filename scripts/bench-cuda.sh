#!/usr/bin/env bash
# The CUDA backend's numbers on a GPU machine that has cargo (benches/cuda.rs; what each section
# measures is said there; a machine without cargo: scripts/gpu-bundle.sh + scripts/gpu-run.sh,
# docs/gpu-run.md). Uses the machine's NVRTC, else installs one into .cuda-tools/ first. Set
# KVLAB_BENCH_MODEL to a checkpoint folder to run real weights instead of random ones of the
# same shapes.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if ! ls /usr/local/cuda/lib64/libnvrtc.so* >/dev/null 2>&1 && [ -z "${KVLAB_NVRTC:-}" ]; then
    source "$repo_root/scripts/setup-cuda-tools.sh" >/dev/null
fi
cargo bench --bench cuda "$@"
