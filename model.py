"""GPT-2 in plain PyTorch: the model, its KV cache, and OpenAI's weights in and out.

    from config import GPT2Config
    from model import GPT
    model = GPT(GPT2Config(n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(idx, targets)             # idx, targets: (B, T) int64
    model = GPT.from_pretrained("gpt2")            # or a Hugging Face-format GPT-2 directory
    model.save_pretrained("out/")                  # transformers.GPT2LMHeadModel.from_pretrained("out/")

References: OpenAI's GPT-2 (tf code and paper) for the architecture and the parameter names, and the
Hugging Face GPT2LMHeadModel for the checkpoint format. Module names follow GPT-2 one to one
(transformer.wte/wpe/h/ln_f, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, lm_head),
so importing OpenAI weights needs no renaming: the four Conv1D matrices are transposed, and wte fills
the first vocab_size rows of the padded embedding.
"""
import json
import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from config import GPT2_CONFIGS, GPT2Config
from tokenizer import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE
from utils import UserError, load_weights_only, utf8_text


class CheckpointFormatError(UserError, ValueError):
    """A file or directory that is not the GPT-2 checkpoint it was supposed to be."""


# OpenAI's four GPT-2 sizes on the Hugging Face hub (openai-community/NAME)
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# the weights GPT-2 stores as Conv1D, (in, out): transposed to and from nn.Linear's (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the config.json fields that fix GPT-2's shape
HF_SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")


# ----------------------------------------------------------------------------- float8 matmuls (opt-in)
# With config.fp8 the four Linear layers of every block multiply in float8 while training: e4m3 (more
# precision) for activations and weights, e5m2 (more range) for the gradients, each tensor scaled by its
# own largest magnitude so that nothing overflows. lm_head, the embeddings, attention and the layer norms
# keep their precision. GPUs of compute capability 8.9+ (Ada, Hopper and newer) multiply float8 at twice
# the bf16 rate; the scaling and casting are extra elementwise work that torch.compile fuses.

def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * scale cast to dtype, 1 / scale), scale putting x's largest magnitude at dtype's largest value.

    The scale stays on the device (no host synchronisation); the clamp keeps rounding at the top of the
    range from turning into NaN, which is what float8_e4m3fn has in place of infinity.
    """
    fmax = torch.finfo(dtype).max
    scale = fmax / x.detach().abs().amax().float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


class _Float8Matmul(torch.autograd.Function):
    """x @ weight.T for 2-D x, in float8; the backward pass multiplies in float8 too.

    torch._scaled_mm takes its first operand row-major and its second column-major (on CUDA it insists),
    so each product below hands it exactly those layouts.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = to_float8(x, torch.float8_e4m3fn)
        w8, w_inv = to_float8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)  # float8 copies: half the memory of bf16 activations
        ctx.dtypes = x.dtype, weight.dtype
        # w8 is (out, in) row-major, so w8.t() is the column-major (in, out) operand
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = to_float8(grad.contiguous(), torch.float8_e5m2)
        # grad_x (M, in) = grad (M, out) @ W (out, in), W column-major
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_inv, scale_b=w_inv, out_dtype=x_dtype)
        # grad_W (out, in) = grad.T (out, M) @ x (M, in), grad.T row-major and x column-major
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=w_dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """nn.Linear that multiplies in float8 while training (model.train() with gradients on).

    Evaluation and generation multiply the weights as they are, and the parameters and state_dict are
    nn.Linear's, so a checkpoint does not depend on the setting.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        device_type = x.device.type
        # the dtype nn.Linear would return: autocast's where it is on
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        y = _Float8Matmul.apply(x.reshape(-1, self.in_features), self.weight, out_dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(out_dtype) if self.bias is not None else y


def fp8_problem(device: torch.device) -> Optional[str]:
    """Why float8 training cannot run on `device`, or None. CPUs run it too (slowly): that is how it is tested."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"fp8 needs a GPU of compute capability 8.9 or newer (H100, H200, L40, RTX 4090, ...); "
                    f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
        return None
    return None if device.type == "cpu" else f"fp8 runs on CUDA GPUs and CPUs, not on {device.type}"


# ------------------------------------------------------------- the loss in chunks (the GPT-2 presets' default)
# With config.loss_chunk_rows = R > 0 the output matmul and the cross-entropy run R rows (tokens) at a time,
# and the forward pass computes their gradients too, chunk by chunk. The plain loss keeps all B*T rows of
# logits for the backward pass, B*T x padded vocab, plus float32 copies while it runs: for GPT-2 at 16 x 1024
# tokens, 1.6 GB of bf16 logits and several GB more for the copies in eager mode. Here only one chunk's logits
# exist at a time; the backward pass scales the two gradients kept from the forward pass, x's (B*T x n_embd)
# and the output weight's (padded vocab x n_embd, float32). The matmuls are the same in number and size.

