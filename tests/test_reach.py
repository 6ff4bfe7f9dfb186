from __future__ import annotations

import csv
import dataclasses
import logging

import pytest
import torch

import controllers.search as search
from controllers.filters import model_token_mask, special_token_ids
from controllers.gcg import GCGConfig
from controllers.objectives import (
    ControllerError,
    SequenceObjective,
    default_prefix_ids,
    encode,
    target_objective,
)
from controllers.reach import (
    ReachConfig,
    ReachRow,
    draw_pairs,
    format_summary,
    next_token_log_probs,
    play_game,
    reach_pair,
    run_reach,
    summarize,
)
from controllers.search import BackoffConfig, GreedyConfig, backoff_search, greedy_backgenerate
from tests.tiny import pydoc_text

QUICK = ReachConfig(
    ks=(0, 1, 4),
    greedy=GreedyConfig(candidates=16),
    gcg=GCGConfig(num_steps=2, search_width=8, topk=8, filter_retokenize=False),
)


@pytest.fixture(scope="module")
def stream(tiny_tok):
    return encode(tiny_tok, pydoc_text()[:6000])


# -- drawing pairs ----------------------------------------------------------------------------


def test_true_pairs_are_windows_of_8_to_32_tokens_followed_by_their_next_token(
    tiny_lm, tiny_tok, stream
):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 20, "true", torch.Generator().manual_seed(0))
    joined = " ".join(map(str, stream))
    for pair in pairs:
        assert 8 <= len(pair.x0_ids) <= 32
        assert " ".join(map(str, [*pair.x0_ids, pair.y_id])) in joined
        log_probs = next_token_log_probs(tiny_lm, pair.x0_ids)
        assert pair.base_rank == int((log_probs > log_probs[pair.y_id]).sum())
        assert pair.base_loss == pytest.approx(float(-log_probs[pair.y_id]), abs=1e-5)
    assert len({len(pair.x0_ids) for pair in pairs}) > 5


def test_top75_targets_are_among_the_model_top_75_and_random_ones_are_not_special(
    tiny_lm, tiny_tok, stream
):
    top = draw_pairs(tiny_lm, tiny_tok, stream, 10, "top75", torch.Generator().manual_seed(1))
    assert all(pair.base_rank < 75 for pair in top)
    uniform = draw_pairs(tiny_lm, tiny_tok, stream, 30, "random", torch.Generator().manual_seed(1))
    special = special_token_ids(tiny_tok)
    assert not any(pair.y_id in special for pair in uniform)
    assert max(pair.base_rank for pair in uniform) >= 75


def test_the_same_seed_draws_the_same_pairs(tiny_lm, tiny_tok, stream):
    first = draw_pairs(tiny_lm, tiny_tok, stream, 5, "top75", torch.Generator().manual_seed(9))
    again = draw_pairs(tiny_lm, tiny_tok, stream, 5, "top75", torch.Generator().manual_seed(9))
    assert first == again


def test_a_corpus_shorter_than_a_window_is_an_error_naming_the_corpus(tiny_lm, tiny_tok):
    with pytest.raises(ControllerError, match="corpus"):
        draw_pairs(tiny_lm, tiny_tok, [1, 2, 3], 1, "true", torch.Generator())


# -- greedy back-generation and back-off ------------------------------------------------------


def one_token_game(model, tokenizer):
    """x0 and a target y that the exhaustive one-token scan must reach, and that is not the
    argmax without a prompt (found by brute force here, independently of the search)."""
    x0 = encode(tokenizer, "Return the value of")
    base = int(next_token_log_probs(model, x0).argmax())
    with torch.no_grad():
        ids = torch.cat([torch.arange(1, 512)[:, None], torch.tensor(x0).expand(511, -1)], dim=1)
        argmax = model(input_ids=ids).logits[:, -1].argmax(-1)  # (511,)
    reachable = [int(y) for y in argmax.unique() if int(y) != base]
    return x0, reachable[0]


