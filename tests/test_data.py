"""Tests for prepare_data.py and data.py: known token counts, exact round trips, the parallel
pipeline against single-thread tiktoken, atomic writes, bad input, and deterministic batches.

    python -m pytest -q tests/test_data.py
"""
import bz2
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare_data
from conftest import gpt2_encoding
from data import (CHANGED, DEFAULT_DATA_DIRS, BatchLoader, DataError, check_vocab, custom_data_dir, load_data_tokenizer,
                  load_meta, prepare_command)
from prepare_data import (TextFile, cut_text, piece_units, prepare_documents, prepare_text, split_ranges, token_dtype,
                          write_dataset)
from tokenizer import EOT, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BOM = "\ufeff".encode()  # the UTF-8 byte-order mark, as Windows Notepad writes


def prepare(*args: str) -> dict:
    """prepare_data.py's main() in this process (no interpreter start-up)."""
    return prepare_data.main([str(a) for a in args])


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def bins(d: Path, dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(d / "train.bin", dtype=dtype), np.fromfile(d / "val.bin", dtype=dtype)


def write_data_dir(d: Path, train, val, vocab_size: int, dtype: str = "uint16") -> Path:
    """A data directory written by hand, for the loader tests."""
    d.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(d / "train.bin")
    np.asarray(val, dtype=dtype).tofile(d / "val.bin")
    meta = dict(tokenizer="char", tokenizer_file="tokenizer.json", vocab_size=vocab_size, eot_token=None,
                dtype=dtype, train_tokens=len(train), val_tokens=len(val))
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def doc_is_val(text: str, val_fraction: float) -> bool:
    """The documented per-document split rule, written out independently of prepare_data."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def expected_doc_ids(docs: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    train, val = [], []
    for doc in docs:
        if doc:
            enc = gpt2_encoding()
            (val if doc_is_val(doc, val_fraction) else train).extend(enc.encode_ordinary(doc) + [enc.eot_token])
    return train, val


# -----------------------------------------------------------------------------
# tinyshakespeare: known counts, exact round trips


def test_shakespeare_char(shakespeare_path, shakespeare_text, tmp_path):
    out = tmp_path / "shakespeare_char"
    meta = prepare("--dataset", "shakespeare", "--tokenizer", "char", "--input", shakespeare_path, "--output_dir", out)
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1_003_854, 111_540, 65)
    assert meta == load_meta(out)
    assert meta["tokenizer"] == "char" and meta["eot_token"] is None and meta["dtype"] == "uint16"
    assert meta["source_sha256"] == prepare_data.SHAKESPEARE_SHA256
    tok = load_data_tokenizer(out)
    train, val = bins(out)
    assert tok.decode(train) + tok.decode(val) == shakespeare_text
    assert tok.decode(train) == shakespeare_text[:1_003_854]


def test_shakespeare_gpt2_from_env(shakespeare_path, shakespeare_text, tmp_path, monkeypatch):
    monkeypatch.setenv("SHAKESPEARE", str(shakespeare_path))  # no --input: the variable gives the copy
    out = tmp_path / "shakespeare"
    meta = prepare("--dataset", "shakespeare", "--output_dir", out, "--num_proc", 2)
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    train, val = bins(out)
    cut = int(len(shakespeare_text) * 0.9)
    np.testing.assert_array_equal(train, gpt2_encoding().encode_ordinary(shakespeare_text[:cut]))
    np.testing.assert_array_equal(val, gpt2_encoding().encode_ordinary(shakespeare_text[cut:]))
    tok = load_data_tokenizer(out)
    assert tok.decode(train) + tok.decode(val) == shakespeare_text
    # cut into 64 KB work units for 2 worker processes: the same ids, in the same order
    small = prepare_text(tmp_path / "small_units", [shakespeare_path], dataset="shakespeare", tokenizer="gpt2",
                         vocab_size=None, val_fraction=0.1, num_proc=2, command="test", unit_bytes=1 << 16)
    assert small["source_sha256"] == meta["source_sha256"] == prepare_data.SHAKESPEARE_SHA256
    for a, b in zip(bins(tmp_path / "small_units"), (train, val)):
        np.testing.assert_array_equal(a, b)


def test_shakespeare_copies_are_checked_and_input_comes_first(shakespeare_path, tmp_path, monkeypatch):
    import io
    real = shakespeare_path.read_bytes()
    served = []

    def urlopen(url, timeout):
        served.append(url)
        return io.BytesIO(served_bytes[0])

    monkeypatch.setattr(prepare_data.urllib.request, "urlopen", urlopen)
    monkeypatch.delenv("SHAKESPEARE", raising=False)
    out = tmp_path / "s"
    out.mkdir()
    (out / "input.txt").write_bytes(real[:1000])  # a cached copy cut short: downloaded again
    served_bytes = [real]
    assert prepare_data.shakespeare_file(None, out) == out / "input.txt" and (out / "input.txt").read_bytes() == real
    assert len(served) == 1
    prepare_data.shakespeare_file(None, out)  # a good copy is not downloaded again
    assert len(served) == 1
    (out / "input.txt").unlink()
    served_bytes = [b"<html>rate limited</html>"]  # a download that is not the file
    with pytest.raises(DataError, match="the download from .* has sha256 .*expected"):
        prepare_data.shakespeare_file(None, out)
    assert not (out / "input.txt").exists()
    other = tmp_path / "other.txt"
    other.write_text("not shakespeare")
    monkeypatch.setenv("SHAKESPEARE", str(other))
    assert prepare_data.shakespeare_file(str(shakespeare_path), out) == shakespeare_path  # --input first
    with pytest.raises(DataError, match="other.txt is not tinyshakespeare"):
        prepare_data.shakespeare_file(None, out)


def test_shakespeare_offline_without_copy_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKESPEARE", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(prepare_data.urllib.request, "urlopen", offline)
    earlier = write_data_dir(tmp_path / "s", np.arange(100), np.arange(50), vocab_size=100)
    before = (earlier / "meta.json").read_bytes()
    with pytest.raises(DataError, match="--input") as e:
        prepare("--dataset", "shakespeare", "--output_dir", earlier)
    assert "SHAKESPEARE" in str(e.value)
    # the error comes before anything is written: an earlier data set there is left complete
    assert (earlier / "meta.json").read_bytes() == before


def test_shakespeare_wrong_copy_is_refused(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(DataError, match="not tinyshakespeare.*--dataset custom"):
        prepare("--dataset", "shakespeare", "--input", fake, "--output_dir", tmp_path / "s")


# -----------------------------------------------------------------------------
# custom text: bpe, folders of files


def test_custom_bpe_round_trip(shakespeare_text, tmp_path):
    text = shakespeare_text[:20_000]
    src = tmp_path / "small.txt"
    src.write_text(text)
    out = tmp_path / "small_bpe"
    meta = prepare("--dataset", "custom", "--input", src, "--tokenizer", "bpe", "--vocab_size", 300,
                   "--output_dir", out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("bpe", 300, 299)
    tok = load_tokenizer(out / "tokenizer.json")
    assert isinstance(tok, BPETokenizer) and tok.special_tokens == {EOT: 299}
    train, val = bins(out)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert tok.decode(train) == text[:18_000] and tok.decode(val) == text[18_000:]
    # the merges were learned from the train split alone
    assert tok.merges == BPETokenizer().train(text[:18_000], 300, special_tokens=[EOT]).merges


def test_a_character_only_in_val_is_in_the_character_vocabulary(tmp_path):
    """The character tokenizer covers both splits: val may hold characters train never has."""
    src = tmp_path / "t.txt"
    src.write_text("abcab " * 15 + "zz")  # 92 characters: the cut at 82 leaves both z in val
    meta = prepare("--dataset", "custom", "--input", src, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    tok = load_data_tokenizer(tmp_path / "o")
    train, val = bins(tmp_path / "o")
    assert "z" not in tok.decode(train.tolist()) and tok.decode(val.tolist()).endswith("zz")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == src.read_text()
    assert meta["vocab_size"] == 5


def test_bpe_without_vocab_size_learns_4096_tokens(shakespeare_path, tmp_path):
    meta = prepare("--dataset", "custom", "--input", shakespeare_path, "--tokenizer", "bpe",
                   "--output_dir", tmp_path / "o")
    assert meta["vocab_size"] == 4096 == load_data_tokenizer(tmp_path / "o").vocab_size


def test_custom_folder_puts_eot_between_files(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Second book, second line.\n" * 20)
    (folder / "a.txt").write_text("First book.\n" * 20)
    (folder / "sub" / "c.txt").write_text("Third, in a subfolder.\n" * 20)
    (folder / "notes.md").write_text("not a .txt file, left out")
    meta = prepare("--dataset", "custom", "--input", folder, "--output_dir", tmp_path / "out")
    texts = [(folder / n).read_text() for n in ("a.txt", "b.txt", "sub/c.txt")]  # sorted path order
    train, val = bins(tmp_path / "out")
    assert gpt2_encoding().decode(train.tolist() + val.tolist()) == EOT.join(texts)
    assert list(train).count(50256) + list(val).count(50256) == 2
    assert meta["source_sha256"] == hashlib.sha256(b"".join(t.encode() for t in texts)).hexdigest()
    assert meta["source"] == f"3 .txt files under {folder}"


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
def test_end_of_text_written_in_a_text_file_is_the_end_of_text_id(tmp_path, capsys, tokenizer):
    """Stories joined by '<|endoftext|>' (as TinyStories' text files are): each marker is one end-of-text id, as
    tiktoken's encode with the marker allowed gives, and as the BPE trainer cuts its text; the 0.9 cut falls
    inside a marker here and moves past it. JSON Lines documents keep a marker inside their text as text."""
    def cut_in_marker(text: str) -> bool:
        cut = int(len(text) * 0.9)
        return EOT in text[cut - len(EOT) + 1 : cut + len(EOT) - 1] and not text[cut:].startswith(EOT)
    stories = [f"Story {i}: a cat sat {'very ' * (i % 7)}quietly.\n" for i in range(40)]
    text = next(t for n in range(100) if cut_in_marker(t := EOT.join(stories) + "!" * n))  # the last story longer
    (tmp_path / "stories.txt").write_text(text)
    meta = prepare("--dataset", "custom", "--input", tmp_path / "stories.txt", "--tokenizer", tokenizer,
                   "--output_dir", tmp_path / "o")
    train, val = bins(tmp_path / "o")
    tok = load_data_tokenizer(tmp_path / "o")
    assert tok.eot_token == meta["eot_token"] and meta["eot_markers_in_text"] == 39
    assert (train == tok.eot_token).sum() + (val == tok.eot_token).sum() == 39
    assert val[0] != tok.eot_token and train[-1] == tok.eot_token  # the marker the cut fell in, whole, in train
    if tokenizer == "gpt2":
        assert train.tolist() + val.tolist() == gpt2_encoding().encode(text, allowed_special={EOT})
    assert tok.decode(train.tolist() + val.tolist()) == text
    note = f"note: 39 '<|endoftext|>' written in the text became the end-of-text id {tok.eot_token}"
    assert note in capsys.readouterr().err
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a <|endoftext|> b", "c"] * 20))
    meta = prepare("--dataset", "openwebtext", "--input", docs, "--val_fraction", "0.5", "--output_dir", tmp_path / "w")
    train, val = bins(tmp_path / "w")
    assert (train == 50256).sum() + (val == 50256).sum() == 40 and "eot_markers_in_text" not in meta


def test_custom_folder_reads_upper_case_suffixes(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.TXT").write_text("upper case suffix\n")  # as Windows may name it
    (folder / "b.txt").write_text("lower case suffix\n")
    meta = prepare("--dataset", "custom", "--input", folder, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    assert meta["source"] == f"2 .txt files under {folder}"
    tok = load_tokenizer(tmp_path / "o" / "tokenizer.json")
    assert tok.decode(np.concatenate(bins(tmp_path / "o")).tolist()) == "upper case suffix\nlower case suffix\n"


def test_openwebtext_reads_upper_case_suffixes(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "a.JSONL").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:6]))
    (web / "b.TXT").write_text(DOCS[6])
    meta = prepare_documents(tmp_path / "o", str(web), hf_name="", val_fraction=0.25, num_proc=1, command="t")
    assert meta["train_documents"] + meta["val_documents"] == 7
    # a file named itself, with an upper-case suffix, too
    meta = prepare_documents(tmp_path / "o2", str(web / "a.JSONL"), hf_name="", val_fraction=0.25, num_proc=1,
                             command="t")
    assert meta["train_documents"] + meta["val_documents"] == 6 and meta["source"] == str(web / "a.JSONL")


def test_meta_json_records_a_command_that_runs_and_what_it_read(tmp_path):
    """command: the arguments, quoted so that they split back as given (a folder name with a space and a
    quote); source: the file read; split: which part went to train."""
    src = tmp_path / "my text's.txt"
    src.write_text("to be or not to be\n" * 50)
    argv = ["--dataset", "custom", "--input", str(src), "--tokenizer", "char", "--output_dir", str(tmp_path / "a b"),
            "--val_fraction", "0.2"]
    meta = prepare(*argv)
    assert shlex.split(meta["command"]) == ["python", "prepare_data.py", *argv]
    assert meta["source"] == str(src) and meta["val_fraction"] == 0.2
    assert meta["split"] == "first 0.8 of the characters train, the rest val"


def test_gpt2_text_is_cut_into_units_for_the_workers(shakespeare_text):
    """A long text tokenised with GPT-2 goes to the workers in units of about unit_bytes, as char does."""
    from prepare_data import can_cut, piece_units
    data = shakespeare_text[:30000].encode()
    units = list(piece_units([("train", data, False, len(data), "t", 0)], 10000, can_cut(GPT2Tokenizer())))
    assert len(units) >= 3 and all(len(b"".join(bytes(p[1]) for p in u[1])) <= 12000 for u, _ in units)


def test_the_bpe_line_counts_the_files_in_the_training_split(tmp_path, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.txt").write_text("abcdefghijklmnopqrstuvwxyz")
    (folder / "b.txt").write_text("zyxwvutsrqponmlkjihgfedcba")
    prepare("--dataset", "custom", "--input", folder, "--tokenizer", "bpe", "--vocab_size", "300",
            "--val_fraction", "0.5", "--output_dir", tmp_path / "o")  # the cut falls between the files
    assert "on 26 characters\n" in capsys.readouterr().err


def test_custom_bpe_learns_no_merge_across_files(tmp_path):
    """The data has end-of-text between files, so the merges must not join one file to the next."""
    folder = tmp_path / "letters"
    for i in range(40):  # a/00.txt holds 'a', b/01.txt 'b', ...: sorted, 'a' * 20 then 'b' * 20
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (folder / "ab"[i % 2] / f"{i:02d}.txt").write_text("ab"[i % 2])
    meta = prepare("--dataset", "custom", "--input", folder, "--tokenizer", "bpe", "--vocab_size", 300,
                   "--output_dir", tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert tok.merges == {}  # joined without end-of-text, 'aaaa...bbbb' would give 'aa', 'bb', 'ab', ...
    assert meta["vocab_size"] == 257 and meta["source"] == f"40 .txt files under {folder}"  # not letters/a
    train, val = bins(tmp_path / "out")
    assert tok.decode(train.tolist() + val.tolist()) == EOT.join("a" * 20 + "b" * 20)


@pytest.mark.parametrize("vocab_size, message", [(0, "vocab_size 0 is too small"),  # not silently the default 4096
                                                  (256, "vocab_size 256 is too small: .* so at least 257")])
def test_a_bpe_vocab_size_too_small_is_refused_before_the_text_is_read(tmp_path, monkeypatch, vocab_size, message):
    src = tmp_path / "t.txt"
    src.write_text("some text to train on\n" * 10)
    monkeypatch.setattr(prepare_data, "scan_files", lambda *a: pytest.fail("the text was read"))
    with pytest.raises(TokenizerError, match=message):
        prepare("--dataset", "custom", "--input", src, "--tokenizer", "bpe", "--vocab_size", vocab_size,
                "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    assert prepare("--dataset", "custom", "--input", src, "--tokenizer", "bpe", "--vocab_size", 257,
                   "--output_dir", tmp_path / "o")["vocab_size"] == 257


def scanned(*datas: bytes) -> list[TextFile]:
    """TextFiles a.txt, b.txt, ... holding datas, read once as prepare_text reads them."""
    texts = [TextFile(f"{chr(97 + i)}.txt", data=d) for i, d in enumerate(datas)]
    for t in texts:
        t.scan(hashlib.sha256(), decode=True)
    return texts


def split_pieces(datas: list[bytes], val_fraction: float) -> list[tuple]:
    """split_ranges' ranges as (split, bytes, end_of_text_after, file name, byte offset)."""
    texts = scanned(*datas)
    return [(split, datas[i][start:end], eot, texts[i].name, start)
            for split, i, start, end, eot in split_ranges(texts, val_fraction)]


def test_text_items_read_the_ranges_once_and_skip_empty_files():
    """A folder of 200,000 small files: looking up each file's ranges among all of them took 8 minutes."""
    datas = [b"", b"abcd", b"\xef\xbb\xbf", b"efgh", b"ij"]  # an empty file, and one of a byte-order mark alone
    texts = scanned(*datas)

    class Once(list):  # the ranges, walked at most once
        walks = 0

        def __iter__(self):
            Once.walks += 1
            return super().__iter__()
    ranges = Once(split_ranges(texts, 0.3))
    items = list(prepare_data.text_items(texts, ranges, "chars"))
    assert Once.walks == 1
    assert [(split, data, eot, name) for split, data, eot, _, name, _ in items] == [
        ("train", b"abcd", True, "b.txt"), ("train", b"efg", False, "d.txt"), ("val", b"h", True, "d.txt"),
        ("val", b"ij", False, "e.txt")]


def test_split_ranges():
    # the cut is int(characters * (1 - val_fraction)), as nanoGPT's data[:int(n * 0.9)]
    assert split_pieces([b"abcd", b"efgh"], 0.25) == [
        ("train", b"abcd", True, "a.txt", 0), ("train", b"ef", False, "b.txt", 0), ("val", b"gh", False, "b.txt", 2)]
    assert split_pieces([b"abcd", b"efgh"], 0.5) == [
        ("train", b"abcd", True, "a.txt", 0), ("val", b"efgh", False, "b.txt", 0)]
    assert split_pieces([b"", b"abc"], 0.1) == [("train", b"ab", False, "b.txt", 0), ("val", b"c", False, "b.txt", 2)]
    # a cut inside a file that is not the last: end-of-text comes only after the whole file, in val
    assert split_pieces([b"abcd", b"efgh"], 0.75) == [
        ("train", b"ab", False, "a.txt", 0), ("val", b"cd", True, "a.txt", 2), ("val", b"efgh", False, "b.txt", 0)]
    # characters, not bytes: 'é' is 2 bytes, '€' 3, '😀' 4
    text = "aé€😀bcdefghij"  # 13 characters, 20 bytes
    (_, train, *_), (_, val, _, _, offset) = split_pieces([text.encode()], 0.2)
    assert (train.decode(), val.decode(), offset) == (text[:10], text[10:], len(text[:10].encode()))
    with pytest.raises(DataError, match="has 1 character,.*leaves the train split empty"):
        split_pieces([b"a"], 0.1)


@pytest.mark.parametrize("read_bytes", [1, 2, 5, 64])
def test_the_cut_is_found_when_the_file_is_read_in_small_blocks(monkeypatch, read_bytes):
    monkeypatch.setattr(prepare_data, "READ_BYTES", read_bytes)
    text = "héllo wörld, 床前明月光 😀 ok\n" * 9  # 225 characters
    data = BOM + text.encode()
    for fraction in (0.01, 0.1, 0.37, 0.5, 0.99):
        cut = int(len(text) * (1 - fraction))
        (_, train, *_), (_, val, _, _, offset) = split_pieces([data], fraction)
        assert (train.decode(), val.decode(), offset) == (text[:cut], text[cut:], len(BOM + text[:cut].encode()))


MIXED = "Hello wörld, 床前明月光，疑是地上霜。 😀 ok\n  spaced   out\n\nend. " * 40


@pytest.mark.parametrize("tokenizer", ["gpt2", "char", "bpe"])
def test_text_read_in_small_blocks_gives_the_same_data_set(tmp_path, monkeypatch, tokenizer):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_bytes(BOM + MIXED.encode())
    (folder / "b.txt").write_bytes(MIXED[::-1].encode())
    (folder / "c.txt").write_bytes(b"")

    def run(out: str, unit_bytes: int) -> tuple:
        prepare_text(tmp_path / out, sorted(folder.iterdir()), dataset="custom", tokenizer=tokenizer,
                     vocab_size=300 if tokenizer == "bpe" else None, val_fraction=0.3, num_proc=1, command="t",
                     unit_bytes=unit_bytes)
        meta = load_meta(tmp_path / out)
        meta.pop("command")
        return bins(tmp_path / out), (tmp_path / out / "tokenizer.json").read_text(), meta

    whole = run("whole", 1 << 20)
    reads = []
    real_open = TextFile.open

    def spied(self):
        f = real_open(self)
        read = f.read
        f.read = lambda n=-1: reads.append(n) or read(n)
        return f

    monkeypatch.setattr(TextFile, "open", spied)
    monkeypatch.setattr(prepare_data, "READ_BYTES", 7)
    blocks = run("blocks", 16)
    for a, b in zip(blocks[0], whole[0]):
        np.testing.assert_array_equal(a, b)
    assert blocks[1:] == whole[1:]
    b_train = MIXED[::-1][: int(2 * len(MIXED) * 0.7) - len(MIXED)]  # the cut counts the characters of both
    # never a whole file at once; only BPE training reads its text whole: a.txt, and the train part of b.txt.
    # Beside the blocks: the bytes around the cut, where an '<|endoftext|>' written in the text is looked for
    assert [n for n in reads if not 0 <= n <= 7] == [2 * len(EOT) - 2] + ([len(MIXED.encode()), len(b_train.encode())]
                                                                          if tokenizer == "bpe" else [])
    if tokenizer == "gpt2":  # the ids of the whole texts
        train, val = whole[0]
        assert train.tolist() == gpt2_encoding().encode_ordinary(MIXED) + [50256] + \
            gpt2_encoding().encode_ordinary(b_train)
        assert val.tolist() == gpt2_encoding().encode_ordinary(MIXED[::-1][len(b_train):])


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
@pytest.mark.parametrize("when", ["before the cut is found", "after the cut is found"])
def test_a_file_that_changes_while_it_is_prepared_is_an_error(tmp_path, monkeypatch, when, tokenizer):
    src = tmp_path / "t.txt"
    real, encode_unit = prepare_data.split_ranges, prepare_data.encode_unit
    encoded = []
    monkeypatch.setattr(prepare_data, "encode_unit", lambda *a: encoded.append(1) or encode_unit(*a))
    # a character new to the file, in as many bytes: the character-level tokenizer made from the file meets
    # it before the file's checksum is compared, and the file's change, not the tokenizer, is to blame
    for name, text in (("same size", MIXED.replace("ok", "no")), ("longer", MIXED + "x"), ("shorter", MIXED[:-9]),
                       ("a new character", MIXED.replace("ok\n", "\u2603"))):
        src.write_text(MIXED)
        encoded.clear()
        if when == "before the cut is found":
            edit = lambda texts, f: (src.write_text(text), real(texts, f))[1]  # noqa: E731
        else:
            edit = lambda texts, f: (real(texts, f), src.write_text(text))[0]  # noqa: E731
        monkeypatch.setattr(prepare_data, "split_ranges", edit)
        with pytest.raises(DataError, match=f"{re.escape(str(src))} changed while it was being read; run again"):
            prepare_text(tmp_path / "o", [src], dataset="custom", tokenizer=tokenizer, vocab_size=None,
                         val_fraction=0.1, num_proc=1, command="t", unit_bytes=1000)
        assert not (tmp_path / "o").exists(), name
        if name == "longer":  # a file being written to (a log) is refused before any tokenising
            assert encoded == [], when


def test_safe_cuts_follow_every_character_but_whitespace():
    """A cut before ASCII whitespace is safe after any character that is not whitespace to GPT-2's pattern
    (U+180E was whitespace in older Unicode). CJK punctuation such as 。！？ ends lines in Chinese text: a cut
    point must follow it, or such text is never cut."""
    import regex
    blocked = set()
    for c in map(chr, itertools.chain(range(0xD800), range(0xE000, 0x110000))):
        for after in (b" ", b"\n", b"\r", b"\t", b"\x0b", b"\x0c"):
            data = b"x" + c.encode() + after
            m = prepare_data.SAFE_CUT.search(data, 1)
            if m is None or m.start() != len(data) - 1:
                blocked.add(c)
    whitespace = {c for c in map(chr, range(0x3001)) if c.isspace() or regex.fullmatch(r"\s", c)}
    assert blocked == whitespace | {"\u180e"}


@pytest.mark.parametrize("cuts, text", [("safe", "床前明月光，疑是地上霜。\n举头望明月！低头思故乡？\n" * 40),
                                        ("safe", "床前明月光，疑是地上霜。\r\n举头望明月！低头思故乡？\r\n" * 40),
                                        ("chars", "床前明月光疑是地上霜举头望明月低头思故乡" * 40)])
def test_chinese_text_is_read_in_blocks(monkeypatch, cuts, text):
    """Lines that end in 。！？ (before "\n", or Windows' "\r\n"), and for a char tokenizer text without any
    space or newline, are cut near each block's end: memory holds a block, not the whole text."""
    monkeypatch.setattr(prepare_data, "READ_BYTES", 256)
    (t,) = scanned(text.encode())
    ranges = [("train", 0, 0, t.size, False)]
    items = list(prepare_data.text_items([t], ranges, cuts))
    assert b"".join(data for _, data, *_ in items).decode() == text
    # a block, and what was left after the last cut in the one before
    assert len(items) >= 8 and max(len(data) for _, data, *_ in items) <= 2 * 256
    if cuts == "safe":  # and GPT-2's ids are those of the whole text
        assert sum((gpt2_encoding().encode_ordinary(data.decode()) for _, data, *_ in items), []) == \
            gpt2_encoding().encode_ordinary(text)


@pytest.mark.parametrize("read_bytes", [3, 4, 1 << 24])
def test_bad_utf8_is_located_across_blocks(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(prepare_data, "READ_BYTES", read_bytes)
    src = tmp_path / "t.txt"
    for data, offset, reason in ((BOM + "床前".encode() + b"\xff ok", 9, "invalid start byte"),
                                 ("abc床".encode() + "前".encode()[:2], 6, "starts a character that is not"),
                                 ("床".encode()[:2] + b"x", 0, "invalid continuation byte")):
        src.write_bytes(data)
        with pytest.raises(DataError, match=f"byte 0x{data[offset]:02x} at byte offset {offset} \\({reason}"):
            prepare_text(tmp_path / "o", [src], dataset="custom", tokenizer="char", vocab_size=None,
                         val_fraction=0.1, num_proc=1, command="t")
    # GPT-2's path leaves decoding to the workers: the offset of a late block's bad byte is still the file's
    monkeypatch.setattr(prepare_data, "READ_BYTES", 64)
    src.write_bytes(b"hello world " * 100 + b"\xff and more text " * 10)
    with pytest.raises(DataError, match="byte 0xff at byte offset 1200 "):
        prepare_text(tmp_path / "o", [src], dataset="custom", tokenizer="gpt2", vocab_size=None,
                     val_fraction=0.1, num_proc=1, command="t")


def test_complete_utf8_keeps_whole_characters_only():
    for ch in "aé€😀ส":  # lead bytes 61, c3, e2, f0 and e0 (Thai)
        data = ch.encode()
        assert prepare_data.complete_utf8(b"x" + data) == 1 + len(data)  # a whole last character stays
        for cut in range(1, len(data)):
            assert prepare_data.complete_utf8(b"x" + data[:cut]) == 1  # a cut one goes to the next block


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 5, 8, 1 << 24])
@pytest.mark.parametrize("bom", [b"", BOM])
def test_scanning_in_any_block_size_finds_exactly_the_characters(read_bytes, bom, monkeypatch):
    monkeypatch.setattr(prepare_data, "READ_BYTES", read_bytes)
    for text in ("Zabcde สวัสดี ภาษาไทย 床前明月光。 é 😀, Z and the last one: 。",
                 "a U+FEFF inside the text is text: \ufeff"):
        (t,) = scanned(bom + text.encode())
        assert (t.charset, t.chars, t.skip, t.size) == ("".join(sorted(set(text))), len(text) + bool(bom),
                                                        len(bom), len(bom + text.encode()))


@pytest.mark.parametrize("how", ["ends inside a character", "shrinks before the cut is found",
                                 "shrinks after the cut is found"])
def test_bad_text_for_bpe_is_found_before_the_training(tmp_path, monkeypatch, capsys, how):
    src = tmp_path / "t.txt"
    src.write_bytes(MIXED.encode() + ("。".encode()[:2] if how == "ends inside a character" else b""))
    real = prepare_data.split_ranges
    if how == "shrinks before the cut is found":
        monkeypatch.setattr(prepare_data, "split_ranges",
                            lambda texts, f: (src.write_bytes(MIXED.encode()[:1000]), real(texts, f))[1])
    if how == "shrinks after the cut is found":
        monkeypatch.setattr(prepare_data, "split_ranges",
                            lambda texts, f: (real(texts, f), src.write_bytes(MIXED.encode()[:1000]))[0])
    match = "starts a character that is not completed" if how == "ends inside a character" else "changed while"
    with pytest.raises(DataError, match=match):
        prepare_text(tmp_path / "o", [src], dataset="custom", tokenizer="bpe", vocab_size=300, val_fraction=0.1,
                     num_proc=1, command="t")
    assert "training a BPE" not in capsys.readouterr().err


def test_both_progress_bars_count_every_byte(tmp_path, monkeypatch):
    """The bar of the first reading counts the files' bytes, the tokenising one the text's (no byte-order mark)."""
    monkeypatch.setattr(prepare_data, "READ_BYTES", 64)
    done = {}
    real_update = prepare_data.Progress.update
    monkeypatch.setattr(prepare_data.Progress, "update",
                        lambda self, n=1: done.update({self.desc: done.get(self.desc, 0) + n}) or real_update(self, n))
    (tmp_path / "a.txt").write_bytes(BOM + MIXED.encode())
    (tmp_path / "b.txt").write_bytes(MIXED[:500].encode())
    prepare_text(tmp_path / "o", [tmp_path / "a.txt", tmp_path / "b.txt"], dataset="custom", tokenizer="char",
                 vocab_size=None, val_fraction=0.1, num_proc=1, command="t", unit_bytes=256)
    text_bytes = len(MIXED.encode()) + len(MIXED[:500].encode())
    assert done == {"reading": text_bytes + len(BOM), "tokenising (char)": text_bytes}


def test_an_unknown_character_in_any_file_is_named_before_the_work(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc\n")
    (tmp_path / "b.txt").write_text("abc é\n")
    with pytest.raises(DataError, match=r"b.txt has 1 character\(s\) that the given character-level tokenizer does "
                                        r"not know \('é'\)"):
        prepare_text(tmp_path / "o", [tmp_path / "a.txt", tmp_path / "b.txt"], dataset="custom",
                     tokenizer=CharTokenizer.from_text("abc \n"), vocab_size=None, val_fraction=0.1, num_proc=1,
                     command="t")


# -----------------------------------------------------------------------------
# cutting long text for the workers leaves the ids unchanged

# characters that stress GPT-2's pre-split: several kinds of whitespace, contractions, digits,
# symbols, letters of other scripts, emoji, and the separators Python calls whitespace but GPT-2 does not
PIECES = ["a", "b", "Z", "é", "東", "😀", "1", "42", ".", ",", "!", "'", "'s", "'ll", " ", "  ", "\n", "\n\n",
          "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u1680", "\u180e", "\u2000", "\u200a",
          "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\ufeff", "-", "<|endoftext|>", " the", "word"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join), st.integers(1, 16))
def test_cut_text_keeps_gpt2_ids(text, max_bytes):
    pieces = [p.decode("utf-8") for p in cut_text(text.encode(), max_bytes)]  # cuts fall between characters
    assert "".join(pieces) == text and (all(pieces) or text == "")
    # every cut follows a character that is not whitespace and precedes ASCII whitespace
    assert all(not left[-1].isspace() and left[-1] != "\u180e" for left in pieces[:-1])
    assert all(right[0] in " \t\n\x0b\x0c\r" for right in pieces[1:])
    ids = [i for p in pieces for i in gpt2_encoding().encode_ordinary(p)]
    assert ids == gpt2_encoding().encode_ordinary(text)


def test_cut_text_keeps_ids_on_shakespeare(shakespeare_text):
    text = shakespeare_text[:200_000]
    pieces = [p.decode() for p in cut_text(text.encode(), 1000)]
    assert len(pieces) > 150 and max(map(len, pieces)) < 1100
    ids = [i for p in pieces for i in gpt2_encoding().encode_ordinary(p)]
    assert ids == gpt2_encoding().encode_ordinary(text)
    # and for a byte-level BPE with GPT-2's pattern, as trained by --tokenizer bpe
    bpe = BPETokenizer().train(text[:50_000], 400)
    assert prepare_data.can_cut(bpe)
    assert [i for p in pieces for i in bpe.encode_ordinary(p)] == bpe.encode_ordinary(text)


def test_piece_units_size_order_and_progress():
    items = [("train", b"one two three four five six seven", True, 33, "x.txt", 0),
             ("val", b"eight nine ten", False, 100, "x.txt", 33)]
    units = list(piece_units(items, 10, cuttable=True))
    assert all(kind == "pieces" for (kind, _), _ in units)
    flat = [p for (_, pieces), _ in units for p in pieces]
    assert b"".join(data for _, data, *_ in flat) == items[0][1] + items[1][1]
    # end-of-text only after the last piece of the first item, which is train (split id 0)
    assert [(split_id, data) for split_id, data, eot, *_ in flat if eot] == [(0, b" six seven")]
    # each piece knows where it came from, for error messages
    assert [(name, offset) for *_, name, offset, _ in flat] == [("x.txt", 0), ("x.txt", 13), ("x.txt", 23),
                                                                ("x.txt", 33), ("x.txt", 43)]
    assert [seen for *_, seen in flat] == [0] * 5  # ASCII only: no evidence that the file is UTF-8
    assert sum(progress for _, progress in units) == 133
    assert all(sum(len(p[1]) for p in pieces) < 20 for (_, pieces), _ in units)


# -----------------------------------------------------------------------------
# openwebtext's code path on local files


WORDS = ["alpha", "beta", "gamma", "δέλτα", "😀"]
DOCS = [f"Document {i}: " + " ".join(WORDS[j % 5] for j in range(i * 7)) + "\n" for i in range(40)]


def test_openwebtext_local_jsonl(tmp_path):
    src = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)]
    lines.insert(5, "")  # blank lines are skipped
    lines.insert(9, json.dumps({"text": ""}))  # an empty document is counted and skipped
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "owt"
    meta = prepare("--dataset", "openwebtext", "--input", src, "--output_dir", out, "--val_fraction", 0.25)
    train, val = expected_doc_ids(DOCS, 0.25)
    assert 0 < len(val) < len(train)  # both splits non-empty with these documents
    got = bins(out)
    np.testing.assert_array_equal(got[0], train)
    np.testing.assert_array_equal(got[1], val)
    n_val = sum(doc_is_val(d, 0.25) for d in DOCS)
    assert (meta["train_documents"], meta["val_documents"], meta["empty_documents"]) == (40 - n_val, n_val, 1)
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (meta["tokenizer"], meta["dtype"], meta["eot_token"]) == ("gpt2", "uint16", 50256)


