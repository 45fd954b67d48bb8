r"""BatchTopK's held-out quality by initialisation, k, path and seed, on a workdir's store.

Trains the tiny config's BatchTopK crosscoder on the store of WORKDIR (left untouched: each
run gets its own workdir under --out, its activations a link to the store) and prints one
JSON line per run with the held-out FVE per model, L0 and dead fraction.

    python -m bench.batchtopk_quality --workdir=runs/tiny --k=32,16,8
    python -m bench.batchtopk_quality --workdir=runs/tiny --k=32 --init=mean --path=sparse

Inits: "l1" (the L1 loss's decoder norm 0.08, b_dec 0), "unit" (norm 1, b_dec 0), "mean"
(norm 1, b_dec at the store mean: the BatchTopK default).
"""

from __future__ import annotations

import argparse
import json
import os

from configs import tiny
from xcoder_jax import train
from xcoder_jax import workdir as wd

INITS = {"l1": (0.08, "zero"), "unit": (1.0, "zero"), "mean": (1.0, "mean")}


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="a workdir holding a complete store")
    p.add_argument("--out", default="runs/batchtopk_quality")
    p.add_argument("--k", default="32")
    p.add_argument("--init", default="l1,mean", help=f"comma-separated: {', '.join(INITS)}")
    p.add_argument("--path", default="dense", choices=("dense", "sparse", "auto"))
    p.add_argument("--seeds", default="0")
    args = p.parse_args()
    store = os.path.abspath(wd.activations_dir(args.workdir))
    for seed in map(int, args.seeds.split(",")):
        for k in map(int, args.k.split(",")):
            for init in args.init.split(","):
                norm, b_dec = INITS[init]
                run = os.path.join(args.out, f"{init}_k{k}_{args.path}_s{seed}")
                os.makedirs(run, exist_ok=True)
                if not os.path.exists(wd.activations_dir(run)):
                    os.symlink(store, wd.activations_dir(run))
                c = tiny.get_config("batchtopk")
                c.seed, c.crosscoder.k, c.crosscoder.topk_path = seed, k, args.path
                c.crosscoder.batchtopk_dec_init_norm, c.crosscoder.b_dec_init = norm, b_dec
                ev = train.train_and_evaluate(c, run)
                line = {"seed": seed, "k": k, "init": init, "path": args.path}
                line.update(fve=ev["fve"], l0=ev["l0"], dead=ev["dead_fraction"])
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
