"""bench.py on CPU: the smoke run CI can afford, and its JSON figures."""
import json
import math
import os
import subprocess
import sys
import threading
import types

import pytest
import torch

from conftest import ROOT, gpt2_encoding


def run_bench(*args, env=None):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def test_cpu_smoke_run_writes_consistent_figures(tmp_path):
    out = run_bench("--device", "cpu", "--steps", "2", "--warmup", "1", "--gen_tokens", "4",
                    "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["device"] == "cpu" and r["preset"] == "shakespeare-char-cpu" and r["vocab_size"] == 65
    assert r["attention"] == "flash" and ", attention flash\n" in out.stdout  # the CPU's kernel, without dropout
    t = r["train"]
    assert t["mfu"] is None  # no known peak on a CPU: FLOP/s instead of a percentage
    assert math.isfinite(t["tokens_per_sec"]) and t["tokens_per_sec"] > 0
    # FLOP/s: the model's FLOPs per token times tokens/s, in units of 10^12
    from config import preset_config
    from model import GPT
    with torch.device("meta"):
        flops_per_token = GPT(preset_config("shakespeare-char-cpu", vocab_size=65)).flops_per_token()
    assert math.isclose(t["achieved_tflops"] * 1e12, flops_per_token * t["tokens_per_sec"], rel_tol=1e-6)
    tokens = r["batch_size"] * r["block_size"]
    assert math.isclose(t["tokens_per_sec"] * t["ms_per_iter"] / 1000, tokens, rel_tol=1e-6)
    assert abs(t["final_loss"] - math.log(65)) < 0.5  # a freshly initialised model is near uniform
    assert [g["batch_size"] for g in r["generate"]] == [1, 8]
    assert all(g["tokens_per_sec"] > 0 for g in r["generate"])
    # generation can take minutes: each batch size reports its runs
    assert "    batch 1: run 1/2, " in out.stderr and "    batch 8: run 2/2, " in out.stderr
    assert "tokens/s" in out.stdout
    # the figure as printed, in GFLOP/s below 1 TFLOP/s (this small model on a CPU) rather than "0.00 TFLOP/s"
    from train import format_flops
    assert f"| {format_flops(t['achieved_tflops'] * 1e12)} achieved" in out.stdout
    assert t["achieved_tflops"] >= 1 or " GFLOP/s achieved" in out.stdout


@pytest.mark.parametrize("n_bytes", [10_000, 100_000, 3_000_000])
def test_the_tokenisation_text_has_the_size_asked_for(n_bytes, tmp_path):
    import bench
    assert n_bytes - 4 < len(bench.bench_text(n_bytes).encode("utf-8")) <= n_bytes
    # words drawn from a text without spaces (Chinese) are whole lines: far longer than made-up words
    (tmp_path / "zh.txt").write_text("床前明月光疑是地上霜举头望明月低头思故乡\n白日依山尽黄河入海流\n" * 3, encoding="utf-8")
    text = bench.bench_text(n_bytes, str(tmp_path / "zh.txt"))
    assert n_bytes - 4 < len(text.encode("utf-8")) <= n_bytes and "\ufffd" not in text


def test_the_attention_kernel_reported_is_the_one_the_model_uses(monkeypatch, capsys):
    import bench
    import model
    monkeypatch.setattr(model, "attention_kernel", lambda *args: "math")
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1"])
    assert r["attention"] == "math" and ", attention math\n" in capsys.readouterr().out


def test_bad_arguments_exit_2():
    out = run_bench("--device", "cpu", "--steps", "0")
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1


def one_line_error(argv, capsys) -> str:
    import bench
    from utils import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: bench.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_dropout_is_on_only_when_asked_for(capsys):
    import bench
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1", "--dropout", "0.2"])
    assert r["dropout"] == 0.2 and " dropout=0.2; batch " in capsys.readouterr().out
    assert bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1"])["dropout"] == 0.0
    assert one_line_error(["--device", "cpu", "--dropout", "1"], capsys) == "error: --dropout must be in [0, 1), got 1\n"


def test_the_loss_in_chunks_is_timed_when_asked_for(monkeypatch, capsys):
    import bench
    import model
    calls = []
    real = model.chunked_loss
    monkeypatch.setattr(model, "chunked_loss", lambda *a: calls.append(a[-1]) or real(*a))
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1", "--loss_chunk_rows", "100"])
    assert r["loss_chunk_rows"] == 100 and ", loss 100 tokens at a time, " in capsys.readouterr().out
    assert calls == [100, 100]  # the warm-up step and the timed one
    assert bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1"])["loss_chunk_rows"] == 0
    assert calls == [100, 100]
    assert "loss_chunk_rows must be an integer >= 0, got -1" in one_line_error(
        ["--device", "cpu", "--loss_chunk_rows", "-1"], capsys)


def test_the_gpt2_presets_loss_in_one_chunk_is_the_default_and_0_turns_it_off(monkeypatch):
    import bench
    import model
    calls = []
    real = model.chunked_loss
    monkeypatch.setattr(model, "chunked_loss", lambda *a: calls.append(a[-1]) or real(*a))
    small = ["--preset", "gpt2", "--device", "cpu", "--batch_size", "1", "--block_size", "8", "--no_generate",
             "--warmup", "1", "--steps", "1"]
    assert bench.main(small)["loss_chunk_rows"] == 16384 and calls == [16384, 16384]
    assert bench.main(small + ["--loss_chunk_rows", "0"])["loss_chunk_rows"] == 0 and calls == [16384, 16384]


def test_cuda_graph_refuses_a_cpu_and_a_warm_up_that_would_not_reach_the_capture(capsys, monkeypatch):
    for warmup in ("5", "3"):  # the device first: a larger --warmup would not help on a CPU
        err = one_line_error(["--device", "cpu", "--cuda_graph", "--no_generate", "--warmup", warmup], capsys)
        assert err == ("error: --cuda_graph captures the training step on a CUDA GPU, and this run's device is cpu; "
                       "or drop --cuda_graph\n")
    import train
    monkeypatch.setattr(train, "cuda_graph_problem", lambda *args: None)  # as on a GPU
    err = one_line_error(["--device", "cpu", "--cuda_graph", "--no_generate", "--warmup", "3"], capsys)
    assert err == ("error: --cuda_graph captures the step after 3 plain ones: give --warmup 4 or more, so that the "
                   "timed steps only replay it\n")


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "batch_size must be an integer > 0, got 0"),
    (["--block_size", "0"], "block_size must be an integer > 0, got 0"),
    (["--vocab_size", "0"], "vocab_size must be an integer > 0, got 0"),
    (["--no_train", "--gen_tokens", "50"], "the 16-token prompt and 50 new tokens exceed block_size 64, where decoding "
                                           "would slide its window and rebuild the cache: use --gen_tokens 48 or less, "
                                           "or --block_size 66 or more (or a larger --preset)"),
    (["--no_train", "--hf_reference", "--block_size", "16"], "the generation benchmark's 16-token prompt fills "
                                                             "block_size 16: give --block_size 17 or more, or "
                                                             "--no_generate"),
    (["--no_train", "--hf_reference", "--gen_batch_sizes", "8"],
     "--hf_reference times transformers' generate at batch 1, which --gen_batch_sizes 8 leaves out; add 1"),
    (["--stpes", "3"], "unrecognized arguments: --stpes 3; see"),
    (["--gen-tokens", "3"], "unrecognized arguments: --gen-tokens 3 (did you mean --gen_tokens?); see "),
    # train.py's flags before --whole_run's `--`, shown after it as train.py names them
    (["--whole_run", "--max_iters=5", "--eval-iters", "2"],
     "error: unrecognized arguments: --max_iters=5 --eval-iters 2; train.py's flags go after `--`, e.g. --whole_run "
     "-- --max_iters=5 --eval_iters 2; see "),
    # bench.py's own flags mistyped with --whole_run are no train.py flags
    (["--whole_run", "--warm-cache"], "error: unrecognized arguments: --warm-cache (did you mean --warm_cache?); see "),
    (["--whole_run", "--stpes", "3"], "error: unrecognized arguments: --stpes 3; see "),
    (["--steps", "three"], "argument --steps: invalid int value: 'three'"),
    (["--profile", "-1"], "--profile profiles training steps: give a number of steps, at least 1"),
    (["--profile", "2", "--no_train"], "and leave out --no_train (got --profile 2 --no_train)"),
    (["--no_generate", "--hf_reference"], "--hf_reference times transformers' generation next to ours, which "
                                          "--no_generate leaves out"),
    (["--no_train", "--num_proc", "2", "--tokenize_mb", "1"], "--num_proc, --tokenize_mb are for --tokenize"),
    (["--warmup", "0"], "--warmup, --steps and --gen_tokens must be at least 1"),  # else a traceback
    (["--no_train", "--gen_tokens", "0"], "--warmup, --steps and --gen_tokens must be at least 1"),  # else 0 tok/s
    # a part left out: its flags would be ignored, and written into --json as if they had applied
    (["--no_train", "--steps", "500", "--dropout", "0.1"], "--dropout, --steps are for the training benchmark, which "
                                                          "--no_train leaves out"),
    (["--no_generate", "--gen_tokens", "100000"], "--gen_tokens is for the generation benchmark, which --no_generate "
                                                  "leaves out"),
])
def test_bad_model_arguments_are_one_line_errors(argv, message, capsys):
    assert message in one_line_error(["--device", "cpu", *argv], capsys)


