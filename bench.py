"""Benchmark: training throughput (tokens/s, ms/iter, MFU, peak memory), generation speed, GPT-2
tokenisation speed of prepare_data.py (MB/s), and the time of a whole train.py run.

    python bench.py --preset gpt2 --batch_size 16 --block_size 1024     # GPT-2 124M on a GPU
    python bench.py                                                     # a small preset on CPU (smoke test)
    python bench.py --data_dir data/shakespeare --json bench.json       # real data; keep the figures
    python bench.py --tokenize --tokenize_mb 100                        # tokenisation only, on every core
    python bench.py --whole_run --preset shakespeare-char               # a whole train.py run, start to exit

Training is timed after a warm-up that covers torch.compile, with one host synchronisation at the
end of the timed window. Generation is timed for batch 1 and batch 8 through generate.py's decoder
(static KV cache, CUDA graphs on GPU). MFU is against the GPU's dense bf16 peak (model.py's table);
where no peak is known (CPU, float32, an unlisted GPU) the achieved FLOP/s is printed instead.
--profile N then runs N more steps under torch.profiler and prints where a step's time goes.

--tokenize times GPT-2 tokenisation alone, on generated text (the words of --input, or of
$SHAKESPEARE, when given): single-thread tiktoken, tiktoken's encode_to_numpy (what prepare_data.py's
workers call) alone in --num_proc processes (the machine's best), and prepare_data.py's parallel pipeline
from file to .bin for one text file and for JSON Lines documents, against a target of 0.7 x single-thread
x processes.

--whole_run times `python train.py --preset=PRESET` in a new process from its start to its exit, with
empty compile caches (as a first run) unless --warm_cache, split into its start-up (the interpreter,
imports, the command line), train.py's own split of the run (setup, first step with compilation, other
steps, evaluations, TensorBoard's text samples, checkpoints) and the exit after its last line; and the best
val loss. It needs the preset's prepared data.
"""
import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator

from utils import quiet_ctrl_c_while_starting

if __name__ == "__main__":  # before torch's import: a second or more in which Ctrl-C would print a traceback
    quiet_ctrl_c_while_starting()

import numpy as np
import torch

from config import COMPILE_MODES, DTYPES, GPT2_CONFIGS, field_names, preset_config
from tokenizer import GPT2_VOCAB_SIZE
from train import GRAPH_WARMUP_STEPS, memory_problem
from utils import (ArgumentParser, HelpFormatter, UserError, atomic_open, become_pool_worker, binary_problem,
                   dtype_warning, format_bytes_apart, machine_memory, output_file_problem, path_arg, resolve_device,
                   resolve_dtype, run_cli, start_process_helpers, stop_signals_raise, synchronize, underscored)

