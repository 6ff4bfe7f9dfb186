from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tok):
    return tiny_llama(len(tiny_tok))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): tiny
    models run many times faster so on a busy 2-core machine, where OpenMP spin-waiting
    makes two threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A float32 tiny Llama and its tokenizer saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
