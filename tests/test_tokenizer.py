"""
Tests for tokenizer.py: round trips, the BPE trainer against a naive reference, GPT-2 against tiktoken.

    pytest tests/test_tokenizer.py

tiktoken's 'gpt2' files and OpenAI's encoder.json / vocab.bpe come from ../shared/data (conftest.py).
"""
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
import torch
from hypothesis import given, settings, strategies as st

import tokenizer
from conftest import gpt2_encoding
from tokenizer import (EOT, GPT2_SPLIT_PATTERN, TIKTOKEN_GPT2_NAMES, BPETokenizer, CharTokenizer, GPT2Tokenizer,
                       TokenizerError, load_tokenizer, tokenizer_from_dict)

# texts where GPT-2's split pattern and byte-level BPE are easy to get wrong
EDGE_CASES = [
    "",
    "Hello world",
    " ",
    "   leading spaces and trailing   ",
    "\n\n\nnew lines\n",
    "tabs\t\tand\t mixed \r\n whitespace \u00a0\u3000 x  \n  y",
    "digits 1234567890 3.14159 1,000,000 -42 ١٢٣ ½",
    "I'm sure you'll see they'd said it's WE'RE 've 'll 'S",
    "naïve café, Привет мир, 北京欢迎你, ελληνικά, עברית",
    "emoji 👋🏽 👨‍👩‍👧‍👦 🇺🇸 🙂🙂🙂",
    "combining e\u0301 and zero\u200bwidth",
    "special <|endoftext|> in the middle<|endoftext|>and at the end <|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "<|endoftext",
    " " * 1000 + "x",
    "a" * 3000,
    "🙂" * 300,
    "!!!???..." * 100,
]


# arbitrary Unicode, sometimes around the special token
texts = st.text() | st.builds(lambda a, b: a + EOT + b, st.text(), st.text())


@functools.cache
def newer_letters_and_numbers() -> frozenset[str]:
    """Characters that the regex module calls \\p{L} or \\p{N} and tiktoken does not.

    Its Unicode tables are newer than those of tiktoken's Rust regex, so characters added in recent
    Unicode versions split differently (tokenizer.py's from_gpt2 says so). Found by asking tiktoken
    itself: an encoding whose pattern is only the class keeps the characters it matches and drops the rest.
    """
    ranks = {bytes([b]): b for b in range(256)}
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    differ = set()
    for cls in (r"\p{L}", r"\p{N}"):
        probe = tiktoken.Encoding("probe", pat_str=cls, mergeable_ranks=ranks, special_tokens={})
        theirs = set(probe.decode_bytes(probe.encode_ordinary(everything)).decode("utf-8"))
        differ |= theirs ^ set(regex.findall(cls, everything))
    return frozenset(differ)


# the same, without the characters whose class the two Unicode tables disagree on
texts_both_know = st.text(st.characters(codec="utf-8").filter(lambda c: c not in newer_letters_and_numbers()))
texts_both_know = texts_both_know | st.builds(lambda a, b: a + EOT + b, texts_both_know, texts_both_know)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return gpt2_encoding()


@pytest.fixture(scope="module")
def gpt2_bpe(gpt2_files):
    return BPETokenizer.from_gpt2(*gpt2_files)


@pytest.fixture(scope="module")
def trained(shakespeare_text):
    """A small BPE with a special token, trained on a slice of tinyshakespeare."""
    return BPETokenizer().train(shakespeare_text[:50_000], 512, special_tokens=[EOT])


# -----------------------------------------------------------------------------
# a naive reference trainer and encoder: recount every pair of every chunk at each step


def naive_merge(ids, pair, idx):
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i:i + 2]) == pair:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_train(text, vocab_size, pattern=GPT2_SPLIT_PATTERN, specials=()):
    parts = re.split("|".join(map(re.escape, specials)), text) if specials else [text]
    chunks = [list(c.encode("utf-8")) for part in parts for c in regex.findall(pattern, part)]
    merges = {}
    for idx in range(256, vocab_size - len(specials)):
        stats = Counter(p for ch in chunks for p in zip(ch, ch[1:]))
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))  # most frequent; ties: smallest pair
        merges[pair] = idx
        chunks = [naive_merge(ch, pair, idx) for ch in chunks]
    return merges


