"""Baselines in the same engine terms (static KV cache, same stats), for side-by-side comparison:

- block diffusion decoding with the same weights (diffusion only, confidence threshold, no AR
  verification): shows the quality TiDAR keeps;
- speculative decoding with a separate draft model (e.g. a truncated copy of the target).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tidar.decode import GenerationConfig, GenerationError, GenerationOutput, GenerationStats
from tidar.decode.accept import speculative_accept
from tidar.decode.sampling import sample, warp
from tidar.masks import causal_mask, with_prefix
from tidar.model.transformer import KVCache, Transformer


def _prefill(model: Transformer, prompt: Sequence[int], cache: KVCache) -> torch.Tensor:
    n = len(prompt)
    h = model(torch.tensor([list(prompt)]), torch.arange(n)[None], causal_mask(n), cache=cache, offset=0, return_hidden=True)
    cache.valid[:, :n] = True
    cache.truncate(n)
    return h


def _logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    return model.head(h).float()


class _Emitter:
    def __init__(self, cfg: GenerationConfig, eos: set[int], stats: GenerationStats) -> None:
        self.cfg, self.eos, self.stats = cfg, eos, stats
        self.tokens: list[int] = []
        self.done = False

    def __call__(self, toks: Sequence[int]) -> None:
        for t in toks:
            if self.done:
                return
            self.tokens.append(int(t))
            self.stats.generated_tokens += 1
            if int(t) in self.eos or len(self.tokens) >= self.cfg.max_new_tokens:
                self.done = True


@torch.inference_mode()
def diffusion_generate(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                       threshold: float = 0.9, block_size: int | None = None) -> GenerationOutput:
    """Block diffusion decoding (greedy): blocks of b [MASK] tokens are denoised left to right;
    each forward unmasks every position whose confidence is >= threshold (at least the most
    confident one). A finished block is committed to the cache causally in the same forward as
    the first denoising step of the next block."""
    cfg.validate()
    if cfg.do_sample:
        raise GenerationError("the diffusion baseline decodes greedily; drop do_sample")
    b = block_size or cfg.block_size or model.config.block_size
    dtype = next(model.parameters()).dtype
    eos = set(cfg.eos_token_id or model.config.eos_ids)
    stats = GenerationStats(acceptance_histogram=[0] * b)
    outputs = []
    t_start = time.perf_counter()
    for prompt in prompts:
        cache = KVCache(model.config, 1, len(prompt) + cfg.max_new_tokens + 3 * b, dtype)
        _prefill(model, prompt, cache)
        emit = _Emitter(cfg, eos, stats)
        pending: list[int] = []  # the previous block, decoded but not yet in the cache
        while not emit.done:
            pending = _denoise_block(model, cache, pending, b, threshold, stats)
            emit(pending)
        outputs.append(emit.tokens)
    stats.total_s = time.perf_counter() - t_start
    stats.step_tokens = stats.generated_tokens
    stats.sequence_steps = stats.forwards
    return GenerationOutput(outputs, stats)


def _denoise_block(model: Transformer, cache: KVCache, pending: list[int], b: int, threshold: float,
                   stats: GenerationStats) -> list[int]:
    """Decode one block of b tokens; the first forward also commits `pending` (causally)."""
    m = model.config.mask_token_id
    block = torch.full((b,), m)
    decided = torch.zeros(b, dtype=torch.bool)
    while not decided.all():
        S, n_clean = cache.length, len(pending)
        ids = torch.tensor(pending + block.tolist())[None]
        T = n_clean + b
        new = torch.zeros(T, T, dtype=torch.bool)
        new[:n_clean, :n_clean] = causal_mask(n_clean)
        new[n_clean:, :] = True
        h = model(ids, torch.arange(S, S + T)[None], with_prefix(new, cache.valid[:, :S]), cache=cache, offset=S,
                  return_hidden=True)
        stats.forwards += 1
        cache.valid[:, S:S + n_clean] = True
        cache.truncate(S + n_clean)
        pending = []
        conf, tok = _logits(model, h[0, n_clean:]).softmax(-1).max(-1)
        conf = conf.masked_fill(decided, -1.0)
        pick = (conf >= threshold) & ~decided
        if not pick.any():
            pick[conf.argmax()] = True
        block[pick] = tok[pick]
        decided |= pick
        stats.acceptance_histogram[int(pick.sum()) - 1] += 1
    return block.tolist()


def truncated_draft(model: Transformer, n_layers: int) -> Transformer:
    """A cheap draft model: the first n_layers of the target plus its final norm and head (shared
    tokenizer by construction). A real drafter can be any small model of the same vocabulary."""
    if not 1 <= n_layers <= model.config.num_hidden_layers:
        raise GenerationError(f"draft layers must be in 1..{model.config.num_hidden_layers}, got {n_layers}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n_layers
    cfg.adapter = None
    draft = Transformer(cfg)
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    draft.load_state_dict(state, strict=False)
    return draft.to(next(model.parameters()).dtype).eval()


@torch.inference_mode()
def spec_generate(target: Transformer, draft: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                  gamma: int = 4) -> GenerationOutput:
    """Speculative decoding (Leviathan et al.): the draft model proposes gamma tokens one by one,
    the target verifies them in one forward; greedy or rejection sampling, so output equals AR."""
    cfg.validate()
    if gamma < 1:
        raise GenerationError(f"gamma must be >= 1, got {gamma}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise GenerationError("the draft model must share the target's vocabulary")
    eos = set(cfg.eos_token_id or target.config.eos_ids)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    stats = GenerationStats(acceptance_histogram=[0] * (gamma + 1))

    def dist(logits: torch.Tensor) -> torch.Tensor:
        if cfg.do_sample:
            return warp(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()

    t_start = time.perf_counter()
    outputs = [_speculate(target, draft, prompt, cfg, gamma, dist, gen, _Emitter(cfg, eos, stats)) for prompt in prompts]
    stats.total_s = time.perf_counter() - t_start
    stats.step_tokens = stats.generated_tokens - len(prompts)
    stats.sequence_steps = stats.forwards
    return GenerationOutput(outputs, stats)


def _speculate(target: Transformer, draft: Transformer, prompt: Sequence[int], cfg: GenerationConfig, gamma: int,
               dist: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator | None, emit: _Emitter) -> list[int]:
    """One prompt: draft gamma tokens, verify them in one target forward, commit, repeat."""
    dtype = next(target.parameters()).dtype
    size = len(prompt) + cfg.max_new_tokens + 2 * gamma + 2
    tc, dc = KVCache(target.config, 1, size, dtype), KVCache(draft.config, 1, size, dtype)
    h = _prefill(target, prompt, tc)
    _prefill(draft, prompt, dc)
    last = sample(dist(_logits(target, h[:, -1])), gen)  # (1,)
    emit([int(last)])
    n = len(prompt)  # committed tokens in the target cache; `last` is not yet in it
    pending = [int(last)]  # committed tokens the draft cache has not seen yet
    while not emit.done:
        proposal, qs = _draft_tokens(draft, dc, pending, gamma, dist, gen)
        # verify [last, d_1..d_gamma] in one target forward
        ids = torch.tensor([[int(last)] + proposal])
        T = gamma + 1
        ht = target(ids, torch.arange(n, n + T)[None], with_prefix(causal_mask(T), tc.valid[:, :n]), cache=tc,
                    offset=n, return_hidden=True)
        emit.stats.forwards += 1
        p = dist(_logits(target, ht[0]))[None]  # (1, T, V)
        q = torch.stack([qs[0]] + qs)[None]  # row 0 unused: `last` is already committed
        a, bonus = speculative_accept(ids, p, q, gen)
        a = int(a)
        tc.valid[:, n:n + T] = False
        tc.valid[:, n:n + a] = True
        tc.truncate(n + a)
        # the draft cache holds last, d_1..d_{gamma-1}: keep the committed part of it
        dc.truncate(min(n + a, dc.length))
        pending = ([proposal[-1]] if a == T else []) + [int(bonus)]
        n += a
        emit.stats.acceptance_histogram[a - 1] += 1
        emit(proposal[: a - 1] + [int(bonus)])
        last = bonus
    return emit.tokens


def _draft_tokens(draft: Transformer, dc: KVCache, pending: list[int], gamma: int,
                  dist: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator | None
                  ) -> tuple[list[int], list[torch.Tensor]]:
    """gamma tokens from the draft model, one by one, first catching its cache up on `pending`;
    and the distribution each was drawn from."""
    proposal, qs = [], []
    inp = torch.tensor([pending])
    for _ in range(gamma):
        S, k = dc.length, inp.shape[1]
        hd = draft(inp, torch.arange(S, S + k)[None], with_prefix(causal_mask(k), dc.valid[:, :S]), cache=dc,
                   offset=S, return_hidden=True)
        dc.valid[:, S:S + k] = True
        dc.truncate(S + k)
        q = dist(_logits(draft, hd[:, -1]))
        tok = sample(q, gen)
        proposal.append(int(tok))
        qs.append(q[0])
        inp = tok[None]
    return proposal, qs