PROMPT_TOKENS = 16  # random prompt of the generation benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                       usage="%(prog)s [options] [-- TRAIN_FLAGS (with --whole_run)]")
    p.add_argument("--preset", default=None, choices=list(GPT2_CONFIGS),
                   help="model preset; default gpt2 on CUDA, shakespeare-char-cpu elsewhere (--whole_run: "
                        "shakespeare-char on CUDA)")
    p.add_argument("--batch_size", type=int, default=None, help="micro-batch in sequences (default: the preset's)")
    p.add_argument("--block_size", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="vocabulary of the random tokens (default: 65 for the character-level presets, else 50257)")
    p.add_argument("--data_dir", type=path_arg, default=None,  # ~ expanded, as train.py does
                   help="time on real batches from this prepared data set")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA GPUs from Ampere on, float16 on older ones, float32 on a CPU")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="torch.compile the model; auto: on CUDA only")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile's mode")
    p.add_argument("--compile_regional", action="store_true",
                   help="compile the embedding, one block (shared by all blocks) and the head apart (train.py's "
                        "--compile_regional): faster to compile, maybe slower to run")
    p.add_argument("--cuda_graph", action="store_true",
                   help="replay each training step (forward, backward, clipping, AdamW) as one CUDA graph, after "
                        f"{GRAPH_WARMUP_STEPS} plain steps (train.py's --cuda_graph); CUDA only")
    p.add_argument("--fp8", action="store_true",
                   help="train the blocks' matmuls in float8 (train.py's --fp8; GPUs of compute capability 8.9+)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout while training (default 0; train.py's shakespeare-char preset trains with 0.2, which "
                        "adds random numbers and masks to the step's kernels)")
    p.add_argument("--loss_chunk_rows", type=int, default=None, metavar="R",
                   help="compute the output layer and loss R tokens at a time, gradients included (train.py's "
                        "--loss_chunk_rows); 0: all at once; default: the preset's (16384 for the GPT-2 presets, "
                        "0 for the others)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 30 on CUDA, 10 on CPU)")
    p.add_argument("--gen_tokens", type=int, default=None,
                   help=f"new tokens per generation run (default 500 on CUDA, 50 on CPU, fewer where the "
                        f"{PROMPT_TOKENS}-token prompt and they would pass block_size)")
    p.add_argument("--gen_batch_sizes", default="1,8", help="comma-separated batch sizes to time generation at")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, run N more under torch.profiler and print where a step's time goes")
    p.add_argument("--no_train", action="store_true", help="skip the training benchmark")
    p.add_argument("--no_generate", action="store_true", help="skip the generation benchmark")
    p.add_argument("--hf_reference", action="store_true",
                   help="also time transformers' GPT2LMHeadModel.generate on the same weights (batch 1)")
    p.add_argument("--json", type=path_arg, default=None, metavar="FILE",
                   help="write the figures to this JSON file")
    t = p.add_argument_group("tokenisation benchmark")
    t.add_argument("--tokenize", action="store_true",
                   help="time GPT-2 tokenisation (tiktoken and prepare_data.py's pipeline) instead of the model")
    t.add_argument("--tokenize_mb", type=float, default=100, help="--tokenize: megabytes of generated text")
    t.add_argument("--input", type=path_arg, default=None, metavar="FILE",
                   help="--tokenize: draw the words from this UTF-8 text (default: $SHAKESPEARE if set, "
                        "else made-up words)")
    t.add_argument("--num_proc", type=int, default=None, help="--tokenize: tokenising processes (default: every core)")
    w = p.add_argument_group("whole training run")
    w.add_argument("--whole_run", action="store_true",
                   help="time `python train.py --preset=PRESET` from its start to its exit instead (default preset: "
                        "shakespeare-char on CUDA, shakespeare-char-cpu elsewhere), with train.py's flags after "
                        "`--`, e.g. `--whole_run -- --max_iters=500`; checkpoints and logs go to a temporary folder, "
                        "removed afterwards")
    w.add_argument("--warm_cache", action="store_true",
                   help="--whole_run: keep torch.compile's usual cache folders (a repeated run compiles faster); "
                        "default: empty ones, as a first run")
    argv = sys.argv[1:] if argv is None else list(argv)
    # --whole_run: what follows `--` is train.py's
    argv, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, unknown = p.parse_known_args(argv)
    if unknown:
        named = [underscored(a) for a in unknown]  # --max-iters=5 -> --max_iters=5, as train.py names it
        if args.whole_run and {a[2:].split("=")[0] for a in named} & set(field_names()):  # given before `--`
            p.error(f"unrecognized arguments: {' '.join(unknown)}; train.py's flags go after `--`, e.g. "
                    f"--whole_run -- {shlex.join(named)}")
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.given = {name for name, value in vars(args).items() if value != p.get_default(name)}
    args.train_flags = train_flags
    if train_flags and not args.whole_run:
        p.error(f"flags after `--` ({shlex.join(train_flags)}) are train.py's, for --whole_run")
    if args.warm_cache and not args.whole_run:
        p.error("--warm_cache is for --whole_run")
    # a flag of the other benchmark would be ignored in silence (--whole_run refuses bench.py's own flags itself)
    if args.tokenize and not args.whole_run and sorted(args.given - TOKENIZE_FLAGS):
        p.error(f"--tokenize times GPT-2 tokenisation only: {listing(sorted(args.given - TOKENIZE_FLAGS))} for the "
                f"model benchmark")
    loose = sorted(args.given & (TOKENIZE_FLAGS - {"tokenize", "json"}))
    if loose and not args.tokenize and not args.whole_run:
        p.error(f"{listing(loose)} for --tokenize")
    if args.hf_reference and args.no_generate:
        p.error("--hf_reference times transformers' generation next to ours, which --no_generate leaves out")
    # flags of a part left out would be ignored, and written into --json as if they had applied
    for skip, part, flags in (("no_train", "training", {"steps", "warmup", "dropout", "loss_chunk_rows", "cuda_graph",
                                                         "fp8"}),
                              ("no_generate", "generation", {"gen_tokens", "gen_batch_sizes"})):
        if getattr(args, skip) and args.given & flags and not args.whole_run:
            p.error(f"{listing(sorted(args.given & flags))} for the {part} benchmark, which --{skip} leaves out")
    return args


def listing(names: list[str]) -> str:
    """['steps', 'preset'] -> '--steps, --preset are' (a refusal's subject)."""
    return f"{', '.join('--' + n for n in names)} {'is' if len(names) == 1 else 'are'}"


def cpu_name() -> str:
    """The processor's model name where the OS tells it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_train(args, config, device, dtype, use_compile) -> dict:
    """Time train.py's optimizer step: its forward_backward, then clipping, optimizer and scaler as its loop does
    (with --cuda_graph: train.py's GraphedStep, the same step replayed as one CUDA graph)."""
    from model import GPT
    from train import GraphedStep, autocast_context, forward_backward, optimizer_step, training_model
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate,
                                           (config.beta1, config.beta2), device.type)
    params = list(model.parameters())  # listed once, as train.py does
    # as train.py builds them: autocast for every dtype but float32 (bfloat16 on a CPU included)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ctx = autocast_context(device.type, dtype)
    # as train.py steps: random ids in range, or the loader's checked batches, so no id check either
    step_model = training_model(model, use_compile, args.compile_mode, args.compile_regional)
    B, T = config.batch_size, config.block_size

    if args.data_dir:
        from data import BatchLoader
        loader = BatchLoader(args.data_dir, T, B, device=str(device), seed=0)
        next_batch = lambda i: loader.get_batch("train", i)  # noqa: E731
    else:
        # a few fixed random batches on the device: the loader's cost is not what is measured here
        pool = [torch.randint(0, config.vocab_size, (B, T + 1), device=device) for _ in range(4)]
        next_batch = lambda i: (pool[i % 4][:, :-1], pool[i % 4][:, 1:])  # noqa: E731

    graphed = GraphedStep(step_model, params, optimizer, config.grad_clip, ctx, device) if args.cuda_graph else None

    def step(i):
        if graphed is not None:
            return graphed(*next_batch(i), config.learning_rate)[0]
        loss = forward_backward(step_model, lambda m: next_batch(i), 1, ctx, scaler)
        optimizer_step(params, optimizer, scaler, config.grad_clip)
        return loss

    try:
        t0 = time.perf_counter()
        for i in range(args.warmup):
            loss = step(i)
        loss.item()
        warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # not the current GPU: --device may name another
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(args.warmup + i)
        final_loss = loss.item()  # the one host synchronisation of the timed window
        dt = (time.perf_counter() - t0) / args.steps
        tokens = B * T
        mfu = model.estimate_mfu(tokens, dt, device=device, dtype=dtype)
        result = dict(tokens_per_sec=tokens / dt, ms_per_iter=dt * 1000, mfu=mfu,
                      achieved_tflops=model.achieved_flops(tokens, dt) / 1e12, warmup_s=warmup_s,
                      final_loss=final_loss, params=model.get_num_params(),
                      peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
        if args.profile:
            result["profile"] = profile_steps(step, args.warmup + args.steps, args.profile, device)
    finally:
        if args.data_dir:
            loader.close()
    del step_model, model, optimizer
    return result


# What the profile's summary groups the time into, by operator or kernel name; the first pattern that
# matches wins. Kernel names differ between GPUs, libraries and versions: the top list shows them as they are.
# Attention comes first: flash and memory-efficient attention kernels carry "cutlass" in their names.
TIME_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|_mm_|tem_fused.*mm|aten::(add)?b?mm$|aten::linear", re.I)),
    ("optimizer and clipping", re.compile(r"adam|multi_tensor|foreach|clip_grad", re.I)),
    ("fused elementwise and reductions (Triton)", re.compile(r"triton", re.I)),
)


