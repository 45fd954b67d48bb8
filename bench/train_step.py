r"""The jitted JAX train step against a straightforward PyTorch L1 crosscoder step.

Both run the same loss (the paper's L1 crosscoder), Adam and global-norm clipping, at the
same shapes and dtype on the same device, timed side by side in one run (alternating
rounds, median). Prints steps/s, tokens/s and the ratio JAX / PyTorch, and, as a ceiling,
the step's five GEMMs alone timed the same way in each framework: the ratio a dense step
could reach at best on this device.

    python -m bench.train_step                  # CPU: d=256, 2 models, 4096 latents, batch 1024
    python -m bench.train_step --gpu            # GPU: bf16, d=1536, 32768 latents, batch 4096,
                                                # also model-FLOP utilisation
    python -m bench.train_step --l1             # our L1 step, dense and sparse paths and a
                                                # dense PyTorch L1 step side by side, at
                                                # several L0 / n_latents
    python -m bench.train_step --l1 --gpu       # the same at the GPU shape
    python -m bench.train_step --l1 --shape 1536,32768,1024 --densities 0.026 --paths dense,torch
                                                # the paper's width and L0 on this device

With --l1 each density is set by the encoder bias (every latent alike, in both frameworks;
our learning rate ~0 so that it stays); the sparse step runs at the capacity training gives
that L0 (`losses.l1_sparse.capacity_for`), here also above its cap, to time the sparse path
itself at every density. The measured L0 is printed with each line, and "ours auto" is the
path `crosscoder.l1_path = "auto"` takes at it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np
import torch

from configs import tiny
from xcoder_jax import huge_pages, losses, sharding
from xcoder_jax import train_step as ts
from xcoder_jax.losses import l1_sparse

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense bf16 peak FLOP/s by device name fragment, for model-FLOP utilisation.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class StepSetup:
    """The jitted step of a config on one device, on a fixed random batch
    [batch, 2, d_model]: `step()` runs one (the one training runs between logged steps: no
    metrics beyond the loss, like the PyTorch steps) from the state the last one left."""

    def __init__(self, c, batch: int, loss=None):
        d, h = c.crosscoder.d_model, c.crosscoder.n_latents
        c.train.batch_size, c.train.steps = batch, 10**6
        self.hp = ts.HParams.from_config(c, d_model=d, total_var=np.ones(2))
        if loss is not None:  # e.g. a path or capacity the config cannot state
            self.hp = dataclasses.replace(self.hp, loss=loss)
        self.trainer = sharding.ShardedStep(self.hp, sharding.make_mesh(1, 1, batch, h))
        self.state = self.trainer.init()
        x = np.random.default_rng(0).normal(size=(batch, 2, d)).astype(np.float32)
        self.xb, self.wb = self.trainer.to_device(x, np.ones(batch, np.float32))

    def step(self, block: bool = True, with_metrics: bool = False):
        """One step; its metrics (the loss alone without `with_metrics`)."""
        self.state, metrics = self.trainer.step(self.state, self.xb, self.wb, with_metrics)
        return jax.block_until_ready(metrics) if block else metrics

    def rounds_of(self, steps_per_round: int):
        """A round: `steps_per_round` steps, dispatched in turn, waited for at the end."""

        def run():
            for _ in range(steps_per_round):
                metrics = self.step(block=False)
            jax.block_until_ready(metrics["loss"])

        return run

    def hlo_text(self) -> str:
        """The compiled step's HLO module (what `bench._xla_profile` attributes time to)."""
        return self.trainer.lowered(self.state, self.xb, self.wb, False).compile().as_text()


def step_runner(c, batch, steps_per_round):
    """A timed round of the jitted step of config `c` (see `StepSetup`): (run, hparams)."""
    setup = StepSetup(c, batch)
    return setup.rounds_of(steps_per_round), setup.hp


def jax_runner(d, h, batch, dtype, steps_per_round):
    c = tiny.get_config()
    c.crosscoder.d_model, c.crosscoder.n_latents = d, h
    c.crosscoder.dtype = dtype
    return step_runner(c, batch, steps_per_round)[0]


