"""Sample text from a GPT-2: one prompt, an interactive loop, or many prompts in batches.

    python generate.py --prompt "ROMEO:" --max_new_tokens 200        # checkpoints/best_checkpoint.pt
    python generate.py --checkpoint ckpt.pt --num_samples 3 --temperature 0.9 --top_k 50 --seed 1
    python generate.py --init_from gpt2 --prompt "Hello, I'm a language model," --top_p 0.9
    python generate.py --interactive                                 # streams tokens; :help lists commands

    from generate import batch_generate
    texts = batch_generate(["ROMEO:", "JULIET:"], output_file="samples.txt", max_new_tokens=100)

Without --checkpoint the first of checkpoints/best_checkpoint.pt, checkpoint.pt and
final_checkpoint.pt that exists is used, and stderr names it. The tokenizer is the one stored in the
checkpoint, so a prompt is encoded exactly as the training data was.

Decoding runs on model.py's static KV cache: one forward pass over the prompt (the prefill), then one
token per step. Prompts of different lengths share a batch left-padded, and each row computes what it
would compute alone, up to rounding (in bfloat16 a near tie can then go either way). A prompt longer
than block_size is cut to its last block_size tokens. When the text outgrows block_size, the context
is cut to its last `window` tokens (--window, default block_size // 2) and the cache is rebuilt with
one prefill: the model always sees between `window` and block_size tokens of context, and a rebuild
costs one prompt pass per block_size - window new tokens. In a batch each row is cut when it outgrows
the block, as it would be alone; only the rows cut are computed again, and the others' cached keys and
values move down to make room.

On CUDA the model is cast to the generation dtype (bfloat16 by default) and one decoding step is
captured in a CUDA graph and replayed for every token: at batch 1 a step of GPT-2 124M is otherwise
dominated by the launch overhead of its ~190 operators (194 non-view aten ops per step: 49 matmuls,
25 layer norms, 24 cache writes, ...; --no_cuda_graph decodes eagerly). On the CPU, where decoding
is bound by memory bandwidth, the Linear layers are set up to stream their weights on every core
(SplitKLinear).

Sampling: top-k (on the raw logits), then temperature, then nucleus (top-p, Holtzman et al. 2019) filtering;
temperature 0 is greedy argmax decoding and matches transformers' GPT2LMHeadModel.generate(do_sample=False).
With utf8_only, tokens that would leave the text invalid UTF-8 are masked first (utf8_after).
"""
import argparse
import codecs
import contextlib
import dataclasses
import functools
import math
import re
import shlex
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from utils import quiet_ctrl_c_while_starting

if __name__ == "__main__":  # before torch's import: a second or more in which Ctrl-C would print a traceback
    quiet_ctrl_c_while_starting()

import torch

from config import DTYPES, suggest
from utils import (CHECKPOINT_FALLBACK, ArgumentParser, CheckpointError, HelpFormatter, Progress, UserError,
                   atomic_open, dtype_warning, find_checkpoint, load_checkpoint, model_from_checkpoint,
                   output_file_problem, path_arg, read_utf8_file, resolve_device, resolve_dtype, run_cli, synchronize,
                   writes_directly)


class GenerationError(UserError, ValueError):
    """A sampling setting, prompt or generation option that cannot work."""


class EmptyPromptError(GenerationError):
    """An empty prompt that the tokenizer has nothing to start from for; example: a prompt it can encode."""

    def __init__(self, message: str, example: str):
        super().__init__(message)
        self.example = example


# ---------------------------------------------------------------------------- settings


