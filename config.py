"""Configuration: one GPT2Config class whose class attributes are the defaults, the presets, and how
train.py's command line and config files override them.

    from config import GPT2Config, GPT2_CONFIGS, parse_args
    config = GPT2Config()                       # GPT-2 124M on ./data/shakespeare
    for k, v in GPT2_CONFIGS['gpt2-medium'].items():
        setattr(config, k, v)
    config = GPT2Config(n_layer=4)              # or overrides as keywords
    config.validate()                           # every problem at once, as one ConfigError

    config, explicit = parse_args(["--preset=shakespeare-char-cpu", "--batch_size=32"])  # as train.py does

parse_args() reads train.py's command line: a preset (--preset=NAME), then an optional config file,
then --key=value flags, applied onto an instance; `python train.py --help` lists every field with the
comment written beside it below. train.py stores `config.to_dict()` in every checkpoint.
"""
import argparse
import ast
import importlib
import inspect
import math
import os
import re
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Optional

import torch

from utils import ArgumentParser, UserError, device_name_problem, near_miss


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message lists every problem found."""


# fields that fix the shape of the weights: a checkpoint rebuilds the model from these, and
# resuming with an override that contradicts one of them is an error
MODEL_SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")

# paths: '~' is expanded, and a config file may give them as pathlib paths
PATH_FIELDS = ("data_dir", "checkpoint_dir", "log_dir", "init_from")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.compile's modes: 'reduce-overhead' replays the compiled graphs as CUDA graphs (less launch overhead
# for small models), the max-autotune ones benchmark kernel choices while compiling (slower to start)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs on a GPU
AUTO_FIELDS = ("compile", "cuda_graph")  # True, False or 'auto'
MAX_SAMPLE_TOKENS = 10_000  # the longest text sample train.py writes at an evaluation (a model keeps any value)


class GPT2Config:
    # model (GPT-2 124M by default)
    vocab_size = 50257  # GPT-2 BPE; training replaces it with the data set's vocab_size from meta.json
    block_size = 1024  # context length in tokens
    n_layer = 12  # transformer blocks
    n_head = 12  # attention heads per block
    n_embd = 768  # width of the residual stream
    dropout = 0.0  # 0 for pretraining; 0.1+ helps fine-tuning and small data sets
    bias = True  # biases in Linear and LayerNorm, as GPT-2 has them
    gradient_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute
    loss_chunk_rows = 0  # > 0: output layer and loss this many tokens at a time or fewer, gradients in forward pass
    fp8 = False  # train the blocks' matmuls in float8 (GPUs of compute capability 8.9+, e.g. H100); eval unchanged

    # data and batches
    data_dir = "./data/shakespeare"  # folder with train.bin, val.bin, meta.json (prepare_data.py)
    batch_size = 12  # micro-batch size per device, in sequences
    gradient_accumulation_steps = 1  # global: micro-batches per optimizer step summed over all ranks

    # optimizer: AdamW
    learning_rate = 6e-4  # peak learning rate, reached at the end of warmup
    weight_decay = 0.1  # applied to 2-D tensors only (matmul weights, embeddings)
    beta1 = 0.9  # AdamW beta1
    beta2 = 0.95  # AdamW beta2
    grad_clip = 1.0  # clip gradients at this global norm; 0 disables

    # schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr
    max_iters = 100000  # optimizer steps in total
    decay_lr = True  # False keeps learning_rate constant after warmup
    warmup_iters = 2000  # steps of linear warmup
    lr_decay_iters = 100000  # step at which the cosine reaches min_lr (usually max_iters)
    min_lr = 6e-5  # floor of the schedule, ~learning_rate / 10

    # evaluation, logging, checkpoints
    eval_interval = 1000  # evaluate train/val loss and write checkpoint.pt every N steps
    eval_iters = 200  # batches per split in each evaluation; a split that fits in as many is evaluated whole, once
    log_interval = 10  # print and log a training line every N steps
    save_interval = 0  # write checkpoint_iter_N.pt every N steps; 0 disables
    keep_last_n = 0  # keep only the newest K checkpoint_iter_N.pt files; 0 keeps all
    # bounded by MAX_SAMPLE_TOKENS: a signal stops the run only once the sample is written
    sample_tokens = 200  # length of the TensorBoard text sample written at each evaluation, at most 10,000; 0 disables
    checkpoint_dir = "./checkpoints"  # where checkpoint.pt, best_checkpoint.pt, ... are written
    log_dir = "./runs"  # TensorBoard logs: tensorboard --logdir runs
    init_from = "auto"  # 'auto' resumes checkpoint.pt if present; 'scratch', 'resume', 'gpt2*' or a HF dir

    # system
    device = "auto"  # 'auto' picks cuda, then mps, then cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype = "auto"  # float32, bfloat16, float16 (a config file: or a torch.dtype); auto: bf16/fp16 on CUDA, else fp32
    compile = "auto"  # torch.compile the model; 'auto' is on for CUDA and off elsewhere
    compile_mode = "default"  # torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune', ...
    compile_eval = True  # evaluate with the compiled model too; False skips compiling the evaluation graph
    compile_regional = False  # compile embedding, one block (shared by all blocks) and head apart: faster compiling
    cuda_graph = False  # replay each step (forward, backward, clipping, AdamW) as one CUDA graph; 'auto': where it can
    seed = 1337  # seeds weights, batches and dropout; a resumed run continues the same streams
    backend = "nccl"  # torch.distributed backend under torchrun: 'nccl' for GPUs, 'gloo' (CPUs' if not given)

    def __init__(self, **overrides: Any):
        unknown = [f"unknown config key {k!r}{suggest(k, field_names())}" for k in overrides if k not in field_names()]
        if unknown:
            raise ConfigError("; ".join(unknown))
        for k, v in overrides.items():
            setattr(self, k, v)

    def __setattr__(self, key: str, value: Any) -> None:
        # dtype is stored as a string so checkpoints stay plain data; torch dtypes are accepted
        if key == "dtype" and isinstance(value, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if value not in names:
                raise ConfigError(f"dtype {value} is not supported; use one of {sorted(DTYPES)}")
            value = names[value]
        object.__setattr__(self, key, value)

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of 64: the embedding matrix's rows, for faster matmuls."""
        return math.ceil(self.vocab_size / 64) * 64

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python data (dtype as a string), for checkpoints and TensorBoard."""
        return {k: getattr(self, k) for k in field_names()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        # keys this version does not know are ignored, so older or newer checkpoints still load
        return cls(**{k: v for k, v in d.items() if k in field_names()})

    def validate(self, partial: bool = False) -> "GPT2Config":
        """Check every field; raise one ConfigError listing all problems, or return self.

        partial=True checks each field alone but not the rules between fields (min_lr <= learning_rate,
        lr_decay_iters > warmup_iters, n_embd divisible by n_head, fp8's sizes divisible by 16): for the
        flags of a command that may resume a run, whose checkpoint supplies the fields the command leaves out.
        """
        problems = []

        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                problems.append(f"{name} must be an integer {'>= 0' if allow_zero else '> 0'}, got {v!r}")
                return False
            return True

        ok = {name: positive_int(name) for name in (
            "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps",
            "max_iters", "eval_interval", "eval_iters", "log_interval")}
        ok.update({name: positive_int(name, allow_zero=True) for name in (
            "warmup_iters", "lr_decay_iters", "save_interval", "keep_last_n", "sample_tokens", "loss_chunk_rows")})
        if not partial and isinstance(self.n_embd, int) and isinstance(self.n_head, int) and self.n_head > 0:
            if self.n_embd % self.n_head:
                problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        # float8 matrix products need every inner dimension divisible by 16: n_embd, and the tokens of a
        # micro-batch (the inner dimension of the weight gradients)
        if not partial and self.fp8 is True and ok["n_embd"] and ok["batch_size"] and ok["block_size"]:
            if self.n_embd % 16 or (self.batch_size * self.block_size) % 16:
                problems.append(f"fp8 needs n_embd ({self.n_embd}) and batch_size x block_size "
                                f"({self.batch_size * self.block_size}) divisible by 16")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            positive = name == "learning_rate"  # the others may be 0
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0
                    or (positive and v == 0)):
                problems.append(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {v!r}")
        if not partial and isinstance(self.min_lr, (int, float)) and isinstance(self.learning_rate, (int, float)):
            if self.min_lr > self.learning_rate > 0:  # a learning_rate <= 0 is named above
                problems.append(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        wd, lr = self.weight_decay, self.learning_rate
        if (not partial and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in (wd, lr))
                and wd * lr >= 1):
            # AdamW's decay is decoupled: each step multiplies the weights by (1 - learning_rate x weight_decay)
            problems.append(f"weight_decay x learning_rate ({wd:g} x {lr:g}) must be below 1: AdamW multiplies the "
                            f"weights by 1 minus that each step, which at 1 or more zeroes them or flips their sign; "
                            f"weight_decay is usually about 0.1")
        if (not partial and self.decay_lr is True and ok["lr_decay_iters"] and ok["warmup_iters"] and ok["max_iters"]
                and self.lr_decay_iters <= self.warmup_iters):
            problems.append(f"lr_decay_iters ({self.lr_decay_iters}) must exceed warmup_iters ({self.warmup_iters}) "
                            f"for the cosine decay; e.g. --lr_decay_iters={self.max_iters} "
                            f"--warmup_iters={min(self.warmup_iters, self.max_iters // 10)}, or --decay_lr=False")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                problems.append(f"{name} must be in [0, 1), got {v!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "decay_lr", "gradient_checkpointing", "compile_eval", "compile_regional", "fp8"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.dtype, str) or (self.dtype != "auto" and self.dtype not in DTYPES):
            problems.append(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        for name in AUTO_FIELDS:
            v = getattr(self, name)
            if not (v is True or v is False or v == "auto"):  # 1 == True
                problems.append(f"{name} must be True, False or 'auto', got {v!r}")
        if self.compile_mode not in COMPILE_MODES:
            problems.append(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if problem := device_name_problem(self.device):
            problems.append(problem)
        if self.backend not in ("nccl", "gloo"):
            problems.append(f"backend must be 'nccl' or 'gloo', got {self.backend!r}")
        for name in PATH_FIELDS:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        # the data loader needs seed >= 0; seed + rank + iteration must stay within torch's 64 bits
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            problems.append(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        # setattr() accepts any name; catch typos such as config.n_layers = 4 here
        for k in vars(self):
            if k not in field_names():
                problems.append(f"unknown config key {k!r}{suggest(k, field_names())}")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))
        return self

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.to_dict().items() if v != getattr(GPT2Config, k)}
        return f"GPT2Config({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def field_names() -> list[str]:
    """The configuration fields, in declaration order."""
    return [k for k, v in vars(GPT2Config).items()
            if not k.startswith("_") and not callable(v) and not isinstance(v, (property, classmethod))]


def preset_config(name: str, **overrides: Any) -> "GPT2Config":
    """A GPT2Config with the GPT2_CONFIGS preset `name` applied, then the keyword overrides."""
    if name not in GPT2_CONFIGS:
        raise ConfigError(f"unknown preset {name!r}{suggest(name, list(GPT2_CONFIGS))}; "
                          f"presets: {', '.join(GPT2_CONFIGS)}")
    config = GPT2Config()
    for k, v in {**GPT2_CONFIGS[name], **overrides}.items():
        setattr(config, k, v)
    return config


def suggest(name: str, candidates: list[str]) -> str:
    """'; did you mean 'n_layer'?' for a near miss, else ''."""
    meant = near_miss(name, candidates)
    return f"; did you mean {meant!r}?" if meant else ""


GPT2_CONFIGS: dict[str, dict[str, Any]] = {
    # OpenAI's four GPT-2 sizes (vocab 50257, context 1024); parameter counts without padding rows. Their output
    # layer and loss run up to 16,384 tokens at a time (a 16 x 1024 micro-batch in one chunk), with the gradients
    # made in the forward pass (model.py's chunked_loss). For the 124M model on an H100, compiled: 458,601 tokens/s
    # against the plain loss's 438,337, and 10.6 GB against 12.4 (BENCHMARKS.md)
    # The larger ones take the learning rates GPT-3's paper (Table 2.1) gives its models of about their sizes,
    # 6e-4 at 125M down to 2e-4 at 1.3B, with min_lr a tenth of each
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, loss_chunk_rows=16384),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, loss_chunk_rows=16384,  # 355M (usually called 350M)
                        learning_rate=3e-4, min_lr=3e-5),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, loss_chunk_rows=16384,  # 774M
                       learning_rate=2.5e-4, min_lr=2.5e-5),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, loss_chunk_rows=16384,  # 1558M
                    learning_rate=2e-4, min_lr=2e-5),
    # Shakespeare at character level on one GPU: ~10.8M parameters; best val loss ~1.45 around step 2000,
    # after which the model overfits (best_checkpoint.pt keeps the best); 59.6-62.4 s on an H100, start to exit,
    # with 15-17 s of compilation (BENCHMARKS.md). The cosine ends at step 2500, not at max_iters: the model
    # is best before the decay's end either way; with the faster decay two H200 runs reached 1.4509 and 1.4547,
    # where four H100 runs decaying to 5000 reached 1.4676-1.4722
    "shakespeare-char": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
        learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100, max_iters=5000, lr_decay_iters=2500,
        eval_interval=250, eval_iters=50, log_interval=50, sample_tokens=0, data_dir="./data/shakespeare_char",
        # its evaluations are a few eager forward passes; compiling a graph for them costs more than it saves
        compile_eval=False,
        # CUDA graphs replay the forward and backward: 6.2-6.4 ms a step on an H200 instead of 9.2. The step's
        # kernels then take 5.9 ms with this dropout, so replaying the whole step as one graph (--cuda_graph)
        # gains nothing more here, and by regions compiling was no faster (BENCHMARKS.md)
        compile_mode="reduce-overhead",
    ),
    # Shakespeare at character level on a laptop CPU: ~0.8M parameters, val loss ~1.75 in about 75 s on
    # 2 cores; small models take a higher learning rate (1e-3 gives ~1.89 in the same 2000 steps)
    "shakespeare-char-cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
        learning_rate=3e-3, min_lr=3e-4, beta2=0.99, warmup_iters=100, max_iters=2000, lr_decay_iters=2000,
        eval_interval=500, eval_iters=50, log_interval=50, data_dir="./data/shakespeare_char",
        device="cpu", compile=False,
    ),
}


# ----------------------------------------------------------------------------- command line and config files
# train.py's arguments: --preset=NAME, then an optional config file (plain Python assigning field
# names), then --key=value flags parsed as Python literals. They are applied to a GPT2Config instance,
# never to globals(), and an unknown key is rejected with the closest field name suggested.

def field_comments() -> dict[str, str]:
    """field -> the comment after it in config.py, which --help shows."""
    comments = {}
    for line in inspect.getsource(GPT2Config).splitlines():
        m = re.match(r"    (\w+) = .*?  # (.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def coerce(key: str, value: Any, raw: Optional[str] = None) -> Any:
    """Check `value` against the type of field `key` and return it (ints become floats for float fields).

    raw is the flag's text: a string field takes it verbatim (--data_dir=2024 is the folder '2024').
    """
    default = getattr(GPT2Config, key)
    # --bias=false, --compile=TRUE: any case, as on most command lines (compile's default is 'auto')
    if raw is not None and (isinstance(default, bool) or key in AUTO_FIELDS) and raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    if key in AUTO_FIELDS:
        if isinstance(value, bool) or value == "auto":
            return value
        example = f"--{key}=False" if raw is not None else f"{key} = False"
        raise ConfigError(f"{key} must be True, False or 'auto', got {value!r} (e.g. {example})")
    if key == "dtype" and isinstance(value, torch.dtype):
        return value  # GPT2Config turns it into its name; validate() checks it is supported
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        expected = "True or False"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:
        if raw is not None:
            text = value if isinstance(value, str) else raw
            # the shell leaves ~ alone after --key=, so a folder would be made under the name '~'
            return os.path.expanduser(text) if key in PATH_FIELDS else text
        if key in PATH_FIELDS and isinstance(value, os.PathLike):  # Path("data") / "mine" in a config file
            value = os.fspath(value)
        if isinstance(value, str):  # a config file's value, say: '~' means the same as in a flag
            return os.path.expanduser(value) if key in PATH_FIELDS else value
        expected = "a string"
    if raw is None:  # a config file's value: the example in its syntax
        example = f"{key} = {default!r}"
    else:
        example = f"--{key}={default!r}" if not isinstance(default, str) else f"--{key}={default}"
    raise ConfigError(f"{key} must be {expected}, got {value!r} ({type(value).__name__}); e.g. {example}")


def parse_value(key: str, text: str) -> Any:
    """A flag's text as a Python literal when it is one (1e-3, False, 'x'), else the bare string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text
    return coerce(key, value, raw=text)


def read_config_file(path: str) -> tuple[dict[str, Any], list[str]]:
    """Run a config file (plain Python assigning field names) in a namespace of its own; its settings, and
    what is wrong in it (unknown keys, values of the wrong type), every problem named."""
    p = Path(path)
    if not p.is_file():
        what = ("is empty" if not path.strip() else "is a directory" if p.is_dir()
                else "is not a regular file (a device or a pipe)" if p.exists() else "does not exist")
        raise ConfigError(f"config file {path!r} {what}; pass a Python file that assigns config fields, "
                          f"e.g. `n_layer = 4`, or use --key=value flags")
    # as a script: __file__ is set, for paths next to the config file. Its folder is not put on sys.path: a
    # file there named like one of this project's modules (data.py) would take that module's place
    namespace: dict[str, Any] = {"__file__": str(p.absolute()), "__name__": "__config__"}
    try:
        source = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows Notepad), as Python allows
        tree = ast.parse(source, str(p))
        exec(compile(tree, str(p), "exec"), namespace)
    except (Exception, SystemExit) as e:  # a config file can fail in any way, even exit; it is the user's file
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    # imports and functions are allowed in a config file (from math import sqrt, from torch import
    # bfloat16); they are not settings, unless they bind a config field's name (from torch import
    # bfloat16 as dtype)
    imported = set()
    for node in tree.body:
        for a in node.names if isinstance(node, (ast.Import, ast.ImportFrom)) else ():
            if a.name != "*":
                imported.add((a.asname or a.name).split(".")[0])
            elif node.level == 0:  # from math import *: the names that module exports (it was imported above)
                module = importlib.import_module(node.module)
                imported.update(getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]))
    fields = field_names()
    settings, problems = {}, []
    for name, value in namespace.items():
        if name not in fields and (name.startswith("_") or name in imported
                                   or isinstance(value, (types.ModuleType, types.FunctionType, type))):
            continue
        try:
            if name not in fields:
                raise ConfigError(f"unknown config key {name!r}{suggest(name, fields)} (a name of the file's own "
                                  f"starts with _, e.g. _{name})")
            settings[name] = coerce(name, value)
        except ConfigError as e:
            problems.append(f"config file {path}: {e}")
    return settings, problems