def test_tokenize_refuses_the_model_benchmarks_flags(capsys):
    err = one_line_error(["--tokenize", "--tokenize_mb", "0.1", "--steps", "3", "--preset", "gpt2"], capsys)
    assert err.startswith("error: --tokenize times GPT-2 tokenisation only: --preset, --steps are for the model "
                          "benchmark")
    err = one_line_error(["--tokenize", "--tokenize_mb", "0.1", "--preset", "gpt2"], capsys)  # alone too
    assert err.startswith("error: --tokenize times GPT-2 tokenisation only: --preset is for the model benchmark")
    for n in ("0", "99999999999999999999"):  # a huge one used to start a process per share of the text
        err = one_line_error(["--tokenize", "--tokenize_mb", "0.1", "--num_proc", n], capsys)
        assert err.startswith("error: --num_proc must be between 1 and ") and f"got {n};" in err


def test_the_timed_steps_train_on_whole_blocks_and_compile_by_itself_on_cuda_only(monkeypatch):
    """tokens/s counts batch x block_size tokens a step: the random batches must be that long. --compile auto
    means CUDA only (--help), not every device but the CPU."""
    import bench
    import model
    import train
    shapes, real = [], train.forward_backward

    def spy(step_model, get_batch, *args, **kwargs):
        x, y = get_batch(0)
        shapes.append((tuple(x.shape), tuple(y.shape)))
        return real(step_model, get_batch, *args, **kwargs)
    monkeypatch.setattr(train, "forward_backward", spy)
    bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1", "--batch_size", "2",
                "--block_size", "8"])
    assert shapes == [((2, 8), (2, 8))] * 2
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("mps"))  # an Apple GPU
    monkeypatch.setattr(bench, "resolve_dtype", lambda name, device: torch.float32)
    monkeypatch.setattr(model, "attention_kernel", lambda *args, **kwargs: "math")
    assert bench.main(["--no_train", "--no_generate"])["compile"] is False


def test_generation_reports_the_best_run_and_transformers_makes_every_token_counted(monkeypatch):
    """benchmark_generation reports the faster of its runs (a busy machine slows one, not the model); the
    transformers reference may not stop early at an end-of-text, since its tokens/s counts all it was asked for."""
    import transformers
    import generate
    from config import GPT2Config
    from model import GPT
    now, durations = [0.0], iter([1.0, 4.0])

    class Gen:  # decoding that takes 1 s, then 4 s (after an untimed warm-up)
        def __init__(self, *args, **kwargs):
            self.warm = False

        def decode(self, rows, n, pick):
            if self.warm:
                now[0] += next(durations)
            self.warm = True
            yield from ([0] * len(rows) for _ in range(n))
    with monkeypatch.context() as m:
        m.setattr(generate, "Generator", Gen)
        m.setattr(generate, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
        tiny = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10))
        r = generate.benchmark_generation(tiny, batch_size=2, prompt_len=3, new_tokens=5, device="cpu",
                                          dtype="float32", repeats=2)
    assert r["tokens_per_sec"] == pytest.approx(2 * 5 / 1.0)
    asked = []
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "generate",
                        lambda self, x, **kw: asked.append((kw.get("min_new_tokens"), kw["max_new_tokens"])))
    small = GPT(GPT2Config(vocab_size=70, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
    generate.benchmark_generation(small, batch_size=1, prompt_len=3, new_tokens=5, device="cpu", dtype="float32",
                                  reference_hf=True, repeats=1)
    assert asked and all(low == high == 5 for low, high in asked)


def test_float16_on_a_cpu_is_warned_of(capsys):
    import bench
    bench.main(["--device", "cpu", "--dtype", "float16", "--no_train", "--gen_tokens", "2", "--gen_batch_sizes", "1"])
    assert "warning: float16 on a CPU is emulated by most processors" in capsys.readouterr().err


def test_profile_accounts_for_the_step(capsys):
    import bench
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "2", "--profile", "2"])
    p = r["train"]["profile"]
    assert p["steps"] == 2 and p["measured"] == "CPU operators (self time)"
    assert math.isclose(sum(p["kinds"].values()), p["ms_per_step"], rel_tol=1e-9)
    # the operators run inside the steps, so they cannot take longer than those same steps do (timed with the
    # profiler on, so a busy machine slows both), and most of a float32 CPU step is spent in them
    assert 0.3 * p["wall_ms_per_step"] < p["ms_per_step"] <= p["wall_ms_per_step"]
    assert p["kinds"]["matmul"] > 0 and p["kinds"]["attention"] > 0 and p["kinds"]["optimizer and clipping"] > 0
    names = [row["name"] for row in p["top"]]
    assert len(names) == 12 and "aten::mm" in names
    # forward and backward of the 4 layers' matmuls, once per step, not once per profiled step in all
    mm = next(row for row in p["top"] if row["name"] == "aten::mm")
    assert mm["calls_per_step"] >= 4 * 4 and mm["calls_per_step"] == int(mm["calls_per_step"])
    out = capsys.readouterr().out
    assert "profile of 2 more steps: CPU operators (self time) take" in out and "aten::mm" in out


