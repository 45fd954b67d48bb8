"""Your own model pair: a base model and its distilled (or fine-tuned) variant, given by local
save_pretrained directories or hub ids, with the paper's crosscoder recipe.

    python launch/pipeline.py --config=configs/pair.py --workdir=runs/mypair \\
        --config.models.base=/path/to/base --config.models.distilled=/path/to/distilled \\
        "--config.data.sources[0].path=corpus.jsonl" \\
        --config.steering.prompts=prompts.jsonl \\
        --config.geometry.relation_files='("antonym.json",)'

Fields to set (the README's "Your own model pair" shows each file's format; the walkthrough
there runs stage by stage):

- models.base, models.distilled: paths or hub ids (required). The pair must share a tokenizer
  and be Qwen2/Llama-family causal LMs (`model.model.layers`, see xcoder_jax/site.py).
- data.sources[0].path: a JSONL file (or glob) of {"text": ...} documents; set its `format`
  to "reasoning" ({"question", "trace"}) or "conversations" for chat records, or replace the
  list with other sources (configs/tiny.py SOURCE_DEFAULTS: kinds jsonl, text, hf).
- steering.prompts: a JSONL file of {"prompt", optional "answer"} (the steering stage stops
  with an error without one).
- geometry.relation_files: Todd et al. (2023) function-vector files, JSON lists of
  {"input", "output"} (the geometry stage is skipped without any; the zoo's relations apply
  only to the zoo).

Everything else is the paper's recipe (configs/paper.py): block L = n_layers // 2 (the
paper's 14 of 28 and 24 of 48), 32768 latents, lambda 2, Adam 5e-5, batch 1024, 400M
tokens, documents truncated to 2048 tokens, bf16 model and crosscoder compute (fp32 master
weights); d_model is read from the activation store. On a CPU add
`--config.models.torch_dtype=float32 --config.crosscoder.dtype=float32`. Arguments after a
colon, as for the other configs: `runlocal` (configs/pair.py:runlocal) shrinks every stage to
a smoke run (xcoder_jax.config_util.runlocal) and `batchtopk` trains BatchTopK (k = 100)
instead of the paper's L1 (`matryoshka`: Matryoshka BatchTopK, the same k).
"""

from ml_collections import ConfigDict

from xcoder_jax import config_util

# Config files are loaded by path, not as a package: paper.py (and through it tiny.py) is
# read from next to this file.
paper = config_util.load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None) -> ConfigDict:
    arg, topk = config_util.loss_variant(arg)  # `batchtopk`, `matryoshka`: that loss, not L1
    _, local = config_util.parse_arg(arg, "configs/pair.py")
    # The paper's recipe; the 1.5b pair's fields other than its models, block and d_model
    # are the same at every size.
    c = paper.get_config("1.5b")

    # --- The pair: required, no zoo ------------------------------------------------------
    # Unset: the config check refuses an empty model (one error line, before any work).
    c.models.base = c.models.distilled = ""
    c.extract.layer = -1  # n_layers // 2 of the pair
    # d_model from the store (0: no check). The field shares one reference with
    # zoo.main_size (configs/tiny.py), so it is replaced rather than set.
    del c.crosscoder["d_model"]
    c.crosscoder.d_model = 0
    # Shares of the latents dedicated to one model, (base-only, distilled-only): none.
    c.crosscoder.exclusive = (0.0, 0.0)
    # Matryoshka: the latent groups' shares of n_latents, as configs/tiny.py.
    c.crosscoder.group_fractions = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
    # The dense L1 step throughout; "auto" turns it sparse once the logged L0 falls below
    # l1_sparse.SPARSE_MAX_DENSITY of the latents, as configs/paper.py does (the same result,
    # faster at a low L0).
    c.crosscoder.l1_path = "dense"

    # --- Text: one JSONL file of {"text": ...} documents ---------------------------------
    source = ConfigDict(dict(paper.tiny.SOURCE_DEFAULTS))
    source.update(kind="jsonl", format="plain")
    c.data.sources = [source]
    c.data.min_tokens = 0  # keep short documents (the paper dropped those under 2048 tokens)
    c.data.max_tokens = 2048

    # --- Steering prompts and relation files: the zoo's exist only for the zoo -----------
    c.steering.prompts = ""  # JSONL of {"prompt", optional "answer"}; required to steer
    c.geometry.zoo_relations = False
    c.geometry.relation_files = ()  # Todd et al. JSON lists of {"input", "output"}

    if topk:  # the paper config's k; AuxK keeps configs/tiny.py's 256 (d_model is not known
        # here; --config.crosscoder.aux_k=<d_model / 2> matches configs/paper.py)
        config_util.batchtopk(c, k=100, loss=topk)
    return config_util.runlocal(c) if local else c
