"""Tests for generate.py: sampling, KV-cache decoding against uncached and transformers references,
batches, streaming, the command line (single, interactive, errors) and checkpoint fallback.

    .venv/bin/pytest tests/test_generate.py -q

Models are tiny (2 layers, width 32) with weights drawn wider than GPT-2's init, so greedy text is
varied instead of one repeated character and a wrong token shows up.
"""
import codecs
import io
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

import generate
from config import GPT2Config
from generate import (Generator, GenerationError, SamplingSettings, TextStream, batch_generate, complete,
                      encode_prompt, load_model, main, sample_logits, sample_text)
from model import GPT
from tokenizer import CharTokenizer, GPT2Tokenizer
from utils import CHECKPOINT_FALLBACK, CHECKPOINT_VERSION, CheckpointError, UserError, run_cli, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHARS = string.ascii_letters + " .,;:!?'\n"
GREEDY = SamplingSettings(temperature=0, max_new_tokens=40)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and idle OpenMP threads spinning on a busy
    machine make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS)


def tiny_model(vocab_size: int, block_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def write_checkpoint(path: Path, model: GPT, tokenizer) -> Path:
    """A checkpoint laid out as utils.py documents, as train.py writes it."""
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": {}, "scaler": None, "iter_num": 7, "best_val_loss": 2.5,
        "config": model.config.to_dict(), "meta": {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind},
        "tokenizer": tokenizer.to_dict(), "rng": {}, "run_dir": "", "version": CHECKPOINT_VERSION,
    })
    return path


def uncached_greedy(model: GPT, ids: list[int], n: int, window: int) -> list[int]:
    """Reference: a full forward pass per token, with the sliding rule the module docstring states
    (a prompt keeps its last block_size tokens; a context longer than block_size keeps its last window)."""
    bs = model.config.block_size
    ctx, out = list(ids[-bs:]), []
    with torch.no_grad():
        for _ in range(n):
            if len(ctx) > bs:
                ctx = ctx[-window:]
            logits, _ = model(torch.tensor([ctx]))
            out.append(int(logits[0, -1].argmax()))
            ctx.append(out[-1])
    return out


def greedy_ids(gen: Generator, prompts: list[list[int]], n: int) -> list[list[int]]:
    rows = [[] for _ in prompts]
    for step in gen.decode(prompts, n, lambda logits: logits.argmax(dim=-1)):
        for row, t in zip(rows, step):
            row.append(t)
    return rows


# ---------------------------------------------------------------------------- sampling


def test_same_seed_same_text_and_global_rng_untouched():
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size).train()
    state = torch.get_rng_state()
    a = sample_text(model, tok, "ab", max_new_tokens=30, temperature=1.0, seed=3)
    b = sample_text(model, tok, "ab", max_new_tokens=30, temperature=1.0, seed=3)
    c = sample_text(model, tok, "ab", max_new_tokens=30, temperature=1.0, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a != c and a.startswith("ab") and len(a) == 32
    assert model.training and model.transformer.h[0].attn.kv_cache is None  # left as it was
    asked = []  # a stop request abandons the sample after the token under way, the model left as it was
    assert sample_text(model, tok, "ab", max_new_tokens=30, seed=3, should_stop=lambda: asked.append(1) or
                       len(asked) == 4) is None
    assert len(asked) == 4 and model.training and model.transformer.h[0].attn.kv_cache is None
    assert sample_text(model, tok, "ab", max_new_tokens=30, temperature=1.0, seed=3, should_stop=lambda: False) == a


def test_samples_during_training_run_without_dropout():
    """sample_text on a model in training mode with dropout: greedy text is the eval-mode model's, and
    dropout draws nothing from the global RNG (a resumed run would otherwise draw other batches)."""
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    expected = uncached_greedy(model, tok.encode("ab"), 30, window=32)
    model.transformer.drop.p = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()
    state = torch.get_rng_state()
    assert sample_text(model, tok, "ab", max_new_tokens=30, temperature=0) == "ab" + tok.decode(expected)
    assert torch.equal(torch.get_rng_state(), state) and model.training


def test_no_seed_draws_other_text_each_time():
    """seed None is non-deterministic, as --help says: two generators must not start alike."""
    draws = {tuple(torch.randint(0, 2**62, (4,), generator=SamplingSettings().make_rng("cpu")).tolist())
             for _ in range(3)}
    assert len(draws) == 3


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_logits(logits, 0.0), logits.argmax(-1))
    # top_k=1 goes through the sampling path and must agree
    assert torch.equal(sample_logits(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(1)),
                       logits.argmax(-1))
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    ids = tok.encode("hello")
    expected = uncached_greedy(model, ids, 25, window=32)
    text = sample_text(model, tok, "hello", max_new_tokens=25, temperature=0)
    assert text == "hello" + tok.decode(expected)


@hsettings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-5, 5, width=32), min_size=2, max_size=12), top_k=st.integers(1, 12),
       top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**31))
def test_top_k_top_p_draw_only_allowed_tokens(logits, top_k, top_p, seed):
    x = torch.tensor([logits])
    rng = torch.Generator().manual_seed(seed)
    # top-k reference: the tokens whose logit is at least the k-th largest (ties included)
    kth = sorted(logits, reverse=True)[min(top_k, len(logits)) - 1]
    draws = {int(sample_logits(x, 1.0, top_k=top_k, generator=rng)) for _ in range(20)}
    assert draws <= {i for i, v in enumerate(logits) if v >= kth}
    # nucleus reference: the most likely tokens until their mass reaches top_p (tokens tied with them too)
    probs = torch.softmax(x[0].double(), -1).tolist()
    keep, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        keep.add(i)
        mass += probs[i]
        if mass >= top_p - 1e-6:
            break
    ties = {i for i in range(len(probs)) if any(abs(probs[i] - probs[j]) < 1e-6 for j in keep)}
    draws = {int(sample_logits(x, 1.0, top_p=top_p, generator=rng)) for _ in range(20)}
    assert draws <= keep | ties


def test_generation_speed_counts_every_row_of_the_batch(monkeypatch):
    """tokens/s = rows x new tokens / seconds: 8 rows of 5 new tokens timed at 2 s are 20 tokens/s."""
    clock = iter([100.0, 102.0])  # the timed run's start and end; the warm-up is not timed
    monkeypatch.setattr(generate.time, "perf_counter", lambda: next(clock))
    r = generate.benchmark_generation(tiny_model(20), batch_size=8, prompt_len=3, new_tokens=5, device="cpu",
                                      dtype="float32", repeats=1)
    assert r["tokens_per_sec"] == pytest.approx(20.0) and r["hf_tokens_per_sec"] is None


def test_the_default_window_is_half_the_block():
    assert Generator(tiny_model(20, block_size=32)).window == 16  # README and --help: block_size // 2
    assert Generator(tiny_model(20, block_size=32), window=7).window == 7


def test_top_p_keeps_no_token_past_the_mass_it_asks_for():
    """[0.5, 0.25, 0.25] with top_p=0.5: the first token alone holds half the mass, so it is the only one."""
    probs = torch.tensor([0.5, 0.25, 0.25])
    draws = sample_logits(probs.log().expand(2000, 3), 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert draws.unique().tolist() == [0]


@pytest.mark.parametrize("top_p", [0.9, 0.99, 0.9999])
def test_top_p_keeps_the_tail_that_exact_sums_keep(monkeypatch, top_p):
    """GPT-2-sized rows: the kept tokens are those the float64 sums keep. Summed in float32 from the most
    likely down, the sum's rounding near 1 exceeded the tail's probabilities and dropped tail tokens."""
    logits = torch.randn(16, 50257, generator=torch.Generator().manual_seed(0)) * 3
    drawn_from = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples, generator=None:
                        drawn_from.append(probs) or probs.argmax(-1, keepdim=True))
    sample_logits(logits, 1.0, top_p=top_p)
    p = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values
    exact = (p.cumsum(dim=-1) - p < top_p).sum(dim=-1)  # the tokens with less than top_p above them
    assert (drawn_from[0] > 0).sum(dim=-1).tolist() == exact.tolist()


@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-9])
def test_a_top_p_below_float32s_smallest_number_keeps_the_most_likely_token(top_p):
    """Such a top_p passes the check (it is > 0) and is 0 in float32, where 0 >= 0 dropped every token."""
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert sample_logits(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]


def test_temperature_sharpens_the_distribution_as_softmax_of_logits_over_t():
    """T = 0.5 on probabilities [.5, .3, .2] gives softmax(log p / 0.5) = p^2 / sum(p^2)."""
    probs = torch.tensor([0.5, 0.3, 0.2])
    draws = sample_logits(probs.log().expand(20000, 3), 0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(draws, minlength=3) / 20000, probs**2 / (probs**2).sum(),
                               atol=0.015, rtol=0)


def test_top_k_zero_or_none_disables_it():
    assert SamplingSettings(top_k=0).validate().top_k == 0
    logits = torch.zeros(3000, 4)
    for top_k in (0, None):
        draws = sample_logits(logits, 1.0, top_k=top_k, generator=torch.Generator().manual_seed(0))
        assert sorted(draws.unique().tolist()) == [0, 1, 2, 3]


def test_generation_speed_reports_the_best_run(monkeypatch):
    """Two timed runs of 8 rows x 5 tokens, 1 s then 2 s: the faster one (40 tokens/s) is reported."""
    clock = iter([100.0, 101.0, 200.0, 202.0])
    monkeypatch.setattr(generate.time, "perf_counter", lambda: next(clock))
    said = []
    r = generate.benchmark_generation(tiny_model(20), batch_size=8, prompt_len=3, new_tokens=5, device="cpu",
                                      dtype="float32", repeats=2, progress=said.append)
    assert r["tokens_per_sec"] == pytest.approx(40.0)
    assert said == ["this project warmed up", "run 1/2, this project: 40.0 tokens/s",
                    "run 2/2, this project: 20.0 tokens/s"]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    rng = torch.Generator().manual_seed(0)
    draws = sample_logits(probs.log().expand(20000, 3), 1.0, generator=rng)
    torch.testing.assert_close(torch.bincount(draws, minlength=3) / 20000, probs, atol=0.015, rtol=0)
    nucleus = sample_logits(probs.log().expand(20000, 3), 1.0, top_p=0.6, generator=rng)
    torch.testing.assert_close(torch.bincount(nucleus, minlength=3) / 20000, torch.tensor([0.625, 0.375, 0.0]),
                               atol=0.015, rtol=0)


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("prompt_len,n,block_size,window", [
    (5, 40, 64, None),  # fits in the block
    (10, 60, 32, None),  # slides at block_size // 2 several times
    (40, 20, 32, 7),  # the prompt is longer than the block
    (3, 30, 16, 16),  # window == block_size: a rebuild at every step
])
def test_cached_equals_uncached_greedy(prompt_len, n, block_size, window):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=block_size)
    ids = tok.encode(("the quick brown fox jumps over the lazy dog " * 3)[:prompt_len])
    gen = Generator(model, window=window)
    assert greedy_ids(gen, [ids], n)[0] == uncached_greedy(model, ids, n, gen.window)


def test_cpu_layout_keeps_values_and_weight_tying():
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([tok.encode("hello there")])
    logits_before = model(x)[0]
    Generator(model)  # stores the Linear weights column-major on the CPU
    assert not model.transformer.h[0].attn.c_attn.weight.is_contiguous()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x)[0], logits_before, rtol=1e-5, atol=1e-5)


