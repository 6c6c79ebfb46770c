#!/usr/bin/env bash
# The label-masking proxy study of the README, in one command (resumable: run it again to
# continue an interrupted study; finished cells and pretrainings are skipped).
#
#   bash benchmarks/label_masking_study.sh [OUT] [FOLDS] [SEEDS]
#
# OUT defaults to results/study, FOLDS to 0, SEEDS to 0,1,2,3,4. Needs the real data sets of
# ../shared/data (or MATBENCH_DIM_SHARED_DATA / --data-home). On the 2-core development
# machine fold 0 takes about 2.5 hours; every fold adds as much.
set -euo pipefail
OUT=${1:-results/study}
FOLDS=${2:-0}
SEEDS=${3:-0,1,2,3,4}
MB=${MATBENCH_DIM:-matbench-dim}
JOBS=${N_JOBS:-2}
# CPU budget for DIM: 15 epochs at lr 1e-3 on the fold's whole training pool (labels hidden)
P=(-p optimizer__lr=0.001 -p pretrain__epochs=15 -p pretrain__patience=0 -p encoder__activation=silu)
common=(--folds "$FOLDS" --seeds "$SEEDS" --n-jobs "$JOBS" "${P[@]}")

# perovskite subset, formation energy: every baseline, supervised transfer from the band gap
$MB -v bench --tasks perovskites_subset:e_form --n-labels 50,100,250,500,1000 \
  --methods dummy_mean,rf_magpie,rf_sine_coulomb,random_init,dim,random_rf,dim_rf,transfer \
  --transfer-target gap "${common[@]}" --out "$OUT/perovskites_subset"
# same folds, band gap: the sanity row (96 % of gaps are 0); reuses the label-free DIM encoder
$MB -v bench --tasks perovskites_subset:gap --n-labels 50,100,250,500,1000 \
  --methods zero,median,dummy_mean,rf_magpie,rf_sine_coulomb,random_rf,dim_rf \
  "${common[@]}" --out "$OUT/perovskites_subset"
# 2D materials band gap (522 labelled; pretraining pool = training fold + unlabelled entries)
$MB -v bench --tasks "jarvis_dft_2d:gap opt" --n-labels 50,100,250 \
  --methods zero,median,dummy_mean,rf_magpie,rf_sine_coulomb,random_init,dim,random_rf,dim_rf \
  "${common[@]}" --out "$OUT/jarvis_dft_2d"
# Materials Project flla, formation energy per atom
$MB -v bench --tasks flla --n-labels 50,100,250,500,1000 \
  --methods dummy_mean,rf_magpie,rf_sine_coulomb,random_init,dim,random_rf,dim_rf \
  "${common[@]}" --out "$OUT/flla"

for d in perovskites_subset jarvis_dft_2d flla; do
  $MB report "$OUT/$d"
done
