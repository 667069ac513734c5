"""Loading a prepared data set: meta.json, the tokenizer and random (x, y) batches from train.bin / val.bin.

prepare_data.py writes a data directory; train.py reads it through this module:

    from data import BatchLoader, load_meta, load_data_tokenizer, check_vocab
    meta = load_meta("data/shakespeare_char")           # vocab_size, dtype, token counts, ...
    check_vocab(meta["vocab_size"], config.vocab_size)  # before building the model
    with BatchLoader("data/shakespeare_char", block_size=256, batch_size=64, device="cuda") as loader:
        x, y = loader.get_batch("train", index=it)       # (B, T) int64 each, y is x shifted by one

A data directory holds train.bin and val.bin (token ids, uint16 or uint32 as meta.json says),
tokenizer.json (the tokenizer that made them) and meta.json, which prepare_data.py writes last:
its presence means the data set is complete.

Batches are a pure function of (seed, split, rank, index), so a resumed run draws exactly the
batches it would have drawn without the interruption, and each DDP rank draws its own windows.
The bins are memory-mapped afresh for every batch: one long-lived np.memmap makes the process's
memory grow over a long run, as nanoGPT notes in its get_batch.
"""
from __future__ import annotations  # torch's types in signatures stay names: this module imports torch late

import contextlib
import json
import shlex
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils import Progress, UserError, folders_holding, near_miss

if TYPE_CHECKING:  # for the annotations only: torch itself is imported where batches are made
    import torch

SPLITS = ("train", "val")
SPLIT_IDS = {"train": 0, "val": 1}  # mixed into the batch RNG's seed, so the splits draw independently
DTYPES = ("uint16", "uint32")  # token storage; uint32 only when the vocabulary exceeds 65,535 ids
META_KEYS = ("tokenizer", "tokenizer_file", "vocab_size", "eot_token", "dtype", "train_tokens", "val_tokens")
# the loader reads the bins whole at start to check their ids: about 0.25 s per GB from memory (2-core CPU),
# longer from a disk; beyond this size it says why the start waits
ID_CHECK_NOTE_BYTES = 1 << 31

# where `python prepare_data.py --dataset D --tokenizer T` writes by default, relative to the working
# directory; config.py's data_dir defaults point here, and errors about a missing data set use it
DEFAULT_DATA_DIRS = {
    ("shakespeare", "gpt2"): "data/shakespeare",
    ("shakespeare", "char"): "data/shakespeare_char",
    ("shakespeare", "bpe"): "data/shakespeare_bpe",
    ("openwebtext", "gpt2"): "data/openwebtext",
}


def custom_data_dir(input_path: str | Path) -> Path:
    """Where `prepare_data.py --dataset custom --input PATH` writes by default: data/<PATH's name without its
    extension>, as data/my for my.txt."""
    return Path("data") / (Path(input_path).resolve().stem or "custom")


class DataError(UserError):
    """A data set that is missing, incomplete or does not fit the run; the message says how to fix it."""


class DamagedBatchError(DataError):
    """A batch that can no longer be trusted: its .bin file was replaced or changed since the loader checked
    it whole, or it holds an id beyond the vocabulary. Under torchrun only the process that drew it knows."""
    per_process = True


def prepare_command(data_dir: str | Path) -> str:
    """The prepare_data.py command that creates `data_dir`.

    data/shakespeare_char -> python prepare_data.py --dataset shakespeare --tokenizer char
    /tmp/shakespeare      -> python prepare_data.py --dataset shakespeare --output_dir /tmp/shakespeare
    /tmp/mine             -> python prepare_data.py --dataset custom --input YOUR_TEXT.txt --tokenizer gpt2 \
                             --output_dir /tmp/mine
    A custom folder that still holds its tokenizer.json (a preparation killed before meta.json) gets that
    tokenizer's kind, char or bpe (with its vocab_size), and not gpt2: the command is to make the same data set
    again.
    """
    data_dir = Path(data_dir)
    for (dataset, tokenizer), default in DEFAULT_DATA_DIRS.items():
        if data_dir.name == Path(default).name:
            cmd = f"python prepare_data.py --dataset {dataset}"
            if tokenizer != "gpt2":
                cmd += f" --tokenizer {tokenizer}"
            if data_dir.resolve() != Path(default).resolve():
                cmd += f" --output_dir {shlex.quote(str(data_dir))}"
            return cmd
    kind = "gpt2"
    if (data_dir / "tokenizer.json").is_file():
        from tokenizer import TokenizerError, load_tokenizer
        with contextlib.suppress(TokenizerError):  # unreadable or no tokenizer: the command for any custom text
            tokenizer = load_tokenizer(data_dir / "tokenizer.json")
            if tokenizer.kind in ("char", "bpe"):  # a BPE trained again to the size it had
                kind = tokenizer.kind + (f" --vocab_size {tokenizer.vocab_size}" if tokenizer.kind == "bpe" else "")
    return (f"python prepare_data.py --dataset custom --input YOUR_TEXT.txt --tokenizer {kind} "
            f"--output_dir {shlex.quote(str(data_dir))}")


