"""Tests for train.py: schedule, accumulation, exact resume, crashes and signals, TensorBoard, DDP, errors.

Everything runs on the CPU with tiny models (2 layers, 32 wide) and data sets built in tmp_path.
"""
import contextlib
import copy
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from config import MODEL_SHAPE_KEYS, ConfigError, GPT2Config, preset_config
from data import BatchLoader, DataError
from model import GPT
from tokenizer import CharTokenizer, load_tokenizer
from train import GracefulStop, TrainingError, estimate_loss, forward_backward, get_lr, main, parse_args, train
from utils import (CheckpointError, UserError, bytecode_note, load_checkpoint, model_from_checkpoint, run_cli,
                   save_checkpoint, save_checkpoint_as)

ROOT = Path(__file__).resolve().parent.parent
WORDS = "to be or not that is the question whether tis nobler in the mind to suffer slings and arrows".split()


def write_data(out: Path, tokenizer, text: str) -> Path:
    """A data directory as prepare_data.py writes it: train.bin / val.bin (uint16), tokenizer.json, meta.json."""
    out.mkdir(parents=True)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(out / "train.bin")
    ids[n:].tofile(out / "val.bin")
    tokenizer.save(out / "tokenizer.json")
    meta = {"tokenizer": type(tokenizer).kind, "tokenizer_file": "tokenizer.json", "vocab_size": tokenizer.vocab_size,
            "eot_token": tokenizer.eot_token, "dtype": "uint16", "train_tokens": n, "val_tokens": len(ids) - n}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small gain nothing from more threads, and threads waiting on each other on a busy
    # machine make every step many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(1500))
    return write_data(tmp_path_factory.mktemp("data") / "char", CharTokenizer.from_text(text), text)


def tiny(data_dir: Path, out: Path, **overrides) -> GPT2Config:
    """A 2-layer, 32-wide model on `data_dir`, writing into `out`."""
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.0,
                    learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, max_iters=10, lr_decay_iters=40,
                    eval_interval=5, eval_iters=2, log_interval=1, sample_tokens=0,
                    data_dir=str(data_dir), checkpoint_dir=str(out / "ckpt"), log_dir=str(out / "runs"),
                    device="cpu", compile=False)
    settings.update(overrides)
    return GPT2Config(**settings)


def cli_flags(config: GPT2Config) -> list[str]:
    return [f"--{k}={v}" for k, v in config.to_dict().items() if v != getattr(GPT2Config, k)]


def subprocess_env(tmp: Path | None = None) -> dict:
    # one thread per process: the tests run on small machines, and torchrun starts two; torchrun's own
    # temporary folders go into the test's folder (tmp), not /tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env if tmp is None else {**env, "TMPDIR": str(tmp)}


def event_steps(run_dir: str) -> tuple[dict, "EventAccumulator"]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


# ----------------------------------------------------------------------------- schedule and accumulation

def test_lr_schedule_boundaries():
    c = GPT2Config(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, c) == pytest.approx(1e-3 / 11)  # above 0 at the first step
    assert all(get_lr(i, c) < get_lr(i + 1, c) for i in range(10))  # linear warmup
    assert get_lr(10, c) == 1e-3  # the peak at the end of warmup
    assert get_lr(60, c) == pytest.approx(5.5e-4)  # halfway down the cosine: the mean of peak and floor
    assert all(get_lr(i, c) > get_lr(i + 1, c) for i in range(10, 110))
    assert get_lr(110, c) == pytest.approx(1e-4) and get_lr(10**6, c) == 1e-4  # then min_lr for good
    assert get_lr(0, GPT2Config(warmup_iters=0, learning_rate=3e-4)) == 3e-4
    assert get_lr(5000, GPT2Config(decay_lr=False, learning_rate=3e-4, warmup_iters=10)) == 3e-4
    assert get_lr(0, GPT2Config(decay_lr=False, learning_rate=3e-4, warmup_iters=10)) == pytest.approx(3e-4 / 11)
    with pytest.raises(UserError, match="lr_decay_iters"):
        GPT2Config(warmup_iters=100, lr_decay_iters=100).validate()


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
    a, b = GPT(config), GPT(config)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (8, 16))
    y = torch.randint(0, 50, (8, 16))
    loss_a = forward_backward(a, lambda m: (x[2 * m: 2 * m + 2], y[2 * m: 2 * m + 2]), 4)
    loss_b = forward_backward(b, lambda m: (x, y), 1)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-7, rtol=1e-5, msg=name)
    assert max(p.grad.abs().max() for p in a.parameters()) > 1e-3  # the gradients are not trivially zero


def test_compile_workers_start_for_compiled_cuda_runs_only_before_the_model_is_built(char_data, tmp_path,
                                                                                      monkeypatch):
    """torch.compile on a GPU starts its pool of Triton compile workers in the first step; train.py starts it
    before the data, the model and the optimizer are set up, so that their set-up hides the pool's."""
    import torch._inductor.async_compile as async_compile

    import train as train_module
    warmed = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: warmed.append(True), raising=False)
    for device, compiled in [("cpu", True), ("cpu", False), ("cuda", False), ("cuda", True)]:
        warmed.clear()
        train_module.start_compile_workers(torch.device(device), compiled)
        assert warmed == [True] * (device == "cuda" and compiled), (device, compiled)

    events, build_model = [], train_module.build_model
    monkeypatch.setattr(train_module, "start_compile_workers", lambda device, compiled: events.append("workers"))
    monkeypatch.setattr(train_module, "build_model", lambda *a: events.append("model") or build_model(*a))
    train(tiny(char_data, tmp_path, max_iters=1, eval_interval=1))
    assert events == ["workers", "model"]


# ----------------------------------------------------------------------------- exact resume, checkpoints, TensorBoard

@pytest.fixture(scope="module")
def resume_runs(char_data, tmp_path_factory):
    """40 iterations straight, and 20 + 20 with a resume, with dropout and text samples on."""
    kw = dict(dropout=0.1, sample_tokens=8, max_iters=40, eval_interval=10, save_interval=10, keep_last_n=2)
    straight_dir, split_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("split")
    straight = train(tiny(char_data, straight_dir, **kw))
    first = train(tiny(char_data, split_dir, **{**kw, "max_iters": 20}))
    second = train(tiny(char_data, split_dir, **kw))
    return straight_dir, split_dir, straight, first, second


def test_paths_on_the_command_line_expand_the_home_folder():
    config, explicit = parse_args(["--checkpoint_dir=~/ckpt", "--log_dir=~other/runs", "--data_dir=data/~x"])
    assert config.checkpoint_dir == os.path.join(os.path.expanduser("~"), "ckpt")
    assert config.log_dir == os.path.expanduser("~other/runs") and config.data_dir == "data/~x"


def test_a_config_file_saved_by_windows_notepad(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_bytes("\ufeff# 我的配置\r\nn_layer = 2\r\n".encode())  # a byte-order mark and \r\n, as Python allows
    config, explicit = parse_args([str(cfg)])
    assert config.n_layer == 2 and explicit == {"n_layer"}


def test_paths_in_a_config_file_expand_the_home_folder(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("checkpoint_dir = '~/ckpt'\nlog_dir = 'runs/~x'\n")
    config, _ = parse_args([str(cfg)])
    assert config.checkpoint_dir == os.path.join(os.path.expanduser("~"), "ckpt") and config.log_dir == "runs/~x"


def test_the_first_rate_leaves_out_the_first_step(char_data, tmp_path, monkeypatch, capsys):
    import train as train_module
    real, calls = train_module.forward_backward, []

    def slow_first(*args, **kwargs):  # as compilation makes the first step slow
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", slow_first)
    summary = train(tiny(char_data, tmp_path, max_iters=8, log_interval=4, eval_interval=8))
    rates = [float(m) for m in re.findall(r"^iter \d+/8: .*?, ([\d.]+) ms/iter", capsys.readouterr().out, re.M)]
    assert len(rates) == 2 and rates[0] < 250 and summary["timing"]["first_step"] >= 1.0


def test_a_fused_adamw_does_the_clipping_in_its_own_step(monkeypatch):
    """bfloat16 and float32 runs leave clipping's multiplication to the fused AdamW (its grad_scale), one read of
    the gradients fewer; the weights and norms are clip_grad_norm_'s, and later steps see no leftover scale."""
    from train import optimizer_step
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=65, block_size=16, dropout=0.0))
    reference = copy.deepcopy(model)
    opts = [m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu") for m in (model, reference)]
    assert opts[0].defaults["fused"]
    multiplied = []
    real_mul = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: multiplied.append(1) or real_mul(*a, **k))
    for step, grad_clip in enumerate((0.5, 0.5, 1e9, 0.0, 0.5)):  # clipped, not reached, off
        x = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(step))
        for m in (model, reference):
            m(x, x)[1].backward()
        norm = optimizer_step(list(model.parameters()), opts[0], scaler, grad_clip, measure_norm=True)
        params = list(reference.parameters())
        expected = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        opts[1].step()
        opts[1].zero_grad(set_to_none=True)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        assert "grad_scale" not in vars(opts[0])
    # by the logits: the keys' bias has a gradient of rounding noise, which AdamW turns into steps of its own size
    x = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=0, atol=1e-5)
    # clip_grad_norm_ multiplied the reference's gradients at every step (by 1 where not clipping), and the
    # fused run's only where it did not clip
    assert len(multiplied) == 5 + 1


def test_float16_without_clipping_steps_between_log_steps(monkeypatch):
    """float16's GradScaler unscales inside the fused AdamW's step where nothing unscaled before (no clipping, no
    norm to log): it multiplies its scale by the optimizer's grad_scale where one is left, which must not be."""
    from train import optimizer_step
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=65, block_size=16, dropout=0.0))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 65, (4, 16))
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x, x)[1]
        scaler.scale(loss).backward()
        norm = optimizer_step(list(model.parameters()), optimizer, scaler, grad_clip=0.0,
                              measure_norm=step == 1)  # a log step between steps that are not
        assert (norm is None) == (step != 1)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_optimizer_step_clips_the_gradient_norm():
    from train import optimizer_step
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5: scaled down to norm 1
    assert optimizer_step([model.p], opt, scaler, grad_clip=1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(model.p.detach(), torch.tensor([-0.6, -0.8, 0.0, 0.0]))
    assert model.p.grad is None
    model.p.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])  # norm 0.5: left as it is
    assert optimizer_step([model.p], opt, scaler, grad_clip=1.0).item() == pytest.approx(0.5)
    torch.testing.assert_close(model.p.detach(), torch.tensor([-0.9, -1.2, 0.0, 0.0]))
    model.p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # grad_clip=0: no clipping, no norm
    assert optimizer_step([model.p], opt, scaler, grad_clip=0.0) is None
    torch.testing.assert_close(model.p.detach(), torch.tensor([-3.9, -5.2, 0.0, 0.0]))


def test_estimate_loss_is_the_mean_loss_of_the_fixed_batches(char_data):
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.0)).eval()
    with BatchLoader(char_data, 16, 2) as loader:
        got = estimate_loss(model, loader, 3, torch.autocast("cpu", enabled=False))
        with torch.no_grad():
            for split, first in (("train", 2**62), ("val", 0)):  # train: batches that training never draws
                losses = [model(*loader.get_batch(split, first + i))[1].item() for i in range(3)]
                assert got[split] == pytest.approx(sum(losses) / 3, rel=1e-6)


def small_split(tmp_path: Path) -> tuple[Path, GPT, float]:
    """1,000 characters: 100 val tokens, whose 99 targets lie in 7 windows of 16 (4 sweep batches of 2), and 900
    train tokens (29 sweep batches); a 1-layer model, and its exact mean loss over the val targets, computed here
    window by window (the last window ends at the split's end and counts its 3 new targets)."""
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefgh \n") for _ in range(1000))
    data = write_data(tmp_path / "d", CharTokenizer.from_text(text), text)
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.0)).eval()
    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    losses = []
    with torch.no_grad():
        for start, new in [(s, 16) for s in range(0, 96, 16)] + [(83, 3)]:
            logits, _ = model(val[None, start:start + 16], val[None, start + 1:start + 17])
            losses += torch.nn.functional.cross_entropy(logits[0], val[start + 1:start + 17], reduction="none")[-new:]
    assert len(losses) == 99
    return data, model, torch.stack(losses).mean().item()


@pytest.mark.parametrize("per_pass", [1, 3])
@pytest.mark.parametrize("eval_iters", [4, 5])
def test_a_split_that_fits_in_eval_iters_batches_is_evaluated_whole(tmp_path, per_pass, eval_iters):
    """The val split's 4 sweep batches fit in eval_iters of 4 (exactly) or 5: its loss is the mean over every
    target once. The train split's 29 would not: it is evaluated on eval_iters fixed random batches."""
    data, model, exact = small_split(tmp_path)
    plain = torch.autocast("cpu", enabled=False)
    with BatchLoader(data, 16, 2) as loader, torch.no_grad():
        assert (loader.sweep_batches("val"), loader.sweep_batches("train")) == (4, 29)
        reports = []
        got = estimate_loss(model, loader, eval_iters, plain, per_pass=per_pass, progress=lambda *a: reports.append(a))
        assert reports[-1] == (eval_iters + 4, eval_iters + 4)
        train = [model(*loader.get_batch("train", 2**62 + i))[1].item() for i in range(eval_iters)]
    assert got["train"] == pytest.approx(sum(train) / eval_iters, rel=1e-5)
    assert got["val"] == pytest.approx(exact, rel=1e-5)


def test_a_swept_split_takes_only_its_own_rounds(tmp_path):
    """eval_iters=50: train swept in 29 batches, val in 4; a progress report and a stop request asked for each
    batch, no more (under DDP each ask is a collective)."""
    data, model, _ = small_split(tmp_path)
    reports, stops = [], []
    with BatchLoader(data, 16, 2) as loader:
        estimate_loss(model, loader, 50, torch.autocast("cpu", enabled=False), progress=lambda *a: reports.append(a),
                      should_stop=lambda: stops.append(1) and False)
    assert reports == [(i, 33) for i in range(1, 34)] and len(stops) == 33


@pytest.mark.parametrize("per_pass", [2, 3])
def test_an_evaluation_pass_can_take_several_batches(char_data, per_pass):
    """per_pass batches joined into one forward pass: the same mean (each batch has as many targets), fewer
    passes; 2 of 3 leaves a last pass of one batch."""
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.0)).eval()
    plain = torch.autocast("cpu", enabled=False)
    with BatchLoader(char_data, 16, 2) as loader:
        one = estimate_loss(model, loader, 3, plain)
        shapes, forward = [], model.forward
        model.forward = lambda x, y: shapes.append(tuple(x.shape)) or forward(x, y)
        asked = []
        joined = estimate_loss(model, loader, 3, plain, per_pass=per_pass, should_stop=lambda: asked.append(1))
    assert shapes == 2 * ([(6, 16)] if per_pass == 3 else [(4, 16), (2, 16)])
    assert len(asked) == len(shapes)  # a stop is asked for before each pass
    assert joined == pytest.approx(one, rel=1e-6)


def test_ranks_take_their_own_runs_of_batches_for_a_pass(char_data, monkeypatch):
    """5 batches, 2 ranks, 2 batches a pass: rank 1 takes batches 2 and 3, then nothing; progress counts every
    rank's batches. What the ranks add up is each one's loss summed over its targets, and their number."""
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.clone()))
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.0)).eval()
    with BatchLoader(char_data, 16, 2) as loader:
        drawn, reports, get_batch = [], [], loader.get_batch
        loader.get_batch = lambda split, index: drawn.append((split, index)) or get_batch(split, index)
        got = estimate_loss(model, loader, 5, torch.autocast("cpu", enabled=False), rank=1, world_size=2,
                            per_pass=2, progress=lambda *a: reports.append(a))
        assert drawn == [("train", 2**62 + 2), ("train", 2**62 + 3), ("val", 2), ("val", 3)]
        assert reports == [(4, 10), (5, 10), (9, 10), (10, 10)]
        with torch.no_grad():
            x, y = zip(get_batch("val", 2), get_batch("val", 3))
            mean = model(torch.cat(x), torch.cat(y))[1].item()
        torch.testing.assert_close(reduced[1], torch.tensor([mean * 2 * 32, 2 * 32]))  # 2 batches of 2 x 16
        assert got["val"] == pytest.approx(mean, rel=1e-6)  # its own sum over its own count, all_reduce being a no-op


def test_evaluation_passes_stay_under_their_size_and_join_only_eagerly_on_a_gpu():
    from train import eval_batches_per_pass
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")  # only compared, never used
    char = preset_config("shakespeare-char", vocab_size=65)
    assert eval_batches_per_pass(char, gpu, compile_model=True) == 5  # 64 x 256 x 1,536 in bfloat16: 5 in 256 MB
    assert eval_batches_per_pass(char, gpu, compile_model=True, dtype=torch.float32) == 2  # twice the bytes
    assert eval_batches_per_pass(preset_config("gpt2"), gpu, True) == 1  # 50,304-wide logits: past the limit
    assert eval_batches_per_pass(preset_config("gpt2", vocab_size=4096, batch_size=12), gpu, True) == 1
    # the loss in chunks: 12 x 1024 x 3,072 bfloat16 activations make 3 batches in 256 MB
    assert eval_batches_per_pass(preset_config("gpt2", loss_chunk_rows=4096, compile_eval=False), gpu, True) == 3
    # but a chunk larger than a batch would grow with the pass: one batch a pass, as with the whole logits
    assert eval_batches_per_pass(preset_config("gpt2", loss_chunk_rows=12289, compile_eval=False), gpu, True) == 1
    assert eval_batches_per_pass(preset_config("gpt2", loss_chunk_rows=12288, compile_eval=False), gpu, True) == 3
    assert eval_batches_per_pass(preset_config("shakespeare-char", vocab_size=65, eval_iters=3), gpu, True) == 3
    assert eval_batches_per_pass(preset_config("shakespeare-char", vocab_size=65, compile_eval=True), gpu, True) == 1
    assert eval_batches_per_pass(preset_config("shakespeare-char", vocab_size=65, compile_eval=True), gpu, False) == 5
    assert eval_batches_per_pass(char, cpu, compile_model=False) == 1
    assert eval_batches_per_pass(preset_config("shakespeare-char-cpu", vocab_size=65), cpu, False, torch.float32) == 1


def test_training_on_a_cpu_evaluates_one_batch_a_pass(char_data, tmp_path, monkeypatch):
    import train as train_module
    chosen = []

    class Stop(Exception):
        pass

    def first_evaluation(*args, per_pass=1, **kwargs):
        chosen.append(per_pass)
        raise Stop

    monkeypatch.setattr(train_module, "estimate_loss", first_evaluation)
    with pytest.raises(Stop):
        train(tiny(char_data, tmp_path))
    assert chosen == [1]


def test_the_lr_each_step_uses_follows_the_schedule(char_data, tmp_path, monkeypatch):
    """Both parameter groups (decayed matrices, undecayed biases and gains) take the schedule's lr, and
    every step clips at --grad_clip."""
    import train as train_module
    used, clips, real = [], set(), train_module.optimizer_step

    def spy(params, optimizer, scaler, grad_clip, **kwargs):
        used.append([group["lr"] for group in optimizer.param_groups])
        clips.add(grad_clip)
        return real(params, optimizer, scaler, grad_clip, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", spy)
    config = tiny(char_data, tmp_path, max_iters=12, warmup_iters=4, lr_decay_iters=10, grad_clip=0.25)
    train(config)
    assert [lr for step in used for lr in step] == pytest.approx([get_lr(i, config) for i in range(12) for _ in "ab"])
    assert len(used[0]) == 2 and clips == {0.25}


def test_accumulated_micro_batches_are_each_drawn_once(char_data, tmp_path, monkeypatch):
    """Step i of A micro-batches draws training batches A*i .. A*i + A - 1: none twice, none skipped."""
    drawn, get_batch = [], BatchLoader.get_batch
    monkeypatch.setattr(BatchLoader, "get_batch", lambda self, split, index=None: (
        drawn.append(index) if split == "train" and index < 2**62 else None) or get_batch(self, split, index))
    train(tiny(char_data, tmp_path, max_iters=3, gradient_accumulation_steps=3, eval_interval=3))
    assert drawn == list(range(9))


def test_only_a_lower_val_loss_replaces_best_checkpoint_also_after_a_resume(char_data, tmp_path, monkeypatch,
                                                                           capsys):
    import train as train_module
    vals = iter([3.0, 2.0, 2.5, 2.01, 2.6, 2.1, 1.9])  # evaluations at 0, 5, ..., 20; then 25, 30 after the resume
    monkeypatch.setattr(train_module, "estimate_loss", lambda *a, **k: {"train": 1.0, "val": next(vals)})
    best = tmp_path / "ckpt" / "best_checkpoint.pt"
    assert train(tiny(char_data, tmp_path, max_iters=20))["best_val_loss"] == 2.0
    assert load_checkpoint(best)["iter_num"] == 5
    summary = train(tiny(char_data, tmp_path, max_iters=30))
    assert "at iteration 20 (best val loss 2.0000)" in capsys.readouterr().out
    assert summary["best_val_loss"] == 1.9 and load_checkpoint(best)["iter_num"] == 30
    assert load_checkpoint(best)["best_val_loss"] == 1.9


def test_a_non_finite_val_loss_stops_training(char_data, tmp_path, monkeypatch):
    import train as train_module
    vals = iter([3.0, float("nan")])
    monkeypatch.setattr(train_module, "estimate_loss", lambda *a, **k: {"train": 1.0, "val": next(vals)})
    with pytest.raises(TrainingError, match="NaN or infinite by iteration 5"):
        train(tiny(char_data, tmp_path, max_iters=10))
    assert not (tmp_path / "ckpt" / "checkpoint.pt").exists()


def test_a_rank_evaluates_its_share_of_batches_when_they_do_not_divide(char_data, monkeypatch):
    """3 batches over 2 ranks: rank 1 takes batch 1 only; the sums over ranks divide the loss by the targets."""
    other = torch.tensor([100.0, 64.0])  # what rank 0 adds: a loss summed over its 64 targets, and their number
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: tensor.add_(other))
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.0)).eval()
    with BatchLoader(char_data, 16, 2) as loader:
        drawn, get_batch = [], loader.get_batch
        loader.get_batch = lambda split, index: drawn.append((split, index)) or get_batch(split, index)
        got = estimate_loss(model, loader, 3, torch.autocast("cpu", enabled=False), rank=1, world_size=2)
        assert drawn == [("train", 2**62 + 1), ("val", 1)]
        with torch.no_grad():
            for split, first in (("train", 2**62), ("val", 0)):
                mine = model(*get_batch(split, first + 1))[1].item() * 32  # 2 x 16 targets
                assert got[split] == pytest.approx((mine + 100) / (32 + 64), rel=1e-6)


def test_tokens_per_step_counts_every_micro_batch(char_data, tmp_path, capsys):
    train(tiny(char_data, tmp_path, max_iters=2, gradient_accumulation_steps=4))
    assert "tokens per step: 256 = 4 micro-batches x 4 sequences x 16 tokens" in capsys.readouterr().out


def test_a_fine_tune_that_never_beats_its_start_still_writes_best_checkpoint(char_data, tmp_path):
    """The first evaluation after training is the first candidate: the loss before training is no
    checkpoint's, so it does not count as a best to beat."""
    summary = train(tiny(char_data, tmp_path, learning_rate=1e-30, min_lr=1e-31, max_iters=10, eval_interval=5))
    assert summary["evals"][5]["val"] >= summary["evals"][0]["val"] - 1e-6  # nothing was learned
    best = load_checkpoint(tmp_path / "ckpt" / "best_checkpoint.pt")
    assert best["iter_num"] in (5, 10) and best["best_val_loss"] == summary["best_val_loss"]


def test_estimate_loss_reports_progress_and_can_be_stopped(char_data):
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.0))
    with BatchLoader(char_data, 16, 2) as loader:
        reports = []
        plain = torch.autocast("cpu", enabled=False)
        full = estimate_loss(model, loader, 3, plain, progress=lambda *a: reports.append(a))
        assert reports == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)] and set(full) == {"train", "val"}
        asked = []
        assert estimate_loss(model, loader, 3, plain, should_stop=lambda: asked.append(1) or len(asked) == 4) is None
        assert len(asked) == 4 and model.training  # stopped before the first val batch, train mode restored


def signal_at_batch(monkeypatch, split: str, index: int, iteration_of, when: int):
    """SIGTERM to this process as the evaluation at iteration `when` draws its batch `index` of `split`."""
    from train import EVAL_BATCHES
    real = BatchLoader.get_batch

    def get_batch(self, s, k):
        if s == split and k == EVAL_BATCHES[split] + index and iteration_of() == when:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, s, k)

    monkeypatch.setattr(BatchLoader, "get_batch", get_batch)


def test_a_signal_during_the_first_evaluation_stops_at_once(char_data, tmp_path, monkeypatch, capsys):
    signal_at_batch(monkeypatch, "train", 0, lambda: 0, 0)
    (tmp_path / "runs").mkdir()  # was there before: stays
    monkeypatch.chdir(tmp_path)  # relative folders, as on a command line
    summary = train(tiny(char_data, tmp_path, eval_iters=50, checkpoint_dir="new/ckpt", log_dir="runs"))
    assert summary["stopped_by"] == signal.SIGTERM and summary["evals"] == {} and summary["iter_num"] == 0
    captured = capsys.readouterr()
    assert "stopped during the first evaluation: nothing was trained yet" in captured.out
    assert "SIGTERM received: finishing this step (or evaluation batch), then stopping: nothing is trained yet" \
        in captured.err
    # nothing is left behind: no checkpoint folder, no TensorBoard run of hyperparameters alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not list((tmp_path / "runs").iterdir())


def test_a_signal_after_the_first_evaluations_last_batch_stops_too(char_data, tmp_path, monkeypatch, capsys):
    """The message said nothing would be saved: a signal while the sample is written, or during the last
    batch, also stops before the first step."""
    signal_at_batch(monkeypatch, "val", 3, lambda: 0, 0)
    summary = train(tiny(char_data, tmp_path, eval_iters=4, checkpoint_dir=str(tmp_path / "new" / "ckpt")))
    assert summary["stopped_by"] == signal.SIGTERM and summary["iter_num"] == 0 and summary["evals"] == {}
    assert "stopped during the first evaluation" in capsys.readouterr().out and not (tmp_path / "new").exists()


def test_a_new_run_stopped_before_training_puts_the_old_checkpoints_back(char_data, tmp_path, monkeypatch, capsys):
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    signal_at_batch(monkeypatch, "train", 0, lambda: 0, 0)
    capsys.readouterr()
    summary = train(tiny(char_data, tmp_path, max_iters=4, eval_iters=50, init_from="scratch"))
    assert summary["iter_num"] == 0 and summary["stopped_by"] == signal.SIGTERM
    assert f"the previous checkpoints are back in {tmp_path / 'ckpt'}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before  # no previous-* folder


