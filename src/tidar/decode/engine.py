"""Decoding: AR and TiDAR in one engine, one model forward per step, exact static KV cache.

A TiDAR step feeds the previous draft d_1..d_b (causal, verified against the AR logits of the same
pass) plus one block of b [MASK] tokens per pre-drafted acceptance length a (each block sees the
prefix and d_1..d_a). After verification the cache keeps exactly d_1..d_a, the AR distribution
at d_a gives the next committed token (the "bonus", next step's d_1), and the block of the real a
gives the rest of the next draft. Greedy output equals AR greedy output; sampling uses
speculative rejection sampling so the output distribution equals AR sampling.

Prompt lookup (optional): when the context's last n-gram occurred earlier, what followed it there
(at the occurrence whose preceding tokens match the context furthest back) replaces d_2.. and may
run past the block (`lookup_tokens`). A step verifying such a span feeds no
[MASK] blocks by default (`span_predraft`): inside a repeat the next draft is usually a copied
span again, and mask rows are the expensive part of a CPU step (they run the adapter). After a
partial acceptance the next draft is then the bonus token alone (plus any new lookup span), and
that step pre-drafts as usual.

Batch > 1: all sequences write the same cache slots each step; a sequence that accepted fewer
tokens than the batch maximum leaves invalid slots ("holes") that its attention mask hides.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from tidar.decode.datastore import Datastore
from tidar.masks import StepLayout, causal_mask, step_layout, with_prefix
from tidar.model.transformer import KVCache, Transformer

POLICIES = ("all", "full", "topk")
DRAFT_SOURCES = ("diffusion", "lookup", "datastore", "none")
GAIN_EMA = 0.3  # weight of the newest diffusion-draft acceptance in the running gain (min_draft_gain)
PROBE_EVERY = 8  # plain steps between pre-drafting probes while the gain is below min_draft_gain
LOOKUP_CANDIDATES = 32  # prompt lookup compares the latest this many occurrences of the n-gram
MATCH_CAP = 64  # ...by how far back their preceding tokens match the context, up to this many
FREE_ROWS = 32  # up to this many rows, one LM-head matmul over all of them costs about one over a few


class GenerationError(ValueError):
    """Bad generation arguments."""


@dataclass
class GenerationConfig:
    """Arguments with the names of transformers' `generate()` where one exists."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: Sequence[int] = ()
    mode: str = "tidar"  # "tidar" | "ar"
    block_size: int | None = None  # draft length b; None = the model's trained block size
    policy: str = "all"  # which acceptance lengths get a pre-draft block: all | full (1 and b) | topk (+1)
    policy_k: int = 2  # for "topk": how many acceptance lengths
    beta: float = 1.0  # trust in AR logits at commit time; 1.0 = lossless
    # Prompt lookup: when the last `lookup_ngram` tokens occurred earlier in the context, draft what
    # followed them there instead of the diffusion draft (0 = off). Drafts never change the output.
    lookup_ngram: int = 0
    # How many lookup tokens may follow the bonus token. A copied span is often longer than the
    # diffusion block, so it may extend the draft past b tokens (0 = stay within the block, b - 1).
    lookup_tokens: int = 0
    # Which earlier occurrence of the n-gram to copy from: "longest", the one whose preceding tokens
    # match the context's furthest back (the same n-gram in the same surroundings); "latest", the
    # most recent one with lookup_tokens after it.
    lookup_occurrence: str = "longest"
    # Whether a step verifying a lookup span longer than the block also pre-drafts [MASK] blocks
    # for the next step (blocks for acceptance 1, b and the full span). Off: such steps are plain
    # verification; measured faster on code, where copied spans usually continue.
    span_predraft: bool = False
    # Pre-draft only while it pays: when the running mean of diffusion-draft tokens accepted per
    # step (beyond d_1) falls below this, steps feed no [MASK] rows (AR steps, plus any lookup
    # span) and probe again every PROBE_EVERY steps. A [MASK] step costs about 1.25x an AR step on
    # this CPU, so drafts must commit about a quarter token more per step to pay. 0 = always.
    min_draft_gain: float = 0.0
    # Datastore drafts: where prompt lookup finds nothing, up to this many tokens that followed the
    # context's last n-gram in the model's own earlier outputs (`tidar.decode.datastore`: passed to the
    # Decoder, or the one `Runtime.load` attached to the model). 0 = off.
    datastore_tokens: int = 0
    # ...cut where the estimated chance that the model writes all of it (the product of each token's
    # share of its n-gram's successors in the datastore) falls below this: long where the model's
    # earlier outputs agree, short where they scatter (rows cost time). 0 = always the full length.
    datastore_confidence: float = 0.0
    # A batch of more prompts than this decodes as AR (vLLM's speculative_disable_by_batch_size):
    # every sequence's draft rows cost compute, and a batch pads each draft to its longest, so on a
    # CPU a large batch runs faster without drafts. The output is the AR model's either way. 0 = never.
    max_draft_batch: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mode not in ("tidar", "ar"):
            raise GenerationError(f"mode must be 'tidar' or 'ar', got {self.mode!r}")
        if self.do_sample and self.temperature <= 0:
            raise GenerationError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.policy not in POLICIES:
            raise GenerationError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise GenerationError(f"beta must be in [0, 1], got {self.beta}")
        if self.block_size is not None and self.block_size < 1:
            raise GenerationError(f"block_size must be >= 1, got {self.block_size}")
        if self.lookup_ngram < 0:
            raise GenerationError(f"lookup_ngram must be >= 0, got {self.lookup_ngram}")
        if self.lookup_tokens < 0:
            raise GenerationError(f"lookup_tokens must be >= 0, got {self.lookup_tokens}")
        if self.lookup_occurrence not in ("longest", "latest"):
            raise GenerationError(f"lookup_occurrence must be 'longest' or 'latest', got {self.lookup_occurrence!r}")
        if self.min_draft_gain < 0:
            raise GenerationError(f"min_draft_gain must be >= 0, got {self.min_draft_gain}")
        if self.datastore_tokens < 0:
            raise GenerationError(f"datastore_tokens must be >= 0, got {self.datastore_tokens}")
        if self.max_draft_batch < 0:
            raise GenerationError(f"max_draft_batch must be >= 0, got {self.max_draft_batch}")
        if not 0.0 <= self.datastore_confidence < 1.0:
            raise GenerationError(f"datastore_confidence must be in [0, 1), got {self.datastore_confidence}")


