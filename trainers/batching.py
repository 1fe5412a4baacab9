"""Grouping variable-length datums into few model calls with little padding.

Datums are sorted by length and cut into contiguous buckets by dynamic programming that
minimises padded tokens plus a fixed cost per model call, under a token budget per call. On a
CPU this beats packing everything into one row, whose attention cost grows with the square of
the packed length when the kernel cannot skip the masked blocks.
"""

from __future__ import annotations


def plan_buckets(lengths: list[int], max_tokens: int, call_overhead: int) -> list[list[int]]:
    """Returns buckets of datum indices; each bucket is one padded model call.

    Cost of a bucket = len(bucket) * its longest length + call_overhead, and a bucket of more
    than one datum stays within max_tokens padded tokens.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    inf = float("inf")
    best = [inf] * (n + 1)  # best[j]: cost of bucketing order[j:]
    cut = [n] * (n + 1)
    best[n] = 0.0
    for start in range(n - 1, -1, -1):
        longest = lengths[order[start]]  # sorted descending: the first is the longest
        for end in range(start + 1, n + 1):
            padded = (end - start) * longest
            if end - start > 1 and padded > max_tokens:
                break
            cost = padded + call_overhead + best[end]
            if cost < best[start]:
                best[start], cut[start] = cost, end
    buckets, start = [], 0
    while start < n:
        buckets.append(order[start : cut[start]])
        start = cut[start]
    return buckets
