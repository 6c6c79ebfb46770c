"""Does an ensemble of fine-tunes from one DIM pretraining beat a single fine-tune, and are
its error bars calibrated? (label-masking protocol: the bench's own subsets and encoder)

    python benchmarks/ensemble_check.py ENCODER --task flla --fold 0 --n 100,250 \
        --seeds 0,1,2 --members 5 -p optimizer__lr=0.001 -p encoder__activation=silu

ENCODER is the label-free DIM encoder that `matbench-dim bench` pretrained for the fold
(``<out>/pretrained/<task>/label-free/fold<k>-*/dim-*``), so member 0 is exactly that bench's
``dim`` cell for the same (n, seed) and the comparison is paired. For each (n, seed) it prints
and appends to ``benchmarks/results/ensemble.csv`` (resumable: done rows are skipped): the
test MAE of member 0 (the single model), of the ensemble mean, the mean MAE of the members,
the coverage of mean ± 1 std / ± 2 std (ideal 68.3 % / 95.4 %), the miscalibration area (0 is ideal) and
the fit time of the ensemble vs the single model. Test targets are read only to score.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from matbench_dim.bench.calibration import calibration_summary
from matbench_dim.bench.subsets import draw_subset
from matbench_dim.data.sources import load_task
from matbench_dim.ensemble import SiteNetDIMEnsemble
from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.runtime import configure_threads

CSV = Path(__file__).resolve().parent / "results" / "ensemble.csv"


def _value(raw: str) -> object:
    """A ``-p`` value: JSON when it parses (numbers, true, null), else the string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("encoder")
    ap.add_argument("--task", default="flla")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--n", default="100,250")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("-p", "--param", action="append", default=[])
    ap.add_argument("--csv", type=Path, default=CSV)
    args = ap.parse_args()
    configure_threads(None)
    params = {k: _value(v) for k, v in (p.split("=", 1) for p in args.param)}
    task = load_task(args.task)
    old = pd.read_csv(args.csv) if args.csv.is_file() else pd.DataFrame()
    X_test = task.test_inputs(args.fold)
    y_test = task.test_targets(args.fold).to_numpy(dtype=float)
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            key = {"task": task.name, "fold": args.fold, "n": n, "seed": seed,
                   "members": args.members}  # fmt: skip
            if len(old) and (old[list(key)] == pd.Series(key)).all(axis=1).any():
                print(f"n={n} seed={seed}: already in {args.csv}")
                continue
            ids = draw_subset(task.train_ids(args.fold), n, args.fold, seed)
            X, y = task.train_data(args.fold)
            base = SiteNetDIMRegressor(**params, random_state=seed, encoder_init=args.encoder)
            t0 = time.perf_counter()
            ens = SiteNetDIMEnsemble(base, n_members=args.members).fit(X.loc[ids], y.loc[ids])
            fit_s = time.perf_counter() - t0
            each = ens.predict_members(X_test)
            mean, std = each.mean(axis=0), each.std(axis=0)
            row = {
                **key,
                "mae_single": float(np.abs(each[0] - y_test).mean()),
                "mae_ensemble": float(np.abs(mean - y_test).mean()),
                "mae_members_mean": float(np.abs(each - y_test).mean(axis=1).mean()),
                **calibration_summary(y_test, mean, std),
                "fit_s_single": ens.fit_seconds_[0],
                "fit_s_ensemble": fit_s,
            }
            rows.append(row)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            )
            merged = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            merged.to_csv(args.csv, index=False, float_format="%.6g")
    table = pd.read_csv(args.csv)
    table = table[(table.task == task.name) & (table.members == args.members)]
    if len(table):
        table = table.assign(gain=1 - table.mae_ensemble / table.mae_single)
        agg = table.groupby("n")[["mae_single", "mae_ensemble", "gain", "coverage_1sigma",
                                  "coverage_2sigma", "miscalibration_area",
                                  "fit_s_single", "fit_s_ensemble"]].agg(["mean", "std"])  # fmt: skip
        print(agg.to_string(float_format=lambda v: f"{v:.3f}"))
        wins = table.groupby("n").apply(lambda t: f"{int((t.gain > 0).sum())}/{len(t)}")
        print("ensemble better than member 0:", dict(wins))


if __name__ == "__main__":
    main()