@dataclass
class GenerationStats:
    mode: str = "tidar"  # the mode that ran ("ar" for a batch past `max_draft_batch`)
    forwards: int = 0  # model forwards after prefill
    generated_tokens: int = 0
    step_tokens: int = 0  # tokens emitted by decode steps (the prefill emits each sequence's first)
    sequence_steps: int = 0  # decode forwards summed over the sequences still running
    query_tokens: int = 0  # new tokens (rows) fed to the decode forwards, summed
    plain_forwards: int = 0  # decode forwards without [MASK] rows (AR steps, lookup-span verification)
    plain_query_tokens: int = 0  # rows fed to those
    prefill_s: float = 0.0
    forward_s: float = 0.0  # time inside model forwards (after prefill)
    total_s: float = 0.0  # wall time after prefill
    acceptance_histogram: list[int] = field(default_factory=list)  # counts of a = 1..b per sequence-step
    # draft tokens accepted beyond d_1 (the committed bonus), by where the draft came from
    accepted_drafts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRAFT_SOURCES, 0))

    @property
    def tokens_per_forward(self) -> float:
        return self.step_tokens / max(self.sequence_steps, 1)

    @property
    def query_tokens_per_forward(self) -> float:
        return self.query_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def mean_acceptance(self) -> float:
        n = sum(self.acceptance_histogram)
        return sum((i + 1) * c for i, c in enumerate(self.acceptance_histogram)) / n if n else 0.0

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "forwards": self.forwards,
            "generated_tokens": self.generated_tokens,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "query_tokens": self.query_tokens,
            "plain_forwards": self.plain_forwards,
            "plain_query_tokens": self.plain_query_tokens,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "mean_acceptance": round(self.mean_acceptance, 4),
            "acceptance_histogram": list(self.acceptance_histogram),
            "accepted_drafts": dict(self.accepted_drafts),
            "prefill_s": round(self.prefill_s, 4),
            "forward_s": round(self.forward_s, 4),
            "overhead_fraction": round(1 - self.forward_s / self.total_s, 4) if self.total_s > 0 else 0.0,
        }


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated token ids per prompt (EOS included when hit)
    stats: GenerationStats


