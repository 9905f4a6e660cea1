#!/usr/bin/env bash
# Reproduce the heads shipped in src/draftheads/default_heads for SmolLM2-135M-Instruct, on CPU, from the
# versioned distilled sets: data/distilled (15,378 conversations, 2.47 M assistant tokens; made by
# scripts/distill_data.sh) and its general-chat supplement data/distilled-chat (scripts/distill_chat.sh).
# Every step is resumable: rerun the same command after a kill.
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

# 1. Medusa-1 on the frozen backbone: 4 heads, one residual block each, own LM heads over the 4,096 most
#    frequent tokens of the backbone's answers (VocabTrim), one epoch over both sets (each keeps its own
#    held-out 5%), on the stored hidden states. A fresh clone has no stored hidden states (a local cache):
#    the trainer computes them first, a shard at a time (bf16 autocast: ~45 min on 2 cores for
#    data/distilled; float32 takes ~3x as long).
[ -f $R/train/heads/config.json ] || $dh train --method medusa1 --data data/distilled --data data/distilled-chat \
    --output $R/train --precompute-features --feature-dtype bfloat16 --num-heads 4 --num-layers 1 --lm-head own --trim-vocab 4096 --epochs 1 --lr 1e-3 --feature-batch 512 \
    --save-dtype float16 --threads 2

#    The n-gram store beside them (src/draftheads/ngrams.py): which token most often followed each context of
#    2-4 tokens in the same replies (seconds).
$dh ngrams --data data/distilled --data data/distilled-chat --heads $R/train/heads

# 2. Calibrate the tree on prompts that are neither training nor evaluation data: 12 training-source
#    prompts that distillation did not use, and 12 general-chat questions the backbone writes itself
#    (data-free, another seed than data/distilled-chat's), for one request and for batches of 2, 4 and 8
#    (the server's batched step); store the trees in the heads' config.json. --lookup also decides by whole
#    replies whether prompt lookup and the n-gram store pay beside the heads there (stored as `lookup`).
.venv/bin/python scripts/unused_prompts.py data/distilled $D/gsm8k_train.jsonl $D/gpteacher_codegen_instruct.json \
    $D/gpteacher_roleplay_instruct.json --num 12 -o $R/calib_files.jsonl
[ -f $R/calib_chat.jsonl ] || $dh distill -o $R/calib_chat.jsonl --num 12 --data-free 1 --seed 7 --max-new-tokens 8 \
    --batch-size 12 --threads 2 --no-progress
cat $R/calib_files.jsonl $R/calib_chat.jsonl > $R/calib_prompts.jsonl
$dh calibrate --heads $R/train/heads --prompts $R/calib_prompts.jsonl --limit 24 --max-new-tokens 96 \
    --max-nodes 32 --latency-sizes 1,2,3,4,5,6,8,12,16,24,32 --latency-steps 16 --measure-limit 8 \
    --batch-sizes 1,2,4,8 --threads 2 --lookup --out $R/tree.json --write-to-heads
#    and for bf16 on this CPU (stored in the heads' device_trees)
$dh calibrate --heads $R/train/heads --prompts $R/calib_prompts.jsonl --limit 24 --max-new-tokens 96 \
    --max-nodes 32 --latency-sizes 1,2,3,4,5,6,8,12,16,24,32 --latency-steps 16 --measure-limit 8 \
    --batch-sizes 1,2,4,8 --threads 2 --dtype bfloat16 --lookup --out $R/tree_bf16.json --write-to-heads
#    and on the llama.cpp engine (its rows cost about a step: the tree and the lookup decided there)
$dh calibrate --heads $R/train/heads --engine llama.cpp --prompts $R/calib_prompts.jsonl --limit 24 --max-new-tokens 96 \
    --max-nodes 8 --latency-sizes 1,2,3,4,6,8 --latency-steps 16 --measure-limit 8 --threads 2 --lookup \
    --out $R/tree_llamacpp.json --write-to-heads
#    The shipped config also holds a calibration for AVX2 CPUs (device_trees["cpu float32 avx2"], stop 64): made on
#    such a CPU with the first command plus --cpu-class, then settled in one process on 40 training-side prompts
#    (scripts/step_phases.py --prompts runs/s61/tune_prompts.jsonl --limit 40 --min-prob 0.3 --alone-trees
#    '[[[0],[1],[0,0]]]'), where calibrate's 8 measured replies could not tell its finalists apart.

# 3. Ship.
mkdir -p src/draftheads/default_heads
cp $R/train/heads/config.json $R/train/heads/model.safetensors $R/train/heads/ngrams.safetensors src/draftheads/default_heads/