class _Parser(ArgumentParser):
    error_type = ConfigError  # a bad flag is reported like a bad value


def build_parser() -> argparse.ArgumentParser:
    """train.py's argument parser: config_file, --preset, and --key=value for every field."""
    presets = "\n".join(textwrap.fill(", ".join(f"{k}={v!r}" for k, v in preset.items()), width=100,
                                       initial_indent=f"  {name:22s} ", subsequent_indent=" " * 25)
                        for name, preset in GPT2_CONFIGS.items())
    parser = _Parser(
        prog="train.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT-2 model: one process, or many under torchrun (DDP), with checkpoints, exact "
                    "resume and TensorBoard.\n\nApplied in order: --preset, then config_file, then --key=value.",
        epilog="presets (--preset=NAME):\n" + presets)
    parser.add_argument("config_file", nargs="?", help="Python file assigning config fields, e.g. n_layer = 4")
    parser.add_argument("--preset", metavar="NAME", help=f"apply a preset first: {', '.join(GPT2_CONFIGS)}")
    comments = field_comments()
    group = parser.add_argument_group("config fields (--key=value; the defaults are config.py's)")
    for name in field_names():
        text = f"{comments.get(name, '')} (default: {getattr(GPT2Config, name)!r})"
        group.add_argument(f"--{name}", metavar="V", default=argparse.SUPPRESS, help=text.replace("%", "%%"))
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[GPT2Config, set[str]]:
    """Command line -> (config, the names of the fields the user set through preset, file or flags).

    Nothing is written and no directory is created here: a mistake raises ConfigError.
    """
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = build_parser().parse_known_args(argv)
    problems = []  # every mistake on the command line is reported at once
    for arg in unknown:
        if arg.startswith("-"):
            name = arg.lstrip("-").split("=", 1)[0]
            if name in field_names():  # -n_layer=4, ---n_layer=4
                problems.append(f"{arg!r} needs two dashes: --{arg.lstrip('-')}")
            else:
                problems.append(f"unknown config key {name!r}{suggest(name, field_names())}")
        else:
            problems.append(f"unexpected argument {arg!r}: give at most one config file, and flags as --key=value")
    if problems:
        raise ConfigError("; ".join(problems) + " (python train.py --help lists the keys)")
    config = GPT2Config() if args.preset is None else preset_config(args.preset)
    explicit: set[str] = set() if args.preset is None else set(GPT2_CONFIGS[args.preset])
    if args.config_file is not None:
        settings, file_problems = read_config_file(args.config_file)
        problems += file_problems  # reported with the flags' problems
        for k, v in settings.items():
            setattr(config, k, v)
            explicit.add(k)
    for k, text in vars(args).items():
        if k in ("preset", "config_file"):
            continue
        try:
            setattr(config, k, parse_value(k, text))
            explicit.add(k)
        except ConfigError as e:
            problems.append(str(e))
    try:
        # the values whose type was right (wrong types are in problems already), each alone: the rules
        # between fields are checked once a resumed run's checkpoint has supplied the fields not given here
        config.validate(partial=True)
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return config, explicit
