"""The extra label-free pool and its guard: no copy of a task's structure gets in."""

from __future__ import annotations

import pandas as pd

from matbench_dim.data.pool import extend_pool, matching_structures


def test_copies_of_labelled_structures_are_dropped_others_join(
    perovskite_sample_task, flla_sample_task
):
    task = perovskite_sample_task
    test_ids = list(task.test_ids(0)[:3])
    copies = {f"copy{k}": task.structures[i].copy() for k, i in enumerate(test_ids)}
    moved = task.structures[test_ids[0]].copy()
    moved.translate_sites(list(range(len(moved))), [0.13, 0.2, 0.05])  # another origin
    moved.make_supercell([2, 1, 1])  # and a supercell: the same crystal
    unrelated = flla_sample_task.structures.iloc[:10]
    extra = pd.concat([pd.Series(copies, dtype=object), pd.Series({"moved": moved}, dtype=object),
                       unrelated])  # fmt: skip
    found = matching_structures(extra, task.structures)
    assert found == {"copy0": test_ids[0], "copy1": test_ids[1], "copy2": test_ids[2],
                     "moved": test_ids[0]}  # fmt: skip
    bigger = extend_pool(task, extra, source="flla+copies")
    pool = bigger.unlabelled_structures(0)
    assert len(pool) == len(task.unlabelled_structures(0)) + 10
    assert {f"flla+copies:{i}" for i in unrelated.index} <= set(pool.index)
    assert not {f"flla+copies:{i}" for i in (*copies, "moved")} & set(pool.index)
    report = bigger.provenance["extra_pool"]
    assert (report["offered"], report["dropped_matches"], report["kept"]) == (14, 4, 10)
    assert list(bigger.test_ids(0)) == list(task.test_ids(0))  # folds and labels unchanged
    assert bigger.targets.equals(task.targets)
