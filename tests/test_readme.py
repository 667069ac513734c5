"""README.md must not drift from the code.

Every `python script.py ...` or `torchrun ... train.py ...` command in its shell blocks goes through that
script's own argument parser (train.py's through config.parse_args, which also validates the values), and
every Python block runs, in a scratch directory that holds a tiny trained checkpoint.
"""
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[list[str]]:
    """Shell commands in README's code blocks that run one of the project's scripts."""
    commands = []
    for lang, block in BLOCKS:
        if lang not in ("", "bash", "sh"):
            continue
        for line in block.splitlines():
            line = line.split(" #")[0].strip()  # drop trailing comments
            for part in re.split(r"&&|;", line):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
                    words = words[1:]
                if words and words[0] in ("python", "torchrun") and any(w.endswith(".py") for w in words):
                    commands.append(words)
    return commands


def parse_command(script: str, args: list[str]) -> None:
    """Run the script's own parser on args; raises (SystemExit or a UserError) when it would refuse them."""
    if script == "train.py":
        import config
        # the config file of the example is README's own my_config.py block, checked in test_python_blocks_run
        # every README command starts a run of its own (its own checkpoint_dir), so the rules between
        # fields that a resumed run's checkpoint could satisfy must hold for its flags alone
        config.parse_args([a for a in args if a.startswith("--")])[0].validate()
    elif script == "generate.py":
        import generate
        generate.get_parser().parse_args(args)
    elif script == "prepare_data.py":
        import prepare_data
        prepare_data.parse_args(args)
    elif script == "bench.py":
        import bench
        bench.parse_args(args)
    elif script == "tokenizer.py":
        import tokenizer
        tokenizer.build_parser().parse_args(args)
    else:
        raise AssertionError(f"README runs {script}, which this test does not know")


def test_readme_shows_commands():
    scripts = {next(w for w in c if w.endswith(".py")) for c in readme_commands()}
    assert {"prepare_data.py", "train.py", "generate.py", "bench.py", "tokenizer.py"} <= scripts


def test_every_readme_command_is_accepted_by_its_script():
    from utils import UserError
    problems = []
    for words in readme_commands():
        script = next(w for w in words if w.endswith(".py"))  # train.py comes before a config file
        if not (ROOT / script).is_file():
            problems.append(f"no such script {script} (README: {' '.join(words)})")
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parse_command(script, words[words.index(script) + 1:])
        except (SystemExit, UserError) as e:
            problems.append(f"{' '.join(words)}\n    -> {e} {stderr.getvalue().strip()[-300:]}")
    assert not problems, "README commands the scripts refuse:\n" + "\n".join(problems)


def test_the_parsers_refuse_what_they_should():
    """The check above can fail: a wrong flag, type or value is refused."""
    from utils import UserError
    for script, args in [("generate.py", ["--no_such_flag", "1"]), ("train.py", ["--learning_rate=3e-5"]),
                         ("train.py", ["--n_layer=four"]), ("bench.py", ["--steps", "x"])]:
        with pytest.raises((SystemExit, UserError)), contextlib.redirect_stderr(io.StringIO()):
            parse_command(script, args)


def test_python_blocks_run(tmp_path):
    """README's Python snippets run as written, against a checkpoint in checkpoints/char."""
    text = (("ROMEO: what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n") * 40)
    data = tmp_path / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                    env=env, timeout=300)
    out = run(str(ROOT / "prepare_data.py"), "--dataset", "custom", "--input", "input.txt", "--tokenizer", "char",
              "--output_dir", str(data))
    assert out.returncode == 0, out.stderr
    out = run(str(ROOT / "train.py"), "--preset=shakespeare-char-cpu", "--checkpoint_dir=checkpoints/char",
              "--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=16", "--max_iters=4", "--eval_interval=2",
              "--eval_iters=1", "--warmup_iters=1", "--sample_tokens=0")
    assert out.returncode == 0, out.stderr

    snippets = [block for lang, block in BLOCKS if lang == "python"]
    assert len(snippets) >= 3
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespaces = []
    try:
        for block in snippets:
            namespaces.append({"__name__": "readme"})
            exec(compile(block, "README.md", "exec"), namespaces[-1])
    finally:
        os.chdir(cwd)
    # batch_generate's block: both prompts continued by 100 characters (a character-level model), and
    # written to the file under their headers
    [texts] = [ns["texts"] for ns in namespaces if "texts" in ns]
    assert [t[:len(p)] for t, p in zip(texts, ("ROMEO:", "JULIET:\nO"))] == ["ROMEO:", "JULIET:\nO"]
    assert [len(t) for t in texts] == [len("ROMEO:") + 100, len("JULIET:\nO") + 100]
    written = (tmp_path / "samples.txt").read_text(encoding="utf-8")
    assert "prompt 1 of 2" in written and "prompt 2 of 2" in written and all(t in written for t in texts)
    assert all((tmp_path / "export" / name).is_file() for name in ("config.json", "toolkit_tokenizer.json"))


def test_the_preset_table_is_the_presets():
    """README's table of presets: shapes, parameter counts, and the settings its last column names."""
    import torch

    from config import GPT2_CONFIGS, preset_config
    from model import GPT
    rows = re.findall(r"^\| `([\w-]+)` \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+)M \| (.*)\|$", README, flags=re.M)
    assert [r[0] for r in rows] == list(GPT2_CONFIGS)
    for name, n_layer, n_head, n_embd, params, note in rows:
        c = preset_config(name, vocab_size=65 if name.startswith("shakespeare-char") else 50257)
        assert (c.n_layer, c.n_head, c.n_embd) == (int(n_layer), int(n_head), int(n_embd)), name
        with torch.device("meta"):
            count = GPT(c).get_num_params() / 1e6
        assert f"{count:.0f}" == params if count >= 100 else f"{count:.1f}" == params, (name, count)
        said = {key: float(v) for key, v in re.findall(r"(block|batch|dropout|lr) ([\d.e-]+)", note)}
        said |= {"steps": float(v) for v in re.findall(r"(\d+) 步", note)}
        said |= {"decay": float(v) for v in re.findall(r"lr_decay_iters=(\d+)", note)}
        actual = dict(block=c.block_size, batch=c.batch_size, dropout=c.dropout, lr=c.learning_rate, steps=c.max_iters,
                      decay=c.lr_decay_iters)
        assert {k: actual[k] for k in said} == said, name
        assert ("compile_eval=False" in note) == (c.compile_eval is False), name


def test_readme_names_the_two_commands_and_tensorboard():
    assert "make demo" in README and "make test" in README
    assert "tensorboard --logdir runs" in README


@pytest.mark.parametrize("script", ["train.py", "prepare_data.py", "tokenizer.py", "generate.py", "bench.py"])
def test_every_script_has_help_without_made_up_defaults(script):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: ") and not r.stderr, r.stderr
    text = " ".join(r.stdout.split())  # one line: help texts wrap
    # an option without a default does not say "default: None", and none says its default twice
    assert "(default: None)" not in text and not re.search(r"\(default[^()]*\) \(default: ", text)