def test_openwebtext_folder_in_parallel_units(tmp_path):
    """.jsonl, .txt and .parquet files in one folder, cut into many small units for 2 processes:
    the same ids as encoding each document alone, in sorted file order."""
    folder = tmp_path / "web"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:15]))
    for i, d in enumerate(DOCS[15:25]):
        (folder / f"b{i:02d}.txt").write_text(d)
    import pyarrow as pa  # a test requirement (requirements-dev.txt), optional for users
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[25:]}), folder / "c.parquet", row_group_size=4)
    order = DOCS
    meta = prepare_documents(tmp_path / "out", str(folder), hf_name="", val_fraction=0.25, num_proc=2,
                             command="test", unit_bytes=300)
    train, val = expected_doc_ids(order, 0.25)
    got = bins(tmp_path / "out")
    np.testing.assert_array_equal(got[0], train)
    np.testing.assert_array_equal(got[1], val)
    n_val = sum(doc_is_val(d, 0.25) for d in order)
    assert (meta["train_documents"], meta["val_documents"], meta["val_fraction"]) == (len(order) - n_val, n_val, 0.25)


def test_a_parquet_file_is_hashed_and_its_progress_counts_its_bytes(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS}), src, row_group_size=7)
    counted = []
    update = prepare_data.Progress.update
    monkeypatch.setattr(prepare_data.Progress, "update", lambda self, n=1: counted.append(n) or update(self, n))
    meta = prepare_documents(tmp_path / "o", str(src), hf_name="", val_fraction=0.25, num_proc=1, command="t",
                             unit_bytes=300)
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert sum(counted) == src.stat().st_size