def time_kind(name: str) -> str:
    """The TIME_KINDS group of an operator or kernel name, else 'other'."""
    return next((kind for kind, pattern in TIME_KINDS if pattern.search(name)), "other")


def caller_kind(event) -> str:
    """The TIME_KINDS group of a profiled CPU operator, or else of its nearest caller that has one."""
    while event is not None:
        found = time_kind(event.name)
        if found != "other":
            return found
        event = event.cpu_parent
    return "other"


def profile_steps(step, first: int, n_steps: int, device, top: int = 12) -> dict:
    """Run step(first), ..., step(first + n_steps - 1) under torch.profiler.

    On CUDA it sums the GPU kernels' time, on a CPU the operators' own (self) time, per step: the
    total, the share of each TIME_KINDS group, and every entry, biggest first ("entries", for --json; the
    `top` first ones are printed). A GPU total well below the timed step says the GPU waits for the host
    (launch overhead), one close to it that the kernels themselves are the cost.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(n_steps):
            loss = step(first + i)
        loss.item()  # waits for the last kernels
        wall = time.perf_counter() - t0
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    rows = [e for e in prof.key_averages() if e.device_type == kind and not getattr(e, "is_user_annotation", False)]
    own_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    per_step = lambda us: us / 1000 / n_steps  # noqa: E731  microseconds in all -> ms per step
    kinds = {name: 0.0 for name, _ in TIME_KINDS} | {"other": 0.0}
    if cuda:  # a kernel's own name says what it is
        for e in rows:
            kinds[time_kind(e.key)] += per_step(own_us(e))
    else:
        # an operator's name may not (clipping's aten::linalg_vector_norm and aten::mul_ on a CPU, one per
        # tensor, under aten::_foreach_norm and aten::_foreach_mul_): the nearest caller whose name does
        for e in prof.events():
            if e.device_type == kind and not getattr(e, "is_user_annotation", False):
                kinds[caller_kind(e)] += per_step(e.self_cpu_time_total)
    rows.sort(key=own_us, reverse=True)
    entries = [dict(name=e.key, ms_per_step=per_step(own_us(e)), calls_per_step=e.count / n_steps) for e in rows]
    return dict(steps=n_steps, measured="GPU kernels" if cuda else "CPU operators (self time)",
                ms_per_step=sum(kinds.values()), kinds=kinds,
                wall_ms_per_step=1000 * wall / n_steps,  # of these steps, the profiler's own cost included
                top=entries[:top], entries=entries)


def print_profile(p: dict, step_ms: float) -> None:
    print(f"  profile of {p['steps']} more steps: {p['measured']} take {p['ms_per_step']:.2f} ms per step "
          f"({100 * p['ms_per_step'] / step_ms:.0f}% of the timed {step_ms:.2f} ms)")
    print("    " + " | ".join(f"{name} {ms:.2f} ms" for name, ms in p["kinds"].items() if ms))
    for row in p["top"]:
        name = row["name"] if len(row["name"]) <= 100 else row["name"][:97] + "..."
        print(f"    {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:6.1f}x  {name}")


def bench_generate(args, config, device, dtype, use_compile) -> list[dict]:
    from generate import benchmark_generation
    from model import GPT
    torch.manual_seed(0)
    model = GPT(config)  # random weights: speed does not depend on them
    results = []
    for bs in args.gen_batch_sizes:
        r = benchmark_generation(model, batch_size=bs, prompt_len=PROMPT_TOKENS, new_tokens=args.gen_tokens,
                                 device=device, dtype=dtype, reference_hf=args.hf_reference and bs == 1,
                                 compile=use_compile,
                                 progress=lambda message: print(f"    batch {bs}: {message}", file=sys.stderr,
                                                                flush=True))
        results.append(dict(batch_size=bs, **r))
    return results


# ----------------------------------------------------------------------------- tokenisation (--tokenize)

def parse_batch_sizes(text: str) -> list[int]:
    """'1,8' -> [1, 8]; anything but a comma-separated list of positive integers is a UserError."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"--gen_batch_sizes must be a comma-separated list of positive integers, got {text!r}; "
                        "e.g. --gen_batch_sizes 1,8")
    return sizes