def test_exhaustive_greedy_finds_a_one_token_prompt_whenever_one_exists(tiny_lm, tiny_tok):
    x0, y = one_token_game(tiny_lm, tiny_tok)
    objective = SequenceObjective(tiny_lm, [], [*x0, y], 1)
    config = GreedyConfig(filter_special=False, filter_ascii=False, batch_size=64)
    result = greedy_backgenerate(tiny_lm, tiny_tok, objective, 3, config)
    assert result.success and len(result.best_ids) == 1
    assert int(next_token_log_probs(tiny_lm, result.best_ids + x0).argmax()) == y


def test_greedy_with_a_candidate_budget_scores_only_that_many_tokens_per_length(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value of the object", suffix="Return")
    result = greedy_backgenerate(tiny_lm, tiny_tok, objective, 2, GreedyConfig(candidates=10))
    assert result.candidates_scored == 10 * len(result.losses)
    assert len(result.best_ids) == len(result.losses)


def test_backoff_reports_the_empty_prompt_when_y_is_already_the_argmax(tiny_lm, tiny_tok):
    x0 = encode(tiny_tok, "Return the value of")
    y = int(next_token_log_probs(tiny_lm, x0).argmax())
    found = backoff_search(tiny_lm, tiny_tok, SequenceObjective(tiny_lm, [], [*x0, y], 1))
    assert (found.reached, found.k, found.method, found.ids) == (True, 0, "base", [])


def test_backoff_uses_gcg_above_the_greedy_lengths(tiny_lm, tiny_tok):
    x0, y = one_token_game(tiny_lm, tiny_tok)
    objective = SequenceObjective(tiny_lm, [], [*x0, y], 1)
    gcg = GCGConfig(num_steps=40, search_width=64, topk=64, filter_retokenize=False)
    found = backoff_search(tiny_lm, tiny_tok, objective, (0, 4), gcg=gcg)
    assert [a.method for a in found.attempts] == ["base", "gcg"]
    assert found.reached and found.method == "gcg" and found.k == 4
    assert int(next_token_log_probs(tiny_lm, found.ids + x0).argmax()) == y


def test_a_search_that_finds_nothing_says_so_and_reports_the_best_loss(tiny_lm, tiny_tok, caplog):
    objective = target_objective(
        tiny_lm, tiny_tok, " value of the first object in a list", suffix="Return"
    )
    gcg = GCGConfig(num_steps=2, search_width=8, topk=8)
    with caplog.at_level(logging.INFO, logger="controllers"):
        found = backoff_search(
            tiny_lm, tiny_tok, objective, (0, 1, 4), greedy=GreedyConfig(candidates=8), gcg=gcg
        )
    assert not found.reached
    assert found.loss == min(attempt.loss for attempt in found.attempts)
    assert "no prompt up to k=4 met the objective; best loss" in caplog.text



def outcome(found):
    """A back-off result without its timings."""
    attempts = [(a.k, a.method, a.loss, a.success) for a in found.attempts]
    return (found.reached, found.k, found.method, found.ids, found.text, found.loss, attempts)


def test_a_backoff_config_searches_exactly_as_backoff_search_with_its_settings(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value of the object", suffix="Return")
    greedy, gcg = GreedyConfig(candidates=8), GCGConfig(num_steps=2, search_width=8, topk=8)
    config = BackoffConfig(ks=(0, 1, 4), greedy_max_k=1, greedy=greedy, gcg=gcg)
    expected = backoff_search(
        tiny_lm, tiny_tok, objective, (0, 1, 4), greedy=greedy, gcg=gcg, greedy_max_k=1
    )
    assert [a.method for a in expected.attempts] == ["base", "greedy", "gcg"]
    assert outcome(config.search(tiny_lm, tiny_tok, objective)) == outcome(expected)


# -- the reachability run ---------------------------------------------------------------------


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_run_writes_one_csv_row_per_pair_and_a_summary(tiny_lm, tiny_tok, stream, tmp_path):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 3, "true", torch.Generator().manual_seed(2))
    calls = []
    result = run_reach(
        tiny_lm,
        tiny_tok,
        pairs,
        tmp_path / "reach.csv",
        QUICK,
        progress=lambda done, total: calls.append((done, total)),
    )
    records = read_csv(tmp_path / "reach.csv")
    assert [int(r["pair"]) for r in records] == [0, 1, 2]
    assert [r["y_id"] for r in records] == [str(p.y_id) for p in pairs]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert result.summary.n_pairs == 3
    for record in records:
        prompt = [int(i) for i in record["prompt_ids"].split()]
        assert int(record["k"]) == len(prompt)
        reached = int(
            next_token_log_probs(
                tiny_lm, prompt + [int(i) for i in record["x0_ids"].split()]
            ).argmax()
        ) == int(record["y_id"])
        assert (record["reached"] == "True") == reached



def test_a_pair_row_is_the_row_a_run_writes_for_that_pair(tiny_lm, tiny_tok, stream, tmp_path):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 2, "true", torch.Generator().manual_seed(2))
    result = run_reach(tiny_lm, tiny_tok, pairs, tmp_path / "reach.csv", QUICK)
    allowed = model_token_mask(tiny_lm, tiny_tok, QUICK.gcg)
    prefix = default_prefix_ids(tiny_tok)
    for pair, written in zip(pairs, result.rows, strict=True):
        row = reach_pair(tiny_lm, tiny_tok, pair, prefix, QUICK, allowed)
        assert row == dataclasses.replace(written, wall_time_s=row.wall_time_s)