@dataclasses.dataclass
class SamplingSettings:
    max_new_tokens: int = 200  # tokens generated after the prompt
    temperature: float = 0.8  # divides the logits: < 1 sharper, > 1 flatter; 0 is greedy argmax
    top_k: Optional[int] = 200  # sample among the k most likely tokens only; None or 0 disables
    top_p: float = 1.0  # sample among the fewest tokens holding this much probability; 1 disables
    seed: Optional[int] = None  # the same seed gives the same text; None draws a fresh one each time
    stop: Optional[str] = None  # end the text where this string appears (the string is not kept)
    utf8_only: bool = False  # draw only tokens after which the text can still be valid UTF-8 (see utf8_after)

    def validate(self) -> "SamplingSettings":
        """Raise one GenerationError listing every bad value, or return self."""
        problems = []

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r} "
                            "(e.g. --max_new_tokens 200)")
        if not is_number(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a number >= 0 (0 means greedy decoding), got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            problems.append(f"top_k must be a positive integer, or 0 / None to disable it, got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 disables nucleus sampling; 0.9 is common), "
                            f"got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            problems.append(f"seed must be an integer from -2**63 to 2**64 - 1, or None, got {self.seed!r}")
        if self.stop is not None and (not isinstance(self.stop, str) or not self.stop):
            problems.append(f"stop must be a non-empty string or None, got {self.stop!r}")
        if not isinstance(self.utf8_only, bool):
            problems.append(f"utf8_only must be True or False, got {self.utf8_only!r}")
        if problems:
            raise GenerationError("invalid sampling settings: " + "; ".join(problems))
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingSettings":
        """SamplingSettings(**kwargs).validate(), with unknown names reported as a GenerationError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise GenerationError(f"unknown sampling setting {unknown[0]!r}{suggest(unknown[0], names)}; "
                                  f"the settings are {', '.join(names)}")
        return cls(**kwargs).validate()

    def make_rng(self, device) -> torch.Generator:
        """A torch.Generator on `device` seeded from self.seed; the global RNG is never touched."""
        rng = torch.Generator(device=device)
        if self.seed is None:
            rng.seed()  # non-deterministic
        else:
            rng.manual_seed(self.seed)
        return rng


def sample_logits(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), drawn with `generator`.

    temperature 0 returns the argmax. Otherwise all but the top_k largest logits are masked, the rest are
    divided by the temperature, then all but the most likely tokens whose probabilities sum to top_p.
    probabilities [0.5, 0.3, 0.2] with top_p=0.6 -> only the first two can be drawn.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k and top_k < logits.size(-1):  # on the logits as they are: dividing can round apart values equal
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1), the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # shifted so the largest logit is 0 before dividing: a tiny temperature then gives -inf, never inf - inf.
    # The clamp keeps the float32 divisor away from 0 and inf (below 1e-45 or above 3e38), where 0 / 0
    # and -inf / inf would make NaN; past it, sampling is as greedy or as flat as float32 can tell apart
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / min(max(temperature, 1e-30), 1e30)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # least likely first
        # drop a token once the tokens ranked above it hold top_p of the probability, that is once it and
        # those below it hold at most 1 - top_p. Summed from the least likely up: summed from the top, the
        # sum near 1 carries the head's rounding (float32's steps there are 6e-8), larger than the tail's
        # probabilities, and cut up to hundreds of tail tokens too many at top_p 0.9999
        drop = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[:, -1] = False  # the most likely token always survives (top_p below float32's smallest number)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------- valid UTF-8


# UTF-8's validating automaton over bytes. State 0 lies between characters; 1, 2, 3: that many continuation
# bytes are still due; 4-7: the second byte of a character led by E0, ED, F0 or F4, whose range is narrower
# (no overlong forms, no surrogates, nothing past U+10FFFF); UTF8_INVALID: the bytes cannot be UTF-8
UTF8_INVALID = 8


@functools.lru_cache(maxsize=1)
def utf8_automaton() -> torch.Tensor:
    """(9, 256): the state after each byte, from each state."""
    t = torch.full((9, 256), UTF8_INVALID, dtype=torch.long)
    t[0, :0x80] = 0
    t[0, 0xC2:0xE0] = 1
    t[0, 0xE0], t[0, 0xE1:0xED], t[0, 0xED], t[0, 0xEE:0xF0] = 4, 2, 5, 2
    t[0, 0xF0], t[0, 0xF1:0xF4], t[0, 0xF4] = 6, 3, 7
    t[1, 0x80:0xC0], t[2, 0x80:0xC0], t[3, 0x80:0xC0] = 0, 1, 2
    t[4, 0xA0:0xC0], t[5, 0x80:0xA0], t[6, 0x90:0xC0], t[7, 0x80:0x90] = 1, 1, 2, 2
    return t


def utf8_after(tokenizer) -> torch.Tensor:
    """(8, vocab_size): the automaton's state after each token's bytes, from each of the states 0-7.

    A byte-level model can begin a character with one token and go on with a token that does not finish
    it: the text then shows U+FFFD. Sampling with utf8_only draws only tokens whose state here is not
    UTF8_INVALID, so every character the model begins can still be finished. Kept on the tokenizer for
    as long as its token_bytes() list is the same one (training a BPE again makes a new list)."""
    token_bytes = tokenizer.token_bytes()
    kept = getattr(tokenizer, "_utf8_after", None)
    if kept is not None and kept[0] is token_bytes:
        return kept[1]
    tokenizer._utf8_after = (token_bytes, _utf8_after(token_bytes))
    return tokenizer._utf8_after[1]


def _utf8_after(token_bytes: list[bytes]) -> torch.Tensor:
    lengths = torch.tensor([len(b) for b in token_bytes], dtype=torch.long)
    states = torch.arange(8).repeat(len(token_bytes), 1).T.contiguous()  # (8, V): each token from each state
    if not token_bytes or int(lengths.max()) == 0:
        return states
    flat = torch.frombuffer(bytearray(b"".join(token_bytes)), dtype=torch.uint8).long()
    rows = torch.repeat_interleave(torch.arange(len(token_bytes)), lengths)
    cols = torch.arange(len(flat)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    data = torch.zeros(len(token_bytes), int(lengths.max()), dtype=torch.long)
    data[rows, cols] = flat  # (V, longest token): each token's bytes, from the left
    automaton = utf8_automaton()
    for j in range(data.shape[1]):  # all tokens at once, byte by byte
        live = lengths > j
        states[:, live] = automaton[states[:, live], data[live, j]]
    return states


def utf8_state(data: bytes) -> int:
    """The automaton's state after data; after bytes that are not UTF-8 it starts again, as a decoder does."""
    table, state = utf8_automaton().tolist(), 0
    for b in data:
        state = table[state][b]
        if state == UTF8_INVALID:
            state = table[0][b]
            state = 0 if state == UTF8_INVALID else state
    return state


# ---------------------------------------------------------------------------- token-level decoding


class Generator:
    """Decodes token ids with model.py's KV cache on the model's device and dtype.

        gen = Generator(model, device="cuda", dtype=torch.bfloat16)   # moves and casts model in place
        for step in gen.decode([[15496, 11], [40]], 50, sample):       # sample: logits (B, V) -> (B,)
            ...                                                         # step: B new ids, a list

    device/dtype None leave the model where and as it is. compile=True runs the decoding step through
    torch.compile (eager if compiling fails). cuda_graph=True (CUDA only) replays one captured
    decoding step per token; eager CUDA decoding is the fallback if capturing fails. cpu_layout=True
    (CPU only) prepares the Linear layers for decoding on every core, in place: see _cpu_decoding_layout.
    """

    def __init__(self, model, device=None, dtype=None, compile: bool = False, cuda_graph: bool = True,
                 window: Optional[int] = None, cpu_layout: bool = True):
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: use the module itself
        self.block_size = model.config.block_size
        self.window = max(1, self.block_size // 2) if window is None else window
        if not isinstance(self.window, int) or isinstance(self.window, bool) or not 1 <= self.window <= self.block_size:
            raise GenerationError(f"window must be an integer from 1 to block_size ({self.block_size}), "
                                  f"got {window!r}; it is how many tokens of context are kept when the "
                                  f"text outgrows the block (default block_size // 2)")
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        model.eval()
        if cpu_layout and model.lm_head.weight.device.type == "cpu":
            _cpu_decoding_layout(model)
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.step_fn = model.forward_cached
        self.compiled = False
        if compile:
            try:
                self.step_fn = torch.compile(model.forward_cached, dynamic=False)
                self.compiled = True
            except RuntimeError as e:  # e.g. a Python version that torch.compile does not support yet
                _warn(f"torch.compile is unavailable ({str(e).splitlines()[0][:120]}); decoding eagerly")
        self.capacity = 0  # slots in the KV cache
        self.pos = 0  # slots filled so far
        self.pad = None  # (B,) left padding of each row
        self._cache = None  # the KVCache of block 0, to notice when someone else replaced the cache
        self._graph = None  # (CUDAGraph, static inputs, static logits)

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], max_new_tokens: int,
               sample: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list[int]]:
        """Yield max_new_tokens steps, each a list of B new token ids (one per prompt).

        sample maps logits (B, vocab_size) to ids (B,). Stop iterating to stop early.
        """
        rows = [list(p[-self.block_size:]) for p in prompts]  # a long prompt keeps its last block_size tokens
        if not rows or not all(rows):
            raise GenerationError("every prompt needs at least one token (an empty text prompt starts "
                                  "from the tokenizer's end-of-text token; see encode_prompt)")
        if max_new_tokens < 1:
            return
        longest = max(len(r) for r in rows)
        # the last sampled token is never fed back, hence the - 1. A CUDA graph or a compiled step is
        # made once for the full block, so that any later prompt reuses it instead of recompiling
        static = self.cuda_graph or self.compiled
        needed = self.block_size if static else min(self.block_size, longest + max_new_tokens - 1)
        self._prepare(len(rows), needed)
        logits = self._prefill(rows)
        for i in range(max_new_tokens):
            tok = sample(logits)  # (B,)
            ids = tok.tolist()
            yield ids
            if i == max_new_tokens - 1:
                return
            for row, t in zip(rows, ids):
                row.append(t)
            if self.pos == self.capacity:
                rows, logits = self._rebuild(rows, tok)
            else:
                logits = self._step(tok)

    def _prepare(self, batch_size: int, slots: int) -> None:
        """Make sure a KV cache of (batch_size, slots) and, if wanted, its CUDA graph exist."""
        cache = self.model.transformer.h[0].attn.kv_cache
        if cache is not None and cache is self._cache and self.model.kv_cache_shape == (batch_size, slots):
            return
        self._graph = None  # it points at the old cache's memory
        self.model.setup_kv_cache(batch_size, slots)
        self._cache = self.model.transformer.h[0].attn.kv_cache
        self.capacity = slots
        if self.compiled or self.cuda_graph:
            self._warm_up(batch_size)

    def _warm_up(self, batch_size: int) -> None:
        """Run the step a few times (compiling it), then capture it in a CUDA graph if wanted.

        The warm-up writes slot 0 of the cache, which the next prefill overwrites.
        """
        dev = self.device
        static = dict(idx=torch.zeros(batch_size, 1, dtype=torch.long, device=dev),
                      cache_pos=torch.zeros(1, dtype=torch.long, device=dev),
                      pad=torch.zeros(batch_size, dtype=torch.long, device=dev))
        # lazy initialisation (cuBLAS workspaces, compilation) must happen before the capture, and on a
        # side stream, as torch.cuda.graph requires
        stream = torch.cuda.Stream(dev) if self.cuda_graph else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(3):
                try:
                    self.step_fn(**static)
                except Exception as e:  # compile failures come in many types (no compiler, no triton, ...)
                    if not self.compiled:
                        raise
                    _warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "decoding eagerly")
                    self.step_fn, self.compiled = self.model.forward_cached, False
        if stream is None:
            return
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with warnings.catch_warnings():  # a failed capture also warns "The CUDA Graph is empty"
                warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
                # on the model's GPU: without stream=, the capture runs on a stream of the current GPU,
                # and with --device cuda:1 it would capture nothing
                with torch.cuda.graph(graph, stream=stream):
                    logits = self.step_fn(**static)  # (B, 1, vocab_size), rewritten by every replay
        except RuntimeError as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if self.compiled:
                # a compiled step can recompile inside the capture, which fails; the graph alone removes
                # the launch overhead that matters at small batch, so capture the eager step instead
                _warn(f"capturing the compiled decoding step failed ({reason}); capturing it uncompiled")
                self.step_fn, self.compiled = self.model.forward_cached, False
                self._warm_up(batch_size)
                return
            _warn(f"capturing the decoding step in a CUDA graph failed ({reason}); decoding eagerly")
            self.cuda_graph = False
            return
        self._graph = (graph, static, logits)

    def _prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Left-pad the rows, run them through the model from slot 0; logits (B, vocab_size) of the last slot."""
        L = max(len(r) for r in rows)
        pad = [L - len(r) for r in rows]
        idx = torch.tensor([[0] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=self.device)  # (B, L)
        self.pad = torch.tensor(pad, dtype=torch.long, device=self.device)
        if self.compiled or self._graph is not None:
            # these steps attend over every slot, masked or not, and 0 * NaN is NaN: the slots past the prompt
            # may hold a non-finite value from an earlier generation that overflowed (float16) and stopped
            for block in self.model.transformer.h:
                block.attn.kv_cache.k[:, :, L:].zero_()
                block.attn.kv_cache.v[:, :, L:].zero_()
        logits = self.model.forward_cached(idx, torch.arange(L, device=self.device), self.pad, kv_len=L,
                                           last_only=True)
        self.pos = L
        if self._graph is not None:
            self._graph[1]["pad"].copy_(self.pad)
        return logits[:, -1]

    def _rebuild(self, rows: list[list[int]], tok: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """The cache is full, and every row's newest token, tok (B,), still has to be fed. A row that has
        outgrown the block keeps its last `window` tokens, as it would alone; the others keep all of theirs.
        Returns the rows and the logits (B, vocab_size) after the newest tokens.

        Rows of different lengths outgrow the block at different steps. Prefilling every row at each of
        those steps would cost up to B full prefills per block_size - window new tokens. Instead only the
        rows cut are computed again; the others keep their keys and values, moved to lower slots (a row's
        position ids count from its first token, not from its slot, so the move changes no value).
        """
        cut = [b for b, row in enumerate(rows) if len(row) > self.block_size]
        rows = [row[-self.window:] if b in cut else row for b, row in enumerate(rows)]
        if len(cut) == len(rows):  # the common case, one row or rows of one length: a plain prefill
            return rows, self._prefill(rows)
        pos = max(len(row) for row in rows) - 1  # slots needed for all but the newest tokens
        shift = self.pos - pos  # >= 1: a row that is not cut fits the block with its newest token
        for block in self.model.transformer.h:
            for buf in (block.attn.kv_cache.k, block.attn.kv_cache.v):
                buf[:, :, :pos] = buf[:, :, shift:self.pos].clone()
                buf[:, :, pos:].zero_()  # the slots to come, masked but read by a static step: finite
        self.pad = torch.tensor([pos - len(row) + 1 for row in rows], dtype=torch.long, device=self.device)
        if self.window > 1:  # the cut rows' kept tokens, all but the newest, computed alone in a cache of their own
            self._fill(cut, [rows[b][:-1] for b in cut], end=pos)
        self.pos = pos
        if self._graph is not None:
            self._graph[1]["pad"].copy_(self.pad)
        return rows, self._step(tok)

    def _fill(self, at: list[int], tokens: list[list[int]], end: int) -> None:
        """Compute the keys and values of `tokens` (rows of one length T, from position 0) and write them
        into rows `at` of the cache, at slots end - T to end."""
        model, T = self.model, len(tokens[0])
        caches, shape = [block.attn.kv_cache for block in model.transformer.h], model.kv_cache_shape
        try:
            model.setup_kv_cache(len(tokens), T)
            model.forward_cached(torch.tensor(tokens, dtype=torch.long, device=self.device),
                                 torch.arange(T, device=self.device), kv_len=T, last_only=True)
            rows = torch.tensor(at, dtype=torch.long, device=self.device)
            for block, cache in zip(model.transformer.h, caches):
                cache.k[rows, :, end - T:end] = block.attn.kv_cache.k
                cache.v[rows, :, end - T:end] = block.attn.kv_cache.v
        finally:
            for block, cache in zip(model.transformer.h, caches):
                block.attn.kv_cache = cache
            model.kv_cache_shape = shape

    def _step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed tok (B,) at the next slot; logits (B, vocab_size)."""
        if self._graph is not None:
            graph, static, logits = self._graph
            static["idx"].copy_(tok[:, None])
            static["cache_pos"].fill_(self.pos)
            graph.replay()
        else:
            # eager decoding attends only to the filled slots; compiled code keeps shapes static
            kv_len = None if self.compiled else self.pos + 1
            logits = self.step_fn(tok[:, None], torch.tensor([self.pos], device=self.device), self.pad,
                                  kv_len=kv_len)
        self.pos += 1
        return logits[:, -1]