def _rows_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, grad: bool):
    """The summed cross-entropy of one chunk's rows whose target is not -1 (float32), and, if grad, its
    gradient with respect to the logits: softmax - one_hot(target), zero on the ignored rows.

    logits is the chunk's matmul output, which nothing else holds: it may be changed in place.
    """
    z = logits.float()
    if z.size(-1) > vocab_size:  # the padding columns: exp(-inf) is exactly 0, as in the plain loss
        z[:, vocab_size:] = float("-inf")
    # logsumexp, not softmax's pattern written out: inductor's online softmax for that pattern made this kernel
    # slower on an H200 (2.09 against 1.93 ms for GPT-2's 16,384 x 50,304 logits; BENCHMARKS.md)
    lse = torch.logsumexp(z, dim=-1)  # (R,)
    valid = targets != -1
    safe = torch.where(valid, targets, 0)  # an ignored row's -1 is no column to gather; other ids stay (checked)
    loss_sum = torch.where(valid, lse - z.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
    if not grad:
        return loss_sum, None
    lse = torch.where(valid, lse, float("inf"))[:, None]  # an ignored row: exp(z - inf) = 0 all along
    if torch.compiler.is_compiling():
        # one elementwise pass that inductor fuses with the reduction: the one-hot as a comparison with the
        # column index, not a scatter, which would make it write the float32 probabilities and read them again
        cols = torch.arange(z.size(-1), device=z.device)
        p = torch.exp(z - lse)
        return loss_sum, torch.where(cols[None, :] == targets[:, None], p - 1.0, p)
    # eager, op by op: in place, so that no op makes another tensor of the chunk's size
    p = z.sub_(lse).exp_()
    return loss_sum, p.scatter_add_(1, safe[:, None], -valid[:, None].to(p.dtype))


class _ChunkedHeadLoss(torch.autograd.Function):
    """mean cross-entropy of (x @ weight.T) against targets, R rows at a time; gradients made in forward().

    x (N, C) is already in the matmul dtype; weight is the parameter (float32 under autocast). The gradients
    are kept unnormalised (|softmax - one_hot| <= 1) and divided by the number of counted rows in backward(),
    together with the incoming gradient: a float16 run's loss scale then applies to them as it would to the
    plain loss's, and nothing underflows on the way.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, rows: int):
        dtype = x.dtype
        w = weight.to(dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_xs = []
        with torch.autocast(x.device.type, enabled=False):  # the dtypes here are chosen, not autocast's
            for i in range(0, x.size(0), rows):
                xc = x[i:i + rows]
                loss_c, g32 = _rows_loss(xc @ w.t(), targets[i:i + rows], vocab_size, grad=True)
                loss_sum = loss_sum + loss_c
                g = g32.to(dtype)
                grad_xs.append(g @ w)
                if dtype == torch.bfloat16:  # its matmul at full speed, the chunks' sum in float32
                    grad_w += (g.t() @ xc).float()
                else:  # float32 in place; float16 sums R products per element, too many for its range
                    grad_w.addmm_(g32.t(), xc.float())
        n = (targets != -1).sum()
        ctx.save_for_backward(torch.cat(grad_xs), grad_w, n)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n  # no counted row: 0 / 0 = nan, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, n = ctx.saved_tensors
        scale = grad_loss.float() / n.clamp(min=1)  # no counted row: zero gradients, as the plain loss gives
        return (grad_x * scale).to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def chunked_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                 rows: int) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T over the first vocab_size columns, targets, ignore_index=-1), computed
    `rows` rows at a time; x (N, C), targets (N,). The matmul runs in autocast's dtype where it is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(x, weight, targets, vocab_size, rows)
    w = weight.to(x.dtype)
    with torch.autocast(device_type, enabled=False):
        loss_sum = sum(_rows_loss(x[i:i + rows] @ w.t(), targets[i:i + rows], vocab_size, grad=False)[0]
                       for i in range(0, x.size(0), rows))
    return loss_sum / (targets != -1).sum()


class KVCache(nn.Module):
    """Static, preallocated keys and values of one attention layer: (B, nh, max_seq_len, hs) each.

    The buffers never change shape or address, and writes go through index_copy_ at positions held
    in a tensor, so one decoding step can be captured in a CUDA graph and replayed.
    """

    def __init__(self, batch_size: int, n_head: int, max_seq_len: int, head_size: int,
                 device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)
        # zeros, not empty: slots that are masked out still enter the attention matmul, and
        # 0 * NaN from uninitialised memory would poison the output
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) at slots cache_pos (T,); return the whole cache."""
        # under autocast k and v come out of the projection in the autocast dtype, not the cache's
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value projections for all heads in one matmul, as GPT-2 stores them
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cache_pos=None, attn_mask=None, kv_len=None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache_pos is None:
            # training and plain evaluation: torch's fused causal attention, which picks its kernel (cuDNN or flash
            # on recent GPUs; attention_kernel() says which), causal mask built in
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            # incremental decoding: attend over the cache; the mask hides future slots and left padding
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nh, max_seq_len, hs)
            if kv_len is not None:  # eager decoding may skip the unused tail of the cache
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation ('gelu_new')
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache_pos=None, attn_mask=None, kv_len=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache_pos, attn_mask, kv_len)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        config.validate()
        self.config = config
        V = config.padded_vocab_size  # rows beyond vocab_size exist only to make matmuls faster
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # weight tying, as in GPT-2: the output projection is the token embedding
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them
        # to the residual stream, and this keeps its variance from growing with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_fp8(config.fp8)
        self._regions = None  # (embed, blocks, head) once compile_regions() has compiled them
        # forward() checks the token ids against the vocabulary, which waits for the GPU; train.py turns
        # it off, since its BatchLoader checks the data's ids on the CPU before the GPU sees any, and so
        # does compile_regions(), whose regions the wait would hold up at every step
        self.check_ids = True

    def set_fp8(self, on: bool) -> None:
        """Let the blocks' four Linear layers multiply in float8 while training (Float8Linear), or not.

        Only the class of those modules changes: parameters, state_dict and evaluation stay the same.
        """
        for block in self.transformer.h:
            for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                layer.__class__ = Float8Linear if on else nn.Linear
        self.config.fp8 = on

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied embedding once and leaving the padding rows out.

        non_embedding=True also leaves out the position embeddings (the convention for FLOP counts:
        the token embedding stays in because it is also the output matmul).
        """
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------ forward passes

    def _check_input(self, idx: torch.Tensor, ids: bool = True, targets: Optional[torch.Tensor] = None) -> None:
        # the embedding takes int64 and int32 ids only: uint16 ids, as a memmapped .bin holds them, need .long()
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of integer token ids (torch.long or torch.int32), got "
                             f"shape {tuple(idx.shape)} and dtype {idx.dtype}; a single sequence is idx[None], "
                             f"and idx.long() converts other integer types")
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the model's block_size "
                             f"{self.config.block_size}; crop it to the last {self.config.block_size} tokens")
        # An out-of-range id would otherwise surface as an opaque device-side assert on CUDA. The
        # check reads a value back to the host, so it is skipped while compiling (the data pipeline
        # has already checked the data's vocabulary), while a CUDA graph is being captured, and when the
        # caller says so (ids=False: check_ids is off).
        if not ids or torch.compiler.is_compiling() or (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            bad = idx[(idx < 0) | (idx >= self.config.vocab_size)][:5].tolist()
            raise ValueError(f"token ids {bad} are outside the vocabulary [0, {self.config.vocab_size}); "
                             "was the data prepared with a different tokenizer than this model's?")
        # a target among the padding columns would meet -inf there and give an infinite loss, not an error
        if targets is not None and targets.numel() and (int(targets.min()) < -1
                                                        or int(targets.max()) >= self.config.vocab_size):
            bad = targets[(targets < -1) | (targets >= self.config.vocab_size)][:5].tolist()
            raise ValueError(f"targets {bad} are outside the vocabulary [0, {self.config.vocab_size}) "
                             "(-1 marks a position the loss ignores)")

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """idx (B, T) token ids -> logits (B, T, vocab_size), and the mean cross-entropy if targets given.

        Targets equal to -1 are ignored by the loss. The padding columns of the output matmul are cut from
        the logits returned, so they are never sampled; the loss runs over the padded row with them at -inf
        (their exp is 0), which gives the same loss and gradients as the vocab_size columns alone.
        With config.loss_chunk_rows > 0 and targets given, the logits are None: the loss is computed a
        chunk of rows at a time (chunked_loss) and the whole logits are never made.
        """
        self._check_input(idx, ids=self.check_ids, targets=targets)
        embed, blocks, head = self._regions or (self._embed, self.transformer.h, self._head)
        x = embed(idx)  # (B, T, C)
        for block in blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; recompute its activations during backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return head(x, targets)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def _head(self, x: torch.Tensor, targets: Optional[torch.Tensor]):
        x = self.transformer.ln_f(x)
        if targets is not None and self.config.loss_chunk_rows:
            loss = chunked_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                self.config.vocab_size, self.config.loss_chunk_rows)
            return None, loss  # no logits: only one chunk of them ever existed
        logits = self.lm_head(x)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            # the softmax runs over the whole padded row with the padding columns at -inf, whose exp is exactly
            # 0: the same loss and gradients as over the vocab_size columns alone, but rows of a multiple of 64
            # let the GPU's fused loss kernels load in wide aligned steps, which the 50,257-wide slice did not
            # (GPT-2 124M on an H200: the loss kernels 4.1 -> 3.1 ms of a 36 ms step)
            flat = logits.reshape(-1, logits.size(-1)).float()
            if self.config.padded_vocab_size > self.config.vocab_size:
                padding = torch.arange(flat.size(-1), device=flat.device) >= self.config.vocab_size
                flat = flat.masked_fill(padding, float("-inf"))
            loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
        return logits[..., :self.config.vocab_size], loss  # (B, T, vocab_size), a view

    def compile_regions(self, mode: str = "default") -> None:
        """torch.compile the embedding, each block and the output head on their own, for forward().

        The n_layer blocks are the same code with other weights, and torch.compile passes parameters
        to the compiled graph as inputs, so one block is traced and compiled and all of them reuse it:
        compilation costs about one block instead of the whole unrolled model, and no longer grows with
        n_layer. What it costs in speed is the fusion across the regions' boundaries (the residual add
        that ends a block and the LayerNorm that starts the next) and one call per region. Parameters,
        state_dict and the KV-cache path (forward_cached) stay as they are; evaluation can still run
        eagerly inside torch.compiler.set_stance("force_eager").
        """
        self.check_ids = False  # like the whole compiled model, which skips the check while compiling
        if self._regions is None:
            self._regions = (torch.compile(self._embed, mode=mode),
                             [torch.compile(block, mode=mode) for block in self.transformer.h],
                             torch.compile(self._head, mode=mode))

    # ------------------------------------------------------------------ KV cache

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Preallocate a static cache for batch_size sequences of up to max_seq_len tokens."""
        if max_seq_len > self.config.block_size:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_size {self.config.block_size}")
        p = self.lm_head.weight
        hs = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_seq_len, hs,
                                          device=device or p.device, dtype=dtype or p.dtype)
        self.kv_cache_shape = (batch_size, max_seq_len)

    def remove_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.kv_cache_shape = None

    def forward_cached(self, idx: torch.Tensor, cache_pos: torch.Tensor, pad: Optional[torch.Tensor] = None,
                       kv_len: Optional[int] = None, last_only: bool = False) -> torch.Tensor:
        """Run idx (B, T) at cache slots cache_pos (T,), reading and extending the KV cache.

        pad (B,) is the number of left-padding slots of each row: a batch of prompts of different
        lengths is right-aligned, row b's real tokens start at slot pad[b], and its position ids
        start at 0 there, so every row computes exactly what it would compute alone.
        kv_len limits attention to the first kv_len slots (eager use only: it must cover cache_pos).
        Returns logits (B, T, vocab_size), or (B, 1, vocab_size) for the last position if last_only.
        For inference, in eval mode: the cached attention applies no dropout.
        """
        if getattr(self, "kv_cache_shape", None) is None:
            raise RuntimeError("call setup_kv_cache(batch_size, max_seq_len) before forward_cached()")
        self._check_input(idx)  # no host sync while compiling or capturing a CUDA graph
        B = idx.size(0)
        n_slots = self.kv_cache_shape[1] if kv_len is None else kv_len
        if kv_len is not None and not torch.compiler.is_compiling() and int(cache_pos.max()) >= kv_len:
            raise ValueError(f"kv_len {kv_len} does not cover the cache slots {cache_pos.tolist()} being written")
        if pad is None:
            pad = torch.zeros(B, dtype=torch.long, device=idx.device)
        pos = (cache_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T) position ids
        slots = torch.arange(n_slots, device=idx.device)
        # a query at slot t sees slots s with pad <= s <= t; a padding query sees only itself, which
        # keeps its (unused) output finite
        allowed = (slots[None, None, :] <= cache_pos[None, :, None]) & (
            (slots[None, None, :] >= pad[:, None, None]) | (slots[None, None, :] == cache_pos[None, :, None]))
        attn_mask = allowed[:, None]  # (B, 1, T, n_slots), broadcast over heads
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache_pos, attn_mask, kv_len)
        if last_only:
            x = x[:, [-1], :]  # using list [-1] to keep the time dimension
        x = self.transformer.ln_f(x)
        return self.lm_head(x)[..., :self.config.vocab_size]

    # ------------------------------------------------------------------ optimizer and throughput

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on tensors of 2 or more dimensions only (matmul weights, embeddings);
        biases and LayerNorm gains are not decayed. Fused kernels on CUDA and CPU."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied weight appears once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # device_type, not the device string: 'cuda:1' must still get the fused kernels. The CPU has a
        # fused AdamW too; it saves ~1.4 ms of a 40 ms step of the CPU preset
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the matmuls forward and backward, plus attention scores.

        The attention term 12 * n_layer * n_embd * T counts the full T x T score matrix, the usual
        convention (PaLM, appendix B), although causal kernels skip the masked half.
        """
        cfg = self.config
        return 6 * self.get_num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_iter: int, dt: float, device=None, dtype=None) -> Optional[float]:
        """Model FLOPs utilisation: achieved FLOP/s over the GPU's dense bf16/fp16 peak.

        Returns None where no peak is known (CPU, float32, an unlisted GPU); report
        achieved_flops() then instead of inventing a percentage.
        """
        peak = peak_flops(device if device is not None else self.lm_head.weight.device, dtype)
        return None if peak is None else self.achieved_flops(tokens_per_iter, dt) / peak

    def achieved_flops(self, tokens_per_iter: int, dt: float) -> float:
        return self.flops_per_token() * tokens_per_iter / dt

    # ------------------------------------------------------------------ OpenAI weights

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float = 0.0) -> "GPT":
        """Load GPT-2 weights from a Hugging Face-format directory (config.json plus model.safetensors
        or pytorch_model.bin, either of them possibly sharded), or by name ('gpt2', 'gpt2-medium',
        'gpt2-large', 'gpt2-xl'), which downloads through huggingface_hub (installed with transformers)
        when the network is there.
        """
        path = Path(name_or_dir) if is_model_folder(name_or_dir) else _download_gpt2(name_or_dir)
        hf = _read_hf_config(path)
        config = GPT2Config(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                            n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, dropout=dropout)
        model = cls(config)
        sd = _read_hf_weights(path)
        # Hub files name keys 'h.0.ln_1.weight'; transformers' own save adds 'transformer.'
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        if "wte.weight" not in sd and "lm_head.weight" in sd:
            # one tied matrix saved under its other name (safetensors' save_model keeps the name that sorts first)
            sd["wte.weight"] = sd["lm_head.weight"]
        ours = model.state_dict()
        expected = [k.removeprefix("transformer.") for k in ours if k != "lm_head.weight"]
        missing = [k for k in expected if k not in sd]
        if missing:
            raise CheckpointFormatError(f"{path} is missing GPT-2 weights {missing[:4]}"
                                        f"{' ...' if len(missing) > 4 else ''}")
        # the causal-mask buffers of older transformers versions are not weights; anything else left over
        # (a layer beyond n_layer, say) means config.json does not describe these weights
        extra = [k for k in sd if k not in expected and k != "lm_head.weight"
                 and not k.endswith((".attn.bias", ".attn.masked_bias"))]
        if extra:
            raise CheckpointFormatError(f"{path} holds weights its config.json has no place for: {extra[:4]}"
                                        f"{' ...' if len(extra) > 4 else ''}")
        if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["wte.weight"]):
            raise CheckpointFormatError(f"{path}: lm_head.weight differs from wte.weight; this model ties them, "
                                        "as GPT-2 does, and cannot load an untied output layer")
        with torch.no_grad():
            for key in expected:
                src = sd[key]
                if key.endswith(CONV1D_WEIGHTS):
                    src = src.t()  # OpenAI stores these as Conv1D: (in, out) instead of Linear's (out, in)
                dst = ours["transformer." + key]
                if key == "wte.weight":
                    dst = dst[: config.vocab_size]  # the padding rows keep their (unused) init values
                if src.shape != dst.shape:
                    raise CheckpointFormatError(f"{path}: weight {key} has shape {tuple(src.shape)}, "
                                                f"expected {tuple(dst.shape)} from its config.json")
                dst.copy_(src)
        return model

    def save_pretrained(self, directory: str, tokenizer=None) -> None:
        """Write config.json and model.safetensors (pytorch_model.bin without safetensors) in the
        Hugging Face GPT-2 format: transformers.GPT2LMHeadModel.from_pretrained(directory) loads it.
        The padding rows are dropped, so a custom vocabulary exports with its own vocab_size.
        If a tokenizer is given, it is written beside it as TOOLKIT_TOKENIZER (this project's format,
        which generate.py --init_from reads), and also in transformers' files, which AutoTokenizer reads:
        GPT-2's and a trained BPE (GPT-2's split pattern) as vocab.json and merges.txt, a character-level
        one as tokenizer.json (tokenizer.hf_files). Without a tokenizer, a folder that holds tokenizer files
        is refused, since they would be deleted. config.json is written last: a directory that has it
        holds a complete export."""
        from utils import atomic_open, remove_unfinished_writes
        cfg = self.config
        out = Path(directory)
        if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:  # ids the model has no row for
            raise CheckpointFormatError(f"the tokenizer has {tokenizer.vocab_size} ids and the model only "
                                        f"{cfg.vocab_size}: export the model with the tokenizer it was trained with")
        if (out / "meta.json").is_file():  # its tokenizer.json would be deleted or clash with transformers'
            raise CheckpointFormatError(f"{out} holds a prepared data set (meta.json): export the model into a "
                                        f"folder of its own, e.g. {out / 'export'}")
        out.mkdir(parents=True, exist_ok=True)
        # an earlier export's config.json would otherwise vouch for weights half overwritten, its weights
        # (model.safetensors where this one writes pytorch_model.bin) would be loaded instead of these, and
        # its tokenizer and generation files would be taken for this model's (tokenizer.json: where earlier
        # versions wrote ours)
        model_files = ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", TOOLKIT_TOKENIZER]
        other_files = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "generation_config.json"]
        stale = model_files + other_files
        names = {p.name for p in out.iterdir()}
        shards = [n for n in names if re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", n)]
        unfinished = re.compile(rf"\.(?:{'|'.join(map(re.escape, model_files))})\..+\.tmp")  # a killed export's
        earlier_export = shards or names & set(model_files) or any(map(unfinished.fullmatch, names))
        found = [n for n in other_files if n in names]
        if found and not earlier_export:  # e.g. a tokenizer trained into this folder: not ours to delete
            raise CheckpointFormatError(f"{out} holds {', '.join(found)} but no exported model (config.json, "
                                        f"weights), and the export would replace them: export into a folder of "
                                        f"its own, e.g. {out / 'export'}, or move them away first")
        # a Hub download saved back into its folder, or an export of ours made again: without a tokenizer the
        # export would delete the tokenizer the folder has, leaving one that generate.py and AutoTokenizer miss
        kept = [n for n in (TOOLKIT_TOKENIZER, *other_files) if n in names and n != "generation_config.json"]
        if tokenizer is None and kept:
            raise CheckpointFormatError(f"{out} holds {', '.join(kept)}, which an export without a tokenizer would "
                                        f"delete: pass the model's tokenizer, save_pretrained({str(out)!r}, "
                                        f"tokenizer), to write it anew, or export into a folder of its own")
        for name in stale + shards:
            (out / name).unlink(missing_ok=True)
        remove_unfinished_writes(out, "|".join(map(re.escape, stale)))  # what a killed export left, gigabytes maybe
        sd = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte; transformers re-ties it on load
            v = v.detach().to("cpu", torch.float32)
            if k == "transformer.wte.weight":
                v = v[: cfg.vocab_size]
            if k.endswith(CONV1D_WEIGHTS):
                v = v.t()
            sd[k] = v.contiguous()
        if not cfg.bias:  # GPT-2's format always has biases: zeros leave the function unchanged
            for k in list(sd):
                if k.endswith(".weight") and ("ln_" in k or "c_" in k):
                    name = k[: -len("weight")] + "bias"
                    sd[name] = torch.zeros(sd[k].shape[-1] if k.endswith(CONV1D_WEIGHTS) else sd[k].shape[0])
        eot = getattr(tokenizer, "eot_token", None) if tokenizer is not None else (
            GPT2_EOT_TOKEN if cfg.vocab_size == GPT2_VOCAB_SIZE else None)
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True, "torch_dtype": "float32",
        }
        try:
            from safetensors.torch import save as safetensors_bytes
        except ImportError:
            with atomic_open(out / "pytorch_model.bin") as f:
                torch.save(sd, f)
        else:
            with atomic_open(out / "model.safetensors") as f:
                f.write(safetensors_bytes(sd, metadata={"format": "pt"}))
        if tokenizer is not None:
            tokenizer.save(out / TOOLKIT_TOKENIZER)
            for name, text in tokenizer.hf_files().items():
                if name == "tokenizer_config.json":  # truncation=True cuts at the model's context, as for GPT-2
                    text = json.dumps({**json.loads(text), "model_max_length": cfg.block_size}, ensure_ascii=False,
                                      indent=2)
                with atomic_open(out / name, "w") as f:
                    f.write(text)
        # last: from_pretrained looks for config.json first, so an export cut short is never taken for whole
        with atomic_open(out / "config.json", "w") as f:
            json.dump(hf_config, f, indent=2)


def train_checkpoint_hint(name: str) -> str:
    """What to do instead where --init_from names train.py's own checkpoint, a .pt file or a folder of them
    (it reads Hugging Face folders only), else ""."""
    p = Path(name)
    if p.suffix == ".pt" and p.is_file():
        what = "it is a train.py checkpoint"
    elif p.is_dir() and any(p.glob("*checkpoint*.pt")):
        what = "it holds train.py's checkpoints"
    else:
        return ""
    return (f"; {what}: sample with generate.py --checkpoint_dir (or --checkpoint FILE), go on training with "
            "train.py --checkpoint_dir, or export it with save_pretrained (README, Checkpoint 管理) and fine-tune "
            "the export with --init_from")


def pretrained_shape(name_or_dir: str) -> dict:
    """The shape from_pretrained would give (n_layer, n_head, n_embd, vocab_size, block_size), known before any
    weights are downloaded or read: a GPT-2 name's from its preset, a folder's from its config.json (whose values
    are not checked here: from_pretrained names what is wrong with them)."""
    if is_model_folder(name_or_dir):
        hf = _read_hf_config(Path(name_or_dir))
        return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], vocab_size=hf["vocab_size"],
                    block_size=hf["n_positions"])
    preset = GPT2_CONFIGS[name_or_dir]
    return dict(n_layer=preset["n_layer"], n_head=preset["n_head"], n_embd=preset["n_embd"],
                vocab_size=GPT2_VOCAB_SIZE, block_size=GPT2Config.block_size)


def _download_gpt2(name: str) -> Path:
    if name not in GPT2_NAMES:
        raise CheckpointFormatError(f"{name!r} is neither a directory nor one of the GPT-2 names "
                                    f"{', '.join(GPT2_NAMES)}{train_checkpoint_hint(name)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"downloading {name} needs huggingface_hub: pip install transformers "
                        "(or pass a local Hugging Face GPT-2 directory)") from None
    try:
        return Path(snapshot_download(f"openai-community/{name}",
                                      allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"could not download {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "without network, pass a local directory holding config.json and "
                        "model.safetensors") from None


def _read_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointFormatError(f"{path} is not a GPT-2 checkpoint directory: expected config.json "
                                    f"and model.safetensors (or pytorch_model.bin) in it{train_checkpoint_hint(path)}")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply, an integer too long
        raise CheckpointFormatError(f"{cfg_file} is not valid JSON ({e}); re-download the checkpoint, or "
                                    "export it again with GPT.save_pretrained") from None
    if not isinstance(hf, dict):
        raise CheckpointFormatError(f"{cfg_file} holds a JSON {type(hf).__name__}, expected an object with "
                                    f"the GPT-2 fields {', '.join(HF_SHAPE_KEYS)}")
    if hf.get("model_type") != "gpt2":
        raise CheckpointFormatError(f"{cfg_file} describes model_type {hf.get('model_type')!r}; "
                                    "expected a GPT-2 checkpoint (model_type 'gpt2')")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointFormatError(f"{cfg_file}: activation_function {act!r} is not GPT-2's tanh GELU")
    missing = [k for k in HF_SHAPE_KEYS if k not in hf]
    if missing:
        raise CheckpointFormatError(f"{cfg_file} lacks the GPT-2 fields {', '.join(missing)}; a GPT-2 config.json "
                                    f"has all of {', '.join(HF_SHAPE_KEYS)} (transformers' GPT2Config writes them)")
    # (a wrong type of n_embd itself is named when the config is validated)
    if isinstance(hf["n_embd"], int) and hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointFormatError(f"{cfg_file}: n_inner {hf['n_inner']} differs from 4 * n_embd")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        raise CheckpointFormatError(f"{cfg_file}: layer_norm_epsilon {eps!r} differs from 1e-5")
    # settings of transformers' GPT2Config that this model does not have: an untied output layer, attention variants
    for key, gpt2 in (("tie_word_embeddings", True), ("scale_attn_weights", True),
                      ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, gpt2) != gpt2:
            raise CheckpointFormatError(f"{cfg_file}: {key} is {hf[key]!r}; this model supports GPT-2's {gpt2}")
    return hf


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict of a Hugging Face folder: model.safetensors, pytorch_model.bin, or either one sharded
    (an index .json naming each weight's file; transformers 4.x wrote sharded .bin files by default)."""
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("loading model.safetensors needs safetensors: pip install safetensors") from None
        if (path / "model.safetensors").is_file():
            return _read_safetensors(load_file, path / "model.safetensors")
        sd = {}
        for shard in _shards(path / "model.safetensors.index.json"):
            sd.update(_read_safetensors(load_file, path / shard))
        return sd
    if (path / "pytorch_model.bin").is_file():
        return _read_bin(path / "pytorch_model.bin")
    if (path / "pytorch_model.bin.index.json").is_file():
        sd = {}
        for shard in _shards(path / "pytorch_model.bin.index.json"):
            sd.update(_read_bin(path / shard))
        return sd
    raise CheckpointFormatError(f"{path} has config.json but no weights: expected model.safetensors or "
                                f"pytorch_model.bin, or a sharded checkpoint's model.safetensors.index.json or "
                                f"pytorch_model.bin.index.json")


