"""Prepare a data set for training: text -> token ids in train.bin / val.bin, plus meta.json.

    python prepare_data.py --dataset shakespeare                   # GPT-2 tokens -> ./data/shakespeare
    python prepare_data.py --dataset shakespeare --tokenizer char  # -> ./data/shakespeare_char
    python prepare_data.py --dataset shakespeare --tokenizer bpe --vocab_size 4096  # -> ./data/shakespeare_bpe
    python prepare_data.py --dataset custom --input my.txt --tokenizer char     # -> ./data/my
    python prepare_data.py --dataset custom --input more.txt --output_dir data/more \
        --tokenizer_file export/toolkit_tokenizer.json
    python prepare_data.py --dataset openwebtext                   # Hugging Face (pip install datasets)
    python prepare_data.py --dataset openwebtext --input docs/     # local .jsonl / .txt / .parquet files

Shakespeare is tinyshakespeare (input.txt of Karpathy's char-rnn repository), downloaded into the
data directory and checked against its sha256; --input FILE or the SHAKESPEARE environment variable
give a local copy instead. --dataset custom reads one text file, or every .txt file under a folder
(in sorted path order, with end-of-text between files when the tokenizer has one). '<|endoftext|>'
written in a text file is a document separator too: the end-of-text id, where the tokenizer has one.

The output directory holds train.bin and val.bin (token ids, uint16, or uint32 when the vocabulary
exceeds 65,535 ids), tokenizer.json (load_tokenizer restores it) and meta.json: tokenizer kind and
file, vocab_size, eot_token, dtype, token counts, source and its sha256. Each file is written under
a temporary name and renamed when complete, meta.json last, so a directory with meta.json is a
complete data set; a run that fails or is interrupted leaves the old data set as it was (see
write_dataset).

How the splits are made:
- shakespeare and custom: the first (1 - val_fraction) of the characters are train, the rest val, as
  nanoGPT does (tinyshakespeare at char level: 1,003,854 / 111,540 tokens; GPT-2: 301,966 / 36,059).
- openwebtext: each document goes to val when the BLAKE2b hash of its UTF-8 text, read as a number
  in [0, 1), is below val_fraction (default 0.0005). The choice depends on nothing but the document,
  so it is the same for any order, chunking or --num_proc, and duplicated documents share a split.
  Every document is followed by end-of-text (50256), as GPT-2's training data was.

Tokenisation runs in --num_proc worker processes (default: every core) on chunks of about 1 MB,
with a bounded number of chunks in flight, and the results are streamed to disk in order. openwebtext's
documents are read as they come, so its memory stays flat however large the corpus. shakespeare and
custom read each file twice in blocks of 16 MB, once to count its characters and find the cut, once to
tokenise it, so their memory stays flat too. Held whole in memory are only: the training text while a BPE
is trained on it, each split's text for a --tokenizer_file BPE with a split pattern of its own (no cut
point is known to be safe for it), and a pipe, which cannot be read twice. Long texts
are cut only just before ASCII whitespace that follows a non-space character; GPT-2's pre-split
pattern never joins characters across such a point, so the ids are exactly those of encoding the
whole text at once (tests/test_data.py checks this).
`python bench.py --tokenize` measures its speed in MB/s against single-thread tiktoken.
"""
import argparse
import contextlib
import errno
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shlex
import shutil
import stat
import sys
import urllib.error
import urllib.request
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import utils
from data import DEFAULT_DATA_DIRS, SPLIT_IDS, SPLITS, DataError, custom_data_dir
from tokenizer import (EOT, GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer, GPT2Tokenizer, PatternGapError,
                       Tokenizer, TokenizerError, check_bpe_vocab_size, load_tokenizer, tokenizer_from_dict)
from utils import (ArgumentParser, HeldSignals, Progress, UserError, atomic_open, become_pool_worker, folder_lock,
                   folder_problem, lock_holder, missing_folders, path_arg, remove_empty_folders,
                   remove_unfinished_writes, run_cli, start_process_helpers, stop_signals_raise)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_VAL_FRACTION = {"shakespeare": 0.1, "custom": 0.1, "openwebtext": 0.0005}
DEFAULT_BPE_VOCAB = 4096
UNIT_BYTES = 1 << 20  # text per work unit handed to a worker process
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")  # not read: their text must be decompressed first
DOC_SUFFIXES = (".jsonl", ".txt", ".parquet")  # local files --dataset openwebtext reads from a folder
# also a .json file named itself (JSON Lines): in a folder, .json is more often something else (a data
# set's meta.json, a Hugging Face download's dataset_info.json)
DOC_FILE_SUFFIXES = (*DOC_SUFFIXES, ".json")
DATASET_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")  # what write_dataset puts in out_dir
# .json files a folder of documents holds that are no documents: a data set's own, a Hugging Face download's
NOT_DOCUMENTS = ("tokenizer.json", "meta.json", "dataset_info.json", "dataset_dict.json", "state.json")
# A safe cut is a point in UTF-8 text just before ASCII whitespace (space, newline, carriage return, tab,
# vertical tab, form feed) that follows a character that is not whitespace: no pre-token of GPT-2's pattern
# crosses it (words, numbers and symbols stop at whitespace, and a whitespace run starting there is matched
# the same way with or without the text before it). The carriage return matters: in Windows text, Chinese
# lines end in "。\r\n", and with no spaces in the text a cut only before "\n" would never be found. The
# character before is checked by its UTF-8 bytes: none of the Unicode whitespace characters (U+0009..000D,
# 001C..001F, 0020, 0085, 00A0, 1680, 180E, 2000..200A, 2028, 2029, 202F, 205F, 3000) may end there.
# Matching their whole encodings, not just last bytes they share with others, keeps the cut points after CJK
# punctuation such as 。！？ (E3 80 82, EF BC 81, EF BC 9F), where Chinese lines end.
SAFE_CUT = re.compile(rb"(?=[ \t\n\x0b\x0c\r])(?<![\s\x1c-\x1f])(?<!\xc2\x85)(?<!\xc2\xa0)(?<!\xe1\x9a\x80)"
                      rb"(?<!\xe1\xa0\x8e)(?<!\xe2\x80[\x80-\x8a\xa8\xa9\xaf])(?<!\xe2\x81\x9f)(?<!\xe3\x80\x80)")
PROGRESS_UNITS = {"bytes": "B", "docs": "doc"}
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark
BLOCK = 1 << 24  # numpy scans of UTF-8 bytes go in blocks of this size, to bound the temporaries
READ_BYTES = 1 << 24  # shakespeare and custom text files are read in blocks of this size

# (split, UTF-8 text, end_of_text_after, progress it stands for, file name and byte offset for errors)
Item = tuple[str, bytes, bool, int, str, int]


# -----------------------------------------------------------------------------
# reading text


def decode_utf8(data: bytes | memoryview, where: str, offset: int = 0, seen: int = 0) -> str:
    """data as str; invalid UTF-8 is a DataError naming `where` and the byte offset (utils.decode_utf8)."""
    return utils.decode_utf8(data, where, offset, DataError, seen)


