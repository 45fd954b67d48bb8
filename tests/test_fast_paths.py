"""The step's fast pieces equal what they replace: BatchTopK's selection (`flat_top_k` vs
`lax.top_k`), the GEMMs' weight gradients (`gemm.matmul` vs `jnp.dot`), the pair decode's
gradient (`pairs.sparse_decode` vs autodiff); and the tools that found them: the profile's
attribution (`bench._xla_profile`) and the huge-pages restart (`huge_pages`)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import _xla_profile as xla_profile
from xcoder_jax import gemm, huge_pages
from xcoder_jax.losses import flat_topk
from xcoder_jax.losses.pairs import sparse_decode


def _values(kind: str, shape=(256, 1024), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: the order among equal entries matters
        return rng.integers(0, 20, size=shape).astype(np.float32)
    v = rng.normal(size=shape).astype(np.float32)
    if kind == "mostly zero":  # fewer positive entries than n: the fallback's case
        return np.maximum(v - 3.0, 0.0)
    if kind == "skewed":  # 1000 large entries, all where the strided sample looks: t is
        v = np.abs(v) * 0.01  # too high, fewer than n entries reach it
        stride = max(1, v.size // flat_topk.SAMPLE) | 1
        v.reshape(-1)[: 1000 * stride : stride] = 100.0
        return v
    return np.maximum(v, 0.0)


@pytest.mark.parametrize(
    "kind, n",
    [("relu", 2048), ("relu", 8192), ("ties", 2048), ("mostly zero", 2048), ("skewed", 2048)],
)
def test_flat_top_k_is_lax_top_k(kind, n):
    """Same values and the same indices in the same order (ties by lower index), on the
    fast path and on both of its fallbacks."""
    v = jnp.asarray(_values(kind))
    want = jax.jit(lambda v: jax.lax.top_k(v.reshape(-1), n))(v)
    got = jax.jit(lambda v: flat_topk.flat_top_k(v, n))(v)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_flat_top_k_takes_the_fast_path_where_it_should():
    """The cases above are not all fallbacks: with ReLU'd normal entries the candidates
    land within [n, cap], with the skewed ones they do not (counted the way the function
    counts them)."""

    def count(v, n):
        total = v.size
        stride = max(1, total // flat_topk.SAMPLE) | 1
        sample = np.sort(v.reshape(-1)[::stride])[::-1]
        wanted = int(np.ceil(flat_topk.MARGIN * n * sample.size / total))
        return int((v >= sample[wanted - 1]).sum())

    n = 2048
    assert n <= count(_values("relu"), n) <= flat_topk.CAP_FACTOR * n
    assert count(_values("skewed"), n) < n


def _dot_loss(mm, a, w, t):
    return jnp.sum(mm(a, w) * t)


@pytest.mark.parametrize("argnums", [(0, 1), (1,), (0,)])
def test_matmul_equals_dot_in_value_and_gradients(argnums):
    rng = np.random.default_rng(1)
    a, w, t = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(32, 24), (24, 40), (32, 40)])
    plain = lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.float32)  # noqa: E731
    np.testing.assert_allclose(gemm.matmul(a, w), plain(a, w), rtol=1e-5, atol=1e-5)
    want = jax.grad(lambda a, w: _dot_loss(plain, a, w, t), argnums)(a, w)
    got = jax.jit(jax.grad(lambda a, w: _dot_loss(gemm.matmul, a, w, t), argnums))(a, w)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_matmul_weight_gradient_contracts_a_materialised_transpose():
    """The point of `matmul`: no dot in its compiled gradient contracts both operands' first
    axis (the layout XLA's CPU backend runs slowly)."""
    a, w = jnp.ones((16, 8)), jnp.ones((8, 12))
    text = jax.jit(jax.grad(lambda w: gemm.matmul(a, w).sum())).lower(w).compile().as_text()
    dots = [line for line in text.splitlines() if " dot(" in line]
    assert dots
    assert not any(
        "lhs_contracting_dims={0}" in d and "rhs_contracting_dims={0}" in d for d in dots
    )


def test_matmul_bfloat16_inputs_keep_their_dtypes():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 12)), jnp.bfloat16)
    ga, gw = jax.grad(lambda a, w: gemm.matmul(a, w).sum(), (0, 1))(a, w)
    assert gemm.matmul(a, w).dtype == jnp.float32
    assert ga.dtype == gw.dtype == jnp.bfloat16
    # sum over the 16 rows of a, in bfloat16 precision (8 bits of mantissa)
    np.testing.assert_allclose(
        gw.astype(np.float32),
        np.outer(a.astype(np.float32).sum(0), np.ones(12)),
        rtol=2e-2,
        atol=2e-2,
    )


