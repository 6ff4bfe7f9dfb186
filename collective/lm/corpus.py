"""The text a collective reads, as one token stream, and how many bytes each token stands for.

    source --load_corpus_text--> str --tokenize_stream--> ids (N,) --token_byte_lengths--> bytes (N,)

Sources: `builtin:pydoc` (Python's own help topics: no file, no network), `wikitext2`
(the WikiText-2 raw test split from a local file, else from the Hugging Face hub when the
`datasets` library is installed and the machine is online), `file` (a UTF-8 text file) and
`hf:DATASET[:CONFIG][:SPLIT]`. The stream is tokenized once, without special tokens, so
that a stream of N tokens is the first N tokens of any longer stream of the same text.
Byte lengths make bits per byte comparable across tokenizers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CORPUS_SOURCES = ("builtin:pydoc", "wikitext2", "file", "hf:DATASET[:CONFIG][:SPLIT]")
WIKITEXT2_RELATIVE = Path("..") / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
_WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")

# tokenize_stream reads text in growing prefixes; tokens this close to a prefix's cut may
# differ from the tokenization of the whole text, so they are never returned.
_CUT_MARGIN_TOKENS = 64
_CHARS_PER_TOKEN_GUESS = 6
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class CorpusError(Exception):
    """The corpus cannot be read; the message says where it looked and what to do."""


class CorpusTooSmallError(CorpusError):
    """The corpus has fewer tokens than the scenario's splits need."""


def pydoc_text() -> str:
    """Python's help topics (`pydoc_data.topics`), joined in sorted order: ~0.47 MB, offline."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def _read_utf8(path: Path, what: str) -> str:
    if not path.is_file():
        raise CorpusError(f"The {what} {str(path)!r} does not exist (or is not a file).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"The {what} {str(path)!r} is not UTF-8 text (invalid byte at offset {err.start}); "
            "convert it with e.g. `iconv -t utf-8`."
        ) from err
    except OSError as err:
        raise CorpusError(f"The {what} {str(path)!r} cannot be read: {err}") from err
    if not text:
        raise CorpusError(f"The {what} {str(path)!r} is empty.")
    return text


def _hub_text(dataset_id: str, config: str | None, split: str) -> str:
    """All rows of the dataset's text column joined; CorpusError when `datasets` is missing or offline."""
    try:
        import datasets  # optional: only users who are online need it
    except ImportError:
        raise CorpusError(
            f"Reading the Hugging Face dataset {dataset_id!r} needs the `datasets` library "
            "(`pip install datasets`) and a network connection; or download the text yourself "
            "and use `source: file` with `path: your.txt`."
        ) from None
    try:
        table = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as err:  # datasets raises many unrelated types for offline / not found
        raise CorpusError(
            f"Could not load the Hugging Face dataset {dataset_id!r} (config {config!r}, split "
            f"{split!r}): {err}. If this machine is offline, give the text as a local file "
            "(`source: file`, `path: ...`)."
        ) from err
    columns = [name for name, feature in table.features.items() if getattr(feature, "dtype", None) == "string"]
    if not columns:
        raise CorpusError(f"The dataset {dataset_id!r} has no text column (columns: {', '.join(table.features)}).")
    column = "text" if "text" in columns else columns[0]
    return "".join(row if row.endswith("\n") else row + "\n" for row in table[column] if row)


def _wikitext2_candidates(base_dir: Path) -> Iterator[Path]:
    seen: set[Path] = set()
    for folder in (base_dir, *base_dir.parents):
        candidate = (folder / WIKITEXT2_RELATIVE).resolve()
        if candidate not in seen:
            seen.add(candidate)
            yield candidate


def _wikitext2_text(base_dir: Path) -> str:
    looked = []
    for candidate in _wikitext2_candidates(base_dir):
        if candidate.is_file():
            return _read_utf8(candidate, "WikiText-2 file")
        looked.append(str(candidate))
    try:
        import datasets  # noqa: F401
    except ImportError:
        hub = "the `datasets` library is not installed, so the Hugging Face hub was not tried"
    else:
        try:
            return _hub_text(*_WIKITEXT2_HUB)
        except CorpusError as err:
            hub = f"the Hugging Face hub failed ({err})"
    raise CorpusError(
        "WikiText-2 (raw test split) was not found: looked for "
        f"{', '.join(looked[:3])}{' and their parents' if len(looked) > 3 else ''}, and {hub}. "
        "Give the file as `path: .../wikitext-2-raw/wiki.test.raw` in the scenario's corpus."
    )


