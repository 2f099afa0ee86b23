"""The decoding engine: AR and TiDAR, one model forward per step, an exact static KV cache.

`Decoder.stream` is the whole algorithm: a prefill, then steps. A TiDAR step is four calls: feed
the draft plus [MASK] blocks (`_forward_step`), verify the draft (`_verify`), commit what was
accepted (`step.commit`), and pick each sequence's next draft (`_next_drafts`). A batch past
`max_draft_batch` running sequences takes plain AR steps instead (`_ar_step`). For continuous
batching (the server), `join` prefills new sequences into the running batch between steps, `step`
runs one forward, and `leave` drops finished or cancelled rows. Greedy output
equals AR greedy output; sampling uses speculative rejection sampling, so the output distribution
equals AR sampling. The pieces live in step.py (tensors), accept.py (the rules), drafters/ (the
draft sources and the policy that picks one), state.py (the batch being decoded).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from tidar.decode import step
from tidar.decode.accept import greedy_accept, mixed_target, proposals, speculative_accept
from tidar.decode.drafters import Draft, DraftContext, DraftPolicy
from tidar.decode.drafters.datastore import Datastore, DatastoreDrafter
from tidar.decode.drafters.diffusion import DiffusionDrafter, DraftGate
from tidar.decode.drafters.lookup import LookupDrafter
from tidar.decode.options import GenerationConfig, GenerationError
from tidar.decode.sampling import Candidates, sample_candidates, warp_candidates
from tidar.decode.state import BatchState
from tidar.decode.stats import GenerationOutput, GenerationStats
from tidar.masks import StepLayout, step_layout, with_prefix
from tidar.model.transformer import KVCache, Transformer


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
        self.store = datastore
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos = set(config.eos_token_id or model.config.eos_ids)
        self.generator = torch.Generator(device="cpu")
        # an unseeded Generator always starts from the same state: seed it from the OS instead
        self.generator.manual_seed(config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self._layouts: dict[tuple[int, ...], StepLayout] = {}
        self._configure(config)
        self.open()

    def _configure(self, cfg: GenerationConfig) -> None:
        self.cfg = cfg
        self.b = cfg.block_size or self.model.config.block_size
        self.tidar = cfg.mode == "tidar"
        drafting = self.tidar and self.b > 1
        sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p} if cfg.do_sample else None
        copies = []
        if drafting and cfg.lookup_ngram:
            copies.append(LookupDrafter(cfg.lookup_ngram, max(self.b - 1, cfg.lookup_tokens)))
        if drafting and cfg.datastore_tokens:
            copies.append(DatastoreDrafter(self.store, cfg.datastore_tokens))
        diffusion = DiffusionDrafter(self.b, sampling, self.generator) if drafting else None
        self.policy = DraftPolicy(diffusion, copies)
        self.max_draft = max(self.b, 1 + self.policy.max_tokens)  # the longest draft a step verifies

    @property
    def done(self) -> list[bool]:
        return self.state.done

    @property
    def stats(self) -> GenerationStats:
        return self.state.stats

    @property
    def cache(self) -> KVCache:
        return self.state.cache

    def layout(self, n_clean: int, accept_lengths: tuple[int, ...]) -> StepLayout:
        key = (self.b, n_clean, *accept_lengths)  # layouts are cached per block size, draft length and blocks fed
        if key not in self._layouts:
            self._layouts[key] = step_layout(n_clean, self.b, accept_lengths, device=self.device)
        return self._layouts[key]

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]]) -> Iterator[list[list[int]]]:
        """Yield, after each forward, the tokens newly emitted by each sequence (lists may be empty).

        Emission stops for a sequence at EOS (included) or max_new_tokens; nothing after is emitted.
        """
        self.open()
        yield self.join(prompts)
        t_start = time.perf_counter()
        while not all(self.state.done):
            yield self.step()
        self.state.stats.total_s = time.perf_counter() - t_start

    # -- continuous batching: rows join and leave between steps ----------------------------------
    def open(self) -> None:
        """Start an empty batch (forgetting any previous one) that `join` adds sequences to."""
        if getattr(self, "state", None) is not None:
            self.policy.remove(self.state.keys)
        self.state: BatchState | None = None  # None until the first join
        self._next_key = 0

    @torch.inference_mode()
    def join(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int] | None = None) -> list[list[int]]:
        """Prefill `prompts` (one forward of their own) and append them to the batch as its last
        rows; returns each one's first token. `max_new_tokens`: per prompt (default: the config's)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("every prompt needs at least one token")
        budgets = list(max_new_tokens) if max_new_tokens is not None else [self.cfg.max_new_tokens] * len(prompts)
        new = self._new_state(prompts, budgets)
        first = self._prefill(new, prompts)
        self.state = new if self.state is None else self.state.concat(new)
        return first

    @torch.inference_mode()
    def step(self) -> list[list[int]]:
        """One forward for every row of the batch: the tokens each row emitted."""
        return self._step(self.state)

    def leave(self, rows: Sequence[int]) -> None:
        """Drop these rows (finished or cancelled) from the batch; the others keep their order."""
        st, gone = self.state, set(rows)
        self.policy.remove([st.keys[i] for i in gone])
        self.state = st.select([i for i in range(len(st.done)) if i not in gone])

    def _new_state(self, prompts: Sequence[Sequence[int]], budgets: list[int]) -> BatchState:
        cfg, b, B = self.cfg, self.b, len(prompts)
        lengths = [len(p) for p in prompts]
        n_max, new_max = max(lengths), max(budgets)
        worst = max(n + m for n, m in zip(lengths, budgets, strict=True))
        if worst + self.max_draft + b + 1 > self.model.config.max_position_embeddings:
            raise GenerationError(
                f"prompt ({n_max}) + max_new_tokens ({new_max}) exceeds the model's "
                f"{self.model.config.max_position_embeddings} positions")
        # Slots: each step advances the cache by the batch's largest acceptance, and every step
        # emits >= 1 token for each unfinished sequence, hence this bound (`_compact` keeps a
        # batch that rows keep joining within it).
        step_tokens = (self.max_draft + b * (b + 1)) if self.tidar else 1
        advance = new_max if B == 1 else self.max_draft * new_max
        cache = KVCache(self.model.config, B, n_max + advance + step_tokens + b + 1, self.dtype, self.device)
        stats = GenerationStats(mode="ar", acceptance_histogram=[0] * (self.max_draft if self.tidar else 1))
        gate = DraftGate(cfg.min_draft_gain, b, B) if cfg.min_draft_gain > 0 else None
        keys = list(range(self._next_key, self._next_key + B))
        self._next_key += B
        histories = [list(p) for p in prompts]
        self.policy.add(keys, histories)
        return BatchState(cache, torch.zeros(B, dtype=torch.long), histories, self.eos, budgets, stats, keys, gate)

    # -- prefill and step ---------------------------------------------------------------------
    def _prefill(self, st: BatchState, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        t0 = time.perf_counter()
        mask_id = self.model.config.mask_token_id
        ids, pos, mask, valid = step.prefill_inputs(prompts, mask_id, self.b if self.tidar else None)
        n_max = valid.shape[1]
        hidden = self._forward(ids, pos, mask.to(self.device), st.cache, 0)
        st.cache.valid[:, :n_max] = valid
        st.cache.truncate(n_max)
        st.n_committed = valid.sum(-1)
        last = self.logits(hidden[:, n_max - 1])  # (B, V)
        first = self._choose(last)  # d_1: the AR model's own next token
        out = [self._emit(st, i, [int(first[i])], step=False) for i in range(len(prompts))]
        block_logits = self.logits(hidden[:, n_max:]) if self.tidar else None  # (B, b, V)
        self._next_drafts(st, first, block_logits, torch.zeros(len(prompts), dtype=torch.long))
        st.stats.prefill_s = time.perf_counter() - t0
        return out

    def _step(self, st: BatchState) -> list[list[int]]:
        """One forward: verify the draft, commit what was accepted, pick the next draft."""
        self._compact(st)
        if not self._drafting(st):
            return self._ar_step(st)
        lay = self._plan(st)
        S = st.cache.length
        hidden, ar_logits, all_logits = self._forward_step(st, lay)
        self._mark_tidar(st)
        a, bonus = self._verify(st, ar_logits)
        step.commit(st.cache, S, lay.num_tokens, a)
        st.n_committed += a
        block_logits, shift = self._block_logits(hidden, lay, a, all_logits)
        out = self._record(st, a, bonus)
        self._next_drafts(st, bonus, block_logits, shift)
        return out

    def _drafting(self, st: BatchState) -> bool:
        """TiDAR for a batch of at most `max_draft_batch` running sequences, AR past it: drafting
        rows multiply a step's rows, and a large batch's plain AR rows already fill the matmuls."""
        limit = self.cfg.max_draft_batch
        return self.tidar and (limit == 0 or len(st.running) <= limit)

    def _compact(self, st: BatchState) -> None:
        """Close the cache's holes when the next step would not fit, or when they are most of it
        (every query reads every slot)."""
        need = st.cache.length + self.max_draft + self.b * (self.b + 1) + 1
        held = int(st.cache.valid[:, : st.cache.length].sum(-1).max()) if st.done else 0
        if need > st.cache.max_len or st.cache.length - held > max(KVCache.GROW, held):
            st.cache.compact()

    def _mark_tidar(self, st: BatchState) -> None:
        st.stats.mode = "tidar"
        for i in st.running:
            st.row_stats[i].mode = "tidar"

    def _plan(self, st: BatchState) -> StepLayout:
        """This step's layout: the draft, then a [MASK] block per pre-drafted acceptance length."""
        n_draft = st.drafts.shape[1]
        blocks: tuple[int, ...] = ()
        if not (st.gate and st.gate.closed):
            blocks = step.predraft_lengths(self.cfg.policy, self.b, n_draft, st.lengths, st.sources, st.done)
        if st.gate:
            st.gate.tick()
        return self.layout(n_draft, blocks)

    def _forward_step(self, st: BatchState, lay: StepLayout
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Hidden states (B, T, D), AR logits of the draft rows, and every row's logits when cheap."""
        S, T = st.cache.length, lay.num_tokens
        ids, positions = step.step_inputs(st.drafts, lay, st.n_committed, self.model.config.mask_token_id)
        attn = with_prefix(lay.mask, st.cache.valid[:, :S])
        tf = time.perf_counter()
        hidden = self._forward(ids, positions, attn, st.cache, S)
        took = time.perf_counter() - tf
        for s in [st.stats] + [st.row_stats[i] for i in st.running]:  # a sequence's own: the forwards it was in
            s.forward_s += took
            s.forwards += 1
            s.query_tokens += T
            if not lay.accept_lengths:
                s.plain_forwards += 1
                s.plain_query_tokens += T
        # The LM head is the largest matrix: while rows are nearly free (memory-bound), score
        # every row in one pass instead of reading the head twice (verify, then the block).
        all_logits = self.logits(hidden) if T <= step.FREE_ROWS else None
        ar_logits = all_logits[:, : lay.n_clean] if all_logits is not None else self.logits(hidden[:, : lay.n_clean])
        return hidden, ar_logits, all_logits

    def _ar_step(self, st: BatchState) -> list[list[int]]:
        """One AR forward: commit d_1 and choose the next token (any pending draft is dropped)."""
        st.drafts = st.drafts[:, :1]
        _, ar_logits, _ = self._forward_step(st, self.layout(1, ()))
        nxt = self._choose(ar_logits[:, 0])
        S = st.cache.length
        st.cache.valid[:, S] = True
        st.cache.truncate(S + 1)
        st.n_committed += 1
        for i in st.running:
            for s in st.both(i):
                s.acceptance_histogram[0] += 1
        B = len(st.done)
        none = [Draft([], "none")] * B  # the next step verifies no draft (as after a step without blocks)
        tokens, lengths = step.pack_drafts(nxt, none)
        st.set_drafts(tokens, None, ["none"] * B, lengths, [[] for _ in range(B)])  # q None: one-hot
        return [self._emit(st, i, [int(nxt[i])]) for i in range(B)]

    def _verify(self, st: BatchState, ar_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Acceptance lengths a (B,) in 1..W (1 for finished sequences) and the token after the
        accepted drafts, both against the target: AR, or AR mixed with the drafts' own logits (beta)."""
        target = ar_logits
        if st.draft_logits is not None:
            target = mixed_target(ar_logits, *st.draft_logits, self.cfg.beta)
        if self.cfg.do_sample:
            a, bonus = speculative_accept(st.drafts, self._dist(target), st.q, self.generator)
            return torch.where(torch.tensor(st.done), torch.ones_like(a), a), bonus
        choice = target.max(-1).indices  # argmax with its tie rule (the first index), faster here
        a = torch.where(torch.tensor(st.done), 1, greedy_accept(st.drafts, choice))
        return a, choice[torch.arange(len(a)), a - 1]

    def _block_logits(self, hidden: torch.Tensor, lay: StepLayout, a: torch.Tensor,
                      all_logits: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (B, b, V) of the [MASK] block for each sequence's real acceptance, row 0 at the
        bonus position (None when the step fed no block), and its shift (see `step.block_rows`)."""
        if not lay.accept_lengths:
            return None, torch.zeros_like(a)
        src, shift = step.block_rows(lay, a)
        rows = (torch.arange(len(a))[:, None], src.to(hidden.device))
        return (all_logits[rows] if all_logits is not None else self.logits(hidden[rows])), shift

    def _record(self, st: BatchState, a: torch.Tensor, bonus: torch.Tensor) -> list[list[int]]:
        """Statistics of the verified drafts, then each sequence's accepted tokens + the bonus."""
        out = []
        for i in range(len(st.done)):
            if not st.done[i]:
                self.policy.observe(st.keys[i], st.token_sources[i], int(a[i]) - 1)
                for s in st.both(i):
                    s.acceptance_histogram[int(a[i]) - 1] += 1
                    for source in st.accepted_sources(i, int(a[i])):
                        s.accepted_drafts[source] += 1
            out.append(self._emit(st, i, st.drafts[i, 1: int(a[i])].tolist() + [int(bonus[i])]))
        if st.gate:
            st.gate.update(a, st.sources, st.done)
        return out

    def _next_drafts(self, st: BatchState, bonus: torch.Tensor, block_logits: torch.Tensor | None,
                     shift: torch.Tensor) -> None:
        """Each sequence's next draft [bonus, d_2..] from the policy over the draft sources."""
        if not self.tidar:
            st.set_drafts(bonus[:, None], None, ["none"] * len(bonus), [1] * len(bonus), [[] for _ in bonus])
            return
        drafts = []
        for i in range(len(bonus)):
            usable = max(self.b - 1 - int(shift[i]), 0)
            ctx = DraftContext(st.histories[i], block_logits[i] if block_logits is not None else None, usable)
            drafts.append(self.policy.draft(st.keys[i], ctx))
        vocab = self.model.config.vocab_size
        tokens, lengths = step.pack_drafts(bonus, drafts)  # q: None (no (B, W, V) tensor) for copies alone
        q = proposals(tokens, [d.q for d in drafts], vocab) if self.cfg.do_sample else None
        mix = step.pack_draft_logits(drafts, tokens.shape[1], vocab) if self.cfg.beta < 1 else None
        st.set_drafts(tokens, q, [d.source for d in drafts], lengths, [d.sources() for d in drafts], mix)

    def _emit(self, st: BatchState, i: int, toks: list[int], step: bool = True) -> list[int]:
        out = st.emit(i, toks, step)
        if out and self.policy.copies:
            start = len(st.histories[i])
            st.histories[i].extend(out)
            self.policy.extend(st.keys[i], st.histories[i], start)
        return out

    # -- the model and the sampling warp --------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor, cache: KVCache,
                 offset: int) -> torch.Tensor:
        return self.model(ids.to(self.device), positions.to(self.device), attn_mask.to(self.device), cache=cache,
                          offset=offset, return_hidden=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden).float()

    def _dist(self, logits: torch.Tensor) -> Candidates:
        return warp_candidates(logits, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_candidates(self._dist(logits), self.generator) if self.cfg.do_sample else logits.max(-1).indices


def generate(model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
             on_tokens: Callable[[int, list[int]], int | None] | None = None,
             datastore: Datastore | None = None) -> GenerationOutput:
    """Generate for a batch of token-id prompts.

    `on_tokens(i, ids)` streams newly emitted tokens of sequence i; returning an int n ends that
    sequence after the first n of those tokens (a stop string was completed). `datastore` serves
    drafts when `config.datastore_tokens` > 0 (default: the one attached to the model).
    """
    decoder = Decoder(model, config or GenerationConfig(), datastore)
    seqs: list[list[int]] = [[] for _ in prompts]
    for emitted in decoder.stream(prompts):
        for i, toks in enumerate(emitted):
            if not toks:
                continue
            keep = on_tokens(i, toks) if on_tokens is not None else None
            if keep is not None:
                toks = toks[:keep]
                decoder.done[i] = True
            seqs[i].extend(toks)
    return GenerationOutput(seqs, decoder.stats)