def test_resume_skips_the_pairs_already_in_the_csv(
    tiny_lm, tiny_tok, stream, tmp_path, monkeypatch
):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 4, "true", torch.Generator().manual_seed(3))
    path = tmp_path / "reach.csv"
    run_reach(tiny_lm, tiny_tok, pairs[:2], path, QUICK)  # an "interrupted" run
    searched = []
    real_search = search.backoff_search

    def counting(model, tokenizer, objective, *args, **kwargs):
        searched.append(objective.rest_ids.tolist())
        return real_search(model, tokenizer, objective, *args, **kwargs)

    monkeypatch.setattr(search, "backoff_search", counting)  # what ReachConfig.search calls
    with pytest.raises(ControllerError, match="exists; pass resume"):
        run_reach(tiny_lm, tiny_tok, pairs, path, QUICK)
    result = run_reach(tiny_lm, tiny_tok, pairs, path, QUICK, resume=True)
    assert result.skipped == 2
    assert searched == [[*pair.x0_ids, pair.y_id] for pair in pairs[2:]]
    assert [int(r["pair"]) for r in read_csv(path)] == [0, 1, 2, 3]
    assert [row.pair for row in result.rows] == [0, 1, 2, 3]


def test_resuming_with_different_pairs_is_an_error_naming_resume(
    tiny_lm, tiny_tok, stream, tmp_path
):
    path = tmp_path / "reach.csv"
    first = draw_pairs(tiny_lm, tiny_tok, stream, 1, "true", torch.Generator().manual_seed(4))
    run_reach(tiny_lm, tiny_tok, first, path, QUICK)
    other = draw_pairs(tiny_lm, tiny_tok, stream, 1, "true", torch.Generator().manual_seed(5))
    with pytest.raises(ControllerError, match="resume: .* does not match"):
        run_reach(tiny_lm, tiny_tok, other, path, QUICK, resume=True)


def row(pair: int, k: int, reached: bool) -> ReachRow:
    return ReachRow(pair, "true", "x", "1", 2, "y", 3, 1.0, "gcg", k, reached, 0.5, "", "", 1.0)


def test_the_summary_counts_a_pair_at_every_k_at_least_its_prompt_length():
    rows = [row(0, 0, True), row(1, 2, True), row(2, 6, True), row(3, 10, False)]
    summary = summarize(rows, (0, 1, 2, 3, 4, 6, 8, 10), "true")
    assert summary.reached == {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 6: 3, 8: 3, 10: 3}
    assert summary.fraction[10] == pytest.approx(0.75)
    table = format_summary(summary, "tiny")
    assert "| 6 | 3/4 | 75.0% |" in table
    assert "Falcon-7B 97.2%, Llama-7B 98.6%, GPT-2 small 99.7%" in table


