"""Defaults every command shares, defined once. Imports nothing heavy: the CLI reads them to build
its parser, and `--help` must not pay for importing torch."""

from __future__ import annotations

# torch CPU threads for every command (--threads). 0: one per core, fewer on a busy machine (set_threads).
THREADS = 0

# New tokens per reply for `generate`, `chat` and the Python API: long enough that a typical
# assistant answer ends at its end-of-turn token rather than mid-sentence (256 cut replies short).
MAX_NEW_TOKENS = 512

# Prompt-lookup branches in the tree beside the heads (--lookup / --no-lookup, load(lookup=...)); without heads
# decoding stays plain unless asked. On since stop 56: with a draft row ~9% of a step, the branches pay for one
# request (vicuna, all 80: 1.06-1.09x heads alone; unused training prompts 1.10x; served at 1 client 1.17-1.22x
# plain against 1.08-1.12x without), and served batches take them only where their own rounds measure them faster
# (batch.py; at 8 clients they padded every pass: 0.88x). Off on 2026-12-02, when a row cost ~2x more.
LOOKUP = True

# Requests the server decodes together (--max-batch): each verify pass covers every running request's
# tree (batch.py). 1 serves one request at a time.
MAX_BATCH = 8
# Prompt tokens the server prefills between two batched passes (--prefill-chunk): a 2,000-token prompt
# prefilled at once would stall the running streams for seconds on a CPU.
PREFILL_CHUNK = 256
# Tokens of recent prompts whose keys the server keeps (--prompt-cache-tokens; kvcache.PromptCache), so that a
# request that starts as an earlier one did (its chat template's system prompt) prefills only the rest. The
# default model holds 48 KB a token in fp32: 2,048 tokens are ~100 MB.
PROMPT_CACHE_TOKENS = 2048
# Hydra heads' first block (--grounded-residual): its residual path is a learned projection of [h, E(path)]
# (Hydra's) or h itself (half the parameters). Here, not in heads/, because the CLI must not import torch.
GROUNDED_RESIDUALS = ("projection", "hidden")
# The server's limits (serve's options and create_app's arguments): the largest request body in bytes,
# the longest prompt and the largest max_tokens a request may ask for (tokens), the reply length when a
# request names none, requests that may wait (more get 429), and a batch slot's tokens (prompt + reply).
MAX_BODY_BYTES = 1 << 20
MAX_PROMPT_TOKENS = 4096
MAX_TOKENS_LIMIT = 2048
DEFAULT_MAX_TOKENS = 256
QUEUE_SIZE = 16
MAX_SEQ_LEN = 2048
# Rows a batched pass of B >= 2 sequences gives each sequence for its tree and prompt lookup's branches together:
# BATCH_LOOKUP_ROWS // B (at least its tree; lookup's branches are cut to fit, the longest match first). Past a few
# rows a pass is compute-bound on a CPU (~0.3 ms a row of the default model here): uncut, lookup's 2 branches of 5
# tokens made a round of 4 sequences cost 2.1x a plain one (0.95x its tokens/s), of 8 2.4x (0.69x); cut to this share
# 1.5x (1.13x) and 1.3x (1.00x); at 2 sequences the cut gained too (1.43x -> 1.61x plain's tokens/s). Stop 57,
# scripts/time_lookup_rounds.py.
BATCH_LOOKUP_ROWS = 16
# Where a batch size's table entry is plain, the served rounds (ADAPT_TREES) take lookup's branches only while their
# recent pairs of rounds measure them this much faster than plain: the pairs' ratio strays from every round's by a
# few % either way (scripts/round_pairs.py at 8 sequences: 1.008 against 0.988, 1.030 against 1.075; stop 57), and
# without a margin a served run at 8 clients flipped to branches in 38% of its rounds, which ran 0.85x plain's
# tokens/s (a tie is plain's: the table chose plain there).
LOOKUP_MARGIN = 1.05
# Tree nodes one batched pass verifies when the heads carry no tree per batch size (--max-tree-rows):
# a CPU's matmuls turn compute-bound at a few rows, so past it the running requests decode plainly.
MAX_TREE_ROWS = 16
# In a batched pass of two or more sequences, tree nodes whose path the heads give less than this
# probability are not verified (batch.py: MedusaHeads.draft_confident; --draft-confidence): each costs a
# row of the pass. The cut where the heads carry none calibrated per batch size (next).
BATCH_DRAFT_CONFIDENCE = 0.2
# The cuts `calibrate --batch-sizes` chooses from, per batch size, with that size's tree; serve takes the
# chosen one. What a row is worth depends on the batch: in calibrate's bf16 rounds here a row cost 0.6-2 ms
# of a 34-42 ms plain round of 8 sequences (0.15-0.38 tokens' worth), ~1 ms of a 28 ms round of 2 (0.07).
BATCH_DRAFT_CONFIDENCES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# The server's batched rounds take the heads' trees or decode plainly at each batch size, whichever its own
# served rounds measured faster (--adapt-trees; round_costs.py): calibrate's table predicted a gain at 8
# sequences that served runs did not show.
ADAPT_TREES = True

# What the CPU products of weights held in GGUF Q4_1 / Q8_0 blocks (the default model's: few_rows.py) multiply
# (--activations): "int8" rounds each row of x to 8 bits per block of 32 inputs and sums integer products, as
# llama.cpp's CPU dot products do (a one-row pass of the default model 8.2 -> 6.4 ms on this project's AVX2 EPYC, 8
# rows 23.5 -> 12.9; top-1 as float32's at 95% of positions, +0.5% NLL on human answers: docs/results.md, stop 47);
# "float32" multiplies the blocks' exact float32 values by x as it is. Either way a row's result never depends on
# the rows beside it, so speculative output equals plain output; the two modes' outputs differ from each other by
# that rounding. Process-wide, like the thread count.
ACTIVATIONS = "int8"
ACTIVATION_KINDS = ("int8", "float32")

# What the KV cache stores keys and values in under a float32 forward on a CPU (--kv-cache): "float16" halves the
# bytes every step's attention reads, which bound batches and long contexts (docs/verify_profile.md; llama.cpp's
# default cache type too); each key and value is rounded to the nearest half when written, and the attention's
# sums stay float32. Every pass reads the same rounded entries, so speculative output still equals plain output.
# "float32" keeps them as computed. Process-wide, like --activations.
KV_CACHE = "float16"
KV_CACHE_KINDS = ("float16", "float32")


def set_threads(threads: int | None, flag: bool = True) -> None:
    """Apply --threads. 0 or None: one thread per core, unless other jobs already keep the cores busy
    (1-minute load average), then fewer: beside a busy 2-thread process our 2-thread loop with heads
    fell from 31.8 to 1.0 tokens/s (OpenMP threads spinning against it), with 1 thread it ran at 11.7
    (docs/results.md, "Threads beside another job")."""
    if threads is not None and threads < 0:
        from .errors import UserError

        raise UserError(f"--threads must be 0 (torch's default) or more, not {threads}")
    if not threads:
        threads = _threads_for_load(flag)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _threads_for_load(flag: bool = True) -> int | None:
    """A thread count below the core count when other work holds cores (None: keep torch's default); the note
    names --threads where the command has it."""
    import os
    import sys

    try:
        cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    free = cores - int(load + 0.5)
    if cores < 2 or free >= cores:
        return None
    threads = max(1, free)
    print(f"draftheads: note: the machine is busy (load average {load:.1f} on {cores} cores): using {threads} "
          f"torch thread(s){'; --threads N chooses' if flag else ''}", file=sys.stderr)
    return threads
