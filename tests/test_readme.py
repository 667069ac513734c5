"""README.md must not drift from the code: every `python script.py --flag` it shows must exist and be accepted."""
import functools
import re
import shlex
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[list[str]]:
    """Shell commands in README's code blocks that run one of the project's scripts."""
    commands = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        if lang not in ("", "bash", "sh"):
            continue
        for line in block.splitlines():
            line = line.split(" #")[0].strip()  # drop trailing comments
            for part in re.split(r"&&|;", line):
                words = shlex.split(part)
                if words and words[0] in ("python", "torchrun") and any(w.endswith(".py") for w in words):
                    commands.append(words)
    return commands


@functools.cache
def help_text(script: str) -> str:
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script} --help failed: {out.stderr[-500:]}"
    return out.stdout


def test_readme_shows_commands():
    scripts = {next(w for w in c if w.endswith(".py")) for c in readme_commands()}
    assert {"prepare_data.py", "train.py", "generate.py", "bench.py", "tokenizer.py"} <= scripts


def test_every_readme_command_uses_real_scripts_and_flags():
    problems = []
    for words in readme_commands():
        script = next(w for w in words if w.endswith(".py"))  # train.py comes before a config file
        if not (ROOT / script).is_file():
            problems.append(f"no such script {script} (README: {' '.join(words)})")
            continue
        flags = [w.split("=")[0] for w in words[words.index(script) + 1:] if w.startswith("--")]
        text = help_text(script)
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{script} does not accept {flag} (README: {' '.join(words)})")
    assert not problems, "\n".join(problems)


def test_readme_names_the_two_commands_and_tensorboard():
    assert "make demo" in README and "make test" in README
    assert "tensorboard --logdir runs" in README
