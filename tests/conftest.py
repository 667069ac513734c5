"""Shared fixtures: local copies of the reference data, so the suite runs offline.

SHAKESPEARE points at tinyshakespeare's input.txt and TIKTOKEN_CACHE_DIR at a
directory holding tiktoken's 'gpt2' files. Both default to the copies that sit
beside the checkout in ../shared/data (CI and development machines have them).
"""
import functools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

# the scripts live flat at the repository root
sys.path.insert(0, str(ROOT))

# tiktoken reads this variable when it first loads an encoding; set it before any test imports it
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


# CI=true (as .ci/run sets it, and CI services do); CI=false or CI=0 is no CI
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        message = f"{what} not found at {path}; set the environment variable to a local copy"
        if IN_CI:
            pytest.fail(message)  # in CI the reference files must be there: a skip would hide lost coverage
        pytest.skip(message)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one, run alone by `make gpu-check`")


def pytest_collection_modifyitems(config, items):
    """A test skipped for want of CUDA must carry the cuda marker too: `make gpu-check` runs `pytest -m cuda` on a
    GPU, and a test missing from that selection would never run anywhere."""
    unmarked = [item.nodeid for item in items
                if not item.get_closest_marker("cuda")
                and any("CUDA" in mark.kwargs.get("reason", "") for mark in item.iter_markers("skipif"))]
    if unmarked:
        raise pytest.UsageError(f"skipped for want of CUDA but not marked @pytest.mark.cuda: {', '.join(unmarked)}")


@functools.lru_cache(maxsize=None)
def gpt2_load_error() -> str | None:
    """Why tiktoken cannot load its 'gpt2' encoding here (neither cached nor downloadable), or None."""
    import tiktoken
    try:
        tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network: requests' errors, OSError, ...
        return type(e).__name__
    return None


GPT2_FILES_MISSING = "tiktoken could not load its 'gpt2' files"  # tokenizer.py's message for that case


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Outside CI, a test that fails because tokenizer.py could not load tiktoken's 'gpt2' files, on a machine
    where they are truly missing, is reported as skipped with that reason, like the tests whose fixtures
    need the other reference files. Many tests reach tiktoken through the scripts themselves (prepare_data.py's
    default tokenizer, a subprocess), so the failure is recognised by tokenizer.py's message."""
    outcome = yield
    report = outcome.get_result()
    if (report.failed and call.excinfo is not None and not IN_CI
            and GPT2_FILES_MISSING in str(report.longrepr) and gpt2_load_error()):
        report.outcome = "skipped"
        report.longrepr = (item.location[0], item.location[1] or 0,
                           f"Skipped: tiktoken's gpt2 files not found ({gpt2_load_error()}); set TIKTOKEN_CACHE_DIR "
                           f"to a local copy")


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's 'gpt2' encoding, from TIKTOKEN_CACHE_DIR or the network; the test is skipped (fails in CI)
    when neither has it."""
    import tiktoken
    if gpt2_load_error():
        _existing(Path("/nonexistent"), f"tiktoken's gpt2 files ({gpt2_load_error()}); TIKTOKEN_CACHE_DIR")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """tinyshakespeare input.txt (1,115,394 bytes)."""
    return _existing(Path(os.environ.get("SHAKESPEARE", SHARED / "tinyshakespeare" / "input.txt")), "SHAKESPEARE")


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """OpenAI's encoder.json and vocab.bpe (GPT2_FILES_DIR overrides the folder)."""
    folder = Path(os.environ.get("GPT2_FILES_DIR", SHARED / "gpt2"))
    return _existing(folder / "encoder.json", "GPT2_FILES_DIR"), _existing(folder / "vocab.bpe", "GPT2_FILES_DIR")
