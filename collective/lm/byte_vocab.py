"""The bytes of every token of a vocabulary, and text prefixes cut at any byte as tokens.

A tokenizer's vocabulary is read once into a `ByteVocab`: for each token id the UTF-8 bytes it
stands for, or None for a special or control token (BOS, EOS, pad, `<unused..>`, chat markers),
which is never counted as text. Two families are read exactly:

- byte-level BPE (GPT-2 style, SmolLM2): each character of a token string stands for one byte
  through GPT-2's printable byte alphabet (`Ġ` is the space 0x20, `Ċ` the newline 0x0A, ...);
- SentencePiece-style BPE with byte fallback (Gemma 3): `<0xNN>` is the byte NN, `▁` is a space,
  every other character is its own UTF-8.

Non-special added tokens (Gemma's runs of newlines) are text: their content, read the same way.
The vocabulary is also kept sorted by bytes, so that "the tokens whose bytes start with p" is one
contiguous range of ids (`prefix_ranges`): the next-byte code (`collective.lm.bytes`) sums
probabilities over such ranges with one cumulative sum per context.

`encode_prefix` tokenizes a byte prefix that may end inside a UTF-8 character: the complete
characters canonically, then each byte of the unfinished character as its own byte token.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

VocabKind = Literal["byte_level", "byte_fallback"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPACE_MARKER = "\u2581"  # ▁, SentencePiece's space
_PROBES = ("Hello, world!\n\n  two  spaces\tand tabs", "caf\u00e9 na\u00efve \u6771\u4eac \U0001f642 \x01 ~")


class ByteVocabError(ValueError):
    """The bytes of a tokenizer's tokens cannot be recovered; the message names why."""


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted: character -> byte value (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    shift = 0
    for value in range(256):
        if value not in printable:
            printable.append(value)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ByteVocabError(
            f"the tokenizer {type(tokenizer).__name__} has no fast (Rust) backend, so its token bytes "
            "cannot be read; load it with use_fast=True"
        )
    parsed: dict[str, Any] = json.loads(backend.to_str())
    return parsed


def vocab_kind(tokenizer: Any) -> VocabKind:
    """Which reading fits the tokenizer: `byte_level` (a ByteLevel decoder or pre-tokenizer) or
    `byte_fallback` (a ByteFallback decoder or all 256 `<0xNN>` tokens); else ByteVocabError."""
    spec = _backend_json(tokenizer)
    text = json.dumps({k: spec.get(k) for k in ("decoder", "pre_tokenizer")})
    if '"ByteLevel"' in text:
        return "byte_level"
    vocab = tokenizer.get_vocab()
    if '"ByteFallback"' in text or all(f"<0x{b:02X}>" in vocab for b in range(256)):
        return "byte_fallback"
    raise ByteVocabError(
        f"the tokenizer {type(tokenizer).__name__} is neither byte-level BPE nor a byte-fallback "
        "SentencePiece model, so the bytes of its tokens cannot be recovered exactly"
    )


def _token_bytes(token: str, kind: VocabKind, alphabet: dict[str, int]) -> bytes:
    if kind == "byte_level":
        try:
            return bytes(alphabet[ch] for ch in token)
        except KeyError as err:
            raise ByteVocabError(f"token {token!r} has a character outside the byte-level alphabet") from err
    match = _BYTE_TOKEN.match(token)
    if match is not None:
        return bytes([int(match.group(1), 16)])
    return token.replace(_SPACE_MARKER, " ").encode("utf-8")


@dataclass(frozen=True, eq=False)
class ByteVocab:
    """The bytes of each of V token ids (None: special, never text) and the vocabulary sorted by
    bytes. `order` (T,) int64 lists the T text token ids in byte order; `sorted_bytes` their bytes
    in that order; `byte_token` (256,) the id of the one-byte token of each byte value (-1: none;
    SmolLM2 lacks a few bytes that never occur in UTF-8 text)."""

    token_bytes: tuple[bytes | None, ...]
    kind: VocabKind
    order: np.ndarray = field(repr=False)
    sorted_bytes: tuple[bytes, ...] = field(repr=False)
    byte_token: tuple[int, ...] = field(repr=False)
    max_token_bytes: int = 0
    _keys: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, dtype=object))

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def decode(self, ids: list[int]) -> bytes:
        """The text bytes of token ids (special tokens contribute nothing)."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """[lo, hi) in byte order of the text tokens whose bytes start with `prefix`."""
        lo = bisect.bisect_left(self.sorted_bytes, prefix)
        hi = bisect.bisect_left(self.sorted_bytes, prefix + b"\xff" * (self.max_token_bytes + 1), lo)
        return lo, hi

    def child_ranges(self, prefix: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each byte b such that some token starts with prefix + b: (b, lo, hi) as three
        (C,) int64 arrays, the [lo, hi) byte-order range of the tokens starting with prefix + b."""
        queries = np.empty(257, dtype=object)
        queries[:256] = [prefix + bytes([b]) for b in range(256)]
        queries[256] = prefix + b"\xff" * (self.max_token_bytes + 1)
        bounds = np.searchsorted(self._keys, queries).astype(np.int64)  # (257,)
        lo, hi = bounds[:-1], bounds[1:]
        present = np.nonzero(hi > lo)[0]
        return present.astype(np.int64), lo[present], hi[present]


