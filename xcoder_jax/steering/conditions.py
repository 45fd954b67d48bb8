"""The conditions of the steering sweep, generated and scored (see `sweep` for the design).

`Generator` samples one condition (a steering vector added at block L of one model) and
scores its samples; `clean_condition` samples a model's clean condition and sets the
generation cap every condition of that model shares; `set_conditions` samples a latent set
at every alpha with its random controls and pairs each with the clean condition.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from xcoder_jax.steering import controls as ctl
from xcoder_jax.steering import stats
from xcoder_jax.steering.generation import check_lengths, sample
from xcoder_jax.steering.hooks import add_at_site


class Generator:
    """Samples and scores conditions of one run; `lines` collects every sample's line of
    samples.jsonl in the order generated.

    sc: the `steering` config section; rows: the prompts ({"prompt", "answer"}); bar: a
    progress bar told of every condition generated.
    """

    def __init__(self, sc, *, xcoder, models, roles, tokenizer, rows, bar):
        self.sc, self.xcoder, self.models, self.roles = sc, xcoder, models, roles
        self.tokenizer, self.rows, self.bar = tokenizer, rows, bar
        self.prompts = [r["prompt"] for r in rows]
        self.with_accuracy = all(r["answer"] is not None for r in rows)
        self.lines: list[dict] = []
        # Two specs may pick the same latents (e.g. both rules' top latent): the same vector
        # and seeds draw the same samples, so they are generated once.
        self._steered: dict = {}

    def run(self, role: str, spec: str, kind: str, *, alpha: float, vector, cap: int, draw=None):
        """Generates one condition: ({metric: {prompt id: mean over its samples}}, lines)."""
        m = self.roles.index(role)
        with add_at_site(self.models[m], self.xcoder.layer, vector):
            outs = sample(self.models[m], self.tokenizer, self.prompts, self.sc, max_new_tokens=cap)
        self.bar.update(1)
        samples, out = [], []
        for i, s, text, n, cut in outs:
            answer = self.rows[i]["answer"] if self.with_accuracy else None
            metrics = stats.text_metrics(text, n, answer, cut)
            samples.append({"prompt_id": i, "metrics": metrics})
            out.append({"model": role, "set": spec, "condition": kind, "draw": draw}
                       | {"alpha": alpha, "prompt_id": i, "sample": s}
                       | {"text": text, "metrics": metrics})  # fmt: skip
        return stats.per_prompt(samples), out

    def steered(self, role: str, spec: str, ids, *, alpha: float, vector, cap: int):
        """`run` of a latent set's steered condition, once per (model, latents, alpha)."""
        key = (role, tuple(ids), alpha)
        if key in self._steered:
            means, out = self._steered[key]
            self.bar.update(1)
            return means, [line | {"set": spec} for line in out]
        self._steered[key] = self.run(role, spec, "steered", alpha=alpha, vector=vector, cap=cap)
        return self._steered[key]


def clean_condition(gen: Generator, role: str) -> tuple[dict, dict, int]:
    """The clean condition of model `role` at the shared cap: (its per-prompt means, the
    generation record of results.json, the cap). Its lines go to `gen.lines`."""
    sc = gen.sc
    zero = torch.zeros(gen.xcoder.d_model)
    clean, clean_lines = gen.run(
        role, "clean", "clean", alpha=0.0, vector=zero, cap=sc.max_new_tokens
    )
    mean = stats.share(clean, "tokens")
    cap = max(int(sc.max_new_tokens), math.ceil(float(sc.cap_factor) * mean))
    record = {
        "max_new_tokens": int(sc.max_new_tokens),
        "cap_factor": float(sc.cap_factor),
        "clean_mean_tokens_at_max_new_tokens": round(mean, 2),
        "clean_truncated_at_max_new_tokens": stats.share(clean),
        "cap": cap,
    }
    why = f"steering.cap_factor (cap {cap} = ceil({sc.cap_factor} x {mean:.1f}))"
    model = gen.models[gen.roles.index(role)]
    check_lengths(gen.tokenizer, model, gen.prompts, cap, why=why)
    # Every condition of the model shares one cap. Where no clean sample hit max_new_tokens,
    # sampling again with the same seeds and a larger cap draws the very same samples (each
    # ended before), so they already are the clean condition at the cap.
    resample = cap > sc.max_new_tokens and stats.share(clean) > 0
    record["clean_resampled_at_cap"] = resample
    if resample:
        gen.bar.total += 1
        clean, clean_lines = gen.run(role, "clean", "clean", alpha=0.0, vector=zero, cap=cap)
    gen.lines += clean_lines
    return clean, record, cap


