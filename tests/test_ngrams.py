"""The n-gram store: counts against a brute-force count, the longest stored context first, the chain's
floor, the file, prompt lookup drafting from it, and the loop and the batched step with it (greedy output
equals plain greedy; the batch equals the sequence alone); `draftheads ngrams` and load() on tiny models."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import draftheads
from bench_fixtures import tiny_dirs  # noqa: F401  (fixture)
from draftheads.acceptance import SamplingConfig
from draftheads.batch import BatchDecoder
from draftheads.cli import main
from draftheads.errors import UserError
from draftheads.generate import Decoder, Stats
from draftheads.lookup import LookupConfig, PromptLookup
from draftheads.ngrams import FILE, MIN_NGRAM, NgramStore, token_bits
from draftheads.tree import load_tree
from tiny import tiny_heads, tiny_model


def brute_force(sequences, n, min_count):
    """context tuple -> (next token, share) by counting, ties to the smallest token."""
    counts: dict[tuple, Counter] = {}
    for ids, start in sequences:
        for p in range(max(start, n), len(ids)):
            counts.setdefault(tuple(ids[p - n:p]), Counter())[ids[p]] += 1
    out = {}
    for ctx, c in counts.items():
        total = sum(c.values())
        if total >= min_count:
            best = max(c.values())
            out[ctx] = (min(t for t, k in c.items() if k == best), best / total)
    return out


def test_tables_equal_a_brute_force_count():
    rng = random.Random(0)
    seqs = [([rng.randrange(6) for _ in range(rng.randrange(5, 40))], rng.randrange(0, 6)) for _ in range(60)]
    for min_count in (1, 2, 3):
        store = NgramStore.build(seqs, vocab_size=6, min_count=min_count)
        for n in range(MIN_NGRAM, store.max_ngram + 1):
            want = brute_force(seqs, n, min_count)
            keys, nxt, share = store.tables[n]
            assert len(keys) == len(want) and (np.diff(keys.astype(np.float64)) > 0).all()
            for ctx, (t, s) in want.items():
                key = 0
                for x in ctx:
                    key = (key << store.bits) | x
                i = int(np.searchsorted(keys, np.uint64(key)))
                assert int(keys[i]) == key and nxt[i] == t and share[i] == pytest.approx(s)


def test_prompt_positions_are_context_only():
    store = NgramStore.build([([1, 2, 3, 1, 2, 4], 5)], vocab_size=8, min_count=1)
    assert store.next_token([1, 2]) == (4, 1.0)  # 1 2 -> 3 sits in the prompt: not counted


def test_longest_stored_context_first_and_the_chain_floor():
    seqs = ([([9, 1, 2, 3], 0)] * 3 + [([8, 1, 2, 5], 0)] * 1 + [([7, 1, 2, 5], 0)] * 2 + [([2, 3, 6, 6, 6], 0)] * 2
            + [([2, 3, 7], 0)])
    store = NgramStore.build(seqs, vocab_size=10, min_count=1)
    assert store.next_token([9, 1, 2]) == (3, 1.0)  # the 3-gram
    assert store.next_token([8, 1, 2]) == (5, 1.0)
    assert store.next_token([4, 1, 2]) == (3, 0.5)  # no 3-gram: the 2-gram (1 2 -> 3 three times of six)
    assert store.next_token([4, 4]) is None and store.next_token([2]) is None  # nothing, or shorter than 2
    assert store.chain([4, 1, 2], 3, 0.0)[:2] == [3, 6]  # then 2 3 -> 6 (two of three)
    assert store.chain([4, 1, 2], 3, 0.51) == []  # the first token's share alone is under the floor
    assert store.chain([4, 1, 2], 3, 0.5)[:1] == [3]  # a product equal to the floor is kept
    full = store.chain([9, 1, 2], 5, 0.0)
    assert full[:3] == [3, 6, 6] and len(full) == 5
    assert store.chain([9, 1, 2], 2, 0.0) == full[:2]  # at most `tokens`
    probs, ctx = [], [9, 1, 2]
    for t in full:  # the floor applies to the product of the shares so far
        probs.append(store.next_token(ctx)[1])
        ctx.append(t)
    assert probs[:2] == [1.0, pytest.approx(2 / 3)]
    assert store.chain([9, 1, 2], 5, probs[0] * probs[1] + 1e-6) == full[:1]
    assert store.chain([9, 1, 2], 5, probs[0] * probs[1] - 1e-6)[:2] == full[:2]


def test_a_large_vocabulary_packs_fewer_tokens_a_key():
    assert token_bits(49152) == 16 and token_bits(151936) == 18 and token_bits(2) == 1
    store = NgramStore.build([([150000, 7, 150001, 7, 150000, 7, 150001], 0)], vocab_size=151936, min_count=1)
    assert store.max_ngram == 3  # 3 x 18 bits fit in 64, 4 do not
    assert store.next_token([7, 150000, 7]) == (150001, 1.0)


def test_file_round_trip_and_bad_files(tmp_path):
    rng = random.Random(1)
    seqs = [([rng.randrange(300) for _ in range(50)], 3) for _ in range(40)]
    store = NgramStore.build(seqs, vocab_size=300, min_count=1)
    store.save(tmp_path / FILE, {"note": "test"})
    back = NgramStore.load(tmp_path / FILE, vocab_size=300)
    assert back.tables.keys() == store.tables.keys()
    for n, (k, t, s) in store.tables.items():
        assert (back.tables[n][0] == k).all() and (back.tables[n][1] == t).all()
        np.testing.assert_allclose(back.tables[n][2], s, atol=1e-3)  # shares stored in float16
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(UserError, match="300-token vocabulary"):
        NgramStore.load(tmp_path / FILE, vocab_size=256)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        NgramStore.load(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="another model"):
        NgramStore.build([([1, 2, 300], 0)], vocab_size=300)
    with pytest.raises(UserError, match="min_count"):
        NgramStore.build(seqs, vocab_size=300, min_count=0)


# ------------------------------------------------------------------------------------- prompt lookup

def test_lookup_takes_the_store_chain_where_the_prompt_leaves_room():
    store = NgramStore.build([([5, 6, 7, 8, 9], 0)] * 2, vocab_size=20, min_count=1)
    cfg = LookupConfig(branches=2, tokens=3, store_tokens=2, store_min_prob=0.5)
    lk = PromptLookup(cfg, store)
    lk.observe(None, [1, 5])
    assert lk.branches(6) == [[7, 8]]  # no copy in the context: the store's chain alone
    lk.observe(None, [6, 11, 12, 5])
    assert lk.branches(6) == [[11, 12, 5], [7, 8]]  # the copy first, then the store
    lk.observe(None, [6, 7, 8, 5])
    assert lk.branches(6) == [[7, 8, 5], [11, 12, 5]]  # two copies fill the branches; the store's is a prefix anyway
    full = PromptLookup(cfg, store)
    full.observe(None, [5, 6, 11, 12, 5, 6, 13, 14, 5])
    assert full.branches(6) == [[13, 14, 5], [11, 12, 5]]  # two copies: no room, the store's [7, 8] is not asked
    assert PromptLookup(LookupConfig(store_tokens=0), store).branches(6) == []  # off
    # the default: one branch, the latest copy where the context has one, the store's chain only where it has none
    default = PromptLookup(LookupConfig(tokens=3, store_tokens=2, store_min_prob=0.5), store)
    default.observe(None, [1, 5])
    assert default.branches(6) == [[7, 8]]
    default.observe(None, [6, 11, 12, 5, 6, 13, 14, 5])
    assert default.branches(6) == [[13, 14, 5]]
    short = PromptLookup(LookupConfig(tokens=1, store_tokens=4), store)
    short.observe(None, [1, 5])
    assert short.branches(6) == [[7]]  # `tokens` caps the chain as every branch
    with pytest.raises(UserError, match="store_tokens"):
        LookupConfig(store_tokens=-1)
    with pytest.raises(UserError, match="store_min_prob"):
        LookupConfig(store_min_prob=1.5)


PROMPT = list(range(60, 80))  # no token repeats: prompt lookup alone finds nothing to copy at first


def own_store(model, n=64):
    """A store of the model's own greedy continuation of PROMPT (what distillation would give)."""
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0].tolist()
    return NgramStore.build([(out, len(PROMPT))], vocab_size=model.config.vocab_size, min_count=1), out[len(PROMPT):]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_store_branches_equals_plain_greedy(arch):
    model = tiny_model(arch)
    store, reference = own_store(model)
    heads, tree = tiny_heads(model, num_heads=2), load_tree("chain2", 2)
    for h, t in ((None, None), (heads, tree)):
        stats, out = Stats(), []
        for step in Decoder(model, h, t, PromptLookup(LookupConfig(), store)).steps(PROMPT, 64, SamplingConfig(), stats):
            out += step
            if len(out) >= 64:
                break
        assert out[:64] == reference
        assert stats.lookup_accepted >= 10, "store branches were hardly accepted: the test would prove little"


