"""What a round costs a node on the wire in a distributed run: its request envelope (coordinator
-> node) plus its result envelope (node -> coordinator), encoded as the runtime encodes them
(protocol 5). Messages (at most a link's byte budget each) are left out: they are the same
in either unit.

    python bench/wire_bytes.py                          # the shapes table only
    python bench/wire_bytes.py --scenario FILE --threads 1   # and a real scenario's rounds

The shapes table encodes synthetic rounds: a token round (R stream tokens, three rows of top-K)
against a byte round (B bytes, three byte rows of 256 log-probabilities a byte), a view of
P tokens before the round. With --scenario, every round of the scenario is computed embedded
and each node's request and result are encoded as the coordinator and the node would send
them (a byte-unit scenario: the nodes' own tokens and byte rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collective.distributed.payloads import MessageKey, RequestPayload, ResultPayload  # noqa: E402
from collective.distributed.protocol import COORDINATOR, encode, envelope  # noqa: E402
from collective.lm.byte_rows import as_predictions  # noqa: E402
from collective.lm.predictions import TokenPredictions  # noqa: E402
from collective.run.node import NodeRoundRequest, NodeRoundResult  # noqa: E402
from collective.scenario import SilentMessage  # noqa: E402

VOCAB = 49_152  # SmolLM2's: 5-digit ids in the request


def _request_bytes(request: NodeRoundRequest, n_inbox: int, round_index: int) -> int:
    keys = [MessageKey(sender=f"n{i}", round_sent=round_index, digest="0" * 16) for i in range(n_inbox)]
    return len(encode(envelope("run", COORDINATOR, RequestPayload.from_request(request, keys, 30.0), round_index)))


def _result_bytes(result: NodeRoundResult, in_bytes: bool, round_index: int) -> int:
    payload = ResultPayload.from_result(result, "s" * 12, 0.25, {}, 0, in_bytes=in_bytes)
    return len(encode(envelope("run", result.node_id, payload, round_index)))


def shapes_row(round_tokens: int, round_bytes: int, view_tokens: int, top_k: int, prompted: bool) -> tuple[int, int, int, int]:
    """(token request, token result, byte request, byte result) in bytes for one node's round;
    prompted: the node has a control prompt (three distinct rows; else plain = isolated, sent once)."""
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10_000, VOCAB, (n,), generator=gen)  # noqa: E731
    request = NodeRoundRequest(
        node_id="a", round_index=5, control_ids=[], prefix_ids=ids(view_tokens), round_inputs=ids(round_tokens),
        targets=ids(round_tokens), message=SilentMessage(), message_tokens=0, seed=0,
    )
    def token_row() -> TokenPredictions:
        logprobs = torch.log_softmax(torch.randn(1, round_tokens, VOCAB, generator=gen), -1)
        top, top_ids = logprobs.topk(top_k, -1)
        return TokenPredictions(logprobs[..., 0], top_ids, top, VOCAB)

    data = bytes(torch.randint(32, 127, (round_bytes,), generator=gen).tolist())

    def byte_row() -> TokenPredictions:
        return as_predictions(torch.log_softmax(torch.randn(round_bytes, 256, generator=gen), -1), data)

    rows = [token_row(), token_row(), token_row()]
    token_result = NodeRoundResult("a", 5, rows[0], rows[1], rows[2] if prompted else rows[1], None, 0)
    rows = [byte_row(), byte_row(), byte_row()]
    byte_result = NodeRoundResult("a", 5, rows[0], rows[1], rows[2] if prompted else rows[1], None, 0)
    byte_request = NodeRoundRequest(**{**request.__dict__, "round_bytes": data})
    return (
        _request_bytes(request, 0, 5), _result_bytes(token_result, False, 5),
        _request_bytes(byte_request, 0, 5), _result_bytes(byte_result, True, 5),
    )


def scenario_rounds(path: Path) -> list[tuple[str, int, int, int]]:
    """(node, round, request bytes, result bytes) of every node and round of the scenario."""
    from collective.lm.models import ModelPool
    from collective.run.engine import EmbeddedExecutor, RoundEngine
    from collective.run.runner import prepare
    from collective.scenario import load_scenario

    prepared = prepare(load_scenario(path), ModelPool(), base_dir=path.parent)
    engine = RoundEngine.from_prepared(prepared, EmbeddedExecutor.from_prepared(prepared), "bench")
    rows = []
    for round_index in range(engine.total_rounds):
        requests = engine.requests(round_index)
        executor = engine.executor
        assert isinstance(executor, EmbeddedExecutor)
        inboxes = {r.node_id: len(r.inbox_messages) for r in executor.with_inboxes(round_index, requests)}  # read before it speaks
        results = executor.run_round(round_index, requests)
        for request in requests:
            result = results[request.node_id]
            assert result is not None
            rows.append((
                request.node_id, round_index, _request_bytes(request, inboxes[request.node_id], round_index),
                _result_bytes(result, request.round_bytes is not None, round_index),
            ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("round (R tokens ~ B bytes, view P tokens, top-K, rows sent) | token round: request + result | byte round: request + result")
    print("(2 rows: no control prompt, the plain row is the isolated one and goes once; 3 rows: a control prompt)")
    shapes = ((8, 32, 24, 8), (16, 64, 64, 64), (32, 128, 128, 64), (64, 256, 256, 64))
    for (round_tokens, round_bytes, view_tokens, top_k), prompted in [(shape, p) for p in (False, True) for shape in shapes]:
        tq, tr, bq, br = shapes_row(round_tokens, round_bytes, view_tokens, top_k, prompted)
        print(
            f"R={round_tokens:>3} ~ B={round_bytes:>3}, P={view_tokens:>3}, K={top_k:>2}, {'3 rows' if prompted else '2 rows'} | "
            f"{tq:>6} + {tr:>7} = {tq + tr:>7} | {bq:>6} + {br:>7} = {bq + br:>7} ({(bq + br) / (tq + tr):.1f}x)"
        )
    if args.scenario is not None:
        rows = scenario_rounds(args.scenario)
        for node_id in sorted({r[0] for r in rows}):
            mine = [r for r in rows if r[0] == node_id]
            mean_q = sum(r[2] for r in mine) / len(mine)
            mean_r = sum(r[3] for r in mine) / len(mine)
            print(
                f"{args.scenario.name} node {node_id}: {len(mine)} rounds, request {mean_q:.0f} B (max {max(r[2] for r in mine)}), "
                f"result {mean_r:.0f} B (max {max(r[3] for r in mine)}), a round {mean_q + mean_r:.0f} B on average"
            )


if __name__ == "__main__":
    main()
