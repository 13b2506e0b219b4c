"""torch beside kvlab on the GPU: the device-to-device copy bandwidth, an 8192^3 bf16 matrix
product (the compute ceiling), and torch.matmul on exactly the prefill shapes that
benches/cuda.rs timed (read from its JSON), for the ratio where cuBLAS could not be loaded.
Every figure is the median of CUDA-event timings after warm-ups, on random data.

    python3 scripts/gpu-torch-yardstick.py BENCH_JSON [--dry-run]

--dry-run: on the CPU with small sizes (checks the script runs; its times mean nothing).
"""

import json
import statistics
import sys
import time


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dry_run = "--dry-run" in sys.argv
    try:
        import torch
    except ImportError as error:
        print(f"torch yardstick skipped: {error}")
        return 0
    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(
            f"{props.name}: {props.multi_processor_count} SMs, "
            f"{getattr(props, 'L2_cache_size', 0) >> 20} MiB L2, {props.total_memory >> 30} GiB"
        )
    samples = 2 if dry_run else 20

    def median_seconds(work, warmups=3):
        for _ in range(warmups):
            work()
        times = []
        for _ in range(samples):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                work()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                began = time.perf_counter()
                work()
                times.append(time.perf_counter() - began)
        return statistics.median(times)

    copy_bytes = (1 << 20) if dry_run else (1 << 30)
    src = torch.randint(0, 255, (copy_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src))
    print(f"copy: {2 * copy_bytes / seconds / 1e9:.0f} GB/s (bytes read + written)")
    del src, dst

    size = 256 if dry_run else 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b))
    print(f"bf16 {size}^3 matmul: {2 * size**3 / seconds / 1e12:.1f} TFLOP/s")
    del a, b

    shapes = []
    if args:
        try:
            with open(args[0]) as f:
                shapes = [(r["shape"], r["m"], r["n"], r["k"]) for r in json.load(f).get("matmul", [])]
        except (OSError, ValueError, KeyError) as error:
            print(f"no prefill shapes from {args[0]}: {error}")
    if not shapes:
        print("no prefill shapes (benches/cuda.rs wrote no matmul section): matmul skipped")
        return 0
    print(f"torch.matmul out[m, n] = a[m, k] @ w[n, k].T, bf16 in and out, on the shapes of {args[0]}")
    print(f"{'shape':<24} {'m':>6} {'n':>8} {'k':>6} {'TF/s':>8}")
    for name, m, n, k in shapes:
        a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.05
        seconds = median_seconds(lambda: torch.matmul(a, w.t()))
        print(f"{name:<24} {m:>6} {n:>8} {k:>6} {2 * m * n * k / seconds / 1e12:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