@pytest.fixture
def threads():
    """Set torch's thread count inside one test (the module runs on one thread)."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("n_threads,in_features,chunks", [(2, 32, 2), (3, 48, 3), (3, 32, 2), (4, 36, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_linear_equals_linear(threads, monkeypatch, n_threads, in_features, chunks, bias):
    threads(n_threads)
    torch.manual_seed(0)
    ref = torch.nn.Linear(in_features, 40, bias=bias)
    layer = torch.nn.Sequential(torch.nn.Linear(in_features, 40, bias=bias))
    layer.load_state_dict({"0." + k: v for k, v in ref.state_dict().items()})
    generate._cpu_decoding_layout(layer)
    assert type(layer[0]) is generate.SplitKLinear and layer[0].chunks == chunks
    bmm_calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(1) or bmm(*a))
    with torch.no_grad():
        for shape in [(1, in_features), (3, 1, in_features), (2, 8, in_features), (17, in_features)]:
            x = torch.randn(shape)
            calls = len(bmm_calls)
            torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
            # up to max_rows rows take the sliced product, more go to nn.Linear
            assert len(bmm_calls) - calls == (x.numel() // in_features <= generate.SplitKLinear.max_rows)


@pytest.mark.parametrize("autocast", [False, True])
def test_split_k_linear_leaves_other_dtypes_to_linear(threads, monkeypatch, autocast):
    threads(2)
    layer = torch.nn.Sequential(torch.nn.Linear(32, 40))
    generate._cpu_decoding_layout(layer)
    monkeypatch.setattr(torch, "bmm", lambda *a: pytest.fail("bmm would round each slice's sum"))
    x = torch.randn(2, 32)
    with torch.no_grad():
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer(x).dtype == torch.bfloat16  # as nn.Linear's
        else:
            layer.to(torch.bfloat16)
            assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_one_thread_keeps_plain_linear(threads):
    threads(1)
    model = tiny_model(char_tokenizer().vocab_size)
    Generator(model)
    assert all(type(m) is not generate.SplitKLinear for m in model.modules())
    assert not model.transformer.h[0].attn.c_attn.weight.is_contiguous()  # still column-major


def test_cached_equals_uncached_greedy_on_two_threads(threads):
    threads(2)
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=32)
    ids = tok.encode("the quick brown fox")
    gen = Generator(model, window=16)
    assert type(model.lm_head) is generate.SplitKLinear and model.lm_head.weight is model.transformer.wte.weight
    other = tok.encode("over the lazy dog..")  # as long as ids: rows of a batch slide their window together
    assert greedy_ids(gen, [ids, other], 40) == [uncached_greedy(model, p, 40, 16) for p in (ids, other)]


def test_a_float8_model_decodes_like_the_same_weights_without(threads):
    threads(2)
    tok = char_tokenizer()
    plain = tiny_model(tok.vocab_size)
    fp8 = GPT(GPT2Config(**{**plain.config.to_dict(), "fp8": True})).eval()
    fp8.load_state_dict(plain.state_dict())
    prompts = [tok.encode("To be, or not"), tok.encode("ab")]
    expected = greedy_ids(Generator(plain), prompts, 30)
    assert greedy_ids(Generator(fp8), prompts, 30) == expected
    # decoding gets the CPU layout too: every block Linear became a SplitKLinear
    assert all(type(layer) is generate.SplitKLinear for block in fp8.transformer.h
               for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))


def test_batch_equals_each_prompt_alone():
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=128)
    prompts = ["a", "To be, or not to be", "hello there", "xyz"]
    gen = Generator(model)
    batch = complete(gen, tok, prompts, GREEDY)
    alone = [complete(gen, tok, [p], GREEDY)[0] for p in prompts]
    assert batch == alone
    assert len(set(batch)) == len(batch) and all(len(t) == GREEDY.max_new_tokens for t in batch)


@pytest.mark.parametrize("window", [None, 1, 2, 5, 16])
def test_batch_equals_each_prompt_alone_when_the_text_outgrows_the_block(window):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=16)
    prompts = [tok.encode("the quick brow"), tok.encode("the quick b"), tok.encode("a")]
    gen = Generator(model, window=window)
    assert greedy_ids(gen, prompts, 40) == [greedy_ids(gen, [p], 40)[0] for p in prompts]


def test_rows_of_different_lengths_outgrowing_the_block_are_not_all_computed_again(monkeypatch):
    """Each row is cut at its own step; only it is computed again, not the whole batch each time."""
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=16)
    prompts = [tok.encode("the quick brown fox"[:n]) for n in (1, 3, 4, 6, 9, 10)]
    fed = []
    forward_cached = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda idx, *a, **k: fed.append(idx.numel()) or
                        forward_cached(idx, *a, **k))
    gen = Generator(model, window=5)
    fed.clear()
    batch = greedy_ids(gen, prompts, 60)
    in_batch = sum(fed)
    fed.clear()
    assert batch == [greedy_ids(gen, [p], 60)[0] for p in prompts]
    padding = len(prompts) * 10 - sum(map(len, prompts))  # of the first prefill, the one place rows pay for others
    assert in_batch <= sum(fed) + padding  # (each prefilled again at every cut: 1,400 more)


def test_a_partial_rebuild_leaves_the_cache_as_decode_made_it_and_zeroes_the_slots_to_come(monkeypatch):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=16)
    gen = Generator(model, window=5)
    prompts = [tok.encode("the quick brow"), tok.encode("a")]  # cut at different steps: partial rebuilds
    zeroed, fill = [], gen._fill

    def checked_fill(at, tokens, end):  # the slots past the moved rows are zero (a static step reads them)
        zeroed.append(all(bool((buf[:, :, end:] == 0).all()) for block in model.transformer.h
                          for buf in (block.attn.kv_cache.k, block.attn.kv_cache.v)))
        return fill(at, tokens, end)
    monkeypatch.setattr(gen, "_fill", checked_fill)
    greedy_ids(gen, prompts, 40)
    assert zeroed and all(zeroed)
    cache = model.transformer.h[0].attn.kv_cache
    assert model.kv_cache_shape == (2, 16) and cache is gen._cache  # the temporary cache is gone
    greedy_ids(gen, prompts, 40)
    assert model.transformer.h[0].attn.kv_cache is cache  # reused, not made again (nor a CUDA graph captured)


def test_zero_new_tokens_yield_nothing():
    model = tiny_model(char_tokenizer().vocab_size, block_size=16)
    assert list(Generator(model).decode([[1, 2, 3, 4, 5]], 0, lambda logits: logits.argmax(-1))) == []


def test_bad_window_leaves_the_model_untouched():
    model = tiny_model(char_tokenizer().vocab_size)
    with pytest.raises(GenerationError, match="window must be an integer from 1 to block_size"):
        Generator(model, window=0)
    assert model.lm_head.weight.is_contiguous() and type(model.lm_head) is torch.nn.Linear


def test_tokens_the_tokenizer_cannot_decode_are_never_drawn():
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size + 40)  # data.check_vocab allows a larger model vocabulary
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] *= 100  # ids without text would otherwise win
    gen = Generator(model)
    texts = complete(gen, tok, ["ab", "cd"], SamplingSettings(temperature=1.0, top_k=0, max_new_tokens=60, seed=0))
    assert all(len(t) == 60 for t in texts)
    assert len(complete(gen, tok, ["ab"], GREEDY)[0]) == GREEDY.max_new_tokens


def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=64, seed=1)
    model.save_pretrained(tmp_path / "hf", tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompts = [tok.encode("Once upon a time"), tok.encode("ab")]
    ours = greedy_ids(Generator(model), prompts, 30)
    for ids, mine in zip(prompts, ours):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False,
                              pad_token_id=0)
        assert out[0, len(ids):].tolist() == mine
    # the tokenizer written beside the weights comes back with --init_from DIR
    model2, tok2, _ = load_model(init_from=str(tmp_path / "hf"))
    assert tok2.kind == "char" and tok2.chars == tok.chars
    assert greedy_ids(Generator(model2), prompts, 30) == ours
    # an export of an earlier version, which named it tokenizer.json, loads too
    (tmp_path / "hf" / "toolkit_tokenizer.json").rename(tmp_path / "hf" / "tokenizer.json")
    assert load_model(init_from=str(tmp_path / "hf"))[1].chars == tok.chars


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_equals_eager_greedy(dtype):
    tok = char_tokenizer()
    prompts = [tok.encode("To be, or not to be"), tok.encode("ab")]
    runs = []
    for graph in (False, True):
        model = tiny_model(tok.vocab_size, block_size=32)
        gen = Generator(model, device="cuda", dtype=dtype, cuda_graph=graph)
        runs.append(greedy_ids(gen, prompts, 70) + greedy_ids(gen, prompts[1:], 20))  # slides, then a new batch size
        assert (gen._graph is not None) == graph
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------- text


def test_empty_prompt_starts_from_end_of_text_or_newline():
    tok = char_tokenizer()
    assert encode_prompt(tok, "") == tok.encode("\n")
    model = tiny_model(tok.vocab_size)
    gen = Generator(model)
    assert complete(gen, tok, [""], GREEDY) == complete(gen, tok, ["\n"], GREEDY)
    assert encode_prompt(GPT2Tokenizer(), "") == [50256]
    with pytest.raises(GenerationError, match="empty"):
        encode_prompt(CharTokenizer("abc"), "")


def test_end_of_text_stops_each_row():
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    gen = Generator(model)
    free = complete(gen, tok, ["hello", "ab"], GREEDY)
    # pretend the character greedy decoding emits 6th in row 0 is end-of-text
    eot_char = free[0][5]
    tok.eot_token = tok.stoi[eot_char]
    cut = complete(gen, tok, ["hello", "ab"], GREEDY)
    assert cut == [f.split(eot_char)[0] for f in free]
    assert len(cut[0]) == 5


def test_stop_string_cuts_text_and_is_never_streamed():
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    gen = Generator(model)
    free = complete(gen, tok, ["hello"], GREEDY)[0]
    stop = free[10:13]
    pieces = []
    settings = SamplingSettings(temperature=0, max_new_tokens=40, stop=stop)
    text = complete(gen, tok, ["hello"], settings, on_text=pieces.append)[0]
    assert text == free[:free.index(stop)] and "".join(pieces) == text


def test_a_stop_string_may_begin_in_the_prompt():
    """As transformers' stop_strings: a prompt ending in '\n' with --stop '\n\n' stops at a first '\n'. The
    text is then empty; a stop string that lies wholly inside the prompt does not count."""
    tok = char_tokenizer()
    gen = Generator(tiny_model(tok.vocab_size))
    free = complete(gen, tok, ["hello"], GREEDY)[0]
    for stop in ("o" + free[:2], "llo" + free[0]):
        settings = SamplingSettings(temperature=0, max_new_tokens=40, stop=stop)
        pieces = []
        assert complete(gen, tok, ["hello"], settings, on_text=pieces.append) == [""] and pieces == []
    settings = SamplingSettings(temperature=0, max_new_tokens=40, stop="ell")  # only in the prompt
    assert complete(gen, tok, ["hello"], settings)[0] == (free[:free.index("ell")] if "ell" in free else free)
    stream = TextStream(tok, stop="xy", prompt="abx")  # the prompt's 'x', then a token 'y'
    stream.add(tok.encode("y")[0])
    assert stream.done and stream.text == ""
    stream = TextStream(tok, stop="abcde", prompt="abc")  # a prompt shorter than the stop string less one
    for c in "de fg":
        stream.add(tok.encode(c)[0])
    assert stream.done and stream.text == ""


def test_nan_logits_are_one_clear_error(monkeypatch):
    """Damaged weights: sampling would fail in torch.multinomial with a traceback, greedy decoding would
    print token 0 over and over; both say what happened instead, at the first token."""
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(GenerationError, match=r"^the model's output became NaN or infinite at new token 1: "):
            complete(Generator(model), tok, ["ab"], SamplingSettings(temperature=temperature, max_new_tokens=5))


def test_text_streams_a_token_at_a_time_and_decoding_stops_when_every_row_is_done():
    tok = char_tokenizer()
    gen = Generator(tiny_model(tok.vocab_size))
    pieces, steps = [], []
    free = complete(gen, tok, ["ab"], GREEDY, on_text=pieces.append, on_step=lambda: steps.append(1))[0]
    assert pieces == list(free) and len(steps) == 40  # one character per token, as it is made
    steps.clear()
    settings = SamplingSettings(temperature=0, max_new_tokens=40, stop=free[0])
    assert complete(gen, tok, ["ab"], settings, on_step=lambda: steps.append(1)) == [""] and len(steps) == 1


def test_a_possible_start_of_the_stop_string_is_held_back_no_longer_than_needed():
    stream = TextStream(char_tokenizer(), stop="xy")
    shown = []
    for c in "abcdef":
        stream.add(stream.tokenizer.encode(c)[0])
        shown.append(stream.new_text())
    assert shown == ["", "a", "b", "c", "d", "e"]  # one character back: 'f' could begin "xy"
    stream.add(stream.tokenizer.encode("x")[0])
    stream.add(stream.tokenizer.encode("y")[0])
    assert stream.new_text() == "f" and stream.done and stream.text == "abcdef"


def test_a_long_stop_string_that_never_appears_streams_the_text_once():
    tok = char_tokenizer()
    gen = Generator(tiny_model(tok.vocab_size))
    free = complete(gen, tok, ["ab"], GREEDY)[0]
    pieces = []
    settings = SamplingSettings(temperature=0, max_new_tokens=40, stop="QQQQQQ")
    assert complete(gen, tok, ["ab"], settings, on_text=pieces.append)[0] == free
    assert "".join(pieces) == free


def test_a_tiny_temperature_is_greedy():
    logits = torch.randn(4, 50) * 10
    for t in (1e-40, 1e-50, 5e-324):  # 1e-50 is 0 in float32
        assert torch.equal(sample_logits(logits, t, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_a_huge_temperature_samples_evenly_from_the_top_k():
    logits = torch.randn(2, 50) * 10
    top5 = torch.topk(logits, 5, dim=-1).indices
    drawn = torch.stack([sample_logits(logits, 1e39, top_k=5, generator=torch.Generator().manual_seed(i))
                         for i in range(200)])  # 1e39 is inf in float32
    for row in range(2):
        assert set(drawn[:, row].tolist()) == set(top5[row].tolist())


def test_streaming_keeps_multibyte_characters_whole():
    tok = GPT2Tokenizer()
    text = "héllo 🤗 wörld, 你好 ∑"
    ids = tok.encode(text)
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]  # tokens holding part of a character
    assert partial, "the text must contain a character split across tokens"
    stream, pieces = TextStream(tok), []
    for i in ids:
        stream.add(i)
        pieces.append(stream.new_text())
    stream.add(tok.eot_token)
    stream.add(ids[0])  # after end-of-text nothing more is taken
    assert stream.done and stream.text == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the budget runs out between the two tokens of '你': the half character is left out, not shown as U+FFFD
    first_half = next(i for i in tok.encode("你") if tok.decode([i]) == "\ufffd")
    stream = TextStream(tok)
    for i in tok.encode("天气") + [first_half]:
        stream.add(i)
    stream.finish()
    assert stream.text == "天气" and stream.held_back() == "天气"
    stream = TextStream(tok)  # a byte that cannot begin a character is still shown as U+FFFD
    for i in tok.encode("a") + [tok.encode("你")[-1]] + tok.encode("b"):
        stream.add(i)
    stream.finish()
    assert stream.text == "a\ufffdb"


@pytest.fixture(scope="module")
def poem_bpe():
    """A BPE trained on Chinese: it merges the last byte of 床 with the first of 前 ([8a e5]), so the prompt
    床 alone ends in the token [8a], which its text never has there."""
    from tokenizer import BPETokenizer
    tok = BPETokenizer().train("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 300, 300)
    return tok


def test_a_prompt_ending_inside_a_merged_character_is_healed(poem_bpe):
    from generate import heal_prompt
    tok = poem_bpe
    assert [tok.decode_bytes([i]) for i in tok.encode("床")] == [b"\xe5", b"\xba", b"\x8a"]
    assert b"\x8a\xe5" in {tok.decode_bytes([i]) for i in range(tok.vocab_size)}
    assert heal_prompt(tok, tok.encode("床")) == (tok.encode("床")[:2], b"\x8a")
    for text in ("举头望明月", "ab"):  # a last token that begins a character is kept
        assert heal_prompt(tok, tok.encode(text)) == (tok.encode(text), b"")
    assert heal_prompt(tok, tok.encode("明")) == (tok.encode("明")[:1], b"\x8e")  # [e6 98][8e]
    gpt2 = GPT2Tokenizer()
    assert heal_prompt(gpt2, gpt2.encode("Hello world")) == (gpt2.encode("Hello world"), b"")
    for t in (tok, gpt2, char_tokenizer()):  # the table the first token is chosen from
        assert t.token_bytes() == [t.decode_bytes([i]) for i in range(t.vocab_size)]
    ids = gpt2.encode("你好")  # GPT-2 spells each in two tokens, the second beginning inside the character
    assert heal_prompt(gpt2, ids) == (ids[:-1], b"\xbd") and len(ids) == 4


def test_utf8s_automaton_accepts_what_python_decodes():
    from generate import UTF8_INVALID, utf8_automaton
    table, rng = utf8_automaton().tolist(), __import__("random").Random(0)
    pieces = [lambda: rng.randint(0, 255), lambda: rng.randint(0x80, 0xBF),
              lambda: rng.choice([0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEF, 0xF0, 0xF1, 0xF4, 0xF5])]
    valid = 0
    for _ in range(50_000):
        data, state = bytes(rng.choice(pieces)() for _ in range(rng.randint(1, 8))), 0
        for b in data:
            state = table[state][b] if state != UTF8_INVALID else state
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            assert state != 0, data  # (a prefix that can still be finished is no error yet)
        else:
            valid += 1
            assert state == 0, data
    assert valid > 1000
    for first, second in ((0xE0, 0x9F), (0xED, 0xA0), (0xF0, 0x8F), (0xF4, 0x90)):  # overlong, surrogate, too large
        assert table[table[0][first]][second] == UTF8_INVALID


def test_utf8_after_follows_each_tokens_bytes(poem_bpe):
    from generate import UTF8_INVALID, utf8_after, utf8_automaton
    table = utf8_automaton().tolist()
    for tok in (poem_bpe, GPT2Tokenizer()):
        after = utf8_after(tok).tolist()
        for i in list(range(0, tok.vocab_size, 97)) + [tok.vocab_size - 1]:
            for start in range(8):
                state = start
                for b in tok.decode_bytes([i]):
                    state = table[state][b] if state != UTF8_INVALID else state
                assert after[start][i] == state, (i, start)


def test_utf8_only_keeps_a_byte_level_model_to_valid_text(poem_bpe):
    tok = poem_bpe
    gen = Generator(tiny_model(tok.vocab_size, block_size=32, seed=3), window=8)  # random weights: any bytes
    loose = SamplingSettings(max_new_tokens=60, temperature=1.0, top_k=None, seed=1)
    strict = SamplingSettings(max_new_tokens=60, temperature=1.0, top_k=None, seed=1, utf8_only=True)
    prompts = ["床", "明月", "低头思故乡。"]  # 床 and 明 are healed: the first token gives back half a character
    assert any("\ufffd" in t for t in complete(gen, tok, prompts, loose))  # so the constraint has work to do
    texts = complete(gen, tok, prompts, strict)
    assert not any("\ufffd" in t for t in texts) and all(len(tok.encode(t)) >= 40 for t in texts)
    greedy = dict(max_new_tokens=30, temperature=0.0)
    chars = char_tokenizer()  # whole characters only: nothing to constrain
    gen = Generator(tiny_model(chars.vocab_size))
    assert complete(gen, chars, ["ab"], SamplingSettings(**greedy, utf8_only=True)) == \
        complete(gen, chars, ["ab"], SamplingSettings(**greedy))
    with pytest.raises(GenerationError, match="utf8_only must be True or False, got 'yes'"):
        SamplingSettings(utf8_only="yes").validate()


def test_utf8_only_from_the_command_line_and_the_note_that_points_to_it(poem_bpe, tmp_path, monkeypatch, capsys):
    model = tiny_model(poem_bpe.vocab_size, block_size=32, seed=3)
    path = write_checkpoint(tmp_path / "ck.pt", model, poem_bpe)
    flags = ["--checkpoint", str(path), "--device", "cpu", "--prompt", "明月", "--max_new_tokens", "60",
             "--temperature", "1.0", "--top_k", "0", "--num_samples", "3", "--seed", "1"]
    generate.main(flags)
    out, err = capsys.readouterr()
    assert "\ufffd" in out and err.endswith("note: the model wrote bytes that are no UTF-8 (shown as \ufffd): it "
                                           "began a character and did not finish it; --utf8_only draws only "
                                           "tokens that keep the text valid\n")
    generate.main(flags + ["--utf8_only"])
    out, err = capsys.readouterr()
    assert "\ufffd" not in out and "note: the model wrote" not in err and out.count("明月") >= 3
    generate.main(flags[:-4])  # one streamed sample: the note after its line
    out, err = capsys.readouterr()
    assert "\ufffd" in out and out.endswith("\n") and err.count("note: the model wrote") == 1
    chars = CharTokenizer(list("caf\ufffd au"))  # a U+FFFD the model writes as a character is no such sign
    assert not TextStream(chars).invalid_bytes
    stream = TextStream(chars)
    for i in chars.encode("caf\ufffd"):
        stream.add(i)
    assert stream.text == "caf\ufffd" and not stream.invalid_bytes
    stream = TextStream(poem_bpe)
    for i in poem_bpe.encode("床")[1:]:  # the bytes after 床's first: no character
        stream.add(i)
    assert stream.text.startswith("\ufffd") and stream.invalid_bytes
    replies = io.StringIO()
    generate.interactive(Generator(model), poem_bpe, SamplingSettings(max_new_tokens=60, temperature=1.0, top_k=None,
                                                                      seed=1),
                         stdin=io.StringIO("明月\n明月\n:utf8_only on\n明月\n"), stdout=replies)
    assert replies.getvalue().count("note: the model wrote") == 1 and ":utf8_only on draws only" in replies.getvalue()
    settings, sink = SamplingSettings(), io.StringIO()
    generate._run_command(":utf8_only on", settings, sink)
    generate._run_command(":utf8_only maybe", settings, sink)
    assert settings.utf8_only is True and sink.getvalue().splitlines() == [
        "utf8_only = True", "error: cannot set utf8_only to 'maybe': give on or off"]


def test_generation_after_a_healed_prompt_begins_with_the_bytes_taken_back(poem_bpe, monkeypatch):
    tok, runs = poem_bpe, []
    decode = Generator.decode

    def recorded(self, prompts, max_new_tokens, sample):
        assert prompts == [tok.encode("床")[:2], tok.encode("明月")]  # 床's last token taken back
        assert max_new_tokens == 3  # one step more: the healed row's first token gives back what was taken
        runs.append(list(decode(self, prompts, max_new_tokens, sample)))
        yield from runs[-1]
    monkeypatch.setattr(Generator, "decode", recorded)
    model = tiny_model(tok.vocab_size)
    for seed in range(5):
        settings = SamplingSettings(temperature=1.0, max_new_tokens=2, seed=seed)
        texts = complete(Generator(model), tok, ["床", "明月"], settings)
        healed, other = ([tok.decode_bytes([step[row]]) for step in runs[-1]] for row in (0, 1))
        assert healed[0].startswith(b"\x8a")  # drawn among the tokens that begin with the byte taken back
        # the text goes on from the prompt, the byte taken back not repeated, and takes two tokens after it;
        # the other row takes two tokens, not three
        as_streamed = codecs.getincrementaldecoder("utf-8")("replace")
        assert "床" + texts[0] == as_streamed.decode(b"\xe5\xba" + b"".join(healed))
        assert texts[1] == codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(other[:2]))
    assert len({tuple(run[0]) for run in runs}) > 1  # not the same draw each time
    monkeypatch.undo()
    with pytest.raises(GenerationError, match="every prompt needs at least one token"):  # no prompt at all
        complete(Generator(model), tok, [], SamplingSettings())


def test_a_prompt_ending_in_a_curly_quote_is_continued_as_transformers_continues_it(tmp_path):
    """GPT-2 spells ’ as [e2 80][99]: healed, the first token may be [99] only ([99 82] would leave a byte of
    no character after ’), so a greedy model writes what transformers writes, as many tokens after the prompt."""
    transformers = pytest.importorskip("transformers")
    from generate import healing_tokens
    tok = GPT2Tokenizer()
    ids = tok.encode("the students’")
    assert tok.decode_bytes(ids[-1:]) == b"\x99" and {b"\x99\x82", b"\x99\xbd"} <= set(tok.token_bytes())
    assert healing_tokens(tok, tok.decode_bytes(ids[-4:-1]), b"\x99") == ids[-1:]
    model = tiny_model(tok.vocab_size, seed=2)
    model.save_pretrained(tmp_path / "hf", tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=0)
    text = complete(Generator(model), tok, ["the students’"], SamplingSettings(temperature=0, max_new_tokens=8))[0]
    assert text == tok.decode(out[0, len(ids):].tolist())


# ---------------------------------------------------------------------------- files and command line


@pytest.fixture
def char_checkpoint(tmp_path):
    """A tiny char-level checkpoint at tmp_path/checkpoints/checkpoint.pt (no best_checkpoint.pt)."""
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=64)
    path = write_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt", model, tok)
    return path, model, tok


def test_many_samples_are_generated_a_batch_at_a_time_without_a_copy_of_the_prompt_each(char_checkpoint, monkeypatch,
                                                                                        capsys):
    """--num_samples 10^12 streams its batches until stopped: a list of that many prompts (8 TB of references)
    was a MemoryError, which ended in advice about batches and models that did not apply."""
    path, _, _ = char_checkpoint
    batches, real = [], generate.complete

    def counted(gen, tokenizer, prompts, *args, **kwargs):
        if len(batches) == 3:
            raise KeyboardInterrupt  # Ctrl-C after three batches
        batches.append(len(prompts))
        return real(gen, tokenizer, prompts, *args, **kwargs)
    monkeypatch.setattr(generate, "complete", counted)
    with pytest.raises(KeyboardInterrupt):
        generate.main(["--checkpoint", str(path), "--device", "cpu", "--prompt", "ab", "--max_new_tokens", "3",
                       "--num_samples", str(10**12), "--batch_size", "2"])
    assert batches == [2, 2, 2] and capsys.readouterr().out.count("---------------\n") == 6
    monkeypatch.undo()
    seen = []  # texts handed to on_batch are the caller's: not kept as well, or 10^12 of them would pile up
    texts = generate.complete_in_batches(Generator(char_checkpoint[1]), char_checkpoint[2], generate.Copies("ab", 3),
                                         SamplingSettings(temperature=0, max_new_tokens=2), 2,
                                         torch.Generator().manual_seed(0), on_batch=lambda t, bar: seen.extend(t))
    assert texts == [] and len(seen) == 3
    copies = generate.Copies("ab", 5)
    assert len(copies) == 5 and copies[3:] == ["ab"] * 2 and copies[-5] == "ab" and list(copies) == ["ab"] * 5
    with pytest.raises(IndexError):
        copies[5]


def cli(args, cwd, stdin=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_end_to_end(char_checkpoint, tmp_path):
    _, model, tok = char_checkpoint
    expected = complete(Generator(model), tok, ["ROMEO:"], SamplingSettings(temperature=0, max_new_tokens=30))[0]
    r = cli(["--prompt", "ROMEO:", "--max_new_tokens", "30", "--temperature", "0", "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ROMEO:" + expected + "\n"
    assert "checkpoints/checkpoint.pt (best_checkpoint.pt not found)" in r.stderr


def test_cli_prompt_file_with_a_byte_order_mark(char_checkpoint, tmp_path):
    _, model, tok = char_checkpoint
    expected = complete(Generator(model), tok, ["ROMEO:"], SamplingSettings(temperature=0, max_new_tokens=10))[0]
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfROMEO:")  # as Windows Notepad saves UTF-8
    r = cli(["--prompt_file", "p.txt", "--max_new_tokens", "10", "--temperature", "0", "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ROMEO:" + expected + "\n"
    for prompt in ("JULIET:", ""):  # one of the two, even an empty --prompt
        r = cli(["--prompt_file", "p.txt", "--prompt", prompt, "--device", "cpu"], tmp_path)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: give --prompt or --prompt_file, not both\n")
    if os.path.exists("/dev/null"):  # an empty prompt (cron's stdin is /dev/null), though /dev/null is a device
        empty = complete(Generator(model), tok, [""], SamplingSettings(temperature=0, max_new_tokens=10))[0]
        r = cli(["--prompt_file", "/dev/null", "--max_new_tokens", "10", "--temperature", "0", "--device", "cpu"],
                tmp_path)
        assert (r.returncode, r.stdout) == (0, empty + "\n"), r.stderr


def test_a_prompt_file_in_another_encoding_is_named_as_prepare_data_names_it(char_checkpoint, tmp_path):
    """GBK after a byte-order mark: the byte offset counts from the file's start (the mark's 3 bytes
    included), and the advice says how to convert; UTF-16 is named as such. \r\n and \r become \n."""
    (tmp_path / "gbk.txt").write_bytes(b"\xef\xbb\xbfabc\xc4\xe3")
    (tmp_path / "u16.txt").write_bytes("ab\n".encode("utf-16"))
    (tmp_path / "u16le.txt").write_bytes("ab\n".encode("utf-16-le"))  # no byte-order mark: valid UTF-8, NULs
    r = cli(["--prompt_file", "u16le.txt", "--device", "cpu"], tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: --prompt_file u16le.txt holds NUL characters: is it "
                                                         "UTF-16 (what Windows Notepad calls 'Unicode')? Convert it "
                                                         "with iconv -f utf-16 -t utf-8\n")
    for name, message in (("gbk.txt", "byte 0xc4 at byte offset 6 (invalid continuation byte); convert the file to "
                                      "UTF-8 first, e.g. `iconv -f gbk -t utf-8 IN > OUT`"),
                          ("u16.txt", "byte 0xff at byte offset 0 (invalid start byte); it is UTF-16")):
        r = cli(["--prompt_file", name, "--device", "cpu"], tmp_path)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"error: --prompt_file {name} is not valid UTF-8: {message}"), r.stderr
    _, model, tok = char_checkpoint
    expected = complete(Generator(model), tok, ["a\nb\nc"], SamplingSettings(temperature=0, max_new_tokens=5))[0]
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc")
    r = cli(["--prompt_file", "crlf.txt", "--max_new_tokens", "5", "--temperature", "0", "--device", "cpu"], tmp_path)
    assert r.returncode == 0 and r.stdout == "a\nb\nc" + expected + "\n", r.stderr


def test_an_empty_prompt_hint_the_tokenizer_can_encode(tmp_path):
    """A Chinese text without newlines: its character-level tokenizer knows no newline and no Latin letter,
    so the example prompt is made of characters it knows."""
    from generate import encode_prompt
    tok = CharTokenizer.from_text("床前明月光疑是地上霜")
    with pytest.raises(GenerationError) as e:
        encode_prompt(tok, "")
    example = shlex.split(str(e.value).rpartition("--prompt ")[2])[0]  # as a shell passes it on
    assert example == tok.decode([0, 1, 2]) and tok.encode(example) == [0, 1, 2]
    out = io.StringIO()  # interactive mode refuses --prompt: its hint is a line to type
    generate.interactive(Generator(tiny_model(tok.vocab_size)), tok, SamplingSettings(max_new_tokens=2),
                         stdin=io.StringIO("\n"), stdout=out)
    assert ("error: an empty line has nothing to start from: this tokenizer has neither an end-of-text token nor a "
            f"newline; type characters it knows, e.g. {example}\n") in out.getvalue()
    assert "--prompt" not in out.getvalue()


def test_interactive_commands_typed_with_a_chinese_input_method(char_checkpoint):
    """The full-width colon and space of a Chinese input method work as ':' and ' '; a UTF-16 line (NULs
    between the letters once read as UTF-8) is refused, not continued, and the loop goes on."""
    _, model, tok = char_checkpoint
    settings, out = SamplingSettings(temperature=0, max_new_tokens=10), io.StringIO()
    generate._run_command("\uff1amax_new_tokens\u30005", settings, out)
    assert settings.max_new_tokens == 5 and out.getvalue() == "max_new_tokens = 5\n"
    generate._run_command(":stop\u3000\u3002", settings, out)
    assert settings.stop == "\u3002"
    # with the tokenizer, as the loop runs it: a stop string this character vocabulary cannot write is refused
    # at once, not at every prompt after it
    out = io.StringIO()
    generate._run_command(":stop \u3002", settings, out, tok)
    assert out.getvalue().startswith("error: cannot set stop to '\u3002': the stop string '\u3002' could never end "
                                     "a text: ")
    generate._run_command(":stop Ro", settings, out, tok)
    assert settings.stop == "Ro"
    settings.stop = None
    out = io.StringIO()
    generate.interactive(Generator(model), tok, settings, stdin=io.StringIO("a\0b\0\nab\n\uff1aquit\nab\n"), stdout=out)
    expected = complete(Generator(model), tok, ["ab"], settings)[0]
    assert out.getvalue() == ("> error: that line holds NUL characters: is the input UTF-16 (what Windows Notepad "
                              f"calls 'Unicode')? Convert it with iconv -f utf-16 -t utf-8\n> {expected}\n> ")


def test_cli_interactive_through_stdin(char_checkpoint, tmp_path):
    _, model, tok = char_checkpoint
    expected = complete(Generator(model), tok, ["ab"], SamplingSettings(temperature=0, max_new_tokens=12))[0]
    lines = [":temperature 0", ":max_new_tokens 12", ":top_p 2", ":temprature 1", "ab", ":help", ":settings"]
    # \r\n line ends, as a file written on Windows and piped in has them
    r = cli(["--interactive", "--device", "cpu"], tmp_path, stdin="\r\n".join(lines) + "\r\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "temperature = 0.0" in out and "max_new_tokens = 12" in out
    assert "error: cannot set top_p to '2'" in out and "did you mean 'temperature'?" in out
    assert expected + "\n" in out and ":quit" in out and "top_p = 1.0" in out  # :help and :settings


def test_text_in_another_encoding_is_named_not_a_traceback(char_checkpoint, tmp_path):
    """A GBK terminal on a UTF-8 machine: '\xbd\xf1' is GBK for one character and no UTF-8 at all."""
    _, model, tok = char_checkpoint
    env = {**os.environ, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--device", "cpu", "--prompt", b"ab\xbd\xf1"],
                       cwd=tmp_path, capture_output=True, env=env, timeout=120)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "--prompt is not valid UTF-8 (byte 0xbd)" in err[0], err
    expected = complete(Generator(model), tok, ["ab"], SamplingSettings(temperature=0, max_new_tokens=5))[0]
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--device", "cpu", "--interactive"], cwd=tmp_path,
                       input=b"\xbd\xf1\n:temperature 0\n:max_new_tokens 5\n\xef\xbb\xbfab\n", capture_output=True,
                       env=env, timeout=120)
    out = r.stdout.decode()
    # the line after the bad one, with a byte-order mark, is read as 'ab' (its continuation is printed)
    assert r.returncode == 0 and "error: that line is not valid UTF-8 (byte 0xbd)" in out and f"> {expected}\n" in out
    # a UTF-8 locale decodes strictly: only the bad line is lost, not the lines before and after it
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--device", "cpu", "--interactive"], cwd=tmp_path,
                       input=b":temperature 0\n:max_new_tokens 5\nab\n\xbd\xf1\nab\n", capture_output=True,
                       env=env, timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0 and out.count(f"> {expected}\n") == 2 and out.count("not valid UTF-8") == 1, out


def test_a_console_that_cannot_show_a_character_gets_a_replacement(char_checkpoint, tmp_path, monkeypatch):
    """A GBK or ASCII console: the text is printed with '?' where it cannot show a character."""
    monkeypatch.chdir(tmp_path)
    console = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # errors="strict", as a console's default
    monkeypatch.setattr(sys, "stdout", console)
    main(["--device", "cpu", "--prompt", "ab", "--max_new_tokens", "3", "--temperature", "0"])
    console.write("é\n")  # what the model might have written
    console.flush()
    assert console.buffer.getvalue().decode("ascii").endswith("?\n")


def test_a_stop_string_may_begin_and_end_with_spaces():
    settings, out = SamplingSettings(), io.StringIO()
    generate._run_command(":stop  and ", settings, out)  # the one space after the name separates
    assert settings.stop == " and "
    generate._run_command(":stop \u3000", settings, out)  # the full-width space
    assert settings.stop == "\u3000"
    generate._run_command(":stop none", settings, out)
    assert settings.stop is None
    settings.stop = "x"
    generate._run_command(":stop off ", settings, out)
    assert settings.stop is None
    generate._run_command(":  top_k   5  ", settings, out)  # other settings: spaces around do not matter
    assert settings.top_k == 5
    out = io.StringIO()
    generate._run_command(r":stop \n\n", settings, out)  # as :help says, \n is a newline
    assert settings.stop == "\n\n" and out.getvalue() == "stop = '\\n\\n'\n"


def test_interactive_names_an_unknown_character_and_goes_on(char_checkpoint):
    _, model, tok = char_checkpoint
    settings = SamplingSettings(temperature=0, max_new_tokens=10)
    out = io.StringIO()
    generate.interactive(Generator(model), tok, settings, stdin=io.StringIO("héllo\nab\n"), stdout=out)
    expected = complete(Generator(model), tok, ["ab"], settings)[0]
    text = out.getvalue()
    assert "error: " in text and "'é'" in text and text.index("error: ") < text.index(f"> {expected}\n")


def overflowed_then_next(generators: Callable[[GPT], list[Generator]]) -> None:
    # inf at position 12 stands for an activation that overflows in float16; the compiled or graphed step attends
    # over every cache slot, so a non-finite value left in a slot past the next prompt would spoil it too
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=16)
    with torch.no_grad():
        model.transformer.wpe.weight[12] = float("inf")
    expected = complete(Generator(model), tok, ["ab"], SamplingSettings(temperature=0, max_new_tokens=3))[0]
    for gen in generators(model):
        out = io.StringIO()
        lines = ":max_new_tokens 12\nabcdef\n:max_new_tokens 3\nab\n"
        generate.interactive(gen, tok, SamplingSettings(temperature=0), stdin=io.StringIO(lines), stdout=out)
        text = out.getvalue()
        # the error on a line of its own after the text streamed so far, then the next prompt as if alone
        assert re.search(r"\n> [^\n]{7}\nerror: the model's output became NaN or infinite at new token 8", text), text
        assert text.endswith(f"> {expected}\n> \n"), (gen.compiled, gen._graph is not None, text)


def test_a_generation_that_overflowed_leaves_nothing_behind_for_the_next():
    overflowed_then_next(lambda model: [Generator(model), Generator(model, compile=True)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_generation_that_overflowed_leaves_nothing_behind_for_the_next_in_a_cuda_graph():
    overflowed_then_next(lambda model: [Generator(model, device="cuda", dtype=torch.float32, cuda_graph=True)])


def test_interactive_ctrl_c_stops_only_that_generation(char_checkpoint, monkeypatch):
    _, model, tok = char_checkpoint
    gen = Generator(model)
    decode, calls = gen.decode, []

    def interrupted_once(*args):
        calls.append(1)
        for i, step in enumerate(decode(*args)):
            if len(calls) == 1 and i == 3:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(gen, "decode", interrupted_once)
    settings = SamplingSettings(temperature=0, max_new_tokens=10)
    out = io.StringIO()
    generate.interactive(gen, tok, settings, stdin=io.StringIO("ab\nab\n:quit\nnever read\n"), stdout=out)
    expected = complete(Generator(model), tok, ["ab"], settings)[0]
    assert f"> {expected[:3]}\n[stopped]\n> {expected}\n> " == out.getvalue()
    # with a stop string the text held back in case it begins the stop string is still shown
    calls.clear()
    settings.stop = "QQQQ"
    out = io.StringIO()
    generate.interactive(gen, tok, settings, stdin=io.StringIO("ab\r\n:quit\n"), stdout=out)
    assert f"> {expected[:3]}\n[stopped]\n> " == out.getvalue()


def test_batch_generate_into_a_directory_fails_before_generating(char_checkpoint, tmp_path, monkeypatch):
    path, _, _ = char_checkpoint
    monkeypatch.setattr(generate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(GenerationError, match="is a directory; give a file name"):
        batch_generate(["a"], output_file=str(tmp_path), checkpoint=str(path))
    (tmp_path / "f").write_text("")
    with pytest.raises(GenerationError, match=r"output_file '.*f/s.txt' cannot be written: its folder is a file"):
        batch_generate(["a"], output_file=str(tmp_path / "f" / "s.txt"), checkpoint=str(path))
    with pytest.raises(GenerationError, match=r"cannot be written: File name too long; give a path you can write"):
        batch_generate(["a"], output_file=str(tmp_path / ("a" * 300 + ".txt")), checkpoint=str(path))


def test_batch_generate_leaves_a_write_protected_file_alone(char_checkpoint, tmp_path, monkeypatch):
    """A results file made read-only to keep it: the atomic write renames over it, which the folder allows, so
    it is refused before the model loads. os.access is asked (root may write anything, and CI runs as root)."""
    path, _, _ = char_checkpoint
    kept = tmp_path / "results.txt"
    kept.write_text("PRECIOUS")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (Path(p) == kept and mode == os.W_OK)
                        and real_access(p, mode, **kw))
    monkeypatch.setattr(generate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(GenerationError, match=r"^output_file '.*results.txt' is write-protected; give a path you "
                                              r"can write to$"):
        batch_generate(["a"], output_file=kept, checkpoint=str(path))
    assert kept.read_text() == "PRECIOUS"


def test_batch_generate_stopped_part_way_keeps_the_batches_done_beside_the_file(char_checkpoint, tmp_path,
                                                                                monkeypatch, capsys):
    """Ctrl-C in the third batch: the two batches done go to output_file + '.partial' and the Ctrl-C goes on to
    the caller; output_file, a finished earlier run's here, is left as it was."""
    path, model, tok = char_checkpoint
    prompts = ["ROMEO:", "a", "To be", "xyz", "hello", "JULIET:"]
    out = tmp_path / "samples.txt"
    out.write_text("an earlier run's samples\n")
    real_complete, calls = generate.complete, []

    def stopped_in_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_complete(*args, **kwargs)
    monkeypatch.setattr(generate, "complete", stopped_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        batch_generate(prompts, output_file=out, checkpoint=str(path), batch_size=2, device="cpu", temperature=0,
                       max_new_tokens=10)
    assert out.read_text() == "an earlier run's samples\n"
    partial = (tmp_path / "samples.txt.partial").read_text(encoding="utf-8")
    texts = [p + real_complete(Generator(model), tok, [p], SamplingSettings(temperature=0, max_new_tokens=10))[0]
             for p in prompts[:4]]
    assert partial == "".join(f"==================== prompt {i} of 6 ====================\n{p}\n"
                              f"-------------------- sample --------------------\n{t}\n\n"
                              for i, (p, t) in enumerate(zip(prompts, texts), 1))
    assert (f"stopped after 4 of 6 samples: those are in {out}.partial; {out} was not written\n"
            in capsys.readouterr().err)


def test_batch_generate_names_the_prompt_it_cannot_take(char_checkpoint, tmp_path, monkeypatch):
    """Hundreds of prompts: the error says which one. A lone surrogate (os.fsdecode of a GBK name) is refused
    before the model is loaded; it would have failed only when the output file was written."""
    path, _, _ = char_checkpoint
    # a model's user is told to keep to its characters, not to rebuild the tokenizer from another text
    with pytest.raises(GenerationError, match=r"^prompt 2 of 3: the prompt has 1 character\(s\) this character-level "
                                              r"model has never seen: '\u00e9'; it continues only text written in "
                                              r"the \d+ characters of its training text \(a byte-level model"):
        batch_generate(["ab", "\u00e9", "cd"], output_file=str(tmp_path / "o.txt"), checkpoint=str(path))
    monkeypatch.setattr(generate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(GenerationError, match=r"^prompt 3 of 3 is not valid UTF-8 \(byte 0x80\)"):
        batch_generate(["ab", "cd", "a\udc80b"], output_file=str(tmp_path / "o.txt"), checkpoint=str(path))
    with pytest.raises(GenerationError, match=r"^stop is not valid UTF-8"):
        batch_generate(["ab"], output_file=str(tmp_path / "o.txt"), checkpoint=str(path), stop="\udc80")
    monkeypatch.undo()
    monkeypatch.setattr(generate, "Generator", lambda *a, **k: pytest.fail("generation began"))
    with pytest.raises(GenerationError, match=r"^stop 'a\u00e9' could never end a text: .*'\u00e9'"):
        batch_generate(["ab"], output_file=str(tmp_path / "o.txt"), checkpoint=str(path), stop="a\u00e9")
    assert not (tmp_path / "o.txt").exists()


def test_a_stop_string_the_tokenizer_cannot_write_is_refused(char_checkpoint, tmp_path):
    """A character-level model writes only the characters it knows: a stop string with another could never
    end a text, and the run would go on to max_new_tokens without a word. It is told to keep to the model's
    characters, not to rebuild the tokenizer."""
    _, model, tok = char_checkpoint
    r = cli(["--stop", "\u4f60", "--prompt", "ab", "--device", "cpu"], tmp_path)
    using, error = r.stderr.splitlines()  # the checkpoint's line, then one line of error
    assert r.returncode == 2 and r.stdout == "" and using.startswith("using checkpoint"), r.stderr
    assert error == ("error: --stop '\u4f60' could never end a text: it has 1 character(s) this character-level model "
                     f"has never seen: '\u4f60', and the model writes only the {tok.vocab_size} characters of its training "
                     "text")
    r = cli(["--stop", "\u4f60", "--interactive", "--device", "cpu"], tmp_path, stdin="ab\n")  # before the loop
    assert r.returncode == 2 and r.stdout == "" and r.stderr.splitlines()[-1] == error, r.stderr
    out = io.StringIO()
    settings = SamplingSettings(temperature=0, max_new_tokens=5)
    generate.interactive(Generator(model), tok, settings, stdin=io.StringIO(":stop \u4f60\nab\n:stop none\nab\n"),
                         stdout=out)
    expected = complete(Generator(model), tok, ["ab"], settings)[0]
    # refused as it is typed, so the prompts after it are continued as before
    assert "> error: cannot set stop to '\u4f60': the stop string '\u4f60' could never end a text: " in out.getvalue()
    assert out.getvalue().count(f"> {expected}\n") == 2 and out.getvalue().endswith(f"> {expected}\n> \n")


def test_batch_generate_takes_an_open_files_lines_a_long_name_and_checks_dtype_first(char_checkpoint, tmp_path):
    path, model, tok = char_checkpoint
    # with the byte-order mark Windows Notepad writes, which the character-level tokenizer has never seen
    (tmp_path / "prompts.txt").write_text("\ufeffROMEO:\nab\nJULIET:", encoding="utf-8")
    name = tmp_path / ("样本" * 41 + ".txt")  # 250 bytes: a name a file may have, and its temporary file too
    kw = dict(checkpoint=str(path), device="cpu", temperature=0, max_new_tokens=5)
    with open(tmp_path / "prompts.txt", encoding="utf-8") as f:
        texts = batch_generate(f, output_file=name, **kw)
    assert texts == batch_generate(["ROMEO:", "ab", "JULIET:"], output_file=None, **kw)  # no line ends kept
    with tempfile.NamedTemporaryFile("w+", encoding="utf-8") as f:  # a file object of another class
        f.write("ROMEO:\r\nab\n")
        f.seek(0)
        assert batch_generate(f, output_file=None, **kw) == texts[:2]
    assert name.read_text(encoding="utf-8").count("= prompt ") == 3
    with pytest.raises(UserError, match="fp16"):  # before loading a model: not one that is not there
        batch_generate(["ab"], output_file=None, checkpoint=str(tmp_path / "missing.pt"), dtype="fp16")


def test_float16_on_a_cpu_is_warned_of(char_checkpoint, tmp_path, capsys):
    """Emulated on most CPUs: many times slower than float32, which a user picking it for speed should hear."""
    path, model, tok = char_checkpoint
    warning = "warning: float16 on a CPU is emulated by most processors and runs many times slower than float32"
    batch_generate(["ab"], output_file=None, checkpoint=str(path), device="cpu", dtype="float16", max_new_tokens=2)
    assert warning in capsys.readouterr().err
    r = cli(["--checkpoint", str(path), "--prompt", "ab", "--max_new_tokens", "2", "--dtype", "float16"], tmp_path)
    assert r.returncode == 0 and warning in r.stderr
    r = cli(["--checkpoint", str(path), "--prompt", "ab", "--max_new_tokens", "2", "--dtype", "bfloat16"], tmp_path)
    assert r.returncode == 0 and "warning" not in r.stderr


def test_a_prompt_file_ending_with_a_line_break_the_tokenizer_lacks_is_said_so(tmp_path):
    tok = CharTokenizer(string.ascii_letters + " .,;:!?'")  # trained on text without line breaks
    path = write_checkpoint(tmp_path / "ck" / "checkpoint.pt", tiny_model(tok.vocab_size), tok)
    (tmp_path / "p.txt").write_text("ROMEO:\n", encoding="utf-8")  # as editors save it
    r = cli(["--checkpoint", str(path), "--prompt_file", "p.txt", "--max_new_tokens", "3"], tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(
        "error: --prompt_file p.txt ends with a line break, which this tokenizer has never seen"), r.stderr


def test_a_failure_after_streamed_text_is_said_on_a_line_of_its_own(tmp_path):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size, block_size=16)
    with torch.no_grad():
        model.transformer.wpe.weight[10] = float("nan")  # the output turns NaN at the 5th new token
    path = write_checkpoint(tmp_path / "ck" / "checkpoint.pt", model, tok)
    r = cli(["--checkpoint", str(path), "--prompt", "ROMEO:", "--max_new_tokens", "9", "--temperature", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr.endswith("became NaN or infinite at new token 6: its weights are damaged\n")
    assert re.fullmatch(r"ROMEO:[^\n]{5}\n", r.stdout), r.stdout  # the 5 tokens before it, then the line's end


def test_running_out_of_memory_while_streaming_is_said_on_a_line_of_its_own(char_checkpoint, monkeypatch, capsys):
    from utils import run_cli
    path, _, _ = char_checkpoint
    decode = Generator.decode

    def out_of_memory_at_the_third(self, *args):
        for i, step in enumerate(decode(self, *args)):
            if i == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield step
    monkeypatch.setattr(Generator, "decode", out_of_memory_at_the_third)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: generate.main(["--checkpoint", str(path), "--prompt", "ROMEO:", "--temperature", "0"]),
                output_on_stdout=True)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and re.fullmatch(r"ROMEO:[^\n]{2}\n", out), out
    assert err.splitlines()[-1].startswith("error: out of memory: tried to allocate 2.00 GiB")


def test_a_backslash_n_in_the_prompt_is_text_and_a_note_says_so(char_checkpoint, capsys):
    """--stop reads \\n as a line end; --prompt takes the text as typed (it may be code), and says so where a
    user who wrote \\n for a line end would otherwise meet an unknown character, or the backslash in the text."""
    path, _, _ = char_checkpoint
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: generate.main(["--checkpoint", str(path), "--prompt", "ROMEO:\\nO", "--temperature", "0"]),
                output_on_stdout=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "note: --prompt is taken as typed, so its \\n is a backslash and an n" in err
    assert "'\\\\'" in err.splitlines()[-1]  # the char tokenizer has never seen a backslash
    run_cli(lambda: generate.main(["--checkpoint", str(path), "--prompt", "ROMEO:", "--temperature", "0",
                                   "--max_new_tokens", "3", "--stop", "\\n"]), output_on_stdout=True)
    assert "note:" not in capsys.readouterr().err  # no note without one


def test_batch_generate_writes_every_prompt(char_checkpoint, tmp_path, monkeypatch):
    path, model, tok = char_checkpoint
    prompts = ["ROMEO:", "a", "To be, or not", "xyz", "hello"]
    out = tmp_path / "samples.txt"
    texts = batch_generate(prompts, output_file=out, checkpoint=str(path), batch_size=2, device="cpu",
                           temperature=0, max_new_tokens=20)
    gen = Generator(model)
    assert texts == [p + complete(gen, tok, [p], SamplingSettings(temperature=0, max_new_tokens=20))[0]
                     for p in prompts]
    written = out.read_text(encoding="utf-8")
    for i, (p, t) in enumerate(zip(prompts, texts), 1):
        assert f"= prompt {i} of 5 =" in written and f"\n{p}\n" in written and f"\n{t}\n" in written
    # a prompt the tokenizer cannot encode fails before anything is generated or written
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding began before every prompt was checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Generator, "decode", no_decoding)
        with pytest.raises(UserError, match="'é'"):
            batch_generate(["ok", "héllo"], output_file=tmp_path / "bad.txt", checkpoint=str(path), device="cpu",
                           batch_size=1)
    assert not (tmp_path / "bad.txt").exists()
    with pytest.raises(GenerationError, match="did you mean 'temperature'"):
        batch_generate(["ok"], output_file=None, checkpoint=str(path), temprature=0)
    for bad in (0, True, 2.0):  # as the sampling settings refuse a bool where a number belongs
        with pytest.raises(GenerationError, match=rf"^batch_size must be an integer >= 1, got {bad!r}$"):
            batch_generate(["ok"], output_file=None, checkpoint=str(path), batch_size=bad)
    # any iterable of prompts, a generator too (read once); a string or no prompt at all is refused
    assert batch_generate((p for p in prompts[:2]), output_file=None, checkpoint=str(path), device="cpu",
                          temperature=0, max_new_tokens=20) == texts[:2]
    for bad in ("ROMEO:", [], iter([]), ["ok", 3], 42):
        with pytest.raises(GenerationError, match="^prompts must be a non-empty list of strings, got "):
            batch_generate(bad, output_file=None, checkpoint=str(path))
    # no default output file, which would replace a file of that name where the caller happens to be
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.txt").write_text("my notes")
    with pytest.raises(TypeError, match="output_file"):
        batch_generate(["ok"], checkpoint=str(path), device="cpu", max_new_tokens=2)
    assert (tmp_path / "samples.txt").read_text() == "my notes"


def test_a_checkpoint_folder_given_as_checkpoint_is_searched(char_checkpoint, capsys):
    path, _, _ = char_checkpoint
    _, _, source = load_model(checkpoint=str(path.parent))
    assert source == str(path)
    assert f"using checkpoint {path} (best_checkpoint.pt not found), step 7, best val loss 2.5000, char tokenizer" \
        in capsys.readouterr().err


def test_a_damaged_tokenizer_file_of_an_export_is_named(tmp_path):
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).save_pretrained(
        tmp_path, tokenizer=GPT2Tokenizer())
    (tmp_path / "toolkit_tokenizer.json").write_text('{"kind": "gpt2"')  # cut short
    with pytest.raises(UserError, match="toolkit_tokenizer.json"):
        load_model(init_from=str(tmp_path))


def test_an_export_whose_tokenizer_outgrows_its_model_is_one_line(tmp_path):
    """toolkit_tokenizer.json copied in from another export: ids beyond the model's rows would fail deep
    inside generation."""
    from tokenizer import CharTokenizer
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=3)).save_pretrained(
        tmp_path / "small", tokenizer=CharTokenizer("abc"))
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=5)).save_pretrained(
        tmp_path / "large", tokenizer=CharTokenizer("abcde"))
    shutil.copy(tmp_path / "large" / "toolkit_tokenizer.json", tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"toolkit_tokenizer.json: its tokenizer has 5 tokens but the model in "
                                              r".*small only 3; the folder mixes two exports"):
        load_model(init_from=str(tmp_path / "small"))


