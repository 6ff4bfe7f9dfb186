"""What the yardstick's forced token boundary costs, in bits/byte, on real text.

A yardstick with another tokenizer than the stream's encodes each round's text apart from its
context (`collective.run.yardstick`), so no token of its own crosses the round's start. Per
round, with the same context text, this compares the yardstick's NLL of context + round
(1) encoded as the run does, the two parts apart, and (2) encoded jointly, as one string: both
cover exactly the same bytes from the same start, so their difference is the forced boundary's
cost alone, reported per byte of the rounds. Also its bits/byte as the run scores it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/yardstick.py --threads 1 [--stream smollm2-135m] \
        [--yardstick gemma3-270m] [--rounds 16]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from collective.lm.byte_vocab import byte_vocab, encode_span
from collective.lm.codec import start_token
from collective.lm.corpus import load_corpus_text, token_byte_lengths, tokenize_stream
from collective.lm.models import LoadedModel, ModelPool
from collective.lm.scoring import ScoreItem, score_items
from collective.run.yardstick import Yardstick


def sequence_nll(lm: LoadedModel, ids: list[int]) -> float:
    """Summed NLL (nats) of every token of `ids` after the start token."""
    bos = torch.tensor([start_token(lm.tokenizer)])
    row = torch.tensor(ids, dtype=torch.long)
    preds = score_items(lm.model, [ScoreItem(bos, row, row)], pad_id=int(bos.item()), top_k=1)
    return float(-preds.target_logprob.double().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="smollm2-135m")
    parser.add_argument("--yardstick", default="gemma3-270m")
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--round-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = ModelPool()
    stream_lm, lm = pool.get(args.stream), pool.get(args.yardstick)
    text = load_corpus_text(args.corpus, None, base_dir=Path.cwd())
    stream = tokenize_stream(text, stream_lm.tokenizer, args.context + args.rounds * args.round_tokens)
    lengths = token_byte_lengths(stream, stream_lm.tokenizer)
    stream_vocab, vocab = byte_vocab(stream_lm.tokenizer), byte_vocab(lm.tokenizer)
    yardstick = Yardstick(lm, args.yardstick, stream_vocab=stream_vocab, vocab=vocab)
    began = time.perf_counter()
    scored, apart, joint, n_bytes, n_tokens = 0.0, 0.0, 0.0, 0, 0
    for r in range(args.rounds):
        start = args.context + r * args.round_tokens
        end = start + args.round_tokens
        context, round_ids = stream[start - args.context : start], stream[start:end]
        stats = yardstick.score(context, round_ids, lengths[start:end], top_k=8, batch_tokens=8192)
        scored += float(stats.nll_sum.sum())
        n_tokens += int(stats.n_tokens.sum())
        n_bytes += int(stats.n_bytes.sum())
        ctx_bytes, round_bytes = stream_vocab.decode(context.tolist()), stream_vocab.decode(round_ids.tolist())
        apart += sequence_nll(lm, encode_span(lm.tokenizer, vocab, ctx_bytes) + encode_span(lm.tokenizer, vocab, round_bytes))
        joint += sequence_nll(lm, encode_span(lm.tokenizer, vocab, ctx_bytes + round_bytes))
    bits = 1 / math.log(2.0) / n_bytes
    print(
        f"yardstick {args.yardstick} on a {args.stream} stream of {args.corpus}: {args.rounds} rounds of "
        f"{args.round_tokens} stream tokens after {args.context} ({n_bytes} bytes, {n_tokens} of its tokens, "
        f"{time.perf_counter() - began:.1f} s)"
    )
    print(f"as the run scores it (forced boundary): {scored * bits:.4f} bits/byte")
    print(f"context + round encoded apart vs jointly: {(apart - joint) * bits:+.4f} bits/byte of the rounds (over-estimate)")


if __name__ == "__main__":
    main()
