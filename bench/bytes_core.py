"""The byte path's CORE only (collective/lm/bytes.py), not a round of the engine: on SmolLM2,
one span of WikiText scored per byte (tree pass over the fronts) against a plain token-level
scoring pass of the same text; bits/byte of both; and, on a few short strings, the canonical-
front chain against the exact marginal over every tokenization.

    .venv/bin/python bench/bytes_core.py --threads 1 [--span-bytes 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch

from collective.lm.byte_exact import cover_chain_logprobs
from collective.lm.byte_vocab import ByteVocab, byte_vocab, encode_prefix
from collective.lm.bytes import model_tree_scorer, next_byte_distributions
from collective.lm.codec import start_token
from collective.lm.models import load_model

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


class ChainArgs(TypedDict):
    """The keywords both byte paths share (typed, so that `**kw` is checked per key)."""

    vocab: ByteVocab
    encode: Callable[[bytes], list[int]]
    root_token: int


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context-tokens", type=int, default=128)
    parser.add_argument("--span-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--offset", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    tok, model = lm.tokenizer, lm.model
    vocab = byte_vocab(tok)
    root = start_token(tok)
    text = WIKI.read_text(encoding="utf-8")[args.offset : args.offset + 20000]
    ids = tok.encode(text, add_special_tokens=False)[: args.context_tokens + args.span_tokens]
    data = vocab.decode(ids)
    start = len(vocab.decode(ids[: args.context_tokens]))
    kw = ChainArgs(vocab=vocab, encode=lambda b: encode_prefix(tok, vocab, b), root_token=root)

    def token_pass() -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[root] + ids])).logits[0, :-1]  # (L, V)
            lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        return float(-lp[args.context_tokens :].sum())

    token_times, byte_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        token_nats = token_pass()
        token_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dist = next_byte_distributions(data, start, len(data), scorer=model_tree_scorer(model), **kw)
        byte_times.append(time.perf_counter() - t0)
    span = len(data) - start
    print(f"span {span} bytes, {args.span_tokens} tokens after {args.context_tokens} context tokens; "
          f"tree {dist.tree_nodes} nodes, {dist.fronts} fronts")
    print(f"rows sum to 1 within {float((dist.probs.sum(-1) - 1).abs().max()):.2e}")
    print(f"token-level bits/byte {token_nats / span / math.log(2):.4f}; byte chain bits/byte {dist.bits_per_byte():.4f}")
    tok_med, byte_med = statistics.median(token_times), statistics.median(byte_times)
    print(f"per 100 bytes (median of {args.repeats}): token pass {100 * tok_med / span:.3f} s, "
          f"byte path {100 * byte_med / span:.3f} s, ratio {byte_med / tok_med:.1f}x")
    for short in (b" the city of", b"Valkyria Chron", b" in 2011, he"):
        canon = cover_chain_logprobs(short, scorer=model_tree_scorer(model), fronts="canonical", **kw)
        exact = cover_chain_logprobs(short, scorer=model_tree_scorer(model), fronts="all", **kw)
        gap = float((exact - canon).sum()) / len(short) / math.log(2)
        print(f"{short!r}: canonical {float(-canon.mean()) / math.log(2):.4f} bits/byte, exact "
              f"{float(-exact.mean()) / math.log(2):.4f}, exact - canonical {gap:+.5f} bits/byte")


if __name__ == "__main__":
    main()
