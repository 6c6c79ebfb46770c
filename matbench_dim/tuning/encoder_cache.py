"""On-disk cache of pretrained encoders, keyed by the pretraining parameters and data.

DIM pretraining on a fold's training structures does not depend on the labels, so trials
that differ only in fine-tuning or head parameters reuse one pretrained encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from matbench_dim.tuning._common import (
    FINETUNE_ONLY_PREFIXES,
    HOST,
    RUN_ONLY_PARAMS,
    jsonable,
    keyword_defaults,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CACHE_DIR", "EncoderCache"]

DEFAULT_CACHE_DIR = Path("tuning") / "cache"  # encoders/ and features/ below it


class EncoderCache:
    """Pretrained encoders on disk, ``<directory>/<key>/encoder``, reused across trials.

    The key hashes the estimator's pretraining parameters (every parameter except the
    fine-tuning-only ones, :data:`FINETUNE_ONLY_PREFIXES` and :data:`RUN_ONLY_PARAMS`) and the
    ordered ids of the pretraining structures. Clear the directory when the model code
    changes. Several workers may share it: each writes to a private temporary folder and
    renames it into place; the first to finish wins.
    """

    def __init__(self, directory: str | Path = DEFAULT_CACHE_DIR / "encoders") -> None:
        self.directory = Path(directory)
        self.n_pretrained = 0  # pretraining runs done by this object (cache misses)

    @staticmethod
    def pretraining_params(params: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``params`` that can change the pretrained encoder."""
        return {
            k: v
            for k, v in sorted(jsonable(params).items())
            if k not in RUN_ONLY_PARAMS and not k.startswith(FINETUNE_ONLY_PREFIXES)
        }

    def key(
        self,
        params: Mapping[str, Any],
        ids: Sequence[str],
        factory: Callable[..., Any] | None = None,
    ) -> str:
        """Hex digest (16 characters) of the pretraining parameters and structure ids.

        With ``factory``, its keyword defaults fill the parameters ``params`` leaves out, so
        an explicit default and an omitted one give the same key.
        """
        full = {**(keyword_defaults(factory) if factory is not None else {}), **params}
        h = hashlib.sha256(json.dumps(self.pretraining_params(full), sort_keys=True).encode())
        h.update(b"\0ids\0" + "\0".join(map(str, ids)).encode())
        return h.hexdigest()[:16]

    def get_or_pretrain(
        self,
        factory: Callable[..., Any],
        params: Mapping[str, Any],
        X: Any,
        ids: Sequence[str],
    ) -> tuple[Path, bool]:
        """Path of the saved encoder for ``params`` on ``X``, pretraining on a miss.

        Returns ``(path, hit)``; the estimator is built as ``factory(**params)`` and must
        provide ``pretrain(X)`` and ``save_encoder(path)``.
        """
        key = self.key(params, ids, factory)
        final = self.directory / key
        encoder = final / "encoder"
        if encoder.exists():
            logger.info("encoder cache hit %s", key)
            return encoder, True
        logger.info("encoder cache miss %s: pretraining on %d structures", key, len(ids))
        tmp = self.directory / f".tmp-{key}-{HOST}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            est = factory(**{k: v for k, v in params.items() if k != "callbacks"})
            est.pretrain(X)
            est.save_encoder(tmp / "encoder")
            self.n_pretrained += 1
            meta = {
                "key": key,
                "params": self.pretraining_params({**keyword_defaults(factory), **params}),
                "n_structures": len(ids),
                "ids_sha256": hashlib.sha256("\0".join(map(str, ids)).encode()).hexdigest(),
                "seconds": round(time.perf_counter() - t0, 3),
                "created": datetime.now().isoformat(timespec="seconds"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                tmp.rename(final)
            except OSError:  # another worker finished the same key first
                logger.info("encoder %s was saved meanwhile by another worker", key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return encoder, False