def naive_encode(text, merges, pattern=GPT2_SPLIT_PATTERN):
    ids = []
    for chunk in regex.findall(pattern, text):
        ch = list(chunk.encode("utf-8"))
        while len(ch) > 1:
            pair = min(zip(ch, ch[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ch = naive_merge(ch, pair, merges[pair])
        ids.extend(ch)
    return ids


small_texts = st.text(alphabet="ab c\n'é1", min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(text=small_texts, extra=st.integers(0, 40), pattern=st.sampled_from([None, r"\S+|\s+", r"[a-c]+|.|\n"]))
def test_trainer_equals_naive_reference(text, extra, pattern):
    # each pattern matches every character ('.' alone would skip '\n', which the reference would drop too)
    tok = BPETokenizer(pattern).train(text, 256 + extra)
    ref_pattern = pattern or GPT2_SPLIT_PATTERN
    ref = naive_train(text, 256 + extra, ref_pattern)
    assert list(tok.merges.items()) == list(ref.items())
    assert tok.encode(text) == naive_encode(text, ref, ref_pattern)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("abc ab cab") == naive_encode("abc ab cab", ref, ref_pattern)


def test_trainer_equals_naive_reference_on_real_text(shakespeare_text):
    text = shakespeare_text[:4000]
    tok = BPETokenizer().train(text, 400)
    ref = naive_train(text, 400)
    assert tok.merges == ref and list(tok.merges) == list(ref)
    assert tok.encode(shakespeare_text[4000:6000]) == naive_encode(shakespeare_text[4000:6000], ref)


def test_trainer_equals_naive_reference_on_chinese():
    """Chinese has no spaces, so GPT-2's pattern makes each phrase one chunk of dozens of bytes, in which
    a pair occurs many times: the trainer's count updates next to each merge must match a recount."""
    rng = random.Random(0)
    chars = [chr(0x4e00 + i) for i in range(40)]  # few characters, so that pairs of them recur
    text = "".join("".join(rng.choices(chars, k=rng.randint(3, 40))) + rng.choice("，。！\n") for _ in range(150))
    tok = BPETokenizer().train(text, 600)
    ref = naive_train(text, 600)
    assert tok.merges == ref and list(tok.merges) == list(ref)
    sample = "".join(rng.choices(chars, k=300))
    assert tok.encode(sample) == naive_encode(sample, ref) and tok.decode(tok.encode(sample)) == sample


@pytest.mark.parametrize("track_shift, track_most, count_block, count_part",
                         [(0, 1, 40, 100), (0, 2, 200, 30), (1, 3, 1 << 18, 1 << 19), (2, 30, 1 << 18, 1 << 19)])
def test_trainer_tracking_few_pairs_equals_naive_reference(monkeypatch, track_shift, track_most, count_block,
                                                          count_part):
    """The trainer tracks only the pairs above a threshold and counts them all again, in blocks of words and
    parts of the pairs, when none is left: tiny settings make it count again at nearly every merge."""
    for name, value in [("TRACK_SHIFT", track_shift), ("TRACK_MOST", track_most), ("COUNT_BLOCK", count_block),
                        ("COUNT_PART", count_part)]:
        monkeypatch.setattr(tokenizer, name, value)
    rng = random.Random(2)
    chars = [chr(0x4e00 + i) for i in range(30)]
    chinese = "".join("".join(rng.choices(chars, k=rng.randint(2, 30))) + rng.choice(["，", "。", " aaaa ", "\n"])
                      for _ in range(100)) + EOT + "abab aaaaa abab " * 20
    ab = "".join(rng.choice(["a", "b", "ab", "aaa", " "]) for _ in range(1500))  # many ties, overlapping pairs
    for text, merges in [(chinese, 300), (ab, 100)]:
        tok = BPETokenizer().train(text, 256 + merges + 1, special_tokens=[EOT])
        ref = naive_train(text, 256 + merges + 1, specials=[EOT])
        assert list(tok.merges.items()) == list(ref.items())


def test_a_long_chunk_is_merged_once_per_merge_not_once_per_occurrence(monkeypatch):
    """A pair that a merge makes many times in one long chunk lists the chunk once: each listing is a scan of
    the whole chunk at the pair's own merge (quadratic time: 'ab' * 20,000 took 5 s for 6 merges)."""
    scans = []
    real = tokenizer._merge_pair_everywhere
    monkeypatch.setattr(tokenizer, "_merge_pair_everywhere", lambda ids, *a: scans.append(len(ids)) or real(ids, *a))
    text = "ab" * 2000 + " ab ba"
    tok = BPETokenizer().train(text, 262)
    assert list(tok.merges.items()) == list(naive_train(text, 262).items())
    assert len(scans) <= 6 * 3  # the long chunk, " ab" and " ba", at most, for each of the 6 merges


def test_textbook_example():
    tok = BPETokenizer().train("aaabdaaabac", 256 + 3)
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert tok.vocab[258] == b"aaab"


def test_special_tokens_are_not_learned_from_the_training_text():
    text = "hello<|endoftext|>hello world<|endoftext|>" * 5
    tok = BPETokenizer().train(text, 265, special_tokens=[EOT])  # 8 merges; 9 would merge everything
    assert tok.merges == naive_train(text, 265, specials=[EOT])
    assert not any(b"<" in tok.vocab[i] or b">" in tok.vocab[i] for i in tok.merges.values())
    assert tok.special_tokens == {EOT: 264} and tok.eot_token == 264 and tok.vocab_size == 265
    assert tok.encode(text, allowed_special="all").count(264) == 10
    assert 264 not in tok.encode(text)  # ordinary by default


def test_a_special_token_that_begins_another_is_split_off_longest_first():
    text = "hello<x>yzw there<x>yzw<x>" * 4
    merges = [BPETokenizer().train(text, 262, special_tokens=order).merges for order in
              (["<x>", "<x>yzw"], ["<x>yzw", "<x>"])]
    assert merges[0] == merges[1]  # the order they are given in does not matter
    assert not any(b"y" in BPETokenizer().train(text, 262, special_tokens=["<x>", "<x>yzw"]).vocab[i]
                   for i in merges[0].values())  # nothing learned from inside '<x>yzw'


def test_encode_splits_off_the_longer_of_two_overlapping_special_tokens():
    tok = BPETokenizer().train("abc", 258, special_tokens=["<x>", "<x>yzw"])  # ids 256 and 257, no merges
    assert tok.encode("a<x>yzw<x>", allowed_special="all") == [97, 257, 256]


def test_training_stops_when_nothing_is_left_to_merge(capsys):
    tok = BPETokenizer().train("ab ab", 1000, special_tokens=[EOT])
    assert "stopped after 2 of 743 merges" in capsys.readouterr().err
    assert tok.vocab_size == 259 and tok.special_tokens == {EOT: 258}
    assert tok.encode("ab ab") == [256, 257]


def test_training_is_verbose_on_request(capsys):
    BPETokenizer().train("hello hello world", 266, verbose=True)
    err = capsys.readouterr().err
    assert "merge 1/10: (101, 108) -> 256 b'el' (2 occurrences)" in err and "merge 10/10" in err


def test_heap_merge_equals_scan_merge():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_tokens = int(rng.integers(3, 12))
        # random merge table over a small alphabet: lower id = earlier merge
        ranks = {}
        for idx in range(n_tokens, n_tokens + int(rng.integers(1, 30))):
            ranks.setdefault((int(rng.integers(0, idx)), int(rng.integers(0, idx))), idx)
        ids = [int(x) for x in rng.integers(0, n_tokens, size=int(rng.integers(1, 200)))]
        assert tokenizer._bpe_heap(ids, ranks) == tokenizer._bpe(ids, ranks) == _scan(ids, ranks)


def _scan(ids, ranks):
    """tiktoken's rule written out: merge the leftmost lowest-ranked pair, one at a time."""
    ids = list(ids)
    while True:
        cands = [(ranks[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in ranks]
        if not cands:
            return ids
        r, i = min(cands)
        ids[i:i + 2] = [r]


# -----------------------------------------------------------------------------
# GPT-2: OpenAI's files and tiktoken


def test_gpt2_byte_mapping_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert tokenizer._gpt2_byte_to_unicode() == bytes_to_unicode()
    assert tokenizer._gpt2_byte_to_unicode()[ord(" ")] == "Ġ"


def test_from_gpt2_equals_tiktoken_on_shakespeare(gpt2_bpe, tiktoken_gpt2, shakespeare_text):
    ids = gpt2_bpe.encode(shakespeare_text)
    assert len(ids) == 338_025
    assert ids == tiktoken_gpt2.encode_ordinary(shakespeare_text)
    assert gpt2_bpe.decode(ids) == shakespeare_text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_from_gpt2_equals_tiktoken_on_edge_cases(gpt2_bpe, tiktoken_gpt2, text):
    assert gpt2_bpe.vocab_size == 50257 and gpt2_bpe.eot_token == 50256
    assert gpt2_bpe.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2_bpe.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2_bpe.encode(text, allowed_special={EOT}) == tiktoken_gpt2.encode(text, allowed_special={EOT})
    if EOT in text:
        with pytest.raises(ValueError):
            tiktoken_gpt2.encode(text)
        with pytest.raises(TokenizerError, match="none_raise"):
            gpt2_bpe.encode(text, allowed_special="none_raise")
    else:
        assert gpt2_bpe.encode(text, allowed_special="none_raise") == tiktoken_gpt2.encode(text)
    assert gpt2_bpe.decode(gpt2_bpe.encode(text, allowed_special="all")) == text


@settings(max_examples=150, deadline=None)
@given(text=texts_both_know)
def test_from_gpt2_equals_tiktoken_on_arbitrary_text(gpt2_bpe, tiktoken_gpt2, text):
    assert gpt2_bpe.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2_bpe.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")


def test_from_gpt2_differs_from_tiktoken_only_on_characters_newer_than_its_unicode(gpt2_bpe, tiktoken_gpt2):
    """What from_gpt2's docstring says: the difference is about 17,000 recent additions to Unicode,
    each a letter or number to the regex module only, and it shows where such a character meets a word."""
    newer = newer_letters_and_numbers()
    assert 0 < len(newer) < 30_000  # 17,480 with regex 2026.11.19 and tiktoken 0.14
    assert all(regex.fullmatch(r"\p{L}|\p{N}", c) for c in newer)
    some = sorted(newer)[:: len(newer) // 50]
    assert any(gpt2_bpe.encode(f"x{c}'s") != tiktoken_gpt2.encode_ordinary(f"x{c}'s") for c in some)
    known = "x\u0531's \u4e2d's"  # an Armenian letter and a CJK character that every table knows
    assert gpt2_bpe.encode(known) == tiktoken_gpt2.encode_ordinary(known)


def test_lone_surrogates_are_encoded_as_tiktoken_does(gpt2_bpe, tiktoken_gpt2):
    text = "a\ud800b \udfff"
    assert gpt2_bpe.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2_bpe.decode(gpt2_bpe.encode(text)) == "a\ufffdb \ufffd"


def test_merge_rules_against_tiktoken_with_the_same_vocabulary(trained, shakespeare_text):
    # a trained vocabulary as tiktoken ranks: both rules give tiktoken's ids
    n = 256 + len(trained.merges)
    enc = tiktoken.Encoding("trained", pat_str=GPT2_SPLIT_PATTERN, special_tokens={EOT: n},
                            mergeable_ranks={trained.vocab[i]: i for i in range(n)})
    by_ranks = tokenizer_from_dict({**trained.to_dict(), "merge_rule": "ranks"})
    text = shakespeare_text[100_000:140_000] + " ".join(EDGE_CASES)
    assert by_ranks.encode(text) == trained.encode(text) == enc.encode_ordinary(text)
    # a vocabulary no training run makes: 'bc' before 'ab', and 'abc' from ('ab', 'c'). tiktoken
    # merges 'a' + 'bc' because their bytes form 'abc'; the learned pairs alone cannot
    merges = [[98, 99], [97, 98], [257, 99]]
    enc = tiktoken.Encoding("abc", pat_str=GPT2_SPLIT_PATTERN, special_tokens={},
                            mergeable_ranks={**{bytes([i]): i for i in range(256)}, b"bc": 256, b"ab": 257, b"abc": 258})
    d = {"kind": "bpe", "pattern": GPT2_SPLIT_PATTERN, "special_tokens": {}, "merges": merges}
    assert tokenizer_from_dict({**d, "merge_rule": "ranks"}).encode("abc") == enc.encode("abc") == [258]
    assert tokenizer_from_dict({**d, "merge_rule": "pairs"}).encode("abc") == naive_encode("abc", {(98, 99): 256}) == [97, 256]


def test_gpt2_tokenizer_matches_tiktoken(tiktoken_gpt2):
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_token == 50256 and tok.kind == "gpt2"
    text = "Data set text with <|endoftext|> inside, which must stay ordinary text."
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text) == tok.encode_ordinary(text)
    assert 50256 not in ids
    assert len(ids) > len(tok.encode(text, allowed_special="all"))
    assert tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert 50256 in tok.encode(text, allowed_special={EOT})
    with pytest.raises(TokenizerError, match="none_raise"):
        tok.encode(text, allowed_special="none_raise")
    texts = ["one", "two <|endoftext|>", "three " * 50]
    assert tok.encode_ordinary_batch(texts, num_threads=2) == [tiktoken_gpt2.encode_ordinary(t) for t in texts]


def test_gpt2_tokenizer_explains_how_to_work_offline(monkeypatch, tmp_path, gpt2_files):
    def offline(name):
        raise ConnectionError("could not reach openaipublic.blob.core.windows.net")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as e:
        GPT2Tokenizer()
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "ConnectionError" in str(e.value)
    # OpenAI's two files copied in under the names the message gives are tiktoken's cache (a new process: this
    # one keeps the encoding it loaded)
    encoder_json, vocab_bpe = gpt2_files
    cache = tmp_path / "cache"
    cache.mkdir()
    assert str(e.value).endswith(f"OpenAI's vocab.bpe and encoder.json copied in under tiktoken's names for them, "
                                 f"{TIKTOKEN_GPT2_NAMES['vocab.bpe']} and {TIKTOKEN_GPT2_NAMES['encoder.json']}")
    for name, path in (("encoder.json", encoder_json), ("vocab.bpe", vocab_bpe)):
        shutil.copy(path, cache / TIKTOKEN_GPT2_NAMES[name])
    r = subprocess.run([sys.executable, "-c", "from tokenizer import GPT2Tokenizer; print(GPT2Tokenizer().encode("
                        "'hello world'))"], cwd=Path(tokenizer.__file__).parent, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)})
    assert r.returncode == 0 and r.stdout == "[31373, 995]\n", r.stderr
    # without tiktoken at all: BPETokenizer.from_gpt2 builds a tokenizer with GPT-2's ids from the same files
    BPETokenizer.from_gpt2(*gpt2_files).save(tmp_path / "gpt2.json")
    text = "Hello world, it's 2026! 東京 😀\n" * 40
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    import prepare_data
    prepare_data.main(["--dataset", "custom", "--input", str(tmp_path / "t.txt"), "--tokenizer_file",
                       str(tmp_path / "gpt2.json"), "--output_dir", str(tmp_path / "offline")])
    monkeypatch.undo()  # tiktoken back: the same text through --tokenizer gpt2
    prepare_data.main(["--dataset", "custom", "--input", str(tmp_path / "t.txt"), "--tokenizer", "gpt2",
                       "--output_dir", str(tmp_path / "tiktoken")])
    for split in ("train.bin", "val.bin"):
        ids = np.fromfile(tmp_path / "offline" / split, dtype=np.uint16)
        assert ids.size and ids.tolist() == np.fromfile(tmp_path / "tiktoken" / split, dtype=np.uint16).tolist()


def test_from_gpt2_rejects_mismatched_files(tmp_path, gpt2_files):
    encoder = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    encoder["Ġt"], encoder["Ġa"] = encoder["Ġa"], encoder["Ġt"]  # swap the first two merges' ids
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(TokenizerError, match="do not belong together"):
        BPETokenizer.from_gpt2(tmp_path / "encoder.json", gpt2_files[1])
    with pytest.raises(TokenizerError, match="cannot read"):
        BPETokenizer.from_gpt2(tmp_path / "missing.json", gpt2_files[1])
    cut = tmp_path / "vocab_cut.bpe"  # a download cut short: the tokens of the missing merges are no specials
    cut.write_text("\n".join(gpt2_files[1].read_text(encoding="utf-8").split("\n")[:1001]), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"encoder.json has 49000 tokens beyond vocab.bpe's 1000 merges that are "
                                             r"not special tokens like '<\|endoftext\|>' \(e.g. 'Ġ"):
        BPETokenizer.from_gpt2(gpt2_files[0], cut)


# -----------------------------------------------------------------------------
# round trips


@settings(max_examples=50, deadline=None)
@given(text=texts)
def test_roundtrip_arbitrary_unicode(text, trained, gpt2_bpe):
    for tok in (trained, gpt2_bpe, GPT2Tokenizer()):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allowed_special="all")) == text
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")
    if text:
        char = CharTokenizer.from_text(text)
        assert char.decode(char.encode(text)) == text


def test_char_tokenizer():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"] and tok.vocab_size == 8
    assert tok.encode("hold") == [3, 5, 4, 1]
    assert tok.decode(np.array([3, 5, 4, 1])) == "hold"
    assert tok.decode_bytes([3, 2]) == b"he"
    assert tok.eot_token is None and tok.kind == "char"


def test_char_tokenizer_names_unseen_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError) as e:
        tok.encode("abcxé\n")
    msg = str(e.value)
    assert "3 character(s)" in msg and "'\\n', 'x', 'é'" in msg and "CharTokenizer.from_text" in msg
    with pytest.raises(TokenizerError) as e:
        tok.encode("".join(chr(0x4e00 + i) for i in range(25)))
    assert "25 character(s)" in str(e.value) and "and 15 more" in str(e.value)


def test_save_load_roundtrip_all_kinds(tmp_path, trained, gpt2_bpe, shakespeare_text):
    text = shakespeare_text[60_000:70_000] + " émoji 🙂 <|endoftext|> 123"
    toks = {
        "char": CharTokenizer.from_text(shakespeare_text),
        "bpe": trained,
        "gpt2_files": gpt2_bpe,
        "gpt2": GPT2Tokenizer(),
    }
    for name, tok in toks.items():
        path = tmp_path / f"{name}.json"
        tok.save(path)
        d = json.loads(path.read_text(encoding="utf-8"))
        assert d == json.loads(json.dumps(tok.to_dict())) and d["kind"] == tok.kind
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok)
        assert loaded.to_dict() == tok.to_dict()
        assert loaded.vocab_size == tok.vocab_size and loaded.eot_token == tok.eot_token
        sample = text if name != "char" else shakespeare_text[60_000:70_000]
        assert loaded.encode(sample) == tok.encode(sample)
        assert loaded.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
        assert tokenizer_from_dict(tok.to_dict()).encode(sample) == tok.encode(sample)