def test_the_summary_cites_the_paper_for_top75_and_random_targets():
    assert "85-89%" in format_summary(summarize([row(0, 0, True)], (0,), "top75"))
    assert "Falcon-7B 46.0%" in format_summary(summarize([row(0, 0, True)], (0,), "random"))


# -- the budget per pair ------------------------------------------------------------------------


def test_a_zero_second_budget_reports_every_pair_the_empty_prompt_misses_as_not_reached_within_the_budget(
    tiny_lm, tiny_tok, stream, tmp_path
):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 6, "random", torch.Generator().manual_seed(6))
    config = QUICK.model_copy(update={"budget_s": 0.0})
    result = run_reach(tiny_lm, tiny_tok, pairs, tmp_path / "reach.csv", config)
    for pair, written in zip(pairs, result.rows, strict=True):
        if pair.base_rank == 0:  # the empty prompt is always scored
            assert written.outcome == "reached" and written.k == 0
        else:  # greedy's first length was never scanned
            assert written.outcome == "not reached within the budget" and written.out_of_budget_k == 1
            assert written.method == "base" and written.k == 0
    cut = sum(pair.base_rank > 0 for pair in pairs)
    assert cut > 0 and result.summary.out_of_budget == {0: 0, 1: cut, 4: cut}
    read_back = [ReachRow.from_csv(record) for record in read_csv(tmp_path / "reach.csv")]
    assert [r.out_of_budget_k for r in read_back] == [r.out_of_budget_k for r in result.rows]


def test_a_one_step_budget_stops_gcg_after_its_first_step_and_says_at_which_length(tiny_lm, tiny_tok, stream):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 4, "random", torch.Generator().manual_seed(7))
    prefix = default_prefix_ids(tiny_tok)
    gcg = GCGConfig(num_steps=3, search_width=4, topk=4, filter_retokenize=False)
    for pair in pairs:
        objective = SequenceObjective(tiny_lm, prefix, [*pair.x0_ids, pair.y_id], 1)
        clock = search.SearchClock(gcg_steps=1)
        found = backoff_search(tiny_lm, tiny_tok, objective, (0, 4, 6), gcg=gcg, greedy_max_k=3, clock=clock)
        assert clock.steps_taken == 1  # one step of k = 4, none of k = 6
        assert found.reached or found.out_of_budget_k == 4
        unbounded = backoff_search(tiny_lm, tiny_tok, objective, (0, 4), gcg=gcg, greedy_max_k=3)
        assert unbounded.out_of_budget_k is None  # without a budget "not reached" is plain


def test_a_budget_spent_on_the_last_step_of_the_last_length_cuts_nothing_short(tiny_lm, tiny_tok, stream):
    pair = draw_pairs(tiny_lm, tiny_tok, stream, 1, "random", torch.Generator().manual_seed(8))[0]
    objective = SequenceObjective(tiny_lm, default_prefix_ids(tiny_tok), [*pair.x0_ids, pair.y_id], 1)
    gcg = GCGConfig(num_steps=2, search_width=4, topk=4, filter_retokenize=False, early_stop=False)
    clock = search.SearchClock(gcg_steps=2)
    found = backoff_search(tiny_lm, tiny_tok, objective, (0, 4), gcg=gcg, greedy_max_k=3, clock=clock)
    assert clock.steps_taken == 2 and found.out_of_budget_k is None


def test_a_greedy_scan_asked_to_stop_returns_after_one_batch_naming_the_length(tiny_lm, tiny_tok):
    x0, y = one_token_game(tiny_lm, tiny_tok)
    objective = SequenceObjective(tiny_lm, [], [*x0, y], 1)
    config = GreedyConfig(filter_special=False, filter_ascii=False, batch_size=16)
    asked = []
    result = greedy_backgenerate(tiny_lm, tiny_tok, objective, 3, config, stop=lambda: asked.append(1) or len(asked) > 1)
    assert result.candidates_scored == 16 and result.stopped_k == 1 and len(result.losses) == 1


