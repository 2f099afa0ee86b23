"""Compiled CPU kernels for the decoding engine (`csrc/cpu_kernels.cpp`), built on first use.

A decode step of a model this small is dominated by per-call overhead: each oneDNN matmul costs
15-25 us even for a few rows, each small PyTorch op 1-3 us, and the engine made about 60 calls per
layer besides its four projections. Fused kernels replace most of them:

- `decode_attention`: softmax attention over the KV cache whose every query row is computed the same
  way whatever the other rows of the call and whatever cache slots its keys sit in (TiDAR's greedy
  output must equal AR's bit for bit, alone or in a batch);
- `lora_add_`: the adapter's up-projection added in place on the [MASK] rows (bfloat16 dot products
  where the CPU has AVX512-BF16);
- `rms_norm`, `add_rms_norm` (the residual add and the next norm in one pass), `silu_mul` (SwiGLU's
  gate) and `rope_cache_` (RoPE on q and k, and the K/V cache writes).

Every kernel works row by row, so no row's result depends on the others in the call.

The kernels are compiled with the machine's C++ compiler through `torch.utils.cpp_extension` (about
half a minute, once; cached in `~/.cache/tidar/kernels/`). Where that is impossible (no
compiler, another OS) or `TIDAR_KERNELS=0`, `available()` is False and the engine keeps its pure
PyTorch path, which is exact too. `python -m tidar.model.kernels` builds them and prints the outcome.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

from tidar.model.files import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"


def _build() -> str | None:
    """Compile and load the kernels; None on success, else why not."""
    return build_extension("tidar_cpu", SOURCE)


def build_extension(prefix: str, source: Path) -> str | None:
    """Compile and load a C++ operator library of ours (`csrc/`); None on success, else why not."""
    if os.environ.get("TIDAR_KERNELS", "1") == "0":
        return "disabled by TIDAR_KERNELS=0"
    if not sys.platform.startswith("linux"):
        return f"not built on {sys.platform}"
    # -march=native: the build is for this machine. The name carries a hash of the source, the torch
    # version and the CPU's flags, so a shared cache never hands a binary to the wrong CPU, and a
    # library built under that name is loaded as it is: importing cpp_extension and asking ninja
    # whether it is up to date took 0.25 s of every start.
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    name = f"{prefix}_{hashlib.sha256(source.read_bytes() + torch.__version__.encode() + flags.encode()).hexdigest()[:12]}"
    build_dir = cache_dir() / "kernels" / name
    built = build_dir / f"{name}.so"
    if built.exists():
        try:
            torch.ops.load_library(str(built))
            return None
        except (OSError, RuntimeError):  # a damaged build: built again below
            pass
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(source)], is_python_module=False, verbose=False, build_directory=str(build_dir),
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - any compiler/ninja failure leaves the PyTorch path
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """Why the compiled kernels are not loaded, or None when they are (builds them on the first call)."""
    reason = _build()
    if reason is not None and os.environ.get("TIDAR_KERNELS", "1") != "0":
        warnings.warn(f"tidar: compiled CPU kernels unavailable ({reason}); using the PyTorch path", stacklevel=2)
    return reason


def available() -> bool:
    """Whether the compiled kernels are loaded (builds them on the first call)."""
    return unavailable_reason() is None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     n_keys: int) -> torch.Tensor:
    """q (B, H, T, D); k, v (B, H_kv, W, D); bias (B or 1, 1, T, W) float32 (0 / -inf) -> (B, T, H, D)."""
    return torch.ops.tidar_cpu.decode_attention(q, k, v, bias, n_keys)


def lora_add_(out: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor, row_start: int,
              col_bounds: list[int] | None = None, rank_bounds: list[int] | None = None) -> None:
    """out[:, row_start:] += down[:, row_start:] @ up_t, in place (float32 sums). With the fused parts'
    cumulative output sizes and ranks (`col_bounds`, `rank_bounds`), up_t's off-diagonal zeros are skipped."""
    torch.ops.tidar_cpu.lora_add_(out, down, up_t, row_start, col_bounds or [], rank_bounds or [])


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate on a fused [gate | up] output (B, T, 2I): silu(gate) * up, rounded as PyTorch's
    `F.silu(gate) * up` rounds (its exp is ours, so an ulp may differ)."""
    return torch.ops.tidar_cpu.silu_mul(gu)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row: weight * (x * rsqrt(mean(x^2) + eps)), rounded as the reference does."""
    return torch.ops.tidar_cpu.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta))."""
    return torch.ops.tidar_cpu.add_rms_norm(x, delta, weight, eps)


def rope_cache_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                offset: int, n_head: int) -> torch.Tensor:
    """RoPE on the q|k|v projection output's q and k; k (transposed) and v written into the cache at
    `offset`; returns q (B, H, T, D)."""
    return torch.ops.tidar_cpu.rope_cache_(qkv, cos, sin, k_cache, v_cache, offset, n_head)


if __name__ == "__main__":
    ok = available()
    print("tidar compiled CPU kernels:", "loaded" if ok else f"unavailable ({unavailable_reason()})")