def test_char_tokenizer_keeps_lone_surrogates_apart(tmp_path):
    """A lone high surrogate and the lone low one after it in sorted order stay two characters."""
    tok = CharTokenizer.from_text("ab\ud83d\ude00")
    tok.save(tmp_path / "t.json")
    loaded = load_tokenizer(tmp_path / "t.json")
    assert loaded.chars == tok.chars and loaded.vocab_size == 4
    assert tokenizer_from_dict({"kind": "char", "chars": "ab"}).chars == ["a", "b"]  # files saved as one string


def test_retraining_forgets_what_the_earlier_merges_encoded(shakespeare_text):
    tok = BPETokenizer().train(shakespeare_text[:20000], 300)
    tok.encode(" the king")  # remembered in the chunk cache
    other = "zzz qqq " * 200
    assert tok.train(other, 260).encode(" the king") == BPETokenizer().train(other, 260).encode(" the king")


def test_special_tokens_take_ids_in_the_order_given():
    tok = BPETokenizer().train("hello world " * 50, 262, special_tokens=["<|pad|>", EOT])
    assert tok.special_tokens == {"<|pad|>": 260, EOT: 261} and tok.eot_token == 261
    alone = BPETokenizer().train("hello world " * 50, 261, special_tokens=["<|pad|>"])
    assert alone.eot_token is None  # a special token that is not end-of-text does not end a text