def test_an_abort_during_the_first_evaluation_leaves_no_trace_either(char_data, tmp_path, monkeypatch):
    """A second Ctrl-C raises KeyboardInterrupt out of the first evaluation: the checkpoints moved aside
    come back and the new TensorBoard run goes."""
    import train as train_module
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    runs_before = sorted((tmp_path / "runs").iterdir())
    monkeypatch.setattr(train_module, "estimate_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(char_data, tmp_path, max_iters=4, init_from="scratch"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted((tmp_path / "runs").iterdir()) == runs_before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_ctrl_c_during_a_new_runs_setup_leaves_no_trace(char_data, tmp_path, monkeypatch, capsys, sig):
    """Before the training's signal handler is in place Ctrl-C raises KeyboardInterrupt, and SIGTERM and SIGHUP
    SystemExit(143, 129): after the checkpoints were moved aside and the TensorBoard run was made, say while
    the hyperparameters are written."""
    import train as train_module
    if not hasattr(signal, sig):
        pytest.skip(f"no {sig} here")
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    runs_before = sorted((tmp_path / "runs").iterdir())
    signum = getattr(signal, sig)

    def signal_now(*args, **kwargs):
        os.kill(os.getpid(), signum)
        for _ in range(100):  # the handler runs between two bytecodes
            pass
    def as_by_default(*args):  # what the signal's own default would do, without ending the tests with it
        raise AssertionError(f"{sig} reached the handler the run started with: the process would have ended")
    monkeypatch.setattr(train_module.Logger, "hparams", signal_now)
    previous = signal.signal(signum, as_by_default) if sig != "SIGINT" else None
    capsys.readouterr()
    try:
        with pytest.raises(KeyboardInterrupt if sig == "SIGINT" else SystemExit) as e:
            train(tiny(char_data, tmp_path, max_iters=4, init_from="scratch"))
        assert sig == "SIGINT" or (e.value.code == 128 + signum and signal.getsignal(signum) is as_by_default)
    finally:
        if previous is not None:
            signal.signal(signum, previous)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted((tmp_path / "runs").iterdir()) == runs_before
    out = capsys.readouterr().out
    assert "were moved to" in out and f"the previous checkpoints are back in {tmp_path / 'ckpt'}" in out


def test_the_undo_of_a_new_run_finishes_when_closing_its_log_fails(char_data, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C (or any error) while the TensorBoard file is closed: the checkpoints still come back,
    and the message saying so comes only after they did."""
    import train as train_module
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    runs_before = sorted((tmp_path / "runs").iterdir())
    monkeypatch.setattr(train_module.Logger, "hparams", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(train_module.Logger, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        train(tiny(char_data, tmp_path, max_iters=4, init_from="scratch"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted((tmp_path / "runs").iterdir()) == runs_before
    assert "are back in" not in capsys.readouterr().out  # the close was cut short: nothing more is said


def test_a_log_folder_that_cannot_be_written_stops_the_run_and_leaves_nothing(char_data, tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tb, "SummaryWriter", disk_full)
    with pytest.raises(ConfigError, match=r"cannot write TensorBoard logs into .*runs.*: No space left on device"):
        train(tiny(char_data, tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # pytest's catch of a traceback
@pytest.mark.parametrize("writes_that_work", [0, 40])
def test_a_full_disk_under_tensorboard_is_one_line(char_data, tmp_path, monkeypatch, capsys, writes_that_work):
    """The event file cannot be written from the start: a one-line error, and no empty event file left. It fills
    up during the run: one warning, and the training goes on (no traceback from TensorBoard's thread either)."""
    from tensorboard.compat.tensorflow_stub.io import gfile
    real, calls = gfile.LocalFileSystem._write, []

    def write(self, filename, content, mode):  # every write of the event file opens it anew
        calls.append(1)
        if len(calls) > writes_that_work:
            open(filename, mode).close()  # the file is made, but its bytes do not fit
            raise OSError(28, "No space left on device")
        real(self, filename, content, mode)
    if writes_that_work == 0:
        train(tiny(char_data, tmp_path, max_iters=4))  # a run to resume: its folder holds an event file already
        monkeypatch.setattr(gfile.LocalFileSystem, "_write", write)
        run_dir = Path(next((tmp_path / "runs").iterdir()))
        events = sorted(run_dir.iterdir())
        with pytest.raises(ConfigError, match=rf"^cannot write TensorBoard logs into {re.escape(str(run_dir))}: No "
                                              rf"space left on device$"):
            train(tiny(char_data, tmp_path, max_iters=8))
        assert sorted(run_dir.iterdir()) == events  # no empty event file
    else:
        monkeypatch.setattr(gfile.LocalFileSystem, "_write", write)
        summary = train(tiny(char_data, tmp_path, max_iters=30))
        assert summary["iter_num"] == 30 and len(calls) > writes_that_work
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err
    warnings = [line for line in err.splitlines() if "TensorBoard logs can no longer be written" in line]
    assert len(warnings) == (writes_that_work > 0)


def at_step(monkeypatch, n: int, action, name: str = "optimizer_step") -> None:
    """action() runs at train.<name>'s n-th call, before the call itself."""
    import train as train_module
    calls, real = [], getattr(train_module, name)

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, name, step)


def fail_at_step(monkeypatch, n: int, error: BaseException, name: str = "optimizer_step") -> None:
    """train.<name> raises `error` at its n-th call (a crash, or running out of memory, at that step)."""
    def fail():
        raise error
    at_step(monkeypatch, n, fail, name)


def prepared_again(path: Path) -> None:
    """path's modification time a second later, as prepare_data.py writing the same data again leaves it."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def sigterm_at_step(monkeypatch, n: int) -> None:
    """SIGTERM to this process at the n-th optimizer step, which still runs: the run stops after it."""
    at_step(monkeypatch, n, lambda: os.kill(os.getpid(), signal.SIGTERM))


@pytest.mark.parametrize("failing_step, trace_left", [(1, False), (2, True)])
def test_a_new_run_whose_first_step_fails_leaves_no_trace(char_data, tmp_path, monkeypatch, capsys, failing_step,
                                                          trace_left):
    """Out of memory or a compile error in the first step: nothing was trained, so the checkpoints moved
    aside come back and the new TensorBoard run goes. A failure later keeps the run's record."""
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    runs_before = sorted((tmp_path / "runs").iterdir())
    fail_at_step(monkeypatch, failing_step, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                 "forward_backward")
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny(char_data, tmp_path, max_iters=4, init_from="scratch"))
    assert ("the previous checkpoints are back in" in capsys.readouterr().out) != trace_left
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    assert (after == before) != trace_left
    assert bool(list((tmp_path / "ckpt").glob("previous-*"))) == trace_left
    assert (sorted((tmp_path / "runs").iterdir()) == runs_before) != trace_left


def test_a_signal_during_a_later_evaluation_saves_and_resumes(char_data, tmp_path, monkeypatch):
    straight = train(tiny(char_data, tmp_path / "straight", max_iters=10, eval_interval=5, eval_iters=20))
    steps = []
    monkeypatch.setattr("train.optimizer_step",
                        lambda *a, _real=__import__("train").optimizer_step, **k: steps.append(1) or _real(*a, **k))
    signal_at_batch(monkeypatch, "val", 3, lambda: len(steps), 5)
    stopped = train(tiny(char_data, tmp_path / "split", max_iters=10, eval_interval=5, eval_iters=20))
    assert stopped["stopped_by"] == signal.SIGTERM and stopped["iter_num"] == 5 and 5 not in stopped["evals"]
    assert load_checkpoint(tmp_path / "split" / "ckpt" / "checkpoint.pt")["iter_num"] == 5
    monkeypatch.undo()
    resumed = train(tiny(char_data, tmp_path / "split", max_iters=10, eval_interval=5, eval_iters=20))
    assert resumed["resumed_from"] == 5
    assert {**stopped["losses"], **resumed["losses"]} == straight["losses"]
    assert {**stopped["evals"], **resumed["evals"]} == straight["evals"]  # the cut evaluation is made up


def test_a_signal_during_the_text_sample_abandons_it(char_data, tmp_path, monkeypatch):
    """The TensorBoard sample after an evaluation is hundreds of tokens, seconds on a CPU: a Ctrl-C no longer
    waits for it. The sample is left out, the state after the evaluation is saved, and the resumed run's
    losses are those of a run never stopped."""
    import generate
    kw = dict(max_iters=10, eval_interval=5, sample_tokens=40)
    straight = train(tiny(char_data, tmp_path / "straight", **kw))
    steps, real_step = [], generate.Generator._step

    def step(self, tok):  # the sample at 0 takes 39 steps; the signal comes at the 10th of the one at 5
        steps.append(1)
        if len(steps) == 39 + 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, tok)
    monkeypatch.setattr(generate.Generator, "_step", step)
    stopped = train(tiny(char_data, tmp_path / "split", **kw))
    assert stopped["stopped_by"] == signal.SIGTERM and stopped["iter_num"] == 5 and len(steps) == 49
    assert stopped["evals"] == {k: straight["evals"][k] for k in (0, 5)}
    _, acc = event_steps(stopped["run_dir"])
    assert [e.step for e in acc.Tensors("sample/text_summary")] == [0]
    monkeypatch.undo()
    resumed = train(tiny(char_data, tmp_path / "split", **kw))
    assert resumed["resumed_from"] == 5 and {**stopped["losses"], **resumed["losses"]} == straight["losses"]


def test_a_run_stopped_between_evaluations_and_finished_there_evaluates_that_iteration(char_data, tmp_path,
                                                                                      monkeypatch):
    """Stopped at iteration 6 of 20 (evaluations every 100), then given --max_iters=6: the run ends at 6 as one
    that was never stopped does, with the evaluation at its last iteration and best_checkpoint.pt."""
    straight = train(tiny(char_data, tmp_path / "straight", max_iters=6, eval_interval=100))
    sigterm_at_step(monkeypatch, 6)
    stopped = train(tiny(char_data, tmp_path / "split", max_iters=20, eval_interval=100))
    assert stopped["stopped_by"] == signal.SIGTERM and stopped["iter_num"] == 6 and list(stopped["evals"]) == [0]
    monkeypatch.undo()
    finished = train(tiny(char_data, tmp_path / "split", max_iters=6, eval_interval=100))
    assert finished["resumed_from"] == 6 and finished["evals"] == {6: straight["evals"][6]}
    for name in ("best_checkpoint.pt", "final_checkpoint.pt"):
        assert load_checkpoint(tmp_path / "split" / "ckpt" / name)["iter_num"] == 6
    again = train(tiny(char_data, tmp_path / "split", max_iters=6, eval_interval=100))
    assert again["evals"] == {}  # done: nothing owed any more


def test_a_warmup_as_long_as_the_run_is_warned_of(char_data, tmp_path, capsys):
    train(tiny(char_data, tmp_path / "a", warmup_iters=20, max_iters=4, eval_interval=4))
    out = capsys.readouterr().out
    assert ("warning: warmup_iters=20 is not below max_iters=4: the run ends while the learning rate still warms up, "
            "at 1.90e-03 (19% of learning_rate); give fewer, e.g. --warmup_iters=1\n") in out  # 4 / 21 of it
    train(tiny(char_data, tmp_path / "b", warmup_iters=3, max_iters=4, eval_interval=4))
    assert "warning: warmup_iters" not in capsys.readouterr().out
    train(tiny(char_data, tmp_path / "c", warmup_iters=1, max_iters=1, eval_interval=1))
    assert "e.g. --warmup_iters=0\n" in capsys.readouterr().out  # a value that does not warn again


def test_a_decay_left_at_its_default_far_beyond_the_run_is_warned_of(char_data, tmp_path, capsys):
    """--max_iters=5000 alone keeps config.py's 100,000 steps of decay: the learning rate hardly falls."""
    train(tiny(char_data, tmp_path / "a", lr_decay_iters=GPT2Config.lr_decay_iters, max_iters=4, eval_interval=4))
    assert ("warning: lr_decay_iters=100000 is above max_iters=4: the run ends with the learning rate at "
            "1.00e-02 (100.0% of learning_rate), before its cosine decay to min_lr; give --lr_decay_iters=4\n"
            ) in capsys.readouterr().out
    # shakespeare-char-cpu's 2000 under a shorter --max_iters: the preset counts as setting it (explicit), yet it
    # is the same trap
    train(tiny(char_data, tmp_path / "preset", lr_decay_iters=2000, max_iters=4, eval_interval=4))
    assert "warning: lr_decay_iters=2000 is above max_iters=4: " in capsys.readouterr().out
    # said as the run starts: a resumed one's lr_decay_iters may have been given to the command that began it
    train(tiny(char_data, tmp_path / "a", lr_decay_iters=GPT2Config.lr_decay_iters, max_iters=6, eval_interval=4))
    assert "warning: lr_decay_iters" not in capsys.readouterr().out
    for given in (dict(lr_decay_iters=40), dict(lr_decay_iters=GPT2Config.lr_decay_iters, decay_lr=False)):
        train(tiny(char_data, tmp_path / str(len(given)), max_iters=4, eval_interval=4, **given))
        assert "warning: lr_decay_iters" not in capsys.readouterr().out  # given, or no decay to miss


def test_a_python_that_writes_no_byte_code_for_a_torch_without_any_is_told_how_to_keep_it(char_data, tmp_path,
                                                                                            monkeypatch, capsys):
    """PYTHONDONTWRITEBYTECODE with no byte code installed: every start compiles torch from source again. The note
    names both ways out; byte code where PYTHONPYCACHEPREFIX points, or Python free to write it, gives none."""
    import importlib.util
    import py_compile
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pyc"))  # empty: torch has no byte code there
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    train(tiny(char_data, tmp_path / "a", max_iters=1, eval_interval=1))
    out = capsys.readouterr().out
    site = shlex.quote(str(Path(torch.__file__).parents[1]))
    assert (f"note: Python writes no byte code here (PYTHONDONTWRITEBYTECODE or -B) and finds none for torch, so each "
            f"start compiles torch's modules from source again (15-21 s a run on the GPU machines measured); unset "
            f"PYTHONDONTWRITEBYTECODE, or write the byte code once: {shlex.quote(sys.executable)} -m compileall -qq "
            f"-j 0 {site}\n") in out
    assert out.index("device: ") < out.index("note: Python writes no byte code")
    with monkeypatch.context() as m:  # a torch shipped as byte code alone, its sources removed: nothing to compile
        m.setattr(torch, "__file__", str(tmp_path / "slim" / "torch" / "__init__.pyc"))
        assert bytecode_note() is None
    py_compile.compile(torch.__file__, cfile=importlib.util.cache_from_source(torch.__file__), doraise=True)
    train(tiny(char_data, tmp_path / "b", max_iters=1, eval_interval=1))
    assert "byte code" not in capsys.readouterr().out
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "other"))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    train(tiny(char_data, tmp_path / "c", max_iters=1, eval_interval=1))
    assert "byte code" not in capsys.readouterr().out


def test_after_a_crash_between_evaluations_the_newest_kept_copy_is_resumed(char_data, tmp_path, monkeypatch, capsys):
    """--save_interval's copies are whole checkpoints: a crash at step 13, with evaluations every 100 and copies
    every 5, resumes from checkpoint_iter_10.pt and goes on exactly, where it used to start over. With a
    checkpoint.pt older than the copy (evaluations every 8) the copy is taken too."""
    settings = dict(max_iters=20, eval_interval=100, save_interval=5, log_interval=1)
    straight = train(tiny(char_data, tmp_path / "straight", **settings))
    for eval_interval in (100, 8):
        fail_at_step(monkeypatch, 13, RuntimeError("the machine went down"))
        out = tmp_path / f"crashed_{eval_interval}"
        with pytest.raises(RuntimeError, match="went down"):
            train(tiny(char_data, out, **{**settings, "eval_interval": eval_interval}))
        assert (out / "ckpt" / "checkpoint.pt").exists() == (eval_interval == 8)
        monkeypatch.undo()
        capsys.readouterr()
        resumed = train(tiny(char_data, out, **{**settings, "eval_interval": eval_interval}))
        assert resumed["resumed_from"] == 10, eval_interval
        # no evaluation after a step before the crash (every 100): no best val loss to give, where "inf" would
        # read as a loss that blew up
        best = (r"no val loss measured since training began" if eval_interval == 100
                else r"best val loss \d+\.\d{4}")
        line = re.escape(f"resuming from {out / 'ckpt' / 'checkpoint_iter_10.pt'} at iteration 10")
        assert re.search(rf"^{line} \({best}\)$", capsys.readouterr().out, re.M)
        assert {i: v for i, v in resumed["losses"].items()} == {i: straight["losses"][i] for i in range(11, 21)}


def test_a_copy_lost_to_a_kill_after_its_evaluation_is_written_on_resume(char_data, tmp_path, monkeypatch):
    """kill -9 after the evaluation at 5 wrote checkpoint.pt and before checkpoint_iter_5.pt: the resumed run,
    which starts from that state, writes the copy an unbroken run has."""
    kw = dict(max_iters=10, eval_interval=5, save_interval=5)
    train(tiny(char_data, tmp_path / "straight", **kw))
    fail_at_step(monkeypatch, 6, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny(char_data, tmp_path / "split", **kw))
    monkeypatch.undo()
    (tmp_path / "split" / "ckpt" / "checkpoint_iter_5.pt").unlink()  # the copy the kill came before
    resumed = train(tiny(char_data, tmp_path / "split", **kw))
    assert resumed["resumed_from"] == 5
    a, b = (load_checkpoint(d / "ckpt" / "checkpoint_iter_5.pt") for d in (tmp_path / "straight", tmp_path / "split"))
    assert a["iter_num"] == b["iter_num"] == 5 and b["best_val_loss"] == a["best_val_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items())


def test_the_copy_kept_at_a_cut_evaluation_is_made_good_with_it(char_data, tmp_path, monkeypatch):
    """save_interval keeps checkpoint_iter_5.pt, written when the evaluation at 5 was cut short: the
    resumed run makes up that evaluation, and the kept copy then says what an unbroken run's says."""
    kw = dict(max_iters=10, eval_interval=5, eval_iters=20, save_interval=5)
    train(tiny(char_data, tmp_path / "straight", **kw))
    steps = []
    monkeypatch.setattr("train.optimizer_step",
                        lambda *a, _real=__import__("train").optimizer_step, **k: steps.append(1) or _real(*a, **k))
    signal_at_batch(monkeypatch, "val", 3, lambda: len(steps), 5)
    train(tiny(char_data, tmp_path / "split", **kw))
    kept = tmp_path / "split" / "ckpt" / "checkpoint_iter_5.pt"
    assert load_checkpoint(kept)["progress"]["eval_owed"]
    monkeypatch.undo()
    train(tiny(char_data, tmp_path / "split", **kw))
    a, b = (load_checkpoint(d / "ckpt" / "checkpoint_iter_5.pt") for d in (tmp_path / "straight", tmp_path / "split"))
    assert not b["progress"]["eval_owed"] and b["best_val_loss"] == a["best_val_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_signal_during_the_last_evaluation_leaves_it_owed(char_data, tmp_path, monkeypatch):
    kw = dict(max_iters=10, eval_interval=5, eval_iters=20, learning_rate=3e-2)
    straight = train(tiny(char_data, tmp_path / "straight", **kw))
    steps = []
    monkeypatch.setattr("train.optimizer_step",
                        lambda *a, _real=__import__("train").optimizer_step, **k: steps.append(1) or _real(*a, **k))
    signal_at_batch(monkeypatch, "val", 3, lambda: len(steps), 10)
    stopped = train(tiny(char_data, tmp_path / "split", **kw))
    ckpt_dir = tmp_path / "split" / "ckpt"
    assert stopped["stopped_by"] == signal.SIGTERM and stopped["iter_num"] == 10 and 10 not in stopped["evals"]
    assert not (ckpt_dir / "final_checkpoint.pt").exists()
    monkeypatch.undo()
    resumed = train(tiny(char_data, tmp_path / "split", **kw))
    assert resumed["resumed_from"] == 10 and resumed["evals"] == {10: straight["evals"][10]}
    assert resumed["stopped_by"] is None and (ckpt_dir / "final_checkpoint.pt").exists()
    best = load_checkpoint(ckpt_dir / "best_checkpoint.pt")
    assert best["best_val_loss"] == straight["best_val_loss"]
    assert not load_checkpoint(ckpt_dir / "checkpoint.pt")["progress"]["eval_owed"]
    assert train(tiny(char_data, tmp_path / "split", **kw))["evals"] == {}  # nothing owed any more


def test_compile_gets_the_compile_mode(char_data, tmp_path, monkeypatch):
    modes = []

    def fake_compile(model, mode=None, **kwargs):  # records the call; the model runs uncompiled
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    train(tiny(char_data, tmp_path, compile=True, compile_mode="reduce-overhead", max_iters=2))
    assert modes == ["reduce-overhead"]


@pytest.mark.parametrize("compile_eval", [True, False])
def test_compile_eval_picks_the_model_evaluations_run(char_data, tmp_path, monkeypatch, compile_eval):
    calls = []

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper and counts its forward passes
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            calls.append(self.model.training)
            return self.model(*args)

    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kwargs: Compiled(model))
    train(tiny(char_data, tmp_path, compile=True, compile_eval=compile_eval, max_iters=4, eval_interval=2,
               eval_iters=3))
    evaluations = 3 * 2 * 3  # at 0, 2 and 4, eval_iters batches of each split
    assert calls.count(True) == 4 and calls.count(False) == (evaluations if compile_eval else 0)


@pytest.mark.parametrize("compile_eval", [True, False])
def test_compile_regional_compiles_the_regions_and_evaluates_eagerly_when_asked(char_data, tmp_path, monkeypatch,
                                                                                compile_eval):
    compiled, calls, stance = [], [], []

    def fake_compile(fn, mode=None, **kwargs):  # records the call; the region runs as it is
        compiled.append((type(fn).__name__, mode))

        def region(*args):
            calls.append((torch.is_grad_enabled(), bool(stance)))
            return fn(*args)
        return region

    class FakeStance:  # torch.compiler.set_stance("force_eager") as a flag the regions can see
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            stance.append(self.name)

        def __exit__(self, *exc):
            stance.pop()

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "set_stance", FakeStance)
    r = train(tiny(char_data, tmp_path, compile=True, compile_regional=True, compile_mode="max-autotune-no-cudagraphs",
                   compile_eval=compile_eval, max_iters=4, eval_interval=2, eval_iters=3))
    assert r["best_val_loss"] < float("inf")
    assert compiled == [("method", "max-autotune-no-cudagraphs"), ("Block", "max-autotune-no-cudagraphs"),
                        ("Block", "max-autotune-no-cudagraphs"), ("method", "max-autotune-no-cudagraphs")]
    per_pass = 4  # embedding, the tiny model's 2 blocks, head
    evaluations = 3 * 2 * 3  # at 0, 2 and 4, eval_iters batches of each split
    assert calls.count((True, False)) == 4 * per_pass  # training steps, compiled
    assert calls.count((False, not compile_eval)) == evaluations * per_pass
    assert len(calls) == (4 + evaluations) * per_pass


def test_compile_regional_without_compilation_says_it_does_nothing(char_data, tmp_path, capsys):
    train(tiny(char_data, tmp_path, compile=False, compile_regional=True, max_iters=1))
    assert "compile False, so compile_regional does nothing" in capsys.readouterr().out
    train(tiny(char_data, tmp_path / "b", compile=False, max_iters=1))
    out = capsys.readouterr().out
    assert "does nothing" not in out
    assert "compile False, attention flash, data" in out  # the attention kernel torch picks, here the CPU's


@pytest.mark.parametrize("regional", [False, True])
def test_training_stays_compiled_when_evaluations_are_not(char_data, tmp_path, monkeypatch, regional):
    """compile_eval=False evaluates under torch.compiler.set_stance("force_eager"), which takes effect as
    soon as it is made: training must stay compiled, a resumed run's steps before its first evaluation too."""
    calls = []

    def counting_backend(gm, example_inputs):  # runs the traced graph as it is, counting its calls
        def run(*args):
            calls.append(torch.is_grad_enabled())
            return gm.forward(*args)
        return run

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kwargs: real_compile(fn, backend=counting_backend))
    torch._dynamo.reset()
    kw = dict(compile=True, compile_regional=regional, compile_eval=False, eval_interval=4, eval_iters=2,
              max_iters=4, lr_decay_iters=8)
    train(tiny(char_data, tmp_path, **kw))
    per_pass = 4 if regional else 1  # embedding, the tiny model's 2 blocks and head, or the whole model
    assert calls == [True] * 4 * per_pass  # every training step compiled, no evaluation
    # the compiled wrapper's names (_orig_mod.) stay out of the checkpoint: it loads into a plain model
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["model"]
    assert set(saved) == set(GPT(tiny(char_data, tmp_path)).state_dict())
    calls.clear()
    r = train(tiny(char_data, tmp_path, **{**kw, "max_iters": 8}))  # steps 5 to 8 come before its evaluation
    assert r["resumed_from"] == 4 and calls == [True] * 4 * per_pass


def test_a_damaged_data_set_stops_the_run_before_anything_is_written(char_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    ids = np.memmap(data / "val.bin", dtype=np.uint16, mode="r+")
    ids[-1] = 300  # far beyond the data set's vocabulary (20 characters); in no batch before the last
    ids.flush()
    with pytest.raises(DataError, match=r"val.bin holds token id 300 at token [\d,]+ \(the first id of 20 or more\)"):
        train(tiny(data, tmp_path))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


def test_training_and_evaluation_leave_the_id_check_to_the_loader(char_data, tmp_path, monkeypatch):
    """The model's id check waits for the GPU at every forward pass; the loader has checked the batches."""
    from model import GPT
    checks, check = [], GPT._check_input
    monkeypatch.setattr(GPT, "_check_input",
                        lambda self, idx, ids=True, **kw: checks.append(ids) or check(self, idx, ids, **kw))
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, eval_iters=2, sample_tokens=4))
    assert len(checks) > 4 + 3 * 2 * 2  # training steps, evaluations, and the samples' decoding steps
    samples = checks.count(True)  # sampling's prompts come from the tokenizer, not the loader: still checked
    assert checks.count(False) == 4 + 3 * 2 * 2 and 0 < samples


def test_torchrun_refuses_a_device_with_an_index(monkeypatch):
    # under torchrun each process takes cuda:LOCAL_RANK; --device=cuda:1 used to be dropped without a word
    from train import resolve_system
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES") as e:
        resolve_system(GPT2Config(device="cuda:1"), local_rank=1)
    assert "\n" not in str(e.value)
    assert resolve_system(GPT2Config(device="cuda"), local_rank=1)[:2] == (torch.device("cuda", 1), torch.bfloat16)
    assert resolve_system(GPT2Config(device="cuda:2"), local_rank=None)[0] == torch.device("cuda", 2)


@pytest.mark.parametrize("given", [None, "cuda:1"])
def test_torchrun_resumes_a_run_made_on_cuda_n_on_each_local_rank(char_data, tmp_path, monkeypatch, given):
    # the checkpoint keeps the device of a run in one process; only a --device given now is refused
    import train as train_module
    config = tiny(char_data, tmp_path, max_iters=2, eval_interval=2)
    train(config)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"]["device"] = "cuda:1"
    torch.save(ckpt, path)
    seen = []

    class Stop(Exception):
        pass

    def record(config, local_rank):
        seen.append((config.device, local_rank))
        raise Stop
    monkeypatch.setattr(train_module, "resolve_system", record)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    again = GPT2Config(checkpoint_dir=config.checkpoint_dir, max_iters=4)
    explicit = {"checkpoint_dir", "max_iters"}
    if given:
        again.device = given
        explicit.add("device")
    with pytest.raises(Stop):
        train(again, explicit)
    assert seen == [(given or "cuda", 0)]


def test_sample_tokens_has_a_ceiling_in_training_only(char_data, tmp_path):
    # the sample is drawn at each evaluation and a signal waits for it: 10**12 tokens hung the run
    with pytest.raises(ConfigError, match=r"--sample_tokens=1,000,000,000,000 is the length .* at most 10,000; give"):
        train(tiny(char_data, tmp_path, sample_tokens=10**12))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2, sample_tokens=4))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"]["sample_tokens"] = 20_000  # allowed before the ceiling
    torch.save(ckpt, path)
    assert GPT(GPT2Config(**{k: ckpt["config"][k] for k in MODEL_SHAPE_KEYS}, sample_tokens=20_000))  # still a model
    with pytest.raises(ConfigError, match=r"--sample_tokens=20,000 \(the checkpoint's setting\) is the length"):
        train(GPT2Config(checkpoint_dir=str(tmp_path / "ckpt"), max_iters=4), {"checkpoint_dir", "max_iters"})
    summary = train(GPT2Config(checkpoint_dir=str(tmp_path / "ckpt"), max_iters=4, sample_tokens=4),
                    {"checkpoint_dir", "max_iters", "sample_tokens"})
    assert summary["iter_num"] == 4


@pytest.mark.parametrize("mode, steps, refused", [("reduce-overhead", 2, True), ("max-autotune", 3, True),
                                                   ("reduce-overhead", 1, False), ("default", 2, False),
                                                   ("max-autotune-no-cudagraphs", 2, False)])
