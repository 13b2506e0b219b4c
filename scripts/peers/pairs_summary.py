"""Summary of interleaved pairs ("kvlab X | llama Y" lines): medians, ranges, the median of the
per-pair ratios, and a one-sided sign test (the chance of kvlab winning at least this many pairs
if both engines were equally fast)."""
import math
import statistics
import sys

kvlab, peer = [], []
for line in open(sys.argv[1]):
    fields = line.split()
    if len(fields) >= 5 and fields[0] == "kvlab":
        kvlab.append(float(fields[1]))
        peer.append(float(fields[4]))
n = len(kvlab)
if n == 0:
    sys.exit(f"no pairs in {sys.argv[1]}")
wins = sum(k > p for k, p in zip(kvlab, peer))
p_value = sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n
ratios = [k / p for k, p in zip(kvlab, peer)]
print(
    f"{n} pairs: kvlab median {statistics.median(kvlab):.2f} ({min(kvlab):.2f}..{max(kvlab):.2f}), "
    f"llama.cpp median {statistics.median(peer):.2f} ({min(peer):.2f}..{max(peer):.2f}); "
    f"kvlab / llama.cpp per pair: median x{statistics.median(ratios):.3f}; "
    f"kvlab ahead in {wins} of {n} (sign test p = {p_value:.4f})"
)