def test_retraining_keeps_the_special_tokens_unless_given_others(shakespeare_text):
    text = shakespeare_text[:20000]
    tok = BPETokenizer().train(text, 270, special_tokens=[EOT])
    assert tok.train(text, 280).special_tokens == {EOT: 279}  # None keeps them, with ids after the merges
    assert tok.train(text, 280, special_tokens=[]).special_tokens == {}


def test_save_load_custom_pattern_and_special_tokens(tmp_path):
    # digits one at a time, everything else in one piece: merges may cross spaces, unlike GPT-2's
    pattern = r"\p{N}|[^\p{N}]+"
    text = "the 1234 cats, the 5678 hats; then 9012 bats. " * 30
    tok = BPETokenizer(pattern).train(text, 280, special_tokens=[EOT, "<|pad|>"])
    assert tok.special_tokens == {EOT: 278, "<|pad|>": 279}
    assert any(b"e " in tok.vocab[i] for i in tok.merges.values())
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.pattern == pattern and loaded.special_tokens == tok.special_tokens
    assert loaded.merges == tok.merges
    sample = "the 42 cats<|pad|>then<|endoftext|>"
    ids = loaded.encode(sample, allowed_special="all")
    assert ids == tok.encode(sample, allowed_special="all") == naive_special_encode(sample, tok, pattern)
    assert ids[-1] == 278 and 279 in ids
    assert loaded.encode(sample, allowed_special={"<|pad|>"})[-1] != 278
    # with GPT-2's pattern the same merges give other ids: the file must keep the custom pattern
    assert naive_encode("the 42 cats", tok.merges) != loaded.encode("the 42 cats")


