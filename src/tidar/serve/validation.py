"""From a validated request body to what the engine runs: checks beyond the body's types, the
generation config, the token budget (capped by --max-tokens-limit) and the prompts' token ids.
The prompt functions tokenize: the routes run them off the event loop (`ServerState.off_loop`)."""

from __future__ import annotations

from tidar.decode import GenerationConfig, GenerationError
from tidar.decode.options import MIN_TEMPERATURE, check_option, options
from tidar.model.weights import chat_ids
from tidar.serve.errors import APIError
from tidar.serve.schema import UNSUPPORTED, ChatMessage, SamplingRequest
from tidar.serve.state import ServerState

MAX_BATCH = 32  # prompts per /v1/completions request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # OpenAI's chat default is "up to the context"; clamped to it below

# Below the engine's MIN_TEMPERATURE (vLLM's rule) a request is decoded greedily rather than refused.
GREEDY_TEMPERATURE = MIN_TEMPERATURE
# Below this top_p the nucleus is the most likely token alone (its probability is at least 1/vocab),
# which is greedy decoding; the engine's float32 warp would round a tiny top_p to 0 and drop every token.
GREEDY_TOP_P = 1e-6


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def check_common(state: ServerState, req: SamplingRequest) -> None:
    if req.model is not None and req.model != state.name:
        raise APIError(f"The model `{req.model}` does not exist: this server serves `{state.name}` (GET /v1/models)",
                       404, param="model", code="model_not_found")
    extra = req.model_extra or {}
    for k, off in UNSUPPORTED.items():
        if k in extra and not off(extra[k]):
            raise APIError(f"{k} is not supported by this server", param=k)
    if req.n not in (None, 1):
        raise APIError(f"n must be 1 (got {req.n}): send separate requests, or a list of prompts", param="n")
    if req.best_of not in (None, 1):
        raise APIError("best_of is not supported", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    for f in options("request"):  # validated whether or not greedy decoding then ignores them (top_k)
        value = getattr(req, f.name)
        if value is not None:
            try:
                check_option(f.name, value)
            except GenerationError as e:
                raise APIError(str(e), param=f.name) from None


def generation_config(state: ServerState, req: SamplingRequest, max_tokens: int) -> GenerationConfig:
    temperature = 1.0 if req.temperature is None else req.temperature
    sampling = temperature >= GREEDY_TEMPERATURE and (req.top_p is None or req.top_p >= GREEDY_TOP_P)
    # An unseeded request stays unseeded: the engine seeds its generator from the OS, and requests
    # without a seed can share a running batch (a seeded one decodes alone, to be reproducible).
    seed = req.seed
    extensions = {f.name: getattr(req, f.name) for f in options("request")}
    if not sampling:
        extensions["top_k"] = None  # a sampling option, meaningless for greedy (as temperature and top_p)
    return state.runtime.generation_config(
        **extensions, max_new_tokens=max_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=req.top_p if sampling else None, seed=seed)


def max_tokens(state: ServerState, req: SamplingRequest, default: int, prompt_len: int) -> int:
    """The request's token budget: what it asked for (a 400 past --max-tokens-limit), else `default`
    clamped to the room left in the context and to the limit."""
    field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
    requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    cap = state.config.max_tokens_limit
    if requested is not None:
        if cap is not None and requested > cap:
            raise APIError(f"{field} {requested} exceeds this server's limit of {cap} tokens per completion "
                           "(--max-tokens-limit)", param=field)
        return requested
    # a default must never be the reason a request fails
    cfg = state.runtime.model.config
    b = req.block_size or state.runtime.generation_config().block_size or cfg.block_size
    room = cfg.max_position_embeddings - prompt_len - 2 * b - 1
    return max(1, min(default, room, cap or default))


def _validate_ids(state: ServerState, ids: list[int]) -> list[int]:
    vocab = state.runtime.model.config.vocab_size
    if not ids:
        raise APIError("the prompt is empty after tokenization", param="prompt")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return ids


def completion_prompts(state: ServerState, prompt: str | list) -> list[list[int]]:
    """Tokenizes: run off the event loop."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif not prompt:
        raise APIError("prompt is empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > MAX_BATCH:
        raise APIError(f"at most {MAX_BATCH} prompts per request, got {len(prompts)}", param="prompt")
    encode = state.runtime.encode
    return [_validate_ids(state, list(p) if isinstance(p, list) else encode(p) if p else []) for p in prompts]


def chat_prompt(state: ServerState, messages: list[ChatMessage]) -> list[int]:
    """Applies the chat template and tokenizes: run off the event loop."""
    tok = state.runtime.tokenizer
    if not messages:
        raise APIError("messages is empty", param="messages")
    if not getattr(tok, "chat_template", None):
        raise APIError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    msgs = []
    for i, m in enumerate(messages):
        content = m.content
        if content is None and m.role != "assistant":  # as OpenAI: only an assistant turn may lack content
            raise APIError(f"messages[{i}].content is required for role {m.role!r}", param="messages")
        if isinstance(content, list):  # content parts: only text can reach a text-only model
            if any(p.type != "text" for p in content):
                raise APIError("only text content parts are supported", param="messages")
            if any(p.text is None for p in content):
                raise APIError(f"messages[{i}].content: a text part needs `text`", param="messages")
            content = "".join(p.text or "" for p in content)
        msgs.append({"role": m.role, "content": content or ""})
    try:
        ids = chat_ids(tok, msgs)
    except Exception as e:  # a template that rejects the conversation (roles, order) is the caller's error
        raise APIError(f"the chat template rejected these messages: {e}", param="messages") from None
    return _validate_ids(state, ids)