def test_cuda_graph_modes_refuse_gradient_accumulation(char_data, tmp_path, monkeypatch, mode, steps, refused):
    import train as train_module

    def on_a_gpu(config, local_rank):  # what resolve_system says on a CUDA machine; nothing touches CUDA
        seen_modes.append(config.compile_mode)
        return torch.device("cuda", 0), torch.bfloat16, True

    class Stop(Exception):
        pass

    def no_data(data_dir):  # the first thing after the check
        raise Stop

    seen_modes = []
    monkeypatch.setattr(train_module, "resolve_system", on_a_gpu)
    monkeypatch.setattr("data.load_meta", no_data)
    config = tiny(char_data, tmp_path, compile=True, compile_mode=mode, gradient_accumulation_steps=steps)
    with pytest.raises(ConfigError if refused else Stop) as e:
        train(config)
    assert seen_modes == [mode]
    if refused:
        assert f"over {steps} micro-steps" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_training_equals_plain_compiled_training(char_data, tmp_path):
    """compile_mode=reduce-overhead replays the same kernels as CUDA graphs: the same losses, step by step,
    whole or by regions. Regional compilation fuses less across the blocks' boundaries, so float32 rounds
    differently there and its curve drifts from the whole model's a little (on an H200: 3.9e-4 at most, a
    relative 1.6e-4, over these 20 steps); lost or mixed-up gradients would move it by far more. CUDA graphs of
    regions evaluate eagerly (compile_eval=False; evaluating through them is refused). 100 evaluation batches:
    the val split is swept, so the compiled evaluations meet targets of -1 too."""
    torch._dynamo.reset()  # earlier tests' compilations count against torch's limit of 8 per function

    def curve(mode, regional=False, compile_eval=True):
        r = train(tiny(char_data, tmp_path / f"{mode}{regional}", device="cuda", dtype="float32", compile=True,
                       compile_mode=mode, compile_regional=regional, compile_eval=compile_eval, max_iters=20,
                       eval_interval=10, eval_iters=100))
        assert list(r["losses"]) == list(range(1, 21)) and list(r["evals"]) == [0, 10, 20]
        return torch.tensor(list(r["losses"].values()) + [e[s] for e in r["evals"].values() for s in ("train", "val")])

    # 3e-4: the embedding's backward adds with atomics in an order that varies from run to run; on an H200 the
    # graphs' curve once differed from the plain one by a relative 1.05e-4 at one of its 26 points
    plain, regional = curve("default"), curve("default", regional=True)
    torch.testing.assert_close(curve("reduce-overhead"), plain, rtol=3e-4, atol=1e-5)
    torch.testing.assert_close(curve("reduce-overhead", regional=True, compile_eval=False), regional, rtol=3e-4,
                               atol=1e-5)
    torch.testing.assert_close(regional, plain, rtol=2e-3, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("compile_model, regional", [(True, False), (True, True), (False, False)])
def test_graphed_steps_follow_plain_steps_and_resume(char_data, tmp_path, compile_model, regional):
    """cuda_graph replays the kernels of the plain step, forward, backward, clipping and AdamW: the same losses and
    evaluations step by step, with dropout drawing in the graph. A run stopped and resumed (warm-up and capture
    again) ends where the straight one does, and its checkpoints keep AdamW's plain settings.

    float32. The embedding's backward adds with atomics, in an order that varies from run to run, so the curves
    agree closely but not bit for bit. On an H200 the resumed run's losses differed from the straight one's by a
    relative 1.3e-4 at most by regions, and some weights differed far more: the key projection's bias gets a
    gradient that is rounding noise (attention does not depend on it), which AdamW scales up to full-size steps
    of either sign. So the two checkpoints are compared by what their models compute: on an H100 (with aten's
    dropout kernel then) their logits differed by up to 4.5e-3 after the 10 resumed steps, whose losses had
    matched within a relative 1e-3."""
    # earlier tests' compilations count against torch's limit of 8 per function: past it, the resumed run would
    # fall back to eager, whose dropout draws other random numbers
    torch._dynamo.reset()
    kw = dict(device="cuda", dtype="float32", compile=compile_model, compile_regional=regional, dropout=0.1,
              max_iters=20, eval_interval=10)

    def curve(r):
        assert list(r["losses"]) == list(range(1, 21)) and list(r["evals"]) == [0, 10, 20]
        return torch.tensor(list(r["losses"].values()) + [e[s] for e in r["evals"].values() for s in ("train", "val")])

    plain = train(tiny(char_data, tmp_path / "plain", **kw))
    graphed = train(tiny(char_data, tmp_path / "graphed", cuda_graph=True, **kw))
    # the atomics' order alone took one of the 26 points a relative 1.05e-4 apart by regions on an H200
    torch.testing.assert_close(curve(graphed), curve(plain), rtol=3e-4, atol=1e-5)
    assert graphed["losses"][20] < graphed["losses"][1] - 0.5  # it learns: the replays step the weights
    first = train(tiny(char_data, tmp_path / "split", cuda_graph=True, **{**kw, "max_iters": 10}))
    second = train(tiny(char_data, tmp_path / "split", cuda_graph=True, **kw))
    assert first["iter_num"] == 10 and second["resumed_from"] == 10
    resumed = [second["losses"][i] for i in range(11, 21)] + [second["evals"][20][s] for s in ("train", "val")]
    straight = [graphed["losses"][i] for i in range(11, 21)] + [graphed["evals"][20][s] for s in ("train", "val")]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-3, atol=1e-5)
    ckpts = [load_checkpoint(tmp_path / run / "ckpt" / "checkpoint.pt") for run in ("split", "graphed")]
    assert [c["iter_num"] for c in ckpts] == [20, 20]
    x = torch.randint(0, ckpts[0]["config"]["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [model_from_checkpoint(c).eval()(x)[0] for c in ckpts]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-2, atol=1e-2)
    groups = ckpts[0]["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in groups)
    assert groups[0]["lr"] == pytest.approx(get_lr(19, tiny(char_data, tmp_path, **kw)))  # the last step's


@pytest.mark.parametrize("mode, compile_eval, refused", [("reduce-overhead", True, True), ("max-autotune", True, True),
                                                          ("reduce-overhead", False, False), ("default", True, False)])
def test_regional_cuda_graphs_refuse_compiled_evaluation(char_data, tmp_path, monkeypatch, mode, compile_eval,
                                                         refused):
    import train as train_module

    class Stop(Exception):
        pass

    def no_data(data_dir):  # the first thing after the check
        raise Stop

    monkeypatch.setattr(train_module, "resolve_system",
                        lambda config, rank: (torch.device("cuda", 0), torch.bfloat16, True))
    monkeypatch.setattr("data.load_meta", no_data)
    config = tiny(char_data, tmp_path, compile=True, compile_mode=mode, compile_regional=True,
                  compile_eval=compile_eval)
    with pytest.raises(ConfigError if refused else Stop) as e:
        train(config)
    if refused:
        assert str(e.value) == (f"compile_regional with compile_mode={mode} cannot evaluate through the compiled "
                                f"regions: one region's CUDA graph overwrites the output the next one reads; add "
                                f"--compile_eval=False (evaluations run eagerly) or drop --compile_regional")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device, dtype, overrides, problem", [
    ("cpu", torch.float32, {}, "cuda_graph captures the training step on a CUDA GPU, and this run's device is cpu"),
    ("cuda", torch.bfloat16, dict(gradient_accumulation_steps=2),
     "cuda_graph captures a step of one micro-batch, not 2: use --gradient_accumulation_steps=1 with a larger "
     "--batch_size"),
    ("cuda", torch.float16, {}, "cuda_graph cannot capture float16's GradScaler, which decides on the host whether "
                                "to take a step: use --dtype=bfloat16 or float32"),
    ("cuda", torch.bfloat16, dict(compile_mode="reduce-overhead"),
     "cuda_graph captures the whole step itself, and compile_mode=reduce-overhead would replay CUDA graphs of its "
     "own inside it: use --compile_mode=default (or max-autotune-no-cudagraphs)"),
    ("cuda", torch.bfloat16, dict(gradient_checkpointing=True),
     "cuda_graph cannot capture gradient_checkpointing's recomputation: drop --gradient_checkpointing"),
])
def test_a_step_that_cannot_be_graphed_is_refused_or_left_plain(char_data, tmp_path, monkeypatch, device, dtype,
                                                                overrides, problem):
    """cuda_graph=True refuses, before anything is written; 'auto' trains without the graph instead."""
    import train as train_module

    class Stop(Exception):
        pass

    def no_data(data_dir):  # the first thing after the checks
        raise Stop

    monkeypatch.setattr(train_module, "resolve_system",
                        lambda config, rank: (torch.device(device, 0 if device == "cuda" else None), dtype, True))
    monkeypatch.setattr("data.load_meta", no_data)
    with pytest.raises(ConfigError) as e:
        train(tiny(char_data, tmp_path, cuda_graph=True, **overrides))
    assert str(e.value) == f"{problem}; or drop --cuda_graph"
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(Stop):  # 'auto' goes on
        train(tiny(char_data, tmp_path, cuda_graph="auto", **overrides))
    if device == "cpu":  # and trains, plainly (a GraphedStep needs CUDA), where it can run here
        monkeypatch.undo()
        r = train(tiny(char_data, tmp_path / "auto", cuda_graph="auto", max_iters=3))
        assert r["iter_num"] == 3 and r["losses"]


def test_float8_on_an_older_gpu_is_refused_before_anything_is_written(char_data, tmp_path, monkeypatch):
    import train as train_module
    monkeypatch.setattr(train_module, "resolve_system",
                        lambda config, rank: (torch.device("cuda", 0), torch.bfloat16, True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"^fp8 needs a GPU of compute capability 8.9 or newer \(H100, H200, L40, "
                                          r"RTX 4090, ...\); NVIDIA A100-SXM4-80GB has 8.0; drop --fp8$"):
        train(tiny(char_data, tmp_path, fp8=True))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


def test_exact_resume(resume_runs):
    straight_dir, split_dir, straight, first, second = resume_runs
    assert second["resumed_from"] == 20 and first["iter_num"] == 20 and second["iter_num"] == 40
    assert list(straight["losses"]) == list(range(1, 41))
    assert {**first["losses"], **second["losses"]} == straight["losses"]  # the same loss at every iteration
    a = load_checkpoint(straight_dir / "ckpt" / "final_checkpoint.pt")
    b = load_checkpoint(split_dir / "ckpt" / "final_checkpoint.pt")
    assert a["iter_num"] == b["iter_num"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise identical
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["rng"][0]["torch"].equal(b["rng"][0]["torch"])
    assert a["best_val_loss"] == b["best_val_loss"] == min(e["val"] for i, e in straight["evals"].items() if i)


def test_a_checkpoint_holds_its_iteration_while_training_goes_on(char_data, tmp_path, monkeypatch):
    """Checkpoints are written by a background thread from a copy of the state: a slow write still saves the
    iteration it was asked for, not what the training thread has made of the weights since."""
    import threading
    import train as train_module
    writers = []

    def slow_save(path, ckpt):
        writers.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.3)  # meanwhile the training thread takes its next steps
        save_checkpoint(path, ckpt)

    monkeypatch.setattr(train_module, "save_checkpoint", slow_save)
    kw = dict(dropout=0.1, eval_interval=100, save_interval=5)
    summary = train(tiny(char_data, tmp_path / "slow", max_iters=15, **kw))
    assert summary["iter_num"] == 15 and writers and not any(writers)
    monkeypatch.undo()
    train(tiny(char_data, tmp_path / "short", max_iters=5, **kw))
    saved = load_checkpoint(tmp_path / "slow" / "ckpt" / "checkpoint_iter_5.pt")
    straight = load_checkpoint(tmp_path / "short" / "ckpt" / "final_checkpoint.pt")
    assert saved["iter_num"] == straight["iter_num"] == 5
    assert all(torch.equal(saved["model"][k], w) for k, w in straight["model"].items())
    for a, b in zip(saved["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_background_write_stops_the_run_at_the_next_step(char_data, tmp_path, monkeypatch):
    import errno
    import train as train_module
    steps, real_fb = [], train_module.forward_backward
    monkeypatch.setattr(train_module, "forward_backward", lambda *a, **k: steps.append(1) or real_fb(*a, **k))

    def full_disk(path, ckpt):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    with pytest.raises(TrainingError, match=r"^cannot write .*ckpt/(best_)?checkpoint.pt at iteration 100: No space"):
        train(tiny(char_data, tmp_path, max_iters=200, lr_decay_iters=200, eval_interval=100, log_interval=100))
    assert 100 <= len(steps) < 190  # not trained on until the next save, at 200


def test_a_resume_takes_a_saved_cuda_graph_as_auto(char_data, tmp_path):
    """A checkpoint of a GPU run with cuda_graph=True continues on a CPU without the graph; only a command that
    asks for it again is refused."""
    train(tiny(char_data, tmp_path, max_iters=5))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["config"]["cuda_graph"] = True
    save_checkpoint(path, ckpt)
    with pytest.raises(ConfigError, match="this run's device is cpu; or drop --cuda_graph$"):
        train(tiny(char_data, tmp_path, max_iters=8, cuda_graph=True))
    r = train(tiny(char_data, tmp_path, max_iters=8))
    assert r["resumed_from"] == 5 and r["iter_num"] == 8


def test_the_checkpoint_writer_copies_shared_memory_once_and_raises_later():
    import threading
    from train import CheckpointWriter, cpu_copy, tensor_bytes
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=65, block_size=8))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "steps": (3, [torch.arange(4)])}
    copy = cpu_copy(state)
    direct, copied = io.BytesIO(), io.BytesIO()
    torch.save(state, direct)
    torch.save(copy, copied)
    assert copied.getvalue() == direct.getvalue()  # the same file: betas shared by both groups are pickled once
    tied = ("transformer.wte.weight", "lm_head.weight")
    assert copy["model"][tied[0]].data_ptr() == copy["model"][tied[1]].data_ptr()  # still tied, as torch.save keeps it
    assert copy["model"][tied[0]].data_ptr() != state["model"][tied[0]].data_ptr()
    assert copy["model"]._metadata == state["model"]._metadata and copy["steps"][0] == 3
    moments = sum(t.nbytes for group in optimizer.state.values() for t in group.values())
    assert tensor_bytes(copy) == tensor_bytes(state) == sum(p.nbytes for p in model.parameters()) + moments + 32
    with torch.no_grad():
        model.lm_head.weight.add_(1)
    assert not torch.equal(copy["model"][tied[1]], state["model"][tied[1]])

    threads = []

    def write(ckpt):
        threads.append(threading.current_thread() is threading.main_thread())
        if ckpt["steps"][0] == 4:
            raise OSError(28, "No space left on device")

    writer = CheckpointWriter()
    writer.submit(write, state)
    writer.submit(write, {"steps": (4, [])})
    with pytest.raises(OSError, match="No space"):  # raised in the training thread, at the next wait
        writer.wait()
    writer.wait()  # once
    big = CheckpointWriter(max_copy_bytes=tensor_bytes(state) - 1)  # written here and now: no copy
    big.submit(write, state)
    big.close()
    writer.close()
    assert threads == [False, False, True]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: page-locked copies are made of GPU tensors only")])])
def test_a_pinned_copy_of_a_checkpoint_writes_the_same_file(device):
    """A GPU model's checkpoint goes through page-locked memory, copied without a wait per tensor: the file is
    the one the state brought to the CPU gives, and the copy no longer follows the weights. On the CPU it is
    cpu_copy."""
    from train import CheckpointWriter, pinned_copy
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=65, block_size=8)).to(device)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device)
    x = torch.randint(0, 65, (4, 8), device=device)
    model(x, x)[1].backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    saved = io.BytesIO()
    torch.save(state, saved)  # the file names each tensor's device: compare with the state brought to the CPU
    direct = io.BytesIO()
    torch.save(torch.load(io.BytesIO(saved.getvalue()), map_location="cpu", weights_only=True), direct)
    copy = pinned_copy(state)
    with torch.no_grad():  # queued right after the copies: the copy must hold the weights from before
        for p in model.parameters():
            p.mul_(2)
    copied = io.BytesIO()
    torch.save(copy, copied)
    assert copied.getvalue() == direct.getvalue()
    tied = copy["model"]["transformer.wte.weight"], copy["model"]["lm_head.weight"]
    assert tied[0].device.type == "cpu" and tied[0].data_ptr() == tied[1].data_ptr()
    assert tied[0].is_pinned() == (device == "cuda") and not copy["rng"].is_pinned()
    files = []

    def write(ckpt):
        files.append(io.BytesIO())
        torch.save(ckpt, files[-1])
    writer = CheckpointWriter()  # under PINNED_CHECKPOINT_BYTES: the writer's copy is made this way
    writer.submit(write, state)
    writer.close()
    files[0].seek(0)
    written = torch.load(files[0])["model"]
    for k, v in model.state_dict().items():  # the doubled weights
        torch.testing.assert_close(written[k], v.cpu(), rtol=0, atol=0, msg=k)


def test_a_checkpoint_of_up_to_the_pinned_limit_is_copied_through_page_locked_memory(monkeypatch):
    import train as train_module
    tries = []
    monkeypatch.setattr(train_module, "pinned_copy", lambda ckpt: tries.append(1) or train_module.cpu_copy(ckpt))
    monkeypatch.setattr(train_module, "PINNED_CHECKPOINT_BYTES", 16)
    written = []
    writer = train_module.CheckpointWriter()
    writer.submit(written.append, {"w": torch.arange(4.0)})  # 16 bytes: the limit itself
    writer.submit(written.append, {"w": torch.arange(5.0)})  # 20 bytes: ordinary memory
    writer.close()
    assert tries == [1] and len(written) == 2


def test_a_checkpoint_copy_falls_back_to_ordinary_memory_once_page_locked_memory_fails(monkeypatch):
    import train as train_module
    tries = []

    def no_pinned_memory(ckpt):
        tries.append(1)
        raise RuntimeError("CUDA error: out of memory (page-locked host memory)")
    monkeypatch.setattr(train_module, "pinned_copy", no_pinned_memory)
    state, written = {"w": torch.arange(4.0)}, []
    writer = train_module.CheckpointWriter()
    for _ in range(3):
        writer.submit(written.append, state)
    writer.close()
    assert len(tries) == 1 and len(written) == 3  # tried once, then not again
    assert all(torch.equal(w["w"], state["w"]) and w["w"].data_ptr() != state["w"].data_ptr() for w in written)


def test_the_last_line_says_where_the_time_went(char_data, tmp_path, monkeypatch, capsys):
    import train as train_module
    writes = []

    def slow_save(path, ckpt):  # each write takes at least 0.1 s more
        time.sleep(0.1)
        writes.append(Path(path).name)
        save_checkpoint(path, ckpt)

    monkeypatch.setattr(train_module, "save_checkpoint", slow_save)
    summary = train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5))
    t = summary["timing"]
    assert set(t) == {"setup", "first_step", "steps", "evaluation", "samples", "checkpoints", "total"}
    assert all(v >= 0 for v in t.values())
    # evaluations at 0, 5 and 10; at 5 and 10 checkpoint.pt (+ best), then final_checkpoint.pt. A background thread
    # writes them, and the training thread waits for the last one: the final checkpoint is whole when it says done
    assert len(writes) >= 3 and t["checkpoints"] >= 0.1
    assert t["evaluation"] < 0.1 * len(writes)  # the writes after an evaluation are not counted in it
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and re.search(r"\(setup [\d.]+ s, first step [\d.]+ s, other steps [\d.]+ s, "
                                        r"evaluations [\d.]+ s, checkpoints [\d.]+ s\)", done[0]), done
    assert done[0].startswith("done: 10 iterations in ")
    train(tiny(char_data, tmp_path, max_iters=13, eval_interval=5))  # a resumed run says what it did itself
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert done[0].startswith("done: 13 iterations (3 of them in this run) in "), done


@pytest.fixture
def fake_clock(monkeypatch):
    """train.py's perf_counter reads a clock the test moves: each training step adds step_s (the first
    one first_step_s more, as compiling does), each evaluation eval_s[0] the first time and eval_s[1]
    after that; nothing else takes time. logged[iter_num] = (dt, eta) of each progress line."""
    import inspect
    import train as train_module
    clock = type("FakeClock", (), {})()
    clock.now, clock.step_s, clock.first_step_s, clock.eval_s, clock.logged = 0.0, 0.01, 0.0, (0.0, 0.0), {}

    class Time:  # the time module, but perf_counter reads the fake clock
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def perf_counter():
            return clock.now
    real_fb, real_log, real_eval = train_module.forward_backward, train_module.log_progress, train_module.estimate_loss
    steps, evals = [], []

    def step(*args, **kwargs):
        clock.now += clock.step_s + (clock.first_step_s if not steps else 0.0)
        steps.append(1)
        return real_fb(*args, **kwargs)

    def evaluation(*args, **kwargs):
        clock.now += clock.eval_s[1 if evals else 0]
        evals.append(1)
        return real_eval(*args, **kwargs)

    def spy(*args, **kwargs):
        bound = inspect.signature(real_log).bind(*args, **kwargs).arguments
        clock.logged[bound["iter_num"]] = (bound["dt"], bound["eta"])
        return real_log(*args, **kwargs)
    monkeypatch.setattr(train_module, "time", Time())
    monkeypatch.setattr(train_module, "forward_backward", step)
    monkeypatch.setattr(train_module, "estimate_loss", evaluation)
    monkeypatch.setattr(train_module, "log_progress", spy)
    return clock


def test_rates_and_eta_on_a_clock_the_test_controls(char_data, tmp_path, fake_clock, capsys):
    """Each step takes 10 ms on a fake clock, the first one (compilation) 1 s more; evaluations and
    everything else take no time. Every logged rate is then exactly 10 ms per step, and the ETA the
    remaining steps' time."""
    fake_clock.first_step_s = 1.0
    summary = train(tiny(char_data, tmp_path, max_iters=12, log_interval=4, eval_interval=12))
    assert sorted(fake_clock.logged) == [4, 8, 12]
    for it, (dt, eta) in fake_clock.logged.items():
        assert dt == pytest.approx(0.01) and eta == pytest.approx((12 - it) * 0.01), it
    # 4 sequences x 16 tokens in 10 ms, printed and logged
    out = capsys.readouterr().out
    assert all(f"iter {it}/12: loss" in out for it in (4, 8, 12)) and out.count(", 10.0 ms/iter, 6,400 tok/s,") == 3
    _, acc = event_steps(summary["run_dir"])
    assert [e.value for e in acc.Scalars("tokens_per_sec")] == pytest.approx([6400.0] * 3)


def test_no_rate_from_the_first_step_alone(char_data, tmp_path, fake_clock, capsys):
    """With a log line after every step, the first line has only the first step to time, which compiles
    (1 s more here): it gives no rate and no ETA rather than planning 1 s for every step left. The same
    holds for a resume that stops one step before a log step."""
    fake_clock.first_step_s = 1.0
    summary = train(tiny(char_data, tmp_path, max_iters=3, log_interval=1, eval_interval=3))
    assert fake_clock.logged == {1: (None, None), 2: pytest.approx((0.01, 0.01)), 3: pytest.approx((0.01, 0.0))}
    out = capsys.readouterr().out
    assert "iter 1/3: loss " in out and ", speed and ETA from the next line on (a run's first step, slowed by " \
        "compiling and warming up, is left out)\n" in out and out.count(", 10.0 ms/iter, 6,400 tok/s,") == 2
    steps, acc = event_steps(summary["run_dir"])
    assert [e.step for e in acc.Scalars("tokens_per_sec")] == [2, 3] and [e.step for e in acc.Scalars("lr")] == [1, 2, 3]


def test_a_long_evaluation_reports_its_progress_and_time_left(char_data, tmp_path, fake_clock, monkeypatch, capsys):
    """An evaluation of 12 batches, 20 s each on this clock: a line once more than 30 s passed since the last,
    with the batches done and the time left at that rate (a preset sized for a GPU, run on a CPU, says so).
    The first batch also compiles (45 s here): the rate leaves it out, else the time left would be 2.25x."""
    import train as train_module
    real = train_module.estimate_loss  # fake_clock's

    def slow(*args, progress=None, **kwargs):
        def timed(done, total):
            fake_clock.now += 20.0 * (done - timed.done) + (25.0 if timed.done == 0 else 0.0)
            timed.done = done
            progress(done, total)
        timed.done = 0
        return real(*args, progress=timed, **kwargs)
    monkeypatch.setattr(train_module, "estimate_loss", slow)
    train(tiny(char_data, tmp_path, max_iters=1, eval_interval=1, eval_iters=6))
    lines = [line for line in capsys.readouterr().out.splitlines() if "evaluating" in line]
    assert len(lines) == 12 and lines[6] == "iter 1: evaluating, 1/12 batches [45s]"  # the evaluation at 1 too
    assert lines[:6] == ["iter 0: evaluating, 1/12 batches [45s]",  # no rate yet: one round, which compiled
                     "iter 0: evaluating, 3/12 batches [85s, about 3m00s left]",
                     "iter 0: evaluating, 5/12 batches [125s, about 2m20s left]",
                     "iter 0: evaluating, 7/12 batches [165s, about 1m40s left]",
                     "iter 0: evaluating, 9/12 batches [205s, about 1m00s left]",
                     "iter 0: evaluating, 11/12 batches [245s, about 20s left]"], lines


def test_the_time_split_keeps_evaluations_and_text_samples_apart(char_data, tmp_path, fake_clock, monkeypatch):
    """Evaluations of 0.5 s and text samples of 4 tokens at 0.1 s a token, at 0, 5 and 10: each in its own part."""
    import generate
    fake_clock.eval_s = (0.5, 0.5)
    real_step = generate.Generator._step

    def step(self, tok):
        fake_clock.now += 0.1
        return real_step(self, tok)
    monkeypatch.setattr(generate.Generator, "_step", step)
    timing = train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5, sample_tokens=4))["timing"]
    assert timing["evaluation"] == pytest.approx(3 * 0.5) and timing["samples"] == pytest.approx(3 * 3 * 0.1)
    assert timing["setup"] == pytest.approx(0.0, abs=1e-9)  # the first evaluation and sample are not setup


def test_rates_and_eta_leave_out_evaluations_and_count_those_to_come(char_data, tmp_path, fake_clock):
    """The same fake clock, and evaluations that take time: 0.5 s the first, 0.2 s each later one. The
    rate leaves them out; the ETA adds the evaluations still to come at the last one's duration.
    max_iters 10 with evaluations every 4: at 4, 8 and 10 (the last iteration), after the first at 0."""
    fake_clock.eval_s = (0.5, 0.2)
    summary = train(tiny(char_data, tmp_path, max_iters=10, log_interval=2, eval_interval=4))
    # at each log step: the steps left at 10 ms, and the evaluations left (4, 8, 10) at the last one's time
    expected = {2: 8 * 0.01 + 3 * 0.5, 4: 6 * 0.01 + 3 * 0.5, 6: 4 * 0.01 + 2 * 0.2, 8: 2 * 0.01 + 2 * 0.2,
                10: 1 * 0.2}
    logged = fake_clock.logged
    assert {it: dt for it, (dt, _) in logged.items()} == pytest.approx({it: 0.01 for it in expected})
    assert {it: eta for it, (_, eta) in logged.items()} == pytest.approx(expected)
    timing = summary["timing"]
    assert timing["evaluation"] == pytest.approx(0.5 + 3 * 0.2) and timing["setup"] == pytest.approx(0.0, abs=1e-9)
    assert timing["first_step"] + timing["steps"] == pytest.approx(10 * 0.01)


@pytest.mark.parametrize("compile_eval", [True, False])
def test_the_eta_leaves_out_the_evaluation_that_compiled(char_data, tmp_path, fake_clock, monkeypatch, compile_eval):
    """Compiled, the first evaluation also compiles the evaluation graph (5 s here, 0.2 s each later one):
    planning the remaining evaluations with it would overstate the ETA by that much per evaluation, so
    they count only from the first evaluation that did not compile. Evaluated eagerly, none compiles."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # the path, without the wait
    fake_clock.eval_s = (5.0, 0.2)
    train(tiny(char_data, tmp_path, max_iters=10, log_interval=2, eval_interval=4, compile=True,
               compile_eval=compile_eval))
    first = 0.0 if compile_eval else 5.0
    expected = {2: 8 * 0.01 + 3 * first, 4: 6 * 0.01 + 3 * first, 6: 4 * 0.01 + 2 * 0.2, 8: 2 * 0.01 + 2 * 0.2,
                10: 1 * 0.2}
    assert {it: eta for it, (_, eta) in fake_clock.logged.items()} == pytest.approx(expected)


def test_a_resume_with_more_evaluation_batches_plans_longer_evaluations(char_data, tmp_path, fake_clock):
    """The saved run's last evaluation (0.2 s on the fake clock) took eval_iters=2 batches per split; the
    resumed run evaluates 4, so until it times one of its own it plans each at 0.4 s."""
    fake_clock.eval_s = (0.2, 0.2)
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=4, eval_iters=2))
    train(tiny(char_data, tmp_path, max_iters=10, log_interval=2, eval_interval=4, eval_iters=4))
    # at 6: 4 steps of 10 ms, and the evaluations at 8 and 10
    assert fake_clock.logged[6][1] == pytest.approx(4 * 0.01 + 2 * 0.4)
    # by the batches they take: with eval_iters=100, 100 of train and the val split's sweep of 69, not 2 x 100
    train(tiny(char_data, tmp_path / "swept", max_iters=4, eval_interval=4, eval_iters=2))
    train(tiny(char_data, tmp_path / "swept", max_iters=10, log_interval=2, eval_interval=4, eval_iters=100))
    assert fake_clock.logged[6][1] == pytest.approx(4 * 0.01 + 2 * 0.2 * 169 / 4)


def taking(clock, seconds: float, fn):
    """fn, taking `seconds` on the fake clock each time it is called."""
    def slow(*args, **kwargs):
        clock.now += seconds
        return fn(*args, **kwargs)
    return slow


def test_the_setup_time_of_a_resume_includes_reading_the_checkpoint(char_data, tmp_path, fake_clock, monkeypatch):
    """Reading a large checkpoint takes seconds (2 s on the fake clock here), before the process group and
    the model: the last line's setup and total count it."""
    import train as train_module
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=4))
    monkeypatch.setattr(train_module, "load_checkpoint", taking(fake_clock, 2.0, train_module.load_checkpoint))
    timing = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=4))["timing"]
    assert timing["setup"] == pytest.approx(2.0) and timing["total"] == pytest.approx(2.0 + 2 * 0.01)


def test_a_save_before_the_first_step_is_counted_once(char_data, tmp_path, fake_clock, monkeypatch):
    """A resume that makes up an owed evaluation saves checkpoint.pt before its first step (1 s on the fake
    clock): that second goes to checkpoints, not also to the setup, and the steps keep their own time. The
    training thread writes them all here: a background thread would move the fake clock at any moment."""
    import train as train_module
    monkeypatch.setattr(train_module, "ASYNC_CHECKPOINT_BYTES", -1)
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=4))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["progress"]["eval_owed"] = True
    save_checkpoint(path, ckpt)
    monkeypatch.setattr(train_module, "save_checkpoint", taking(fake_clock, 1.0, train_module.save_checkpoint))
    timing = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=10))["timing"]
    # saves: the owed evaluation's, the last evaluation's (at 6) and final_checkpoint.pt
    assert timing["setup"] == pytest.approx(0.0, abs=1e-9) and timing["checkpoints"] == pytest.approx(3.0)
    assert timing["first_step"] + timing["steps"] == pytest.approx(2 * 0.01)


def test_the_time_split_of_the_last_line():
    from train import format_timing
    timing = {"setup": 1.0, "first_step": 2.0, "evaluation": 3.0, "checkpoints": 4.0}
    assert format_timing(timing, 20.0, compiled=True) == ("setup 1.0 s, first step (compilation) 2.0 s, other steps "
                                                          "10.0 s, evaluations 3.0 s, checkpoints 4.0 s")
    timing["samples"] = 1.5  # sample_tokens > 0: TensorBoard's text samples, taken after each evaluation
    assert format_timing(timing, 20.0, compiled=False) == ("setup 1.0 s, first step 2.0 s, other steps 8.5 s, "
                                                           "evaluations 3.0 s, text samples 1.5 s, checkpoints 4.0 s")


def test_the_stop_message_says_how_to_continue(char_data, tmp_path, monkeypatch, capsys):
    import train as train_module
    steps, real_fb = [], train_module.forward_backward
    monkeypatch.setattr(train_module, "forward_backward", lambda *a, **k: steps.append(1) or real_fb(*a, **k))
    monkeypatch.setattr(train_module, "stop_requested", lambda stop, group=None: len(steps) >= 2)
    for init_from, again in (("auto", "run the same command again to continue"),
                             ("scratch", "run it again without --init_from=scratch to continue")):
        steps.clear()
        summary = train(tiny(char_data, tmp_path / init_from, max_iters=10, init_from=init_from))
        out = capsys.readouterr().out
        assert summary["iter_num"] == 2 and "stopped at iteration 2: saved" in out and again in out
        assert load_checkpoint(tmp_path / init_from / "ckpt" / "checkpoint.pt")["iter_num"] == 2


def test_the_eta_of_the_last_log_step_counts_the_final_evaluation(char_data, tmp_path, monkeypatch):
    import train as train_module
    import inspect
    etas, real = {}, train_module.log_progress

    def spy(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs).arguments
        etas[bound["iter_num"]] = bound["eta"]
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "log_progress", spy)
    train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5, log_interval=5))
    assert set(etas) == {5, 10} and etas[10] > 0  # the evaluation at 10 comes after the line