# -- sampling math: small pure functions ---------------------------------------------------------
def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus), as in transformers' warpers."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    shape = probs.shape[:-1]
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(shape)


def greedy_accept(drafts: torch.Tensor, ar_next: torch.Tensor) -> torch.Tensor:
    """Acceptance lengths a in 1..b: d_1 is always committed; d_{i+1} is kept while it equals the
    AR argmax after d_i. drafts, ar_next: (B, b) -> (B,)."""
    match = drafts[:, 1:] == ar_next[:, :-1]
    return 1 + match.long().cumprod(-1).sum(-1)


def speculative_accept(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling (Leviathan et al.) of drafts d_2..d_b drawn from q against the AR p.

    drafts (B, b); p (B, b, V): AR distribution after each d_i; q (B, b, V): distribution each
    d_i was drawn from (q[:, 0] unused: d_1 is already committed). Returns (a, bonus): acceptance
    lengths in 1..b and the next token, drawn from norm(max(0, p - q)) at the first rejection or
    from p after d_b, so every committed token is distributed exactly as under AR sampling.
    """
    B, b = drafts.shape
    if b > 1:
        d = drafts[:, 1:].unsqueeze(-1)
        p_d = p[:, :-1].gather(-1, d).squeeze(-1)
        q_d = q[:, 1:].gather(-1, d).squeeze(-1)
        u = torch.rand(p_d.shape, generator=generator, dtype=p_d.dtype)
        ok = u * q_d < p_d  # u < p/q without dividing by a zero q
        a = 1 + ok.long().cumprod(-1).sum(-1)
    else:
        a = torch.ones(B, dtype=torch.long)
    rows = torch.arange(B)
    p_at = p[rows, a - 1]
    full = a == b
    q_next = q[rows, a.clamp(max=b - 1)]
    residual = (p_at - q_next).clamp(min=0)
    norm = residual.sum(-1, keepdim=True)
    # If p <= q everywhere the residual vanishes; that can only happen when the draft was accepted
    # with probability 1, so falling back to p is never actually used for a rejection.
    residual = torch.where(norm > 0, residual / norm.clamp(min=1e-30), p_at)
    dist = torch.where(full.unsqueeze(-1), p_at, residual)
    return a, sample(dist, generator)


# -- the engine ----------------------------------------------------------------------------------
class Decoder:
    """Runs AR or TiDAR decoding for a batch of prompts on one model."""

    def __init__(self, model: Transformer, config: GenerationConfig, datastore: Datastore | None = None) -> None:
        config.validate()
        if datastore is None:  # the one a loaded model ships with (`Runtime.load` attaches it)
            datastore = getattr(model, "datastore", None)
        if config.datastore_tokens and datastore is None:
            raise GenerationError("datastore_tokens > 0 needs a datastore (this model ships none): "
                                  "set datastore_tokens=0 or build one with `tidar datastore build`")
        self.model = model
        self._store = datastore
        self.requested = config  # what stream() runs, unless the batch is past max_draft_batch
        self._configure(config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos = set(config.eos_token_id or model.config.eos_ids)
        self.generator = torch.Generator(device="cpu")
        # an unseeded Generator always starts from the same state: seed it from the OS instead
        self.generator.manual_seed(config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self._layouts: dict[tuple[int, ...], StepLayout] = {}
        self.span_lengths: list[int] = []  # each sequence's current draft length (lookup spans vary)
        self.draft_source: list[str] = []  # where each current draft's d_2.. came from (DRAFT_SOURCES)
        self.draft_gain: list[float] = []  # running diffusion-draft tokens accepted per step
        self.plain_steps_left = 0  # steps to run without [MASK] rows (min_draft_gain)
        self.accept_counts = torch.ones(self.b)  # running statistics for the top-k policy

    def _configure(self, config: GenerationConfig) -> None:
        self.cfg = config
        self.b = config.block_size or self.model.config.block_size
        self.datastore = self._store if config.datastore_tokens else None
        # the longest draft a step verifies: the diffusion block, or a longer copied span
        self.max_draft = self.b
        self.lookup_limit = max(self.b - 1, config.lookup_tokens)
        self.copies = config.mode == "tidar" and self.b > 1 and (bool(config.lookup_ngram) or self.datastore is not None)
        if self.copies:
            self.max_draft = max(self.b, 1 + (self.lookup_limit if config.lookup_ngram else 0),
                                 1 + config.datastore_tokens if self.datastore is not None else 0)

    # layouts are cached per draft length and set of pre-drafted acceptance lengths
    def layout(self, n_clean: int, accept_lengths: tuple[int, ...]) -> StepLayout:
        key = (n_clean, *accept_lengths)
        lay = self._layouts.get(key)
        if lay is None:
            lay = step_layout(n_clean, self.b, accept_lengths, device=self.device)
            self._layouts[key] = lay
        return lay

    def predraft_lengths(self, n_draft: int | None = None) -> tuple[int, ...]:
        """Acceptance lengths that get a pre-draft block. Every policy keeps a = 1: a block drafted
        after d_1 still covers any larger a (shifted, shorter), so the next step always has a draft.
        A draft longer than the block (prompt lookup) gets a block for its full acceptance, or,
        unless `span_predraft`, no blocks at all when every sequence verifies such a span; a
        datastore draft counts as a span whatever its length (it is cut where it turns unlikely,
        and when it fails the datastore usually has the next draft too)."""
        if self.cfg.mode == "ar" or self.plain_steps_left > 0:
            return ()
        n = n_draft or self.b
        if not self.cfg.span_predraft and all(
                k > self.b or src == "datastore"
                for k, src, done in zip(self.span_lengths, self.draft_source, self.done, strict=True) if not done):
            return ()
        if self.cfg.policy == "all":
            lengths = set(range(1, self.b + 1))
        elif self.cfg.policy == "full":  # full acceptance + the a = 1 fallback: 2 blocks
            lengths = {1, self.b}
        else:
            k = min(self.cfg.policy_k, self.b)
            lengths = {1} | set(torch.topk(self.accept_counts, k).indices.add(1).tolist())
        if n > self.b:
            lengths.add(n)
        return tuple(sorted(a for a in lengths if a <= n))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor, cache: KVCache,
                 offset: int) -> torch.Tensor:
        return self.model(ids, positions, attn_mask, cache=cache, offset=offset, return_hidden=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden).float()

    def _dist(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return warp(logits, c.temperature, c.top_k, c.top_p)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.do_sample:
            return sample(self._dist(logits), self.generator)
        return logits.argmax(-1)

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]]) -> Iterator[list[list[int]]]:
        """Yield, after each forward, the tokens newly emitted by each sequence (lists may be empty).

        Emission stops for a sequence at EOS (included) or max_new_tokens; nothing after is emitted.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("every prompt needs at least one token")
        B = len(prompts)
        want = self.requested
        if want.mode == "tidar" and 0 < want.max_draft_batch < B:
            want = replace(want, mode="ar")
        if want is not self.cfg:
            self._configure(want)
        cfg, b, model = self.cfg, self.b, self.model
        n_max = max(len(p) for p in prompts)
        tidar = cfg.mode == "tidar"
        step_tokens = (self.max_draft + b * (b + 1)) if tidar else 1
        # Slots: each step advances the cache by the batch's largest acceptance (<= b), and every
        # step emits >= 1 token for each unfinished sequence, hence this bound.
        advance = cfg.max_new_tokens if B == 1 else self.max_draft * cfg.max_new_tokens
        max_len = n_max + advance + step_tokens + b + 1
        if n_max + cfg.max_new_tokens + self.max_draft + b + 1 > model.config.max_position_embeddings:
            raise GenerationError(
                f"prompt ({n_max}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        cache = self.cache = KVCache(model.config, B, max_len, self.dtype, self.device)
        stats = self.stats = GenerationStats(mode=cfg.mode, acceptance_histogram=[0] * (self.max_draft if tidar else 1))
        emitted = [0] * B
        done = self.done = [False] * B
        self.draft_gain = [1.0] * B
        self.plain_steps_left = 0
        n_gram = cfg.lookup_ngram
        self.history = [list(p) for p in prompts]
        self.ngram_index: list[dict[tuple[int, ...], list[int]]] = [{} for _ in prompts]
        if n_gram:
            for i in range(B):
                self._index_ngrams(i, 0)

        def emit(i: int, toks: list[int], step: bool = True) -> list[int]:
            if step and not done[i]:
                stats.sequence_steps += 1
            out = []
            for t in toks:
                if done[i]:
                    break
                out.append(t)
                emitted[i] += 1
                if t in self.eos or emitted[i] >= cfg.max_new_tokens:
                    done[i] = True
            if self.copies and out:
                start = len(self.history[i])
                self.history[i].extend(out)
                self._index_ngrams(i, start)
            stats.generated_tokens += len(out)
            stats.step_tokens += len(out) if step else 0
            return out

        # ---- prefill: left-padded prompts (causal) + one mask block seeing the whole prompt
        t0 = time.perf_counter()
        ids = torch.zeros(B, n_max, dtype=torch.long)
        valid = torch.zeros(B, n_max, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, n_max - len(p):] = torch.tensor(list(p), dtype=torch.long)
            valid[i, n_max - len(p):] = True
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        n_committed = valid.sum(-1)  # (B,) tokens of each sequence in the cache = next position
        mask = causal_mask(n_max) & valid[:, None, None, :]
        mask |= torch.eye(n_max, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
        if tidar:
            m = model.config.mask_token_id
            ids = torch.cat([ids, torch.full((B, b), m)], dim=1)
            pos = torch.cat([pos, n_committed[:, None] + torch.arange(b)], dim=1)
            block = torch.ones(b, b, dtype=torch.bool)
            top = torch.cat([mask, torch.zeros(B, 1, n_max, b, dtype=torch.bool)], dim=-1)
            bottom = torch.cat([valid[:, None, None, :].expand(B, 1, b, n_max), block.expand(B, 1, b, b)], dim=-1)
            mask = torch.cat([top, bottom], dim=2)
        hidden = self._forward(ids.to(self.device), pos.to(self.device), mask.to(self.device), cache, 0)
        cache.valid[:, :n_max] = valid
        cache.truncate(n_max)
        last = self.logits(hidden[:, n_max - 1])  # (B, V)
        first = self._choose(last)  # d_1: the AR model's own next token
        first_out = [emit(i, [int(first[i])], step=False) for i in range(B)]
        if tidar:
            block_logits = self.logits(hidden[:, n_max:])  # (B, b, V)
            drafts, q = self._new_draft(first, last, block_logits)
        else:
            drafts, q = first[:, None], None
        stats.prefill_s = time.perf_counter() - t0
        t_start = time.perf_counter()
        yield first_out

        # ---- decode steps: one forward each
        while not all(done):
            n_draft = drafts.shape[1]
            lay = self.layout(n_draft, self.predraft_lengths(n_draft))
            self.plain_steps_left = max(self.plain_steps_left - 1, 0)
            S = cache.length
            T = lay.num_tokens
            step_ids = torch.full((B, T), model.config.mask_token_id, dtype=torch.long)
            step_ids[:, : lay.n_clean] = drafts
            positions = n_committed[:, None] + lay.position_offsets[None, :].cpu()
            attn = with_prefix(lay.mask, cache.valid[:, :S])
            tf = time.perf_counter()
            hidden = self._forward(step_ids.to(self.device), positions.to(self.device), attn, cache, S)
            stats.forward_s += time.perf_counter() - tf
            stats.forwards += 1
            stats.query_tokens += T
            if not lay.accept_lengths:
                stats.plain_forwards += 1
                stats.plain_query_tokens += T
            # The LM head is the largest matrix: while rows are nearly free (memory-bound), score
            # every row in one pass instead of reading the head twice (verify, then the block).
            all_logits = self.logits(hidden) if T <= FREE_ROWS else None
            ar_logits = all_logits[:, : lay.n_clean] if all_logits is not None else self.logits(hidden[:, : lay.n_clean])

            if not tidar:
                nxt = self._choose(ar_logits[:, 0])
                cache.valid[:, S] = True
                cache.truncate(S + 1)
                n_committed += 1
                stats.acceptance_histogram[0] += sum(1 for d in done if not d)
                drafts = nxt[:, None]
                yield [emit(i, [int(nxt[i])]) for i in range(B)]
                continue

            # verify d_1..d_b
            if cfg.do_sample:
                p = self._dist(ar_logits)
                a, bonus = speculative_accept(drafts, p, q, self.generator)
            else:
                a = greedy_accept(drafts, ar_logits.argmax(-1))
                bonus = None
            # keep exactly the accepted drafts in the cache
            a = torch.where(torch.tensor(done), torch.ones_like(a), a)
            a_max = int(a.max())
            cache.valid[:, S: S + T] = False
            cache.valid[:, S: S + a_max] = torch.arange(a_max)[None, :] < a[:, None]
            cache.truncate(S + a_max)
            n_committed += a

            # next draft from the pre-draft block that matches (or best covers) the real a
            rows = torch.arange(B)
            ar_at = ar_logits[rows, a - 1]  # (B, V): AR logits after d_a
            block_logits, shift = self._block_for(hidden, lay, a, all_logits)
            if bonus is None or cfg.beta < 1.0:
                mixed = ar_at
                if cfg.beta < 1.0 and block_logits is not None:
                    own = (shift == 0).unsqueeze(-1)  # diffusion logits for exactly this position
                    mixed = torch.where(own, cfg.beta * ar_at + (1 - cfg.beta) * block_logits[:, 0], ar_at)
                bonus = self._choose(mixed)
            out = []
            for i in range(B):
                if not done[i]:
                    stats.acceptance_histogram[int(a[i]) - 1] += 1
                    stats.accepted_drafts[self.draft_source[i]] += int(a[i]) - 1
                    self.accept_counts[min(int(a[i]), b) - 1] += 1
                out.append(emit(i, drafts[i, 1: int(a[i])].tolist() + [int(bonus[i])]))
            if cfg.min_draft_gain > 0:
                self._gate(a)
            drafts, q = self._new_draft(bonus, ar_at, block_logits, shift)
            yield out
        stats.total_s = time.perf_counter() - t_start

    def _gate(self, a: torch.Tensor) -> None:
        """Fold this step's acceptance of diffusion drafts into the running gain; when every
        running sequence's gain is below min_draft_gain, the next PROBE_EVERY steps feed no
        [MASK] rows (the step after them pre-drafts again: a probe)."""
        seen = False
        for i, g in enumerate(self.draft_gain):
            if self.draft_source[i] == "diffusion" and not self.done[i]:
                self.draft_gain[i] = g + GAIN_EMA * (min(int(a[i]), self.b) - 1 - g)
                seen = True
        running = [g for g, d in zip(self.draft_gain, self.done, strict=True) if not d]
        if seen and running and max(running) < self.cfg.min_draft_gain:
            self.plain_steps_left = PROBE_EVERY

    def _block_for(self, hidden: torch.Tensor, lay: StepLayout, a: torch.Tensor,
                   all_logits: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (B, b, V) of the pre-draft block for each sequence's acceptance length, aligned so
        row 0 is the position of the bonus token, and the shift used (0 = exact block).

        A block drafted for a' <= a covers positions a' .. a'+b-1, so the last b - (a - a') rows
        are still drafts conditioned on a correct prefix; rows past its end are filled with
        rejected-by-construction padding by `_new_draft`.
        """
        B, b = a.shape[0], self.b
        if not lay.accept_lengths:
            return None, torch.zeros(B, dtype=torch.long)
        starts = torch.tensor(lay.accept_lengths)
        # the largest pre-drafted a' <= a for each sequence (-1 if none)
        ok = starts[None, :] <= a[:, None]
        j = torch.where(ok, torch.arange(len(starts))[None, :], -1).max(-1).values
        have = j >= 0
        jj = j.clamp(min=0)
        shift = torch.where(have, a - starts[jj], torch.full_like(a, b))
        # gather rows: block j's row (shift + r) for r in 0..b-1
        r = torch.arange(b)[None, :] + shift[:, None]
        src = lay.n_clean + jj[:, None] * b + r.clamp(max=b - 1)
        rows = (torch.arange(B)[:, None], src.to(hidden.device))
        logits = all_logits[rows] if all_logits is not None else self.logits(hidden[rows])
        return logits, torch.where(have, shift, torch.full_like(shift, b))

    def _new_draft(self, bonus: torch.Tensor, ar_at: torch.Tensor, block_logits: torch.Tensor | None,
                   shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next draft [bonus, d_2..d_n] and the distributions q the drafts were drawn from (n = b,
        more when a prompt-lookup span is longer than the block, 1 after a step without blocks)."""
        B, b = bonus.shape[0], self.b
        if shift is None:
            shift = torch.zeros(B, dtype=torch.long)
        if b == 1 or block_logits is None:
            drafts = bonus[:, None].clone()
            # q[:, 0] is never read (d_1 is committed), but sampling needs q's shape
            q = torch.zeros(B, 1, ar_at.shape[-1]) if self.cfg.do_sample else None
            self.span_lengths = [1] * B
            self.draft_source = ["none"] * B
            if self.copies:
                drafts, q = self._lookup_drafts(drafts, q)
            return drafts, q
        drafts = torch.zeros(B, b, dtype=torch.long)
        drafts[:, 0] = bonus
        # rows 1.. of the block predict positions after the bonus; rows beyond the block's end
        # (shift > 0) have no draft: fill them with a token and a one-hot q (a valid proposal).
        usable = (torch.arange(b)[None, :] + shift[:, None]) < b  # (B, b)
        q = None
        if self.cfg.do_sample:
            q = self._dist(block_logits)
            picks = sample(q[:, 1:], self.generator)
            filler = torch.zeros_like(picks)
            picks = torch.where(usable[:, 1:], picks, filler)
            one_hot = F.one_hot(picks, q.shape[-1]).to(q.dtype)
            q = q.clone()
            q[:, 1:] = torch.where(usable[:, 1:, None], q[:, 1:], one_hot)
        else:
            picks = block_logits[:, 1:].argmax(-1)
            picks = torch.where(usable[:, 1:], picks, torch.zeros_like(picks))
        drafts[:, 1:] = picks
        self.span_lengths = [b] * B
        self.draft_source = ["diffusion"] * B
        if self.copies:
            drafts, q = self._lookup_drafts(drafts, q)
        return drafts, q

    def _index_ngrams(self, i: int, start: int) -> None:
        """Record, for every n-gram ending before position j >= start, that token j followed it."""
        n, hist, index = self.cfg.lookup_ngram, self.history[i], self.ngram_index[i]
        if not n:
            return
        for j in range(max(start, n), len(hist)):
            index.setdefault(tuple(hist[j - n: j]), []).append(j)

    def _continuation(self, i: int) -> tuple[list[int], str]:
        """What followed the context's last n-gram earlier (see `lookup_occurrence`); without an
        occurrence, the datastore's draft (if any). Returns the draft and its source.

        Occurrences with `lookup_limit` tokens after them are preferred: the very latest occurrence
        inside a repeating run has a one-token continuation."""
        n, hist, limit = self.cfg.lookup_ngram, self.history[i], self.lookup_limit
        where = self.ngram_index[i].get(tuple(hist[-n:])) if n and len(hist) >= n else None
        if not where:
            if self.datastore is None:
                return [], "none"
            return self.datastore.draft(hist, self.cfg.datastore_tokens, self.cfg.datastore_confidence), "datastore"
        end = len(hist)
        if self.cfg.lookup_occurrence == "latest":
            j = next((j for j in reversed(where) if end - j >= limit), where[0])
            return hist[j: j + limit], "lookup"
        cands = where[-LOOKUP_CANDIDATES:]
        cands = [j for j in cands if end - j >= limit] or cands
        best, best_m = cands[-1], -1
        for j in reversed(cands):  # latest first: it wins ties
            m = n
            while m < MATCH_CAP and j - 1 - m >= 0 and hist[j - 1 - m] == hist[end - 1 - m]:
                m += 1
            if m > best_m:
                best, best_m = j, m
        return hist[best: best + limit], "lookup"

    def _lookup_drafts(self, drafts: torch.Tensor, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replace d_2.. by what followed an earlier occurrence of the context's last n-gram (prompt
        lookup decoding, see `_continuation`); such drafts have a one-hot proposal distribution. The
        draft grows past the block when a continuation is longer; in a batch, sequences with a
        shorter draft are padded with token 0 under a one-hot q (a valid, rarely accepted proposal)."""
        w = drafts.shape[1]
        conts, sources = zip(*(self._continuation(i) for i in range(len(self.history))), strict=True)
        width = max(w, 1 + max(len(c) for c in conts))
        if width > w:
            wide = torch.zeros(drafts.shape[0], width, dtype=drafts.dtype)
            wide[:, :w] = drafts
            drafts = wide
            if q is not None:
                pad = F.one_hot(torch.zeros(q.shape[0], width - w, dtype=torch.long), q.shape[-1]).to(q.dtype)
                q = torch.cat([q, pad], dim=1)
        for i, (cont, source) in enumerate(zip(conts, sources, strict=True)):
            if not cont:
                continue
            k = len(cont)
            self.span_lengths[i] = max(self.span_lengths[i], 1 + k)
            self.draft_source[i] = source
            drafts[i, 1: 1 + k] = torch.tensor(cont)
            if q is not None:
                q[i, 1: 1 + k] = F.one_hot(drafts[i, 1: 1 + k], q.shape[-1]).to(q.dtype)
        return drafts, q


def generate(model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
             on_tokens: Callable[[int, list[int]], int | None] | None = None,
             datastore: Datastore | None = None) -> GenerationOutput:
    """Generate for a batch of token-id prompts.

    `on_tokens(i, ids)` streams newly emitted tokens of sequence i; returning an int n ends that
    sequence after the first n of those tokens (a stop string was completed). `datastore` serves
    drafts when `config.datastore_tokens` > 0.
    """
    decoder = Decoder(model, config or GenerationConfig(), datastore)
    seqs: list[list[int]] = [[] for _ in prompts]
    for step in decoder.stream(prompts):
        for i, toks in enumerate(step):
            if not toks:
                continue
            keep = on_tokens(i, toks) if on_tokens is not None else None
            if keep is not None:
                toks = toks[:keep]
                decoder.done[i] = True
            seqs[i].extend(toks)
    return GenerationOutput(seqs, decoder.stats)


class TextStreamer:
    """Incremental detokenizer with stop strings: `push(ids)` returns the text now safe to show.

    Text that might be the start of a stop string is held back until it is disambiguated, so a
    stop string is never printed and nothing after it is emitted.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # noqa: ANN001
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.text()
        cut = len(text)
        for s in self.stop:
            k = text.find(s)
            if k != -1 and k < cut:
                cut = k
                self.stopped = True
        if not self.stopped and not final:
            cut = max(self.shown, cut - self._hold)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
                cut = min(cut, len(text) - 1)
        out = text[self.shown: cut] if cut > self.shown else ""
        self.shown = max(self.shown, cut)
        return out