def load_meta(data_dir: str | Path) -> dict:
    """Read and check `data_dir`/meta.json; a missing or broken one is a DataError naming the fix."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if data_dir.is_file():  # one of a data set's files (input.txt too), or the raw text itself
        if (data_dir.parent / "meta.json").is_file():
            raise DataError(f"--data_dir {str(data_dir)!r} is a file of a data set; give the folder that holds it: "
                            f"--data_dir={shlex.quote(str(data_dir.parent))}")
        out = shlex.quote(str(custom_data_dir(data_dir)))
        raise DataError(f"--data_dir {str(data_dir)!r} is a file, not a prepared data set (a folder). If it is your "
                        f"text, prepare it with: python prepare_data.py --dataset custom --input "
                        f"{shlex.quote(str(data_dir))} --tokenizer gpt2 --output_dir {out}, then give --data_dir={out}")
    if not path.is_file():
        # a typo beside a prepared data set (data/shakespear_char) is its name misspelled; a default folder
        # (data/shakespeare beside data/shakespeare_char) is another data set, which prepare_command names
        defaults = {Path(d).name for d in DEFAULT_DATA_DIRS.values()}
        if not data_dir.exists() and data_dir.name not in defaults:
            meant = near_miss(data_dir.name, [p.name for p in folders_holding(data_dir.parent, ("meta.json",))])
            if meant:
                raise DataError(f"data directory {str(data_dir)!r} does not exist; did you mean "
                                f"--data_dir={shlex.quote(str(data_dir.parent / meant))}, a prepared data set?")
        what = ("does not exist" if not data_dir.exists()
                else "has no meta.json (not prepared, or preparation did not finish)")
        raise DataError(f"data directory {str(data_dir)!r} {what}. Prepare it with: {prepare_command(data_dir)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as e:  # the data set is fine: this user may not read it
        raise DataError(f"cannot read {path}: {e.strerror}; make it readable (and its folder), e.g. chmod a+r "
                        f"{shlex.quote(str(path))}") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an integer too long
        raise DataError(f"cannot read {path}: {e}. Prepare the data set again with: {prepare_command(data_dir)}") from e
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; it was not written by this version of "
                        f"prepare_data.py. Prepare the data set again with: {remake_command(data_dir, meta)}")
    bad = [k for k in ("vocab_size", "train_tokens", "val_tokens")
           if not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < 0]
    bad += [] if isinstance(meta["tokenizer_file"], str) else ["tokenizer_file"]
    if bad:
        raise DataError(f"{path} has a bad {', '.join(f'{k} ({meta[k]!r})' for k in bad)}: counts are whole numbers "
                        f"and tokenizer_file a file name. Prepare the data set again with: "
                        f"{remake_command(data_dir, meta)}")
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{path} says dtype {meta['dtype']!r}; expected one of {', '.join(DTYPES)}. "
                        f"Prepare the data set again with: {remake_command(data_dir, meta)}")
    return meta


CHANGED = "was replaced or changed since the run started (prepared again?)"


def _identity(path: Path) -> tuple:
    """What tells a file from another put in its place (prepare_data.py renames new files over the old), or
    from itself grown, cut or written over in place: device, inode, size and modification time."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remake_command(data_dir: Path, meta: dict) -> str:
    """The command recorded in meta.json, writing into data_dir (the data set may have been copied or
    renamed since, and the recorded command names its old folder or none); else the default for data_dir."""
    cmd = meta.get("command") if isinstance(meta, dict) else None
    try:
        words = shlex.split(cmd) if isinstance(cmd, str) else []
    except ValueError:  # unbalanced quotes: not a command this project wrote
        words = []
    if not words:
        return prepare_command(data_dir)
    kept, skip = [], False
    for word in words:
        if not skip and word != "--output_dir" and not word.startswith("--output_dir="):
            kept.append(word)
        skip = word == "--output_dir"  # its value follows
    return shlex.join([*kept, "--output_dir", str(data_dir)])


