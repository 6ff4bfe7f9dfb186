"""Every random draw of a run derives from the scenario's one seed.

`derive_seed(seed, *parts)` hashes the seed with names (node id, link, round, purpose)
into a 63-bit integer, so that each node, link and round has its own stream, stable
across processes and machines (Python's `hash` is salted per process; blake2b is not).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    text = "|".join([str(seed), *map(str, parts)])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU torch.Generator seeded from the scenario seed and the given names."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def uniform(seed: int, *parts: object) -> float:
    """One uniform draw in [0, 1) for the given names (e.g. a drop decision)."""
    return derive_seed(seed, *parts) / float(1 << 63)
