"""The README's "Your own model pair" walkthrough, run as written on the micro pair.

The fenced bash block after the README's `<!-- own-pair walkthrough -->` marker is executed
with its model paths pointed at the suite's random micro pair (tests/conftest.py), its files
(corpus, prompts, relations) written into a temporary directory, and `runlocal` plus a few
overrides to keep it short. The models are random, so the checks are on structure and on
values that do not depend on what the crosscoder learned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from xcoder_jax import config_check
from xcoder_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- own-pair walkthrough -->"
PYTHON = ".venv/bin/python"
# Shrinking overrides on top of `runlocal` (config_util.RUNLOCAL_CAPS): CPU dtypes, one steered
# set, one ablated category and rule, short generations.
SHRINK = (
    "--config.models.torch_dtype=float32",
    "--config.crosscoder.dtype=float32",
    "--config.train.steps=20",
    "--config.analysis.splice_docs=4",
    "--config.steering.latents=('self_reflection:1',)",
    "--config.steering.max_new_tokens=12",
    "--config.ablation.categories=('self_reflection',)",
    "--config.ablation.rules=('specificity',)",
    "--config.geometry.n_components=(2,)",
)
PROMPTS = [
    {"prompt": "Question: Tom has 3 apples and buys 4 more. How many now?\nAnswer:", "answer": "7"},
    {"prompt": "Question: Tom has 6 apples and buys 2 more. How many now?\nAnswer:"},
]


def walkthrough() -> str:
    """The bash block that follows the marker in README.md."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, f"README.md needs exactly one {MARKER}"
    m = re.match(r"\s*```bash\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert m, f"no ```bash block right after {MARKER}"
    return m.group(1)


def substitute(script: str, pattern: str, new: str) -> str:
    """`script` with the one match of `pattern` (a regex, multiline) replaced by `new`."""
    out, n = re.subn(pattern, lambda _: new, script, flags=re.M)
    assert n >= 1, f"the walkthrough no longer matches {pattern!r}"
    return out


def single_token_words(model_dir: str, n: int) -> list[str]:
    """`n` words the micro tokenizer reads as one token with nothing around them (the
    config's geometry template is the bare word), so every relation pair is kept."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = sorted(
        w
        for w in tok.get_vocab()
        if w.isalpha() and w.isascii() and len(w) >= 2 and len(tok.encode(w)) == 1
    )
    assert len(words) >= n, words
    return words[:n]


def run(cmd: list[str] | str, cwd: Path, timeout: int, shell: bool = False):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", cmd] if shell else cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_walkthrough_runs_on_the_micro_pair(micro_pair, tmp_path):
    script = walkthrough()
    # The files the walkthrough names, in the formats the README gives, where it runs.
    for name in ("corpus.jsonl", "prompts.jsonl", "antonym.json"):
        assert name in script, name
    shutil.copy(micro_pair["corpus"], tmp_path / "corpus.jsonl")  # {"text": ...} per line
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    words = single_token_words(micro_pair["base"], 6)
    relation = [{"input": a, "output": b} for a, b in zip(words[::2], words[1::2])]
    (tmp_path / "antonym.json").write_text(json.dumps(relation))

    workdir = tmp_path / "run"
    script = substitute(script, r"^BASE=\S*", f"BASE={micro_pair['base']}")
    script = substitute(script, r"^DISTILLED=\S*", f"DISTILLED={micro_pair['distilled']}")
    script = substitute(script, r"^WORKDIR=\S*", f"WORKDIR={workdir}")
    script = substitute(
        script, r"--config=configs/pair\.py\b", f"--config={ROOT}/configs/pair.py:runlocal"
    )
    launch = f"{sys.executable} {ROOT}/launch/"
    script = substitute(script, rf"^{re.escape(PYTHON)} launch/", launch)
    first = script.index(launch)  # the overrides join PAIR before its first use
    shrink = " ".join(f'"{o}"' for o in SHRINK)
    script = f"{script[:first]}PAIR+=({shrink})\n{script[first:]}"
    stages = re.findall(rf"^{re.escape(launch)}(\w+)\.py", script, re.M)
    assert stages and stages[-1] == "pipeline", stages

    done = run(script, tmp_path, timeout=600, shell=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The export: the micro pair's d_model, both models, the latents runlocal keeps.
    hidden = json.loads(Path(micro_pair["base"], "config.json").read_text())["hidden_size"]
    export = json.loads((workdir / "export" / "config.json").read_text())
    assert export["d_model"] == hidden
    with safe_open(str(workdir / "export" / "crosscoder.safetensors"), "np") as f:
        assert f.get_slice("W_dec").get_shape() == [export["n_latents"], 2, hidden]
    assert export["n_latents"] == 256  # config_util.RUNLOCAL_CAPS

    # The analysis: every latent in exactly one class.
    summary = json.loads((workdir / "analysis" / "summary.json").read_text())
    classes = ("base_only", "shared", "distilled_only", "dead")
    assert summary["n_latents"] == export["n_latents"]
    assert sum(summary.get(f"n_{k}", 0) for k in classes) == summary["n_latents"]
    assert summary["d_model"] == hidden

    # Steering read the walkthrough's prompts file, every prompt of it.
    steering = json.loads((workdir / "steering" / "results.json").read_text())
    assert Path(tmp_path, steering["prompts"]).resolve() == (tmp_path / "prompts.jsonl").resolve()
    assert steering["n_prompts"] == len(PROMPTS)
    samples = [json.loads(line) for line in (workdir / "steering" / "samples.jsonl").open()]
    assert {s["prompt_id"] for s in samples} == set(range(len(PROMPTS)))

    # Geometry studied the relation file, named by its stem, on the configured pair only.
    geometry = json.loads((workdir / "geometry" / "results.json").read_text())
    assert list(geometry["pairs"]) == ["main"]
    antonym = geometry["pairs"]["main"]["relations"]["antonym"]
    assert antonym["total"] == antonym["kept"] == len(relation)

    # A real pair has no zoo and no no-loop pair; every stage is in the pipeline's summary.
    assert not (workdir / "models").exists() and not (workdir / "no_loop").exists()
    for stage in ("extract", "train", "analyze", "steer", "ablate", "geometry"):
        assert re.search(rf"^\s+{stage}\s", done.stdout, re.M), stage


def test_pair_config_without_models_is_one_error_line(tmp_path):
    done = run(
        [sys.executable, str(ROOT / "launch" / "pipeline.py"),
         f"--config={ROOT}/configs/pair.py", f"--workdir={tmp_path / 'run'}"],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "error: models.base = '': must be 'zoo', a model directory or hub id; "
        "models.distilled = '': must be 'zoo', a model directory or hub id"
    ], done.stderr


def test_pair_config_refuses_an_unset_model_and_takes_the_usual_words():
    from xcoder_jax import config_util

    pair = config_util.load_sibling(str(ROOT / "configs" / "tiny.py"), "pair.py")
    c = pair.get_config()
    with pytest.raises(ConfigError, match=r"^models\.base = '': must be 'zoo', a model"):
        config_check.check(c)
    c.models.base, c.models.distilled = "/models/base", "org/distilled"
    assert "zoo" not in (c.models.base, c.models.distilled)
    assert c.crosscoder.d_model == 0 and c.extract.layer == -1  # both read from the pair
    assert (c.geometry.zoo_relations, c.geometry.relation_files, c.steering.prompts) == (
        False,
        (),
        "",
    )
    assert c.data.sources[0].kind == "jsonl"
    local = pair.get_config("runlocal,batchtopk")
    assert local.crosscoder.loss == "batchtopk" and local.crosscoder.k == 100
    assert local.train.steps == config_util.RUNLOCAL_CAPS["train.steps"]
    with pytest.raises(ConfigError, match="configs/pair.py takes no argument but 'runlocal'"):
        pair.get_config("1.5b")