def plan_controls(sc, xcoder, role: str, spec: str, *, ids, nrn, freq) -> dict:
    """The set's control draws (the same at every alpha): random unit directions and matched
    random latents, with what results record of them."""
    draws = range(int(sc.n_control_draws))
    seed = lambda kind, j: ctl.draw_seed(sc.seed, kind, role, spec, draw=j)
    units = [ctl.random_unit(xcoder.d_model, seed("direction", j)) for j in draws]
    info = lambda lat: (
        {"latents": lat, "nrn": [round(float(nrn[i]), 4) for i in lat]}
        | {"firing_freq": [float(freq[i]) for i in lat]}
    )
    record = info(list(ids)) | {
        "random_direction": {"method": ctl.RANDOM_DIRECTION, "draws": len(units)},
        "random_latent": {"method": ctl.RANDOM_LATENT, "match_pool": int(sc.match_pool)},
    }
    latents, reason = [], None
    try:
        for j in draws:
            rng = np.random.default_rng(seed("latent", j))
            latents.append(ctl.match_latents(ids, nrn, freq, pool=sc.match_pool, rng=rng))
    except ValueError as e:
        latents, reason = [], str(e)
    record["random_latent"] |= {"draws": [info(lat) for lat in latents], "reason": reason}
    return {"units": units, "latents": latents, "record": record}


def set_conditions(gen: Generator, role: str, spec: str, ids, *, plan, clean, cap, alphas):
    """The conditions of latent set `ids` (spec `spec`) in model `role` at every alpha, each
    paired with the clean condition and, at alpha != 0, with its controls (`plan`, from
    `plan_controls`). Their lines go to `gen.lines`."""
    sc, xcoder = gen.sc, gen.xcoder
    m = gen.roles.index(role)
    base = {"model": role, "set": spec, "latents": ids, "cap": cap}
    base |= {k: plan["record"][k] for k in ("nrn", "firing_freq")}
    conditions = []
    for alpha in alphas:
        if alpha == 0:
            conditions.append(base | {"alpha": 0.0} | stats.condition(clean, clean, 0.0))
            continue
        v = xcoder.steering_vector(ids, m, alpha, sc.convention)
        means, out = gen.steered(role, spec, ids, alpha=alpha, vector=v, cap=cap)
        gen.lines += out
        draws = {"random_direction": [], "random_latent": []}
        for j, u in enumerate(plan["units"]):
            vec = ctl.rescaled(u, v, alpha)
            draws["random_direction"].append(
                gen.run(role, spec, "random_direction", alpha=alpha, vector=vec, cap=cap, draw=j)
            )
        for j, lat in enumerate(plan["latents"]):
            vec = ctl.rescaled(xcoder.steering_vector(lat, m, alpha, sc.convention), v)
            draws["random_latent"].append(
                gen.run(role, spec, "random_latent", alpha=alpha, vector=vec, cap=cap, draw=j)
            )
        ctrl = {}
        for kind, got in draws.items():
            gen.lines += [line for _, out in got for line in out]
            ctrl[kind] = stats.mean_over_draws([mm for mm, _ in got]) or None
        conditions.append(
            base | {"alpha": alpha, "vector_norm": round(float(v.norm()), 6)}
            | stats.condition(means, clean, alpha, ctrl)
        )  # fmt: skip
    return conditions