def input_files(path: Path, suffixes: tuple[str, ...],
                file_suffixes: tuple[str, ...] | None = None) -> tuple[list[Path], int]:
    """path itself, or every file under the folder path with one of the suffixes, in sorted order, and
    their size in bytes; file_suffixes, where given, are those a file named itself may have (any, where not given).

    Folders linked into the input folder are followed; a file reached twice (links, hard links) is read once.
    --output_dir may lie inside the input folder:
    the data set's own files (DATASET_FILES: .bin and .json) never have one of the suffixes read here,
    which is also why a folder's .json files are not read as JSON Lines.
    """
    if not path.exists():
        raise DataError(f"--input {str(path)!r} does not exist; pass a file or a folder of {'/'.join(suffixes)} files")
    if not path.is_dir():  # a file, or a pipe: <(zcat text.gz) is the natural way to read a compressed file
        if not (path.is_file() or path.is_fifo()):
            raise DataError(f"--input {str(path)!r} is a device, not a file or a folder; pass a file, a folder or "
                            f"a pipe")
        if file_suffixes is not None and path.suffix.lower() not in file_suffixes:
            raise DataError(f"--input {str(path)!r} is not a file this reads: expected {'/'.join(file_suffixes)}"
                            + (" (decompress it first)" if path.suffix.lower() in COMPRESSED
                               else "; a pipe is read by --dataset custom only, so save it as a .jsonl file"
                               if not path.is_file() else ""))
        with reading(path):
            return [path], path.stat().st_size
    files, size, compressed, broken, json_files, others = [], 0, [], [], [], {}
    # JSON Lines named .json (C4's shards) may lie in a folder read for .jsonl documents: named when left out
    as_json = (".json",) if ".jsonl" in suffixes else ()
    # OpenWebText extracted is 8 million files: listing them takes minutes, which the bar shows; the size of
    # each comes from the one stat() that tells a file from a folder or a broken link
    with Progress(file=sys.stderr, desc=f"listing {path}", bar_format="{desc}: {n:,} files [{elapsed}]",
                  mininterval=1.0, delay=2.0) as bar:
        for p in _walk(path, bar.update):
            suffix = p.suffix.lower()  # .TXT as well as .txt: Windows names files in either case
            if suffix in suffixes:
                try:
                    st = p.stat()
                except OSError as e:
                    # a link that points to nothing, to itself, or into a file (a.txt/x)
                    if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        broken.append(p)
                        continue
                    raise DataError(f"cannot read {p}: {e.strerror or e}; make it readable, or move it out of "
                                    f"--input") from None
                if stat.S_ISREG(st.st_mode):
                    # inode 0: no file identity (Windows' network and cloud drives), so every path counts
                    files.append((p, (st.st_dev, st.st_ino) if st.st_ino else p, st.st_size))
            elif suffix in COMPRESSED and Path(p.stem).suffix.lower() in (*suffixes, *as_json):
                compressed.append(p)  # shard.jsonl.gz
            elif p.name in NOT_DOCUMENTS:
                continue
            elif suffix in as_json:
                json_files.append(p)  # C4's shards, decompressed, are JSON Lines named .json
            else:
                others[suffix or "suffix-less"] = others.get(suffix or "suffix-less", 0) + 1
    unpack = "decompress them" + (" and name them .jsonl" if any(
        Path(p.stem).suffix.lower() == ".json" for p in compressed) else "")  # C4's shards: .json.gz
    json_why = ("a folder's .json files are not read (Hugging Face downloads keep their metadata in them); "
                "rename those that hold JSON Lines documents to .jsonl")
    if not files:
        held = ([f"{len(compressed)} compressed file(s) such as {compressed[0].name}: {unpack} first"]
                if compressed else [])
        held += [f"{len(json_files)} .json file(s) such as {json_files[0].name}: {json_why}"] if json_files else []
        held += [f"{n} {s} file(s)" + (" (compressed or archived: extract them first)"
                                       if s in (*COMPRESSED, ".tar", ".tgz") else
                                       " (documents: extract their text into .txt files first)"
                                       if s in (".pdf", ".doc", ".docx", ".epub", ".mobi", ".azw3") else "")
                 for s, n in sorted(others.items(), key=lambda item: -item[1])[:3]]
        raise DataError(f"the folder {str(path)!r} holds no {'/'.join(suffixes)} files"
                        f"{'; it holds ' + '; '.join(held) if held else ''}; pass a file or another folder")
    if compressed:
        print(f"note: {len(compressed)} compressed file(s) under {path} are left out, such as {compressed[0].name}: "
              f"{unpack} to read them", file=sys.stderr)
    if json_files:
        print(f"note: {len(json_files)} .json file(s) under {path} are left out, such as {json_files[0].name}: "
              f"{json_why}", file=sys.stderr)
    if broken:
        print(f"note: {len(broken)} link(s) under {path} point to nothing and are left out, such as {broken[0]}",
              file=sys.stderr)
    # a file linked in twice (a.txt and latest.txt -> a.txt) is read once, the first time in path order: read
    # again, its text could stand in both splits and make the val loss a training loss
    read, again = {}, []
    for p, identity, n in sorted(files, key=lambda f: f[0]):
        if identity in read:
            again.append((p, read[identity]))
        else:
            read[identity] = p
            size += n
    if again:
        print(f"note: {len(again)} file(s) under {path} are the same file as one read before and are read once, "
              f"such as {again[0][0]} (the same as {again[0][1]})", file=sys.stderr)
    return list(read.values()), size


def _walk(folder: Path, listed=lambda n: None) -> Iterator[Path]:
    """Every file under folder, through linked folders too (Path.rglob skips them), each folder once;
    listed(n) hears of the n files of each folder as it is read."""
    def unreadable(error: OSError):  # os.walk would skip such a folder without a word
        raise DataError(f"cannot read the folder {error.filename!r} under --input ({error.strerror}); make it "
                        f"readable, or move it out of the input folder")

    seen = set()
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to a folder already read
            dirs.clear()
            continue
        seen.add(real)
        listed(len(names))
        yield from (Path(root) / name for name in names)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """An OSError while reading an input file (no permission, a disk error) as one line that names it."""
    try:
        yield
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; make it readable, or move it out of --input") from None