@pytest.mark.parametrize("out_name", ["out", None])
def test_openwebtext_output_dir_inside_the_input_folder(tmp_path, out_name):
    """The data set written into the input folder (or a folder in it) is not read back as documents."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20]))
    out = docs / out_name if out_name else docs
    train, val = expected_doc_ids(DOCS[:20], 0.25)
    for _ in range(3):  # the second run once read the first run's meta.json while deleting it
        meta = prepare("--dataset", "openwebtext", "--input", docs, "--output_dir", out, "--val_fraction", 0.25,
                       "--num_proc", 1)
        assert meta["source"] == str(docs / "a.jsonl") and load_meta(out) == meta
        assert [a.tolist() for a in bins(out)] == [train, val]


def test_openwebtext_hugging_face_path(tmp_path, monkeypatch):
    """The `datasets` code path, with a stand-in module (the real one would download)."""
    calls = {}

    class FakeDataset:
        column_names = ["text"]

        def __len__(self):
            return len(DOCS)

        def iter(self, batch_size):
            for i in range(0, len(DOCS), batch_size):
                yield {"text": DOCS[i : i + batch_size]}

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, split, num_proc):
            calls.update(name=name, split=split, num_proc=num_proc)
            return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    meta = prepare("--dataset", "openwebtext", "--output_dir", tmp_path / "hf", "--val_fraction", 0.25,
                   "--num_proc", 1)
    assert calls == {"name": "openwebtext", "split": "train", "num_proc": 1}
    train, val = expected_doc_ids(DOCS, 0.25)
    got = bins(tmp_path / "hf")
    np.testing.assert_array_equal(got[0], train)
    np.testing.assert_array_equal(got[1], val)
    digests = b"".join(hashlib.blake2b(d.encode(), digest_size=8).digest() for d in DOCS)
    assert meta["source"] == "huggingface:openwebtext"
    assert meta["source_sha256"] == hashlib.sha256(digests).hexdigest()
    meta = prepare("--dataset", "openwebtext", "--output_dir", tmp_path / "hf2", "--val_fraction", 0.25,
                   "--num_proc", 1, "--hf_dataset", "Skylion007/openwebtext")
    assert calls["name"] == "Skylion007/openwebtext" and meta["source"] == "huggingface:Skylion007/openwebtext"
    # without --val_fraction: OpenWebText's 0.0005, which leaves 40 documents none for val
    with pytest.raises(DataError, match=r"--val_fraction \(now 0.0005\)"):
        prepare("--dataset", "openwebtext", "--output_dir", tmp_path / "hf3", "--num_proc", 1)


def test_openwebtext_without_datasets_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets.*--input"):
        prepare("--dataset", "openwebtext", "--output_dir", tmp_path / "x")


# -----------------------------------------------------------------------------
# uint32 ids


class WideTokenizer(Tokenizer):
    """A stand-in with ids above 65,535: character c -> 65536 + ord(c) (ASCII text only)."""

    kind = "wide"
    eot_token = 65536 + 128

    @property
    def vocab_size(self) -> int:
        return 65536 + 129

    def encode_ordinary(self, text: str) -> list[int]:
        return [65536 + ord(c) for c in text]

    def to_dict(self) -> dict:
        return {"kind": "wide"}


def test_token_dtype_boundary():
    assert token_dtype(65_535) == np.uint16  # ids 0..65534
    assert token_dtype(65_536) == np.uint32  # the issue: uint32 once the vocabulary exceeds 65,535
    assert token_dtype(100_277) == np.uint32


def test_uint32_written_and_loaded(tmp_path):
    text = "the quick brown fox jumps over the lazy dog " * 4
    items = [("train", text.encode(), True, len(text), "t", 0), ("val", text[:30].encode(), False, 30, "v", 0)]
    meta = write_dataset(tmp_path, WideTokenizer(), piece_units(items, 16, cuttable=True), num_proc=1,
                         val_fraction=0.1, progress=("bytes", None), meta={"dataset": "test"})
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65665
    train, val = bins(tmp_path, np.uint32)
    assert train.tolist() == [65536 + ord(c) for c in text] + [65536 + 128]
    assert val.tolist() == [65536 + ord(c) for c in text[:30]]
    assert (tmp_path / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    with BatchLoader(tmp_path, block_size=8, batch_size=4) as loader:
        assert loader.dtype == np.uint32
        x, y = loader.get_batch("train", 0)
    assert x.min() > 65535
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        s = next(i for i in range(len(train) - 8) if train[i : i + 8].tolist() == row_x)
        assert row_y == train[s + 1 : s + 9].tolist()


# -----------------------------------------------------------------------------
# atomic writes


def test_a_compressed_file_is_named_so_not_taken_for_another_encoding(shakespeare_text, tmp_path):
    text = shakespeare_text[:2000].encode()
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as z:
        z.writestr("in.txt", text)
    files = {"gzip": gzip.compress(text), "bzip2": bz2.compress(text), "zip": (tmp_path / "in.zip").read_bytes()}
    for kind, data in files.items():
        (tmp_path / "in.txt").write_bytes(data)  # a name that does not say it
        r = run_cli("--dataset", "custom", "--input", tmp_path / "in.txt", "--output_dir", tmp_path / kind)
        assert r.returncode == 2 and r.stderr.endswith(f"it is compressed ({kind}): decompress it first\n"), r.stderr
        assert not (tmp_path / kind).exists()
    from utils import decode_utf8  # text in GBK that begins with the letters of bzip2's mark is text
    with pytest.raises(DataError, match=r"in.txt is not valid UTF-8: .*iconv -f gbk -t utf-8"):
        decode_utf8("BZh is text, in GBK: 你好".encode("gbk"), "in.txt", error=DataError)


def test_utf8_text_with_damaged_bytes_is_not_sent_to_iconv_from_gbk(tmp_path):
    """Following the GBK hint for a UTF-8 file with a damaged byte garbles the whole text."""
    text = "床前明月光，疑是地上霜。"
    (tmp_path / "in.txt").write_bytes(text.encode() + b"\xe5\x80" + "举头望明月".encode())
    r = run_cli("--dataset", "custom", "--input", tmp_path / "in.txt", "--output_dir", tmp_path / "o",
                "--tokenizer", "char")
    assert r.returncode == 2 and r.stderr.endswith(
        f"byte 0xe5 at byte offset {len(text.encode())} (invalid continuation byte); the text before it is UTF-8, so "
        f"the file has damaged bytes: drop them with `iconv -f utf-8 -t utf-8 -c IN > OUT`\n"), r.stderr
    # a file cut inside its last character: the bytes left over after the last whole block are few, and the
    # characters of the blocks before count too
    (tmp_path / "cut.txt").write_bytes((text * 100).encode() + b"\xe5\xba")
    r = run_cli("--dataset", "custom", "--input", tmp_path / "cut.txt", "--output_dir", tmp_path / "o",
                "--tokenizer", "char")
    assert r.returncode == 2 and r.stderr.endswith("the file has damaged bytes: drop them with `iconv -f utf-8 -t "
                                                   "utf-8 -c IN > OUT`\n"), r.stderr
    from utils import decode_utf8  # GBK whose first bytes happen to read as UTF-8 still gets the GBK hint
    with pytest.raises(DataError, match=r"byte offset 4 .*iconv -f gbk -t utf-8"):
        decode_utf8("ab\u0121".encode() + "你好".encode("gbk"), "in.txt", error=DataError)


def test_a_parquet_or_json_lines_file_given_as_custom_text_is_named(tmp_path, capsys):
    (tmp_path / "d.parquet").write_bytes(b"PAR1\x15\x04\x15\xc8\x01" + b"\x00" * 64 + b"PAR1")
    with pytest.raises(DataError, match=r"d.parquet is not valid UTF-8: .*it is a Parquet file, not text: write its "
                                        r"text column out as a .txt file first$"):
        prepare("--dataset", "custom", "--input", str(tmp_path / "d.parquet"), "--output_dir", str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()
    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(200))
    (tmp_path / "d.jsonl").write_text(lines, encoding="utf-8")
    meta = prepare("--dataset", "custom", "--input", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "j"),
                   "--tokenizer", "char")
    assert meta["train_tokens"] + meta["val_tokens"] == len(lines)  # read as text, as it says
    assert (f"note: {tmp_path / 'd.jsonl'} is read as plain text, its JSON syntax included; --dataset openwebtext "
            f"--input {tmp_path / 'd.jsonl'} reads the \"text\" field of each line") in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to stand for a full disk")
def test_a_finished_data_set_is_no_failure_when_stdout_cannot_take_the_last_line(shakespeare_text, tmp_path):
    (tmp_path / "in.txt").write_text(shakespeare_text[:5000], encoding="utf-8")
    with open("/dev/full", "w") as full:  # `> log.txt` on a full disk
        r = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--dataset", "custom", "--input",
                            tmp_path / "in.txt", "--output_dir", tmp_path / "o", "--tokenizer", "char"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.endswith(" (stdout could not take this line: No space left on device)\n")
    assert f"wrote {tmp_path / 'o'}: 4,500 train and 500 val tokens" in r.stderr
    assert sum(np.fromfile(tmp_path / "o" / f"{s}.bin", np.uint16).size for s in ("train", "val")) == 5000


def test_a_pool_broken_by_the_stop_signal_itself_stops_as_the_signal_asks():
    # SIGTERM to the group also ends a worker still starting (before it ignores the signal), and the pool breaks;
    # the parent's own exception can be swallowed where it lands (in a fork's callbacks): the stop still wins
    with pytest.raises(KeyboardInterrupt):
        with prepare_data.sigterm_as_interrupt():
            with contextlib.suppress(KeyboardInterrupt):  # swallowed, as in a fork's callbacks
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            raise DataError("a tokenising process died (killed by the system: out of memory?); nothing was written")


def test_interrupted_run_leaves_no_valid_looking_data(shakespeare_text, tmp_path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text[:50_000])
    out = tmp_path / "out"
    prepare_text(out, [src], dataset="custom", tokenizer="char", vocab_size=None, val_fraction=0.1,
                 num_proc=1, command="first run")
    assert load_meta(out)["train_tokens"] == 45_000
    # a second run is interrupted after two units have been written
    real, calls = prepare_data.encode_unit, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prepare_data, "encode_unit", interrupted)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        prepare_text(out, [src], dataset="custom", tokenizer="char", vocab_size=None, val_fraction=0.1,
                     num_proc=1, command="second run", unit_bytes=5000)
    # the new .bin files would only have replaced the old ones at the end: the first run's data set is
    # still there, whole, and no partial file is left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_meta(out)["command"] == "first run"
    BatchLoader(out, block_size=8, batch_size=2).get_batch("train", 0)
    # a fresh directory is not left behind at all
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_text(fresh, [src], dataset="custom", tokenizer="char", vocab_size=None, val_fraction=0.1,
                     num_proc=1, command="x", unit_bytes=5000)
    assert not fresh.exists()


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail with TimeoutError after `seconds` instead of hanging the whole test session (main thread only)."""
    def hung(*_):
        raise TimeoutError(f"{what} took over {seconds} s: it hangs")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def start_with_encode_unit(encode_unit: str, src: Path, out: Path) -> subprocess.Popen:
    """prepare_data.py tokenising src (char, 2 worker processes) into out, with the encode_unit that the
    Python source `encode_unit` defines (forked workers inherit it), in a session of its own: a signal can go
    to the script alone or to its whole group (as Ctrl-C in a terminal does), and whatever is left of it can
    be found and killed at the end. Ctrl-C raises KeyboardInterrupt in it, as in a terminal, also where these
    tests run as a background job, which starts with SIGINT ignored and would pass that on."""
    code = (f"import os, signal, time, prepare_data, utils\n{encode_unit}\n"
            f"signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"prepare_data.encode_unit = encode_unit\nutils.run_cli(prepare_data.main)\n")
    args = ["--dataset", "custom", "--input", src, "--tokenizer", "char", "--output_dir", out, "--num_proc", 2]
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_worker_killed_by_the_system_stops_the_run_in_one_line(shakespeare_text, tmp_path):
    """The out-of-memory killer takes a worker: a clear error, not a run that waits for its result forever."""
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text * 3)
    out = tmp_path / "out"
    proc = start_with_encode_unit("def encode_unit(*args):\n    os.kill(os.getpid(), signal.SIGKILL)", src, out)
    try:
        proc.stderr = proc.communicate(timeout=60)[1]
    finally:  # a run that hangs (Python before 3.11.5 did, without a fix) must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: a tokenising process died (killed by the system: out of memory?); nothing was written. Try again "
        "with fewer processes, e.g. --num_proc 1"]
    assert not out.exists()


def test_a_broken_pool_ends_its_own_workers_only(shakespeare_text, tmp_path, monkeypatch):
    """prepare_data's functions run inside other programs too (these tests): a child process of the caller's
    is left alone when the pool's workers are ended."""
    import multiprocessing
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text * 3)
    bystander = multiprocessing.Process(target=time.sleep, args=(60,))
    bystander.start()
    try:
        monkeypatch.setattr(prepare_data, "encode_unit", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
        with pytest.raises(DataError, match="a tokenising process died"), deadline(60, "prepare_data"):
            prepare("--dataset", "custom", "--input", src, "--tokenizer", "char", "--output_dir", tmp_path / "o",
                    "--num_proc", 2)
        assert bystander.is_alive()
    finally:
        bystander.kill()
        bystander.join()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_no_input(tmp_path):
    with pytest.raises(DataError, match=r"--input '/dev/zero' is a device, not a file or a folder"):
        prepare("--dataset", "custom", "--input", "/dev/zero", "--tokenizer", "char", "--output_dir", tmp_path / "o")


def test_one_worker_killed_while_another_sends_its_result_stops_the_run(shakespeare_text, tmp_path):
    """The out-of-memory killer takes one worker while the other has a result of megabytes to send. The
    pool stops reading results, so that worker blocks in its write, and it ignores the SIGTERM the pool
    sends: the run must end it and say so in one line, not wait for it forever."""
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text * 3)  # 3 units of about 1 MB; each result is 2 MB of uint16 ids
    first = tmp_path / "first"
    out = tmp_path / "out"
    proc = start_with_encode_unit(f"real = prepare_data.encode_unit\n"
                                  f"def encode_unit(*args):\n"
                                  f"    try:  # the first worker to start a unit is killed; the other works on\n"
                                  f"        os.close(os.open({str(first)!r}, os.O_CREAT | os.O_EXCL))\n"
                                  f"    except FileExistsError:\n"
                                  f"        return real(*args)\n"
                                  f"    os.kill(os.getpid(), signal.SIGKILL)", src, out)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what a hang left behind
        proc.wait()
    assert proc.returncode == 2 and err.strip().splitlines() == [
        "error: a tokenising process died (killed by the system: out of memory?); nothing was written. Try again "
        "with fewer processes, e.g. --num_proc 1"]
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("group", [False, True])
def test_signal_while_workers_tokenise_cleans_up(shakespeare_text, tmp_path, sig, group):
    """Ctrl-C, SIGTERM (kill, a scheduler) or SIGHUP (the terminal closed, SSH dropped) sent to the script, or to
    it and its workers as a terminal or a scheduler does: exit code 130, one line, no partial files, no process
    left."""
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text * 3)  # about 3 units of 1 MB, so a pool of worker processes runs
    started = tmp_path / "started"
    out = tmp_path / "out"
    # a slow encode_unit that says when a worker has begun; its result is that of an empty unit, so that a
    # signal the run does not act on fails this test by its exit code, not by a traceback about the result
    proc = start_with_encode_unit(f"def encode_unit(*args):\n"
                                  f"    open({str(started)!r}, 'w').close()\n"
                                  f"    time.sleep(1)\n"
                                  f"    empty = prepare_data.np.zeros(0, prepare_data.np.uint16)\n"
                                  f"    return empty, empty, (0, 0, 0), b''", src, out)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.stderr.read() if proc.poll() is not None else "no worker started in 60 s"
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        time.sleep(0.5)  # the workers end with the script
        try:
            os.killpg(proc.pid, 0)  # a process of its group is still there
            left = True
        except ProcessLookupError:
            left = False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a failure
        proc.wait()
    assert proc.returncode == 130, err
    assert not left
    assert err.strip().splitlines() == ["interrupted"]  # no traceback from the script or its workers
    assert not out.exists()  # the partial .tmp files were removed, and the folder the run made


def _running(pid: int) -> bool:
    """Whether process pid exists and has not ended (a zombie has ended, only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux's /proc")
def test_workers_end_when_the_script_is_killed_outright(shakespeare_text, tmp_path):
    """SIGKILL (the out-of-memory killer, kill -9) gives the script no chance to stop its workers: they notice
    on their own and end, instead of waiting for work forever."""
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text * 3)
    started = tmp_path / "started"
    started.mkdir()
    # a slow encode_unit that leaves its worker's pid behind
    proc = start_with_encode_unit(f"def encode_unit(*args):\n"
                                  f"    open(os.path.join({str(started)!r}, str(os.getpid())), 'w').close()\n"
                                  f"    time.sleep(1)", src, tmp_path / "out")
    try:
        deadline = time.monotonic() + 60
        while len(list(started.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.name) for p in started.iterdir()]
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no two workers in 60 s"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30  # they look once a second; a generous margin for a busy machine
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in workers if _running(pid)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a failure
    assert left == []


def test_a_spawned_worker_ends_with_its_parent_where_its_parent_pid_never_changes(tmp_path):
    """Windows keeps an orphan's parent pid as it was, so a worker there must see its parent's end another way."""
    script = tmp_path / "parent.py"
    script.write_text(f"""import multiprocessing, os, sys, time
sys.path.insert(0, {str(ROOT)!r})

