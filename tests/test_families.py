"""Every model family decodes exactly through draftheads or is refused at load.

Each family is a tiny random model built from transformers' own config class (2 layers, hidden 64).
Greedy speculative decoding must equal transformers' greedy `generate` token for token, on prompts
plus outputs longer than the sliding window where the family has one; `exact` sampling on a
softcapped model must have the model's own distribution; unsupported models are refused in one line.
"""

import itertools

import pytest
import torch
import transformers as tf
from scipy.stats import chisquare

from draftheads.acceptance import SamplingConfig, sampling_probs
from draftheads.backbone import load_backbone
from draftheads.errors import UserError
from draftheads.generate import Decoder, Stats
from draftheads.kvcache import TreeKVCache
from draftheads.tree import Tree, load_tree
from tiny import tiny_heads, tiny_model, tiny_tokenizer

VOCAB, WINDOW, PROMPT, N_NEW = 128, 8, 12, 36  # prompt + output = 48 positions: six windows
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
SLIDE = dict(sliding_window=WINDOW)
MIXED = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])

# name -> (config class, model class, config overrides on SMALL)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
    "mistral-sliding": (tf.MistralConfig, tf.MistralForCausalLM, SLIDE),
    "mixtral-sliding": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(SLIDE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-mixed": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                               max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=16)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(MIXED, head_dim=16)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(MIXED, head_dim=16, final_logit_softcapping=30.0)),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, {}),
    "phi3-sliding": (tf.Phi3Config, tf.Phi3ForCausalLM, SLIDE),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {}),
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(rotary_dim=8)),
    "falcon": (tf.FalconConfig, tf.FalconForCausalLM, {}),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, {}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.5)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(logits_scaling=4.0)),
}

# Families the loop cannot decode exactly -> what the one-line refusal says.
REFUSED = {
    "gpt_neo": (tf.GPTNeoConfig, tf.GPTNeoForCausalLM, dict(attention_types=[[["global", "local"], 1]],
                                                             window_size=WINDOW), "local attention layers"),
    "mpt": (tf.MptConfig, tf.MptForCausalLM, dict(d_model=64, n_heads=4, n_layers=2), "own logits"),  # ALiBi
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(n_head=4, n_layer=2), "fails on a tree step"),  # ALiBi
    "falcon_mamba": (tf.FalconMambaConfig, tf.FalconMambaForCausalLM, {}, "'linear_attention' layers"),
}