def load_data_tokenizer(data_dir: str | Path, meta: dict | None = None):
    """The tokenizer that produced the data set, from the tokenizer.json beside its bins."""
    from tokenizer import load_tokenizer  # kept local: loading batches needs no tokenizer

    data_dir = Path(data_dir)
    meta = load_meta(data_dir) if meta is None else meta
    path = data_dir / meta["tokenizer_file"]
    if not path.is_file():
        raise DataError(f"{path} is missing although meta.json names it. "
                        f"Prepare the data set again with: {remake_command(data_dir, meta)}")
    tok = load_tokenizer(path)
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(f"{path} has vocab_size {tok.vocab_size} but meta.json says {meta['vocab_size']}; the "
                        f"directory mixes two preparations. Prepare it again with: {remake_command(data_dir, meta)}")
    return tok


def check_vocab(meta_vocab_size: int, model_vocab_size: int) -> None:
    """Refuse a model whose embedding has fewer rows than the data set has token ids."""
    if meta_vocab_size > model_vocab_size:
        raise DataError(
            f"the data set's vocabulary has {meta_vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab_size}: ids from {model_vocab_size} up would index past the embedding. Use "
            f"--vocab_size={meta_vocab_size} (or larger) for a new model, or a data set prepared with the "
            f"model's tokenizer.")


