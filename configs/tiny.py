"""The embedded default: the tiny Qwen2 model pair the project builds itself, on CPU.

    python launch/pipeline.py --config=configs/tiny.py --workdir=runs/tiny

Every stage reads this one config; override any field on the command line, e.g.
`--config.zoo.pretrain_steps=100 --config.extract.shard_rows=2048`.
"""

from ml_collections import ConfigDict


def get_config(arg=None):
    c = ConfigDict()
    c.seed = 0

    # --- The model pair ------------------------------------------------------------------
    # "zoo" means the embedded pair built into <workdir>/models; otherwise an HF id or a
    # local save_pretrained directory.
    c.models = ConfigDict()
    c.models.base = "zoo"
    c.models.distilled = "zoo"
    c.models.base_revision = None
    c.models.distilled_revision = None
    c.models.torch_dtype = "float32"  # dtype the HF models run in during extraction
    c.models.device = "auto"  # "auto": cuda when available, else cpu

    # --- The embedded zoo ----------------------------------------------------------------
    c.zoo = ConfigDict()
    c.zoo.sizes = (64, 96, 128)  # hidden sizes built for the geometry-vs-size study
    c.zoo.main_size = 128  # the pair the crosscoder is trained on
    c.zoo.n_layers = 4
    c.zoo.n_heads = 4
    c.zoo.n_kv_heads = 2
    c.zoo.mlp_mult = 4  # intermediate size = mlp_mult * hidden
    c.zoo.vocab_size = 512  # byte-level BPE trained on the corpus
    c.zoo.max_len = 160  # tokens per training sequence
    c.zoo.n_train_problems = 6000
    c.zoo.n_heldout_problems = 100  # held out from training; used to evaluate the pair
    c.zoo.n_extract_docs = 600  # documents written for activation extraction
    c.zoo.pretrain_steps = 300
    c.zoo.distill_steps = 300
    c.zoo.batch_size = 32
    c.zoo.lr = 3e-3
    c.zoo.distill_lr = 1e-3
    c.zoo.max_new_tokens = 96  # greedy answer length when evaluating the pair

    # --- Text for extraction -------------------------------------------------------------
    # Each source: kind "zoo" (the zoo's extraction corpus), "jsonl", "text" (one document
    # per file, or per line with per_line=True) or "hf" (a `datasets` name, where the hub is
    # reachable). format "plain" takes `text_field`; "reasoning" joins question + "\n" +
    # trace and maps thought markers to <think> ... </think>.
    c.data = ConfigDict()
    c.data.sources = [
        ConfigDict(
            dict(
                kind="zoo",
                path="",
                name="",
                split="train",
                format="plain",
                text_field="text",
                question_field="question",
                trace_field="trace",
                per_line=False,
                max_docs=-1,
            )
        )
    ]
    c.data.min_tokens = 0  # drop shorter documents (the paper: 2048)
    c.data.max_tokens = 256  # truncate longer ones (the paper: 2048)
    c.data.max_docs = -1  # -1: all documents

    # --- Activation extraction -----------------------------------------------------------
    c.extract = ConfigDict()
    c.extract.layer = -1  # block whose input is read; -1 means n_layers // 2
    c.extract.drop_first = True  # drop position 0 (the attention-sink token)
    c.extract.batch_size = 16  # documents per forward pass
    c.extract.dtype = "bfloat16"  # "bfloat16" or "float16" on disk
    c.extract.shard_rows = 8192  # rows per shard (the last shard of a run may be shorter)
    return c