def family_model(name: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[name] if name in FAMILIES else REFUSED[name][:3]
    torch.manual_seed(seed)
    config = config_cls(**{**SMALL, **extra, **overrides}, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        tie_word_embeddings=False)
    # sdpa where the model supports it, eager otherwise (Gemma-2's softcapping), as backbone.load_backbone picks.
    impl = "sdpa" if model_cls._supports_sdpa else "eager"
    config._attn_implementation = impl
    model = model_cls(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    return model


def hf_greedy(model, prompt, n=N_NEW):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def decode(decoder, prompt, sp=None, n=N_NEW, tree=None, stats=None):
    out = []
    for step in decoder.steps(prompt, n, sp or SamplingConfig(), stats or Stats(), tree):
        out += step
        if len(out) >= n:
            break
    return out[:n]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(name):
    model = family_model(name)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = hf_greedy(model, prompt)
    tree = load_tree("medusa16", 3)
    stats = Stats()
    assert decode(Decoder(model, tiny_heads(model, num_heads=3), tree), prompt, stats=stats) == reference
    assert stats.steps < N_NEW  # some drafts were accepted: the tree was exercised


def test_longrope_decodes_exactly_up_to_its_original_context():
    """Past the original context longrope switches every position's frequencies and transformers' generate
    recomputes the cache: the loop stops there (at position 32 here) instead of diverging from it."""
    rope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=32,
                short_factor=[1.0] * 8, long_factor=[4.0] * 8)
    model = family_model("phi3-sliding", sliding_window=None, rope_parameters=rope, original_max_position_embeddings=32)
    decoder = Decoder(model, tiny_heads(model, num_heads=3), load_tree("medusa16", 3))
    assert decoder.context == 32
    prompt = list(range(10, 10 + PROMPT))
    out = decode(decoder, prompt)
    assert len(out) == 32 - PROMPT + 1 and out == hf_greedy(model, prompt)[:len(out)]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_families_are_refused_in_one_line(name):
    model = family_model(name)
    with pytest.raises(UserError, match=f"cannot decode {model.config.model_type} exactly: .*{REFUSED[name][3]}") as e:
        Decoder(model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_family_without_row_exact_attention_is_refused_in_reduced_precision_on_a_cpu(dtype):
    """Its tree rows round differently from one-token steps: tiny Qwen3 in bf16 changed 6 of 12 greedy
    replies against plain decoding. float32 stays exact (test_greedy_equals_transformers_generate)."""
    with pytest.raises(UserError, match="cannot decode qwen3 exactly: in .* on a CPU .* load it in float32") as e:
        Decoder(family_model("qwen3").to(dtype))
    assert "\n" not in str(e.value)
    Decoder(tiny_model("qwen2").to(dtype))  # the lean forward attends row by row: taken


def test_exact_sampling_has_the_softcapped_distribution():
    """Gemma-2 softcaps its final logits (tanh(x / cap) * cap): `exact` must sample that distribution, and
    the same counts must reject the distribution of the uncapped logits, or the test proves nothing."""
    model = family_model("gemma2", seed=5, vocab_size=SMALL_VOCAB, final_logit_softcapping=1.0)
    heads = tiny_heads(model, num_heads=2, noise=0.3)
    tree, prompt = Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]]), [0, 1, 2, 3, 2, 1]
    sp = SamplingConfig(temperature=1.0, acceptance="exact")
    counts, stats = sample_counts(Decoder(model, heads, tree), prompt, sp, tree)
    assert stats.mean_accepted > 1.2, "drafts were hardly ever accepted: the test would not exercise the tree"
    assert chi_square_pvalue(counts, sequence_distribution(model, prompt, sp)) > 1e-3
    model.config.final_logit_softcapping = None
    assert chi_square_pvalue(counts, sequence_distribution(model, prompt, sp)) < 1e-3


def test_a_logit_transform_the_loop_does_not_apply_is_refused(monkeypatch):
    model = family_model("gemma3")
    monkeypatch.setattr("draftheads.engine.logits_transform", lambda model: None)
    with pytest.raises(UserError, match="cannot decode gemma3_text exactly: .* own logits"):
        Decoder(model)


def test_window_mask_counts_positions_of_tree_nodes():
    """A node at depth d sits at position L + d: with window 3 it sees prefix keys at positions > L + d - 3."""
    cache = TreeKVCache(1, 32, torch.float32, "cpu", windows={"sliding_attention": 3})
    cache.layers[0].length = 10  # ten cached entries, positions 0..9
    tt = load_tree("chain2", 2).tensors("cpu", torch.float32)
    visible = cache.attention_mask(tt.tree_bias, tt.depths + 10)[0, 0] == 0  # [3 nodes, 13 keys]
    assert visible.nonzero().tolist() == [[0, 8], [0, 9], [0, 10], [1, 9], [1, 10], [1, 11],
                                          [2, 10], [2, 11], [2, 12]]


def test_mixed_models_get_one_mask_per_layer_type():
    cache = TreeKVCache(2, 32, torch.float32, "cpu", windows={"full_attention": None, "sliding_attention": 2})
    masks = cache.attention_mask(torch.zeros(1, 1), torch.tensor([0]))
    assert set(masks) == {"full_attention", "sliding_attention"}


