"""lm-evaluation-harness integration: the model class "tidar" plus pure scoring functions.

    tidar lm-eval --model tidar --model_args model=smollm2,dtype=float32 \\
        --tasks TASK --include_path DIR_WITH_LOCAL_TASK_YAMLS

The harness has no plugin discovery for model classes, so `lm_eval --model tidar` only works in
a process that imported this module; `tidar lm-eval ...` is the harness's command line with
"tidar" registered. From Python: `lm_eval.simple_evaluate(model=TidarLM(model="smollm2"), ...)`.

Scoring (loglikelihood, loglikelihood_rolling) is one causal AR forward: the TiDAR model's AR
path is the base model, and scoring is where drafting cannot help. Generation (generate_until)
runs TiDAR decoding, whose greedy output equals AR greedy output.

lm_eval is optional: the scoring functions below need only torch; `TidarLM` exists only when
lm_eval (pip install lm-eval==0.4.13) is importable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tidar.masks import causal_mask
from tidar.runtime import Runtime

log = logging.getLogger("tidar.lm_eval")
LOGIT_ROWS = 1024


# -- pure scoring: token level -------------------------------------------------------------------
@torch.inference_mode()
def score_tokens(model: torch.nn.Module, windows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[torch.Tensor, bool]]:
    """Log-probabilities of the last `n` tokens of each window given the tokens before them.

    windows: (tokens, n) with 1 <= n < len(tokens). Returns, per window, the n log-probs (float32)
    and whether each of those tokens is the argmax. Windows are right-padded into one batch: under
    a causal mask padding at the end cannot influence earlier positions, so no extra masking is
    needed.
    """
    if not windows:
        return []
    for toks, n in windows:
        if not 1 <= n < len(toks):
            raise ValueError(f"need 1 <= n < len(tokens), got n={n} for {len(toks)} tokens")
    device = next(model.parameters()).device
    T = max(len(t) for t, _ in windows) - 1  # the last token is only a target, never an input
    ids = torch.zeros(len(windows), T, dtype=torch.long)
    for i, (toks, _) in enumerate(windows):
        ids[i, : len(toks) - 1] = torch.tensor(list(toks[:-1]), dtype=torch.long)
    pos = torch.arange(T)[None, :]
    hidden = model(ids.to(device), pos.to(device), causal_mask(T, device)[None, None], return_hidden=True)
    head = model.head_weight().float()
    out = []
    for i, (toks, n) in enumerate(windows):
        L = len(toks) - 1
        target = torch.tensor(list(toks[-n:]), device=hidden.device)
        lps, greedy = [], True
        # rows in chunks: (n, vocab) float32 logits of a long window would take gigabytes at once
        for r in range(0, n, LOGIT_ROWS):
            # float32 logits: summing hundreds of bf16 log-probs would lose digits that matter for ranking
            logp = F.log_softmax(F.linear(hidden[i, L - n + r: min(L, L - n + r + LOGIT_ROWS)].float(), head), dim=-1)
            t = target[r: r + LOGIT_ROWS]
            lps.append(logp.gather(-1, t[:, None]).squeeze(-1))
            greedy = greedy and bool((logp.argmax(-1) == t).all())
        out.append((torch.cat(lps).cpu(), greedy))
    return out


# -- pure scoring: text level (lm-eval's conventions) --------------------------------------------
def _encode(runtime: Runtime, text: str) -> list[int]:
    return list(runtime.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prefix_token_id(runtime: Runtime) -> int | None:
    """The token that conditions text with no context: BOS, else EOS (as lm-eval's HF model)."""
    bos = getattr(runtime.tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    return runtime.eos_ids[0] if runtime.eos_ids else None


def encode_pair(runtime: Runtime, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split like lm-eval's causal models: trailing spaces
    of the context move to the continuation, and the continuation is what encoding the whole
    string adds after the context's tokens (so merges across the boundary are scored as the
    model would see them). An empty context becomes the prefix token."""
    if not context:
        cont = _encode(runtime, continuation)
        prefix = prefix_token_id(runtime)
        if prefix is None or (cont and cont[0] == prefix):
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(runtime, context + continuation)
    ctx = _encode(runtime, context)
    return ctx, whole[len(ctx):]


def _max_len(runtime: Runtime, max_len: int | None) -> int:
    limit = runtime.model.config.max_position_embeddings
    return min(max_len or limit, limit)


def _pair_window(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], int]:
    # at most max_len inputs: keep the end (the continuation and the context nearest to it)
    toks = (context + continuation)[-(max_len + 1):]
    return toks, min(len(continuation), len(toks) - 1)


def loglikelihood_of(runtime: Runtime, context: str, continuation: str, max_len: int | None = None) -> tuple[float, bool]:
    """(log P(continuation | context), whether greedy decoding would produce the continuation),
    from one causal forward over context + continuation."""
    ctx, cont = encode_pair(runtime, context, continuation)
    if not cont:
        return 0.0, True
    if not ctx:
        raise ValueError("cannot score text with no context: the tokenizer has neither BOS nor EOS")
    (lp, greedy), = score_tokens(runtime.model, [_pair_window(ctx, cont, _max_len(runtime, max_len))])
    return float(lp.sum()), greedy


def rolling_windows(tokens: Sequence[int], prefix: int | None, max_len: int) -> list[tuple[list[int], int]]:
    """Disjoint windows that score every token exactly once with at most max_len inputs each.

    The sequence is [prefix] + tokens; window k predicts the next max_len tokens from the single
    token before them (lm-eval's rolling loglikelihood with context_len=1). Without a prefix the
    first token has nothing to condition on and is not scored.
    """
    seq = ([prefix] if prefix is not None else []) + list(tokens)
    out, start = [], 1
    while start < len(seq):
        end = min(start + max_len, len(seq))
        out.append((seq[start - 1: end], end - start))
        start = end
    return out


def rolling_loglikelihood(runtime: Runtime, text: str, max_len: int | None = None, batch_size: int = 1) -> float:
    """Total log-likelihood of `text` (for perplexity), in windows of at most max_len tokens."""
    windows = rolling_windows(_encode(runtime, text), prefix_token_id(runtime), _max_len(runtime, max_len))
    total = 0.0
    for i in range(0, len(windows), max(1, batch_size)):
        total += sum(float(lp.sum()) for lp, _ in score_tokens(runtime.model, windows[i: i + batch_size]))
    return total


def generate_until_text(runtime: Runtime, context: str, until: Sequence[str] = (), max_gen_toks: int = 256,
                        mode: str = "tidar", block_size: int | None = None, **sampling: Any) -> str:
    """TiDAR decoding of `context` until a stop string, EOS or max_gen_toks; the stop string is
    not included. `sampling`: do_sample, temperature, top_p, top_k, seed (greedy by default)."""
    gen = runtime.generation_config(mode=mode, block_size=block_size, max_new_tokens=max_gen_toks, **sampling)
    ids = _encode(runtime, context)
    b = gen.block_size or runtime.model.config.block_size
    room = runtime.model.config.max_position_embeddings - max_gen_toks - 2 * b - 1
    if room < 1:
        raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in "
                         f"{runtime.model.config.max_position_embeddings} positions")
    if len(ids) > room:
        # lm-eval truncates long contexts from the left; the runtime takes text, so re-decode the
        # kept tokens (a few tokens of slack in case re-encoding the cut text comes out longer)
        context = runtime.tokenizer.decode(ids[-max(1, room - 8):])
    return runtime.generate_text(context, gen, stop=[s for s in until if s]).text


# -- the lm-eval model class ---------------------------------------------------------------------
try:
    import lm_eval.models  # noqa: F401  # registers the built-in models; get_model() skips that once the registry is non-empty
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval is optional: the functions above work without it
    LM = None

if LM is not None:

    @register_model("tidar")
    class TidarLM(LM):
        """lm-eval model: `--model tidar --model_args model=DIR|smollm2,dtype=float32,mode=tidar`.

        model_args: model, dtype (float32 | bfloat16), mode (tidar | ar, for generation),
        block_size, max_length (scoring window, default the model's context), max_gen_toks
        (default 256), batch_size (scoring windows per forward), threads. `runtime=` takes an
        already loaded `tidar.runtime.Runtime` (Python API / tests).
        """

        def __init__(self, model: str | None = None, dtype: str = "float32", mode: str = "tidar",
                     block_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                     batch_size: int | str | None = 1, threads: int | None = None, runtime: Runtime | None = None,
                     **kwargs: Any) -> None:
            super().__init__()
            for k in ("max_batch_size", "device"):  # the harness always passes these
                kwargs.pop(k, None)
            if kwargs:
                log.warning("tidar: ignoring unknown model_args %s", sorted(kwargs))
            if threads:
                torch.set_num_threads(int(threads))
            self.runtime = runtime if runtime is not None else Runtime.load(model, dtype=dtype)
            self.mode = mode
            self.block_size = int(block_size) if block_size else None
            self.max_length = _max_len(self.runtime, int(max_length) if max_length else None)
            self.max_gen_toks = int(max_gen_toks)
            # "auto" and friends: scoring batches are cheap to size by hand on CPU
            self.batch_size = int(batch_size) if str(batch_size or "1").isdigit() else 1
            self.runtime.generation_config(mode=mode, block_size=self.block_size)  # fail now on bad args

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.runtime.tokenizer, "name_or_path", self.runtime.name) or "tidar"

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return getattr(self.runtime.tokenizer, "chat_template", None) if chat_template else None

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.runtime.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                              add_generation_prompt=add_generation_prompt)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            windows: list[tuple[list[int], int] | None] = []
            for req in requests:
                context, continuation = req.args
                ctx, cont = encode_pair(self.runtime, context, continuation)
                windows.append(_pair_window(ctx, cont, self.max_length) if cont and ctx else None)
            # longest first, so a batch pads little and memory peaks on the first batch
            order = sorted((i for i, w in enumerate(windows) if w is not None), key=lambda i: -len(windows[i][0]))
            results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
            for s in range(0, len(order), self.batch_size):
                chunk = order[s: s + self.batch_size]
                for i, (lp, greedy) in zip(chunk, score_tokens(self.runtime.model, [windows[i] for i in chunk]),
                                           strict=True):
                    results[i] = (float(lp.sum()), greedy)
            for req, res in zip(requests, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", req.args, res)
            return results

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                (text,) = req.args
                ll = rolling_loglikelihood(self.runtime, text, self.max_length, self.batch_size)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
                out.append(ll)
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                kw = dict(gen_kwargs or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
                sampling = {k: kw.pop(k) for k in ("do_sample", "temperature", "top_p", "top_k", "seed") if k in kw}
                if not sampling.get("do_sample") or sampling.get("temperature") == 0:
                    sampling = {"do_sample": False}  # lm-eval's temperature=0 / do_sample=False mean greedy
                if kw:
                    log.warning("tidar: ignoring generation kwargs %s", sorted(kw))
                text = generate_until_text(self.runtime, context, until, max_gen_toks, self.mode, self.block_size, **sampling)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

