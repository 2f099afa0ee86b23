"""TiDAR decoding through transformers' `custom_generate` (custom_generate/generate.py of a TiDAR export).

Loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, the model's
`generate()` is this function (transformers swaps it in because the directory has this file), and
`model.generate(..., custom_generate=dir, trust_remote_code=True)` runs it however the model was
loaded. transformers' own AR loop stays one call away: `generate(..., tidar=False)` or
`type(model).generate(model, ...)`.

One TiDAR step is one forward over the draft d_1..d_W (causal; d_1 is already committed, d_2.. are
diffusion drafts) followed by one block of b [MASK] tokens per acceptance length a in 1..W: that
block sees the prefix and d_1..d_a, and itself bidirectionally, at the positions after d_a. The
causal rows verify the draft (greedy: d_{i+1} stays while it equals the AR argmax after d_i;
sampling: speculative rejection sampling, Leviathan et al.), so greedy output is greedy AR's and
sampled output follows AR's distribution. The block drafted for the a actually accepted gives the
next draft. This is TiDAR as in the paper (diffusion drafts only, a block for every a); `tidar`'s
engine adds copy drafts and a batched, bit-stable cache on top.

KV cache: a DynamicCache holds the committed tokens only. A step appends its T rows and is cropped
back to the accepted d_1..d_a, whose keys and values were computed causally (they never attend to
[MASK] rows), so they are what AR decoding would have cached.

Exact up to floating-point rounding: a token verified among others goes through matmuls with more
rows than an AR step's, which may round its last bits differently (as batched decoding does in
transformers); on a near-tie that can flip a greedy choice. In float32 that is rare.

Sequences of a batch are decoded one after another, each without its padding. Self-contained
(torch and transformers only), like the modeling code.
"""

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Generation settings this loop does not implement (most depend on the tokens so far, which a draft
# row would need per row), with the values that mean "off". Anything else is refused, not ignored.
NEUTRAL = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "sequence_bias": (None,), "guidance_scale": (None, 1.0), "stop_strings": (None,),
    "max_time": (None,), "output_scores": (None, False), "output_logits": (None, False),
    "output_attentions": (None, False), "output_hidden_states": (None, False), "watermarking_config": (None,),
    "renormalize_logits": (None, False), "exponential_decay_length_penalty": (None,), "penalty_alpha": (None,),
}
# `generate()` arguments that select another decoding method; None = not used
OTHER_METHODS = ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask")


def generate(inputs=None, *, model, generation_config=None, logits_processor=None, stopping_criteria=None,  # noqa: ANN001
             streamer=None, tidar: bool = True, block_size: int | None = None, tidar_stats: dict | None = None,  # noqa: ANN001
             **kwargs):  # noqa: ANN003, ANN201
    """`model.generate` with TiDAR decoding: the usual arguments (`input_ids`, `attention_mask`,
    `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `eos_token_id`,
    `streamer`, `generation_config`, ...) plus `block_size` (draft length b; default: the one the
    adapter was trained for), `tidar=False` (transformers' own AR loop instead) and `tidar_stats`
    (a dict to fill with "forwards", "new_tokens" and "accepted_drafts")."""
    kwargs.pop("custom_generate", None)  # this is it: reached through a model whose generate() already is this
    kwargs.pop("trust_remote_code", None)
    if not tidar:
        return type(model).generate(model, inputs, generation_config=generation_config, logits_processor=logits_processor,
                                    stopping_criteria=stopping_criteria, streamer=streamer, **kwargs)
    kwargs.pop("synced_gpus", None)
    kwargs.pop("tokenizer", None)  # only stop_strings read it, and they are refused below
    for name in OTHER_METHODS:
        if kwargs.pop(name, None) is not None:
            raise NotImplementedError(f"TiDAR generate does not support {name}; pass tidar=False for transformers' loop")
    if logits_processor or stopping_criteria:
        raise NotImplementedError("TiDAR generate takes no custom logits_processor or stopping_criteria; "
                                  "pass tidar=False for transformers' loop")
    # transformers' own merge of the model's generation_config, the global defaults and the kwargs,
    # so every setting means what it means in generate()
    gen, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("TiDAR generate needs input_ids of shape (batch, prompt length > 0)")
    if model_kwargs:
        raise TypeError(f"TiDAR generate got unexpected arguments: {sorted(model_kwargs)}")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("a streamer needs a batch of one sequence")
    settings = Settings(model, gen, block_size, input_ids.shape[1])
    with torch.no_grad():
        out = _generate_batch(model, settings, input_ids, attention_mask, streamer, tidar_stats)
    return GenerateDecoderOnlyOutput(sequences=out) if gen.return_dict_in_generate else out