@pytest.mark.parametrize("kernel, kind", [
    ("void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false, true>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, "
     "cutlass::bfloat16_t, true, false, true, 64, 64, 64, false>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "matmul"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer and clipping"),
    ("triton_per_fused__to_copy_add_native_layer_norm_4", "fused elementwise and reductions (Triton)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >", "other"),
])
def test_kernel_names_fall_into_their_kind(kernel, kind):
    import bench
    assert bench.time_kind(kernel) == kind


def test_json_into_a_directory_fails_before_running(tmp_path, capsys):
    assert "is a directory" in one_line_error(["--device", "cpu", "--json", str(tmp_path)], capsys)
    (tmp_path / "f").write_text("")
    assert "cannot be written: its folder is a file" in one_line_error(
        ["--device", "cpu", "--json", str(tmp_path / "f" / "b.json")], capsys)


def test_generation_is_timed_within_block_size_and_its_settings_are_kept(monkeypatch, tmp_path):
    # past block_size decoding slides its window and rebuilds the cache: the default stays within it
    import bench
    import generate
    seen = []
    monkeypatch.setattr(generate, "benchmark_generation",
                        lambda *a, **k: seen.append((k["prompt_len"], k["new_tokens"])) or dict(tokens_per_sec=1.0))
    report = bench.main(["--device", "cpu", "--no_train", "--gen_batch_sizes", "1", "--json", str(tmp_path / "b.json")])
    assert seen == [(16, 48)]  # the CPU preset's block_size is 64: 50 would not fit
    kept = json.loads((tmp_path / "b.json").read_text())
    assert (kept["prompt_tokens"], kept["gen_tokens"], kept["dtype"]) == (16, 48, "float32") == (
        report["prompt_tokens"], report["gen_tokens"], report["dtype"])
    bench.main(["--device", "cpu", "--no_train", "--gen_batch_sizes", "1", "--block_size", "128"])
    assert seen[-1] == (16, 50)


def test_generation_is_timed_with_the_compile_setting(monkeypatch, capsys):
    import bench
    import generate
    seen = []
    monkeypatch.setattr(generate, "benchmark_generation",
                        lambda *a, **k: seen.append(k["compile"]) or dict(tokens_per_sec=1.0, hf_tokens_per_sec=None))
    for flag in ("true", "false"):
        bench.main(["--device", "cpu", "--no_train", "--gen_batch_sizes", "1", "--compile", flag])
    assert seen == [True, False]
    monkeypatch.setattr(generate, "benchmark_generation",
                        lambda *a, **k: dict(tokens_per_sec=52.5, hf_tokens_per_sec=25.0))
    capsys.readouterr()
    bench.main(["--device", "cpu", "--no_train", "--gen_batch_sizes", "1", "--gen_tokens", "40", "--hf_reference"])
    assert "  batch 1: 52.5 tokens/s | transformers generate 25.0 tokens/s (x2.10)" in capsys.readouterr().out


@pytest.mark.parametrize("compile_, regional", [("true", False), ("true", True), ("false", True)])
def test_compile_regional_times_the_compiled_regions(monkeypatch, capsys, compile_, regional):
    import bench
    from model import GPT
    compiled, checks, check = [], [], GPT._check_input

    def fake_compile(fn, mode=None, **kwargs):  # records what is compiled; it runs as it is
        compiled.append((type(fn).__name__, mode))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(GPT, "_check_input",
                        lambda self, idx, ids=True, **kw: checks.append(ids) or check(self, idx, ids, **kw))
    report = bench.main(["--device", "cpu", "--compile", compile_, "--compile_mode", "max-autotune", "--warmup", "1",
                         "--steps", "1", "--no_generate", "--batch_size", "2", "--block_size", "8"]
                        + ["--compile_regional"] * regional)
    on = compile_ == "true"
    assert report["compile_regional"] is (on and regional) and math.isfinite(report["train"]["final_loss"])
    n_layer = report["n_layer"]
    want = [("method", "max-autotune")] + [("Block", "max-autotune")] * n_layer + [("method", "max-autotune")]
    assert compiled == ((want if regional else [("GPT", "max-autotune")]) if on else [])
    assert ("--compile_regional does nothing" in capsys.readouterr().out) is not on
    assert checks and not any(checks)  # no id check, no GPU sync, in the timed steps