def torch_runner(d, h, batch, dtype, steps_per_round, device, b_enc: float = 0.0):
    """A timed round of a dense PyTorch L1 step; `b_enc`: every latent's encoder bias."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(h, 2, d, generator=g)
    w = w * (0.08 / w.norm(dim=-1, keepdim=True))
    tdtype = TORCH_DTYPES[dtype]
    params = {
        "W_enc": w.permute(1, 2, 0).contiguous(),
        "W_dec": w.clone(),
        "b_enc": torch.full((h,), b_enc),
        "b_dec": torch.zeros(2, d),
    }
    params = {k: v.to(device).requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=5e-5, betas=(0.9, 0.999))
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 2, d)).astype(np.float32)).to(
        device
    )

    def step():
        with torch.autocast(device.type, dtype=tdtype, enabled=dtype != "float32"):
            f = torch.relu(torch.einsum("bmd,mdh->bh", x, params["W_enc"]) + params["b_enc"])
            x_hat = torch.einsum("bh,hmd->bmd", f, params["W_dec"]) + params["b_dec"]
        f, x_hat = f.float(), x_hat.float()
        mse = (x_hat - x).pow(2).sum((1, 2)).mean()
        sparsity = (f * params["W_dec"].norm(dim=-1).sum(-1)).sum(-1).mean()
        loss = mse + 2.0 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        return loss

    def run():
        for _ in range(steps_per_round):
            loss = step()
        loss.item()  # waits for the device
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def gemm_runners(d, h, batch, dtype, steps_per_round, device):
    """The step's five GEMMs alone, in JAX and in torch: encoder and decoder forward, the
    decoder's two gradients and the encoder's weight gradient (the data needs none). A dense
    implementation of the step cannot beat the faster of the two."""
    rng = np.random.default_rng(1)
    shapes = {
        "x": (batch, 2 * d),  # the batch
        "f": (batch, h),  # latent activations
        "w_enc": (2 * d, h),
        "w_dec": (h, 2 * d),
        "g_xhat": (batch, 2 * d),  # gradient of the loss at the reconstruction
        "g_pre": (batch, h),  # gradient of the loss at the encoder's pre-activations
    }
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}

    def five(a, t):
        return (
            a["x"] @ a["w_enc"],
            a["f"] @ a["w_dec"],
            t(a["f"]) @ a["g_xhat"],  # d loss / d W_dec
            a["g_xhat"] @ t(a["w_dec"]),  # d loss / d f
            t(a["x"]) @ a["g_pre"],  # d loss / d W_enc
        )

    jdtype = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
    jarrays = {k: jax.numpy.asarray(v, jdtype) for k, v in arrays.items()}
    jfive = jax.jit(lambda a: five(a, t=lambda m: m.T))
    tdtype = TORCH_DTYPES[dtype]
    tarrays = {k: torch.from_numpy(v).to(device, tdtype) for k, v in arrays.items()}

    def jax_run():
        for _ in range(steps_per_round):
            out = jfive(jarrays)
        jax.block_until_ready(out)

    def torch_run():
        for _ in range(steps_per_round):
            out = five(tarrays, t=lambda m: m.t())
        out[-1].sum().item()

    return {"gemm_jax": jax_run, "gemm_torch": torch_run}


L1_DENSITIES = (1 / 32, 1 / 64, 1 / 128, 1 / 192, 1 / 256, 1 / 1024)


def l1_runner(d, h, batch, dtype, steps_per_round, density, sparse):
    """A timed round of our L1 step at L0 / n_latents ~ `density` on a fixed random batch
    (x ~ N(0, 1)): (run, the measured L0). The encoder bias b puts a share `density` of the
    pre-activations above 0: pre ~ N(b, sigma^2), sigma = the W_enc column's norm."""
    c = tiny.get_config()
    c.crosscoder.d_model, c.crosscoder.n_latents, c.crosscoder.dtype = d, h, dtype
    c.train.lr, c.train.batch_size, c.train.steps = 1e-12, batch, 10**6
    loss = losses.from_config(c)
    if sparse:  # the capacity of that L0, without the cap at SPARSE_MAX_DENSITY
        capacity = l1_sparse.bucket(l1_sparse.HEADROOM * density * h * batch)
        loss = dataclasses.replace(loss, sparse=True, capacity=capacity)
    setup = StepSetup(c, batch, loss)
    bias = np.full(h, density_bias(c.crosscoder.dec_init_norm, density), np.float32)
    setup.state["params"]["b_enc"] = setup.state["params"]["b_enc"].replace(bias)
    l0 = float(setup.step(with_metrics=True)["l0"])
    return setup.rounds_of(steps_per_round), l0


def density_bias(dec_init_norm: float, density: float) -> float:
    """The encoder bias b that puts a share `density` of the pre-activations above 0 at
    init on x ~ N(0, 1): pre ~ N(b, sigma^2), sigma = a W_enc column's norm (both models'
    rows at `dec_init_norm`)."""
    sigma = dec_init_norm * np.sqrt(2)
    return float(-sigma * statistics.NormalDist().inv_cdf(1 - density))


