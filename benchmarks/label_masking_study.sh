#!/usr/bin/env bash
# The README's label-masking study (after the wiring fix), in one command. Resumable: run it
# again to continue an interrupted study; finished cells and pretrainings are skipped, and
# every finished batch of cells is appended to benchmarks/results/label_masking.csv.
#
#   bash benchmarks/label_masking_study.sh [OUT] [FOLDS] [SEEDS]
#
# OUT defaults to results/study, FOLDS to 0,1,2,3,4, SEEDS to 0,1,2,3,4. Needs the real data
# sets of ../shared/data (or MATBENCH_DIM_SHARED_DATA / --data-home) and, for chgnet_rf, the
# optional extra (pip install 'matbench-dim[chgnet]'; skipped with a message without it).
# On the 2-core development machine one flla fold takes about 25 min on one core, one
# perovskite fold about 12 min, fold 0 at n = 500 / 1000 about as much again.
set -euo pipefail
OUT=${1:-results/study}
FOLDS=${2:-0,1,2,3,4}
SEEDS=${3:-0,1,2,3,4}
MB=${MATBENCH_DIM:-matbench-dim}
PY=${PYTHON:-python}
JOBS=${N_JOBS:-1}
STUDY=means-to-global/dim15ep-lr1e-3-silu
# CPU budget for DIM: 15 epochs at lr 1e-3 on the fold's whole training pool (labels hidden)
P=(-p optimizer__lr=0.001 -p pretrain__epochs=15 -p pretrain__patience=0 -p encoder__activation=silu)
METHODS=dummy_mean,rf_magpie,chgnet_rf,random_init,dim,random_rf,dim_rf

for spec in flla perovskites_subset:e_form; do
  dir="$OUT/${spec%%:*}"
  $MB -v bench --tasks "$spec" --n-labels 50,100,250 --methods "$METHODS" --folds "$FOLDS" \
    --seeds "$SEEDS" --n-jobs "$JOBS" "${P[@]}" --out "$dir"
  $PY benchmarks/collect_cells.py add "$dir" --study "$STUDY"
  # fold 0 also with more labels
  $MB -v bench --tasks "$spec" --n-labels 500,1000 --methods "$METHODS" --folds 0 \
    --seeds "$SEEDS" --n-jobs "$JOBS" "${P[@]}" --out "$dir"
  $PY benchmarks/collect_cells.py add "$dir" --study "$STUDY"
  $MB report "$dir"
done
# the README's tables, paired statistics and figures, from the committed CSV
$PY benchmarks/collect_cells.py readme --baseline-study "$STUDY"
