#!/usr/bin/env bash
# Installs NVRTC and ptxas from PyPI into .cuda-tools/ of the repository (ignored by git), once.
#   nvidia-cuda-nvrtc-cu12: libnvrtc.so.12 (kvlab finds it there by itself; see nvrtc.rs)
#   nvidia-cuda-nvcc-cu12:  ptxas, for scripts/kernel-report.sh
# Source it to get the exports, or run it and copy the printed lines.
# Override the versions with NVRTC_VERSION / NVCC_VERSION.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="$repo_root/.cuda-tools"
nvrtc_version="${NVRTC_VERSION:-12.9.86}"
nvcc_version="${NVCC_VERSION:-12.9.86}"
stamp="$tools_dir/.installed-$nvrtc_version-$nvcc_version"

if [ ! -f "$stamp" ]; then
    rm -rf "$tools_dir"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tools_dir" \
        "nvidia-cuda-nvrtc-cu12==$nvrtc_version" "nvidia-cuda-nvcc-cu12==$nvcc_version"
    touch "$stamp"
fi

nvrtc_lib_dir="$tools_dir/nvidia/cuda_nvrtc/lib"
ptxas_path="$tools_dir/nvidia/cuda_nvcc/bin/ptxas"
for required in "$nvrtc_lib_dir/libnvrtc.so.12" "$ptxas_path"; do
    if [ ! -e "$required" ]; then
        echo "setup-cuda-tools: $required is missing after the install" >&2
        exit 1
    fi
done

export KVLAB_NVRTC="$nvrtc_lib_dir/libnvrtc.so.12"
export KVLAB_PTXAS="$ptxas_path"
export LD_LIBRARY_PATH="$nvrtc_lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "export KVLAB_NVRTC=$KVLAB_NVRTC"
echo "export KVLAB_PTXAS=$KVLAB_PTXAS"
echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
