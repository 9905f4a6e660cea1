"""The prompt cache (kvcache.PromptCache, the server's --prompt-cache-tokens) against prefilling every prompt
whole: chat-formatted questions decoded greedily one at a time with the default heads, each question with
the cache and without it in one process (the order alternating per question). The cache starts with one
warm-up request, as a served run's does, and then keeps what each question leaves.

Prints the mean prefill milliseconds (Stats.prefill_s: the prompt's forward and its first token) both
ways, the prompt tokens the cache gave, how many prompts' hidden states differ in any bit from a whole
prefill (after the timed pair, untimed), and how many replies differ.

    python scripts/compare_prompt_cache.py --questions vicuna --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
from collections import OrderedDict

import torch

import draftheads
from draftheads.kvcache import PromptCache
from draftheads.questions import load_questions, question_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="vicuna")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--heads", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-cache-tokens", type=int, default=2048)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = draftheads.load(heads=a.heads, dtype=a.dtype, lookup=False)
    engine = m.decoder.engine
    reason = engine.use_prompt_cache(a.prompt_cache_tokens)
    if reason:
        raise SystemExit(f"no prompt cache: {reason}")
    cache = engine.prompt_cache
    m.generate([{"role": "user", "content": "Say hi."}], max_new_tokens=8)  # the bench's warm-up request
    prefill = {False: [], True: []}
    differ, bits, tokens = 0, 0, []
    for k, q in enumerate(load_questions(question_file(a.questions), a.limit)):
        chat = [{"role": "user", "content": q.turns[0]}]
        out = {}
        probe = PromptCache(cache.max_tokens)  # what the cache holds before this question, for the bit check
        probe.entries, probe.held = OrderedDict(cache.entries), cache.held
        for on in (True, False) if k % 2 == 0 else (False, True):
            engine.prompt_cache = cache if on else None
            r = m.generate(chat, max_new_tokens=a.max_new_tokens)
            prefill[on].append(r.stats.prefill_s)
            out[on] = r.token_ids
            if on:
                tokens.append(r.stats.prompt_tokens)
        differ += out[True] != out[False]
        ids = torch.tensor(m.prompt_ids(chat))
        hidden = {}
        for on in (False, True):  # the prompt's hidden states, whole and from the start the timed run found
            engine.prompt_cache = probe if on else None
            hidden[on] = engine.prefill(engine.new_cache(len(ids)), ids)[0]
        bits += not torch.equal(hidden[True], hidden[False])
    n = len(tokens)
    print(f"{n} questions, {statistics.mean(tokens):.1f} prompt tokens on average; the cache gave "
          f"{cache.counts['tokens_reused'] / max(cache.counts['prompts'] - 1, 1):.1f} a question "
          f"({cache.counts['hits']} hits of {cache.counts['prompts']} prompts, the warm-up's included)")
    print("| prefill | mean ms | median ms |\n|---|---|---|")
    for on in (False, True):
        print(f"| {'cached start' if on else 'whole prompt'} | {1e3 * statistics.mean(prefill[on]):.1f} | "
              f"{1e3 * statistics.median(prefill[on]):.1f} |")
    print(f"prompts whose hidden states differ in any bit: {bits} of {n}; replies that differ: {differ} of {n}")


if __name__ == "__main__":
    main()
