"""Train a GPT-2 model: one process, or many under torchrun (DDP), with checkpoints, exact resume and TensorBoard.

    python train.py                                          # config.py's defaults (GPT-2 124M, data/shakespeare)
    python train.py --preset=shakespeare-char-cpu            # ~0.8M parameters: ~75 s on 2 CPU cores, val loss ~1.75
    python train.py my_config.py --batch_size=32             # a config file, then --key=value flags
    python train.py --init_from=gpt2 --data_dir=data/shakespeare --learning_rate=3e-5 --min_lr=3e-6  # fine-tune GPT-2
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2 --gradient_accumulation_steps=40
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=8 train.py ...

Settings are applied in this order: --preset=NAME (a GPT2_CONFIGS entry), the config file (plain Python
assigning field names), then --key=value flags (Python literals; bare strings are fine); config.py's
parse_args reads them, and `--help` lists every field. If checkpoint_dir holds checkpoint.pt the run
continues from it (--init_from=scratch starts over and moves the old files aside). Ctrl-C, SIGTERM or
SIGHUP finishes the current step (or evaluation batch), saves checkpoint.pt and exits (before the first
step there is nothing to save); a second Ctrl-C, more than a second later, aborts at once. A signal the
process started with ignored stays ignored (nohup's SIGHUP; torchrun, though, forwards SIGHUP unless given
--signals-to-handle=SIGTERM,SIGINT).
`tensorboard --logdir runs` shows the curves and text samples.

The loop follows nanoGPT's train.py: AdamW, linear warmup then cosine decay, gradient accumulation,
gradient clipping, autocast with bfloat16 (float16 plus a GradScaler on GPUs before Ampere), and
torch.compile, with DDP through torch.distributed when launched by torchrun.
"""
import copy
import hashlib
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

from utils import quiet_ctrl_c_while_starting

if __name__ == "__main__":  # before torch's import: a second or more in which Ctrl-C would print a traceback
    quiet_ctrl_c_while_starting()

import numpy as np
import torch

# the command line is parsed in config.py
from config import (CUDA_GRAPH_MODES, GPT2_CONFIGS, MAX_SAMPLE_TOKENS, MODEL_SHAPE_KEYS, ConfigError, GPT2Config,
                    parse_args)
from model import (GPT, GPT2_NAMES, attention_kernel, fp8_problem, is_model_folder, pretrained_shape,
                   train_checkpoint_hint)
from utils import (CHECKPOINT_FALLBACK, CHECKPOINT_VERSION, ITER_CHECKPOINT, CheckpointError, UserError, bytecode_note,
                   dtype_warning, folder_lock, folder_problem, format_bytes, format_bytes_apart, format_duration,
                   get_rng_state, iter_checkpoints, load_checkpoint, load_weights, lock_holder, machine_memory,
                   missing_folders, remove_empty_folders, remove_unfinished_writes, resolve_device, resolve_dtype,
                   run_cli, save_checkpoint, save_checkpoint_as, set_rng_state, silence, stop_signals,
                   stop_signals_raise, synchronize, utf8_text)

# every checkpoint name this file writes, for the temporary files of saves a kill cut short
CHECKPOINT_NAMES = r"(?:best_|final_)?checkpoint(?:_iter_\d+)?\.pt"


class TrainingError(UserError):
    """Training cannot go on (a NaN loss, a checkpoint that does not fit the run); the message says why."""


# ----------------------------------------------------------------------------- schedule, evaluation

