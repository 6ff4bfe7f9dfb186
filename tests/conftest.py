from __future__ import annotations

import pytest

from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tok):
    return tiny_llama(len(tiny_tok))
