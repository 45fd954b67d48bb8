"""The package stays readable in pieces: no module over 300 lines, no function over 80.

Lines are the file's lines as `str.splitlines` counts them; a function runs from its `def`
(decorators excluded) to its last line, nested functions counted on their own as well.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "xcoder_jax"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 80


def offenders(package: pathlib.Path = PACKAGE) -> list[str]:
    """Every module over `MAX_MODULE_LINES` and every function over `MAX_FUNCTION_LINES`, as
    "path: N lines" and "path:line name: N lines" (paths relative to `package`)."""
    out = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(package).as_posix()
        n_lines = len(text.splitlines())
        if n_lines > MAX_MODULE_LINES:
            out.append(f"{name}: {n_lines} lines")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return out


def test_the_checker_finds_a_long_module_and_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")  # 81 lines
    (tmp_path / "ok.py").write_text("def g():\n    return 1\n")
    (tmp_path / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert offenders(tmp_path) == ["big.py: 301 lines", "long.py:1 f: 81 lines"]


def test_no_module_over_300_lines_and_no_function_over_80():
    found = offenders()
    assert not found, "over the limits:\n" + "\n".join(found)
