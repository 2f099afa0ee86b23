"""Cold start: time to first token, wall time and peak memory of a fresh `tidar generate`, next to
llama.cpp's (the measurement: `tidar.measure.cold_start`; `tidar bench --cold-start RUNS` reports it too).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cold_start.py --runs 5 \\
        --json benchmarks/results/cold-start-2026-12-06.json

Without llama-cpp-python installed (`pip install -e '.[bench]'`, a source build of about 5 minutes)
the llama.cpp side is reported as unavailable, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from tidar.measure.cold_start import MAX_NEW_TOKENS, PROMPT, cold_start, format_cold_start, tidar_command


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (default 1)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--no-llama", action="store_true", help="measure tidar only")
    p.add_argument("--baseline-src", type=Path,
                   help="also measure the tidar package under this src directory (another checkout, e.g. "
                        "`git archive HEAD src | tar -x -C /tmp/base`), as tidar-baseline. Its kernels build "
                        "once into tidar's cache if their source differs (keep --warmup >= 1 so the build is not timed)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    extra = {}
    if args.baseline_src:
        extra["tidar-baseline"] = (tidar_command(args.prompt, args.max_new_tokens),
                                   {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())})
    report = cold_start(args.runs, args.warmup, args.prompt, args.max_new_tokens, llama=not args.no_llama, extra=extra)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["benchmarks/cold_start.py", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              **report}
    text = json.dumps(result, indent=2)
    print(text)
    print(format_cold_start(report), file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
