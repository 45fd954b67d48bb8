"""What every script in launch/ shares: known errors reported as one line.

    if __name__ == "__main__":
        launch_util.run_main(main)

`run_main` runs `main` under absl's `app.run`. A known failure (an `errors.XcoderError`: a
corrupted shard, a missing store, an unknown loss, a bad config value, ...) is printed as the
one line `error: <message>` on stderr and the script exits with status 1; `--traceback` shows
the full traceback instead. Any other exception is a bug and always shows its traceback.
A known error raised while the config file is loaded (`--config=configs/paper.py:13b`), and a
config file that does not exist, are reported the same way, and so are a config override that
names no field (`--config.train.stepz=5`: with the closest field suggested) or holds a value of
the wrong type (`--config.train.steps=abc`). Before `main` runs, every config is validated
(`config_check.check`: each field's range, in one line) and the workdir must be writable, so
a bad input fails before any work. Every other flag error keeps absl's own report.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

from xcoder_jax import config_check, config_util, huge_pages, inputs
from xcoder_jax.errors import ConfigError, XcoderError

_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the full traceback of a known error instead of one line."
)


def one_line(error: BaseException) -> str:
    """`error: <message>`, the message's lines joined into one."""
    parts = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error: " + (" ".join(parts) or type(error).__name__)


def _fail(error: BaseException) -> None:
    print(one_line(error), file=sys.stderr, flush=True)
    if getattr(error, "exit_at_once", False):
        # Exit handlers would wait for what cannot come (jax.distributed's shutdown waits
        # for a process that died, then aborts): leave without them.
        sys.stdout.flush()
        os._exit(1)
    sys.exit(1)


def _known_cause(error: BaseException) -> XcoderError | None:
    """The innermost XcoderError among `error` and the exceptions it was raised from."""
    known, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, XcoderError):
            known = error
        error = error.__cause__ or error.__context__
    return known


def _traceback_requested(argv: list[str]) -> bool:
    """Whether argv turns --traceback on (read from argv: a flag error stops parsing early)."""
    on = False
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("--traceback", "-traceback"):
            on = True
        elif arg in ("--notraceback", "-notraceback"):
            on = False
        elif arg.startswith(("--traceback=", "-traceback=")):
            on = arg.split("=", 1)[1].lower() in ("1", "t", "true", "y", "yes")
    return on


def _overrides(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """(config flag, dotted field, value or None) of every `--<config>.<field>[=value]`."""
    out = []
    for arg in argv[1:]:
        if arg == "--":
            break
        name, _, rest = arg.lstrip("-").partition(".")
        if arg.startswith("-") and rest and name in flags.FLAGS:
            field, eq, value = rest.partition("=")
            out.append((name, field, value if eq else None))
    return out


def _load_config(argv: list[str], name: str):
    """The config `--<name>=file[:arg]` names, loaded as ml_collections does; None if absent."""
    for arg in argv[1:]:
        flag, eq, value = arg.lstrip("-").partition("=")
        if flag == name and eq:
            path, _, config_arg = value.partition(":")
            module = config_util.load_file(path)
            return module.get_config(config_arg) if config_arg else module.get_config()
    return None


def _parses_as(text: str, default) -> bool:
    """Whether `text` reads as a value of `default`'s type on the command line."""
    if isinstance(default, bool):
        return text.lower() in ("true", "false", "t", "f", "1", "0", "yes", "no")
    try:
        if isinstance(default, int):
            int(text)
        elif isinstance(default, float):
            float(text)
        elif isinstance(default, (tuple, list)):
            return isinstance(ast.literal_eval(text), (tuple, list, int, float, str))
    except (ValueError, SyntaxError):
        return False
    return True


def _override_problem(argv: list[str]) -> ConfigError | None:
    """The first config override naming no field, or holding a value of the wrong type."""
    configs: dict[str, object] = {}
    for name, field, value in _overrides(argv):
        if name not in configs:
            try:
                configs[name] = _load_config(argv, name)
            except Exception:  # noqa: BLE001 - the config's own error is reported elsewhere
                configs[name] = None
        node, walked = configs[name], []
        if node is None:
            continue
        parts = field.split(".")
        for i, part in enumerate(parts):
            where = ".".join(walked) or "the config"
            if not hasattr(node, "keys"):
                return ConfigError(f"--{name}.{field}: {where} is not a section")
            if part not in node:
                hint = config_check.suggest(part, node.keys())
                kind = "field" if i == len(parts) - 1 else "section"
                return ConfigError(f"--{name}.{field}: {where} has no {kind} {part!r}{hint}")
            node, walked = node[part], [*walked, part]
        if value is not None and node is not None and not _parses_as(value, node):
            kind = type(node).__name__
            return ConfigError(
                f"--{name}.{field}={value}: {field} takes a value of type {kind} "
                f"(its default is {node!r})"
            )
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError) as e:
        if not _traceback_requested(argv):
            known = _known_cause(e) or _override_problem(argv)
            if known is not None:
                _fail(known)
        if not isinstance(e, flags.Error):
            raise
    # Any other flag error (or --traceback): absl's own report, which parses once more.
    return app.parse_flags_with_usage(argv)


def _check_config_files() -> None:
    """Raises ConfigError for a config flag whose file could not be read.

    ml_collections defers that error to the config's first use, deep inside a stage.
    """
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        try:
            path = config_flags.get_config_filename(flag)
        except (TypeError, flags.Error):  # not a config-file flag, or not given
            continue
        try:
            getattr(flag.value, "_xcoder_load_check", None)  # any access raises when unread
        except XcoderError:
            raise  # the config's own known error (e.g. a file it names is missing)
        except OSError as e:
            raise ConfigError(f"--{name}: cannot read the config file {path!r}: {e}") from e


def _check_configs() -> None:
    """Validates every config flag's config: its values (`config_check`), then the files
    and models it names (`inputs`)."""
    for name in list(flags.FLAGS):
        value = flags.FLAGS[name].value
        if hasattr(value, "keys") and "train" in value:  # a run config, not a flag of dicts
            config_check.check(value)
            inputs.check(value)


def check_writable(directory: str) -> None:
    """Raises ConfigError unless files can be created in `directory` (made when missing).

    A probe file is written and removed: permission bits alone do not tell (root ignores
    them; a read-only mount does not).
    """
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_probe.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"cannot write in the workdir {directory}: {e.strerror or e}; choose a writable "
            "--workdir"
        ) from e


def _check_workdir() -> None:
    if "workdir" in flags.FLAGS and flags.FLAGS["workdir"].value:
        check_writable(flags.FLAGS["workdir"].value)


def run_main(main: Callable[[list[str]], object]) -> None:
    """absl's `app.run(main)`, with an XcoderError reported as one line (exit status 1);
    first restarted with huge pages for XLA's CPU buffers where they are wanted
    (`huge_pages`)."""
    huge_pages.reexec()

    def guarded(argv: list[str]) -> object:
        try:
            _check_config_files()
            _check_configs()
            _check_workdir()
            return main(argv)
        except XcoderError as e:
            if _TRACEBACK.value:
                raise
            _fail(e)

    app.run(guarded, flags_parser=_parse_flags)
