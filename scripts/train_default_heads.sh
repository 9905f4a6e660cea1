#!/usr/bin/env bash
# Reproduce the heads shipped in src/draftheads/default_heads for SmolLM2-135M-Instruct, on CPU.
# Every step is resumable: rerun the same command after a kill. On this project's 2-core CPU machine
# the shipped run stopped distillation early to fit a 3-hour session (docs/training.md has the counts);
# with more time, let step 1 run longer: more conversations mean more accurate heads.
#
#   bash scripts/train_default_heads.sh [DATA_DIR]       (default DATA_DIR: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-../shared/data}
if [ ! -f "$D/gsm8k_train.jsonl" ]; then
    echo "train_default_heads.sh: no training prompts in $D: fetch them (docs/training.md, \"Prompt files\") and pass their folder" >&2
    exit 2
fi
R=runs/default
dh=.venv/bin/draftheads
mkdir -p $R

# 1. Self-distillation: the backbone answers the training prompt files (never the evaluation files
#    vicuna_bench, arena_hard_v0.1, eagle_humaneval) and, for part of the mix, writes the questions itself.
$dh distill -o $R/conversations.jsonl --num 6000 --max-new-tokens 192 --max-prompt-tokens 160 --batch-size 48 \
    --prompts $D/gsm8k_train.jsonl:1 --prompts $D/gpteacher_codegen_instruct.json:1 \
    --prompts $D/gpteacher_roleplay_instruct.json:1 --prompts $D/self_instruct_user_oriented_252.jsonl:0.3 \
    --prompts $D/self_instruct_seed_tasks_175.jsonl:0.2 --prompts $D/oasst_prompt_lottery_en_250.jsonl:0.3 \
    --prompts $D/arena_hard_v2.0_question.jsonl:0.5 --data-free 0.6 --threads 2

# 2. Medusa-1 on the frozen backbone: 4 heads, own LM heads over the 4,096 most frequent tokens of the
#    backbone's answers (VocabTrim), trained on precomputed hidden states; float16 on disk.
$dh train --method medusa1 --data $R/conversations.jsonl --output $R/train --precompute-features \
    --num-heads 4 --num-layers 1 --lm-head own --trim-vocab 4096 --epochs 3 --lr 1e-3 --feature-batch 512 \
    --save-dtype float16 --threads 2

# 3. Calibrate the tree on training-source prompts that distillation did not use (neither training
#    nor evaluation data), and store it in the heads' config.json.
.venv/bin/python scripts/unused_prompts.py $R/conversations.jsonl $D/gsm8k_train.jsonl \
    $D/gpteacher_codegen_instruct.json $D/gpteacher_roleplay_instruct.json $D/arena_hard_v2.0_question.jsonl \
    --num 24 -o $R/calib_prompts.jsonl
$dh calibrate --heads $R/train/heads --prompts $R/calib_prompts.jsonl --limit 24 --max-new-tokens 96 \
    --max-nodes 32 --latency-sizes 1,2,3,4,5,6,8,12,16,24,32 --latency-steps 16 --measure-limit 8 --threads 2 \
    --out $R/tree.json --write-to-heads

# 4. Ship.
mkdir -p src/draftheads/default_heads
cp $R/train/heads/config.json $R/train/heads/model.safetensors src/draftheads/default_heads/
