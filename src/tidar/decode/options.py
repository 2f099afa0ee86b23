"""Every decoding option, declared once: name, default, help text and validation.

`GenerationConfig` is the only place a decoding option exists. The CLI flags (`tidar generate`,
`tidar bench`, `tidar eval`), the server's request fields and the shipped operating point (the
`operating_point` of a model's tidar.json) are all derived from these fields and their metadata:
an option added here appears everywhere, an option removed here disappears everywhere.

Names follow transformers' `generate()` where one exists.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MIN_TEMPERATURE = 1e-5  # the smallest sampling temperature (vLLM's rule too); below it, decode greedily


class GenerationError(ValueError):
    """Bad generation arguments."""


def option(default: Any, help: str, *, choices: Sequence[str] | None = None, at_least: float | None = None,
           above: float | None = None, at_most: float | None = None, flag: bool = True, request: bool = False,
           tuned: bool = False) -> Any:
    """A GenerationConfig field with what every consumer needs to know about it.

    `flag`: a CLI flag; `request`: a server request field (an extension beyond OpenAI's own names);
    `tuned`: part of a model's operating point (its manifest may set it).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "at_least": at_least, "above": above,
            "at_most": at_most, "flag": flag, "request": request, "tuned": tuned}
    return field(default=default, metadata=meta)


@dataclass
class GenerationConfig:
    """Arguments of one generation; `validate()` says in one line what is wrong."""

    max_new_tokens: int = option(128, "most tokens to generate per prompt", at_least=1)
    do_sample: bool = option(False, "sample instead of greedy decoding (greedy TiDAR equals greedy AR)")
    temperature: float = option(1.0, "sampling temperature (with do_sample)")
    top_k: int | None = option(None, "sample among the k most likely tokens only (default: all)", at_least=1, request=True)
    top_p: float | None = option(None, "sample from the smallest set of tokens whose probability reaches p "
                                         "(default: 1, all)",
                                 above=0, at_most=1)
    seed: int | None = option(None, "random seed for sampling (default: from the OS)", at_least=-(2**63),
                              at_most=2**63 - 1)
    eos_token_id: Sequence[int] = option((), "token ids that end a sequence (default: the model's)", flag=False)
    mode: str = option("tidar", "tidar (drafts verified in the same forward) or ar (one token per forward)",
                       choices=("tidar", "ar"), request=True)
    block_size: int | None = option(None, "diffusion draft length b (default: the model's operating point, else "
                                          "its trained b; a smaller b works zero-shot)", at_least=1, at_most=32,
                                    request=True, tuned=True)
    policy: str = option("all", "which acceptance lengths get a pre-drafted [MASK] block: all (1..b) or full "
                                "(1 and b)", choices=("all", "full"), tuned=True)
    beta: float = option(1.0, "trust in AR when verifying: each diffusion-drafted token is checked against "
                              "beta * AR logits + (1 - beta) * the logits it was drafted from (1 = lossless, "
                              "AR's output; 0 = every diffusion draft is kept; sampling follows the mixed "
                              "distribution exactly)", at_least=0, at_most=1)
    lookup_ngram: int = option(0, "prompt lookup: draft what followed the context's last N tokens where they "
                                  "occurred earlier (0 = off)", at_least=0, tuned=True)
    lookup_tokens: int = option(0, "prompt lookup: longest copied draft after the committed token; may exceed "
                                   "the block (0 = b - 1)", at_least=0, tuned=True)
    datastore_tokens: int = option(0, "longest draft from the model's datastore of its own earlier outputs, "
                                      "where prompt lookup finds nothing (0 = off)", at_least=0, tuned=True)
    min_draft_gain: float = option(0.0, "feed [MASK] blocks only while diffusion drafts commit this many extra "
                                        "tokens per step, probing again every few steps (0 = no gate; a step "
                                        "verifying a copied span feeds no blocks either way)",
                                   at_least=0, tuned=True)
    max_draft_batch: int = option(0, "a step of a batch with more running sequences than this is plain AR; it "
                                     "drafts again once sequences finish or leave (0 = always draft)", at_least=0,
                                  tuned=True)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            # below this, logits / temperature overflows float32 to inf: the draw would be NaN
            raise GenerationError(f"temperature must be >= {MIN_TEMPERATURE:g} when sampling; a smaller one "
                                  "is greedy decoding (use do_sample=False)")


# TiDAR as in the paper: diffusion drafts only (no copy drafts, no gate), a block for every acceptance
# length. One flag of `tidar generate` (--diffusion-only) and the bench method `tidar-diffusion`.
DIFFUSION_ONLY: dict[str, Any] = {"lookup_ngram": 0, "datastore_tokens": 0, "min_draft_gain": 0.0, "policy": "all"}

_HINTS: dict[str, Any] = {}


def option_type(name: str) -> type:
    """The Python type of an option's values (int for `int | None`)."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(GenerationConfig))
    hint = _HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def options(kind: str) -> list[dataclasses.Field]:
    """The fields marked `flag`, `request` or `tuned`, in declaration order."""
    return [f for f in dataclasses.fields(GenerationConfig) if f.metadata[kind]]


def check_option(name: str, value: Any) -> None:
    """Raise GenerationError if `value` is not valid for option `name`."""
    _check(next(f for f in dataclasses.fields(GenerationConfig) if f.name == name), value)


def check_sweep(sweeps: dict[str, Sequence[Any]]) -> None:
    """`check_option` for every value of each swept option (e.g. {"block_size": [2, 3, 4]})."""
    for name, values in sweeps.items():
        for value in values:
            check_option(name, value)


def _check(f: dataclasses.Field, value: Any) -> None:
    if value is None and f.default is None:
        return
    m, name, want = f.metadata, f.name, option_type(f.name)
    ok_type = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok_type = True
    if not ok_type:
        raise GenerationError(f"{name} must be {want.__name__}, got {value!r}")
    if want is float and not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value}")
    if m["choices"] and value not in m["choices"]:
        raise GenerationError(f"{name} must be one of {', '.join(m['choices'])}; got {value!r}")
    if m["at_least"] is not None and not value >= m["at_least"]:
        raise GenerationError(f"{name} must be >= {m['at_least']}, got {value}")
    if m["above"] is not None and not value > m["above"]:
        raise GenerationError(f"{name} must be > {m['above']}, got {value}")
    if m["at_most"] is not None and not value <= m["at_most"]:
        raise GenerationError(f"{name} must be <= {m['at_most']}, got {value}")