def test_tokenize_from_a_file_without_words(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    out = run_bench("--tokenize", "--tokenize_mb", "0.05", "--num_proc", "1", "--input", str(tmp_path / "empty.txt"))
    assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith("error: ")  # after a progress line
    assert "holds no words" in out.stderr and "Traceback" not in out.stderr
    # NULs are UTF-8: a binary file is named as the --input, at once, not later as a temporary file of words
    (tmp_path / "train.bin").write_bytes(bytes(range(2, 60)) * 30 + b"\0" * 2000)  # a data set's ids, say
    out = run_bench("--tokenize", "--tokenize_mb", "0.05", "--num_proc", "1", "--input", str(tmp_path / "train.bin"))
    lines = out.stderr.splitlines()  # the progress line, then the error: nothing timed before it
    assert out.returncode == 2 and len(lines) == 2 and out.stdout == "", out.stderr
    assert lines[1].startswith(f"error: {tmp_path / 'train.bin'} is not text: 2,000 of its first 3,740 bytes are NULs")


@pytest.mark.parametrize("sizes", ["x", "0", "1,-8", ",", "1,,2"])
def test_bad_gen_batch_sizes_are_one_line_errors(sizes, capsys):
    import bench
    from utils import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: bench.main(["--device", "cpu", "--gen_batch_sizes", sizes]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: --gen_batch_sizes must be a comma-separated list of positive integers, got {sizes!r}; "
                   "e.g. --gen_batch_sizes 1,8\n")


def test_cpu_bfloat16_trains_under_autocast_with_train_py_step(monkeypatch):
    import bench
    import train
    from model import GPT
    seen = {"autocast": [], "steps": 0}
    forward, forward_backward = GPT.forward, train.forward_backward

    def recording_forward(self, idx, targets=None):
        seen["autocast"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, idx, targets)

    def counting_forward_backward(*args, **kwargs):
        seen["steps"] += 1
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(GPT, "forward", recording_forward)
    monkeypatch.setattr(train, "forward_backward", counting_forward_backward)
    report = bench.main(["--device", "cpu", "--dtype", "bfloat16", "--warmup", "1", "--steps", "2", "--no_generate",
                         "--batch_size", "2", "--block_size", "8"])
    assert report["dtype"] == "bfloat16" and math.isfinite(report["train"]["final_loss"])
    assert seen["steps"] == 3  # every step, warm-up and timed, is train.py's forward_backward
    assert seen["autocast"] == [(True, torch.bfloat16)] * 3


def test_tokenize_benchmark_matches_tiktoken(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SHAKESPEARE"}  # made-up words, non-ASCII included
    out = run_bench("--tokenize", "--tokenize_mb", "2", "--num_proc", "2", "--json", str(tmp_path / "t.json"), env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "t.json").read_text())["tokenize"]
    assert set(r) == {"mb", "num_proc", "single_thread_mb_s", "single_thread_numpy_mb_s", "tiktoken_parallel_mb_s",
                      "text_file_mb_s", "documents_mb_s", "target_mb_s", "text_file_tokens", "documents",
                      "documents_tokens"}
    assert r["num_proc"] == 2 and 2.0 <= r["mb"] < 3.0
    assert all(r[k] > 0 for k in r if k.endswith("_mb_s"))
    assert math.isclose(r["target_mb_s"], 0.7 * r["single_thread_mb_s"] * 2, abs_tol=0.02)
    # the same generated text, tokenised here by tiktoken: the text file is split 90/10 by characters,
    # and every JSON Lines document is followed by end-of-text
    from bench import bench_documents, bench_text
    text = bench_text(2_000_000)
    enc = gpt2_encoding()
    cut = int(len(text) * 0.9)
    assert r["text_file_tokens"] == len(enc.encode_ordinary(text[:cut])) + len(enc.encode_ordinary(text[cut:]))
    docs = [json.loads(line)["text"] for line in bench_documents(text)]
    assert "".join(docs) == text and r["documents"] == len(docs)
    assert r["documents_tokens"] == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    assert "ids identical to single-thread tiktoken: yes" in out.stdout


def test_tokenize_small_sizes(capsys):
    """A tenth of a MB makes a handful of documents: val still gets one; a thousandth makes one, which
    cannot fill both splits: a one-line error."""
    import bench
    r = bench.main(["--tokenize", "--tokenize_mb", "0.1", "--num_proc", "1"])["tokenize"]
    assert r["mb"] == 0.1 and r["documents"] >= 2
    capsys.readouterr()
    from utils import UserError
    with pytest.raises(UserError, match=r"--tokenize_mb 0.001 makes 1 document, and both splits need one"):
        bench.bench_tokenize(0.001, 1, None)
    r = bench.main(["--tokenize", "--tokenize_mb", "0.05", "--num_proc", "1"])["tokenize"]  # the least it takes
    assert r["documents"] >= 2


@pytest.mark.parametrize("mb", ["0", "0.01", "inf", "nan"])
def test_tokenize_bad_size_exits_2(mb):
    out = run_bench("--tokenize", "--tokenize_mb", mb)  # refused before any text is made
    assert out.returncode == 2
    assert out.stderr == (f"error: --tokenize_mb must be a number of megabytes, at least 0.05, got {float(mb):g}; "
                          "e.g. --tokenize_mb 100\n")


class FakeClock:
    """time.perf_counter for bench.py: a training step takes 10 ms, nothing else takes time."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):  # strftime, time, ...
        import time
        return getattr(time, name)


def test_training_figures_come_from_the_timed_steps_alone(monkeypatch, capsys):
    """2 warm-up steps and 3 timed ones at 10 ms each: ms per iteration, tokens/s, MFU against a known peak
    and the parameter count follow from the 3 timed steps only."""
    import bench
    import model as model_module
    import train
    clock, forward_backward = FakeClock(), train.forward_backward

    def timed_forward_backward(*args, **kwargs):
        clock.now += 0.010
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(train, "forward_backward", timed_forward_backward)
    monkeypatch.setattr(model_module, "peak_flops", lambda device, dtype=None: 1e9)
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "2", "--steps", "3", "--batch_size", "2",
                    "--block_size", "8"])
    t = r["train"]
    assert t["ms_per_iter"] == pytest.approx(10.0) and t["tokens_per_sec"] == pytest.approx(16 / 0.010)
    assert t["warmup_s"] == pytest.approx(0.020)
    from config import preset_config
    from model import GPT
    with torch.device("meta"):
        reference = GPT(preset_config("shakespeare-char-cpu", vocab_size=65, block_size=8))
    assert t["params"] == reference.get_num_params()
    assert t["mfu"] == pytest.approx(reference.flops_per_token() * 16 / 0.010 / 1e9)
    assert (r["n_head"], r["n_embd"], r["data"], r["device_name"]) == (4, 128, "random tokens", bench.cpu_name())
    printed = capsys.readouterr().out
    assert (f"  1,600 tokens/s | 10.0 ms/iter | MFU {100 * t['mfu']:.1f}% | {t['achieved_tflops'] * 1e3:.1f} GFLOP/s "
            "achieved | warm-up 0.0 s") in printed


def test_data_dir_times_the_data_sets_batches(tmp_path, monkeypatch):
    """--data_dir: the model takes the data set's vocabulary and every step draws a loader batch."""
    import numpy as np

    import bench
    from data import BatchLoader
    d = tmp_path / "d"
    d.mkdir()
    (np.arange(3000) % 300).astype(np.uint16).tofile(d / "train.bin")
    (np.arange(500) % 300).astype(np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps(dict(tokenizer="char", tokenizer_file="tokenizer.json", vocab_size=300,
                                                 eot_token=None, dtype="uint16", train_tokens=3000, val_tokens=500)))
    drawn, get_batch = [], BatchLoader.get_batch
    monkeypatch.setattr(BatchLoader, "get_batch", lambda self, split, index=None: drawn.append((split, index))
                        or get_batch(self, split, index))
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "2", "--batch_size", "2",
                    "--block_size", "8", "--data_dir", str(d)])
    assert r["vocab_size"] == 300 and r["data"] == str(d) and drawn == [("train", 0), ("train", 1), ("train", 2)]
    assert abs(r["train"]["final_loss"] - math.log(300)) < 0.5
    from utils import UserError
    with pytest.raises(UserError, match=r"--vocab_size is the data set's with --data_dir"):  # not ignored in silence
        bench.main(["--device", "cpu", "--no_generate", "--data_dir", str(d), "--vocab_size", "100"])


def test_gpt2_presets_report_gpt2s_vocabulary_and_no_compile_mode_uncompiled(capsys):
    import bench
    r = bench.main(["--device", "cpu", "--preset", "gpt2", "--no_train", "--no_generate"])
    assert (r["vocab_size"], r["compile"], r["compile_mode"], r["compile_regional"]) == (50257, False, None, False)
    assert "train" not in r and "generate" not in r
    assert capsys.readouterr().out.splitlines()[-1] == ("nothing measured: --no_train and --no_generate leave only "
                                                        "the settings above")  # not a silent success
    r = bench.main(["--device", "cpu", "--preset", "gpt2-medium", "--no_train", "--no_generate"])
    assert (r["n_layer"], r["n_head"], r["n_embd"], r["block_size"]) == (24, 16, 1024, 1024)


def test_tokenize_speeds_are_size_over_time(monkeypatch):
    """With a clock that moves 1 s at each reading, every single-process figure is MB / 1 s."""
    import bench

    class Tick(FakeClock):
        def perf_counter(self):
            self.now += 1.0
            return self.now

    monkeypatch.setattr(bench, "time", Tick())
    r = bench.main(["--tokenize", "--tokenize_mb", "0.1", "--num_proc", "1"])["tokenize"]
    size = r["mb"]  # 0.1, rounded as the speeds are
    assert r["single_thread_mb_s"] == r["single_thread_numpy_mb_s"] == r["text_file_mb_s"] == r["documents_mb_s"]
    assert r["single_thread_mb_s"] == pytest.approx(size, abs=0.01)
    assert r["tiktoken_parallel_mb_s"] == r["single_thread_mb_s"] and r["target_mb_s"] == pytest.approx(0.7 * size,
                                                                                                         abs=0.01)


def fixed_encode(text):
    """_raw_encode's stand-in: the share without NUL runs from 10 s to 12 s, the one with it from 11 s to 13 s."""
    return (11.0, 13.0) if "\x00" in text else (10.0, 12.0)


