"""Next-byte distributions from token distributions (collective/lm/bytes.py, byte_vocab.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from collective.lm.byte_exact import cover_chain_logprobs
from collective.lm.byte_vocab import ByteVocab, ByteVocabError, byte_vocab, encode_prefix
from collective.lm.bytes import model_tree_scorer, next_byte_distributions, path_scorer
from tests.tiny import pydoc_text, tiny_gemma3, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SAMPLE = "The café on Main St. sold 12 teas;  东京 visitors paid \u20ac3\n\n = Heading = \n".encode()


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Gemma-like tokenizer: `▁` for space, BPE trained on ASCII text, all 256 `<0xNN>` byte
    tokens for everything else, and three special tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    ascii_text = pydoc_text()[:100_000].encode("ascii", "ignore").decode()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False)
    tok.train_from_iterator([ascii_text], trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for value in range(256):
        vocab.setdefault(f"<0x{value:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    rebuilt = Tokenizer(models.BPE(vocab, merges, byte_fallback=True))
    rebuilt.normalizer = tok.normalizer
    rebuilt.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    rebuilt.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=rebuilt, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def sp_tok() -> PreTrainedTokenizerFast:
    return byte_fallback_tokenizer()


def roundtrip_failures(tokenizer, vocab: ByteVocab, texts: list[str]) -> list[str]:
    return [t for t in texts if vocab.decode(tokenizer.encode(t, add_special_tokens=False)) != t.encode("utf-8")]


def windows(count: int, size: int) -> list[str]:
    text = WIKI.read_text(encoding="utf-8")
    step = (len(text) - size) // count
    return [text[i * step : i * step + size] for i in range(count)]


def test_byte_level_tokens_spell_their_text(tiny_tok):
    vocab = byte_vocab(tiny_tok)
    assert vocab.kind == "byte_level"
    assert roundtrip_failures(tiny_tok, vocab, [SAMPLE.decode(), pydoc_text()[5000:9000]]) == []
    assert vocab.token_bytes[0] is None  # <|endoftext|>: special, never text


def test_byte_fallback_tokens_are_their_byte_and_the_space_marker_a_space(sp_tok):
    vocab = byte_vocab(sp_tok)
    assert vocab.kind == "byte_fallback"
    assert vocab.token_bytes[sp_tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert vocab.token_bytes[sp_tok.convert_tokens_to_ids("<0xE4>")] == b"\xe4"
    ids = sp_tok.encode(SAMPLE.decode(), add_special_tokens=False)
    assert any(sp_tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # é, 东京 fall back
    assert any("\u2581" in sp_tok.convert_ids_to_tokens(i) for i in ids)
    assert vocab.decode(ids) == SAMPLE
    assert [vocab.token_bytes[sp_tok.convert_tokens_to_ids(t)] for t in ("<pad>", "<eos>", "<bos>")] == [None] * 3


def test_a_tokenizer_that_adds_a_dummy_prefix_is_refused(sp_tok):
    bad = byte_fallback_tokenizer()
    bad.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    with pytest.raises(ByteVocabError, match="round-trip"):
        byte_vocab(bad)


def test_a_prefix_cut_inside_a_character_ends_in_byte_tokens(sp_tok, tiny_tok):
    for tok in (sp_tok, tiny_tok):
        vocab = byte_vocab(tok)
        for cut in range(len(SAMPLE) + 1):
            assert vocab.decode(encode_prefix(tok, vocab, SAMPLE[:cut])) == SAMPLE[:cut]


def _setup(tokenizer, model):
    vocab = byte_vocab(tokenizer)
    return dict(vocab=vocab, encode=lambda b: encode_prefix(tokenizer, vocab, b), root_token=2 if vocab.kind == "byte_fallback" else 0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_tree_pass_gives_each_node_the_distribution_of_its_own_path(tiny_tok, family):
    model = tiny_llama(len(tiny_tok)) if family == "llama" else tiny_gemma3(len(tiny_tok))

    def plain(path: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=torch.tensor([path])).logits[0, -1].double(), -1)

    kw = _setup(tiny_tok, model)
    tree = next_byte_distributions(SAMPLE, 3, 40, scorer=model_tree_scorer(model), **kw)
    slow = next_byte_distributions(SAMPLE, 3, 40, scorer=path_scorer(plain), **kw)
    assert tree.fronts > 30
    torch.testing.assert_close(tree.probs, slow.probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["byte_level", "byte_fallback"])
def test_next_byte_rows_sum_to_one_and_match_enumerated_covers(tiny_tok, sp_tok, which):
    tok = tiny_tok if which == "byte_level" else sp_tok
    model = tiny_llama(len(tok), seed=5)
    kw = _setup(tok, model)
    data = "The é, 东 a".encode() if which == "byte_fallback" else b"The cat; x"
    got = next_byte_distributions(data, 0, len(data), scorer=model_tree_scorer(model), **kw)
    assert torch.all((got.probs.sum(-1) - 1).abs() < 1e-5)
    want = cover_chain_logprobs(data, scorer=model_tree_scorer(model), fronts="canonical", **kw)
    # an independent route (no ranges, no memo); a dropped "token ends here" branch differs here
    torch.testing.assert_close(got.target_logprob, want, atol=1e-5, rtol=0)


def test_the_byte_after_a_finished_token_comes_from_the_next_token(tiny_tok):
    """After "The" the space starts a new token (byte-level BPE puts spaces in front): only the
    front that ends at the boundary gives it mass."""
    model = tiny_llama(len(tiny_tok), seed=7)
    kw = _setup(tiny_tok, model)
    got = next_byte_distributions(b"The cat", 3, 4, scorer=model_tree_scorer(model), **kw)
    assert not any(b.startswith(b"The ") for b in kw["vocab"].sorted_bytes)
    assert got.probs[0, ord(" ")] > 1e-4
    assert math.isfinite(float(got.target_logprob[0]))


def test_a_span_that_starts_inside_the_context_token_still_counts_its_covers(tiny_tok):
    model = tiny_llama(len(tiny_tok), seed=9)
    kw = _setup(tiny_tok, model)
    whole = next_byte_distributions(SAMPLE, 0, 30, scorer=model_tree_scorer(model), **kw)
    tail = next_byte_distributions(SAMPLE, 12, 30, scorer=model_tree_scorer(model), **kw)
    torch.testing.assert_close(tail.probs, whole.probs[12:], atol=1e-6, rtol=0)  # float32 model


# ---- real tokenizers and SmolLM2 (slow) --------------------------------------------------


def real_tokenizer(ref: str):
    """The tokenizer of a packaged model, offline: the converted cache folder when there is
    one, else read from the GGUF file (Gemma's takes about a minute)."""
    from transformers import AutoTokenizer

    from collective.lm import models

    source = models.resolve_model_source(ref)
    if source.kind != "gguf":
        pytest.skip(f"{ref} is not installed")
    models._assemble_packaged_gguf(source)
    cached = models.gguf_cache_folder(source.gguf_path, models.default_cache_dir())
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["smollm2-135m", "gemma3-270m"])
def test_real_tokenizers_spell_wikitext_byte_for_byte(ref):
    tokenizer = real_tokenizer(ref)
    vocab = byte_vocab(tokenizer)
    assert vocab.kind == ("byte_level" if ref == "smollm2-135m" else "byte_fallback")
    assert roundtrip_failures(tokenizer, vocab, windows(400, 600)) == []


@pytest.mark.slow
def test_smollm2_byte_chain_is_within_0_05_bits_per_byte_of_its_token_level_score():
    from collective.lm.codec import start_token
    from collective.lm.models import load_model

    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    vocab = byte_vocab(lm.tokenizer)
    root = start_token(lm.tokenizer)
    ids = lm.tokenizer.encode(windows(1, 3000)[0][1000:], add_special_tokens=False)[:160]
    data, start = vocab.decode(ids), len(vocab.decode(ids[:96]))
    got = next_byte_distributions(
        data, start, len(data), vocab=vocab, encode=lambda b: encode_prefix(lm.tokenizer, vocab, b),
        root_token=root, scorer=model_tree_scorer(lm.model),
    )
    assert torch.all((got.probs.sum(-1) - 1).abs() < 1e-5)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[root] + ids])).logits[0, :-1].float()
    token_nats = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[96:].sum()
    token_bpb = float(token_nats) / (len(data) - start) / math.log(2)
    assert abs(got.bits_per_byte() - token_bpb) < 0.05
