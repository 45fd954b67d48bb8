"""Documents for extraction: text sources, reasoning formatting, tokenisation, filtering.

Sources are read lazily and interleaved round-robin (the paper mixes reasoning traces with
general web text), so memory does not grow with the corpus. Document ids are positions in
the filtered, tokenised stream; they are the `doc` of the store's (doc, position) index.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import numpy as np

from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, MissingInputError

# Thought markers of common reasoning data sets, mapped to the <think> tags the distilled
# models were trained with.
THOUGHT_MARKERS = {
    "<|begin_of_thought|>": "<think>",
    "<|end_of_thought|>": "</think>",
}


def format_reasoning(question: str, trace: str) -> str:
    """question + "\\n" + trace, with thought markers mapped to <think> ... </think>."""
    for old, new in THOUGHT_MARKERS.items():
        trace = trace.replace(old, new)
    return f"{question}\n{trace}"


def _records(source, workdir: str) -> Iterator[dict]:
    kind = source.kind
    if kind == "zoo":
        path = os.path.join(wd.zoo_data_dir(workdir), "extract.jsonl")
        if not os.path.exists(path):
            raise MissingInputError(f"zoo corpus {path} is missing; build the zoo first")
        yield from _jsonl(path)
    elif kind == "jsonl":
        for path in data_paths(source.path):
            yield from _jsonl(path)
    elif kind == "text":
        for path in data_paths(source.path):
            with open(path, encoding="utf-8") as f:
                if source.per_line:
                    yield from ({"text": line.rstrip("\n")} for line in f if line.strip())
                else:
                    yield {"text": f.read()}
    elif kind == "hf":
        try:
            import datasets
        except ImportError as e:
            raise ImportError("source kind 'hf' needs `pip install xcoder_jax[datasets]`") from e
        yield from datasets.load_dataset(source.name, split=source.split, streaming=True)
    else:
        raise ConfigError(f"unknown data source kind {kind!r} (zoo, jsonl, text, hf)")


FILE_KINDS = ("jsonl", "text")  # source kinds read from local files (`path`: file or glob)


def data_paths(pattern: str) -> list[str]:
    """The files a source's `path` (a file or a glob pattern) names; MissingInputError when
    a named file does not exist or the pattern matches none."""
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    for p in paths:
        if not os.path.isfile(p):
            raise MissingInputError(f"data file not found: {p}")
    if not paths:
        raise MissingInputError(f"no data files match {pattern!r}")
    return paths


def _jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def _texts(source, workdir: str) -> Iterator[str]:
    n = 0
    for record in _records(source, workdir):
        if source.max_docs >= 0 and n >= source.max_docs:
            return
        if source.format == "reasoning":
            text = format_reasoning(record[source.question_field], record[source.trace_field])
        elif source.format == "conversations":
            # Chat records ({"conversations": [{"from"|"role": ..., "value"|"content": ...}]}):
            # the first user turn is the question, the first assistant turn the trace.
            turns = record[source.conversations_field]
            text_of = lambda t: t.get("value", t.get("content", ""))
            role_of = lambda t: t.get("from", t.get("role", ""))
            question = next(text_of(t) for t in turns if role_of(t) in ("user", "human"))
            trace = next(text_of(t) for t in turns if role_of(t) in ("assistant", "gpt"))
            text = format_reasoning(question, trace)
        elif source.format == "plain":
            text = record[source.text_field]
        else:
            raise ConfigError(
                f"unknown document format {source.format!r} (plain, reasoning, conversations)"
            )
        n += 1
        yield text


def iter_texts(data_config, workdir: str) -> Iterator[str]:
    """Documents of all sources, interleaved round-robin."""
    streams = [_texts(s, workdir) for s in data_config.sources]
    while streams:
        alive = []
        for stream in streams:
            text = next(stream, None)
            if text is not None:
                alive.append(stream)
                yield text
        streams = alive


def iter_documents(data_config, workdir: str, tokenizer) -> Iterator[tuple[int, np.ndarray]]:
    """(doc id, token ids [T] int32) after the length filter and truncation.

    Documents shorter than `min_tokens` are dropped and longer ones truncated to
    `max_tokens` (the paper: drop < 2048, truncate to 2048). Documents of fewer than two
    tokens are dropped too: without position 0 they would give no rows.
    """
    doc = 0
    for text in iter_texts(data_config, workdir):
        if data_config.max_docs >= 0 and doc >= data_config.max_docs:
            return
        ids = tokenizer(text)["input_ids"]  # BOS where the tokenizer adds one
        if len(ids) < max(2, data_config.min_tokens):
            continue
        if data_config.max_tokens > 0:
            ids = ids[: data_config.max_tokens]
        yield doc, np.asarray(ids, np.int32)
        doc += 1