def test_the_summary_counts_a_pair_out_of_budget_from_the_length_it_was_searching():
    rows = [row(0, 0, True), dataclasses.replace(row(1, 0, False), out_of_budget_k=4), row(2, 3, False)]
    summary = summarize(rows, (0, 1, 4, 10), "true")
    assert summary.out_of_budget == {0: 0, 1: 0, 4: 1, 10: 1}
    assert [r.outcome for r in rows] == ["reached", "not reached within the budget", "not reached"]
    assert "| 4 | 1/3 | 33.3% | 1/3 |" in format_summary(summary, "tiny")


def test_resuming_a_csv_of_other_columns_is_an_error_not_a_garbled_file(tiny_lm, tiny_tok, stream, tmp_path):
    pairs = draw_pairs(tiny_lm, tiny_tok, stream, 1, "true", torch.Generator().manual_seed(4))
    path = tmp_path / "reach.csv"
    run_reach(tiny_lm, tiny_tok, pairs, path, QUICK)
    old = [line.rsplit(",", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()]  # without the last column
    path.write_text("\n".join(old) + "\n", encoding="utf-8")
    with pytest.raises(ControllerError, match="another version of reach.csv"):
        run_reach(tiny_lm, tiny_tok, pairs, path, QUICK, resume=True)
    assert path.read_text(encoding="utf-8") == "\n".join(old) + "\n"


# -- the control game -------------------------------------------------------------------------


def test_the_game_finds_a_one_token_prompt_whose_greedy_continuation_starts_with_the_target(
    tiny_lm, tiny_tok
):
    x0, y = one_token_game(tiny_lm, tiny_tok)
    text, target = tiny_tok.decode(x0), tiny_tok.decode([y])
    assert encode(tiny_tok, target) == [y]
    greedy = GreedyConfig(filter_special=False, filter_ascii=False)
    result = play_game(tiny_lm, tiny_tok, text, target, max_k=3, greedy=greedy)
    assert result.reached and result.length_tokens == 1 and result.method == "greedy"
    assert result.length_chars == len(result.prompt_text)
    assert result.continuation.startswith(target)


def test_the_game_answers_zero_when_the_target_is_already_the_continuation(tiny_lm, tiny_tok):
    x0 = encode(tiny_tok, "If the object is a")
    target = tiny_tok.decode([int(next_token_log_probs(tiny_lm, x0).argmax())])
    assert len(encode(tiny_tok, target)) == 1  # the argmax survives a text round trip
    result = play_game(tiny_lm, tiny_tok, tiny_tok.decode(x0), target, max_k=2)
    assert (result.reached, result.length_tokens, result.prompt_text) == (True, 0, "")


def test_a_game_target_that_tokenizes_to_nothing_is_an_error_naming_the_target(tiny_lm, tiny_tok):
    with pytest.raises(ControllerError, match="target"):
        play_game(tiny_lm, tiny_tok, "Return the", "", max_k=2)


# -- on the real SmolLM2-135M -----------------------------------------------------------------


@pytest.mark.slow
def test_the_federer_game_is_solved_on_smollm2():
    from tests.test_gcg import load_smollm2

    model, tokenizer = load_smollm2()
    result = play_game(
        model,
        tokenizer,
        "Roger Federer is the",
        " greatest",
        max_k=10,
        greedy=GreedyConfig(candidates=1024, batch_size=256),
        gcg=GCGConfig(num_steps=40, search_width=64, topk=64),
    )
    logging.getLogger(__name__).warning(
        "Federer: prompt %r, %d tokens, %d characters, continuation %r",
        result.prompt_text,
        result.length_tokens,
        result.length_chars,
        result.continuation,
    )
    assert result.reached
    assert result.continuation.startswith(" greatest")
    assert result.length_tokens <= 10


# -- the command line ---------------------------------------------------------------------------


def _tiny_model_and_corpus(tmp_path):
    """A tiny model saved as a folder, and a text file: what `collective reach` loads."""
    from tests.tiny import tiny_llama, tiny_tokenizer

    folder = tmp_path / "tiny"
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = tmp_path / "text.txt"
    corpus.write_text(pydoc_text()[:8000], encoding="utf-8")
    return folder, corpus


def test_the_reach_command_writes_csv_summary_and_plot_and_prints_plain_progress_off_a_terminal(
    tmp_path, capsys, monkeypatch
):
    from collective.cli import main

    monkeypatch.setenv("COLUMNS", "1000")
    folder, corpus = _tiny_model_and_corpus(tmp_path)
    out = tmp_path / "reach"
    argv = [
        "reach", "--model", str(folder), "--corpus", str(corpus), "--pairs", "3", "--targets", "random",
        "--k", "0", "1", "--gcg-steps", "1", "--search-width", "4", "--topk", "4", "--greedy-candidates", "4",
        "--out", str(out),
    ]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "pairs 1/3 (" in printed and "pairs 3/3 (" in printed and "left)" in printed
    with (out / "reach.csv").open(encoding="utf-8") as handle:
        assert [row["pair"] for row in csv.DictReader(handle)] == ["0", "1", "2"]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "3 pairs, targets = random" in summary and "--dtype auto" in summary
    assert (out / "reach.png").stat().st_size > 1000
    assert main(argv) == 2  # the CSV is there: without --resume that is an error
    assert "resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # nothing left to do


def test_the_reach_command_reports_pairs_that_ran_out_of_their_budget_in_the_summary(tmp_path, capsys, monkeypatch):
    import json

    from collective.cli import main

    monkeypatch.setenv("COLUMNS", "1000")
    folder, corpus = _tiny_model_and_corpus(tmp_path)
    out = tmp_path / "reach"
    argv = [
        "reach", "--model", str(folder), "--corpus", str(corpus), "--pairs", "4", "--targets", "random",
        "--k", "0", "1", "4", "--gcg-steps", "2", "--search-width", "4", "--topk", "4", "--greedy-candidates", "4",
        "--pair-budget-s", "0", "--out", str(out),
    ]
    assert main(argv) == 0
    with (out / "reach.csv").open(encoding="utf-8") as handle:
        rows = [ReachRow.from_csv(record) for record in csv.DictReader(handle)]
    cut = sum(r.outcome == "not reached within the budget" for r in rows)
    assert cut == sum(not r.reached for r in rows) > 0  # with 0 s nothing past the empty prompt runs
    record = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert record["schema_version"] == 2 and record["out_of_budget"] == {"0": 0, "1": cut, "4": cut}
    assert "--pair-budget-s 0 " in record["command"]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "not reached within the budget" in summary and f"| 4 | {4 - cut}/4 |" in summary
    assert f"| {cut}/4 |" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("option", "value"), [("--pair-budget-s", "-1"), ("--pair-budget-s", "nan"), ("--pair-budget-steps", "-2")])
