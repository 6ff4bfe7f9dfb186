"""The run's PNGs, drawn from a small real run of a tiny model, opened and checked."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from PIL import Image

from collective.cli import main
from collective.live.replay import read_events
from collective.records import Report, RoundEvent, RunStart
from collective.report.plots import (
    GAINS_PLOT,
    NLL_PLOT,
    TOPOLOGY_PLOT,
    forest_rows,
    member_gains,
    messages_carried,
    node_positions,
    plot_gains,
    plot_reach,
    plot_topology,
    write_run_plots,
)
from tests.test_compare import make_report
from tests.test_live import synthetic_run

TINY_SCENARIO = """\
name: tiny-plots
seed: 0
corpus: {{source: "builtin:pydoc", train_tokens: 96, eval_tokens: {eval_tokens}}}
models: {{tiny: {model_dir}}}
node_defaults: {{model: tiny, message: {{policy: generate}}}}
nodes:
  - {{id: a, view: {{kind: window, tokens: 32}}}}
  - {{id: b, view: {{kind: lagged, tokens: 32, lag: 16}}}}
  - {{id: c, view: {{kind: none}}, message: {{policy: relay}}}}
topology: {{kind: ring}}
bus: {{round_tokens: 16, max_message_tokens: 8, max_message_bytes: 60}}
evaluation: {{warmup_rounds: 1, context_tokens: 64}}
"""


def write_tiny_scenario(folder: Path, tokenizer, model, eval_tokens: int = 48) -> Path:  # type: ignore[no-untyped-def]
    """A 3-node ring of the tiny random Llama, saved as a local model folder: a real run in seconds."""
    model_dir = folder / "tiny-model"
    if not model_dir.exists():
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    path = folder / "tiny.yaml"
    path.write_text(TINY_SCENARIO.format(model_dir=model_dir, eval_tokens=eval_tokens), encoding="utf-8")
    return path


def assert_real_png(path: Path, min_width: int = 500, min_height: int = 300) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        extrema = image.convert("L").getextrema()
        assert extrema[0] < 100 < 200 < extrema[1], "the image is blank"  # dark ink on a light page
        histogram = image.convert("L").histogram()
        assert sum(histogram[:200]) > 0.005 * image.width * image.height, "almost nothing is drawn"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tok, tiny_lm) -> Path:
    folder = tmp_path_factory.mktemp("tiny-run")
    scenario = write_tiny_scenario(folder, tiny_tok, tiny_lm)
    assert main(["run", str(scenario), "--out", str(folder / "run"), "--no-live", "--quiet"]) == 0
    return folder / "run"


def test_every_run_leaves_three_pngs_in_its_folder(tiny_run):
    for name in (NLL_PLOT, GAINS_PLOT, TOPOLOGY_PLOT):
        assert_real_png(tiny_run / name)


def test_report_md_embeds_the_plots(tiny_run):
    text = (tiny_run / "report.md").read_text(encoding="utf-8")
    for name in (NLL_PLOT, GAINS_PLOT, TOPOLOGY_PLOT):
        assert f"]({name})" in text


def test_member_gains_are_isolated_minus_in_collective_nll(tiny_run):
    report = Report.model_validate_json((tiny_run / "report.json").read_text(encoding="utf-8"))
    gains = member_gains(report)
    assert set(gains) == {"a", "b", "c"}
    expected = report.row("member_isolated", "a").nll - report.row("member_collective", "a").nll
    assert gains["a"] == pytest.approx(expected)


def test_a_plot_that_fails_logs_a_warning_and_the_others_are_still_drawn(tiny_run, tmp_path, monkeypatch, caplog):
    import collective.report.plots as plots

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "events.jsonl").write_bytes((tiny_run / "events.jsonl").read_bytes())
    report = Report.model_validate_json((tiny_run / "report.json").read_text(encoding="utf-8"))

    def broken(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("no ink left")

    monkeypatch.setattr(plots, "plot_gains", broken)
    with caplog.at_level(logging.WARNING, logger="collective.report.plots"):
        images = write_run_plots(copy, report)
    assert [name for _, name in images] == [NLL_PLOT, TOPOLOGY_PLOT]
    assert "no ink left" in caplog.text and not (copy / GAINS_PLOT).exists()


def test_a_folder_without_events_gets_no_plots_and_no_exception(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="collective.report.plots"):
        assert write_run_plots(tmp_path, make_report(0, 3.3)) == []
    assert "cannot read its events" in caplog.text


def test_a_32_node_topology_plot_is_drawn_with_every_node(tmp_path):
    events = synthetic_run(n_nodes=32)
    start = events[0]
    assert isinstance(start, RunStart)
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    report = make_report(0, 3.3, nodes=tuple(n.node_id for n in start.nodes))
    assert_real_png(plot_topology(start, report, tmp_path / "topology.png", rounds))



def test_a_link_carries_the_messages_delivered_on_it_and_not_the_dropped_ones():
    rounds = [e for e in synthetic_run(n_nodes=4, drop_rate=0.3) if isinstance(e, RoundEvent)]
    carried = messages_carried(rounds)
    messages = [m for event in rounds for m in event.messages]
    assert any(m.dropped for m in messages)
    assert sum(carried.values()) == sum(not m.dropped for m in messages)
    for (sender, receiver), count in carried.items():
        on_link = [m for m in messages if (m.sender, m.receiver) == (sender, receiver)]
        assert count == sum(not m.dropped for m in on_link) > 0
    assert messages_carried([]) == {}


def test_node_positions_are_deterministic_and_inside_the_unit_square():
    nodes = [f"n{i}" for i in range(12)]
    edges = [(nodes[i], nodes[(i + 1) % 12]) for i in range(12)] + [("n0", "n6")]
    first = node_positions(nodes, edges)
    assert first == node_positions(nodes, list(reversed(edges)))
    assert all(0.0 <= x <= 1.0 and 0.0 <= y <= 1.0 for x, y in first.values())


def test_the_reach_plot_takes_plain_data_and_the_papers_points(tmp_path):
    summaries = [
        {"targets": "true", "n_pairs": 25, "fraction": {0: 0.3, 1: 0.6, 2: 0.75, 3: 0.85, 4: 0.9, 6: 0.95, 8: 0.96, 10: 0.98}},
        {"targets": "random", "n_pairs": 25, "fraction": {0: 0.0, 1: 0.05, 2: 0.1, 3: 0.2, 4: 0.25, 6: 0.3, 8: 0.4, 10: 0.45}},
    ]
    published = [
        {"model": "Falcon-7B", "targets": "true", "k": 10, "low": 0.972, "high": 0.972},
        {"model": "Falcon-7B", "targets": "random", "k": 10, "low": 0.46, "high": 0.46},
        {"model": "three 7B models", "targets": "top75", "k": 10, "low": 0.85, "high": 0.89},
    ]
    assert_real_png(plot_reach(summaries, tmp_path / "reach.png", published))


def test_the_reach_plot_reads_the_reach_librarys_summaries():
    reach = pytest.importorskip("controllers.reach")
    summary = reach.ReachSummary(
        targets="true", n_pairs=4, ks=(0, 1), reached={0: 1, 1: 3}, fraction={0: 0.25, 1: 0.75},
        published=tuple(p for p in reach.PUBLISHED if p.targets == "true"),
    )
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        assert_real_png(plot_reach([summary], Path(folder) / "reach.png"))


def test_the_nll_plot_covers_every_round_of_the_run(tiny_run):
    events = read_events(tiny_run / "events.jsonl")
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    assert len(rounds) == 1 + 3  # one warm-up and three eval rounds of 16 tokens
    assert all(math.isfinite(e.nll_collective) for e in rounds)


def test_the_gains_plot_draws_a_byte_reports_yardstick_and_leaves_out_one_of_another_tokenizer(tmp_path):
    from tests.report_fixtures import as_byte_report, full_token_report

    token = full_token_report()  # its yardstick scored 300 of its own tokens for 320 eval tokens
    assert "yardstick" not in [row.row for row in forest_rows(token)]
    byte = as_byte_report(token)  # every row, the yardstick's too, per byte of the same text
    assert [row.row for row in forest_rows(byte)][-1] == "yardstick"
    assert_real_png(plot_gains(byte, tmp_path / "gains.png"))