def test_a_folder_without_train_pys_checkpoints_says_what_it_holds(tmp_path, monkeypatch):
    tok = char_tokenizer()
    for step in (5, 20):  # kept steps only (--save_interval): the newest, by number
        write_checkpoint(tmp_path / "steps" / f"checkpoint_iter_{step}.pt", tiny_model(tok.vocab_size), tok)
    (tmp_path / "steps" / "checkpoint_iter_90.pt").mkdir()  # a folder of that name is no checkpoint
    with pytest.raises(CheckpointError, match=r"holds 2 kept step\(s\); read the newest with --checkpoint "
                                              r".*steps/checkpoint_iter_20.pt$"):
        load_model(checkpoint_dir=tmp_path / "steps")
    tiny_model(tok.vocab_size).save_pretrained(tmp_path / "export", tokenizer=tok)
    for kw in ({"checkpoint_dir": tmp_path / "export"}, {"checkpoint": str(tmp_path / "export")}):
        with pytest.raises(CheckpointError, match=r"export holds no checkpoint of train.py .* but a Hugging Face "
                                                  r"model folder; read it with --init_from .*export$"):
            load_model(**kw)
    # the README's runs have folders of their own: a command without --checkpoint_dir, or with a typo in it,
    # is pointed at the trained models, not told to train one
    runs = tmp_path / "checkpoints"
    for name in ("char", "char_full"):
        write_checkpoint(runs / name / "best_checkpoint.pt", tiny_model(tok.vocab_size), tok)
    (runs / "empty").mkdir()
    with pytest.raises(CheckpointError, match=rf"^no checkpoint found in {re.escape(str(runs))} itself \(searched "
                                              rf".*\), but folders in it hold trained models: {re.escape(str(runs))}/"
                                              rf"char, {re.escape(str(runs))}/char_full; pass one, e.g. "
                                              rf"--checkpoint_dir {re.escape(str(runs))}/char$"):
        load_model(checkpoint_dir=runs)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(runs))}/char_ful does not exist; did you mean "
                                              rf"--checkpoint_dir {re.escape(str(runs))}/char_full, which holds a "
                                              rf"trained model\?$"):
        load_model(checkpoint_dir=runs / "char_ful")
    with pytest.raises(CheckpointError, match=r"train one first"):  # nothing like it: how to train
        load_model(checkpoint_dir=runs / "char_full" / "empty")
    (runs / "char_fulll").mkdir()  # there, untrained: no typo, whatever its name is like
    with pytest.raises(CheckpointError, match=r"^no checkpoint found \(searched .*/char_fulll/best"):
        load_model(checkpoint_dir=runs / "char_fulll")
    five = tmp_path / "five"
    for i in range(5):  # five are all shown, with no "..." after them
        write_checkpoint(five / f"r{i}" / "checkpoint.pt", tiny_model(tok.vocab_size), tok)
    with pytest.raises(CheckpointError, match=r"five/r3, .*five/r4; pass one"):
        load_model(checkpoint_dir=five)
    # a folder this user may not enter (lost+found, another user's run) is passed over, not an error of its own
    (runs / "private").mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if Path(path).parent.name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(CheckpointError, match=r"did you mean --checkpoint_dir .*/char_full, which holds"):
        load_model(checkpoint_dir=runs / "char_ful")