def test_batched_sequences_with_the_store_equal_each_alone(monkeypatch):
    from draftheads import kvcache
    from test_batch import drive, hf_greedy

    monkeypatch.setattr(kvcache, "_KV_CACHE", "float32")  # then each sequence's output is transformers' greedy
    model = tiny_model("llama")
    store, _ = own_store(model)
    chains = []
    monkeypatch.setattr(store, "chain", lambda *a, f=store.chain: chains.append(f(*a)) or chains[-1])
    heads, tree = tiny_heads(model, num_heads=2), load_tree("chain2", 2)
    prompts = [PROMPT, PROMPT[:12], [3, 4, 5] + PROMPT[5:]]
    batch = BatchDecoder(Decoder(model, heads, tree, PromptLookup(LookupConfig(), store)), slots=3, capacity=160,
                         draft_confidence=0.0)
    assert batch.lookup_store is store
    assert drive(batch, [(p, SamplingConfig(), None) for p in prompts], 40) == [hf_greedy(model, p, 40) for p in prompts]
    assert sum(map(bool, chains)) >= 10, "the store drafted hardly anything: the test would prove little"


# ------------------------------------------------------------------------------------------ the command

def distilled_dir(tmp_path, backbone) -> str:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"question number {i}\n" for i in range(8)))
    out = tmp_path / "distilled"
    assert main(["distill", "--backbone", str(backbone), "--prompts", str(prompts), "-o", str(out), "--batch-size", "4",
                 "--max-new-tokens", "24", "--no-progress", "--threads", "1"]) == 0
    return str(out)


