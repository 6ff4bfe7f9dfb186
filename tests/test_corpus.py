from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from transformers import PreTrainedTokenizerFast

from collective.lm.corpus import (
    CorpusError,
    CorpusTooSmallError,
    load_corpus_text,
    token_byte_lengths,
    tokenize_stream,
)
from tests.tiny import pydoc_text

SHARED_WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
REPO = Path(__file__).resolve().parents[1]
MULTILINGUAL = "naïve café — “quotes” 東京 🙂\r\n\ttabs\u00a0and spaces  \n"


@pytest.fixture
def no_datasets(monkeypatch):
    """Make `import datasets` fail, as on a machine without the library."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Gemma-style tokenizer: '▁' for spaces, single characters, byte fallback for the rest."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for ch in "▁abcdefghijklmnopqrstuvwxyzé":
        vocab[ch] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


# ------------------------------------------------------------------ sources


def test_builtin_pydoc_is_pythons_help_text_and_needs_no_file(tmp_path):
    text = load_corpus_text("builtin:pydoc", None, base_dir=tmp_path)
    assert text == pydoc_text()
    assert len(text) > 100_000


def test_builtin_pydoc_refuses_a_path(tmp_path):
    with pytest.raises(CorpusError, match="takes no path"):
        load_corpus_text("builtin:pydoc", tmp_path / "x.txt", base_dir=tmp_path)


def test_a_file_is_read_as_utf8_with_universal_newlines_relative_to_base_dir(tmp_path):
    (tmp_path / "notes.txt").write_bytes("first line\r\nsecond: café\rthird\n".encode())
    text = load_corpus_text("file", Path("notes.txt"), base_dir=tmp_path)
    assert text == "first line\nsecond: café\nthird\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), (b"", "is empty"), (b"ok \xff\xfe bad", "not UTF-8 text \\(invalid byte at offset 3\\)")],
)
def test_a_bad_corpus_file_is_a_corpus_error_naming_it(tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=expected) as info:
        load_corpus_text("file", path, base_dir=tmp_path)
    assert str(path) in str(info.value)


def test_source_file_without_a_path_says_what_to_add(tmp_path):
    with pytest.raises(CorpusError, match="needs `path: your.txt`"):
        load_corpus_text("file", None, base_dir=tmp_path)


def test_wikitext2_reads_a_given_path(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" = Title = \n Some text .\n", encoding="utf-8")
    assert load_corpus_text("wikitext2", path, base_dir=tmp_path) == " = Title = \n Some text .\n"


def test_wikitext2_is_found_in_shared_data_above_the_base_dir(tmp_path):
    # the layout of a checkout beside ../shared: <root>/shared/data/..., <root>/project/scenarios
    shared = tmp_path / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    shared.parent.mkdir(parents=True)
    shared.write_text(" = Robert Boulter = \n Text .\n", encoding="utf-8")
    scenarios = tmp_path / "project" / "scenarios"
    scenarios.mkdir(parents=True)
    assert load_corpus_text("wikitext2", None, base_dir=scenarios) == " = Robert Boulter = \n Text .\n"


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").is_file(),
    reason="this checkout has no ../shared/data/wikitext-2-raw beside it",
)
def test_this_checkouts_wikitext2_is_the_shared_file():
    text = load_corpus_text("wikitext2", None, base_dir=REPO / "scenarios")
    assert text.startswith(" = Robert Boulter = \n")
    assert text == (REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")


def test_missing_wikitext2_offline_says_where_it_looked_and_how_to_pass_a_path(tmp_path, no_datasets):
    with pytest.raises(CorpusError) as info:
        load_corpus_text("wikitext2", None, base_dir=tmp_path)
    message = str(info.value)
    assert str((tmp_path / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").resolve()) in message
    assert "`datasets` library is not installed" in message
    assert "path: .../wikitext-2-raw/wiki.test.raw" in message


def test_a_hub_dataset_without_the_datasets_library_says_how_to_get_it(tmp_path, no_datasets):
    with pytest.raises(CorpusError, match="pip install datasets"):
        load_corpus_text("hf:Salesforce/wikitext:wikitext-2-raw-v1:test", None, base_dir=tmp_path)


def test_malformed_and_unknown_sources_are_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match=r"hf:DATASET\[:CONFIG\]\[:SPLIT\], found 'hf:'"):
        load_corpus_text("hf:", None, base_dir=tmp_path)
    with pytest.raises(CorpusError, match="expected one of builtin:pydoc, wikitext2, file"):
        load_corpus_text("gutenberg", None, base_dir=tmp_path)


# ------------------------------------------------------------------ tokenize_stream


def test_the_stream_is_the_first_tokens_of_the_whole_text(tiny_tok):
    text = pydoc_text()
    whole = tiny_tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    stream = tokenize_stream(text, tiny_tok, 3000)
    assert stream.dtype == torch.long and stream.shape == (3000,)
    assert stream.tolist() == whole[:3000]
    assert tokenize_stream(text, tiny_tok, 1000).tolist() == whole[:1000]


def test_a_huge_text_is_tokenized_only_as_far_as_needed(tiny_tok):
    seen_chars: list[int] = []

    class Counting:
        def __call__(self, text, **kwargs):
            seen_chars.append(len(text))
            return tiny_tok(text, **kwargs)

    text = pydoc_text() * 20
    tokenize_stream(text, Counting(), 500)
    assert max(seen_chars) < len(text) // 100


def test_too_small_a_corpus_names_needed_and_available_tokens(tiny_tok):
    text = "def f(x):\n    return x\n"
    available = len(tiny_tok(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(CorpusTooSmallError, match=f"has {available} tokens, but 10000 are needed"):
        tokenize_stream(text, tiny_tok, 10_000)
    assert tokenize_stream(text, tiny_tok, available).shape == (available,)


def test_a_stream_of_no_tokens_is_refused(tiny_tok):
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        tokenize_stream("text", tiny_tok, 0)


# ------------------------------------------------------------------ token_byte_lengths


def test_byte_level_tokens_add_up_to_the_utf8_length_of_the_text(tiny_tok):
    for text in (MULTILINGUAL, pydoc_text()[:20_000]):
        ids = torch.tensor(tiny_tok(text, add_special_tokens=False)["input_ids"])
        lengths = token_byte_lengths(ids, tiny_tok)
        assert lengths.shape == ids.shape and lengths.dtype == torch.long
        assert int(lengths.sum()) == len(text.encode("utf-8"))
        assert (lengths >= 1).all()


def test_a_character_split_across_byte_level_tokens_counts_each_byte_where_it_falls(tiny_tok):
    ids = tiny_tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the tiny vocabulary should split the emoji into byte pieces"
    lengths = token_byte_lengths(torch.tensor(ids), tiny_tok)
    assert lengths.tolist() == [len(tiny_tok.convert_ids_to_tokens(i)) for i in ids]
    assert int(lengths.sum()) == 4


def test_byte_lengths_keep_the_shape_of_a_batch(tiny_tok):
    ids = torch.tensor(tiny_tok("hello world, 東京", add_special_tokens=False)["input_ids"])
    batch = torch.stack([ids, ids.flip(0)])
    lengths = token_byte_lengths(batch, tiny_tok)
    assert lengths.shape == batch.shape
    assert torch.equal(lengths[1], token_byte_lengths(ids, tiny_tok).flip(0))


def test_sentencepiece_spaces_and_byte_fallback_pieces_count_their_bytes():
    tokenizer = _sentencepiece_like()
    text = "naïve café 東京 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == text
    lengths = token_byte_lengths(torch.tensor(ids), tokenizer)
    assert int(lengths.sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.convert_ids_to_tokens(ids).index("▁")] == 1


def test_other_tokenizers_count_each_token_decoded_alone():
    tok = Tokenizer(WordLevel(vocab={"[UNK]": 0, "hello": 1, "wörld": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    lengths = token_byte_lengths(torch.tensor([1, 2, 1]), tokenizer)
    assert lengths.tolist() == [5, 6, 5]


# ------------------------------------------------------------------ real tokenizer (slow)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from collective.lm.models import load_model

    return load_model("smollm2-135m", device="cpu").tokenizer


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_WIKITEXT.is_file(), reason="needs ../shared/data/wikitext-2-raw")
def test_smollm2_byte_lengths_of_wikitext_add_up_to_its_utf8_bytes(smollm2_tokenizer):
    text = load_corpus_text("wikitext2", SHARED_WIKITEXT, base_dir=REPO)
    stream = tokenize_stream(text, smollm2_tokenizer, 20_000)
    lengths = token_byte_lengths(stream, smollm2_tokenizer)
    decoded = smollm2_tokenizer.decode(stream.tolist(), clean_up_tokenization_spaces=False)
    assert text.startswith(decoded)
    assert int(lengths.sum()) == len(decoded.encode("utf-8"))
    assert 3.5 < len(decoded.encode("utf-8")) / len(stream) < 5.0  # English BPE: ~4 bytes per token
