"""How cheap can a KD loss be? The floor under ``train_overhead.py``'s small-student rows.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/kd_loss_floor.py [--batch-size 128 512] [--compile]

The "store-fed training <= 3 % over no distillation" target compares a KD step with a CE step.
For a student whose whole step costs ~1.3 ms (the demo's 40-100-100-10 MLP at batch 128), 3 %
is ~40 us, and the KD loss itself -- not the store -- is what costs more. This script measures,
on a [B, C] leaf with ``requires_grad`` (no student, no data: the loss alone, forward + backward,
interleaved, median of rounds):

* ``F.cross_entropy``            -- the bare no-distillation loss;
* ``softlabels ce``              -- the ``ce`` method (label checks included): the baseline
                                    ``train_overhead.py`` takes its ratios against;
* ``softlabels kd (prepared)``   -- the ``kd`` method on loss-ready rows, as ``softlabels train``;
* ``eager floor``                -- the fewest eager torch ops that give the CE + KD value *and*
                                    its gradient (one autograd node, gradient in closed form;
                                    no checks, no masking, no logging components);
* ``compiled floor``             -- the same function through ``torch.compile`` (inductor, C++):
                                    one fused kernel call per step. Only with ``--compile`` (needs
                                    a C++ compiler; the first call compiles for ~30 s).

It also times the full CE step of the MLP student (forward, loss, backward, Adam; inputs in
memory, no fetch) to express each loss's extra cost over ``F.cross_entropy`` as a percentage of
that step.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from softlabels.losses import build_method
from softlabels.models import build_model

T, CE_W, KD_W, C = 4.0, 0.1, 0.9, 10


def floor_value_and_grad(z, p, logp, y, temperature: float, ce_weight: float, kd_weight: float):
    """CE + KD total and d total / dz with the fewest ops (dense teacher probabilities ``p`` at T
    and their logs ``logp``, every row labelled)."""
    batch = z.shape[0]
    logq = torch.log_softmax(z / temperature, -1)
    logq1 = torch.log_softmax(z, -1)
    kd = torch.vdot(p.reshape(-1), (logp - logq).reshape(-1)) * (temperature * temperature / batch)
    ce = F.nll_loss(logq1, y)
    grad = (logq.exp() - p) * (kd_weight * temperature / batch)
    grad += (logq1.exp() - F.one_hot(y, z.shape[1]).to(z.dtype)) * (ce_weight / batch)
    return kd * kd_weight + ce * ce_weight, grad


class _WithGrad(torch.autograd.Function):
    """One autograd node whose forward returns the loss and keeps the gradient it computed."""

    @staticmethod
    def forward(ctx, z, p, logp, y, fn):
        total, ctx.grad = fn(z.detach(), p, logp, y, T, CE_W, KD_W)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return ctx.grad * grad_total, None, None, None, None


def time_us(fns: dict, z0: torch.Tensor, rounds: int, inner: int) -> dict[str, float]:
    """Median over interleaved rounds of the per-call forward + backward time (us)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in fns if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            for _ in range(inner):
                z = z0.detach().requires_grad_()
                fns[name](z).backward()
            samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def ce_step_us(batch: int, steps: int = 2000) -> float:
    """Median time of one full CE step of the builtin MLP student on mnist1d-shaped inputs
    (measured before anything is compiled)."""
    torch.manual_seed(0)
    student = build_model("mlp", (40,), C)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 40), torch.randint(0, C, (batch,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(student(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[steps // 10 :]) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=400)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd floor")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("$ OMP_NUM_THREADS=1 PYTHONPATH=. python " + shlex.join(sys.argv))
    print(f"torch {torch.__version__}, 1 thread, C={C}, T={T:g}, ce/kd weights {CE_W}/{KD_W}; forward + backward, us")
    kd = build_method("kd", temperature=T, ce_weight=CE_W, kd_weight=KD_W, num_classes=C)
    ce = build_method("ce", num_classes=C)
    steps = {batch: ce_step_us(batch) for batch in args.batch_size}
    compiled = None
    if args.compile:
        compiled = torch.compile(floor_value_and_grad, dynamic=False, fullgraph=True)
    for batch in args.batch_size:
        torch.manual_seed(batch)
        z0, y = torch.randn(batch, C), torch.randint(0, C, (batch,))
        p = torch.softmax(torch.randn(batch, C) * 3 / T, -1)
        logp = p.log()
        prepared = kd.prepare_rows({"topk_values": torch.randn(batch, C), "topk_indices": torch.arange(C).repeat(batch, 1),
                                    "logsumexp": torch.zeros(batch)}, None)
        fns = {
            "F.cross_entropy": lambda z: F.cross_entropy(z, y),
            "softlabels ce": lambda z: ce(z, y, {}).total,
            "softlabels kd (prepared)": lambda z: kd(z, y, prepared).total,
            "eager floor": lambda z: _WithGrad.apply(z, p, logp, y, floor_value_and_grad),
        }
        if compiled is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(z0, p, logp, y, T, CE_W, KD_W)
            print(f"(batch {batch}: compiled in {time.perf_counter() - t0:.1f} s)")
            fns["compiled floor"] = lambda z: _WithGrad.apply(z, p, logp, y, compiled)
        got = time_us(fns, z0, args.rounds, args.inner)
        step = steps[batch]
        base = got["F.cross_entropy"]
        print(f"\nbatch {batch}: full CE step of the mlp student {step:.0f} us (3 % = {0.03 * step:.0f} us)")
        print(f"{'loss':28s} {'us':>7s} {'over F.ce':>9s} {'% of the CE step':>17s}")
        for name, us in got.items():
            print(f"{name:28s} {us:7.1f} {us - base:+9.1f} {100 * (us - base) / step:+16.1f}%")


if __name__ == "__main__":
    main()
