"""The pretrained encoder as a file: a folder of JSON configuration and a torch state dict.

Every saved folder (an encoder here, a fitted estimator in :mod:`matbench_dim.estimator`)
holds ``config.json`` with a ``format_version`` and a ``kind``, read back by
:func:`read_meta`, which refuses other versions and kinds with a specific error. Weights are
loaded with ``weights_only=True``: no pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder

FORMAT_VERSION = 1
"""Version of the saved-model folder layout; bump on incompatible changes."""


class IncompatibleModelError(ValueError):
    """A saved model folder that this version of matbench-dim cannot read."""


class PretrainedEncoder:
    """A DIM-pretrained encoder that several fine-tunes can start from.

    Saved as a folder: ``config.json`` (encoder configuration, provenance, format version) and
    ``encoder.pt`` (state dict).
    """

    def __init__(
        self,
        config: EncoderConfig,
        state_dict: dict[str, torch.Tensor],
        info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.state_dict = state_dict
        self.info = info or {}

    @classmethod
    def from_module(
        cls, encoder: SiteNetEncoder, info: dict[str, Any] | None = None
    ) -> PretrainedEncoder:
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
        return cls(encoder.cfg, state, info)

    def build(self) -> SiteNetEncoder:
        """A new :class:`SiteNetEncoder` carrying these weights."""
        enc = SiteNetEncoder(self.config)
        enc.load_state_dict(self.state_dict)
        return enc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the folder; returns its path."""
        return write_folder(
            path,
            "matbench_dim.PretrainedEncoder",
            self.state_dict,
            "encoder.pt",
            {"encoder": self.config.to_dict(), "info": self.info},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PretrainedEncoder:
        """Read a folder written by :meth:`save` (or by ``SiteNetDIMRegressor.save_encoder``)."""
        path = Path(path)
        meta = read_meta(path, "matbench_dim.PretrainedEncoder")
        state = torch.load(path / "encoder.pt", map_location="cpu", weights_only=True)
        return cls(EncoderConfig(**meta["encoder"]), state, meta.get("info", {}))


def write_folder(
    path: str | os.PathLike[str],
    kind: str,
    state_dict: dict[str, torch.Tensor],
    weights_file: str,
    meta: dict[str, Any],
) -> Path:
    """Write a saved folder: ``weights_file`` (the state dict) and ``config.json``.

    ``config.json`` holds ``format_version`` and ``kind`` (what :func:`read_meta` checks),
    then the entries of ``meta``. Returns the folder's path.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path / weights_file)
    full = {"format_version": FORMAT_VERSION, "kind": kind, **meta}
    (path / "config.json").write_text(json.dumps(full, indent=2, default=str))
    return path


def read_meta(path: Path, kind: str) -> dict[str, Any]:
    """``config.json`` of the saved folder ``path``, checked to be of ``kind`` and this version."""
    cfg = path / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{path} is not a saved matbench-dim model: {cfg} is missing")
    meta = json.loads(cfg.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise IncompatibleModelError(
            f"{path} was saved in format version {version}; this matbench-dim reads version "
            f"{FORMAT_VERSION}. Re-save it with the matbench-dim version that wrote it, or retrain."
        )
    if meta.get("kind") != kind:
        raise IncompatibleModelError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
    return meta