def test_the_reach_command_refuses_a_negative_budget_in_the_parser(tmp_path, capsys, option, value):
    from collective.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["reach", "--model", "x", "--out", str(tmp_path), option, value])
    assert exited.value.code == 2 and f"argument {option}: expected" in capsys.readouterr().err


class ClaimsEverySuccess(SequenceObjective):
    """Its batched scoring claims that every prompt succeeds; its plain check does not lie."""

    def scores(self, control_ids):
        scores = super().scores(control_ids)
        return dataclasses.replace(scores, success=torch.ones_like(scores.success))


def test_greedy_and_the_empty_prompt_keep_only_successes_a_plain_forward_pass_confirms(tiny_lm, tiny_tok):
    x0, y = one_token_game(tiny_lm, tiny_tok)
    claims = ClaimsEverySuccess(tiny_lm, [], [*x0, y], 1)
    config = GreedyConfig(filter_special=False, filter_ascii=False, batch_size=64)
    result = greedy_backgenerate(tiny_lm, tiny_tok, claims, 3, config)
    assert result.success and len(result.best_ids) == 1  # a real one-token prompt exists
    assert int(next_token_log_probs(tiny_lm, result.best_ids + x0).argmax()) == y
    backoff = BackoffConfig(ks=(0,), greedy_max_k=0).search(tiny_lm, tiny_tok, claims)
    assert not backoff.reached and not backoff.attempts[0].success  # claimed, but y is not the base argmax
