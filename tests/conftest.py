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


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        message = f"{what} not found at {path}; set the environment variable to a local copy"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI the reference files must be there: a skip would hide lost coverage
        pytest.skip(message)
    return path


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's 'gpt2' encoding, from TIKTOKEN_CACHE_DIR or the network; the test is skipped (fails in CI)
    when neither has it."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network: requests' errors, OSError, ...
        _existing(Path("/nonexistent"), f"tiktoken's gpt2 files ({type(e).__name__}); TIKTOKEN_CACHE_DIR")


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
