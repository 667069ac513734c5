"""
Tokenizers behind one interface: character-level, trainable byte-level BPE, and OpenAI's GPT-2.

    CharTokenizer.from_text(text)           # ids = index in the sorted set of characters
    BPETokenizer().train(text, 4096)        # byte-level BPE with GPT-2's regex pre-split
    BPETokenizer.from_gpt2(encoder_json, vocab_bpe)   # OpenAI's files, tiktoken's ids (see from_gpt2)
    GPT2Tokenizer()                         # tiktoken's 'gpt2' encoding (vocab 50257)

All of them have encode(text) -> list[int], encode_ordinary, decode(ids) -> str, decode_bytes,
vocab_size, eot_token, save(path); load_tokenizer(path) restores whatever save() wrote, so a
data set, a checkpoint and generation always agree on the tokenizer.

Benchmark and training from the command line:

    python tokenizer.py --bench data/shakespeare_char/input.txt --vocab_size 4096
    python tokenizer.py --train input.txt --vocab_size 4096 --special '<|endoftext|>' --out tok.json

Naming follows minbpe (merges {(int, int): int}, vocab {int: bytes}, special_tokens {str: int},
encode_ordinary next to encode(allowed_special=...)); GPT-2's split pattern and file formats
follow OpenAI's gpt-2 release, and BPETokenizer.from_gpt2 reproduces tiktoken's 'gpt2' encoding
(except on characters added to Unicode lately, see from_gpt2).
"""
import argparse
import contextlib
import heapq
import json
import operator
import os
import re
import sys
import time
from array import array
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import regex  # unlike re, it knows the Unicode classes \p{L} and \p{N} of GPT-2's pattern

from utils import (ArgumentParser, HelpFormatter, UserError, atomic_open, output_file_problem, path_arg, print_result,
                   read_utf8_file, run_cli, writes_directly)

# GPT-2's pre-split: contractions, letters, digits, other symbols (each with at most one leading
# space), and runs of whitespace. A space is kept at the start of the word that follows it, and
# BPE never merges across two of these chunks.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE, GPT2_EOT_TOKEN = 50257, 50256  # what OpenAI's GPT-2 reads: its ids and end-of-text's
# sha256 of GPT-2's token_bytes() (each as a 4-byte little-endian length, then the bytes), known without tiktoken
GPT2_TOKEN_BYTES_SHA256 = "a5623714bcf19049eb0fd78df19b6daa1e61ac435b86a5deae767768e7fcdc3d"
# merged chunks are cached by encode_ordinary; the cache is emptied when it reaches this size
CHUNK_CACHE_SIZE = 1 << 18
# chunks of more bytes than this are merged with a heap (n log n) instead of repeated scans (n^2); the
# two cost the same at about 10 bytes (a 4096-token vocabulary, English or Chinese text). English words
# are shorter, while a chunk of Chinese, which has no spaces, is a whole phrase
LONG_CHUNK = 12
ALLOWED_SPECIAL_MODES = ("none", "all", "none_raise")


REPORT_EVERY_CHUNKS = 1 << 20  # BPE training looks at the clock this often while it counts chunks (~5 MB of text)
REPORT_S = 5.0  # BPE training's progress lines come at least this often
CHECK_EVERY_CHUNKS = 1 << 16  # encode_ordinary(text, check) calls check this often (~300 KB of English text)


class _ChunkReport:
    """BPE training's progress while it counts chunks, which takes about 0.16 s per MB: a GB of text is
    minutes of it. Called with the characters done so far; prints at most every REPORT_S seconds."""

    def __init__(self, total_chars: int, t0: float):
        self.total, self.t0, self.last, self.chunks = total_chars, t0, t0, 0

    def __call__(self, pos: int) -> None:
        if time.time() - self.last >= REPORT_S:
            self.last = time.time()
            print(f"counting chunks: {pos / self.total:.0%} of the text, {self.last - self.t0:.1f}s", file=sys.stderr)


def has_gpt2_ids(tokenizer: "Tokenizer") -> bool:
    """Whether every id stands for the bytes it stands for in GPT-2, as it does in BPETokenizer.from_gpt2's
    (kind 'bpe'): data in its ids can fine-tune OpenAI's GPT-2."""
    import hashlib
    if tokenizer.vocab_size != GPT2_VOCAB_SIZE:
        return False
    digest = hashlib.sha256()
    for b in tokenizer.token_bytes():
        digest.update(len(b).to_bytes(4, "little") + b)
    return digest.hexdigest() == GPT2_TOKEN_BYTES_SHA256


class TokenizerError(UserError, ValueError):
    """Bad tokenizer input: an unseen character, an id out of range, a bad training setup or file."""


class GPT2FilesError(TokenizerError):
    """tiktoken, or its 'gpt2' files, cannot be had here (not installed; offline without TIKTOKEN_CACHE_DIR)."""


class PatternGapError(TokenizerError):
    """A BPE split pattern that matches nothing at some character of the text (.position, counted in
    characters of the text given to encode or train), so that text would be left out. Callers that know
    where the text came from (prepare_data.py: a file and a byte offset) say so in their own words."""

    position = 0


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of text; a lone surrogate (which UTF-8 cannot hold) becomes U+FFFD, as in tiktoken."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def listing(items: list, at_most: int = 10) -> str:
    """['a', 'b', ..., 'z'] -> "'a', 'b', ... and 16 more" (repr of each item)."""
    shown = ", ".join(repr(x) for x in items[:at_most])
    return shown + (f" and {len(items) - at_most} more" if len(items) > at_most else "")


# -----------------------------------------------------------------------------
# the interface


