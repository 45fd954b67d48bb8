r"""The BatchTopK train step: ours (auto, dense, sparse) and a dense PyTorch step.

The PyTorch step is written the way the public PyTorch crosscoder trainers write BatchTopK:
encode every latent, weight by decoder norms, `topk` over the flattened batch, scatter, a
dense decode, AuxK only when some latent is dead; then Adam and global-norm clipping. All
three run the same shapes in float32 on the same device, timed side by side in one run
(alternating rounds, medians). Prints steps/s, tokens/s and ratios to the PyTorch step per
shape, and with --breakdown where the sparse step's time goes.

    python -m bench.batchtopk_step                       # the three CPU shapes below
    python -m bench.batchtopk_step --shapes 256x16384x32 --rounds 5
    python -m bench.batchtopk_step --breakdown           # encoder GEMM, selection, ...
    python -m bench.batchtopk_step --gpu                 # GPU: also tokens/s per device

Shapes are d x n_latents x k (2 models, batch 1024): 256x4096x32, 256x16384x32 and the
paper's width 1536x32768x100 (slow on a CPU: a few steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.train_step import step_runner
from configs import tiny
from xcoder_jax.sparse_topk import use_sparse

SHAPES = ("256x4096x32", "256x16384x32", "1536x32768x100")


def ours(d, h, k, batch, path, steps):
    c = tiny.get_config("batchtopk")
    c.crosscoder.d_model, c.crosscoder.n_latents, c.crosscoder.k = d, h, k
    c.crosscoder.topk_path = path
    return step_runner(c, batch, steps)


def torch_step(d, h, k, batch, steps, device, aux_k=256, aux_coeff=1 / 32):
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        since_fired.add_(batch).masked_fill_((f > 0).any(0), 0)
        return loss

    def run():
        for _ in range(steps):
            loss = one()
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def breakdown(d, h, k, batch, rounds):
    """Median ms of the sparse step's parts, each jitted alone on the same data."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 2 * d)).astype(np.float32))
    w_enc = jnp.asarray(rng.normal(size=(2 * d, h)).astype(np.float32) / np.sqrt(2 * d))
    w_dec = jnp.asarray(rng.normal(size=(h, 2 * d)).astype(np.float32) / np.sqrt(2 * d))
    pre = jax.jit(lambda x, w: jax.nn.relu(x @ w))(x, w_enc)
    _, flat = jax.lax.top_k(pre.reshape(-1), k * batch)
    rows, cols = flat // h, flat % h
    f = jnp.ones(k * batch)
    parts = {
        "encoder GEMM": (lambda x, w: x @ w, (x, w_enc)),
        "batch top-k selection": (lambda p: jax.lax.top_k(p.reshape(-1), k * batch), (pre,)),
        "decoder gather + segment sum": (
            lambda w, f, r, c: jax.ops.segment_sum(f[:, None] * w[c], r, num_segments=batch),
            (w_dec, f, rows, cols),
        ),
        "weight-gradient scatter-add": (
            lambda x, f, r, c: jax.ops.segment_sum(x[r] * f[:, None], c, num_segments=h),
            (x, f, rows, cols),
        ),
        "Adam update (both matrices)": (
            lambda a, b: (a * 0.9 + b * 0.1, a * a * 0.999 + b * b * 0.001),
            (w_enc, w_enc),
        ),
    }
    out = {}
    for name, (fn, args) in parts.items():
        fn = jax.jit(fn)
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times)
    return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="d x n_latents x k, comma-separated")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="steps per round (0: by shape)")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    print(f"device: {jax.devices()[0].device_kind} | torch {torch.__version__} on {device}")
    for shape in args.shapes.split(","):
        d, h, k = (int(v) for v in shape.split("x"))
        steps = args.steps or max(1, 8 * 4096 // h if d < 1024 else 1)
        auto, hp = ours(d, h, k, args.batch, "auto", steps)
        runners = {
            f"ours auto ({'sparse' if hp.loss.sparse else 'dense'})": auto,
            "ours dense": ours(d, h, k, args.batch, "dense", steps)[0],
            "ours sparse": ours(d, h, k, args.batch, "sparse", steps)[0],
            "torch dense": torch_step(d, h, k, args.batch, steps, device),
        }
        for run in runners.values():  # compile / warm up
            run()
        times = {n: [] for n in runners}
        for _ in range(args.rounds):
            for n, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[n].append(time.perf_counter() - t0)
        rate = {n: steps / statistics.median(t) for n, t in times.items()}
        print(f"\nd=2x{d}, {h} latents, k={k}, batch {args.batch}, float32, {steps} steps/round")
        for n, s in rate.items():
            ratio = s / rate["torch dense"]
            print(f"  {n:>22}: {s:7.3f} steps/s {s * args.batch:10.0f} tokens/s  {ratio:5.2f}x")
        if args.breakdown:
            sparse = use_sparse("sparse", h, k)
            print(f"  sparse step parts (ms, sparse={sparse}):")
            for name, ms in breakdown(d, h, k, args.batch, args.rounds).items():
                print(f"    {name:>30}: {ms:9.1f}")


if __name__ == "__main__":
    main()
