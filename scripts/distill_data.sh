#!/usr/bin/env bash
# The versioned distilled set (data/distilled/): the default backbone answers the training prompt files
# (never the evaluation files vicuna_bench, arena_hard_v0.1, eagle_humaneval) and, for a quarter of the
# mix, writes the questions itself. Resumable: rerun the same command after a kill or in a later
# session; finished shards are committed with the code, hidden states stay local (features/).
#
#   bash scripts/distill_data.sh [DATA_DIR]       (default DATA_DIR: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-../shared/data}
# --activations float32 --kv-cache float32: the set was distilled with x as it is and a float32 cache (before int8
# activations and the float16 cache); a resumed run keeps that
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} .venv/bin/draftheads distill --activations float32 --kv-cache float32 -o data/distilled --num 16000 --shard-size 500 --batch-size 128 \
    --max-new-tokens 192 --max-prompt-tokens 192 \
    --prompts $D/gsm8k_train.jsonl:0.3 --prompts $D/gpteacher_codegen_instruct.json:0.25 \
    --prompts $D/gpteacher_roleplay_instruct.json:0.12 --prompts $D/self_instruct_user_oriented_252.jsonl:0.016 \
    --prompts $D/self_instruct_seed_tasks_175.jsonl:0.011 --prompts $D/oasst_prompt_lottery_en_250.jsonl:0.016 \
    --prompts $D/arena_hard_v2.0_question.jsonl:0.04 --data-free 0.25 --threads 2