def test_checkpoint_contents(resume_runs):
    straight_dir, _, straight, _, _ = resume_runs
    ckpt_dir = straight_dir / "ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "best_checkpoint.pt", "checkpoint.pt", "checkpoint_iter_30.pt", "checkpoint_iter_40.pt",
        "final_checkpoint.pt"]  # keep_last_n=2 pruned iterations 10 and 20
    ckpt = torch.load(ckpt_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "iter_num", "best_val_loss", "config", "meta", "tokenizer", "rng",
            "run_dir", "version"} <= ckpt.keys()
    assert ckpt["config"]["n_layer"] == 2 and ckpt["config"]["vocab_size"] == ckpt["meta"]["vocab_size"]
    assert ckpt["tokenizer"]["kind"] == "char" and ckpt["scaler"] is None
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["run_dir"] == straight["run_dir"]
    model = GPT(GPT2Config.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # strict: the raw module's names
    best = torch.load(ckpt_dir / "best_checkpoint.pt", weights_only=True)
    best_iter = min((e["val"], i) for i, e in straight["evals"].items() if i)[1]
    assert best["iter_num"] == best_iter and best["best_val_loss"] == straight["evals"][best_iter]["val"]


def test_durations_read_as_people_write_them():
    from utils import format_duration
    assert [format_duration(t) for t in (0, 59.4, 59.6, 125, 3599, 3600, 7500, 90061)] == [
        "0s", "59s", "1m00s", "2m05s", "59m59s", "1h00m", "2h05m", "25h01m"]


def test_rng_state_round_trip_repeats_every_stream():
    import random

    from utils import get_rng_state, set_rng_state
    np.random.randn()  # numpy keeps the second of each pair of normal draws: a state with one waiting
    state = get_rng_state()
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == draws


def test_a_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"weights.pt is not a checkpoint of this project: expected a dict with "
                                              r"'model' and 'config'"):
        load_checkpoint(tmp_path / "weights.pt")
    torch.save({"model": {}}, tmp_path / "no_config.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "no_config.pt")


def test_each_rank_resumes_its_own_random_stream():
    from train import restore_rng
    from utils import get_rng_state
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(get_rng_state())
    for rank in (0, 1):
        assert restore_rng(states, rank, 2, torch.device("cpu"), seed=99)
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
    assert not restore_rng(states[:1], 1, 2, torch.device("cpu"), seed=99)  # saved by one process: re-seeded
    assert not restore_rng(states, 0, 1, torch.device("cpu"), seed=99)  # saved by two, resumed by one
    assert torch.initial_seed() == 99
    torch.manual_seed(99)
    expected = torch.rand(3)
    restore_rng(states[:1], 1, 2, torch.device("cpu"), seed=99)
    assert torch.equal(torch.rand(3), expected)


def test_a_resume_under_another_number_of_processes_reseeds_by_rank_and_step(char_data, tmp_path, monkeypatch):
    """Each rank its own dropout stream, one that does not repeat the start's: seed + rank + iteration."""
    import train as train_module
    train(tiny(char_data, tmp_path, max_iters=5, dropout=0.1))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["rng"] = ckpt["rng"] * 2  # as two processes saved it
    save_checkpoint(path, ckpt)
    seeds, real = [], train_module.restore_rng
    monkeypatch.setattr(train_module, "restore_rng",
                        lambda *a: real(*a) or seeds.append(torch.initial_seed()))
    train(tiny(char_data, tmp_path, max_iters=6, dropout=0.1, seed=1337))
    assert seeds == [1337 + 0 + 5]


def test_init_from_resume_without_a_checkpoint_is_refused(char_data, tmp_path):
    with pytest.raises(CheckpointError, match=r"--init_from=resume but .*checkpoint.pt does not exist; .*scratch$"):
        train(tiny(char_data, tmp_path, init_from="resume"))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))  # best_checkpoint.pt alone is left: named
    for name in ("checkpoint.pt", "final_checkpoint.pt"):
        (tmp_path / "ckpt" / name).unlink()
    ckpt, best = tmp_path / "ckpt" / "checkpoint.pt", tmp_path / "ckpt" / "best_checkpoint.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"or use --init_from=scratch; {best} is there: to resume "
                                                        f"from it, cp {best} {ckpt}")):
        train(tiny(char_data, tmp_path, init_from="resume"))


def test_a_finished_runs_final_checkpoint_alone_is_resumed(char_data, tmp_path, capsys):
    """checkpoint.pt deleted to save space, or final_checkpoint.pt alone copied to another machine: it holds the
    whole training state, and the run goes on exactly, where it used to start over and move it aside."""
    straight = train(tiny(char_data, tmp_path / "straight", max_iters=12))
    train(tiny(char_data, tmp_path / "first", max_iters=6))
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "first" / "ckpt" / "final_checkpoint.pt", tmp_path / "alone" / "final_checkpoint.pt")
    capsys.readouterr()
    resumed = train(tiny(char_data, tmp_path, max_iters=12, checkpoint_dir=str(tmp_path / "alone")))
    assert f"resuming from {tmp_path / 'alone' / 'final_checkpoint.pt'} at iteration 6" in capsys.readouterr().out
    assert resumed["resumed_from"] == 6
    assert resumed["losses"] == {i: straight["losses"][i] for i in range(7, 13)}


def test_a_vocab_size_flag_is_kept_and_checked_against_the_data(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=1, vocab_size=64))
    assert load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")["config"]["vocab_size"] == 64
    with pytest.raises(DataError, match="vocabulary has 20 tokens but the model's vocab_size is 10.*Use --vocab_size=20"):
        train(tiny(char_data, tmp_path / "small", max_iters=1, vocab_size=10))


def test_a_run_folder_moved_away_resumes_where_it_is_now(char_data, tmp_path, monkeypatch):
    """checkpoint.pt records the folder it was written to; a resume writes where the command points
    (here the default ./checkpoints), not where the folder used to be."""
    monkeypatch.chdir(tmp_path)
    train(tiny(char_data, tmp_path, max_iters=3, checkpoint_dir="old"))
    (tmp_path / "old").rename(tmp_path / "checkpoints")
    summary = train(tiny(char_data, tmp_path, max_iters=5, checkpoint_dir="./checkpoints"))
    assert summary["resumed_from"] == 3 and not (tmp_path / "old").exists()
    assert load_checkpoint(tmp_path / "checkpoints" / "final_checkpoint.pt")["iter_num"] == 5


def test_a_second_signal_exits_with_its_number(monkeypatch):
    stop = GracefulStop(verbose=False)
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # within REPEAT_S: the same request, forwarded again
    monkeypatch.setattr(GracefulStop, "REPEAT_S", -1.0)
    with pytest.raises(SystemExit) as e:
        stop._handle(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_output_cut_short_by_a_closed_pipe_is_no_error(tmp_path):
    code = "from utils import run_cli\nrun_cli(lambda: [print(i) for i in range(200000)])\n"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -c '{code}' | head -1"], cwd=ROOT,
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0\n", "")


def test_a_progress_bar_on_a_terminal_redraws_and_makes_room_for_text():
    import io

    from utils import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with Progress(total=3, file=term, mininterval=0) as bar:
        assert not bar.lines
        bar.update(1)
        assert bar.drawn and "\r" in term.getvalue()
        before = len(term.getvalue())
        bar.print_above("text\n", term)
        after = term.getvalue()[before:]
    cleared = after[:after.index("text")]
    assert "\r" in cleared and "33%" not in cleared  # the bar is taken away first, then drawn again below
    assert "33%" in after[after.index("text"):]


def test_keep_last_n_keeps_the_highest_iterations_by_number(tmp_path):
    from train import prune_iter_checkpoints
    for it in (5, 10, 15, 100):
        (tmp_path / f"checkpoint_iter_{it}.pt").write_bytes(b"")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "checkpoint_iter_5.pt.bak").write_bytes(b"")  # the user's copy: not one of the kept steps
    prune_iter_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint_iter_100.pt",
                                                          "checkpoint_iter_15.pt", "checkpoint_iter_5.pt.bak"]


def test_checkpoints_are_written_whole_and_readable_as_the_umask_allows(char_data, tmp_path, monkeypatch):
    """atomic_open: the data reaches the disk (fsync) before the new name replaces the old file, and the file
    gets the permissions of any other file the user makes (0o666 less the umask), not a temporary file's 0o600."""
    import utils
    events, fsync, replace = [], os.fsync, os.replace
    # fsync of a file, then of the folder that holds its new name, so that a power loss keeps the rename too
    monkeypatch.setattr(utils.os, "fsync", lambda fd: events.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync") or fsync(fd))
    monkeypatch.setattr(utils.os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or replace(a, b))
    with utils.atomic_open(tmp_path / "a.txt", "w") as f:
        f.write("x")
    assert events[:3] == ["fsync", ("replace", "a.txt"), "fsync folder"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    train(tiny(char_data, tmp_path, max_iters=5))
    assert (tmp_path / "ckpt" / "checkpoint.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    # a file replaced keeps its own permissions, as open() keeps them: private weights stay private, also
    # where checkpoint.pt is a separate file (a copy) that an improved evaluation would make a link of best's
    (tmp_path / "ckpt" / "copy").write_bytes((tmp_path / "ckpt" / "checkpoint.pt").read_bytes())
    os.replace(tmp_path / "ckpt" / "copy", tmp_path / "ckpt" / "checkpoint.pt")
    os.chmod(tmp_path / "ckpt" / "checkpoint.pt", 0o600)
    train(tiny(char_data, tmp_path, max_iters=10))
    assert load_checkpoint(tmp_path / "ckpt" / "best_checkpoint.pt")["iter_num"] == 10  # improved: both names
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["iter_num"] == 10
    assert (tmp_path / "ckpt" / "checkpoint.pt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ckpt" / "best_checkpoint.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_permission_error_anywhere_is_one_line(capsys, monkeypatch):
    """A file or folder this user may not read (root never meets one, so the checks up front cannot see it)."""
    from utils import run_cli

    def main():
        raise PermissionError(13, "Permission denied", "/data/x/train.bin")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: Permission denied: '/data/x/train.bin'; check the permissions of that file and of the folders "
        "above it\n")
    # under torchrun each machine's first process says it, as for any other error of the user's
    for local_rank, rank, said in (("1", "1", ""), ("0", "2", "error (rank 2): Permission denied")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            run_cli(main)
        err = capsys.readouterr().err
        assert err.startswith(said) and (err != "") == bool(said)


@pytest.mark.parametrize("error, said", [
    (MemoryError(), "error: out of memory; "),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
     "error: out of memory: tried to allocate 2.00 GiB; "),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 128000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "error: out of memory: tried to allocate 128.0 GB; "),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000 bytes."),
     "error: out of memory: tried to allocate 40 MB; "),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"), "error: out of memory; ")])
def test_out_of_memory_is_one_line(capsys, error, said):
    """A text read whole by prepare_data.py, or a model or batch too large for the machine (PyTorch's
    allocators raise RuntimeError, not MemoryError): no traceback."""
    from utils import run_cli

    def main():
        raise error
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(said) and len(err.splitlines()) == 1


@pytest.mark.parametrize("script, flag", [
    ("bench", "--data_dir"), ("bench", "--json"), ("bench", "--input"), ("generate", "--checkpoint"),
    ("generate", "--checkpoint_dir"), ("generate", "--init_from"), ("generate", "--prompt_file"),
    ("prepare_data", "--tokenizer_file"), ("prepare_data", "--input"), ("prepare_data", "--output_dir"),
    ("tokenizer", "--bench"), ("tokenizer", "--train"), ("tokenizer", "--out")])
def test_an_empty_path_flag_is_refused(script, flag):
    # --json "$OUT" with OUT unset: refused, not read as the flag left out (no file, the default folder)
    import importlib
    from utils import UserError
    module = importlib.import_module(script)
    parser = {"generate": "get_parser", "tokenizer": "build_parser"}.get(script)
    parse = getattr(module, parser)().parse_args if parser else module.parse_args
    extra = ["--tokenize"] if (script, flag) == ("bench", "--input") else []  # a flag of bench.py --tokenize
    with pytest.raises(UserError, match=f"argument {flag}: an empty path; give the name of a file or folder"):
        parse([*extra, flag, " "])
    assert getattr(parse([*extra, flag, "~/x"]), flag[2:]) == os.path.expanduser("~/x")


def test_out_of_memory_inside_torch_compile_is_one_line(capsys):
    from torch._dynamo.exc import BackendCompilerFailed
    from utils import run_cli

    def main():
        raise BackendCompilerFailed(lambda: None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                                         "1.50 GiB. GPU 0 has ..."), None) from None
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: out of memory: tried to allocate 1.50 GiB; ")


def test_other_runtime_errors_keep_their_traceback():
    from utils import run_cli

    def main():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_cli(main)


def test_a_run_folder_that_cannot_be_written_is_refused_before_training(char_data, tmp_path, monkeypatch):
    """A resumed run writes its TensorBoard events into its own run's folder, which may be another user's."""
    import train as train_module
    run_dir = Path(train(tiny(char_data, tmp_path, max_iters=5))["run_dir"])
    real = train_module.folder_problem
    monkeypatch.setattr(train_module, "folder_problem",
                        lambda p: "is not writable" if Path(p) == run_dir else real(p))
    with pytest.raises(ConfigError, match=rf"^cannot write TensorBoard logs into {re.escape(str(run_dir))}: it is "
                                          r"not writable; make it writable, or give another --log_dir$"):
        train(tiny(char_data, tmp_path, max_iters=10))
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["iter_num"] == 5


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symbolic links")
def test_atomic_open_writes_through_links_and_into_pipes(tmp_path):
    """An output file given as a link (samples.txt -> runs/samples.txt) or a pipe (bench --json >(jq .)):
    the link's file gets the data and the link stays; the pipe's reader gets it and the pipe stays."""
    import stat
    import threading
    import utils
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "out.txt").write_text("old")
    (tmp_path / "out.txt").symlink_to("real/out.txt")
    with utils.atomic_open(tmp_path / "out.txt", "w") as f:
        f.write("new")
    assert (tmp_path / "out.txt").is_symlink() and (tmp_path / "real" / "out.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["out.txt"]  # no temporary file left
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_text()))
    reader.start()
    with utils.atomic_open(pipe, "w") as f:
        f.write("through the pipe")
    reader.join(timeout=30)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.stat(pipe).st_mode)
    # /dev/stdout while stdout goes to a file (bench.py --json /dev/stdout > out.txt): after what was printed,
    # which sits in the stream's buffer unless PYTHONUNBUFFERED is set; the same for /dev/stderr (2> log)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for stream in ("stdout", "stderr"):
        code = (f"import sys, utils\nprint('before', file=sys.{stream})\n"
                f"with utils.atomic_open('/dev/{stream}', 'w') as f:\n"
                f"    f.write('written\\n')\nprint('after', file=sys.{stream})\n")
        with open(tmp_path / "out.txt", "w") as out:
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60, env=env,
                           **{stream: out})
        assert (tmp_path / "out.txt").read_text() == "before\nwritten\nafter\n", stream


def test_output_file_problem_follows_links_and_passes_pipes_and_devices(tmp_path, monkeypatch):
    """Checked before long work: a link whose file's folder is a file fails now; a pipe or /dev/null is written
    as it is, whatever its folder (/dev is not writable for a user who is not root)."""
    import utils
    from utils import output_file_problem
    (tmp_path / "blocker").write_text("")
    (tmp_path / "out.json").symlink_to(tmp_path / "blocker" / "out.json")
    assert output_file_problem(tmp_path / "out.json") == "cannot be written: its folder is a file"
    os.mkfifo(tmp_path / "pipe")
    monkeypatch.setattr(utils, "folder_problem", lambda path: "is not writable")
    assert output_file_problem("/dev/null") is None and output_file_problem(tmp_path / "pipe") is None
    assert output_file_problem(tmp_path / "plain.json") == "cannot be written: its folder is not writable"
    # /dev/stdout under `sudo -u alice ... > file`: the name is root's, the descriptor is the process's own
    monkeypatch.setattr(utils.os, "access", lambda *a, **k: False)
    assert output_file_problem("/dev/stdout") is None
    assert output_file_problem(tmp_path / "pipe") == "cannot be written: permission denied"


def test_the_link_a_killed_save_leaves_is_one_the_next_run_removes(tmp_path, monkeypatch):
    import utils
    from train import CHECKPOINT_NAMES
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "config": {}})

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "_rename_over", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_as(tmp_path / "best_checkpoint.pt", tmp_path / "checkpoint.pt", {})
    assert len(list(tmp_path.iterdir())) == 2  # the link under its temporary name
    utils.remove_unfinished_writes(tmp_path, CHECKPOINT_NAMES)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_folder_named_like_a_checkpoint_is_passed_over(tmp_path):
    from utils import find_checkpoint
    (tmp_path / "best_checkpoint.pt").mkdir()
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "config": {}})
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"


@pytest.mark.parametrize("links", [True, False])
def test_a_second_name_for_a_saved_checkpoint(tmp_path, monkeypatch, links):
    import utils
    from utils import save_checkpoint_as
    if not links:  # a file system without hard links: the state is written again
        monkeypatch.setattr(utils.os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no links here")))
    first = {"iter_num": 5, "model": {"w": torch.arange(4.0)}, "config": {}}
    second = {"iter_num": 10, "model": {"w": torch.zeros(4)}, "config": {}}
    (tmp_path / "best.pt").write_bytes(b"an older best")
    save_checkpoint(tmp_path / "last.pt", first)
    save_checkpoint_as(tmp_path / "best.pt", tmp_path / "last.pt", first)
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt") == links
    save_checkpoint(tmp_path / "last.pt", second)  # the next save replaces last.pt, never best.pt's contents
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["iter_num"] == 5 and torch.equal(best["model"]["w"], torch.arange(4.0)) and last["iter_num"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left


def test_a_second_name_that_is_a_link_stays_a_link(tmp_path):
    """checkpoint.pt linked to a file elsewhere (a bigger disk, say): saving an improved checkpoint under both
    names replaces the file the link points to, as a plain save does, instead of the link."""
    from utils import save_checkpoint_as
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").symlink_to(tmp_path / "elsewhere" / "checkpoint.pt")
    first, second = ({"iter_num": i, "model": {"w": torch.zeros(2)}, "config": {}} for i in (5, 10))
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", first)
    save_checkpoint(tmp_path / "ckpt" / "best_checkpoint.pt", second)
    save_checkpoint_as(tmp_path / "ckpt" / "checkpoint.pt", tmp_path / "ckpt" / "best_checkpoint.pt", second)
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_symlink()
    assert load_checkpoint(tmp_path / "elsewhere" / "checkpoint.pt")["iter_num"] == 10
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["checkpoint.pt"]


def test_training_links_best_checkpoint_instead_of_writing_it_again(char_data, tmp_path, monkeypatch):
    import train as train_module
    written = []
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda path, ckpt: written.append(Path(path).name) or save_checkpoint(path, ckpt))
    summary = train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5))
    assert summary["evals"][10]["val"] < summary["evals"][5]["val"]  # so best_checkpoint.pt was saved twice
    assert "checkpoint.pt" not in written and written.count("best_checkpoint.pt") == 2
    best = load_checkpoint(tmp_path / "ckpt" / "best_checkpoint.pt")
    assert best["iter_num"] == 10 and best["best_val_loss"] == summary["evals"][10]["val"]
    assert (tmp_path / "ckpt" / "checkpoint.pt").read_bytes() == (tmp_path / "ckpt" / "best_checkpoint.pt").read_bytes()


class Crash(BaseException):
    """A kill at a chosen point, as far as the files on disk are concerned."""


def test_a_crash_between_the_two_names_of_an_improved_checkpoint_keeps_the_best(char_data, tmp_path, monkeypatch):
    """best_checkpoint.pt is written first: a crash before checkpoint.pt follows leaves checkpoint.pt
    behind, and the resumed run repeats those steps and saves both again; best never lags the loss
    that the run reports as its best."""
    import train as train_module
    calls = []

    def crash_at_iteration_10(path, saved, ckpt):
        calls.append(ckpt["iter_num"])
        if ckpt["iter_num"] == 10:
            raise Crash
        save_checkpoint_as(path, saved, ckpt)
    monkeypatch.setattr(train_module, "save_checkpoint_as", crash_at_iteration_10)
    with pytest.raises(Crash):
        train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5))
    monkeypatch.undo()
    assert calls == [5, 10]  # both evaluations improved, so both saves had a second name
    summary = train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5))
    best = load_checkpoint(tmp_path / "ckpt" / "best_checkpoint.pt")
    assert best["iter_num"] == 10 and best["best_val_loss"] == summary["best_val_loss"]


def test_a_crash_while_writing_the_final_checkpoint_is_made_good_by_running_again(char_data, tmp_path, monkeypatch,
                                                                                   capsys):
    import train as train_module

    def crash_on_final(path, ckpt):
        if Path(path).name == "final_checkpoint.pt":
            raise Crash
        save_checkpoint(path, ckpt)
    monkeypatch.setattr(train_module, "save_checkpoint", crash_on_final)
    with pytest.raises(Crash):
        train(tiny(char_data, tmp_path, max_iters=10))
    monkeypatch.undo()
    assert not (tmp_path / "ckpt" / "final_checkpoint.pt").exists()
    capsys.readouterr()
    train(tiny(char_data, tmp_path, max_iters=10))
    assert load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")["iter_num"] == 10
    out = capsys.readouterr().out  # not "already trained ... raise --max_iters", then "done"
    assert "already trained" not in out and "done: 10 iterations (0 of them in this run)" in out
    events = sorted((tmp_path / "runs").rglob("events.out.tfevents.*"))
    train(tiny(char_data, tmp_path, max_iters=10))  # now it is complete
    assert "already trained for 10 iterations (max_iters=10); raise --max_iters" in capsys.readouterr().out
    assert sorted((tmp_path / "runs").rglob("events.out.tfevents.*")) == events  # no empty event file
    train(tiny(char_data, tmp_path, max_iters=10, eval_iters=3))  # nor one of changed settings that were not used
    assert "already trained for 10 iterations (max_iters=10); raise --max_iters" in capsys.readouterr().out
    assert sorted((tmp_path / "runs").rglob("events.out.tfevents.*")) == events
    # an earlier, shorter run's final checkpoint left in place by the crash is replaced too
    monkeypatch.setattr(train_module, "save_checkpoint", crash_on_final)
    with pytest.raises(Crash):
        train(tiny(char_data, tmp_path, max_iters=15, lr_decay_iters=40))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")["iter_num"] == 10
    train(tiny(char_data, tmp_path, max_iters=15, lr_decay_iters=40))
    assert load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")["iter_num"] == 15


def test_a_max_iters_below_a_stopped_run_writes_no_final_checkpoint(char_data, tmp_path, monkeypatch, capsys):
    """Stopped at iteration 7 of 10, run again with --max_iters=5: that run did not finish, so there is no
    final checkpoint to write, and a finished run's final_checkpoint.pt is not replaced by a stopped one."""
    import train as train_module
    steps, real_fb = [], train_module.forward_backward
    monkeypatch.setattr(train_module, "forward_backward", lambda *a, **k: steps.append(1) or real_fb(*a, **k))
    monkeypatch.setattr(train_module, "stop_requested", lambda stop, group=None: len(steps) >= 7)
    train(tiny(char_data, tmp_path, max_iters=10, eval_interval=5))
    monkeypatch.undo()
    capsys.readouterr()
    summary = train(tiny(char_data, tmp_path, max_iters=5, eval_interval=5))
    assert summary["iter_num"] == 7 and not (tmp_path / "ckpt" / "final_checkpoint.pt").exists()
    out = capsys.readouterr().out
    assert "already trained for 7 iterations (max_iters=5); raise --max_iters to continue" in out and "done:" not in out
    # a run finished at 10, extended to 20 and stopped at 14: the command of the first run changes nothing
    train(tiny(char_data, tmp_path / "b", max_iters=10, eval_interval=5, lr_decay_iters=40))
    final = (tmp_path / "b" / "ckpt" / "final_checkpoint.pt").read_bytes()
    steps.clear()
    monkeypatch.setattr(train_module, "forward_backward", lambda *a, **k: steps.append(1) or real_fb(*a, **k))
    monkeypatch.setattr(train_module, "stop_requested", lambda stop, group=None: len(steps) >= 4)
    assert train(tiny(char_data, tmp_path / "b", max_iters=20, eval_interval=5, lr_decay_iters=40))["iter_num"] == 14
    monkeypatch.undo()
    train(tiny(char_data, tmp_path / "b", max_iters=10, eval_interval=5, lr_decay_iters=40))
    assert (tmp_path / "b" / "ckpt" / "final_checkpoint.pt").read_bytes() == final


@pytest.mark.parametrize("resume", [False, True])
def test_temporary_files_of_killed_saves_are_removed(char_data, tmp_path, resume):
    if resume:
        train(tiny(char_data, tmp_path, max_iters=5))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    left = [".checkpoint.pt.k2j4h1x9.tmp", ".best_checkpoint.pt.4242.link.tmp", ".final_checkpoint.pt.ab.tmp",
            ".checkpoint_iter_5.pt.zz.tmp"]
    others = [".notes.txt.tmp", "checkpoint.pt.tmp", "mine.tmp", ".checkpoint.pt.x.tmp.bak"]  # not ours
    for name in left + others:
        (ckpt / name).write_bytes(b"PK half a checkpoint")
    (ckpt / ".checkpoint.pt.d.tmp").mkdir()  # a folder is nobody's unfinished write either
    others.append(".checkpoint.pt.d.tmp")
    train(tiny(char_data, tmp_path, max_iters=10, init_from="resume" if resume else "scratch"))
    names = {p.name for p in ckpt.iterdir()}
    assert not names & set(left) and set(others) <= names


def test_tensorboard_events_of_a_resumed_run(resume_runs):
    _, split_dir, _, first, second = resume_runs
    assert first["run_dir"] == second["run_dir"]  # the resumed run continues the same directory
    steps, acc = event_steps(second["run_dir"])
    for tag in ("train/loss", "lr", "grad_norm"):
        assert steps[tag] == list(range(1, 41)), tag  # every step once: none duplicated, none reset
    # a rate needs a step that did not compile: none for the first step of either run, which is logged alone
    first_steps = [1, second["resumed_from"] + 1]
    for tag in ("tokens_per_sec", "flops_per_sec"):
        assert steps[tag] == [i for i in range(1, 41) if i not in first_steps], tag
    assert steps["val/loss"] == steps["train/eval_loss"] == [0, 10, 20, 30, 40]
    assert "mfu" not in steps  # no peak is known for a CPU: FLOP/s instead
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert losses == pytest.approx({**first["losses"], **second["losses"]})
    evals = {**first["evals"], **second["evals"]}
    for tag, split in (("val/loss", "val"), ("train/eval_loss", "train")):
        assert {e.step: e.value for e in acc.Scalars(tag)} == pytest.approx({i: e[split] for i, e in evals.items()})
    config = tiny(split_dir, split_dir, max_iters=40)  # the schedule of resume_runs
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([get_lr(i, config) for i in range(40)])
    assert max(e.value for e in acc.Scalars("grad_norm")) > config.grad_clip  # the norm before clipping
    assert [e.step for e in acc.Tensors("sample/text_summary")] == [0, 10, 20, 30, 40]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    assert "_hparams_/session_end_info" not in acc.PluginTagToContent("hparams")  # no "success" before the end


def test_tensorboard_runs_of_resumes_into_the_same_or_another_log_folder(char_data, tmp_path, monkeypatch):
    """--log_dir=runs after the default ./runs continues the same run; another folder starts a run with its
    own HPARAMS; settings a resumed command changed are listed on the TEXT page."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    def plugins(run_dir):
        acc = EventAccumulator(run_dir)
        acc.Reload()
        return acc

    monkeypatch.chdir(tmp_path)
    first = train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, log_dir="./runs"))
    second = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, log_dir="runs", learning_rate=5e-3))
    assert second["run_dir"] == first["run_dir"] and len(list((tmp_path / "runs").iterdir())) == 1
    acc = plugins(first["run_dir"])
    hp = metadata.parse_session_start_info_plugin_data(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).hparams
    assert (hp["device"].string_value, hp["dtype"].string_value, hp["compile"].bool_value) == ("cpu", "float32", False)
    assert (hp["world_size"].number_value, hp["backend"].string_value) == (1, "none")
    assert hp["learning_rate"].number_value == 1e-2  # TensorBoard keeps a run's first hyperparameters
    assert "custom_scalars" in acc.ActivePlugins()  # the train and val losses on one chart
    changes = acc.Tensors("config_changes/text_summary")
    assert [e.step for e in changes] == [5]  # the first step of the resumed run
    text = changes[0].tensor_proto.string_val[0].decode()
    assert "resumed at iteration 4 with:" in text and "learning_rate: 0.01 -> 0.005" in text
    assert "max_iters: 4 -> 6" in text and "log_dir" not in text  # the same folder, written otherwise
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the same folder named from another working folder
    again = train(tiny(char_data, tmp_path, max_iters=7, eval_interval=2, log_dir="../runs"))
    assert Path(again["run_dir"]).resolve() == Path(tmp_path / first["run_dir"]).resolve()
    monkeypatch.chdir(tmp_path)
    third = train(tiny(char_data, tmp_path, max_iters=8, eval_interval=2, log_dir="other_runs"))
    assert Path(third["run_dir"]).resolve().parent == tmp_path / "other_runs"
    assert "hparams" in plugins(third["run_dir"]).ActivePlugins()  # a run of its own, listed on HPARAMS
    assert len(list((tmp_path / "runs").iterdir())) == 1 and list((tmp_path / "sub").iterdir()) == []


def test_a_resume_says_what_its_command_changed_and_a_finished_one_leaves_no_tensorboard_run(char_data, tmp_path,
                                                                                             capsys, monkeypatch):
    """Settings a resumed command changes are said on the console too (--preset given again puts its own
    learning rate back over the first run's flag, with nothing but the TEXT page to show it). A finished run
    resumed into another --log_dir trains nothing: no TensorBoard run of the hyperparameters alone, however
    often the command is run."""
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))
    train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2))
    out = capsys.readouterr().out
    assert "settings this command changed: max_iters: 4 -> 6\n" in out
    train(tiny(char_data, tmp_path, max_iters=8, eval_interval=2, learning_rate=5e-3))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("settings this command changed"))
    assert "learning_rate: 0.01 -> 0.005" in line and "max_iters: 6 -> 8" in line
    train(tiny(char_data, tmp_path, max_iters=8, eval_interval=2, learning_rate=5e-3))
    assert "settings this command changed" not in capsys.readouterr().out
    (tmp_path / "sub").mkdir()  # the same folders and data set, written from another working folder
    monkeypatch.chdir(tmp_path / "sub")
    train(tiny(os.path.relpath(char_data), tmp_path, max_iters=9, eval_interval=2, learning_rate=5e-3,
               checkpoint_dir="../ckpt", log_dir="../runs"))
    assert "\nsettings this command changed: max_iters: 8 -> 9\n" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "branch")  # a copy is another folder: said
    train(tiny(char_data, tmp_path, max_iters=9, eval_interval=2, learning_rate=5e-3,
               checkpoint_dir=str(tmp_path / "branch")))
    assert f"checkpoint_dir: '../ckpt' -> {str(tmp_path / 'branch')!r}" in capsys.readouterr().out
    for _ in range(2):
        train(tiny(char_data, tmp_path, max_iters=9, eval_interval=2, learning_rate=5e-3,
                   log_dir=str(tmp_path / "other_runs")))
        assert "already trained for 9 iterations" in capsys.readouterr().out
    assert not (tmp_path / "other_runs").exists()
    (tmp_path / "other_runs").mkdir()  # a folder the user made stays, empty
    train(tiny(char_data, tmp_path, max_iters=9, eval_interval=2, learning_rate=5e-3,
               log_dir=str(tmp_path / "other_runs")))
    assert list((tmp_path / "other_runs").iterdir()) == []
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_a_copied_checkpoint_folder_resumes_into_a_tensorboard_run_of_its_own(char_data, tmp_path):
    """Two branches of one run (the folder copied, each resumed with other settings) must not share a TensorBoard
    run: the second would purge the first one's later steps. A moved folder goes on with its run."""
    first = train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))
    shutil.copytree(tmp_path / "ckpt", tmp_path / "branch")
    branch = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, learning_rate=5e-3,
                        checkpoint_dir=str(tmp_path / "branch")))
    assert branch["resumed_from"] == 4 and branch["run_dir"] != first["run_dir"]
    assert Path(branch["run_dir"]).name.endswith("_branch")
    assert sorted(event_steps(branch["run_dir"])[0]["train/loss"]) == [5, 6]
    original = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2))
    assert original["run_dir"] == first["run_dir"]
    assert sorted(event_steps(first["run_dir"])[0]["train/loss"]) == [1, 2, 3, 4, 5, 6]
    (tmp_path / "ckpt").rename(tmp_path / "moved")
    moved = train(tiny(char_data, tmp_path, max_iters=8, eval_interval=2, checkpoint_dir=str(tmp_path / "moved")))
    assert moved["run_dir"] == first["run_dir"]