def naive_special_encode(text, tok, pattern):
    ids = []
    for i, part in enumerate(re.split("(<\\|pad\\|>|<\\|endoftext\\|>)", text)):
        ids.extend([tok.special_tokens[part]] if i % 2 else naive_encode(part, tok.merges, pattern))
    return ids


def test_saved_file_is_readable(tmp_path, trained):
    path = tmp_path / "tok.json"
    trained.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "{" and lines[1] == ' "kind": "bpe",'
    first_merge = list(trained.merges)[0]
    assert f"  [{first_merge[0]}, {first_merge[1]}]," in lines  # one merge per line, in rank order
    assert not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# bad input


def test_bad_training_input():
    with pytest.raises(TokenizerError, match="empty text"):
        BPETokenizer().train("", 300)
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer().train("hello", 256, special_tokens=[EOT])
    with pytest.raises(TokenizerError, match="too small"):
        BPETokenizer().train("hello", 100)
    for bad in ("4096", 4096.0):
        with pytest.raises(TokenizerError, match="must be an integer"):
            BPETokenizer().train("hello", bad)
    assert BPETokenizer().train("hello", np.int64(258)).vocab_size == 258  # numpy's integers are integers
    with pytest.raises(TokenizerError, match=r"special_tokens must be a list of strings, got the string '<eos>'; "
                                             r"e.g. special_tokens=\['<eos>'\]"):
        BPETokenizer().train("hello", 300, special_tokens="<eos>")
    with pytest.raises(TokenizerError, match="empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(TokenizerError, match="takes a str, got bytes"):
        CharTokenizer.from_text(b"hello")
    with pytest.raises(TokenizerError, match="takes a str, got bytes"):
        BPETokenizer().train(b"hello", 300)
    for bad in (["\ud800"], [""], [EOT, EOT]):
        with pytest.raises(TokenizerError, match="special tokens must be distinct non-empty strings of valid"):
            BPETokenizer().train("hello", 300, special_tokens=bad)
    with pytest.raises(TokenizerError, match="not a valid regular expression"):
        BPETokenizer(pattern="(unclosed")
    assert BPETokenizer().train("hello", 257, special_tokens=[EOT]).encode("hello") == list(b"hello")


@pytest.mark.parametrize("pattern, text, where", [
    (r"\w+", "hello, world!", "character 5 (', world!')"),  # would encode as 'helloworld'
    ("(?=x)", "abc", "character 0 ('abc')"),  # matches only empty strings: would encode as []
    (r"[a-z]+|.", "ab<|endoftext|>cd\n", "character 17 ('\\n')"),  # '.' skips '\n'; counted in the whole text
])
def test_pattern_that_skips_text_is_refused(pattern, text, where):
    message = f"split pattern {pattern!r} does not match the text at {where}"
    with pytest.raises(TokenizerError, match=re.escape(message)):
        BPETokenizer(pattern).train(text, 300, special_tokens=[EOT])
    with pytest.raises(TokenizerError, match="must match every character"):
        BPETokenizer(pattern).encode(text)  # untrained: no merges, still no silent loss
    tok = BPETokenizer(pattern + "|(?s:.)").train(text, 300, special_tokens=[EOT])  # the suggested fix
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(TokenizerError, match=r"capturing groups.*\(\?:"):
        BPETokenizer(f"({pattern})")


def test_encode_ordinary_with_a_check_gives_the_same_ids_and_stops_where_it_raises(monkeypatch, shakespeare_text):
    import tokenizer as tokenizer_module
    monkeypatch.setattr(tokenizer_module, "CHECK_EVERY_CHUNKS", 1000)
    tok = BPETokenizer(r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+").train(shakespeare_text[:50_000], 400)
    text = shakespeare_text[:100_000]
    chunks = len(tok._split(text))
    calls = []
    assert tok.encode_ordinary(text, check=lambda: calls.append(1)) == tok.encode_ordinary(text)
    assert len(calls) == -(-chunks // 1000) > 10  # before each 1,000 chunks

    class Stop(Exception):
        pass

    def stop_at_the_third():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        tok.encode_ordinary(text, check=stop_at_the_third)
    assert len(calls) == 3
    with pytest.raises(TokenizerError, match=r"does not match the text at character 5 \(', world!'\)"):
        BPETokenizer(r"\w+").encode_ordinary("hello, world!", check=lambda: None)  # a gap: the same error


@pytest.mark.parametrize("make", [lambda: CharTokenizer.from_text("abc"), lambda: BPETokenizer().train("abab", 258),
                                  GPT2Tokenizer])
def test_decode_rejects_ids_out_of_range(make):
    tok = make()
    n = tok.vocab_size
    for bad in (n, -1, n + 1000):
        with pytest.raises(TokenizerError) as e:
            tok.decode([0, bad, 1])
        assert f"token id {bad}" in str(e.value) and f"0 to {n - 1}" in str(e.value)
    for bad in ([0, "1"], [0, 1.0], "ab", [[0, 1]]):
        with pytest.raises(TokenizerError, match="integers"):
            tok.decode(bad)
    for bad in (None, 1.5):
        with pytest.raises(TokenizerError, match=rf"^token ids must be an integer or a sequence of them, got "
                                                 rf"{type(bad).__name__}$"):
            tok.decode(bad)
    assert tok.decode([np.int64(0), True]) == tok.decode([0, 1])
    assert tok.decode(torch.tensor([0, 1])) == tok.decode(np.array([0, 1])) == tok.decode([0, 1])
    assert tok.decode([]) == ""


def test_invalid_utf8_decodes_to_replacement_characters(gpt2_bpe, tiktoken_gpt2):
    ids = tiktoken_gpt2.encode("🙂")  # 4 bytes, split over several tokens
    assert len(ids) > 1
    for tok in (gpt2_bpe, GPT2Tokenizer()):
        assert tok.decode(ids[:-1]) == tiktoken_gpt2.decode(ids[:-1])
        assert "\ufffd" in tok.decode(ids[:-1])
        assert tok.decode_bytes(ids[:-1]) == "🙂".encode("utf-8")[:len(tok.decode_bytes(ids[:-1]))]
    tok = BPETokenizer()
    assert tok.decode([0xE2, 0x82, 0x41, 0xFF]) == b"\xe2\x82A\xff".decode("utf-8", "replace")


def test_bad_allowed_special():
    tok = BPETokenizer(special_tokens={EOT: 256})
    with pytest.raises(TokenizerError, match="does not have"):
        tok.encode("x", allowed_special={"<|pad|>"})
    with pytest.raises(TokenizerError, match="not understood"):
        tok.encode("x", allowed_special="some")
    for value in (None, 3):
        with pytest.raises(TokenizerError, match=f"allowed_special={value} is not understood"):
            tok.encode("x", allowed_special=value)
    with pytest.raises(TokenizerError, match="allowed_special names 1, '<x>', which"):  # mixed types still sort
        tok.encode("x", allowed_special={"<x>", 1})
    with pytest.raises(TokenizerError, match="takes a str"):
        tok.encode(b"bytes")
    assert tok.encode("x<|endoftext|>", allowed_special="all") == [120, 256]
    for encode in (CharTokenizer("abc").encode_ordinary, CharTokenizer("abc").encode):  # not ids "never seen"
        with pytest.raises(TokenizerError, match="^encode\\(\\) takes a str, got bytes"):
            encode(b"abc")


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read the tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    for bad in ["{not json", '{"kind": "char", "n": ' + "1" * 5000 + "}", "[" * 100_000]:
        (tmp_path / "bad.json").write_text(bad, encoding="utf-8")
        with pytest.raises(TokenizerError, match="invalid JSON"):
            load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="kind"):
        tokenizer_from_dict({"kind": "sentencepiece"})
    # saved again by Windows Notepad, with a byte-order mark first
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + CharTokenizer("bca").to_json().encode())
    assert load_tokenizer(tmp_path / "bom.json").chars == ["a", "b", "c"]
    assert tokenizer_from_dict(CharTokenizer("bca").to_dict()).chars == ["a", "b", "c"]
    for chars in (["b", "a"], ["a", "a", "b"], "ba", {"a": 0}, ["a", 1]):  # a hand-edited file: ids would shift
        with pytest.raises(TokenizerError, match="the saved char tokenizer is damaged or incomplete"):
            tokenizer_from_dict({"kind": "char", "chars": chars})
    d = BPETokenizer().train("abab abab", 260).to_dict()
    with pytest.raises(TokenizerError, match="damaged"):
        tokenizer_from_dict({k: v for k, v in d.items() if k != "merges"})
    d["merges"][0] = [300, 1]
    with pytest.raises(TokenizerError, match="later token"):
        tokenizer_from_dict(d)


# -----------------------------------------------------------------------------
# command line


def test_cli_help_and_train(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, tokenizer.__file__, *args], cwd=tmp_path, capture_output=True, text=True)

    out = cli("--help")
    assert out.returncode == 0 and "--vocab_size" in out.stdout and "--bench" in out.stdout
    (tmp_path / "in.txt").write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    out = cli("--train", "in.txt", "--vocab_size", "280", "--special", EOT, "--out", "tok.json")
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.vocab_size == 280 and tok.eot_token == 279
    out = cli("--train", "in.txt", "--vocab_size", "10")
    assert out.returncode == 2 and out.stderr.startswith("error: vocab_size 10 is too small")
    for size in (2 ** 31, 2 ** 54):  # pairs of ids would overflow 64 bits: wrong merges, or a KeyError
        out = cli("--train", "in.txt", "--vocab_size", str(size))
        assert out.returncode == 2 and out.stderr.startswith(f"error: vocab_size {size} is too large"), out.stderr
    for size in (4096, 2 ** 31 - 1):  # the largest: both stop when every chunk is one token, with the same merges
        out = cli("--train", "in.txt", "--vocab_size", str(size), "--out", f"{size}.json")
        assert out.returncode == 0, out.stderr
    assert load_tokenizer(tmp_path / f"{2 ** 31 - 1}.json").merges == load_tokenizer(tmp_path / "4096.json").merges
    out = cli("--train", "missing.txt")
    assert out.returncode == 2 and "cannot read the text file 'missing.txt'" in out.stderr
    if os.path.exists("/dev/zero"):  # read until memory ran out, before
        for flag in ("--train", "--bench"):
            out = cli(flag, "/dev/zero", "--vocab_size", "300")
            assert (out.returncode, out.stderr) == (2, "error: /dev/zero is a device, not a file; pass a file or a "
                                                       "pipe\n")
    (tmp_path / "outdir").mkdir()
    out = cli("--train", "in.txt", "--out", "outdir")
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: --out 'outdir' is a directory; --out is the file to write, e.g. --out outdir/tokenizer.json"]
    out = cli("--train", "in.txt", "--out", "in.txt/tok.json")  # before training, not after it
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: --out 'in.txt/tok.json' cannot be written: its folder is a file; give a path you can write to"]
    before = (tmp_path / "in.txt").read_bytes()
    out = cli("--train", "in.txt", "--out", "./in.txt")  # the text itself: refused, and the text stays
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: --out './in.txt' is the training text itself, which writing the tokenizer would destroy; give "
        "another file, e.g. --out tokenizer.json"] and (tmp_path / "in.txt").read_bytes() == before
    (tmp_path / "zh.txt").write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 30, encoding="utf-8")
    out = cli("--bench", "zh.txt", "--vocab_size", "280")
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "zh.txt").read_text(encoding="utf-8")
    size = len(text.encode()) / 1e6
    assert out.stdout.startswith(f"zh.txt: {size:.2f} MB, {len(text):,} characters")
    ids = BPETokenizer().train(text, 280).encode_ordinary(text)
    assert f", {len(ids):,} tokens, " in out.stdout
    tokens_per_s, mb_per_s = re.search(r"bpe .*?, ([\d,]+) tokens/s, ([\d.]+) MB/s", out.stdout).groups()
    assert float(mb_per_s) == pytest.approx(float(tokens_per_s.replace(",", "")) * size / len(ids), rel=0.02, abs=0.01)
    out = cli("--bench", "in.txt", "--vocab_size", "280", "--pattern", r"\w+")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(r"error: the split pattern '\\w+' does not match the text at character 2 (' be or")
    assert "on the command line leave out --pattern" in out.stderr
    for spelled in ("gpt2", "None"):  # GPT-2's pattern, as the help says
        out = cli("--train", "in.txt", "--vocab_size", "280", "--pattern", spelled, "--out", f"{spelled}.json")
        assert out.returncode == 0, out.stderr
        assert load_tokenizer(tmp_path / f"{spelled}.json").pattern == GPT2_SPLIT_PATTERN
    out = cli("--train", "in.txt", "--vocab_size", "280", "--pattern", r"\S+|\s+", "--out", "own.json")
    assert out.returncode == 0, out.stderr
    assert load_tokenizer(tmp_path / "own.json").pattern == r"\S+|\s+"