def byte_vocab(tokenizer: Any) -> ByteVocab:
    """Read the bytes of every token of a Hugging Face fast tokenizer (see the module doc).

    Raises ByteVocabError when the tokenizer is of neither family, or when its encoding of a few
    probe strings does not decode back to their bytes (a dummy prefix space, a normalizer that
    changes the text): the next-byte distribution would then be about other text.
    """
    kind = vocab_kind(tokenizer)
    alphabet = gpt2_byte_alphabet()
    size = len(tokenizer)
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    table: list[bytes | None] = []
    for token_id, token in enumerate(tokens):
        if token_id in special or token is None:
            table.append(None)
        elif token_id in added:  # non-special added tokens are literal text
            text = str(added[token_id].content)
            table.append(text.replace(_SPACE_MARKER, " ").encode() if kind == "byte_fallback" else text.encode())
        else:
            table.append(_token_bytes(token, kind, alphabet) or None)
    vocab = _sorted_vocab(tuple(table), kind)
    for probe in _PROBES:
        ids = tokenizer.encode(probe, add_special_tokens=False)
        if vocab.decode(ids) != probe.encode("utf-8"):
            raise ByteVocabError(
                f"the tokenizer's encoding of {probe!r} decodes to {vocab.decode(ids)!r}: it does not "
                "round-trip text byte for byte (a dummy prefix or a normalizer), so byte-level "
                "probabilities from it would be about different text"
            )
    return vocab


def _sorted_vocab(table: tuple[bytes | None, ...], kind: VocabKind) -> ByteVocab:
    text_ids = [i for i, b in enumerate(table) if b]
    text_ids.sort(key=lambda i: (table[i], i))
    sorted_bytes = tuple(table[i] or b"" for i in text_ids)
    byte_token = [-1] * 256
    for token_id in reversed(text_ids):  # prefer a byte-fallback / base token: the lowest id
        value = table[token_id]
        if value is not None and len(value) == 1:
            byte_token[value[0]] = token_id
    keys = np.empty(len(sorted_bytes), dtype=object)
    keys[:] = sorted_bytes
    return ByteVocab(
        token_bytes=table,
        kind=kind,
        order=np.asarray(text_ids, dtype=np.int64),
        sorted_bytes=sorted_bytes,
        byte_token=tuple(byte_token),
        max_token_bytes=max(len(b) for b in sorted_bytes),
        _keys=keys,
    )


def complete_utf8(data: bytes) -> int:
    """The length of the longest prefix of valid UTF-8 `data` that ends on a character boundary
    (at most 3 bytes are cut: the start of an unfinished character)."""
    if not data or data[-1] < 0x80:
        return len(data)
    start = len(data) - 1
    while start > 0 and len(data) - start < 4 and 0x80 <= data[start] < 0xC0:
        start -= 1  # back to the lead byte of the last character
    lead = data[start]
    width = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return len(data) if len(data) - start >= width else start


def encode_prefix(tokenizer: Any, vocab: ByteVocab, data: bytes) -> list[int]:
    """Token ids of a byte prefix: the complete characters canonically (no special tokens
    added), then one byte token per byte of an unfinished last character."""
    cut = complete_utf8(data)
    ids = list(tokenizer.encode(data[:cut].decode("utf-8", errors="strict"), add_special_tokens=False)) if cut else []
    tail = [vocab.byte_token[b] for b in data[cut:]]
    if min(tail, default=0) < 0:
        raise ByteVocabError(f"the vocabulary has no one-byte token for a byte of {data[cut:]!r}")
    return ids + tail


def encode_span(tokenizer: object, vocab: ByteVocab, data: bytes) -> list[int]:
    """Token ids that spell `data` exactly, which may start or end inside a UTF-8 character:
    leading continuation bytes as one-byte tokens, then `encode_prefix` (complete characters
    canonically, an unfinished last character as byte tokens)."""
    lead = 0
    while lead < len(data) and 0x80 <= data[lead] < 0xC0:
        lead += 1
    head = [vocab.byte_token[b] for b in data[:lead]]
    if min(head, default=0) < 0:
        raise ValueError(f"the vocabulary has no one-byte token for a byte of {data[:lead]!r}")
    return head + encode_prefix(tokenizer, vocab, data[lead:])