def test_parallel_tiktoken_speed_spans_first_start_to_last_end(monkeypatch):
    import bench
    monkeypatch.setattr(bench, "_raw_encode", fixed_encode)
    text = "a b c d " * 1000 + "\x00 e f " * 1000  # cut in two shares near the middle, in the first half
    size = len(text.encode()) / 1e6
    assert bench.raw_parallel_speed(text, 2) == pytest.approx(size / 3)  # from 10 s to 13 s


def dying_encode(text):
    """_raw_encode's stand-in whose worker the system kills (out of memory, say) on the share with the NUL."""
    if "\x00" in text:
        os._exit(1)
    return (10.0, 12.0)


def test_a_tiktoken_worker_that_dies_is_one_line_of_error_not_a_wait_forever(monkeypatch):
    import bench
    from utils import UserError
    monkeypatch.setattr(bench, "_raw_encode", dying_encode)
    import signal
    text = "a b c d " * 1000 + "\x00 e f " * 1000

    def hung(*_):
        raise TimeoutError("the benchmark waits forever for the dead worker's result")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(UserError, match=r"^a tokenising process died \(killed by the system: out of memory\?\); "
                                            r"try a smaller --tokenize_mb or fewer processes, e.g. --num_proc 1$"):
            bench.raw_parallel_speed(text, 2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="signals to a process group")
def test_a_pool_broken_by_the_stop_signal_itself_ends_tokenize_as_the_signal_asks(monkeypatch):
    import signal
    import time
    import bench
    from utils import UserError

    def broken(args, between):  # the worker the signal ended broke the pool; the parent's exception was swallowed
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except SystemExit:
            pass
        raise UserError("a tokenising process died (killed by the system: out of memory?)")
    monkeypatch.setattr(bench, "tokenize_report", broken)
    with pytest.raises(SystemExit) as e:
        bench.main(["--tokenize"])
    assert e.value.code == 128 + signal.SIGTERM


def test_sigterm_during_tokenize_removes_its_temporary_folder(tmp_path):
    """The folder holds the text and the data sets made from it, hundreds of MB at the default size."""
    import signal
    import time
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "--tokenize", "--tokenize_mb", "3",
                             "--num_proc", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "tmp").glob("*/bench.txt")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the temporary folder never came"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or `kill` sends it, to the whole group
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    # a signal that lands in a fork's own callbacks is printed as "Exception ignored" (with its traceback) by
    # Python, and the stage that follows stops instead
    assert proc.returncode == 128 + signal.SIGTERM and err.count("Traceback") == err.count("Exception ignored"), err
    assert list((tmp_path / "tmp").iterdir()) == []


def _watcher_threads(_):
    import threading
    return [t.name for t in threading.enumerate() if t.daemon]


def test_raw_tiktoken_workers_end_with_the_script():
    """Killed outright, bench.py could not stop its pool; each worker watches for that itself (the
    watcher is tested in test_data.py's test_workers_end_when_the_script_is_killed_outright)."""
    import multiprocessing
    import bench
    with multiprocessing.Pool(1, bench._init_raw_worker, (None,)) as pool:
        assert pool.map(_watcher_threads, [0]) == [["exit-with-parent"]]


def test_tokenize_refuses_ids_that_differ_from_tiktoken(monkeypatch):
    import numpy as np

    import bench
    import prepare_data
    prepare_text = prepare_data.prepare_text

    def damaged(out_dir, *args, **kwargs):
        meta = prepare_text(out_dir, *args, **kwargs)
        ids = np.fromfile(out_dir / "train.bin", dtype=np.uint16)
        ids[5] ^= 1
        ids.tofile(out_dir / "train.bin")
        return meta

    monkeypatch.setattr(prepare_data, "prepare_text", damaged)
    with pytest.raises(RuntimeError, match="ids differ from single-thread tiktoken's"):
        bench.main(["--tokenize", "--tokenize_mb", "0.1", "--num_proc", "1"])


class FakeEvent:
    def __init__(self, key, self_us, count, parent=None):
        self.key = self.name = key
        self.self_cpu_time_total, self.count, self.cpu_parent = self_us, count, parent
        self.cpu_time_total = 3 * self_us  # inclusive time: not what the profile reports
        self.device_type = torch.autograd.DeviceType.CPU
        self.is_user_annotation = False


class FakeProfile:
    """torch.profiler.profile for 2 steps with known operators and self times (microseconds in all).
    Clipping on a CPU: aten::_foreach_norm calls aten::linalg_vector_norm once per tensor, whose name
    alone says nothing; aten::mul_ runs in the forward pass too, where it is not clipping."""
    norm = FakeEvent("aten::_foreach_norm", 40, 2)
    events_ = [FakeEvent("aten::addmm", 3000, 4), FakeEvent("aten::mm", 1000, 2),
               FakeEvent("aten::_scaled_dot_product_flash_attention_for_cpu", 800, 2),
               FakeEvent("aten::_fused_adamw_", 500, 2), FakeEvent("aten::add", 200, 4), norm,
               FakeEvent("aten::linalg_vector_norm", 160, 8, parent=norm),
               FakeEvent("aten::mul_", 100, 2, parent=FakeEvent("aten::dropout", 0, 2))]

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def events(self):
        return list(self.events_)

    def key_averages(self):
        return list(self.events_)


def test_the_profile_sums_self_time_per_step_by_kind(monkeypatch, capsys):
    import torch.profiler

    import bench
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    p = bench.profile_steps(lambda i: torch.zeros(()), 10, 2, torch.device("cpu"))
    assert p["kinds"] == pytest.approx({"attention": 0.4, "matmul": 2.0, "optimizer and clipping": 0.35,
                                        "fused elementwise and reductions (Triton)": 0.0, "other": 0.15})
    assert p["ms_per_step"] == pytest.approx(2.9) and p["steps"] == 2
    assert [(r["name"], r["ms_per_step"], r["calls_per_step"]) for r in p["top"][:2]] == [
        ("aten::addmm", 1.5, 2.0), ("aten::mm", 0.5, 1.0)]
    # every entry for --json, biggest first; the first 12 are the printed top
    assert [r["name"] for r in p["entries"]][-2:] == ["aten::mul_", "aten::_foreach_norm"]
    assert len(p["entries"]) == len(FakeProfile.events_) and p["top"] == p["entries"][:12]
    few = bench.profile_steps(lambda i: torch.zeros(()), 10, 2, torch.device("cpu"), top=3)
    assert few["top"] == few["entries"][:3] and len(few["entries"]) == len(FakeProfile.events_)
    bench.print_profile(p, step_ms=5.5)
    out = capsys.readouterr().out
    assert "take 2.90 ms per step (53% of the timed 5.50 ms)" in out and "matmul 2.00 ms" in out
    assert "   1.500 ms     2.0x  aten::addmm" in out


def test_timers_wait_for_apple_gpus_too(monkeypatch):
    """MPS queues its work as CUDA does: a timer that does not wait for it times only the queueing."""
    import utils
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(str(device)))
    for name in ("cpu", "mps", "cuda:1"):
        utils.synchronize(torch.device(name))
    assert waited == ["mps", "cuda:1"]


# ----------------------------------------------------------------------------- --whole_run