@pytest.mark.parametrize("present,expected", [
    (CHECKPOINT_FALLBACK, "best_checkpoint.pt"),
    (("checkpoint.pt", "final_checkpoint.pt"), "checkpoint.pt"),
    (("final_checkpoint.pt",), "final_checkpoint.pt"),
])
def test_checkpoint_fallback_order(tmp_path, capsys, present, expected):
    tok = char_tokenizer()
    for i, name in enumerate(present):
        write_checkpoint(tmp_path / name, tiny_model(tok.vocab_size, seed=i), tok)
    model, _, source = load_model(checkpoint_dir=tmp_path)
    assert Path(source).name == expected
    reference = tiny_model(tok.vocab_size, seed=present.index(expected))
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert f"using checkpoint {tmp_path / expected}" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
     "29 missing (e.g. transformer.wte.weight), 29 unexpected (e.g. _orig_mod.transformer.wte.weight); the names "
     "carry the prefix '_orig_mod.' of a wrapped model"),
    (lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"}, "1 missing (e.g. lm_head.weight)"),
    (lambda sd: {**sd, "transformer.wpe.weight": torch.zeros(8, 16)},
     "1 of another shape (e.g. transformer.wpe.weight: (8, 16), expected (64, 32))"),
    (lambda sd: list(sd.values()), "its 'model' entry is a list, not a state_dict"),
])
def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path, change, message):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    path = write_checkpoint(tmp_path / "c.pt", model, tok)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = change(ckpt["model"])
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_model(checkpoint=str(path))
    assert str(e.value).startswith(f"{path}: its ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_hub_folder_with_its_own_tokenizer_and_another_vocabulary_is_named(tmp_path):
    """transformers' tokenizer.json cannot be read here: a vocabulary that is not GPT-2's gets the clear
    message, not a complaint about the file's format."""
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=1000)).save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(CheckpointError, match="has vocab_size 1000, not GPT-2's 50257, and no toolkit_tokenizer.json"):
        load_model(init_from=str(tmp_path))