def load_corpus_text(source: str, path: Path | None, *, base_dir: Path) -> str:
    """The corpus text of `source` (see CORPUS_SOURCES); a relative `path` is under base_dir."""
    if path is not None and not path.is_absolute():
        path = base_dir / path
    if source == "builtin:pydoc":
        if path is not None:
            raise CorpusError("The corpus source builtin:pydoc takes no path; use `source: file` for a file.")
        return pydoc_text()
    if source == "wikitext2":
        return _read_utf8(path, "WikiText-2 file") if path is not None else _wikitext2_text(base_dir)
    if source == "file":
        if path is None:
            raise CorpusError("The corpus source `file` needs `path: your.txt` (a UTF-8 text file).")
        return _read_utf8(path, "corpus file")
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise CorpusError(f"Expected hf:DATASET[:CONFIG][:SPLIT], found {source!r}.")
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        return _hub_text(parts[0], config, split)
    raise CorpusError(f"Unknown corpus source {source!r}; expected one of {', '.join(CORPUS_SOURCES)}.")


def tokenize_stream(text: str, tokenizer: Any, n_tokens: int) -> torch.Tensor:
    """The first n_tokens tokens of `text` (no special tokens), as a (n_tokens,) int64 tensor.

    Huge texts are not tokenized whole: a prefix of about 6 characters per needed token is
    tokenized, cut at a line break, and doubled until it yields n_tokens plus a safety
    margin, so the result equals the first n_tokens of tokenizing the whole text.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, found {n_tokens}")
    chars = (n_tokens + _CUT_MARGIN_TOKENS) * _CHARS_PER_TOKEN_GUESS
    while True:
        whole = chars >= len(text)
        if whole:
            prefix = text
        else:
            line_end = text.rfind("\n", 0, chars)
            prefix = text[: line_end + 1] if line_end > chars // 2 else text[:chars]
        ids = tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]
        if whole and len(ids) < n_tokens:
            raise CorpusTooSmallError(
                f"The corpus has {len(ids)} tokens, but {n_tokens} are needed (offset + train + "
                "eval tokens); use a larger corpus or smaller splits."
            )
        if whole or len(ids) >= n_tokens + _CUT_MARGIN_TOKENS:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
        chars *= 2


def _decoder_types(tokenizer: Any) -> set[str]:
    """The decoder component types of a fast tokenizer (ByteLevel, ByteFallback, Replace, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())
    return {part["type"] for part in state.get("decoders", [state])}


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE uses to stand for the 256 byte values (GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    return {chr(c) for c in printable + shifted}


def token_byte_lengths(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """UTF-8 bytes each token contributes to the decoded text: (N,) int64 for ids (N,).

    Byte-level BPE (GPT-2, SmolLM2): each character of a vocabulary piece stands for one
    byte, so a token counts exactly its own bytes; a multi-byte character split across
    tokens (e.g. an emoji as 'ðŁĻ' + 'Ĥ') counts each byte where it falls. SentencePiece
    (Gemma): '▁' is one space, a byte-fallback piece '<0xNN>' is one byte, any other piece
    its UTF-8 length. Other tokenizers: the UTF-8 length of the token decoded alone.
    The sum over a stretch equals len(decode(stretch).encode()) whenever the stretch
    starts and ends on character boundaries (always for a whole tokenized text).
    """
    flat = ids.reshape(-1).long()
    unique, inverse = torch.unique(flat, return_inverse=True)
    pieces = tokenizer.convert_ids_to_tokens(unique.tolist())
    decoders = _decoder_types(tokenizer)
    if "ByteLevel" in decoders:
        alphabet = _byte_level_alphabet()
        lengths = [sum(1 if ch in alphabet else len(ch.encode()) for ch in piece) for piece in pieces]
    elif "ByteFallback" in decoders or any("▁" in piece for piece in pieces):
        lengths = [
            1 if _BYTE_FALLBACK.match(piece) else len(piece.replace("▁", " ").encode()) for piece in pieces
        ]
    else:
        lengths = [len(tokenizer.decode([token_id]).encode()) for token_id in unique.tolist()]
    return torch.tensor(lengths, dtype=torch.long)[inverse].reshape(ids.shape)