class Tokenizer:
    """Common base: encode/decode with special tokens, id checks, save. Subclasses fill in the rest."""

    kind: str = ""
    eot_token: int | None = None  # id of '<|endoftext|>', or None when the tokenizer has none
    special_tokens: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: every id is in range(vocab_size)."""
        raise NotImplementedError

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text as plain text: special-token strings in it are ordinary characters."""
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for. A prefix of a multi-byte character may be cut off at the end,
        so streaming output should decode the bytes incrementally (codecs.getincrementaldecoder)."""
        raise NotImplementedError

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes, in id order (a special token's are its string's)."""
        return [self.decode_bytes([i]) for i in range(self.vocab_size)]

    def to_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer, as plain JSON types; includes "kind"."""
        raise NotImplementedError

    def hf_files(self) -> dict[str, str]:
        """File name -> text of the files with which transformers' AutoTokenizer loads this tokenizer
        (model.save_pretrained writes them beside the weights); {} where transformers cannot express it."""
        return {}

    def encode(self, text: str, allowed_special="none") -> list[int]:
        """Encode text into ids.

        allowed_special says which special-token strings in the text become their special id:
        "none" (default): none, they are encoded as ordinary text; "all": all of them; a set of
        special-token strings: those, the others stay ordinary text; "none_raise": none, and a
        text that contains one raises TokenizerError (tiktoken's default behaviour).
        """
        allowed = self._allowed_special(text, allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        # split around the allowed special tokens; the capturing group keeps them at odd indices,
        # and the longest alternative goes first so that a special token containing another wins
        split = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids, offset = [], 0
        for i, part in enumerate(re.split(split, text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_part(part, offset))
            offset += len(part)
        return ids

    def _encode_part(self, text: str, offset: int) -> list[int]:
        """encode_ordinary of text that starts at character `offset` of what encode() was given (for errors)."""
        return self.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """encode_ordinary of each text. Pure-Python tokenizers hold the GIL, so this runs serially;
        GPT2Tokenizer overrides it with tiktoken's threaded version."""
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        """ids (a list, numpy array or 1-D tensor) -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        """Write to_json() to path; load_tokenizer(path) restores it."""
        with atomic_open(path, "w") as f:
            f.write(self.to_json())

    def to_json(self) -> str:
        """to_dict() as human-readable JSON: what save() writes."""
        return _dumps(self.to_dict())

    def _allowed_special(self, text: str, allowed_special) -> set[str]:
        """Validate encode()'s arguments; return the set of special tokens to recognise in text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}; decode bytes first, "
                                 f"e.g. data.decode('utf-8')")
        if isinstance(allowed_special, str):
            if allowed_special not in ALLOWED_SPECIAL_MODES:
                raise TokenizerError(f"allowed_special={allowed_special!r} is not understood; use one of "
                                     f"{ALLOWED_SPECIAL_MODES} or a set of special-token strings")
            if allowed_special == "all":
                return set(self.special_tokens)
            if allowed_special == "none_raise":
                found = [s for s in self.special_tokens if s in text]
                if found:
                    raise TokenizerError(
                        f"the text contains the special token(s) {listing(found)}, and "
                        f"allowed_special='none_raise' forbids them; pass allowed_special='all' to encode "
                        f"them as special tokens, or 'none' to encode them as ordinary text")
            return set()
        try:
            allowed = set(allowed_special)
        except TypeError:  # None, a number
            raise TokenizerError(f"allowed_special={allowed_special!r} is not understood; use one of "
                                 f"{ALLOWED_SPECIAL_MODES} or a set of special-token strings") from None
        unknown = sorted(allowed - set(self.special_tokens), key=str)
        if unknown:
            raise TokenizerError(f"allowed_special names {listing(unknown)}, which this {self.kind} tokenizer "
                                 f"does not have; its special tokens are {listing(list(self.special_tokens))}")
        return allowed

    def _check_ids(self, ids) -> list[int]:
        """ids as a list of ints, each in range(vocab_size); TokenizerError naming the first bad one."""
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        try:
            ids = [ids] if isinstance(ids, int) else list(ids)
        except TypeError:
            raise TokenizerError(f"token ids must be an integer or a sequence of them, got "
                                 f"{type(ids).__name__}") from None
        if not all(type(i) is int for i in ids):
            try:  # numpy integers and the like become ints; floats and strings are refused
                ids = [operator.index(i) for i in ids]
            except TypeError:
                raise TokenizerError(f"token ids must be integers, got {listing(ids[:3], 3)}...") from None
        n = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= n):
            bad = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(
                f"cannot decode token id {bad}: this {self.kind} tokenizer has ids 0 to {n - 1} "
                f"(vocab_size {n}). The ids were probably made with a different tokenizer; decode them "
                f"with the one saved beside that data set or checkpoint (load_tokenizer(path))")
        return ids


def _dumps(d: dict) -> str:
    """JSON with one key per line, and lists of lists (the merges) one item per line."""
    lines = []
    for key, value in d.items():
        if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
            text = "[\n" + ",\n".join("  " + json.dumps(x) for x in value) + "\n ]"
        else:
            text = json.dumps(value, ensure_ascii=False)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: only the \u escape can store it
                text = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def tokenizer_from_dict(d: dict) -> "Tokenizer":
    """Rebuild a tokenizer from its to_dict()."""
    if not isinstance(d, dict) or d.get("kind") not in ("char", "bpe", "gpt2"):
        kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise TokenizerError(f"not a saved tokenizer: expected a JSON object with \"kind\" 'char', 'bpe' or "
                             f"'gpt2', got {kind!r}; make the file with Tokenizer.save(path)")
    try:
        if d["kind"] == "char":
            # ids are positions in this list: one that is not as to_dict() wrote it (sorted, no repeats)
            # would be re-sorted into other ids without a word
            chars = list(d["chars"]) if isinstance(d["chars"], str) else d["chars"]  # older files: one string
            if not isinstance(chars, list) or chars != sorted(set(chars)):
                raise ValueError("its chars must be a list of distinct characters in sorted order")
            return CharTokenizer(chars)
        if d["kind"] == "gpt2":
            return GPT2Tokenizer()
        tok = BPETokenizer(d["pattern"])
        tok._set(d["merges"], d["special_tokens"], d.get("byte_ids"), d.get("merge_rule", "pairs"))
        return tok
    except TokenizerError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"the saved {d['kind']} tokenizer is damaged or incomplete ({type(e).__name__}: "
                             f"{e}); save it again with Tokenizer.save(path)") from e


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """Restore a tokenizer from the file Tokenizer.save(path) wrote."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as Windows Notepad saves, is no JSON
            d = json.load(f)
    except OSError as e:
        raise TokenizerError(f"cannot read the tokenizer file {str(path)!r} ({e.strerror or e}); "
                             f"pass the tokenizer.json written beside the data set or checkpoint") from e
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply, an integer too long
        raise TokenizerError(f"{str(path)!r} is not a tokenizer file (invalid JSON: {e}); "
                             f"write one with Tokenizer.save(path)") from e
    return tokenizer_from_dict(d)


# -----------------------------------------------------------------------------
# character-level


class CharTokenizer(Tokenizer):
    """One id per character: the index of the character in the sorted set it was built from.

    >>> CharTokenizer.from_text("hello").encode("hole")
    [1, 3, 2, 0]
    """

    kind = "char"

    def __init__(self, chars: str | list[str]):
        chars = sorted(set(chars))
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if not chars or bad:
            raise TokenizerError(f"CharTokenizer needs a non-empty collection of single characters, got "
                                 f"{len(chars)} items{', e.g. ' + listing(bad, 3) if bad else ''}; "
                                 f"build it with CharTokenizer.from_text(text)")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        _check_training_text(text, "a character-level tokenizer")
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unseen(self, text: str) -> list[str]:
        """The characters of text this tokenizer does not know, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode_ordinary(self, text: str) -> list[int]:
        if not isinstance(text, str):  # bytes would be taken for ids: "never seen: 101, 104, ..."
            self._allowed_special(text, "none")  # raises the type error
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unseen = self.unseen(text)
            raise TokenizerError(
                f"the text contains {len(unseen)} character(s) this character-level tokenizer has never "
                f"seen: {listing(unseen)}. It knows only the {len(stoi)} characters of the text it was "
                f"built from; rebuild it from a text that contains these (CharTokenizer.from_text), or "
                f"use a byte-level tokenizer ('bpe' or 'gpt2'), which encodes any text") from None

    def decode(self, ids) -> str:
        chars = self.chars
        return "".join([chars[i] for i in self._check_ids(ids)])

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def hf_files(self) -> dict[str, str]:
        """transformers' tokenizer.json (a WordLevel vocabulary over single characters) and tokenizer_config.json,
        which AutoTokenizer loads; {} where a character is a lone surrogate, which JSON for transformers cannot hold."""
        if any("\ud800" <= c <= "\udfff" for c in self.chars):
            return {}
        spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                # every character its own piece, newlines included ([\s\S]: the regex engine's '.' skips them)
                "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated",
                                  "invert": False},
                "post_processor": None, "decoder": {"type": "Fuse"},  # decode joins the characters without spaces
                # no unknown token: a character never seen is an error there too, as in encode
                "model": {"type": "WordLevel", "vocab": self.stoi, "unk_token": "<unk>"}}
        return {"tokenizer.json": json.dumps(spec, ensure_ascii=False),
                "tokenizer_config.json": hf_tokenizer_config("PreTrainedTokenizerFast", {})}

    def to_dict(self) -> dict:
        # a list, not one string: escaped in one string, a lone high surrogate followed by a lone low
        # one would read back as a single character, shifting every later id
        return {"kind": "char", "chars": list(self.chars)}