@pytest.fixture(scope="module")
def tiny_char_data(tmp_path_factory, shakespeare_text):
    import prepare_data
    folder = tmp_path_factory.mktemp("whole_run")
    (folder / "input.txt").write_text(shakespeare_text[:60_000], encoding="utf-8")
    prepare_data.main(["--dataset", "custom", "--input", str(folder / "input.txt"), "--tokenizer", "char",
                       "--output_dir", str(folder / "char")])
    return folder / "char"


TINY_RUN = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=6",
            "--eval_interval=3", "--eval_iters=1", "--warmup_iters=1"]


def test_whole_run_splits_train_py_s_wall_time_and_leaves_nothing(tiny_char_data, tmp_path, monkeypatch, capsys):
    import tempfile
    import bench
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    envs = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: envs.append(kw["env"]) or real_popen(*a, **kw))
    report = bench.main(["--whole_run", "--preset", "shakespeare-char-cpu", "--json", str(tmp_path / "w.json"), "--",
                         f"--data_dir={tiny_char_data}", *TINY_RUN])
    out = capsys.readouterr().out
    r = report["whole_run"]
    assert json.loads((tmp_path / "w.json").read_text()) == report
    assert report["device"] == "cpu" and report["dtype"] == "float32" and r["iterations"] == 6
    # train.py's own split, as its last line printed it, and the best val loss it printed
    [done] = [line for line in out.splitlines() if line.startswith("  done: 6 iterations")]
    # (the CPU preset's TensorBoard samples of 200 tokens after each evaluation: timed apart)
    assert list(r["split_s"]) == ["setup", "first step", "other steps", "evaluations", "text samples", "checkpoints"]
    assert ", ".join(f"{k} {v:.1f} s" for k, v in r["split_s"].items()) in done
    assert f"best val loss {r['best_val_loss']:.4f};" in done
    # wall time = start-up + train.py's clock + exit; start-up is the interpreter and its imports, most of a second
    assert r["wall_s"] == pytest.approx(r["startup_s"] + sum(r["split_s"].values()) + r["exit_s"], abs=0.2)
    assert 0.2 < r["startup_s"] < r["wall_s"] and 0 <= r["exit_s"] < 0.5
    assert "target" not in r  # a preset changed by flags is not the preset a target is for
    # checkpoints, logs and compile caches went to one temporary folder, now gone
    [env] = envs
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "tmp" / "bench_whole_run_"))
    assert env["TRITON_CACHE_DIR"].startswith(str(tmp_path / "tmp" / "bench_whole_run_"))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_whole_run_keeps_the_compile_caches_when_asked(tiny_char_data, monkeypatch, capsys):
    import bench
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    envs = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: envs.append(kw["env"]) or real_popen(*a, **kw))
    report = bench.main(["--whole_run", "--warm_cache", "--", f"--data_dir={tiny_char_data}", *TINY_RUN])
    assert report["whole_run"]["warm_cache"] and "TORCHINDUCTOR_CACHE_DIR" not in envs[0]
    assert "compile caches as they are" in capsys.readouterr().out


def test_whole_run_target_only_for_the_preset_as_it_stands():
    import bench
    assert bench.whole_run_target("shakespeare-char", [], 59.9, 1.47) == dict(
        seconds=60.0, best_val_loss=1.47, machine="one H100 or H200 in bfloat16", met=True)
    assert not bench.whole_run_target("shakespeare-char", [], 60.1, 1.40)["met"]
    assert not bench.whole_run_target("shakespeare-char", [], 50.0, 1.4701)["met"]
    assert bench.whole_run_target("shakespeare-char-cpu", [], 139.0, 1.75)["met"]
    assert not bench.whole_run_target("shakespeare-char-cpu", [], 141.0, 1.75)["met"]
    assert bench.whole_run_target("shakespeare-char", ["--max_iters=100"], 5.0, 2.0) is None
    assert bench.whole_run_target("gpt2", [], 5.0, 2.0) is None


def test_whole_run_reads_every_form_of_train_py_s_last_line():
    from pathlib import Path
    import bench
    from train import done_line
    timing = {"setup": 1.25, "first_step": 17.7, "evaluation": 4.3, "checkpoints": 0.9}
    plain = bench.parse_done_line(done_line(5000, None, 62.0, timing, True, 1.46251, Path("ck")))
    assert plain == dict(iterations=5000, iterations_this_run=5000, best_val_loss=1.4625,
                         split_s={"setup": 1.2, "first step (compilation)": 17.7, "other steps": 37.9,
                                  "evaluations": 4.3, "checkpoints": 0.9})
    resumed = bench.parse_done_line(done_line(5000, 3000, 30.0, timing, False, 1.5, Path("ck")))
    assert resumed["iterations"] == 5000 and resumed["iterations_this_run"] == 2000
    assert list(resumed["split_s"]) == ["setup", "first step", "other steps", "evaluations", "checkpoints"]
    no_step = {k: v for k, v in timing.items() if k != "first_step"}  # no step ran in this process
    no_evaluation = bench.parse_done_line(done_line(10, None, 10.0, no_step, False, float("inf"), Path("ck")))
    assert no_evaluation["best_val_loss"] is None and "first step" not in no_evaluation["split_s"]
    assert bench.parse_done_line("iter 10/20: loss 2.5, lr 1e-3") is None


