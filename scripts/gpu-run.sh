#!/usr/bin/env bash
# kvlab on a lent GPU machine, in one call of the device tool. Needs no cargo, network or pip:
# the binaries come from scripts/gpu-bundle.sh, in the carried folder .gpu-bundle/.
#
#   here, in the checkout the device tool sends:  scripts/gpu-bundle.sh
#   then one device call:  run(command="scripts/gpu-run.sh", carry=[".gpu-bundle"], timeout_s=470)
#   here, every stage end to end on the emulator:  scripts/gpu-run.sh --dry-run
#
# Stages, each under its own timeout (a failure is recorded and the next stage runs), the whole
# run within 7 minutes; everything lands in $OUT (7 files; results/gpu-dry-run without $OUT):
#   env       nvidia-smi, the driver, nvcc, python/torch, the NVRTC and cuBLAS kvlab finds -> env.txt
#   selftest  kvlab selftest: fragment-layout probes, every kernel against its CPU reference,
#             the tiny references teacher-forced                  -> selftest.txt, selftest.json
#   synth     kvlab synth --preset llama-3.2-1b: the model the bench decodes   -> bench.txt
#   decode    .gpu-bundle/cuda-bench (benches/cuda.rs), each bench stage after the copy
#             bandwidth it is a share of: decode steps at 128/1k/8k/32k, static and chunks of
#             16/64/256, graphs on and off, int8/fp8 KV in runs            -> bench.txt, bench.json
#   kernels   the bench's decode attention at 8k/32k (contiguous vs chunked, bf16/int8/fp8 KV), decode matvec,
#             prefill matmul beside cuBLAS                                -> bench.txt, bench.json
#   prefill   the bench's prefill of 512 and 2048 tokens                 -> bench.txt, bench.json
#   torch     scripts/gpu-torch-yardstick.py: copy, 8192^3 bf16, torch.matmul on the bench's
#             prefill shapes (the yardstick where cuBLAS is absent)       -> torch.txt
# and summary.txt (each stage's status and seconds, the selftest's verdict, the decode table),
# printed last so that the device reply's tail carries it. Exits 1 when a stage did not pass.
#
# --dry-run: the emulator (kvlab selftest --backend emu, the bench's quick plan on a tiny
# synthetic model, torch on the CPU if installed), to prove the script here; timings mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

dry_run=false
case "${1:-}" in
--dry-run) dry_run=true ;;
"") ;;
*)
    echo "usage: scripts/gpu-run.sh [--dry-run]" >&2
    exit 2
    ;;
esac

# A dry run checks that every stage runs end to end, on the emulator, which is slower than a GPU
# at the selftest (its timings mean nothing): each stage gets twice its limit there.
budget_s=420
$dry_run && budget_s=840
started=$(date +%s)
out="${OUT:-$repo/results/$($dry_run && echo gpu-dry-run || echo gpu-run)}"
mkdir -p "$out"
rm -f "$out"/{env,selftest,bench,torch,summary}.txt "$out"/{selftest,bench}.json
work="${TMPDIR:-/tmp}/kvlab-gpu-run"
mkdir -p "$work"
export KVLAB_CACHE="$work/cache"
bundle="$repo/.gpu-bundle"
kvlab="$bundle/kvlab"
bench="$bundle/cuda-bench"
if $dry_run; then
    backend=emu
    preset=tiny
else
    backend=cuda
    preset=llama-3.2-1b
fi
model="$work/synthetic-$preset"

statuses=()
note() { echo "[gpu-run $(($(date +%s) - started))s] $*"; }

# stage NAME LIMIT_S FILE COMMAND...: runs COMMAND under `timeout`, output appended to FILE,
# within what is left of the budget; records ok / failed (rc) / timed out / skipped.
stage() {
    local name=$1 limit=$2 file=$3
    $dry_run && limit=$((limit * 2))
    shift 3
    local left=$((budget_s - ($(date +%s) - started) - 10))
    if [ "$left" -lt "$limit" ]; then
        limit=$left
    fi
    if [ "$limit" -lt 5 ]; then
        statuses+=("$(printf '%-9s %-24s %5s s  %s' "$name" "skipped: out of time" 0 "$(basename "$file")")")
        note "$name skipped: the run's $budget_s s are spent"
        return
    fi
    note "$name (at most $limit s) -> $(basename "$file")"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$file" 2>&1
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after $limit s" ;;
    *) status="failed (exit $rc)" ;;
    esac
    statuses+=("$(printf '%-9s %-24s %5s s  %s' "$name" "$status" $(($(date +%s) - t0)) "$(basename "$file")")")
    note "$name: $status"
}

environment() {
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm), $(nproc) cores"
    grep -E '^(PRETTY_NAME)=' /etc/os-release 2>/dev/null
    free -g 2>/dev/null | head -2
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,persistence_mode,mig.mode.current --format=csv
    else
        echo "no nvidia-smi"
    fi
    echo "== /proc/driver/nvidia/version"
    cat /proc/driver/nvidia/version 2>/dev/null || echo "absent"
    echo "== nvcc"
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "no nvcc on the PATH"; fi
    ls -l /usr/local/cuda*/lib64/libnvrtc.so* /usr/local/cuda*/lib64/libcublas.so* 2>/dev/null
    echo "== python"
    command -v python3 && python3 - <<'EOF'