def test_cli_out_to_stdout_and_flags_bench_ignores(tmp_path):
    (tmp_path / "in.txt").write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    with open(tmp_path / "piped.json", "w") as f:  # --out /dev/stdout > file: the file is the tokenizer alone
        out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "in.txt", "--vocab_size", "270",
                              "--out", "/dev/stdout"], cwd=tmp_path, stdout=f, stderr=subprocess.PIPE, text=True)
    assert out.returncode == 0, out.stderr
    assert load_tokenizer(tmp_path / "piped.json").vocab_size == 270
    assert "saved a 270-token BPE tokenizer to /dev/stdout" in out.stderr
    for extra in (["--special", EOT], ["--out", "b.json"]):  # --bench writes nothing: these would do nothing
        out = subprocess.run([sys.executable, tokenizer.__file__, "--bench", "in.txt", "--vocab_size", "270", *extra],
                             cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout == "" and "apply to --train only" in out.stderr
    assert not (tmp_path / "b.json").exists()


def test_training_reports_while_it_counts_chunks(monkeypatch, capsys):
    """Counting a large text's chunks takes minutes per GB before the first merge: it says how far it is."""
    clock = iter(range(0, 10**6, 10))  # 10 s pass between two looks at the clock
    monkeypatch.setattr(tokenizer.time, "time", lambda: next(clock))
    monkeypatch.setattr(tokenizer, "REPORT_EVERY_CHUNKS", 100)
    text = " ab" * 500  # 500 chunks of 3 characters
    BPETokenizer().train(text, 258, verbose=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("counting chunks")]
    assert [line.split(",")[0] for line in lines] == [f"counting chunks: {p}% of the text" for p in (20, 40, 60, 80, 100)]
    BPETokenizer().train(text, 258)  # not verbose: nothing
    assert capsys.readouterr().err == ""
    # chunks are counted across the parts between special tokens (a data set's files): 50 chunks in each of
    # 10 parts, a report every 100 chunks, where the percentages go on rising
    text = (" ab" * 50 + EOT) * 10
    BPETokenizer().train(text, 259, verbose=True, special_tokens=[EOT])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("counting chunks")]
    percents = [int(line.split()[2][:-1]) for line in lines]
    assert len(percents) == 5 and percents == sorted(set(percents)) and percents[-1] >= 90, lines
    # at most one line in 5 seconds: with 2 s between looks at the clock, every third report prints
    clock = iter(range(0, 10**6, 2))
    monkeypatch.setattr(tokenizer.time, "time", lambda: next(clock))
    BPETokenizer().train(" ab" * 1000, 258, verbose=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("counting chunks")]
    assert 0 < len(lines) < 10 - 3


