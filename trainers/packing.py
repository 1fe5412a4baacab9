"""Datums that begin with the same tokens share one forward pass of those tokens.

An RL batch is groups of completions of one prompt: in the main job 12 prompts x 8 samples,
47 prompt tokens and ~15 sampled ones per datum. One datum per row, the trainer computes each
prompt eight times, and prompts are three quarters of the tokens. Here datums that share a
prefix go into one row as a prefix tree (trie) of their tokens: every shared token once, each
node at its own depth as its position id, and an attention mask under which a node sees its
ancestors and itself only. A datum's positions then compute exactly what its own row would
(the same causal context at the same positions), to floating-point reduction order.

The output head runs once per distinct (node, targets) pair: positions that several datums
share with the same targets (a prompt's, whose next token is in the prompt) are projected once
and their logprobs handed to each of those datums, so their gradients add up as they would.

A row's attention is dense under a custom mask (no CPU kernel skips the masked blocks), so its
cost grows with the square of the row's nodes: a row holds at most `max_row_tokens` nodes, and
a datum joins the row before it only if they share at least `min_shared` leading tokens.
Datums that share nothing get rows of their own, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class TrieRow:
    """One model row: its members (datum indices) and the size of their prefix tree. The
    tree itself (nodes in insertion order, a node's ancestors before it) is built on first
    use, so a row of one datum, which goes the padded way, never builds one."""

    members: list[int]
    sequences: list[Sequence[int]]  # the members' tokens, in `members` order
    size: int  # nodes of the tree: the members' tokens, each shared prefix once

    @functools.cached_property
    def _tree(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        tokens: list[int] = []
        depth: list[int] = []
        parent: list[int] = []
        paths: list[list[int]] = []
        children: list[dict[int, int]] = []
        roots: dict[int, int] = {}
        for sequence in self.sequences:
            level, above, path = roots, -1, []
            for position, token in enumerate(sequence):
                node = level.get(token)
                if node is None:
                    node = len(tokens)
                    tokens.append(token)
                    depth.append(position)
                    parent.append(above)
                    children.append({})
                    level[token] = node
                path.append(node)
                above, level = node, children[node]
            paths.append(path)
        return tokens, depth, parent, paths

    @property
    def tokens(self) -> list[int]:  # per node
        return self._tree[0]

    @property
    def depth(self) -> list[int]:  # per node: its position id
        return self._tree[1]

    @property
    def parent(self) -> list[int]:  # per node: -1 at the root level
        return self._tree[2]

    @property
    def paths(self) -> list[list[int]]:  # per member: its nodes, in order
        return self._tree[3]

    def attention(self, width: int) -> torch.Tensor:
        """[width, width] bool: node q may attend to node k (an ancestor or itself); padding
        nodes beyond `size` attend to themselves only."""
        allowed = torch.eye(width, dtype=torch.bool)
        for node, parent in enumerate(self.parent):
            if parent >= 0:
                allowed[node] |= allowed[parent]
        return allowed


def plan_rows(
    sequences: Sequence[Sequence[int]], min_shared: int, max_row_tokens: int
) -> list[TrieRow]:
    """Rows for datums `sequences` (their token lists): sorted, so that datums with a common
    prefix are neighbours; each joins the row of its predecessor if they share `min_shared`
    leading tokens and the row stays within `max_row_tokens` nodes. In sorted order no earlier
    member shares more with a datum than its predecessor does, so a datum adds its length
    less that common prefix to the row's tree."""
    order = sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))
    rows: list[TrieRow] = []
    previous: Sequence[int] = ()
    for i in order:
        sequence = sequences[i]
        shared = _common_prefix(previous, sequence)
        row = rows[-1] if rows else None
        if row is None or shared < min_shared or row.size + len(sequence) - shared > max_row_tokens:
            rows.append(TrieRow([i], [sequence], len(sequence)))
        else:
            row.members.append(i)
            row.sequences.append(sequence)
            row.size += len(sequence) - shared
        previous = sequence
    return rows


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PackedBucket:
    """One model call over trie rows, and where each datum's target logprobs come from."""

    datums: list[int]  # datum indices, in the order of `picks`
    input_ids: torch.Tensor  # [B, W]
    position_ids: torch.Tensor  # [B, W]
    mask: torch.Tensor  # [B, 1, W, W] additive float: 0 = attend
    head_rows: torch.Tensor  # [R] row of each output-head position
    head_nodes: torch.Tensor  # [R] node of each output-head position
    head_targets: torch.Tensor  # [R, K] target tokens (padded with 0 to the widest K)
    picks: list[torch.Tensor]  # per datum: [its length] indices into the R head positions


def pack_bucket(
    rows: Sequence[TrieRow], targets: Mapping[int, torch.Tensor], dtype: torch.dtype
) -> PackedBucket:
    """The model inputs of `rows` (one model call), and each member's output-head positions:
    one per distinct (node, target tokens). `targets[i]`: datum i's targets, [len_i, K_i]."""
    width = max(row.size for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.int64)
    position_ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.full((len(rows), 1, width, width), torch.finfo(dtype).min, dtype=dtype)
    k = max(targets[i].shape[1] for row in rows for i in row.members)
    head: dict[tuple[int, int, bytes], int] = {}
    head_rows: list[int] = []
    head_nodes: list[int] = []
    head_targets: list[torch.Tensor] = []
    datums: list[int] = []
    picks: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        input_ids[r, : row.size] = torch.tensor(row.tokens)
        position_ids[r, : row.size] = torch.tensor(row.depth)
        mask[r, 0].masked_fill_(row.attention(width), 0.0)
        for i, path in zip(row.members, row.paths, strict=True):
            wide = torch.nn.functional.pad(targets[i], (0, k - targets[i].shape[1]))
            pick = []
            for node, target in zip(path, wide, strict=True):
                key = (r, node, target.numpy().tobytes())
                at = head.get(key)
                if at is None:
                    at = head[key] = len(head_rows)
                    head_rows.append(r)
                    head_nodes.append(node)
                    head_targets.append(target)
                pick.append(at)
            datums.append(i)
            picks.append(torch.tensor(pick))
    return PackedBucket(
        datums=datums,
        input_ids=input_ids,
        position_ids=position_ids,
        mask=mask,
        head_rows=torch.tensor(head_rows),
        head_nodes=torch.tensor(head_nodes),
        head_targets=torch.stack(head_targets),
        picks=picks,
    )
