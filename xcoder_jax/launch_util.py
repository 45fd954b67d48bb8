"""What every script in launch/ shares: known errors reported as one line.

    if __name__ == "__main__":
        launch_util.run_main(main)

`run_main` runs `main` under absl's `app.run`. A known failure (an `errors.XcoderError`: a
corrupted shard, a missing store, an unknown loss, a bad config value, ...) is printed as the
one line `error: <message>` on stderr and the script exits with status 1; `--traceback` shows
the full traceback instead. Any other exception is a bug and always shows its traceback.
A known error raised while the config file is loaded (`--config=configs/paper.py:13b`), and a
config file that does not exist, are reported the same way; every other flag error keeps
absl's own report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

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


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        known = _known_cause(e)
        if known is not None and not _traceback_requested(argv):
            _fail(known)
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


def run_main(main: Callable[[list[str]], object]) -> None:
    """absl's `app.run(main)`, with an XcoderError reported as one line (exit status 1)."""

    def guarded(argv: list[str]) -> object:
        try:
            _check_config_files()
            return main(argv)
        except XcoderError as e:
            if _TRACEBACK.value:
                raise
            _fail(e)

    app.run(guarded, flags_parser=_parse_flags)