class TextFile:
    """One text file of shakespeare or custom input. It is read in blocks of READ_BYTES, twice: scan() counts
    its characters (to find the train/val cut) and hashes it, then text_items() hands its text out again
    for tokenising, so memory stays flat whatever the file's size. A pipe cannot be read twice: its bytes are
    kept (data). A file that changes between the two readings is an error, not a mix of two texts."""

    def __init__(self, path: Path | str, data: bytes | None = None):
        self.path, self.name, self.data = Path(path), str(path), data
        if data is None and not self.path.is_file():  # a pipe, such as <(zcat text.gz)
            with reading(self.path):
                self.data = self.path.read_bytes()
        self.size = self.skip = self.chars = 0  # bytes; a byte-order mark's bytes; characters, the mark included
        self.block_chars: list[tuple[int, int]] = []  # (byte offset, characters) of each block scan() read
        # its characters, the mark left out, each once, where scan() decoded the text: a str, since a set of 20
        # characters takes 2 kB, and a folder may hold hundreds of thousands of files
        self.charset = ""
        self.crc = 0  # CRC-32 of its bytes: whether the second reading reads what the first one did

    def open(self):
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")

    def scan(self, sha, decode: bool, progress=lambda n: None) -> None:
        """Read the file once: size, byte-order mark, characters and sha256 (sha, the hash of all the files in
        order, is updated too). decode: decode the text as well, so that bad UTF-8 is an error now, before a
        long training, and gather the character set. progress(bytes) is called after each block."""
        head, carry, offset, crc, charset = b"", b"", 0, 0, set()
        seen = 0  # characters beyond ASCII in the blocks before, which say the text is UTF-8 (utils.decode_utf8)
        with reading(self.path), self.open() as f:
            while block := f.read(READ_BYTES):
                problem = utils.binary_problem(block) if offset == 0 else None
                if problem:  # before the tokenizer is built: a character set of bytes, a BPE of NULs
                    raise DataError(f"{self.name} is not text: {problem}")
                crc = zlib.crc32(block, crc)  # twice as fast as a second sha256
                sha.update(block)
                head += block[: len(BOM) - len(head)]
                self.skip = len(BOM) if head == BOM else 0
                n = utf8_length(block)  # counts the bytes that begin a character: a block may end inside one
                self.block_chars.append((offset, n))
                self.chars += n
                if decode:  # whole characters only; the rest goes with the next block
                    data = carry + block
                    end = complete_utf8(data)
                    text = decode_utf8(data[:end], self.name, offset - len(carry), seen)
                    if offset - len(carry) == 0 and self.skip:
                        text = text[1:]  # the mark is no text
                    charset.update(text)
                    seen += utils.utf8_evidence(data[:end], utils.UTF8_EVIDENCE - seen)
                    carry = data[end:]
                offset += len(block)
                progress(len(block))
        if carry:
            decode_utf8(carry, self.name, offset - len(carry), seen)  # the file ends inside a character: the error
        self.size, self.crc, self.charset = offset, crc, "".join(sorted(charset))

    def char_offset(self, k: int) -> int:
        """Byte offset of character k (the byte-order mark is character 0 where there is one)."""
        for start, n in self.block_chars:
            if k < n:
                with reading(self.path), self.open() as f:
                    f.seek(start)
                    block = f.read(READ_BYTES)
                if len(block) != min(READ_BYTES, self.size - start) or utf8_length(block) != n:
                    raise self.changed()
                return start + utf8_offset(block, k)
            k -= n
        return self.size

    def read(self, start: int, end: int) -> bytes:
        with reading(self.path), self.open() as f:
            f.seek(start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise self.changed()
        return data

    def changed(self) -> DataError:
        return changed_error(self.name)


def changed_error(name: str) -> DataError:
    return DataError(f"{name} changed while it was being read; run again once nothing writes to it (a file that "
                     f"keeps growing, such as a log: prepare a copy of it)")


def complete_utf8(data: bytes) -> int:
    """Length of data without a character cut off at its end (1 to 3 bytes of a 2- to 4-byte character)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:  # ASCII: nothing is cut off
            return len(data)
        if b >= 0xC0:  # the last character's lead byte: how many bytes it needs
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(data) - back if back < need else len(data)
    return len(data)  # continuation bytes only: the decoder says what is wrong


def scan_files(files: list[Path], decode: bool) -> tuple[list[TextFile], str]:
    """Each file read once (TextFile.scan), and the sha256 of all their bytes in order."""
    sha = hashlib.sha256()
    texts = [TextFile(f) for f in files]
    sizes = []
    for t in texts:
        with reading(t.path):
            sizes.append(len(t.data) if t.data is not None else t.path.stat().st_size)
    with Progress(total=sum(sizes), unit="B", unit_scale=True, file=sys.stderr, desc="reading", mininterval=1.0) as bar:
        for t in texts:
            t.scan(sha, decode, bar.update)
    total = sum(t.size for t in texts)
    if all(t.size == t.skip for t in texts):
        what = f"{files[0]} is" if len(files) == 1 else f"all {len(files)} files under the input folder are"
        size = "empty (0 bytes)" if total == 0 else "empty (nothing but a byte-order mark)"
        raise DataError(f"{what} {size}: there is nothing to tokenise. Pass a file with text.")
    return texts, sha.hexdigest()


def utf8_length(data: bytes) -> int:
    """Characters in UTF-8 data: the bytes that do not continue a character (10xxxxxx, below -64 as int8)."""
    if data.isascii():
        return len(data)
    a = np.frombuffer(data, dtype=np.int8)
    return sum(int(np.count_nonzero(a[i : i + BLOCK] >= -64)) for i in range(0, len(a), BLOCK))


def utf8_offset(data: bytes, k: int) -> int:
    """Byte offset of character k in UTF-8 data (len(data) for k at or past the end)."""
    if data.isascii():
        return min(k, len(data))
    a = np.frombuffer(data, dtype=np.int8)
    for i in range(0, len(a), BLOCK):
        starts = a[i : i + BLOCK] >= -64
        n = int(np.count_nonzero(starts))
        if k < n:
            return i + int(np.flatnonzero(starts)[k])
        k -= n
    return len(data)


def shakespeare_file(input_arg: str | None, out_dir: Path) -> Path:
    """tinyshakespeare: --input, else $SHAKESPEARE, else a verified copy in out_dir, else a download."""
    local = input_arg or os.environ.get("SHAKESPEARE")
    if local:
        path = Path(local)
        if not path.is_file():
            origin = "--input" if input_arg else "SHAKESPEARE"
            raise DataError(f"{origin} points to {str(path)!r}, which is not a file; give the path of "
                            f"tinyshakespeare's input.txt")
        with reading(path):
            got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != SHAKESPEARE_SHA256:
            raise DataError(f"{path} is not tinyshakespeare: its sha256 is {got}, expected {SHAKESPEARE_SHA256} "
                            f"(a copy with changed line endings differs too). For other text use "
                            f"--dataset custom --input {shlex.quote(str(path))}")
        return path
    path = out_dir / "input.txt"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256:
        return path
    print(f"downloading {SHAKESPEARE_URL}", file=sys.stderr)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download tinyshakespeare from {SHAKESPEARE_URL} ({e}). Without network, "
                        f"give a local copy of input.txt: --input /path/to/input.txt, or set "
                        f"SHAKESPEARE=/path/to/input.txt") from e
    got = hashlib.sha256(data).hexdigest()
    if got != SHAKESPEARE_SHA256:
        raise DataError(f"the download from {SHAKESPEARE_URL} has sha256 {got}, expected {SHAKESPEARE_SHA256}; "
                        f"try again, or give a local copy with --input or SHAKESPEARE")
    with atomic_open(path, "wb") as f:
        f.write(data)
    made = _claimed.get(out_dir.resolve(), [])
    if out_dir.resolve() in made:  # the folder holds the download now, which a run that fails later keeps
        made.remove(out_dir.resolve())
    return path


# -----------------------------------------------------------------------------
# work units: what the main process hands a worker process
#
#   ("pieces", [(split_id, data, eot_after, name, offset, seen), ...])   UTF-8 text whose split is known
#   ("docs", [text, ...])                  documents: split by hash, end-of-text after each
#   ("jsonl", name, lineno, offset, data, seen)  whole lines of a JSON Lines file, parsed by the worker
#
# The main process only reads and slices bytes, and counts the characters beyond ASCII of each file's first
# pieces (seen: utils.UTF8_EVIDENCE at most, which tell damaged UTF-8 from another encoding); decoding,
# parsing, hashing and tokenising happen in the workers, so one main process keeps many of them busy. name
# and offset locate bad UTF-8.


def split_ranges(texts: list[TextFile], val_fraction: float) -> list[tuple[str, int, int, int, bool]]:
    """Cut the scanned files' text, taken in order, after the first (1 - val_fraction) of its characters.

    Returns (split, file index, start byte, end byte, end_of_text_after) in order; end-of-text goes between
    files, not after the last. The cut counts characters, as nanoGPT's data[:int(n * 0.9)] does (moved past an
    '<|endoftext|>' written in the text that it would cut in two):
    files "abcd" and "efgh", 0.25 -> [("train", 0, 0, 4, True), ("train", 1, 0, 2, False), ("val", 1, 2, 4, False)]
    """
    # a byte-order mark (U+FEFF, as Windows Notepad writes) is no text: it is left out, never tokenised
    files = [(i, t) for i, t in enumerate(texts) if t.size > t.skip]
    lengths = [t.chars - (t.skip > 0) for _, t in files]
    total = sum(lengths)
    cut = int(total * (1 - val_fraction))
    if cut == 0 or cut == total:
        empty = "train" if cut == 0 else "val"
        raise DataError(f"the input has {total} character{'s' if total != 1 else ''}, so --val_fraction {val_fraction} "
                        f"leaves the {empty} split empty; give more text or a val_fraction that leaves both splits "
                        f"non-empty")
    ranges, start = [], 0
    for j, ((i, t), n) in enumerate(zip(files, lengths)):
        eot = j < len(files) - 1
        k = min(max(cut - start, 0), n)
        b = past_marker(t, t.char_offset(k + (t.skip > 0))) if 0 < k < n else t.skip if k == 0 else t.size
        if b > t.skip:
            ranges.append(("train", i, t.skip, b, eot and b == t.size))
        if b < t.size:
            ranges.append(("val", i, b, t.size, eot))
        start += n
    return ranges


def past_marker(t: TextFile, b: int) -> int:
    """The cut at byte b, or past an '<|endoftext|>' written in the text that b would cut in two: whole, it is
    one end-of-text id (encode_unit), in train."""
    marker = EOT.encode()
    start = max(t.skip, b - len(marker) + 1)
    i = t.read(start, min(t.size, b + len(marker) - 1)).find(marker)  # two cannot fit: at most one spans b
    return start + i + len(marker) if i >= 0 and start + i < b else b


def cut_kind(tokenizer: Tokenizer) -> str | None:
    """Where text may be cut without changing this tokenizer's ids: after any character (char), at SAFE_CUT
    points (GPT-2's pattern), or nowhere (a BPE with a pattern of its own)."""
    return "chars" if tokenizer.kind == "char" else "safe" if can_cut(tokenizer) else None


def can_cut(tokenizer: Tokenizer) -> bool:
    """Whether cutting text at SAFE_CUT points leaves this tokenizer's ids unchanged."""
    return tokenizer.kind in ("char", "gpt2") or getattr(tokenizer, "pattern", None) == GPT2_SPLIT_PATTERN


def cut_text(data: bytes | memoryview, max_bytes: int) -> Iterator[bytes]:
    """UTF-8 text in pieces of about max_bytes (longer where no safe point is near), cut at SAFE_CUT points."""
    start = 0
    while len(data) - start > max_bytes:
        m = SAFE_CUT.search(data, start + max_bytes)
        if m is None:
            break
        yield bytes(data[start : m.start()])
        start = m.start()
    yield bytes(data[start:])


def last_safe_cut(data: bytes | bytearray, since: int = 0) -> int:
    """Offset of the last SAFE_CUT point in data at or after `since` (where the search of a shorter data ended),
    0 if there is none. Searched from the end backwards, in windows that grow, since a point near the end is
    what is wanted and almost every text has one."""
    end, window = len(data), 1 << 16
    while end > since:
        start = max(since, end - window)
        last = 0
        for m in SAFE_CUT.finditer(data, start, end):  # a point needs the byte after it: none is at `end`
            last = m.start()
        if last:
            return last
        end, window = start, window * 4
    return 0


def text_items(texts: list[TextFile], ranges: list[tuple], cuts: str | None) -> Iterator[Item]:
    """The ranges' text as items, read again in blocks. Each block ends where the tokenizer allows a cut
    (cuts, from cut_kind), so the ids are those of the whole range: at a SAFE_CUT point ('safe'), or after
    any character ('chars'); where it allows none (None), a range is one item. Each file must read back exactly
    as scanned."""
    # ranges come in file order, and files that are empty (or nothing but a byte-order mark) have none; grouped
    # in one pass, since a folder may hold hundreds of thousands of files
    for i, mine in itertools.groupby(ranges, key=lambda r: r[1]):
        t, mine = texts[i], list(mine)
        with reading(t.path), t.open() as f:
            if t.data is None and os.fstat(f.fileno()).st_size != t.size:  # a log being written, say: say so now
                raise t.changed()
            crc = zlib.crc32(f.read(t.skip))
            for split, _, start, end, eot in mine:
                pending, at = bytearray(), start  # read but not handed out yet, from byte `at` on
                while at + len(pending) < end:
                    want = end - at - len(pending)
                    block = f.read(min(READ_BYTES, want) if cuts else want)
                    if not block:
                        raise t.changed()
                    crc = zlib.crc32(block, crc)
                    searched = len(pending)  # no cut point lies before this: the last search looked there
                    pending += block
                    done = at + len(pending) == end
                    if done:
                        cut = len(pending)
                    elif cuts == "safe":
                        cut = last_safe_cut(pending, searched)
                    elif cuts == "chars":
                        cut = complete_utf8(pending)
                    else:
                        cut = 0
                    if cut:
                        yield split, bytes(pending[:cut]), eot and done, cut, t.name, at
                        del pending[:cut]
                        at += cut
            if f.read(1) or crc != t.crc:
                raise t.changed()


def piece_units(items: Iterable[Item], unit_bytes: int, cuttable: bool, sha=None) -> Iterator[tuple[tuple, int]]:
    """Group items into ("pieces", [(split_id, data, eot_after, name, offset, seen), ...]) units of about
    unit_bytes. seen: the characters beyond ASCII in the file's earlier pieces (up to utils.UTF8_EVIDENCE),
    which tell a worker that meets a byte that is not UTF-8 whether the file is UTF-8 with damaged bytes.

    Pieces are cut lazily, so the first unit goes out before a long text has been sliced; sha, if
    given, is updated with the pieces in order (for one file, or files in order: their bytes).
    """
    unit, size, progress = [], 0, 0
    seen = {}  # by file name
    for split, data, eot, prog, name, offset in items:
        pieces = cut_text(data, unit_bytes) if cuttable else iter([bytes(data)])
        n, cum = max(len(data), 1), 0
        piece = next(pieces)
        while piece is not None:
            following = next(pieces, None)
            last = following is None
            if sha is not None:
                sha.update(piece)
            before_piece = seen.get(name, 0)
            unit.append((SPLIT_IDS[split], piece, eot and last, name, offset + cum, before_piece))
            seen[name] = before_piece + utils.utf8_evidence(piece, utils.UTF8_EVIDENCE - before_piece)
            # each piece stands for its share of the item's progress
            before = prog * cum // n
            cum += len(piece)
            progress += (prog if last else prog * cum // n) - before
            size += len(piece)
            if size >= unit_bytes:
                yield ("pieces", unit), progress
                unit, size, progress = [], 0, 0
            piece = following
    if unit:
        yield ("pieces", unit), progress


def doc_units(docs: Iterable[tuple[str, int]], unit_size: int) -> Iterator[tuple[tuple, int]]:
    """Group (text, progress) documents into ("docs", texts) units of about unit_size characters."""
    texts, size, progress = [], 0, 0
    for text, prog in docs:
        texts.append(text)
        size += len(text)
        progress += prog
        if size >= unit_size:
            yield ("docs", texts), progress
            texts, size, progress = [], 0, 0
    if texts:
        yield ("docs", texts), progress


def jsonl_units(path: Path, unit_bytes: int, sha) -> Iterator[tuple[tuple, int]]:
    """("jsonl", ...) units of about unit_bytes of whole lines; sha is updated with the file's bytes. Each
    unit carries the characters beyond ASCII of the units before (piece_units says why)."""
    lineno, offset, seen = 1, 0, 0
    with reading(path), open(path, "rb") as f:
        while chunk := f.read(unit_bytes):
            chunk += f.readline()  # finish the line the block ends in
            sha.update(chunk)
            yield ("jsonl", str(path), lineno, offset, chunk, seen), len(chunk)
            lineno += chunk.count(b"\n")
            offset += len(chunk)
            seen += utils.utf8_evidence(chunk, utils.UTF8_EVIDENCE - seen)


def txt_documents(files: list[Path], val_fraction: float, counts: dict, sha=None) -> Iterator[Item]:
    """Each .txt file is one document; its split is chosen here so that a long one can be cut.

    sha, if given, hears of the byte-order marks left out (piece_units hashes the text after them)."""
    for f in files:
        with reading(f):
            data = f.read_bytes()
        skip = len(BOM) if data.startswith(BOM) else 0  # a byte-order mark is no text: left out
        if sha is not None:
            sha.update(data[:skip])  # the pieces that follow hash the rest: the file's bytes in order
        if len(data) == skip:
            counts["empty"] += 1
            continue
        text = data[skip:] if skip else data
        problem = utils.binary_problem(data)
        if problem:
            raise DataError(f"{f} is not text: {problem}")
        split = SPLITS[doc_split(text, val_fraction)[0]]  # the hash of UTF-8 text is the hash of its bytes
        counts[split] += 1
        yield split, text, True, len(data), str(f), skip


def import_parquet(path: Path):
    """pyarrow.parquet, or a DataError naming the Parquet file that needs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to .jsonl)") from None
    return pq


def parquet_documents(path: Path, sha) -> Iterator[tuple[str, int]]:
    """(text, file bytes it stands for) for each row of a Parquet file's "text" column (needs pyarrow)."""
    pq = import_parquet(path)
    with reading(path), open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    import pyarrow as pa
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # not Parquet at all, e.g. a git-lfs pointer or a cut download
        raise DataError(f"cannot read {path} as Parquet: {str(e).splitlines()[0][:200]}") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no \"text\" column (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"expected one document per row in a \"text\" column")
    kind = pf.schema_arrow.field("text").type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind  # dictionary-encoded strings are strings
    is_text = (getattr(pa.types, f"is_{name}", lambda t: False) for name in ("string", "large_string", "string_view"))
    if not any(test(values) for test in is_text):
        raise DataError(f"{path}: its \"text\" column holds {kind}, not strings; expected one document per row")
    size, rows, done = path.stat().st_size, max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            done += 1  # progress in file bytes, spread evenly over the rows
            yield text or "", size * done // rows - size * (done - 1) // rows


def local_units(files: list[Path], unit_bytes: int, val_fraction: float, sha, counts: dict,
                cuttable: bool) -> Iterator[tuple[tuple, int]]:
    """Work units for local .jsonl/.json (JSON Lines), .txt (one document each) and .parquet files, in order."""
    for suffix, group in itertools.groupby(files, key=lambda f: f.suffix.lower()):
        group = list(group)
        if suffix == ".txt":  # consecutive small files share units
            yield from piece_units(txt_documents(group, val_fraction, counts, sha), unit_bytes, cuttable, sha)
        for f in group if suffix != ".txt" else []:
            yield from (doc_units(parquet_documents(f, sha), unit_bytes) if suffix == ".parquet"
                        else jsonl_units(f, unit_bytes, sha))


def hf_units(name: str, num_proc: int, unit_bytes: int) -> tuple[Iterator[tuple[tuple, int]], int]:
    """Work units over the train split of a Hugging Face data set with a "text" column, and its size."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset openwebtext downloads {name!r} with Hugging Face datasets, which is not "
                        f"installed: pip install datasets. Or give local files: --input DOCS.jsonl (one "
                        f"{{\"text\": ...}} per line), or a folder of .jsonl/.txt/.parquet files") from None
    try:
        ds = datasets.load_dataset(name, split="train", num_proc=num_proc)
    except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise DataError(f"could not load the Hugging Face data set {name!r} ({type(e).__name__}: {e}). "
                        f"Offline, give local files instead: --input DOCS.jsonl or a folder") from e
    if "text" not in ds.column_names:
        raise DataError(f"the Hugging Face data set {name!r} has no \"text\" column ({', '.join(ds.column_names)})")
    docs = ((text or "", 1) for batch in ds.iter(batch_size=1024) for text in batch["text"])
    return doc_units(docs, unit_bytes), len(ds)


# -----------------------------------------------------------------------------
# tokenising units, in worker processes


def doc_split(text: str | bytes, val_fraction: float) -> tuple[int, bytes]:
    """(split id, 8-byte BLAKE2b digest) of a document: val (1) when the digest, read as a little-endian
    number over 2**64, is below val_fraction, else train (0)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int(int.from_bytes(digest, "little") < val_fraction * 2**64), digest


def parse_jsonl(where: str, lineno: int, offset: int, chunk: bytes, seen: int = 0) -> list[str]:
    """The "text" of each non-blank line of a JSON Lines chunk that starts at line lineno, byte offset.
    seen: the characters beyond ASCII before the chunk (utils.decode_utf8)."""
    texts = []
    for i, line in enumerate(chunk.split(b"\n")):
        here = f"{where} line {lineno + i}"
        text = decode_utf8(line, here, offset, seen)
        seen += utils.utf8_evidence(line, utils.UTF8_EVIDENCE - seen)
        offset += len(line) + 1
        if lineno + i == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark, as some Windows editors write
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        # ValueError: JSONDecodeError, or an integer of more than 4,300 digits; RecursionError: nested too deeply
        except (ValueError, RecursionError) as e:
            raise DataError(f"{here} is not JSON ({e}); expected JSON Lines: one object with a "
                            f"\"text\" string per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{here} has no \"text\" string; expected JSON Lines: one object with a "
                            f"\"text\" string per line, e.g. {{\"text\": \"Hello world\"}}")
        texts.append(obj["text"])
    return texts


def encode_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """tokenizer.encode_ordinary(text) as an array."""
    enc = getattr(tokenizer, "enc", None)
    if tokenizer.kind == "gpt2" and hasattr(enc, "encode_to_numpy"):
        # tiktoken hands over its Rust buffer: no Python int per token, about a third faster.
        # With nothing disallowed and nothing allowed, special-token text is ordinary text.
        try:
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # a lone surrogate (a JSON escape can make one): encode_ordinary copes
            pass
    if isinstance(tokenizer, BPETokenizer) and _stop is not None:
        # a BPE with a pattern of its own gets a whole split as one unit: minutes of encoding for a large
        # text, which the worker cuts short once the run stops
        return np.array(tokenizer.encode_ordinary(text, check=_check_stop), dtype=np.int64)
    return np.array(tokenizer.encode_ordinary(text), dtype=np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65,535 ids, uint32 beyond."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def pattern_gap(tokenizer: Tokenizer, text: str, pos: int, where: tuple[str, int]) -> DataError:
    """A --tokenizer_file whose own split pattern misses a character of this piece of a text file: the file
    and byte offset, and the way out, which is another tokenizer (prepare_data.py has no --pattern)."""
    name, offset = where
    byte = offset + len(text[:pos].encode("utf-8", "surrogatepass"))
    return DataError(f"{name} at byte {byte:,}: the tokenizer's split pattern {tokenizer.pattern!r} matches nothing "
                     f"at {text[pos:pos + 20]!r}, so its BPE would leave that text out; train a tokenizer whose "
                     f"pattern matches every character (`python tokenizer.py --train` without --pattern uses "
                     f"GPT-2's)")


def encode_unit(tokenizer: Tokenizer, unit: tuple, dtype: np.dtype, val_fraction: float) -> tuple:
    """One work unit -> (train ids, val ids, [train, val, empty documents, end-of-text markers] counts, document
    digests).

    In text files (not in JSON Lines or Parquet documents, whose format separates them) '<|endoftext|>' written
    out is a document separator: it becomes the end-of-text id where the tokenizer has one, as the BPE trainer
    splits its text there. A read block never ends inside one, as it holds no cut point; only the cut between
    the splits can, at most once per file."""
    kind, *payload = unit
    counts, digests = [0, 0, 0, 0], []
    if kind == "pieces":
        items = [(split_id, decode_utf8(data, name, offset, seen=seen), eot, (name, offset))
                 for split_id, data, eot, name, offset, seen in payload[0]]
    elif kind in ("jsonl", "docs"):
        items = []
        for text in parse_jsonl(*payload) if kind == "jsonl" else payload[0]:
            if not text:
                counts[2] += 1
                continue
            split_id, digest = doc_split(text, val_fraction)
            counts[split_id] += 1
            digests.append(digest)
            items.append((split_id, text, True, None))
    else:
        raise ValueError(f"unknown work unit kind {kind!r}")
    parts = ([], [])
    eot = None if tokenizer.eot_token is None else np.array([tokenizer.eot_token])
    for split_id, text, eot_after, where in items:
        at = 0  # where the text between markers starts
        for i, between in enumerate(text.split(EOT) if eot is not None and kind == "pieces" else [text]):
            if i:
                parts[split_id].append(eot)
                counts[3] += 1
            try:
                if between:
                    parts[split_id].append(encode_ids(tokenizer, between))
            except PatternGapError as e:
                if where is None:  # documents are GPT-2's, whose pattern misses nothing
                    raise
                raise pattern_gap(tokenizer, text, at + e.position, where) from None
            except TokenizerError:
                # a character-level tokenizer knows every character the files held when scanned, as it was made
                # from them or checked against them (check_known_characters): a new one was written since
                if where is None or tokenizer.kind != "char":
                    raise
                raise changed_error(where[0]) from None
            at += len(between) + len(EOT)
        if eot_after and eot is not None:
            parts[split_id].append(eot)
    out = []
    for p in parts:
        ids = np.concatenate(p) if p else np.zeros(0, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise RuntimeError(f"the {tokenizer.kind} tokenizer produced an id outside 0..{tokenizer.vocab_size - 1}")
        out.append(ids.astype(dtype))
    return out[0], out[1], counts, b"".join(digests)


_worker: tuple | None = None  # (tokenizer, dtype, val_fraction) in a worker process
_stop = None  # in a worker process: the pool's flag (a shared byte), 1 once the parent stops taking results


class UnitAbandoned(Exception):
    """A worker's unit cut short because the run stopped; nobody reads its result."""


def _check_stop() -> None:
    if _stop is not None and _stop.value:
        raise UnitAbandoned


def _init_worker(tokenizer: Tokenizer | dict, dtype: str, val_fraction: float, stop=None) -> None:
    global _worker, _stop
    # the parent lets each worker finish its unit (or stop it at a check, see encode_ids) and then ends the pool:
    # a worker killed by Ctrl-C while it sends a result would leave the parent reading the rest of it forever
    become_pool_worker()
    tokenizer = tokenizer_from_dict(tokenizer) if isinstance(tokenizer, dict) else tokenizer
    _worker, _stop = (tokenizer, np.dtype(dtype), val_fraction), stop


def _encode_in_worker(unit: tuple) -> tuple:
    tokenizer, dtype, val_fraction = _worker
    return encode_unit(tokenizer, unit, dtype, val_fraction)


def encode_units(tokenizer: Tokenizer, units: Iterable[tuple[tuple, int]], num_proc: int, dtype: np.dtype,
                 val_fraction: float) -> Iterator[tuple[int, tuple]]:
    """(progress, encode_unit's result) for each unit, in order, computed by num_proc worker processes.

    At most 2 * num_proc units are in flight, so memory stays bounded whatever the input size.
    A single unit, or num_proc 1, is encoded in this process.
    """
    units = iter(units)
    head = list(itertools.islice(units, 2))
    if len(head) < 2 or num_proc <= 1:
        for unit, progress in itertools.chain(head, units):
            yield progress, encode_unit(tokenizer, unit, dtype, val_fraction)
        return
    # a forked worker inherits the tokenizer as it is (loading tiktoken's files takes ~0.5 s); other
    # start methods pickle the arguments, so they get the plain-data description instead
    fork = multiprocessing.get_start_method() == "fork"
    if sys.platform == "win32":  # Windows waits on at most 63 handles at once: its executors take 61 workers
        num_proc = min(num_proc, 61)
    # a plain shared byte, not an Event: reading an Event takes its lock, which a worker killed meanwhile (by the
    # system, or below after another died) would keep forever, and the parent's set() would wait for it
    stop = multiprocessing.get_context().RawValue("b", 0)
    initargs = (tokenizer if fork else tokenizer.to_dict(), dtype.str, val_fraction, stop)
    # an executor, not multiprocessing.Pool: when the system kills a worker (out of memory), the Pool
    # starts another and waits for the lost result forever, where the executor raises BrokenProcessPool
    others = set(multiprocessing.active_children())  # children that are not the pool's (a caller's)
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(), initializer=_init_worker,
                               initargs=initargs)
    try:
        pending = deque()
        for unit, progress in itertools.chain(head, units):
            pending.append((progress, pool.submit(_encode_in_worker, unit)))
            if len(pending) >= 2 * num_proc:
                progress, result = pending.popleft()
                yield progress, result.result()
        while pending:
            progress, result = pending.popleft()
            yield progress, result.result()
    except BrokenProcessPool:
        # The survivors ignore SIGTERM, the only signal the executor sends them, and one may be blocked
        # writing its result into a pipe that nobody reads any more: shutdown() would wait for it forever
        for worker in set(multiprocessing.active_children()) - others:
            worker.kill()
        if sys.version_info < (3, 11, 5):  # Debian 12's python3 is 3.11.2
            # the executor's own thread may be blocked writing the next unit for the dead workers, and
            # shutdown() would wait for it forever; closing the reading end makes that write fail, as
            # Python does itself from 3.11.5 on (CPython issue 94777)
            with contextlib.suppress(Exception):
                pool._call_queue._reader.close()
        raise DataError(f"a tokenising process died (killed by the system: out of memory?); nothing was "
                        f"written. Try again with fewer processes, e.g. --num_proc {max(1, num_proc // 2)}") from None
    finally:  # an error, Ctrl-C, or the caller stopped: the units not begun are dropped, a unit (~1 MB) each ends,
        stop.value = 1  # and a whole split for a BPE with a pattern of its own stops at its next check
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# writing a data set

_claimed: dict[Path, list[Path]] = {}  # output folder (resolved) -> the folders its claim made, while held


def busy(out_dir: Path) -> DataError:
    return DataError(f"another prepare_data.py{lock_holder(out_dir)} is writing into {out_dir}; wait for it to finish, "
                     f"or give another --output_dir")


@contextlib.contextmanager
def claim_output_dir(out_dir: Path) -> Iterator[None]:
    """Make out_dir and hold its lock for the whole run, from before the input is read: a second run into the
    same folder is refused at once, not after minutes of reading or BPE training, only for the first run to
    replace its data set later. write_dataset then works under this lock. A run that fails takes away the
    folders it made, where they are empty, before it lets go of the lock."""
    made = missing_folders(out_dir)  # deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty_folders(made)
        raise DataError(f"cannot write the data set into {out_dir}: {e.strerror or e}") from None
    key = out_dir.resolve()
    with folder_lock(out_dir) as held:
        if not held:
            raise busy(out_dir)  # its folders, maybe: none removed
        _claimed[key] = made
        try:
            yield
        except BaseException:
            remove_empty_folders(made)  # what write_dataset has not removed already
            raise
        finally:
            del _claimed[key]


def write_dataset(out_dir: Path, tokenizer: Tokenizer, units: Iterable[tuple[tuple, int]], *, num_proc: int,
                  val_fraction: float, progress: tuple[str, int | None], meta: dict, late_meta=None) -> dict:
    """Encode units into out_dir/{train,val}.bin, with tokenizer.json and meta.json beside them.

    progress is (unit, total) for the progress bar: unit 'bytes' or 'docs', total None if unknown.
    meta holds the description fields (dataset, source, ...); the token counts are added here, and
    late_meta(documents, digests_sha256) is called once the units are exhausted for fields
    gathered while streaming: documents is [train, val, empty, end-of-text markers], digests_sha256 the
    sha256 of the documents' BLAKE2b digests in order.

    Every file is written and synced under a temporary name first; the old data set is touched only
    then, by renames, meta.json last. A run that fails before keeps the old data set whole, and takes
    away the folders it made. Under claim_output_dir the folder is made and locked already.
    """
    claimed = _claimed.get(out_dir.resolve())
    made = missing_folders(out_dir) if claimed is None else claimed  # deepest first
    dtype = token_dtype(tokenizer.vocab_size)
    retired = out_dir / ".meta.json.replaced"
    bins_before = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            # entered first, so left last: from the first rename below until every file is in place and settled
            held = stack.enter_context(HeldSignals("the signal came while the finished data set was put in "
                                                   "place; it is complete and kept"))
            if claimed is None and not stack.enter_context(folder_lock(out_dir)):
                made = []  # the other run's folders, not this one's
                raise busy(out_dir)

            def settle(error_type, *_) -> None:
                """Runs after the files below are renamed or removed, and before the lock is released: a run
                that starts now must neither begin writing into a folder about to be removed, nor have its
                own stepped-aside meta.json deleted by this one."""
                if error_type is not None and retired.exists() and _identities(out_dir) == bins_before:
                    os.replace(retired, out_dir / "meta.json")  # no .bin file was replaced after all
                retired.unlink(missing_ok=True)  # it described .bin files that are no longer there
                if error_type is None:
                    return
                # only what this run made: another run may have put a data set beside out_dir meanwhile
                if out_dir.resolve() in made:
                    shutil.rmtree(out_dir.resolve(), ignore_errors=True)
                remove_empty_folders(made)
                made.clear()  # done, while the lock was held
            stack.push(settle)
            # a killed run's leftovers, not those of a run beside this one (the lock): its temporary
            # files, and a meta.json it had stepped aside, which no longer describes the .bin files
            remove_unfinished_writes(out_dir, "|".join(re.escape(name) for name in DATASET_FILES))
            retired.unlink(missing_ok=True)
            # entered in this order, renamed in the reverse one as the block ends: the .bin files,
            # tokenizer.json, and meta.json, which says the data set is complete, last
            meta_file = stack.enter_context(atomic_open(out_dir / "meta.json", "w"))
            tokenizer_file = stack.enter_context(atomic_open(out_dir / "tokenizer.json", "w"))
            bins = [stack.enter_context(atomic_open(out_dir / f"{split}.bin", "wb")) for split in SPLITS]
            tokens, documents, digests = _encode_into(bins, tokenizer, dtype, units, num_proc, val_fraction, progress)
            tokenizer_file.write(tokenizer.to_json())
            meta = {
                **meta,
                "tokenizer": tokenizer.kind,
                "tokenizer_file": "tokenizer.json",
                "vocab_size": tokenizer.vocab_size,
                "eot_token": tokenizer.eot_token,
                "dtype": dtype.name,
                "train_tokens": tokens[0],
                "val_tokens": tokens[1],
                **({"eot_markers_in_text": documents[3]} if documents[3] else {}),
                **(late_meta(documents, digests.hexdigest()) if late_meta else {}),
            }
            text = json.dumps(meta, indent=2, ensure_ascii=False)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a path or argument in bytes that are not UTF-8 (a GBK file name, say):
                text = json.dumps(meta, indent=2)  # \u escapes keep its surrogates, which UTF-8 cannot
            meta_file.write(text + "\n")
            for f in (meta_file, tokenizer_file, *bins):  # a full disk fails here, with the old data set whole
                f.flush()
                os.fsync(f.fileno())
            # until the new meta.json lands the folder holds no complete data set: the old meta.json
            # steps aside, and comes back if no .bin file was replaced after all
            held.hold()  # a signal now would leave neither data set whole
            bins_before = _identities(out_dir)
            if (out_dir / "meta.json").exists():
                os.replace(out_dir / "meta.json", retired)
    except BaseException as e:
        remove_empty_folders(made)
        if isinstance(e, OSError):  # a folder that cannot be written, a full disk, ...
            raise DataError(f"cannot write the data set into {out_dir}: {e.strerror or e}"
                            + (f" ({e.filename})" if e.filename else "")) from None
        raise
    if documents[3]:
        print(f"note: {documents[3]:,} {EOT!r} written in the text became the end-of-text id {tokenizer.eot_token}, "
              f"a boundary between documents; remove them from the text if they were meant as text", file=sys.stderr)
    return meta


def _identities(out_dir: Path) -> list:
    """(device, inode) of train.bin and val.bin, None where absent: whether a rename replaced them."""
    return [(s.st_dev, s.st_ino) if (s := _stat(out_dir / f"{split}.bin")) else None for split in SPLITS]


def _stat(path: Path):
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _encode_into(bins: list, tokenizer: Tokenizer, dtype, units, num_proc: int, val_fraction: float,
                 progress: tuple[str, int | None]) -> tuple:
    """Encode units into the open train and val files; returns the token counts per split, the
    counts [train, val, empty documents, end-of-text markers] and the sha256 of the documents' digests."""
    tokens, documents, digests = [0, 0], [0, 0, 0, 0], hashlib.sha256()
    bar = Progress(total=progress[1], unit=PROGRESS_UNITS[progress[0]], unit_scale=True, file=sys.stderr,
                   desc=f"tokenising ({tokenizer.kind})", mininterval=1.0)
    with bar:
        for done, (train, val, counts, unit_digests) in encode_units(tokenizer, units, num_proc, dtype, val_fraction):
            for i, ids in enumerate((train, val)):
                bins[i].write(ids.tobytes())
                tokens[i] += ids.size
            documents = [a + b for a, b in zip(documents, counts)]
            digests.update(unit_digests)
            bar.update(done)
    if tokens == [0, 0]:  # no --val_fraction helps here
        empty = f" ({documents[2]:,} document(s), all empty)" if documents[2] else ""
        raise DataError(f"the input holds no text to train on{empty}; check that --input is the text you meant")
    for split, n in zip(SPLITS, tokens):
        if n < 2:  # the temporary files are removed: no empty bin is left behind
            more = "smaller" if split == "train" else "larger"
            # a window needs block_size + 1 tokens: one token holds none, for any block_size
            what = "came out empty" if n == 0 else "holds a single token, too few for any training window"
            raise DataError(f"the {split} split {what} ({tokens[0]} train / {tokens[1]} val tokens); "
                            f"give more text or a {more} --val_fraction (now {val_fraction})")
    return tokens, documents, digests


def load_tokenizer_file(path: str) -> Tokenizer:
    """--tokenizer_file: a tokenizer this project saved, or a DataError that says what the file is not."""
    if not Path(path).is_file():
        raise DataError(f"--tokenizer_file {path!r} is not a file; give a tokenizer.json of a prepared data set, an "
                        f"export's toolkit_tokenizer.json, or what tokenizer.py --train wrote")
    try:
        return load_tokenizer(path)
    except UserError as e:
        hint = (" (an export's tokenizer.json is transformers' own: give the toolkit_tokenizer.json beside it)"
                if Path(path).name == "tokenizer.json" and (Path(path).parent / "config.json").is_file() else "")
        raise DataError(f"--tokenizer_file {path}: {e}{hint}") from None


def check_known_characters(tok: CharTokenizer, texts: list[TextFile]) -> None:
    """With a given character set, text with a character outside it cannot be encoded: say so before the work."""
    known = set(tok.chars)
    for t in texts:
        unknown = set(t.charset) - known
        if unknown:
            shown = ", ".join(repr(c) for c in sorted(unknown)[:5])
            raise DataError(f"{t.name} has {len(unknown)} character(s) that the given character-level tokenizer "
                            f"does not know ({shown}{', ...' if len(unknown) > 5 else ''}); its ids cover only "
                            f"the characters of the text it was made from")


def build_tokenizer(kind: str | Tokenizer, texts: list[TextFile], ranges: list[tuple],
                    vocab_size: int | None) -> Tokenizer:
    if isinstance(kind, Tokenizer):  # --tokenizer_file
        if isinstance(kind, CharTokenizer):
            check_known_characters(kind, texts)
        return kind
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":  # every character of both splits must be known: scan() gathered them
        return CharTokenizer.from_text("".join(sorted(set().union(*(t.charset for t in texts)))))
    # BPE learns from the training split only, so val stays unseen text. scan() has decoded all of it
    # already, so bad UTF-8 anywhere is reported before a long training, not after it. End-of-text goes
    # between files, as in the encoded data: the trainer splits the text there, so no merge joins the end
    # of one file to the start of the next
    train = [(texts[i], start, end, eot) for split, i, start, end, eot in ranges if split == "train"]
    train_text = "".join(decode_utf8(t.read(start, end), t.name, start) + (EOT if eot else "")
                         for t, start, end, eot in train)
    markers = sum(eot for *_, eot in train)
    print(f"training a BPE tokenizer, vocab_size {vocab_size}, on {len(train_text) - markers * len(EOT):,} characters"
          + (f" of {len(train)} files" if len(train) > 1 else ""), file=sys.stderr)
    return BPETokenizer().train(train_text, vocab_size, verbose=True, special_tokens=[EOT])


def prepare_text(out_dir: Path, files: list[Path], *, dataset: str, tokenizer: str | Tokenizer, vocab_size: int | None,
                 val_fraction: float, num_proc: int, command: str, unit_bytes: int = UNIT_BYTES,
                 input_path: str | None = None) -> dict:
    """shakespeare and custom: count the files' characters, cut at the character fraction, tokenise, write.

    input_path is the folder the files were listed from (--input), named in meta.json's source. tokenizer is
    'gpt2', 'char' or 'bpe', to make one, or a Tokenizer to encode with.
    """
    # the text is decoded in this process only where the tokenizer is made from it or must know every character
    decode = tokenizer in ("char", "bpe") if isinstance(tokenizer, str) else isinstance(tokenizer, CharTokenizer)
    texts, sha256 = scan_files(files, decode)
    ranges = split_ranges(texts, val_fraction)
    tok = build_tokenizer(tokenizer, texts, ranges, vocab_size)
    names = [t.name for t in texts]
    meta = {
        "dataset": dataset,
        "source": names[0] if len(files) == 1 else
                  f"{len(files)} .txt files under {input_path or os.path.commonpath(names)}",
        "val_fraction": val_fraction,
        "split": f"first {1 - val_fraction:.6g} of the characters train, the rest val",
        "command": command,
    }
    items = text_items(texts, ranges, cut_kind(tok))
    text_bytes = sum(end - start for _, _, start, end, _ in ranges)
    return write_dataset(out_dir, tok, piece_units(items, unit_bytes, can_cut(tok)), num_proc=num_proc,
                         val_fraction=val_fraction, progress=("bytes", text_bytes), meta=meta,
                         late_meta=lambda *_: {"source_sha256": sha256})


def prepare_documents(out_dir: Path, input_path: str | None, *, hf_name: str, val_fraction: float, num_proc: int,
                      command: str, unit_bytes: int = UNIT_BYTES) -> dict:
    """openwebtext: stream documents (local files or Hugging Face), GPT-2 tokens, end-of-text after each."""
    tok = GPT2Tokenizer()
    txt_counts = {"train": 0, "val": 0, "empty": 0}  # .txt documents are split in this process
    sha = hashlib.sha256()
    if input_path:
        files, size = input_files(Path(input_path), DOC_SUFFIXES, file_suffixes=DOC_FILE_SUFFIXES)
        # before any tokenising, not when the first Parquet file comes up, maybe hours into the run
        parquet = next((f for f in files if f.suffix.lower() == ".parquet"), None)
        if parquet is not None:
            import_parquet(parquet)
        units = local_units(files, unit_bytes, val_fraction, sha, txt_counts, can_cut(tok))
        progress = ("bytes", size)
        source = str(files[0]) if len(files) == 1 else f"{len(files)} files under {input_path}"
    else:
        units, n_docs = hf_units(hf_name, num_proc, unit_bytes)
        progress, source = ("docs", n_docs), f"huggingface:{hf_name}"
    meta = {
        "dataset": "openwebtext",
        "source": source,
        "val_fraction": val_fraction,
        "split": "per document: val when blake2b(utf8(text), digest_size=8) as a little-endian integer "
                 "/ 2**64 < val_fraction",
        "command": command,
    }

    def late_meta(documents: list[int], digests_sha256: str) -> dict:
        if input_path:
            sha_fields = {"source_sha256": sha.hexdigest(), "source_sha256_of": "the input files' bytes, in order"}
        else:  # no file to hash: fingerprint the documents instead
            sha_fields = {"source_sha256": digests_sha256,
                          "source_sha256_of": "the 8-byte BLAKE2b digests of the non-empty documents, in order"}
        return {**sha_fields, "train_documents": documents[0] + txt_counts["train"],
                "val_documents": documents[1] + txt_counts["val"],
                "empty_documents": documents[2] + txt_counts["empty"]}

    return write_dataset(out_dir, tok, units, num_proc=num_proc, val_fraction=val_fraction, progress=progress,
                         meta=meta, late_meta=late_meta)


# -----------------------------------------------------------------------------
# command line


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM (kill, a job scheduler's stop) and SIGHUP (the terminal closed, SSH dropped)
    raise KeyboardInterrupt, so they end the worker pool and remove the partial files the way Ctrl-C does;
    a SIGHUP that is ignored already (nohup) stays ignored. The old handlers are restored after."""
    with stop_signals_raise(lambda signum: KeyboardInterrupt()):  # run_cli: "interrupted", exit code 130
        yield


def check_output_dir(out_dir: Path) -> None:
    """DataError unless out_dir is a writable folder or can be made one; checked before any long work."""
    problem = folder_problem(out_dir)
    if problem:
        raise DataError(f"--output_dir {str(out_dir)!r} {problem}; a data set is a folder (train.bin, val.bin, "
                        f"tokenizer.json, meta.json): pass the path of a folder you can write to, new or existing")


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_num_proc(num_proc: int, error: type = DataError) -> None:
    """1 to 4 processes a core: tokenising is bound by the cores, so more only take memory (and a typo of a
    huge number would start thousands)."""
    most = 4 * default_num_proc()
    if not 1 <= num_proc <= most:
        raise error(f"--num_proc must be between 1 and {most} (4 a core on this machine's {most // 4}), got "
                    f"{num_proc}; the default is one a core")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["shakespeare", "custom", "openwebtext"], help="what to prepare")
    p.add_argument("--tokenizer", choices=["gpt2", "char", "bpe"], default=None,
                   help="gpt2: tiktoken's GPT-2 BPE; char: one id per character; bpe: train a byte-level BPE "
                        "(default gpt2)")
    p.add_argument("--tokenizer_file", type=path_arg, default=None, metavar="FILE",
                   help="encode with this saved tokenizer instead of making one: a data set's tokenizer.json, an "
                        "export's toolkit_tokenizer.json, or tokenizer.py --train's output (fine-tuning a model "
                        "on new text needs the model's own tokenizer)")
    p.add_argument("--input", type=path_arg, default=None,
                   help="shakespeare: a local input.txt (else $SHAKESPEARE, else download); custom: a text file "
                        "or a folder of .txt files; openwebtext: local .jsonl/.txt/.parquet files (or a .json "
                        "file of JSON Lines) or a folder of them")
    p.add_argument("--output_dir", type=path_arg, default=None,
                   help="where the data set goes (default: ./data/shakespeare[_char|_bpe], ./data/openwebtext, "
                        "./data/<input name without its extension> for custom)")
    p.add_argument("--vocab_size", type=int, default=None,
                   help=f"bpe only: vocabulary size, <|endoftext|> included (default {DEFAULT_BPE_VOCAB})")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="share of the text held out for validation (default 0.1; openwebtext 0.0005 of the documents)")
    p.add_argument("--num_proc", type=int, default=default_num_proc(),
                   help="tokenising processes (default: every core, %(default)s)")
    p.add_argument("--hf_dataset", default=None,
                   help="openwebtext without --input: the Hugging Face data set to load, with a \"text\" column "
                        "(default openwebtext)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start_process_helpers()
    check_num_proc(args.num_proc)
    if args.dataset is None:
        raise DataError("say what to prepare: --dataset shakespeare, --dataset custom --input FILE, or "
                        "--dataset openwebtext (python prepare_data.py --help lists the options)")
    if args.tokenizer_file is not None and (args.tokenizer is not None or args.vocab_size is not None):
        raise DataError("--tokenizer_file brings its own tokenizer: leave out --tokenizer and --vocab_size")
    if args.tokenizer_file is not None and args.output_dir is None:  # the default folders are the made tokenizers'
        raise DataError("--tokenizer_file needs --output_dir: the default folders (data/shakespeare_char, data/<input "
                        "name>) belong to data sets whose tokenizer is made from their text, and would be replaced")
    given = load_tokenizer_file(args.tokenizer_file) if args.tokenizer_file is not None else None
    dataset, kind = args.dataset, given.kind if given is not None else args.tokenizer or "gpt2"
    val_fraction = DEFAULT_VAL_FRACTION[dataset] if args.val_fraction is None else args.val_fraction
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; e.g. 0.1")
    if args.vocab_size is not None and kind != "bpe":
        raise DataError(f"--vocab_size applies to --tokenizer bpe only; the {kind} tokenizer's vocabulary is fixed")
    if args.vocab_size is not None:  # before the text is read
        check_bpe_vocab_size(args.vocab_size, specials=1)  # <|endoftext|>
    if dataset == "openwebtext" and kind != "gpt2":
        given_as = f"--tokenizer_file {args.tokenizer_file}" if given is not None else f"--tokenizer {kind}"
        raise DataError(f"--dataset openwebtext is tokenised with GPT-2 only, got {given_as}; for another "
                        f"tokenizer use --dataset custom --input TEXT {given_as}")
    if args.hf_dataset is not None and (dataset != "openwebtext" or args.input):
        beside = "--input" if dataset == "openwebtext" else f"--dataset {dataset}"
        raise DataError(f"--hf_dataset names the Hugging Face data set that --dataset openwebtext downloads without "
                        f"--input; it does nothing with {beside}: leave it out")
    if dataset == "custom" and not args.input:
        raise DataError("--dataset custom needs --input: a UTF-8 text file, or a folder of .txt files")
    if args.output_dir:
        out_dir = Path(args.output_dir)
    elif dataset == "custom":
        # <(zcat a.gz) is /dev/fd/63 -> pipe:[137773]: a new folder each run, named so that shells trip on it
        # (a named pipe, made by mkfifo, keeps its name; a device goes on to input_files' message)
        if Path(args.input).expanduser().resolve().name.startswith(("pipe:", "socket:")):
            raise DataError(f"--input {args.input} is an unnamed pipe, whose name says nothing of the text and "
                            f"changes from run to run; say where the data set goes, e.g. --output_dir data/mine")
        out_dir = custom_data_dir(args.input)
    else:
        out_dir = Path(DEFAULT_DATA_DIRS[dataset, kind])
    check_output_dir(out_dir)
    command = shlex.join(["python", "prepare_data.py", *argv])

    with sigterm_as_interrupt(), claim_output_dir(out_dir):
        if dataset == "openwebtext":
            meta = prepare_documents(out_dir, args.input, hf_name=args.hf_dataset or "openwebtext",
                                     val_fraction=val_fraction, num_proc=args.num_proc, command=command)
        else:
            files = ([shakespeare_file(args.input, out_dir)] if dataset == "shakespeare"
                     else input_files(Path(args.input), (".txt",))[0])
            if dataset == "custom" and files[0].suffix.lower() in (".jsonl", ".json"):
                print(f"note: {files[0]} is read as plain text, its JSON syntax included; --dataset openwebtext "
                      f"--input {shlex.quote(str(files[0]))} reads the \"text\" field of each line (GPT-2 tokenizer)",
                      file=sys.stderr)
            vocab_size = DEFAULT_BPE_VOCAB if args.vocab_size is None else args.vocab_size
            meta = prepare_text(out_dir, files, dataset=dataset, tokenizer=given or kind, val_fraction=val_fraction,
                                vocab_size=vocab_size if kind == "bpe" else None, num_proc=args.num_proc,
                                command=command, input_path=args.input)
    utils.print_result(f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
                       f"({meta['tokenizer']}, vocab_size {meta['vocab_size']}, {meta['dtype']})")
    return meta


if __name__ == "__main__":
    run_cli(main)
