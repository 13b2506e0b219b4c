#!/usr/bin/env bash
# llama.cpp's own benchmark with the shapes of `cargo bench --bench model`: prefill of 128 tokens,
# decode of 64, 2 threads, 5 repetitions (llama-bench prints mean ± standard deviation).
# usage: scripts/peers/llamacpp_peer.sh PATH/TO/llama-bench MODEL.gguf [threads]
set -euo pipefail
bench=${1:?usage: $0 PATH/TO/llama-bench MODEL.gguf [threads]}
model=${2:?usage: $0 PATH/TO/llama-bench MODEL.gguf [threads]}
threads=${3:-2}
"$bench" -m "$model" -t "$threads" -p 128 -n 64 -r 5 -o md
