"""The paper's settings (Baek & Tegmark 2025) for its three model pairs: Qwen2.5 base vs
DeepSeek-R1-Distill-Qwen, at 1.5b, 7b and 14b. The size is the config's argument:

    python launch/pipeline.py --config=configs/paper.py:1.5b --workdir=runs/qwen2p5_1p5b
    python launch/pipeline.py --config=configs/paper.py:7b --workdir=runs/qwen2p5_7b
    python launch/pipeline.py --config=configs/paper.py:14b --workdir=runs/qwen2p5_14b

Needs hub access (or set --config.models.base/distilled to local paths and
--config.data.sources to local files) and an accelerator: pip install -e ".[cuda12]".
Add `,batchtopk` (`--config=configs/paper.py:1.5b,batchtopk`) for the BatchTopK loss
(k = 100) instead of the paper's L1, and `,runlocal` for a smoke run with few steps,
latents, documents and prompts (xcoder_jax.config_util.runlocal); steering needs
--config.steering.prompts and geometry --config.geometry.relation_files, as in a full run.

Every field not set here keeps its configs/tiny.py meaning and default.
"""

from ml_collections import ConfigDict

from xcoder_jax import config_util

# Config files are loaded by path, not as a package: tiny.py is read from next to this file.
tiny = config_util.load_sibling(__file__, "tiny.py")

# size -> (base, distilled, d_model, layer); layer = n_layers // 2 (resid_pre of block L).
PAIRS = {
    "1.5b": ("Qwen/Qwen2.5-Math-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1536, 14),
    "7b": ("Qwen/Qwen2.5-Math-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 3584, 14),
    "14b": ("Qwen/Qwen2.5-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 5120, 24),
}

TOKENS = 400_000_000  # training budget in activation vectors
BATCH = 1024


def get_config(arg: str | None = None) -> ConfigDict:
    arg, topk = config_util.split_variant(arg)  # `,batchtopk`: that loss instead of L1
    size, local = config_util.parse_arg(arg, "configs/paper.py", tuple(PAIRS))
    base, distilled, d_model, layer = PAIRS[size]
    c = tiny.get_config()
    c.models.base, c.models.distilled = base, distilled
    c.models.torch_dtype = "bfloat16"

    # OpenThoughts-114k (question + reasoning trace, thought markers -> <think>) mixed with
    # 100k RedPajama documents; documents under 2048 tokens dropped, the rest truncated.
    reasoning = ConfigDict(dict(tiny.SOURCE_DEFAULTS))
    reasoning.update(kind="hf", name="open-thoughts/OpenThoughts-114k", format="conversations")
    web = ConfigDict(dict(tiny.SOURCE_DEFAULTS))
    web.update(kind="hf", name="togethercomputer/RedPajama-Data-1T-Sample", max_docs=100_000)
    c.data.sources = [reasoning, web]
    c.data.min_tokens = 2048
    c.data.max_tokens = 2048

    c.extract.layer = layer
    c.extract.batch_size = 8  # documents of 2048 tokens per forward pass
    c.extract.shard_rows = 16384  # ~50 MB per model file at d=1536

    c.crosscoder.d_model = d_model
    c.crosscoder.n_latents = 32768
    c.crosscoder.l1_coeff = 2.0
    c.crosscoder.dtype = "bfloat16"  # bf16 compute; fp32 master weights
    c.crosscoder.dead_window_tokens = 10_000_000

    c.train.batch_size = BATCH
    c.train.steps = TOKENS // BATCH
    c.train.lr = 5e-5
    c.train.log_every = 500
    c.train.eval_every = 20_000
    c.train.eval_shards = 4
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 3
    c.train.group_shards = 8
    c.train.prefetch = 8

    # The paper read the bare word as the whole input; relation pairs come from the Todd et
    # al. (2023) function-vector files (english-spanish, ..., singular-plural), given as
    # --config.geometry.relation_files='("a.json", "b.json")'.
    c.geometry.template = "{word}"
    c.geometry.zoo_relations = False
    if topk:  # k = 100 and aux_k = d_model / 2, as the PyTorch crosscoder trainers use
        config_util.batchtopk(c, k=100, aux_k=d_model // 2)
    return config_util.runlocal(c) if local else c