def _shards(index_file: Path) -> list[str]:
    """The files a sharded checkpoint's index names, each once, in order."""
    try:
        shards = sorted(set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values()))
        if not all(isinstance(shard, str) for shard in shards):
            raise TypeError("a shard name that is not a string")
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8: ValueError
        raise CheckpointFormatError(f"cannot read {index_file} ({type(e).__name__}: {e}); a sharded checkpoint's "
                                    f"index is a JSON object whose weight_map maps each weight to its file: "
                                    f"download it again") from None
    return shards


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    # weights_only: a pickle from an untrusted download must not be able to run code
    _check_not_lfs_pointer(file)
    sd = load_weights_only(file, "weights file")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointFormatError(f"{file} is not a state_dict (a dict of tensors by name)")
    return sd


def _read_safetensors(load_file, file: Path) -> dict[str, torch.Tensor]:
    _check_not_lfs_pointer(file)
    try:  # safetensors says "No such file or directory" for a file this user may not read
        open(file, "rb").close()
    except OSError as e:
        raise CheckpointFormatError(f"cannot read weights file {file}: {e.strerror or e}") from None
    try:
        # a folder named in another encoding (GBK): safetensors opens UTF-8 paths only
        if utf8_text(str(file)) != str(file):
            from safetensors.torch import load
            return load(file.read_bytes())
        return load_file(str(file))
    except Exception as e:  # SafetensorError, OSError, ...: one line, not the library's traceback
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointFormatError(f"cannot read weights file {file}: {first[:200]} (truncated download?)") from None