def test_merges_report_at_least_every_few_seconds(monkeypatch, capsys, shakespeare_text):
    """The first merges of a Chinese text take seconds each: a line comes by the clock too, not only every
    twentieth of the merges."""
    clock = iter(range(0, 10**6, 10))  # 10 s pass between two looks at the clock
    monkeypatch.setattr(tokenizer.time, "time", lambda: next(clock))
    BPETokenizer().train(shakespeare_text[:20_000], 256 + 60, verbose=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("merge ")]
    assert [line.split(":")[0] for line in lines] == [f"merge {i}/60" for i in range(1, 61)]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to stand for a full disk")
def test_cli_saved_tokenizer_is_no_failure_when_stdout_cannot_take_the_last_line(tmp_path):
    (tmp_path / "in.txt").write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "in.txt", "--vocab_size", "270", "--out",
                              "tok.json"], cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True)
    assert out.returncode == 0 and out.stderr.endswith(
        "saved a 270-token BPE tokenizer to tok.json (stdout could not take this line: No space left on device)\n")
    assert load_tokenizer(tmp_path / "tok.json").vocab_size == 270


def test_cli_notes_a_special_token_that_the_text_uses_as_text(tmp_path):
    """Training cuts the text at each special token, prepare_data.py encodes it as text: --special ' ' would
    keep the space out of every merge, in silence."""
    (tmp_path / "in.txt").write_text(f"to be or not to be{EOT}that is the question\n" * 20, encoding="utf-8")
    for special, note in ((" ", "note: --special ' ' occurs 160 times in in.txt; training leaves those places out "
                                "of every merge, while prepare_data.py encodes them as ordinary text"),
                          (EOT, None)):  # the end-of-text marker is meant to be in the text
        out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "in.txt", "--vocab_size", "270",
                              "--special", special, "--out", "tok.json"], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert (note in out.stderr) if note else "note:" not in out.stderr, out.stderr
    for specials in ([""], ["a", "a"]):  # refused in one line, without notes that count '' everywhere first
        out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "in.txt", "--out", "tok.json",
                              *[arg for s in specials for arg in ("--special", s)]],
                             cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.splitlines() == [
            f"error: special tokens must be distinct non-empty strings of valid Unicode, got {specials!r}"]


def test_a_pattern_gap_is_placed_in_the_whole_text_given_to_encode():
    """encode() with special tokens: the position counts from the start of the text, not of its last part."""
    tok = BPETokenizer(r"[a-z<|>]+").train("abcdefgh" * 10, 260, special_tokens=[EOT])
    text = "abcdefgh" + EOT + "ab1"
    with pytest.raises(tokenizer.PatternGapError, match=r"does not match the text at character 23 \('1'\)") as e:
        tok.encode(text, allowed_special="all")
    assert e.value.position == 23 == text.index("1")