class SplitKLinear(torch.nn.Linear):
    """nn.Linear whose products with a few rows use every CPU core: decoding on a multi-core CPU.

    Decoding multiplies one row per sequence by each weight matrix. That is bound by memory bandwidth,
    and the BLAS runs it on a single core, which on a 2-core x86 machine streams the weights at
    13-23 GB/s. Cutting the inner dimension into `chunks` slices turns it into one batched product of
    `chunks` independent slices, which torch spreads over the cores, and the partial results are summed:
    25-32 GB/s for the blocks and 41-47 GB/s for lm_head on the same machine, GPT-2 124M batch-1 decoding
    from 34.6 to 45-52 tokens/s (BENCHMARKS.md).
    It needs the weight stored column-major, so that every slice of the (in, out) matrix is contiguous;
    _cpu_decoding_layout sets that up. More than `max_rows` rows (a long prompt) and other dtypes than
    float32 go to nn.Linear.
    """
    chunks = 1
    max_rows = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t()  # (in, out)
        rows, k = x.numel() // self.in_features, self.in_features // self.chunks
        # float32 only: in bfloat16 or float16 (or under autocast) every partial sum would be rounded
        # once more than nn.Linear's
        if (self.chunks == 1 or rows > self.max_rows or x.device.type != "cpu" or not w.is_contiguous()
                or x.dtype != torch.float32 or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        parts = torch.bmm(x.reshape(rows, self.chunks, k).transpose(0, 1), w.view(self.chunks, k, -1))
        y = parts.sum(0)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _cpu_decoding_layout(model) -> None:
    """Prepare the model's Linear layers for decoding on the CPU, in place; values are unchanged.

    Every nn.Linear weight (out, in) is stored column-major: the same values, transposed in memory.
    F.linear then multiplies by a contiguous (in, out) matrix, which the BLAS streams faster for the few
    rows of decoding (1.5x for the blocks and 2x for lm_head at batch 1 on a 2-core x86 machine, and about
    3x for a 16-token prefill), and SplitKLinear can slice it without copying. With more than one torch
    thread the layers become SplitKLinear, with one slice per thread (the largest divisor of in_features
    not above torch.get_num_threads(), fixed here). Parameters keep their identity, so the tied lm_head /
    wte weight stays tied (the embedding lookup reads its rows strided), and the state_dict is the same.
    """
    from model import Float8Linear
    threads = torch.get_num_threads()
    with torch.no_grad():
        for module in model.modules():
            # Float8Linear multiplies in float8 only while training: when decoding it is a plain Linear
            if type(module) not in (torch.nn.Linear, Float8Linear, SplitKLinear) or not module.weight.is_contiguous():
                continue
            module.weight.data = module.weight.data.t().contiguous().t()
            chunks = max(c for c in range(1, threads + 1) if module.in_features % c == 0)
            if chunks > 1:
                module.__class__ = SplitKLinear
                module.chunks = chunks


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- text


def _encodes(tokenizer, text: str) -> bool:
    try:
        encode_prompt(tokenizer, text)
    except UserError:
        return False
    return True


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt starts from end-of-text, or a newline where there is none."""
    if prompt:
        try:
            return tokenizer.encode(prompt)
        except UserError:
            if unseen := unseen_characters(tokenizer, prompt):
                raise GenerationError(f"the prompt has {unseen}; it continues only text written in the "
                                      f"{tokenizer.vocab_size} characters of its training text (a byte-level model, "
                                      f"BPE or GPT-2, takes any text)") from None
            raise
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except UserError:
        # the example is made of characters it knows: a Chinese text's tokenizer may know no Latin letter
        known = tokenizer.decode(list(range(min(3, tokenizer.vocab_size))))
        raise EmptyPromptError(f"the prompt is empty and this tokenizer has neither an end-of-text token nor a "
                               f"newline to start from; give a prompt of characters it knows, e.g. "
                               f"--prompt {shlex.quote(known)}", known) from None


def unseen_characters(tokenizer, text: str) -> str:
    """'2 character(s) this character-level model has never seen: 'é', 'ö'', or '' for a text it can encode
    and for other tokenizers. The tokenizer's own advice (rebuild it from another text) is for whoever
    prepares the data; a model's user can only keep to its characters."""
    from tokenizer import listing
    unseen = tokenizer.unseen(text) if tokenizer.kind == "char" else []
    return f"{len(unseen)} character(s) this character-level model has never seen: {listing(unseen)}" if unseen else ""


def check_stop(tokenizer, stop: Optional[str], where: str) -> None:
    """A stop string the model can write: a character-level tokenizer writes no character it does not know,
    so such a stop string would never end a text (nor begin in a prompt, which the tokenizer refuses too)."""
    if stop:
        try:
            tokenizer.encode(stop)
        except UserError as e:
            if unseen := unseen_characters(tokenizer, stop):
                raise GenerationError(f"{where} {stop!r} could never end a text: it has {unseen}, and the model "
                                      f"writes only the {tokenizer.vocab_size} characters of its training "
                                      f"text") from None
            raise GenerationError(f"{where} {stop!r} could never end a text: {e}") from None


_decoding = threading.local()  # the TextStream whose bytes are being decoded, for the error handler below


def _replace_and_note(error: UnicodeDecodeError) -> tuple[str, int]:
    """What errors="replace" does (one U+FFFD per bad sequence), noting that bytes were not UTF-8: a U+FFFD
    the model wrote as a character (GPT-2 has 8 such tokens) is no such sign."""
    stream = getattr(_decoding, "stream", None)
    if stream is not None:
        stream.invalid_bytes = True
    return "\ufffd", error.end


codecs.register_error("textstream_replace", _replace_and_note)


class TextStream:
    """One row's generated text, built token by token.

    Bytes go through an incremental UTF-8 decoder, so a character split across tokens appears whole
    once its last byte arrives. The text ends at end-of-text or before the stop string, which may begin
    in the prompt (as transformers' stop_strings may): then the text is empty. new_text() returns what
    can be shown so far, holding back a possible beginning of the stop string.
    """

    def __init__(self, tokenizer, stop: Optional[str] = None, prompt: str = "", healed: bytes = b""):
        self.tokenizer = tokenizer
        self.stop = stop
        self._healed = healed  # the prompt's last bytes, which the first token repeats (heal_prompt)
        # the end of the prompt that a stop string could begin in: all of it but its last character
        self._before = prompt[max(0, len(prompt) - len(stop) + 1):] if stop and len(stop) > 1 else ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="textstream_replace")
        self.invalid_bytes = False  # whether bytes that are no UTF-8 were shown as U+FFFD
        self.text = ""
        self.done = False
        self._shown = 0

    def add(self, token: int) -> None:
        if self.done:
            return
        if token == self.tokenizer.eot_token:
            self.finish()
            return
        data = self.tokenizer.decode_bytes([token])
        if self._healed:  # already part of the prompt
            data, self._healed = data.removeprefix(self._healed), b""
        _decoding.stream = self
        try:
            self._append(self.decoder.decode(data))
        finally:
            _decoding.stream = None

    def finish(self) -> None:
        if not self.done:
            # the first bytes of a character whose last ones never came (the token budget ran out between
            # them, as it often does with GPT-2's two tokens per Chinese character) are no character: they
            # are left out rather than shown as U+FFFD; bytes that cannot start or continue one still are
            self.decoder.reset()
            self.done = True

    def _append(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        if self.stop:
            before = self._before
            i = (before + self.text).find(self.stop, max(0, len(before) + start - len(self.stop) + 1))
            if i >= 0:
                self.text = self.text[:max(0, i - len(before))]
                self.done = True

    def held_back(self) -> str:
        """The text not returned yet, also what new_text() keeps back while the stop string could begin."""
        piece = self.text[self._shown:]
        self._shown = len(self.text)
        return piece

    def new_text(self) -> str:
        """Text not returned before that can no longer change."""
        end = len(self.text)
        if self.stop and not self.done:
            end = max(self._shown, end - (len(self.stop) - 1))
        piece = self.text[self._shown:end]
        self._shown = max(self._shown, end)
        return piece


def heal_prompt(tokenizer, ids: list[int]) -> tuple[list[int], bytes]:
    """(ids, b"") or, where the last token begins inside a character, (ids without it, its bytes).

    A byte-level BPE learns tokens across character boundaries: trained on Chinese, it may only ever have
    seen 床前 as [e5][ba][8a e5]..., the last byte of 床 merged with the first of 前. The prompt 床 alone
    ends in the token [8a], which the model never saw there, and it goes on with bytes that make no
    character. So that token is taken back and the first new token must begin with its bytes, as
    "token healing" does (see complete). A last token that begins a character is left alone: text in ASCII
    is continued as transformers continues it.
    """
    if len(ids) < 2:
        return ids, b""
    last = tokenizer.decode_bytes([ids[-1]])
    return (ids[:-1], last) if last and 0x80 <= last[0] < 0xC0 else (ids, b"")


def healing_tokens(tokenizer, before: bytes, healed: bytes) -> list[int]:
    """The ids a healed prompt may go on with: those whose bytes begin with the bytes taken back and, after
    the prompt's bytes `before` them, are UTF-8 as far as they go (GPT-2's [99 82] also begins with the
    [99] that ends ’, and would leave a byte that belongs to no character)."""
    # the last character's bytes, where it is still incomplete, lie among the last 3; utf8_after knows which
    # tokens can follow them (the automaton utf8_only samples with)
    valid = (utf8_after(tokenizer)[utf8_state(before[-3:])] != UTF8_INVALID).tolist()
    return [i for i, b in enumerate(tokenizer.token_bytes()) if valid[i] and b.startswith(healed)]


def complete(gen: Generator, tokenizer, prompts: list[str], settings: SamplingSettings,
             rng: Optional[torch.Generator] = None, on_text: Optional[Callable[[str], None]] = None,
             on_step: Optional[Callable[[], object]] = None,
             on_invalid: Optional[Callable[[], object]] = None) -> list[str]:
    """The continuation of each prompt (the prompt itself not included), generated as one batch.

    on_text(piece) receives the first row's text as it is produced; on_step() is called after each
    decoding step (a token for every row). rng defaults to settings.make_rng(). on_invalid() is called
    at the end if a text shows bytes that are no UTF-8 as U+FFFD (utf8_only would have kept them out).
    """
    ids, healed = [], []
    for p in prompts:
        row, h = heal_prompt(tokenizer, encode_prompt(tokenizer, p))
        ids.append(row)
        healed.append(h)
    check_stop(tokenizer, settings.stop, "the stop string")  # interactive's :stop, set after the model loaded
    rng = settings.make_rng(gen.device) if rng is None else rng
    streams = [TextStream(tokenizer, settings.stop, p, h) for p, h in zip(prompts, healed)]
    # a healed row's first token gives back the bytes taken from the prompt: it takes one step more, so that
    # max_new_tokens counts the tokens after the prompt (then a model that goes on with the token taken back
    # writes what transformers writes), and the other rows leave out that step's token
    extra = 1 if any(healed) else 0
    first = [bool(extra)]  # the first step of a healed batch: only tokens that begin with the healed bytes
    if settings.utf8_only:  # each row's state in UTF-8's automaton after its prompt (healed: maybe mid-character)
        after = utf8_after(tokenizer).to(gen.device)
        invalid = after == UTF8_INVALID  # (8, V): the tokens each state cannot take
        utf8 = [torch.tensor([utf8_state(tokenizer.decode_bytes(row)) for row in ids], device=gen.device)]

    def sample(logits):
        # a model may have more outputs than its tokenizer has tokens (data.check_vocab allows it); ids
        # without text are never drawn
        logits = logits[:, :tokenizer.vocab_size]
        # a row of NaN or infinite logits (damaged weights, float16 overflow) comes back as id -1, in the
        # transfer of the ids that happens anyway: no extra wait for the GPU
        finite = torch.isfinite(logits).all(dim=-1)
        if settings.temperature > 0:  # torch.multinomial refuses them (on a GPU with a device-side assert)
            logits = torch.where(finite[:, None], logits, 0.0)
        if first[0]:
            first[0] = False
            allowed = torch.ones(logits.shape, dtype=torch.bool)
            for row, h in enumerate(healed):
                if h:
                    allowed[row] = False
                    allowed[row, healing_tokens(tokenizer, tokenizer.decode_bytes(ids[row][-3:]), h)] = True
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        if settings.utf8_only:
            cannot = invalid[utf8[0]]  # (B, V)
            # a row left with no token (a tokenizer without the bytes that finish a character) goes on
            # unmasked: sampling from nothing would fail. Byte-level BPEs have every single byte
            logits = logits.masked_fill(cannot & ~cannot.all(dim=-1, keepdim=True), float("-inf"))
        drawn = sample_logits(logits, settings.temperature, settings.top_k, settings.top_p, rng)
        if settings.utf8_only:
            utf8[0] = after[utf8[0], drawn]
            utf8[0] = torch.where(utf8[0] == UTF8_INVALID, 0, utf8[0])  # (from an unmasked row) starts again
        return torch.where(finite, drawn, -1)

    try:
        with contextlib.closing(gen.decode(ids, settings.max_new_tokens + extra, sample)) as steps:
            for n, step in enumerate(steps, 1 - extra):  # n: the tokens after the prompt so far
                if min(step) < 0:
                    raise GenerationError(f"the model's output became NaN or infinite at new token {max(n, 1)}: "
                                          + ("its weights are damaged, or float16 overflowed (then try --dtype "
                                             "float32 or bfloat16)" if gen.dtype == torch.float16 else
                                             "its weights are damaged"))
                for stream, token, h in zip(streams, step, healed):
                    if h or not (extra and n == settings.max_new_tokens):  # the step more is the healed rows'
                        stream.add(token)  # a finished row keeps being decoded, and ignored
                if on_step is not None and n > 0:
                    on_step()
                if on_text is not None and (piece := streams[0].new_text()):
                    on_text(piece)
                if all(s.done for s in streams):
                    break
    except KeyboardInterrupt:
        # the text held back in case it began the stop string is shown before the interruption goes on
        if on_text is not None and (piece := streams[0].held_back()):
            on_text(piece)
        raise
    for stream in streams:
        stream.finish()
    if on_text is not None and (piece := streams[0].new_text()):
        on_text(piece)
    if on_invalid is not None and any(s.invalid_bytes for s in streams):
        on_invalid()
    return [s.text for s in streams]


def utf8_note(how: str) -> str:
    """The line that says, after a text that showed bytes that are no UTF-8, how to turn utf8_only on."""
    return (f"note: the model wrote bytes that are no UTF-8 (shown as \ufffd): it began a character and did not "
            f"finish it; {how} draws only tokens that keep the text valid")


class Copies(Sequence):
    """`text` n times over, as --num_samples asks: its slices are lists, the whole is never one (1e9 copies
    would be 8 GB of references before the first sample)."""

    def __init__(self, text: str, n: int):
        self.text, self.n = text, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.text] * len(range(*i.indices(self.n)))
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.text


