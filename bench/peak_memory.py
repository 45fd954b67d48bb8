r"""Peak memory of extraction and training at 1x and 4x the corpus size.

Each measurement runs in a fresh child process that reports its own peak RSS; the ratio
4x / 1x (target <= 1.2) shows that memory does not grow with the corpus: extraction streams
documents into fixed-size shards, and training reads a few shards at a time.

    python -m bench.peak_memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

BASE_DOCS = 200  # extraction corpus at 1x
BASE_ROWS = 65536  # training store at 1x


def child_extract(root: str, scale: int) -> None:
    from bench import recorded_settings
    from configs import tiny
    from xcoder_jax import activations
    from xcoder_jax.synthetic import CORPUS, make_model, make_tokenizer, micro_config

    recorded_settings()

    tok = make_tokenizer(CORPUS)
    pair = {
        r: make_model(os.path.join(root, r), tok, seed=s, hidden=256, layers=4)
        for s, r in enumerate(("base", "distilled"))
    }
    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as f:
        for i in range(BASE_DOCS * scale):
            f.write(json.dumps({"text": CORPUS[i % len(CORPUS)] * 4}) + "\n")
    config = micro_config(
        tiny.get_config(), {**pair, "corpus": corpus}, batch_size=16, shard_rows=8192
    )
    manifest = activations.extract(config, os.path.join(root, "run"))
    print(json.dumps({"rows": manifest["n_rows"]}))


def child_train(root: str, scale: int) -> None:
    from bench import recorded_settings
    from configs import tiny
    from xcoder_jax import train
    from xcoder_jax import workdir as wd
    from xcoder_jax.synthetic import synthetic_store, train_config

    recorded_settings()

    rows = BASE_ROWS * scale
    synthetic_store(wd.activations_dir(root), n_rows=rows, d=256, n_atoms=256, shard_rows=8192)
    c = train_config(
        tiny.get_config(),
        batch_size=1024,
        steps=rows // 1024,
        log_every=50,
        eval_every=0,
        checkpoint_every=10**6,
        eval_shards=1,
    )
    c.crosscoder.d_model, c.crosscoder.n_latents = 256, 512
    train.train_and_evaluate(c, root)
    print(json.dumps({"rows": rows}))


def measure(stage: str, scale: int) -> int:
    """Peak RSS in bytes of a child running `stage` at `scale`."""
    root = tempfile.mkdtemp(prefix=f"bench_mem_{stage}_")
    try:
        code = (
            f"import resource, sys; sys.path.insert(0, {os.getcwd()!r}); "
            f"from bench.peak_memory import child_{stage}; child_{stage}({root!r}, {scale}); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        peak = next(line for line in out.stdout.splitlines() if line.startswith("PEAK"))
        return int(peak.split()[1]) * 1024  # ru_maxrss is in KiB on Linux
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.parse_args()
    for stage, unit in (("extract", f"{BASE_DOCS} docs"), ("train", f"{BASE_ROWS} rows")):
        one, four = measure(stage, 1), measure(stage, 4)
        print(
            f"{stage:>8}: 1x ({unit}) {one / 2**20:7.0f} MiB   4x {four / 2**20:7.0f} MiB   "
            f"ratio 4x/1x {four / one:.2f}"
        )


if __name__ == "__main__":
    main()