# -----------------------------------------------------------------------------
# byte-level BPE


def _merge_pair_everywhere(ids, a: int, b: int, idx: int, shift: int):
    """Replace every occurrence of the pair (a, b) in ids (a list or an array of ids), left to right, by idx;
    also say which adjacent pairs left and which came, which are only those next to a merge: (None, (), ())
    when the pair does not occur. The new ids are of the same type as ids.

    Pairs are given as keys a << shift | b (see BPETokenizer.train). With shift 8, as keys (a, b):
    [5, 1, 2, 7, 1, 2], 1, 2, 9 -> ([5, 9, 7, 9], [(5, 1), (2, 7), (7, 1)], [(5, 9), (9, 7), (7, 9)])
    The merged occurrences themselves are not listed among the pairs that left: training drops the pair's
    count as a whole (an overlapping one, the middle (1, 1) of [1, 1, 1] for (1, 1), is listed).
    Training updates its pair counts from these two lists instead of recounting the whole chunk: a
    chunk of Chinese text, which has no spaces, is a whole phrase of dozens of bytes.
    """
    n = len(ids)
    sites, i = [], 0
    while True:
        try:
            i = ids.index(a, i, n - 1)  # the search runs in C; a chunk of one byte has no pair
        except ValueError:
            break
        if ids[i + 1] == b:
            sites.append(i)
            i += 2
        else:
            i += 1
    if not sites:
        return None, (), ()
    # the pairs at positions s-1 and s+1 of each site s left (counted once where sites are adjacent;
    # neither is a site, as sites are at least 2 apart);
    # in the new ids the k-th merged token stands at s - k, with new pairs on both sides of it
    if len(sites) == 1:  # the common case, kept short
        s = sites[0]
        new = ids[:s]
        new.append(idx)
        new += ids[s + 2:]
        gone, came = [], []
        if s > 0:
            x = ids[s - 1]
            gone.append(x << shift | a)
            came.append(x << shift | idx)
        if s + 2 < n:
            y = ids[s + 2]
            gone.append(b << shift | y)
            came.append(idx << shift | y)
        return new, gone, came
    new, start = ids[:0], 0  # a list or an array, as ids is
    for s in sites:
        new += ids[start:s]
        new.append(idx)
        start = s + 2
    new += ids[start:]
    gone = {j for s in sites for j in (s - 1, s + 1) if 0 <= j < n - 1}
    came = {j for k, s in enumerate(sites) for j in (s - k - 1, s - k) if 0 <= j < len(new) - 1}
    return (new, [ids[j] << shift | ids[j + 1] for j in sorted(gone)],
            [new[j] << shift | new[j + 1] for j in sorted(came)])


# When BPE training counts the pairs, it tracks fewer than TRACK_MOST of them, and none below 1 / 2**TRACK_SHIFT
# of the best pair's count (see BPETokenizer.train): more pairs take more memory, fewer make it count more often
TRACK_MOST = 1 << 16
TRACK_SHIFT = 6
# Counting every pair of the words is done with numpy, over blocks of about COUNT_BLOCK ids, and in parts
# of about COUNT_PART distinct pairs (a pair's part is its key modulo the number of parts), one part after
# another: Chinese text has about as many distinct pairs as ids, and counting them takes about 60 bytes a
# pair at once (a dict: 75). Each part reads all the words again
COUNT_BLOCK = 1 << 18
COUNT_PART = 1 << 19


def _track_pairs(words: list, freqs: list[int], shift: int):
    """Count every pair of the words (as keys a << shift | b), and track those of count >= threshold, a
    fraction of the best count: -> (stats, where, heap, threshold), see BPETokenizer.train.

    stats: pair -> count. where: pair -> the words that may hold it, as the one word's index or an array
    or list of them (a set per pair would take about ten times the memory); it may later name a word twice,
    or one that lost the pair since, which the merge skips. heap: -count << 2 * shift | pair, a min-heap: the
    highest count first, and the smallest pair among equal counts.
    """
    stats, threshold = _frequent_pairs(words, freqs, shift)
    where = {}
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            key = a << shift | b
            if key in stats:
                listed = where.get(key)
                if listed is None:
                    where[key] = wi
                elif listed.__class__ is int:
                    if listed != wi:
                        where[key] = array("i", (listed, wi))  # 4 bytes a word, where a list takes 8
                elif listed[-1] != wi:
                    listed.append(wi)
    shift2 = 2 * shift
    heap = [-c << shift2 | p for p, c in stats.items()]
    heapq.heapify(heap)
    return stats, where, heap, threshold


def _frequent_pairs(words: list, freqs: list[int], shift: int) -> tuple[dict[int, int], int]:
    """-> ({pair: count} of the pairs of count >= threshold, threshold); pairs as keys a << shift | b.

    The threshold is at least best >> TRACK_SHIFT (best: the highest count), so that the next count comes
    when the counts have fallen by as much, and above the count of the TRACK_MOST-th pair, so that the
    pairs tracked stay few when the best count is low; but never above best."""
    if not words:
        return {}, 1
    blocks, start, size = [], 0, 0  # (start, stop) of consecutive words with about COUNT_BLOCK ids
    for i, w in enumerate(words):
        size += len(w)
        if size >= COUNT_BLOCK or i == len(words) - 1:
            blocks.append((start, i + 1))
            start, size = i + 1, 0
    # about as many distinct pairs in each block as in the first (more, if anything, at the start of a text)
    start, stop = blocks[0]
    distinct = len(np.unique(_block_pairs(words[start:stop], freqs[start:stop], shift)[0]))
    parts = 1 + distinct * len(blocks) // COUNT_PART
    best, found, tops = 0, [], []
    for part in range(parts):
        keys, counts = _part_pair_counts(words, freqs, shift, blocks, part, parts)
        part_best = int(counts.max(initial=0))
        best = max(best, part_best)
        top = np.partition(counts, -TRACK_MOST)[-TRACK_MOST:] if len(counts) > TRACK_MOST else counts
        tops.append(top)
        # keep what the threshold below can keep: it is at least best >> TRACK_SHIFT (with the final best),
        # and above the TRACK_MOST-th count of all, which is at least this part's, unless it is best itself
        cut = max(best >> TRACK_SHIFT, int(top.min()) + 1 if len(counts) > TRACK_MOST else 0)
        frequent = (counts >= cut) | (counts == part_best)
        found.append((keys[frequent], counts[frequent]))
    tops = np.concatenate(tops)
    most = int(np.partition(tops, -TRACK_MOST)[-TRACK_MOST]) + 1 if len(tops) >= TRACK_MOST else 1
    threshold = max(1, min(best, max(best >> TRACK_SHIFT, most)))
    stats = {}
    for keys, counts in found:
        frequent = counts >= threshold
        stats.update(zip(keys[frequent].tolist(), counts[frequent].tolist()))
    return stats, threshold


