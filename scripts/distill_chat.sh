#!/usr/bin/env bash
# A general-chat supplement to data/distilled (data/distilled-chat/): the default backbone writes the user
# turn itself (data-free, sampled at temperature 1) and answers it greedily. Why: on vicuna_bench the heads
# trained on data/distilled are right far less often on general questions (knowledge, common-sense,
# generic, writing: head-1 top-1 0.26-0.31) than on code or math (0.49-0.69), and data/distilled's only
# general-chat sources are its data-free quarter and ~1,100 file prompts (docs/training.md). No prompt
# file is read, so no evaluation data can enter. Resumable: rerun after a kill or in a later session.
#
#   bash scripts/distill_chat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# --activations float32 --kv-cache float32: the set was distilled with x as it is and a float32 cache (before int8
# activations and the float16 cache); a resumed run keeps that
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} .venv/bin/draftheads distill --activations float32 --kv-cache float32 -o data/distilled-chat --num 3000 \
    --shard-size 500 --batch-size 128 --max-new-tokens 192 --max-prompt-tokens 192 --data-free 1 --seed 1 \
    --threads 2