def test_a_resume_run_again_after_a_crash_lists_its_changed_settings_once(char_data, tmp_path, monkeypatch):
    """A resumed run with changed settings that crashes before its first checkpoint, run again: one entry on
    the TEXT page, not one per try."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    import train as train_module
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))

    def crash(*args, **kwargs):
        raise Crash
    monkeypatch.setattr(train_module, "forward_backward", crash)
    with pytest.raises(Crash):
        train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, learning_rate=5e-3))
    monkeypatch.undo()
    summary = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, learning_rate=5e-3))
    acc = EventAccumulator(summary["run_dir"])
    acc.Reload()
    changes = acc.Tensors("config_changes/text_summary")
    assert [e.step for e in changes] == [5]
    assert "learning_rate: 0.01 -> 0.005" in changes[0].tensor_proto.string_val[0].decode()


def test_runs_started_in_the_same_second_get_their_own_tensorboard_run(tmp_path, monkeypatch):
    from train import new_run_dir
    import train as train_module
    monkeypatch.setattr(train_module.time, "strftime", lambda fmt: "20261126-120000")
    made = [new_run_dir(str(tmp_path / "runs"), str(tmp_path / "data" / "char"), "./checkpoints") for _ in range(3)]
    assert [p.name for p in made] == ["20261126-120000_char", "20261126-120000_char-1", "20261126-120000_char-2"]
    assert all(p.is_dir() for p in made)
    # a sweep's runs are told apart by their checkpoint folders, in TensorBoard's list of runs too
    made = [new_run_dir(str(tmp_path / "runs"), str(tmp_path / "data" / "char"), f"checkpoints/lr{lr}/")
            for lr in ("1e-3", "3e-4")]
    assert [p.name for p in made] == ["20261126-120000_char_lr1e-3", "20261126-120000_char_lr3e-4"]
    # a long folder name (here 3-byte characters) is cut to whole characters, so that the run can still start
    long = new_run_dir(str(tmp_path / "runs"), str(tmp_path / "data" / ("字" * 60)), "checkpoints/" + "x" * 250)
    assert long.is_dir() and long.name == "20261126-120000_" + "字" * 60 + "_" + "x" * 19
    long = new_run_dir(str(tmp_path / "runs"), str(tmp_path / "data" / ("字" * 84)), "checkpoints/" + "x" * 250)
    assert long.is_dir() and long.name == "20261126-120000_" + "字" * 66  # not the half of the 67th
    assert len(long.name.encode()) <= 255 - len("-999")


def test_a_resumed_runs_event_file_sorts_after_the_one_it_continues(tmp_path):
    from train import Logger
    names = []
    for _ in range(3):  # within the same second, as a quick stop and resume in one process can be
        log = Logger(True, tmp_path, purge_step=None)
        log.scalars(1, x=1.0)
        log.close()
        names.append(max(set(p.name for p in tmp_path.iterdir()) - set(names)))
    assert sorted(names) == names and len({n.split(".")[3] for n in names}) == 3
    # a file from a clock an hour ahead (another machine) is not waited for
    (tmp_path / f"events.out.tfevents.{int(time.time()) + 3600}.other.1.0").write_bytes(b"")
    t0 = time.monotonic()
    log = Logger(True, tmp_path, purge_step=None)
    log.scalars(1, x=1.0)  # the event file is opened here
    log.close()
    assert time.monotonic() - t0 < 1.5
    assert len(list(tmp_path.iterdir())) == 5
    Logger(True, tmp_path, purge_step=None).close()  # nothing written: no empty event file either
    assert len(list(tmp_path.iterdir())) == 5


def test_resume_between_log_steps_logs_the_same_losses(char_data, tmp_path):
    kw = dict(max_iters=12, log_interval=4, eval_interval=6, lr_decay_iters=12)
    straight = train(tiny(char_data, tmp_path / "a", **kw))
    train(tiny(char_data, tmp_path / "b", **{**kw, "max_iters": 6}))  # stops between log steps 4 and 8
    resumed = train(tiny(char_data, tmp_path / "b", **kw))
    assert resumed["resumed_from"] == 6 and list(resumed["losses"]) == [8, 12]
    assert resumed["losses"] == {k: straight["losses"][k] for k in (8, 12)}  # iteration 8 averages 5..8
    # resumed at 6 with log_interval 2: 5 and 6 were summed for a log step at 8, and the interval now due
    # began after 6. The sum cannot be split, so it is left out: the means are those of a run logged every 2
    train(tiny(char_data, tmp_path / "b7", **{**kw, "max_iters": 7}))  # one step before a log step: 5..7 kept
    assert train(tiny(char_data, tmp_path / "b7", **kw))["losses"][8] == straight["losses"][8]
    every2 = train(tiny(char_data, tmp_path / "c", **{**kw, "log_interval": 2}))
    train(tiny(char_data, tmp_path / "d", **{**kw, "max_iters": 6}))
    resumed = train(tiny(char_data, tmp_path / "d", **{**kw, "log_interval": 2}))
    assert resumed["losses"] == {k: every2["losses"][k] for k in (8, 10, 12)}


def test_resume_takes_the_checkpoint_settings_the_command_leaves_out(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=5))
    # config.py's defaults (warmup_iters 2000, learning_rate 6e-4) would contradict these flags; the
    # checkpoint's (warmup_iters 2, learning_rate 1e-2) do not
    config, explicit = parse_args([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--max_iters=8", "--lr_decay_iters=8",
                                   "--min_lr=2e-3", "--weight_decay=0.0", "--beta2=0.5"])
    summary = train(config, explicit)
    assert summary["resumed_from"] == 5 and summary["iter_num"] == 8
    ckpt = load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")
    assert ckpt["config"]["warmup_iters"] == 2 and ckpt["config"]["min_lr"] == 2e-3
    # the optimizer runs with the new settings, not those stored with its state
    assert [(g["weight_decay"], g["betas"]) for g in ckpt["optimizer"]["param_groups"]] == [(0.0, (0.9, 0.5))] * 2
    with pytest.raises(UserError, match=r"lr_decay_iters \(1\) must exceed warmup_iters \(2\)"):
        train(*parse_args([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--max_iters=9", "--lr_decay_iters=1"]))


def test_resuming_on_data_of_another_tokenizer_is_refused(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=5))
    other = write_data(tmp_path / "other", CharTokenizer.from_text("abc \n"), "abc cab\n" * 300)
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    with pytest.raises(CheckpointError, match=r"was trained on data tokenised with 'char' \(vocab \d+\), but .*other "
                                              r"holds 'char' \(vocab 5\)"):
        train(tiny(other, tmp_path, max_iters=10))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before


def test_resuming_on_other_characters_of_the_same_count_is_refused(char_data, tmp_path):
    """Same kind, same vocabulary size, other characters: the ids would stand for other text."""
    train(tiny(char_data, tmp_path, max_iters=5))
    chars = "".join(load_tokenizer(char_data / "tokenizer.json").chars)
    swapped = chars.replace("q", "Q")  # one character of the data set's for a new one
    assert swapped != chars and len(set(swapped)) == len(chars)
    other = write_data(tmp_path / "other", CharTokenizer.from_text(swapped), swapped * 200)
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    with pytest.raises(CheckpointError, match=r"was trained with another char tokenizer than the one .*other was "
                                              r"prepared with: the vocabulary size is the same, .*--tokenizer_file "
                                              rf"{re.escape(str(char_data / 'tokenizer.json'))} --output_dir NEW_FOLDER\)"):
        train(tiny(other, tmp_path, max_iters=10))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    # the same tokenizer in another folder (the data set prepared again, or copied) resumes
    shutil.copytree(char_data, tmp_path / "copy")
    assert train(tiny(tmp_path / "copy", tmp_path, max_iters=10))["resumed_from"] == 5


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(char_data, tmp_path, monkeypatch):
    import errno
    import train as train_module
    train(tiny(char_data, tmp_path, max_iters=5))
    before = (tmp_path / "ckpt" / "checkpoint.pt").read_bytes()

    def full_disk(path, ckpt):  # what torch.save raises when the disk fills up under it
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 19088064 vs 19087952")

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    with pytest.raises(TrainingError, match=r"^cannot write .*ckpt/(best_)?checkpoint.pt at iteration 10: No space "
                                            r"left on device; the checkpoints written before are whole"):
        train(tiny(char_data, tmp_path, max_iters=20, eval_interval=10))
    assert (tmp_path / "ckpt" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(TrainingError, match=r"No space left on device; nothing was saved before\. .* it starts over$"):
        train(tiny(char_data, tmp_path / "new", max_iters=20, eval_interval=10))  # its first save fails
    monkeypatch.setattr(train_module, "save_checkpoint", lambda path, ckpt: 1 / 0)  # not a write error: as it is
    with pytest.raises(ZeroDivisionError):
        train(tiny(char_data, tmp_path, max_iters=20, eval_interval=10))

    def torch_error(path, ckpt):  # a RuntimeError with no OSError behind it is no full disk either
        raise RuntimeError("boom")
    monkeypatch.setattr(train_module, "save_checkpoint", torch_error)
    with pytest.raises(RuntimeError, match="^boom$"):
        train(tiny(char_data, tmp_path, max_iters=20, eval_interval=10))


def test_a_resume_on_a_data_set_prepared_again_says_so(char_data, tmp_path, capsys, monkeypatch):
    """The same tokenizer, other text: the run goes on, and says that its val losses compare with nothing."""
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    train(tiny(data, tmp_path, max_iters=5))
    shutil.copytree(data, tmp_path / "copy")  # the same data set in another folder: nothing to say
    assert train(tiny(tmp_path / "copy", tmp_path, max_iters=6))["resumed_from"] == 5
    assert "resuming from" in (out := capsys.readouterr().out) and "note:" not in out
    shutil.rmtree(data)
    text = "to be or not to be that is the question\n" * 100
    chars = load_tokenizer(char_data / "tokenizer.json")
    write_data(data, chars, text)  # as the helper writes it, meta.json has token counts but no source_sha256
    assert train(tiny(data, tmp_path, max_iters=8))["resumed_from"] == 6
    assert re.search(rf"note: {re.escape(str(data))} is not the data set the checkpoint was trained on "
                     r"\(train_tokens, val_tokens differ\): training goes on with this one, and the val loss is "
                     r"not comparable with the best so far \(\d", capsys.readouterr().out)
    # prepare_data.py records the source's hash: other text of the same token counts is noticed by it
    for sha, iters in (("a" * 64, 10), ("b" * 64, 12)):
        meta = json.loads((data / "meta.json").read_text())
        (data / "meta.json").write_text(json.dumps({**meta, "source_sha256": sha}))
        train(tiny(data, tmp_path, max_iters=iters))
    assert "(source_sha256 differ): training goes on" in capsys.readouterr().out
    # a crash before any evaluation after a step: no best so far, so nothing to be not comparable with
    fail_at_step(monkeypatch, 3, RuntimeError("the machine went down"))
    with pytest.raises(RuntimeError, match="went down"):
        train(tiny(char_data, tmp_path / "early", max_iters=20, eval_interval=100, save_interval=2))
    monkeypatch.undo()
    train(tiny(data, tmp_path / "early", max_iters=3, eval_interval=100, save_interval=2))
    out = capsys.readouterr().out
    assert "at iteration 2 (no val loss measured since training began)\n" in out
    assert re.search(r"differ\): training goes on with this one\n", out)


def test_a_resume_that_draws_other_val_batches_says_its_val_loss_is_not_comparable(char_data, tmp_path, capsys):
    """--eval_iters, --batch_size or --seed changed on resume: the evaluations measure other val batches, so a
    better model may score above the best so far and best_checkpoint.pt stay on the worse one. Said once."""
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))
    for iters, changes, said in ((6, dict(eval_iters=3), "--eval_iters"), (8, dict(eval_iters=3), None),
                                 (10, dict(eval_iters=3, batch_size=2, seed=7), "--batch_size and --seed")):
        capsys.readouterr()
        train(tiny(char_data, tmp_path, max_iters=iters, eval_interval=2, **changes))
        out = capsys.readouterr().out
        if said is None:
            assert "note:" not in out
        else:
            assert re.search(rf"\nnote: {said} changed since the best so far, so the evaluations draw other val "
                             r"batches, and the val loss "
                             r"is not comparable with the best so far \(\d\.\d{4}\), which best_checkpoint.pt keeps "
                             r"until a lower one\n", out)


def test_a_resume_says_when_the_val_loss_is_measured_otherwise_than_the_best_so_far(char_data, tmp_path, capsys):
    """The val split's 4,386 targets fit in 69 batches of 4 x 16: with --eval_iters=100 it is swept, and its loss
    is its exact mean whatever the seed or batch size. A note says when the evaluations measure otherwise than the
    best so far was measured: on random batches against a sweep, or the other way round, also for a checkpoint
    made before sweeps (no best_measure: its settings' random batches)."""
    with BatchLoader(char_data, 16, 4) as loader:
        assert loader.sweep_batches("val") == 69
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2, eval_iters=69))  # swept: exactly as many
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["progress"]["best_measure"] == {"swept": True}
    not_comparable = r", so the val loss is not comparable with the best so far \(\d\.\d{4}\)"
    swept, random_50 = "every target of the val split once", "50 random val batches"
    for iters, changes, said in (
            (4, dict(eval_iters=150, seed=7, batch_size=2), None),  # swept both times (138 batches): comparable
            (6, dict(eval_iters=50), f"now take {random_50}, and the best so far was measured on {swept}"),
            (8, dict(eval_iters=100), None),  # swept again, as the best still was
    ):
        if iters == 6:  # a best the random batches cannot beat: it stays the swept one, to compare with at 8
            ckpt = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
            save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", {**ckpt, "best_val_loss": 0.001})
        capsys.readouterr()
        train(tiny(char_data, tmp_path, max_iters=iters, eval_interval=2, **changes))
        out = capsys.readouterr().out
        assert "note:" not in out if said is None else re.search(rf"\nnote: the evaluations {said}{not_comparable}", out)
        assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["progress"]["best_measure"] == {"swept": True}
    ckpt = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    del ckpt["progress"]["best_measure"]  # as an earlier version wrote it, evaluating on random batches
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", ckpt)
    train(tiny(char_data, tmp_path, max_iters=10, eval_interval=2, eval_iters=100))
    assert re.search(rf"\nnote: the evaluations now take {swept}, and the best so far was measured on 100 random val "
                     rf"batches{not_comparable}", capsys.readouterr().out)


def test_a_data_set_prepared_again_with_other_characters_points_to_the_checkpoints_tokenizer(char_data, tmp_path):
    """Its tokenizer.json is now the other one: the advice is the tokenizer the checkpoint holds."""
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    train(tiny(data, tmp_path, max_iters=5))
    shutil.rmtree(data)
    chars = "".join(load_tokenizer(char_data / "tokenizer.json").chars).replace("q", "Q")
    write_data(data, CharTokenizer.from_text(chars), chars * 200)
    with pytest.raises(CheckpointError, match=r"prepare this text with the checkpoint's own tokenizer, exported with "
                                              r"the model .* --tokenizer_file EXPORT/toolkit_tokenizer.json"):
        train(tiny(data, tmp_path, max_iters=8))
    # the same from another folder: the recorded one no longer holds the checkpoint's tokenizer either
    data.rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"prepare this text with the checkpoint's own tokenizer"):
        train(tiny(tmp_path / "elsewhere", tmp_path, max_iters=8))