def _check_not_lfs_pointer(file: Path) -> None:
    """A clone of a Hugging Face repository without git-lfs has small text files in place of the weights."""
    if file.is_file() and file.stat().st_size < 1024 and file.read_bytes().startswith(b"version https://git-lfs"):
        raise CheckpointFormatError(f"{file} is a git-lfs pointer, not the weights: run `git lfs pull` in "
                                    f"{file.parent}, or download the file itself")


def is_model_folder(name: str) -> bool:
    """Whether --init_from NAME means a local folder: a folder, as transformers takes it, except that a
    folder named like a GPT-2 model ('gpt2', a run's checkpoint folder, say) counts only if it holds
    a config.json; without one the name means OpenAI's model."""
    path = Path(name)
    return path.is_dir() and (name not in GPT2_NAMES or (path / "config.json").is_file())


# this project's tokenizer in an exported Hugging Face folder: not tokenizer.json, which is transformers'
# own format and name (AutoTokenizer would fail on ours)
TOOLKIT_TOKENIZER = "toolkit_tokenizer.json"


def exported_tokenizer_file(folder: Path) -> Optional[Path]:
    """The file of this project's tokenizer in a Hugging Face folder, None if there is none; folders
    exported by earlier versions have it as tokenizer.json (which may also be transformers' own)."""
    for name in (TOOLKIT_TOKENIZER, "tokenizer.json"):
        if (folder / name).is_file():
            return folder / name
    return None


# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' datasheets. Checked in
# order against torch.cuda.get_device_name(), so the more specific names come first.
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800 PCIe", 756e12), ("H800", 989e12),
    ("H200 NVL", 835e12), ("H200", 989e12),
    ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090 Ti", 80e12), ("RTX 3090", 71e12),
    ("V100S", 130e12), ("V100-PCIE", 112e12), ("V100", 125e12),  # V100 has no bf16: its float16 peaks
]


def attention_kernel(config: GPT2Config, batch_size: int, device, dtype: torch.dtype, training: bool = True) -> str:
    """The kernel F.scaled_dot_product_attention picks for this model's causal attention: 'flash', 'cudnn',
    'efficient' or 'math' ('unknown' if this torch cannot say).

    torch chooses by device, dtype, shapes, dropout and the priority order in force (sdpa_kernel), and the
    choice moves the step time a good deal, so the scripts print it. dtype is what the attention sees:
    autocast's dtype under mixed precision.
    """
    hs = config.n_embd // config.n_head
    # only the metadata is read, but it must be a real tensor on the device (the rules depend on the GPU)
    q = torch.empty(batch_size, config.n_head, config.block_size, hs, device=device, dtype=dtype,
                    requires_grad=training)
    try:
        choice = torch._fused_sdp_choice(q, q, q, dropout_p=config.dropout if training else 0.0, is_causal=True)
        name = SDPBackend(choice).name
    except (AttributeError, RuntimeError, ValueError):  # a private function, which may change
        return "unknown"
    return {"FLASH_ATTENTION": "flash", "CUDNN_ATTENTION": "cudnn", "EFFICIENT_ATTENTION": "efficient"}.get(
        name, name.lower())


def peak_flops(device, dtype=None) -> Optional[float]:
    """The GPU's dense half-precision peak, or None where unknown (CPU, MPS, float32, unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (None, torch.bfloat16, torch.float16, "bfloat16", "float16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops
    return None

