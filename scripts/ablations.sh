#!/usr/bin/env bash
# Recipe ablations of issue 10 (docs/training.md, "Recipe ablations"): Medusa-1 on ~250 k assistant tokens of
# the distilled set's training split, evaluated on the same 769 held-out conversations as the data-size curve,
# the shipped recipe and one change each. Resumable: finished runs (heads present) are skipped.
#
#   bash scripts/ablations.sh [TRAIN_TOKENS]        (default 250000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-250000}
R=runs/ablate
mkdir -p $R
common=(--method medusa1 --data data/distilled --precompute-features --feature-dtype bfloat16 --num-heads 4
        --epochs 1 --lr 1e-3 --feature-batch 512 --save-dtype float16 --threads 2 --train-tokens "$N")
run() {  # NAME FLAGS...
    local name=$1; shift
    [ -f $R/$name/heads/config.json ] || .venv/bin/draftheads train --output $R/$name "${common[@]}" "$@" 2>&1 | tee -a $R/$name.log
}
run base     --num-layers 1 --lm-head own --trim-vocab 4096
run trim8192 --num-layers 1 --lm-head own --trim-vocab 8192
run blocks2  --num-layers 2 --lm-head own --trim-vocab 4096
run soft     --num-layers 1 --lm-head own --trim-vocab 4096 --soft-targets
