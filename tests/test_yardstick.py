"""The yardstick (`evaluation.yardstick`): a bigger model with the full view, scored in bits/byte
on the same eval text whatever its tokenizer, and the share of the best member's gap to it that
the collective closes, with its interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from collective.cli import main
from collective.evaluate.gains import yardstick_line
from collective.evaluate.intervals import critical_value, gap_share, lag1_variance
from collective.evaluate.metrics import LN2, RoundStats, summarize
from collective.lm.byte_vocab import byte_vocab, encode_span
from collective.lm.models import ModelPool
from collective.records import Report
from collective.report.report_view import report_markdown
from collective.run.engine import EmbeddedExecutor
from collective.run.prepared import RunError
from collective.run.runner import prepare, run_prepared
from collective.scenario import load_scenario
from tests.test_rundir import write_tiny_scenario
from tests.tiny import pydoc_text, tiny_llama, tiny_tokenizer

WARMUP, EVAL_ROUNDS, ROUND, CONTEXT = 1, 5, 8, 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- the gap share, by hand


def _stats(nll: list[float], n_bytes: list[int]) -> RoundStats:
    ints = torch.tensor(n_bytes, dtype=torch.long)
    return RoundStats(torch.tensor(nll, dtype=torch.float64), ints // 4 + 1, ints * 0, ints, ints * 0)


BYTES = [40, 36, 44, 38, 42, 35, 41, 39]
BEST = [30.0, 29.0, 33.5, 27.0, 31.0, 25.5, 30.5, 28.0]
COLLECTIVE = [27.0, 27.5, 30.0, 25.5, 28.0, 24.0, 27.0, 26.5]
YARDSTICK = [22.0, 21.0, 25.0, 20.5, 23.0, 19.0, 22.5, 21.0]


def _share(weights: torch.Tensor) -> float:
    """(bpb_B - bpb_C) / (bpb_B - bpb_Y) recomputed from scratch with round weights (R,)."""
    n_bytes = torch.tensor(BYTES, dtype=torch.float64) * weights

    def bpb(nll: list[float]) -> float:
        return float((torch.tensor(nll, dtype=torch.float64) * weights).sum() / LN2 / n_bytes.sum())

    return (bpb(BEST) - bpb(COLLECTIVE)) / (bpb(BEST) - bpb(YARDSTICK))


def test_the_share_is_the_ratio_of_the_rows_bits_per_byte_differences():
    found = gap_share(_stats(BEST, BYTES), _stats(COLLECTIVE, BYTES), _stats(YARDSTICK, BYTES))
    bpb = {name: summarize(_stats(nll, BYTES)).bits_per_byte for name, nll in (("b", BEST), ("c", COLLECTIVE), ("y", YARDSTICK))}
    assert found.defined
    assert found.share.value == pytest.approx((bpb["b"] - bpb["c"]) / (bpb["b"] - bpb["y"]), rel=1e-12)
    assert found.gap.value == pytest.approx(bpb["b"] - bpb["y"], rel=1e-12)
    assert found.closed.value == pytest.approx(bpb["b"] - bpb["c"], rel=1e-12)


def test_the_share_interval_matches_a_brute_delta_method_by_perturbing_each_round():
    """The linearised residual of a round is R times the derivative of the share with respect to
    that round's weight (an empirical influence function): computed here by central finite
    differences of the share recomputed from scratch, then the same calibrated interval.
    Leaving out the share's own term of the linearisation (z_N / D) changes the width by ~20%."""
    found = gap_share(_stats(BEST, BYTES), _stats(COLLECTIVE, BYTES), _stats(YARDSTICK, BYTES))
    n_rounds, step = len(BYTES), 1e-6
    influence = torch.zeros(n_rounds, dtype=torch.float64)
    for r in range(n_rounds):
        up, down = torch.ones(n_rounds, dtype=torch.float64), torch.ones(n_rounds, dtype=torch.float64)
        up[r], down[r] = 1 + step, 1 - step
        influence[r] = n_rounds * (_share(up) - _share(down)) / (2 * step)
    assert abs(float(influence.sum())) < 1e-5  # the share does not change when every round weighs more
    half = critical_value(n_rounds) * math.sqrt(float(lag1_variance(influence)) / n_rounds)
    assert found.share.high - found.share.value == pytest.approx(half, rel=1e-5)
    assert found.share.value - found.share.low == pytest.approx(half, rel=1e-5)


