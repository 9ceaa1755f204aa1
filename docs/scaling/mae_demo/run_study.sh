#!/usr/bin/env bash
# The committed MAE IsoFLOP study on the demo data, start to end: plan -> launch slurm (one job array on the
# local one-node cluster) -> collect -> fit. Needs `make demo-data` and a running SLURM (tools/slurm_local_cluster.sh
# start). Writes docs/scaling/mae_demo/{sweep.yaml,table.csv,fit/}; the runs go under runs/scaling-mae-demo/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PRETRAIN=${PRETRAIN:-.venv/bin/pretrain}
OUT=docs/scaling/mae_demo
start=$(date +%s)
# 3 budgets x 5 encoder sizes, down to 16x2 (6.6k parameters) so that each IsoFLOP curve can turn up at both
# ends (second_grid/: 64x4 to 192x8, where the smallest always won); a small decoder so that encoder size moves
# the FLOPs; evaluation at the end only
$PRETRAIN scaling plan configs/demo.yaml objective.decoder_dim=64 objective.decoder_depth=1 objective.decoder_heads=2 \
    eval.at_start=false eval.every=0 train.export_on_end=false train.image_log_every=0 \
    --budgets 1e12 2.5e12 6.25e12 --models 16x2 32x2 48x3 64x4 96x4 --name scaling-mae-demo --max-concurrent 1 \
    --out $OUT/sweep.yaml
rm -rf runs/scaling-mae-demo
submitted=$($PRETRAIN launch slurm configs/demo.yaml --sweep $OUT/sweep.yaml --time 60:00 --cpus-per-task 2 \
    --sweep-dir runs/scaling-mae-demo)
echo "$submitted" | tail -3
job=$(squeue -h -o %F | sort -u | tail -1)
while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 15; done
$PRETRAIN launch status runs/scaling-mae-demo | cut -c1-12,126-
$PRETRAIN scaling collect runs/scaling-mae-demo --out $OUT/table.csv
$PRETRAIN scaling fit $OUT/table.csv --out $OUT/fit --predict-compute 5e13 1e14 \
    --title "MAE on the demo radiographs: 3 budgets x 5 ViT sizes (2 CPU cores)"
echo "study wall time: $(( $(date +%s) - start )) s" | tee $OUT/wall_time.txt