def bench_text(n_bytes: int, words_file: str | None = None, seed: int = 1337) -> str:
    """About n_bytes of deterministic, varied text: words drawn with Zipf-like frequencies.

    The words come from words_file (e.g. tinyshakespeare) when given, else they are generated from
    syllables, with capitals, numbers, punctuation and some non-ASCII words; lines end at random.
    """
    from prepare_data import decode_utf8
    rng = np.random.default_rng(seed)
    if words_file:
        data = Path(words_file).read_bytes()
        if problem := binary_problem(data):  # NULs are UTF-8: found here, not minutes later in a temporary file
            raise UserError(f"{words_file} is not text: {problem}")
        words = sorted(set(decode_utf8(data, words_file).split()))
        if not words:
            raise UserError(f"the word source {words_file!r} holds no words; give a text file, or no --input")
    else:
        syllables = ["ka", "lo", "mi", "ster", "an", "the", "ing", "pre", "vo", "tu", "ré", "qua", "ex", "on",
                     "ly", "ber", "sh", "ou", "ght", "ion", "al", "fe", "dri", "ck", "zo", "ph", "ea", "un"]
        words = set()
        while len(words) < 20000:
            w = "".join(rng.choice(syllables, size=rng.integers(1, 5)))
            r = rng.random()
            w = w.capitalize() if r < 0.15 else w + rng.choice(list(",.;:!?")) if r < 0.25 else w
            words.add(w)
        words = sorted(words) + [str(i) for i in range(0, 3000, 7)]
        words += ["café", "naïve", "über", "東京", "Москва", "εὐχαριστῶ", "😀", "—", "(1999)", "don't", "it's"]
    words = np.array(words, dtype=object)
    rng.shuffle(words)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    p /= p.sum()
    parts, size, per_word = [], 0, 10.0  # bytes per word and separator, measured on each block drawn
    while size < n_bytes:
        k = int(min(1 << 18, max(16, (n_bytes - size) / per_word)))
        tokens = np.empty(2 * k, dtype=object)
        tokens[0::2] = words[rng.choice(len(words), size=k, p=p)]
        tokens[1::2] = np.where(rng.random(k) < 0.08, "\n", " ")
        block = "".join(tokens).encode("utf-8")
        parts.append(block)
        size += len(block)
        per_word = len(block) / k
    # cut to the size asked for, at a character boundary
    return b"".join(parts)[:n_bytes].decode("utf-8", errors="ignore")


def bench_documents(text: str, seed: int = 1337) -> Iterator[str]:
    """text cut at newlines into documents of 1 to 20 KB, as JSON Lines."""
    rng = random.Random(seed)
    start = 0
    while start < len(text):
        end = text.find("\n", start + rng.randint(1000, 20000))
        end = len(text) if end < 0 else end + 1
        yield json.dumps({"text": text[start:end]}, ensure_ascii=False) + "\n"
        start = end


_barrier = None


def _init_raw_worker(barrier) -> None:
    global _barrier
    _barrier = barrier
    become_pool_worker()  # the parent ends the workers on Ctrl-C: no traceback from each of them


def _raw_encode(text: str) -> tuple[float, float]:
    """Encode text with tiktoken alone, as prepare_data.py's workers do (encode_to_numpy), after every worker
    has its text: (start, end) times."""
    from tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer()
    tok.enc.encode_to_numpy("warm up", disallowed_special=())
    _barrier.wait(timeout=600)  # a worker that died before it: the others give up instead of waiting forever
    t0 = time.time()
    tok.enc.encode_to_numpy(text, disallowed_special=())
    return t0, time.time()


