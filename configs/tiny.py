"""The embedded default: the tiny Qwen2 model pair the project builds itself, on CPU.

    python launch/pipeline.py --config=configs/tiny.py --workdir=runs/tiny

Every stage reads this one config; override any field on the command line, e.g.
`--config.zoo.pretrain_steps=100 --config.extract.shard_rows=2048`. A smoke run of every
stage in a few minutes: `--config=configs/tiny.py:runlocal` (see xcoder_jax.config_util).
"""

from ml_collections import ConfigDict, config_dict

from xcoder_jax import config_util
from xcoder_jax.lexicon import CATEGORY_NAMES

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
    arg, topk = config_util.loss_variant(arg)  # `batchtopk`, `matryoshka`: that loss, not L1
    _, local = config_util.parse_arg(arg, "configs/tiny.py")
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
    # Hidden sizes built for the geometry-vs-size study, with their depths (width and depth
    # grow together, as across Qwen2.5 sizes); () for depths: n_layers at every size.
    c.zoo.sizes = (32, 48, 64, 96)
    c.zoo.depths = (2, 2, 4, 4)  # even: block n_layers // 2 sits at mid-depth at every size
    c.zoo.main_size = 96  # the pair the crosscoder is trained on
    c.zoo.n_layers = 4
    c.zoo.n_heads = 4
    c.zoo.n_kv_heads = 2
    c.zoo.mlp_mult = 4  # intermediate size = mlp_mult * hidden
    # Set by dry runs at a real model's shapes (configs/paper.py:<size>,dryrun); 0 keeps the
    # zoo's own: the MLP width (else mlp_mult * hidden), the embedding rows (else the
    # tokenizer's), and random_pair: both models random (two seeds), nothing trained.
    c.zoo.intermediate_size = 0
    c.zoo.model_vocab_size = 0
    c.zoo.random_pair = False
    # Upper bound for the byte-level BPE; the corpus saturates at ~830 entries, enough for
    # every marker and relation word to be one token (numbers split into digits, as in Qwen2).
    c.zoo.vocab_size = 1024
    # Tokens per packed training row; traces run to ~630 tokens (median ~115) and may span rows.
    c.zoo.max_len = 256
    # "rounds": reflection in rounds whose number rises with difficulty, slips a later round
    # corrects (zoo.rounds); "no_loop": at most one reflection per trace, in one fixed order.
    c.zoo.teacher = "rounds"
    # The negative-control pair: the main size's base distilled on this teacher instead
    # (models/no_loop; the study runs on it too, in <workdir>/no_loop/); "" builds none.
    c.zoo.control_teacher = "no_loop"
    c.zoo.n_train_problems = 6000  # each gets a concise solution (base) and a trace (distill)
    c.zoo.n_relation_docs = 1500  # paragraphs of relation sentences in the base corpus
    # Paragraphs using the marker words in their everyday sense ("Wait for me", "But Anna
    # likes cats"), so the base knows the words without ever reasoning with them.
    c.zoo.n_everyday_docs = 500
    # Relation/everyday paragraphs replayed in every arm trained from the base (distilled,
    # sham, no-loop): characters of replay per character of the arm's problem text.
    c.zoo.replay_frac = 0.05
    c.zoo.n_heldout_problems = 100  # held out from training; used to evaluate the pair
    c.zoo.n_val_problems = 100  # held out; their documents' loss says when training converged
    c.zoo.n_extract_docs = 600  # documents written for activation extraction
    c.zoo.extract_mix = (0.4, 0.4, 0.2)  # extraction docs: traces, concise, relation paragraphs
    # Every size trains to convergence of its held-out loss (zoo.training.Schedule): the peak
    # lr until the loss on the val documents improves by less than `converge_tol` (relative)
    # over `converge_patience` evaluations `converge_every` steps apart, then a decay over
    # `decay_frac` of the steps so far. The step counts are caps (decay included); zoo.json
    # records each run's steps and whether it converged. The sham arm repeats the distilled
    # arm's schedule step for step.
    c.zoo.pretrain_steps = 400
    c.zoo.distill_steps = 200
    c.zoo.converge_every = 50
    c.zoo.converge_patience = 2
    c.zoo.converge_tol = 0.02
    c.zoo.decay_frac = 0.2
    c.zoo.batch_size = 16  # rows of max_len tokens per step
    c.zoo.lr = 3e-3
    c.zoo.distill_lr = 2e-3
    c.zoo.warmup_frac = 0.05  # of the step cap: linear warmup
    c.zoo.weight_decay = 0.01
    # A size's distillation counts as taken when, on the held-out prompts, the distilled
    # model's greedy answers hold a reasoning marker and read as a trace (work, then a
    # conclusion with the final line; zoo.trace_reading) at least this often.
    c.zoo.criterion_min_rate = 0.8
    c.zoo.max_new_tokens = 448  # greedy answer length when evaluating (traces run long)
    c.zoo.eval_batch_size = 50  # prompts decoded together (left-padded)
    # torch CPU threads while building; with another busy process on a 2-core machine, run
    # with OMP_WAIT_POLICY=PASSIVE (launch/build_zoo.py sets it) or steps slow down ~5x.
    c.zoo.num_threads = 2

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
    # Positions never stored, so never trained on, selected or measured (activations/exclude.py):
    c.extract.exclude_first = 1  # the first n of every document (1: the attention sink / BOS)
    c.extract.exclude_special = False  # the tokenizer's special tokens (BOS, EOS, chat template)
    c.extract.exclude_tokens = ()  # more single tokens, e.g. ("<think>", "</think>")
    c.extract.batch_size = 16  # documents per forward pass
    c.extract.dtype = "bfloat16"  # "bfloat16" or "float16" on disk
    c.extract.shard_rows = 8192  # rows per shard (the last shard of a run may be shorter)
    # Stop after this many rows (-1: every row of the corpus); the disk budget is checked
    # against the rows a run will write before anything is written.
    c.extract.max_rows = -1
    # --- The crosscoder ------------------------------------------------------------------
    c.crosscoder = ConfigDict()
    c.crosscoder.n_models = 2
    c.crosscoder.d_model = c.zoo.get_ref("main_size")  # checked against the store
    c.crosscoder.n_latents = 1024  # the paper: 32768
    c.crosscoder.loss = "l1"  # "l1" (the paper's), "batchtopk" or "matryoshka"
    c.crosscoder.l1_coeff = 2.0  # lambda of the paper
    c.crosscoder.l1_warmup_frac = 0.05  # lambda warms up linearly over this share of steps
    c.crosscoder.k = 32  # BatchTopK: active latents per row on average
    # BatchTopK k-annealing: k falls linearly from k_max (0: 4 k) to k over the first
    # k_anneal_steps steps (0: k throughout); the selection runs at k_max's size meanwhile.
    c.crosscoder.k_max = 0
    c.crosscoder.k_anneal_steps = 0
    c.crosscoder.aux_k = 256  # AuxK: dead latents used to model the residual
    c.crosscoder.aux_coeff = 1 / 32
    c.crosscoder.threshold_ema = 0.99  # EMA of the BatchTopK inference threshold
    # BatchTopK step: "dense" GEMMs over every latent, "sparse" over the kept (row, latent)
    # pairs only (same result to float tolerance), or "auto" (batchtopk.SPARSE_MIN_RATIO).
    # Dense here: the README's recorded BatchTopK figures were trained on it.
    c.crosscoder.topk_path = "dense"
    # L1 step: "dense", "sparse" over the active (row, latent) pairs only (same result), or
    # "auto" from the logged L0 (l1_sparse.SPARSE_MAX_DENSITY, xcoder_jax/l1_switch.py).
    c.crosscoder.l1_path = "dense"
    # Matryoshka BatchTopK: the latents split into consecutive groups of these shares of
    # n_latents (the last group takes the remainder); every prefix of groups must reconstruct
    # on its own. dictionary_learning's example shares.
    c.crosscoder.group_fractions = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
    c.crosscoder.dead_window_tokens = 50_000  # a latent silent this long counts as dead
    c.crosscoder.dec_init_norm = 0.08  # L2 norm of every decoder row at init (L1)
    # BatchTopK's own: with L1's 0.08, 45% of its latents die at k = 32 (README).
    c.crosscoder.batchtopk_dec_init_norm = 1.0
    c.crosscoder.b_dec_init = "zero"  # decoder bias at init: "zero" or "mean" (of the store)
    # Subtract each model's store mean (normalised units) before encoding and add it back
    # after decoding; the export folds it into the biases (raw-unit users see no difference).
    # The decoder bias then starts at the mean (0 in the centred frame) whatever b_dec_init.
    c.crosscoder.center = False
    # Dedicated latents (Jiralerspong & Bricken 2026): (f_base, f_distilled), the shares of
    # n_latents that are base-only and distilled-only by construction (the other model's
    # encoder and decoder rows held at 0; the last latents, xcoder_jax/exclusive.py); the
    # rest are shared. (0.0, 0.0): none, every latent may use both models.
    c.crosscoder.exclusive = (0.0, 0.0)
    c.crosscoder.dtype = "float32"  # compute dtype; "bfloat16" keeps fp32 master weights

    # --- Export to other crosscoder formats (export/<format>/, after training) ---------------
    c.export = ConfigDict()
    # "dictionary_learning" (save_pretrained dir of CrossCoder / BatchTopKCrossCoder),
    # "ckkissane" (cc_weights.pt + cfg.json; L1 crosscoders only) and "saelens" (one JumpReLU
    # SAE over both models' concatenated activations; not written unless listed); () none.
    c.export.formats = ("dictionary_learning", "ckkissane")

    # --- Training ------------------------------------------------------------------------
    c.train = ConfigDict()
    c.train.steps = 1500
    c.train.batch_size = 256  # activation vectors per step (the paper: 1024)
    c.train.lr = 1e-3  # the paper: 5e-5 at batch 1024 over 400M tokens
    c.train.beta1 = 0.9
    c.train.beta2 = 0.999
    c.train.clip_norm = 1.0  # global-norm gradient clipping
    # Adam's first moment: "float32" (exact Adam) or "bfloat16" (half its memory; the second
    # moment stays float32).
    c.train.mu_dtype = "float32"
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
    # False: the latent axis stays within a host and hosts split the batch (only gradients
    # cross hosts); True: it spans hosts, each holding a share of the latents.
    c.mesh.model_across_processes = False
    c.distributed = False  # multi-host: call jax.distributed.initialize()
    # Leave empty/-1 where the cluster tells JAX (Cloud TPU, SLURM, Open MPI).
    c.coordinator_address = ""  # "host:port" of process 0
    c.num_processes = -1
    c.process_id = -1
    # A process silent this long is declared dead and the others stop with an error.
    c.heartbeat_seconds = 30

    # --- Geometry (parallelogram metric on word-pair relations) --------------------------
    c.geometry = ConfigDict()
    # Block whose input represents a word; unset: the crosscoder's (extract.layer).
    c.geometry.layer = config_dict.placeholder(int)
    # The word is read in this prompt; a space before {word} belongs to the word (" seven").
    # The paper used the bare word as the whole input ("{word}" for Qwen2.5); the zoo's
    # tokenizer prepends its EOS, so there the word sits at position 1.
    c.geometry.template = " {word}"
    c.geometry.add_special_tokens = True  # the tokenizer's own prefix (BOS/EOS) first
    c.geometry.zoo_relations = True  # the relations the zoo corpus teaches (zoo.RELATIONS)
    # Todd et al. (2023) function-vector files: JSON lists of {"input", "output"}.
    c.geometry.relation_files = ()
    c.geometry.max_pairs = 1000  # larger sets are subsampled (seeded); -1: all
    c.geometry.n_components = (2, 5, 10, 20)  # PCA sizes; capped at min(2 * pairs, d_model)
    c.geometry.plot_n_components = 2  # the one figures and the summary use (the paper's)
    c.geometry.n_shuffles = 5  # random pairings of the same words averaged in the control
    # Bootstrap resamples of word pairs behind every 95% interval (seeded by `seed`).
    c.geometry.n_boot = 1000
    c.geometry.batch_size = 64  # words per forward pass
    # More pairs to study, each ConfigDict(name=..., base=..., distilled=...) (HF ids/paths).
    c.geometry.pairs = []
    # --- Analysis ------------------------------------------------------------------------
    c.analysis = ConfigDict()
    c.analysis.norm = "l1"  # decoder norm in the relative norm: "l1" (the paper's) or "l2"
    # NRN bands (NRN = r / (1 + r), r = distilled / base decoder norm, normalised units):
    c.analysis.base_only_max = 0.1  # NRN below this: base-only latent
    c.analysis.distilled_only_min = 0.9  # NRN above this: distilled-only latent
    c.analysis.nrn_bins = 50  # NRN histogram bins over [0, 1]
    c.analysis.top_k_examples = 10  # max-activating positions kept per latent (the paper: 10)
    c.analysis.context_before = 24  # tokens shown before the firing token (the paper: 100 in all)
    c.analysis.context_after = 8  # tokens shown after it
    # A latent fires on a category when it is active on more of the category's marker
    # occurrences than this share of the largest such count over latents (the paper: 10%).
    c.analysis.firing_share = 0.1
    c.analysis.bare_markers = False  # also count markers without their leading space
    c.analysis.label_min_share = 0.5  # labels name a category when this share of examples fit
    c.analysis.top_latents = 20  # rows of the report's tables and of each category's top list
    c.analysis.batch_rows = 1024  # rows encoded at once (memory: batch_rows * n_latents floats)
    # Base-only and distilled-only latents given a latent-scaling fit, the most extreme first;
    # half the budget per side, what one side leaves unused goes to the other.
    c.analysis.scaling_max_latents = 4096
    c.analysis.scaling_min_rows = 5  # held-out firing rows needed for a fit
    # Error ratio of latent scaling (other model's beta / owner's on the error target) above
    # which an exclusive latent is flagged as falsely exclusive (complete shrinkage, Minder et
    # al. 2025). The reconstruction ratio (latent decoupling) is reported, not thresholded.
    c.analysis.scaling_false_ratio = 0.5
    c.analysis.splice_docs = 64  # held-out documents for splice-in CE; 0 skips splice-in
    c.analysis.splice_batch = 8  # documents per forward pass in splice-in
    # Behavioural KL (analysis/kl.py) on the first held-out documents: KL(model || model with
    # its reconstruction spliced in), and the half-step KL (base model to block L plus a latent
    # set's share of the reconstruction difference, distilled model's blocks from L on): the
    # fraction of KL(distilled || base continued in the distilled model) the distilled-only
    # latents close, beside the full reconstruction difference and random latent sets of the
    # same size matched on activity. 0 skips it; 95% intervals bootstrap documents (`seed`).
    c.analysis.kl_docs = 32  # 8 documents gave bootstrap intervals over too few clusters
    c.analysis.kl_random_draws = 3  # seeded activity-matched random sets; 0: no control
    # Feature browser (analysis/browser.html): latents whose contexts it keeps (the alive
    # ones, most exclusive first; every latent is listed), contexts per latent, and promoted
    # tokens per model (decoder row through the final-norm gain and the unembedding).
    c.analysis.browser_latents = 2048
    c.analysis.browser_examples = 5
    c.analysis.browser_promoted = 10  # 0: none (with splice_docs 0, the pair is not loaded)

    # --- Latent selection (xcoder_jax.selection: steering's and the ablation's rules) -----
    c.selection = ConfigDict()
    # Latents are scored at this offset from the marker's first token
    # (lexicon.marker_read_rows): -1 is the "predict" anchor, the token whose output predicts
    # the marker, where steering acts and the ablation measures; 0 the marker's first token.
    # The analysis reads the marker's last token instead ("read").
    c.selection.fire_offset = -1
    # Specificity: control rows per preceding token (a seeded subsample of frequent tokens).
    c.selection.max_controls = 2000
    # Attribution: training documents whose marker log-probabilities are differentiated.
    c.selection.n_docs = 256
    c.selection.batch_size = 64  # documents per forward and backward pass
    c.selection.seed = c.get_ref("seed")  # the control subsample

    # --- Steering (decoder rows added at block L during generation) --------------------
    c.steering = ConfigDict()
    # Latent sets, each steered on its own: "<category>:<k>" = the k latents of the category
    # with NRN > min_nrn most specific to its markers (selection.py; ":attribution" appended
    # ranks by attribution instead), or ids "17" / "17+230".
    c.steering.latents = ("self_reflection:1", "deductive:1", "self_reflection:1:attribution")
    c.steering.min_nrn = 0.5  # distilled-leaning; analysis.distilled_only_min: distilled-only
    c.steering.models = ("distilled",)  # roles steered, each with its own decoder rows
    # What alpha multiplies (steering.hooks.CONVENTIONS): "norm", the model's mean activation
    # norm at block L (sqrt(d) / scale) times each latent's unit decoder row, summed over the
    # set; "raw" (the paper's), the latents' exported decoder rows in raw units, summed.
    c.steering.convention = "norm"
    # 0 is the clean model, always run: each steered alpha is paired with it. Every other
    # alpha costs 1 + 2 x n_control_draws generations per set, so the demo steers at the two
    # ends only (the stage takes ~1.5 minutes on 2 CPU cores); add -0.2, 0.2 for a dose curve.
    c.steering.alphas = (-0.4, 0.0, 0.4)
    c.steering.prompts = ""  # JSONL of {"prompt", optional "answer"}; "": the zoo's held-out set
    c.steering.n_prompts = 50  # -1: all
    c.steering.samples = 4  # seeded samples per prompt and condition
    c.steering.temperature = 0.8  # 0: greedy
    # The clean model's cap; it is sampled first with it, then every condition of a model
    # (the clean one again if any of its samples hit max_new_tokens) with max(max_new_tokens,
    # ceil(cap_factor x the clean mean tokens)): a cap near the clean length would censor
    # exactly the length increases steering is meant to show. Samples that still hit it are
    # recorded as truncated.
    c.steering.max_new_tokens = 192
    c.steering.cap_factor = 4.0
    # Controls at every alpha != 0, on the same prompts and seeds (steering.controls): a
    # random direction of the steered vector's norm and a random latent matched on NRN and
    # firing frequency. A large push costs accuracy whatever it encodes; only the difference
    # from these says what the latent does. Draws of each control per set (more: a steadier
    # control, one more generation per draw and alpha).
    c.steering.n_control_draws = 1
    # The matched latent is drawn among this many alive latents nearest to each steered one
    # in (NRN, log10 firing frequency): close enough to match, many enough to be random.
    c.steering.match_pool = 10
    c.steering.batch_size = 100  # rows decoded together (left-padded)
    c.steering.stop = "Question:"  # text is cut where this begins ("": keep all)
    c.steering.seed = c.get_ref("seed")  # sampling seeds follow the run's seed

    # --- Ablation (marker logits with category latents removed at block L) -------------
    c.ablation = ConfigDict()
    c.ablation.categories = CATEGORY_NAMES  # every category of the lexicon
    # Rules that choose the targeted latents on the training shards (c.selection):
    # "specificity" (firing before the markers against the same token elsewhere; the declared
    # headline rule) and "attribution" (gradient x activation of the markers' log-probability).
    c.ablation.rules = ("specificity", "attribution")
    # Top share of the latents that pass a rule with NRN > min_nrn, best first: a dose-response.
    c.ablation.fracs = (0.5, 0.2, 0.1)
    c.ablation.headline_frac = 0.1  # the paper's fraction; the declared test of each category
    c.ablation.min_nrn = 0.5  # latents with NRN above this are ablated (the paper's)
    # Random sets at these multiples of the targeted set's activity: the dose-response the
    # random effect at matched activity is read off.
    c.ablation.dose_levels = (0.5, 1.0, 2.0)
    # Seeded draws per dose level and of random directions, resampled in the CIs.
    c.ablation.n_random = 10
    c.ablation.n_docs = 256  # held-out documents whose marker log-probabilities are measured
    c.ablation.batch_size = 64  # documents per forward pass
    # Half-step KL (analysis/kl.py) of each category's headline set on the first of the
    # measured documents: the share of KL(distilled || base continued in the distilled model)
    # it closes, against analysis.kl_random_draws activity-matched random sets of its size.
    c.ablation.kl_docs = 32  # 0 skips it
    c.ablation.seed = c.get_ref("seed")  # random control draws and bootstrap

    if topk:
        config_util.batchtopk(c, k=c.crosscoder.k, loss=topk)
    return config_util.runlocal(c) if local else c
