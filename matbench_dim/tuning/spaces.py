"""Search spaces: declarative, validated parameter ranges per model family.

A space file (``tuning/spaces/<family>.json`` or ``.yaml``) holds ``{"family", "description",
"params"}``; each entry of ``params`` is ``{"name", "type", "low", "high", "log", "step",
"choices", "default", "description"}`` where ``name`` is a flat estimator parameter name and
``type`` is ``float``, ``int`` or ``categorical``. The defaults (the seed's published values)
become the first enqueued trial of a new study.

Family names are looked up in ``./tuning/spaces`` (relative to the working directory) or else
in the repository's ``tuning/spaces`` next to the package source; a non-editable install
ships neither, so pass a directory or file paths there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

__all__ = [
    "DEFAULT_SPACES",
    "ParamSpec",
    "SearchSpace",
    "SpaceError",
    "default_space_dir",
    "load_space",
    "load_spaces",
]

DEFAULT_SPACES = ("dim_pretraining", "finetune", "head")


class SpaceError(ValueError):
    """A search-space file or entry is invalid (the message names the file and the entry)."""


_TYPES = ("float", "int", "categorical")
_ENTRY_KEYS = {"name", "type", "low", "high", "log", "step", "choices", "default", "description"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ParamSpec:
    """One tunable estimator parameter (``name`` is the flat name, e.g. ``optimizer__lr``)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    default: Any = None
    description: str = ""

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask ``trial`` for a value of this parameter."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=step
            )
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    """Parameters of one or several model families, in file order."""

    params: tuple[ParamSpec, ...]
    sources: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggested values of every parameter for ``trial``."""
        return {p.name: p.suggest(trial) for p in self.params}

    def defaults(self) -> dict[str, Any]:
        """The entries' ``default`` values (the seed's published configuration)."""
        return {p.name: p.default for p in self.params if p.default is not None}

    def get(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


def _spec_from_entry(entry: Any, where: str) -> ParamSpec:
    if not isinstance(entry, Mapping):
        raise SpaceError(f"{where}: an entry must be a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpaceError(f"{where}: 'name' must be a flat estimator parameter name, got {name!r}")
    where = f"{where} ({name})"
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
    kind = entry.get("type")
    if kind not in _TYPES:
        raise SpaceError(f"{where}: unknown type {kind!r}; expected one of {list(_TYPES)}")
    log, step, default = bool(entry.get("log", False)), entry.get("step"), entry.get("default")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: a categorical entry needs a non-empty 'choices' list")
        if any(c is not None and not isinstance(c, bool | int | float | str) for c in choices):
            raise SpaceError(f"{where}: choices must be numbers, strings, booleans or null")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SpaceError(f"{where}: duplicate choices {choices}")
        if default is not None and default not in choices:
            raise SpaceError(f"{where}: default {default!r} is not one of the choices {choices}")
        return ParamSpec(name, kind, choices=tuple(choices), default=default)
    low, high = entry.get("low"), entry.get("high")
    number = int if kind == "int" else int | float
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise SpaceError(f"{where}: {kind} entry needs a numeric '{key}', got {value!r}")
    if low > high:
        raise SpaceError(f"{where}: low ({low}) > high ({high})")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0, got {low}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise SpaceError(f"{where}: 'step' must be a positive {kind}, got {step!r}")
        if log and (kind == "float" or step != 1):
            raise SpaceError(f"{where}: 'step' and 'log' cannot be combined")
    if default is not None and (
        isinstance(default, bool) or not isinstance(default, number) or not low <= default <= high
    ):
        raise SpaceError(f"{where}: default {default!r} is not a {kind} in [{low}, {high}]")
    return ParamSpec(name, kind, low, high, log, step, default=default)


def _read_mapping(path: Path) -> Any:
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and yaml.YAMLError's parse errors
        raise SpaceError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    except Exception as exc:
        raise SpaceError(f"{path}: could not be parsed: {exc}") from exc


def default_space_dir() -> Path:
    """``./tuning/spaces`` when it exists (your own spaces), else the packaged defaults.

    The default spaces ship inside the package (``matbench_dim/tuning/spaces``); the
    repository's top-level ``tuning/spaces`` is a link to that folder, so running from the
    repository root reads the same files.
    """
    local = Path("tuning") / "spaces"
    return local if local.is_dir() else Path(__file__).resolve().parent / "spaces"


def _missing_folder(source: str | os.PathLike[str], base: Path, *, default: bool) -> str:
    """Message for a family name looked up in a search-space folder that does not exist."""
    return (
        f"search space {str(source)!r} not found: the folder {base} does not exist; "
        "give space file paths or an existing folder"
    )


def load_space(source: str | os.PathLike[str], directory: str | Path | None = None) -> SearchSpace:
    """Load and validate one space file: a path, or a family name looked up in ``directory``.

    Raises
    ------
    SpaceError
        When the file is missing or malformed, naming the file and the entry.
    """
    path = Path(source)
    if not path.is_file():
        base = Path(directory) if directory is not None else default_space_dir()
        found = [base / f"{source}{ext}" for ext in (".json", ".yaml", ".yml")]
        path = next((p for p in found if p.is_file()), found[0])
        if not path.is_file():
            if not base.is_dir():
                raise SpaceError(_missing_folder(source, base, default=directory is None))
            raise SpaceError(f"search space {str(source)!r} not found (looked for {found})")
    data = _read_mapping(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("params"), list):
        raise SpaceError(f"{path}: expected a mapping with a 'params' list")
    unknown = set(data) - {"family", "description", "params"}
    if unknown:
        raise SpaceError(f"{path}: unknown top-level keys {sorted(unknown)}")
    specs, seen = [], set()
    for i, entry in enumerate(data["params"]):
        spec = _spec_from_entry(entry, f"{path}: params[{i}]")
        if spec.name in seen:
            raise SpaceError(f"{path}: params[{i}]: duplicate parameter {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return SearchSpace(tuple(specs), (str(path),))


def load_spaces(
    sources: Sequence[str | os.PathLike[str]] = DEFAULT_SPACES, directory: str | Path | None = None
) -> SearchSpace:
    """Load several space files and merge them (a name defined twice is an error)."""
    params: list[ParamSpec] = []
    where: dict[str, str] = {}
    paths: list[str] = []
    for source in sources:
        space = load_space(source, directory)
        for spec in space.params:
            if spec.name in where:
                raise SpaceError(
                    f"parameter {spec.name!r} defined in both {where[spec.name]} and {space.sources[0]}"
                )
            where[spec.name] = space.sources[0]
            params.append(spec)
        paths.extend(space.sources)
    return SearchSpace(tuple(params), tuple(paths))