def _part_pair_counts(words: list, freqs: list[int], shift: int, blocks: list[tuple[int, int]], part: int,
                      parts: int) -> tuple[np.ndarray, np.ndarray]:
    """The count of every pair of key % parts == part in the words, as numpy arrays: (keys sorted, counts)."""
    sums = []
    for start, stop in blocks:
        keys, weights = _block_pairs(words[start:stop], freqs[start:stop], shift)
        if parts > 1:
            mine = keys % parts == part
            keys, weights = keys[mine], weights[mine]
        sums.append(_sum_by_key(keys, weights))
    return _sum_by_key(np.concatenate([k for k, _ in sums]), np.concatenate([c for _, c in sums]))


def _block_pairs(words: list, freqs: list[int], shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of adjacent ids inside each of the words (arrays of one typecode), as int64 numpy arrays:
    the keys a << shift | b, and the count of the word each is in."""
    ids = np.frombuffer(b"".join(words), dtype=words[0].typecode).astype(np.int64)
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    keys = ids[:-1] << shift | ids[1:]
    weights = np.repeat(np.asarray(freqs, np.int64), lengths)[:-1]
    inside = np.ones(len(keys), bool)
    inside[np.cumsum(lengths)[:-1] - 1] = False  # a word's last id and the next word's first
    return keys[inside], weights[inside]


def _sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (the distinct keys, sorted, and the sum of the weights of each)."""
    if not len(keys):
        return keys, weights
    order = np.argsort(keys)
    keys = keys[order]
    firsts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[firsts], np.add.reduceat(weights[order], firsts)


def _pop_best(heap: list[int], stats: dict[int, int], shift2: int) -> tuple[int, int]:
    """Take the tracked pair of the highest count (the smallest among equal counts) off the heap: -> (pair,
    count), or (0, 0) when none is left. An entry is never below its pair's count, which only shrinks
    after it is pushed; one that is too high is pushed back with the true count (lazy invalidation)."""
    while heap:
        entry = heapq.heappop(heap)
        key = entry & ((1 << shift2) - 1)
        count = stats.get(key, 0)
        if count == -(entry >> shift2):
            return key, count
        if count:
            heapq.heappush(heap, -count << shift2 | key)
    return 0, 0


def _bpe(ids: list[int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """Merge adjacent pairs, lowest-ranked first and leftmost among equals, until none is in ranks.

    ranks maps a pair to the id of its merge, and a lower id is an earlier (higher-priority) merge.
    One occurrence is merged at a time, as tiktoken does; with ranks == merges this gives the same
    result as applying each merge to all its occurrences in training order (minbpe).
    """
    if len(ids) > LONG_CHUNK:
        return _bpe_heap(ids, ranks)
    ids = list(ids)
    get = ranks.get
    while len(ids) > 1:
        best, pos = None, 0
        for i in range(len(ids) - 1):
            r = get((ids[i], ids[i + 1]))
            if r is not None and (best is None or r < best):
                best, pos = r, i
        if best is None:
            break
        ids[pos:pos + 2] = (best,)
    return ids


def _bpe_heap(ids: list[int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """Same result as _bpe, in O(n log n) for long chunks: a heap of (rank, position) over a linked list."""
    ids = list(ids)
    n = len(ids)
    nxt = list(range(1, n + 1))  # n means "no next token"
    prv = list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := ranks.get((ids[i], ids[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        # entries go stale when a neighbour merges; skip those whose pair is no longer (this rank) here
        if ids[i] is None or j >= n or ranks.get((ids[i], ids[j])) != r:
            continue
        ids[i], ids[j] = r, None
        k = nxt[i] = nxt[j]
        if k < n:
            prv[k] = i
            if (r2 := ranks.get((r, ids[k]))) is not None:
                heapq.heappush(heap, (r2, i))
        if prv[i] >= 0 and (r2 := ranks.get((ids[prv[i]], r))) is not None:
            heapq.heappush(heap, (r2, prv[i]))
    return [t for t in ids if t is not None]


class BPETokenizer(Tokenizer):
    """Byte-level BPE: text -> regex chunks -> UTF-8 bytes -> merges applied by rank.

    Ids: 0..255 are the single bytes (GPT-2 numbers them in its own order, see byte_ids),
    256 + i is the token made by merges[i], and the special tokens come last.

    merge_rule decides which adjacent pairs may merge while encoding, lowest id first:
    "pairs" (trained tokenizers, as minbpe and Hugging Face do): only the learned pairs;
    "ranks" (from_gpt2, tiktoken's definition): any two tokens whose bytes together form a token.
    On vocabularies that BPE training produced, GPT-2's included, the two agreed on every text
    tried; they differ on hand-made ones (merges 'b'+'c', 'a'+'b', 'ab'+'c': "abc" is 'a', 'bc'
    by pairs but 'abc' by ranks). from_gpt2 uses "ranks", so its merges are tiktoken's by construction.
    """

    kind = "bpe"

    def __init__(self, pattern: str | None = None, special_tokens: dict[str, int] | None = None):
        self.pattern = GPT2_SPLIT_PATTERN if pattern is None else pattern
        try:
            self.compiled_pattern = regex.compile(self.pattern)
        except (regex.error, TypeError) as e:
            raise TokenizerError(f"the split pattern {self.pattern!r} is not a valid regular expression ({e}); "
                                 f"leave pattern=None for GPT-2's") from e
        if self.compiled_pattern.groups:  # findall would return the groups' text instead of the chunks
            raise TokenizerError(f"the split pattern {self.pattern!r} has capturing groups; make them "
                                 f"non-capturing, (...) -> (?:...)")
        self._set([], special_tokens or {})

    def _set(self, merges, special_tokens: dict[str, int], byte_ids=None, merge_rule: str = "pairs") -> None:
        """Install merges (pairs in rank order), special tokens and byte ids; build the lookup tables.

        Checks what a damaged file could get wrong, so that encode and decode can trust the tables.
        """
        byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
        if sorted(byte_ids) != list(range(256)):
            raise TokenizerError("byte_ids must number the 256 bytes with the ids 0..255, each once")
        if merge_rule not in ("pairs", "ranks"):
            raise TokenizerError(f"merge_rule must be 'pairs' or 'ranks', got {merge_rule!r}")
        self.byte_ids, self.merge_rule = byte_ids, merge_rule
        self.merges = {}  # (int, int) -> int, in rank order
        for idx, (a, b) in enumerate(merges, start=256):
            if not (0 <= a < idx and 0 <= b < idx) or (a, b) in self.merges:
                raise TokenizerError(f"merge {idx - 256} ({a}, {b}) -> {idx} refers to a later token or repeats "
                                     f"an earlier merge; the merges must be pairs of earlier ids in rank order")
            self.merges[(a, b)] = idx
        first_special = 256 + len(self.merges)
        _check_special_tokens(list(special_tokens))
        ids = sorted(special_tokens.values())
        if ids != list(range(first_special, first_special + len(ids))) or len(set(special_tokens)) != len(ids):
            raise TokenizerError(f"special token ids {ids} must be {first_special}, {first_special + 1}, ... "
                                 f"(right after the 256 bytes and {len(self.merges)} merges), one id each")
        self.special_tokens = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        self.eot_token = self.special_tokens.get(EOT)
        # vocab {int: bytes}: each merged token is the concatenation of its pair
        self.vocab = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        for (a, b), idx in self.merges.items():
            self.vocab[idx] = self.vocab[a] + self.vocab[b]
        for s, idx in self.special_tokens.items():
            self.vocab[idx] = s.encode("utf-8")
        self._id_bytes = [self.vocab[i] for i in range(len(self.vocab))]  # list lookup is faster than dict
        self._ranks = self.merges if merge_rule == "pairs" else self._concatenation_ranks()
        self._byte_identity = byte_ids == list(range(256))
        self._cache = {}  # chunk -> ids

    def _concatenation_ranks(self) -> dict[tuple[int, int], int]:
        """Every pair of tokens whose bytes together are a token -> that token (the "ranks" rule)."""
        by_bytes = {}
        for idx in range(256 + len(self.merges)):
            by_bytes.setdefault(self._id_bytes[idx], idx)  # if two merges give the same bytes, the first wins
        ranks = {}
        for idx in range(256, 256 + len(self.merges)):
            token = self._id_bytes[idx]
            if by_bytes[token] != idx:
                continue
            for k in range(1, len(token)):
                a, b = by_bytes.get(token[:k]), by_bytes.get(token[k:])
                if a is not None and b is not None:
                    ranks[(a, b)] = idx
        return ranks

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges) + len(self.special_tokens)

    # ---- training

    def train(self, text: str, vocab_size: int, verbose: bool = False, special_tokens=None) -> "BPETokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from text; returns self.

        special_tokens: strings such as ['<|endoftext|>'], given the ids after the merges (None keeps
        this tokenizer's current ones). The text is split around them before training, so they are
        never learned as ordinary text.
        Each step merges the most frequent pair; among equally frequent pairs the smallest (a, b)
        wins (compare a, then b), so the result does not depend on the order of the text.
        Pair counts are kept over the unique chunks, weighted by how often each chunk occurs, and
        after a merge only the chunks that contain the merged pair are updated.
        """
        if isinstance(special_tokens, str):  # list('<eos>') would register '<', 'e', 'o', 's' and '>'
            raise TokenizerError(f"special_tokens must be a list of strings, got the string {special_tokens!r}; "
                                 f"e.g. special_tokens=[{special_tokens!r}]")
        names = list(self.special_tokens) if special_tokens is None else list(special_tokens)
        _check_special_tokens(names)
        _check_training_text(text, "a BPE tokenizer")
        vocab_size = check_bpe_vocab_size(vocab_size, len(names))
        num_merges = vocab_size - 256 - len(names)
        t0 = time.time()

        # unique chunks and their counts; a chunk never spans a special token. The capturing group
        # keeps the special tokens (at odd indices), so that offset counts characters of the whole text;
        # the longest first, as encode() does, when one special token begins another
        chunk_counts = Counter()
        alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
        parts = re.split("(" + alternatives + ")", text) if names else [text]
        report = _ChunkReport(len(text), t0) if verbose else None
        offset = 0
        for i, part in enumerate(parts):
            if i % 2 == 0:
                chunk_counts.update(self._iter_split(part, offset, report))
            offset += len(part)
        # the chunks as arrays of token ids, and how often each occurs. An array of 2-byte ids takes a
        # quarter of a list's memory (a list holds an 8-byte pointer per id), and Chinese text, which has
        # nearly no repeated chunks, makes about as many ids as it has bytes
        typecode = "H" if vocab_size <= 1 << 16 else "I"
        words, freqs = [], []
        for chunk, n in chunk_counts.items():
            w = array(typecode, iter(_utf8(chunk)))  # iter: the bytes are the ids, not the array's memory
            if len(w) > 1:  # a single byte has no pair to count
                words.append(w)
                freqs.append(n)
        del chunk_counts  # the chunks' text is not needed again

        # A pair (a, b) is kept as the one int a << shift | b, which orders as the tuple does: a fifth less
        # time and a third less memory than tuples.
        shift = vocab_size.bit_length()
        low = (1 << shift) - 1
        shift2 = 2 * shift
        # Only the pairs that occur at least `threshold` times are tracked (counts, words, heap; see
        # _track_pairs). Chinese text makes millions of distinct pairs (two characters side by side), nearly
        # all rare, and tracking them all took about 85 bytes of memory per byte of text. It is exact: a
        # pair's count only grows in the step that creates it (it holds the new token) and only shrinks
        # later, so a pair below the threshold when counted, or when created, stays below it. Every pair at
        # or above it is tracked, so the best tracked pair is the best of all, ties included. A tracked pair
        # that falls below it is dropped; when none is left, all pairs are counted again with a lower
        # threshold (see _frequent_pairs): 3 times for 10 MB of Chinese text (BENCHMARKS.md) at vocab 4096.
        stats, where, heap, threshold = _track_pairs(words, freqs, shift)

        merges = []
        vocab = {i: bytes([i]) for i in range(256)}
        report_every = max(1, num_merges // 20)
        last_report = time.time()  # and at least every REPORT_S: the first merges of Chinese text take seconds each
        for step in range(num_merges):
            key, count = _pop_best(heap, stats, shift2)
            if not count and threshold > 1:  # untracked pairs may be left
                stats, where, heap, threshold = _track_pairs(words, freqs, shift)
                key, count = _pop_best(heap, stats, shift2)
            if not count:
                print(f"BPE training stopped after {step} of {num_merges} merges: every chunk of the text is a "
                      f"single token; vocab_size is {256 + step + len(names)} instead of {vocab_size}",
                      file=sys.stderr)
                break
            idx = 256 + step
            pair = (key >> shift, key & low)
            merges.append(pair)
            vocab[idx] = vocab[pair[0]] + vocab[pair[1]]
            # the new pairs (each holds idx) and their words, tracked at the end if frequent enough
            fresh, fresh_where = defaultdict(int), {}
            found = where.pop(key)
            del stats[key]  # its merged occurrences are not subtracted one by one
            for wi in (found,) if found.__class__ is int else found:
                new, gone, came = _merge_pair_everywhere(words[wi], pair[0], pair[1], idx, shift)
                if new is None:  # named twice, or stale: the pair left this word earlier
                    continue
                f = freqs[wi]
                for p in gone:
                    c = stats.get(p)
                    if c is None:  # untracked, or the merged pair itself (in 'aaa', merging 'aa')
                        continue
                    c -= f
                    if c >= threshold:
                        stats[p] = c
                    else:  # below the threshold for good: stop tracking it
                        del stats[p]
                        del where[p]
                for p in came:
                    fresh[p] += f
                    listed = fresh_where.get(p)  # each word once: a long chunk makes a new pair many times
                    if listed is None:
                        fresh_where[p] = wi
                    elif listed.__class__ is int:
                        if listed != wi:
                            fresh_where[p] = [listed, wi]
                    elif listed[-1] != wi:
                        listed.append(wi)
                words[wi] = new
            for p, c in fresh.items():
                if c >= threshold:
                    stats[p] = c
                    where[p] = fresh_where[p]
                    heapq.heappush(heap, -c << shift2 | p)
            if verbose and ((step + 1) % report_every == 0 or step + 1 == num_merges
                            or time.time() - last_report >= REPORT_S):
                last_report = time.time()
                print(f"merge {step + 1}/{num_merges}: {pair} -> {idx} {vocab[idx]!r} ({count} occurrences), "
                      f"{last_report - t0:.1f}s", file=sys.stderr)

        specials = {s: 256 + len(merges) + i for i, s in enumerate(names)}
        self._set(merges, specials)
        return self

    # ---- encoding and decoding

    def _split(self, text: str, offset: int = 0) -> list[str]:
        """text -> the pattern's chunks, which must cover all of it (offset: where text starts, for errors).

        findall skips what the pattern does not match, and BPE sees nothing else: a pattern of word
        characters only would encode 'hello, world!' as 'helloworld'. Every chunk is a substring of
        text, so their lengths add up to len(text) exactly when nothing was skipped.
        """
        chunks = self.compiled_pattern.findall(text)
        if sum(map(len, chunks)) != len(text):
            pos = 0  # the first character that no match covers
            for m in self.compiled_pattern.finditer(text):
                if m.start() > pos:
                    break
                pos = m.end()
            self._not_covered(text, pos, offset)
        return chunks

    def _iter_split(self, text: str, offset: int = 0, report: "_ChunkReport | None" = None) -> Iterator[str]:
        """_split's chunks one at a time, for counting them: a list of all the chunks of a large text
        takes ten times the text's memory. report(characters done), if given, is called every
        REPORT_EVERY_CHUNKS chunks, counted over all the texts it was given (report.chunks)."""
        pos, n = 0, report.chunks if report is not None else 0
        for n, m in enumerate(self.compiled_pattern.finditer(text), n + 1):
            if m.start() != pos:
                break
            pos = m.end()
            yield m.group()
            if report is not None and n % REPORT_EVERY_CHUNKS == 0:
                report(offset + pos)
        if report is not None:
            report.chunks = n
        if pos != len(text):
            self._not_covered(text, pos, offset)

    def _not_covered(self, text: str, pos: int, offset: int):
        e = PatternGapError(
            f"the split pattern {self.pattern!r} does not match the text at character {offset + pos} "
            f"({text[pos:pos + 20]!r}), so BPE would leave that text out; the pattern must match every "
            f"character: end it with a catch-all alternative, |(?s:.), or use GPT-2's (pattern=None; on the "
            f"command line leave out --pattern)")
        e.position = offset + pos
        raise e

    def encode_ordinary(self, text: str, check: Callable[[], None] | None = None) -> list[int]:
        """text -> ids, special-token text encoded as ordinary text.

        check, if given, is called before each CHECK_EVERY_CHUNKS chunks are merged: it may raise to end a
        long encoding early (prepare_data.py's workers stop this way when the run is interrupted). The split
        into chunks comes first and runs whole (findall: about 15 MB/s of English on one core).
        """
        if not isinstance(text, str):
            self._allowed_special(text, "none")  # raises the type error
        if check is None:
            return self._encode_part(text, 0)
        chunks, ids = self._split(text), []
        for i in range(0, len(chunks), CHECK_EVERY_CHUNKS):
            check()
            ids += self._encode_chunks(chunks[i:i + CHECK_EVERY_CHUNKS])
        return ids

    def _encode_part(self, text: str, offset: int) -> list[int]:
        return self._encode_chunks(self._split(text, offset))

    def _encode_chunks(self, chunks: list[str]) -> list[int]:
        cache, ranks, byte_ids = self._cache, self._ranks, self.byte_ids
        ids = []
        for chunk in chunks:
            tokens = cache.get(chunk)
            if tokens is None:
                data = _utf8(chunk)
                tokens = _bpe(list(data) if self._byte_identity else [byte_ids[b] for b in data], ranks)
                if len(cache) >= CHUNK_CACHE_SIZE:
                    cache.clear()
                cache[chunk] = tokens
            ids.extend(tokens)
        return ids

    def decode_bytes(self, ids) -> bytes:
        table = self._id_bytes
        return b"".join([table[i] for i in self._check_ids(ids)])

    def token_bytes(self) -> list[bytes]:
        return self._id_bytes  # made anew by each train() or load, never changed in place

    def to_dict(self) -> dict:
        # copies: a caller that edits the dict (to build a variant) must not change this tokenizer
        d = {"kind": "bpe", "pattern": self.pattern, "merge_rule": self.merge_rule,
             "special_tokens": dict(self.special_tokens)}
        if not self._byte_identity:
            d["byte_ids"] = list(self.byte_ids)  # byte_ids[b] is the id of the single byte b (GPT-2 reorders them)
        d["merges"] = [list(pair) for pair in self.merges]  # merges[i] makes token 256 + i
        return d

    def hf_files(self) -> dict[str, str]:
        """vocab.json, merges.txt and tokenizer_config.json for transformers' GPT-2 tokenizer, which splits
        with GPT-2's pattern and applies the learned pairs by rank, as the "pairs" rule does (on a vocabulary
        that training made, "ranks" agrees). {} for what those files cannot express: another split pattern,
        two tokens of the same bytes, a special token spelled like a token (vocab.json is keyed by spelling),
        or one that transformers would decode wrongly: its decoder reads each character of GPT-2's byte
        alphabet as that byte, special tokens included ('Ġ' -> ' ', 'é' -> the lone byte 0xE9)."""
        n = 256 + len(self.merges)
        tokens = {self._id_bytes[i]: i for i in range(n)}
        spell = _gpt2_byte_to_unicode()
        byte_of = {c: b for b, c in spell.items()}
        words = {"".join(spell[b] for b in token) for token in tokens}
        as_decoded = lambda s: b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in s)  # noqa: E731
        if (self.pattern != GPT2_SPLIT_PATTERN or len(tokens) < n
                or any(s in words or as_decoded(s) != s.encode() for s in self.special_tokens)):
            return {}
        merges = [(self._id_bytes[a], self._id_bytes[b]) for a, b in self.merges]
        return _gpt2_style_files(tokens, merges, self.special_tokens)

    # ---- OpenAI's GPT-2 files

    @classmethod
    def from_gpt2(cls, encoder_json_path: str | os.PathLike, vocab_bpe_path: str | os.PathLike) -> "BPETokenizer":
        """Load OpenAI's GPT-2 encoder.json (token -> id) and vocab.bpe (the merges in rank order).

        Both files spell bytes as printable characters (see _gpt2_byte_to_unicode). The ids and the
        encoding equal tiktoken's 'gpt2'; '<|endoftext|>' (50256) is the only special token.
        One exception: the split pattern's \\p{L} and \\p{N} come from the regex module here and from
        tiktoken's Rust regex there, and their Unicode tables differ in age. About 17,000 characters added
        lately (CJK Extension J, new letters of old scripts) are letters or numbers to regex 2026.11 only,
        so a word that contains one splits, and may encode, differently. Text in any script that Unicode
        14 already had encodes the same (tests/test_tokenizer.py checks both).
        """
        try:
            with open(encoder_json_path, encoding="utf-8") as f:
                encoder = json.load(f)
            with open(vocab_bpe_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an integer too long
            raise TokenizerError(f"cannot read GPT-2's encoder.json / vocab.bpe ({e}); pass the paths of the two "
                                 f"files of OpenAI's GPT-2 release") from e
        byte_to_char = _gpt2_byte_to_unicode()
        try:
            byte_ids = [encoder[byte_to_char[b]] for b in range(256)]
            merges = []
            for rank, line in enumerate(ln for ln in lines[1:] if ln):  # line 0 is '#version: 0.2'
                a, b = line.split(" ")
                if encoder[a + b] != 256 + rank:
                    raise TokenizerError(f"vocab.bpe merge {rank} ({line!r}) has id {encoder[a + b]} in "
                                         f"encoder.json, expected {256 + rank}: the files do not belong together")
                merges.append((encoder[a], encoder[b]))
        except TokenizerError:
            raise
        except (KeyError, ValueError) as e:
            raise TokenizerError(f"encoder.json and vocab.bpe do not match ({type(e).__name__}: {e}); pass "
                                 f"the two files of the same GPT-2 release") from e
        specials = {s: i for s, i in encoder.items() if i >= 256 + len(merges)}
        ordinary = [s for s in specials if not re.fullmatch(r"<[^<>\s]+>", s)]  # such as <|endoftext|>
        if ordinary:  # a vocab.bpe cut short: its missing merges' tokens would pass for special tokens
            raise TokenizerError(f"encoder.json has {len(ordinary)} tokens beyond vocab.bpe's {len(merges)} merges "
                                 f"that are not special tokens like '<|endoftext|>' (e.g. {ordinary[0]!r}): vocab.bpe "
                                 f"is cut short or from another release; pass the two files of the same GPT-2 release")
        tok = cls(GPT2_SPLIT_PATTERN)
        tok._set(merges, specials, byte_ids, merge_rule="ranks")
        return tok


def gpt2_files_from_ranks(ranks: dict[bytes, int], specials: dict[str, int]) -> dict[str, str]:
    """OpenAI's encoder.json and vocab.bpe, as transformers names them (vocab.json, merges.txt), rebuilt
    from tiktoken's token -> rank table, with a tokenizer_config.json: what transformers' GPT-2 tokenizer loads.

    A token of rank r is the merge of two tokens of lower rank; splitting its bytes again by merging the
    lowest-ranked pairs below r, until two parts remain, finds which.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise TokenizerError(f"token {token!r} of rank {rank} is no merge of two tokens of lower rank")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return _gpt2_style_files(ranks, merges, specials)


def _gpt2_style_files(tokens: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                      specials: dict[str, int]) -> dict[str, str]:
    """vocab.json (spelling -> id), merges.txt (the pairs in rank order) and tokenizer_config.json."""
    spell = _gpt2_byte_to_unicode()
    word = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    vocab = {word(token): i for token, i in tokens.items()} | specials
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{word(a)} {word(b)}\n" for a, b in merges),
            "tokenizer_config.json": hf_tokenizer_config("GPT2Tokenizer", specials)}


def hf_tokenizer_config(tokenizer_class: str, specials: dict[str, int]) -> str:
    """transformers' tokenizer_config.json: the class that reads the files, the special tokens as special
    (never split, kept whole in text as encode(allowed_special='all') does), '<|endoftext|>' as bos, eos and
    unk as in GPT-2, or none at all; decode must not drop spaces before punctuation, as older versions did."""
    eot = EOT if EOT in specials else None
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for s, i in specials.items()}
    return json.dumps({"tokenizer_class": tokenizer_class, "bos_token": eot, "eos_token": eot, "unk_token": eot,
                       "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                       "added_tokens_decoder": added}, ensure_ascii=False, indent=2)


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of bytes in encoder.json and vocab.bpe.

    Bytes that are printable characters stand for themselves ('!'..'~', '¡'..'¬', '®'..'ÿ'); the
    other 68 bytes, in increasing order, are spelled chr(256), chr(257), ...: b' ' -> 'Ġ' (chr(288)).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


# -----------------------------------------------------------------------------
# GPT-2 through tiktoken


# the names tiktoken's cache gives OpenAI's two files: the SHA-1 of the URLs it downloads them from
TIKTOKEN_GPT2_NAMES = {"vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                       "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"}


class GPT2Tokenizer(Tokenizer):
    """tiktoken's 'gpt2' encoding: vocab 50257, '<|endoftext|>' = 50256. encode() is ordinary by default."""

    kind = "gpt2"

    def __init__(self):
        try:
            import tiktoken

            self.enc = tiktoken.get_encoding("gpt2")
        except ImportError as e:
            raise GPT2FilesError("the 'gpt2' tokenizer needs tiktoken: pip install tiktoken") from e
        except Exception as e:  # tiktoken fetches its files over the network, errors vary by version
            raise GPT2FilesError(
                f"tiktoken could not load its 'gpt2' files ({type(e).__name__}: {e}). It downloads them on first "
                f"use; to work offline set TIKTOKEN_CACHE_DIR to a directory that holds them: tiktoken's cache "
                f"from a machine online, or OpenAI's vocab.bpe and encoder.json copied in under tiktoken's names "
                f"for them, {TIKTOKEN_GPT2_NAMES['vocab.bpe']} and {TIKTOKEN_GPT2_NAMES['encoder.json']}") from e
        self.eot_token = self.enc.eot_token
        self.special_tokens = {EOT: self.enc.eot_token}

    def hf_files(self) -> dict[str, str]:
        """vocab.json and merges.txt for transformers' GPT-2 tokenizer (model.save_pretrained writes them)."""
        return gpt2_files_from_ranks(self.enc._mergeable_ranks, self.special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_ordinary(self, text: str) -> list[int]:
        if not isinstance(text, str):
            self._allowed_special(text, "none")
        return self.enc.encode_ordinary(text)

    def encode(self, text: str, allowed_special="none") -> list[int]:
        allowed = self._allowed_special(text, allowed_special)
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """encode_ordinary of each text, on num_threads threads (tiktoken releases the GIL)."""
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(self._check_ids(ids))

    def token_bytes(self) -> list[bytes]:
        if getattr(self, "_token_bytes", None) is None:  # GPT-2's vocabulary never changes: made once
            self._token_bytes = [self.enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]
        return self._token_bytes

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}


# -----------------------------------------------------------------------------
# command line


def _check_training_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"building {what} takes a str, got {type(text).__name__}; decode bytes first, "
                             f"e.g. data.decode('utf-8')")
    if not text:
        raise TokenizerError(f"cannot build {what} from an empty text; check that the training file is not "
                             f"empty and was read as text")


MAX_BPE_VOCAB_SIZE = 2 ** 31 - 1  # ids of 31 bits: two of them, a << 31 | b, fit numpy's int64 (train's pair keys)


def check_bpe_vocab_size(vocab_size, specials: int) -> int:
    """vocab_size as an int (numpy's integers are integers too); a byte-level BPE's vocabulary holds the 256 byte
    tokens and the special tokens at least."""
    try:
        vocab_size = operator.index(vocab_size)  # 4096.0 or "4096" is refused, as int() would take them
    except TypeError:
        raise TokenizerError(f"vocab_size must be an integer, got {vocab_size!r}, e.g. vocab_size=4096") from None
    if vocab_size < 256 + specials:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 byte tokens plus "
            f"{specials} special token(s), so at least {256 + specials}; typical values are 512 to "
            f"50257, e.g. vocab_size=4096")
    if vocab_size > MAX_BPE_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} is too large: training keeps a pair of ids in one 64-bit "
                             f"integer, so at most {MAX_BPE_VOCAB_SIZE:,}; typical values are 512 to 50257, "
                             f"e.g. vocab_size=4096")
    return vocab_size


def _check_special_tokens(names: list) -> None:
    """Special tokens are distinct, non-empty strings that have UTF-8 bytes (no lone surrogates)."""
    def ok(s):
        try:
            return isinstance(s, str) and s and s.encode("utf-8")
        except UnicodeEncodeError:
            return False

    if not all(ok(s) for s in names) or len(set(names)) != len(names):
        raise TokenizerError(f"special tokens must be distinct non-empty strings of valid Unicode, got {names!r}")


def _read_text(path: str) -> str:
    # the bytes decoded keep '\r\n' and '\r' as they are (read_text would make them '\n'): prepare_data.py
    # reads bytes, so a tokenizer trained here must see the same line ends as the text it will encode;
    # a byte-order mark is dropped there as here
    try:
        return read_utf8_file(path, path, TokenizerError)
    except OSError as e:
        raise TokenizerError(f"cannot read the text file {path!r} ({e.strerror or e}); pass a UTF-8 text "
                             f"file") from None


def bench(path: str, vocab_size: int, pattern: str | None = None) -> None:
    """Time training and encoding on one file and compare with tiktoken's gpt2 (single thread)."""
    text = _read_text(path)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"{path}: {mb:.2f} MB, {len(text):,} characters")
    t0 = time.perf_counter()
    tok = BPETokenizer(pattern).train(text, vocab_size)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tok.encode_ordinary(text)
    t_enc = time.perf_counter() - t0
    assert tok.decode(ids) == text  # an invariant: train and encode_ordinary refuse a pattern that skips text
    print(f"bpe  vocab {tok.vocab_size}: train {t_train:.2f}s, encode {t_enc:.2f}s, {len(ids):,} tokens, "
          f"{len(ids) / t_enc:,.0f} tokens/s, {mb / t_enc:.2f} MB/s")
    try:
        gpt2 = GPT2Tokenizer()
    except TokenizerError as e:
        print(f"tiktoken gpt2 skipped: {e}")
        return
    gpt2.encode_ordinary("warm up")
    t0 = time.perf_counter()
    ids = gpt2.encode_ordinary(text)
    t_enc = time.perf_counter() - t0
    print(f"tiktoken gpt2 (Rust, for scale): encode {t_enc:.2f}s, {len(ids):,} tokens, "
          f"{len(ids) / t_enc:,.0f} tokens/s, {mb / t_enc:.2f} MB/s")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Train or benchmark the byte-level BPE tokenizer.",
        formatter_class=HelpFormatter,
        epilog="examples:\n  python tokenizer.py --bench input.txt --vocab_size 4096\n"
               "  python tokenizer.py --train input.txt --vocab_size 4096 --special '<|endoftext|>' --out tok.json")
    # paths: ~ is expanded here too, as train.py does, for --out=~/tok.json (which no shell expands)
    parser.add_argument("--bench", type=path_arg, metavar="FILE",
                        help="time BPE training and encoding on FILE")
    parser.add_argument("--train", type=path_arg, metavar="FILE",
                        help="train a BPE tokenizer on FILE and save it to --out")
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size, special tokens included")
    parser.add_argument("--special", action="append", default=[], metavar="TOKEN",
                        help="special token to register after the merges (repeatable), e.g. '<|endoftext|>'")
    parser.add_argument("--pattern", default=None,
                        help="regex pre-split pattern (default, or 'gpt2': GPT-2's); it must match every character")
    parser.add_argument("--out", type=path_arg, default="tokenizer.json",
                        help="where --train writes the tokenizer")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pattern in ("gpt2", "None"):  # the Python API's pattern=None, spelled on a command line
        args.pattern = None
    if bool(args.bench) == bool(args.train):
        parser.error("give exactly one of --bench FILE or --train FILE")
    if args.bench and (args.special or args.out != parser.get_default("out")):
        parser.error("--special and --out apply to --train only; --bench times training and encoding and "
                     "writes nothing")
    if args.bench:
        bench(args.bench, args.vocab_size, args.pattern)
        return
    problem = output_file_problem(args.out)
    if problem:  # checked before training, which can take long
        hint = (f"--out is the file to write, e.g. --out {os.path.join(args.out, 'tokenizer.json')}"
                if problem == "is a directory" else "give a path you can write to")
        raise TokenizerError(f"--out {args.out!r} {problem}; {hint}")
    with contextlib.suppress(OSError):  # a missing --out, or a missing --train that _read_text reports
        if os.path.samefile(args.out, args.train):
            raise TokenizerError(f"--out {args.out!r} is the training text itself, which writing the tokenizer "
                                 f"would destroy; give another file, e.g. --out tokenizer.json")
    text = _read_text(args.train)
    _check_special_tokens(args.special)  # before the notes below, which would count '' everywhere
    for token in args.special:
        # training cuts the text at each occurrence, while prepare_data.py encodes the text as ordinary bytes: a
        # marker the text uses as text (a space, a letter, a word) leaves it out of every merge
        n = text.count(token) if token != EOT else 0
        if n:
            print(f"note: --special {token!r} occurs {n:,} times in {args.train}; training leaves those places out "
                  f"of every merge, while prepare_data.py encodes them as ordinary text: a marker that never "
                  f"occurs as text (such as {EOT!r}) does not cost merges", file=sys.stderr)
    tok = BPETokenizer(args.pattern).train(text, args.vocab_size, verbose=True, special_tokens=args.special)
    try:
        tok.save(args.out)
    except OSError as e:  # e.g. a full disk
        raise TokenizerError(f"cannot write --out {args.out!r}: {e.strerror or e}") from None
    # where the file itself goes to stdout (--out /dev/stdout > tok.json), the line must not join it
    print_result(f"saved a {tok.vocab_size}-token BPE tokenizer to {args.out}",
                 sys.stderr if writes_directly(Path(args.out)) else sys.stdout)


if __name__ == "__main__":
    run_cli(main)
