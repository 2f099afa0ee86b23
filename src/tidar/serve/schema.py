"""Request bodies: OpenAI's fields (strict JSON types), our decoding extensions, and the fields this
server does not implement, each with the value(s) that mean "off"."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from tidar.decode.options import option_type, options
from tidar.serve.errors import APIError


def _off(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {}


def _number(neutral: float) -> Callable[[Any], bool]:
    return lambda v: v is None or (type(v) in (int, float) and v == neutral)


# Request fields (OpenAI's, and vLLM's/transformers' sampling names) this server does not implement,
# each with the test for the value(s) that mean "off": such a value is accepted (clients send some by
# default, e.g. presence_penalty 0), any other is a 400 naming the field.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": _off, "top_logprobs": _off, "echo": _off, "suffix": _off, "logit_bias": _off,
    "presence_penalty": _number(0), "frequency_penalty": _number(0), "repetition_penalty": _number(1),
    "min_p": _number(0), "typical_p": _number(1), "top_a": _number(0), "min_tokens": _number(0),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _off, "functions": _off, "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "modalities": lambda v: v in (None, ["text"]), "audio": _off,
    "ignore_eos": _off, "stop_token_ids": _off, "bad_words": _off, "allowed_token_ids": _off,
    "use_beam_search": _off, "guided_json": _off, "guided_regex": _off, "guided_choice": _off,
    "guided_grammar": _off, "structured_outputs": _off, "logits_processors": _off, "prompt_logprobs": _off,
    "include_stop_str_in_output": _off,
}
_SURROGATE = re.compile("[\ud800-\udfff]")


def _extension_fields() -> dict[str, Any]:
    """Our request fields beyond OpenAI's own names: the decoding options marked `request` in
    `tidar.decode.options` (validated there, as everywhere: a bad value is a 400 naming it)."""
    return {f.name: (option_type(f.name) | None, Field(None, description=f.metadata["help"]))
            for f in options("request")}


_Extensions = create_model("_Extensions", **_extension_fields())


def check_json(data: Any) -> None:
    """Reject what JSON lets through but no field can mean: a lone surrogate in any string or key (a
    "\\ud800" escape is not Unicode text, and a tokenizer fails on it) and a non-finite number anywhere
    (Python's JSON parser reads NaN, Infinity and 1e400 as inf). Iterative: JSON nested ~1000 deep
    must not overflow the stack."""
    if not isinstance(data, dict):
        return  # not an object: the model's own validation says so
    stack: list[tuple[str | None, str, Any]] = [(None, "", data)]
    while stack:
        top, path, v = stack.pop()
        if isinstance(v, str) and (bad := _SURROGATE.search(v)):
            raise APIError(f"{path} is not valid Unicode: it contains a lone surrogate (\\u{ord(bad.group()):04x}); "
                           "send UTF-8 text", param=top)
        if isinstance(v, float) and not math.isfinite(v):
            raise APIError(f"{path} must be a finite number, got {v}", param=top)
        if isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    raise APIError(f"{path or 'the request'} is not valid Unicode: a key contains a lone surrogate; "
                                   "send UTF-8 text", param=top)
                stack.append((top or k, f"{path}.{k}" if path else k, x))
        elif isinstance(v, list):
            stack.extend((top, f"{path}[{i}]", x) for i, x in enumerate(v))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class SamplingRequest(_Extensions):
    # strict: a wrong JSON type is a 400 (no "5" for 5, no true for 1.0; an int is a valid float).
    # Fields beyond these are kept (clients send user, store, metadata, ...); UNSUPPORTED ones must be "off".
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens
    temperature: float | None = Field(None, ge=0)  # OpenAI default 1: sampling; 0 = greedy
    top_p: float | None = Field(None, ge=0, le=1)  # 0 = greedy
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    best_of: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_json(cls, data: Any) -> Any:
        check_json(data)
        return data


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]


def param_of(message: str) -> str | None:
    """The request field an engine message ("seed must be <= ...") is about, if it names one."""
    word = message.split(" ", 1)[0]
    word = {"max_new_tokens": "max_tokens"}.get(word, word)
    return word if word in ChatRequest.model_fields or word in CompletionRequest.model_fields else None
