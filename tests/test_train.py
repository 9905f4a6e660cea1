"""Medusa-1 training: target alignment, loss masks, VocabTrim maps, a learning step, resume, the CLI."""

import json
import re

import pytest
import torch
from tiny import EOS, tiny_model, tiny_tokenizer

from draftheads.backbone import Backbone
from draftheads.errors import UserError
from draftheads.heads import HeadsConfig, MedusaHeads, load_heads
from draftheads.heads.vocab import IGNORE, build_vocab_map, count_tokens, full_to_trimmed, trim_targets
from draftheads.train import trainer
from draftheads.train.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from draftheads.train.data import head_targets, load_training_sets, tokenize_conversation
from draftheads.tree import Tree


def test_head_k_targets_token_t_plus_2_plus_k():
    ids = torch.arange(100, 110)
    mask = torch.tensor([False] * 3 + [True] * 7)
    t = head_targets(ids, mask, 3)  # [10, 3]
    for pos in range(10):
        for k in range(3):
            j = pos + 2 + k  # hidden at pos predicts pos+1 itself; head k is k+1 beyond that
            assert t[pos, k] == (ids[j] if j < 10 and mask[j] else IGNORE)


def test_loss_mask_covers_assistant_tokens_only():
    tok = tiny_tokenizer()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok!"}]
    ids, mask = tokenize_conversation(tok, conv, 1024)
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)
    assert tok.decode(ids[mask]) == "yo<|im_end|>\nok!<|im_end|>\n"


def test_vocab_trim_map_round_trip():
    counts = torch.tensor([5, 0, 9, 9, 1, 0, 7, 2])
    vmap = build_vocab_map(counts, 3, always=[5])
    assert vmap.tolist() == [2, 3, 5]  # 9, 9 (ties: lower id first) and the forced id 5, sorted
    table = full_to_trimmed(vmap, 8)
    assert table[vmap].tolist() == [0, 1, 2] and table[0] == IGNORE
    assert trim_targets(torch.tensor([[3, 0], [IGNORE, 5]]), table).tolist() == [[1, IGNORE], [IGNORE, 2]]
    assert count_tokens([(torch.tensor([1, 1, 2]), torch.tensor([True, False, True]))], 4).tolist() == [0, 1, 1, 0]
    heads = MedusaHeads(HeadsConfig(num_heads=2, hidden_size=8, vocab_size=8, trimmed_vocab=3))
    heads.vocab_map.copy_(vmap)
    drafted = heads.draft(torch.randn(8), torch.tensor(0), Tree([[0], [0, 2]]))
    assert set(drafted[1:].tolist()) <= set(vmap.tolist())  # drafts come back as full ids


