"""A member's next-byte distribution from its next-token distribution: the core of byte-level
pooling across tokenizers.

The model defines a distribution over token sequences, hence over byte strings. The probability
that the text starts with the bytes x[:n] is the sum over its *covers*: token sequences
t_1..t_k whose first k-1 tokens spell x[:j] exactly (j < n) and whose last token starts with
x[j:n]. We sum over the covers whose front t_1..t_{k-1} is the tokenizer's own encoding of
x[:j] (`encode_prefix`), for every j within one token length of n, and over every last token,
canonical or not (so "the token ends here, the next one starts with b" is the front j = n):

    P(x[:n] b) = sum_j P(front_j) * P(next token starts with x[j:n] b | front_j)
    p(b | x[:n]) = P(x[:n] b) / sum_b' P(x[:n] b')

The fronts of all positions share most of their tokens, so they form a trie (`TokenTree`),
scored in one forward pass with a tree attention mask (`model_tree_scorer`). Per front, the
probability of "starts with s" is a difference of one cumulative sum over the vocabulary in byte
order (`ByteVocab.child_ranges`). What is left out (covers whose front is not canonical) is
measured against full enumeration in docs/BYTES.md.

Shapes: K tree nodes, V vocabulary, T text tokens, N scored bytes, 256 byte values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from collective.lm.byte_vocab import ByteVocab

NodeLogprobs = Callable[[torch.Tensor], torch.Tensor]
"""Node indices (k,) -> (k, V) log-probabilities of the next token after each node's path."""
TreeScorer = Callable[["TokenTree"], NodeLogprobs]


