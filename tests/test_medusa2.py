"""Medusa-2: heads and a LoRA adapter trained together. The KL term starts at zero and the loss falls,
disabled adapters give the original model exactly, merged and adapter-applied models decode alike, the
tuned fingerprint refuses the untuned backbone, and train -> load -> generate / export / compare runs."""

import json

import pytest
import torch
from tiny import tiny_heads, tiny_model, tiny_tokenizer

from draftheads.adapter import lora_changes, merge_adapter, tuned_fingerprint, tuned_verdict
from draftheads.backbone import Backbone, chat_ids, output_embedding_fingerprint
from draftheads.cli import main
from draftheads.draftmodel import DraftModel
from draftheads.errors import UserError
from draftheads.heads import load_heads, save_heads
from draftheads.heads.checkpoint import check_backbone
from draftheads.train import medusa2
from draftheads.train.config import DataConfig, JointConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from draftheads.train.data import tokenize_conversation
from draftheads.train.trainer import medusa_loss
from draftheads.tree import load_tree

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _lora(model, seed=0, random_b=True):
    """`model` with a LoRA adapter; B random (a trained adapter) or zero (peft's initialisation)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    if random_b:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return peft_model


def _conversations(path, n=12):
    recs = [{"messages": [{"role": "user", "content": f"count {i}"},
                          {"role": "assistant", "content": "abcdefghij" * 2}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_kl_is_zero_at_initialisation_and_the_joint_loss_falls():
    model, tok = tiny_model(), tiny_tokenizer()
    heads = tiny_heads(model, 2).requires_grad_(True).train()
    peft_model = _lora(model, random_b=False)
    seqs = [tokenize_conversation(tok, [{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": "the same answer " * 3}], 256) for i in range(4)]
    ids, att, kl_sel, head_sel, tgt = medusa2.pad_batch(seqs, 2)
    joint = medusa2.Joint(model, heads)
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": list(heads.parameters()), "lr": 1e-2}, {"params": lora, "lr": 1e-3}])
    losses = []
    for step in range(6):
        with torch.no_grad(), peft_model.disable_adapter():
            original = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state[kl_sel]
        hidden, logits = joint(ids, att, head_sel)
        kl = medusa2.kl_to_original(peft_model, hidden[kl_sel], original, chunk=16)  # several chunks
        if step == 0:
            assert abs(kl.item()) < 1e-6  # LoRA's B = 0: the tuned model is the original
        loss = kl + 0.5 * medusa_loss(logits, tgt, 0.8)[0]
        loss.backward()
        assert all(p.grad is not None for p in lora)  # the heads' loss reaches the adapter
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_disabled_adapters_give_the_original_logits_exactly():
    model = tiny_model()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        before = model(input_ids=x).logits
        peft_model = _lora(model)
        with peft_model.disable_adapter():
            off = model(input_ids=x).logits
        on = model(input_ids=x).logits
    assert torch.equal(off, before)
    assert not torch.allclose(on, before, atol=1e-3)  # the adapter does change the model


def test_merged_and_adapter_applied_models_decode_alike(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    peft_model = _lora(model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(tiny_model(), tmp_path / "adapter")  # a fresh original, the adapter merged from disk
    prompt = torch.tensor([chat_ids(tok, "tell me")])
    model.generation_config.eos_token_id = None  # 24 tokens whatever they are
    with torch.no_grad():
        ref = peft_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                  do_sample=False)[0, prompt.shape[1]:].tolist()
    dm = DraftModel(Backbone(merged, tok, "tiny"), tiny_heads(merged, 3), load_tree("medusa16", 3))
    dm.eos_ids = set()
    got = dm.generate(prompt, max_new_tokens=24)
    assert got.token_ids == ref and len(ref) == 24


def test_tuned_fingerprint_refuses_the_untuned_and_another_backbone(tmp_path):
    model = tiny_model()
    peft_model = _lora(model)
    changes = lora_changes(model)
    merged = peft_model.merge_and_unload()
    fp = tuned_fingerprint(merged, changes)
    assert len(fp) == 32 and all(e["delta"] for e in fp)
    assert [tuned_verdict(m, fp) for m in (merged, tiny_model(), tiny_model(seed=5))] == ["tuned", "untuned", "other"]
    assert tuned_verdict(merged.to(torch.bfloat16), fp) == "tuned"  # a bf16 copy still passes
    merged.float()

    heads = tiny_heads(merged, 2)
    heads.cfg.adapter, heads.cfg.tuned_fingerprint = "../adapter", fp
    heads.cfg.backbone_fingerprint = output_embedding_fingerprint(merged)
    save_heads(heads, tmp_path / "heads")
    load_heads(tmp_path / "heads", merged)
    with pytest.raises(UserError, match="original \\(untuned\\) backbone"):
        load_heads(tmp_path / "heads", tiny_model())
    with pytest.raises(UserError, match="neither the tuned nor the original"):
        check_backbone(heads.cfg, tiny_model(seed=5), "x")


def _cfg(tmp_path, out):
    return TrainConfig(model=ModelConfig(num_heads=2, trim_vocab=64), data=DataConfig(
        paths=[str(_conversations(tmp_path / "c.jsonl"))], eval_fraction=0.2),
        optim=OptimConfig(epochs=2, batch_size=4, lr=3e-3),
        run=RunConfig(output=str(out), checkpoint_every=1, progress=False),
        joint=JointConfig(enabled=True, lora_rank=4, lora_targets=TARGETS, adapter_lr=1e-3, heads_warmup_epochs=1))


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    def run(out):
        bb = Backbone(tiny_model(), tiny_tokenizer(), "tiny")
        heads = load_heads(medusa2.train_medusa2(_cfg(tmp_path, out), bb), bb.model)
        return heads, bb.model
    ref_heads, ref_model = run(tmp_path / "a")
    real = medusa2.save_checkpoint

    def killed(path, heads, peft_model, opt, sched, step):
        real(path, heads, peft_model, opt, sched, step)
        if step == 2:
            raise KeyboardInterrupt  # stands in for SIGKILL right after a checkpoint
    monkeypatch.setattr(medusa2, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(medusa2, "save_checkpoint", real)
    got_heads, got_model = run(tmp_path / "b")
    for (k, a), (_, b) in zip(ref_heads.state_dict().items(), got_heads.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=0, msg=k)
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), got_model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)
    hist = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and 0 <= hist[-1]["agreement"] <= 1 and hist[-1]["kl"] >= 0


def test_cli_train_load_generate_export_compare(tmp_path, capsys):
    bb = tmp_path / "bb"
    tiny_model().save_pretrained(bb)
    tiny_tokenizer().save_pretrained(bb)
    run = tmp_path / "run"
    argv = ["train", "--method", "medusa2", "--backbone", str(bb), "--data", str(_conversations(tmp_path / "c.jsonl")),
            "--output", str(run), "--num-heads", "2", "--trim-vocab", "64", "--epochs", "1", "--batch-size", "4",
            "--heads-warmup-epochs", "1", "--lora-rank", "4", "--lora-targets", ",".join(TARGETS), "--merge",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stage 1" in out and "stage 2 (joint)" in out and "top-1 agreement" in out
    cfg = json.loads((run / "heads" / "config.json").read_text())
    assert cfg["adapter"] == "../adapter" and len(cfg["tuned_fingerprint"]) == 32 and cfg["backbone"] == str(bb)
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "merged" / "config.json").exists()

    gen = ["generate", "hello", "--heads", str(run / "heads"), "--max-new-tokens", "8", "--json"]
    assert main(gen) == 0
    a = capsys.readouterr()
    assert "changed by the LoRA adapter" in a.err and "not lossless" in a.err
    assert main(gen + ["--backbone", str(run / "merged")]) == 0  # the merged weights: no second merge
    b = capsys.readouterr()
    assert "already carries" in b.err
    assert json.loads(a.out)["token_ids"] == json.loads(b.out)["token_ids"]

    (run / "adapter" / "adapter_config.json").rename(run / "adapter" / "moved.json")
    assert main(gen) == 2 and "missing" in capsys.readouterr().err
    (run / "adapter" / "moved.json").rename(run / "adapter" / "adapter_config.json")

    assert main(["export", "--heads", str(run / "heads"), "--to", "vllm", "--out", str(tmp_path / "ex")]) == 0
    assert "Medusa-2 adapter merged" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    load_heads(tmp_path / "ex", AutoModelForCausalLM.from_pretrained(tmp_path / "ex" / "backbone"))
    with pytest.raises(UserError, match="untuned"):
        load_heads(tmp_path / "ex", AutoModelForCausalLM.from_pretrained(bb))

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["hi there"]}) + "\n")
    assert main(["compare", str(q), "--heads", str(run / "heads"), "--medusa1-heads", str(run / "stage1" / "heads"),
                 "--max-new-tokens", "8", "--out", str(tmp_path / "cmp")]) == 0
    rep = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert set(rep["methods"]) == {"original", "original + medusa1", "tuned + medusa2"}
    assert 0 <= rep["quality"]["agreement_top1"] <= 1 and rep["quality"]["ppl_original_on_tuned"] > 0
    assert "not lossless" in capsys.readouterr().out


def test_an_unknown_lora_target_is_refused_before_stage_one(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "m2")
    cfg.joint.lora_targets = ["q_proj", "nosuch_proj"]
    with pytest.raises(UserError, match="the backbone has no module named nosuch_proj"):
        medusa2.train_medusa2(cfg, Backbone(tiny_model(), tiny_tokenizer(), "tiny"))
    assert not (tmp_path / "m2").exists()  # no Medusa-1 warm-up ran, nothing was written