def worker():
    os.getppid = lambda: 1  # as on Windows: the parent pid the worker sees never changes
    import utils
    utils.exit_with_parent(interval=0.1)
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=worker)
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        time.sleep(0.5)
        assert _running(worker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(worker)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_a_data_set_rewritten_in_place_during_the_run_stops_it_at_the_next_batch(tmp_path):
    """`cp other/train.bin data/x/train.bin` keeps the file (its inode) and changes its length."""
    from data import DamagedBatchError
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    with BatchLoader(d, block_size=8, batch_size=2) as loader:
        loader.get_batch("train", 0)
        with open(d / "train.bin", "r+b") as f:
            f.truncate(0)
            f.write((np.arange(80) % 50).astype(np.uint16).tobytes())
        with pytest.raises(DamagedBatchError, match=r"train.bin was replaced or changed since the run started"):
            loader.get_batch("train", 1)
    # the same length written over in place, with ids that are all valid: only the time tells
    d = write_data_dir(tmp_path / "e", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    with BatchLoader(d, block_size=8, batch_size=2) as loader:
        loader.get_batch("train", 0)
        before = (d / "train.bin").stat().st_mtime_ns
        with open(d / "train.bin", "r+b") as f:
            f.write((np.arange(100) % 49).astype(np.uint16).tobytes())
        os.utime(d / "train.bin", ns=(before + 10**9, before + 10**9))  # a later write, on a coarse clock too
        with pytest.raises(DamagedBatchError, match=r"train.bin was replaced or changed since the run started"):
            loader.get_batch("train", 1)


def test_the_default_folder_of_a_relative_input_is_named_after_it(tmp_path, monkeypatch):
    """--input .. from books/sub names the data set after 'books', not '..' (which would put its files here)."""
    (tmp_path / "books" / "sub").mkdir(parents=True)
    (tmp_path / "books" / "a.txt").write_text("to be or not to be, that is the question\n" * 20)
    monkeypatch.chdir(tmp_path / "books" / "sub")
    assert custom_data_dir("..") == Path("data") / "books" and custom_data_dir(".") == Path("data") / "sub"
    prepare("--dataset", "custom", "--input", "..", "--tokenizer", "char")
    assert sorted(p.name for p in (tmp_path / "books" / "sub").iterdir()) == ["data"]
    assert (tmp_path / "books" / "sub" / "data" / "books" / "train.bin").is_file()


def test_units_in_flight_are_bounded(monkeypatch):
    """At most 2 * num_proc units are handed to the workers before the first result is taken: memory stays
    bounded whatever the input's size."""
    taken = []

    def units():
        for i in range(100):
            taken.append(i)
            yield ("docs", [f"text {i}"]), i

    tok = CharTokenizer.from_text("text 0123456789")
    results = prepare_data.encode_units(tok, units(), num_proc=2, dtype=np.dtype(np.uint16), val_fraction=0.5)
    next(results)
    assert len(taken) == 2 * 2
    assert len(list(results)) == 99 and len(taken) == 100


@pytest.mark.parametrize("kind", ["custom", "openwebtext"])
def test_the_progress_bar_knows_the_input_size(tmp_path, monkeypatch, kind):
    """A total gives each bar its percentage and ETA: the bytes of the files read."""
    totals = []
    real_init = prepare_data.Progress.__init__
    monkeypatch.setattr(prepare_data.Progress, "__init__",
                        lambda self, *a, **k: totals.append(k.get("total")) or real_init(self, *a, **k))
    src = tmp_path / ("in.txt" if kind == "custom" else "in.jsonl")
    src.write_text("to be or not to be\n" * 50 if kind == "custom" else
                   "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20]))
    prepare("--dataset", kind, "--input", src, "--output_dir", tmp_path / "o", "--val_fraction", 0.2,
            *(["--tokenizer", "char"] if kind == "custom" else []))
    # custom text is read twice: once to count its characters, once to tokenise it
    assert totals == [src.stat().st_size] * (2 if kind == "custom" else 1)


def test_a_data_set_prepared_again_during_the_run_stops_it_at_the_next_batch(tmp_path):
    """prepare_data.py renames new files over the old: batches from a shorter file would crash, from a longer
    one they would silently be other text."""
    from data import DamagedBatchError
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    with BatchLoader(d, block_size=8, batch_size=2) as loader:
        loader.get_batch("train", 0)
        new = tmp_path / "new.bin"
        (np.arange(100) % 50).astype(np.uint16).tofile(new)  # the same size, even: another file all the same
        os.replace(new, d / "train.bin")
        with pytest.raises(DamagedBatchError, match=r"train.bin was replaced or changed since the run started"):
            loader.get_batch("train", 1)
        loader.get_batch("val", 1)  # the other split is untouched


def test_a_file_put_in_place_with_the_old_time_or_changed_in_size_is_seen(tmp_path):
    """The identity is more than the modification time: another file given the old time (cp -p, rsync -t),
    or the file cut and written again within the clock's resolution; a removed file is said too."""
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    with BatchLoader(d, block_size=8, batch_size=2) as loader:
        old = (d / "train.bin").stat().st_mtime_ns
        new = tmp_path / "new.bin"
        (np.arange(100) % 50).astype(np.uint16).tofile(new)
        os.utime(new, ns=(old, old))
        os.replace(new, d / "train.bin")  # only the inode differs
        assert loader.changed_file() == f"{d / 'train.bin'} {CHANGED}"
    with BatchLoader(d, block_size=8, batch_size=2) as loader:
        old = (d / "val.bin").stat().st_mtime_ns
        with open(d / "val.bin", "ab") as f:
            f.write(b"\0\0")
        os.utime(d / "val.bin", ns=(old, old))  # only the size differs
        assert loader.changed_file() == f"{d / 'val.bin'} {CHANGED}"
    d = write_data_dir(tmp_path / "d2", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    with BatchLoader(d, block_size=8, batch_size=2) as loader:
        os.remove(d / "train.bin")
        assert loader.changed_file() == f"{d / 'train.bin'} cannot be read any more (No such file or directory)"


def test_each_tokenizer_has_a_default_folder_of_its_own(tmp_path, monkeypatch, shakespeare_path):
    """prepare_data.py --dataset shakespeare --tokenizer char (or bpe) without --output_dir must not replace
    the GPT-2 data set, nor one the other."""
    assert len(set(DEFAULT_DATA_DIRS.values())) == len(DEFAULT_DATA_DIRS)
    assert prepare_command("data/shakespeare_bpe") == "python prepare_data.py --dataset shakespeare --tokenizer bpe"
    monkeypatch.chdir(tmp_path)
    prepare("--dataset", "shakespeare", "--tokenizer", "char", "--input", shakespeare_path, "--num_proc", 1)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shakespeare_char"]
    assert (tmp_path / "data" / "shakespeare_char" / "meta.json").is_file()


def test_an_unreadable_meta_json_asks_for_permissions_not_a_new_data_set(tmp_path, monkeypatch):
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "meta.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(DataError, match=rf"^cannot read {re.escape(str(d / 'meta.json'))}: Permission denied; make "
                                        r"it readable \(and its folder\), e\.g\. chmod a\+r "):
        load_meta(d)


@pytest.mark.parametrize("field, value", [("train_tokens", None), ("vocab_size", "50"), ("val_tokens", -1),
                                          ("vocab_size", True), ("tokenizer_file", None)])
def test_meta_with_a_field_of_the_wrong_type_is_one_line(tmp_path, field, value):
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50) % 50, vocab_size=50)
    meta = json.loads((d / "meta.json").read_text())
    meta[field] = value
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"meta.json has a bad {field} \({re.escape(repr(value))}\)"):
        load_meta(d)


def test_meta_that_does_not_match_the_bins_is_refused(tmp_path):
    d = write_data_dir(tmp_path / "d", np.arange(100), np.arange(50), vocab_size=100)
    meta = json.loads((d / "meta.json").read_text())
    meta["train_tokens"] = 120
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"has 200 bytes, but meta.json promises 120 uint16 tokens"):
        BatchLoader(d, block_size=8, batch_size=2)
    meta["train_tokens"] = 80  # a bin longer than promised is as wrong: its end would never be read
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"has 200 bytes, but meta.json promises 80 uint16 tokens"):
        BatchLoader(d, block_size=8, batch_size=2)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("train_tokens"), "lacks train_tokens; it was not written by this version"),
    (lambda m: m.update(dtype="float32"), "says dtype 'float32'; expected one of"),
])
def test_a_meta_json_of_another_kind_is_refused(tmp_path, change, message):
    d = write_data_dir(tmp_path / "d", np.arange(100), np.arange(50), vocab_size=100)
    meta = json.loads((d / "meta.json").read_text())
    change(meta)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        BatchLoader(d, block_size=8, batch_size=2)


def test_a_rank_outside_the_world_is_refused(tmp_path):
    d = write_data_dir(tmp_path / "d", np.arange(100), np.arange(50), vocab_size=100)
    with pytest.raises(ValueError, match="0 <= rank < world_size, got seed=1337, rank=2, world_size=2"):
        BatchLoader(d, block_size=8, batch_size=2, rank=2, world_size=2)


@pytest.mark.parametrize("recorded, fix", [
    # the recorded command, run again, would write another folder: the data set was copied or renamed
    ("python prepare_data.py --dataset shakespeare --tokenizer char",
     "python prepare_data.py --dataset shakespeare --tokenizer char --output_dir '{d}'"),
    ("python prepare_data.py --dataset custom --input 'my text.txt' --output_dir data/old --tokenizer bpe",
     "python prepare_data.py --dataset custom --input 'my text.txt' --tokenizer bpe --output_dir '{d}'"),
    ("python prepare_data.py --dataset custom --input a.txt --output_dir=data/old",
     "python prepare_data.py --dataset custom --input a.txt --output_dir '{d}'"),
    (None, "python prepare_data.py --dataset custom --input YOUR_TEXT.txt --tokenizer gpt2 --output_dir '{d}'"),
])
def test_the_fix_for_a_damaged_data_set_writes_into_its_own_folder(tmp_path, recorded, fix):
    d = write_data_dir(tmp_path / "copy of data", np.arange(100), np.arange(50), vocab_size=100)
    meta = json.loads((d / "meta.json").read_text())
    meta.update(train_tokens=120, command=recorded)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        BatchLoader(d, block_size=8, batch_size=2)
    assert str(e.value).endswith("Prepare the data set again with: " + fix.format(d=d))


def test_a_token_id_beyond_the_vocabulary_is_found_before_anything_runs(tmp_path, monkeypatch):
    train = np.arange(100) % 50
    train[60], train[70] = 50, 99  # a damaged file: no id may reach vocab_size, 50 included
    d = write_data_dir(tmp_path / "d", train, np.arange(50), vocab_size=50)
    with pytest.raises(DataError, match=r"train.bin holds token id 50 at token 60 \(the first id of 50 or more\), "
                                        r"but meta.json's vocab_size is 50"):
        BatchLoader(d, block_size=8, batch_size=2)
    fromfile = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda f, dtype, count: fromfile(f, dtype, count=min(count, 16)))
    with pytest.raises(DataError, match=r"token id 50 at token 60 "):  # found in a later chunk too
        BatchLoader(d, block_size=8, batch_size=2)