def complete_in_batches(gen: Generator, tokenizer, prompts: Sequence[str], settings: SamplingSettings,
                        batch_size: int, rng: torch.Generator,
                        on_batch: Optional[Callable[[list[str], Progress], None]] = None,
                        on_invalid: Optional[Callable[[], object]] = None) -> list[str]:
    """The continuation of each prompt, batch_size prompts at a time, with a progress bar of the decoding
    steps on stderr: on a terminal after 2 s, elsewhere a line every 30 s (utils.Progress).
    on_batch(prompts + continuations, bar) is called after each batch, and then the texts are not kept
    (the list returned is empty): the caller has them; on_invalid: as complete's."""
    texts, steps = [], settings.max_new_tokens
    n_batches = -(-len(prompts) // batch_size)
    with Progress(total=n_batches * steps, unit="step", desc=f"generating {len(prompts)} samples", delay=2.0,
                  file=sys.stderr) as bar:
        for n in range(1, n_batches + 1):
            chunk = list(prompts[(n - 1) * batch_size:n * batch_size])
            done = [p + c for p, c in zip(chunk, complete(gen, tokenizer, chunk, settings, rng, on_step=bar.update,
                                                          on_invalid=on_invalid))]
            bar.update(n * steps - bar.n)  # the steps that a stop string made unnecessary
            if on_batch is not None:
                on_batch(done, bar)
            else:
                texts += done
    return texts


class _SampleAbandoned(Exception):
    """sample_text's should_stop said to stop."""


def sample_text(model, tokenizer, prompt: str = "", should_stop: Optional[Callable[[], bool]] = None,
                **sampling) -> Optional[str]:
    """prompt + a sampled continuation, from `model` as it is (its device and dtype, eager decoding);
    sampling: SamplingSettings' fields, their defaults where not given.

    For samples during training: the global RNG is not touched (a seeded torch.Generator draws), and the
    model's train/eval mode is restored and its KV cache removed afterwards. should_stop() is asked after
    each token: True abandons the sample (None is returned), so that a Ctrl-C need not wait for hundreds of
    tokens on a CPU.
    """
    settings = SamplingSettings(**sampling).validate()
    raw = getattr(model, "_orig_mod", model)
    was_training = raw.training

    def step() -> None:
        if should_stop is not None and should_stop():
            raise _SampleAbandoned
    try:
        gen = Generator(raw, cuda_graph=False, cpu_layout=False)  # the training step keeps its layout
        return prompt + complete(gen, tokenizer, [prompt], settings, on_step=step)[0]
    except _SampleAbandoned:
        return None
    finally:
        raw.remove_kv_cache()
        raw.train(was_training)


# ---------------------------------------------------------------------------- loading


def load_model(checkpoint: Optional[str] = None, init_from: Optional[str] = None,
               checkpoint_dir: str = "checkpoints"):
    """(model in float32 on the CPU, tokenizer, source path or name); stderr says which was used.

    checkpoint: a checkpoint file (or a directory searched like checkpoint_dir); init_from: 'gpt2',
    'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a Hugging Face GPT-2 directory; neither: the first of
    CHECKPOINT_FALLBACK in checkpoint_dir.
    """
    if checkpoint and init_from:
        raise GenerationError(f"give either --checkpoint ({checkpoint}) or --init_from ({init_from}), not both")
    if init_from:
        return _load_pretrained(init_from)
    path = Path(checkpoint) if checkpoint else Path(checkpoint_dir)
    searched = not checkpoint or path.is_dir()
    if searched:
        path = find_checkpoint(path)
    ckpt = load_checkpoint(path)
    tokenizer = _checkpoint_tokenizer(ckpt, path)  # first: it says when a file is not this project's at all
    model = model_from_checkpoint(ckpt, path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; the checkpoint mixes two runs")
    skipped = CHECKPOINT_FALLBACK[:CHECKPOINT_FALLBACK.index(path.name)] if searched else ()
    note = f" ({', '.join(skipped)} not found)" if skipped else ""
    loss = ckpt.get("best_val_loss")
    stats = f", step {ckpt.get('iter_num', '?')}" + (f", best val loss {loss:.4f}" if isinstance(loss, float)
                                                     and math.isfinite(loss) else "")
    print(f"using checkpoint {path}{note}{stats}, {tokenizer.kind} tokenizer", file=sys.stderr)
    return model, tokenizer, str(path)


def _checkpoint_tokenizer(ckpt: dict, path: Path):
    from tokenizer import tokenizer_from_dict
    d = ckpt.get("tokenizer")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds no tokenizer (key 'tokenizer'), so its prompts cannot be encoded "
                              "as its training data was; it was not written by this project's train.py. "
                              "Train a new checkpoint with `python train.py --preset=shakespeare-char-cpu`")
    return tokenizer_from_dict(d)


def _load_pretrained(name: str):
    from model import GPT, TOOLKIT_TOKENIZER, exported_tokenizer_file, is_model_folder
    from tokenizer import GPT2_VOCAB_SIZE, BPETokenizer, GPT2FilesError, GPT2Tokenizer, TokenizerError, load_tokenizer
    model = GPT.from_pretrained(name)
    folder = Path(name) if is_model_folder(name) else None
    tok_file = exported_tokenizer_file(folder) if folder is not None else None
    # offline without tiktoken's cache, a Hub folder (and our export of a GPT-2 model) holds GPT-2's BPE itself
    vocab_files = [folder / n for n in ("vocab.json", "merges.txt")] if folder is not None else []

    def folders_gpt2(error: GPT2FilesError):
        if not vocab_files or not all(f.is_file() for f in vocab_files):
            raise error
        print(f"note: tiktoken's 'gpt2' files are not here; encoding with {name}'s vocab.json and merges.txt, "
              f"which give the same ids", file=sys.stderr)
        return BPETokenizer.from_gpt2(*vocab_files)

    tokenizer = None
    if tok_file is not None:
        try:
            tokenizer = load_tokenizer(tok_file)
        except GPT2FilesError as e:  # the toolkit's file says gpt2: its model may be padded beyond 50257
            tokenizer = folders_gpt2(e)
        except TokenizerError:
            if tok_file.name == TOOLKIT_TOKENIZER:  # ours, and damaged
                raise
            # transformers' own tokenizer.json: a standard GPT-2 vocabulary is GPT-2's BPE, others are named below
    if tokenizer is None:
        if model.config.vocab_size != GPT2_VOCAB_SIZE:
            raise CheckpointError(f"{name} has vocab_size {model.config.vocab_size}, not GPT-2's {GPT2_VOCAB_SIZE}, "
                                  f"and no {TOOLKIT_TOKENIZER} of this project beside it; export it with "
                                  "model.save_pretrained(directory, tokenizer) so its tokenizer travels along")
        try:
            tokenizer = GPT2Tokenizer()
        except GPT2FilesError as e:
            tokenizer = folders_gpt2(e)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{tok_file}: its tokenizer has {tokenizer.vocab_size} tokens but the model in {name} "
                              f"only {model.config.vocab_size}; the folder mixes two exports. Export the model again "
                              f"with model.save_pretrained(directory, tokenizer)")
    print(f"using {'Hugging Face directory' if is_model_folder(name) else 'pretrained weights'} {name}, "
          f"{tokenizer.kind} tokenizer", file=sys.stderr)
    return model, tokenizer, name


