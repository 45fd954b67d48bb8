"""Where a jitted computation's time goes, measured inside it: the XLA profiler's events of
one run attributed to the instructions of the compiled HLO module and grouped by what they
do (GEMMs, selection, gathers, scatter-adds, buffer fills, optimizer, copies, the rest).

Operations that run at the same time on different threads share the wall time they
overlap, and a conditional's time goes to its branch's operations, so the categories add up
to the time some operation was running; the gap to the wall time of the same run is what
the runtime spent between them (dispatch, allocation outside operations, waiting). An
asynchronous operation (a plain `dot` on the CPU) is timed from its start to its "end:"
event.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from dataclasses import dataclass

import jax

# Category rules, first match wins: (name, test on an `HloOp`).
_GEMM = re.compile(r"\b(dot|convolution)\(")
CATEGORIES = (
    ("GEMMs, forward", lambda op: bool(_GEMM.search(op.body)) and "transpose(" not in op.op_name),
    ("GEMMs, backward", lambda op: bool(_GEMM.search(op.body))),
    ("selection (top-k, sort)", lambda op: re.search(r"top_?k|sort", op.body + op.op_name, re.I)),
    ("optimizer (clipping, Adam)", lambda op: "optax" in op.source),
    ("scatter-adds", lambda op: " scatter(" in op.body or op.opcode == "scatter"),
    ("gathers", lambda op: " gather(" in op.body or op.opcode == "gather"),
    ("buffer fills (broadcast constants)", lambda op: op.name.startswith("wrapped_broadcast")),
    ("copies and transposes", lambda op: op.opcode in ("copy", "transpose") or "copy" in op.name),
    ("control flow (conditional, loop)", lambda op: op.opcode in ("conditional", "while")),
    ("elementwise and reductions", lambda op: True),
)


@dataclass(frozen=True)
class HloOp:
    """One instruction of the compiled module: its name, opcode, the text of the computation
    it calls (a fusion's body; its own line otherwise), metadata op_name and source file."""

    name: str
    opcode: str
    body: str
    op_name: str
    source: str


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^%?([\w.\-]+) .*\{\s*$")


def hlo_ops(text: str) -> dict[str, HloOp]:
    """The instructions of an HLO module's text (`compiled.as_text()`), by name."""
    frames = _stack_files(text)
    comps, current, lines = {}, None, []
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current, lines = m.group(1), []
            continue
        if current and line.strip() == "}":
            comps[current] = "\n".join(lines)
            current = None
        elif current:
            lines.append(line)
    ops = {}
    for comp_lines in comps.values():
        for line in comp_lines.splitlines():
            m = _INSTR.match(line)
            if not m:
                continue
            name, opcode = m.group(1), m.group(2)
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = comps.get(called.group(1), "") if called else ""
            op_name = re.search(r'op_name="([^"]*)"', line)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            source = frames.get(frame.group(1), "") if frame else ""
            ops[name] = HloOp(
                name, opcode, body + "\n" + line, op_name.group(1) if op_name else "", source
            )
    return ops


def _stack_files(text: str) -> dict[str, str]:
    """stack_frame_id -> the file:line of its frames, innermost first, joined by ';'
    (from the module text's FileNames, FileLocations and StackFrames sections)."""
    sections = collections.defaultdict(dict)
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif not line.strip() or not line[0].isdigit():
            section = None
        elif section:
            key, _, value = line.partition(" ")
            sections[section][key] = value
    files = {k: v.strip('"') for k, v in sections["FileNames"].items()}
    locs = {}
    for k, v in sections["FileLocations"].items():
        name, line = re.search(r"file_name_id=(\d+).*?\bline=(\d+)", v).groups()
        locs[k] = f"{files.get(name, '')}:{line}"
    parents = {}
    for frame, v in sections["StackFrames"].items():
        loc = re.search(r"file_location_id=(\d+)", v).group(1)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        # parent_frame_id p names frame p - 1 (0: none), as the module text prints it.
        parents[frame] = (loc, str(int(parent.group(1)) - 1) if parent else "0")
    out = {}
    for frame in parents:
        chain, f = [], frame
        while f in parents and len(chain) < 64:
            loc, f = parents[f]
            chain.append(locs.get(loc, ""))
        out[frame] = ";".join(chain)
    return out


def _with_async_ends(events: list[dict], names) -> list[dict]:
    """The events of `names`, each lasting until its "end: <name>" event where that comes
    later (an operation that runs asynchronously returns before its work is done)."""
    ends = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"])
    for times in ends.values():
        times.sort()
    out = []
    for e in sorted(
        (e for e in events if e.get("ph") == "X" and e["name"] in names), key=lambda e: e["ts"]
    ):
        later = [t for t in ends.get(e["name"], ()) if t >= e["ts"]]
        if later:
            ends[e["name"]].remove(later[0])
            e = {**e, "dur": max(e["dur"], later[0] - e["ts"])}
        out.append(e)
    return out


def _wall_shares(events: list[dict], names) -> dict[str, float]:
    """Wall time (us) attributed to every event whose name is in `names`. The timeline is
    cut at every start and end; each piece is split equally among the events running in it
    that hold no other running event of their thread (a conditional's time goes to its
    branch's operations). So operations that run concurrently on different threads share
    the wall time they overlap, and the shares add up to the time any operation ran."""
    evs = _with_async_ends(events, names)
    cuts = sorted({e["ts"] for e in evs} | {e["ts"] + e["dur"] for e in evs})
    starts = sorted(evs, key=lambda e: e["ts"])
    out = collections.Counter()
    active, i = [], 0
    for lo, hi in zip(cuts, cuts[1:]):
        while i < len(starts) and starts[i]["ts"] <= lo:
            active.append(starts[i])
            i += 1
        active = [e for e in active if e["ts"] + e["dur"] > lo]
        if not active:
            continue
        leaves = [
            e
            for e in active
            if not any(
                o is not e
                and o.get("tid") == e.get("tid")
                and o["ts"] >= e["ts"]
                and (o["ts"] + o["dur"] <= e["ts"] + e["dur"])
                and o["dur"] < e["dur"]
                for o in active
            )
        ]
        for e in leaves or active:
            out[e["name"]] += (hi - lo) / len(leaves or active)
    return dict(out)


@dataclass
class Breakdown:
    """One profiled run: wall seconds, seconds per category and per operation (wall-time
    shares), and the operations' descriptions."""

    wall: float
    categories: dict[str, float]
    ops: dict[str, float]
    described: dict[str, HloOp]

    @property
    def in_operations(self) -> float:
        return sum(self.categories.values())

    def lines(self, top: int = 12) -> list[str]:
        """The report: categories, their sum against the wall time, the top operations."""
        out = [f"{'category':>36} {'ms':>9} {'share':>6}"]
        for name, s in sorted(self.categories.items(), key=lambda t: -t[1]):
            out.append(f"{name:>36} {1e3 * s:9.1f} {s / self.wall:6.1%}")
        gap = self.wall - self.in_operations
        out.append(f"{'between operations':>36} {1e3 * gap:9.1f} {gap / self.wall:6.1%}")
        out.append(f"{'wall time of the profiled run':>36} {1e3 * self.wall:9.1f}")
        out.append("  top operations (ms of wall time, where):")
        for name, s in sorted(self.ops.items(), key=lambda t: -t[1])[:top]:
            op = self.described[name]
            here = next((f for f in op.source.split(";") if "xcoder_jax" in f), "")
            where = here.rpartition("xcoder_jax/")[2] or op.op_name.rpartition("/")[2]
            out.append(f"    {1e3 * s:9.1f}  {name:<30} {where}")
        return out


def category(op: HloOp) -> str:
    return next(name for name, test in CATEGORIES if test(op))


def profile(run, hlo_text: str) -> Breakdown:
    """Runs `run()` (one call of the compiled computation whose module text is `hlo_text`,
    blocking until done) under the profiler and attributes its events."""
    ops = hlo_ops(hlo_text)
    log_dir = tempfile.mkdtemp(prefix="xla_profile_")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    (path,) = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace if isinstance(trace, list) else trace["traceEvents"]
    per_op = {n: us / 1e6 for n, us in _wall_shares(events, ops).items()}
    cats = collections.Counter()
    for name, s in per_op.items():
        cats[category(ops[name])] += s
    return Breakdown(wall, dict(cats), per_op, ops)
