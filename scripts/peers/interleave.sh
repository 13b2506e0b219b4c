#!/usr/bin/env bash
# kvlab and llama.cpp in alternation, one run each per pair, so that both see the same phases of a
# host whose memory bandwidth drifts. Prints one line per pair: "kvlab X | llama Y" (tokens/s),
# then a summary (scripts/peers/pairs_summary.py).
#   decode:  kvlab generate, 64 new tokens after 8 prompt ids (decode tok/s) vs llama-bench -n 64 -r 1
#   prefill: kvlab generate, a prompt of 128 ids (the first forward pass of the process) vs
#            llama-bench -p 128 -r 1 (after its own warm-up)
# usage: scripts/peers/interleave.sh decode|prefill PAIRS KVLAB_BINARY LLAMA_BENCH MODEL.gguf [threads]
# KVLAB_ARGS: more flags for kvlab generate (default none: the synthetic 1B), e.g.
#   KVLAB_ARGS="--model smollm2-135m-instruct --weight-dtype bf16"
set -euo pipefail
usage="usage: $0 decode|prefill PAIRS KVLAB_BINARY LLAMA_BENCH MODEL.gguf [threads]"
mode=${1:?$usage}; pairs=${2:?$usage}; kvlab=${3:?$usage}; bench=${4:?$usage}; gguf=${5:?$usage}
threads=${6:-2}
read -r -a extra <<< "${KVLAB_ARGS:-}"
here=$(cd "$(dirname "$0")" && pwd)
case $mode in
  decode)
    ids=1,2,3,4,5,6,7,8; kv_args=(--max-new-tokens 64); lb_args=(-p 0 -n 64)
    kv_rate="d['decode_tokens_per_second']" ;;
  prefill)
    ids=$(python3 -c "print(','.join(str(1000 + i * 7919 % 20000) for i in range(128)))")
    kv_args=(--max-new-tokens 1); lb_args=(-p 128 -n 0)
    kv_rate="len(d['prompt_ids']) / d['prefill_seconds']" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
out=$(mktemp)
for _ in $(seq "$pairs"); do
  k=$("$kvlab" generate "${extra[@]}" --threads "$threads" --prompt-ids "$ids" "${kv_args[@]}" --ignore-eos \
      --cache static --json 2>/dev/null |
      python3 -c "import json, sys; d = json.load(sys.stdin); print(round($kv_rate, 2))")
  l=$("$bench" -m "$gguf" -t "$threads" "${lb_args[@]}" -r 1 -o json 2>/dev/null |
      python3 -c "import json, sys; print(round(json.load(sys.stdin)[0]['avg_ts'], 2))")
  echo "kvlab $k | llama $l" | tee -a "$out"
done
python3 "$here/pairs_summary.py" "$out"
rm -f "$out"