def test_a_moved_data_set_is_named_as_the_checkpoints(char_data, tmp_path):
    """The folder recorded in the checkpoint is gone: say so, how to point to it, and the command the
    checkpoint recorded for preparing it (a char data set here, not the generic GPT-2 one)."""
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["command"] = "python prepare_data.py --dataset custom --input t.txt --tokenizer char"  # as it records it
    (data / "meta.json").write_text(json.dumps(meta))
    train(tiny(data, tmp_path, max_iters=5))
    data.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"the data set .*checkpoint.pt was trained on, --data_dir=.*data \(recorded "
                                        r"in the checkpoint\), is not there. If it moved, give --data_dir=NEW_FOLDER; "
                                        r"else prepare it again with: python prepare_data.py --dataset custom --input "
                                        r"t.txt --tokenizer char --output_dir .*data$"):
        train(*parse_args([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--max_iters=8", "--compile=False"]))
    config, explicit = parse_args([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--max_iters=8", "--compile=False",
                                   f"--data_dir={tmp_path / 'moved'}"])
    assert train(config, explicit)["resumed_from"] == 5


def test_a_resume_with_another_log_dir_logs_there(char_data, tmp_path):
    first = train(tiny(char_data, tmp_path, max_iters=5))
    second = train(tiny(char_data, tmp_path, max_iters=10, log_dir=str(tmp_path / "new_runs")))
    assert second["resumed_from"] == 5 and Path(second["run_dir"]).parent == tmp_path / "new_runs"
    assert Path(first["run_dir"]).parent == tmp_path / "runs"


def test_a_resume_that_drops_the_biases_is_named_as_a_contradiction(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=1))
    with pytest.raises(CheckpointError, match=r"this command contradicts: bias=False \(checkpoint: True\)"):
        train(tiny(char_data, tmp_path, max_iters=2, bias=False))
    # values a preset gave are named as such: the user typed none of them
    with pytest.raises(CheckpointError, match=r"contradicts: block_size=64 \(checkpoint: 16\), .* \(set by a flag, a "
                                              r"config file or a --preset\)\. Drop those to continue that run"):
        main(["--preset=shakespeare-char-cpu", f"--data_dir={char_data}", f"--checkpoint_dir={tmp_path / 'ckpt'}",
              f"--log_dir={tmp_path / 'runs'}", "--max_iters=2"])


def test_resuming_weights_that_do_not_fit_is_one_line(char_data, tmp_path):
    config = tiny(char_data, tmp_path, max_iters=5)
    train(config)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["lm_head.weight"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: its weights do not fit the model its config "
                                              r"describes: 1 missing \(e.g. lm_head.weight\)$"):
        train(tiny(char_data, tmp_path, max_iters=10))


def test_a_checkpoint_without_training_state_is_not_resumed(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=5))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    save_checkpoint(path, {k: ckpt[k] for k in ("model", "config", "meta", "tokenizer")})  # stripped to share
    with pytest.raises(CheckpointError, match="holds no training state .optimizer, iter_num, best_val_loss missing"):
        train(tiny(char_data, tmp_path, max_iters=10))


def test_resume_checks_the_folders_of_the_run_it_continues(char_data, tmp_path, monkeypatch):
    train(tiny(char_data, tmp_path, max_iters=5, log_dir=str(tmp_path / "logs")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the default log_dir would be")
    config, explicit = parse_args([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--max_iters=8", "--lr_decay_iters=8"])
    assert train(config, explicit)["iter_num"] == 8  # the run's own log_dir, not the default ./runs
    shutil.rmtree(tmp_path / "logs")
    (tmp_path / "logs").write_text("now a file")
    with pytest.raises(UserError, match=r"--log_dir=.*logs is a file"):
        train(*parse_args([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--max_iters=10", "--lr_decay_iters=10"]))


@pytest.mark.parametrize("name", ["checkpoint_dir", "log_dir"])
def test_a_file_where_a_folder_goes_is_refused_before_anything_moves(char_data, tmp_path, name):
    train(tiny(char_data, tmp_path, max_iters=5))
    (tmp_path / "afile").write_text("x")
    before = sorted(os.listdir(tmp_path / "ckpt"))
    config = tiny(char_data, tmp_path, max_iters=5, init_from="scratch", **{name: str(tmp_path / "afile" / "sub")})
    with pytest.raises(UserError, match=f"--{name}=.* is inside .*afile'?, which is a file"):
        train(config)
    assert sorted(os.listdir(tmp_path / "ckpt")) == before  # nothing moved aside


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_a_data_folder_named_in_gbk_trains_and_logs(char_data, tmp_path):
    """A folder name in GBK bytes reaches Python as lone surrogates, which TensorBoard cannot write: the run
    folder named after the data shows U+FFFD for them, and the hyperparameters too."""
    data = tmp_path / "\udcd6\udcd0\udcce\udcc4"  # 中文 in GBK
    shutil.copytree(char_data, data)
    summary = train(tiny(data, tmp_path, max_iters=5))
    run_dir = Path(summary["run_dir"])
    assert run_dir.name.endswith("_\ufffd\ufffd\ufffd\ufffd_ckpt")  # and the checkpoint folder's name
    steps, acc = event_steps(str(run_dir))
    assert steps["train/loss"] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"--log_dir=.*\ufffdruns is not UTF-8 .* TensorBoard writes only UTF-8"):
        train(tiny(data, tmp_path / "b", log_dir=str(tmp_path / "\udcd6runs")))
    assert not (tmp_path / "b").exists()


def test_a_log_dir_that_cannot_be_made_stops_before_checkpoints_move(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=2))
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # /proc takes no new folders: root passes the permission check, so the mkdir itself fails; another user
    # is stopped by the check
    refused = (r"cannot make --log_dir folder /proc/no_runs|log_dir=/proc/no_runs is not|"
               r"--log_dir=/proc/no_runs would be made inside '/proc', which is not writable")
    with pytest.raises(ConfigError, match=refused):
        train(tiny(char_data, tmp_path, max_iters=2, init_from="scratch", log_dir="/proc/no_runs"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before  # nothing moved aside
    with pytest.raises(ConfigError, match=refused):  # nor left behind
        train(tiny(char_data, tmp_path, max_iters=2, log_dir="/proc/no_runs", checkpoint_dir=str(tmp_path / "n" / "c")))
    assert not (tmp_path / "n").exists()


def test_a_link_to_nothing_where_a_folder_goes(tmp_path):
    from utils import folder_problem
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert folder_problem(tmp_path / "gone") == "is a link to nothing"
    assert folder_problem(tmp_path / "new" / "deeper") is None
    (tmp_path / "f").write_text("x")
    assert folder_problem(tmp_path / "f" / "sub") == f"is inside {str(tmp_path / 'f')!r}, which is a file"


def test_infinite_gradients_with_a_finite_loss_stop_training(char_data, tmp_path, monkeypatch):
    import train as train_module
    real = train_module.optimizer_step

    def poisoned(params, *args, **kwargs):
        params[0].grad.fill_(float("inf"))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", poisoned)
    with pytest.raises(TrainingError, match="the gradient norm or the weights became NaN or infinite by iteration 1;"):
        train(tiny(char_data, tmp_path, max_iters=5))
    # the advice against float16 only where the run is in float16 (whose scaler skips infinite gradients: NaN
    # weights instead)
    def damaging(params, *args, **kwargs):
        norm = real(params, *args, **kwargs)
        params[0].data.fill_(math.nan)
        return norm
    monkeypatch.setattr(train_module, "optimizer_step", damaging)
    with pytest.raises(TrainingError) as e:
        train(tiny(char_data, tmp_path, max_iters=5, init_from="scratch"))
    assert str(e.value).endswith("Lower --learning_rate (now 0.01) or keep --grad_clip on")
    with pytest.raises(TrainingError) as e:
        train(tiny(char_data, tmp_path, max_iters=5, init_from="scratch", dtype="float16"))
    assert str(e.value).endswith("--grad_clip on, or use --dtype=bfloat16 instead of float16")


def test_no_checkpoint_is_written_with_non_finite_weights(char_data, tmp_path, monkeypatch):
    import train as train_module
    real = train_module.optimizer_step

    def poisoned(params, optimizer, *args, **kwargs):
        if optimizer.state and next(iter(optimizer.state.values()))["step"] == 4:  # the 5th step
            params[0].grad.fill_(float("inf"))
        return real(params, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", poisoned)
    # no clipping: the gradient norm is measured on log steps only, and the save comes first
    with pytest.raises(TrainingError, match="by iteration 5;"):
        train(tiny(char_data, tmp_path, max_iters=20, grad_clip=0.0, save_interval=5, log_interval=10,
                   eval_interval=10))
    assert not (tmp_path / "ckpt" / "checkpoint_iter_5.pt").exists()


def test_config_file_may_import(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("from math import sqrt\nimport os.path\nfrom torch import bfloat16 as bf16\n"
                   "n_layer = int(sqrt(16))\ndtype = bf16\n")
    config, explicit = parse_args([str(cfg)])
    assert config.n_layer == 4 and config.dtype == "bfloat16" and explicit == {"n_layer", "dtype"}
    # an import that binds a field's name is a setting; one inside a function binds nothing here
    cfg.write_text("from torch import bfloat16 as dtype\ndef helper():\n    from os import sep as dropout\n"
                   "dropout = 0.3\nfrom math import *\nn_layer = floor(2.5)\n")
    config, explicit = parse_args([str(cfg)])
    assert (config.dtype, config.dropout, config.n_layer) == ("bfloat16", 0.3, 2)
    cfg.write_text("from math import *\nlearning_rat = 1e-3\n")
    with pytest.raises(UserError, match="unknown config key 'learning_rat'"):
        parse_args([str(cfg)])


def test_resume_refuses_a_contradicting_model_shape(resume_runs, char_data):
    straight_dir, *_ = resume_runs
    config = tiny(char_data, straight_dir, n_layer=3, max_iters=50)
    before = sorted(os.listdir(straight_dir / "ckpt"))
    with pytest.raises(CheckpointError, match=r"n_layer=3 \(checkpoint: 2\)"):
        train(config)
    assert sorted(os.listdir(straight_dir / "ckpt")) == before


def test_scratch_moves_old_checkpoints_aside(char_data, tmp_path):
    train(tiny(char_data, tmp_path, max_iters=5, save_interval=5))
    old = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    summary = train(tiny(char_data, tmp_path, max_iters=5, init_from="scratch", seed=7))
    assert summary["resumed_from"] is None
    [moved] = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    assert moved.name.startswith("previous-")
    kept = load_checkpoint(moved / "checkpoint.pt")
    assert all(torch.equal(kept["model"][k], old["model"][k]) for k in old["model"])
    assert (moved / "checkpoint_iter_5.pt").is_file() and not (tmp_path / "ckpt" / "checkpoint_iter_5.pt").exists()
    assert len(list((tmp_path / "runs").iterdir())) == 2  # the new run has its own TensorBoard directory


def test_crash_mid_save_keeps_the_previous_checkpoint(char_data, tmp_path, monkeypatch):
    train(tiny(char_data, tmp_path, max_iters=5))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(TrainingError, match="No space left on device; the checkpoints written before are whole"):
        train(tiny(char_data, tmp_path, max_iters=10))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["iter_num"] == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["best_checkpoint.pt", "checkpoint.pt",
                                                             "final_checkpoint.pt"]  # no temporary files left


class FastGrowingScaler(torch.amp.GradScaler):
    """Doubles its scale after every good step, so float16 overflows every few steps on the CPU too."""

    def __init__(self, device="cuda", **kwargs):
        super().__init__(device, growth_interval=1, **kwargs)


def test_float16_scales_its_loss_skips_overflows_and_resumes_exactly(char_data, tmp_path, monkeypatch, capsys):
    """The GradScaler path: its state in the checkpoint and back, overflowing steps skipped (not an error),
    and the logged gradient norm unscaled (float32's at the first step, before the runs diverge)."""
    monkeypatch.setattr(torch.amp, "GradScaler", FastGrowingScaler)
    kw = dict(dtype="float16", max_iters=12, eval_interval=6)
    straight = train(tiny(char_data, tmp_path / "straight", **kw))
    # emulated on most CPUs: a run 12-19x slower than float32 says so (this one is on the CPU)
    assert ("warning: float16 on a CPU is emulated by most processors and runs many times slower than float32 (12-19x "
            "in training on a 2-core EPYC); use --dtype=float32, or bfloat16 where the CPU has it\n"
            in capsys.readouterr().out)
    train(tiny(char_data, tmp_path / "split", **{**kw, "max_iters": 6}))
    split = train(tiny(char_data, tmp_path / "split", **kw))
    assert list(split["losses"]) == list(range(7, 13))
    assert {k: straight["losses"][k] for k in split["losses"]} == split["losses"]
    a = load_checkpoint(tmp_path / "straight" / "ckpt" / "final_checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "ckpt" / "final_checkpoint.pt")
    assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["growth_interval"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    _, acc = event_steps(straight["run_dir"])
    norms = [e.value for e in acc.Scalars("grad_norm")]
    assert any(math.isinf(n) for n in norms)  # overflowing steps were taken in stride
    monkeypatch.undo()
    _, acc32 = event_steps(train(tiny(char_data, tmp_path / "fp32", max_iters=1))["run_dir"])
    assert norms[0] == pytest.approx(acc32.Scalars("grad_norm")[0].value, rel=0.02)


@pytest.mark.parametrize("log_interval", [1, 100])  # caught at a log line, or only when saving
def test_nan_loss_stops_training_without_overwriting_checkpoints(char_data, tmp_path, monkeypatch, log_interval):
    forward = GPT.forward
    calls = {"train": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 7:  # iteration 7 on
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"NaN or infinite by iteration \d+; training stopped and no checkpoint "
                                            r"was overwritten \(.*checkpoint.pt holds the last good state\)"):
        train(tiny(char_data, tmp_path, max_iters=20, log_interval=log_interval))
    calls["train"] = 7  # from the first step on, in a fresh folder
    with pytest.raises(TrainingError, match=r"training stopped and no checkpoint was written\. Lower"):
        train(tiny(char_data, tmp_path / "fresh", max_iters=20, log_interval=log_interval))
    calls["train"] = 0  # with only checkpoint_iter_N.pt files before the NaN, the newest one is named
    with pytest.raises(TrainingError, match=r"no checkpoint was overwritten \(.*checkpoint_iter_6.pt holds"):
        train(tiny(char_data, tmp_path / "iters", max_iters=20, eval_interval=10, save_interval=2,
                   log_interval=log_interval))
    ckpt = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert ckpt["iter_num"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "ckpt" / "final_checkpoint.pt").exists()


def test_weights_only_refusal(char_data, tmp_path, capsys):
    config = tiny(char_data, tmp_path)
    (tmp_path / "ckpt").mkdir()
    # a pickled object other than tensors and plain data: loading it could run code
    torch.save({"model": {}, "config": {}, "payload": argparse_namespace()}, tmp_path / "ckpt" / "checkpoint.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(cli_flags(config) + ["--init_from=resume"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "arbitrary code" in err and len(err.strip().splitlines()) == 1


def argparse_namespace():
    import argparse
    return argparse.Namespace(x=1)


def write_pickle_protocol_2(path: Path) -> None:
    import pickle
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "config": {}, "payload": argparse_namespace()}, f, protocol=2)


def test_a_damaged_checkpoint_names_the_others_to_resume_from(char_data, tmp_path):
    kw = dict(max_iters=10, eval_interval=5, save_interval=5)
    train(tiny(char_data, tmp_path, **kw))
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint.pt").write_bytes((ckpt / "checkpoint.pt").read_bytes()[:5000])  # a disk that filled up
    with pytest.raises(CheckpointError) as e:
        train(tiny(char_data, tmp_path, **{**kw, "max_iters": 15}))
    q = shlex.quote(str(ckpt / "checkpoint.pt"))
    assert str(e.value).endswith(f"(truncated or not a PyTorch file?); move it aside (mv {q} {q}.damaged) and run "
                                 f"again to resume from the newest of the others (checkpoint_iter_5.pt, "
                                 f"checkpoint_iter_10.pt)"), str(e.value)
    (ckpt / "checkpoint.pt").rename(ckpt / "checkpoint.pt.damaged")
    assert train(tiny(char_data, tmp_path, **{**kw, "max_iters": 15}))["resumed_from"] == 10
    for p in ckpt.glob("checkpoint_iter_*.pt"):
        p.unlink()
    (ckpt / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(truncated or not a PyTorch file\?\); to resume from "
                                              r"best_checkpoint.pt instead, copy it over the damaged file: cp "):
        train(tiny(char_data, tmp_path, **{**kw, "max_iters": 20}))
    (ckpt / "best_checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match=r"file\?\); no other checkpoint to resume from is left: start over with "
                                              r"--init_from=scratch$"):
        train(tiny(char_data, tmp_path, **{**kw, "max_iters": 20}))


@pytest.mark.parametrize("name, write, message", [
    ("empty", lambda p: p.write_bytes(b""), "the file is empty"),
    ("text", lambda p: p.write_text("hello, this is not a checkpoint\n"), "KeyError"),
    # seeded bytes whose first is not pickle's GLOBAL opcode 'c' (which would read as a class name)
    ("random", lambda p: p.write_bytes(b"\x80" + random.Random(0).randbytes(4095)), "UnpicklingError"),
    ("truncated", lambda p: p.write_bytes(b"PK\x03\x04 half a checkpoint"), "RuntimeError"),
    # torch's reader raises an OSError without a file name for a checkpoint cut after its first kilobytes
    ("cut", lambda p: torch.save({"model": {"w": torch.zeros(20000)}, "config": {}}, p) or os.truncate(p, 5000),
     "OSError"),
])
def test_unreadable_checkpoint_is_reported_as_such(tmp_path, name, write, message):
    path = tmp_path / f"{name}.pt"
    write(path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ") and msg.endswith("(truncated or not a PyTorch file?)")
    assert message in msg and "arbitrary code" not in msg and "\n" not in msg


@pytest.mark.parametrize("write", [
    lambda p: torch.save({"model": {}, "config": {}, "payload": argparse_namespace()}, p),
    write_pickle_protocol_2,  # a plain pickle, not written by torch.save
])
def test_pickle_with_an_arbitrary_object_is_refused(tmp_path, write):
    path = tmp_path / "evil.pt"
    write(path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"refusing to load {path}: ") and "arbitrary code" in msg
    assert "GLOBAL argparse.Namespace" in msg and "\n" not in msg


def test_under_torchrun_an_input_error_is_printed_once_a_machine(monkeypatch):
    # a silent process waits before it exits, so that torchrun, which then ends the others, leaves the first process
    # of the machine the time to say the error
    import utils
    slept = []
    monkeypatch.setattr(utils.time, "sleep", slept.append)
    for local_rank, waits in (("1", [2]), ("0", [])):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        slept.clear()
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: (_ for _ in ()).throw(UserError("bad flag")))
        assert e.value.code == 2 and slept == waits
    monkeypatch.undo()
    code = "from utils import run_cli, UserError\ndef main():\n    raise UserError('bad flag')\nrun_cli(main)\n"
    for rank, local_rank, printed in (("0", "0", "error: bad flag\n"), ("1", "1", ""),
                                      ("8", "0", "error (rank 8): bad flag\n")):  # the second machine's first
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "RANK": rank, "LOCAL_RANK": local_rank})
        assert (r.returncode, r.stderr) == (2, printed)
    # an error of one process's own batch: only that process knows, so it says it whatever its rank
    code = "from utils import run_cli\nfrom data import DamagedBatchError\ndef main():\n    raise DamagedBatchError('bad')\nrun_cli(main)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RANK": "1", "LOCAL_RANK": "1"})
    assert (r.returncode, r.stderr) == (2, "error (rank 1): bad\n")


def test_a_signal_to_this_process_just_after_anothers_is_the_same_request(monkeypatch):
    """A preemption reaches the processes a moment apart: the one that hears of it from another
    process first must not take its own copy for a second Ctrl-C, which aborts without saving."""
    from train import stop_requested
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce",  # another rank received SIGTERM
                        lambda flags, **kwargs: flags.copy_(torch.tensor([signal.SIGTERM, 1])))
    stop = GracefulStop(verbose=False)
    assert stop_requested(stop) and stop.signum == signal.SIGTERM
    stop._handle(signal.SIGTERM, None)  # its own copy, 0 s later: no SystemExit
    assert stop.signum == signal.SIGTERM


@pytest.mark.parametrize("others, said", [([0, 0], None), ([signal.SIGINT, 1], "received SIGINT"),
                                          ([signal.SIGHUP, 1], "received SIGHUP"), ([0, 1], "found its data changed")])
def test_rank_0_names_why_another_process_stops(monkeypatch, capsys, others, said):
    from train import stop_requested
    sent = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    def all_reduce(flags, **kwargs):
        sent.append(flags.tolist())
        flags.copy_(torch.maximum(flags, torch.tensor(others)))
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop = GracefulStop(verbose=True)
    assert stop_requested(stop) == (said is not None) and sent == [[0, 0]]
    err = capsys.readouterr().err
    assert err == (f"another process {said}: stopping with it\n" if said else "")
    assert stop.signum == (None if said is None else others[0] or signal.SIGTERM)  # the exit code says it too
    stop = GracefulStop(verbose=True)  # what a process sends: the signal it received, or only that it stops
    stop._handle(signal.SIGHUP, None)
    stop_requested(stop)
    other = GracefulStop(verbose=True)
    other.request(signal.SIGTERM, "its data changed", between_steps=True)
    stop_requested(other)
    assert sent[1:] == [[signal.SIGHUP, 1], [0, 1]]


@pytest.mark.parametrize("env, warned", [({}, False), ({"TORCHELASTIC_RUN_ID": "x"}, True),
                                         ({"TORCHELASTIC_RUN_ID": "x", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}, False)])
def test_under_torchrun_the_stop_message_says_when_torchrun_kills(monkeypatch, capsys, env, warned):
    """torchrun sends SIGKILL 30 s after it forwards the signal: a longer save is lost, unless it was told to wait."""
    for name in ("TORCHELASTIC_RUN_ID", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    GracefulStop(verbose=True)._handle(signal.SIGINT, None)
    err = capsys.readouterr().err
    assert "SIGINT received: finishing this step" in err
    assert ("unless torchrun was started with a longer --shutdown-timeout, it kills the processes 30 s after" in err
            and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun" in err) == warned
    GracefulStop(verbose=True).request(13, "stdout was closed")  # no signal reached torchrun: no deadline runs
    assert capsys.readouterr().err == ("stdout was closed: finishing this step (or evaluation batch), then "
                                       "saving checkpoint.pt\n")


def test_processes_that_found_different_checkpoints_stop_with_a_reason():
    from train import check_same_start
    check_same_start([None, None], "ck")
    check_same_start([40, 40, 40], "ck")
    with pytest.raises(ConfigError, match=r"rank 0: iteration 40, rank 1: no checkpoint\); on several machines "
                                          r"it must be a folder that all of them share"):
        check_same_start([40, None], "ck")
    check_same_start([None, None], "ck", ["gpt2", "scratch"])  # the model comes from rank 0 anyway
    # one shared folder, but --init_from=scratch given to one process: the folder is not what to fix
    with pytest.raises(ConfigError, match=r"^the processes were given different --init_from \(rank 0: auto, rank 1: "
                                          r"scratch\), so they start from different places \(rank 0: iteration 40, "
                                          r"rank 1: no checkpoint\): give every process the same --init_from$"):
        check_same_start([40, None], "ck", ["auto", "scratch"])
    for same in (["auto", "auto"], ["/mnt/hf", "/nfs/hf"]):  # the same start (a model's path may differ): the folder
        with pytest.raises(ConfigError, match="on several machines"):
            check_same_start([40, None], "ck", same)


def test_processes_started_with_other_settings_stop_with_the_differences():
    from train import check_same_settings, rank_ranges, settings_of
    meta = {"tokenizer": "char", "vocab_size": 65, "train_tokens": 900, "val_tokens": 100, "source_sha256": "ab"}
    same = settings_of(GPT2Config(data_dir="/mnt/a", checkpoint_dir="/mnt/ck", device="cuda:0"), meta)
    check_same_settings([same, settings_of(GPT2Config(data_dir="/nfs/a", checkpoint_dir="/nfs/ck", device="cuda:1",
                                                      gradient_checkpointing=True, loss_chunk_rows=16), meta)])
    # (paths, devices and what only saves memory may differ from machine to machine)
    other = settings_of(GPT2Config(learning_rate=3e-2, max_iters=10), {**meta, "train_tokens": 800})
    with pytest.raises(ConfigError, match=r"different settings \(learning_rate: 0.0006 \(ranks 0-2, 4\), 0.03 "
                                          r"\(rank 3\); max_iters: 100000 \(ranks 0-2, 4\), 10 \(rank 3\); "
                                          r"the data's train_tokens: 900 \(ranks 0-2, 4\), 800 \(rank 3\)\): give"):
        check_same_settings([same, same, same, other, same])
    assert rank_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    check_same_settings([settings_of(GPT2Config(log_dir="/mnt/runs", init_from="/mnt/hf"), meta),
                         settings_of(GPT2Config(log_dir="/nfs/runs", init_from="/nfs/hf"), meta)])
    with pytest.raises(ConfigError, match=r"the data's source_sha256: 'ab' \(rank 0\), 'cd' \(rank 1\)\)"):
        check_same_settings([same, settings_of(GPT2Config(), {**meta, "source_sha256": "cd"})])
    four = settings_of(GPT2Config(learning_rate=1.0, max_iters=1, batch_size=1, n_layer=1), meta)
    five = settings_of(GPT2Config(learning_rate=1.0, max_iters=1, batch_size=1, n_layer=1, n_head=1), meta)
    for other, more in ((four, False), (five, True)):  # at most four named, then "..."
        with pytest.raises(ConfigError) as e:
            check_same_settings([settings_of(GPT2Config(), meta), other])
        assert str(e.value).count("(rank 1)") == 4 and ("; ...)" in str(e.value)) == more
    # --dtype=auto on an H100 and on a V100: bfloat16 against float16 with a GradScaler scaling half the gradients
    with pytest.raises(ConfigError, match=r"dtype in use: 'bfloat16' \(rank 0\), 'float16' \(rank 1\)\): "
                                          r"--dtype=auto chose by GPU, and the GPUs differ: give --dtype=float16"):
        check_same_settings([settings_of(GPT2Config(), meta, torch.bfloat16),
                             settings_of(GPT2Config(), meta, torch.float16)])
    with pytest.raises(ConfigError, match=r"dtype: 'bfloat16' \(rank 0\), 'float16' \(rank 1\); dtype in use: .*: give "
                                          r"every machine the same flags"):  # typed so
        check_same_settings([settings_of(GPT2Config(dtype="bfloat16"), meta, torch.bfloat16),
                             settings_of(GPT2Config(dtype="float16"), meta, torch.float16)])


def test_two_machines_given_other_flags_stop_before_training(char_data, tmp_path):
    """Two torchrun launches, as on two machines, the second with another learning rate."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = cli_flags(tiny(char_data, tmp_path, gradient_accumulation_steps=2, backend="gloo"))
    runs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                              "--master_addr=127.0.0.1", f"--master_port={port}", "--nproc_per_node=1",
                              str(ROOT / "train.py"), *flags, *extra], cwd=tmp_path, env=subprocess_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node, extra in ((0, []), (1, ["--learning_rate=0.03"]))]
    outputs = [run.communicate(timeout=180) for run in runs]
    assert all(run.returncode != 0 for run in runs)
    assert ("error: the processes were started with different settings (learning_rate: 0.01 (rank 0), 0.03 "
            "(rank 1)): give every machine") in outputs[0][1]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


def test_run_cli_turns_ctrl_c_into_exit_130():
    # in a subprocess: a KeyboardInterrupt that escaped run_cli would stop pytest itself
    code = "from utils import run_cli\ndef main():\n    raise KeyboardInterrupt\nrun_cli(main)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (130, "interrupted\n")  # no traceback


@pytest.mark.parametrize("body, said", [
    ("import torch; torch.empty(2**64)", "Overflow when unpacking long long"),  # --block_size=99999999999999999999
    ("[0] * 2**70", "cannot fit 'int' into an index-sized integer"),  # generate.py --num_samples=...
    ("raise TypeError('a bug of ours')", None),  # any other TypeError is a traceback, as it should be
])
def test_run_cli_says_a_size_past_64_bits_is_too_large(body, said):
    code = f"from utils import run_cli\ndef main():\n    {body}\nrun_cli(main)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if said is None:
        assert r.returncode == 1 and "Traceback" in r.stderr and "a bug of ours" in r.stderr
    else:
        assert (r.returncode, r.stderr) == (2, f"error: a size or count given is too large to work with ({said}); "
                                               f"give smaller values\n")


@pytest.mark.parametrize("script", ["train.py", "generate.py", "bench.py"])
def test_ctrl_c_while_torch_imports_ends_the_script_without_a_traceback(script):
    # a Ctrl-C that arrives while the script imports torch, made certain by an import hook that sends it then;
    # the script runs as a program would (runpy, __name__ == "__main__")
    code = ("import os, runpy, signal, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            f"sys.argv = [{script!r}, '--help']\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr, r.stdout) == (130, "interrupted\n", "")


def test_run_cli_gives_ctrl_c_back_to_python_and_leaves_an_ignored_one_ignored():
    from utils import quiet_ctrl_c_while_starting
    handlers = []
    try:
        quiet_ctrl_c_while_starting()
        handlers.append(signal.getsignal(signal.SIGINT))
        run_cli(lambda: handlers.append(signal.getsignal(signal.SIGINT)))  # KeyboardInterrupt for main's cleanups
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started with & by a shell script
        quiet_ctrl_c_while_starting()
        handlers.append(signal.getsignal(signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert handlers[0] not in (signal.default_int_handler, signal.SIG_IGN)
    assert handlers[1:] == [signal.default_int_handler, signal.SIG_IGN]


def test_data_prepared_again_during_a_run_stops_it_with_its_last_step_saved(char_data, tmp_path, monkeypatch):
    import train as train_module
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    at_step(monkeypatch, 3, lambda: prepared_again(data / "train.bin"))  # found at the end of that iteration
    config = tiny(data, tmp_path / "run", max_iters=10, eval_interval=5)
    with pytest.raises(DataError, match=r"train.bin was replaced or changed since the run started \(prepared again\?\): "
                                        r"finish preparing, then run the same command again; it checks the data anew"):
        main(cli_flags(config))
    assert load_checkpoint(tmp_path / "run" / "ckpt" / "checkpoint.pt")["iter_num"] == 3
    evaluate, evaluations = train_module.estimate_loss, []

    def evaluate_then_touch(*args, **kwargs):  # after the last evaluation: the run is complete, and no error
        losses = evaluate(*args, **kwargs)
        evaluations.append(1)
        if len(evaluations) == 2:  # the initial one, then the one at max_iters
            prepared_again(data / "train.bin")
        return losses
    monkeypatch.setattr(train_module, "estimate_loss", evaluate_then_touch)
    main(cli_flags(tiny(data, tmp_path / "done", max_iters=2, eval_interval=5)))
    assert load_checkpoint(tmp_path / "done" / "ckpt" / "final_checkpoint.pt")["iter_num"] == 2
    monkeypatch.setattr(train_module, "estimate_loss", evaluate)
    # the same bytes: the resumed run ends where a run that was never stopped ends
    resumed = train(config)
    straight = train(tiny(char_data, tmp_path / "straight", max_iters=10, eval_interval=5))
    assert resumed["resumed_from"] == 3 and resumed["iter_num"] == 10
    assert {i: resumed["losses"][i] for i in range(4, 11)} == {i: straight["losses"][i] for i in range(4, 11)}
    assert resumed["evals"][10] == straight["evals"][10]


def test_data_prepared_again_during_an_evaluation_stops_the_run_with_that_evaluation_owed(char_data, tmp_path,
                                                                                          monkeypatch, capsys):
    import train as train_module
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    evaluate, calls = train_module.estimate_loss, []

    def touch_then_evaluate(*args, **kwargs):  # at the evaluation of iteration 5, before its first batch
        calls.append(1)
        if len(calls) == 2:  # the first is the initial evaluation
            prepared_again(data / "val.bin")
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train_module, "estimate_loss", touch_then_evaluate)
    config = tiny(data, tmp_path / "run", max_iters=10, eval_interval=5)
    with pytest.raises(DataError, match=r"val.bin was replaced or changed since the run started"):
        main(cli_flags(config))
    assert "iter 5: evaluation cut short by the stop request" in capsys.readouterr().out
    saved = load_checkpoint(tmp_path / "run" / "ckpt" / "checkpoint.pt")
    assert saved["iter_num"] == 5 and saved["progress"]["eval_owed"]
    monkeypatch.undo()
    # run again with a max_iters it has passed: nothing to do, and no TensorBoard file for its changed setting
    events = sorted((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    train(tiny(data, tmp_path / "run", max_iters=4, eval_interval=5))
    assert "already trained for 5 iterations (max_iters=4)" in capsys.readouterr().out
    assert sorted((tmp_path / "run" / "runs").rglob("events.out.tfevents.*")) == events
    resumed = train(config)  # makes the evaluation up first, then goes on as a run that was never stopped
    straight = train(tiny(char_data, tmp_path / "straight", max_iters=10, eval_interval=5))
    assert [resumed["evals"][i] for i in (5, 10)] == [straight["evals"][i] for i in (5, 10)]
    assert resumed["losses"][10] == straight["losses"][10]


def test_sample_without_end_of_text_or_newline(tmp_path, char_data):
    # a character set without '\n': the TensorBoard sample starts from the val split's first character
    from train import sample_prompt
    text = " ".join(random.Random(1).choice(WORDS) for _ in range(3000))
    cut = int(0.9 * len(text))
    text = text[:cut] + "t" + text[cut + 1:]  # not ' ', token 0, which a split without tokens would give
    data = write_data(tmp_path / "nonewline", CharTokenizer.from_text(text), text)
    meta = json.loads((data / "meta.json").read_text())
    assert sample_prompt(CharTokenizer.from_text(text), data, meta) == "t"
    char_meta = json.loads((char_data / "meta.json").read_text())  # with '\n': start from nothing
    assert sample_prompt(load_tokenizer(char_data / "tokenizer.json"), char_data, char_meta) == ""
    summary = train(tiny(data, tmp_path, max_iters=5, sample_tokens=8))
    assert summary["iter_num"] == 5 and (tmp_path / "ckpt" / "final_checkpoint.pt").is_file()
    _, acc = event_steps(summary["run_dir"])
    samples = acc.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [0, 5]
    first = text[int(0.9 * len(text))]  # write_data puts the last 10% in val
    assert all(e.tensor_proto.string_val[0].decode().startswith("    " + first) for e in samples)


@pytest.mark.parametrize("fp8", [False, True])
def test_fine_tune_from_a_hugging_face_directory(tmp_path, monkeypatch, fp8):
    from tokenizer import GPT2Tokenizer
    text = " ".join(WORDS * 40)
    data = write_data(tmp_path / "gpt2data", GPT2Tokenizer(), text)
    torch.manual_seed(0)
    pretrained = GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257))
    pretrained.save_pretrained(str(tmp_path / "hf"))
    float8_products = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: float8_products.append(1) or real(*a, **k))
    config = tiny(data, tmp_path, init_from=str(tmp_path / "hf"), max_iters=1, block_size=16, fp8=fp8)
    summary = train(config)
    assert len(float8_products) == (2 * 4 * 3 if fp8 else 0)  # 2 blocks x 4 layers x (forward + 2 backward)
    ckpt = load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")
    assert ckpt["config"]["block_size"] == 16 and ckpt["config"]["vocab_size"] == 50257
    assert ckpt["model"]["transformer.wpe.weight"].shape == (16, 32)  # cropped to the shorter context
    # the starting point is the pretrained model: same loss on the same evaluation batches
    pretrained.transformer.wpe.weight.data = pretrained.transformer.wpe.weight.data[:16]
    pretrained.config.block_size = 16
    with BatchLoader(data, 16, 4) as loader:
        expected = estimate_loss(pretrained, loader, 2, torch.autocast("cpu", enabled=False))
    assert summary["evals"][0] == pytest.approx(expected, abs=1e-5)


def test_a_presets_shape_is_named_when_it_contradicts_the_pretrained_model(tmp_path):
    from tokenizer import GPT2Tokenizer
    data = write_data(tmp_path / "gpt2data", GPT2Tokenizer(), " ".join(WORDS * 40))
    GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257)).save_pretrained(tmp_path / "hf")
    config, explicit = parse_args(["--preset=shakespeare-char", f"--init_from={tmp_path / 'hf'}",
                                   f"--data_dir={data}", f"--checkpoint_dir={tmp_path / 'c'}", "--device=cpu"])
    with pytest.raises(ConfigError, match=r"drop n_layer=6 \(.* has 2\), n_head=6 .*or a --preset"):
        train(config, explicit)


def test_float8_training_follows_float32(char_data, tmp_path):
    runs = [train(tiny(char_data, tmp_path / str(fp8), fp8=fp8, max_iters=30, eval_interval=30))
            for fp8 in (False, True)]
    plain, fp8 = (torch.tensor(list(r["losses"].values())) for r in runs)
    assert fp8[-1] < 0.8 * fp8[0]  # it learns
    # a 32-wide model is the hardest case for float8's 3-bit (e4m3) and 2-bit (e5m2) mantissas
    torch.testing.assert_close(fp8, plain, rtol=0.05, atol=0)  # within 5% of the float32 loss at every step
    assert not torch.equal(fp8, plain)
    assert runs[1]["evals"][30]["val"] == pytest.approx(runs[0]["evals"][30]["val"], rel=0.03)


def test_fine_tune_an_exported_char_model_on_its_own_data(char_data, tmp_path):
    from tokenizer import GPT2Tokenizer, load_tokenizer
    train(tiny(char_data, tmp_path / "first", max_iters=4))
    ckpt = load_checkpoint(tmp_path / "first" / "ckpt" / "final_checkpoint.pt")
    exported = tmp_path / "export"
    model_from_checkpoint(ckpt).save_pretrained(str(exported), tokenizer=load_tokenizer(char_data / "tokenizer.json"))
    summary = train(tiny(char_data, tmp_path / "tuned", init_from=str(exported), max_iters=2))
    assert summary["iter_num"] == 2
    # new text, prepared with the export's own tokenizer, fine-tunes it too
    import prepare_data
    (tmp_path / "new.txt").write_text("that is the question to be or not\n" * 300)
    prepare_data.main(["--dataset", "custom", "--input", str(tmp_path / "new.txt"), "--tokenizer_file",
                       str(exported / "toolkit_tokenizer.json"), "--output_dir", str(tmp_path / "newdata")])
    tuned_new = train(tiny(tmp_path / "newdata", tmp_path / "tuned_new", init_from=str(exported), max_iters=2))
    assert tuned_new["iter_num"] == 2
    # GPT-2 tokens would index past its 20-row embedding, another char set would mean other letters
    gpt2_data = write_data(tmp_path / "gpt2data", GPT2Tokenizer(), " ".join(WORDS * 40))
    other_chars = write_data(tmp_path / "other", CharTokenizer.from_text("zyxwvu " * 20), "zyxwvu " * 2000)
    for data, message in ((gpt2_data, "holds a model of 20 tokens, but .* was prepared with the 'gpt2' tokenizer"),
                          (other_chars, "was not prepared with the tokenizer of .* prepare the text with the "
                                        "model's own tokenizer: python prepare_data.py --dataset custom --input "
                                        "TEXT --tokenizer_file .*export/toolkit_tokenizer.json --output_dir DATA")):
        with pytest.raises(TrainingError, match=message):
            train(tiny(data, tmp_path / data.name, init_from=str(exported), max_iters=2))
        assert not (tmp_path / data.name / "ckpt").exists()
    # a damaged tokenizer file cannot vouch for the data: no training
    (exported / "toolkit_tokenizer.json").write_text('{"kind": "char", "chars')
    with pytest.raises(TrainingError, match="toolkit_tokenizer.json"):
        train(tiny(other_chars, tmp_path / "damaged", init_from=str(exported), max_iters=2))
    # nor can none at all (the folder saved again by transformers, say), unless the model is GPT-2's size
    (exported / "toolkit_tokenizer.json").unlink()
    with pytest.raises(TrainingError, match=r"holds a model of 20 tokens, not GPT-2's 50257, and no "
                                            r"toolkit_tokenizer.json of this project beside it"):
        train(tiny(char_data, tmp_path / "none", init_from=str(exported), max_iters=2))
    assert not (tmp_path / "none" / "ckpt").exists()


def test_repeating_a_fine_tuning_command_continues_its_run(char_data, tmp_path, capsys):
    from tokenizer import load_tokenizer
    train(tiny(char_data, tmp_path / "first", max_iters=4))
    model = model_from_checkpoint(load_checkpoint(tmp_path / "first" / "ckpt" / "final_checkpoint.pt"))
    for name in ("a", "b"):
        model.save_pretrained(str(tmp_path / name), tokenizer=load_tokenizer(char_data / "tokenizer.json"))
    tune = lambda source, **kw: train(tiny(char_data, tmp_path, init_from=source, **kw))  # noqa: E731
    assert tune(str(tmp_path / "a"), max_iters=3)["resumed_from"] is None
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["started_from"] == str(tmp_path / "a")
    # the same command after a crash, with a longer schedule, or from another spelling of the folder
    assert tune(str(tmp_path / "a"), max_iters=6)["resumed_from"] == 3
    assert tune(f"{tmp_path}/x/../a", max_iters=8)["resumed_from"] == 6
    assert tune("resume", max_iters=9)["resumed_from"] == 8
    from train import folder_fingerprint
    resumed = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert resumed["started_from"] == str(tmp_path / "a")
    assert resumed["started_from_fingerprint"] == folder_fingerprint(str(tmp_path / "a")) is not None
    assert tune(str(tmp_path / "a"), max_iters=10)["resumed_from"] == 9  # and the fine-tuning command after it
    capsys.readouterr()
    # other weights, or scratch, start a new run and move the old checkpoints aside
    assert tune(str(tmp_path / "b"), max_iters=2)["resumed_from"] is None
    assert "the previous checkpoints in" in capsys.readouterr().out
    assert tune("scratch", max_iters=2)["resumed_from"] is None
    assert len(list((tmp_path / "ckpt").glob("previous-*"))) == 2
    # a command that contradicts the fine-tuning run it would continue is not told to use scratch
    tune(str(tmp_path / "a"), max_iters=2)
    with pytest.raises(CheckpointError, match=r"start the new fine-tuning run in another --checkpoint_dir") as e:
        tune(str(tmp_path / "a"), max_iters=4, n_layer=3)
    assert "--init_from=scratch" not in str(e.value)
    # another model exported into the same folder is another start too
    tune(str(tmp_path / "a"), max_iters=4)
    assert tune(str(tmp_path / "a"), max_iters=5)["resumed_from"] == 4
    GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=model.config.vocab_size)).save_pretrained(
        str(tmp_path / "a"), tokenizer=load_tokenizer(char_data / "tokenizer.json"))
    capsys.readouterr()
    assert tune(str(tmp_path / "a"), max_iters=6)["resumed_from"] is None
    assert "the previous checkpoints in" in capsys.readouterr().out
    # but the same files copied away and back (new times, as a backup restored without them) are the same start
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(tmp_path / "a_copy", tmp_path / "a", copy_function=shutil.copyfile)
    for p in (tmp_path / "a").iterdir():
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert tune(str(tmp_path / "a"), max_iters=7)["resumed_from"] == 6
    (tmp_path / "a" / "pytorch_model.bin").symlink_to(tmp_path / "nothing")  # a link to nothing is no crash
    from train import folder_fingerprint
    assert folder_fingerprint(str(tmp_path / "a")) != folder_fingerprint(str(tmp_path / "a_copy"))
    (tmp_path / "a" / "pytorch_model.bin").unlink()
    # a fingerprint of another method (an earlier version's) cannot be compared: the path decides
    ckpt = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    ckpt["started_from_fingerprint"] = "modification-times:1234"
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", ckpt)
    assert tune(str(tmp_path / "a"), max_iters=8)["resumed_from"] == 7


def test_a_folder_named_like_a_gpt2_model_is_a_folder(char_data, tmp_path, monkeypatch):
    """'--init_from=gpt2' with a folder ./gpt2 loads the folder (as transformers does), so the folder's
    checks apply: a model of another vocabulary is one line, not a traceback."""
    from tokenizer import GPT2Tokenizer
    monkeypatch.chdir(tmp_path)
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20)).save_pretrained("gpt2")
    gpt2_data = write_data(tmp_path / "gpt2data", GPT2Tokenizer(), " ".join(WORDS * 40))
    with pytest.raises(TrainingError, match="gpt2 holds a model of 20 tokens"):
        train(tiny(gpt2_data, tmp_path, init_from="gpt2", max_iters=2))
    from train import folder_fingerprint, origin
    assert origin("gpt2") == str(tmp_path / "gpt2") and folder_fingerprint("gpt2") is not None
    # and a checkpoint folder named gpt2, made by the run, is not taken for where its weights came from
    shutil.rmtree(tmp_path / "gpt2")
    monkeypatch.setattr(GPT, "from_pretrained", classmethod(lambda cls, name, dropout=0.0: GPT(GPT2Config(
        n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50257))))  # as if downloaded
    train(tiny(gpt2_data, tmp_path, init_from="gpt2", max_iters=2, checkpoint_dir="gpt2"))
    ckpt = load_checkpoint(tmp_path / "gpt2" / "checkpoint.pt")
    assert ckpt["started_from"] == "gpt2" and ckpt["started_from_fingerprint"] is None
    # the same command again continues: a folder gpt2 without config.json is no model folder
    summary = train(tiny(gpt2_data, tmp_path, init_from="gpt2", max_iters=4, checkpoint_dir="gpt2"))
    assert summary["resumed_from"] == 2


def test_fine_tuning_gpt2_needs_gpt2_tokens(char_data, tmp_path):
    with pytest.raises(TrainingError, match="GPT-2 tokens .* 'char' tokenizer"):
        train(tiny(char_data, tmp_path, init_from="gpt2"))
    assert not tmp_path.joinpath("ckpt").exists() and not tmp_path.joinpath("runs").exists()
    # a folder of 50,257 tokens without this project's tokenizer file is taken for OpenAI's GPT-2
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "toolkit_tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(TrainingError, match="fine-tunes OpenAI's GPT-2, which reads GPT-2 tokens"):
        train(tiny(char_data, tmp_path, init_from=str(tmp_path / "hf")))
    # GPT-2's vocabulary size without its end-of-text token is no GPT-2 data either
    from tokenizer import GPT2Tokenizer
    data = write_data(tmp_path / "gpt2data", GPT2Tokenizer(), " ".join(WORDS * 40))
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "eot_token": None}))
    with pytest.raises(TrainingError, match="end-of-text 50256"):
        train(tiny(data, tmp_path, init_from="gpt2"))
    assert not tmp_path.joinpath("ckpt").exists()


def test_fine_tuning_gpt2_takes_a_bpe_of_gpt2s_ids_only(gpt2_files, tmp_path):
    """A BPE of GPT-2's size and end-of-text id whose ids stand for other bytes is refused; the one that
    BPETokenizer.from_gpt2 makes of OpenAI's files (no tiktoken needed) has GPT-2's ids and is taken."""
    from tokenizer import BPETokenizer, tokenizer_from_dict
    ours = BPETokenizer.from_gpt2(*gpt2_files)
    d = ours.to_dict()
    d["byte_ids"][ord("a")], d["byte_ids"][ord("b")] = d["byte_ids"][ord("b")], d["byte_ids"][ord("a")]
    other = tokenizer_from_dict(d)
    assert (other.vocab_size, other.eot_token) == (50257, 50256)
    GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50257)).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "toolkit_tokenizer.json").unlink(missing_ok=True)
    text = " ".join(WORDS * 40)
    data = write_data(tmp_path / "other", other, text)
    for init_from in ("gpt2", str(tmp_path / "hf")):
        with pytest.raises(TrainingError, match="GPT-2 tokens .* 'bpe' tokenizer"):
            train(tiny(data, tmp_path / "a", init_from=init_from))
    assert not tmp_path.joinpath("a", "ckpt").exists()
    data = write_data(tmp_path / "gpt2ids", ours, text)
    train(tiny(data, tmp_path / "b", init_from=str(tmp_path / "hf"), max_iters=1))
    assert (tmp_path / "b" / "ckpt" / "final_checkpoint.pt").is_file()


def test_a_train_checkpoint_as_init_from_is_named_so(char_data, tmp_path):
    train(tiny(char_data, tmp_path / "a", max_iters=1))
    for init_from in (tmp_path / "a" / "ckpt", tmp_path / "a" / "ckpt" / "final_checkpoint.pt"):
        with pytest.raises(UserError, match=r"train.py('s)? checkpoints?: sample with generate.py --checkpoint_dir"):
            train(tiny(char_data, tmp_path / "b", init_from=str(init_from)))
    assert not tmp_path.joinpath("b", "ckpt").exists()


def test_a_pretrained_folder_sets_the_context_unless_asked_for_less(char_data, tmp_path):
    from tokenizer import load_tokenizer
    model = GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=20))
    model.save_pretrained(str(tmp_path / "hf"), tokenizer=load_tokenizer(char_data / "tokenizer.json"))
    hf = str(tmp_path / "hf")
    train(tiny(char_data, tmp_path / "a", init_from=hf, max_iters=1, block_size=1024))  # 1024: the default, unset
    assert load_checkpoint(tmp_path / "a" / "ckpt" / "final_checkpoint.pt")["config"]["block_size"] == 16
    with pytest.raises(ConfigError, match="block_size=32 exceeds .*context of 16 tokens; use --block_size=16 or less"):
        train(tiny(char_data, tmp_path / "b", init_from=hf, max_iters=1, block_size=32))
    with pytest.raises(ConfigError, match=r"drop vocab_size=64 \(.* has 20\)"):
        train(tiny(char_data, tmp_path / "c", init_from=hf, max_iters=1, vocab_size=64))


# ----------------------------------------------------------------------------- command line

def test_flags_file_and_preset_apply_in_order(tmp_path):
    cfg = tmp_path / "my_config.py"
    cfg.write_text("import math\nbatch_size = 7\nn_layer = 5\nlearning_rate = 2 * math.pi / 1000\n")
    config, explicit = parse_args(["--preset=shakespeare-char-cpu", str(cfg), "--n_layer=3", "--dropout=0",
                                   "--data_dir=data/2024", "--compile=auto", "--dtype=bfloat16", "--bias=false",
                                   "--min_lr", "1e-5"])
    assert (config.n_layer, config.batch_size, config.n_embd) == (3, 7, 128)  # flag > file > preset
    assert config.learning_rate == pytest.approx(2e-3 * 3.14159265, rel=1e-6)
    assert config.dropout == 0.0 and isinstance(config.dropout, float)  # int accepted for a float field
    assert config.data_dir == "data/2024" and config.compile == "auto" and config.dtype == "bfloat16"
    assert config.bias is False and config.min_lr == 1e-5
    assert {"n_layer", "batch_size", "learning_rate", "n_embd", "dropout", "bias"} <= explicit
    assert "seed" not in explicit and "vocab_size" not in explicit


@pytest.mark.parametrize("argv, message", [
    (["--n_layr=4"], "unknown config key 'n_layr'; did you mean 'n_layer'?"),
    (["--max_iters=1.5"], "max_iters must be an integer, got 1.5"),
    (["--learning_rate=fast"], "learning_rate must be a number, got 'fast'"),
    (["--compile=yes"], "compile must be True, False or 'auto'"),
    (["--cuda_graph=1"], "cuda_graph must be True, False or 'auto', got 1 (e.g. --cuda_graph=False)"),
    (["--compile_mode=fast"], "compile_mode must be one of default, reduce-overhead, max-autotune"),
    (["--seed=-1"], "seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["--seed=99999999999999999999999"], "seed must be an integer from 0 to 2**63 - 1"),
    (["--bias=1"], "bias must be True or False, got 1"),
    (["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
    (["--preset=gpt3"], "unknown preset 'gpt3'; did you mean 'gpt2'?"),
    (["missing_config.py"], "config file 'missing_config.py' does not exist"),
    ([os.devnull], f"config file '{os.devnull}' is not a regular file (a device or a pipe)"),
    (["."], "config file '.' is a directory"),
    (["--n_layer"], "expected one argument"),
])
def test_bad_overrides_exit_2_and_write_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_unknown_name_in_config_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 2\nlearning_rat = 1e-3\n")
    with pytest.raises(UserError, match="unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        parse_args([str(cfg)])


def test_every_mistake_in_a_config_file_and_the_flags_is_reported_at_once(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("from math import sqrt\nlearning_rate = sqrt(1e-6)\nbatch_size = 8.0\ndropout = 2\n"
                   "n_layers = 4\nbatch_sise = 3\n")
    with pytest.raises(ConfigError) as e:
        parse_args([str(cfg), "--n_layer=x", "--eval_iters=0"])
    message = str(e.value)
    for problem in (f"config file {cfg}: batch_size must be an integer, got 8.0 (float); e.g. batch_size = 12",
                    f"config file {cfg}: unknown config key 'n_layers'", f"config file {cfg}: unknown config key "
                    f"'batch_sise'", "n_layer must be an integer, got 'x' (str); e.g. --n_layer=12",
                    "dropout must be in [0, 1), got 2", "eval_iters must be an integer > 0"):
        assert problem in message


def test_cli_error_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--n_layr=4", "--seed=x"], cwd=tmp_path,
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown config key 'n_layr'") and len(r.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- Makefile (make demo trains)

def make_dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # --no-print-directory: under `make test` this make is a sub-make, which says where it enters and leaves
    r = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(ROOT / "Makefile"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_clean_removes_the_demos_data_set_whole_and_nothing_of_the_users():
    # data.py takes a directory with meta.json for a complete data set: it must go with the .bin files
    [command] = [line for line in make_dry_run("clean").splitlines() if line.startswith("rm ")]
    demo = {f"data/shakespeare_char/{name}" for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json")}
    assert set(command.split()) == {"rm", "-rf", ".venv", *demo}  # not data/*: other data sets are the user's
    listed = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"demo", "test", "bench", "gpu-check", "clean"} <= set(targets)
    assert all(f"make {t}" in listed for t in targets if t != "help")  # make help lists every target


def test_make_dry_run_installs_nothing_when_the_environment_is_up_to_date(tmp_path):
    """make -n says whether an installation (maybe gigabytes of torch) would run: not when nothing changed,
    and yes when TORCH or TORCH_INDEX differ from what was installed."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".torch-spec").write_text("torch==2.13.0 \n")  # as an earlier version of the Makefile wrote it
    for name in (".installed", ".installed-dev"):  # newer than the requirements files
        (venv / name).touch()
    up_to_date = make_dry_run(f"VENV={venv}", "TORCH=torch==2.13.0", "test")
    assert "pip install" not in up_to_date and "-m pytest -q tests" in up_to_date
    index = "https://download.pytorch.org/whl/cpu"
    other_index = make_dry_run(f"VENV={venv}", "TORCH=torch==2.13.0", f"TORCH_INDEX={index}", "test")
    assert other_index.count("pip install") == 3 and index in other_index


def test_make_torch_index_applies_to_torch_only(tmp_path):
    venv = tmp_path / "venv"
    target = f"{venv}/.installed"
    default = [line for line in make_dry_run(f"VENV={venv}", target).splitlines() if "pip install" in line]
    assert len(default) == 2 and not any("--index-url" in line for line in default)
    index = "https://download.pytorch.org/whl/cpu"
    torch_line, requirements = [line for line in make_dry_run(f"VENV={venv}", f"TORCH_INDEX={index}", target).splitlines()
                                if "pip install" in line]
    assert '"torch' in torch_line and torch_line.endswith(f'--index-url "{index}"')
    assert "-r requirements.txt" in requirements and "--index-url" not in requirements


def test_make_gpu_check_runs_the_cuda_tests_and_the_targets_benchmarks(monkeypatch):
    """With a Python that has everything (a GPU machine's own), nothing is installed; the tests find the text
    prepared just before them; the benchmarks are the speed targets' own commands, as README gives them."""
    monkeypatch.delenv("SHAKESPEARE", raising=False)  # .ci/run sets it, and make takes it as the variable
    lines = make_dry_run("PY=python3", "gpu-check").splitlines()
    assert not any("pip install" in line for line in lines)
    assert lines[-4:] == [
        "python3 prepare_data.py --dataset shakespeare --tokenizer char ",
        'SHAKESPEARE="data/shakespeare_char/input.txt" python3 -m pytest -q -rs -m cuda tests',
        "python3 bench.py --preset gpt2 --batch_size 16 --block_size 1024 --json bench-gpt2.json",
        "python3 bench.py --whole_run --preset shakespeare-char --json bench-whole-run.json"]
    given = make_dry_run("PY=python3", "SHAKESPEARE=/data/input.txt", "gpu-check")
    assert '--input "/data/input.txt"' in given and 'SHAKESPEARE="/data/input.txt" python3 -m pytest' in given
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(line.split(" --json")[0].removeprefix("python3 ") in readme for line in lines[-2:])
    assert ".venv/.installed-dev" in make_dry_run("-W", "requirements-dev.txt", "gpu-check")  # the venv's Python


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine with no GPU")
def test_make_gpu_check_without_a_gpu_stops_before_doing_anything(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), f"PY={sys.executable}", "gpu-check"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: make gpu-check needs a CUDA GPU; torch ")
    assert os.listdir(tmp_path) == []


def test_a_test_skipped_for_want_of_cuda_must_be_selected_by_make_gpu_check(tmp_path):
    """`pytest -m cuda` selects the GPU's tests: one skipped without CUDA but not marked would run nowhere."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    skip = '@pytest.mark.skipif(True, reason="needs CUDA")\ndef test_gpu():\n    pass\n'
    (tmp_path / "test_gpu.py").write_text(f"import pytest\n\n\n{skip}")
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(tmp_path)]
    r = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stdout + r.stderr  # pytest's usage error
    assert "skipped for want of CUDA but not marked @pytest.mark.cuda: test_gpu.py::test_gpu" in r.stderr
    (tmp_path / "test_gpu.py").write_text(f"import pytest\n\n\n@pytest.mark.cuda\n{skip}")
    r = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------- signals and processes

def start(config: GPT2Config, cwd: Path, ignored: int | None = None) -> subprocess.Popen:
    """train.py in a process of its own; ignored: a signal it starts with ignored (nohup's SIGHUP, say)."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli_flags(config)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            preexec_fn=None if ignored is None else lambda: signal.signal(ignored, signal.SIG_IGN))


def read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the process ended before printing {prefix!r}:\n{''.join(lines)}")


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(char_data, tmp_path):
    config = tiny(char_data, tmp_path, max_iters=500, lr_decay_iters=500, eval_interval=20, log_interval=1)
    proc = start(config, tmp_path)
    try:
        read_until(proc, "iter 25/")
        # checkpoint.pt of iteration 20 is written by a background thread while the steps go on: killed before it
        # lands, the run would start over, which is right but not what this test is about
        deadline = time.monotonic() + 30
        while not (tmp_path / "ckpt" / "checkpoint.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stdout.close()
    killed_at = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["iter_num"]
    assert killed_at in range(20, 500, 20)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *cli_flags(config)], cwd=tmp_path,
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {tmp_path / 'ckpt' / 'checkpoint.pt'} at iteration {killed_at}" in r.stdout
    assert load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")["iter_num"] == 500
    [run_dir] = (tmp_path / "runs").iterdir()
    steps, _ = event_steps(str(run_dir))
    assert steps["train/loss"] == list(range(1, 501))  # the killed run's extra steps were purged


# SIGHUP: the terminal was closed, or the SSH connection dropped
@pytest.mark.parametrize("sig", [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))
def test_sigterm_finishes_the_step_saves_and_exits(char_data, tmp_path, sig):
    config = tiny(char_data, tmp_path, max_iters=100000, lr_decay_iters=100000, eval_interval=1000)
    proc = start(config, tmp_path)
    try:
        lines = read_until(proc, "iter 3/")
        proc.send_signal(sig)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, out
    assert f"{signal.Signals(sig).name} received: finishing this step" in out
    stopped = int(out.split("stopped at iteration ")[1].split(":")[0])
    ckpt = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert ckpt["iter_num"] == stopped >= 3
    assert f"iter {stopped}/100000: loss" in out  # the last step completed before saving
    assert not (tmp_path / "ckpt" / "final_checkpoint.pt").exists()


def test_an_ignored_ctrl_c_stays_ignored_while_training(char_data, tmp_path):
    """`python train.py ... &` in a shell script starts with SIGINT ignored: a Ctrl-C at the terminal, meant
    for whatever runs in the foreground, must not stop the training behind it. SIGTERM still stops it."""
    config = tiny(char_data, tmp_path, max_iters=100000, lr_decay_iters=100000, eval_interval=1000)
    proc = start(config, tmp_path, ignored=signal.SIGINT)
    try:
        lines = read_until(proc, "iter 3/")
        proc.send_signal(signal.SIGINT)
        lines += read_until(proc, "iter 8/")  # still training, five steps on
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        proc.stdout.close()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGINT received" not in out and "SIGTERM received: finishing this step" in out
    assert "press Ctrl-C again" not in out  # it would do nothing

def run_with_exit_handler(cwd: Path, command: list[str], site: str = "", stdin: str = "",
                          env: dict | None = None) -> subprocess.CompletedProcess:
    """`python *command` in a process whose sitecustomize registers an exit handler printing "teardown ran",
    then runs `site` (Python, before any other code). stdout is buffered, as into a pipe or a file, so that
    output lost at the exit would show."""
    (cwd / "site").mkdir(exist_ok=True)
    (cwd / "site" / "sitecustomize.py").write_text(f"import atexit\natexit.register(print, 'teardown ran')\n{site}\n")
    env = {k: v for k, v in {**subprocess_env(), **(env or {})}.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd / "site"), str(ROOT)])
    return subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, env=env, input=stdin,
                          timeout=120)


def test_a_finished_run_ends_without_the_teardown_and_loses_nothing(char_data, tmp_path):
    config = tiny(char_data, tmp_path, max_iters=6, lr_decay_iters=6, eval_interval=3, sample_tokens=20)
    for command in ([str(ROOT / "train.py")], ["-m", "train"]):
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        r = run_with_exit_handler(tmp_path, command + cli_flags(config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "teardown ran" not in r.stdout  # the process ended at once
        # what the run printed, wrote and logged is all there: stdout was flushed, TensorBoard closed
        assert r.stdout.rstrip().splitlines()[-1].startswith("done: 6 iterations")
        assert load_checkpoint(tmp_path / "ckpt" / "final_checkpoint.pt")["iter_num"] == 6
        [run_dir] = (tmp_path / "runs").iterdir()
        steps, acc = event_steps(str(run_dir))
        assert steps["train/loss"] == list(range(1, 7)) and steps["val/loss"] == [0, 3, 6]
        assert acc.Tags()["tensors"]  # the text sample, written last


RUNS_TRAIN_PY = "import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


def test_an_error_or_help_ends_the_process_at_once_too(char_data, tmp_path):
    """train.py's own exits (an error in one line, --help) skip the teardown as a finished run does: it would
    wait for the compile workers that start before the data and the model are set up; a program around
    train.py still gets control back."""
    flags = cli_flags(tiny(tmp_path / "missing", tmp_path))
    r = run_with_exit_handler(tmp_path, [str(ROOT / "train.py"), *flags])
    assert r.returncode == 2 and "teardown ran" not in r.stdout, r.stdout + r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("error: data directory") and "missing" in line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()

    r = run_with_exit_handler(tmp_path, ["-c", RUNS_TRAIN_PY, str(ROOT / "train.py"), *flags])
    assert r.returncode == 2 and r.stdout.rstrip().endswith("teardown ran"), r.stdout + r.stderr

    r = run_with_exit_handler(tmp_path, [str(ROOT / "train.py"), "--help"])
    assert r.returncode == 0 and "teardown ran" not in r.stdout, r.stdout + r.stderr
    assert "usage: train.py" in r.stdout and "--checkpoint_dir" in r.stdout and r.stdout.endswith("\n")
    if sys.platform != "win32":  # `>&-`: sys.stdout is None, which the exit must not trip over
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], cwd=tmp_path, stdout=None,
                           stderr=subprocess.PIPE, text=True, env=subprocess_env(), timeout=120,
                           preexec_fn=lambda: os.close(1))
        assert r.returncode == 2 and r.stderr.startswith("error: data directory"), r.stderr


@pytest.mark.parametrize("how", ["tracer", "python -i", "program around it", "pdb", "TORCH_LOGS"])
def test_a_run_inside_something_else_keeps_the_normal_exit(char_data, tmp_path, how):
    """What runs train.py and goes on after it, or writes its results at exit, must get control back: a tracer
    (debuggers, coverage), `python -i`'s prompt, a program around train.py (runpy.run_path, IPython's %run,
    cProfile), pdb's "continue" without breakpoints (pdb then stops tracing), torch's reports under TORCH_LOGS."""
    config = tiny(char_data, tmp_path, max_iters=2, eval_interval=2)
    train_py = [str(ROOT / "train.py"), *cli_flags(config)]
    r = {"tracer": lambda: run_with_exit_handler(tmp_path, train_py, site="import sys\nsys.settrace(lambda *a: None)"),
         "python -i": lambda: run_with_exit_handler(tmp_path, ["-i", *train_py]),
         "program around it": lambda: run_with_exit_handler(
             tmp_path, ["-c", RUNS_TRAIN_PY + "print('the program goes on')", *train_py]),
         # '--': Python 3.13.0's pdb takes train.py's flags for its own without it
         "pdb": lambda: run_with_exit_handler(tmp_path, ["-m", "pdb", "--", *train_py], stdin="c\nq\n"),
         "TORCH_LOGS": lambda: run_with_exit_handler(tmp_path, train_py, env={"TORCH_LOGS": "graph_breaks"})}[how]()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: 2 iterations" in r.stdout and r.stdout.rstrip().endswith("teardown ran"), r.stdout
    if how == "program around it":
        assert "the program goes on\nteardown ran" in r.stdout
    if how == "pdb":
        assert "The program finished and will be restarted" in r.stdout


def test_exit_at_once_keeps_the_run_s_code_when_stdout_cannot_be_flushed():
    """A reader that went away after the run's last line (`train.py | head`): the exit code is still the run's."""
    code = (f"import io, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n"
            f"class Gone(io.StringIO):\n    def flush(self):\n        raise BrokenPipeError(32, 'Broken pipe')\n"
            f"sys.stdout = Gone()\ntrain.exit_at_once(141)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 141 and r.stderr == "", r.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_a_run_started_with_nohup_outlives_the_terminal(char_data, tmp_path):
    """nohup ignores SIGHUP so that the run goes on after the terminal closes; it must stay ignored."""
    config = tiny(char_data, tmp_path, max_iters=40, lr_decay_iters=40, eval_interval=20)
    proc = start(config, tmp_path, ignored=signal.SIGHUP)
    try:
        lines = read_until(proc, "iter 3/")
        proc.send_signal(signal.SIGHUP)
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0 and "SIGHUP" not in out and "done: 40 iterations" in out, out


def test_a_stream_without_a_file_descriptor_is_silenced_without_leaking_one():
    import io
    from utils import silence
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(5):
        silence(io.StringIO())
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def test_a_checkpoint_with_the_older_char_set_string_resumes(char_data, tmp_path):
    """Char checkpoints once stored their characters as one string; the same characters are the same tokens."""
    train(tiny(char_data, tmp_path, max_iters=5))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["tokenizer"]["chars"] = "".join(ckpt["tokenizer"]["chars"])
    save_checkpoint(path, ckpt)
    assert train(tiny(char_data, tmp_path, max_iters=8))["resumed_from"] == 5


@pytest.mark.parametrize("stderr", ["file", "same pipe"])
def test_a_closed_stdout_stops_like_a_signal_and_saves(char_data, tmp_path, stderr):
    """`train.py | head` (or `2>&1 | head`): once stdout is gone the run saves checkpoint.pt and stops, exiting
    as SIGPIPE would, instead of losing what it trained since the last checkpoint."""
    config = tiny(char_data, tmp_path, max_iters=100000, lr_decay_iters=100000, eval_interval=1000)
    command = shlex.join([sys.executable, str(ROOT / "train.py"), *cli_flags(config)])
    err = tmp_path / "err"
    redirect = f"2>{shlex.quote(str(err))}" if stderr == "file" else "2>&1"
    r = subprocess.run(["bash", "-c", f"{command} {redirect} | head -6; exit ${{PIPESTATUS[0]}}"], cwd=tmp_path,
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    log = err.read_text() if stderr == "file" else ""
    assert r.returncode == 128 + 13, r.stdout + r.stderr + log  # 141, as `kill -PIPE` would give
    assert len(r.stdout.splitlines()) == 6 and "iter 1/100000: loss" in r.stdout  # training had begun
    stopped = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["iter_num"]
    assert stopped >= 2 and not (tmp_path / "ckpt" / "final_checkpoint.pt").exists()
    if stderr == "file":  # where the run stopped is said on stderr, and nothing else is
        assert log.splitlines() == [
            "stdout was closed: finishing this step (or evaluation batch), then saving checkpoint.pt",
            f"stopped at iteration {stopped}: saved {tmp_path / 'ckpt' / 'checkpoint.pt'}; run the same command "
            f"again to continue"]


def test_a_second_run_in_the_same_checkpoint_folder_is_refused(char_data, tmp_path, monkeypatch):
    """Two runs in one --checkpoint_dir (two terminals, a sweep) would overwrite each other's checkpoints, and
    the second one's start-up would remove the first one's checkpoint being written."""
    import errno

    import fcntl
    from utils import folder_lock
    train(tiny(char_data, tmp_path, max_iters=5))
    ckpt_dir = tmp_path / "ckpt"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    (ckpt_dir / ".checkpoint.pt.abc.tmp").write_bytes(b"the first run's save, being written")
    with folder_lock(ckpt_dir) as held:  # the first run, still training
        assert held
        for overrides in ({}, {"init_from": "scratch"}):
            with pytest.raises(ConfigError, match=rf"^another train.py is training with --checkpoint_dir="
                                                  rf"{re.escape(str(ckpt_dir))}; wait for it"):
                train(tiny(char_data, tmp_path, max_iters=10, **overrides))
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir() if p.name in before} == before
    assert (ckpt_dir / ".checkpoint.pt.abc.tmp").exists() and len(list(ckpt_dir.iterdir())) == len(before) + 1
    # a folder that did not exist is locked as soon as it is made: here the other run made it first
    import train as train_module
    real = train_module.folder_lock

    @contextlib.contextmanager
    def taken(folder):
        with real(folder) as mine:
            assert mine
            yield False
    monkeypatch.setattr(train_module, "folder_lock", taken)
    with pytest.raises(ConfigError, match="another train.py is training"):
        train(tiny(char_data, tmp_path / "new", max_iters=5))
    assert (tmp_path / "new" / "ckpt").is_dir()  # not removed: the other run's, as far as this one knows
    monkeypatch.undo()
    # where the file system has no locks, the run says so and goes on; an error of the run's own is not
    # chained to the lock's (a traceback would begin with "OSError: No locks available")
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks "
                                                                                                    "available")))
    assert train(tiny(char_data, tmp_path, max_iters=6))["iter_num"] == 6
    monkeypatch.setattr(train_module, "log_progress", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError) as e:
        train(tiny(char_data, tmp_path, max_iters=8))
    assert e.value.__context__ is None


def test_a_stdout_closed_during_the_setup_stops_before_training(char_data, tmp_path):
    """`train.py | head -1`: stdout is gone after the first line of the setup; the run stops at the first
    evaluation, before anything is trained, and says that nothing is saved (not 'then saving checkpoint.pt')."""
    config = tiny(char_data, tmp_path, max_iters=100000, lr_decay_iters=100000, eval_interval=1000)
    command = shlex.join([sys.executable, str(ROOT / "train.py"), *cli_flags(config)])
    err = tmp_path / "err"
    r = subprocess.run(["bash", "-c", f"{command} 2>{shlex.quote(str(err))} | head -1; exit ${{PIPESTATUS[0]}}"],
                       cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    log = err.read_text()
    assert r.returncode == 128 + 13, r.stdout + r.stderr + log
    # the setup's lines after the one that failed go to stderr first: which ones depends on when head exits
    assert ("stdout was closed: finishing this step (or evaluation batch), then stopping: nothing is trained yet, "
            "so nothing is saved\n") in log and "saving checkpoint.pt" not in log
    assert "stopped during the first evaluation: nothing was trained yet" in log and "iter 1/" not in log
    assert not (tmp_path / "ckpt").exists()


def test_a_stdout_closed_at_a_finished_run_promises_no_save(char_data, tmp_path):
    """`train.py ... | head -1` on a run at max_iters already: nothing is trained or saved, and it says so."""
    config = tiny(char_data, tmp_path, max_iters=5)
    train(config)
    # a pipe whose reader is gone before the run starts: with `| head -1`, a slow head could still be
    # reading when the run has written its few lines, and then no write fails
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *cli_flags(config)], cwd=tmp_path,
                           stdout=write_end, stderr=subprocess.PIPE, text=True, env=subprocess_env(), timeout=120)
    finally:
        os.close(write_end)
    assert ("then stopping: max_iters is reached already, so nothing is left to train\n" in r.stderr
            and "saving checkpoint.pt" not in r.stderr), r.stderr


def test_a_signal_whose_exception_python_dropped_is_raised_again_at_the_next_check():
    """An exception from a signal handler that runs inside a fork's callbacks or a __del__ is printed as
    "Exception ignored" and lost; the stage that follows must still stop."""
    from utils import stop_signals_raise
    with stop_signals_raise(lambda signum: SystemExit(128 + signum)) as check:
        check()  # nothing received: nothing raised
        try:  # where Python would drop it
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between two bytecodes
                pass
        except SystemExit:
            pass
        with pytest.raises(SystemExit) as e:
            check()
    assert e.value.code == 128 + signal.SIGTERM


def test_a_stop_requested_after_a_signal_keeps_the_signal(capsys):
    """SIGTERM, then a closed stdout found while stopping: the run exits as SIGTERM asked (143), said once."""
    with GracefulStop(verbose=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between two bytecodes
            pass
        stop.request(13, "stdout was closed")
        assert stop.signum == signal.SIGTERM
    assert capsys.readouterr().err.count("finishing this step") == 1


def test_a_peer_gone_after_the_same_signal_ends_the_process_as_the_signal(monkeypatch, capsys):
    """Under torchrun, Ctrl-C while rank 0 still sets up: it leaves at once, and rank 1, waiting on it
    inside GracefulStop, sees the connection closed. That ends rank 1 as the signal does, without a traceback."""
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer\nmore")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    mine = lambda signum, frame: None  # noqa: E731
    before = signal.signal(signal.SIGINT, mine)
    try:
        with pytest.raises(SystemExit) as e:
            with GracefulStop(verbose=False) as stop:
                stop._handle(signal.SIGINT, None)
                raise gone
        assert signal.getsignal(signal.SIGINT) is mine  # given back on this way out too
    finally:
        signal.signal(signal.SIGINT, before)
    assert e.value.code == 130
    assert capsys.readouterr().err == "stopping after SIGINT: " + str(gone).splitlines()[0] + "\n"  # one line
    with pytest.raises(ValueError):  # a bug after the signal is no peer gone
        with GracefulStop(verbose=False) as stop:
            stop._handle(signal.SIGINT, None)
            raise ValueError("a bug")
    with pytest.raises(SystemExit):
        with GracefulStop(verbose=False) as stop:
            stop._handle(signal.SIGTERM, None)
            raise RuntimeError()  # without a message
    assert capsys.readouterr().err == "stopping after SIGTERM: RuntimeError\n"
    with pytest.raises(RuntimeError):  # without a signal it is an error, as it is outside torchrun
        with GracefulStop(verbose=False) as stop:
            raise gone
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError):
        with GracefulStop(verbose=False) as stop:
            stop._handle(signal.SIGINT, None)
            raise gone


def test_graceful_stop_gives_back_every_handler_it_took():
    """train() in a notebook or a sweep: after it returns, SIGHUP, SIGTERM and SIGINT do what they did before."""
    handler = lambda signum, frame: None  # noqa: E731
    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        with GracefulStop(verbose=False):
            assert signal.getsignal(signal.SIGHUP) is not handler
        assert signal.getsignal(signal.SIGHUP) is handler and signal.getsignal(signal.SIGTERM) is handler
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # noted, the loop finishes its step
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded again by torchrun: still noted only
        stop._first -= GracefulStop.REPEAT_S + 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between two bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_ddp_resume_between_log_steps_logs_the_same_losses(char_data, tmp_path, monkeypatch):
    # no --backend: on CPUs gloo is taken where the default, nccl, needs GPUs
    kw = dict(gradient_accumulation_steps=2, max_iters=12, log_interval=4, eval_interval=6, lr_decay_iters=12,
              save_interval=6)

    def torchrun(out, **overrides):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(ROOT / "train.py"), *cli_flags(tiny(char_data, out, **{**kw, **overrides}))],
                           cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        return dict(re.findall(r"^iter (\d+)/12: loss ([\d.]+),", r.stdout, re.M))  # {'8': '3.1234', ...}

    straight = torchrun(tmp_path / "a")
    # TensorBoard's HPARAMS name the backend in use, not the config's nccl, and the number of processes
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    acc = EventAccumulator(str(next((tmp_path / "a" / "runs").iterdir())))
    acc.Reload()
    hp = metadata.parse_session_start_info_plugin_data(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).hparams
    assert (hp["backend"].string_value, hp["world_size"].number_value) == ("gloo", 2)
    torchrun(tmp_path / "b", max_iters=6)  # stops between log steps 4 and 8
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "b" / "ckpt" / "checkpoint_iter_6.pt").unlink()  # as a kill between it and checkpoint.pt leaves it
    resumed = torchrun(tmp_path / "b")
    assert resumed == {k: straight[k] for k in ("8", "12")}
    assert (tmp_path / "b" / "ckpt" / "checkpoint_iter_6.pt").is_file()  # rank 0 saw it missing, both saved it
    # one process continues the two processes' run: the same means, to the rounding of another order
    alone = train(tiny(char_data, tmp_path / "c", **{**kw, "backend": "nccl"}))  # nccl: never used alone
    assert alone["resumed_from"] == 6
    assert [alone["losses"][i] for i in (8, 12)] == pytest.approx([float(straight[k]) for k in ("8", "12")],
                                                                   abs=2e-4)
    # nccl asked for by name on CPUs is refused, before any process group
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    config, explicit = parse_args(cli_flags(tiny(char_data, tmp_path / "d", **kw)) + ["--backend=nccl"])
    with pytest.raises(ConfigError, match=r"^the nccl backend needs CUDA GPUs, but device is cpu; use --backend=gloo$"):
        train(config, explicit)