@dataclass(frozen=True)
class TokenTree:
    """A trie of token sequences; node 0 is the root (the start token). Parents come before
    children. tokens, parents (-1 for the root) and depths are (K,) int64."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def path(self, node: int) -> list[int]:
        """The token ids from the root to `node`, both included."""
        out: list[int] = []
        while node >= 0:
            out.append(int(self.tokens[node]))
            node = int(self.parents[node])
        return out[::-1]


def build_tree(root_token: int, sequences: list[list[int]]) -> tuple[TokenTree, list[int]]:
    """The trie of `[root_token] + seq` for every sequence, and the node each one ends at."""
    tokens, parents, depths = [root_token], [-1], [0]
    children: list[dict[int, int]] = [{}]
    ends: list[int] = []
    for seq in sequences:
        node = 0
        for token in seq:
            nxt = children[node].get(token)
            if nxt is None:
                nxt = len(tokens)
                children[node][token] = nxt
                children.append({})
                tokens.append(token)
                parents.append(node)
                depths.append(depths[node] + 1)
            node = nxt
        ends.append(node)
    tree = TokenTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths))
    return tree, ends


def tree_attention_mask(tree: TokenTree, window: int | None = None) -> torch.Tensor:
    """(K, K) bool: node i may attend to node k iff k is i or an ancestor of i (and, with a
    sliding `window`, fewer than `window` levels above it)."""
    size = len(tree)
    allowed = torch.zeros((size, size), dtype=torch.bool)
    parents = tree.parents.tolist()
    for node in range(size):
        if parents[node] >= 0:
            allowed[node] = allowed[parents[node]]
        allowed[node, node] = True
    if window is not None:
        gap = tree.depths[:, None] - tree.depths[None, :]  # (K, K)
        allowed &= gap < window
    return allowed


def model_tree_scorer(model: Any) -> TreeScorer:
    """A TreeScorer for a transformers causal LM (Llama, Gemma 3, ...): one forward pass over
    every node of the tree, each attending to its own path, at position id = depth; the output
    head runs per chunk of nodes so that (K, V) logits never exist at once."""

    @torch.no_grad()
    def score(tree: TokenTree) -> NodeLogprobs:
        config = model.config
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        floor = torch.finfo(dtype).min

        def additive(allowed: torch.Tensor) -> torch.Tensor:  # (1, 1, K, K)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, floor)
            return mask[None, None].to(device)

        mask: Any = additive(tree_attention_mask(tree))
        layer_types = set(getattr(config, "layer_types", None) or [])
        if "sliding_attention" in layer_types:
            sliding = additive(tree_attention_mask(tree, int(config.sliding_window)))
            mask = {"full_attention": mask, "sliding_attention": sliding}
        hidden = model.model(
            input_ids=tree.tokens[None].to(device),
            attention_mask=mask,
            position_ids=tree.depths[None].to(device),
            use_cache=False,
        ).last_hidden_state[0]  # (K, H)
        head = model.get_output_embeddings()
        cap = getattr(config, "final_logit_softcapping", None)

        @torch.no_grad()
        def logprobs(nodes: torch.Tensor) -> torch.Tensor:
            logits = head(hidden[nodes.to(device)])  # (k, V)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            return torch.log_softmax(logits.float(), dim=-1).cpu()

        return logprobs

    return score


def batch_tree_scorer(model: Any, trees: list[TokenTree]) -> list[NodeLogprobs]:
    """`model_tree_scorer` for several trees in one batched forward pass: tree b is row b,
    padded to the largest (a padding node attends to itself only and is never read)."""
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    floor = torch.finfo(dtype).min
    size = max(len(tree) for tree in trees)

    def additive(window: int | None) -> torch.Tensor:  # (B, 1, K, K)
        allowed = torch.eye(size, dtype=torch.bool).repeat(len(trees), 1, 1)
        for b, tree in enumerate(trees):
            allowed[b, : len(tree), : len(tree)] = tree_attention_mask(tree, window)
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, floor)[:, None].to(device)

    tokens = torch.zeros((len(trees), size), dtype=torch.long)
    depths = torch.zeros((len(trees), size), dtype=torch.long)
    for b, tree in enumerate(trees):
        tokens[b, : len(tree)] = tree.tokens
        depths[b, : len(tree)] = tree.depths
    mask: Any = additive(None)
    if "sliding_attention" in set(getattr(config, "layer_types", None) or []):
        mask = {"full_attention": mask, "sliding_attention": additive(int(config.sliding_window))}
    with torch.no_grad():
        hidden = model.model(
            input_ids=tokens.to(device), attention_mask=mask, position_ids=depths.to(device), use_cache=False
        ).last_hidden_state  # (B, K, H)
    head = model.get_output_embeddings()
    cap = getattr(config, "final_logit_softcapping", None)

    def scorer(b: int) -> NodeLogprobs:
        @torch.no_grad()
        def logprobs(nodes: torch.Tensor) -> torch.Tensor:
            logits = head(hidden[b, nodes.to(device)])  # (k, V)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            return torch.log_softmax(logits.float(), dim=-1).cpu()

        return logprobs

    return [scorer(b) for b in range(len(trees))]


def path_scorer(next_logprobs: Callable[[list[int]], torch.Tensor]) -> TreeScorer:
    """A TreeScorer from a plain function: token prefix -> (V,) next-token log-probabilities,
    called once per node (slow; the reference the tree pass is checked against)."""

    def score(tree: TokenTree) -> NodeLogprobs:
        @torch.no_grad()
        def logprobs(nodes: torch.Tensor) -> torch.Tensor:
            return torch.stack([next_logprobs(tree.path(int(n))) for n in nodes])

        return logprobs

    return score


@dataclass(frozen=True)
class ByteDistributions:
    """Next-byte distributions over a span: probs (N, 256) float64, rows summing to 1; the
    log-probability of each actual next byte (N,) float64 (nats); how many tree nodes and fronts
    were scored."""

    probs: torch.Tensor
    target_logprob: torch.Tensor
    tree_nodes: int
    fronts: int

    def bits_per_byte(self) -> float:
        return float(-self.target_logprob.mean() / np.log(2.0))


@dataclass(frozen=True)
class _Pair:
    """Front j, byte position n: the tokens starting with x[j:n] + b, per present byte b."""

    front: int
    position: int
    child_bytes: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _front_starts(data: bytes, start: int, end: int, vocab: ByteVocab) -> list[int]:
    """Byte offsets j whose front can matter for some position in [start, end): every j in
    [start, end), and the j < start from which some token still spans to `start`."""
    early = range(max(0, start - vocab.max_token_bytes + 1), start)
    reach = [j for j in early if _nonempty(vocab.prefix_range(data[j:start]))]
    return reach + list(range(start, end))


def _nonempty(bounds: tuple[int, int]) -> bool:
    return bounds[1] > bounds[0]


def _pairs(data: bytes, start: int, end: int, vocab: ByteVocab, fronts: list[int]) -> list[list[_Pair]]:
    """For each front j: the positions n >= max(j, start) that a token starting at j still covers."""
    memo: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    out: list[list[_Pair]] = []
    for j in fronts:
        pairs = []
        for n in range(max(j, start), end):
            prefix = data[j:n]
            if prefix not in memo:
                memo[prefix] = vocab.child_ranges(prefix)
            child_bytes, lo, hi = memo[prefix]
            if len(child_bytes):
                pairs.append(_Pair(j, n, child_bytes, lo, hi))
            if data[n] not in child_bytes:
                break  # no token starts with x[j:n+1]: none covers n+1 from j
        out.append(pairs)
    return out


def _front_masses(
    logprobs: torch.Tensor, pairs: list[_Pair], order: torch.Tensor
) -> list[torch.Tensor]:
    """logprobs (V,) of one front -> per pair (256,) float64: P(next token starts with x[j:n] b)."""
    probs = logprobs.double().exp()[order]  # (T,) in byte order
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), probs.cumsum(0)])  # (T + 1,)
    out = []
    for pair in pairs:
        mass = torch.zeros(256, dtype=torch.float64)
        lo, hi = torch.from_numpy(pair.lo), torch.from_numpy(pair.hi)
        mass[torch.from_numpy(pair.child_bytes)] = (cumulative[hi] - cumulative[lo]).clamp(min=0.0)
        out.append(mass)
    return out


def next_byte_distributions(
    data: bytes,
    start: int,
    end: int,
    *,
    vocab: ByteVocab,
    encode: Callable[[bytes], list[int]],
    root_token: int,
    scorer: TreeScorer,
    chunk_nodes: int = 128,
) -> ByteDistributions:
    """p(x[n] = b | x[:n]) for every n in [start, end) and every byte b (see the module doc).

    data: the text as UTF-8 bytes; x[:start] is context, only conditioned on. encode: a byte
    prefix -> its token ids (`encode_prefix`). root_token starts every path (the start token).
    Returns N = end - start rows.
    """
    plan = plan_fronts(data, start, end, vocab)
    tree, front_node = build_tree(root_token, [encode(data[:j]) for j in plan.fronts])
    return assemble(plan, tree, front_node, scorer(tree), vocab, chunk_nodes=chunk_nodes)


@dataclass(frozen=True)
class FrontPlan:
    """What a span needs scored: the byte offsets j of its fronts and, per front, the positions
    a token starting at j covers (`_Pair`); it depends on the text and the vocabulary only."""

    data: bytes
    start: int
    end: int
    fronts: list[int]
    pairs: list[list[_Pair]]


def plan_fronts(data: bytes, start: int, end: int, vocab: ByteVocab) -> FrontPlan:
    if not 0 <= start < end <= len(data):
        raise ValueError(f"need 0 <= start < end <= len(data), got {start}, {end}, {len(data)}")
    fronts = _front_starts(data, start, end, vocab)
    return FrontPlan(data, start, end, fronts, _pairs(data, start, end, vocab, fronts))


def _below_trunk(tree: TokenTree, front_node: list[int]) -> torch.Tensor:
    """(k,) in order: the deepest node every front passes through (their common ancestor) and
    every node below it. The tokens above it are in every front's path, so their probability
    is a common factor of every P(x[:n] b) that the normalisation cancels: never scored."""
    below = torch.zeros(len(tree), dtype=torch.long)  # fronts in each node's subtree
    for node in front_node:
        below[node] += 1
    parents = tree.parents.tolist()
    for node in range(len(tree) - 1, 0, -1):
        below[parents[node]] += below[node]
    trunk = torch.nonzero(below == len(front_node)).squeeze(1)  # the root down to the common ancestor
    common = int(trunk[tree.depths[trunk].argmax()])
    keep = below > 0
    keep[trunk] = False
    keep[common] = True
    return torch.nonzero(keep).squeeze(1)


def assemble(
    plan: FrontPlan,
    tree: TokenTree,
    front_node: list[int],
    logprobs_of: NodeLogprobs,
    vocab: ByteVocab,
    *,
    chunk_nodes: int = 128,
) -> ByteDistributions:
    """The span's next-byte distributions from a scored tree whose node `front_node[i]` ends the
    tokens of front `plan.fronts[i]`."""
    node_pairs = {node: plan.pairs[i] for i, node in enumerate(front_node)}
    order = torch.from_numpy(vocab.order)
    edge = torch.zeros(len(tree), dtype=torch.float64)  # log P(token of node | parent's path)
    masses: dict[int, list[torch.Tensor]] = {}
    parents = tree.parents
    scored = _below_trunk(tree, front_node)  # (k,) the nodes whose next-token distribution matters
    at = torch.full((len(tree),), -1, dtype=torch.long)
    at[scored] = torch.arange(len(scored))
    for lo in range(0, len(scored), chunk_nodes):
        nodes = scored[lo : lo + chunk_nodes]
        logprobs = logprobs_of(nodes)  # (k, V)
        kids = torch.nonzero((at[parents.clamp(min=0)] >= lo) & (at[parents.clamp(min=0)] < lo + len(nodes)) & (parents >= 0)).squeeze(1)
        edge[kids] = logprobs[at[parents[kids]] - lo, tree.tokens[kids]].double()
        for row, node in enumerate(nodes.tolist()):
            if node in node_pairs:
                masses[node] = _front_masses(logprobs[row], node_pairs[node], order)
    path = edge.clone()
    for node in range(1, len(tree)):
        path[node] += path[int(parents[node])]  # log P(path of node), root excluded
    start, end = plan.start, plan.end
    joint = torch.full((end - start, 256), -torch.inf, dtype=torch.float64)  # log P(x[:n] b)
    for i, node in enumerate(front_node):
        for pair, mass in zip(plan.pairs[i], masses.get(node, []), strict=True):
            row = pair.position - start
            joint[row] = torch.logaddexp(joint[row], path[node] + mass.log())
    probs = torch.softmax(joint, dim=-1)  # (N, 256)
    targets = torch.tensor(list(plan.data[start:end]))
    target_logprob = joint.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(joint, dim=-1)
    return ByteDistributions(probs, target_logprob, len(tree), len(plan.fronts))
