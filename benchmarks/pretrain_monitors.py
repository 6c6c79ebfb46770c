"""The label-free monitors of the DIM pretrainings behind a `bench` results folder.

    python benchmarks/pretrain_monitors.py RESULTS_DIR [RESULTS_DIR ...] --tracking-uri URI

For every label-free pretraining manifest under ``RESULTS_DIR/pretrained`` it reads the run's
per-epoch metrics from MLflow and prints, at the chosen (best validation DIM loss) epoch and at
the last epoch: the critics' validation accuracies (local, global), the participation ratio
(effective rank) of the pooled local means and of the crystal vectors next to the random
encoder's (``ref_pr_*``), the epoch count and the wall time. No label is read: these are the
numbers a user can see before any fine-tuning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("val_acc_local", "val_acc_global", "val_pr_local", "ref_pr_local", "val_pr_global",
        "ref_pr_global", "val_dim_loss")  # fmt: skip


def main() -> None:
    from mlflow import MlflowClient

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--tracking-uri", required=True)
    args = ap.parse_args()
    client = MlflowClient(args.tracking_uri)
    print("| results | epochs | best epoch | wall s | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 4) + "|")
    for root in args.results:
        for manifest in sorted((root / "pretrained").rglob("dim-*.json")):
            meta = json.loads(manifest.read_text())
            run_id = meta.get("mlflow_run_id")
            if not run_id:
                continue
            history = {k: client.get_metric_history(run_id, f"pretrain/{k}") for k in KEYS}
            by_step = {k: {m.step: m.value for m in v} for k, v in history.items()}
            steps = sorted(by_step["val_dim_loss"])
            best = min(steps, key=lambda s: by_step["val_dim_loss"][s])
            for label, step in (("best", best), ("last", steps[-1])):
                vals = [f"{by_step[k].get(step, float('nan')):.3f}" for k in KEYS]
                print(f"| {root.name} ({label}) | {len(steps)} | {best} | {meta['wall_s']:.0f} | "
                      + " | ".join(vals) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