class Settings:
    """What one generate() call decodes with, checked once."""

    def __init__(self, model, gen, block_size: int | None, prompt_width: int) -> None:  # noqa: ANN001
        if not hasattr(model, "tidar_logits"):
            raise TypeError(f"TiDAR generate needs a TidarForCausalLM, got {type(model).__name__}")
        for name, neutral in NEUTRAL.items():
            if getattr(gen, name, None) not in neutral:
                raise NotImplementedError(f"TiDAR generate does not support {name}={getattr(gen, name)!r}; "
                                          "pass tidar=False for transformers' loop")
        self.block = int(block_size if block_size is not None else model.block_size)
        if self.block < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block}")
        self.mask_id = model.mask_token_id
        self.sample = bool(gen.do_sample)
        self.warpers = _warpers(gen) if self.sample else None
        eos = gen.eos_token_id
        eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.eos = set(eos)
        self.max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - prompt_width
        # finished rows are padded like transformers pads them: pad_token_id, else the first EOS
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)


def _warpers(gen) -> LogitsProcessorList:  # noqa: ANN001
    """The sampling warpers transformers' generate() applies, in its order (they read only the logits)."""
    out = LogitsProcessorList()
    if gen.temperature is not None and gen.temperature != 1.0:
        out.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k is not None and gen.top_k != 0:
        out.append(TopKLogitsWarper(top_k=gen.top_k))
    if gen.top_p is not None and gen.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=gen.top_p))
    if gen.min_p is not None:
        out.append(MinPLogitsWarper(min_p=gen.min_p))
    return out


def _generate_batch(model, s: Settings, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,  # noqa: ANN001
                    streamer, stats: dict | None) -> torch.Tensor:  # noqa: ANN001
    """Each row decoded alone (without its padding); new tokens right-padded to one width."""
    if streamer is not None:
        streamer.put(input_ids.cpu())  # as transformers does: a TextStreamer skips it with skip_prompt
    decoder = Decoder(model, s)
    rows = []
    for i in range(input_ids.shape[0]):
        ids = input_ids[i] if attention_mask is None else input_ids[i][attention_mask[i].bool()]
        seq = Sequence(s, streamer)
        if s.max_new > 0:
            decoder.run(ids.tolist(), seq.add)
        rows.append(seq.tokens)
    if streamer is not None:
        streamer.end()
    if stats is not None:
        stats.update(forwards=decoder.forwards, new_tokens=sum(map(len, rows)), accepted_drafts=decoder.accepted)
    new = torch.full((len(rows), max(map(len, rows))), s.pad, dtype=torch.long)
    for i, r in enumerate(rows):
        new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


class Sequence:
    """One sequence's new tokens: cut after EOS (kept) or max_new_tokens, streamed as they come."""

    def __init__(self, s: Settings, streamer) -> None:  # noqa: ANN001
        self.s, self.streamer, self.tokens = s, streamer, []

    def add(self, toks: list[int]) -> bool:
        """Append a step's tokens; False once the sequence is done."""
        start, done = len(self.tokens), False
        for t in toks:
            self.tokens.append(t)
            if t in self.s.eos or len(self.tokens) >= self.s.max_new:
                done = True
                break
        if self.streamer is not None and len(self.tokens) > start:
            self.streamer.put(torch.tensor(self.tokens[start:]))
        return not done


def step_layout(n_clean: int, block: int, accept_lengths: range) -> tuple[torch.Tensor, list[int]]:
    """Mask (T, T) among one step's new tokens (True = may attend) and their positions relative to d_1:
    d_1..d_n causal, then per a in `accept_lengths` a block of `block` [MASK] tokens that sees d_1..d_a
    and itself, at positions a..a+block-1 (tidar.masks.step_layout)."""
    T = n_clean + len(accept_lengths) * block
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[:n_clean, :n_clean] = torch.ones(n_clean, n_clean, dtype=torch.bool).tril()
    positions = list(range(n_clean))
    for j, a in enumerate(accept_lengths):
        s = n_clean + j * block
        allowed[s:s + block, :a] = True
        allowed[s:s + block, s:s + block] = True
        positions += range(a, a + block)
    return allowed, positions


