r"""Peak memory and time of the analysis pass on a paper-sized dictionary over a large store.

Builds (once, under --dir) a synthetic store of N rows x 2 models x d (bfloat16, tokens from
a small BPE with the lexicon's markers planted) and a random 32768-latent export, then runs
`xcoder_jax.analysis.analyze` (norms, the streaming pass with running top-k, categories,
latent scaling, latents.jsonl with decoded contexts) in a fresh process per store size and
prints its peak RSS and wall time, side by side. Bounded memory shows as a peak RSS that does
not grow with the number of rows; for scale, the dense latent activations of the largest
store are printed too.

    python -m bench.analysis_memory                          # 250k and 1M rows, d=64, 32768 latents
    python -m bench.analysis_memory --rows=100000 --latents=4096   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

MARKER_TEXT = (
    "Wait, let me check. Therefore the answer is 4. Thus it holds. Alternatively, count. "
    "However, the sum is 9. But it is not. I can verify this. The cat sat on the mat."
)


def build_tokenizer(directory: str):
    from transformers import PreTrainedTokenizerFast

    from bench import recorded_settings
    from xcoder_jax.synthetic import make_tokenizer

    recorded_settings()
    path = os.path.join(directory, "tokenizer")
    if os.path.exists(path):
        return PreTrainedTokenizerFast.from_pretrained(path)
    fast = make_tokenizer([MARKER_TEXT] * 200, vocab_size=400)
    fast.save_pretrained(path)
    return fast


def build_store(directory: str, n_rows: int, d: int, tokenizer, doc_rows: int = 256) -> str:
    """Random activations with planted marker texts; returns the store directory."""
    from bench import recorded_settings
    from xcoder_jax.activations import ActivationStore
    from xcoder_jax.activations import manifest as mf
    from xcoder_jax.synthetic import store_writer

    recorded_settings()
    path = os.path.join(directory, f"store_{n_rows}_{d}")
    if os.path.exists(os.path.join(path, "manifest.json")):
        if mf.read_manifest(path).get("complete"):
            ActivationStore(path, verify=False)
            return path
        shutil.rmtree(path)  # an interrupted build: start it again
    rng = np.random.default_rng(0)
    text_ids = np.asarray(tokenizer(MARKER_TEXT)["input_ids"], np.int32)
    writer = store_writer(path, {"bench": n_rows}, d=d, shard_rows=65536)
    for doc, start in enumerate(range(0, n_rows, doc_rows)):
        n = min(doc_rows, n_rows - start)
        x = rng.normal(size=(n, 2, d)).astype(np.float32)
        tokens = np.resize(text_ids, n)
        writer.add(x, tokens, doc, np.arange(1, n + 1))
    writer.close()
    return path


def build_export(directory: str, d: int, h: int) -> dict:
    """A random raw-unit export; b_enc puts L0 near 200 of 32768 on unit-normal rows."""
    rng = np.random.default_rng(1)
    w_enc = rng.normal(size=(2, d, h)).astype(np.float32) / np.sqrt(2 * d)
    tensors = {
        "W_enc": w_enc,
        "b_enc": np.full(h, -2.5, np.float32),
        "W_dec": np.ascontiguousarray(w_enc.transpose(2, 0, 1)) * rng.uniform(0, 1, (h, 2, 1)),
        "b_dec": np.zeros((2, d), np.float32),
    }
    return tensors


def analyse(directory: str, n_rows: int, d: int, h: int) -> None:
    """The measured child process: prints one JSON line."""
    from configs import tiny
    from xcoder_jax.activations import ActivationStore
    from xcoder_jax.analysis import analyze
    from xcoder_jax.exported import ExportedCrosscoder

    tokenizer = build_tokenizer(directory)
    store = ActivationStore(os.path.join(directory, f"store_{n_rows}_{d}"), verify=False)
    tensors = build_export(directory, d, h)
    export_config = {"scales": store.scales.tolist(), "models": store.manifest["models"]}
    xcoder = ExportedCrosscoder(tensors, export_config)
    ac = tiny.get_config().analysis
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.time()
    out = os.path.join(directory, f"analysis_{n_rows}")
    heldout = [len(store.shards) - 1]
    os.makedirs(out, exist_ok=True)
    latents = os.path.join(out, "latents.jsonl")
    summary = analyze(
        store,
        xcoder,
        ac,
        heldout=heldout,
        tokenizer=tokenizer,
        latents_path=latents,
        progress=False,
    ).summary
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows": n_rows,
                "seconds": seconds,
                "peak_rss_mib": peak,
                "rss_before_mib": rss_before,
                "l0": summary["l0"],
                "wait_occurrences": summary["categories"]["self_reflection"]["occurrences"],
                "latents_jsonl_mib": os.path.getsize(os.path.join(out, "latents.jsonl")) / 2**20,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/bench_analysis")
    p.add_argument("--rows", default="250000,1000000", help="store sizes, comma-separated")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--latents", type=int, default=32768)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        analyse(args.dir, args.child, args.d, args.latents)
        return
    os.makedirs(args.dir, exist_ok=True)
    tokenizer = build_tokenizer(args.dir)
    sizes = [int(r) for r in args.rows.split(",")]
    for n in sizes:
        build_store(args.dir, n, args.d, tokenizer)
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, f"--dir={args.dir}", f"--child={n}", f"--d={args.d}"]
        cmd.append(f"--latents={args.latents}")
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"d={args.d}, 2 models, {args.latents} latents, bfloat16 store, torch threads "
          f"{__import__('torch').get_num_threads()}")  # fmt: skip
    print(f"{'rows':>9} {'time s':>8} {'rows/s':>9} {'peak RSS MiB':>13} {'before MiB':>11} "
          f"{'L0':>6} {'latents.jsonl MiB':>18}")  # fmt: skip
    for r in rows:
        print(f"{r['rows']:>9} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>9.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['rss_before_mib']:>11.0f} {r['l0']:>6.1f} "
              f"{r['latents_jsonl_mib']:>18.1f}")  # fmt: skip
    big = max(sizes)
    dense = big * args.latents * 4 / 2**30
    acts = big * 2 * args.d * 2 / 2**30
    print(f"for scale: dense latent activations of {big} rows = {dense:.0f} GiB (float32); "
          f"the store's activations = {acts:.2f} GiB")  # fmt: skip
    if len(rows) > 1:
        print(f"peak RSS ratio largest / smallest store: "
              f"{rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f} "
              f"for {sizes[-1] / sizes[0]:.0f}x the rows")  # fmt: skip


if __name__ == "__main__":
    main()
