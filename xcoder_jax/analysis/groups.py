"""The classes of a Matryoshka crosscoder's latents group by group.

Matryoshka training splits the latents into consecutive groups, each prefix of which must
reconstruct on its own (`losses.matryoshka`), so the first groups hold the most general
latents. Per group: how many of its latents are base-only, shared, distilled-only or dead,
and their shares of the group (`group_classes`, summary.json's "groups"), and the report's
table of them (`groups_html`).
"""

from __future__ import annotations

import html

import numpy as np

from xcoder_jax.nrn import CLASSES


def group_classes(sizes, classes: np.ndarray) -> list[dict]:
    """Per group of `sizes` (consecutive latents): {"latents": [lo, hi) , "counts": {class:
    n}, "shares": {class: n / group size}} from the class index per latent [h]
    (`nrn.classify`, dead included)."""
    out, lo = [], 0
    for size in sizes:
        part = np.asarray(classes[lo : lo + size])
        counts = {name: int((part == k).sum()) for k, name in enumerate(CLASSES)}
        shares = {name: n / max(len(part), 1) for name, n in counts.items()}
        out.append({"latents": [lo, lo + len(part)], "counts": counts, "shares": shares})
        lo += size
    return out


def group_summary(sizes, classes: np.ndarray) -> dict:
    """summary.json's {"groups": [...]} (`group_classes`) for an export with latent groups;
    {} for one without (None)."""
    return {} if sizes is None else {"groups": group_classes(sizes, classes)}


def groups_html(summary: dict) -> str:
    """The report's table of the latent groups' classes ("" without groups)."""
    groups = summary.get("groups")
    if not groups:
        return ""
    cell = lambda g, k: f"{g['counts'][k]} ({g['shares'][k]:.1%})"
    rows = "".join(
        f"<tr><td>{i}</td><td>{g['latents'][0]}–{g['latents'][1] - 1}</td>"
        + "".join(f"<td class='n'>{cell(g, k)}</td>" for k in CLASSES)
        + "</tr>"
        for i, g in enumerate(groups)
    )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("group", "latents", *CLASSES))
    return (
        "<h2>Matryoshka groups</h2><p>The classes of each nested group of latents (the "
        "prefix of groups 0..g reconstructs on its own: the first groups hold the most "
        f"general latents).</p><table><tr>{head}</tr>{rows}</table>"
    )
