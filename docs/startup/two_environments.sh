#!/bin/bash
# Start-up with two environments on one machine: a 2-step `pretrain train` timed in env1, env2, env1, ...
# env1 is the repository's .venv; env2 is a second venv that reaches env1's packages through a .pth file
# but has its own copy of DeepSpeed (its C++ sources elsewhere, as in a second install). Needs demo_data
# (`make demo-data`). First with one build folder shared by both (torch's default, what medpretrain did
# before), then with medpretrain's per-environment folders.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
E1=$REPO/.venv/bin/python
WORK=$(mktemp -d)
"$E1" -m venv --without-pip "$WORK/env2"
OURS=$("$E1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SITE2=$("$WORK/env2/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$OURS/deepspeed" "$SITE2/"
{ echo "$OURS"; for f in "$OURS"/*.pth; do cat "$f"; echo; done; } > "$SITE2/env1.pth"
E2=$WORK/env2/bin/python
run() {  # $1 python, $2 label: seconds from start to exit of a 2-step run
  local t0 t1 rc
  t0=$(date +%s.%N)
  (cd "$WORK" && "$1" -m pretrain.tools.cli.main train "$REPO/configs/demo.yaml" data.train="$REPO/demo_data/pretrain_2d" \
     eval.knn_train= eval.knn_val= train.steps=2 train.run_dir="$WORK/run_$RANDOM" train.progress=false --no-export \
     > "$WORK/run.log" 2>&1)
  rc=$?
  t1=$(date +%s.%N)
  printf "| %-22s | %d | %5.1f s |\n" "$2" $rc "$(echo "$t1 - $t0" | bc)"
}
echo "shared build folder (torch's default):"
export TORCH_EXTENSIONS_DIR=$WORK/shared_ext
run "$E1" "env1, first"; run "$E1" "env1, warm"; run "$E2" "env2, after env1"; run "$E1" "env1, after env2"
unset TORCH_EXTENSIONS_DIR
echo "a build folder per environment (medpretrain):"
run "$E1" "env1"; run "$E2" "env2, first"; run "$E1" "env1, after env2"; run "$E2" "env2, after env1"
rm -rf "$WORK"
