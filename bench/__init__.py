"""Benchmarks, each run from the repository root as `python -m bench.<name>` (its docstring
has the commands, docs/performance.md the recorded results)."""


def recorded_settings() -> None:
    """The process settings the recorded results of the benchmarks that build micro models
    or synthetic stores were measured with: torch loaded and limited to 2 threads, no
    tokenizer parallelism."""
    import os

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(2)