def test_ddp_two_processes_match_one(char_data, tmp_path):
    # 200 evaluation batches: the val split's sweep (every target once) takes fewer, shared out over the ranks
    kw = dict(gradient_accumulation_steps=4, batch_size=2, max_iters=6, eval_interval=3, backend="gloo",
              eval_iters=200)
    single = train(tiny(char_data, tmp_path / "single", **kw))
    config = tiny(char_data, tmp_path / "ddp", **kw)
    noting = tmp_path / "train_noting.py"  # train.py, with a note for the id check of every .bin however small
    noting.write_text(f"import runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport data\n"
                      f"data.ID_CHECK_NOTE_BYTES = 0\nrunpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(noting), *cli_flags(config)], cwd=tmp_path, capture_output=True, text=True,
                       env=subprocess_env(tmp_path), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "over 2 processes" in r.stdout and r.stdout.count("tokens per step") == 1  # rank 0 alone prints
    assert r.stderr.count("checking the token ids of") == 2  # train.bin and val.bin, by rank 0 alone
    ddp_losses = {int(line.split()[1].split("/")[0]): float(line.split("loss ")[1].split(",")[0])
                  for line in r.stdout.splitlines() if line.startswith("iter ") and "/6:" in line}
    assert ddp_losses == pytest.approx(single["losses"], abs=2e-4)  # printed with 4 decimals
    with BatchLoader(char_data, 16, 2) as loader:
        assert loader.sweep_batches("val") < 200 < loader.sweep_batches("train")
    ddp_evals = {int(m[1]): (float(m[2]), float(m[3]))
                 for m in re.finditer(r"^iter (\d+): train loss ([\d.]+), val loss ([\d.]+)", r.stdout, re.M)}
    assert ddp_evals.keys() == single["evals"].keys() == {0, 3, 6}
    for it, (train_loss, val_loss) in ddp_evals.items():
        assert (train_loss, val_loss) == pytest.approx((single["evals"][it]["train"], single["evals"][it]["val"]),
                                                       abs=2e-4)
    a = load_checkpoint(tmp_path / "single" / "ckpt" / "final_checkpoint.pt")
    b = load_checkpoint(tmp_path / "ddp" / "ckpt" / "final_checkpoint.pt")
    for k in a["model"]:
        wa, wb = a["model"][k], b["model"][k]
        if k.endswith("attn.c_attn.bias"):
            # the key bias cannot change the softmax, so its true gradient is 0 and Adam turns the
            # rounding noise of two summation orders into whole steps; leave it out
            wa, wb = torch.cat([wa[:32], wa[64:]]), torch.cat([wb[:32], wb[64:]])
        torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5, msg=k)
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])