def test_a_collective_as_good_as_the_yardstick_closes_the_whole_gap_and_one_as_the_best_member_none():
    best, yardstick = _stats(BEST, BYTES), _stats(YARDSTICK, BYTES)
    whole = gap_share(best, yardstick, yardstick)
    assert whole.share.value == pytest.approx(1.0) and whole.share.low == pytest.approx(1.0) and whole.share.high == pytest.approx(1.0)
    none = gap_share(best, best, yardstick)
    assert none.share.value == 0.0 and none.share.low == pytest.approx(0.0) and none.share.high == pytest.approx(0.0)


def test_the_share_is_undefined_when_the_yardstick_is_not_better_than_the_best_member():
    best, collective = _stats(BEST, BYTES), _stats(COLLECTIVE, BYTES)
    worse = gap_share(best, collective, _stats([x + 1.0 for x in BEST], BYTES))
    assert not worse.defined and math.isnan(worse.share.value) and not worse.share.has_interval
    assert worse.gap.value < 0
    noisy = [b - 0.5 + (2.5 if r % 2 else -2.5) for r, b in enumerate(BEST)]  # better on average, CI straddles 0
    straddle = gap_share(best, collective, _stats(noisy, BYTES))
    assert straddle.gap.value > 0 and straddle.gap.low < 0 and not straddle.defined


def test_below_four_rounds_the_share_has_a_value_and_no_interval():
    found = gap_share(_stats(BEST[:3], BYTES[:3]), _stats(COLLECTIVE[:3], BYTES[:3]), _stats(YARDSTICK[:3], BYTES[:3]))
    assert found.defined and 0 < found.share.value < 1 and not found.share.has_interval


def test_the_verdict_sentence_gives_the_share_with_its_interval_or_says_it_is_undefined():
    best, collective = _stats(BEST, BYTES), _stats(COLLECTIVE, BYTES)
    found = gap_share(best, collective, _stats(YARDSTICK, BYTES))
    line = yardstick_line(found, "big")
    share = f"{100 * found.share.value:.0f}%"
    assert line.startswith(f"The collective closes {share} of the gap between its best member and the yardstick (big) (95% CI ")
    assert f"{100 * found.share.low:.0f}% to {100 * found.share.high:.0f}%" in line
    worse = yardstick_line(gap_share(best, collective, _stats([x + 1.0 for x in BEST], BYTES)), "big")
    assert "is undefined" in worse and "closes" in worse and "% of the gap" not in worse


# ---------------------------------------------------------------------------- bytes across tokenizers


def test_a_span_cut_inside_characters_encodes_to_tokens_that_spell_it_exactly():
    tok = tiny_tokenizer(384)
    vocab = byte_vocab(tok)
    data = "caf\u00e9 \u6771\u4eac \U0001f642 def f(x):\n    return x".encode()
    for start in range(len(data)):
        for end in (start + 1, start + 5, len(data)):
            span = data[start:end]
            assert vocab.decode(encode_span(tok, vocab, span)) == span, (start, end)


# ---------------------------------------------------------------------------- runs