class Adapter(torch.nn.Module):
    """A LoRA-like wrapper: the base Linear plus a low-rank update, as peft wraps a projection."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_adapter_wrapped_projections_take_the_generic_path():
    model = family_model("llama")
    attn = model.model.layers[1].self_attn
    attn.q_proj = Adapter(attn.q_proj)
    decoder = Decoder(model, tiny_heads(model, num_heads=3), load_tree("medusa16", 3))
    assert decoder.lean is None
    prompt = list(range(20, 32))
    assert decode(decoder, prompt) == hf_greedy(model, prompt)


def test_unmaskable_attention_and_layer_types_are_refused():
    model = family_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="cannot decode llama exactly: attention implementation 'flash_attention_2'"):
        Decoder(model)
    model = family_model("qwen2-mixed")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UserError, match="'chunked_attention' layers"):
        Decoder(model)


# Exact sampling, enumerated: the model's own distribution over every 3-token continuation of a
# 4-token vocabulary (the pattern of test_acceptance.py).
SMALL_VOCAB, N_TOKENS, SAMPLES = 4, 3, 400


def sequence_distribution(model, prompt, sp):
    seqs = list(itertools.product(range(SMALL_VOCAB), repeat=N_TOKENS))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, len(prompt) - 1:-1]  # [seqs, 3, vocab]
    p = sampling_probs(logits, sp).gather(-1, torch.tensor(seqs).unsqueeze(-1)).squeeze(-1).prod(-1)  # [seqs]
    return dict(zip(seqs, p.tolist()))


def sample_counts(decoder, prompt, sp, tree):
    counts, stats = {}, Stats()
    for i in range(SAMPLES):
        sp.seed = i
        key = tuple(decode(decoder, prompt, sp, N_TOKENS, tree, stats))
        counts[key] = counts.get(key, 0) + 1
    return counts, stats


def chi_square_pvalue(counts, dist):
    cells = sorted(dist, key=dist.get, reverse=True)
    expected, observed = [dist[c] * SAMPLES for c in cells], [counts.get(c, 0) for c in cells]
    while expected[-1] < 5:  # pool the rare cells: the chi-square approximation needs expected counts >= 5
        e, o = expected.pop(), observed.pop()
        expected[-1] += e
        observed[-1] += o
    return chisquare(observed, [e * SAMPLES / sum(expected) for e in expected]).pvalue


@pytest.mark.parametrize("name,attention", [("gemma2", "eager"), ("llama", "sdpa")])
def test_load_picks_sdpa_or_eager_per_model(tmp_path, name, attention):
    family_model(name).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    assert bb.model.config._attn_implementation == attention
    Decoder(bb.model)  # and the loop accepts it


@pytest.mark.parametrize("native", [True, False])
def test_load_warns_of_bf16_the_cpu_emulates(tmp_path, monkeypatch, caplog, native):
    family_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="draftheads"):
        load_backbone(str(tmp_path), dtype="bfloat16")
        load_backbone(str(tmp_path))  # float32: nothing to say
    said = [r.getMessage() for r in caplog.records if r.name == "draftheads"]
    assert said == ([] if native else ["warning: this CPU has no bfloat16 instructions, so torch emulates "
                                       "them, slower than float32 (the CPU default)"])


def test_cache_keyword_is_the_one_the_forward_names():
    from draftheads.kvcache import cache_keyword

    class Before(torch.nn.Module):  # a remote-code model written before transformers renamed it
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert cache_keyword(Before()) == "past_key_values"
    assert cache_keyword(tiny_model().base_model) == "cache"


def test_generic_path_routes_one_row_forwards_only_where_the_cpp_kernel_serves_one_row(monkeypatch):
    """transformers' forward reaches cpu_matmul only through a torch function mode, whose dispatch costs ~2 ms
    a forward: a one-row forward takes it where the C++ kernel (~45% off a one-row product) serves one row."""
    from torch.overrides import TorchFunctionMode

    from draftheads import cpu_matmul
    from draftheads.engine import TorchEngine

    engine = TorchEngine(tiny_model())
    threads = torch.get_num_threads()
    for route, one_row in [({1: "rows", 2: "rows"}, True), ({1: "padded", 2: "padded"}, False), ({}, False)]:
        monkeypatch.setattr(cpu_matmul, "_ROUTES", {threads: route})
        assert isinstance(engine._kernels(1), TorchFunctionMode) == one_row, route
        assert isinstance(engine._kernels(2), TorchFunctionMode), route  # 2+ rows always: the routes decide per product
    engine.fast_linear = False
    assert not isinstance(engine._kernels(2), TorchFunctionMode)