def test_a_few_steps_lower_the_loss():
    model = tiny_model()
    heads = MedusaHeads(HeadsConfig(num_heads=2, hidden_size=64, vocab_size=model.config.vocab_size))
    heads.init_lm_heads_from(model)
    torch.manual_seed(0)
    hidden, targets = torch.randn(32, 64), torch.randint(0, 200, (32, 2))
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _ = trainer.medusa_loss(heads(hidden), targets, 0.8)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def _conversations(path):
    # A learnable pattern: every answer is the same text, so heads can reach high accuracy quickly.
    recs = [{"id": str(i), "messages": [{"role": "user", "content": f"count {i}"},
                                        {"role": "assistant", "content": "abcdefghij" * 2}]} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(tmp_path, out, **optim):
    return TrainConfig(model=ModelConfig(num_heads=2, trim_vocab=64), data=DataConfig(
        paths=[str(_conversations(tmp_path / "c.jsonl"))], eval_fraction=0.2, precompute_features=True),
        optim=OptimConfig(epochs=2, feature_batch=64, lr=3e-3, **optim),
        run=RunConfig(output=str(out), checkpoint_every=1, progress=False))


def _bb():
    return Backbone(model=tiny_model(), tokenizer=tiny_tokenizer(), name="tiny")


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    ref = load_heads(trainer.train(_cfg(tmp_path, tmp_path / "a"), _bb()))
    real = trainer.save_checkpoint

    def killed(path, heads, opt, sched, step):
        real(path, heads, opt, sched, step)
        if step == 3:
            raise KeyboardInterrupt  # stands in for SIGKILL right after a checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_cfg(tmp_path, tmp_path / "b"), _bb())
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    got = load_heads(trainer.train(_cfg(tmp_path, tmp_path / "b"), _bb()))
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    hist = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and len(hist[-1]["top1"]) == 2


def test_a_resume_with_other_settings_or_an_unreadable_checkpoint_is_one_line(tmp_path, monkeypatch):
    real = trainer.save_checkpoint

    def killed(path, heads, opt, sched, step):
        real(path, heads, opt, sched, step)
        raise KeyboardInterrupt  # after the first checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_cfg(tmp_path, tmp_path / "r"), _bb())
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    other = _cfg(tmp_path, tmp_path / "r")
    other.model.num_heads = 1
    with pytest.raises(UserError, match="holds a checkpoint of other settings .*train_config.json"):
        trainer.train(other, _bb())
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # cut short by a full disk or a copy
    with pytest.raises(UserError, match="cannot read the checkpoint .*delete it to start the run over"):
        trainer.train(_cfg(tmp_path, tmp_path / "r"), _bb())


def test_a_run_that_cannot_start_leaves_no_output(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "never")
    cfg.data.paths = [str(tmp_path / "no_such.jsonl")]
    with pytest.raises(UserError):
        trainer.train(cfg, _bb())
    (tmp_path / "plain_dir").mkdir()
    cfg.data.paths = [str(tmp_path / "plain_dir")]
    with pytest.raises(UserError, match="plain_dir is not a distilled directory .*or pass a conversations JSONL file"):
        trainer.train(cfg, _bb())
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("section,field,value,message", [
    ("data", "eval_fraction", 1.5, "0 <= eval_fraction < 1"), ("data", "eval_fraction", -0.5, "0 <= eval_fraction < 1"),
    ("data", "max_length", 1, "max_length >= 2"), ("data", "train_tokens", -5, "train_tokens >= 1"),
    ("optim", "batch_size", 0, "batch_size, feature_batch"), ("optim", "feature_batch", 0, "batch_size, feature_batch"),
    ("run", "checkpoint_every", 0, "checkpoint_every must be at least 1"),
    ("joint", "init_heads", "/no/such/heads", "init_heads (--init-heads) starts Medusa-2's joint stage")])
def test_config_rejects_out_of_range_settings(section, field, value, message):
    cfg = TrainConfig(data=DataConfig(paths=["x"]), run=RunConfig(output="y"))
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(UserError, match=re.escape(message)):
        cfg.validate()


def test_soft_targets_run(tmp_path):
    heads = load_heads(trainer.train(_cfg(tmp_path, tmp_path / "s", soft_targets=True), _bb()))
    assert heads.cfg.trimmed_vocab == 64 and EOS in heads.vocab_map.tolist()


def test_train_flag_defaults_are_the_config_defaults():
    import argparse

    from draftheads.train.cli import add_train_args

    args = argparse.ArgumentParser()
    add_train_args(args)
    ns = args.parse_args(["--data", "d", "--output", "o"])
    assert ns.data == ["d"] and args.parse_args(["--data", "d", "--data", "e", "--output", "o"]).data == ["d", "e"]
    m, r = ModelConfig(), RunConfig()
    assert (ns.trim_vocab, ns.save_dtype) == (m.trim_vocab, r.save_dtype) == (4096, "float16")  # what the docs advise
    assert (ns.num_heads, ns.lr, ns.checkpoint_every) == (m.num_heads, OptimConfig().lr, r.checkpoint_every)


def test_trim_at_or_above_the_vocabulary_keeps_it_whole(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "w")
    cfg.model.trim_vocab, cfg.optim.epochs = 4096, 1  # the default N; the tiny vocabulary has 259 tokens
    heads = load_heads(trainer.train(cfg, _bb()))
    assert heads.cfg.trimmed_vocab is None
    with pytest.raises(UserError, match="trim_vocab"):
        TrainConfig(model=ModelConfig(trim_vocab=1), data=DataConfig(paths=["x"]), run=RunConfig(output="y")).validate()


def test_config_rejects_a_grounded_residual_for_medusa_heads_and_unknown_values():
    def check(**model):
        TrainConfig(model=ModelConfig(**model), data=DataConfig(paths=["x"]), run=RunConfig(output="y")).validate()

    check(head_type="hydra++", grounded_residual="hidden")
    with pytest.raises(UserError, match="^grounded_residual applies to Hydra heads"):
        check(grounded_residual="hidden")
    with pytest.raises(UserError, match="^grounded_residual must be 'projection' or 'hidden', not 'none'$"):
        check(head_type="hydra", grounded_residual="none")


def test_config_rejects_unknown_keys():
    with pytest.raises(UserError, match="lr_rate"):
        TrainConfig.from_dict({"optim": {"lr_rate": 1}})
    with pytest.raises(UserError, match="optimiser"):
        TrainConfig.from_dict({"optimiser": {}})


def test_each_source_is_split_on_its_own_so_adding_one_keeps_the_others_held_out_part(tmp_path):
    tok = tiny_tokenizer()
    a = _conversations(tmp_path / "a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"b {i}"},
                                                  {"role": "assistant", "content": "zyxw" * (1 + i % 3)}]}) + "\n"
                         for i in range(8)))
    seqs1, _, train1, eval1, _ = load_training_sets([str(a)], tok, 1024, 0.25, 0)
    seqs2, _, train2, eval2, src2 = load_training_sets([str(a), str(b)], tok, 1024, 0.25, 0)
    assert len(seqs2) == len(seqs1) + 8 and sorted(train2 + eval2) == list(range(len(seqs2)))
    ids = lambda seqs, idx: [seqs[i][0].tolist() for i in idx]  # noqa: E731
    n = len(seqs1)
    assert ids(seqs2, [i for i in eval2 if i < n]) == ids(seqs1, eval1) and len(eval1) == 4
    assert ids(seqs2, [i for i in train2 if i < n]) == ids(seqs1, train1)
    assert len([i for i in eval2 if i >= n]) == 2  # b's own quarter
    assert src2 == [str(a)] * n + [str(b)] * 8
    with pytest.raises(UserError, match="at least 2 usable"):
        b.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}]}) + "\n")
        load_training_sets([str(a), str(b)], tok, 1024, 0.25, 0)