def _save(folder: Path, vocab_size: int, seed: int) -> Path:
    if not folder.exists():
        tok = tiny_tokenizer(vocab_size)
        tiny_llama(len(tok), seed=seed).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def _scenario(folder: Path, model_dir: Path, yardstick: str | None, name: str = "yard") -> Path:
    """The run folder tests' tiny scenario, with this file's rounds and an optional yardstick."""
    evaluation = {"context_tokens": CONTEXT, "warmup_rounds": WARMUP, "top_k": 8} | ({"yardstick": yardstick} if yardstick else {})
    return write_tiny_scenario(
        folder, model_dir, name=name, evaluation=evaluation,
        corpus={"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": ROUND * EVAL_ROUNDS},
        bus={"round_tokens": ROUND, "max_message_tokens": 4},
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("yardstick")
    return {"root": root, "members": _save(root / "members", 512, 0), "other": _save(root / "other", 384, 7)}


def _run(folders: dict[str, Path], yardstick: str | None, name: str) -> tuple[Report, dict]:
    root = folders["root"]
    scenario = load_scenario(_scenario(root, folders["members"], yardstick, name))
    prepared = prepare(scenario, ModelPool(cache_dir=root / "cache"), base_dir=root)
    result = run_prepared(prepared, root / f"run-{name}")
    assert result.report is not None
    return result.report, json.loads((root / f"run-{name}" / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(folders) -> dict[str, tuple[Report, dict]]:
    return {
        "none": _run(folders, None, "none"),
        "same": _run(folders, "tiny", "same"),
        "other": _run(folders, str(folders["other"]), "other"),
    }


def _numbers(data: dict) -> dict:
    """A report.json without what changes from run to run (names, times) or with the schema."""
    drop = {"run_id", "scenario", "wall_seconds", "tokens_per_second", "schema_version", "yardstick"}
    return {k: v for k, v in data.items() if k not in drop}


def test_a_run_without_a_yardstick_has_no_yardstick_row_and_the_same_numbers(runs):
    report, data = runs["none"]
    assert data["yardstick"] is None and all(row["row"] != "yardstick" for row in data["rows"])
    assert "yardstick" not in report.verdict and "yardstick" not in report_markdown(report)
    _, with_it = runs["other"]  # the yardstick adds its row and its sentence; every other number is the same
    rows = [row for row in with_it["rows"] if row["row"] != "yardstick"]
    assert rows == data["rows"] and len(with_it["rows"]) == len(rows) + 1
    assert with_it["verdict"].startswith(data["verdict"]) and with_it["verdict"] != data["verdict"]
    assert {**_numbers(with_it), "rows": rows, "verdict": data["verdict"]} == _numbers(data)


def test_a_yardstick_with_the_stream_tokenizer_reads_the_stream_tokens_as_the_reference_does(runs):
    report, _ = runs["same"]  # the yardstick is the reference's model: the two rows must agree
    reference, yardstick = report.row("reference"), report.row("yardstick")
    assert yardstick.model == "tiny" and yardstick.n_rounds == EVAL_ROUNDS
    assert yardstick.n_tokens == reference.n_tokens == report.n_eval_tokens
    assert yardstick.nll == pytest.approx(reference.nll, abs=1e-6)
    assert yardstick.bits_per_byte == pytest.approx(reference.bits_per_byte, abs=1e-6)


def _brute_yardstick(folders: dict[str, Path]) -> tuple[float, int, int]:
    """The other-tokenizer yardstick recomputed without the library: the stream text per round,
    its context text, each tokenized alone by the yardstick, one plain forward pass per round."""
    stream_tok, tok = tiny_tokenizer(512), tiny_tokenizer(384)
    model = tiny_llama(len(tok), seed=7)
    ids = stream_tok(pydoc_text(), add_special_tokens=False)["input_ids"][: 48 + ROUND * EVAL_ROUNDS]
    nll, n_tokens, n_bytes = 0.0, 0, 0
    for r in range(EVAL_ROUNDS):
        start = 48 + r * ROUND
        context = stream_tok.decode(ids[start - CONTEXT : start])
        text = stream_tok.decode(ids[start : start + ROUND])
        ctx_ids, round_ids = tok.encode(context, add_special_tokens=False), tok.encode(text, add_special_tokens=False)
        inputs = torch.tensor([[tok.bos_token_id, *ctx_ids, *round_ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs).logits[0].double(), -1)  # (L, V)
        first = 1 + len(ctx_ids)  # position of the round's first token
        targets = torch.tensor(round_ids)
        nll -= float(logprobs[first - 1 : first - 1 + len(round_ids)].gather(1, targets[:, None]).sum())
        n_tokens += len(round_ids)
        n_bytes += len(text.encode())
    return nll, n_tokens, n_bytes


def test_a_yardstick_with_another_tokenizer_scores_the_same_text_as_a_brute_recomputation(runs, folders):
    report, _ = runs["other"]
    row = report.row("yardstick")
    nll, n_tokens, n_bytes = _brute_yardstick(folders)
    assert n_bytes == report.eval_bytes
    assert row.n_tokens == n_tokens != report.n_eval_tokens  # its own tokens: not the stream's count
    assert row.nll == pytest.approx(nll / n_tokens, rel=1e-4)
    assert row.bits_per_byte == pytest.approx(nll / LN2 / n_bytes, rel=1e-4)
    assert not report.is_partial(row)


def test_the_report_gives_the_gap_closed_in_its_verdict_table_and_markdown(runs):
    report, data = runs["other"]
    gap = report.yardstick
    assert gap is not None and data["schema_version"] >= 7
    best, collective, yardstick = report.row("member_isolated", gap.best_member), report.row("collective"), report.row("yardstick")
    assert gap.gap_bits_per_byte == pytest.approx(best.bits_per_byte - yardstick.bits_per_byte, rel=1e-9)
    assert gap.closed_bits_per_byte == pytest.approx(best.bits_per_byte - collective.bits_per_byte, rel=1e-9)
    if gap.share is not None:
        assert gap.share == pytest.approx(gap.closed_bits_per_byte / gap.gap_bits_per_byte, rel=1e-9)
        assert "of the gap between its best member and the yardstick" in report.verdict
    else:
        assert "undefined" in report.verdict
    markdown = report_markdown(report)
    assert "| yardstick, full view |" in markdown and "- yardstick: " in markdown
    assert Report.model_validate_json(json.dumps(data)).model_dump_json() == report.model_dump_json()  # NaN != NaN


def test_a_report_of_version_6_still_reads_without_a_yardstick(runs):
    _, data = runs["none"]
    older = {k: v for k, v in data.items() if k != "yardstick"} | {"schema_version": 6}
    report = Report.model_validate(older)
    assert report.yardstick is None and "yardstick" not in report_markdown(report)


class _MissingA:
    """An executor whose node `a` misses the second eval round, as a volunteer past its deadline."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner

    def run_round(self, round_index, requests):  # type: ignore[no-untyped-def]
        results = self.inner.run_round(round_index, requests)
        return {**results, "a": None} if round_index == WARMUP + 1 else results


def test_the_yardstick_is_scored_on_the_coordinator_when_a_node_misses_a_round(folders):
    """A distributed run's executor may lose a node for a round; the yardstick runs beside the
    executor, on every eval round, and the gap pairs the rounds its three rows share."""
    root = folders["root"]
    scenario = load_scenario(_scenario(root, folders["members"], str(folders["other"]), "missing-a"))
    prepared = prepare(scenario, ModelPool(cache_dir=root / "cache"), base_dir=root)
    result = run_prepared(prepared, root / "run-missing-a", executor=_MissingA(EmbeddedExecutor.from_prepared(prepared)))
    report = result.report
    assert report is not None and report.missed_rounds == {"a": 1}
    assert report.row("yardstick").n_rounds == EVAL_ROUNDS and not report.is_partial(report.row("yardstick"))
    assert report.yardstick is not None and report.yardstick.best_member != "a"
    assert report.yardstick.n_rounds == EVAL_ROUNDS  # the best member, the collective and the yardstick scored every round


# ---------------------------------------------------------------------------- bad input


def _unreadable_tokenizer_model(folder: Path) -> Path:
    """A tiny model whose tokenizer splits on whitespace into word pieces: no byte alphabet, no
    byte fallback, so the bytes of its tokens cannot be recovered."""
    if folder.exists():
        return folder
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False)
    tok.train_from_iterator([pydoc_text()[:50_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>", unk_token="<unk>")
    tiny_llama(len(fast), seed=1).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_a_yardstick_that_does_not_load_is_named_before_any_round(folders):
    root = folders["root"]
    path = _scenario(root, folders["members"], str(root / "no-such-model"), "missing")
    with pytest.raises(RunError, match=r"^evaluation\.yardstick: the yardstick .*no-such-model.* could not be loaded"):
        prepare(load_scenario(path), ModelPool(cache_dir=root / "cache"), base_dir=root)


def test_a_yardstick_whose_token_bytes_cannot_be_read_is_refused_by_validate_deep_with_the_file(folders, capsys):
    root = folders["root"]
    path = _scenario(root, folders["members"], str(_unreadable_tokenizer_model(root / "words")), "words")
    with pytest.raises(RunError, match=r"^evaluation\.yardstick: .*another tokenizer.*neither byte-level BPE"):
        prepare(load_scenario(path), ModelPool(cache_dir=root / "cache"), base_dir=root)
    assert main(["--cache-dir", str(root / "cache"), "validate", "--deep", str(path)]) == 2
    err = capsys.readouterr()
    assert f"{path}: evaluation.yardstick:" in " ".join((err.out + err.err).split())


# ---------------------------------------------------------------------------- real tokenizers (slow)


@pytest.mark.slow
def test_a_gemma_yardstick_of_a_smollm2_stream_reads_every_round_byte_for_byte():
    """SmolLM2 (byte-level BPE, splits an emoji or a CJK character across tokens) cuts the
    stream; Gemma 3 (byte fallback, `▁` for space) re-encodes each round and its context apart:
    its tokens must spell exactly the bytes of the stream's tokens, also where a round boundary
    falls inside a character."""
    from types import SimpleNamespace

    from collective.lm.corpus import load_corpus_text
    from collective.run.yardstick import Yardstick
    from tests.test_bytes import real_tokenizer

    stream_tok, tok = real_tokenizer("smollm2-135m"), real_tokenizer("gemma3-270m")
    stream_vocab, vocab = byte_vocab(stream_tok), byte_vocab(tok)
    text = load_corpus_text("wikitext2", None, base_dir=Path.cwd())[:6000] + " \U0001f642\u6771\u4eac\U0001f680 caf\u00e9 " * 40
    ids = torch.tensor(stream_tok.encode(text, add_special_tokens=False))
    yardstick = Yardstick(SimpleNamespace(tokenizer=tok), "gemma3-270m", stream_vocab=stream_vocab, vocab=vocab)  # type: ignore[arg-type]
    cut_inside, round_tokens = 0, 7
    for start in range(32, len(ids) - round_tokens, round_tokens):
        context, round_ids = ids[start - 32 : start], ids[start : start + round_tokens]
        got_context, got_round = yardstick.tokens(context, round_ids)
        assert vocab.decode(got_context.tolist()) == stream_vocab.decode(context.tolist())
        assert vocab.decode(got_round.tolist()) == stream_vocab.decode(round_ids.tolist())
        cut_inside += 0x80 <= stream_vocab.decode(round_ids.tolist())[0] < 0xC0
    assert cut_inside > 0  # some round starts inside a character: the byte tokens were needed


# ---------------------------------------------------------------------------- distributed (real broker)


@pytest.mark.mqtt
def test_a_distributed_run_scores_the_yardstick_on_the_coordinator_as_the_embedded_run_does(tmp_path, tiny_tok, tiny_lm):
    """Volunteers never see the yardstick; the coordinator scores it beside the rounds they serve."""
    from tests import test_distributed as dist
    from tests.mosquitto import running_broker

    root = tmp_path / "world"
    root.mkdir()
    other = _save(root / "other", 384, 7)
    tiny_lm.save_pretrained(root / "tiny")
    tiny_tok.save_pretrained(root / "tiny")
    spec = {**dist.SCENARIO, "models": {"tiny": {"ref": str(root / "tiny"), "dtype": "float32", "device": "cpu"}}}
    spec["evaluation"] = {**spec["evaluation"], "yardstick": str(other)}
    (root / "scenario.yaml").write_text(yaml.safe_dump(spec))
    prepared = prepare(load_scenario(root / "scenario.yaml"), ModelPool(cache_dir=root / "cache"), base_dir=root)
    embedded = run_prepared(prepared, root / "embedded").report
    assert embedded is not None and embedded.yardstick is not None
    world = dist.World(root, prepared, embedded, [])
    nodes = dist.Nodes(tmp_path)
    try:
        with running_broker(tmp_path / "broker") as broker:
            result, _, _ = dist._run_with_nodes(world, nodes, broker, tmp_path / "run")
    finally:
        nodes.stop_all()
    found = result.report
    assert found is not None and found.runtime == "mqtt" and found.yardstick is not None
    dist._assert_same_evaluation(embedded, found)  # every row, the yardstick's included
    assert dist._close(found.yardstick.gap_bits_per_byte, embedded.yardstick.gap_bits_per_byte)
    assert dist._close(found.yardstick.closed_bits_per_byte, embedded.yardstick.closed_bits_per_byte)
