"""Tiny models for tests: built from configs in code, nothing downloaded.

`tiny_model(arch)` is a random Llama / Mistral / Qwen2 with a 256-byte vocabulary; `tiny_tokenizer()`
is a byte-level tokenizer (one token per byte, plus specials) with a ChatML chat template, so text
round-trips exactly; `tiny_draftmodel()` puts them together with random Medusa heads.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from draftheads.backbone import Backbone, output_embedding_fingerprint
from draftheads.draftmodel import DraftModel
from draftheads.heads import HeadsConfig, MedusaHeads
from draftheads.tree import load_tree

SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]
VOCAB = 256 + len(SPECIALS)
EOS = 256 + 1
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = VOCAB,
               context: int = 512):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    eos, pad = (EOS, EOS + 1) if vocab > EOS + 1 else (None, None)  # a tiny-vocabulary model has no EOS
    # A large init makes the logits peaked, so greedy argmax has clear winners (no near-ties that
    # would make batched and one-token forwards disagree in the last float bit).
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                        initializer_range=0.2, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
                        tie_word_embeddings=False, attn_implementation="sdpa", **extra)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.requires_grad_(False)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    # WordLevel over ByteLevel pieces: map the 256 byte-level symbols to ids 0..255.
    byte_syms = pre_tokenizers.ByteLevel.alphabet()
    table = {ch: i for i, ch in enumerate(sorted(byte_syms, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.WordLevel(vocab={**table, **{s: 256 + i for i, s in enumerate(SPECIALS)}}, unk_token="<pad>"))
    tok.decoder = decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split("", "isolated")])
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def _byte_of(ch: str) -> int:
    # ByteLevel maps each byte to a printable unicode char; recover the byte it stands for.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


def tiny_heads(model, num_heads: int = 3, seed: int = 1, noise: float = 0.05) -> MedusaHeads:
    torch.manual_seed(seed)
    cfg = HeadsConfig(num_heads=num_heads, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                      backbone="tiny", backbone_fingerprint=output_embedding_fingerprint(model))
    heads = MedusaHeads(cfg)
    heads.init_lm_heads_from(model)
    for p in heads.parameters():
        p.data += noise * torch.randn_like(p)
    return heads.eval().requires_grad_(False)


def tiny_draftmodel(arch: str = "llama", tree: str = "medusa16", num_heads: int = 3, heads: bool = True) -> DraftModel:
    model = tiny_model(arch)
    h = tiny_heads(model, num_heads) if heads else None
    return DraftModel(Backbone(model=model, tokenizer=tiny_tokenizer(), name="tiny"), h,
                      load_tree(tree, num_heads) if heads else None)


def tiny_hydra_heads(model, head_type: str = "hydra", num_heads: int = 3, seed: int = 1, noise: float = 0.05,
                     grounded_residual: str = "projection", prefix_token: bool = False, **cfg):
    """Hydra heads on `model`, their weights perturbed by `noise`; cfg: other HeadsConfig fields (num_layers, lm_head)."""
    from draftheads.heads import HydraHeads

    torch.manual_seed(seed)
    cfg = HeadsConfig(num_heads=num_heads, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                      head_type=head_type, backbone="tiny", backbone_fingerprint=output_embedding_fingerprint(model),
                      grounded_residual=grounded_residual, prefix_token=prefix_token, **cfg)
    heads = HydraHeads(cfg)
    heads.init_lm_heads_from(model)
    for p in heads.parameters():
        p.data += noise * torch.randn_like(p)
    return heads.attach(model).eval().requires_grad_(False)