def test_checking_large_bins_says_why_the_start_waits(tmp_path, monkeypatch, capsys):
    import data
    monkeypatch.setattr(data, "ID_CHECK_NOTE_BYTES", 100)  # train.bin has 200 bytes, val.bin 100
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50), vocab_size=50)
    BatchLoader(d, block_size=8, batch_size=2)
    assert capsys.readouterr().err == f"checking the token ids of {d / 'train.bin'} (0.0 GB)\n"
    BatchLoader(d, block_size=8, batch_size=2, verbose=False)  # train.py's other ranks: one line a run
    assert capsys.readouterr().err == ""
    # and, over minutes of a large file, how far it is: a line every LINE_INTERVAL seconds in a log
    from utils import Progress
    monkeypatch.setattr(Progress, "LINE_INTERVAL", 0)
    fromfile = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda f, dtype, count: fromfile(f, dtype, count=min(count, 25)))
    BatchLoader(d, block_size=8, batch_size=2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"checking the token ids of {d / 'train.bin'} (0.0 GB)"
    assert any(line.startswith("checking train.bin:") and "100%" in line for line in lines[1:]), lines


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("pos, bad", [(60, 50), (99, 77)])  # 99: the last token, only ever a target
def test_a_file_damaged_after_the_check_stops_at_the_batch(tmp_path, prefetch, pos, bad):
    from data import DamagedBatchError
    d = write_data_dir(tmp_path / "d", np.arange(100) % 50, np.arange(50), vocab_size=50)
    with BatchLoader(d, block_size=8, batch_size=2, prefetch=prefetch) as loader:
        loader.get_batch("val", 0)
        times = os.stat(d / "train.bin").st_mtime_ns
        bins = np.memmap(d / "train.bin", dtype=np.uint16, mode="r+")
        bins[pos] = bad
        bins.flush()
        del bins
        # a change that leaves no later time (a clock set back, say) gets past the identity check: the ids
        # themselves are the last guard
        os.utime(d / "train.bin", ns=(times, times))
        with pytest.raises(DamagedBatchError, match=rf"train.bin holds token id {bad} \(it changed after the loader "):
            for i in range(1000):  # some batch covers the position (of 92 window starts, 1 holds token 99)
                loader.get_batch("train", i)
    assert DamagedBatchError.per_process  # under torchrun the process that drew it says so


# -----------------------------------------------------------------------------
# bad input


def test_cli_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    earlier = write_data_dir(tmp_path / "o", np.arange(100), np.arange(50), vocab_size=100)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    r = run_cli("--dataset", "custom", "--input", empty, "--tokenizer", "char", "--output_dir", earlier)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty (0 bytes)" in lines[0]
    assert str(empty) in lines[0] and "Traceback" not in r.stderr
    # the input is read before anything is written: an earlier data set there is left as it was
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_output_dir_that_is_a_file(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("some text\n" * 10)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(DataError, match=r"--output_dir '.*afile' is a file; .* pass the path of a folder"):
        prepare("--dataset", "custom", "--input", src, "--output_dir", afile)
    with pytest.raises(DataError, match=r"--output_dir '.*afile/sub' is inside '.*afile', which is a file"):
        prepare("--dataset", "custom", "--input", src, "--output_dir", afile / "sub")
    assert afile.read_text() == "not a folder"


def test_cli_non_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Hello\nsummer: ".encode() + "été\n".encode("latin-1"))
    r = run_cli("--dataset", "custom", "--input", bad, "--output_dir", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{bad} is not valid UTF-8: byte 0xe9 at byte offset 14" in r.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
@pytest.mark.parametrize("dataset, name", [("custom", "\udcd6\udcd0\udcce\udcc4.txt"),  # 中文.txt in GBK
                                           ("openwebtext", "\udcd6\udcd0\udcce\udcc4.jsonl")])
def test_a_file_named_in_gbk_is_prepared(tmp_path, dataset, name):
    """Names unzipped from a Chinese Windows archive are GBK bytes, which reach Python as lone surrogates;
    meta.json (source, command) keeps them as \\u escapes instead of failing after all the tokenising."""
    src = tmp_path / name
    text = "to be or not to be\n" * 50
    src.write_text(text if dataset == "custom" else "".join(json.dumps({"text": f"{i} {text}"}) + "\n"
                                                             for i in range(20)))
    out = tmp_path / "o"
    r = run_cli("--dataset", dataset, "--input", src, "--tokenizer", "char" if dataset == "custom" else "gpt2",
                "--output_dir", out, "--val_fraction", "0.5")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert str(src) in meta["command"] and name in json.dumps(meta["source"], ensure_ascii=False)
    train, val = bins(out)
    assert meta["train_tokens"] + meta["val_tokens"] == len(train) + len(val) > 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_read_as_a_text_file(tmp_path, shakespeare_text):
    """`--input <(zcat text.gz)` hands over a pipe (/dev/fd/63): custom reads it as the file it streams;
    openwebtext, which names its formats by suffix, says what to do instead."""
    import threading
    text = shakespeare_text[:100_000]
    (tmp_path / "t.txt").write_text(text)
    prepare("--dataset", "custom", "--tokenizer", "char", "--input", tmp_path / "t.txt", "--output_dir", tmp_path / "f")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=(text,))
    writer.start()

    try:
        with deadline(60, "reading the pipe (opened a second time?)"):
            prepare("--dataset", "custom", "--tokenizer", "char", "--input", pipe, "--output_dir", tmp_path / "p")
    finally:
        if writer.is_alive():  # the run failed before it opened the pipe: let the writer finish
            pipe.read_bytes()
        writer.join()
    assert [b.tolist() for b in bins(tmp_path / "p")] == [b.tolist() for b in bins(tmp_path / "f")]
    with pytest.raises(DataError, match=r"is not a file this reads: .*; a pipe is read by --dataset custom only"):
        prepare("--dataset", "openwebtext", "--input", pipe, "--output_dir", tmp_path / "o")


@pytest.mark.skipif(sys.platform != "linux", reason="an unnamed pipe as /dev/fd/N resolving to pipe:[...], as on Linux")
def test_an_unnamed_pipe_needs_an_output_dir_and_a_named_one_names_its_folder(tmp_path, monkeypatch):
    """bash's <(zcat a.gz) is /dev/fd/63, which resolves to pipe:[137773]: a default folder named after it would
    be a new one at every run. A named pipe (mkfifo) keeps its name, and its default folder."""
    import threading
    monkeypatch.chdir(tmp_path)
    r, w = os.pipe()
    try:
        with pytest.raises(DataError, match=r"^--input /dev/fd/\d+ is an unnamed pipe, .*; say where the data set "
                                            r"goes, e.g. --output_dir data/mine$"):
            prepare("--dataset", "custom", "--tokenizer", "char", "--input", f"/dev/fd/{r}")
    finally:
        os.close(r)
        os.close(w)
    assert not (tmp_path / "data").exists()
    os.mkfifo(tmp_path / "corpus")
    writer = threading.Thread(target=(tmp_path / "corpus").write_text, args=("to be or not to be\n" * 100,))
    writer.start()
    try:
        with deadline(60, "reading the named pipe"):
            prepare("--dataset", "custom", "--tokenizer", "char", "--input", "corpus")
    finally:
        if writer.is_alive():
            (tmp_path / "corpus").read_bytes()
        writer.join()
    assert (tmp_path / "data" / "corpus" / "meta.json").is_file()


def test_a_given_tokenizer_file_encodes_new_text(tmp_path, shakespeare_text):
    """--tokenizer_file: new text in the ids of a tokenizer made before (a data set's, an export's, or
    tokenizer.py --train's), so that a model trained on them can be fine-tuned on it."""
    first, more = shakespeare_text[:200_000], shakespeare_text[-100_000:].replace("X", "")
    (tmp_path / "first.txt").write_text(first)
    (tmp_path / "more.txt").write_text(more)
    prepare("--dataset", "custom", "--input", tmp_path / "first.txt", "--tokenizer", "char", "--output_dir",
            tmp_path / "a")
    chars = load_tokenizer(tmp_path / "a" / "tokenizer.json")
    meta = prepare("--dataset", "custom", "--input", tmp_path / "more.txt", "--tokenizer_file",
                   tmp_path / "a" / "tokenizer.json", "--output_dir", tmp_path / "b")
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == chars.vocab_size
    assert load_tokenizer(tmp_path / "b" / "tokenizer.json").to_dict() == chars.to_dict()
    cut = int(len(more) * 0.9)
    assert [b.tolist() for b in bins(tmp_path / "b")] == [chars.encode(more[:cut]), chars.encode(more[cut:])]
    # a character it has no id for is named before any work
    (tmp_path / "x.txt").write_text("ROMEO: \u00e9t\u00e9")
    with pytest.raises(DataError, match=r"x.txt has 1 character\(s\) that the given character-level tokenizer "
                                        r"does not know \('\u00e9'\)"):
        prepare("--dataset", "custom", "--input", tmp_path / "x.txt", "--tokenizer_file",
                tmp_path / "a" / "tokenizer.json", "--output_dir", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # a BPE of tokenizer.py --train, with its end-of-text
    bpe = BPETokenizer().train(first, 300, special_tokens=[EOT])
    bpe.save(tmp_path / "tok.json")
    prepare("--dataset", "custom", "--input", tmp_path / "more.txt", "--tokenizer_file", tmp_path / "tok.json",
            "--output_dir", tmp_path / "c")
    assert [b.tolist() for b in bins(tmp_path / "c")] == [bpe.encode(more[:cut]), bpe.encode(more[cut:])]
    # a BPE with a pattern of its own sees each text whole: a safe cut for GPT-2's pattern may split one of
    # its chunks (here whole lines), so text longer than one work unit is not cut
    lines = BPETokenizer(r"[^\n]*\n|[^\n]+").train(first, 300)
    assert not prepare_data.can_cut(lines) and prepare_data.can_cut(bpe)
    for read_bytes in (1 << 24, 4096):  # nor cut where the file is read in blocks
        prepare_data.READ_BYTES = read_bytes
        try:
            meta = prepare_text(tmp_path / "l", [tmp_path / "more.txt"], dataset="custom", tokenizer=lines,
                                vocab_size=None, val_fraction=0.1, num_proc=1, command="t", unit_bytes=10_000)
        finally:
            prepare_data.READ_BYTES = 1 << 24
        assert [b.tolist() for b in bins(tmp_path / "l")] == [lines.encode(more[:cut]), lines.encode(more[cut:])]
    # a BPE whose own pattern has no place for digits: the file and the byte where they are, not a position
    # in some piece of it, and no --pattern advice, which prepare_data.py has no flag for
    BPETokenizer(r"[^\d\s]+|\s+").train(first, 270).save(tmp_path / "pat.json")
    (tmp_path / "digits.txt").write_text("Hello world. " * 100 + "\u00e9t\u00e9 123 y\n" + "Hello again. " * 40)
    with pytest.raises(DataError) as e:  # in the val piece, after two 2-byte characters
        prepare("--dataset", "custom", "--input", tmp_path / "digits.txt", "--tokenizer_file", tmp_path / "pat.json",
                "--output_dir", tmp_path / "p", "--val_fraction", 0.5)
    assert str(e.value) == (f"{tmp_path / 'digits.txt'} at byte 1,306: the tokenizer's split pattern "
                            f"'[^\\\\d\\\\s]+|\\\\s+' matches nothing at '123 y\\nHello again. H', so its BPE "
                            f"would leave that text out; train a tokenizer whose pattern matches every character "
                            f"(`python tokenizer.py --train` without --pattern uses GPT-2's)")
    assert not (tmp_path / "p").exists()
    for extra, message in ((["--tokenizer", "char"], "leave out --tokenizer and --vocab_size"),
                           (["--vocab_size", "300"], "leave out --tokenizer and --vocab_size")):
        with pytest.raises(DataError, match=message):
            prepare("--dataset", "custom", "--input", tmp_path / "more.txt", "--tokenizer_file", tmp_path / "tok.json",
                    "--output_dir", tmp_path / "d", *extra)
    with pytest.raises(DataError, match=r"--tokenizer_file needs --output_dir: the default folders"):
        prepare("--dataset", "shakespeare", "--tokenizer_file", tmp_path / "tok.json")
    with pytest.raises(DataError, match=r"--tokenizer_file .*first.txt: .*first.txt. is not a tokenizer file"):
        prepare("--dataset", "custom", "--input", tmp_path / "more.txt", "--tokenizer_file", tmp_path / "first.txt",
                "--output_dir", tmp_path / "d")
    with pytest.raises(DataError, match=r"openwebtext is tokenised with GPT-2 only, got --tokenizer_file .*tok.json"):
        prepare("--dataset", "openwebtext", "--input", tmp_path / "more.txt", "--tokenizer_file", tmp_path / "tok.json",
                "--output_dir", tmp_path / "e")


def test_a_split_of_a_single_token_is_refused(tmp_path):
    """One token holds no window (a window is block_size + 1 tokens): no training could use such a data set."""
    (tmp_path / "t.txt").write_text("abcdefghijklmnopqrst")  # 20 characters: 19 train, 1 val at 0.05
    with pytest.raises(DataError, match=r"the val split holds a single token, too few for any training window "
                                        r"\(19 train / 1 val tokens\); give more text or a larger --val_fraction"):
        prepare("--dataset", "custom", "--input", tmp_path / "t.txt", "--tokenizer", "char", "--val_fraction", 0.05,
                "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_utf16_file_is_named_as_such(tmp_path):
    bad = tmp_path / "notepad_unicode.txt"
    bad.write_bytes("床前明月光".encode("utf-16"))  # Notepad's "Unicode": a byte-order mark FF FE first
    r = run_cli("--dataset", "custom", "--input", bad, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "it is UTF-16" in r.stderr and "iconv -f utf-16 -t utf-8" in r.stderr


@pytest.mark.parametrize("dataset", ["custom", "openwebtext"])
def test_a_file_of_nul_bytes_is_no_text(tmp_path, dataset):
    """A NUL is valid UTF-8: UTF-16 without a byte-order mark, a tar archive, a train.bin or a checkpoint given
    as --input were tokenised as they were, into a data set of NULs; a few stray NULs in a text are text."""
    import tarfile
    text = "to be or not to be, that is the question\n" * 40
    (tmp_path / "u16le.txt").write_bytes(text.encode("utf-16-le"))
    (tmp_path / "u16be.txt").write_bytes(text.encode("utf-16-be"))
    np.arange(2, 60, dtype=np.uint16).repeat(30).tofile(tmp_path / "train.bin.txt")  # a char data set's ids
    (tmp_path / "plain.txt").write_text(text)
    with tarfile.open(tmp_path / "texts.txt", "w") as tar:
        tar.add(tmp_path / "plain.txt", "plain.txt")
    torch.save({"model": torch.ones(4)}, tmp_path / "ckpt.txt")
    (tmp_path / "zeros.txt").write_bytes(b"\0" * 4096 + text.encode())
    expect = {"u16le.txt": r"1,640 of its first 3,280 bytes are NULs, every other byte: it looks like UTF-16 without "
                           r"a byte-order mark .*`iconv -f utf-16le -t utf-8 IN > OUT`; or it is a binary file",
              "u16be.txt": r".*, every other byte: .*`iconv -f utf-16be -t utf-8 IN > OUT`",
              "train.bin.txt": r".*, every other byte: .*or it is a binary file, such as a data set's train.bin$",
              "texts.txt": r"it is a tar archive: extract it first \(tar -xf FILE\)$",
              "ckpt.txt": r"it is a PyTorch file \(what torch.save writes, such as a checkpoint\)$",
              "zeros.txt": r"4,096 of its first 5,736 bytes are NULs: it is a binary file \(a data set's .bin, a "
                           r"model, an archive\)$"}
    for name, message in expect.items():
        args = ["--tokenizer", "char"] if dataset == "custom" else ["--num_proc", 1]
        with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))} is not text: {message}"):
            prepare("--dataset", dataset, "--input", tmp_path / name, "--output_dir", tmp_path / "o", *args)
        assert not (tmp_path / "o").exists()
    # not archives: "mustard" at byte 256 (a tar's magic, "ustar", at 257), and GNU tar's own format is one
    (tmp_path / "mustard.txt").write_text("x" * 256 + "mustard and cress\n" * 40)
    with tarfile.open(tmp_path / "gnu.txt", "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(tmp_path / "plain.txt", "plain.txt")
    with pytest.raises(DataError, match=r"gnu.txt is not text: it is a tar archive"):
        prepare("--dataset", dataset, "--input", tmp_path / "gnu.txt", "--output_dir", tmp_path / "o", *args)
    # Chinese in UTF-16 has too few NULs to alternate, and is no UTF-8 at all: told to convert, not "binary"
    (tmp_path / "zh16.txt").write_bytes(("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 40).encode("utf-16-le")
                                        + "ab\n".encode("utf-16-le") * 100)
    with pytest.raises(DataError, match=r"zh16.txt is not valid UTF-8: .*convert the file to UTF-8 first"):
        prepare("--dataset", dataset, "--input", tmp_path / "zh16.txt", "--output_dir", tmp_path / "o", *args)
    stray = "".join(line + ("\0" if i % 7 == 0 else "") for i, line in enumerate(text.splitlines(True)))
    (tmp_path / "stray.txt").write_text(stray)  # 6 NULs in 1,646 bytes
    (tmp_path / "more").mkdir()  # documents enough for both splits
    for i in range(20):
        (tmp_path / "more" / f"{i}.txt").write_text(f"{i}: {stray}")
    (tmp_path / "more" / "mustard.txt").write_bytes((tmp_path / "mustard.txt").read_bytes())
    meta = prepare("--dataset", dataset, "--input", tmp_path / "more", "--output_dir", tmp_path / "o", *args,
                   "--val_fraction", 0.2)
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0


def test_the_lines_between_text_with_nuls_and_a_binary_file():
    from utils import binary_problem
    text = "to be or not to be, that is the question\n" * 250
    lines = text.splitlines(True)
    stray = "".join(line + ("\0" if i % 12 == 0 else "") for i, line in enumerate(lines)).encode()
    assert stray.count(0) == 21 and binary_problem(stray) is None  # 0.2% of the bytes: stray NULs in a text
    assert binary_problem(b"hello\0world\n") is None  # a short document with one
    assert binary_problem(text[:1900].encode() + b"\0" * 100).startswith("100 of its first 2,000 bytes are NULs")
    # Russian in UTF-16 without a byte-order mark: a NUL only after each space and ASCII sign (17% of them)
    ru = ("Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему. "
          "Все смешалось в доме Облонских.\n") * 40
    assert "every other byte: it looks like UTF-16" in binary_problem(ru.encode("utf-16-le"))


def test_a_bad_lead_byte_before_a_cut_gets_the_true_reason(tmp_path):
    src = tmp_path / "l.txt"
    src.write_bytes(b"caf\xe9\n")  # the cut between train and val falls right after 0xe9
    with pytest.raises(DataError) as e:
        prepare("--dataset", "custom", "--input", src, "--tokenizer", "gpt2", "--output_dir", tmp_path / "o",
                "--num_proc", 1)
    assert "byte 0xe9 at byte offset 3" in str(e.value) and "unexpected end of data" not in str(e.value)


def test_non_utf8_line_in_jsonl(tmp_path):
    src = tmp_path / "d.jsonl"
    good = json.dumps({"text": "fine"}).encode() + b"\n"
    src.write_bytes(good * 3 + b'{"text": "caf\xe9"}\n')
    offset = 3 * len(good) + len(b'{"text": "caf')
    with pytest.raises(DataError, match=rf"d.jsonl line 4 is not valid UTF-8: byte 0xe9 at byte offset {offset}"):
        prepare("--dataset", "openwebtext", "--input", src, "--output_dir", tmp_path / "o", "--num_proc", 1)


def test_a_bad_line_past_the_first_unit_is_named_exactly(tmp_path):
    src = tmp_path / "d.jsonl"
    good = json.dumps({"text": "fine"}).encode() + b"\n"  # 17 bytes a line
    src.write_bytes(good * 40 + b'{"text": "caf\xe9"}\n')
    offset = 40 * len(good) + len(b'{"text": "caf')
    with pytest.raises(DataError, match=rf"d.jsonl line 41 is not valid UTF-8: byte 0xe9 at byte offset {offset}"):
        prepare_documents(tmp_path / "o", str(src), hf_name="", val_fraction=0.5, num_proc=1, command="t",
                          unit_bytes=100)


def test_lines_of_spaces_in_json_lines_are_skipped(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n   \t\n" for d in DOCS[:10]))
    meta = prepare_documents(tmp_path / "o", str(src), hf_name="", val_fraction=0.3, num_proc=1, command="t")
    assert meta["train_documents"] + meta["val_documents"] == 10


def test_jsonl_escapes_and_lone_surrogates(tmp_path):
    docs = [f"{i}: quote \" and newline \n inside; <|endoftext|> is ordinary text" for i in range(6)]
    docs += [f"{i}: a lone surrogate \ud800 (only a JSON escape can hold one)" for i in range(6)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))  # ASCII, with \u escapes
    prepare_documents(tmp_path / "o", str(src), hf_name="", val_fraction=0.5, num_proc=1, command="t")
    train, val = expected_doc_ids(docs, 0.5)  # tiktoken's encode_ordinary replaces the surrogate
    got = bins(tmp_path / "o")
    assert got[0].tolist() == train and got[1].tolist() == val


def test_jsonl_with_a_byte_order_mark(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes("\ufeff".encode() + "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode())
    prepare_documents(tmp_path / "o", str(src), hf_name="", val_fraction=0.25, num_proc=1, command="t")
    train, val = expected_doc_ids(DOCS, 0.25)
    got = bins(tmp_path / "o")
    assert got[0].tolist() == train and got[1].tolist() == val



def test_the_cut_counts_characters_of_text_not_byte_order_marks():
    pieces = split_pieces([BOM + b"aaaa", BOM + b"bbbbbb"], 0.25)  # 10 characters: 7 train
    assert [(split, d, eot, off) for split, d, eot, _, off in pieces] == [
        ("train", b"aaaa", True, 3), ("train", b"bbb", False, 3), ("val", b"bbb", False, 6)]
    pieces = split_pieces([BOM + "αβγδεζηθικ".encode()], 0.1)
    assert [d.decode() for _, d, _, _, _ in pieces] == ["αβγδεζηθι", "κ"]


@pytest.mark.parametrize("block", [4, 7, 1 << 24])
def test_utf8_counts_agree_with_python_across_blocks(monkeypatch, block):
    monkeypatch.setattr(prepare_data, "BLOCK", block)
    text = "héllo wörld, 床前明月光 😀 ok" * 3
    data = text.encode()
    assert prepare_data.utf8_length(data) == len(text)
    for k in range(len(text) + 2):
        assert prepare_data.utf8_offset(data, k) == len(text[:k].encode()), k


def test_windows_line_ends_are_kept_as_they_are(tmp_path):
    src = tmp_path / "crlf.txt"
    src.write_bytes(b"first line\r\nsecond line\r\n" * 40)
    meta = prepare("--dataset", "custom", "--input", src, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    tok = load_data_tokenizer(tmp_path / "o")
    assert "\r" in tok.chars and tok.decode(np.concatenate(bins(tmp_path / "o")).tolist()).encode() == src.read_bytes()
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_text_files_with_a_byte_order_mark(tmp_path):
    """Windows Notepad starts UTF-8 files with a byte-order mark: it is left out of the tokens and the
    character vocabulary, while source_sha256 still hashes the files' bytes and error offsets count them."""
    folder = tmp_path / "books"
    folder.mkdir()
    texts = ["床前明月光，疑是地上霜。\n" * 3, "Second book.\n" * 3]
    for name, text in zip(("a.txt", "b.txt"), texts):
        (folder / name).write_bytes(BOM + text.encode())
    (folder / "c.txt").write_bytes(BOM)  # nothing but the mark: no text, so no end-of-text either
    meta = prepare("--dataset", "custom", "--input", folder, "--tokenizer", "char", "--output_dir", tmp_path / "c")
    tok = load_tokenizer(tmp_path / "c" / "tokenizer.json")
    assert "\ufeff" not in tok.chars and tok.decode(np.concatenate(bins(tmp_path / "c")).tolist()) == "".join(texts)
    assert meta["source_sha256"] == hashlib.sha256(b"".join((folder / n).read_bytes() for n in
                                                             ("a.txt", "b.txt", "c.txt"))).hexdigest()
    prepare("--dataset", "custom", "--input", folder, "--output_dir", tmp_path / "g")
    assert gpt2_encoding().decode(np.concatenate(bins(tmp_path / "g")).tolist()) == EOT.join(texts)
    # as documents of openwebtext: each text's ids as if the mark were not there, split by the text's hash
    web = tmp_path / "web"
    web.mkdir()
    for i, d in enumerate(DOCS[:12]):
        (web / f"{i:02d}.txt").write_bytes(BOM + d.encode())
    (web / "99.txt").write_bytes(BOM)
    meta = prepare_documents(tmp_path / "o", str(web), hf_name="", val_fraction=0.25, num_proc=1, command="t")
    train, val = expected_doc_ids(DOCS[:12], 0.25)
    got = bins(tmp_path / "o")
    assert got[0].tolist() == train and got[1].tolist() == val and meta["empty_documents"] == 1
    assert meta["source_sha256"] == hashlib.sha256(b"".join(p.read_bytes() for p in sorted(web.iterdir()))).hexdigest()
    (folder / "b.txt").write_bytes(BOM + b"ab\xffc")  # offsets count the mark's 3 bytes
    with pytest.raises(DataError, match="b.txt is not valid UTF-8: byte 0xff at byte offset 5 .*iconv -f gbk"):
        prepare("--dataset", "custom", "--input", folder, "--tokenizer", "char", "--output_dir", tmp_path / "c2")
    (web / "05.txt").write_bytes(BOM + b"ab\xffc")  # the same in a document of openwebtext
    with pytest.raises(DataError, match="05.txt is not valid UTF-8: byte 0xff at byte offset 5 "):
        prepare_documents(tmp_path / "o2", str(web), hf_name="", val_fraction=0.25, num_proc=1, command="t")
    (folder / "a.txt").write_bytes(BOM)
    (folder / "b.txt").write_bytes(b"")
    with pytest.raises(DataError, match="all 3 files under the input folder are empty \\(nothing but a byte-order"):
        prepare("--dataset", "custom", "--input", folder, "--tokenizer", "char", "--output_dir", tmp_path / "c3")


def test_jsonl_without_text_field(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2 has no \"text\" string"):
        prepare("--dataset", "openwebtext", "--input", src, "--output_dir", tmp_path / "o", "--num_proc", 1)


@pytest.mark.parametrize("value, reason", [("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
                                           ("1" * 5000, "Exceeds the limit")])
def test_a_jsonl_line_nested_too_deeply_or_with_a_huge_number_is_one_line_of_error(tmp_path, value, reason):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "b", "x": ' + value + "}\n")
    with pytest.raises(DataError, match=rf"d.jsonl line 2 is not JSON \({reason}"):
        prepare("--dataset", "openwebtext", "--input", src, "--output_dir", tmp_path / "o", "--num_proc", 1)
    assert not (tmp_path / "o").exists()


def test_a_meta_json_that_python_cannot_read_asks_for_a_new_preparation(tmp_path):
    d = write_data_dir(tmp_path / "d", np.arange(100), np.arange(50), vocab_size=100)
    for broken in ['{"vocab_size": ' + "1" * 5000 + "}", "[" * 100_000, b"\xff\xfe{}"]:
        (d / "meta.json").write_bytes(broken if isinstance(broken, bytes) else broken.encode())
        with pytest.raises(DataError, match=r"cannot read .*meta.json: .* Prepare the data set again with: "):
            BatchLoader(d, block_size=8, batch_size=2)


def test_documents_that_are_all_empty_are_no_text_not_a_val_fraction_to_change(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": ""}\n{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"^the input holds no text to train on \(3 document\(s\), all empty\); check "):
        prepare("--dataset", "openwebtext", "--input", src, "--output_dir", tmp_path / "o", "--num_proc", 1,
                "--val_fraction", 0.3)
    assert not (tmp_path / "o").exists()


def test_compressed_shards_and_broken_links_are_named_not_skipped_in_silence(tmp_path, capsys):
    import gzip
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (docs / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    (docs / "c.txt").symlink_to(tmp_path / "gone.txt")
    (docs / "notes.gz").write_bytes(gzip.compress(b"not a shard"))  # not a kind of file read here: no word
    assert prepare_data.input_files(docs, prepare_data.DOC_SUFFIXES)[0] == [docs / "a.jsonl"]
    assert capsys.readouterr().err.splitlines() == [
        f"note: 1 compressed file(s) under {docs} are left out, such as b.jsonl.gz: decompress them to read them",
        f"note: 1 link(s) under {docs} point to nothing and are left out, such as {docs / 'c.txt'}"]
    (docs / "a.jsonl").unlink()
    with pytest.raises(DataError, match=r"holds no .jsonl/.txt/.parquet files; it holds 1 compressed file\(s\) such "
                                        r"as b.jsonl.gz: decompress them first; 1 .gz file\(s\) \(compressed "
                                        r"or archived: extract them first\); pass a file"):
        prepare_data.input_files(docs, prepare_data.DOC_SUFFIXES)


def test_a_file_reached_twice_through_links_is_read_once(tmp_path, capsys, monkeypatch):
    """latest.txt -> a.txt beside a.txt, a hard link, a linked folder: read twice, a text stood in both splits."""
    books = tmp_path / "books"
    (books / "sub").mkdir(parents=True)
    (books / "a.txt").write_text("the first book, whose text must not be read twice\n" * 40)
    (books / "b.txt").write_text("the second book, a text of its own\n" * 40)
    (books / "z_latest.txt").symlink_to("a.txt")
    os.link(books / "b.txt", books / "sub" / "hard.txt")
    (tmp_path / "elsewhere.txt").write_text("a book linked in from elsewhere\n" * 40)
    (books / "sub" / "linked.txt").symlink_to(tmp_path / "elsewhere.txt")
    files, size = prepare_data.input_files(books, (".txt",))
    assert files == [books / "a.txt", books / "b.txt", books / "sub" / "linked.txt"]
    assert size == sum(f.stat().st_size for f in files)
    assert capsys.readouterr().err == (f"note: 2 file(s) under {books} are the same file as one read before and are "
                                       f"read once, such as {books / 'sub' / 'hard.txt'} (the same as "
                                       f"{books / 'b.txt'})\n")
    meta = prepare("--dataset", "custom", "--input", books, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    assert meta["source"] == f"3 .txt files under {books}"
    # inode 0, as Windows reports for network and cloud drives: no identity to go by, every path is read
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, *a, **k: os.stat_result(
        (lambda st: (st.st_mode, 0, *st[2:]))(real_stat(self, *a, **k))))
    assert len(prepare_data.input_files(books, (".txt",))[0]) == 5


@pytest.mark.parametrize("name, head, message", [
    ("a.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", r"it is a PDF: extract its text first, e.g. `pdftotext"),
    ("a.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00", r"it is an old Microsoft Office file \(.doc, .xls, .ppt\)"),
    ("a.epub", None, r"it is an EPUB e-book: convert it to text first"),
    ("a.docx", None, r"it is a Microsoft Office file \(.docx, .xlsx, .pptx\): save it as plain text"),
])
def test_documents_in_a_format_are_named_not_taken_for_gbk_text(tmp_path, name, head, message):
    """A PDF begins in ASCII and goes on in bytes that are no UTF-8: it was taken for GBK text."""
    import zipfile
    path = tmp_path / name
    if head is not None:
        path.write_bytes(head + bytes(range(128, 256)) * 8)
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            if name.endswith(".epub"):  # stored first and uncompressed, as the format asks
                z.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip", zipfile.ZIP_STORED)
            z.writestr("[Content_Types].xml", "<Types/>" * 20)
            z.writestr("word/document.xml", "<w:document/>" * 20)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} is not text: {message}"):
        prepare("--dataset", "custom", "--input", path, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    folder = tmp_path / "folder"
    folder.mkdir()
    path.rename(folder / name)
    with pytest.raises(DataError, match=r"holds no .txt files; it holds 1 \.\w+ file\(s\) \(documents: extract their "
                                        r"text into .txt files first\)"):
        prepare("--dataset", "custom", "--input", folder, "--tokenizer", "char", "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()

def test_a_folder_is_listed_with_a_count_and_the_size_of_its_files(tmp_path, capsys, monkeypatch):
    """OpenWebText extracted is millions of .txt files, minutes of listing: the count of files read so far shows
    (a line at a time where stderr is no terminal); their size, the bar's total when tokenising, comes along."""
    docs = tmp_path / "docs"
    for i in range(3):
        (docs / f"d{i}").mkdir(parents=True)
        for j in range(4):
            (docs / f"d{i}" / f"{j}.txt").write_text("x" * (10 * i + j + 1))
    (docs / "d0" / "loop.txt").symlink_to(docs / "d0" / "loop.txt")  # a link to itself is a broken one
    (docs / "d2" / "into.txt").symlink_to(docs / "d2" / "0.txt" / "x")  # so is a link into a file
    (docs / "d1" / "folder.txt").mkdir()  # a folder named like a file is walked into, not read
    os.mkfifo(docs / "d1" / "pipe.txt")  # a pipe in the folder is no document: reading it would wait forever
    monkeypatch.setattr(prepare_data.Progress, "LINE_INTERVAL", 0.0)
    files, size = prepare_data.input_files(docs, prepare_data.DOC_SUFFIXES)
    assert files == sorted(docs / f"d{i}" / f"{j}.txt" for i in range(3) for j in range(4))
    assert size == sum(f.stat().st_size for f in files) == sum(10 * i + j + 1 for i in range(3) for j in range(4))
    err = capsys.readouterr().err
    assert re.search(rf"^listing {re.escape(str(docs))}: 15 files ", err, re.M), err
    assert re.search(rf"^note: 2 link\(s\) under {re.escape(str(docs))} point to nothing and are left out, such as "
                     rf".*/(loop|into).txt$", err, re.M), err
    assert prepare_data.input_files(docs / "d2" / "3.txt", (".txt",)) == ([docs / "d2" / "3.txt"], 24)


def test_a_folders_json_files_are_named_when_left_out(tmp_path, capsys):
    """C4's shards, decompressed, are JSON Lines named .json; a Hugging Face download's metadata is .json too."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "c4-train.00000-of-01024.json").write_text('{"text": "x"}\n')
    for name in ("dataset_info.json", "state.json", "meta.json", "tokenizer.json"):  # no documents: no word of them
        (docs / name).write_text("{}")
    with pytest.raises(DataError, match=r"holds no .jsonl/.txt/.parquet files; it holds 1 .json file\(s\) such as "
                                        r"c4-train.00000-of-01024.json: a folder's .json files are not read .*rename "
                                        r"those that hold JSON Lines documents to .jsonl; pass a file"):
        prepare_data.input_files(docs, prepare_data.DOC_SUFFIXES)
    (docs / "a.jsonl").write_text('{"text": "x"}\n')
    assert prepare_data.input_files(docs, prepare_data.DOC_SUFFIXES)[0] == [docs / "a.jsonl"]
    assert capsys.readouterr().err == (f"note: 1 .json file(s) under {docs} are left out, such as "
                                       f"c4-train.00000-of-01024.json: a folder's .json files are not read (Hugging "
                                       f"Face downloads keep their metadata in them); rename those that hold JSON "
                                       f"Lines documents to .jsonl\n")
    (docs / "c4-train.00001-of-01024.json.gz").write_bytes(b"\x1f\x8b")  # as C4 comes: decompressed, still .json
    assert prepare_data.input_files(docs, prepare_data.DOC_SUFFIXES)[0] == [docs / "a.jsonl"]
    assert "such as c4-train.00001-of-01024.json.gz: decompress them and name them .jsonl to read them" in \
        capsys.readouterr().err
    with pytest.raises(DataError) as e:  # --dataset custom reads .txt alone: no shard advice
        prepare_data.input_files(docs, (".txt",))
    assert "compressed file(s) such as" not in str(e.value) and ".json file(s) such as" not in str(e.value)
    for i in range(3):
        (tmp_path / "owt" / f"urlsf_subset0{i}-1_data.xz").parent.mkdir(exist_ok=True)
        (tmp_path / "owt" / f"urlsf_subset0{i}-1_data.xz").write_bytes(b"\xfd7zXZ")
    with pytest.raises(DataError, match=r"holds no .jsonl/.txt/.parquet files; it holds 3 .xz file\(s\) \(compressed "
                                        r"or archived: extract them first\); pass a file"):
        prepare_data.input_files(tmp_path / "owt", prepare_data.DOC_SUFFIXES)


@pytest.mark.parametrize("dataset, name", [("custom", "a.txt"), ("openwebtext", "a.txt"), ("openwebtext", "a.jsonl")])
def test_an_input_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, dataset, name):
    """No permission (or a disk error) while reading an input: named as a read, not a traceback, and not as
    a failure to write the data set."""
    import builtins
    src = tmp_path / "in"
    src.mkdir()
    (src / name).write_text("to be or not to be\n" if name.endswith(".txt") else json.dumps({"text": "to be"}) + "\n")

    def refuse(path):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))

    real_read, real_open = Path.read_bytes, builtins.open
    monkeypatch.setattr(Path, "read_bytes", lambda self: refuse(self) or real_read(self))
    monkeypatch.setattr(prepare_data, "open", lambda f, *a, **k: refuse(f) or real_open(f, *a, **k), raising=False)
    with pytest.raises(DataError, match=rf"^cannot read {re.escape(str(src / name))}: Permission denied; make it "
                                        r"readable, or move it out of --input$"):
        prepare("--dataset", dataset, "--input", src, "--tokenizer", "char" if dataset == "custom" else "gpt2",
                "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_parquet_file_without_pyarrow_is_named_before_any_tokenising(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (docs / "z.parquet").write_bytes(b"PAR1")  # never opened
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(prepare_data, "encode_units", lambda *a, **k: pytest.fail("tokenising began"))
    with pytest.raises(DataError, match=r"reading .*z.parquet needs pyarrow: pip install pyarrow"):
        prepare("--dataset", "openwebtext", "--input", docs, "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_which_document_files_are_read(tmp_path, monkeypatch):
    """In a folder .jsonl, .txt and .parquet, through linked folders too; a .json only when named itself
    (in a folder it is more often another data set's meta.json, or a download's dataset_info.json)."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    lines = lambda texts: "".join(json.dumps({"text": t}) + "\n" for t in texts)  # noqa: E731
    (docs / "a.jsonl").write_text(lines(DOCS[:5]))
    (docs / "sub" / "b.jsonl").write_text(lines(DOCS[5:10]))
    (tmp_path / "elsewhere" / "c.jsonl").write_text(lines(DOCS[10:15]))
    (docs / "linked").symlink_to(tmp_path / "elsewhere")
    (docs / "loop").symlink_to(docs)  # read once all the same
    (docs / "dataset_info.json").write_text('{\n  "description": "not JSON Lines"\n}\n')
    for out in ("owt_a", "owt_b"):
        meta = prepare("--dataset", "openwebtext", "--input", docs, "--output_dir", docs / out, "--num_proc", 1,
                       "--val_fraction", 0.3)
    assert meta["source"] == f"3 files under {docs}"  # not owt_a's meta.json, nor dataset_info.json
    assert meta["train_documents"] + meta["val_documents"] == 15
    (tmp_path / "d.json").write_text(lines(DOCS[:15]))  # a .json named itself is JSON Lines
    meta = prepare("--dataset", "openwebtext", "--input", tmp_path / "d.json", "--output_dir", tmp_path / "o1",
                   "--num_proc", 1, "--val_fraction", 0.3)
    assert meta["train_documents"] + meta["val_documents"] == 15
    real_walk = os.walk

    def walk(top, onerror=None, followlinks=False):  # a subfolder this user may not read (root reads all)
        onerror(PermissionError(13, "Permission denied", str(docs / "locked")))
        yield from real_walk(top, onerror=onerror, followlinks=followlinks)
    with monkeypatch.context() as m:
        m.setattr(prepare_data.os, "walk", walk)
        with pytest.raises(DataError, match=r"cannot read the folder '.*docs/locked' under --input \(Permission denied"):
            prepare("--dataset", "openwebtext", "--input", docs, "--output_dir", tmp_path / "o3", "--num_proc", 1)
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b\x08")
    with pytest.raises(DataError, match=r"d.jsonl.gz' is not a file this reads: expected .jsonl/.txt/.parquet/.json "
                                        r"\(decompress it first\)"):
        prepare("--dataset", "openwebtext", "--input", tmp_path / "d.jsonl.gz", "--output_dir", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def prepared_once(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A char data set in tmp_path/out, and the bytes of each of its files."""
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question\n" * 50)
    out = tmp_path / "out"
    prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir", out)
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_failed_write_keeps_the_old_data_set_whole(tmp_path, monkeypatch):
    out, before = prepared_once(tmp_path)
    real = prepare_data.encode_units

    def disk_full(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            yield result
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_data, "encode_units", disk_full)
    (tmp_path / "b.txt").write_text("something else entirely\n" * 50)
    for target in (out, tmp_path / "new" / "out"):
        with pytest.raises(DataError) as e:
            prepare("--dataset", "custom", "--input", tmp_path / "b.txt", "--tokenizer", "char", "--output_dir", target)
        assert str(e.value) == f"cannot write the data set into {target}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # meta.json and the .bin files as they were
    assert not (tmp_path / "new" / "out").exists()


@pytest.mark.parametrize("full", [".val.bin", ".train.bin", ".tokenizer.json", ".meta.json"])
def test_a_full_disk_at_the_last_flush_keeps_the_old_data_set(tmp_path, monkeypatch, full):
    out, before = prepared_once(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):  # this file's data cannot reach the disk
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(full):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(prepare_data.os, "fsync", fsync)
    with pytest.raises(DataError, match="No space left on device"):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("fail", ["val.bin", "train.bin", "tokenizer.json", "meta.json"])
def test_a_rename_that_fails_never_leaves_a_meta_json_that_lies(tmp_path, monkeypatch, fail):
    out, before = prepared_once(tmp_path)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == fail:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "b.txt").write_text("quite different text this time\n" * 70)
    with pytest.raises(DataError, match="Input/output error"):
        prepare("--dataset", "custom", "--input", tmp_path / "b.txt", "--tokenizer", "char", "--output_dir", out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert not [name for name in after if name.startswith(".")]  # no temporary file is left
    if fail == "val.bin":  # the first rename: nothing was replaced, so the old data set is whole again
        assert after == before
    else:  # some of the new files are in: the folder must not claim to hold a complete data set
        assert "meta.json" not in after
        with pytest.raises(DataError, match="no meta.json"):
            BatchLoader(out, block_size=8, batch_size=2)


def test_a_failed_run_takes_away_every_folder_it_made(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "encode_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    with pytest.raises(KeyboardInterrupt):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char",
                "--output_dir", tmp_path / "nest" / "x" / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    monkeypatch.undo()  # later, with the .bin files already in place: a full disk for tokenizer.json
    monkeypatch.setattr(prepare_data.Tokenizer, "to_json", lambda self: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(DataError, match="full"):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char",
                "--output_dir", tmp_path / "nest" / "x" / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failed_run_leaves_a_data_set_written_beside_it_meanwhile(tmp_path, monkeypatch):
    """Two runs into a fresh ./data: the one that fails takes away its own folder, not ./data with the
    other run's finished data set in it."""
    (tmp_path / "a.txt").write_text("abc\n" * 50)

    def other_run_then_fail(*args, **kwargs):
        monkeypatch.undo()
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char",
                "--output_dir", tmp_path / "data" / "a")
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "encode_units", other_run_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char",
                "--output_dir", tmp_path / "data" / "b" / "c")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a"]
    assert (tmp_path / "data" / "a" / "meta.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="counts the workers' checks through forked copies of this module")
def test_a_whole_split_in_a_worker_stops_when_the_run_stops(monkeypatch, shakespeare_text):
    """A BPE with a split pattern of its own gets each split whole, one unit each: Ctrl-C (here the units' source
    raising KeyboardInterrupt, as Ctrl-C in the parent does) must not wait for the workers to encode them to the
    end. Without the stop, each worker makes every one of its checks."""
    import multiprocessing
    import tokenizer as tokenizer_module
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a: "fork")
    ctx = multiprocessing.get_context("fork")
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: ctx)
    monkeypatch.setattr(tokenizer_module, "CHECK_EVERY_CHUNKS", 1000)  # the forked workers inherit both
    checks = ctx.Value("i", 0)
    real_check = prepare_data._check_stop

    def counted_check():
        with checks.get_lock():
            checks.value += 1
        real_check()

    monkeypatch.setattr(prepare_data, "_check_stop", counted_check)
    tok = BPETokenizer(r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+").train(shakespeare_text[:20_000], 300)
    text = shakespeare_text * 3
    per_unit = -(-len(tok._split(text)) // 1000)

    def units():
        yield ("docs", [text]), 0
        yield ("docs", [text + "!"]), 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(prepare_data.encode_units(tok, units(), num_proc=2, dtype=np.dtype(np.uint16), val_fraction=0.5))
    assert per_unit > 500 and checks.value < per_unit, (checks.value, per_unit)


def test_workers_leave_ctrl_c_and_sigterm_to_the_parent():
    import multiprocessing
    import signal as sig
    ctx = multiprocessing.get_context()
    pool = ctx.Pool(1, prepare_data._init_worker, (prepare_data.CharTokenizer("ab"), "uint16", 0.1))
    try:
        handlers = pool.apply(_signal_handlers)
    finally:
        # not terminate() (what `with Pool` does): it ends workers by SIGTERM, which this worker ignores, and
        # it may hold the task queue's lock that the worker needs to see that it should end: a hang
        pool.close()
        pool.join()
    assert handlers == [sig.SIG_IGN, sig.SIG_IGN, sig.SIG_IGN]


def _signal_handlers():
    import signal as sig
    return [sig.getsignal(sig.SIGINT), sig.getsignal(sig.SIGTERM), sig.getsignal(sig.SIGHUP)]


def test_missing_folders():
    from utils import missing_folders
    root = Path("/tmp") / f"mf-{os.getpid()}"
    try:
        (root / "data" / "x").mkdir(parents=True)
        assert missing_folders(root / "new" / "sub") == [root / "new" / "sub", root / "new"]
        assert missing_folders(root / "missing" / ".." / "data" / "x") == [root / "missing"]
        assert missing_folders(root / "missing" / ".." / "data" / "y") == [root / "data" / "y", root / "missing"]
        assert missing_folders(root / "data") == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_failed_run_keeps_an_existing_folder_named_through_a_missing_one(tmp_path, monkeypatch):
    """'missing/../data/x' names the existing data/x: it is not a folder this run made (but 'missing' is)."""
    monkeypatch.setattr(prepare_data, "encode_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "keep.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char",
                "--output_dir", tmp_path / "missing" / ".." / "data" / "x")
    assert (tmp_path / "data" / "x" / "keep.txt").read_text() == "mine" and not (tmp_path / "missing").exists()


def test_what_a_killed_run_left_is_removed_by_the_next(tmp_path):
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    out = tmp_path / "o"
    out.mkdir()
    left = [".train.bin.k2j4h1x9.tmp", ".val.bin.x.tmp", ".tokenizer.json.y.tmp", ".meta.json.z.tmp",
            ".meta.json.replaced"]
    mine = [".notes.tmp", "train.bin.tmp", "keep.txt"]  # not this program's temporary names
    for name in left + mine:
        (out / name).write_text("x")
    prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir", out)
    names = {p.name for p in out.iterdir()}
    assert not names & set(left) and set(mine) <= names and "meta.json" in names


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path):
    """Two prepare_data.py into one folder at once: the second stops in one line and touches nothing."""
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    out = tmp_path / "o"
    out.mkdir()
    first_runs = [".train.bin.live.tmp", ".meta.json.replaced"]  # being written; its old meta.json stepped aside
    for name in first_runs:
        (out / name).write_text("the first run's")
    with prepare_data.folder_lock(out) as held:  # the first run
        assert held
        with pytest.raises(DataError, match="another prepare_data.py is writing into"):
            prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir", out)
    assert sorted(p.name for p in out.iterdir()) == sorted(first_runs)
    with prepare_data.folder_lock(out) as held:  # released: the lock is taken again
        assert held


def test_the_folder_is_held_from_before_the_input_is_read(tmp_path, shakespeare_path, monkeypatch):
    """Reading a large text or training a BPE takes minutes before the first token is written; a second run
    into the folder meanwhile is refused then, not let through only to have its data set replaced."""
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    out = tmp_path / "new" / "o"
    seen, input_files = [], prepare_data.input_files

    def reading(*args, **kwargs):
        with prepare_data.folder_lock(out) as held:  # what a second run would find
            seen.append(held)
        return input_files(*args, **kwargs)
    monkeypatch.setattr(prepare_data, "input_files", reading)
    prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir", out)
    assert seen == [False] and (out / "meta.json").is_file()
    monkeypatch.setattr(prepare_data, "input_files", input_files)
    # a run that fails while reading takes away the folders it made
    with pytest.raises(DataError, match="missing.txt"):
        prepare("--dataset", "custom", "--input", tmp_path / "missing.txt", "--tokenizer", "char", "--output_dir",
                tmp_path / "new2" / "o")
    assert not (tmp_path / "new2").exists()
    # but keeps a download of tinyshakespeare it made there, when the tokenising fails after it
    import io
    monkeypatch.delenv("SHAKESPEARE", raising=False)
    monkeypatch.setattr(prepare_data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(
        shakespeare_path.read_bytes()))
    monkeypatch.setattr(prepare_data, "_encode_into", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare("--dataset", "shakespeare", "--tokenizer", "char", "--output_dir", tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["input.txt"]


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="the lock's holder is found in Linux's /proc/locks")
def test_the_refusal_names_the_process_that_holds_the_folder(tmp_path):
    """Which run holds the folder (a forgotten one in another terminal, say) is what the user needs to know."""
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    (tmp_path / "unlocked").mkdir()
    assert prepare_data.lock_holder(tmp_path / "unlocked") == ""
    with prepare_data.folder_lock(tmp_path) as held:  # this process's own lock names no other process
        assert held and prepare_data.lock_holder(tmp_path) == ""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from utils import "
                               "folder_lock\nwith folder_lock(Path(sys.argv[1])) as held:\n print(held, flush=True); "
                               "sys.stdin.read()", str(tmp_path)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "True\n"
        assert prepare_data.lock_holder(tmp_path / "unlocked") == ""  # another folder's lock is not this one's
        with pytest.raises(DataError, match=rf"^another prepare_data.py \(pid {holder.pid}\) is writing into "):
            prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir",
                    tmp_path)
    finally:
        holder.communicate("", timeout=60)
    assert prepare_data.lock_holder(tmp_path) == ""  # gone with its process


@pytest.mark.parametrize("made_anew", [False, True])
def test_a_lock_on_a_folder_removed_meanwhile_is_no_lock(tmp_path, monkeypatch, made_anew):
    """A run that opened the folder just as a failing run removed it locks a folder that is gone."""
    import fcntl
    out = tmp_path / "o"
    out.mkdir()
    flock = fcntl.flock

    def removed_meanwhile(fd, op):
        shutil.rmtree(out)
        if made_anew:  # by a third run
            out.mkdir()
        flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", removed_meanwhile)
    with prepare_data.folder_lock(out) as held:
        assert not held
    monkeypatch.undo()
    out.mkdir(exist_ok=True)
    with prepare_data.folder_lock(out) as held:
        assert held


def test_without_flock_the_lock_says_it_guards_nothing(tmp_path, monkeypatch, capsys):
    """Windows has no fcntl: two runs in one folder cannot be kept apart there, and the user is told so."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    with prepare_data.folder_lock(tmp_path) as held:
        assert held
    assert capsys.readouterr().err == (f"note: {tmp_path} cannot be locked on this system (no flock): make sure "
                                       f"that no other run writes into it at the same time\n")


def test_a_stdout_without_a_character_escapes_it_instead_of_failing(tmp_path):
    """A redirected stdout on Chinese Windows is GBK, which has no 'ñ': the data set's line must still come."""
    src = tmp_path / "España_ñ.txt"
    src.write_text("abc\n" * 50)
    r = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--dataset", "custom", "--input", str(src),
                        "--tokenizer", "char", "--output_dir", str(tmp_path / "o_ñ")], cwd=ROOT, capture_output=True,
                       timeout=120, env={**os.environ, "PYTHONIOENCODING": "gbk"})
    assert r.returncode == 0, r.stderr.decode("gbk", "replace")
    assert r.stdout.decode("gbk").startswith(f"wrote {tmp_path}/o_\\xf1: 180 train and 20 val tokens")


def test_a_failed_run_removes_its_folder_before_it_releases_the_lock(tmp_path, monkeypatch):
    """Otherwise a run that starts in between could begin writing into the folder about to be removed."""
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    out = tmp_path / "new"
    removed, rmtree = [], shutil.rmtree

    def remove(path, **kwargs):
        with prepare_data.folder_lock(path) as held:
            removed.append((path, held))
        rmtree(path, **kwargs)
    monkeypatch.setattr(prepare_data.shutil, "rmtree", remove)
    monkeypatch.setattr(prepare_data, "_encode_into", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char", "--output_dir", out)
    assert removed == [(out, False)] and not out.exists()


def test_progress_lines_where_stderr_is_no_terminal(tmp_path, monkeypatch, capsys):
    """A log file or CI gets plain progress lines, not a silent run nor '\\r' redrawing."""
    monkeypatch.setattr(prepare_data.Progress, "LINE_INTERVAL", 0.0)
    (tmp_path / "a.txt").write_text("abc\n" * 5000)
    prepare_text(tmp_path / "o", [tmp_path / "a.txt"], dataset="custom", tokenizer="char", vocab_size=None,
                 val_fraction=0.1, num_proc=1, command="t", unit_bytes=4096)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenising (char)")]
    assert len(lines) >= 3 and "\r" not in err and "" not in err.splitlines()
    capsys.readouterr()
    monkeypatch.undo()  # a short run prints no bar line at all
    prepare_text(tmp_path / "o2", [tmp_path / "a.txt"], dataset="custom", tokenizer="char", vocab_size=None,
                 val_fraction=0.1, num_proc=1, command="t", unit_bytes=4096)
    assert "tokenising" not in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data.os, "access", lambda path, mode: Path(path) != tmp_path)
    monkeypatch.setattr(prepare_data, "build_tokenizer", lambda *a: pytest.fail("the tokenizer was built"))
    (tmp_path / "a.txt").write_text("abc\n" * 50)
    with pytest.raises(DataError, match=f"--output_dir '{tmp_path / 'x' / 'y'}' would be made inside "
                                         f"'{tmp_path}', which is not writable"):
        prepare("--dataset", "custom", "--input", tmp_path / "a.txt", "--tokenizer", "char",
                "--output_dir", tmp_path / "x" / "y")


def write_parquet(path: Path, texts) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), path)


def test_parquet_with_dictionary_encoded_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array(DOCS).dictionary_encode()}), tmp_path / "d.parquet")
    meta = prepare("--dataset", "openwebtext", "--input", tmp_path / "d.parquet", "--output_dir", tmp_path / "o",
                   "--num_proc", 1, "--val_fraction", 0.25)
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 5\n"),
     r"cannot read .*d.parquet as Parquet: "),
    (lambda path: write_parquet(path, [1, 2]), r"d.parquet: its \"text\" column holds int64, not strings"),
])
def test_parquet_that_cannot_be_read_as_text(tmp_path, write, message):
    write(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=message):
        prepare("--dataset", "openwebtext", "--input", tmp_path / "d.parquet", "--output_dir", tmp_path / "o",
                "--num_proc", 1)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "custom", "--tokenizer", "char"], "--dataset custom needs --input"),
    (["--dataset", "shakespeare", "--tokenizer", "char", "--vocab_size", "100"], "--vocab_size applies to"),
    (["--dataset", "openwebtext", "--tokenizer", "char"], "openwebtext is tokenised with GPT-2 only"),
    (["--dataset", "shakespeare", "--val_fraction", "0"], "--val_fraction must be between 0 and 1"),
    (["--dataset", "shakespeare", "--val_fraction", "1"], "--val_fraction must be between 0 and 1"),
    (["--dataset", "shakespeare", "--val_fraction", "-0.1"], "--val_fraction must be between 0 and 1"),
    (["--dataset", "shakespeare", "--val_fraction", "nan"], "--val_fraction must be between 0 and 1"),
    (["--dataset", "custom", "--input", "no/such/file.txt"], "does not exist"),
    (["--dataset", "custom", "--input", "a.txt", "--hf_dataset", "x"], "it does nothing with --dataset custom: leave"),
    (["--dataset", "openwebtext", "--input", "docs/", "--hf_dataset", "x"], "it does nothing with --input: leave it"),
    (["--dataset", "shakespeare", "--num_proc", "0"], "--num_proc must be between 1 and "),
    (["--dataset", "shakespeare", "--num_proc", "99999999999999999999"], "got 99999999999999999999; the default"),
])
def test_bad_arguments(args, message):
    with pytest.raises(DataError, match=message):
        prepare(*args)


