#!/usr/bin/env bash
# Builds, here, what a lent GPU machine runs: that machine has no Rust toolchain, no network and
# no pip index. Writes into the ignored folder .gpu-bundle/:
#   kvlab        the release binary (selftest, synth, generate...), stripped
#   cuda-bench   benches/cuda.rs as a release binary, stripped
#   MANIFEST     commit, build date, sizes, sha256 and the newest glibc / libstdc++ symbols needed
# then checks that the working tree the device tool sends (tracked files, untracked files git
# does not ignore, shared/ if present, and the bundle, which the call carries) stays under
# 55 MiB (the tool's limit is 64 MiB).
#
# The device call that follows (docs/gpu-run.md; run the bundle in the checkout the device tool
# sends, the session's own):
#   run(command="scripts/gpu-run.sh", carry=[".gpu-bundle"], timeout_s=470)
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.gpu-bundle
limit_mib=55

if ! git check-ignore -q "$bundle"; then
    echo "gpu-bundle: $bundle is not ignored by git (it must travel as a carried path)" >&2
    exit 1
fi
cargo build --release --bin kvlab
bench=$(cargo bench --bench cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "cuda" \
            and message.get("executable"):
        print(message["executable"])
')
if [ -z "$bench" ] || [ ! -x "$bench" ]; then
    echo "gpu-bundle: cargo did not name the cuda bench's executable" >&2
    exit 1
fi

rm -rf "$bundle"
mkdir -p "$bundle"
cp target/release/kvlab "$bundle/kvlab"
cp "$bench" "$bundle/cuda-bench"
strip "$bundle/kvlab" "$bundle/cuda-bench"

newest() { objdump -T "$1" | grep -o "$2[0-9.]*" | sort -uV | tail -1; }
{
    echo "commit: $(git rev-parse HEAD)$([ -z "$(git status --porcelain)" ] || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version | head -1)"
    for binary in kvlab cuda-bench; do
        echo "$binary: $(stat -c %s "$bundle/$binary") bytes, sha256 $(sha256sum "$bundle/$binary" | cut -d' ' -f1), needs $(newest "$bundle/$binary" GLIBC_) $(newest "$bundle/$binary" GLIBCXX_)"
    done
} >"$bundle/MANIFEST"
cat "$bundle/MANIFEST"

# What travels: tracked files that exist, untracked files git does not ignore, shared/, the bundle.
bytes() { xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }
tracked=$(git ls-files -z | bytes)
untracked=$(git ls-files -z --others --exclude-standard | bytes)
shared=0
if [ -d shared ]; then
    shared=$(find -L shared -type f -print0 | bytes)
fi
carried=$(find "$bundle" -type f -print0 | bytes)
total=$((tracked + untracked + shared + carried))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "travels: tracked $(mib "$tracked") + untracked $(mib "$untracked") + shared/ $(mib "$shared") + $bundle $(mib "$carried") = $(mib "$total") (limit $limit_mib MiB)"
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
    echo "gpu-bundle: the travelling tree is over $limit_mib MiB; the largest files:" >&2
    { git ls-files -z; git ls-files -z --others --exclude-standard; find "$bundle" -type f -print0; } |
        xargs -0 -r du -b 2>/dev/null | sort -rn | head -10 >&2
    exit 1
fi
