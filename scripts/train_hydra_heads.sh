#!/usr/bin/env bash
# Reproduce the Hydra++ heads shipped in src/draftheads/default_hydra_heads (`--heads hydra`) for
# SmolLM2-135M-Instruct, on CPU, from the versioned distilled set data/distilled, the data of the shipped
# Medusa heads; then compare both in one run on held-out vicuna questions. Resumable: rerun after a kill.
#
#   bash scripts/train_hydra_heads.sh [DATA_DIR] [TRAIN_TOKENS]    (defaults: ../shared/data, the whole split)
#
# Size: own LM heads and Hydra's learned residual projections make 44 MB of Hydra++ heads, over the 40 MB
# all shipped heads may take beside the 21.6 MB Medusa heads; the backbone's own (frozen) output rows
# (--lm-head shared, over the same 4,096 VocabTrim ids) and the hidden state as the first block's residual
# (--grounded-residual hidden) make 15.9 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-../shared/data}
N=${2:-}
if [ ! -f "$D/gsm8k_train.jsonl" ]; then
    echo "train_hydra_heads.sh: no training prompts in $D: fetch them (docs/training.md, \"Prompt files\") and pass their folder" >&2
    exit 2
fi
R=runs/hydra
dh=.venv/bin/draftheads
mkdir -p $R

# 1. Hydra++ with the released recipe (teacher loss only, dropout 0.2), one epoch, on the stored hidden states
#    (computed first on a fresh clone: bf16 autocast pays only on CPUs with BF16 instructions).
[ -f $R/train/heads/config.json ] || $dh train --method hydra++ --data data/distilled --output $R/train \
    --precompute-features --feature-dtype bfloat16 ${N:+--train-tokens $N} --num-heads 4 --num-layers 1 \
    --lm-head shared --trim-vocab 4096 --grounded-residual hidden --soft-targets --dropout 0.2 --epochs 1 \
    --batch-size 8 --lr 1e-3 --save-dtype float16 --threads 2

# 2. Calibrate its tree on the prompts the Medusa heads were calibrated on (scripts/train_default_heads.sh, step 2: 12
#    training-source prompts distillation did not use and 12 data-free chat questions), made the same way where that
#    run left none; the shipped configs of both head sets were calibrated on them.
C=runs/default
if [ ! -f $C/calib_prompts.jsonl ]; then
    mkdir -p $C
    .venv/bin/python scripts/unused_prompts.py data/distilled $D/gsm8k_train.jsonl $D/gpteacher_codegen_instruct.json \
        $D/gpteacher_roleplay_instruct.json --num 12 -o $C/calib_files.jsonl
    [ -f $C/calib_chat.jsonl ] || $dh distill -o $C/calib_chat.jsonl --num 12 --data-free 1 --seed 7 --max-new-tokens 8 \
        --batch-size 12 --threads 2 --no-progress
    cat $C/calib_files.jsonl $C/calib_chat.jsonl > $C/calib_prompts.jsonl
fi
[ -f $R/calib_prompts.jsonl ] || cp $C/calib_prompts.jsonl $R/calib_prompts.jsonl
[ -f $R/tree.json ] || $dh calibrate --heads $R/train/heads --prompts $R/calib_prompts.jsonl --limit 24 \
    --max-new-tokens 96 --max-nodes 32 --latency-sizes 1,2,3,4,5,6,8,12,16,24,32 --latency-steps 16 \
    --measure-limit 8 --threads 2 --lookup --out $R/tree.json --write-to-heads
#    and for bf16 on this CPU (stored in the heads' device_trees)
[ -f $R/tree_bf16.json ] || $dh calibrate --heads $R/train/heads --prompts $R/calib_prompts.jsonl --limit 24 \
    --max-new-tokens 96 --max-nodes 32 --latency-sizes 1,2,3,4,5,6,8,12,16,24,32 --latency-steps 16 \
    --measure-limit 8 --threads 2 --dtype bfloat16 --lookup --out $R/tree_bf16.json --write-to-heads
#    and on the llama.cpp engine. Each run with --lookup also decides whether prompt lookup pays beside the heads there
#    and keeps the heads' own tree apart (heads_alone) for --no-lookup (docs/results.md, stop 60).
[ -f $R/tree_llamacpp.json ] || $dh calibrate --heads $R/train/heads --engine llama.cpp --prompts $R/calib_prompts.jsonl \
    --limit 24 --max-new-tokens 96 --max-nodes 8 --latency-sizes 1,2,3,4,6,8 --latency-steps 16 --measure-limit 8 \
    --threads 2 --lookup --out $R/tree_llamacpp.json --write-to-heads

# 3. Shipped Medusa heads against these, each with its own calibrated tree, interleaved per prompt.
[ -f $R/compare.json ] || .venv/bin/python scripts/compare_heads.py --heads default --heads $R/train/heads \
    --limit 20 --max-new-tokens 128 --out $R/compare.json
[ -f $R/compare_bf16.json ] || .venv/bin/python scripts/compare_heads.py --heads default --heads $R/train/heads \
    --dtype bfloat16 --limit 20 --max-new-tokens 128 --out $R/compare_bf16.json

# 4. Ship.
mkdir -p src/draftheads/default_hydra_heads
cp $R/train/heads/config.json $R/train/heads/model.safetensors src/draftheads/default_hydra_heads/