def get_lr(it: int, config: GPT2Config) -> float:
    """Learning rate of optimizer step `it` (0-based): linear warmup, cosine decay, then min_lr.

    warmup_iters=100: it=0 -> lr/101 (above 0), it=100 -> lr, it=lr_decay_iters -> min_lr, later -> min_lr.
    """
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if not config.decay_lr:
        return config.learning_rate
    if it >= config.lr_decay_iters:
        return config.min_lr
    ratio = (it - config.warmup_iters) / (config.lr_decay_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


# The train split's evaluation batches are numbered from here: training draws batches 0, 1, 2, ..., so the
# train loss at evaluation comes from fixed windows that are never themselves a training batch. Their text is
# still the training text, which training windows cover again and again: it measures the fit to that text,
# and only val's loss is on text the model has never seen
EVAL_BATCHES = {"train": 2**62, "val": 0}

# an eager evaluation forward pass on a GPU takes several fixed batches at once, up to about this many bytes in
# its largest tensor (2-3 times that in all): a small model's eager passes are bound by their host, about 5 ms
# each for shakespeare-char on an H200 whatever their size, so 100 passes of one batch took 0.5 s per evaluation.
# Counted per token: the MLP's hidden layer in the activations' dtype, or the logits at 16 bytes each (the loss
# makes float32 copies of them), whichever is more. GPT-2's 50,304-wide logits exceed it with one batch. With
# loss_chunk_rows no more than a batch's tokens, a pass of any size makes the same chunks of logits as a training
# step, and the MLP's layer counts alone; a larger chunk would grow with the pass, and counts as whole logits.
EVAL_PASS_BYTES = 2**28


def eval_batches_per_pass(config: GPT2Config, device: torch.device, compile_model: bool,
                          dtype: torch.dtype = torch.bfloat16) -> int:
    """How many fixed batches one evaluation forward pass takes: as many as EVAL_PASS_BYTES allows where the
    evaluation runs eagerly on a GPU, else 1. A CPU computes one big pass no faster than small ones (slower at
    50 batches), and a compiled evaluation graph of another batch size would make torch.compile treat the batch
    size as dynamic in the training graph too. dtype is what the activations are in."""
    if device.type == "cpu" or (compile_model and config.compile_eval):
        return 1
    chunked = 0 < config.loss_chunk_rows <= config.batch_size * config.block_size
    per_token = max(4 * config.n_embd * dtype.itemsize, 0 if chunked else 16 * config.padded_vocab_size)
    return max(1, min(config.eval_iters, EVAL_PASS_BYTES // (config.batch_size * config.block_size * per_token)))


def val_measure_of(config: dict, default: GPT2Config) -> dict:
    """What decides the random val batches an evaluation draws (a swept split's loss depends on none of it); a
    setting the dict lacks (an older checkpoint's config) is taken to be default's."""
    return {k: config.get(k, getattr(default, k)) for k in ("eval_iters", "batch_size", "seed")}


def eval_plan(loader, eval_iters: int) -> dict[str, tuple[int, bool]]:
    """(batches, swept) for each split: an evaluation takes eval_iters fixed random batches of it, or its sweep
    (every target once) where that takes no more batches. The sweep gives the split's exact mean loss, and a
    small split's at a fraction of the cost: shakespeare-char's 111,539 val targets fit in 7 batches of
    64 x 256, where its 50 random batches would draw 819,200 targets from the same ones, with repeats."""
    plan = {}
    for split in ("train", "val"):
        swept = loader.sweep_batches(split) <= eval_iters
        plan[split] = (loader.sweep_batches(split) if swept else eval_iters, swept)
    return plan


@torch.no_grad()
def estimate_loss(model, loader, eval_iters: int, ctx, rank: int = 0, world_size: int = 1,
                  should_stop=None, progress=None, per_pass: int = 1) -> Optional[dict[str, float]]:
    """Mean loss per target of each split over its evaluation batches (eval_plan): the fixed batches
    EVAL_BATCHES[split] + 0 .. eval_iters - 1, or the split's sweep. They are shared out over the ranks,
    per_pass batches to a forward pass.

    Batches are dealt out in rounds of world_size * per_pass: rank r takes the r-th run of per_pass of
    each round. should_stop() is asked before each round (every rank asks equally often, so it may be a
    collective); when it says yes the evaluation is abandoned and None returned. progress(done, total)
    hears of the batches evaluated so far, counted over all ranks.
    """
    was_training = model.training
    model.eval()
    out = {}
    per_round = world_size * per_pass
    plan = eval_plan(loader, eval_iters)
    done, all_batches = 0, sum(n for n, _ in plan.values())
    try:
        for split, (n, sweep) in plan.items():
            total = torch.zeros(2, device=loader.device)  # the loss summed over the counted targets, and those
            for first in range(0, n, per_round):
                if should_stop is not None and should_stop():
                    return None
                mine = range(first + rank * per_pass, min(first + (rank + 1) * per_pass, n))
                if mine:
                    xs, ys = zip(*(loader.get_sweep_batch(split, j) if sweep
                                   else loader.get_batch(split, EVAL_BATCHES[split] + j) for j in mine))
                    y = torch.cat(ys)
                    with ctx:
                        # the loss is the mean over the targets that are not -1, so times their number it is
                        # their sum, whatever the batches joined
                        _, loss = model(torch.cat(xs), y)
                    counted = (y >= 0).sum()  # on the device: no wait for the GPU here
                    total += torch.stack((loss.float() * counted, counted.float()))
                if progress is not None:
                    progress(done + min(first + per_round, n), all_batches)
            done += n
            if world_size > 1:
                torch.distributed.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        return out
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- devices and processes

def resolve_system(config: GPT2Config, local_rank: Optional[int]) -> tuple[torch.device, torch.dtype, bool]:
    """(device, dtype, compile) from config's 'auto' values; under torchrun each rank takes cuda:LOCAL_RANK."""
    device = resolve_device(config.device)
    if device.type == "cuda":
        if local_rank is not None:
            if device.index is not None:  # every process would take it, or else cuda:LOCAL_RANK without a word
                raise ConfigError(f"--device={config.device} names one GPU, but under torchrun each process takes "
                                  f"cuda:LOCAL_RANK; give --device=cuda and choose the GPUs with CUDA_VISIBLE_DEVICES, "
                                  f"e.g. CUDA_VISIBLE_DEVICES=2,3 torchrun --nproc_per_node=2 ...")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(config.dtype, device)
    compile_model = device.type == "cuda" if config.compile == "auto" else config.compile
    return device, dtype, compile_model


SIGPIPE = getattr(signal, "SIGPIPE", 13)  # a run stopped because stdout closed exits with 128 + SIGPIPE, as if killed
# the presets' lengths of decay: a --preset counts as setting it, though a --max_iters below it was what was typed
PRESET_DECAYS = {p["lr_decay_iters"] for p in GPT2_CONFIGS.values() if "lr_decay_iters" in p}


class GracefulStop:
    """SIGINT/SIGTERM/SIGHUP set a flag that the loop checks after each step and estimate_loss before each
    round of evaluation batches; a second Ctrl-C aborts at once. request() sets it from inside (stdout closed).

    A repeat within REPEAT_S seconds counts as the same request: Ctrl-C can reach torchrun and its workers
    together (where the workers share the terminal's process group; torch 2.13 starts each in a session of its
    own), and torchrun then forwards the signal to the workers a second time.
    """
    REPEAT_S = 1.0
    SAVING = "saving checkpoint.pt"  # what the loop does after a signal, as its message says

    def __init__(self, verbose: bool = True):
        self.signum: Optional[int] = None
        self.signalled = False  # signum came from a signal, not from request()
        self.verbose = verbose
        self.then = self.SAVING
        self._first = 0.0
        self._previous = {}
        self._ctrl_c = True  # whether Ctrl-C reaches the handler (not where it was ignored before)

    def __enter__(self) -> "GracefulStop":
        import threading
        if threading.current_thread() is threading.main_thread():
            # an ignored Ctrl-C stays ignored: a job that a shell script started with `&` is not the one that a
            # Ctrl-C at the terminal stops (SIGHUP under nohup likewise, in stop_signals)
            self._ctrl_c = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
            for sig in (*([signal.SIGINT] if self._ctrl_c else []), *stop_signals()):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def request(self, signum: int, why: str, between_steps: bool = False) -> None:
        """Stop as a signal would, for a reason found inside the process; a repeat does nothing. between_steps: the
        reason was found where no step or evaluation batch is under way. No signal reached torchrun, so no
        deadline of its applies."""
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            if self.verbose:
                self._say(f"{why}: {self.then}" if between_steps else
                          f"{why}: finishing this step (or evaluation batch), then {self.then}")

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first, self.signalled = signum, time.monotonic(), True
            if self.verbose:
                again = " (press Ctrl-C again to abort at once)" if self._ctrl_c else ""
                self._say(f"\n{signal.Signals(signum).name} received: finishing this step (or evaluation batch), "
                          f"then {self.then}{again}{torchrun_deadline()}")
        elif time.monotonic() - self._first > self.REPEAT_S:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        # under torchrun a peer that the same signal stopped in its setup, before it could agree on stopping,
        # closes its connections, and this process's wait on it fails: the signal is the cause, so one line
        # says what failed instead of a traceback
        if (self.signalled and isinstance(exc, RuntimeError) and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            what = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            self._say(f"stopping after {signal.Signals(self.signum).name}: {what}")
            raise SystemExit(128 + self.signum) from None

    @staticmethod
    def _say(message: str) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
        except OSError:  # stderr is a closed pipe too (`2>&1 | head`): stopping and saving matter more
            silence(sys.stderr)


def torchrun_deadline() -> str:
    """What to add to the stop message under torchrun, which kills its processes 30 s after it forwards
    a signal unless told to wait longer (torch 2.12 and later read TORCH_ELASTIC_SHUTDOWN_TIMEOUT; the
    same setting through torchrun's --shutdown-timeout is not visible from here)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in os.environ:
        return ""
    return ("; unless torchrun was started with a longer --shutdown-timeout, it kills the processes 30 s after "
            "the signal and a longer step and save is lost: start it as TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 "
            "torchrun ... to give them 10 minutes")


# ----------------------------------------------------------------------------- run setup

def restore_rng(rng, rank: int, world_size: int, device, seed: int) -> bool:
    """Give this rank the random state it saved (each rank its own dropout stream); True if it could.

    Under another number of processes there is no state of this rank's to take: the batches still
    continue exactly (they depend on the batch number alone), dropout is re-seeded with `seed`.
    """
    if isinstance(rng, list) and len(rng) == world_size:
        set_rng_state(rng[rank], device)
        return True
    torch.manual_seed(seed)
    return False


def default_explicit(config: GPT2Config) -> set[str]:
    """The fields a programmatic caller set: those that differ from config.py's defaults."""
    return {k for k, v in config.to_dict().items() if v != getattr(GPT2Config, k)}


def load_resumable(path: Path, others: list[Path]) -> dict:
    """The checkpoint to resume from; one that cannot be read (truncated by a full disk, say) names what else
    the folder holds, newest last among others, and how to resume from it instead."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        others = [p for p in others if p != path and p.is_file()]
        best = path.parent / "best_checkpoint.pt"
        if others:
            names = ", ".join(p.name for p in others[-3:])
            how = (f"; move it aside (mv {shlex.quote(str(path))} {shlex.quote(str(path))}.damaged) and run again to "
                   f"resume from the newest of the others ({'..., ' if len(others) > 3 else ''}{names})")
        elif best.is_file():
            how = (f"; to resume from best_checkpoint.pt instead, copy it over the damaged file: "
                   f"cp {shlex.quote(str(best))} {shlex.quote(str(path))}")
        else:
            how = "; no other checkpoint to resume from is left: start over with --init_from=scratch"
        raise CheckpointError(f"{e}{how}") from None


def plan_run(config: GPT2Config, explicit: set[str]) -> tuple[GPT2Config, Optional[dict], Optional[Path]]:
    """Decide between resuming and starting afresh; returns (run config, checkpoint or None, its path).

    Resuming takes the checkpoint's config and applies the fields the user set on top; a model-shape
    field that contradicts the checkpoint is an error. Nothing is written here.
    """
    ckpt_path = Path(config.checkpoint_dir) / "checkpoint.pt"
    # --save_interval's copies are whole checkpoints too: after a crash between two evaluations the newest of
    # them can be ahead of checkpoint.pt, or the only checkpoint there is
    folder = Path(config.checkpoint_dir)
    kept = iter_checkpoints(folder) if config.init_from != "scratch" and folder.is_dir() else []
    if not ckpt_path.is_file() and not kept and (folder / "final_checkpoint.pt").is_file():
        # a finished run's folder with checkpoint.pt deleted to save space, or the final file alone copied to
        # another machine: it holds the whole training state, the last there is
        ckpt_path = folder / "final_checkpoint.pt"
    if config.init_from == "resume" and not ckpt_path.is_file() and not kept:
        best = folder / "best_checkpoint.pt"
        how = (f"; {best} is there: to resume from it, cp {shlex.quote(str(best))} {shlex.quote(str(ckpt_path))}"
               if best.is_file() else "")
        raise CheckpointError(f"--init_from=resume but {ckpt_path} does not exist; train first (python train.py "
                              f"...), point --checkpoint_dir at a run, or use --init_from=scratch{how}")
    if config.init_from == "scratch" or not (ckpt_path.is_file() or kept):
        return check_folders(config.validate()), None, None
    ckpt = load_resumable(ckpt_path, kept) if ckpt_path.is_file() else None
    newest = int(ITER_CHECKPOINT.fullmatch(kept[-1].name).group(1)) if kept else -1
    if ckpt is None or newest > ckpt.get("iter_num", newest):
        ckpt_path, ckpt = kept[-1], load_resumable(kept[-1], kept[:-1] + ([ckpt_path] if ckpt is not None else []))
    # fine-tuning (--init_from=gpt2 or a folder) continues a run that started from the same weights; a
    # checkpoint of another start is moved aside like --init_from=scratch does
    if config.init_from not in ("auto", "resume") and not same_start(ckpt, config.init_from):
        return check_folders(config.validate()), None, None
    lacking = [k for k in ("optimizer", "iter_num", "best_val_loss") if k not in ckpt]
    if lacking:
        raise CheckpointError(f"{ckpt_path} holds no training state ({', '.join(lacking)} missing), so the run "
                              f"cannot continue from it; {start_over(config)}")
    run = GPT2Config.from_dict(ckpt["config"])
    conflicts = [f"{k}={getattr(config, k)!r} (checkpoint: {getattr(run, k)!r})" for k in MODEL_SHAPE_KEYS
                 if k in explicit and getattr(config, k) != getattr(run, k)]
    if conflicts:
        raise CheckpointError(f"{ckpt_path} holds a model that this command contradicts: {', '.join(conflicts)} "
                              f"(set by a flag, a config file or a --preset). Drop those to continue that run, or "
                              f"{start_over(config)}")
    for k in explicit | {"checkpoint_dir", "init_from"}:
        if k not in MODEL_SHAPE_KEYS:
            setattr(run, k, getattr(config, k))
    return check_folders(run.validate()), ckpt, ckpt_path


def start_over(config: GPT2Config) -> str:
    """How to start a new run instead of continuing the one in checkpoint_dir, as advice."""
    if config.init_from in ("auto", "resume", "scratch"):
        return "start a new one with --init_from=scratch (the old files are moved aside) or another --checkpoint_dir"
    # --init_from=scratch would throw the pretrained weights away
    return (f"start the new fine-tuning run in another --checkpoint_dir, or move the old checkpoints out of "
            f"{config.checkpoint_dir}")


def origin(init_from: str) -> str:
    """What a run starts from: 'scratch', a GPT-2 name, or a Hugging Face folder as an absolute path
    (model.is_model_folder decides, as GPT.from_pretrained does: a model folder ./gpt2 is no download)."""
    if init_from in ("auto", "scratch", "resume"):
        return "scratch"
    return init_from if init_from in GPT2_NAMES and not is_model_folder(init_from) else str(Path(init_from).resolve())


def started_from(ckpt: dict) -> str:
    """A checkpoint's origin(); checkpoints written before it was recorded keep it in their config."""
    return ckpt.get("started_from") or origin(ckpt["config"].get("init_from", "scratch"))


FINGERPRINT_KIND = "slices"  # folder_fingerprint's method, written before its digests


def folder_fingerprint(init_from: str, pieces: int = 64, piece: int = 1 << 16) -> Optional[str]:
    """For a Hugging Face folder, a digest of its config.json and of its weight files' names, sizes and
    `pieces` slices spread over each (4 MiB at most, whatever the size), which change when another model
    is exported into it, but not when the same files are copied, restored or downloaded again; None
    for anything that is not a folder."""
    path = Path(init_from)
    if not is_model_folder(init_from):
        return None
    digest = hashlib.sha256()  # tagged with its method below: a checkpoint with another kind compares by path
    for p in sorted(path.iterdir()):
        if p.name != "config.json" and p.suffix not in (".safetensors", ".bin"):
            continue
        digest.update(p.name.encode())
        try:
            with open(p, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                digest.update(f"{size}".encode())
                for i in range(pieces):  # first and last bytes included
                    f.seek(max(0, (size - piece) * i // max(1, pieces - 1)))
                    digest.update(f.read(piece))
        except OSError:  # a link to nothing (a pruned Hugging Face cache, say): its name alone counts
            digest.update(b"unreadable")
    return f"{FINGERPRINT_KIND}{pieces}:{digest.hexdigest()}"


def same_start(ckpt: dict, init_from: str) -> bool:
    """Whether a fine-tuning command continues the run of ckpt: the same start, and, for a folder that is
    still there, the same model in it (not another one exported there since)."""
    recorded, now = ckpt.get("started_from_fingerprint"), folder_fingerprint(init_from)
    comparable = recorded is not None and now is not None and recorded.split(":")[0] == now.split(":")[0]
    return started_from(ckpt) == origin(init_from) and (not comparable or recorded == now)


def check_folders(config: GPT2Config) -> GPT2Config:
    """The run's checkpoint_dir and log_dir must be folders or places where one can be made."""
    for name in ("checkpoint_dir", "log_dir"):
        problem = folder_problem(Path(getattr(config, name)))
        if problem:
            raise ConfigError(f"--{name}={getattr(config, name)} {problem}; give the path of a folder, new or existing")
    if utf8_text(config.log_dir) != config.log_dir:
        raise ConfigError(f"--log_dir={utf8_text(config.log_dir)} is not UTF-8 (a name in another encoding, such as "
                          f"GBK), and TensorBoard writes only UTF-8 paths; give a folder whose path is UTF-8")
    return config


def check_same_tokens(ckpt: dict, ckpt_path: Path, meta: dict, tokenizer, config: GPT2Config) -> None:
    """A resumed run must read the same tokens as before: the same kind and size of vocabulary, and the same
    tokenizer, since two character sets or two BPE merge lists of one size give the same ids to other text."""
    old = ckpt.get("meta") or {}
    if (old.get("tokenizer"), old.get("vocab_size")) != (meta.get("tokenizer"), meta.get("vocab_size")):
        raise CheckpointError(f"{ckpt_path} was trained on data tokenised with {old.get('tokenizer')!r} "
                              f"(vocab {old.get('vocab_size')}), but {config.data_dir} holds {meta.get('tokenizer')!r} "
                              f"(vocab {meta.get('vocab_size')}); use the same kind of data, or {start_over(config)}")
    own = saved_tokenizer(ckpt.get("tokenizer"))
    if own is not None and own != tokenizer.to_dict():
        trained_on = Path((ckpt.get("config") or {}).get("data_dir") or "DATA") / "tokenizer.json"
        if load_tokenizer_dict(trained_on) != own:
            # that folder is gone or was prepared again: only the checkpoint still holds the tokenizer
            its_own = ("the checkpoint's own tokenizer, exported with the model (model.save_pretrained(EXPORT, "
                       "tokenizer_from_dict(ckpt['tokenizer'])), see the README), with prepare_data.py "
                       "--tokenizer_file EXPORT/toolkit_tokenizer.json --output_dir NEW_FOLDER")
        else:
            its_own = (f"its tokenizer (prepare_data.py --tokenizer_file {shlex.quote(str(trained_on))} "
                       f"--output_dir NEW_FOLDER)")
        raise CheckpointError(f"{ckpt_path} was trained with another {meta.get('tokenizer')} tokenizer than the one "
                              f"{config.data_dir} was prepared with: the vocabulary size is the same, but the ids "
                              f"stand for other text. Resume on the data set it was trained on, prepare this text "
                              f"with {its_own}, or {start_over(config)}")


def load_tokenizer_dict(path: Path) -> Optional[dict]:
    """The to_dict() of the tokenizer saved at path, or None if there is none to read."""
    from tokenizer import load_tokenizer
    try:
        return load_tokenizer(path).to_dict()
    except (UserError, OSError):
        return None


def saved_tokenizer(d: Optional[dict]) -> Optional[dict]:
    """A checkpoint's tokenizer as today's to_dict() writes it (older files stored a char set as one string),
    or None if it cannot be read back, which the kind and size checks then have to answer for."""
    from tokenizer import TokenizerError, tokenizer_from_dict
    if d is None:
        return None
    try:
        return tokenizer_from_dict(d).to_dict()
    except (TokenizerError, KeyError, TypeError, ValueError):
        return None


def check_gpt2_data(init_from: str, meta: dict, data_dir: str) -> None:
    from data import load_data_tokenizer
    from tokenizer import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE, has_gpt2_ids
    # the ids' meaning too: a BPE trained with --vocab_size 50257 has GPT-2's size and end-of-text id, and
    # other text per id; one made by BPETokenizer.from_gpt2 (without tiktoken) has GPT-2's
    if (meta.get("vocab_size") != GPT2_VOCAB_SIZE or meta.get("eot_token") != GPT2_EOT_TOKEN
            or meta.get("tokenizer") != "gpt2" and not (meta.get("tokenizer") == "bpe"
                                                        and has_gpt2_ids(load_data_tokenizer(data_dir, meta)))):
        raise TrainingError(
            f"--init_from={init_from} fine-tunes OpenAI's GPT-2, which reads GPT-2 tokens (vocab 50257, "
            f"end-of-text 50256), but {data_dir} was prepared with the {meta.get('tokenizer')!r} tokenizer "
            f"(vocab {meta.get('vocab_size')}). Prepare GPT-2 tokens, e.g. `python prepare_data.py --dataset "
            "shakespeare` and --data_dir=data/shakespeare, or train from scratch on this data")


def check_folder_data(folder: Path, vocab_size: int, meta: dict, data_dir: str) -> None:
    """Data for fine-tuning a Hugging Face folder's model must be in that model's tokens.

    The folder's tokenizer, where it has one of this project's (save_pretrained writes it), must be the
    data set's tokenizer. A folder without one and GPT-2's 50,257 tokens is taken for OpenAI's GPT-2.
    """
    from model import TOOLKIT_TOKENIZER, exported_tokenizer_file
    from tokenizer import GPT2_VOCAB_SIZE, load_tokenizer
    if meta["vocab_size"] > vocab_size:
        raise TrainingError(f"{folder} holds a model of {vocab_size} tokens, but {data_dir} was prepared with the "
                            f"{meta.get('tokenizer')!r} tokenizer ({meta['vocab_size']} tokens); prepare the data "
                            f"with the model's tokenizer")
    own, theirs = exported_tokenizer_file(folder), Path(data_dir) / meta.get("tokenizer_file", "tokenizer.json")
    try:
        own_tokenizer = load_tokenizer(own).to_dict() if own is not None else None
    except UserError as e:
        if own.name == TOOLKIT_TOKENIZER:  # this project's, damaged: the check cannot be made, so no training
            raise TrainingError(str(e)) from None
        own_tokenizer = None  # transformers' own tokenizer.json, not this project's: nothing to compare with
    if own_tokenizer is None:
        if vocab_size != GPT2_VOCAB_SIZE:  # generate.py refuses such a folder too: what its ids stand for is unknown
            raise TrainingError(f"{folder} holds a model of {vocab_size} tokens, not GPT-2's 50257, and no "
                                f"{TOOLKIT_TOKENIZER} of this project beside it, so nothing says which text its "
                                f"ids stand for; export it with model.save_pretrained(directory, tokenizer), or "
                                f"fine-tune the folder this project exported")
        check_gpt2_data(str(folder), meta, data_dir)
        return
    if not theirs.is_file() or load_tokenizer(theirs).to_dict() != own_tokenizer:
        kind = own_tokenizer.get("kind")
        how = ("prepare the data with --tokenizer gpt2" if kind == "gpt2" else
               f"prepare the text with the model's own tokenizer: python prepare_data.py --dataset custom --input "
               f"TEXT --tokenizer_file {shlex.quote(str(own))} --output_dir DATA")
        raise TrainingError(f"{data_dir} was not prepared with the tokenizer of {folder} ({own}): the same ids "
                            f"would stand for other text; {how}")


def memory_problem(config: GPT2Config, device: torch.device, dtype: torch.dtype, shape_given: bool = True,
                   block_given: Optional[bool] = None, advice: Optional[str] = None) -> Optional[str]:
    """Why this run cannot fit in the machine's memory (RAM and swap), by a lower bound, or None. A size typed
    with a few zeros too many is otherwise built for minutes and then killed by the kernel with a bare "Killed",
    or fills the swap. A GPU's own memory needs no such check: CUDA refuses what does not fit at once, in one
    line; only the float32 weights, built on the CPU first, are counted for it.
    shape_given: whether the command may choose the model's shape (not a resumed or pretrained model's);
    block_given: its block_size (default: as shape_given; a pretrained model's may be shortened); advice: what to
    do, in the caller's flags (default: train.py's). Under torchrun each process on this machine holds all of it."""
    available = machine_memory()
    if available is None:
        return None
    block_given = shape_given if block_given is None else block_given
    L, d, B, T = config.n_layer, config.n_embd, config.batch_size, config.block_size
    params = 12 * L * d * d + (config.vocab_size + T) * d  # GPT-2's weights, biases aside
    count = f"{params / 1e9:,.2f}B" if params >= 1e9 else f"{params / 1e6:,.1f}M" if params >= 1e6 else f"{params:,}"
    if device.type == "cpu":
        # float32 weights, gradients and AdamW's two moments: 16 bytes a parameter. The activations kept for the
        # backward pass: 80-110 bytes per token, layer and channel measured in float32 (BENCHMARKS.md), counted
        # here as 40, and half that under autocast; with gradient checkpointing each layer's input alone
        per = (4 if dtype == torch.float32 else 2) * (1 if config.gradient_checkpointing else 10)
        weights, activations = 16 * params, B * T * L * d * per
        what = (f"{format_bytes(weights)} for the weights, gradients and AdamW state of {count} parameters and "
                f"{format_bytes(activations)} for the activations of one micro-batch of {B} x {T} tokens")
    else:
        weights, activations = 4 * params, 0
        what = f"{format_bytes(weights)} for the {count} weights, built on the CPU before they move to the GPU"
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)  # torchrun's processes on this machine
    if local * (weights + activations) <= available:
        return None
    fewer = f"run fewer processes on this machine than {local} (torchrun --nproc_per_node)"
    if weights > available:  # no batch makes the model itself fit
        fix = "give a smaller --n_layer or --n_embd" if shape_given else "use a smaller model or a larger machine"
    elif local * weights > available:  # no batch makes as many copies of the model fit
        fix = fewer + (", or give a smaller --n_layer or --n_embd" if shape_given else "")
    else:  # a resumed model keeps its block_size (its position embeddings)
        fix = ("give a smaller --batch_size" + (" or --block_size" if block_given else "")
               + " (with --gradient_accumulation_steps for the same tokens per step)"
               + ("" if config.gradient_checkpointing else ", or --gradient_checkpointing=True")
               + (f", or {fewer}" if local > 1 else ""))
    fix = advice or fix
    each = f"{local} processes on this machine, each with " if local > 1 else ""
    needed, has = format_bytes_apart(local * (weights + activations), available)
    return f"this run needs at least {needed} of memory: {each}{what}; this machine has {has} (RAM and swap); {fix}"


def build_model(config: GPT2Config, explicit: set[str], meta: dict, ckpt: Optional[dict],
                ckpt_path: Optional[Path], device: torch.device, dtype: torch.dtype):
    """The raw model (float32, on the CPU) for a resumed, fresh or pretrained run; fills config's shape."""
    from data import check_vocab

    def check_memory(shape_given: bool, shape: Optional[GPT2Config] = None, block_given: Optional[bool] = None):
        if problem := memory_problem(shape or config, device, dtype, shape_given, block_given):
            raise ConfigError(problem)
    if ckpt is not None:
        check_memory(False)  # a resumed run may ask for a larger batch
        model = GPT(config)
        load_weights(model, ckpt["model"], ckpt_path)
    elif config.init_from in ("scratch", "auto", "resume"):
        if "vocab_size" not in explicit:
            config.vocab_size = int(meta["vocab_size"])  # never guessed: the data set says it
        check_vocab(int(meta["vocab_size"]), config.vocab_size)
        check_memory(True)
        model = GPT(config)
    else:
        folder = is_model_folder(config.init_from)  # as from_pretrained decides
        if not folder and config.init_from not in GPT2_NAMES:
            raise ConfigError(f"init_from must be 'auto', 'scratch', 'resume', one of {', '.join(GPT2_NAMES)} or "
                              f"a Hugging Face GPT-2 directory, got {config.init_from!r}"
                              f"{train_checkpoint_hint(config.init_from)}")
        if not folder:  # before the download
            check_gpt2_data(config.init_from, meta, config.data_dir)
        shape = pretrained_shape(config.init_from)
        if all(type(v) is int and v > 0 for v in shape.values()):  # else from_pretrained says what is wrong
            # before gigabytes are downloaded and read: GPT-2 XL's weights, gradients and AdamW state alone take
            # 24.9 GB on a CPU
            planned = copy.copy(config)
            for k, v in shape.items():
                setattr(planned, k, min(v, config.block_size) if k == "block_size" and k in explicit else v)
            check_memory(False, planned, block_given=True)  # a shorter context keeps the first positions
        model = GPT.from_pretrained(config.init_from, dropout=config.dropout)
        pretrained = model.config
        if folder:
            check_folder_data(Path(config.init_from), pretrained.vocab_size, meta, config.data_dir)
        conflicts = [f"{k}={getattr(config, k)!r} ({config.init_from} has {getattr(pretrained, k)!r})"
                     for k in ("n_layer", "n_head", "n_embd", "bias", "vocab_size")
                     if k in explicit and getattr(config, k) != getattr(pretrained, k)]
        if conflicts:
            raise ConfigError(f"--init_from={config.init_from} fixes the model's shape; drop {', '.join(conflicts)} "
                              f"(set by a flag, a config file or a --preset: a preset's shape is for training "
                              f"from scratch)")
        block_size = config.block_size if "block_size" in explicit else pretrained.block_size
        if block_size > pretrained.block_size:
            raise ConfigError(f"block_size={block_size} exceeds {config.init_from}'s context of "
                              f"{pretrained.block_size} tokens; use --block_size={pretrained.block_size} or less")
        for k in MODEL_SHAPE_KEYS:
            setattr(config, k, getattr(pretrained, k))
        if block_size < pretrained.block_size:
            # a shorter context keeps the first block_size position embeddings
            wpe = model.transformer.wpe
            wpe.weight = torch.nn.Parameter(wpe.weight.detach()[:block_size].clone())
            wpe.num_embeddings = block_size
            config.block_size = block_size
        model.config = config.validate()  # the folder's shape may not suit fp8
        check_memory(False, block_given=True)  # the batch, for the shape just loaded
        model.set_fp8(config.fp8)  # from_pretrained built plain Linear layers
    return model


def sample_prompt(tokenizer, data_dir: str, meta: dict) -> str:
    """The text each evaluation's TensorBoard sample starts from.

    '' where generate.py can start from nothing (the end-of-text token, or a newline); for a tokenizer
    with neither (a character set without '\\n'), the first token of the val split, or token 0.
    """
    from generate import encode_prompt
    try:
        encode_prompt(tokenizer, "")
        return ""
    except UserError:
        pass
    first = np.fromfile(Path(data_dir) / "val.bin", dtype=meta["dtype"], count=1)
    return tokenizer.decode([int(first[0]) if first.size else 0])


def remove_run_folders(run_dir: Optional[Path], made: list[Path]) -> None:
    """Take away what a run that trained nothing leaves: its TensorBoard run (the hyperparameters alone)
    and the folders it made, where they are empty."""
    if run_dir is not None and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
    remove_empty_folders(made)


def move_aside(checkpoint_dir: Path) -> Optional[Path]:
    """Move the checkpoints of an earlier run into checkpoint_dir/previous-<time>/ so nothing is overwritten."""
    if not checkpoint_dir.is_dir():
        return None
    old = [p for p in checkpoint_dir.iterdir()
           if p.is_file() and (p.name in CHECKPOINT_FALLBACK or ITER_CHECKPOINT.fullmatch(p.name))]
    if not old:
        return None
    dest = checkpoint_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    return dest


def move_back(moved: Path, checkpoint_dir: Path) -> None:
    """Undo move_aside: a run that trained nothing leaves checkpoint_dir as it found it."""
    for p in moved.iterdir():
        os.replace(p, checkpoint_dir / p.name)
    moved.rmdir()


def copied_checkpoints(ckpt: dict, checkpoint_dir: Path) -> bool:
    """Whether checkpoint_dir is a copy of the folder that wrote ckpt, which still exists: the copy resumed (one
    branch of a sweep, say) must not write into the TensorBoard run of the original, whose later steps it would
    hide. A folder that was moved or renamed is no copy: the original is gone."""
    written_in = ckpt.get("checkpoint_folder")  # checkpoints before this key: taken as the same folder
    if not written_in or not Path(written_in).is_dir():
        return False
    try:
        return not os.path.samefile(written_in, checkpoint_dir)
    except OSError:
        return False


def new_run_dir(log_dir: str, data_dir: str, checkpoint_dir: str) -> Path:
    """Make log_dir/<time>_<data>[_<checkpoint folder>][-N] and return it. Making it claims the name: runs
    started in the same second (a sweep started from a script, say) each get their own TensorBoard run."""
    # a sweep's runs differ in their checkpoint folders (checkpoints/lr3e-4, ...): their names tell the runs
    # apart in TensorBoard's list, where the default folder's name would say nothing
    checkpoints = Path(checkpoint_dir).resolve().name
    name = Path(data_dir).resolve().name + ("" if checkpoints in ("checkpoints", "") else f"_{checkpoints}")
    # TensorBoard writes only UTF-8 paths: a folder named in other bytes (GBK) shows U+FFFD instead. Cut to
    # whole characters so that the name, with its time and a "-N", stays within the 255 bytes of a file name
    name = utf8_text(name).encode()[:200].decode("utf-8", "ignore")
    base = Path(log_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}_{name}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            run_dir = base.with_name(f"{base.name}-{n}")
            n += 1


class Logger:
    """stdout lines and TensorBoard scalars, on rank 0 only (every method is a no-op elsewhere)."""

    def __init__(self, master: bool, run_dir: Optional[Path], purge_step: Optional[int]):
        self.master = master
        self.writer = None
        # stdout that can no longer be written stops the run like SIGPIPE would, but through `stop` (the
        # loop's GracefulStop, once it runs), so that checkpoint.pt is saved first
        self.out = sys.stdout
        self.stdout_error: Optional[str] = None
        self.stop: Optional[GracefulStop] = None
        # the event file is opened at the first value written: a resumed run that has nothing left to train
        # leaves no empty file in the run's folder
        self.pending = (run_dir, purge_step) if master and run_dir is not None else None

    def open_writer(self):
        """The SummaryWriter, opened now if it is not yet; None on other ranks, without a log_dir, or closed."""
        if self.pending is not None:
            run_dir, purge_step = self.pending
            self.pending = None
            from torch.utils.tensorboard import SummaryWriter
            # event files are named after the second they were opened in, and TensorBoard reads a folder's
            # files in name order: a resumed run's file must not sort before the one it continues
            before = set(run_dir.glob("events.out.tfevents.*"))
            opened = [int(p.name.split(".")[3]) for p in before if p.name.split(".")[3].isdigit()]
            wait = max(opened) + 1 - time.time() if opened else 0
            if 0 < wait <= 2:  # a larger gap is another machine's clock, not this second: do not hang on it
                time.sleep(wait)
            quiet_tensorboard_threads()
            # purge_step hides events a killed run wrote after its last checkpoint, so a resumed run
            # shows no duplicated steps
            try:
                self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)
            except OSError as e:  # a full disk, say: the file was made, its first event could not be written
                for p in set(run_dir.glob("events.out.tfevents.*")) - before:
                    with suppress(OSError):
                        if p.stat().st_size == 0:
                            p.unlink()
                raise ConfigError(f"cannot write TensorBoard logs into {run_dir}: {e.strerror or e}") from None
        return self.writer

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around each use of the open event file: a write that fails (the disk filled up during the run) is said
        once, and the run trains on without TensorBoard rather than lose the steps since its last checkpoint."""
        try:
            yield
        except OSError as e:
            writer, self.writer = self.writer, None
            with suppress(OSError):
                writer.close()
            print(f"warning: TensorBoard logs can no longer be written into {writer.log_dir} ({e.strerror or e}); "
                  f"training goes on without them", file=sys.stderr, flush=True)

    def print(self, *args, **kwargs) -> None:
        if not self.master or self.out is None:  # stdout and stderr both failed: nowhere left to say it
            return
        try:
            print(*args, **kwargs, file=self.out, flush=True)
        except OSError as e:  # `| head` ended (BrokenPipeError), or the log file's disk is full
            failed = self.out
            # the few lines still to come (where the run stopped) go to stderr, unless that failed too
            self.out = sys.stderr if failed is sys.stdout else None
            silence(failed)
            if self.stdout_error is None:
                self.stdout_error = ("stdout was closed" if isinstance(e, BrokenPipeError)
                                     else f"stdout cannot be written ({e.strerror or e})")
                if self.stop is not None:
                    self.stop.request(SIGPIPE, self.stdout_error)

    def scalars(self, step: int, **values) -> None:
        if any(v is not None for v in values.values()) and self.open_writer() is not None:
            with self.writing():
                for tag, v in values.items():
                    if v is not None:
                        self.writer.add_scalar(tag, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.open_writer() is not None:
            with self.writing():
                # markdown: indent by four spaces so line breaks and spacing survive
                self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, config: dict) -> None:
        """config's plain values on the HPARAMS page, and a chart with the train and val losses together
        (CUSTOM SCALARS page), where overfitting shows as the two curves part."""
        if self.open_writer() is not None:
            from torch.utils.tensorboard.summary import hparams
            hp = {k: utf8_text(v) if isinstance(v, str) else v for k, v in config.items()
                  if isinstance(v, (bool, int, float, str))}
            # written into the run itself (SummaryWriter.add_hparams would start a second run); the
            # metrics are the val/loss and train/loss curves of this run. Not the third summary, the session's
            # end, which says "success" before the run has even begun
            experiment, session_start, _ = hparams(hp, {"val/loss": 0.0, "train/loss": 0.0})
            with self.writing():
                self.writer.add_custom_scalars(
                    {"loss": {"train and val": ["Multiline", ["train/loss", "train/eval_loss", "val/loss"]]}})
                for summary in (experiment, session_start):
                    self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.writer is not None:
            with self.writing():
                self.writer.flush()

    def close(self) -> None:
        self.pending = None
        if self.writer is not None:
            with self.writing():
                self.writer.close()
            self.writer = None


def quiet_tensorboard_threads() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails (a full disk): the error
    is raised again in the thread that writes next, where Logger.writing says it in one line."""
    import threading
    try:  # a private class: a TensorBoard without it only prints the traceback again
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:
        return
    if getattr(threading.excepthook, "quiet_tensorboard", False):
        return
    default = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            default(args)
    hook.quiet_tensorboard = True
    threading.excepthook = hook


def format_flops(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


# ----------------------------------------------------------------------------- training

def train(config: GPT2Config, explicit: Optional[set[str]] = None) -> dict:
    """Train as `config` says, resuming from checkpoint_dir/checkpoint.pt when it is there.

    explicit: the fields the user set (default: those that differ from config.py's defaults); when
    resuming they override the checkpoint's config. Returns a summary: iter_num, best_val_loss,
    losses {iter: train loss at each log step}, evals {iter: {'train', 'val'}}, run_dir,
    stopped_by (the signal number, or None), resumed_from (the iteration, or None), timing (seconds of
    setup, first_step, evaluation and checkpoints), and data_changed (what changed) when the data was
    prepared again during the run.
    Under torchrun (RANK set) every rank calls it; only rank 0 prints and writes files.
    """
    t_start = time.perf_counter()  # the last line's setup includes reading the checkpoint, which can take seconds
    config = copy.deepcopy(config)
    explicit = default_explicit(config) if explicit is None else set(explicit)
    config.validate(partial=True)
    with ExitStack() as lock:
        # the process that writes the checkpoints holds checkpoint_dir from before it reads checkpoint.pt
        # until it is done; a folder that is not there yet is locked by _train once it has made it
        later = None
        if os.environ.get("RANK", "0") == "0":
            if Path(config.checkpoint_dir).is_dir():
                hold_checkpoint_dir(lock, Path(config.checkpoint_dir))
            else:
                later = lock
        return _train_locked(config, explicit, t_start, later)


def hold_checkpoint_dir(lock: ExitStack, checkpoint_dir: Path) -> None:
    """Lock checkpoint_dir for this run, or refuse: two runs in one folder overwrite each other's checkpoints,
    and one's start-up removes the other's checkpoint being written."""
    if not lock.enter_context(folder_lock(checkpoint_dir)):
        raise ConfigError(f"another train.py{lock_holder(checkpoint_dir)} is training with --checkpoint_dir="
                          f"{checkpoint_dir}; wait for it to finish (or stop it), or give this run another "
                          f"--checkpoint_dir")


def _train_locked(config: GPT2Config, explicit: set[str], t_start: float, lock: Optional[ExitStack]) -> dict:
    """train() with checkpoint_dir locked, or with `lock` to lock it in once _train has made it."""
    # before the process group: a resumed run's backend and device come from its checkpoint
    plan = list(plan_run(config, explicit))
    config = plan[0]
    if config.sample_tokens > MAX_SAMPLE_TOKENS:  # drawn at each evaluation, and a signal waits for it
        given = "" if "sample_tokens" in explicit or plan[1] is None else " (the checkpoint's setting)"
        raise ConfigError(f"--sample_tokens={config.sample_tokens:,}{given} is the length of the text sample written "
                          f"at each evaluation: at most {MAX_SAMPLE_TOKENS:,}; give --sample_tokens=200, say, and "
                          f"use generate.py for long texts")
    torchrun = int(os.environ.get("RANK", -1)) != -1
    if torchrun and "device" not in explicit and config.device.startswith("cuda:"):
        config.device = "cuda"  # a checkpoint's own, from a run in one process: here each takes cuda:LOCAL_RANK
    rank, world_size, local_rank = 0, 1, None
    if torchrun:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
    ddp = world_size > 1  # torchrun with one process needs no process group
    if ddp:
        import torch.distributed as dist
        device, _, _ = resolve_system(config, local_rank)
        backend = config.backend
        if device.type != "cuda" and backend == "nccl":
            if "backend" in explicit:
                raise ConfigError(f"the nccl backend needs CUDA GPUs, but device is {device}; use --backend=gloo")
            # the default is the GPUs' one; on CPUs it is gloo's turn. The config keeps nccl, so a run resumed
            # on GPUs uses it there
            backend = "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        if ddp:  # each process read checkpoint_dir on its own machine: they must start from the same place
            starts = [None] * world_size
            dist.all_gather_object(starts, (plan[1]["iter_num"] if plan[1] is not None else None, config.init_from))
            check_same_start([s for s, _ in starts], config.checkpoint_dir, [i for _, i in starts])
        with ExitStack() as cleanup:
            summary = _train(plan, explicit, rank, world_size, local_rank, cleanup, t_start, lock)
        if ddp:
            # leave together: rank 0 may still be writing the final checkpoint, and a rank that tears
            # down its process group while a peer is still connected can abort at exit
            dist.barrier()
        return summary
    finally:
        if ddp:
            dist.destroy_process_group()


def check_same_start(starts: list, checkpoint_dir: str, init_froms: Optional[list] = None) -> None:
    """starts[rank]: the iteration each process would resume from (None: a new run). Processes on
    machines that do not share checkpoint_dir would disagree, and then wait on each other forever; so would
    processes given different --init_from (init_froms[rank]), such as scratch on one, on one shared folder."""
    if len(set(starts)) > 1:
        found = ", ".join(f"rank {r}: {'iteration ' + str(s) if s is not None else 'no checkpoint'}"
                          for r, s in enumerate(starts))
        # a pretrained model's path may differ between machines (LOCAL_SETTINGS): what counts is where a run starts
        if init_froms and len({i if i in ("auto", "scratch", "resume") else "pretrained" for i in init_froms}) > 1:
            given = ", ".join(f"rank {r}: {i}" for r, i in enumerate(init_froms))
            raise ConfigError(f"the processes were given different --init_from ({given}), so they start from "
                              f"different places ({found}): give every process the same --init_from")
        raise ConfigError(f"the processes found different checkpoints in --checkpoint_dir={checkpoint_dir} ({found}); "
                          f"on several machines it must be a folder that all of them share (a network file "
                          f"system), since only rank 0 writes checkpoints")


# what may differ between machines: paths (a shared folder mounted elsewhere), devices, and the settings that
# only save memory, for GPUs with less of it. The model comes from rank 0 whatever init_from says (DDP
# copies its weights to the others)
LOCAL_SETTINGS = ("data_dir", "checkpoint_dir", "log_dir", "device", "init_from", "gradient_checkpointing",
                  "loss_chunk_rows")


def settings_of(config: GPT2Config, meta: dict, dtype: Optional[torch.dtype] = None) -> dict:
    """What must be the same in every process of a run: the settings and the data set's identity. dtype: the
    one this process resolved (--dtype=auto picks float16 on GPUs without bfloat16, with a GradScaler that
    would scale only their gradients)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in LOCAL_SETTINGS}
    if dtype is not None:
        settings["dtype in use"] = str(dtype).removeprefix("torch.")
    return {**settings, **{f"the data's {k}": meta.get(k) for k in
                           ("tokenizer", "vocab_size", "train_tokens", "val_tokens", "source_sha256")}}


def check_same_settings(settings: list[dict]) -> None:
    """settings[rank]: settings_of() in each process. A command typed differently on one machine would
    otherwise step each copy of the model with its own learning rate under one averaged gradient, or
    leave the processes waiting on each other forever (another max_iters, eval_interval, ...)."""
    differ = [k for k in settings[0] if any(s.get(k) != settings[0][k] for s in settings[1:])]
    if not differ:
        return

    def ranks(values: list) -> str:  # "0.0006 (ranks 0-7), 0.03 (ranks 8-15)"
        groups = {}
        for r, v in enumerate(values):
            groups.setdefault(repr(v), []).append(r)
        return ", ".join(f"{v} (rank{'s' if len(rs) > 1 else ''} {rank_ranges(rs)})" for v, rs in groups.items())
    found = "; ".join(f"{k}: {ranks([s.get(k) for s in settings])}" for k in differ[:4])
    how = "give every machine the same flags, config file and prepared data"
    if "dtype in use" in differ and "dtype" not in differ:  # the same --dtype, resolved on other GPUs
        how = ("--dtype=auto chose by GPU, and the GPUs differ: give --dtype=float16 (or float32) on every "
               "machine, since only some of the GPUs compute in bfloat16")
    raise ConfigError(f"the processes were started with different settings ({found}"
                      f"{'; ...' if len(differ) > 4 else ''}): {how}")


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _train(plan: list, explicit: set[str], rank: int, world_size: int, local_rank: Optional[int],
           cleanup: ExitStack, t_start: float, lock: Optional[ExitStack] = None) -> dict:
    from data import BatchLoader, DataError, load_data_tokenizer, load_meta, remake_command
    config, ckpt, ckpt_path = plan
    plan.clear()  # no reference is left in train(), so `del ckpt` below frees the checkpoint's tensors
    master = rank == 0
    ddp = world_size > 1

    # --- everything that can fail on the user's input happens before anything is written
    A = config.gradient_accumulation_steps
    if A % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({A}) counts the micro-batches of all processes together "
                          f"and must be divisible by the {world_size} processes; e.g. "
                          f"--gradient_accumulation_steps={world_size * max(1, round(A / world_size))}")
    device, dtype, compile_model = resolve_system(config, local_rank)
    problem = fp8_problem(device) if config.fp8 else None
    if problem:
        raise ConfigError(f"{problem}; drop --fp8")
    cuda_graphs = compile_model and device.type == "cuda" and config.compile_mode in CUDA_GRAPH_MODES
    if cuda_graphs and A > world_size:
        # A CUDA graph's backward hands its gradient buffers to .grad and overwrites them on the next
        # replay, so a second micro-step would corrupt the first one's gradients (pytorch/pytorch#169545)
        other = "default" if config.compile_mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
        raise ConfigError(f"compile_mode={config.compile_mode} replays CUDA graphs, which cannot accumulate "
                          f"gradients over {A // world_size} micro-steps per process; use --compile_mode={other}, "
                          f"or --gradient_accumulation_steps={world_size} with a larger --batch_size")
    if cuda_graphs and config.compile_regional and config.compile_eval:
        # on an H200 with torch 2.11 the first compiled evaluation failed: torch's CUDA graph trees had overwritten
        # the embedding region's output before the first block read it. Eager evaluation of the regions is fine.
        raise ConfigError(f"compile_regional with compile_mode={config.compile_mode} cannot evaluate through the "
                          f"compiled regions: one region's CUDA graph overwrites the output the next one reads; add "
                          f"--compile_eval=False (evaluations run eagerly) or drop --compile_regional")
    graph_problem = cuda_graph_problem(config, device, dtype, compile_model, world_size) if config.cuda_graph else None
    # a resumed run whose command does not say --cuda_graph takes the checkpoint's True as 'auto': a GPU run
    # continued on a CPU, say, trains without the graph rather than refusing a flag the command did not give
    if config.cuda_graph is True and graph_problem and (ckpt is None or "cuda_graph" in explicit):
        raise ConfigError(f"{graph_problem}; or drop --cuda_graph")
    graph_step = bool(config.cuda_graph) and graph_problem is None  # 'auto' captures where it can
    start_compile_workers(device, compile_model)
    if ckpt is not None and "data_dir" not in explicit and not (Path(config.data_dir) / "meta.json").is_file():
        # the folder comes from the checkpoint, not from the command: moved or removed since; the checkpoint
        # knows how it was prepared
        raise DataError(f"the data set {ckpt_path} was trained on, --data_dir={config.data_dir} (recorded in the "
                        f"checkpoint), is not there. If it moved, give --data_dir=NEW_FOLDER; else prepare it again "
                        f"with: {remake_command(Path(config.data_dir), ckpt.get('meta') or {})}")
    meta = load_meta(config.data_dir)
    if world_size > 1:  # each machine's command was typed, and its data prepared, on its own
        settings = [None] * world_size
        torch.distributed.all_gather_object(settings, settings_of(config, meta, dtype))
        check_same_settings(settings)
    tokenizer = load_data_tokenizer(config.data_dir, meta)
    if ckpt is not None:
        check_same_tokens(ckpt, ckpt_path, meta, tokenizer, config)
    prompt = sample_prompt(tokenizer, config.data_dir, meta) if config.sample_tokens else ""
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    raw_model = build_model(config, explicit, meta, ckpt, ckpt_path, device, dtype)
    # what the weights came from, settled before any folder is made (a --checkpoint_dir named gpt2 would
    # otherwise be taken for the model's folder)
    run_origin = started_from(ckpt) if ckpt is not None else origin(config.init_from)
    run_fingerprint = ckpt.get("started_from_fingerprint") if ckpt is not None else folder_fingerprint(config.init_from)
    # rank 0 and world size 1 on every rank: batch_index() below gives each rank its own windows
    loader = cleanup.enter_context(BatchLoader(config.data_dir, config.block_size, config.batch_size, device=device,
                                               seed=config.seed, verbose=master))
    micro_steps = A // world_size  # per rank, per optimizer step
    tokens_per_iter = A * config.batch_size * config.block_size
    eval_per_pass = eval_batches_per_pass(config, device, compile_model, dtype)
    # how this run measures the val loss: its exact mean where the split is swept (as estimate_loss does),
    # whatever the seed or the batches; else on the random batches these settings draw
    val_measure = ({"swept": True} if eval_plan(loader, config.eval_iters)["val"][1]
                   else val_measure_of(config.to_dict(), config))

    device_type = device.type
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls where float32 remains
    ctx = autocast_context(device_type, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(config.weight_decay, config.learning_rate,
                                               (config.beta1, config.beta2), device_type)
    iter_num, best_val_loss, best_measure = 0, float("inf"), val_measure
    if ckpt is not None:
        # the moments and step counts continue; the settings (weight_decay, betas, fused, ...) are this
        # run's, which a resumed command may have changed (the learning rate is set at every step). They
        # go into the saved groups before loading: torch places the step counters by the flags it loads
        state = ckpt["optimizer"]
        for saved, own in zip(state["param_groups"], optimizer.param_groups):
            saved.update({k: v for k, v in own.items() if k != "params"})
        optimizer.load_state_dict(state)
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        # how the best so far was measured; a checkpoint from before sweeps measured every val loss on the random
        # batches of its settings
        best_measure = (ckpt.get("progress") or {}).get("best_measure") or val_measure_of(ckpt["config"], config)
        # the last step's learning rate, which an unbroken run's groups still hold when a copy is saved before the
        # next step: the evaluation a stop left owed, the iteration copy a kill came before
        for group in optimizer.param_groups:
            group["lr"] = get_lr(max(iter_num - 1, 0), config)
        rng = ckpt.get("rng")
        exact = restore_rng(rng, rank, world_size, device, config.seed + rank + iter_num)
        if not exact and master and config.dropout > 0:  # without dropout nothing random is drawn: nothing to say
            print(f"note: {ckpt_path} holds the random state of {len(rng or [])} process(es) and this run has "
                  f"{world_size}; dropout is re-seeded, so the run does not continue bit for bit")
    else:
        torch.manual_seed(config.seed + rank)  # each rank its own dropout stream
    model = training_model(raw_model, compile_model, config.compile_mode, config.compile_regional)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device_type == "cuda" else None)
        # all ranks agree on stopping after a signal; a gloo group keeps that check off the GPU stream
        stop_group = torch.distributed.new_group(backend="gloo") if config.backend != "gloo" else None
    # evaluation needs no gradient synchronisation, and with compile_eval=False no compiled graph either
    # (compiled regions are part of raw_model: they run eagerly inside the force_eager stance, which is
    # made anew for each evaluation because making it already sets it, for the whole process)
    eval_model = (model.module if ddp else model) if config.compile_eval else raw_model
    eval_stance = nullcontext if config.compile_eval else lambda: torch.compiler.set_stance("force_eager")

    # --- from here on files are written (rank 0 only); until GracefulStop takes over, a signal ends the run
    # with an exception, so that a new run that trained nothing puts the old checkpoints back
    # (GracefulStop, entered for the training itself, takes the signals over and gives them back to this)
    setup_stopped = cleanup.enter_context(stop_signals_raise(lambda signum: SystemExit(128 + signum)))
    checkpoint_dir = Path(config.checkpoint_dir)
    run_dir = None
    made_folders = []  # by this run: a run stopped before it trained anything takes them away again
    new_run = False  # whether run_dir is a new TensorBoard run, rather than one this run continues
    if master:
        # both folders first: one that cannot be made (a read-only or virtual file system) stops the run
        # before the previous checkpoints are moved aside
        made_folders = missing_folders(checkpoint_dir) + missing_folders(Path(config.log_dir))
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            remove_run_folders(None, made_folders)
            raise ConfigError(f"cannot make --checkpoint_dir folder {checkpoint_dir}: {e.strerror or e}") from None
        if lock is not None:  # the folder did not exist when train() began
            try:
                hold_checkpoint_dir(lock, checkpoint_dir)
            except ConfigError:
                made_folders = []  # made by the run that holds the lock, maybe, at the same moment: its own now
                raise
        try:
            # a resume continues the same TensorBoard run where --log_dir holds it, however the folder is
            # written (runs, ./runs, a path from another working folder), or where --log_dir is unchanged
            continued = Path(config.log_dir) / Path(ckpt["run_dir"]).name if ckpt and ckpt.get("run_dir") else None
            if continued and copied_checkpoints(ckpt, checkpoint_dir):
                continued = None  # a copy of another run's folder (a branch of a sweep): a run of its own
            if continued and (continued.is_dir() or config.log_dir == ckpt["config"].get("log_dir")):
                run_dir, new_run = continued, not continued.is_dir()  # a deleted run folder starts again
                run_dir.mkdir(parents=True, exist_ok=True)
            else:
                run_dir, new_run = new_run_dir(config.log_dir, config.data_dir, config.checkpoint_dir), True
        except OSError as e:
            remove_run_folders(None, made_folders)  # the checkpoint folder just made, say
            raise ConfigError(f"cannot make --log_dir folder {config.log_dir}: {e.strerror or e}") from None
    untrained, log, moved = ckpt is None, None, None  # a new run, until its first step is done

    def leave_no_trace() -> None:  # a new run that trained nothing: the folders as it found them
        nonlocal untrained
        untrained = False  # once
        try:
            if log is not None:
                log.close()
        finally:  # the folders first, the message after: it must not claim what did not happen
            if moved:
                move_back(moved, checkpoint_dir)
            remove_run_folders(run_dir, made_folders)
        if moved:
            with suppress(OSError):  # a closed stdout (| head) must not hide the error being undone
                print(f"nothing was trained: the previous checkpoints are back in {checkpoint_dir}", flush=True)
    # an error or a second Ctrl-C before then (in the setup, the first evaluation or the first step: out of
    # memory, a compile error) ends a new run that trained nothing
    cleanup.push(lambda error_type, *_: leave_no_trace() if error_type is not None and untrained else None)
    # a resumed run writes into its run's folder, which --log_dir's check did not see (another user's, say);
    # TensorBoard's writer thread would also print a traceback of its own
    problem = folder_problem(run_dir) if master and run_dir is not None else None
    if problem:
        raise ConfigError(f"cannot write TensorBoard logs into {run_dir}: it {problem}; make it writable, or give "
                          f"another --log_dir")
    log = Logger(master, run_dir, purge_step=iter_num + 1 if ckpt is not None else None)
    cleanup.callback(log.close)
    if master:
        remove_unfinished_writes(checkpoint_dir, CHECKPOINT_NAMES)
    if master and ckpt is None:
        moved = move_aside(checkpoint_dir)
        if moved:
            log.print(f"starting a new run: the previous checkpoints in {checkpoint_dir} were moved to {moved}")
    if new_run:  # TensorBoard keeps the first hyperparameters a run folder gets, so only a new one gets them
        # the backend in use, not the config's (gloo stands in for nccl on CPUs), and how many processes
        log.hparams({**config.to_dict(), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                     "compile": compile_model, "world_size": world_size,
                     "backend": torch.distributed.get_backend() if ddp else "none"})
    # a resumed run whose command changed settings says so, and on its TEXT page (below) where it continues a run
    config_changes, data_changed = [], []
    if ckpt is not None:
        before = ckpt["config"]
        data_changed = [k for k in ("source_sha256", "train_tokens", "val_tokens")
                        if k in (ckpt.get("meta") or {}) and ckpt["meta"][k] != meta.get(k)]
        # a place written otherwise (../w1/runs, an absolute path) is no change where it is the same place: a
        # resume comes only from the same start (init_from), the same data set (data_dir, unless said below)
        # and the same TensorBoard run; checkpoint_dir only where it is a copy of the folder that wrote ckpt
        same = {"init_from"}
        if not data_changed:
            same.add("data_dir")
        if not new_run:
            same.add("log_dir")
        if not copied_checkpoints(ckpt, checkpoint_dir):
            same.add("checkpoint_dir")
        config_changes = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in config.to_dict().items()
                          if k in before and before[k] != v and k not in same]

    n_params = raw_model.get_num_params()
    log.print(f"model: {n_params / 1e6:.2f}M parameters ({config.n_layer} layers, {config.n_head} heads, "
              f"{config.n_embd} wide, block {config.block_size}, vocab {config.vocab_size})")
    log.print(f"tokens per step: {tokens_per_iter:,} = {config.gradient_accumulation_steps} micro-batches x "
              f"{config.batch_size} sequences x {config.block_size} tokens"
              + (f" over {world_size} processes" if ddp else ""))
    compiled = f"compile {compile_model}" + (f" ({config.compile_mode}{', regional' * config.compile_regional})"
                                             if compile_model else ", so compile_regional does nothing"
                                             if config.compile_regional else "")
    compiled += ", each step one CUDA graph" if graph_step else ""
    attention = attention_kernel(config, config.batch_size, device, dtype)
    log.print(f"device: {device}{f' x {world_size}' if ddp else ''}, dtype {str(dtype).removeprefix('torch.')}, "
              f"{compiled}, attention {attention}, data {config.data_dir} ({meta['tokenizer']}), "
              f"checkpoints {checkpoint_dir}, tensorboard {run_dir}")
    if warning := dtype_warning(device, dtype):
        log.print(warning)
    if note := bytecode_note():
        log.print(note)
    if config.warmup_iters >= config.max_iters > iter_num and config.learning_rate > 0:
        # config.py's default warmup (2000 steps) under a short --max_iters: a run that never really trains
        last = get_lr(config.max_iters - 1, config)
        fewer = min(config.max_iters - 1, max(1, config.max_iters // 10))
        log.print(f"warning: warmup_iters={config.warmup_iters} is not below max_iters={config.max_iters}: the run "
                  f"ends while the learning rate still warms up, at {last:.2e} ({last / config.learning_rate:.0%} of "
                  f"learning_rate); give fewer, e.g. --warmup_iters={fewer}")
    elif (ckpt is None and config.decay_lr and config.learning_rate > 0 and config.max_iters < config.lr_decay_iters
          and ("lr_decay_iters" not in explicit or config.lr_decay_iters in PRESET_DECAYS)):
        # the same trap at the other end: config.py's 100,000 steps of decay, or a preset's, under a shorter
        # --max_iters. Said as a run starts: a resumed one's lr_decay_iters may have been given when it began
        last = get_lr(config.max_iters - 1, config)
        log.print(f"warning: lr_decay_iters={config.lr_decay_iters} is above max_iters={config.max_iters}: the run "
                  f"ends with the learning rate at {last:.2e} ({last / config.learning_rate:.1%} of learning_rate), "
                  f"before its cosine decay to min_lr; give --lr_decay_iters={config.max_iters}")
    if ckpt is not None:
        # inf until an evaluation after training steps: stopped or crashed before one, which is no failed run
        has_best = math.isfinite(best_val_loss)
        best = f"best val loss {best_val_loss:.4f}" if has_best else "no val loss measured since training began"
        log.print(f"resuming from {ckpt_path} at iteration {iter_num} ({best})")
        if config_changes:  # --preset given again, say, puts its own values back over the first run's flags
            log.print(f"settings this command changed: {', '.join(config_changes)}")
        not_comparable = (f"the val loss is not comparable with the best so far ({best_val_loss:.4f}), which "
                          f"best_checkpoint.pt keeps until a lower one")
        if data_changed:
            log.print(f"note: {config.data_dir} is not the data set the checkpoint was trained on "
                      f"({', '.join(data_changed)} differ): training goes on with this one"
                      + (f", and {not_comparable}" if has_best else ""))
        elif not has_best:  # no best yet: nothing to compare with
            pass
        elif best_measure.get("swept") != val_measure.get("swept"):
            def way(measure: dict) -> str:
                return ("every target of the val split once" if measure.get("swept")
                        else f"{measure['eval_iters']} random val batches")
            log.print(f"note: the evaluations now take {way(val_measure)}, and the best so far was measured on "
                      f"{way(best_measure)}, so {not_comparable}")
        elif sampled := [f"--{k}" for k in best_measure if best_measure[k] != val_measure[k]]:
            # the val batches are drawn by seed, batch number and batch size: other ones, or more or fewer
            log.print(f"note: {' and '.join(sampled)} changed since the best so far, so the evaluations draw other "
                      f"val batches, and {not_comparable}")
    elif config.init_from not in ("auto", "scratch", "resume"):
        log.print(f"fine-tuning from {config.init_from}")
    resumed_from = iter_num if ckpt is not None else None
    progress = (ckpt.get("progress") if ckpt is not None else None) or {"loss_sums": [], "steps": 0, "eval_s": 0.0}
    progress["eval_iters"] = ckpt["config"].get("eval_iters") if ckpt is not None else None  # what eval_s timed
    eval_owed = bool(progress.get("eval_owed", False))
    # the iteration of the last whole evaluation (older checkpoints: taken as this one). A run stopped between
    # evaluations and resumed with --max_iters at that iteration evaluates it first, as a run that ended there did
    evaluated_at = progress.get("evaluated_at", iter_num) if ckpt is not None else None
    if ckpt is not None and iter_num == config.max_iters and evaluated_at != iter_num:
        eval_owed = True
    # only where this run trains, or makes up an owed evaluation: a finished run leaves no event file
    trains = iter_num < config.max_iters or (iter_num == config.max_iters and eval_owed)
    if config_changes and not new_run and trains:
        # at the first step this run trains, which a rerun after a crash before its first checkpoint purges
        # (purge_step): listed once, not once per try
        log.text("config_changes", f"resumed at iteration {iter_num} with:\n" + "\n".join(config_changes),
                 iter_num + 1)
    del ckpt  # the optimizer and model hold copies; free the checkpoint's tensors

    def make_checkpoint() -> dict:
        # every rank's RNG state, so each dropout stream continues exactly (a collective under DDP)
        rng = get_rng_state(device)
        if ddp:
            states = [None] * world_size
            torch.distributed.all_gather_object(states, rng)
            rng = states
        else:
            rng = [rng]
        # each process's train-loss sum since the last log step, so that a resumed run logs the same means
        sums = [interval_loss.item()]
        if ddp:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, sums[0])
            sums = gathered
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "iter_num": iter_num,
                "best_val_loss": best_val_loss, "config": config.to_dict(), "meta": meta,
                "tokenizer": tokenizer.to_dict(), "rng": rng, "run_dir": str(run_dir) if run_dir else None,
                "checkpoint_folder": str(checkpoint_dir.resolve()),  # a copy of the folder can tell itself from it
                "progress": {"loss_sums": sums, "steps": interval_steps, "eval_s": last_eval_s,
                             "eval_owed": eval_owed, "evaluated_at": evaluated_at, "best_measure": best_measure},
                "started_from": run_origin, "started_from_fingerprint": run_fingerprint, "version": CHECKPOINT_VERSION}

    # where the run's time goes, for the last line: evaluations, text samples and checkpoint writes are summed
    # as they happen, setup and the first step (torch.compile's compilation) are timed once, steps are the rest
    timing = {"evaluation": 0.0, "samples": 0.0, "checkpoints": 0.0}

    writer = CheckpointWriter()
    # on an error elsewhere the write under way is finished (a whole file), and its own error, if any, stays behind
    cleanup.push(lambda error_type, *_: writer.close(raise_error=error_type is None))

    def write(names: list[str], at: int, prune: bool, ckpt: dict) -> None:
        """Write names[0], then give the other names the same state. A crash in between leaves the
        others at an older state, so names[0] is the one that must not lag (best_checkpoint.pt: a
        checkpoint.pt left behind only makes the resumed run repeat those steps, exactly). On the
        writer's thread, mostly: `at` is the iteration the state is from."""
        name = names[0]
        try:
            save_checkpoint(checkpoint_dir / name, ckpt)
            for name in names[1:]:  # the same state under another name
                save_checkpoint_as(checkpoint_dir / name, checkpoint_dir / names[0], ckpt)
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as a RuntimeError raised while handling the OSError
            cause = next((c for c in exception_chain(e) if isinstance(c, OSError)), None)
            if cause is None:
                raise
            last = checkpoint_dir / "checkpoint.pt"
            then = (f"the checkpoints written before are whole. Make room (or fix the folder) and run the same "
                    f"command again to continue from {last}" if last.is_file() else
                    "nothing was saved before. Make room (or fix the folder) and run the same command again: "
                    "it starts over")
            raise TrainingError(f"cannot write {checkpoint_dir / name} at iteration {at}: "
                                f"{cause.strerror or cause}; {then}") from None
        if prune:
            prune_iter_checkpoints(checkpoint_dir, config.keep_last_n)

    def save(names: list[str], wait: bool = False) -> None:
        """Save the state under names (see write), while training goes on; wait: until the files are written."""
        t0 = time.perf_counter()
        check_finite(weights=True)
        ckpt = make_checkpoint()
        if master:
            log.flush()  # events up to this step reach the disk before the checkpoint that covers them
            prune = bool(config.keep_last_n) and ITER_CHECKPOINT.fullmatch(names[0]) is not None
            writer.submit(partial(write, names, iter_num, prune), ckpt)
            if wait:
                writer.wait()
        # the training thread's share: the state's copy (and the wait for the write before, if it is still going)
        timing["checkpoints"] += time.perf_counter() - t0

    # non-finite losses and gradient norms are counted on the device and looked at only where the host
    # syncs anyway
    nonfinite = torch.zeros((), dtype=torch.int32, device=device)

    def check_finite(losses=(), weights: bool = False) -> None:
        bad = nonfinite.clone()
        if weights:  # before a save: without clipping the gradient norm is watched on log steps only
            bad += torch.stack([~torch.isfinite(p).all() for p in raw_model.parameters()]).sum().int()
        if ddp:
            torch.distributed.all_reduce(bad)
        if bad.item() or not all(math.isfinite(v) for v in losses):
            writer.wait()  # the write under way is among the saved files below
            saved = [p for p in checkpoint_dir.glob("*.pt")
                     if p.name == "checkpoint.pt" or ITER_CHECKPOINT.fullmatch(p.name)]
            last = max(saved, key=lambda p: p.stat().st_mtime, default=None)
            kept = (f"no checkpoint was overwritten ({last} holds the last good state)" if last is not None
                    else "no checkpoint was written")
            raise TrainingError(
                f"the loss, the gradient norm or the weights became NaN or infinite by iteration {iter_num}; "
                f"training stopped and {kept}. Lower --learning_rate (now {config.learning_rate}) or keep "
                f"--grad_clip on" + (", or use --dtype=bfloat16 instead of float16" if dtype == torch.float16 else ""))

    def evaluate(initial: bool = False) -> Optional[dict[str, float]]:
        """The evaluation at iter_num; None if a signal cut it short (then checkpoint.pt is saved all the same,
        except for the initial evaluation, before anything was trained)."""
        nonlocal best_val_loss, best_measure, eval_owed, evaluated_at
        t0 = last_report = time.perf_counter()
        first_round = None  # (time, batches) at the end of the first round, which may have compiled the graph

        def progress(done: int, total: int) -> None:  # a line every 30 s when an evaluation takes long
            nonlocal last_report, first_round
            now = time.perf_counter()
            first_round = first_round or (now, done)
            if now - last_report > 30:
                last_report = now
                # the time left says at once what a preset sized for a GPU costs on a CPU: minutes per evaluation.
                # Its rate leaves out the first round, whose compiling would make it many times too long
                since, before = first_round
                left = f", about {format_duration((now - since) / (done - before) * (total - done))} left" \
                    if done > before else ""
                log.print(f"iter {iter_num}: evaluating, {done}/{total} batches [{now - t0:.0f}s{left}]")

        def should_stop() -> bool:  # before each round of evaluation batches
            look_at_data()
            return stop_requested(stop, stop_group if ddp else None)
        with eval_stance():
            losses = estimate_loss(eval_model, loader, config.eval_iters, ctx, rank, world_size,
                                   should_stop=should_stop, progress=progress, per_pass=eval_per_pass)
        if losses is None:
            timing["evaluation"] += time.perf_counter() - t0
            log.print(f"iter {iter_num}: evaluation cut short by the stop request")
            if not initial:
                eval_owed = True  # a resumed run evaluates this iteration first
                save(["checkpoint.pt"])
            return None
        eval_owed, evaluated_at = False, iter_num
        check_finite(losses.values())
        # the starting point is only reported: best_checkpoint.pt is the best the training produced
        improved = not initial and losses["val"] < best_val_loss
        if improved:
            best_val_loss, best_measure = losses["val"], val_measure
        log.print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  f"{' (best)' if improved else ''} [{time.perf_counter() - t0:.1f}s]")
        log.scalars(iter_num, **{"train/eval_loss": losses["train"], "val/loss": losses["val"]})
        timing["evaluation"] += time.perf_counter() - t0
        if master and config.sample_tokens:
            from generate import sample_text
            t_sample = time.perf_counter()
            # the raw model, seeded generator: the training RNG streams are not touched. A stop request
            # abandons the sample: a larger model's hundreds of tokens take seconds on a CPU
            text = sample_text(raw_model, tokenizer, prompt, max_new_tokens=config.sample_tokens, seed=config.seed,
                               should_stop=lambda: stop.signum is not None)
            if text is not None:
                log.text("sample", text, iter_num)
            timing["samples"] += time.perf_counter() - t_sample
        if not initial:
            save(["best_checkpoint.pt", "checkpoint.pt"] if improved else ["checkpoint.pt"])
        return losses

    def batch_index(it: int, m: int) -> int:
        # the global micro-batch number: W ranks with A/W micro-steps each draw the same windows as one
        # process with A micro-steps, and rank r takes every W-th of them
        return it * config.gradient_accumulation_steps + m * world_size + rank

    summary = {"losses": {}, "evals": {}, "stopped_by": None, "resumed_from": resumed_from,
               "run_dir": str(run_dir) if run_dir else None}

    def look_at_data() -> None:
        """The data prepared again (a .bin replaced, changed or removed): stop, saving the state of the last step,
        before a batch meets the change. Before each round of evaluation batches, and at the end of each
        iteration, before the processes agree to go on; a stat per split."""
        changed = loader.changed_file()
        if changed and not summary.get("data_changed"):
            summary["data_changed"] = changed
            stop.request(signal.SIGTERM, changed, between_steps=True)

    def finish() -> dict:
        writer.wait()
        total = time.perf_counter() - t_start
        timing.update(steps=total - sum(timing.values()), total=total)
        summary.update(iter_num=iter_num, best_val_loss=best_val_loss, timing=timing)
        return summary
    setup_stopped()  # a signal whose exception Python dropped (raised inside a fork's callbacks, say) ends it here
    with GracefulStop(verbose=master) as stop:
        log.stop = stop
        if resumed_from is None:  # until the first evaluation, which comes before any training
            stop.then = "stopping: nothing is trained yet, so nothing is saved"
        elif iter_num >= config.max_iters and not eval_owed:  # see "already trained" below
            stop.then = "stopping: max_iters is reached already, so nothing is left to train"
        if log.stdout_error:  # already during the setup
            stop.request(SIGPIPE, log.stdout_error)
        # the train loss summed since the last log step; a resumed run starts from the checkpoint's sums,
        # so that it logs the same means as a run that was never stopped. Each process sums its own
        # losses and a log step averages over the processes, so under another number of processes every
        # one starts from the average of the saved sums
        sums = progress["loss_sums"]
        own = sums[rank] if len(sums) == world_size else sum(sums) / max(1, len(sums))
        interval_steps = progress["steps"]
        if interval_steps > iter_num % config.log_interval:
            # summed since a log step of another --log_interval, before this interval began: those steps cannot
            # be taken out of the sum, so the interval starts here and its first mean covers the steps after it
            own, interval_steps = 0.0, 0
        interval_loss = torch.tensor(own, device=device)
        last_eval_s = progress["eval_s"]  # the last evaluation's duration, for the ETA
        if progress.get("eval_iters"):  # a resumed run may evaluate on more or fewer batches than the saved one
            last_eval_s *= (sum(n for n, _ in eval_plan(loader, config.eval_iters).values())
                            / sum(n for n, _ in eval_plan(loader, progress["eval_iters"]).values()))
        # the first evaluation in this process also compiles the evaluation graph, which the later ones do not
        eval_compiles = compile_model and config.compile_eval

        def timed_eval(seconds: float) -> float:
            """The duration to plan the remaining evaluations with, after one that took `seconds`."""
            nonlocal eval_compiles
            if eval_compiles:
                eval_compiles = False
                return last_eval_s  # the saved run's figure, or 0 until an evaluation without compiling
            return seconds
        t0 = time.perf_counter()
        owed = eval_owed  # a stopped run's last evaluation was cut short: it is made up first

        def final_due() -> bool:
            # also when a run that had finished lost its final checkpoint to a crash while writing it: then
            # final_checkpoint.pt is missing, or older than the checkpoint.pt of the last evaluation. Never
            # for a checkpoint past max_iters (a lower --max_iters than the run was stopped at): that run
            # did not finish, and its final_checkpoint.pt, if any, is another run's end
            writer.wait()  # the files as they will be
            final, last = checkpoint_dir / "final_checkpoint.pt", checkpoint_dir / "checkpoint.pt"
            return iter_num == config.max_iters and (
                resumed_from is None or iter_num > resumed_from or owed or not final.is_file()
                or (last.is_file() and final.stat().st_mtime < last.stat().st_mtime))

        if iter_num > config.max_iters or (iter_num == config.max_iters and not owed and not final_due()):
            log.print(f"already trained for {iter_num} iterations (max_iters={config.max_iters}); "
                      f"raise --max_iters to continue")
            if new_run:  # its TensorBoard run would hold the hyperparameters alone, one more at every such command
                log.close()
                remove_run_folders(run_dir, made_folders)
        elif resumed_from is None or owed:
            losses = evaluate(initial=resumed_from is None)  # at the start, e.g. a pretrained model's loss
            stop.then = GracefulStop.SAVING
            # a signal after the last batch (while the sample is written, say) stops here too, as announced
            if resumed_from is None and losses is not None and stop_requested(stop, stop_group if ddp else None):
                losses = None
            if losses is None:
                summary["stopped_by"] = stop.signum or signal.SIGTERM
                if resumed_from is None:
                    log.print("stopped during the first evaluation: nothing was trained yet, so no checkpoint was "
                              "written" + (" and the folders this run made were removed" if made_folders else ""))
                    leave_no_trace()
                else:
                    log.print(f"stopped at iteration {iter_num} again: {checkpoint_dir / 'checkpoint.pt'} still "
                              f"owes that evaluation")
                return finish()
            summary["evals"][iter_num] = losses
            last_eval_s = timed_eval(time.perf_counter() - t0)
            if owed and config.save_interval and iter_num % config.save_interval == 0:
                save([f"checkpoint_iter_{iter_num}.pt"])  # the copy kept at the stop still owed this evaluation
        elif config.save_interval and iter_num % config.save_interval == 0 and iter_num <= config.max_iters:
            # a run killed after its evaluation wrote checkpoint.pt and before the copy that follows it: the state
            # resumed from is that copy's. Rank 0 looks (it writes the files) and the others save with it
            missing = torch.tensor([0 if (checkpoint_dir / f"checkpoint_iter_{iter_num}.pt").is_file() else 1])
            if ddp:
                torch.distributed.broadcast(missing, 0, group=stop_group)
            if missing.item():
                save([f"checkpoint_iter_{iter_num}.pt"])
        if iter_num < config.max_iters:
            log.open_writer()  # a resumed run's, here, where it counts as setup and not in the first rate
        timed_steps, t_mark, eval_time = 0, time.perf_counter(), 0.0
        timing["setup"] = t_mark - t_start - timing["evaluation"] - timing["samples"] - timing["checkpoints"]
        first_in_interval = True  # the first step compiles: its time stays out of the first rate and ETA
        # clipped in the model's order, listed once: model.parameters() walks the module tree, about 0.1 ms of host
        # time a step for 6 layers, which a GPU bound by its host waits for
        params = list(raw_model.parameters())
        graphed = GraphedStep(model, params, optimizer, config.grad_clip, ctx, device) if graph_step else None
        while iter_num < config.max_iters:
            lr = get_lr(iter_num, config)
            log_step = (iter_num + 1) % config.log_interval == 0
            if graphed is not None:
                step_loss, grad_norm = graphed(*loader.get_batch("train", batch_index(iter_num, 0)), lr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = forward_backward(model, lambda m: loader.get_batch("train", batch_index(iter_num, m)),
                                             micro_steps, ctx, scaler)
                # clipping measures the norm at every step; without it, only log steps (which print it) do
                grad_norm = optimizer_step(params, optimizer, scaler, config.grad_clip, measure_norm=log_step)
            if "first_step" not in timing:  # compiling and running it: wait for the GPU, or the step's
                synchronize(device)         # queued kernels would count in the rate of the steps after it
                timing["first_step"] = time.perf_counter() - t_mark
            nonfinite += (~torch.isfinite(step_loss)).int()
            if grad_norm is not None and not scaler.is_enabled():
                # a finite loss with infinite gradients still ruins the weights in this step; under
                # float16 an infinite norm is the GradScaler's business: it skips the step and rescales
                nonfinite += (~torch.isfinite(grad_norm)).int()
            interval_loss += step_loss
            interval_steps += 1
            timed_steps += 1
            iter_num += 1
            untrained = False
            writer.check()

            if log_step:
                if ddp:  # the mean over all ranks (gloo has no AVG)
                    torch.distributed.all_reduce(interval_loss)
                # the host waits for the GPU here, once a log step (the checks that follow find it done)
                loss_value = interval_loss.item() / interval_steps / world_size
                check_finite([loss_value])
                elapsed, steps = time.perf_counter() - t_mark - eval_time, timed_steps
                if first_in_interval:
                    elapsed, steps = elapsed - timing["first_step"], steps - 1
                first_in_interval = False
                # no rate, no ETA where the first step is the only one timed (--log_interval=1, or a resume
                # one step before a log step): it compiled, and its time would be planned for every step left
                dt = elapsed / steps if steps else None
                # the evaluations after this iteration, and the one right after this line if it falls here
                evals_left = (config.max_iters // config.eval_interval - iter_num // config.eval_interval
                              + (config.max_iters % config.eval_interval != 0)
                              + (iter_num % config.eval_interval == 0))
                eta = (config.max_iters - iter_num) * dt + evals_left * last_eval_s if steps else None
                log_progress(log, raw_model, iter_num, config.max_iters, loss_value, lr, grad_norm.item(), dt,
                             tokens_per_iter, world_size, eta, device, dtype)
                summary["losses"][iter_num] = loss_value
                interval_loss.zero_()
                interval_steps, timed_steps, t_mark, eval_time = 0, 0, time.perf_counter(), 0.0

            evaluating = iter_num % config.eval_interval == 0 or iter_num == config.max_iters
            if evaluating or (config.save_interval and iter_num % config.save_interval == 0):
                synchronize(device)  # the training steps still queued are timed as training, not as this
            t0 = time.perf_counter()
            eval_cut = False  # by a signal: then this iteration stops, whether or not it is the last
            if evaluating:
                losses = evaluate()
                eval_cut = losses is None
                if not eval_cut:
                    summary["evals"][iter_num] = losses
                    last_eval_s = timed_eval(time.perf_counter() - t0)
            if config.save_interval and iter_num % config.save_interval == 0:
                save([f"checkpoint_iter_{iter_num}.pt"])
            eval_time += time.perf_counter() - t0

            if iter_num < config.max_iters:  # (the last evaluation, which looked before its batches, is done)
                look_at_data()  # last before the processes agree to go on: the next step's reads come right after
            # eval_cut is the same on every rank (estimate_loss agreed on it), so all skip the collective
            if eval_cut or (stop_requested(stop, stop_group if ddp else None) and iter_num < config.max_iters):
                if iter_num % config.eval_interval and iter_num != config.max_iters:  # else evaluate() saved it
                    save(["checkpoint.pt"])
                writer.wait()  # saved, before it says so
                summary["stopped_by"] = stop.signum or signal.SIGTERM
                # under torchrun another rank may have seen the change first: every rank that sees it says why
                summary["data_changed"] = summary.get("data_changed") or loader.changed_file()
                again = ("run the same command again" if config.init_from != "scratch"
                         else "run it again without --init_from=scratch")  # which would start over
                log.print(f"stopped at iteration {iter_num}: saved {checkpoint_dir / 'checkpoint.pt'}; {again} "
                          "to continue")
                break
        else:
            if final_due():
                save(["final_checkpoint.pt"], wait=True)
                total = time.perf_counter() - t_start
                log.print(done_line(iter_num, resumed_from, total, timing, compile_model, best_val_loss,
                                    checkpoint_dir))
    return finish()


def done_line(iter_num: int, resumed_from: Optional[int], total: float, timing: dict, compiled: bool,
              best_val_loss: float, checkpoint_dir: Path) -> str:
    """A finished run's last line, which bench.py --whole_run reads too."""
    this_run = f" ({iter_num - resumed_from} of them in this run)" if resumed_from is not None else ""
    return (f"done: {iter_num} iterations{this_run} in {format_duration(total)} "
            f"({format_timing(timing, total, compiled)}), best val loss {best_val_loss:.4f}; "
            f"checkpoints in {checkpoint_dir}")


def format_timing(timing: dict, total: float, compiled: bool) -> str:
    """'setup 2.1 s, first step 11.0 s, other steps 46.2 s, ...' from _train's timing."""
    first = "first step" + (" (compilation)" if compiled else "")
    parts = [("setup", timing["setup"]), (first, timing.get("first_step")),
             ("other steps", total - sum(timing.values())), ("evaluations", timing["evaluation"]),
             ("text samples", timing.get("samples") or None), ("checkpoints", timing["checkpoints"])]
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts if seconds is not None)


def log_progress(log: Logger, model, iter_num: int, max_iters: int, loss: float, lr: float, grad_norm: float,
                 dt: Optional[float], tokens_per_iter: int, world_size: int, eta: Optional[float], device,
                 dtype) -> None:
    """The progress line and its TensorBoard scalars; dt is seconds per iteration (None: not known yet)."""
    if dt is None:
        log.print(f"iter {iter_num}/{max_iters}: loss {loss:.4f}, lr {lr:.2e}, speed and ETA from the next line "
                  f"on (a run's first step, slowed by compiling and warming up, is left out)")
        log.scalars(iter_num, **{"train/loss": loss, "lr": lr, "grad_norm": grad_norm})
        return
    tokens_per_sec = tokens_per_iter / dt
    flops = model.achieved_flops(tokens_per_iter, dt)  # all devices together, like tokens/s
    mfu = model.estimate_mfu(tokens_per_iter // world_size, dt, device=device, dtype=dtype)
    speed = f"MFU {mfu * 100:.1f}%" if mfu is not None else format_flops(flops)
    log.print(f"iter {iter_num}/{max_iters}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
              f"{tokens_per_sec:,.0f} tok/s, {speed}, ETA {format_duration(eta)}")
    log.scalars(iter_num, **{"train/loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                             "mfu": mfu, "flops_per_sec": flops if mfu is None else None})


def start_compile_workers(device: torch.device, compile_model: bool) -> None:
    """Starts inductor's pool of Triton compile workers now, while the data, the model and the optimizer are
    set up, where torch.compile would start it only in the first step, once the model is traced.

    The pool is a helper process that imports torch and Triton and then forks the workers: seconds of work
    where Python has no byte code to read. On an H200 the first step's profile spent about 4 s waiting for
    these workers (BENCHMARKS.md). Only for compiled CUDA runs: a CPU compiles C++ in threads of its own.
    torch keeps one pool per process, so compilation later uses this one; TORCH_WARM_POOL=0 still keeps it
    from starting early.
    """
    if not (compile_model and device.type == "cuda"):
        return
    from torch._inductor import async_compile
    warm = getattr(async_compile, "maybe_warm_pool", None)  # what torch.compile itself calls, later
    if warm is not None:
        warm()


def training_model(raw_model, compile_model: bool, mode: str, regional: bool):
    """What the training steps call: raw_model, compiled whole or by regions (then raw_model.forward runs
    the compiled regions), without the model's id check, since the loader checked the data's ids on the
    CPU and the check would wait for the GPU at every forward pass."""
    raw_model.check_ids = False
    if compile_model and regional:
        raw_model.compile_regions(mode)
    elif compile_model:
        return torch.compile(raw_model, mode=mode)
    return raw_model


def autocast_context(device_type: str, dtype: torch.dtype):
    """Mixed precision for every dtype but float32 (bfloat16 on a CPU included); float32 runs as it is."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)


def optimizer_step(params: list, optimizer, scaler, grad_clip: float, measure_norm: bool = False
                   ) -> Optional[torch.Tensor]:
    """Unscale, clip the gradients of params (the model's, as a list) at grad_clip (0: no clipping), step, update
    the scaler and zero the gradients.

    Returns the gradient norm before clipping as a device tensor when clipping or measure_norm asks for
    it (max_norm=inf only measures), else None.
    """
    norm = None
    if grad_clip > 0 or measure_norm:
        scaler.unscale_(optimizer)
        # under float16 the GradScaler hands the fused AdamW a grad_scale of its own
        norm = clip_gradients(params, optimizer, grad_clip, fold=not scaler.is_enabled())
    scaler.step(optimizer)
    # gone, not None: a GradScaler that did not unscale multiplies its scale by getattr(optimizer, "grad_scale", 1)
    vars(optimizer).pop("grad_scale", None)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def clip_gradients(params: list, optimizer, grad_clip: float, fold: bool) -> torch.Tensor:
    """The total norm of the gradients of params, and their clipping at grad_clip (0: only the norm), as
    torch.nn.utils.clip_grad_norm_ measures and clips them.

    fold: a fused AdamW's next step does the clipping's multiplication. It divides each gradient by its
    grad_scale tensor as it reads it anyway (and writes the result back), so every gradient is read once less:
    for GPT-2 124M 0.5 GB of float32 gradients, where clip_grad_norm_'s multiplication, a read and a write, took
    0.37 ms of a 36 ms step on an H100. The caller removes grad_scale after that step.
    """
    if not (fold and grad_clip > 0 and optimizer.defaults.get("fused")):
        return torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    # clip_grad_norm_ multiplies by min(1, grad_clip / (norm + 1e-6)); AdamW divides by the inverse
    optimizer.grad_scale = ((norm + 1e-6) / grad_clip).clamp(min=1.0)
    return norm


def cuda_graph_problem(config: GPT2Config, device: torch.device, dtype: torch.dtype, compile_model: bool,
                       world_size: int = 1) -> Optional[str]:
    """Why this run's training step cannot be captured as one CUDA graph (GraphedStep), as advice, or None."""
    if device.type != "cuda":
        return f"cuda_graph captures the training step on a CUDA GPU, and this run's device is {device.type}"
    if world_size > 1:
        return "cuda_graph captures the step of one process, without DDP's gradient all-reduce; not under torchrun"
    if config.gradient_accumulation_steps > 1:
        return (f"cuda_graph captures a step of one micro-batch, not {config.gradient_accumulation_steps}: use "
                f"--gradient_accumulation_steps=1 with a larger --batch_size")
    if dtype == torch.float16:
        return ("cuda_graph cannot capture float16's GradScaler, which decides on the host whether to take a step: "
                "use --dtype=bfloat16 or float32")
    if compile_model and config.compile_mode in CUDA_GRAPH_MODES:
        return (f"cuda_graph captures the whole step itself, and compile_mode={config.compile_mode} would replay "
                f"CUDA graphs of its own inside it: use --compile_mode=default (or max-autotune-no-cudagraphs)")
    if config.gradient_checkpointing:
        # torch.utils.checkpoint reads and sets the GPU's random state on the host (pytorch/pytorch#162504)
        return "cuda_graph cannot capture gradient_checkpointing's recomputation: drop --gradient_checkpointing"
    return None


GRAPH_WARMUP_STEPS = 3  # plain steps before the capture: compilation, AdamW's moments, the libraries' workspaces


class GraphedStep:
    """The whole training step, forward, backward, gradient clipping and AdamW, captured once as a CUDA graph and
    then replayed (config.cuda_graph).

    A small model's step is some hundreds of short kernels, and the GPU waits while the host launches them;
    torch.compile's reduce-overhead mode replays the forward and backward as CUDA graphs but leaves clipping and
    the optimizer to the host, with Python bookkeeping of its own at every replay. Here the first
    GRAPH_WARMUP_STEPS steps run as usual, the next one is captured, and from then on a step is three small
    copies (batch, targets, learning rate) into the graph's input tensors and one replay. The graph holds the
    kernels the plain step launches, so the numbers are the same. Warm-up and capture run on one side stream,
    as torch's CUDA graph notes ask: libraries set up per-stream workspaces on first use, which a capture
    cannot. cuda_graph_problem() says what cannot be captured.
    """

    def __init__(self, model, params: list, optimizer, grad_clip: float, ctx, device: torch.device):
        self.model, self.params, self.optimizer, self.grad_clip, self.ctx = model, params, optimizer, grad_clip, ctx
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warmup_left = GRAPH_WARMUP_STEPS
        # the graph's inputs and outputs, fixed tensors that each replay reads and writes
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.x = self.y = self.loss = self.norm = None

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = forward_backward(self.model, lambda m: (x, y), 1, self.ctx)  # the plain step's, one micro-batch
        # the norm is measured at every step (a graph has no branches); grad_clip=0 only measures
        norm = clip_gradients(self.params, self.optimizer, self.grad_clip, fold=True)
        self.optimizer.step()
        vars(self.optimizer).pop("grad_scale", None)
        return loss, norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the batch (x, y) at learning rate lr: (loss, gradient norm before clipping) as device
        tensors. After the warm-up they are the graph's outputs, which the next step overwrites."""
        current = torch.cuda.current_stream(self.device)
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.stream.wait_stream(current)  # the batch was copied on the current stream
            with torch.cuda.stream(self.stream):
                loss, norm = self._step(x, y)
                self.optimizer.zero_grad(set_to_none=True)
            current.wait_stream(self.stream)
            return loss, norm
        if self.graph is None:
            self._capture(x, y)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:  # what a checkpoint saves; the graph reads self.lr
            group["lr"] = lr
        self.graph.replay()
        return self.loss, self.norm

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # with the batch's own strides: torch.compile's guards on them would otherwise compile anew inside the capture
        self.x, self.y = (torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device) for t in (x, y))
        groups = self.optimizer.param_groups
        # AdamW reads the rate from a tensor, which each step fills; a float would be a constant of the graph.
        # capturable=True only passes the optimizer's check (the fused kernels ignore it); both are put back
        # after the capture, so checkpoints keep plain settings
        for group in groups:
            group["lr"], group["capturable"] = self.lr, True
        # gradients start as None: the graph's backward writes them afresh at every replay instead of adding
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            # thread_local: the loader's thread may pin memory meanwhile, which a global capture would forbid
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.loss, self.norm = self._step(self.x, self.y)
        finally:
            for group in groups:
                group["lr"], group["capturable"] = 0.0, False
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def forward_backward(model, get_batch, micro_steps: int, ctx=nullcontext(), scaler=None) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over micro_steps micro-batches.

    get_batch(m) -> (x, y) of micro-step m. Each micro-batch's loss is divided by micro_steps, so the
    gradients are those of the mean loss over all of them (4 micro-batches of 2 == 1 batch of 8).
    Under DDP (model is a DistributedDataParallel) gradients are averaged over the ranks only in the
    last backward. Returns the step's mean loss as a device tensor: no host synchronisation.
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    step_loss = None
    x, y = get_batch(0)
    for m in range(micro_steps):
        with model.no_sync() if ddp and m < micro_steps - 1 else nullcontext():
            with ctx:
                _, loss = model(x, y)
            loss = loss / micro_steps
            if m + 1 < micro_steps:
                x, y = get_batch(m + 1)  # issued while the GPU still works on this forward
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss


def exception_chain(e: Optional[BaseException]) -> Iterator[BaseException]:
    """e, then the exceptions it was raised from or while handling, innermost last."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def stop_requested(stop: GracefulStop, group=None) -> bool:
    """Whether a signal asked to stop; under DDP every rank must agree, or the others would hang.

    group: a gloo process group for the agreement (None: the default group, which must be gloo),
    so the check is a CPU collective that does not wait for the GPU.
    """
    if not torch.distributed.is_initialized():
        return stop.signum is not None
    # [the signal a process received, whether one stopped for a reason of its own (request(): its data changed)]
    flags = torch.tensor([stop.signum if stop.signalled else 0, 1 if stop.signum is not None else 0])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
    signum, stopping = flags.tolist()
    if stopping and stop.signum is None:
        # another rank was signalled; this one's own copy of the signal may still come, and must count as
        # the same request, not as a second one that aborts without saving
        stop.signum, stop._first = signum or signal.SIGTERM, time.monotonic()  # its exit code says the same
        if stop.verbose:  # rank 0 says why the run stops (a signalled rank 0 said it already)
            why = f"received {signal.Signals(signum).name}" if signum else "found its data changed"
            print(f"another process {why}: stopping with it", file=sys.stderr, flush=True)
    return bool(stopping)


# a checkpoint up to this size is copied into CPU memory and written by a background thread (GPT-2 124M with AdamW's
# moments: 1.4 GiB, GPT-2 medium 4.0 GiB); a larger one (GPT-2 large and up) is written by the training thread, as the
# copy would take as much host memory again
ASYNC_CHECKPOINT_BYTES = 5 * 2**30
# and a GPU's checkpoint up to this size goes into page-locked memory, which the GPU copies into at full speed and
# torch's pinned-memory cache hands out again at the next save (sizes rounded up to powers of two, so up to about
# twice this stays reserved). shakespeare-char's 130 MB are saved 21 times in a run of 36 s of steps; a copy into
# fresh pageable memory (its page faults included) takes several times as long
PINNED_CHECKPOINT_BYTES = 2**30


def storage_key(t: torch.Tensor) -> tuple:
    """What identifies the memory under t: tensors with the same key share it."""
    storage = t.untyped_storage()
    return ("storage", storage.device, storage.data_ptr(), storage.nbytes())


def cpu_copy(obj, memo: Optional[dict] = None, pinned: bool = False):
    """obj (dicts, lists and tuples of tensors and plain values) with every tensor copied into CPU memory. What is
    shared stays shared, as torch.save keeps it: tensors on one storage (the tied embedding and lm_head) and
    objects met twice (AdamW's betas in both parameter groups), so the file is the one obj itself would give.

    pinned: copy CUDA tensors into page-locked memory, without waiting for the copies; the caller then waits
    for them (pinned_copy does both)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        key = storage_key(obj)
        if key not in memo:
            storage = obj.untyped_storage()
            if storage.device.type == "cpu":
                memo[key] = storage.clone()
            elif pinned and storage.device.type == "cuda":
                memo[key] = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
                memo[key].copy_(storage, non_blocking=True)
            else:
                memo[key] = storage.cpu()
        copied = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
    elif isinstance(obj, dict):  # a state_dict is an OrderedDict, whose _metadata load_state_dict reads
        copied = type(obj)((k, cpu_copy(v, memo, pinned)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copied._metadata = obj._metadata
    elif type(obj) in (list, tuple):
        copied = type(obj)(cpu_copy(v, memo, pinned) for v in obj)
    else:
        return obj
    memo[id(obj)] = copied
    return copied


def pinned_copy(obj):
    """cpu_copy(obj) through page-locked memory, once every copy has arrived."""
    memo = {}
    copied = cpu_copy(obj, memo, pinned=True)
    for device in {key[1] for key in memo if isinstance(key, tuple) and key[1].type == "cuda"}:
        torch.cuda.synchronize(device)  # the copies ran on the device's streams, behind the work queued there
    return copied


def tensor_bytes(obj, seen: Optional[set] = None) -> int:
    """The bytes of the distinct tensor memory in obj, which cpu_copy would copy."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = storage_key(obj)
        if key in seen:
            return 0
        seen.add(key)
        return key[-1]
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


class CheckpointWriter:
    """Writes checkpoints one at a time on a background thread, while training goes on.

    Writing a checkpoint, fsync included, takes a small model longer than hundreds of its training steps on a GPU
    (0.22-0.25 s for the 130 MB of shakespeare-char on an H200, against 6 ms a step). submit() copies the state
    into CPU memory (it changes with the next step) and returns; the write's error, if any, is raised in the
    training thread by the next submit() or wait().
    """

    def __init__(self, max_copy_bytes: Optional[int] = None):
        self.max_copy_bytes = ASYNC_CHECKPOINT_BYTES if max_copy_bytes is None else max_copy_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Optional[Future] = None
        self._pin = True  # until page-locked memory fails once

    def submit(self, write: Callable[[dict], None], ckpt: dict) -> None:
        """write(ckpt) on the writer's thread, from a copy in memory; here and now where that copy would be larger
        than max_copy_bytes. Waits for the write before first."""
        self.wait()
        size = tensor_bytes(ckpt)
        if size > self.max_copy_bytes:
            write(ckpt)
            return
        copied = None
        if size <= PINNED_CHECKPOINT_BYTES and self._pin:
            try:
                copied = pinned_copy(ckpt)
            except RuntimeError:  # no page-locked memory to be had (a limit on locked memory, say): ordinary memory
                self._pin = False
        self._pending = self._pool.submit(write, copied if copied is not None else cpu_copy(ckpt))

    def check(self) -> None:
        """Raise the error of a write that has ended in one, at once, without waiting for one still going: the
        training thread calls it at every step, so that a full disk stops the run before it trains on for
        nothing until the next save."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Until the write under way is done; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, raise_error: bool = True) -> None:
        try:
            if raise_error:
                self.wait()
            elif self._pending is not None:
                with suppress(Exception):
                    self.wait()
        finally:
            self._pool.shutdown(wait=True)


def prune_iter_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint_iter_N.pt files."""
    for p in iter_checkpoints(checkpoint_dir)[:-keep]:
        p.unlink()


def owns_the_process() -> bool:
    """Whether train.py is this process's own program (`python train.py`, `python -m train`) and nothing needs
    the interpreter's normal exit. What does: a program that runs train.py inside it and goes on afterwards
    (pdb, runpy.run_path, IPython's %run); tools that write their results at exit (cProfile, coverage, any
    tracer or profiler); torch's reports under TORCH_LOGS; `python -i`, whose prompt comes after the run."""
    stack = []
    frame = sys._getframe()
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    # `python -m train` starts in runpy; so does `python -m cProfile train.py`, whose next frame is cProfile's
    outermost = next((f for f in reversed(stack)
                      if os.path.basename(f.f_code.co_filename) not in ("runpy.py", "<frozen runpy>")), None)
    # the code of this very file, not only its globals: `python -m pdb train.py` runs train.py in pdb's own
    # __main__ namespace
    if outermost is None or outermost.f_globals is not globals() or \
            os.path.realpath(outermost.f_code.co_filename) != os.path.realpath(__file__):
        return False
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return False
    if sys.flags.inspect or os.environ.get("PYTHONINSPECT") or os.environ.get("TORCH_LOGS"):
        return False
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: cProfile and coverage use it
    return monitoring is None or all(monitoring.get_tool(i) is None for i in range(6))


def exit_at_once(code: int) -> None:
    """End the process now, without the interpreter's teardown. train() has returned or raised by now, so all
    it wrote is on disk (checkpoints fsynced and renamed, TensorBoard closed, the writer thread joined) or,
    after an error in a new run, undone. What is left is Python unloading two thousand modules and more,
    torch's exit handlers, the compile workers and the CUDA context: 0.77 s on 2 CPU cores and 3.1 s on an
    H200 after the run's last line (BENCHMARKS.md). The compile workers see their pipe close and exit by
    themselves, also a pool still starting (it reads the closed pipe once it is up)."""
    logging.shutdown()  # TORCH_TRACE and other logging files
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away, a closed stream (None where the shell closed it): the code still stands
        with suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    config, explicit = parse_args(argv)
    summary = train(config, explicit)  # a second Ctrl-C raises KeyboardInterrupt: run_cli exits with 130
    if summary.get("data_changed"):  # stopped (the lines before say what was saved); run_cli exits with 2
        from data import DataError
        error = DataError(f"{summary['data_changed']}: finish preparing, then run the same command again; it checks "
                          f"the data anew")
        error.per_process = True  # under torchrun, said by each process that saw it, on whichever machine
        raise error
    code = 128 + int(summary["stopped_by"]) if summary["stopped_by"] else 0
    # Under torchrun always: the process group is destroyed and every file is closed, but gloo's worker threads
    # can still abort the process ("terminate called without an active exception") while C++ objects are
    # destroyed at exit, turning a finished run into a failed one.
    if "RANK" in os.environ or owns_the_process():
        exit_at_once(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:
        run_cli(main)
    except SystemExit as stop:
        # an error said in one line (2), Ctrl-C (130), --help (0): train() has undone or closed all it began by
        # now, and the interpreter's teardown would still wait for the compile workers, whose pool starts
        # before the data and the model are set up and can take seconds to come up only to be shut down
        if (stop.code is None or isinstance(stop.code, int)) and owns_the_process():
            exit_at_once(stop.code or 0)
        raise