def test_ngrams_command_writes_a_store_that_load_uses(tiny_dirs, tmp_path, capsys):  # noqa: F811
    bb, heads, _ = tiny_dirs
    data = distilled_dir(tmp_path, bb)
    assert main(["ngrams", "--data", data, "--heads", str(heads), "--min-count", "1"]) == 0
    assert "n-gram store" in capsys.readouterr().out
    meta = NgramStore.load(heads / FILE).meta
    assert meta["records"] == 8 and meta["min_count"] == 1 and meta["backbone_fingerprint"]
    dm = draftheads.load(heads=str(heads), backbone=str(bb))
    assert dm.ngrams is not None and dm.ngrams.entries > 0 and dm.decoder.drafter.lookup.store is dm.ngrams
    r = dm.generate("question number 3", max_new_tokens=16)
    plain = draftheads.load(heads=None, backbone=str(bb)).generate("question number 3", max_new_tokens=16)
    assert r.token_ids == plain.token_ids
    off = draftheads.load(heads=str(heads), backbone=str(bb), lookup=False)
    assert off.ngrams is not None and off.decoder.drafter.lookup is None  # kept for bench's methods, not drafted from


def test_ngrams_command_refuses_another_backbones_data(tiny_dirs, tmp_path, capsys):  # noqa: F811
    bb, heads, _ = tiny_dirs
    other = tmp_path / "other"
    from tiny import tiny_tokenizer

    tiny_model(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    data = distilled_dir(tmp_path, other)
    assert main(["ngrams", "--data", data, "--heads", str(heads)]) == 2
    assert "another backbone" in capsys.readouterr().err and not (heads / FILE).exists()
    assert main(["ngrams", "--data", str(tmp_path / "nowhere"), "--heads", str(heads)]) == 2
    assert "not a distilled directory" in capsys.readouterr().err
    # a set that names no backbone (an older manifest) is taken, as training takes it, and said so
    manifest = Path(data) / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "backbone_fingerprint"}))
    assert main(["ngrams", "--data", data, "--heads", str(heads), "--min-count", "1"]) == 0
    assert "records no backbone fingerprint" in capsys.readouterr().err and (heads / FILE).exists()


def test_a_heads_directory_store_for_another_backbone_is_refused_and_the_shipped_one_is_not_taken(tiny_dirs, tmp_path):  # noqa: F811
    bb, heads, _ = tiny_dirs
    assert draftheads.load(heads=str(heads), backbone=str(bb)).ngrams is None  # the shipped store is the default model's
    other = tmp_path / "other_heads"
    from draftheads.heads.checkpoint import save_heads

    save_heads(tiny_heads(tiny_model(seed=1), 3), other)
    NgramStore.build([([1, 2, 3, 4], 0)], vocab_size=tiny_model().config.vocab_size, min_count=1).save(
        heads / FILE, {"backbone_fingerprint": json.loads((other / "config.json").read_text())["backbone_fingerprint"]})
    with pytest.raises(UserError, match="another backbone"):
        draftheads.load(heads=str(heads), backbone=str(bb))