import sys
print(sys.version.split()[0], sys.prefix)
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
except Exception as error:
    print("torch:", error)
try:
    import glob, os, nvidia
    for root in nvidia.__path__:
        for path in sorted(glob.glob(os.path.join(root, "*", "lib", "lib*.so*"))):
            if "nvrtc" in path or "cublas" in path:
                print(path)
except Exception as error:
    print("nvidia wheels:", error)
EOF
    echo "== the bundle"
    cat "$bundle/MANIFEST"
    for binary in "$kvlab" "$bench"; do
        if ldd "$binary" | grep -q 'not found'; then
            echo "$binary misses libraries:"
            ldd "$binary"
        fi
    done
    echo "== what kvlab finds"
    "$kvlab" selftest --env
}

# The first of the Python CUDA wheels' or a toolkit's files named NAME, or nothing.
locate() {
    {
        python3 -c "import glob, os, nvidia
for root in nvidia.__path__:
    print('\n'.join(sorted(glob.glob(os.path.join(root, '*', 'lib', '$1')))))" 2>/dev/null
        ls /usr/local/cuda*/lib64/$1 /usr/lib/x86_64-linux-gnu/$1 2>/dev/null
    } | grep -v '^$' | head -1
}

if [ ! -x "$kvlab" ] || [ ! -x "$bench" ]; then
    echo "gpu-run: $bundle/kvlab or $bundle/cuda-bench is missing: run scripts/gpu-bundle.sh here first, and carry .gpu-bundle" | tee "$out/summary.txt" >&2
    exit 1
fi
# kvlab searches the venvs itself (see src/backend/cuda/libraries.rs); should it find nothing,
# the wheels' files that Python sees are named explicitly.
if ! $dry_run; then
    found=$(timeout 30 "$kvlab" selftest --env 2>&1)
    if [ -z "${KVLAB_NVRTC:-}" ] && grep -q '^NVRTC used: none' <<<"$found"; then
        KVLAB_NVRTC=$(locate 'libnvrtc.so.1[0-9]')
        [ -n "$KVLAB_NVRTC" ] && export KVLAB_NVRTC && note "KVLAB_NVRTC=$KVLAB_NVRTC (kvlab's own search found none)"
    fi
    if [ -z "${KVLAB_CUBLAS:-}" ] && grep -q 'yardstick): absent' <<<"$found"; then
        KVLAB_CUBLAS=$(locate 'libcublas.so.1[0-9]')
        [ -n "$KVLAB_CUBLAS" ] && export KVLAB_CUBLAS && note "KVLAB_CUBLAS=$KVLAB_CUBLAS (kvlab's own search found none)"
    fi
fi
export -f environment
export kvlab bench bundle

stage env 20 "$out/env.txt" bash -c environment
stage selftest 120 "$out/selftest.txt" \
    "$kvlab" selftest --backend "$backend" --fixtures "$repo/tests/fixtures" --json "$out/selftest.json"
if [ -f "$model/config.json" ]; then
    echo "synthetic model already at $model" >>"$out/bench.txt"
else
    rm -rf "$model"
    stage synth 45 "$out/bench.txt" "$kvlab" synth --preset "$preset" --out "$model"
fi
bench_env=(KVLAB_BENCH_MODEL="$model" KVLAB_BENCH_JSON="$out/bench.json")
$dry_run && bench_env+=(KVLAB_BENCH_BACKEND=emu)
# Three runs of the bench, so that a hang or a crash in one leaves the others their time.
stage decode 100 "$out/bench.txt" env "${bench_env[@]}" KVLAB_BENCH_SECTIONS=decode "$bench"
stage kernels 80 "$out/bench.txt" env "${bench_env[@]}" KVLAB_BENCH_SECTIONS=attention,matvec,matmul "$bench"
stage prefill 30 "$out/bench.txt" env "${bench_env[@]}" KVLAB_BENCH_SECTIONS=prefill "$bench"
torch_args=("$out/bench.json")
$dry_run && torch_args+=(--dry-run)
stage torch 30 "$out/torch.txt" env PYTHONUNBUFFERED=1 python3 "$repo/scripts/gpu-torch-yardstick.py" "${torch_args[@]}"

{
    echo "gpu-run$($dry_run && echo ' --dry-run (the emulator)'), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - started)) s of $budget_s"
    printf '%s\n' "${statuses[@]}"
    echo
    grep -E '^(device:|FAIL|[0-9]+ of [0-9]+ checks)' "$out/selftest.txt" 2>/dev/null
    echo
    grep -E '^(bound:|graph capture failed|section .* failed)' "$out/bench.txt" 2>/dev/null | sort -u
    sed -n '/^1\. decode steps/,/^graphs:/p' "$out/bench.txt" 2>/dev/null
} >"$out/summary.txt"
cat "$out/summary.txt"
note "files in $out: $(cd "$out" && ls | tr '\n' ' ')"
# Every stage's outcome is in the files; the status says whether all of them passed.
! printf '%s\n' "${statuses[@]}" | grep -qv '^[a-z]* *ok '