def test_sparse_decode_gradient_equals_autodiff_of_its_formula():
    rng = np.random.default_rng(3)
    n_rows, h, width, k = 6, 10, 7, 25
    f = jnp.asarray(rng.random(k), jnp.float32)
    rows = jnp.asarray(rng.integers(0, n_rows, k), jnp.int32)
    cols = jnp.asarray(rng.integers(0, h, k), jnp.int32)  # repeated latents and rows
    w2 = jnp.asarray(rng.normal(size=(h, width)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(n_rows, width)), jnp.float32)

    def formula(f, w2):
        return jax.ops.segment_sum(f[:, None] * w2[cols], rows, num_segments=n_rows)

    np.testing.assert_allclose(
        sparse_decode(f, rows, cols, w2, n_rows), formula(f, w2), rtol=1e-6, atol=1e-6
    )
    want = jax.grad(lambda f, w2: jnp.sum(formula(f, w2) * t), (0, 1))(f, w2)
    got = jax.grad(lambda f, w2: jnp.sum(sparse_decode(f, rows, cols, w2, n_rows) * t), (0, 1))(
        f, w2
    )
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


# --- bench._xla_profile ------------------------------------------------------------------


def test_profile_attributes_a_compiled_function():
    """The GEMM and the top-k of a real compiled function are found in its HLO and put in
    their categories; every event's share comes from a named operation."""
    x, w = jnp.ones((64, 128)), jnp.ones((128, 512))
    fn = jax.jit(lambda x, w: jax.lax.top_k((x @ w).reshape(-1), 64)[0].sum())
    text = fn.lower(x, w).compile().as_text()
    ops = xla_profile.hlo_ops(text)
    cats = {xla_profile.category(op) for op in ops.values()}
    assert {"GEMMs, forward", "selection (top-k, sort)"} <= cats
    result = xla_profile.profile(lambda: jax.block_until_ready(fn(x, w)), text)
    assert set(result.ops) <= set(ops)
    assert result.categories.get("GEMMs, forward", 0) > 0
    assert 0 < result.in_operations <= result.wall * 1.05


def test_wall_shares_split_overlap_and_skip_parents():
    """Two operations overlapping on two threads share the overlap; a conditional's time
    goes to the operation inside it; an asynchronous one lasts until its end event."""
    ev = [
        {"ph": "X", "name": "a", "ts": 0, "dur": 10, "tid": 1},
        {"ph": "X", "name": "b", "ts": 5, "dur": 10, "tid": 2},  # overlaps a on [5, 10)
        {"ph": "X", "name": "cond", "ts": 20, "dur": 10, "tid": 1},
        {"ph": "X", "name": "inner", "ts": 22, "dur": 6, "tid": 1},
        {"ph": "X", "name": "dot", "ts": 40, "dur": 1, "tid": 1},
        {"ph": "X", "name": "end: dot", "ts": 50, "dur": 0, "tid": 3},
    ]
    shares = xla_profile._wall_shares(ev, {"a", "b", "cond", "inner", "dot"})
    assert shares == pytest.approx({"a": 7.5, "b": 7.5, "cond": 4.0, "inner": 6.0, "dot": 10.0})


# --- huge_pages ---------------------------------------------------------------------------


def test_reexec_adds_the_tunable_once(monkeypatch):
    calls = []
    monkeypatch.setattr(huge_pages, "wanted", lambda: True)
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    huge_pages.reexec()
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == sys.orig_argv
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{huge_pages.TUNABLE}"
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
    huge_pages.reexec()  # already set: no second start
    assert len(calls) == 1


def test_reexec_respects_the_switch(monkeypatch):
    monkeypatch.setenv("XCODER_HUGE_PAGES", "0")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted"))
    assert not huge_pages.wanted()
    huge_pages.reexec()