def raw_parallel_speed(text: str, num_proc: int) -> float:
    """MB/s of num_proc processes each running tiktoken on its own share, nothing else: what the
    machine's cores give at best. Shares are handed out before the clock starts."""
    from prepare_data import cut_text
    data = text.encode("utf-8")
    shares = [share.decode("utf-8") for share in cut_text(data, len(data) // num_proc + 1)]
    context = multiprocessing.get_context()
    others = set(multiprocessing.active_children())  # a caller's children, not the pool's
    # an executor, not multiprocessing.Pool, which would start another worker for one the system killed (out of
    # memory) and wait for its result forever
    pool = ProcessPoolExecutor(len(shares), mp_context=context, initializer=_init_raw_worker,
                               initargs=(context.Barrier(len(shares)),))
    try:
        times = list(pool.map(_raw_encode, shares))
    except BaseException as e:  # a worker died, Ctrl-C, SIGTERM: the others go too, not after their share
        for worker in set(multiprocessing.active_children()) - others:
            worker.kill()
        if isinstance(e, BrokenProcessPool):
            raise UserError(f"a tokenising process died (killed by the system: out of memory?); try a smaller "
                            f"--tokenize_mb or fewer processes, e.g. --num_proc {max(1, num_proc // 2)}") from None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(data) / 1e6 / (max(t for _, t in times) - min(t for t, _ in times))


def bench_tokenize(mb: float, num_proc: int, words_file: str | None, between: Callable[[], None] = lambda: None
                   ) -> dict:
    """Time single-thread tiktoken and prepare_data.py's parallel pipeline on the same generated text.
    between() is called between the stages (a stop request that an exception could not deliver ends it there).

    Prints MB/s and returns the figures, with the token counts the pipeline wrote (text_file_tokens:
    train + val of the text file; documents_tokens: those of the JSON Lines documents, end-of-text
    after each). Raises RuntimeError if the pipeline's ids differ from single-thread tiktoken's.
    """
    from data import SPLITS
    from prepare_data import doc_split, prepare_documents, prepare_text
    from tokenizer import GPT2Tokenizer
    print(f"generating {mb:g} MB of text from {'the words of ' + words_file if words_file else 'made-up words'}",
          file=sys.stderr)
    text = bench_text(int(mb * 1e6), words_file)
    size = len(text.encode("utf-8")) / 1e6
    tok = GPT2Tokenizer()
    tok.encode_ordinary("warm up")
    cut = int(len(text) * 0.9)
    t0 = time.perf_counter()
    ref = [tok.encode_ordinary(text[:cut]), tok.encode_ordinary(text[cut:])]
    single = size / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    tok.enc.encode_to_numpy(text, disallowed_special=())
    single_np = size / (time.perf_counter() - t0)
    print(f"single-thread tiktoken: {single:.2f} MB/s", file=sys.stderr)
    ceiling = raw_parallel_speed(text, num_proc) if num_proc > 1 else single_np
    between()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bench.txt").write_text(text, encoding="utf-8")
        t0 = time.perf_counter()
        text_meta = prepare_text(tmp / "text", [tmp / "bench.txt"], dataset="custom", tokenizer="gpt2",
                                 vocab_size=None, val_fraction=0.1, num_proc=num_proc, command="bench")
        text_speed = size / (time.perf_counter() - t0)
        between()
        same = all(np.array_equal(np.fromfile(tmp / "text" / f"{split}.bin", dtype=np.uint16), ids)
                   for split, ids in zip(SPLITS, ref))
        del ref
        fractions = []  # where each document's hash falls in [0, 1): below val_fraction means val
        with open(tmp / "bench.jsonl", "w", encoding="utf-8") as f:
            for line in bench_documents(text):
                f.write(line)
                digest = doc_split(json.loads(line)["text"], 0.0)[1]
                fractions.append(int.from_bytes(digest, "little") / 2**64)
        if len(fractions) < 2:
            raise UserError(f"--tokenize_mb {mb:g} makes {len(fractions)} document, and both splits need one; "
                            f"give at least --tokenize_mb 0.05")
        # OpenWebText's val_fraction leaves val a few documents from about 50 MB up; a smaller text takes
        # 0.05, or just enough to put one document in val, as an empty split is an error. Which split a
        # document goes to does not change the speed.
        smallest = sorted(fractions)[:2]
        val_fraction = 0.0005 if len(fractions) >= 5000 else max(0.05, (smallest[0] + smallest[1]) / 2)
        t0 = time.perf_counter()
        meta = prepare_documents(tmp / "docs", str(tmp / "bench.jsonl"), hf_name="", val_fraction=val_fraction,
                                 num_proc=num_proc, command="bench")
        docs_speed = size / (time.perf_counter() - t0)
        between()
    target = 0.7 * single * num_proc
    print(f"text: {size:.3g} MB; documents: {meta['train_documents'] + meta['val_documents']:,}; processes: {num_proc}")
    print(f"single-thread tiktoken encode_ordinary:         {single:8.2f} MB/s")
    print(f"single-thread tiktoken encode_to_numpy:         {single_np:8.2f} MB/s (what the workers call)")
    print(f"encode_to_numpy alone in {num_proc:2d} processes (best): {ceiling:8.2f} MB/s = "
          f"{ceiling / single:.2f} x single")
    print(f"pipeline, one text file (file to .bin):        {text_speed:8.2f} MB/s = "
          f"{text_speed / single:.2f} x single; ids identical to single-thread tiktoken: {'yes' if same else 'NO'}")
    print(f"pipeline, JSON Lines documents (file to .bin): {docs_speed:8.2f} MB/s = {docs_speed / single:.2f} x single")
    print(f"target 0.7 x single x {num_proc} = {target:.2f} MB/s: text file {text_speed / target:.2f}, documents "
          f"{docs_speed / target:.2f} of target ({'met' if min(text_speed, docs_speed) >= target else 'NOT met'}); "
          f"against encode_to_numpy's single-thread speed: {text_speed / target * single / single_np:.2f} and "
          f"{docs_speed / target * single / single_np:.2f}")
    if not same:
        raise RuntimeError("the parallel pipeline's ids differ from single-thread tiktoken's")
    return dict(mb=round(size, 3), num_proc=num_proc, single_thread_mb_s=round(single, 2),
                single_thread_numpy_mb_s=round(single_np, 2),
                tiktoken_parallel_mb_s=round(ceiling, 2), text_file_mb_s=round(text_speed, 2),
                documents_mb_s=round(docs_speed, 2), target_mb_s=round(target, 2),
                text_file_tokens=text_meta["train_tokens"] + text_meta["val_tokens"],
                documents=meta["train_documents"] + meta["val_documents"],
                documents_tokens=meta["train_tokens"] + meta["val_tokens"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    problem = output_file_problem(args.json) if args.json else None
    if problem:
        hint = (f"give a file name, e.g. --json {Path(args.json) / 'bench.json'}" if problem == "is a directory"
                else "give a path you can write to")
        raise UserError(f"--json {args.json} {problem}; {hint}")
    if args.whole_run:
        report = whole_run_report(args)
    elif args.tokenize:
        start_process_helpers()
        # SIGTERM, SIGHUP: the temporary folder (hundreds of MB of text and .bin files) goes, as after Ctrl-C
        with stop_signals_raise(lambda signum: SystemExit(128 + signum)) as stopped:
            report = tokenize_report(args, between=stopped)
    else:
        report = model_report(args)
    if args.json:
        try:
            with atomic_open(args.json, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")
        except OSError as e:  # e.g. the disk filled up while the benchmark ran
            raise UserError(f"cannot write --json {args.json}: {e.strerror or e}; the figures are printed "
                            f"above") from None
        print(f"wrote {args.json}")
    return report


def tokenize_report(args, between: Callable[[], None] = lambda: None) -> dict:
    """The --tokenize run: tokenisation figures only, no model."""
    from prepare_data import check_num_proc, default_num_proc
    num_proc = default_num_proc() if args.num_proc is None else args.num_proc
    words_file = args.input or os.environ.get("SHAKESPEARE")
    check_num_proc(num_proc, UserError)
    if not 0.05 <= args.tokenize_mb < float("inf"):  # less makes too few documents for both splits
        raise UserError(f"--tokenize_mb must be a number of megabytes, at least 0.05, got {args.tokenize_mb:g}; "
                        "e.g. --tokenize_mb 100")
    # the text, its ids as lists and arrays, and the pipeline's own: 13 bytes for each byte of text measured
    # with real words, 23-26 with made-up ones (BENCHMARKS.md), counted as 12 so that only what surely cannot
    # fit is refused
    available = machine_memory()
    if available is not None and args.tokenize_mb * 12e6 > available:
        most = available / 12e6  # rounded down: the figure suggested must itself be taken
        most = f"{math.floor(most)}" if most >= 1 else f"{math.floor(most * 100) / 100:g}"
        needed, has = format_bytes_apart(args.tokenize_mb * 12e6, available)
        raise UserError(f"--tokenize_mb {args.tokenize_mb:g} needs at least {needed} of memory (about 12 bytes for "
                        f"each byte of text), and this machine has {has} (RAM and swap); give at most --tokenize_mb "
                        f"{most}")
    if words_file and not Path(words_file).is_file():
        raise UserError(f"the word source {words_file!r} (--input, else $SHAKESPEARE) is not a file; give a UTF-8 "
                        "text file, or neither to use made-up words")
    return dict(device_name=cpu_name(), date=time.strftime("%Y-%m-%d"),
                tokenize=bench_tokenize(args.tokenize_mb, num_proc, words_file, between))


# the issues' targets for a whole run of a preset: (seconds from start to exit, best val loss, the machine)
WHOLE_RUN_TARGETS = {"shakespeare-char": (60.0, 1.47, "one H100 or H200 in bfloat16"),
                     "shakespeare-char-cpu": (140.0, 1.90, "a laptop CPU")}
WHOLE_RUN_FLAGS = {"whole_run", "preset", "warm_cache", "json"}
TOKENIZE_FLAGS = {"tokenize", "tokenize_mb", "input", "num_proc", "json"}
DEVICE_LINE = re.compile(r"device: (\S+), dtype (\w+)")  # "device: cuda, dtype bfloat16, compile True, ..."
# train.py's done_line: "done: 5000 iterations in 1m04s (setup 8.7 s, first step (compilation) 17.7 s, other
# steps 32.0 s, evaluations 4.3 s, checkpoints 0.9 s), best val loss 1.4625; checkpoints in ..."
DONE_LINE = re.compile(r"done: (\d+) iterations(?: \((\d+) of them in this run\))? in \S+ \((.*)\), "
                       r"best val loss (\S+);")


def parse_done_line(line: str) -> dict | None:
    """train.py's last line as figures: iterations (this run's), train.py's split in seconds, best val loss
    (None where no evaluation ran); None for any other line."""
    m = DONE_LINE.match(line)
    if m is None:
        return None
    iterations, this_run, split, best = m.groups()
    best = float(best)
    return dict(iterations=int(iterations), iterations_this_run=int(this_run or iterations),
                split_s={name: float(sec) for name, sec in re.findall(r"([a-z][a-z ()]*?) ([\d.]+) s", split)},
                best_val_loss=best if math.isfinite(best) else None)


def whole_run_target(preset: str, flags: list[str], wall: float, best_val_loss: float | None) -> dict | None:
    """The target of a preset run as it stands (no train.py flags), and whether this run met it."""
    if preset not in WHOLE_RUN_TARGETS or flags:
        return None
    seconds, loss, machine = WHOLE_RUN_TARGETS[preset]
    met = wall <= seconds and best_val_loss is not None and best_val_loss <= loss
    return dict(seconds=seconds, best_val_loss=loss, machine=machine, met=met)


def whole_run_report(args) -> dict:
    """--whole_run: train.py in a new process, timed from its start to its exit, its output passed through."""
    others = sorted(args.given - WHOLE_RUN_FLAGS)
    if others:
        raise UserError(f"--whole_run times train.py as it runs: {listing(others)} bench.py's own; give train.py's "
                        f"flags after `--`, e.g. --whole_run -- --batch_size=32 --compile=False")
    flags = args.train_flags
    if "-h" in flags or "--help" in flags:
        subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), "--help"])
        raise SystemExit(0)
    # a config file (train.py's one positional argument, not a flag's value) could set what the flags below may not
    files = [f for i, f in enumerate(flags)
             if not f.startswith("-") and (i == 0 or "=" in flags[i - 1] or not flags[i - 1].startswith("-"))]
    if files:
        raise UserError(f"{' '.join(files)} after `--`: a config file could set what --whole_run sets itself (the "
                        f"preset, the folders for checkpoints and logs, the start from scratch); give its settings "
                        f"as --key=value flags")
    # bench.py sets these itself: the preset it reports and compares with its target, and the temporary folder
    # that is removed after the run (a checkpoint left elsewhere would be resumed by the next run), where the run
    # starts from scratch
    owned = [f for f in flags if f.split("=", 1)[0] in ("--preset", "--checkpoint_dir", "--log_dir", "--init_from")]
    if owned:
        raise UserError(f"{' '.join(owned)} after `--` would change what --whole_run sets itself: the preset "
                        f"(give --preset before `--`), the temporary folders for checkpoints and logs, removed "
                        f"after the run, and the start: a new model, trained from scratch; leave "
                        f"{'it' if len(owned) == 1 else 'them'} out")
    preset = args.preset or ("shakespeare-char" if torch.cuda.is_available() else "shakespeare-char-cpu")
    # SIGTERM (timeout, docker stop, a scheduler) and SIGHUP end this like Ctrl-C: the child killed, the folder removed
    with stop_signals_raise(stopped_by):
        return _whole_run(args, preset, flags)


def signal_name(signum: int) -> str | None:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return None


def stopped_by(signum: int) -> SystemExit:
    print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
    return SystemExit(128 + signum)


def _whole_run(args, preset: str, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_whole_run_") as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line as printed, to stamp it
        if not args.warm_cache:
            env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        command = [sys.executable, str(Path(__file__).with_name("train.py")), f"--preset={preset}",
                   f"--checkpoint_dir={Path(tmp) / 'checkpoints'}", f"--log_dir={Path(tmp) / 'runs'}", *flags]
        print(f"whole run: python {shlex.join(command[1:])}, compile caches "
              f"{'as they are' if args.warm_cache else 'empty'}", flush=True)
        done_at = done = None
        device, dtype = "cpu", "unknown"
        last_lines: list[str] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", env=env)
        try:
            for line in proc.stdout:
                now = time.perf_counter() - t0
                print(f"  {line}", end="", flush=True)
                last_lines = (last_lines + [line.rstrip()])[-3:]
                parsed, named = parse_done_line(line), DEVICE_LINE.match(line)
                if parsed:
                    done_at, done = now, parsed
                elif named:
                    device, dtype = named.groups()
            code = proc.wait()
        finally:  # Ctrl-C reached train.py too; it saves into the folder about to be removed: do not wait for that
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        wall = time.perf_counter() - t0
    by_signal = signal_name(-code if code < 0 else code - 128 if code > 128 else 0)
    if by_signal:  # its own "saved checkpoint.pt; run it again" went with the temporary folder
        raise UserError(f"train.py was {'killed' if code < 0 else 'stopped'} by {by_signal}, so the run was not timed")
    if code != 0 or done is None:
        said = next((line for line in reversed(last_lines) if line), "no output").removeprefix("error: ")
        raise UserError(f"train.py {'exited with code ' + str(code) if code else 'did not finish'}: {said}")
    split = done["split_s"]
    # wall = start-up (the interpreter, imports, the command line) + train.py's own clock + the exit after its
    # last line; the split is printed to 0.1 s, so the start-up carries up to about 0.25 s of that rounding
    startup = max(0.0, done_at - sum(split.values()))
    r = dict(preset=preset, command="python " + shlex.join(command[1:]), warm_cache=args.warm_cache,
             wall_s=round(wall, 2), startup_s=round(startup, 2), split_s=split, exit_s=round(wall - done_at, 2),
             **{k: done[k] for k in ("iterations", "iterations_this_run", "best_val_loss")})
    best = "none (no evaluation)" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f}"
    print(f"whole run: {wall:.1f} s from start to exit = start-up {startup:.1f} s (imports, command line) + "
          f"{', '.join(f'{k} {v:.1f} s' for k, v in split.items())} + exit {r['exit_s']:.1f} s after the last line; "
          f"best val loss {best}")
    target = whole_run_target(preset, flags, wall, r["best_val_loss"])
    if target:
        r["target"] = target
        print(f"target on {target['machine']}: at most {target['seconds']:.0f} s with best val loss at most "
              f"{target['best_val_loss']}: {'met' if target['met'] else 'NOT met'} here")
    # named after the run, so that this process does not hold the GPU while train.py starts
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name()
    return dict(device=device, device_name=name, dtype=dtype, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                whole_run=r)


def model_report(args) -> dict:
    """The default run: training and generation figures, printed as they come."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if warning := dtype_warning(device, dtype):
        print(warning, file=sys.stderr)
    use_compile = device.type == "cuda" if args.compile == "auto" else args.compile == "true"
    preset = args.preset or ("gpt2" if device.type == "cuda" else "shakespeare-char-cpu")
    if args.vocab_size is not None:
        vocab_size = args.vocab_size
    else:
        vocab_size = 65 if preset.startswith("shakespeare-char") else GPT2_VOCAB_SIZE
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout:g}")
    config = preset_config(preset, vocab_size=vocab_size, dropout=args.dropout, device=str(device),
                           dtype=str(dtype).removeprefix("torch."), compile=use_compile)
    if args.data_dir:
        if args.vocab_size is not None:
            raise UserError("--vocab_size is the data set's with --data_dir (its meta.json says it): leave it out")
        from data import load_meta
        config.vocab_size = load_meta(args.data_dir)["vocab_size"]
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    if args.block_size is not None:
        config.block_size = args.block_size
    config.fp8 = args.fp8
    if args.loss_chunk_rows is not None:
        config.loss_chunk_rows = args.loss_chunk_rows
    config.validate()
    from model import attention_kernel, fp8_problem
    problem = fp8_problem(device) if args.fp8 else None
    if problem:
        raise UserError(problem)
    if not args.no_train:  # a size that cannot fit is refused before minutes of building it
        if problem := memory_problem(config, device, dtype, advice="give a smaller --batch_size or --block_size, "
                                                                   "or a smaller --preset or --vocab_size"):
            raise UserError(problem)
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    args.steps = args.steps if args.steps is not None else (30 if cuda else 10)
    # the prompt and the new tokens within block_size: past it, decoding slides its window and rebuilds the KV cache,
    # and the figure would no longer be the cached step's speed
    room = config.block_size - PROMPT_TOKENS
    if not args.no_generate and room < 1:
        raise UserError(f"the generation benchmark's {PROMPT_TOKENS}-token prompt fills block_size "
                        f"{config.block_size}: give --block_size {PROMPT_TOKENS + 1} or more, or --no_generate")
    args.gen_tokens = args.gen_tokens if args.gen_tokens is not None else min(500 if cuda else 50, max(room, 1))
    if args.warmup < 1 or args.steps < 1 or args.gen_tokens < 1:
        raise UserError("--warmup, --steps and --gen_tokens must be at least 1")
    if not args.no_generate and args.gen_tokens > room:
        raise UserError(f"the {PROMPT_TOKENS}-token prompt and {args.gen_tokens} new tokens exceed block_size "
                        f"{config.block_size}, where decoding would slide its window and rebuild the cache: use "
                        f"--gen_tokens {room} or less, or --block_size {PROMPT_TOKENS + args.gen_tokens} or more "
                        f"(or a larger --preset)")
    if args.cuda_graph:  # first whether it can run here at all, then how many steps it needs
        from train import cuda_graph_problem
        config.compile_mode = args.compile_mode
        problem = cuda_graph_problem(config, device, dtype, use_compile)
        if problem:
            raise UserError(f"{problem.replace('cuda_graph', '--cuda_graph', 1)}; or drop --cuda_graph")
    if args.cuda_graph and not args.no_train and args.warmup <= GRAPH_WARMUP_STEPS:
        raise UserError(f"--cuda_graph captures the step after {GRAPH_WARMUP_STEPS} plain ones: give --warmup "
                        f"{GRAPH_WARMUP_STEPS + 1} or more, so that the timed steps only replay it")
    if args.profile < 0 or (args.profile and args.no_train):
        raise UserError(f"--profile profiles training steps: give a number of steps, at least 1, and leave out "
                        f"--no_train (got --profile {args.profile}{' --no_train' if args.no_train else ''})")
    args.gen_batch_sizes = parse_batch_sizes(args.gen_batch_sizes)
    if args.hf_reference and not args.no_generate and 1 not in args.gen_batch_sizes:
        raise UserError(f"--hf_reference times transformers' generate at batch 1, which --gen_batch_sizes "
                        f"{','.join(map(str, args.gen_batch_sizes))} leaves out; add 1 to it")
    if args.hf_reference and not args.no_generate:
        # checked before the training benchmark, not after it
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--hf_reference needs transformers: pip install transformers") from None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    attention = attention_kernel(config, config.batch_size, device, dtype)
    report = dict(device=str(device), device_name=name, torch=torch.__version__,
                  dtype=str(dtype).removeprefix("torch."), compile=use_compile,
                  compile_mode=args.compile_mode if use_compile else None,
                  compile_regional=use_compile and args.compile_regional, cuda_graph=args.cuda_graph, fp8=args.fp8,
                  loss_chunk_rows=config.loss_chunk_rows,
                  attention=attention,
                  preset=preset, dropout=config.dropout,
                  batch_size=config.batch_size, block_size=config.block_size,
                  n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
                  data=args.data_dir or "random tokens", date=time.strftime("%Y-%m-%d"),
                  threads=torch.get_num_threads(), warmup_steps=args.warmup, timed_steps=args.steps,
                  prompt_tokens=PROMPT_TOKENS, gen_tokens=args.gen_tokens)
    print(f"device {name} ({device}), torch {torch.__version__}, {report['dtype']}, compile={use_compile}"
          + (f" ({args.compile_mode}{', regional' * args.compile_regional})" if use_compile
             else ", so --compile_regional does nothing" if args.compile_regional else "")
          + (", each training step one CUDA graph" if args.cuda_graph else "")
          + (", fp8 matmuls in training" if args.fp8 else "")
          + (f", loss {config.loss_chunk_rows} tokens at a time" if config.loss_chunk_rows else "")
          + f", attention {attention}")
    print(f"model {preset}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
          f"vocab={config.vocab_size}{f' dropout={config.dropout:g}' if config.dropout else ''}; batch "
          f"{config.batch_size} x {config.block_size} tokens; data: {report['data']}")

    if not args.no_train:
        print(f"training: {args.warmup} warm-up steps (compilation included), then {args.steps} timed ...", flush=True)
        r = bench_train(args, config, device, dtype, use_compile)
        from train import format_flops
        report["train"] = r
        eff = (f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a (no known peak)")
        mem = f", peak memory {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
        print(f"  {r['tokens_per_sec']:,.0f} tokens/s | {r['ms_per_iter']:.1f} ms/iter | {eff} | "
              f"{format_flops(r['achieved_tflops'] * 1e12)} achieved{mem} | warm-up {r['warmup_s']:.1f} s")
        if "profile" in r:
            print_profile(r["profile"], r["ms_per_iter"])
    if not args.no_generate:
        print(f"generation: prompt {PROMPT_TOKENS} tokens, {args.gen_tokens} new tokens, greedy ...", flush=True)
        report["generate"] = bench_generate(args, config, device, dtype, use_compile)
        for g in report["generate"]:
            ref = (f" | transformers generate {g['hf_tokens_per_sec']:.1f} tokens/s "
                   f"(x{g['tokens_per_sec'] / g['hf_tokens_per_sec']:.2f})" if g.get("hf_tokens_per_sec") else "")
            print(f"  batch {g['batch_size']}: {g['tokens_per_sec']:,.1f} tokens/s{ref}")
    if args.no_train and args.no_generate:
        print("nothing measured: --no_train and --no_generate leave only the settings above")
    return report


if __name__ == "__main__":
    run_cli(main)