def test_a_gpt2_folder_offline_encodes_with_its_own_vocabulary_files(tmp_path, monkeypatch, capsys):
    """Without tiktoken's cache and network, an export with GPT-2's tokenizer and a Hub download both hold
    vocab.json and merges.txt: they give tiktoken's ids. Without them the error stays tiktoken's."""
    import tokenizer
    from conftest import gpt2_encoding
    text = "Hello world, 你好世界! It's 2026."
    expected = gpt2_encoding().encode_ordinary(text)
    export, hub, padded = tmp_path / "export", tmp_path / "hub", tmp_path / "padded"
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).save_pretrained(export,
                                                                                                   GPT2Tokenizer())
    shutil.copytree(export, hub)
    (hub / "toolkit_tokenizer.json").unlink()
    # nanoGPT's padded vocabulary: its own toolkit_tokenizer.json says gpt2
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304)).save_pretrained(padded,
                                                                                                   GPT2Tokenizer())

    def offline(self):
        raise tokenizer.GPT2FilesError("tiktoken could not load its 'gpt2' files (ConnectionError: offline)")
    monkeypatch.setattr(tokenizer.GPT2Tokenizer, "__init__", offline)
    for folder in (export, hub, padded):
        _, tok, _ = load_model(init_from=str(folder))
        assert tok.encode(text) == expected and tok.eot_token == 50256
        note = f"note: tiktoken's 'gpt2' files are not here; encoding with {folder}'s vocab.json"
        assert note in capsys.readouterr().err
        (folder / "merges.txt").unlink()
        with pytest.raises(tokenizer.GPT2FilesError, match="tiktoken could not load its 'gpt2' files"):
            load_model(init_from=str(folder))

