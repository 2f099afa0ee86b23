"""What the `self-kl` diffusion loss costs per training step on SmolLM2's shapes, forward + backward of
the loss alone (logits in, logit gradients out): the written-out KL(p_AR || q) that the seventh chunk's
KL run trained with, the fused soft-target cross-entropy `tidar_loss` uses now (`tidar.train.objectives.self_kl`), and the argmax
cross-entropy of `self` for reference. Run on an idle machine; medians of --repeats.

    .venv/bin/python benchmarks/kl_loss_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tidar.train.objectives import self_kl


def written_out(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def argmax_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student.flatten(0, 1), teacher.argmax(-1).flatten())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=255)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(a.batch, a.seq, a.vocab, generator=g) * 3
    base = torch.randn(a.batch, a.seq, a.vocab, generator=g) * 3
    results = {}
    for name, fn in (("written-out KL", written_out), ("fused soft-target CE", self_kl), ("argmax CE (self)", argmax_ce)):
        times = []
        for _ in range(a.repeats):
            student = base.clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn(student, teacher).backward()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times)
    ref = written_out(base.requires_grad_(True), teacher)
    ref.backward()
    g_ref = base.grad.clone()
    base.grad = None
    self_kl(base, teacher).backward()
    print(f"logits {a.batch}x{a.seq}x{a.vocab} float32, {a.threads} threads, median of {a.repeats}")
    for name, t in results.items():
        print(f"{name:>22}: {t * 1000:8.1f} ms per step (forward + backward)")
    print(f"max |grad difference| fused vs written-out: {(base.grad - g_ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
