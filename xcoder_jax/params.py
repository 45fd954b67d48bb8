"""What a stage reads from the config: one frozen parameters object, and its fingerprint.

A stage declares the fields it reads, once (`Declared`), and builds its parameters from the
config at its start:

    FIELDS = params.Declared("steer", what=("steering.alphas", ...), how=("steering.batch_size",))
    p = FIELDS.read(config)
    p.steering.alphas          # a declared field
    p.steering.seedz           # AttributeError: not declared, so never read unfingerprinted

Reading a field the stage did not declare raises, so every field that shapes a result is in
its fingerprint (`p.fingerprint()`): the `what` fields, with their values. `how` fields
change how a result is computed, not what it is (batch sizes, devices, threads): they are
read like the others but left out of the fingerprint, so changing one never reruns a stage.
A declared field the config lacks is a ConfigError: defaults live in the config files only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from xcoder_jax.errors import ConfigError


class Record(Mapping):
    """A frozen dict whose keys also read as attributes (a data source: `source.kind`), as
    the ConfigDict it was read from."""

    def __init__(self, items: dict):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._items[key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return f"Record({self._items!r})"


def lookup(config, path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted field ("train.steps") of a config or nested mapping."""
    node = config
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def _frozen(value):
    """A config value as an immutable plain value (lists become tuples, dicts Records)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return Record({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _plain(value):
    """A frozen value back as JSON-ready data (what fingerprints hold)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class _Section:
    """Attribute access to one section's declared fields."""

    def __init__(self, stage: str, name: str, values: Mapping[str, Any]):
        self._stage, self._name, self._values = stage, name, values

    def __getattr__(self, field: str):
        if field.startswith("_"):
            raise AttributeError(field)
        try:
            return self._values[field]
        except KeyError:
            raise AttributeError(
                f"the {self._stage} stage reads {self._name}.{field} without declaring it "
                "(add it to the stage's params.Declared)"
            ) from None

    def __getitem__(self, field: str):
        return self.__getattr__(field)

    def get(self, field: str, default=None):
        """A declared field's value (`default` is never used: an undeclared field raises, a
        declared one is always there). For code written against ConfigDict sections."""
        return self.__getattr__(field)

    def __contains__(self, field: str) -> bool:
        return field in self._values


@dataclass(frozen=True)
class StageParams:
    """The values of the fields one stage declared, read once from the config.

    values: {"section.field": value} (frozen); how: the fields left out of the fingerprint.
    """

    stage: str
    values: Mapping[str, Any]
    how: frozenset[str]

    def __getattr__(self, section: str) -> _Section:
        if section.startswith("_") or section in ("stage", "values", "how"):
            raise AttributeError(section)
        prefix = section + "."
        fields = {k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)}
        if not fields and section not in self.values:
            raise AttributeError(f"the {self.stage} stage declares no field of section {section!r}")
        if section in self.values:  # a top-level field such as "seed"
            return self.values[section]
        return _Section(self.stage, section, fields)

    def fingerprint(self) -> dict:
        """{field: value} of the fields that change what the stage computes (JSON-ready)."""
        return {k: _plain(v) for k, v in sorted(self.values.items()) if k not in self.how}


@dataclass(frozen=True)
class Declared:
    """The fields a stage reads: `what` enter its fingerprint, `how` do not."""

    stage: str
    what: tuple[str, ...]
    how: tuple[str, ...] = ()

    def __post_init__(self):
        both = set(self.what) & set(self.how)
        if both:
            raise ValueError(f"{self.stage}: fields declared both what and how: {sorted(both)}")

    def fields(self) -> tuple[str, ...]:
        return (*self.what, *self.how)

    def read(self, config) -> StageParams:
        """The declared fields' values; ConfigError naming any field the config lacks.

        `config` is a ConfigDict, or parameters read already (returned as they are when they
        are this stage's; another stage's give the fields both declared)."""
        if isinstance(config, StageParams):
            if config.stage == self.stage:
                return config
            config = _nested(config.values)
        values, missing = {}, []
        for path in self.fields():
            found, value = lookup(config, path)
            if found:
                values[path] = _frozen(value)
            else:
                missing.append(path)
        if missing:
            raise ConfigError(f"the config has no {', '.join(missing)} (the {self.stage} stage)")
        json.dumps(_plain(values), default=str)  # fingerprints must serialise
        return StageParams(self.stage, MappingProxyType(values), frozenset(self.how))


def _nested(values: Mapping[str, Any]) -> dict:
    """{"a.b": v} -> {"a": {"b": v}}: parameters read as a config again."""
    out: dict = {}
    for path, value in values.items():
        *sections, field = path.split(".")
        node = out
        for name in sections:
            node = node.setdefault(name, {})
        node[field] = value
    return out


# Field groups several stages read (each stage names them in its own `Declared`).
MODELS = (
    "models.base",
    "models.distilled",
    "models.base_revision",
    "models.distilled_revision",
    "models.torch_dtype",
)
DATA = ("data.sources", "data.min_tokens", "data.max_tokens", "data.max_docs")
SELECTION = (
    "selection.fire_offset",
    "selection.max_controls",
    "selection.n_docs",
    "selection.seed",
)
# Fields that change how a stage computes, never what: where it runs, how much at once.
HOW = ("models.device", "train.verify_store", "selection.batch_size")


def unread(declared: Iterable[Declared], config) -> list[str]:
    """Fields of `config` that no stage in `declared` reads (for tests and docs)."""
    read = {f for d in declared for f in d.fields()}
    out = []
    for section, value in config.items():
        if hasattr(value, "keys"):
            out += [f"{section}.{k}" for k in value if f"{section}.{k}" not in read]
        elif section not in read:
            out.append(section)
    return out
