"""bench.py on CPU: the smoke run CI can afford, and its JSON figures."""
import json
import math
import subprocess
import sys

from conftest import ROOT


def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cpu_smoke_run_writes_consistent_figures(tmp_path):
    out = run_bench("--device", "cpu", "--steps", "2", "--warmup", "1", "--gen_tokens", "4",
                    "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["device"] == "cpu" and r["preset"] == "shakespeare-char-cpu" and r["vocab_size"] == 65
    t = r["train"]
    assert t["mfu"] is None  # no known peak on a CPU: FLOP/s instead of a percentage
    assert t["tokens_per_sec"] == t["tokens_per_sec"] and t["tokens_per_sec"] > 0
    tokens = r["batch_size"] * r["block_size"]
    assert math.isclose(t["tokens_per_sec"] * t["ms_per_iter"] / 1000, tokens, rel_tol=1e-6)
    assert abs(t["final_loss"] - math.log(65)) < 0.5  # a freshly initialised model is near uniform
    assert [g["batch_size"] for g in r["generate"]] == [1, 8]
    assert all(g["tokens_per_sec"] > 0 for g in r["generate"])
    assert "tokens/s" in out.stdout and "FLOP/s achieved" in out.stdout


def test_bad_arguments_exit_2():
    out = run_bench("--device", "cpu", "--steps", "0")
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1