def test_split_shorter_than_block_size(tmp_path):
    d = write_data_dir(tmp_path / "d", np.arange(1000) % 50, np.arange(40) % 50, vocab_size=50)
    with pytest.raises(DataError, match=r"the val split of .* has 40 tokens, but block_size=64 needs at least "
                                        r"block_size \+ 1 = 65"):
        BatchLoader(d, block_size=64, batch_size=2)
    BatchLoader(d, block_size=39, batch_size=2).get_batch("val")  # 40 tokens hold one window of 39 + 1
    with pytest.raises(DataError, match=r"has 40 tokens, but block_size=40 needs at least block_size \+ 1 = 41 per split. "
                                        r"Use --block_size=39 or less"):
        BatchLoader(d, block_size=40, batch_size=2)
    one = write_data_dir(tmp_path / "one", np.arange(1000) % 50, np.arange(1) % 50, vocab_size=50)
    with pytest.raises(DataError, match=r"has 1 tokens, .* per split. Prepare more text"):
        BatchLoader(one, block_size=8, batch_size=2)  # no block_size fits: none is suggested
    # both splits too short: the block_size suggested fits both, and a larger --val_fraction is no advice for train
    short = write_data_dir(tmp_path / "short", np.arange(300) % 50, np.arange(500) % 50, vocab_size=50)
    with pytest.raises(DataError, match=r"the train split of .* has 300 tokens, .* Use --block_size=299 or less, or "
                                        r"prepare more text\.$"):
        BatchLoader(short, block_size=1000, batch_size=2)


