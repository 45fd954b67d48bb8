r"""The BatchTopK train step: ours (auto, dense, sparse) and a dense PyTorch step.

The PyTorch step is written the way the public PyTorch crosscoder trainers write BatchTopK:
encode every latent, weight by decoder norms, `topk` over the flattened batch, scatter, a
dense decode, AuxK only when some latent is dead; then Adam and global-norm clipping. Ours
and it run the same shapes in float32 on the same device, timed side by side in one run
(alternating rounds, medians), in one process with huge pages for both
(`xcoder_jax.huge_pages`). Prints steps/s, tokens/s and ratios to the PyTorch step per
shape; --breakdown profiles our auto step inside XLA (`bench._xla_profile`: time per
category of operation, against the median unprofiled step); --memory the peak RSS of our
auto BatchTopK and L1 steps, each in a fresh process.

    python -m bench.batchtopk_step                       # the three shapes below
    python -m bench.batchtopk_step --shapes 256x16384x32 --rounds 5 --paths auto,dense,sparse
    python -m bench.batchtopk_step --shapes 1536x32768x100 --breakdown --memory
    python -m bench.batchtopk_step --gpu                 # GPU: also MFU of the dense FLOPs

Shapes are d x n_latents x k (2 models, batch 1024): 256x4096x32, 256x16384x32 and the
paper's width 1536x32768x100 (slow on a CPU: three steps a round). Each runner holds its own
train state (2.25 GiB at the paper's width), so time few paths at a time there.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import jax
import numpy as np
import torch

from bench import _xla_profile as xla_profile
from bench.train_step import StepSetup, mfu, step_runner, steps_per_second, time_round
from configs import tiny
from xcoder_jax import huge_pages
from xcoder_jax.losses.batchtopk import use_sparse

SHAPES = ("256x4096x32", "256x16384x32", "1536x32768x100")


def _config(d, h, k, path, loss="batchtopk", dtype="float32"):
    """The tiny config at this shape: BatchTopK on `path` (auto, dense, sparse) or, with
    loss "l1", the L1 step on `path` (its `l1_path`); `dtype` the compute dtype."""
    if loss == "l1":
        c = tiny.get_config()
        c.crosscoder.l1_path = path
    else:
        c = tiny.get_config("batchtopk")
        c.crosscoder.k, c.crosscoder.topk_path = k, path
    c.crosscoder.d_model, c.crosscoder.n_latents, c.crosscoder.dtype = d, h, dtype
    return c


def ours(d, h, k, batch, path, steps, dtype="float32"):
    return step_runner(_config(d, h, k, path, dtype=dtype), batch, steps)


def torch_step(d, h, k, batch, steps, device, aux_k=256, aux_coeff=1 / 32, dtype="float32"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(h, 2, d, generator=g)
    w = w * (1.0 / w.norm(dim=-1, keepdim=True))
    params = {
        "W_enc": w.permute(1, 2, 0).contiguous(),
        "W_dec": w.clone(),
        "b_enc": torch.zeros(h),
        "b_dec": torch.zeros(2, d),
    }
    params = {n: v.to(device).requires_grad_() for n, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-4)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 2, d)).astype(np.float32))
    x = x.to(device)
    since_fired = torch.zeros(h, dtype=torch.long, device=device)

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss, f = forward()  # the backward outside autocast, as PyTorch advises
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        since_fired.add_(batch).masked_fill_((f > 0).any(0), 0)
        return loss

    def forward():
        pre = torch.relu(torch.einsum("bmd,mdh->bh", x, params["W_enc"]) + params["b_enc"])
        weighted = pre * params["W_dec"].norm(dim=-1).sum(-1)
        top = weighted.flatten().topk(k * batch)
        mask = torch.zeros_like(weighted).flatten().scatter(0, top.indices, 1.0).view_as(pre)
        f = pre * mask
        x_hat = torch.einsum("bh,hmd->bmd", f, params["W_dec"]) + params["b_dec"]
        loss = (x_hat - x).pow(2).sum((1, 2)).mean()
        dead = since_fired >= 10**9
        if dead.any():  # AuxK, as the PyTorch trainers do, only when some latent is dead
            residual = (x - x_hat).detach()
            vals, idx = pre.masked_fill(~dead, -float("inf")).topk(min(aux_k, h), dim=-1)
            aux_f = torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
            aux_hat = torch.einsum("bh,hmd->bmd", aux_f, params["W_dec"])
            loss = loss + aux_coeff * (aux_hat - residual).pow(2).sum((1, 2)).mean()
        return loss, f

    def run():
        for _ in range(steps):
            loss = one()
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def breakdown(d, h, k, batch, path, rounds):
    """Where the real step's time goes: the jitted step of `path` on one batch, profiled
    inside XLA (`bench._xla_profile`), against the median of `rounds` unprofiled steps."""
    runner = StepSetup(_config(d, h, k, path), batch)
    runner.step()  # compile
    plain = statistics.median(time_round(runner.step) for _ in range(rounds))
    result = xla_profile.profile(runner.step, runner.hlo_text())
    lines = result.lines()
    off = result.in_operations / plain - 1
    lines.append(
        f"{'median unprofiled step':>36} {1e3 * plain:9.1f}  (operations sum to it within "
        f"{abs(off):.1%}: {'yes' if abs(off) <= 0.1 else 'NO'}, the 10% check)"
    )
    return lines


def peak_rss(d, h, k, batch, path, loss) -> dict:
    """Peak RSS (GiB) in a fresh process: after the imports (`runtime`), and after two
    steps of `path` (`peak`); the train state's size (`state`: parameters and Adam's two
    float32 moments) and the parameters' (`params`). Read from VmHWM: getrusage's maximum
    would carry over the parent's through fork and exec."""
    code = (
        "from bench.batchtopk_step import _config, StepSetup; "
        "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))"
        ".split()[1]); before = rss(); "
        f"r = StepSetup(_config({d}, {h}, {k}, {path!r}, {loss!r}), {batch}); "
        "r.step(); r.step(); print(before, rss())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    runtime, peak = (int(v) / 2**20 for v in out.stdout.split()[-2:])  # KiB -> GiB
    params = (2 * 2 * d * h + h + 2 * d) * 4 / 2**30
    return {"runtime": runtime, "peak": peak, "state": 3 * params, "params": params}


def memory_line(m: dict) -> str:
    extra = (m["peak"] - m["runtime"] - m["state"]) / m["params"]
    return (
        f"peak RSS {m['peak']:.2f} GiB = runtime {m['runtime']:.2f} + state {m['state']:.2f} "
        f"(parameters and Adam's moments) + {extra:.2f} x the parameters ({m['params']:.2f})"
    )


def main():
    huge_pages.reexec()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="d x n_latents x k, comma-separated")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="steps per round (0: by shape)")
    p.add_argument("--paths", default="auto", help="our paths to time: auto, dense, sparse")
    p.add_argument("--breakdown", action="store_true", help="where the auto step's time goes")
    p.add_argument("--memory", action="store_true", help="peak RSS of the auto step")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = "bfloat16" if args.gpu else "float32"  # MFU is against the bf16 peak
    print(
        f"device: {jax.devices()[0].device_kind} | torch {torch.__version__} on {device} "
        f"| huge pages {'on' if huge_pages.active() else 'off'}"
    )
    for shape in args.shapes.split(","):
        d, h, k = (int(v) for v in shape.split("x"))
        # 3 steps a round at the paper's width: a round's first step re-faults the memory the
        # other framework's round released (measured: 6.1 s against 4.2 s for the next ones).
        steps = args.steps or max(1, 8 * 4096 // h if d < 1024 else 3)
        auto = "sparse" if use_sparse("auto", h, k) else "dense"
        runners = {}
        for path in args.paths.split(","):
            name = f"ours {path} ({auto})" if path == "auto" else f"ours {path}"
            runners[name] = ours(d, h, k, args.batch, path, steps, dtype)[0]
        runners["torch dense"] = torch_step(d, h, k, args.batch, steps, device, dtype=dtype)
        rate = steps_per_second(runners, args.rounds, steps)
        print(f"\nd=2x{d}, {h} latents, k={k}, batch {args.batch}, {dtype}, {steps} steps/round")
        flops = 10 * args.batch * 2 * d * h  # the dense step's five GEMMs
        for n, s in rate.items():
            line = f"  {n:>22}: {s:7.3f} steps/s {s * args.batch:10.0f} tokens/s"
            line += f"  {rate['torch dense'] and s / rate['torch dense']:5.2f}x torch dense"
            if args.gpu:
                line += f"  {mfu(s * flops)}"
            print(line)
        if args.breakdown:
            print(f"  where the time of our auto ({auto}) step goes, inside it:")
            for line in breakdown(d, h, k, args.batch, "auto", args.rounds):
                print("  " + line)
        if args.memory:
            for loss in ("batchtopk", "l1"):
                m = peak_rss(d, h, k, args.batch, "auto", loss)
                print(f"  {loss} auto step: {memory_line(m)}")


if __name__ == "__main__":
    main()