def whole_run_children(folder) -> list[int]:
    """The pids of processes whose command line names `folder` (train.py, started with its temporary paths)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(folder).encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the child through /proc")
@pytest.mark.parametrize("to, sig, code, says", [("bench", "SIGINT", 130, "interrupted"),
                                                 ("bench", "SIGTERM", 143, "stopped by SIGTERM"),
                                                 ("train.py", "SIGKILL", 2, "error: train.py was killed by SIGKILL"),
                                                 ("train.py", "SIGTERM", 2, "error: train.py was stopped by SIGTERM")])
def test_whole_run_stopped_by_a_signal_leaves_no_folder_and_no_child(tiny_char_data, tmp_path, to, sig, code, says):
    import signal
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "--whole_run", "--json", str(tmp_path / "w.json"),
                             "--", f"--data_dir={tiny_char_data}", *TINY_RUN, "--max_iters=1000000",
                             "--lr_decay_iters=1000000", "--log_interval=1"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = threading.Timer(120, proc.kill)  # a run that never prints the line fails instead of hanging
    deadline.start()
    try:
        for line in proc.stdout:
            if line.startswith("  iter 3/"):
                break
        [child] = whole_run_children(tmp_path / "tmp")
        os.kill(proc.pid if to == "bench" else child, getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        deadline.cancel()
        proc.kill()
        for pid in whole_run_children(tmp_path / "tmp"):
            os.kill(pid, 9)
    assert proc.returncode == code and len(err.strip().splitlines()) == 1 and err.startswith(says), err
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "w.json").exists()
    assert whole_run_children(tmp_path / "tmp") == []


def test_whole_run_passes_help_on_to_train_py():
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--whole_run", "--", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--preset NAME" in out.stdout and "whole run:" not in out.stdout, out.stderr


@pytest.mark.parametrize("args, message", [
    (["--whole_run", "--batch_size", "4"], "--batch_size is bench.py's own; give train.py's flags after `--`"),
    (["--warm_cache"], "--warm_cache is for --whole_run"),
    (["--whole_run", "--steps", "4", "--tokenize"], "--steps, --tokenize are bench.py's own"),
    (["--", "--max_iters=4"], "flags after `--` (--max_iters=4) are train.py's, for --whole_run"),
    (["--whole_run", "--", "--max_iters=4", "--preset=shakespeare-char", "--checkpoint_dir=ck"],
     "--preset=shakespeare-char --checkpoint_dir=ck after `--` would change what --whole_run sets itself"),
    (["--whole_run", "--", "--log_dir=logs"],  # TensorBoard's files outside the temporary folder it removes
     "--log_dir=logs after `--` would change what --whole_run sets itself"),
    (["--whole_run", "--", "--init_from=gpt2"],  # the reason names the start, not only the preset and folders
     "and the start: a new model, trained from scratch; leave it out"),
    (["--whole_run", "--", "cf.py", "--max_iters=2"],  # a config file could set --init_from itself
     "cf.py after `--`: a config file could set what --whole_run sets itself"),
    (["--whole_run", "--json", "W.json", "--", "--max_iters", "x"],  # a flag's value, not a config file
     "train.py exited with code 2: max_iters must be an integer, got 'x'"),
    (["--whole_run", "--json", "W.json", "--", "--max_iters=x"],
     "train.py exited with code 2: max_iters must be an integer, got 'x'"),
])
def test_whole_run_errors_are_one_line_and_write_nothing(args, message, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


# ---------------------------------------------------------------------------- the figures: clocks, peaks, stages


class AsyncClock(FakeClock):
    """A GPU-like queue: work queued adds to `pending`; only a host synchronisation (loss.item(), synchronize)
    moves the clock past it."""

    def __init__(self):
        super().__init__()
        self.pending = 0.0

    def queue(self, seconds):
        self.pending += seconds

    def drain(self, *args, **kwargs):
        self.now += self.pending
        self.pending = 0.0


class QueuedLoss:
    def __init__(self, loss, clock):
        self.loss, self.clock = loss, clock

    def item(self):
        self.clock.drain()
        return self.loss.item()


def test_training_clock_is_read_after_the_host_synchronisation(monkeypatch):
    """Each step queues 10 ms that only a synchronisation waits for: the windows must end after one."""
    import bench
    import train
    clock, forward_backward = AsyncClock(), train.forward_backward

    def queued_forward_backward(*args, **kwargs):
        clock.queue(0.010)
        return QueuedLoss(forward_backward(*args, **kwargs), clock)

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "synchronize", clock.drain)
    monkeypatch.setattr(train, "forward_backward", queued_forward_backward)
    r = bench.main(["--device", "cpu", "--no_generate", "--warmup", "2", "--steps", "3", "--batch_size", "2",
                    "--block_size", "8"])
    t = r["train"]
    assert t["ms_per_iter"] == pytest.approx(10.0) and t["tokens_per_sec"] == pytest.approx(16 / 0.010)
    assert t["warmup_s"] == pytest.approx(0.020)
    assert (r["warmup_steps"], r["timed_steps"]) == (2, 3)  # the JSON says which steps the figures are of


def test_mfu_is_none_for_float32_even_on_a_listed_gpu(monkeypatch):
    """The peak is bf16/fp16's: a float32 run gets FLOP/s, not a percentage of a peak it cannot reach."""
    import bench
    import model as model_module
    real = model_module.peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(model_module, "peak_flops", lambda device, dtype=None: real("cuda", dtype))  # as on an H100
    args = ["--device", "cpu", "--no_generate", "--warmup", "1", "--steps", "1", "--batch_size", "2",
            "--block_size", "8"]
    assert bench.main(args)["train"]["mfu"] is None
    assert bench.main(args + ["--dtype", "bfloat16"])["train"]["mfu"] > 0


def test_each_generation_batch_size_is_timed_at_that_size(monkeypatch, capsys):
    import bench
    import generate
    seen = []
    monkeypatch.setattr(generate, "benchmark_generation", lambda *a, **k: seen.append(k["batch_size"]) or dict(
        tokens_per_sec=100.0 * k["batch_size"], hf_tokens_per_sec=None))
    r = bench.main(["--device", "cpu", "--no_train", "--gen_batch_sizes", "1,8"])
    assert seen == [1, 8]
    assert [(g["batch_size"], g["tokens_per_sec"]) for g in r["generate"]] == [(1, 100.0), (8, 800.0)]
    out = capsys.readouterr().out
    assert "  batch 1: 100.0 tokens/s\n" in out and "  batch 8: 800.0 tokens/s\n" in out


def test_whole_run_split_from_a_scripted_train_py(monkeypatch, capsys):
    """train.py scripted: spawned at 0.25 s, its last line at 5 s with 4 s of its own split, its exit at 7 s.
    Wall 7 s (from before the spawn) = start-up 1 s + split 4 s + exit 2 s."""
    import subprocess
    from pathlib import Path

    import bench
    from train import done_line
    clock = FakeClock()
    start = clock.now
    timing = {"setup": 1.0, "first_step": 1.0, "evaluation": 0.5, "checkpoints": 0.5}  # other steps 1.0
    last = done_line(6, None, 4.0, timing, False, 1.5, Path("ck")) + "\n"

    def lines():
        clock.now = start + 1.0
        yield "device: cpu, dtype float32, compile False\n"
        clock.now = start + 5.0
        yield last

    class FakeProc:
        def __init__(self, *args, **kwargs):
            clock.now += 0.25  # starting a process takes time too
            self.stdout = lines()

        def wait(self):
            clock.now = start + 7.0
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    r = bench.main(["--whole_run", "--preset", "shakespeare-char-cpu"])["whole_run"]
    assert sum(r["split_s"].values()) == pytest.approx(4.0)
    assert (r["wall_s"], r["startup_s"], r["exit_s"]) == pytest.approx((7.0, 1.0, 2.0))
    assert r["target"]["met"] and r["best_val_loss"] == 1.5


def test_tokenize_figures_each_time_their_own_stage(monkeypatch):
    """Stages scripted to take 0.01 s (encode_ordinary, two calls), 0.02 s (encode_to_numpy), 0.04 s (text file
    pipeline) and 0.08 s (documents pipeline); writing the input file 1 s, outside every window."""
    import pathlib

    import tiktoken

    import bench
    import prepare_data
    from tokenizer import GPT2Tokenizer
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    inside = []  # the pipelines' own calls move no clock

    def costing(real, seconds, min_len=0):
        def wrapper(self_or_first, *args, **kwargs):
            if not inside and len(str(self_or_first if not args else args[0])) >= min_len:
                clock.now += seconds
            return real(self_or_first, *args, **kwargs)
        return wrapper

    def pipeline(real, seconds):
        def wrapper(*args, **kwargs):
            inside.append(1)
            try:
                return real(*args, **kwargs)
            finally:
                inside.pop()
                clock.now += seconds
        return wrapper

    monkeypatch.setattr(GPT2Tokenizer, "encode_ordinary", costing(GPT2Tokenizer.encode_ordinary, 0.005, 1000))
    monkeypatch.setattr(tiktoken.Encoding, "encode_to_numpy", costing(tiktoken.Encoding.encode_to_numpy, 0.02, 1000))
    monkeypatch.setattr(pathlib.Path, "write_text", costing(pathlib.Path.write_text, 1.0))
    monkeypatch.setattr(prepare_data, "prepare_text", pipeline(prepare_data.prepare_text, 0.04))
    monkeypatch.setattr(prepare_data, "prepare_documents", pipeline(prepare_data.prepare_documents, 0.08))
    r = bench.main(["--tokenize", "--tokenize_mb", "0.1", "--num_proc", "1"])["tokenize"]
    size = r["mb"]
    assert r["single_thread_mb_s"] == pytest.approx(size / 0.01, abs=0.01)
    assert r["single_thread_numpy_mb_s"] == pytest.approx(size / 0.02, abs=0.01)
    assert r["tiktoken_parallel_mb_s"] == r["single_thread_numpy_mb_s"]  # one process: the numpy call's speed
    assert r["text_file_mb_s"] == pytest.approx(size / 0.04, abs=0.01)
    assert r["documents_mb_s"] == pytest.approx(size / 0.08, abs=0.01)
    assert r["target_mb_s"] == pytest.approx(0.7 * size / 0.01, abs=0.01)  # 0.7 x encode_ordinary's speed