# ------------------------------------------------------------------------------------------------ pins

def test_pins_of_the_store_rules_mutation_testing_found_loose(tmp_path):
    """Rules that survived mutants of ngrams.py (scripts/mutation.sh ngrams, stop 59)."""
    import os
    import stat

    from safetensors import safe_open
    from safetensors.numpy import save_file

    # the floor is on the product of the shares, also where the first share is under 1
    seqs = [([1, 2, 3, 4], 0)] * 3 + [([1, 2, 3, 6], 0), ([1, 2, 5], 0)]
    store = NgramStore.build(seqs, vocab_size=10, min_count=1)
    assert store.next_token([1, 2]) == (3, pytest.approx(0.8)) and store.next_token([1, 2, 3]) == (4, 0.75)
    assert store.chain([1, 2], 3, 0.0) == [3, 4] and store.chain([1, 2], 3, 0.7) == [3]  # 0.8 x 0.75 = 0.6 < 0.7
    seqs = [([1, 2, 3, 4, 5], 0)] * 4 + [([1, 2, 3, 4, 6], 0), ([1, 2, 7], 0)]  # shares 5/6, 1, 4/5
    store = NgramStore.build(seqs, vocab_size=10, min_count=1)
    assert store.chain([1, 2], 3, 0.0) == [3, 4, 5] and store.chain([1, 2], 3, 0.7) == [3, 4]  # 2/3 < 0.7 <= 5/6
    # the context grows to max_ngram tokens, then slides by one: the 3-gram 1 2 3 -> 4, not the 2-gram 2 3 -> 7
    seqs = [([1, 2, 3, 4], 0)] * 2 + [([5, 2, 3, 7], 0)] * 3
    store = NgramStore.build(seqs, vocab_size=10, max_ngram=3, min_count=1)
    assert store.next_token([2, 3]) == (7, pytest.approx(0.6)) and store.next_token([1, 2, 3]) == (4, 1.0)
    assert store.chain([1, 2], 2, 0.0) == [3, 4] and store.chain([0, 1, 2], 2, 0.0) == [3, 4]
    # max_ngram: 2 is allowed; cut to what 64 bits hold (5 bits a token: 12)
    assert NgramStore.build(seqs, vocab_size=10, max_ngram=2, min_count=1).max_ngram == 2
    assert NgramStore.build([(list(range(20)) * 2, 0)], vocab_size=32, max_ngram=20, min_count=1).max_ngram == 12
    assert token_bits(65536) == 16 and token_bits(65537) == 17
    assert NgramStore.build([(list(range(8)) * 2, 0)], vocab_size=10, min_count=1).max_ngram == 4  # the default
    with pytest.raises(UserError, match="leaves no room for 2-token contexts"):
        NgramStore.build(seqs, vocab_size=2 ** 33)
    # no context at all (replies of fewer than 2 tokens after their context): an empty store that drafts nothing
    empty = NgramStore.build([([1, 2], 0)], vocab_size=10, min_count=1)
    assert empty.tables == {} and empty.chain([1, 2], 4, 0.0) == [] and empty.next_token([1, 2]) is None
    # the file: next tokens in 16 bits where they fit, shares in float16; readable as the umask allows
    old = os.umask(0o022)
    try:
        NgramStore.build(seqs, vocab_size=49152, min_count=1).save(tmp_path / "a.safetensors", {})  # 16 bits
        NgramStore.build([([150000, 7, 150001, 7], 0)], vocab_size=151936, min_count=1).save(tmp_path / "b.safetensors", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
    wide = NgramStore.build([([70000, 7, 70001, 7, 70000, 7, 70001], 0)], vocab_size=100000, min_count=1)  # 17 bits
    wide.save(tmp_path / "c.safetensors", {})
    assert NgramStore.load(tmp_path / "c.safetensors").next_token([70000, 7]) == (70001, 1.0)
    for name, want in (("a", np.uint16), ("b", np.int32)):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="numpy") as f:
            assert f.get_tensor("next.2").dtype == want and f.get_tensor("share.2").dtype == np.float16
    save_file({"x": np.zeros(2, dtype=np.float32)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="is not an n-gram store"):
        NgramStore.load(tmp_path / "other.safetensors")