# ---------------------------------------------------------------------------- batches, benchmark


def batch_generate(prompts: list[str], output_file: Optional[str], checkpoint: Optional[str] = None,
                   init_from: Optional[str] = None, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                   checkpoint_dir: str = "checkpoints", compile: bool = False, **sampling) -> list[str]:
    """Generate for every prompt, batch_size prompts at a time; return prompt + continuation for each.

    sampling: the SamplingSettings fields (max_new_tokens, temperature, top_k, top_p, seed, stop, utf8_only).
    output_file receives each prompt and its text, written atomically once all are done; None writes nothing. It
    has no default: a default name would replace a file of that name in the working directory of a caller who
    only wanted the returned texts. Stopped (Ctrl-C) or failed part-way, the batches already done go to
    output_file + '.partial', and output_file, which may hold a finished earlier run's, is left as it was.
    """
    given = prompts
    if hasattr(prompts, "readline") and not isinstance(prompts, (str, list)):
        # an open text file of any kind (open, tempfile, codecs.open): its lines, each without its line end;
        # the lines of a file opened in binary mode are bytes, which the check below refuses
        prompts = [line.removesuffix("\n").removesuffix("\r") if isinstance(line, str) else line for line in prompts]
        if prompts and isinstance(prompts[0], str):  # the byte-order mark Windows Notepad writes is no text
            prompts[0] = prompts[0].removeprefix("\ufeff")
    elif not isinstance(prompts, str):  # any iterable of strings (a generator, a tuple) is read once
        with contextlib.suppress(TypeError):
            prompts = list(prompts)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise GenerationError(f"prompts must be a non-empty list of strings, got {type(given).__name__} "
                              f"{str(given)[:60]!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:  # True is an int too
        raise GenerationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    settings = SamplingSettings.from_kwargs(**sampling)
    problem = output_file_problem(output_file) if output_file is not None else None
    if problem:  # found out now, not after the generation
        hint = (f"give a file name, e.g. {str(Path(output_file) / 'samples.txt')!r}" if problem == "is a directory"
                else "give a path you can write to")
        raise GenerationError(f"output_file {str(output_file)!r} {problem}; {hint}")
    n = len(prompts)
    for i, p in enumerate(prompts, 1):  # a lone surrogate (os.fsdecode, surrogateescape) could not be written
        check_utf8(p, f"prompt {i} of {n}")
    check_utf8(settings.stop, "stop")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)  # a typo is said before a model of gigabytes loads
    if warning := dtype_warning(device, dtype):
        print(warning, file=sys.stderr)
    model, tokenizer, _ = load_model(checkpoint, init_from, checkpoint_dir)
    for i, p in enumerate(prompts, 1):  # a prompt the tokenizer cannot encode fails before any generation
        try:
            encode_prompt(tokenizer, p)
        except UserError as e:
            raise GenerationError(f"prompt {i} of {n}: {e}") from None
    check_stop(tokenizer, settings.stop, "stop")
    gen = Generator(model, device, dtype, compile=compile)
    rng = settings.make_rng(gen.device)
    texts: list[str] = []
    try:
        complete_in_batches(gen, tokenizer, prompts, settings, batch_size, rng,
                            on_batch=lambda done, bar: texts.extend(done))
    except BaseException:
        if output_file is not None and texts and not writes_directly(Path(output_file)):
            partial = f"{output_file}.partial"
            try:
                write_samples(partial, prompts, texts)
            except OSError as e:
                print(f"the {len(texts)} samples done could not be kept in {partial}: {e.strerror or e}",
                      file=sys.stderr)
            else:
                print(f"stopped after {len(texts)} of {n} samples: those are in {partial}; {output_file} was not "
                      f"written", file=sys.stderr)
        raise
    if output_file is not None:
        try:
            write_samples(output_file, prompts, texts)
        except OSError as e:  # a full disk, or a path that passed the check above and still cannot be made
            raise GenerationError(f"cannot write output_file {str(output_file)!r}: {e.strerror or e}") from None
        print(f"wrote {len(texts)} samples to {output_file}", file=sys.stderr)
    return texts