class QueuedGenerator:
    """generate.Generator's stand-in: each decoded token queues 1 s for the batch; the first call compiles (100 s)."""
    clock = None

    def __init__(self, *args, **kwargs):
        self.compiled = False

    def decode(self, rows, n, pick):
        if not self.compiled:
            self.clock.queue(100.0)
            self.compiled = True
        for _ in range(n):
            self.clock.queue(1.0)
            yield [0] * len(rows)


@pytest.mark.parametrize("repeats", [1, 2])
def test_generation_timer_waits_for_the_device_and_skips_the_warm_up(monkeypatch, repeats):
    import generate
    clock = AsyncClock()
    QueuedGenerator.clock = clock
    monkeypatch.setattr(generate, "time", clock)
    monkeypatch.setattr(generate, "synchronize", clock.drain)
    monkeypatch.setattr(generate, "Generator", QueuedGenerator)
    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10))
    r = generate.benchmark_generation(model, batch_size=8, prompt_len=3, new_tokens=5, device="cpu",
                                      dtype="float32", repeats=repeats)
    assert r["tokens_per_sec"] == pytest.approx(8.0)  # 8 rows x 5 tokens in 5 s


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12), ("NVIDIA H200 NVL", torch.bfloat16, 835e12),
    ("NVIDIA L40", torch.bfloat16, 181e12), ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165e12), ("NVIDIA H100 80GB HBM3", torch.float16, 989e12),
    ("NVIDIA A800-SXM4-80GB", torch.bfloat16, 312e12), ("NVIDIA GeForce RTX 3090 Ti", torch.bfloat16, 80e12),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71e12), ("Tesla V100-SXM2-32GB", torch.float16, 125e12),
    ("Tesla V100-PCIE-16GB", torch.float16, 112e12), ("Tesla V100S-PCIE-32GB", torch.float16, 130e12),
])
def test_every_listed_gpu_gets_its_datasheet_peak(monkeypatch, name, dtype, peak):
    from model import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda", dtype) == peak


def test_the_profile_s_wall_time_is_per_step(monkeypatch):
    """Two profiled steps of 5 ms each: wall_ms_per_step (in --json) is 5, not the 10 of both."""
    import torch.profiler

    import bench
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)

    def step(i):
        clock.now += 0.005
        return torch.zeros(())

    assert bench.profile_steps(step, 10, 2, torch.device("cpu"))["wall_ms_per_step"] == pytest.approx(5.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is CUDA's allocator figure")
def test_peak_memory_is_the_timed_steps_own_in_gigabytes(monkeypatch):
    """The figure counts the timed steps only (the warm-up's compilation may hold more for a while), in units of
    10^9 bytes as printed: a step that holds 300 MB more must show at least 0.3 GB, a warm-up that held 2 GB must
    not show at all."""
    import bench
    import train
    real, calls = train.forward_backward, []

    def spy(*args, **kwargs):
        calls.append(1)
        extra = torch.empty(2_000_000_000 if len(calls) == 1 else 300_000_000, dtype=torch.uint8, device="cuda")
        loss = real(*args, **kwargs)
        del extra
        return loss
    monkeypatch.setattr(train, "forward_backward", spy)
    r = bench.main(["--device", "cuda", "--preset", "shakespeare-char-cpu", "--no_generate", "--warmup", "1",
                    "--steps", "1", "--compile", "false"])
    assert len(calls) == 2
    assert 0.3 <= r["train"]["peak_memory_gb"] < 1.0


def test_sizes_that_cannot_fit_in_memory_are_refused_before_the_work(monkeypatch, capsys, tmp_path):
    """A batch or a text a few zeros too large: one line, instead of the kernel killing the benchmark (and
    whatever else the machine ran) once the memory is gone."""
    import bench
    import train
    # a machine of 1 MB: without the checks, these would run (and pass)
    monkeypatch.setattr(train, "machine_memory", lambda: 10**6)
    err = one_line_error(["--device", "cpu", "--steps", "1", "--warmup", "1", "--no_generate"], capsys)
    assert err.startswith("error: this run needs at least 29 MB of memory: ") and "1 MB (RAM and swap)" in err
    # bench.py's own flags, not train.py's (--gradient_accumulation_steps, --n_layer)
    assert err.endswith("; give a smaller --batch_size or --block_size, or a smaller --preset or --vocab_size\n")
    assert bench.main(["--device", "cpu", "--no_train", "--gen_tokens", "2",
                       "--gen_batch_sizes", "1"])["generate"]  # no training, no optimizer: not refused
    capsys.readouterr()
    monkeypatch.setattr(bench, "machine_memory", lambda: 7 * 10**6)
    err = one_line_error(["--tokenize", "--tokenize_mb", "0.6", "--num_proc", "1"], capsys)
    # 7.2 MB and 7.0: one decimal more, where whole megabytes would read the same
    assert err == ("error: --tokenize_mb 0.6 needs at least 7.2 MB of memory (about 12 bytes for each byte of "
                   "text), and this machine has 7.0 MB (RAM and swap); give at most --tokenize_mb 0.58\n")
    monkeypatch.setattr(bench, "machine_memory", lambda: 25_276_510_208)  # this machine: 2106.4 MB at most
    err = one_line_error(["--tokenize", "--tokenize_mb", "5000", "--num_proc", "1"], capsys)
    assert err.endswith("; give at most --tokenize_mb 2106\n")
    monkeypatch.setattr(bench, "bench_tokenize", lambda mb, *args: {"mb": mb})  # and that is taken
    assert bench.main(["--tokenize", "--tokenize_mb", "2106", "--num_proc", "1"])["tokenize"] == {"mb": 2106}
    for memory, most in ((25_283_000_000, "2106"), (7_070_000, "0.58")):  # 2106.9 and 0.589: rounded down
        monkeypatch.setattr(bench, "machine_memory", lambda m=memory: m)
        assert one_line_error(["--tokenize", "--tokenize_mb", "5000", "--num_proc", "1"], capsys).endswith(
            f"give at most --tokenize_mb {most}\n")
    monkeypatch.setattr(bench, "machine_memory", lambda: None)  # unknown (Windows): not refused
    assert bench.main(["--tokenize", "--tokenize_mb", "5000", "--num_proc", "1"])["tokenize"] == {"mb": 5000}
