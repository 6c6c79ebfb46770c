"""A larger label-free pretraining pool, with a guard against the task's own structures.

DIM pretraining reads no label, so any crystal structures can join a task's pool (another
data set, the user's CIFs). The danger is the same crystal appearing under another id: a test
structure of the task reaching pretraining through the extra source. :func:`extend_pool`
drops every extra structure that matches *any* labelled structure of the task (training or
test, of every fold, so no fold's test crystal can slip in) before it joins
``Task.unlabelled_pool``:

1. same reduced formula (cheap, exact);
2. then, for those, the same space-group number (spglib through pymatgen, ``symprec``);
3. then pymatgen's ``StructureMatcher`` (default tolerances: scaled lattices, any origin, any
   supercell of the same primitive cell).

The kept structures get ids ``<prefix><original id>``; the provenance records the source,
how many were offered, kept and dropped, and the sha256 of the kept ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict
from typing import Any

import pandas as pd

from matbench_dim.data.task import Task

logger = logging.getLogger(__name__)

__all__ = ["extend_pool", "matching_structures"]


def _spacegroup(structure: Any, symprec: float) -> int:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())
    except Exception:  # spglib gives up on some cells: compare them by the matcher alone
        return 0


def matching_structures(
    extra: pd.Series, reference: pd.Series, symprec: float = 0.1
) -> dict[str, str]:
    """``{extra id: reference id}`` for every extra structure that is a reference structure
    (formula, then space group, then ``StructureMatcher``); see the module doc."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    by_formula: dict[str, list[str]] = defaultdict(list)
    for rid, s in reference.items():
        by_formula[s.composition.reduced_formula].append(str(rid))
    matcher = StructureMatcher()
    groups: dict[str, int] = {}

    def group(key: str, s: Any) -> int:
        if key not in groups:
            groups[key] = _spacegroup(s, symprec)
        return groups[key]

    found: dict[str, str] = {}
    for eid, s in extra.items():
        candidates = by_formula.get(s.composition.reduced_formula, [])
        if not candidates:
            continue
        sg = group(f"e:{eid}", s)
        for rid in candidates:
            other = reference[rid]
            rsg = group(f"r:{rid}", other)
            if sg and rsg and sg != rsg:
                continue
            if matcher.fit(s, other):
                found[str(eid)] = rid
                break
    return found


def extend_pool(
    task: Task, extra: pd.Series, *, source: str, prefix: str | None = None, symprec: float = 0.1
) -> Task:
    """A copy of ``task`` whose label-free pool also holds the structures of ``extra`` that
    are none of the task's labelled structures.

    Parameters
    ----------
    task
        The task (its labelled structures are the guard's reference).
    extra
        Structures indexed by id (e.g. another task's ``structures``); labels are not read.
    source
        Name of the extra source, for ids and provenance.
    prefix
        Id prefix of the kept structures (default ``"<source>:"``).
    symprec
        Space-group tolerance (angstrom) of the guard's second step.
    """
    prefix = f"{source}:" if prefix is None else prefix
    labelled = task.structures
    matches = matching_structures(extra, labelled, symprec)
    kept = extra[[str(i) not in matches for i in extra.index]]
    kept = pd.Series(list(kept), index=[f"{prefix}{i}" for i in kept.index], dtype=object)
    known = set(task.structures.index) | set(
        [] if task.unlabelled_pool is None else task.unlabelled_pool.index
    )
    kept = kept[[i not in known for i in kept.index]]
    pool = kept if task.unlabelled_pool is None else pd.concat([task.unlabelled_pool, kept])
    logger.info(
        "%s: %d extra structures from %s offered, %d match the task's labelled structures "
        "(dropped), %d join the label-free pool",
        task.name, len(extra), source, len(matches), len(kept),
    )  # fmt: skip
    provenance = {
        **task.provenance,
        "extra_pool": {
            "source": source,
            "offered": len(extra),
            "dropped_matches": len(matches),
            "kept": len(kept),
            "kept_ids_sha256": hashlib.sha256("\n".join(kept.index).encode()).hexdigest(),
            "dropped_examples": dict(list(matches.items())[:5]),
        },
    }
    return dataclasses.replace(task, unlabelled_pool=pool, provenance=provenance)