def test_a_folder_gpt2_without_a_model_is_not_taken_for_one(tmp_path, monkeypatch):
    """--init_from gpt2 beside a folder ./gpt2 that holds no config.json (a data set, a run's checkpoints)
    means OpenAI's model, with GPT-2's tokenizer, not the folder's tokenizer.json."""
    import model as model_module
    from tokenizer import CharTokenizer
    hub = tmp_path / "hub"
    GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).save_pretrained(str(hub))
    monkeypatch.setattr(model_module, "_download_gpt2", lambda name: hub)  # the download, offline
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    CharTokenizer.from_text("abc").save(tmp_path / "gpt2" / "tokenizer.json")
    _, tok, _ = load_model(init_from="gpt2")
    assert tok.kind == "gpt2"


def test_no_checkpoint_message_names_paths_and_command(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(checkpoint_dir=tmp_path / "none")
    msg = str(e.value)
    assert all(str(tmp_path / "none" / n) in msg for n in CHECKPOINT_FALLBACK)
    assert f"python train.py --preset=shakespeare-char-cpu --checkpoint_dir={tmp_path / 'none'}`" in msg


@pytest.mark.parametrize("args,fragment", [
    (["--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "got 1.5"),
    (["--prompt", "héllo wörld"], "'é', 'ö'"),
    (["--checkpoint", "missing.pt"], "missing.pt does not exist"),
    (["--checkpoint", os.devnull], f"checkpoint {os.devnull} is not a regular file (a device or a pipe)"),
    (["--checkpoint_dir", "nowhere"], "no checkpoint found"),
    (["--checkpoint_dir", "notes.txt"], "--checkpoint_dir notes.txt is a file, not a folder; to read that file as a "
                                        "checkpoint, pass --checkpoint notes.txt"),
    (["--device", "tpu"], "device must be"),
    (["--seed", str(2**64)], "seed must be an integer from -2**63 to 2**64 - 1"),
    (["--temprature", "1"], "unrecognized arguments: --temprature 1; see"),
    (["--max-new-tokens=5", "--top-p", "1"],  # the flags are the settings' names, with underscores
     "unrecognized arguments: --max-new-tokens=5 --top-p 1 (did you mean --max_new_tokens, --top_p?); see"),
    (["--interactive", "--prompt", "ab"], "do not apply to --interactive"),
    (["--interactive", "--batch_size", "4"], "do not apply to --interactive"),
    (["--batch_size", "0", "--num_samples", "2"], "--batch_size must be >= 1, got 0"),
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--num_samples", str(2**63)],
     "--num_samples must be at most 9,223,372,036,854,775,807, got 9,223,372,036,854,775,808"),
    (["--window", "0", "--checkpoint", "missing.pt"], "--window must be >= 1, got 0"),  # before the model loads
    (["--top_k", "-5"], "top_k must be a positive integer, or 0 / None to disable it, got -5"),
    (["--stop", ""], "stop must be a non-empty string or None"),
    (["--stop", "\udcbd"], "--stop is not valid UTF-8 (byte 0xbd)"),
    (["--checkpoint", "a.pt", "--init_from", "gpt2"], "give either --checkpoint (a.pt) or --init_from (gpt2), not both"),
])
def test_bad_input_is_one_line_and_exit_code_2(char_checkpoint, tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("not a checkpoint folder")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--device", "cpu", *args]))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("using checkpoint")]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert out == ""  # nothing half-written: not even the prompt


def test_num_samples_go_out_in_batches_of_batch_size(char_checkpoint, tmp_path, monkeypatch, capsys):
    import generate
    sizes, complete_ = [], generate.complete
    monkeypatch.setattr(generate, "complete", lambda gen, tok, prompts, *a, **k: sizes.append(len(prompts)) or complete_(
        gen, tok, prompts, *a, **k))
    monkeypatch.chdir(tmp_path)
    for extra, want in ((["--batch_size", "2"], [2, 2, 1]), ([], [5])):  # default 8
        sizes.clear()
        main(["--device", "cpu", "--prompt", "ab", "--num_samples", "5", "--max_new_tokens", "3", *extra])
        assert sizes == want and capsys.readouterr().out.count("---------------") == 5


def test_several_samples_report_progress_while_they_are_made(char_checkpoint, tmp_path, monkeypatch, capsys):
    """Nothing is printed until a batch is done: a progress line says how far it is (every 30 s in a log)."""
    monkeypatch.setattr(generate.Progress, "LINE_INTERVAL", 0.0)
    monkeypatch.chdir(tmp_path)
    main(["--device", "cpu", "--prompt", "ab", "--num_samples", "3", "--batch_size", "2", "--max_new_tokens", "40"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("generating 3 samples")]
    assert len(lines) >= 10 and "80/80" in lines[-1] and "\r" not in captured.err  # 2 batches of 40 steps
    assert captured.out.count("---------------") == 3 and "generating" not in captured.out
    texts = batch_generate(["a", "b"], output_file=None, max_new_tokens=30, device="cpu")  # one batch
    assert len(texts) == 2 and "30/30" in capsys.readouterr().err


def test_num_samples_with_seed_is_reproducible(char_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--device", "cpu", "--prompt", "ab", "--num_samples", "3", "--batch_size", "2",
            "--max_new_tokens", "15", "--temperature", "1.0", "--seed", "5"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first
    samples = first.split("\n---------------\n")
    assert len(samples) == 4 and samples[-1] == "" and len(set(samples[:3])) == 3


def test_every_batch_of_samples_draws_on(char_checkpoint, tmp_path, monkeypatch, capsys):
    """Two full batches from one seed: the second batch continues the generator, it does not restart it."""
    path, _, _ = char_checkpoint
    monkeypatch.chdir(tmp_path)
    main(["--device", "cpu", "--prompt", "ab", "--num_samples", "4", "--batch_size", "2", "--max_new_tokens", "15",
          "--temperature", "1.0", "--seed", "5"])
    samples = capsys.readouterr().out.split("\n---------------\n")
    assert len(samples) == 5 and len(set(samples[:4])) == 4
    texts = batch_generate(["ab"] * 4, output_file=None, checkpoint=str(path), batch_size=2, device="cpu",
                           temperature=1.0, max_new_tokens=15, seed=5)
    assert len(set(texts)) == 4


def test_stop_and_window_flags_reach_the_generator(char_checkpoint, tmp_path, monkeypatch, capsys):
    _, model, tok = char_checkpoint
    monkeypatch.chdir(tmp_path)
    settings = SamplingSettings(temperature=0, max_new_tokens=100)  # 102 characters outgrow the block of 64
    narrow = complete(Generator(model, window=5), tok, ["ab"], settings)[0]
    assert narrow != complete(Generator(model), tok, ["ab"], settings)[0]  # so --window must reach it
    main(["--device", "cpu", "--prompt", "ab", "--max_new_tokens", "100", "--temperature", "0", "--window", "5"])
    assert capsys.readouterr().out == "ab" + narrow + "\n"
    seen = []
    monkeypatch.setattr(generate, "complete", lambda gen, tok, prompts, settings, **k: seen.append(settings.stop) or [""])
    for flag, stop in (("\\n", "\n"), ("\\n.", "\n."), ("ab", "ab")):  # characters the char model knows
        main(["--device", "cpu", "--prompt", "ab", "--max_new_tokens", "3", "--stop", flag])
    assert seen == ["\n", "\n.", "ab"]
    assert generate._unescape("a\\tb\\nc") == "a\tb\nc"  # the tab, which the char model above does not know


def test_a_stop_string_fills_the_progress_bar(char_checkpoint, tmp_path, monkeypatch, capsys):
    """Rows that stop early end their batch early; the bar still ends at its total."""
    _, model, tok = char_checkpoint
    monkeypatch.setattr(generate.Progress, "LINE_INTERVAL", 0.0)
    gen = Generator(model)
    first = complete(gen, tok, ["ab"], GREEDY)[0][0]
    settings = SamplingSettings(temperature=0, max_new_tokens=40, stop=first)
    texts = generate.complete_in_batches(gen, tok, ["ab"] * 3, settings, 2, torch.Generator().manual_seed(0))
    assert texts == ["ab"] * 3
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generating 3 samples")]
    assert "80/80" in lines[-1]


def test_a_checkpoint_whose_tokenizer_outgrows_its_model_is_refused(tmp_path):
    tok = char_tokenizer()
    path = write_checkpoint(tmp_path / "c.pt", tiny_model(tok.vocab_size - 5), tok)
    with pytest.raises(CheckpointError, match=f"its tokenizer has {tok.vocab_size} tokens but the model only "
                                              f"{tok.vocab_size - 5}; the checkpoint mixes two runs"):
        load_model(checkpoint=str(path))


def test_paths_the_system_refuses_and_a_full_disk_are_one_line_of_error(char_checkpoint, tmp_path):
    long = "a" * 300  # over the 255 bytes a file name may have: is_file() raises instead of saying False
    for flags in (["--checkpoint_dir", long], ["--checkpoint", long + ".pt"], ["--init_from", long]):
        r = cli([*flags, "--device", "cpu"], tmp_path)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr == f"error: File name too long: '{flags[1]}'; check that path\n"
    if not Path("/dev/full").exists():
        return
    # the text could not be written: the message says where the space is missing, not what else to do
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--prompt", "ab", "--max_new_tokens", "3",
                            "--device", "cpu"], cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True,
                           env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == "error: No space left on device while writing the output; free some space there"


@pytest.mark.skipif(sys.platform == "win32", reason="closes a standard descriptor before Python starts")
@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_closed_standard_stream_is_no_traceback_and_no_mixed_output(char_checkpoint, tmp_path, closed):
    """`<&-`, `>&-`, `2>&-`: Python starts with that sys stream None."""
    args = ["--interactive"] if closed == 0 else ["--prompt", "ab", "--max_new_tokens", "5", "--temperature", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), *args, "--device", "cpu"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120, preexec_fn=lambda: os.close(closed))
    assert "Traceback" not in r.stderr + r.stdout
    if closed == 0:  # nothing to read: the loop ends as at the end of a piped file
        assert r.returncode == 0 and r.stdout == "> \n" and "interactive mode" in r.stderr, r.stdout + r.stderr
    elif closed == 1:  # the output would be lost
        assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
            "error: the standard output is closed (>&-); send it to a file, or to /dev/null to discard it")
    else:  # the output alone, without the checkpoint's line
        _, model, tok = char_checkpoint
        expected = complete(Generator(model), tok, ["ab"], SamplingSettings(temperature=0, max_new_tokens=5))[0]
        assert r.returncode == 0 and r.stdout == "ab" + expected + "\n"


# ---------------------------------------------------------------------------- healing and prompts: more cases


def test_healing_covers_a_last_token_of_0x80_and_four_byte_characters():
    """GPT-2 spells 😀 [f0 9f 98][80] and 🤗 [f0 9f][a4][97]: the last token begins inside the character, so it
    is taken back, and the only first token allowed is the one that completes the character."""
    from generate import heal_prompt, healing_tokens
    tok = GPT2Tokenizer()
    ids = tok.encode("😀")
    assert heal_prompt(tok, ids) == (ids[:-1], b"\x80")
    ids = tok.encode("hi 🤗")
    assert heal_prompt(tok, ids) == (ids[:-1], b"\x97")
    assert healing_tokens(tok, tok.decode_bytes(ids[-4:-1]), b"\x97") == ids[-1:]
    model = tiny_model(tok.vocab_size, seed=2)
    greedy = complete(Generator(model), tok, ["hi 🤗"], SamplingSettings(temperature=0, max_new_tokens=3))[0]
    assert greedy == tok.decode(uncached_greedy(model, ids, 3, window=32))  # as if nothing had been taken back
    sampled = complete(Generator(model), tok, ["hi 🤗"], SamplingSettings(temperature=1.0, max_new_tokens=3, seed=0))
    assert len(sampled) == 1  # some first token was allowed: all -inf would make multinomial fail


def test_a_prompt_ending_in_a_whole_two_byte_character_is_not_healed():
    from generate import heal_prompt
    tok = GPT2Tokenizer()
    for text in ("café", "мир"):  # é is the token [c3 a9], р is [d1 80]: each begins its character
        assert heal_prompt(tok, tok.encode(text)) == (tok.encode(text), b"")


def test_the_first_token_after_healing_is_any_that_begins_with_all_the_bytes_taken_back(poem_bpe):
    from generate import heal_prompt, healing_tokens
    tok = poem_bpe
    table = tok.token_bytes()
    # 床 = [e5][ba] + [8a]: the merged [8a e5] the poem goes on with (床前) is allowed, though it ends in a lead byte
    assert sorted(table[i] for i in healing_tokens(tok, b"\xe5\xba", b"\x8a")) == [b"\x8a", b"\x8a\xe5", b"\x8a\xe9"]
    # 床前 = [e5 ba 8a e5][89 8d]: two bytes taken back, and the last 3 bytes before them begin with two of 床's
    ids, healed = heal_prompt(tok, tok.encode("床前"))
    assert healed == b"\x89\x8d"
    allowed = healing_tokens(tok, tok.decode_bytes(ids[-3:]), healed)
    assert sorted(table[i] for i in allowed) == [b"\x89\x8d", b"\x89\x8d\xe6\x98\x8e\xe6\x9c\x88\xe5\x85\x89"]
    texts = complete(Generator(tiny_model(tok.vocab_size)), tok, ["床前"],
                     SamplingSettings(temperature=1.0, max_new_tokens=2, seed=0))
    assert len(texts) == 1  # some first token was allowed: all -inf would make multinomial fail


def test_a_healed_prompt_counts_steps_and_new_tokens_after_the_prompt(poem_bpe):
    tok = poem_bpe
    model = tiny_model(tok.vocab_size)
    steps = []
    complete(Generator(model), tok, ["床", "明月"], SamplingSettings(temperature=0, max_new_tokens=4),
             on_step=lambda: steps.append(1))
    assert len(steps) == 4  # the step that gives back the byte taken is no new token
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(GenerationError, match=r"^the model's output became NaN or infinite at new token 1: "):
        complete(Generator(model), tok, ["床"], SamplingSettings(temperature=0, max_new_tokens=4))


def test_only_the_first_token_after_a_healed_prompt_gives_back_the_bytes_taken():
    tok = GPT2Tokenizer()
    ids = tok.encode("你")  # [e4 bd][a0]
    stream = TextStream(tok, prompt="你", healed=tok.decode_bytes(ids[-1:]))
    for i in ids[-1:] + ids:  # the byte taken back, then 你 again, whose last token is that byte once more
        stream.add(i)
    stream.finish()
    assert stream.text == "你"


def test_batch_generate_takes_a_crlf_codecs_file_and_refuses_an_empty_file(char_checkpoint, tmp_path):
    path, _, _ = char_checkpoint
    kw = dict(checkpoint=str(path), device="cpu", temperature=0, max_new_tokens=5, output_file=None)
    (tmp_path / "crlf.txt").write_bytes(b"ROMEO:\r\nab\r\n")
    with codecs.open(tmp_path / "crlf.txt", encoding="utf-8") as f:  # no newline translation: lines end in \r\n
        assert batch_generate(f, **kw) == batch_generate(["ROMEO:", "ab"], **kw)
    (tmp_path / "empty.txt").write_text("")
    with open(tmp_path / "empty.txt", encoding="utf-8") as f:
        with pytest.raises(GenerationError, match="prompts must be a non-empty list of strings"):
            batch_generate(f, **kw)


def test_a_prompt_ending_with_a_line_break_the_tokenizer_lacks_is_not_said_to_be_a_file(tmp_path):
    tok = CharTokenizer(string.ascii_letters + " .,;:!?'")  # trained on text without line breaks
    path = write_checkpoint(tmp_path / "ck" / "checkpoint.pt", tiny_model(tok.vocab_size), tok)
    with pytest.raises(UserError) as e:
        main(["--checkpoint", str(path), "--prompt", "ROMEO:\n", "--max_new_tokens", "3", "--device", "cpu"])
    assert "prompt_file" not in str(e.value) and "never seen" in str(e.value)


def test_a_failure_before_any_text_after_an_empty_prompt_writes_nothing_to_stdout(tmp_path, capsys):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    path = write_checkpoint(tmp_path / "ck" / "checkpoint.pt", model, tok)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--checkpoint", str(path), "--prompt", "", "--temperature", "0", "--device", "cpu"]),
                output_on_stdout=True)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and "new token 1" in err, (out, err)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_is_read_as_a_prompt_file():
    import signal
    from utils import read_utf8_file

    def no_end(signum, frame):
        raise TimeoutError("the terminal's Ctrl-D did not end the read")
    master, slave = os.openpty()
    previous = signal.signal(signal.SIGALRM, no_end)  # a failure, not a hang, where Ctrl-D ends nothing
    signal.alarm(20)
    try:
        os.write(master, b"ROMEO:\n\x04")  # a line, then Ctrl-D at a line's start: the end of the input
        assert read_utf8_file(os.ttyname(slave), "--prompt_file") == "ROMEO:\n"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.close(master)
        os.close(slave)


def test_a_block_device_is_refused_as_a_prompt_file(tmp_path, monkeypatch):
    import stat
    from utils import UserError, read_utf8_file
    (tmp_path / "disk").write_bytes(b"ROMEO:")
    # a disk (/dev/sda) as os.fstat reports it: read whole, it would fill memory
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((stat.S_IFBLK | 0o660, 0, 0, 1, 0, 0, 0, 0, 0, 0)))
    with pytest.raises(UserError, match=r"^--prompt_file /dev/sda is a device, not a file; pass a file or a pipe$"):
        read_utf8_file(tmp_path / "disk", "--prompt_file /dev/sda")