class BatchLoader:
    """Random windows of block_size + 1 tokens from a prepared data set, as (x, y) batches.

    get_batch(split, index) is a pure function of (seed, split, rank, index). The caller numbers
    the batches: train.py passes the global micro-batch number while training and EVAL_BATCHES[split]
    + k for the k-th batch of an evaluation (for train, numbers that no training step reaches), so a
    resumed run draws the same batches and every evaluation sees the same fixed set. DDP ranks draw
    different windows through `rank`, or through disjoint indices (train.py's way, which makes W ranks
    draw what one process would). verbose=False leaves the note and progress bar of the start-up id
    check to another process (train.py: rank 0's).

    get_sweep_batch(split, k) for k below sweep_batches(split) instead lays the windows side by side,
    so that the batches together hold every target of the split once: train.py evaluates a split that
    way where that takes no more batches than eval_iters.

    On CUDA the batch goes through pinned memory with a non-blocking copy, and a background
    thread prepares the next batch while the GPU works: the one for index + stride, where stride
    is the step between the last two indices of that split (a rank that takes every W-th index
    has stride W).
    """

    def __init__(self, data_dir: str | Path, block_size: int, batch_size: int, device: str | torch.device = "cpu",
                 seed: int = 1337, rank: int = 0, world_size: int = 1, prefetch: bool | None = None,
                 verbose: bool = True):
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        if seed < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need seed >= 0 and 0 <= rank < world_size, got seed={seed}, rank={rank}, "
                             f"world_size={world_size}")
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.block_size, self.batch_size = block_size, batch_size
        # torch is imported here, not at the top: prepare_data.py uses this module's constants, and each
        # of its worker processes would load torch (1-2 s, 200 MB) for nothing where workers are spawned
        # (macOS, Windows) instead of forked
        import torch
        self.device = torch.device(device)
        self.seed, self.rank, self.verbose = seed, rank, verbose
        self.num_tokens = {split: self._check_bin(split) for split in SPLITS}
        # which files were checked: prepare_data.py replaces them by renaming new ones over them
        self._files = {split: _identity(self.data_dir / f"{split}.bin") for split in SPLITS}
        for split in SPLITS:  # before a run writes anything: reading 1 GB from memory takes well under a second
            self._check_ids(split)
        shortest = min(SPLITS, key=lambda split: self.num_tokens[split])
        n = self.num_tokens[shortest]
        if n < block_size + 1:
            raise DataError(
                f"the {shortest} split of {self.data_dir} has {n} tokens, but block_size={block_size} needs "
                f"at least block_size + 1 = {block_size + 1} per split. "
                + (f"Use --block_size={n - 1} or less, or prepare" if n >= 2 else "Prepare") + " more text"
                + (" (a larger --val_fraction grows the val split)." if shortest == "val" else "."))
        self._next_index = {split: 0 for split in SPLITS}
        self._stride = {split: 1 for split in SPLITS}
        self.prefetched = 0  # batches served from the background thread (a statistic)
        self._pin = self.device.type == "cuda"
        # prefetching only pays when a GPU works while the CPU assembles the next batch
        self._prefetch = self._pin if prefetch is None else prefetch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") if self._prefetch else None
        self._pending: tuple[str, int, Future] | None = None

    def _check_bin(self, split: str) -> int:
        path = self.data_dir / f"{split}.bin"
        expected = self.meta[f"{split}_tokens"]
        size = path.stat().st_size if path.is_file() else None
        if size != expected * self.dtype.itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise DataError(f"{path} {found}, but meta.json promises {expected} {self.dtype.name} tokens "
                            f"({expected * self.dtype.itemsize} bytes). Prepare the data set again with: "
                            f"{remake_command(self.data_dir, self.meta)}")
        return expected

    def _damaged(self, split: str, bad_id: int, what: str) -> str:
        return (f"{self.data_dir / f'{split}.bin'} holds token id {bad_id}{what}, but meta.json's vocab_size is "
                f"{self.vocab_size}: the file is damaged or belongs to another data set. Prepare it again with: "
                f"{remake_command(self.data_dir, self.meta)}")

    def _check_ids(self, split: str) -> None:
        """Every id of the split below vocab_size (on the GPU a bad id is an opaque device-side assert)."""
        start, path = 0, self.data_dir / f"{split}.bin"
        size = self.num_tokens[split] * self.dtype.itemsize
        bar = None
        if size > ID_CHECK_NOTE_BYTES and self.verbose:  # seconds per GB from disk: say why the start waits
            print(f"checking the token ids of {path} ({size / 1e9:.1f} GB)", file=sys.stderr, flush=True)
            bar = Progress(total=size, unit="B", unit_scale=True, desc=f"checking {path.name}", delay=2.0)
        with open(path, "rb") as f, bar if bar is not None else contextlib.nullcontext():
            # 32M tokens at a time: the file is streamed, never held whole
            while (ids := np.fromfile(f, dtype=self.dtype, count=1 << 25)).size:
                if int(ids.max()) >= self.vocab_size:
                    i = int(np.argmax(ids >= self.vocab_size))  # the first bad one, named with its position
                    raise DataError(self._damaged(split, int(ids[i]), f" at token {start + i:,} (the first id of "
                                                                      f"{self.vocab_size} or more)"))
                start += ids.size
                if bar is not None:
                    bar.update(ids.nbytes)

    def get_batch(self, split: str, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64 on the loader's device, with y[:, t] == x[:, t + 1] for t < T - 1.

        index None continues an internal per-split counter (after the last index used for that split).
        """
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if index is None:
            index = self._next_index[split]
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        step = index - self._next_index[split] + 1  # the step from the previous index of this split
        self._stride[split] = step if step > 0 else 1
        self._next_index[split] = index + 1
        prepared = self._take_prepared(split, index)
        x, y = prepared if prepared is not None else self._cpu_batch(split, index)
        if self._executor is not None:
            guess = index + self._stride[split]
            self._pending = (split, guess, self._executor.submit(self._cpu_batch, split, guess))
        return self._to_device(x, y)

    def changed_file(self) -> str | None:
        """Why the batches to come may not be drawn from the data the run started with, or None: a .bin file
        replaced, changed or removed since it was checked (prepare_data.py run again into the folder). train.py
        looks after each step, and then saves and stops before a batch meets it; a stat per split."""
        for split in SPLITS:
            path = self.data_dir / f"{split}.bin"
            try:
                if _identity(path) != self._files[split]:
                    return f"{path} {CHANGED}"
            except OSError as e:
                return f"{path} cannot be read any more ({e.strerror or e})"
        return None

    def _take_prepared(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        p_split, p_index, future = pending
        if (p_split, p_index) == (split, index):
            self.prefetched += 1
            return future.result()
        future.cancel()  # a different batch was asked for (an evaluation began, or a resume jumped)
        return None

    def sweep_batches(self, split: str) -> int:
        """How many batches get_sweep_batch makes of the split: its windows of block_size targets, side by side,
        batch_size to a batch, the last batch filled up with rows that count nothing."""
        windows = -(-(self.num_tokens[split] - 1) // self.block_size)  # every target but the first token's
        return -(-windows // self.batch_size)

    def get_sweep_batch(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: batch `index` of the sweep, in which every target of the split is counted exactly once; the
        targets that count nothing are -1, which the loss ignores. Window k starts at token k * block_size;
        the last one, where the split's targets do not fill a window, ends at the split's end instead, and
        its targets that the window before it counted are -1. Does not touch get_batch's prefetching."""
        if not 0 <= index < self.sweep_batches(split):
            raise ValueError(f"sweep batch index must be in 0 .. {self.sweep_batches(split) - 1}, got {index}")
        T, n = self.block_size, self.num_tokens[split]
        k = index * self.batch_size + np.arange(self.batch_size)  # the rows' window numbers
        starts = np.minimum(k * T, n - 1 - T)  # the last window, and the filler, end at the split's end
        windows = self._windows(split, starts)
        # a target at position t of window k is the split's token start_k + t + 1; it counts when no earlier
        # window counted it: t >= k * T - start_k, and the row is a real window, not filler (k * T < n - 1)
        skip = np.where(k * T < n - 1, k * T - starts, T)
        y = np.where(np.arange(T) >= skip[:, None], windows[:, 1:], -1)
        return self._to_device(*self._as_tensors(windows[:, :-1], y))

    def _windows(self, split: str, starts: np.ndarray) -> np.ndarray:
        """The (B, T + 1) int64 tokens from the given starts of the split, checked against the file the loader
        checked and against the vocabulary."""
        T = self.block_size
        path = self.data_dir / f"{split}.bin"
        if _identity(path) != self._files[split]:  # a stat a batch: microseconds
            raise DamagedBatchError(f"{path} {CHANGED}, so its batches may no longer be the ones this run draws. "
                                    f"Finish preparing, then run the command again: a resumed run checks the data anew")
        data = np.memmap(path, dtype=self.dtype, mode="r")
        # one gather for all B windows: a stack of B slices costs several times as long in Python, on the thread
        # that shares the interpreter with the training loop
        windows = data[starts[:, None] + np.arange(T + 1)].astype(np.int64)  # (B, T + 1)
        del data  # drop the mapping now: its pages must not pile up over a long run
        if windows.max() >= self.vocab_size:  # the file changed since it was checked; microseconds a batch
            raise DamagedBatchError(self._damaged(split, int(windows.max()),
                                                  " (it changed after the loader checked it)"))
        return windows

    def _as_tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) arrays as CPU tensors, pinned when the device is CUDA."""
        import torch  # loaded by __init__ already
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pin:
            # non_blocking returns at once; the pinned source stays valid because torch's pinned-memory
            # allocator does not hand the block out again until the copy that reads it has finished
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def _cpu_batch(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch for (split, index) in CPU memory, pinned when the device is CUDA."""
        rng = np.random.Generator(np.random.PCG64([self.seed, SPLIT_IDS[split], self.rank, index]))
        # a window starting at s needs tokens s .. s + T, so s ranges over 0 .. n - T - 1
        starts = rng.integers(0, self.num_tokens[split] - self.block_size, size=self.batch_size)
        windows = self._windows(split, starts)
        return self._as_tensors(windows[:, :-1], windows[:, 1:])

    def close(self) -> None:
        """Stop the background thread; get_batch keeps working, without prefetching."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._pending = None, None

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            # the last reference can be the prefetch job itself, so this may run on the executor's own
            # thread, which cannot wait for itself
            executor.shutdown(wait=False, cancel_futures=True)
