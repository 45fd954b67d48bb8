"""The paper's settings (Baek & Tegmark 2025) for its three model pairs: Qwen2.5 base vs
DeepSeek-R1-Distill-Qwen, at 1.5b, 7b and 14b. The size is the config's argument:

    python launch/pipeline.py --config=configs/paper.py:1.5b --workdir=runs/qwen2p5_1p5b
    python launch/pipeline.py --config=configs/paper.py:7b --workdir=runs/qwen2p5_7b
    python launch/pipeline.py --config=configs/paper.py:14b --workdir=runs/qwen2p5_14b

Needs hub access (or set --config.models.base/distilled to local paths and
--config.data.sources to local files) and an accelerator: pip install -e ".[cuda12]".
Add `,batchtopk` (`--config=configs/paper.py:1.5b,batchtopk`) for the BatchTopK loss
(k = 100) instead of the paper's L1 (`,matryoshka`: Matryoshka BatchTopK, the same k), and
`,runlocal` for a smoke run with few steps, latents, documents and prompts
(xcoder_jax.config_util.runlocal); steering needs --config.steering.prompts and geometry
--config.geometry.relation_files, as in a full run.

Add `,dryrun` (`--config=configs/paper.py:1.5b,dryrun`) for the paper's shapes end to end
without the hub: a random-init Qwen2 pair with the real architecture (layers, d_model, heads,
KV heads, MLP width, vocabulary; the zoo's tokenizer stands in), a few short zoo documents,
the paper's crosscoder (32,768 latents, bf16 compute) for a few steps, then every stage:

    python launch/pipeline.py --config=configs/paper.py:1.5b,dryrun --workdir=runs/dryrun_1p5b

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

# size -> the base model's architecture (Qwen2.5 configs): layers, heads, KV heads, MLP
# width, vocabulary rows.
ARCH = {
    "1.5b": (28, 12, 2, 8960, 151_936),
    "7b": (28, 28, 4, 18944, 152_064),
    "14b": (48, 40, 8, 13824, 152_064),
}
DRYRUN = "dryrun"

TOKENS = 400_000_000  # training budget in activation vectors
BATCH = 1024


def get_config(arg: str | None = None) -> ConfigDict:
    arg, topk = config_util.loss_variant(arg)  # `,batchtopk`, `,matryoshka`: that loss, not L1
    arg, dry = config_util.split_variant(arg, DRYRUN)
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
    # The L1 step turns sparse once the logged L0 falls below l1_sparse.SPARSE_MAX_DENSITY of the
    # latents (same result).
    c.crosscoder.l1_path = "auto"
    c.crosscoder.dead_window_tokens = 10_000_000
    c.crosscoder.exclusive = (0.0, 0.0)  # dedicated base-only / distilled-only shares: none
    # Matryoshka: the latent groups' shares of n_latents, as configs/tiny.py.
    c.crosscoder.group_fractions = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)

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
        config_util.batchtopk(c, k=100, aux_k=d_model // 2, loss=topk)
    if dry:
        return dryrun(c, size)
    return config_util.runlocal(c) if local else c


def dryrun(c: ConfigDict, size: str) -> ConfigDict:
    """The paper's shapes on a random pair and a few zoo documents: every stage runs."""
    d_model = c.crosscoder.d_model
    n_latents = c.crosscoder.n_latents
    config_util.runlocal(c)  # few documents, prompts, draws; then the paper's shapes back
    c.models.base = c.models.distilled = "zoo"
    c.models.torch_dtype = "float32"  # bf16 matmuls are slower than fp32 on CPUs without AMX
    n_layers, n_heads, n_kv_heads, mlp, vocab = ARCH[size]
    z = c.zoo
    z.sizes, z.depths, z.main_size = (d_model,), (), d_model
    z.n_layers, z.n_heads, z.n_kv_heads = n_layers, n_heads, n_kv_heads
    z.intermediate_size, z.model_vocab_size, z.random_pair = mlp, vocab, True
    z.n_heldout_problems, z.max_new_tokens, z.eval_batch_size = 4, 16, 4
    c.data.sources = [ConfigDict(dict(tiny.SOURCE_DEFAULTS))]  # the zoo's documents
    c.data.min_tokens, c.data.max_tokens, c.data.max_docs = 0, 128, 16
    c.extract.batch_size, c.extract.shard_rows = 4, 256
    c.crosscoder.n_latents = n_latents
    c.crosscoder.aux_k = min(256, n_latents)
    c.crosscoder.dead_window_tokens = 1000
    c.train.steps, c.train.batch_size = 4, 256
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 2
    c.train.eval_shards = 1
    c.analysis.batch_rows = 256
    c.geometry.zoo_relations = True
    c.geometry.template = " {word}"  # the zoo tokenizer's words are single tokens with a space
    return c
