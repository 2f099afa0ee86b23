"""A tokenizer on the `tokenizers` library alone, for the generation path.

Importing transformers and loading its AutoTokenizer took 2.7 s of a cold `tidar generate` (of 7.6 s)
and 150 MB, to run what `tokenizers` does by itself: a transformers tokenizer of the
`TokenizersBackend` kind encodes and decodes through the same `tokenizer.json`, and renders the chat
template with Jinja before encoding the result. `Tokenizer` does the same with the files
`save_pretrained` wrote, and gives the same ids and text (tests/test_cold_start.py checks it against
AutoTokenizer). Where a directory asks for anything it does not implement (another tokenizer class,
extra special tokens, space clean-up, a `{% generation %}` template), `Tokenizer.load` returns None
and the caller falls back to transformers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' classes that use tokenizer.json as it is, without rebuilding it from their own settings
PLAIN_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# tokenizer_config.json keys that change neither encode(add_special_tokens=False), decode nor the template
INERT_KEYS = frozenset({"backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length", "name_or_path",
                        "chat_template", "added_tokens_decoder", "model_input_names", "padding_side",
                        "truncation_side", "clean_up_tokenization_spaces", *SPECIAL})
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """What the runtime, the streamer and the server ask of a transformers tokenizer: `__call__` /
    `encode`, `decode`, the special tokens' ids and `apply_chat_template`."""

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str], chat_template: str | None = None,
                 name_or_path: str = "") -> None:
        self.backend = backend
        self.special_tokens_map = special  # what transformers passes the chat template besides the messages
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        for name in SPECIAL:
            setattr(self, f"{name}_id", backend.token_to_id(special[name]) if name in special else None)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer | None:
        """The tokenizer `save_pretrained` wrote to `directory`, or None where it needs transformers."""
        directory = Path(directory)
        config_path, json_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
        if not (config_path.exists() and json_path.exists()):
            return None
        config = json.loads(config_path.read_text())
        template_path = directory / "chat_template.jinja"
        template = template_path.read_text() if template_path.exists() else config.get("chat_template")
        if (set(config) - INERT_KEYS or config.get("tokenizer_class") not in PLAIN_CLASSES
                or config.get("clean_up_tokenization_spaces") or not isinstance(template, str | None)
                or (template and _GENERATION_TAG.search(template))):
            return None
        backend = tokenizers.Tokenizer.from_file(str(json_path))
        special = {k: _content(config[k]) for k in SPECIAL if config.get(k) is not None}
        added = config.get("added_tokens_decoder", {})
        # tokens transformers would add on top of tokenizer.json, or special tokens it does not know
        if any(backend.token_to_id(_content(t)) != int(i) for i, t in added.items()) or \
                any(backend.token_to_id(t) is None for t in special.values()):
            return None
        return cls(backend, special, template, str(directory))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [e.ids for e in self.backend.encode_batch(text, add_special_tokens=add_special_tokens)]}

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([ids] if isinstance(ids, int) else list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> str | list[int]:
        """The conversation through the chat template, as text or (tokenize) as ids: transformers'
        rendering (its Jinja settings and helpers, None values dropped, reasoning aliases) and its
        encoding of the result (no special tokens added)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        text = _compile(self.chat_template).render(messages=chat, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt,
                                                   **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """A message's reasoning under every name templates read it by (as transformers does)."""
    reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str) -> Any:
    """The template compiled as transformers compiles chat templates: a sandbox with trim_blocks,
    lstrip_blocks and loop controls, a `tojson` that does not escape HTML, `raise_exception` and
    `strftime_now`."""
    if template not in _TEMPLATES:
        import jinja2  # only for chat prompts
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
