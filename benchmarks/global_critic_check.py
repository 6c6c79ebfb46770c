"""How the global DIM critic scores clean local means after a short pretraining (issue 12).

Pretrains on a shipped sample (300 crystals) and scores, on the held-out validation slice,
every (G, local mean) pair with the trained global critic, using means on both sides (what
fine-tuning sees). Prints:

- ``positive``: fraction of a crystal's own (G, mean) pairs scored T > 0;
- ``own>other``: fraction of (mean, other crystal) pairs where the own G outscores the other
  crystal's G (the global critic's real task);
- ``other_neg``: fraction of (other crystal's G, mean) pairs scored T < 0;
- the last epoch's label-free monitors, when the code logs them.

Run it on a checkout (``PYTHONPATH=<checkout>``) to compare two versions of the wiring::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/global_critic_check.py flla --seed 0
"""

from __future__ import annotations

import argparse
import time

import torch

from matbench_dim.data.sources import load_task
from matbench_dim.features.featurize import collate, featurize
from matbench_dim.model.dim import DIMConfig
from matbench_dim.model.sitenet import EncoderConfig
from matbench_dim.training.common import OptimizerConfig, split_train_val
from matbench_dim.training.pretrain import PretrainConfig, pretrain_dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", help="a task with a shipped sample: flla, perovskites_subset, ...")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n", type=int, default=300, help="crystals of the sample to use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--activation", default="silu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = load_task(args.task, sample=True)
    records = featurize(list(task.structures)[: args.n], progress=False)
    val_fraction = 0.2
    res = pretrain_dim(
        records,
        encoder_cfg=EncoderConfig(activation=args.activation),  # the seed's sizes
        dim_cfg=DIMConfig(),
        optimizer_cfg=OptimizerConfig(lr=args.lr),
        cfg=PretrainConfig(
            epochs=args.epochs, batch_sites=300, val_fraction=val_fraction, patience=0
        ),
        seed=args.seed,
    )
    _, val_idx = split_train_val(len(records), val_fraction, args.seed)
    encoder, critic = res.encoder.eval(), res.objective.global_loss.eval()
    with torch.no_grad():
        out = encoder(collate(records, val_idx))
        scores = torch.einsum("bc,qpc->bqp", critic.f(out.global_mu), critic.g(out.local_mu))
        mask = out.site_mask
        own = scores.diagonal(dim1=0, dim2=1).transpose(0, 1)
        n = scores.shape[0]
        others = ~torch.eye(n, dtype=torch.bool)[:, :, None]
        beats = ((own[None] > scores) & others).sum(0).float() / (n - 1)
        other_neg = ((scores < 0) & others).sum(0).float() / (n - 1)
    last = res.history[-1]
    print(
        f"{args.task} epochs={args.epochs} n={args.n} seed={args.seed} lr={args.lr}: "
        f"positive={float((own > 0)[mask].float().mean()):.3f} "
        f"own>other={float(beats[mask].mean()):.3f} "
        f"other_neg={float(other_neg[mask].mean()):.3f} "
        f"val_acc_global(logged)={last['val_acc_global']:.3f} best_epoch={res.best_epoch} "
        f"wall={time.perf_counter() - t0:.1f}s"
    )
    monitors = {
        k: round(v, 3) for k, v in last.items() if k.startswith(("val_acc_", "val_pr_", "ref_pr_"))
    }
    if monitors:
        print("  last epoch:", monitors)


if __name__ == "__main__":
    main()
