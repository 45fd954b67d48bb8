"""One validation pass over a config, before any stage computes: `check(config)`.

Every field a run reads has its accepted values in `config_rules.RULES`; the cross-field
constraints are here (`_relations`, and the zoo's and geometry's structural checks, which live
with their stages). A config that breaks any of them raises one ConfigError naming each field,
its value and what it accepts, so the launch scripts print one `error:` line and write
nothing. Fields a config does not have are not checked (configs from older versions).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from xcoder_jax.config_rules import RULES
from xcoder_jax.errors import ConfigError
from xcoder_jax.params import lookup


def _relations(config) -> list[str]:
    """Constraints between fields, as messages (empty when all hold)."""
    out = []
    has = lambda path: lookup(config, path)[0]
    val = lambda path: lookup(config, path)[1]
    if has("crosscoder.k") and has("crosscoder.n_latents") and val("crosscoder.loss") != "l1":
        if val("crosscoder.k") > val("crosscoder.n_latents"):
            out.append(
                f"crosscoder.k = {val('crosscoder.k')}: must be <= crosscoder.n_latents "
                f"({val('crosscoder.n_latents')})"
            )
    if val("crosscoder.loss") == "matryoshka" and has("crosscoder.n_latents"):
        fractions, h = tuple(val("crosscoder.group_fractions") or ()), val("crosscoder.n_latents")
        if len(fractions) > h:  # Matryoshka: every group holds at least one latent
            out.append(
                f"crosscoder.group_fractions = {fractions}: must have at most "
                f"crosscoder.n_latents ({h}) groups, not {len(fractions)}"
            )
    anneal = val("crosscoder.k_anneal_steps") if has("crosscoder.k_anneal_steps") else 0
    if anneal > 0 and has("train.steps") and val("crosscoder.loss") != "l1":
        if anneal >= val("train.steps"):  # k would never fall to crosscoder.k
            out.append(
                f"crosscoder.k_anneal_steps = {anneal}: must be < train.steps "
                f"({val('train.steps')}) so that k reaches crosscoder.k (0: no annealing)"
            )
    if has("crosscoder.exclusive") and any(val("crosscoder.exclusive")):
        if val("crosscoder.n_models") != 2:
            out.append(
                f"crosscoder.exclusive = {tuple(val('crosscoder.exclusive'))}: dedicated latents "
                f"need crosscoder.n_models = 2 (base, distilled), not {val('crosscoder.n_models')}"
            )
        if has("crosscoder.n_latents"):
            out.extend(_exclusive_counts(val("crosscoder.exclusive"), val("crosscoder.n_latents")))
    if has("analysis.base_only_max") and has("analysis.distilled_only_min"):
        if val("analysis.base_only_max") >= val("analysis.distilled_only_min"):
            out.append(
                f"analysis.base_only_max = {val('analysis.base_only_max')}: must be below "
                f"analysis.distilled_only_min ({val('analysis.distilled_only_min')})"
            )
    if has("ablation.headline_frac") and has("ablation.fracs"):
        if val("ablation.headline_frac") not in tuple(val("ablation.fracs")):
            out.append(
                f"ablation.headline_frac = {val('ablation.headline_frac')}: must be one of "
                f"ablation.fracs {tuple(val('ablation.fracs'))}"
            )
    if has("steering.alphas") and 0 not in tuple(val("steering.alphas") or ()):
        out.append("steering.alphas: must include 0 (the clean model each alpha is paired with)")
    return out


def _exclusive_counts(fractions, h: int) -> list[str]:
    """The dedicated latents' counts (`exclusive.counts`) of the shares `fractions` of `h`
    latents: every nonzero share makes at least one latent, and one shared latent remains."""
    from xcoder_jax import exclusive

    fractions, out = tuple(fractions), []
    n = exclusive.counts(fractions, h)
    for side, f, count in zip(exclusive.SIDES, fractions, n):
        if f > 0 and count == 0:
            out.append(
                f"crosscoder.exclusive = {fractions}: the {side} share {f} of crosscoder.n_latents "
                f"({h}) rounds to 0 latents (a share of 1/{h} or more makes at least 1)"
            )
    if sum(n) >= h:
        out.append(
            f"crosscoder.exclusive = {fractions}: {n[0]} base-only + {n[1]} distilled-only of "
            f"crosscoder.n_latents ({h}) leave no shared latent (at least 1 must remain)"
        )
    return out


def problems(config) -> list[str]:
    """Every field of `config` outside what it accepts, as `field = value: must be ...`."""
    out = []
    for path, rule in RULES.items():
        found, value = lookup(config, path)
        if found and not rule.ok(value):
            out.append(f"{path} = {value!r}: must be {rule.accepted}")
    if out:  # cross-field checks assume each field is valid on its own
        return out
    out = _relations(config)
    for section, check in _STRUCTURAL.items():
        if not out and section in config and _uses(config, section):
            try:
                check()(config[section])
            except ConfigError as e:
                out.append(str(e))
    return out


def _zoo_check():
    from xcoder_jax.zoo.build_config import check_config

    return check_config


def _geometry_check():
    from xcoder_jax.geometry.results_key import check_config

    return check_config


_STRUCTURAL = {"zoo": _zoo_check, "geometry": _geometry_check}


def _uses(config, section: str) -> bool:
    """Whether the run uses a section checked structurally (the zoo only with zoo models)."""
    if section != "zoo":
        return True
    models = config.get("models")
    return models is not None and "zoo" in (models.get("base"), models.get("distilled"))


def check(config) -> None:
    """Raises one ConfigError listing every problem of `config` (nothing when it is valid)."""
    found = problems(config)
    if found:
        raise ConfigError("; ".join(found))


def suggest(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'steps'?)' for the closest option to a mistyped name, else ''."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