def l1_paths(d, h, batch, dtype, args, device):
    """Prints our L1 step's dense and sparse paths and a dense PyTorch L1 step side by side
    at each of L1_DENSITIES (the same encoder bias in both frameworks), and our "auto" (the
    path `crosscoder.l1_path = "auto"` takes at that L0) over the PyTorch step."""
    print(f"device: {jax.devices()[0].device_kind} | d=2x{d}, {h} latents, batch {batch}, {dtype}")
    print(
        f"auto runs sparse below L0 / n_latents = {l1_sparse.SPARSE_MAX_DENSITY:.4g} "
        f"| huge pages {'on' if huge_pages.active() else 'off'}"
    )
    paths = args.paths.split(",")
    for density in args.densities or L1_DENSITIES:
        runners, l0 = {}, None
        for path in ("dense", "sparse"):
            if path in paths:
                runners[path], l0 = l1_runner(
                    d, h, batch, dtype, args.steps, density, path == "sparse"
                )
        if "torch" in paths:
            bias = density_bias(tiny.get_config().crosscoder.dec_init_norm, density)
            runners["torch"] = torch_runner(d, h, batch, dtype, args.steps, device, bias)
        rate = steps_per_second(runners, args.rounds, args.steps)
        auto = "sparse" if density < l1_sparse.SPARSE_MAX_DENSITY else "dense"
        line = f"L0/h {density:8.5f} (L0 {l0 or float('nan'):7.1f}):"
        line += "".join(f" {n} {r:7.3f} steps/s," for n, r in rate.items())
        if {"dense", "sparse"} <= rate.keys():
            line += f" sparse/dense {rate['sparse'] / rate['dense']:5.2f}x,"
        if auto in rate and "torch" in rate:
            line += f" ours auto ({auto}) / torch {rate[auto] / rate['torch']:5.2f}x"
        print(line.rstrip(","))


def mfu(flops_per_second: float) -> str:
    """Model-FLOP utilisation against the device's dense bf16 peak (PEAK_BF16), as text."""
    kind = jax.devices()[0].device_kind
    peak = next((v for n, v in PEAK_BF16.items() if n in kind), None)
    return f"MFU {flops_per_second / peak:.1%} of bf16 peak" if peak else f"MFU: no peak for {kind}"


def time_round(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def steps_per_second(runners: dict, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Each runner's steps/s: one warm-up (compile) round each, then `rounds` rounds
    alternating between the runners, the median round."""
    for run in runners.values():
        run()
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for k, run in runners.items():
            times[k].append(time_round(run))
    return {k: steps_per_round / statistics.median(v) for k, v in times.items()}


def main():
    huge_pages.reexec()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gpu", action="store_true", help="GPU mode: bf16 at the 1.5B paper shape")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--l1", action="store_true", help="our L1 step: dense and sparse paths")
    p.add_argument("--densities", type=float, nargs="*", help="--l1: L0 / n_latents to time")
    p.add_argument("--shape", help="d,n_latents,batch instead of the device's default")
    p.add_argument("--paths", default="dense,sparse,torch", help="--l1: the steps to time")
    args = p.parse_args()
    if args.gpu:
        d, h, batch, dtype, device = 1536, 32768, 4096, "bfloat16", torch.device("cuda")
    else:
        d, h, batch, dtype, device = 256, 4096, 1024, "float32", torch.device("cpu")
    if args.shape:
        d, h, batch = (int(v) for v in args.shape.split(","))
    if args.l1:
        return l1_paths(d, h, batch, dtype, args, device)
    runners = {
        "jax": jax_runner(d, h, batch, dtype, args.steps),
        "torch": torch_runner(d, h, batch, dtype, args.steps, device),
        **gemm_runners(d, h, batch, dtype, args.steps, device),
    }
    steps_s = steps_per_second(runners, args.rounds, args.steps)
    print(
        f"device: {jax.devices()[0].device_kind} | torch {torch.__version__} on {device} "
        f"| {torch.get_num_threads()} torch threads"
    )
    print(f"shape: d={d}, 2 models, {h} latents, batch {batch}, {dtype}")
    flops = 10 * batch * 2 * d * h  # the five GEMMs of a step (see gemm_runners)
    for k, s in steps_s.items():
        line = (
            f"{k:>10}: {s:8.2f} steps/s  {s * batch:12.0f} tokens/s  {s * flops / 1e9:8.1f} GFLOP/s"
        )
        if args.gpu:
            line += f"  {mfu(s * flops)}"
        print(line)
    print(f"ratio jax/torch: {steps_s['jax'] / steps_s['torch']:.2f}x")
    # The gemm_* rows time the step's five GEMMs alone as one "step": no dense step can beat
    # the faster of them, so this bounds what any dense implementation could reach here.
    ceiling = max(steps_s["gemm_jax"], steps_s["gemm_torch"])
    print(
        f"dense ceiling / torch step: {ceiling / steps_s['torch']:.2f}x "
        f"(jax step at {steps_s['jax'] / ceiling:.0%} of it, torch step at "
        f"{steps_s['torch'] / ceiling:.0%})"
    )


if __name__ == "__main__":
    main()
