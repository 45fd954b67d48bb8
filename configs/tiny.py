"""The embedded default: the tiny Qwen2 model pair the project builds itself, on CPU.

    python launch/pipeline.py --config=configs/tiny.py --workdir=runs/tiny

Every stage reads this one config; override any field on the command line, e.g.
`--config.zoo.pretrain_steps=100 --config.extract.shard_rows=2048`.
"""

from ml_collections import ConfigDict

# Fields of one text source; every source of `data.sources` has all of them.
SOURCE_DEFAULTS = dict(
    kind="zoo",  # "zoo", "jsonl", "text" or "hf"
    path="",  # file or glob pattern (jsonl, text)
    name="",  # `datasets` name (hf)
    split="train",
    format="plain",  # "plain", "reasoning" or "conversations"
    text_field="text",
    question_field="question",
    trace_field="trace",
    conversations_field="conversations",
    per_line=False,  # text: one document per line instead of per file
    max_docs=-1,  # -1: all documents of this source
)


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
    # Upper bound for the byte-level BPE; the corpus saturates at ~750, enough for every
    # marker and relation word to be one token.
    c.zoo.vocab_size = 768
    c.zoo.max_len = 128  # tokens per packed training row (documents run to ~110)
    c.zoo.n_train_problems = 6000  # each gets a concise solution (base) and a trace (distill)
    c.zoo.n_relation_docs = 1500  # paragraphs of relation sentences in the base corpus
    c.zoo.distill_relation_frac = 0.1  # relation docs mixed into distillation, per trace
    c.zoo.n_heldout_problems = 100  # held out from training; used to evaluate the pair
    c.zoo.n_extract_docs = 600  # documents written for activation extraction
    c.zoo.extract_mix = (0.4, 0.4, 0.2)  # extraction docs: traces, concise, relation paragraphs
    c.zoo.pretrain_steps = 300
    c.zoo.distill_steps = 200
    c.zoo.batch_size = 32
    c.zoo.lr = 3e-3
    c.zoo.distill_lr = 1e-3
    c.zoo.warmup_frac = 0.05  # linear warmup, then cosine decay to 10% of the peak
    c.zoo.weight_decay = 0.01
    c.zoo.max_new_tokens = 96  # greedy answer length when evaluating the pair
    c.zoo.eval_batch_size = 50  # prompts decoded together (left-padded)
    c.zoo.num_threads = 2  # torch CPU threads while building

    # --- Text for extraction -------------------------------------------------------------
    # Each source: kind "zoo" (the zoo's extraction corpus), "jsonl", "text" (one document
    # per file, or per line with per_line=True) or "hf" (a `datasets` name, where the hub is
    # reachable). format "plain" takes `text_field`; "reasoning" joins question + "\n" +
    # trace and maps thought markers to <think> ... </think>.
    c.data = ConfigDict()
    c.data.sources = [ConfigDict(dict(SOURCE_DEFAULTS))]
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
    # --- The crosscoder ------------------------------------------------------------------
    c.crosscoder = ConfigDict()
    c.crosscoder.n_models = 2
    c.crosscoder.d_model = c.zoo.get_ref("main_size")  # checked against the store
    c.crosscoder.n_latents = 1024  # the paper: 32768
    c.crosscoder.loss = "l1"  # "l1" (the paper's) or "batchtopk"
    c.crosscoder.l1_coeff = 2.0  # lambda of the paper
    c.crosscoder.l1_warmup_frac = 0.05  # lambda warms up linearly over this share of steps
    c.crosscoder.k = 32  # BatchTopK: active latents per row on average
    c.crosscoder.aux_k = 256  # AuxK: dead latents used to model the residual
    c.crosscoder.aux_coeff = 1 / 32
    c.crosscoder.threshold_ema = 0.99  # EMA of the BatchTopK inference threshold
    c.crosscoder.dead_window_tokens = 50_000  # a latent silent this long counts as dead
    c.crosscoder.dec_init_norm = 0.08  # L2 norm of every decoder row at init
    c.crosscoder.dtype = "float32"  # compute dtype; "bfloat16" keeps fp32 master weights

    # --- Training ------------------------------------------------------------------------
    c.train = ConfigDict()
    c.train.steps = 1500
    c.train.batch_size = 256  # activation vectors per step (the paper: 1024)
    c.train.lr = 1e-3  # the paper: 5e-5 at batch 1024 over 400M tokens
    c.train.beta1 = 0.9
    c.train.beta2 = 0.999
    c.train.clip_norm = 1.0  # global-norm gradient clipping
    c.train.decay_start_frac = 0.8  # constant lr, then linear decay to 0 over the last 20%
    c.train.log_every = 50
    c.train.eval_every = 500  # held-out evaluation (at log steps)
    c.train.eval_shards = 1  # the last shards of the store are held out
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.group_shards = 4  # shards shuffled together (the reader's shuffle buffer)
    c.train.prefetch = 4  # batches prepared ahead by the reader thread
    c.train.nonfinite_rows = "error"  # NaN/inf rows in the store: "error" or "skip"
    c.train.verify_store = True  # check shard checksums on first read

    # --- Devices -------------------------------------------------------------------------
    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by 'model'
    c.mesh.model = 1  # devices sharing the latent axis
    c.distributed = False  # multi-host: call jax.distributed.initialize()
    return c