class Decoder:
    """TiDAR decoding of one sequence at a time on a TidarForCausalLM, with a cropped DynamicCache."""

    def __init__(self, model, s: Settings) -> None:  # noqa: ANN001
        self.model, self.s = model, s
        self.forwards = 0
        self.accepted = 0  # draft tokens d_2.. accepted, over all steps

    def run(self, prompt: list[int], emit: Callable[[list[int]], bool]) -> None:
        """Decode after `prompt`; `emit(tokens)` gets each forward's new tokens and says whether to go on."""
        self.cache = DynamicCache(config=self.model.config)
        first, block = self._prefill(prompt)
        if not emit([first]):
            return
        drafts, q = self.draft(first, block)
        while True:
            a, bonus, block = self._step(drafts, q)
            if not emit(drafts[1:a] + [bonus]):
                return
            drafts, q = self.draft(bonus, block)

    def _prefill(self, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        """The prompt (causal) plus one [MASK] block that sees all of it: the first token (AR) and the
        block's logits, row 0 at the first token's position."""
        n, b = len(prompt), self.s.block if self.s.block > 1 else 0
        allowed = torch.zeros(n + b, n + b, dtype=torch.bool)
        allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[n:] = True
        logits = self._forward(prompt + [self.s.mask_id] * b, list(range(n + b)), allowed)
        self._keep(n)
        return self._choose(logits[n - 1]), (logits[n:] if b else None)

    def _step(self, drafts: list[int], q: torch.Tensor | None) -> tuple[int, int, torch.Tensor | None]:
        """One forward: verify the draft, keep the accepted part in the cache; (a, bonus, next block's logits)."""
        S, W, b = self.cache.get_seq_length(), len(drafts), self.s.block
        lengths = range(1, W + 1) if b > 1 else range(0)
        allowed, offsets = step_layout(W, b, lengths)
        logits = self._forward(drafts + [self.s.mask_id] * (len(lengths) * b), [S + o for o in offsets], allowed)
        a, bonus = self.verify(drafts, q, logits[:W])
        self._keep(S + a)
        self.accepted += a - 1
        return a, bonus, (logits[W + (a - 1) * b: W + a * b] if b > 1 else None)

    def _forward(self, ids: list[int], positions: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """Logits (T, V) of T new tokens after the cached ones, which every new token may see."""
        S, T = self.cache.get_seq_length(), len(ids)
        full = torch.cat([torch.ones(T, S, dtype=torch.bool), allowed], dim=1)
        self.forwards += 1
        return self.model.tidar_logits(torch.tensor([ids]), torch.tensor([positions]), full[None], self.cache)[0]

    def _keep(self, n: int) -> None:
        drop = self.cache.get_seq_length() - n
        if drop:
            self.cache.crop(-drop)  # a negative count: the same meaning in older transformers too

    def verify(self, drafts: list[int], q: torch.Tensor | None, ar: torch.Tensor) -> tuple[int, int]:
        """Acceptance length a in 1..W and the token after d_a, from the AR logits after each d_i."""
        if not self.s.sample:
            choice = ar.argmax(-1)
            match = torch.tensor(drafts[1:], device=choice.device) == choice[:-1]
            a = 1 + int(match.long().cumprod(0).sum())
            return a, int(choice[a - 1])
        return speculative_accept(drafts, self._probs(ar), q)

    def draft(self, bonus: int, block: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None]:
        """The next draft [bonus, d_2..d_b] from the [MASK] block (row 0 is the bonus's position), and
        when sampling the distributions d_2.. were drawn from (row 0 unused)."""
        if block is None:
            return [bonus], None
        rows = block[1:]
        if not self.s.sample:
            return [bonus] + rows.argmax(-1).tolist(), None
        q = self._probs(rows)
        picks = torch.multinomial(q, 1)[:, 0]
        return [bonus] + picks.tolist(), torch.cat([torch.zeros_like(q[:1]), q])

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.s.warpers(None, logits).softmax(-1)

    def _choose(self, logits: torch.Tensor) -> int:
        if not self.s.sample:
            return int(logits.argmax())
        return int(torch.multinomial(self._probs(logits[None])[0], 1))


def speculative_accept(drafts: list[int], p: torch.Tensor, q: torch.Tensor) -> tuple[int, int]:
    """Rejection sampling of d_2..d_W (drawn from q) against the AR distributions p, p[i] after d_{i+1}:
    d_{i+1} stays with probability min(1, p/q); at the first rejection the next token comes from
    norm(max(0, p - q)), after a full acceptance from p, so every token is distributed as under AR."""
    W, a = len(drafts), 1
    while a < W:
        d = drafts[a]
        if not float(torch.rand(())) * float(q[a, d]) < float(p[a - 1, d]):  # u < p/q without dividing by q = 0
            break
        a += 1
    dist = p[a - 1]
    if a < W:
        residual = (p[a - 1] - q[a]).clamp(min=0)
        # p <= q everywhere means the draft was accepted with probability 1: never a rejection here
        dist = residual / residual.sum() if float(residual.sum()) > 0 else dist
    return a, int(torch.multinomial(dist, 1))