def write_samples(path: str | Path, prompts: list[str], texts: list[str]) -> None:
    """batch_generate's file, atomically: for each text, a header that counts it among all the prompts, its
    prompt, a separator, and prompt + continuation; fewer texts than prompts where it was stopped part-way."""
    with atomic_open(path, "w") as f:
        for i, (prompt, text) in enumerate(zip(prompts, texts), 1):
            f.write(f"==================== prompt {i} of {len(prompts)} ====================\n")
            f.write(f"{prompt}\n")
            f.write("-------------------- sample --------------------\n")
            f.write(f"{text}\n\n")


def benchmark_generation(model, batch_size: int = 1, prompt_len: int = 16, new_tokens: int = 200, device="auto",
                         dtype="auto", reference_hf: bool = False, compile: bool = False, cuda_graph: bool = True,
                         repeats: int = 2, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Greedy decoding speed of `model` (moved and cast in place) on random prompts.

    Returns {"tokens_per_sec": generated tokens per second over the whole batch, prefill included,
    "hf_tokens_per_sec": the same for transformers' GPT2LMHeadModel.generate with the same weights
    (exported with model.save_pretrained), or None unless reference_hf, "device": str, "dtype": str}.
    After an untimed warm-up, the two are timed `repeats` times, taking turns, and the best run of
    each is reported, so that a busy machine slows both alike. progress, if given, hears of each run as it ends.
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_dtype(dtype, device)
    model = getattr(model, "_orig_mod", model)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len),
                            generator=torch.Generator().manual_seed(0))
    runners = {}
    if reference_hf:
        from transformers import GPT2LMHeadModel
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)  # before the Generator below casts the model
            hf = GPT2LMHeadModel.from_pretrained(tmp).to(device=device, dtype=dtype).eval()
        x = prompts.to(device)

        @torch.no_grad()
        def run_hf(n):
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)

        runners["hf_tokens_per_sec"] = run_hf
    gen = Generator(model, device, dtype, compile=compile, cuda_graph=cuda_graph)
    rows = prompts.tolist()

    def run_ours(n):
        for _ in gen.decode(rows, n, lambda logits: logits.argmax(dim=-1)):
            pass

    runners["tokens_per_sec"] = run_ours
    best = {"tokens_per_sec": 0.0, "hf_tokens_per_sec": None if not reference_hf else 0.0}
    names = {"tokens_per_sec": "this project", "hf_tokens_per_sec": "transformers"}
    for key, run in runners.items():
        run(min(new_tokens, 8))  # warm-up: allocations, kernels, compilation, graph capture
        if progress:
            progress(f"{names[key]} warmed up")
    for i in range(max(1, repeats)):
        for key, run in runners.items():
            synchronize(device)
            t0 = time.perf_counter()
            run(new_tokens)
            synchronize(device)
            rate = batch_size * new_tokens / (time.perf_counter() - t0)
            best[key] = max(best[key], rate)
            if progress:
                progress(f"run {i + 1}/{max(1, repeats)}, {names[key]}: {rate:,.1f} tokens/s")
    return {**best, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------------------- interactive


# the key that ends input at a terminal
EOF_KEYS = "Ctrl-Z then Enter" if sys.platform == "win32" else "Ctrl-D"
INTERACTIVE_HELP = f"""\
Type a prompt and press Enter to continue it. Commands, between prompts:
  :temperature X     0 is greedy argmax decoding
  :top_k N           sample among the N most likely tokens; 0 or none disables
  :top_p X           nucleus sampling, in (0, 1]; 1 disables
  :max_new_tokens N  length of each continuation
  :seed N            fixed seed: the same prompt gives the same text; 'none' draws fresh ones
  :stop STRING       end the text where STRING appears, spaces included (\\n is a newline); 'none' disables
  :utf8_only on|off  draw only tokens that keep the text valid UTF-8 (no U+FFFD from half characters)
  :settings          show the current settings
  :help              this list
  :quit              exit ({EOF_KEYS} does too)
The full-width colon and space (：and U+3000) work as well.
Ctrl-C stops the text being generated and returns to the prompt.
"""


def _optional(parse):
    return lambda text: None if text.lower() in ("none", "off") else parse(text)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise ValueError("give on or off")
    return text.lower() == "on"


SETTING_PARSERS = {"max_new_tokens": int, "temperature": float, "top_k": _optional(int), "top_p": float,
                   "seed": _optional(int), "stop": _optional(_unescape), "utf8_only": _on_off}


def _run_command(line: str, settings: SamplingSettings, out, tokenizer=None) -> bool:
    """Apply one ':name value' command to settings; False means quit. With the tokenizer, a stop string it
    cannot write is refused here, as --stop is, rather than at every prompt after it."""
    # the name ends at a space or at U+3000, the full-width space that a Chinese input method types
    name, value = re.match(r"(\S*)\s?(.*)", line[1:].lstrip(), re.DOTALL).groups()
    # a stop string may begin or end with spaces (or U+3000); 'none' turns it off
    if name != "stop" or value.strip().lower() in ("none", "off"):
        value = value.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name in ("help", "h", "?"):
        out.write(INTERACTIVE_HELP)
    elif name == "settings":
        out.write("".join(f"  {k} = {v!r}\n" for k, v in dataclasses.asdict(settings).items()))
    elif name in SETTING_PARSERS:
        try:
            new = dataclasses.replace(settings, **{name: SETTING_PARSERS[name](value)}).validate()
            if name == "stop" and tokenizer is not None:
                check_stop(tokenizer, new.stop, "the stop string")
        except (ValueError, UserError) as e:  # GenerationError is a ValueError too
            out.write(f"error: cannot set {name} to {value!r}: {e}\n")
        else:
            setattr(settings, name, getattr(new, name))
            out.write(f"{name} = {getattr(settings, name)!r}\n")
    else:
        commands = list(SETTING_PARSERS) + ["settings", "help", "quit"]
        out.write(f"unknown command :{name}{suggest(name, commands)}; :help lists the commands\n")
    return True


def interactive(gen: Generator, tokenizer, settings: SamplingSettings, stdin=None, stdout=None) -> None:
    """Prompt loop: each line is continued and streamed; ':' lines are commands (INTERACTIVE_HELP).

    stdin/stdout default to the terminal (input() with line editing); pass file objects to script it.
    """
    out = sys.stdout if stdout is None else stdout
    if stdin is None:
        try:
            import readline  # noqa: F401  (input() then edits the line and keeps a history)
        except ImportError:  # not on every platform
            pass
        if hasattr(sys.stdin, "reconfigure"):
            # bytes that are not UTF-8 (a terminal set to GBK) arrive as lone surrogates, which check_utf8
            # names, instead of an error that takes the rest of the buffered input with it
            sys.stdin.reconfigure(errors="surrogateescape")
    print(f"interactive mode: type a prompt and press Enter; :help lists the commands, {EOF_KEYS} exits",
          file=sys.stderr)

    def write(piece):
        out.write(piece)
        out.flush()

    noted = False  # utf8_note, said once a session
    while True:
        try:
            if stdin is None:
                line = input("> ").rstrip("\r")  # piped text with \r\n line ends, as below
            else:
                write("> ")
                line = stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\r\n")  # a piped file may end its lines with \r\n
            line = line.removeprefix("\ufeff")  # a piped file's byte-order mark is no text
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            write("\n")
            continue
        except UnicodeDecodeError as e:  # a terminal in another encoding: say so, and read on
            write(f"error: that line is not valid UTF-8 (byte {e.object[e.start]:#04x}); is the terminal set to "
                  f"another encoding, such as GBK? Switch it to UTF-8\n")
            continue
        try:  # the same, where the bad bytes arrive as lone surrogates (Python's C or POSIX locale)
            check_utf8(line, "that line")
        except GenerationError as e:
            write(f"error: {e}\n")
            continue
        if "\0" in line:  # UTF-16 text read as UTF-8: every other byte of a Latin letter is a NUL
            write("error: that line holds NUL characters: is the input UTF-16 (what Windows Notepad calls "
                  "'Unicode')? Convert it with iconv -f utf-16 -t utf-8\n")
            continue
        if line[:1] in (":", "\uff1a"):  # also the full-width colon of a Chinese input method
            if not _run_command(line, settings, out, tokenizer):
                return
            continue
        streamed, invalid = [], []

        def stream(piece):
            streamed.append(piece)
            write(piece)
        try:
            complete(gen, tokenizer, [line], settings, on_text=stream, on_invalid=lambda: invalid.append(True))
            write("\n")
            if invalid and not noted:
                noted = True
                write(utf8_note(":utf8_only on") + "\n")
        except KeyboardInterrupt:
            write("\n[stopped]\n")
        except EmptyPromptError as e:  # its --prompt example is an option of the command line, refused here
            write(f"error: an empty line has nothing to start from: this tokenizer has neither an end-of-text "
                  f"token nor a newline; type characters it knows, e.g. {e.example}\n")
        except UserError as e:  # e.g. characters a character-level tokenizer does not know
            # on a line of its own, not glued to the text streamed before a failure (a non-finite output)
            write(f"{chr(10) if any(streamed) else ''}error: {e}\n")


# ---------------------------------------------------------------------------- command line


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Sample text from a GPT-2 checkpoint or OpenAI's GPT-2 weights.",
                       formatter_class=HelpFormatter)
    src = p.add_argument_group("model")
    # paths: ~ is expanded here too, as train.py does, for --checkpoint_dir=~/runs (which no shell expands)
    src.add_argument("--checkpoint", type=path_arg,
                     help=f"checkpoint file; default: the first of {', '.join(CHECKPOINT_FALLBACK)} in "
                          "--checkpoint_dir")
    src.add_argument("--checkpoint_dir", type=path_arg, default="checkpoints",
                     help="where to look when --checkpoint is not given")
    src.add_argument("--init_from", type=path_arg,
                     help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 directory")
    s = p.add_argument_group("sampling")
    d = SamplingSettings()
    s.add_argument("--prompt", help="text to continue, as typed (\\n stays a backslash and an n: for a line end use "
                                    "bash's $'...' or --prompt_file); empty (the default) starts from end-of-text (or "
                                    "a newline)")
    s.add_argument("--prompt_file", type=path_arg, help="read the prompt from this UTF-8 file instead")
    s.add_argument("--num_samples", type=int, default=1, help="continuations of the prompt")
    s.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="tokens per continuation")
    s.add_argument("--temperature", type=float, default=d.temperature, help="0 means greedy argmax decoding")
    s.add_argument("--top_k", type=int, default=d.top_k, help="sample among the k most likely tokens; 0 disables")
    s.add_argument("--top_p", type=float, default=d.top_p, help="nucleus sampling threshold in (0, 1]; 1 disables")
    s.add_argument("--seed", type=int, default=None,
                   help="the same seed gives the same text (with the same --num_samples and --batch_size); unset "
                        "draws a random one")
    s.add_argument("--stop", default=None, help="end each text where this string appears (\\n is a newline)")
    s.add_argument("--utf8_only", action="store_true",
                   help="draw only tokens that keep the text valid UTF-8: a byte-level model (bpe, gpt2) can begin "
                        "a character and not finish it, shown as U+FFFD")
    s.add_argument("--interactive", action="store_true", help="prompt loop with streaming output; :help inside")
    sys_ = p.add_argument_group("system")
    sys_.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sys_.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                      help="auto: bfloat16 on CUDA GPUs from Ampere on, float16 on older ones, float32 elsewhere")
    sys_.add_argument("--compile", action="store_true",
                      help="torch.compile the decoding step (faster on CUDA, slower than eager on a CPU)")
    sys_.add_argument("--no_cuda_graph", action="store_true", help="decode eagerly on CUDA (slower)")
    sys_.add_argument("--batch_size", type=int, default=None,
                      help="samples generated at once for --num_samples (default 8)")
    sys_.add_argument("--window", type=int, default=None,
                      help="tokens of context kept when the text outgrows block_size (default block_size // 2)")
    return p


