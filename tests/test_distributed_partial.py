"""A distributed run that loses a node for good: its rows are counted over the rounds it
served and marked, the best member is chosen among the nodes scored on every round, and the
verdict says who missed what. Reuses test_distributed's world (the embedded reference run),
its node processes and its coordinator helper."""

from __future__ import annotations

import pytest

from collective.distributed.coordinator import MqttExecutor
from collective.records import MEMBER_ROWS, RoundEvent, parse_event
from tests import test_distributed as dist
from tests.mosquitto import running_broker

pytestmark = pytest.mark.mqtt

world = dist.world  # the module's fixtures, shared by name
nodes = dist.nodes
LOST = "c"


def test_a_node_lost_mid_run_leaves_partial_rows_that_the_report_marks(world, nodes, tmp_path):
    run_dir = tmp_path / "run-lost"
    with running_broker(tmp_path / "broker") as broker:

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 1:
                nodes.processes[LOST].kill()  # SIGKILL, never restarted
                nodes.processes[LOST].wait()

        for node_id in dist.NODES:
            nodes.start(broker.url(), run_dir.name, node_id)
        result, _, _ = dist._run(world, broker.url(), run_dir, on_event)
        assert {n: p.wait(timeout=30) for n, p in nodes.processes.items() if n != LOST} == {"a": 0, "b": 0}
    report = result.report
    assert result.status == "complete" and report is not None
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    missed = [e.eval_round for e in events if isinstance(e, RoundEvent) and e.phase == "eval" for n in e.nodes if n.missed]
    n_eval, served = report.n_eval_rounds, report.n_eval_rounds - len(missed)
    assert missed == list(range(n_eval - len(missed), n_eval)) and 0 < served < n_eval  # gone from round 2 on

    for kind in MEMBER_ROWS:
        row = report.row(kind, LOST)
        assert (row.n_rounds, row.n_tokens) == (served, served * report.round_tokens) and report.is_partial(row)
        assert report.row(kind, "a").n_rounds == n_eval
    assert report.partial_members == [LOST] and report.missed_rounds == {LOST: len(missed)}
    embedded_best = min(("a", "b"), key=lambda n: world.embedded.row("member_isolated", n).nll)
    assert report.best_member == embedded_best
    assert report.best_member_rule.endswith(f"not eligible: {LOST} (missed {len(missed)} of {n_eval})")
    assert report.collective_gain.n_rounds == report.communication_gain.n_rounds == n_eval
    assert f"Missed eval rounds: {LOST} {len(missed)} of {n_eval}" in report.verdict
    # the nodes that stayed lost nothing: their message-free rows are the embedded ones
    kept = {(kind, node) for kind in ("member_plain", "member_isolated") for node in ("a", "b")} | {("reference", None)}
    dist._assert_same_evaluation(world.embedded, report, rows=kept)
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"| member, isolated [{LOST}]* |" in markdown and f"| {served}/{n_eval} rounds |" in markdown