def test_missing_data_dir_prints_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_meta("data/shakespeare_char")
    assert str(e.value).endswith("Prepare it with: python prepare_data.py --dataset shakespeare --tokenizer char")
    with pytest.raises(DataError) as e:
        BatchLoader("./data/shakespeare", block_size=8, batch_size=2)
    assert str(e.value).endswith("Prepare it with: python prepare_data.py --dataset shakespeare")
    (tmp_path / "elsewhere" / "openwebtext").mkdir(parents=True)  # exists, but was never completed
    with pytest.raises(DataError, match="has no meta.json") as e:
        load_meta(tmp_path / "elsewhere" / "openwebtext")
    assert str(e.value).endswith(f"--dataset openwebtext --output_dir {tmp_path / 'elsewhere' / 'openwebtext'}")
    (tmp_path / "我的 文本.txt").write_text("raw text")  # the text itself, instead of the folder prepared from it
    with pytest.raises(DataError) as e:
        load_meta("我的 文本.txt")
    assert str(e.value) == ("--data_dir '我的 文本.txt' is a file, not a prepared data set (a folder). If it is your "
                            "text, prepare it with: python prepare_data.py --dataset custom --input '我的 文本.txt' "
                            "--tokenizer gpt2 --output_dir 'data/我的 文本', then give --data_dir='data/我的 文本'")
    (tmp_path / "data" / "verse").mkdir(parents=True)
    (tmp_path / "data" / "verse" / "meta.json").write_text("{}")
    for name in ("train.bin", "input.txt"):  # input.txt: where --dataset shakespeare keeps its download
        (tmp_path / "data" / "verse" / name).write_bytes(b"")
        with pytest.raises(DataError, match=r"is a file of a data set; give the folder that holds it: "
                                            r"--data_dir=data/verse$"):
            load_meta(f"data/verse/{name}")
    (tmp_path / "data" / "shakespeare_char").mkdir()
    (tmp_path / "data" / "shakespeare_char" / "meta.json").write_text("{}")
    with pytest.raises(DataError, match=r"^data directory 'data/shakespear_char' does not exist; did you mean "
                                        r"--data_dir=data/shakespeare_char, a prepared data set\?$"):
        load_meta("data/shakespear_char")  # a typo beside it: not told to prepare a custom GPT-2 data set
    (tmp_path / "data" / "shakespeare_char2").mkdir()  # there, unprepared: not said to be missing
    with pytest.raises(DataError, match=r"^data directory 'data/shakespeare_char2' has no meta.json"):
        load_meta("data/shakespeare_char2")
    (tmp_path / "data" / "shakespeare_chr").mkdir()  # a folder is no suggestion before it is prepared
    with pytest.raises(DataError, match=r"did you mean --data_dir=data/shakespeare_char, a prepared"):
        load_meta("data/shakespeare_chrr")  # nearer to the unprepared shakespeare_chr
    for name, kind in (("shakespeare", ""), ("shakespeare_bpe", " --tokenizer bpe")):  # other data sets, not typos
        with pytest.raises(DataError, match=rf"^data directory 'data/{name}' does not exist. Prepare it with: python "
                                            rf"prepare_data.py --dataset shakespeare{kind}$"):
            load_meta(f"data/{name}")
    with pytest.raises(DataError, match=r"^data directory 'data/openwebtext' does not exist. Prepare it with: python "
                                        r"prepare_data.py --dataset openwebtext$"):
        load_meta("data/openwebtext")  # nothing like it
    assert prepare_command("runs/mine") == ("python prepare_data.py --dataset custom --input YOUR_TEXT.txt "
                                            "--tokenizer gpt2 --output_dir runs/mine")
    # a preparation killed before meta.json leaves its tokenizer: the command makes that data set again
    from tokenizer import BPETokenizer
    bpe = json.dumps(BPETokenizer().train("hello world, hello there " * 40, 262, special_tokens=["<|endoftext|>"])
                     .to_dict())
    for kind, text in (("char", '{"kind": "char", "chars": ["a"]}'), ("bpe --vocab_size 262", bpe),
                       ("gpt2", '{"kind": "bpe"}'), ("gpt2", '["not", "an", "object"]'), ("gpt2", "{broken")):
        (tmp_path / "runs" / "mine").mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "mine" / "tokenizer.json").write_text(text)
        with pytest.raises(DataError, match=rf"--tokenizer {kind} --output_dir runs/mine$"):
            load_meta("runs/mine")


def test_check_vocab():
    check_vocab(65, 65)
    check_vocab(50257, 50304)
    with pytest.raises(DataError, match="vocabulary has 50257 tokens but the model's vocab_size is 65"):
        check_vocab(50257, 65)
    with pytest.raises(DataError, match="vocabulary has 66 tokens but the model's vocab_size is 65"):
        check_vocab(66, 65)


def test_load_data_tokenizer_checks_vocab(shakespeare_text, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text[:5000])
    out = tmp_path / "o"
    meta = prepare("--dataset", "custom", "--input", src, "--tokenizer", "char", "--output_dir", out)
    assert load_data_tokenizer(out).vocab_size == meta["vocab_size"]
    for change in (1, -1):  # a tokenizer with fewer ids than meta.json says, or more
        (out / "meta.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + change}))
        with pytest.raises(DataError, match="mixes two preparations"):
            load_data_tokenizer(out)


# -----------------------------------------------------------------------------
# batches


@pytest.fixture
def counting_dir(tmp_path) -> Path:
    """train.bin holds 0, 1, 2, ...: every window is a run of consecutive ids."""
    return write_data_dir(tmp_path / "count", np.arange(5000), np.arange(10_000, 11_000), vocab_size=11_000)


def test_get_batch_shapes_dtypes_shift(counting_dir):
    loader = BatchLoader(counting_dir, block_size=16, batch_size=5)
    assert loader.vocab_size == 11_000 and loader.dtype == np.uint16 and loader.meta["train_tokens"] == 5000
    for split, lo, hi in (("train", 0, 5000), ("val", 10_000, 11_000)):
        x, y = loader.get_batch(split)
        assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
        assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()
        torch.testing.assert_close(y, x + 1)  # consecutive ids: y is x shifted by one
        torch.testing.assert_close(x - x[:, :1], torch.arange(16).expand(5, 16))
        assert x.min() >= lo and y.max() < hi


def test_every_window_of_a_split_can_be_drawn_the_first_and_the_last(tmp_path):
    # 20 tokens, windows of 16 and their next tokens: starts 0 to 3, all of them drawn over a few batches
    d = write_data_dir(tmp_path / "d", np.arange(20), np.arange(100, 120), vocab_size=120)
    loader = BatchLoader(d, block_size=16, batch_size=8)
    starts = {int(s) for i in range(10) for s in loader.get_batch("train", i)[0][:, 0]}
    assert starts == {0, 1, 2, 3}


def test_each_row_is_a_window_of_the_data_and_its_next_tokens(tmp_path):
    """On random ids (where counting data would hide an x computed from y): x is data[s:s+T], y data[s+1:s+T+1]."""
    rng = np.random.default_rng(0)
    train_ids, val_ids = rng.integers(0, 500, 3000), rng.integers(0, 500, 400)
    d = write_data_dir(tmp_path / "d", train_ids, val_ids, vocab_size=500)
    loader = BatchLoader(d, block_size=8, batch_size=6)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        x, y = loader.get_batch(split, 3)
        windows = np.lib.stride_tricks.sliding_window_view(ids, 9)
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            starts = np.flatnonzero((windows[:, :8] == row_x).all(axis=1))
            assert len(starts) and any((windows[s, 1:] == row_y).all() for s in starts)


def test_batches_are_a_function_of_seed_split_rank_index(counting_dir):
    a = BatchLoader(counting_dir, block_size=8, batch_size=4, seed=1)
    drawn = [a.get_batch("train")[0] for _ in range(6)]  # index None counts 0, 1, 2, ...
    b = BatchLoader(counting_dir, block_size=8, batch_size=4, seed=1)
    # a resumed run jumps straight to index 4 and draws what the uninterrupted run drew
    torch.testing.assert_close(b.get_batch("train", index=4)[0], drawn[4])
    torch.testing.assert_close(b.get_batch("train")[0], drawn[5])  # the counter continues after 4
    assert not torch.equal(drawn[0], drawn[1])
    assert not torch.equal(BatchLoader(counting_dir, 8, 4, seed=2).get_batch("train", 0)[0], drawn[0])
    ranks = [BatchLoader(counting_dir, 8, 4, seed=1, rank=r, world_size=2).get_batch("train", 0)[0] for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], drawn[0])  # rank 0 of 2 draws what a single process draws
    # evaluation batches are a fixed set: the same for every call
    torch.testing.assert_close(a.get_batch("val", 3)[0], b.get_batch("val", 3)[0])
    # and the split is part of the seed: on splits of one length, train and val windows start elsewhere
    same = write_data_dir(counting_dir.parent / "same", np.arange(1000), np.arange(10_000, 11_000), 11_000)
    loader = BatchLoader(same, 8, 4, seed=1)
    starts = [loader.get_batch(split, 0)[0][:, 0] % 10_000 for split in ("train", "val")]
    assert not torch.equal(starts[0], starts[1])


