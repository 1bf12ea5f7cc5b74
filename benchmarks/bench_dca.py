"""How much does DCA cost? U-Net with vs without DCA at the paper's configuration.

Times inference forward (eval, no grad) and one training step (forward, BCE loss, backward, Adam
step) at 224 x 224, batch 4, 2 CPU threads. Variants run interleaved, round after round, and the
table reports medians, so load from other processes hits all variants alike.

Variants: U-Net; U-Net + DCA as shipped (torch's fused attention kernel; spatial attention's V
zero-padded to Q's head size); U-Net + DCA with every attention an explicit softmax (materialised
maps, as a straightforward implementation computes them); and the spatial attention products
alone, a lower bound for any implementation.

    python benchmarks/bench_dca.py [--repeats 7] [--size 224] [--batch 4] [--profile]
    python benchmarks/bench_dca.py --threads 1 --clock thread   # CPU time: robust on a busy machine
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import src_models.dca as dca_module

from src_models import build_model


def explicit_attend(q, k, v, scale, capture):
    att = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    if capture is not None:
        capture.append(att.detach())
    return att @ v


@contextlib.contextmanager
def attention_path(kind: str):
    """'shipped' or 'explicit' (softmax(QK^T * scale) materialised for every attention)."""
    saved = dca_module._attend
    if kind == "explicit":
        dca_module._attend = explicit_attend
    try:
        yield
    finally:
        dca_module._attend = saved


CLOCK = time.perf_counter


class Variant:
    def __init__(self, label: str, dca: bool, attention: str = "shipped"):
        torch.manual_seed(0)
        self.label = label
        self.attention = attention
        self.model = build_model("unet", dca=dca)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999))
        self.forward_s: list[float] = []
        self.step_s: list[float] = []

    def forward(self, x):
        self.model.eval()
        with attention_path(self.attention), torch.no_grad():
            t = CLOCK()
            self.model(x)
            return CLOCK() - t

    def step(self, x, target):
        self.model.train()
        with attention_path(self.attention):
            t = CLOCK()
            self.opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(self.model(x), target)
            loss.backward()
            self.opt.step()
            return CLOCK() - t


class AttentionCore:
    """Only the spatial attention products of one DCA training step, on random Q, K, V of the paper
    configuration's shapes (4 stages, 4 heads, N = (size/8)^2 tokens, Q/K head size C/4, V head size
    C_i/4), forward and backward through the shipped `_attend`. No implementation of DCA can do less
    arithmetic than this (it is the N x N x head-size products), so it bounds the overhead from below."""

    label = "spatial attention products alone (lower bound)"

    def __init__(self, model: torch.nn.Module, batch: int, size: int):
        dca = next(m for m in model.modules() if isinstance(m, dca_module.DCA))
        self.stage_channels = dca.features
        self.heads = dca.blocks[0].spatial_attn[0].heads
        self.batch, self.tokens = batch, (size // dca.strides[0]) ** 2
        self.forward_s: list[float] = []
        self.step_s: list[float] = []

    def forward(self, _x) -> float:
        return float("nan")

    def step(self, _x, _target) -> float:
        c, h, b, n = sum(self.stage_channels), self.heads, self.batch, self.tokens
        qkv = [(torch.randn(b, h, n, c // h, requires_grad=True), torch.randn(b, h, n, c // h, requires_grad=True),
                torch.randn(b, h, n, ci // h, requires_grad=True)) for ci in self.stage_channels]
        t = CLOCK()
        out = [dca_module._attend(q, k, v, (c // h) ** -0.5, None) for q, k, v in qkv]
        torch.stack([o.sum() for o in out]).sum().backward()
        return CLOCK() - t


def pct(a: float, base: float) -> str:
    return f"{100 * (a / base - 1):+.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-explicit", action="store_true", help="skip the explicit-attention variant")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: this thread's CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--profile", action="store_true", help="profile one DCA training step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    target = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.5).float()
    variants = [Variant("U-Net", False), Variant("U-Net + DCA (shipped)", True)]
    if not args.no_explicit:
        variants.append(Variant("U-Net + DCA (explicit softmax everywhere)", True, "explicit"))
    variants.append(AttentionCore(variants[1].model, args.batch, args.size))

    for v in variants:   # warm-up (allocator, kernels)
        v.forward(x)
        v.step(x, target)
    print(f"{args.repeats} rounds ...", flush=True)
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            v.forward_s.append(v.forward(x))
            v.step_s.append(v.step(x, target))

    base_f = statistics.median(variants[0].forward_s)
    base_s = statistics.median(variants[0].step_s)
    print(f"\nU-Net at the paper config (k=0.5), {args.size}x{args.size}, batch {args.batch}, "
          f"{args.threads} threads, {args.clock} clock, torch {torch.__version__}, "
          f"medians of {args.repeats} interleaved runs\n")
    print("| variant | forward (ms) | DCA overhead | train step (ms) | DCA overhead |")
    print("|---|---|---|---|---|")
    for v in variants:
        f, s = statistics.median(v.forward_s), statistics.median(v.step_s)
        if isinstance(v, AttentionCore):  # no forward; its step, as a share of U-Net's, is a floor
            print(f"| {v.label} | - | - | {1e3 * s:.0f} | at least +{100 * s / base_s:.1f}% |")
            continue
        print(f"| {v.label} | {1e3 * f:.0f} | {pct(f, base_f) if v is not variants[0] else '-'} "
              f"| {1e3 * s:.0f} | {pct(s, base_s) if v is not variants[0] else '-'} |")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        v = variants[1]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            v.step(x, target)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
