"""Rebuild the small real-data samples shipped in ``matbench_dim/data/samples``.

Run from a checkout that can see the full files::

    python -m matbench_dim.data.make_samples --shared /work/shared/data

Each sample keeps real rows (structures, targets, ids) of a full matminer-format file,
chosen by a fixed, library-independent rule: rows are ranked by
``sha256("18012019:" + id)`` and the lowest-ranked are kept (per official fold where
noted), then written in the source file's row order. The JSON is written by matminer's
``store_dataframe_as_json`` and gzipped with a zero timestamp, so a rerun on the same
inputs and library versions reproduces the same bytes. ``SAMPLES.json`` records, for each
sample, the source file and its sha256, the sample's sha256, its rows and the rule.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from matbench_dim.data.sources import datasets_dir, matminer_data_home, sha256_file
from matbench_dim.data.task import MATBENCH_SEED

MANIFEST = "SAMPLES.json"
COMMAND = "python -m matbench_dim.data.make_samples --shared <shared/data>"


def rank_key(identifier: str, seed: int = MATBENCH_SEED) -> str:
    """Sort key of the selection rule: ``sha256(f"{seed}:{identifier}")`` in hex."""
    return hashlib.sha256(f"{seed}:{identifier}".encode()).hexdigest()


def pick(ids: Sequence[str], k: int) -> list[str]:
    """The ``k`` ids with the lowest :func:`rank_key` (all of them when fewer)."""
    return sorted(ids, key=rank_key)[:k]


def pick_per_fold(ids: Sequence[str], matbench_name: str, per_fold: int) -> list[str]:
    """:func:`pick` ``per_fold`` ids inside each official test fold of ``matbench_name``."""
    from matbench.metadata import mbv01_validation

    available = set(ids)
    out: list[str] = []
    for key, split in mbv01_validation.splits[matbench_name].items():
        chosen = pick([i for i in split.test if i in available], per_fold)
        if not chosen:
            raise RuntimeError(f"official {key} of {matbench_name} has no available test ids")
        out += chosen
    return out


def write_gz_json(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` with matminer's ``store_dataframe_as_json``, gzipped with mtime 0."""
    from matminer.utils.io import store_dataframe_as_json

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "sample.json"
        store_dataframe_as_json(df, str(plain), compression=None, pbar=False)
        data = plain.read_bytes()
    tmp_out = path.with_name(path.name + ".tmp")
    with (
        open(tmp_out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
    ):
        gz.write(data)
    tmp_out.replace(path)


@dataclass(frozen=True)
class SampleRecipe:
    """One sample: its source file (relative to the shared data dir) and how rows are kept."""

    name: str
    file: str
    source: str
    rows: int
    selection: str
    build: Callable[[Path], pd.DataFrame]


def _read(path: Path) -> pd.DataFrame:
    from matminer.utils.io import load_dataframe_from_json

    return load_dataframe_from_json(str(path), pbar=False)


def _perovskites(path: Path) -> pd.DataFrame:
    df = _read(path)
    keep = set(pick_per_fold(list(df.index), "matbench_perovskites", 60))
    return df.loc[
        [i for i in df.index if i in keep], ["structure", "e_form", "gap gllbsc", "source"]
    ]


def _flla(path: Path) -> pd.DataFrame:
    df = _read(path)
    keep = set(pick(list(df["material_id"]), 300))
    return df[df["material_id"].isin(keep)]


def _jarvis(path: Path) -> pd.DataFrame:
    df = _read(path)
    no_eform = list(df.loc[df["e_form"].isna(), "jid"])
    rest = pick([j for j in df["jid"] if j not in set(no_eform)], 200 - len(no_eform))
    keep = set(no_eform) | set(rest)
    cols = ["jid", "mpid", "structure", "e_form", "gap opt", "exfoliation_en"]
    return df.loc[df["jid"].isin(keep), cols]


def _phonons(path: Path) -> pd.DataFrame:
    from matbench.data_ops import load

    with matminer_data_home(path.parent):
        df = load("matbench_phonons")  # indexed by the official mbids, as matbench does it
    keep = set(pick_per_fold(list(df.index), "matbench_phonons", 40))
    return df.loc[[i for i in df.index if i in keep]]


RECIPES = (
    SampleRecipe(
        "perovskites_subset",
        "perovskites_subset_sample.json.gz",
        "subsets/matbench_perovskites_partial.json.gz",
        300,
        "60 per official matbench_perovskites test fold: lowest sha256('18012019:'+mbid) among "
        "the fold's ids present in the subset; columns structure, e_form, gap gllbsc, source",
        _perovskites,
    ),
    SampleRecipe(
        "flla",
        "flla_sample.json.gz",
        "flla.json.gz",
        300,
        "300 rows with the lowest sha256('18012019:'+material_id); all columns",
        _flla,
    ),
    SampleRecipe(
        "jarvis_dft_2d",
        "jarvis_dft_2d_sample.json.gz",
        "jarvis_dft_2d.json.gz",
        200,
        "every row lacking e_form (3), then the others with the lowest sha256('18012019:'+jid) "
        "up to 200 rows; columns jid, mpid, structure, e_form, gap opt, exfoliation_en",
        _jarvis,
    ),
    SampleRecipe(
        "matbench_phonons",
        "matbench_phonons_sample.json.gz",
        "matbench_phonons.json.gz",
        200,
        "40 per official matbench_phonons test fold: lowest sha256('18012019:'+mbid); index = "
        "official mbid (as matbench.data_ops.load gives it)",
        _phonons,
    ),
)


def make_samples(shared: Path, out: Path) -> dict:
    """Write every sample and ``SAMPLES.json`` into ``out``; return the manifest."""
    samples = {}
    for recipe in RECIPES:
        src = shared / recipe.source
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing; --shared must be the shared data folder")
        df = recipe.build(src)
        if len(df) != recipe.rows:
            raise RuntimeError(f"{recipe.name}: selected {len(df)} rows, expected {recipe.rows}")
        target = out / recipe.file
        write_gz_json(df, target)
        samples[recipe.name] = {
            "file": recipe.file,
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
            "rows": len(df),
            "columns": [str(c) for c in df.columns],
            "source_file": recipe.source,
            "source_sha256": sha256_file(src),
            "selection": recipe.selection,
        }
        print(f"{recipe.file}: {len(df)} rows, {target.stat().st_size} bytes")
    jdft = out / "matbench_jdft2d.json.gz"
    manifest = {
        "generated_by": COMMAND,
        "format": "matminer store_dataframe_as_json (orient='split'), gzip with mtime 0",
        "samples": samples,
        "shipped_full": {
            "matbench_jdft2d": {
                "file": jdft.name,
                "sha256": sha256_file(jdft) if jdft.is_file() else None,
                "rows": 636,
                "note": "the complete matbench_jdft2d task, read by matbench itself",
            }
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in out.glob("*.json.gz"))
    print(f"wrote {out / MANIFEST}; all shipped data files: {total} bytes")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, required=True, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=datasets_dir(), help="output folder")
    args = parser.parse_args(argv)
    make_samples(args.shared, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
