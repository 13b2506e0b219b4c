#!/usr/bin/env python3
"""The study's own tool (Hugging Face transformers) on the same folder and cores as kvlab.

Two measurements, each printed as a Markdown table:

  study       the study's protocol (../shared/scenarios/README.md): per strategy, the history
              re-templated (or the "role: content" fallback with BOS) and re-prefilled every turn,
              greedy, one warm-up generation first; wall time around model.generate.
  throughput  prefill tokens/s of a 128-token prompt and decode tokens/s of 64 new tokens
              (dynamic cache), medians of 3 runs after a warm-up, as benches/model.rs measures kvlab.

The synthetic default has random weights, so `min_new_tokens` keeps every answer at its full
length (kvlab's --ignore-eos). Needs torch and transformers (scripts/peers/README.md).

    python3 scripts/peers/transformers_peer.py study --model ~/.cache/kvlab/synthetic-llama-3.2-1b-seed0
    python3 scripts/peers/transformers_peer.py throughput --model DIR --threads 2
"""

import argparse
import json
import pathlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SCENARIOS = pathlib.Path(__file__).resolve().parents[2] / "src/scenario/study_scenarios.json"


def load(model_dir, threads):
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    return tokenizer, model


def prompt_ids(tokenizer, messages):
    """The study's step 2: the chat template, or its fallback when there is none."""
    try:
        if tokenizer.chat_template is None:
            raise ValueError("no chat template")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not torch.is_tensor(ids):
            ids = ids["input_ids"]
    except Exception:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def generate(model, tokenizer, ids, strategy, new_tokens):
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        attention_mask=torch.ones_like(ids),
    )
    if strategy == "none":
        kwargs["use_cache"] = False
    else:
        kwargs["cache_implementation"] = strategy
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    return time.perf_counter() - start, out[0, ids.shape[1]:]


def study(args):
    tokenizer, model = load(args.model, args.threads)
    scenarios = json.loads(SCENARIOS.read_text())
    scenario = scenarios["scenarios"][args.scenario]
    system = scenarios["system_prompts"][scenario["system"]]
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{args.threads} threads, bf16, {args.model}")
    print("\n| strategy | turn | input tokens | output tokens | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for strategy in args.strategies.split(","):
        messages = [{"role": "system", "content": system}]
        warm = prompt_ids(tokenizer, messages + [{"role": "user", "content": scenario["turns"][0]}])
        generate(model, tokenizer, warm, strategy, args.max_new_tokens)  # warm-up, not counted
        for turn, user in enumerate(scenario["turns"][: args.turns], start=1):
            messages.append({"role": "user", "content": user})
            ids = prompt_ids(tokenizer, messages)
            seconds, new = generate(model, tokenizer, ids, strategy, args.max_new_tokens)
            print(f"| {strategy} | {turn} | {ids.shape[1]} | {len(new)} | {seconds:.2f} |", flush=True)
            messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})


def throughput(args):
    tokenizer, model = load(args.model, args.threads)
    vocab = model.config.vocab_size
    ids = torch.tensor([[1000 + (i * 7919) % 20000 % vocab for i in range(args.prompt_tokens)]])
    prefill, decode = [], []
    for rep in range(args.reps + 1):
        first, _ = generate(model, tokenizer, ids, "dynamic", 1)
        total, _ = generate(model, tokenizer, ids, "dynamic", args.new_tokens + 1)
        if rep == 0:
            continue  # warm-up
        prefill.append(args.prompt_tokens / first)
        decode.append(args.new_tokens / (total - first))
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{args.threads} threads, bf16, {args.model}")
    print(f"prefill tok/s ({args.prompt_tokens} tokens): median {statistics.median(prefill):.1f} "
          f"(min {min(prefill):.1f}, max {max(prefill):.1f})")
    print(f"decode tok/s ({args.new_tokens} tokens, dynamic): median {statistics.median(decode):.2f} "
          f"(min {min(decode):.2f}, max {max(decode):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("study", "throughput"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="an HF model folder, e.g. kvlab's synthetic default in ~/.cache/kvlab")
        p.add_argument("--threads", type=int, default=2)
    s = sub.choices["study"]
    s.add_argument("--scenario", default="insurance_claim_auto")
    s.add_argument("--strategies", default="none,dynamic,static")
    s.add_argument("--turns", type=int, default=2)
    s.add_argument("--max-new-tokens", type=int, default=16)
    t = sub.choices["throughput"]
    t.add_argument("--prompt-tokens", type=int, default=128)
    t.add_argument("--new-tokens", type=int, default=64)
    t.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    {"study": study, "throughput": throughput}[args.command](args)


if __name__ == "__main__":
    main()
