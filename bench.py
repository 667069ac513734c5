"""Benchmark: training throughput (tokens/s, ms/iter, MFU, peak memory) and generation speed.

    python bench.py --preset gpt2 --batch_size 16 --block_size 1024     # GPT-2 124M on a GPU
    python bench.py                                                     # a small preset on CPU (smoke test)
    python bench.py --data_dir data/shakespeare --json bench.json       # real data; keep the figures

Training is timed after a warm-up that covers torch.compile, with one host synchronisation at the
end of the timed window. Generation is timed for batch 1 and batch 8 through generate.py's decoder
(static KV cache, CUDA graphs on GPU). MFU is against the GPU's dense bf16 peak (model.py's table);
where no peak is known (CPU, float32, an unlisted GPU) the achieved FLOP/s is printed instead.
"""
import argparse
import json
import os
import platform
import time

import torch

from config import GPT2_CONFIGS, preset_config
from utils import UserError, atomic_open, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, choices=list(GPT2_CONFIGS),
                   help="model preset; default gpt2 on CUDA, shakespeare-char-cpu elsewhere")
    p.add_argument("--batch_size", type=int, default=None, help="micro-batch in sequences (default: the preset's)")
    p.add_argument("--block_size", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="vocabulary of the random tokens (default: 65 for the character-level presets, else 50257)")
    p.add_argument("--data_dir", default=None, help="time on real batches from this prepared data set")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 30 on CUDA, 10 on CPU)")
    p.add_argument("--gen_tokens", type=int, default=None, help="new tokens per generation run (default 500 on CUDA, 50 on CPU)")
    p.add_argument("--gen_batch_sizes", default="1,8", help="comma-separated batch sizes to time generation at")
    p.add_argument("--no_train", action="store_true", help="skip the training benchmark")
    p.add_argument("--no_generate", action="store_true", help="skip the generation benchmark")
    p.add_argument("--hf_reference", action="store_true",
                   help="also time transformers' GPT2LMHeadModel.generate on the same weights (batch 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures to this JSON file")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
    from contextlib import nullcontext

    from model import GPT
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate,
                                           (config.beta1, config.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ctx = nullcontext() if device.type == "cpu" else torch.autocast(device.type, dtype=dtype)
    step_model = torch.compile(model) if use_compile else model
    B, T = config.batch_size, config.block_size

    if args.data_dir:
        from data import BatchLoader
        loader = BatchLoader(args.data_dir, T, B, device=str(device), seed=0)
        next_batch = lambda i: loader.get_batch("train", i)  # noqa: E731
    else:
        # a few fixed random batches on the device: the loader's cost is not what is measured here
        pool = [torch.randint(0, config.vocab_size, (B, T + 1), device=device) for _ in range(4)]
        next_batch = lambda i: (pool[i % 4][:, :-1], pool[i % 4][:, 1:])  # noqa: E731

    def step(i):
        x, y = next_batch(i)
        with ctx:
            _, loss = step_model(x, y)
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step(i)
    loss.item()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
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
    if args.data_dir:
        loader.close()
    del step_model, model, optimizer
    return result


def bench_generate(args, config, device, dtype) -> list[dict]:
    from generate import benchmark_generation
    from model import GPT
    torch.manual_seed(0)
    model = GPT(config)  # random weights: speed does not depend on them
    results = []
    for bs in [int(b) for b in args.gen_batch_sizes.split(",") if b]:
        r = benchmark_generation(model, batch_size=bs, prompt_len=16, new_tokens=args.gen_tokens,
                                 device=device, dtype=dtype, reference_hf=args.hf_reference and bs == 1)
        results.append(dict(batch_size=bs, **r))
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    use_compile = device.type == "cuda" if args.compile == "auto" else args.compile == "true"
    preset = args.preset or ("gpt2" if device.type == "cuda" else "shakespeare-char-cpu")
    vocab_size = args.vocab_size or (65 if preset.startswith("shakespeare-char") else 50257)
    config = preset_config(preset, vocab_size=vocab_size, dropout=0.0, device=str(device),
                           dtype=str(dtype).removeprefix("torch."), compile=use_compile)
    if args.data_dir:
        from data import load_meta
        config.vocab_size = load_meta(args.data_dir)["vocab_size"]
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.block_size:
        config.block_size = args.block_size
    config.validate()
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    args.steps = args.steps if args.steps is not None else (30 if cuda else 10)
    args.gen_tokens = args.gen_tokens if args.gen_tokens is not None else (500 if cuda else 50)
    if args.warmup < 1 or args.steps < 1 or args.gen_tokens < 1:
        raise UserError("--warmup, --steps and --gen_tokens must be at least 1")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    report = dict(device=str(device), device_name=name, torch=torch.__version__, dtype=str(dtype),
                  compile=use_compile, preset=preset, batch_size=config.batch_size, block_size=config.block_size,
                  n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
                  data=args.data_dir or "random tokens", date=time.strftime("%Y-%m-%d"),
                  threads=torch.get_num_threads())
    print(f"device {name} ({device}), torch {torch.__version__}, {report['dtype']}, compile={use_compile}")
    print(f"model {preset}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
          f"vocab={config.vocab_size}; batch {config.batch_size} x {config.block_size} tokens; data: {report['data']}")

    if not args.no_train:
        print(f"training: {args.warmup} warm-up steps (compilation included), then {args.steps} timed ...", flush=True)
        r = bench_train(args, config, device, dtype, use_compile)
        report["train"] = r
        eff = (f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a (no known peak)")
        mem = f", peak memory {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
        print(f"  {r['tokens_per_sec']:,.0f} tokens/s | {r['ms_per_iter']:.1f} ms/iter | {eff} | "
              f"{r['achieved_tflops']:.2f} TFLOP/s achieved{mem} | warm-up {r['warmup_s']:.1f} s")
    if not args.no_generate:
        print(f"generation: prompt 16 tokens, {args.gen_tokens} new tokens, greedy ...", flush=True)
        report["generate"] = bench_generate(args, config, device, dtype)
        for g in report["generate"]:
            ref = (f" | transformers generate {g['hf_tokens_per_sec']:.1f} tokens/s "
                   f"(x{g['tokens_per_sec'] / g['hf_tokens_per_sec']:.2f})" if g.get("hf_tokens_per_sec") else "")
            print(f"  batch {g['batch_size']}: {g['tokens_per_sec']:,.1f} tokens/s{ref}")
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    run_cli(main)