def test_prefetch_gives_the_same_batches(counting_dir):
    plan = [("train", 0), ("train", 1), ("train", 2), ("val", 0), ("val", 1), ("train", 3), ("train", 7),
            ("train", 8), ("val", 0)]
    plain = BatchLoader(counting_dir, block_size=8, batch_size=3)
    with BatchLoader(counting_dir, block_size=8, batch_size=3, prefetch=True) as pre:
        for split, i in plan:
            for got, want in zip(pre.get_batch(split, i), plain.get_batch(split, i)):
                torch.testing.assert_close(got, want)
    assert pre.prefetched == 3  # train 1, train 2 and val 1 were ready in advance
    assert pre._executor is None
    torch.testing.assert_close(pre.get_batch("train", 1)[0], plain.get_batch("train", 1)[0])  # works after close


def test_a_prefetched_batch_serves_only_its_own_split_and_index(counting_dir):
    """After val 0, 1, 2 the loader prepares val 3; train 3, asked next, is train's batch, not val's. After
    close() the loader still gives the right batches, also the one that was being prepared."""
    plain = BatchLoader(counting_dir, block_size=8, batch_size=3)
    pre = BatchLoader(counting_dir, block_size=8, batch_size=3, prefetch=True)
    for i in range(3):
        pre.get_batch("val", i)
    torch.testing.assert_close(pre.get_batch("train", 3)[0], plain.get_batch("train", 3)[0])
    pre.get_batch("val", 0)  # prepares val 1
    pre.close()
    torch.testing.assert_close(pre.get_batch("val", 1)[0], plain.get_batch("val", 1)[0])


def test_prefetch_follows_the_stride(counting_dir):
    """Under DDP train.py gives rank r the global indices r, r + W, r + 2W, ...: the next one is predicted."""
    plain = BatchLoader(counting_dir, block_size=8, batch_size=3)
    with BatchLoader(counting_dir, block_size=8, batch_size=3, prefetch=True) as pre:
        for i in range(1, 40, 3):
            torch.testing.assert_close(pre.get_batch("train", i)[0], plain.get_batch("train", i)[0])
        assert pre.prefetched == 11  # all but the first two, which set the stride


@pytest.mark.parametrize("n, block_size, batch_size", [
    (1000, 16, 5),  # 999 targets: 62 full windows and one of 7 new targets, 13 batches, the last with 3 rows
    (1001, 16, 5),  # 1,000 targets: 62 windows and 8, the same batches
    (97, 16, 3),  # 96 targets: 6 windows exactly, 2 full batches
    (17, 16, 4),  # the shortest split a block of 16 allows: 1 window, 3 rows of filler
    (20, 16, 1),  # 19 targets: a full window, then one that counts only its last 3
])
def test_the_sweep_counts_every_target_of_the_split_once(tmp_path, n, block_size, batch_size):
    """On counting ids a target's value is its position: every position from 1 to n - 1 is counted once, each
    row is a window of the data with its next tokens, and every row's targets that count nothing are -1."""
    d = write_data_dir(tmp_path / "d", np.arange(n), np.arange(n), vocab_size=n)
    loader = BatchLoader(d, block_size=block_size, batch_size=batch_size)
    windows = -(-(n - 1) // block_size)
    assert loader.sweep_batches("val") == -(-windows // batch_size)
    counted, rows = [], 0
    for k in range(loader.sweep_batches("val")):
        x, y = loader.get_sweep_batch("val", k)
        assert x.shape == y.shape == (batch_size, block_size) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert row_x == list(range(row_x[0], row_x[0] + block_size))  # a window of the split
            kept = [t for t in row_y if t != -1]
            assert row_y == [-1] * (block_size - len(kept)) + kept  # what counts nothing comes first
            assert kept == [t + 1 for t in row_x][block_size - len(kept):]
            counted += kept
            rows += bool(kept)
    assert sorted(counted) == list(range(1, n))
    assert rows == windows  # every window counts something; the rest is filler


def test_sweep_batches_are_the_splits_own_and_outside_them_an_error(counting_dir):
    loader = BatchLoader(counting_dir, block_size=8, batch_size=4)
    assert loader.sweep_batches("train") == 157 and loader.sweep_batches("val") == 32  # ceil(4999 / 32), 999 / 32
    x, y = loader.get_sweep_batch("train", 1)
    assert x[0, 0] == 32 and y[-1, -1] == 64  # batch 1 holds windows 4 to 7
    assert loader.get_sweep_batch("val", 0)[0][0, 0] == 10_000
    for bad in (-1, 32):
        with pytest.raises(ValueError, match=r"sweep batch index must be in 0 \.\. 31"):
            loader.get_sweep_batch("val", bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(counting_dir):
    cpu = BatchLoader(counting_dir, block_size=32, batch_size=8)
    with BatchLoader(counting_dir, block_size=32, batch_size=8, device="cuda") as gpu:
        for i in range(20):
            x, y = gpu.get_batch("train", i)
            assert x.is_cuda and y.is_cuda and x.dtype == torch.int64
            # overwrite the batch on the GPU: the next one must not share memory with it
            x.zero_()
            torch.testing.assert_close(gpu.get_batch("val", i)[1].cpu(), cpu.get_batch("val", i)[1])
            torch.testing.assert_close(y.cpu(), cpu.get_batch("train", i)[1])
        for i in range(gpu.sweep_batches("val")):  # the sweep's -1 targets come through the pinned copy too
            for got, want in zip(gpu.get_sweep_batch("val", i), cpu.get_sweep_batch("val", i)):
                assert got.is_cuda
                torch.testing.assert_close(got.cpu(), want)


def test_cli_end_to_end(shakespeare_text, tmp_path):
    """The script itself: a custom char data set in ./data/<name>, then loaded."""
    (tmp_path / "verse.txt").write_text(shakespeare_text[:3000])
    r = run_cli("--dataset", "custom", "--input", "verse.txt", "--tokenizer", "char", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote data/verse: 2,700 train and 300 val tokens (char" in r.stdout
    meta = load_meta(tmp_path / "data" / "verse")
    assert meta["command"] == "python prepare_data.py --dataset custom --input verse.txt --tokenizer char"
    assert sorted(p.name for p in (tmp_path / "data" / "verse").iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_preparing_data_does_not_load_torch():
    """Worker processes that are spawned (macOS, Windows) import prepare_data.py afresh: torch would cost each
    of them 1-2 s and 200 MB for nothing."""
    code = "import sys, prepare_data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_prepare_the_same_data_and_helpers_ignore_hangups(tmp_path, shakespeare_path, method):
    """macOS and Windows spawn worker processes instead of forking them; Python 3.14 on Linux takes them from a
    fork server. multiprocessing's helper processes (its resource tracker, the fork server) must ignore SIGHUP
    as the workers do: a closed terminal would kill them with tracebacks."""
    script = tmp_path / "spawned.py"
    script.write_text(f"""import multiprocessing, sys
sys.path.insert(0, {str(ROOT)!r})
if __name__ == "__main__":
    multiprocessing.set_start_method({method!r})
    import prepare_data
    from multiprocessing import forkserver, resource_tracker
    prepare_data.main(["--dataset", "custom", "--input", {str(shakespeare_path)!r}, "--tokenizer", "char",
                       "--num_proc", "2", "--output_dir", {str(tmp_path / "spawned")!r}])
    helpers = [resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid]
    for pid in helpers[: 2 if {method!r} == "forkserver" else 1]:
        status = open(f"/proc/{{pid}}/status").read()
        print(int(status.split("SigIgn:")[1].split()[0], 16) & 1)  # bit 0: SIGHUP, signal 1
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-(1 + (method == "forkserver")):] == ["1"] * (1 + (method == "forkserver"))
    prepare("--dataset", "custom", "--input", shakespeare_path, "--tokenizer", "char", "--num_proc", 2,
            "--output_dir", tmp_path / "forked")
    for a, b in zip(bins(tmp_path / "spawned"), bins(tmp_path / "forked")):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- file types and damaged UTF-8: more cases


def test_utf8_evidence_is_eight_characters_before_the_bad_byte():
    from utils import decode_utf8
    gbk = "你好，世界".encode("gbk")  # c4 e3 ...: 0xc4 starts a character that 0xe3 cannot continue
    # 7 characters beyond ASCII (14 bytes: continuation bytes are no characters) are no evidence yet, and the
    # GBK bytes after the bad one do not count
    with pytest.raises(DataError, match=r"byte offset 14 .*iconv -f gbk -t utf-8"):
        decode_utf8("é".encode() * 7 + gbk, "in.txt", error=DataError)
    with pytest.raises(DataError, match=r"byte offset 16 .*the file has damaged bytes: drop them with `iconv -f utf-8"):
        decode_utf8("é".encode() * 8 + gbk, "in.txt", error=DataError)


def test_utf8_evidence_carries_over_every_block(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "READ_BYTES", 64)
    # block 1: 12 characters beyond ASCII; block 2: ASCII only; block 3 begins with the damaged byte
    data = "床前明月光，疑是地上霜。".encode() + b"x" * 28 + b"y" * 64 + b"\xe5\x80" + "举头望明月".encode()
    (tmp_path / "t.txt").write_bytes(data)
    with pytest.raises(DataError, match=r"byte 0xe5 at byte offset 128 .*the text before it is UTF-8, so the file has "
                                        r"damaged bytes"):
        prepare_text(tmp_path / "o", [tmp_path / "t.txt"], dataset="custom", tokenizer="char", vocab_size=None,
                     val_fraction=0.1, num_proc=1, command="t")


def test_xz_zstd_and_utf16_be_are_named_and_bzip2_letters_are_text():
    import lzma
    from utils import decode_utf8
    for kind, data in (("xz", lzma.compress(b"some text " * 50)), ("zstd", b"\x28\xb5\x2f\xfd" + bytes(range(256)))):
        with pytest.raises(DataError, match=rf"it is compressed \({kind}\): decompress it first$"):
            decode_utf8(data, "in.txt", error=DataError)
    with pytest.raises(DataError, match=r"it is UTF-16 \(what Windows Notepad calls 'Unicode'\)"):
        decode_utf8("\ufeffab\n".encode("utf-16-be"), "in.txt", error=DataError)
    # bzip2's 'BZh' and block size, without the block's magic number, is text
    with pytest.raises(DataError, match=r"iconv -f gbk -t utf-8"):
        decode_utf8("BZh9 is text, in GBK: 你好".encode("gbk"), "in.txt", error=DataError)


def test_a_magic_number_past_the_start_of_the_file_is_no_file_type():
    from utils import decode_utf8
    for data in (b"PK\x03\x04\xff", b"\x1f\x8b\x08\x00", b"PAR1\xff"):  # a piece that starts at byte 100
        with pytest.raises(DataError, match=r"at byte offset 10\d .*iconv -f gbk -t utf-8") as e:
            decode_utf8(data, "in.txt", offset=100, error=DataError)
        assert "compressed" not in str(e.value) and "Parquet" not in str(e.value)


def test_num_proc_may_be_up_to_four_a_core(monkeypatch):
    monkeypatch.setattr(prepare_data, "default_num_proc", lambda: 3)
    prepare_data.check_num_proc(12)
    with pytest.raises(DataError, match=r"^--num_proc must be between 1 and 12 \(4 a core on this machine's 3\), got "
                                        r"13; the default is one a core$"):
        prepare_data.check_num_proc(13)


def test_hf_dataset_is_refused_with_shakespeare():
    with pytest.raises(DataError, match="it does nothing with --dataset shakespeare: leave it out"):
        prepare("--dataset", "shakespeare", "--hf_dataset", "x")


def test_a_json_file_of_any_case_gets_the_note_with_its_name_quoted(tmp_path, capsys):
    src = tmp_path / "my docs.JSON"
    src.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(200)), encoding="utf-8")
    prepare("--dataset", "custom", "--input", src, "--output_dir", tmp_path / "j", "--tokenizer", "char")
    assert (f"note: {src} is read as plain text, its JSON syntax included; --dataset openwebtext "
            f"--input {shlex.quote(str(src))} reads the \"text\" field of each line") in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_damaged_utf8_in_a_later_block_gets_the_same_hint_with_gpt2(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(prepare_data, "READ_BYTES", 64)
    (tmp_path / "t.txt").write_bytes(("床前明月光，疑是地上霜。\n" * 20).encode() + b"\xe5\x80" + "举头望明月".encode())
    with pytest.raises(DataError, match=r"the text before it is UTF-8, so the file has damaged bytes"):
        prepare_text(tmp_path / "o", [tmp_path / "t.txt"], dataset="custom", tokenizer=tokenizer, vocab_size=None,
                     val_fraction=0.1, num_proc=1, command="t")


@pytest.mark.parametrize("read_bytes", [1 << 20, 64])
@pytest.mark.parametrize("second", ["举头望明月，低头思故乡。\n" * 20, "说话的人，一时也要去学。\n" * 20])
def test_a_utf8_file_that_goes_on_in_gbk_gets_a_split_conversion_not_the_damaged_bytes_hint(tmp_path, monkeypatch,
                                                                                             read_bytes, second):
    """Two files joined (cat a.txt b_gbk.txt): dropping the bytes that are not UTF-8 would drop the whole GBK
    part, so the hint shows how the rest reads as GBK and converts the part from where the encoding changes,
    which gives the text back. 说 (CB B5) also reads as UTF-8 (U+02F5): the change is before it, not after."""
    monkeypatch.setattr(prepare_data, "READ_BYTES", read_bytes)
    first = "床前明月光，疑是地上霜。\n" * 20
    data = first.encode() + second.encode("gbk")
    (tmp_path / "t.txt").write_bytes(data)
    with pytest.raises(DataError) as e:
        prepare_text(tmp_path / "o", [tmp_path / "t.txt"], dataset="custom", tokenizer="char", vocab_size=None,
                     val_fraction=0.1, num_proc=1, command="t")
    at = len(first.encode())
    assert f"from byte offset {at} on, read as GBK, it begins {second[:12]!r}. If that is the text" in str(e.value)
    assert f"`(head -c {at} IN; tail -c +{at + 1} IN | iconv -f gbk -t utf-8) > OUT`" in str(e.value)
    assert str(e.value).endswith("if not, that part is in another encoding or damaged")
    assert data[:at].decode() + data[at:].decode("gbk") == first + second  # what the command does
    # a few damaged bytes in UTF-8 Chinese, which itself reads as GBK (mojibake), keep the damaged-bytes hint
    (tmp_path / "d.txt").write_bytes(first.encode() + b"\xe5\x80" + second.encode())
    with pytest.raises(DataError, match=r"so the file has damaged bytes: drop them"):
        prepare_text(tmp_path / "o", [tmp_path / "d.txt"], dataset="custom", tokenizer="char", vocab_size=None,
                     val_fraction=0.1, num_proc=1, command="t")


def test_damaged_utf8_in_a_later_json_lines_unit_gets_the_damaged_bytes_hint(tmp_path):
    """The characters beyond ASCII of the lines before, in this unit and in the units before it, say the file is
    UTF-8: a worker that meets a damaged byte says so, as a text file's reader does."""
    lines = [json.dumps({"text": f"{i}: 床前明月光，疑是地上霜。"}, ensure_ascii=False).encode() for i in range(30)]
    lines.append(b'{"text": "\xe5\x80 damaged"}')
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    for unit_bytes in (1 << 20, 64):  # one unit, then a unit of about two lines each
        with pytest.raises(DataError, match=r"docs.jsonl line 31 is not valid UTF-8: .*the text before it is "
                                            r"UTF-8, so the file has damaged bytes"):
            prepare_documents(tmp_path / f"o{unit_bytes}", str(tmp_path / "docs.jsonl"), hf_name="",
                              val_fraction=0.25, num_proc=1, command="t", unit_bytes=unit_bytes)


@pytest.mark.parametrize("after", ["val.bin", "train.bin", "tokenizer.json"])
def test_a_signal_while_the_files_are_put_in_place_leaves_the_new_data_set_whole(shakespeare_text, tmp_path, monkeypatch,
                                                                                 capsys, after):
    """The renames of the finished files land together: SIGTERM between two of them is raised after the last."""
    import utils
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_text[:20_000])
    out = tmp_path / "out"
    prepare_text(out, [src], dataset="custom", tokenizer="char", vocab_size=None, val_fraction=0.1,
                 num_proc=1, command="first run")
    real = utils._rename_over

    def rename_then_signal(tmp, path):
        real(tmp, path)
        if Path(path).name == after:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(utils, "_rename_over", rename_then_signal)
    with pytest.raises(KeyboardInterrupt):
        with prepare_data.sigterm_as_interrupt():
            prepare_text(out, [src], dataset="custom", tokenizer="char", vocab_size=None, val_fraction=0.2,
                         num_proc=1, command="second run")
    meta = load_meta(out)  # the second run's, whole: its meta.json landed too
    assert (meta["command"], meta["val_tokens"]) == ("second run", 4000)
    assert np.fromfile(out / "val.bin", np.uint16).size == 4000 and not (out / ".meta.json.replaced").exists()
    assert "note: the signal came while the finished data set was put in place; it is complete and kept" in \
        capsys.readouterr().err


def test_held_signals_leave_an_ignored_signal_ignored_and_give_back_the_first_handlers(capsys):
    import utils
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job (`cmd &`) in a script
    try:
        with prepare_data.sigterm_as_interrupt():
            term = signal.getsignal(signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt):
                with utils.HeldSignals("kept") as held:
                    held.hold()
                    held.hold()  # twice: what is given back is still what was there before the first
                    os.kill(os.getpid(), signal.SIGINT)  # ignored: not held, no note of it
                    os.kill(os.getpid(), signal.SIGTERM)  # held, then raised: the run still stops
                    time.sleep(0.01)
            assert held.held == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is term
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert capsys.readouterr().err == "note: kept\n"
    finally:
        signal.signal(signal.SIGINT, before)