def check_utf8(text: Optional[str], what: str) -> None:
    """Bytes that are not UTF-8 reach sys.argv as lone surrogates (U+DC80 + byte): refuse them in one line."""
    bad = next((c for c in text or "" if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        byte = f"byte {ord(bad) - 0xDC00:#04x}" if "\udc80" <= bad <= "\udcff" else repr(bad)
        raise GenerationError(f"{what} is not valid UTF-8 ({byte}): the terminal or the text is in another "
                              f"encoding, such as GBK; switch the terminal to UTF-8, or convert the text with "
                              f"iconv -f gbk -t utf-8")


def main(argv: Optional[list[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed,
                                stop=None if args.stop is None else _unescape(args.stop),
                                utf8_only=args.utf8_only).validate()
    for name in ("num_samples", "batch_size", "window"):  # before the model loads (its block_size bounds --window)
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GenerationError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_samples > sys.maxsize:  # a count Python's len() can give, for the batches' sequence
        raise GenerationError(f"--num_samples must be at most {sys.maxsize:,}, got {args.num_samples:,}")
    if args.prompt is not None and args.prompt_file:
        raise GenerationError("give --prompt or --prompt_file, not both")
    prompt = args.prompt or ""
    if "\\n" in prompt:  # --stop reads \n as a line end; a prompt is the text as typed, which may be code
        print("note: --prompt is taken as typed, so its \\n is a backslash and an n, not a line end (--stop is the "
              "option that reads \\n as one); for a line end use bash's $'...' quotes or --prompt_file",
              file=sys.stderr)
    if args.prompt_file:
        try:  # without a byte-order mark; \r\n and \r become \n, which a model trained on any text knows
            prompt = read_utf8_file(args.prompt_file, f"--prompt_file {args.prompt_file}", GenerationError)
        except OSError as e:
            raise GenerationError(f"cannot read --prompt_file {args.prompt_file}: {e.strerror or e}") from None
        prompt = prompt.replace("\r\n", "\n").replace("\r", "\n")
        if "\0" in prompt:  # UTF-16 without a byte-order mark reads as UTF-8, a NUL after each Latin letter
            raise GenerationError(f"--prompt_file {args.prompt_file} holds NUL characters: is it UTF-16 (what Windows "
                                  f"Notepad calls 'Unicode')? Convert it with iconv -f utf-16 -t utf-8")
    if args.interactive and (args.prompt is not None or args.prompt_file or args.num_samples != 1
                             or args.batch_size is not None):
        raise GenerationError("--prompt, --prompt_file, --num_samples and --batch_size do not apply to --interactive, "
                              "which reads its prompts from the terminal one at a time; leave them out, or leave out "
                              "--interactive")
    batch_size = args.batch_size or 8
    check_utf8(prompt, "--prompt")
    check_utf8(settings.stop, "--stop")
    # a console in another encoding (GBK, say) still gets the text, with what it cannot show replaced
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if warning := dtype_warning(device, dtype):
        print(warning, file=sys.stderr)
    model, tokenizer, _ = load_model(args.checkpoint, args.init_from, args.checkpoint_dir)
    gen = Generator(model, device, dtype, compile=args.compile, cuda_graph=not args.no_cuda_graph,
                    window=args.window)
    check_stop(tokenizer, settings.stop, "--stop")
    if args.interactive:
        interactive(gen, tokenizer, settings)
        return
    try:
        encode_prompt(tokenizer, prompt)  # an unknown character fails before anything is printed
    except UserError:
        text = prompt.rstrip("\n")  # the line break an editor ends a file with, where the text has no other
        if args.prompt_file and text != prompt and "\n" not in text and _encodes(tokenizer, text):
            raise GenerationError(f"--prompt_file {args.prompt_file} ends with a line break, which this tokenizer "
                                  f"has never seen (its training text had none); remove it, e.g. "
                                  f"printf '%s' \"$(cat FILE)\" > FILE") from None
        raise
    out = sys.stdout
    if args.num_samples == 1:  # stream it
        out.write(prompt)
        streamed = [prompt]

        def stream(piece):
            streamed.append(piece)
            out.write(piece)
            out.flush()
        invalid = []
        try:
            complete(gen, tokenizer, [prompt], settings, on_text=stream, on_invalid=lambda: invalid.append(True))
        except (UserError, KeyboardInterrupt, MemoryError, RuntimeError):  # out of memory too
            # run_cli's line on a line of its own, not after the text streamed so far
            if any(streamed):
                with contextlib.suppress(OSError, ValueError):  # a stdout that failed itself takes no line end
                    out.write("\n")
                    out.flush()
            raise
        out.write("\n")
    else:
        rng, invalid = settings.make_rng(gen.device), []
        complete_in_batches(gen, tokenizer, Copies(prompt, args.num_samples), settings, batch_size, rng,
                            on_batch=lambda texts, bar: bar.print_above(
                                "".join(f"{t}\n---------------\n" for t in texts), out),
                            on_invalid=lambda: invalid.append(True))
    if invalid:  # after the text's last line
        print(utf8_note("--utf8_only"), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main, output_on_stdout=True)