def test_cli_names_text_in_another_encoding_as_prepare_data_does(tmp_path):
    (tmp_path / "gbk.txt").write_bytes(b"\xef\xbb\xbfabc\xc4\xe3")  # a byte-order mark, then GBK
    (tmp_path / "u16.txt").write_bytes("to be or not to be\n".encode("utf-16"))
    for name, message in (("gbk.txt", "byte 0xc4 at byte offset 6 (invalid continuation byte); convert the file to "
                                      "UTF-8 first, e.g. `iconv -f gbk -t utf-8 IN > OUT`"),
                          ("u16.txt", "byte 0xff at byte offset 0 (invalid start byte); it is UTF-16")):
        out = subprocess.run([sys.executable, tokenizer.__file__, "--train", name, "--out", "t.json"], cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"error: {name} is not valid UTF-8: {message}"), out.stderr
    assert not (tmp_path / "t.json").exists()
    # UTF-16 without a byte-order mark is valid UTF-8, a NUL beside each letter: it trained a BPE of 259 tokens
    (tmp_path / "u16le.txt").write_bytes(("to be or not to be\n" * 20).encode("utf-16-le"))
    out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "u16le.txt", "--out", "t.json"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert (out.returncode, out.stderr.splitlines()[:1]) == (2, [
        "error: u16le.txt is not text: 380 of its first 760 bytes are NULs, every other byte: it looks like UTF-16 "
        "without a byte-order mark (what Windows Notepad calls 'Unicode'), so convert it with `iconv -f utf-16le -t "
        "utf-8 IN > OUT`; or it is a binary file, such as a data set's train.bin"]), out.stderr
    assert not (tmp_path / "t.json").exists()


def test_cli_expands_a_tilde_in_paths(tmp_path):
    """--out=~/tok.json reaches the program unexpanded (no shell expands ~ after '='): it means the home folder."""
    (tmp_path / "in.txt").write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    out = subprocess.run([sys.executable, tokenizer.__file__, "--train=~/in.txt", "--vocab_size", "260",
                          "--out=~/tok.json"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path / "home")})
    assert out.returncode == 2 and "'~/in.txt'" not in out.stderr  # the path was expanded, then not found
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "in.txt").write_bytes((tmp_path / "in.txt").read_bytes())
    out = subprocess.run([sys.executable, tokenizer.__file__, "--train=~/in.txt", "--vocab_size", "260",
                          "--out=~/tok.json"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr
    assert load_tokenizer(tmp_path / "home" / "tok.json").vocab_size == 260 and not (tmp_path / "~").exists()


def test_cli_keeps_line_ends(tmp_path):
    """--train keeps CRLF and CR line ends as they are in the file, as prepare_data.py (which reads bytes) does."""
    data = b"to be or not to be\r\n\r\n" * 20 + b"old mac\r\r" * 20
    (tmp_path / "crlf.txt").write_bytes(data)
    out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "crlf.txt", "--vocab_size", "300",
                          "--out", "tok.json"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.merges == BPETokenizer().train(data.decode("utf-8"), 300).merges
    # merges of the file's line ends; read_text would have turned them into '\n\n' and '\n'
    assert {b"\r\n\r", b"\r\r"} <= set(tok.vocab.values())
    (tmp_path / "bom.txt").write_bytes("\ufeff".encode() + data)  # a byte-order mark is no text
    out = subprocess.run([sys.executable, tokenizer.__file__, "--train", "bom.txt", "--vocab_size", "300",
                          "--out", "tok2.json"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert load_tokenizer(tmp_path / "tok2.json").merges == tok.merges


def test_hf_files_only_for_what_gpt2s_files_can_hold():
    tok = BPETokenizer()
    tok._set([(97, 98), (256, 99), (97, 98 + 1)], {})  # 'ab', 'abc', 'ac': GPT-2's files can hold these
    files = tok.hf_files()
    assert files["merges.txt"] == "#version: 0.2\na b\nab c\na c\n"
    assert json.loads(files["vocab.json"])["abc"] == 257 and json.loads(files["tokenizer_config.json"])["eos_token"] is None
    tok._set([(98, 99), (97, 98), (97, 256), (257, 99)], {})  # 'abc' made twice: vocab.json is keyed by spelling
    assert tok.hf_files() == {}
    tok._set([(97, 98)], {"ab": 257})  # a special token spelled like the token 'ab'
    assert tok.hf_files() == {}
    tok._set([(97, 98)], {"Ġ": 257})  # ... or like the byte ' ', which GPT-2's files spell 'Ġ'
    assert tok.hf_files() == {}
    for name in ("<|naïve|>", "<|Ġsep|>"):  # transformers would decode them as the bytes their letters spell
        tok._set([(97, 98)], {name: 257})
        assert tok.hf_files() == {}, name
    for name in ("<|sp ace|>", "<s>", "[SEP]", "<|👋|>", "\n\n"):  # these it decodes as they are
        tok._set([(97, 98)], {name: 257})
        assert json.loads(tok.hf_files()["vocab.json"])[name] == 257
    assert set(BPETokenizer(r"\S+|\s+").hf_files()) == set()  # another split pattern
    assert CharTokenizer(["a", "\ud800"]).hf_files() == {}  # a lone surrogate has no place in their JSON


def test_gpt2s_files_from_tiktoken_name_its_special_token():
    config = json.loads(GPT2Tokenizer().hf_files()["tokenizer_config.json"])
    assert config["eos_token"] == config["bos_token"] == EOT
    assert config["added_tokens_decoder"]["50256"]["content"] == EOT and config["clean_up_tokenization_spaces"] is False


def test_gpt2_files_python_cannot_read_are_one_clear_error(tmp_path):
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    for bad in ['{"!": ' + "1" * 5000 + "}", "[" * 100_000, "{not json"]:
        (tmp_path / "encoder.json").write_text(bad, encoding="utf-8")
        with pytest.raises(TokenizerError, match="cannot read GPT-2's encoder.json / vocab.bpe"):
            BPETokenizer.from_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_gpt2s_ids_are_known_by_their_bytes(gpt2_files):
    from tokenizer import has_gpt2_ids
    ours = BPETokenizer.from_gpt2(*gpt2_files)
    assert has_gpt2_ids(GPT2Tokenizer()) and has_gpt2_ids(ours)
    d = ours.to_dict()
    d["byte_ids"][ord("a")], d["byte_ids"][ord("b")] = d["byte_ids"][ord("b")], d["byte_ids"][ord("a")]
    assert not has_gpt2_ids(tokenizer_from_dict(d))  # "a" and "b" swapped, and every token made of them
    d["special_tokens"]["<|pad|>"] = 50257
    assert has_gpt2_ids(ours) and ours.special_tokens == {EOT: 50256}  # the dict was a copy
    assert not has_gpt2_ids(CharTokenizer(list("ab")))