def test_train_cli_online_mode(tmp_path, capsys):
    from draftheads.cli import main

    bb = tmp_path / "bb"
    tiny_model().save_pretrained(bb)
    tiny_tokenizer().save_pretrained(bb)
    data = _conversations(tmp_path / "c.jsonl")
    (tmp_path / "more.jsonl").write_text((tmp_path / "c.jsonl").read_text().replace("count", "tally"))
    argv = ["train", "--backbone", str(bb), "--data", str(data), "--data", str(tmp_path / "more.jsonl"),
            "--output", str(tmp_path / "run"), "--num-heads", "2",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--lm-head", "shared", "--trim-vocab", "32"]
    assert main(argv) == 0
    heads = load_heads(tmp_path / "run" / "heads")
    assert heads.cfg.lm_head == "shared" and heads.cfg.backbone == str(bb) and heads.cfg.backbone_fingerprint
    out = capsys.readouterr().out
    assert "will write" in out and "checkpoint.pt" in out and "MB in float16" in out  # sizes said before writing
    assert "train: 30 conversations" in out and "2 held out" in out  # both sources, 16 each, one held out of each
    per_source = json.loads((tmp_path / "run" / "eval.json").read_text())[-1]["per_source"]
    assert list(per_source) == [str(data), str(tmp_path / "more.jsonl")] and f"  {data}: top1 " in out
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "run" / "heads" / "model.safetensors")
    assert stored["blocks.0.0.linear.weight"].dtype == torch.float16  # the default save dtype
    assert main(["train", "--backbone", str(bb), "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("DRAFTHEADS_SLOW_TESTS"), reason="set DRAFTHEADS_SLOW_TESTS=1 (~45 s)")
def test_two_processes_gloo(tmp_path):
    """The accelerate path with 2 CPU processes (gloo), launched by torchrun as `accelerate launch` would."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bb = tmp_path / "bb"
    tiny_model().save_pretrained(bb)
    tiny_tokenizer().save_pretrained(bb)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "draftheads.cli", "train",
           "--backbone", str(bb), "--data", str(_conversations(tmp_path / "c.jsonl")), "--output", str(tmp_path / "run"),
           "--num-heads", "2", "--precompute-features", "--feature-batch", "32", "--epochs", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout and "MULTI_CPU" in done.stdout
    assert load_heads(tmp_path / "run" / "heads").cfg.num_heads == 2


def test_train_on_distilled_directory_uses_stored_hidden_states(tmp_path, capsys):
    """A distilled directory's token streams and hidden states feed training without a feature pass, and
    give the heads that recomputed features give."""
    import shutil

    from draftheads.train.distill import DistillConfig, GenerationConfig, SourceSpec, run
    from draftheads.train.shards import read_distilled

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"say {i} {'xyz' * (i % 4)}\n" for i in range(12)))
    data = tmp_path / "d"
    run(DistillConfig(output=str(data), sources=[SourceSpec(str(prompts))], shard_size=5,
                      gen=GenerationConfig(batch_size=4, max_new_tokens=24)), _bb(), progress=False)
    recs, hidden = read_distilled(data)
    assert len(recs) == 12 and all(h is not None for h in hidden)

    def cfg(out):
        return TrainConfig(model=ModelConfig(num_heads=2, trim_vocab=64), data=DataConfig(
            paths=[str(data)], eval_fraction=0.2, precompute_features=True),
            optim=OptimConfig(epochs=1, feature_batch=64, lr=3e-3), run=RunConfig(output=str(out), progress=False))
    a = load_heads(trainer.train(cfg(tmp_path / "a"), _bb()))
    assert not list((tmp_path / "a").glob("features-*.pt"))  # no feature pass ran
    shutil.rmtree(data / "features")  # as on a fresh clone: the features are a local cache
    b = load_heads(trainer.train(cfg(tmp_path / "b"), _bb()))
    # recomputed into the directory, a file per shard (so a killed pass keeps what it finished)
    assert len(list((data / "features").glob("shard-*.safetensors"))) == len(list(data.glob("shard-*.jsonl.gz"))) == 3
    assert not list((tmp_path / "b").glob("features-*.pt"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=0, msg=k)

    other = Backbone(model=tiny_model(seed=5), tokenizer=tiny_tokenizer(), name="tiny")
    with pytest.raises(UserError, match="another backbone"):
        trainer.train(cfg(tmp_path / "c"), other)

    # --shards N: the first N shards only, and hidden states are computed for those only.
    shutil.rmtree(data / "features")
    one = cfg(tmp_path / "s1")
    one.data.shards = 1
    trainer.train(one, _bb())
    assert sorted(p.name for p in (data / "features").glob("*")) == ["shard-00000.safetensors"]
    assert "train: 4 conversations" in capsys.readouterr().out  # shard 0's 5 records: 4 train, 1 held out
    every = cfg(tmp_path / "s3")
    every.data.shards = 3  # every finished shard: allowed
    trainer.train(every, _bb())
    assert "train: 10 conversations" in capsys.readouterr().out
    one.data.shards = 4
    with pytest.raises(UserError, match="has 3 finished shard"):
        trainer.train(one, _bb())
    one.data.shards, one.data.paths = 1, [str(prompts)]
    with pytest.raises(UserError, match="needs a distilled directory"):
        trainer.train(one, _bb())


def test_train_tokens_takes_a_subset_of_the_training_split_and_keeps_the_held_out_one(tmp_path, capsys):
    path = _conversations(tmp_path / "c.jsonl")

    def run(out, train_tokens):
        cfg = TrainConfig(model=ModelConfig(num_heads=2, trim_vocab=0), data=DataConfig(
            paths=[str(path)], eval_fraction=0.25, precompute_features=True, train_tokens=train_tokens),
            optim=OptimConfig(epochs=1, feature_batch=16), run=RunConfig(output=str(tmp_path / out), progress=False))
        trainer.train(cfg, _bb())
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train: ") and "held out" in x)
        return int(line.split()[1]), line.split("), ")[1].split(" held out")[0]

    full, held = run("full", None)
    few, held_few = run("few", 10)
    assert held_few == held and few == 1 < full  # every answer holds more than 10 assistant tokens


@pytest.mark.parametrize("head_type,precompute,token", [("hydra", True, False), ("hydra", False, False),
                                                        ("hydra++", True, False), ("hydra++", False, False),
                                                        ("hydra++", True, True)])
def test_hydra_training_learns_and_resumes(tmp_path, head_type, precompute, token):
    from draftheads.heads import HydraHeads

    def cfg(out):
        c = _cfg(tmp_path, out)
        c.model.head_type, c.model.dropout = head_type, 0.1 if head_type == "hydra++" else 0.0
        c.model.prefix_token = token
        c.data.precompute_features = precompute
        c.optim.epochs, c.optim.batch_size = 3, 4
        return c
    heads = load_heads(trainer.train(cfg(tmp_path / "a"), _bb()))
    assert isinstance(heads, HydraHeads) and heads.cfg.head_type == head_type and heads.cfg.prefix_token == token
    if token:  # the fuse trained away from its start (h alone): the token half carries weight now
        assert heads.fuse.weight[:, heads.cfg.hidden_size:].abs().max() > 0
    assert (heads.prefix is not None) == (head_type == "hydra++")
    hist = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert hist[-1]["top1"][0] > hist[0]["top1"][0] or hist[-1]["top1"][0] > 0.9, hist
    assert hist[-1]["top1"][1] > 0.5, hist  # the answers repeat a pattern: learnable with the path


@pytest.mark.parametrize("lm_head,residual", [("own", "projection"), ("shared", "hidden")])  # the 2nd: shipped
def test_hydra_plus_plus_teacher_loss_runs_and_resumes_exactly(tmp_path, monkeypatch, lm_head, residual):
    def cfg(out):
        c = _cfg(tmp_path, out, soft_targets=True)
        c.model.head_type, c.model.lm_head, c.model.grounded_residual = "hydra++", lm_head, residual
        return c
    ref = load_heads(trainer.train(cfg(tmp_path / "a"), _bb()))
    assert (ref.cfg.lm_head, ref.cfg.grounded_residual) == (lm_head, residual)
    assert (ref.blocks[0][0].res is None) == (residual == "hidden") and (ref.lm_heads is None) == (lm_head == "shared")
    real = trainer.save_checkpoint

    def killed(path, heads, opt, sched, step):
        real(path, heads, opt, sched, step)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg(tmp_path / "b"), _bb())
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    got = load_heads(trainer.train(cfg(tmp_path / "b"), _bb()))
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_trim_vocab_keeps_every_eos_of_a_list(tmp_path):
    """Llama-3 and Qwen2.5 list several EOS ids in generation_config: each must stay in the trimmed vocab."""
    bb = _bb()
    bb.model.generation_config.eos_token_id = [EOS, 250]
    cfg = _cfg(tmp_path, tmp_path / "e")
    cfg.optim.epochs = 1
    heads = load_heads(trainer.train(cfg, bb))
    assert {EOS, 250} <= set(heads.vocab_map.tolist())


def test_bf16_feature_pass_runs_in_bf16_and_stays_within_a_few_percent_of_fp32():
    model = tiny_model()
    seqs = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 14)]
    full = trainer.backbone_hidden(model, seqs, "cpu")
    half = trainer.backbone_hidden(model, seqs, "cpu", "bfloat16")
    for f, h in zip(full, half):
        assert f.shape == h.shape and f.dtype == torch.float32
        rel = ((h.float() - f).norm() / f.norm()).item()
        assert 0 < rel < 0.05  # rounded (autocast really on), but close
