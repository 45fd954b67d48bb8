r"""Extraction throughput against a bare forward pass of the two models on the same tokens.

Both sides tokenise the same documents and run both models to block L in the same batches;
extraction also converts, checksums and writes the store. Rounds alternate and the median
is reported, so the ratio (target >= 0.85) is measured side by side in one run.

    python -m bench.extract_throughput                 # random Qwen2 pair, hidden 256
    python -m bench.extract_throughput --hidden=512 --docs=400
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from bench import recorded_settings
from configs import tiny
from xcoder_jax import activations, site
from xcoder_jax.activations.extract import _batches
from xcoder_jax.activations.extract import extract as extract_store
from xcoder_jax.activations.sources import iter_documents
from xcoder_jax.synthetic import CORPUS, make_model, make_tokenizer, micro_config

recorded_settings()


def bare_forward(config, workdir, models, layer) -> int:
    """Both models to block L over every batch; returns the rows a store would hold."""
    tok = activations.models.load_tokenizer(config.models.base)
    rows = 0
    for batch in _batches(iter_documents(config.data, workdir, tok), config.extract.batch_size):
        lengths = [len(ids) for _, ids in batch]
        ids = np.zeros((len(batch), max(lengths)), np.int64)
        mask = np.zeros_like(ids)
        for i, (_, d) in enumerate(batch):
            ids[i, : len(d)], mask[i, : len(d)] = d, 1
        for m in models:
            site.forward_to_site(
                m, layer, torch.from_numpy(ids), torch.from_numpy(mask)
            ).float().numpy()
        rows += sum(n - 1 for n in lengths)
    return rows


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_extract_")
    try:
        texts = [CORPUS[i % len(CORPUS)] * 4 for i in range(args.docs)]
        tok = make_tokenizer(CORPUS)
        pair = {
            role: make_model(
                os.path.join(root, role), tok, seed=s, hidden=args.hidden, layers=args.layers
            )
            for s, role in enumerate(("base", "distilled"))
        }
        corpus = os.path.join(root, "corpus.jsonl")
        with open(corpus, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        config = micro_config(
            tiny.get_config(), {**pair, "corpus": corpus}, batch_size=16, shard_rows=4096
        )
        models = [
            activations.models.load_model(pair[r], None, "float32", torch.device("cpu"))
            for r in pair
        ]
        layer = args.layers // 2
        times = {"bare forward": [], "extract": []}
        rows = 0
        for r in range(args.rounds + 1):  # round 0 warms up
            start = time.perf_counter()
            rows = bare_forward(config, root, models, layer)
            t_bare = time.perf_counter() - start
            workdir = os.path.join(root, f"run{r}")
            start = time.perf_counter()
            manifest = extract_store(config, workdir)
            t_extract = time.perf_counter() - start
            shutil.rmtree(workdir)
            assert manifest["n_rows"] == rows
            if r:
                times["bare forward"].append(t_bare)
                times["extract"].append(t_extract)
        shape = f"2 x Qwen2 hidden {args.hidden}, {args.layers} layers"
        print(f"pair: {shape}; {args.docs} docs, {rows} rows")
        rate = {k: rows / statistics.median(v) for k, v in times.items()}
        for k, v in rate.items():
            print(f"{k:>13}: {v:10.0f} rows/s")
        print(f"ratio extract / bare forward: {rate['extract'] / rate['bare forward']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
