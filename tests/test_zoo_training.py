"""The zoo's training schedule (train to a held-out plateau, then anneal), the distillation
criterion, and the negative-control pair's config."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.conftest import micro_zoo_config
from xcoder_jax import control_pair
from xcoder_jax import workdir as wd
from xcoder_jax.zoo.evaluation import distillation_criterion
from xcoder_jax.zoo.trace_reading import reads_as_trace
from xcoder_jax.zoo.training import Schedule, train_causal_lm


def test_schedule_warms_up_holds_then_decays_within_the_cap():
    s = Schedule(max_steps=100, warmup_frac=0.1, decay_frac=0.25)
    assert s.warmup == 10
    assert [s.factor(i, None) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.factor(500, None) == 1.0  # the stable phase lasts until it is ended
    # Ended at step 40: 10 decay steps (40..49), linear down to 10% of the peak at the last.
    assert s.decay_steps(40) == 10
    assert [s.factor(i, 40) for i in (39, 40, 44, 49)] == pytest.approx([1.0, 0.91, 0.55, 0.1])
    # The latest end of the stable phase still leaves room for its decay under the cap.
    for cap, frac in ((100, 0.25), (37, 0.2), (10, 0.5), (601, 0.2)):
        sched = Schedule(max_steps=cap, decay_frac=frac)
        m = sched.max_stable
        assert m + sched.decay_steps(m) <= cap < (m + 1) + sched.decay_steps(m + 1)


def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _cycle_docs(n, length, seed):
    """Documents of a fixed cycle 1..7 from a random phase: learnable to near-zero loss."""
    rng = np.random.default_rng(seed)
    return [((np.arange(length) + rng.integers(7)) % 7 + 1).astype(np.int64) for _ in range(n)]


def test_training_stops_at_the_held_out_plateau_and_a_fixed_run_repeats_its_schedule():
    torch.set_num_threads(1)
    docs, val = _cycle_docs(64, 40, 0), _cycle_docs(8, 40, 1)
    kw = dict(batch_size=8, seq_len=16, lr=3e-2, weight_decay=0.0, seed=0, desc="t")
    sched = Schedule(max_steps=400, warmup_frac=0.02, eval_every=5, patience=2, tol=0.01)
    out = train_causal_lm(_tiny_lm(), docs, schedule=sched, val_docs=val, **kw)
    # A learnable cycle plateaus long before the cap: the run ends at its plateau + decay.
    assert out["converged"] is True and out["stable_steps"] < sched.max_stable
    assert out["steps"] == out["stable_steps"] + sched.decay_steps(out["stable_steps"])
    assert out["final_val_loss"] < 0.2 * out["val_loss"][0][1]
    steps = [s for s, _ in out["val_loss"]]
    assert steps == sorted(steps) and steps[-1] == out["steps"]
    # Given that stable length, a run on other text takes exactly as many steps (the sham).
    fixed = Schedule(max_steps=400, warmup_frac=0.02, stable_steps=out["stable_steps"])
    sham = train_causal_lm(_tiny_lm(), _cycle_docs(64, 40, 2), schedule=fixed, **kw)
    assert sham["steps"] == out["steps"] and sham["converged"] is None
    # Never a plateau (a cap too small to see one): the run stops at the cap, not converged.
    short = Schedule(max_steps=12, warmup_frac=0.1, eval_every=5, patience=50)
    capped = train_causal_lm(_tiny_lm(), docs, schedule=short, val_docs=val, **kw)
    assert capped["converged"] is False and capped["steps"] <= 12
    with pytest.raises(ValueError, match="held-out"):
        train_causal_lm(_tiny_lm(), docs, schedule=short, **kw)


def test_the_distillation_criterion_needs_both_rates():
    trace = (
        " Let me think. 3 + 4 = 7. Wait, let me check: 7 - 4 = 3. Therefore, it is 7."
        " The answer is 7."
    )
    assert reads_as_trace(trace)
    assert not reads_as_trace(" 3 + 4 = 7. The answer is 7.")  # concise: no reasoning move
    assert not reads_as_trace(" 3 + 4 = 7. Wait, let me check: 7 - 4 = 3.")  # no final line
    ok = distillation_criterion({"marker_rate": 0.9, "trace_format_rate": 0.85}, 0.8)
    assert ok == {"min_rate": 0.8, "marker_rate": 0.9, "trace_format_rate": 0.85, "met": True}
    assert not distillation_criterion({"marker_rate": 0.95, "trace_format_rate": 0.5}, 0.8)["met"]
    assert not distillation_criterion({"marker_rate": 0.5, "trace_format_rate": 0.95}, 0.8)["met"]


def test_the_no_loop_pair_reads_the_zoo_documents_with_the_main_base(tmp_path):
    config = micro_zoo_config()
    assert control_pair.applies(config)
    c = control_pair.config_for(config, str(tmp_path))
    root = os.path.abspath(str(tmp_path))
    assert c.models.base == wd.model_dir(root, "base")
    assert c.models.distilled == wd.model_dir(root, "no_loop")
    src = c.data.sources[0]
    assert (src.kind, src.path) == ("jsonl", os.path.join(wd.zoo_data_dir(root), "extract.jsonl"))
    assert c.steering.prompts == os.path.join(wd.zoo_data_dir(root), "heldout.jsonl")
    assert c.export.formats == () and config.export.formats != ()  # the original is untouched
    # Everything else is the run's own.
    assert c.steering.latents == ("self_reflection:1", "deductive:1")
    for section in ("crosscoder", "train", "selection", "analysis"):
        a, b = config[section].to_dict(), c[section].to_dict()
        assert {k: v for k, v in a.items() if k != "prompts"} == {
            k: v for k, v in b.items() if k != "prompts"
        }, section
    for off in (dict(control_teacher=""), dict(random_pair=True)):
        assert not control_pair.applies(micro_zoo_config(**off))
    real = micro_zoo_config()
    real.models.base, real.models.distilled = "/m/base", "/m/distilled"
    assert not control_pair.applies(real)