# ---------------------------------------------------------------------------- stops, resumes and warnings: more cases


# stop_requested must reduce with MAX, not SUM
def test_two_other_processes_signalled_name_their_signal(monkeypatch, capsys):
    from train import stop_requested
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    ops = {torch.distributed.ReduceOp.MAX: torch.maximum, torch.distributed.ReduceOp.SUM: torch.add}

    def all_reduce(flags, op, **kwargs):  # three processes: this one, and two that received SIGTERM
        others = torch.tensor([signal.SIGTERM, 1])
        flags.copy_(ops[op](ops[op](flags, others), others))
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop = GracefulStop(verbose=True)
    assert stop_requested(stop) and stop.signum == signal.SIGTERM
    assert capsys.readouterr().err == "another process received SIGTERM: stopping with it\n"


# a process that received a signal itself keeps it and says nothing of another process
def test_a_signalled_process_keeps_its_own_signal_at_the_check(monkeypatch, capsys):
    from train import stop_requested
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda flags, **kw: flags.copy_(torch.maximum(flags, torch.tensor([signal.SIGTERM, 1]))))
    stop = GracefulStop(verbose=True)
    stop._handle(signal.SIGINT, None)
    capsys.readouterr()
    assert stop_requested(stop) and stop.signum == signal.SIGINT
    assert capsys.readouterr().err == ""


# the newest three others, "..., " only when there are more, a path with a space quoted
def test_a_damaged_checkpoint_names_the_newest_three_others_and_quotes_its_path(char_data, tmp_path):
    out = tmp_path / "my run"
    kw = dict(max_iters=20, eval_interval=5, save_interval=5)
    train(tiny(char_data, out, **kw))
    ckpt = out / "ckpt"
    (ckpt / "checkpoint.pt").write_bytes((ckpt / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        train(tiny(char_data, out, **{**kw, "max_iters": 25}))
    assert str(e.value).endswith("(..., checkpoint_iter_10.pt, checkpoint_iter_15.pt, checkpoint_iter_20.pt)")
    mv = str(e.value).split("(mv ")[1].split(") and run")[0]
    assert shlex.split(mv) == ["mv", str(ckpt / "checkpoint.pt"), f"{ckpt / 'checkpoint.pt'}.damaged"][1:]
    (ckpt / "checkpoint_iter_5.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        train(tiny(char_data, out, **{**kw, "max_iters": 25}))
    assert str(e.value).endswith("others (checkpoint_iter_10.pt, checkpoint_iter_15.pt, checkpoint_iter_20.pt)")


# a damaged newest copy names an older checkpoint.pt among the others
def test_a_damaged_newest_copy_names_checkpoint_pt_among_the_others(char_data, tmp_path, monkeypatch):
    kw = dict(max_iters=20, eval_interval=8, save_interval=5)
    fail_at_step(monkeypatch, 13, RuntimeError("the machine went down"))
    with pytest.raises(RuntimeError):
        train(tiny(char_data, tmp_path, **kw))
    monkeypatch.undo()
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint_iter_10.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        train(tiny(char_data, tmp_path, **kw))
    assert str(e.value).endswith("resume from the newest of the others (checkpoint_iter_5.pt, checkpoint.pt)")


# checkpoint_folder is absolute, so a copy is told from the original from another working folder
def test_a_copy_of_a_folder_given_relative_is_a_copy_from_another_working_folder(char_data, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, checkpoint_dir="ckpt"))
    shutil.copytree(tmp_path / "a" / "ckpt", tmp_path / "branch")
    monkeypatch.chdir(tmp_path)
    branch = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, checkpoint_dir=str(tmp_path / "branch")))
    assert branch["resumed_from"] == 4 and branch["run_dir"] != first["run_dir"]


# a kill between checkpoint.pt and the copy at max_iters: running again writes the copy too
def test_a_copy_lost_at_the_last_iteration_is_written_when_run_again(char_data, tmp_path):
    kw = dict(max_iters=10, eval_interval=5, save_interval=5)
    train(tiny(char_data, tmp_path, **kw))
    for name in ("checkpoint_iter_10.pt", "final_checkpoint.pt"):  # what a kill after checkpoint.pt left out
        (tmp_path / "ckpt" / name).unlink()
    train(tiny(char_data, tmp_path, **kw))
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint_iter_10.pt")["iter_num"] == 10


# a resume between save_interval multiples writes no copy of its own
def test_a_resume_between_copies_keeps_the_copies_an_unbroken_run_keeps(char_data, tmp_path, monkeypatch):
    kw = dict(max_iters=10, eval_interval=100, save_interval=5)
    train(tiny(char_data, tmp_path / "straight", **kw))
    sigterm_at_step(monkeypatch, 3)
    assert train(tiny(char_data, tmp_path / "split", **kw))["iter_num"] == 3
    monkeypatch.undo()
    assert train(tiny(char_data, tmp_path / "split", **kw))["resumed_from"] == 3
    names = lambda d: sorted(p.name for p in (d / "ckpt").glob("checkpoint_iter_*.pt"))  # noqa: E731
    assert names(tmp_path / "split") == names(tmp_path / "straight")


# no warmup warning for a run that has nothing left to train
def test_a_finished_run_run_again_is_not_warned_of_its_warmup(char_data, tmp_path, capsys):
    kw = dict(warmup_iters=20, max_iters=4, eval_interval=4)
    train(tiny(char_data, tmp_path, **kw))
    assert "warning: warmup_iters" in capsys.readouterr().out
    train(tiny(char_data, tmp_path, **kw))
    out = capsys.readouterr().out
    assert "already trained for 4 iterations" in out and "warning: warmup_iters" not in out


# the suggested warmup is a tenth of the run
def test_the_suggested_warmup_is_a_tenth_of_the_run(char_data, tmp_path, capsys):
    train(tiny(char_data, tmp_path, warmup_iters=60, max_iters=50, lr_decay_iters=100, eval_interval=50))
    assert "give fewer, e.g. --warmup_iters=5\n" in capsys.readouterr().out


# a resume that only makes up the last evaluation still lists its changed settings
def test_a_resume_that_makes_up_the_last_evaluation_lists_its_changed_settings(char_data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    kw = dict(max_iters=10, eval_interval=5, eval_iters=20)
    steps = []
    monkeypatch.setattr("train.optimizer_step",
                        lambda *a, _real=__import__("train").optimizer_step, **k: steps.append(1) or _real(*a, **k))
    signal_at_batch(monkeypatch, "val", 3, lambda: len(steps), 10)
    assert train(tiny(char_data, tmp_path, **kw))["iter_num"] == 10
    monkeypatch.undo()
    summary = train(tiny(char_data, tmp_path, **kw, learning_rate=5e-3))
    assert summary["evals"].keys() == {10}
    acc = EventAccumulator(summary["run_dir"])
    acc.Reload()
    changes = acc.Tensors("config_changes/text_summary")
    assert [e.step for e in changes] == [11]
    assert "learning_rate: 0.01 -> 0.005" in changes[0].tensor_proto.string_val[0].decode()


# data found changed between steps: the message does not promise to finish a step
def test_data_prepared_again_says_it_saves_without_a_step_to_finish(char_data, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    at_step(monkeypatch, 3, lambda: prepared_again(data / "train.bin"))
    train(tiny(data, tmp_path / "run", max_iters=10, eval_interval=5))
    err = capsys.readouterr().err
    assert (f"{data / 'train.bin'} was replaced or changed since the run started (prepared again?): "
            f"{GracefulStop.SAVING}\n") in err and "finishing this step" not in err


# a process told by another that the data changed (its own look came just before the change) says so too
def test_a_process_stopped_by_anothers_data_change_names_it(char_data, tmp_path, monkeypatch):
    import train as train_module
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    real_step, real_check, steps = train_module.optimizer_step, train_module.stop_requested, []
    monkeypatch.setattr(train_module, "optimizer_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))

    def check(stop, group=None):  # what stop_requested gives under torchrun when another rank found the change
        if len(steps) == 3 and stop.signum is None:
            prepared_again(data / "train.bin")
            stop.signum = signal.SIGTERM
        return real_check(stop, group)
    monkeypatch.setattr(train_module, "stop_requested", check)
    with pytest.raises(DataError, match=r"train.bin was replaced or changed since the run started"):
        main(cli_flags(tiny(data, tmp_path / "run", max_iters=10, eval_interval=5)))


# under torchrun every process that saw the data change says it
def test_under_torchrun_each_process_says_its_data_changed(monkeypatch, capsys):
    import train as train_module
    monkeypatch.setattr(train_module, "train", lambda config, explicit: {"data_changed": "train.bin changed",
                                                                         "stopped_by": signal.SIGTERM})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr("utils.time.sleep", lambda s: None)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([]))
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error (rank 1): train.bin changed: finish preparing")


@pytest.mark.parametrize("body, said", [
    ("import os; os.lseek(0, 2**70, 0)", "Python int too large to convert to C long"),
    ("(2**70).to_bytes(2, 'big')", "int too big to convert"),
])
def test_run_cli_names_pythons_other_overflow_messages(body, said):
    code = f"from utils import run_cli\ndef main():\n    {body}\nrun_cli(main)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, f"error: a size or count given is too large to work with ({said}); "
                                           f"give smaller values\n")


def test_a_checkpoint_path_that_is_a_folder_is_named_so(tmp_path):
    from utils import load_weights_only
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(tmp_path))} is a directory$"):
        load_weights_only(tmp_path)


# sizes that cannot fit in the machine's memory: one line before the model is built, not the kernel's "Killed"
def test_a_run_that_cannot_fit_in_memory_is_refused_before_it_is_built(char_data, tmp_path, monkeypatch):
    import train as train_module
    from train import memory_problem
    config = tiny(char_data, tmp_path, vocab_size=65)
    # 12 x 2 layers x 32^2 + (65 + 16) x 32 parameters at 16 bytes; 4 x 16 tokens x 2 layers x 32 wide at 40 bytes
    weights, activations = 16 * 27168, 163840
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights + activations)
    assert memory_problem(config, cpu, torch.float32) is None
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights + activations - 1)
    assert memory_problem(config, cpu, torch.float32) == (
        "this run needs at least 598.528 kB of memory: 435 kB for the weights, gradients and AdamW state of 27,168 "
        "parameters and 164 kB for the activations of one micro-batch of 4 x 16 tokens; this machine has 598.527 kB "
        "(RAM and swap); give a smaller --batch_size or --block_size (with --gradient_accumulation_steps for the "
        "same tokens per step), or --gradient_checkpointing=True")
    # a resumed model keeps its block_size
    assert memory_problem(config, cpu, torch.float32, shape_given=False).endswith(
        "; give a smaller --batch_size (with --gradient_accumulation_steps for the same tokens per step), or "
        "--gradient_checkpointing=True")
    assert memory_problem(config, cpu, torch.bfloat16) is None  # half the activations under autocast
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights - 1)  # no batch makes the model fit
    assert memory_problem(config, cpu, torch.bfloat16).endswith("; give a smaller --n_layer or --n_embd")
    assert memory_problem(config, cpu, torch.bfloat16, False).endswith("; use a smaller model or a larger machine")
    config.gradient_checkpointing = True  # each layer's input alone
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights + activations // 10)
    assert memory_problem(config, cpu, torch.float32) is None
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights + activations // 10 - 1)
    assert memory_problem(config, cpu, torch.float32).endswith(
        "(with --gradient_accumulation_steps for the same tokens per step)")
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights // 4)  # a GPU's run: the weights built
    assert memory_problem(config, cuda, torch.bfloat16) is None
    monkeypatch.setattr(train_module, "machine_memory", lambda: weights // 4 - 1)
    assert "for the 27,168 weights, built on the CPU before they move to the GPU" in memory_problem(config, cuda,
                                                                                                  torch.bfloat16)
    monkeypatch.setattr(train_module, "machine_memory", lambda: None)  # unknown (Windows): not refused
    assert memory_problem(config, cpu, torch.float32) is None
    # under torchrun each process on the machine holds a copy of all of it
    config.gradient_checkpointing = False
    monkeypatch.setattr(train_module, "machine_memory", lambda: 3 * (weights + activations))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert memory_problem(config, cpu, torch.float32) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory_problem(config, cpu, torch.float32) == (
        "this run needs at least 2.4 MB of memory: 4 processes on this machine, each with 435 kB for the weights, "
        "gradients and AdamW state of 27,168 parameters and 164 kB for the activations of one micro-batch of 4 x 16 "
        "tokens; this machine has 1.8 MB (RAM and swap); give a smaller --batch_size or --block_size (with "
        "--gradient_accumulation_steps for the same tokens per step), or --gradient_checkpointing=True, or run fewer "
        "processes on this machine than 4 (torchrun --nproc_per_node)")
    monkeypatch.setattr(train_module, "machine_memory", lambda: 3 * weights)  # four models alone do not fit
    assert memory_problem(config, cpu, torch.float32).endswith(
        "; run fewer processes on this machine than 4 (torchrun --nproc_per_node), or give a smaller --n_layer or "
        "--n_embd")
    assert memory_problem(config, cpu, torch.float32, shape_given=False).endswith("(torchrun --nproc_per_node)")
    monkeypatch.setattr(train_module, "machine_memory", lambda: 3 * weights // 4)  # nor four GPU runs' weights
    assert "4 processes on this machine, each with 109 kB for the 27,168 weights" in memory_problem(
        config, cuda, torch.bfloat16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # train.py: one line, exit 2, no folder left (a machine of 100 kB: without the check, the run would train)
    monkeypatch.setattr(train_module, "machine_memory", lambda: 10**5)
    dtypes = []
    monkeypatch.setattr(train_module, "memory_problem",
                        lambda config, device, dtype, *args: dtypes.append(dtype) or memory_problem(config, device,
                                                                                                    dtype, *args))
    with pytest.raises(ConfigError, match=r"^this run needs at least \d+ kB of memory: .* one micro-batch of "
                                          r"4 x 16 tokens; this machine has 100 kB \(RAM and swap\); give a smaller "
                                          r"--n_layer or --n_embd$"):
        train(tiny(char_data, tmp_path, max_iters=2, dtype="bfloat16"))
    assert dtypes == [torch.bfloat16]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    monkeypatch.setattr(train_module, "machine_memory", lambda: None)
    train(tiny(char_data, tmp_path, max_iters=2))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 10**6)  # a resume with a larger batch
    with pytest.raises(ConfigError, match=r"micro-batch of 400 x 16 tokens; this machine has 1 MB \(RAM and "
                                          r"swap\); give a smaller --batch_size \(with --gradient_accumulation_steps "
                                          r"for the same tokens per step\), or --gradient_checkpointing=True$"):
        train(tiny(char_data, tmp_path, max_iters=4, batch_size=400))
    # fine-tuning a model folder: checked once its shape is read
    export = tmp_path / "export"
    model_from_checkpoint(load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")).save_pretrained(
        str(export), tokenizer=load_tokenizer(char_data / "tokenizer.json"))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 10**5)
    with pytest.raises(ConfigError, match=r"^this run needs at least .*; use a smaller model or a larger machine$"):
        train(tiny(char_data, tmp_path / "tuned", init_from=str(export), max_iters=2))


def test_a_pretrained_model_too_large_is_refused_before_its_weights_are_read(char_data, tmp_path, monkeypatch):
    """GPT-2 XL trains in 25 GB on a CPU: on a 24 GB machine the refusal comes before the download of 6 GB; a
    folder's shape comes from its config.json, with the context the command asks for."""
    import train as train_module
    from tokenizer import GPT2Tokenizer
    monkeypatch.setattr(GPT, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("weights read")))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 24 * 10**9)
    gpt2_data = write_data(tmp_path / "gpt2data", GPT2Tokenizer(), " ".join(WORDS * 40))
    with pytest.raises(ConfigError, match=r"^this run needs at least 25\.\d GB of memory: 24\.9 GB for the weights, "
                                          r"gradients and AdamW state of 1\.55B parameters and .* this machine has "
                                          r"24\.0 GB \(RAM and swap\); use a smaller model or a larger machine$"):
        train(tiny(gpt2_data, tmp_path / "xl", init_from="gpt2-xl", max_iters=2))  # 16 positions of 1,024
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=48, n_head=25, n_embd=1600,
                                                        n_positions=1024, vocab_size=65)))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 20 * 10**9)  # 23.8 GB with 65 tokens
    with pytest.raises(ConfigError, match=r"micro-batch of 4 x 16 tokens; this machine has 20\.0 GB"):
        train(tiny(char_data, tmp_path / "folder", init_from=str(folder), max_iters=2))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 23.7e9)  # the weights fit, not with the batch
    with pytest.raises(ConfigError, match=r"; give a smaller --batch_size or --block_size \(with "):  # may shorten it
        train(tiny(char_data, tmp_path / "folder", init_from=str(folder), max_iters=2))
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer="48", n_head=25, n_embd=1600,
                                                        n_positions=1024, vocab_size=65)))
    with pytest.raises(pytest.fail.Exception, match="weights read"):  # a shape to check first: the load says why
        train(tiny(char_data, tmp_path / "folder", init_from=str(folder), max_iters=2))
    assert not (tmp_path / "xl").exists() and not (tmp_path / "folder").exists()
    # without --block_size (1,024 is config.py's default, so not given) the folder's 2,048 positions are counted
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32,
                                                        n_positions=2048, vocab_size=65)))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 15 * 10**6)  # 4 x 1,024 tokens: 11 MB; 2,048: 22
    with pytest.raises(ConfigError, match=r"micro-batch of 4 x 2048 tokens"):
        train(tiny(char_data, tmp_path / "folder", init_from=str(folder), block_size=1024, max_iters=2))
    # a layer count of 0 is no shape to check: from_pretrained names what is wrong with it
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=0, n_head=25, n_embd=1600,
                                                        n_positions=1024, vocab_size=50257)))
    monkeypatch.setattr(train_module, "machine_memory", lambda: 10**9)  # its embeddings alone take 1.3 GB
    with pytest.raises(pytest.fail.Exception, match="weights read"):
        train(tiny(char_data, tmp_path / "folder", init_from=str(folder), max_iters=2))


def test_amounts_of_memory_that_differ_do_not_read_the_same():
    from utils import format_bytes, format_bytes_apart
    assert (format_bytes(1_234_567), format_bytes(24_930_000_000), format_bytes(999)) == ("1 MB", "24.9 GB", "999 B")
    assert (format_bytes(0), format_bytes(0.4)) == ("0 B", "0 B")
    assert format_bytes_apart(24_930_000_000, 24_910_000_000) == ("24.93 GB", "24.91 GB")
    assert format_bytes_apart(7_200_000, 7_000_000) == ("7.2 MB", "7.0 MB")
    assert format_bytes_apart(30_000_000, 7_000_000) == ("30 MB", "7 MB")  # apart already
    assert format_bytes_apart(2_000_000, 2_000_000) == ("2 MB", "2 MB")  # the same amount
    assert format_bytes_apart(1_000_000, 999_999) == ("1.000000 MB", "0.999999 MB")
    # in the larger amount's unit: not '1.0 GB' against '1,000 MB'
    assert format_bytes_apart(10**9, 999_500_000) == ("1.0000 GB", "0.9995 GB")
    assert format_bytes_apart(999_700_000, 10**9) == ("0.9997 GB", "1.0000 GB")
    assert format_bytes_apart(1_500, 999) == ("2 kB", "1 kB")


def test_machine_memory_is_ram_and_swap(tmp_path):
    from utils import machine_memory
    (tmp_path / "meminfo").write_text("MemTotal:       24684092 kB\nMemFree:        22997260 kB\n"
                                      "SwapTotal:       2097148 kB\nSwapFree:        2097148 kB\n")
    assert machine_memory(str(tmp_path / "meminfo")) == (24684092 + 2097148) * 1024
    (tmp_path / "meminfo").write_text("MemTotal:       24684092 kB\n")
    assert machine_memory(str(tmp_path / "meminfo")) == 24684092 * 1024
    if hasattr(os, "sysconf"):  # no /proc/meminfo, or no MemTotal in it (macOS, say): RAM from sysconf
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert machine_memory(str(tmp_path / "missing")) == ram
        (tmp_path / "meminfo").write_text("MemFree:  1 kB\n")
        assert machine_memory(str(tmp_path / "meminfo")) == ram


# from the mutation audit of the resume lines: each part of what a resume lists and writes
def test_a_resume_lists_a_new_log_folder_and_another_data_set_but_never_the_start(char_data, tmp_path, capsys):
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, init_from="resume", log_dir=str(tmp_path / "other")))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("settings this command changed"))
    assert "log_dir: " in line and "init_from" not in line  # a new TensorBoard run; a resume is from the same start
    write_data(tmp_path / "data2", load_tokenizer(char_data / "tokenizer.json"),
               "to be or not to be that is the question\n" * 100)
    train(tiny(tmp_path / "data2", tmp_path, max_iters=6, eval_interval=2, eval_iters=3))
    out = capsys.readouterr().out
    assert "data_dir: " in out and out.count("note: ") == 1  # the data set's note says it all


def test_the_text_page_of_changes_only_where_a_run_continues_and_trains(char_data, tmp_path):
    first = train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))
    before = sorted(os.listdir(first["run_dir"]))
    train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, learning_rate=5e-3))  # finished: trains nothing
    assert sorted(os.listdir(first["run_dir"])) == before
    shutil.copytree(tmp_path / "ckpt", tmp_path / "branch")  # a run of its own: its HPARAMS say its settings
    branch = train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, learning_rate=5e-3,
                        checkpoint_dir=str(tmp_path / "branch")))
    assert "config_changes/text_summary" not in event_steps(branch["run_dir"])[1].Tags()["tensors"]


def test_a_checkpoint_whose_config_lacks_a_key_still_resumes(char_data, tmp_path):
    """Older checkpoints hold fewer settings; the val-batches note must not need every one."""
    train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2))
    path = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["seed"]
    save_checkpoint(path, ckpt)
    for p in (tmp_path / "ckpt").glob("*checkpoint*.pt"):
        if p != path:
            p.unlink()
    assert train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2))["resumed_from"] == 2
