"""model.py against transformers' GPT2LMHeadModel: logits, loss, weights in and out, KV cache."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

from config import ConfigError, GPT2Config, preset_config
from conftest import gpt2_encoding
from model import GPT, CheckpointFormatError, attention_kernel, fp8_problem, peak_flops
from utils import UserError

transformers = pytest.importorskip("transformers")


def tiny_config(**kw) -> GPT2Config:
    return GPT2Config(**{**dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0), **kw})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 saved by transformers itself."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=100,
                                  eos_token_id=100)
    hf = transformers.GPT2LMHeadModel(cfg)
    # random LayerNorm gains and biases, so a swapped or untransposed tensor cannot go unnoticed
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5 if "bias" in name else 1.0)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return d


def test_logits_and_loss_match_transformers(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(str(hf_dir)).eval()
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (3, 31, 101)
    torch.testing.assert_close(logits, ref.logits[:, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)


def test_causal_mask_buffers_and_shards_of_transformers_checkpoints_load(hf_dir, tmp_path):
    """Older transformers versions store each layer's causal mask (attn.bias, attn.masked_bias) beside the
    weights, as OpenAI's hub files do; large checkpoints come in shards. Both load, with the same logits."""
    import safetensors.torch
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        ref = hf(idx).logits
    weights = safetensors.torch.load_file(hf_dir / "model.safetensors")
    prefix = next(k for k in weights if k.endswith("wte.weight"))[:-len("wte.weight")]
    for i in range(2):
        weights[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        weights[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    safetensors.torch.save_file(weights, masks / "model.safetensors")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    # sharded pytorch_model.bin, as transformers 4.x wrote large models by default (5.x writes no .bin)
    sharded_bin = tmp_path / "sharded_bin"
    sharded_bin.mkdir()
    (sharded_bin / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    keys, weight_map = sorted(weights), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        torch.save({k: weights[k] for k in part}, sharded_bin / f"pytorch_model-0000{i}-of-00002.bin")
        weight_map |= {k: f"pytorch_model-0000{i}-of-00002.bin" for k in part}
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for folder in (masks, sharded, sharded_bin):
        with torch.no_grad():
            torch.testing.assert_close(GPT.from_pretrained(str(folder)).eval()(idx)[0], ref, atol=1e-5, rtol=0)


def test_weights_this_user_may_not_read_are_not_called_missing(hf_dir, monkeypatch):
    """safetensors reports a file it may not open as "No such file or directory"; the file is there."""
    import builtins

    import model
    real = builtins.open
    monkeypatch.setattr(model, "open", lambda file, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(file))) if str(file).endswith(".safetensors")
        else real(file, *a, **k), raising=False)
    with pytest.raises(CheckpointFormatError, match=r"^cannot read weights file .*model.safetensors: Permission "
                                                    r"denied$"):
        GPT.from_pretrained(str(hf_dir))


def test_a_hub_folder_saved_back_in_place_keeps_its_tokenizer(hf_dir, tmp_path):
    """GPT.from_pretrained(d).save_pretrained(d), as transformers' users do: refused without the tokenizer (the
    folder's files would be deleted and AutoTokenizer would find none), written anew with it."""
    import shutil

    from tokenizer import CharTokenizer, load_tokenizer
    folder = tmp_path / "hub"
    shutil.copytree(hf_dir, folder)
    tokenizer_files = {"vocab.json": '{"a": 0}', "merges.txt": "#version: 0.2\n", "tokenizer_config.json": "{}"}
    for name, text in tokenizer_files.items():
        (folder / name).write_text(text)
    model = GPT.from_pretrained(str(folder))
    with pytest.raises(CheckpointFormatError, match="holds vocab.json, merges.txt, tokenizer_config.json, which an "
                                                    "export without a tokenizer would delete"):
        model.save_pretrained(folder)
    assert {name: (folder / name).read_text() for name in tokenizer_files} == tokenizer_files
    model.save_pretrained(folder, CharTokenizer("abc"))  # the old files go: they are no tokenizer of this model's
    assert "vocab.json" not in {p.name for p in folder.iterdir()}
    assert load_tokenizer(folder / "toolkit_tokenizer.json").chars == list("abc")


def test_a_tied_matrix_saved_as_lm_head_weight_alone_loads(hf_dir, tmp_path):
    """safetensors.torch.save_model(hf_model) keeps one name of the tied matrix, the first in sorted order."""
    import safetensors.torch
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    folder = tmp_path / "lm_head_only"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    safetensors.torch.save_model(hf, folder / "model.safetensors")
    keys = safetensors.torch.load_file(folder / "model.safetensors").keys()
    assert "lm_head.weight" in keys and "transformer.wte.weight" not in keys
    idx = torch.randint(0, hf.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(str(folder)).eval()(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)

def test_from_pretrained_takes_the_dropout_asked_for(hf_dir):
    model = GPT.from_pretrained(str(hf_dir), dropout=0.1)
    assert model.config.dropout == 0.1 and model.transformer.drop.p == 0.1


def test_an_export_without_a_tokenizer_names_gpt2s_end_of_text(tmp_path):
    """HF generate stops at eos_token_id: a GPT-2-vocabulary model gets <|endoftext|>, another none."""
    GPT(tiny_config(vocab_size=50257)).save_pretrained(tmp_path / "a")
    GPT(tiny_config()).save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["eos_token_id"] == 50256
    assert json.loads((tmp_path / "b" / "config.json").read_text())["eos_token_id"] is None
    for vocab_size in (50304, 60000):  # larger vocabularies: 50256 is some other token of theirs
        GPT(tiny_config(vocab_size=vocab_size)).save_pretrained(tmp_path / str(vocab_size))
        assert json.loads((tmp_path / str(vocab_size) / "config.json").read_text())["eos_token_id"] is None


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    model = GPT(tiny_config(vocab_size=65)).eval()  # a custom vocabulary: padded to 128 inside
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 65  # exported without padding rows
    idx = torch.randint(0, 65, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    # and back again
    again = GPT.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_save_pretrained_without_bias(tmp_path):
    torch.manual_seed(2)
    model = GPT(tiny_config(bias=False)).eval()
    model.save_pretrained(tmp_path)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]  # every bias is in the file (zeros), not filled in by transformers
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
        # and back into this project, which reads GPT-2's format, biases included
        assert torch.equal(GPT.from_pretrained(str(tmp_path)).eval()(idx)[0], model(idx)[0])


def test_an_export_states_the_dropout_it_was_trained_with(tmp_path):
    GPT(tiny_config(dropout=0.2)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["resid_pdrop"], cfg["embd_pdrop"], cfg["attn_pdrop"]) == (0.2, 0.2, 0.2)


def test_safetensors_are_read_before_a_pickle_beside_them(hf_dir, tmp_path):
    import shutil
    shutil.copytree(hf_dir, tmp_path / "both")
    sd = {k: torch.zeros_like(v) for k, v in transformers.GPT2LMHeadModel.from_pretrained(hf_dir).state_dict().items()}
    torch.save(sd, tmp_path / "both" / "pytorch_model.bin")  # other weights: they must not be the ones read
    idx = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(str(tmp_path / "both")).eval()(idx)[0],
                                   GPT.from_pretrained(str(hf_dir)).eval()(idx)[0], atol=0, rtol=0)


def test_loss_ignores_minus_one_and_padding_columns():
    torch.manual_seed(3)
    model = GPT(tiny_config(vocab_size=70)).eval()
    idx = torch.randint(0, 70, (2, 8))
    targets = idx.clone()
    targets[:, :3] = -1
    logits, loss = model(idx, targets)
    assert logits.shape[-1] == 70  # the 58 padding columns never leave the model
    manual = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 70), idx[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, manual)


@pytest.mark.parametrize("bad", [70, 127, 128, -2])
def test_targets_outside_the_vocabulary_are_refused(bad):
    """70 and 127 are padding columns (vocab 70, padded to 128), where the loss would be infinite."""
    model = GPT(tiny_config(vocab_size=70)).eval()
    idx = torch.randint(0, 70, (2, 8))
    targets = idx.clone()
    targets[1, 4] = bad
    with pytest.raises(ValueError, match=rf"^targets \[{bad}\] are outside the vocabulary \[0, 70\) \(-1 marks"):
        model(idx, targets)


def test_padding_columns_take_no_part_in_the_gradients():
    """The loss runs over the padded rows with -inf in the padding columns: the gradients are those of the
    cross-entropy over the vocab_size columns alone, and the padding rows of lm_head get none."""
    torch.manual_seed(3)
    model = GPT(tiny_config(vocab_size=70)).eval()
    idx = torch.randint(0, 70, (2, 8))
    model(idx, idx)[1].backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits, _ = model(idx)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 70), idx.reshape(-1)).backward()
    assert ours[:70].abs().max() > 0 and ours[70:].abs().max() == 0
    torch.testing.assert_close(ours, model.lm_head.weight.grad)


def chunked_copy(model, rows):
    """The same weights with the loss computed `rows` tokens at a time."""
    other = GPT(GPT2Config(**{**model.config.to_dict(), "loss_chunk_rows": rows}))
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])  # one row; a last chunk shorter than the others; one chunk
def test_the_chunked_loss_has_the_loss_and_gradients_of_transformers(hf_dir, rows):
    """Against GPT2LMHeadModel's loss and the gradients of every weight, with ignored targets and 27 padding
    columns (vocab 101, padded to 128), in float32."""
    torch.manual_seed(5)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).train()
    model = chunked_copy(GPT.from_pretrained(str(hf_dir)), rows).train()
    idx = torch.randint(0, 101, (3, 32))
    labels = idx.clone()
    labels[0, :9] = -100  # transformers' ignored label; ours is -1
    ref = hf(idx, labels=labels)
    ref.loss.backward()
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == -100, -1)
    logits, loss = model(idx[:, :-1], targets)
    assert logits is None  # no logits were made for the whole batch
    loss.backward()
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)
    with torch.no_grad():  # an evaluation's path, which makes no gradients: the same mean over the targets kept
        torch.testing.assert_close(model(idx[:, :-1], targets)[1], ref.loss, atol=1e-5, rtol=0)
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        grad = theirs[name].grad  # the same names; the tied lm_head.weight is listed once, as wte
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            grad = grad.t()  # GPT-2's Conv1D keeps (in, out)
        if name == "transformer.wte.weight":
            assert p.grad[101:].abs().max() == 0  # the padding rows take no part
            p_grad = p.grad[:101]
        else:
            p_grad = p.grad
        torch.testing.assert_close(p_grad, grad, atol=1e-6, rtol=1e-4, msg=name)


def bf16_gradient_error(model, idx, targets, reference):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), max(((p.grad - r).abs().max() / r.abs().max()).item()
                              for p, r in zip(model.parameters(), reference))


def test_the_chunked_loss_under_bfloat16_autocast_is_as_close_to_float32_as_the_plain_loss():
    torch.manual_seed(6)
    model = GPT(tiny_config(vocab_size=70)).train()
    idx = torch.randint(0, 70, (4, 32))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    model(idx, targets)[1].backward()
    reference = [p.grad.clone() for p in model.parameters()]
    plain_loss, plain_error = bf16_gradient_error(model, idx, targets, reference)
    chunked_loss, chunked_error = bf16_gradient_error(chunked_copy(model, 40), idx, targets, reference)
    torch.testing.assert_close(chunked_loss, plain_loss, atol=1e-4, rtol=0)
    assert plain_error < 0.03 and chunked_error < 2 * plain_error, (plain_error, chunked_error)


def test_the_chunked_loss_keeps_small_gradients_under_float16_loss_scaling():
    """float16 with a loss scale, as train.py's GradScaler runs it: unscaled, the gradients are float32's. The
    output rows of tokens that are never a target get only softmax probabilities of ~1e-5 and less; divided by
    the number of tokens before the loss scale applies, they would fall into float16's subnormals (5% off)."""
    torch.manual_seed(7)
    model = GPT(tiny_config(vocab_size=70)).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked softmax rows
    idx = torch.randint(0, 35, (4, 32))  # tokens 35-69 never occur
    model(idx, idx)[1].backward()
    reference = model.lm_head.weight.grad.clone()
    chunked = chunked_copy(model, 48)
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss = chunked(idx, idx)
    (loss * 2.0 ** 14).backward()
    assert all(torch.isfinite(p.grad).all() for p in chunked.parameters())
    grad = chunked.lm_head.weight.grad / 2.0 ** 14
    torch.testing.assert_close(grad[:35], reference[:35], atol=0.01 * reference[:35].abs().max().item(), rtol=0)
    rows = (grad[35:70] - reference[35:70]).norm(dim=1) / reference[35:70].norm(dim=1)
    assert rows.max() < 0.01, rows.max()


def test_the_chunked_loss_sums_the_output_weights_gradient_in_float32_under_float16():
    """One chunk's share of lm_head's gradient sums a product per row: 64 rows of the same target with
    activations of ~3000 make -1.9e5 in that token's row, beyond float16's 65,504."""
    torch.manual_seed(10)
    model = GPT(tiny_config(vocab_size=70)).train()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(3000.0)
        model.lm_head.weight.mul_(1e-4)  # logits stay moderate
    idx = torch.full((2, 32), 5)
    model(idx, idx)[1].backward()
    reference = model.lm_head.weight.grad.clone()
    chunked = chunked_copy(model, 64)
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss = chunked(idx, idx)
    loss.backward()
    assert reference.abs().max() * 64 > 65504  # what one chunk's sum would be before the division
    torch.testing.assert_close(chunked.lm_head.weight.grad, reference, atol=0.01 * reference.abs().max().item(),
                               rtol=0)


def test_the_chunked_loss_without_gradients_and_with_every_target_ignored():
    torch.manual_seed(8)
    model = GPT(tiny_config(vocab_size=70)).eval()
    idx = torch.randint(0, 70, (2, 16))
    chunked = chunked_copy(model, 5)
    with torch.no_grad():
        torch.testing.assert_close(chunked(idx, idx)[1], model(idx, idx)[1], atol=1e-6, rtol=0)
    nothing = torch.full_like(idx, -1)
    for m in (model, chunked):  # 0 / 0 = nan, as F.cross_entropy gives, but zero gradients, as its backward gives
        loss = m(idx, nothing)[1]
        loss.backward()
        assert loss.isnan() and all(p.grad.abs().max() == 0 for p in m.parameters())
    assert chunked(idx)[0].shape == (2, 16, 70)  # without targets: the logits, as ever


def test_the_chunked_loss_compiles_without_graph_breaks_to_what_eager_computes():
    torch.manual_seed(9)
    model = GPT(tiny_config(vocab_size=70, loss_chunk_rows=24)).train()
    idx = torch.randint(0, 70, (2, 32))
    targets = idx.clone()
    targets[0, :5] = -1  # ignored rows take the compiled form's own way to a zero row
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with torch.no_grad():  # evaluation's path, without the gradients
        explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    _, eager_loss, eager_grads = loss_and_grads_of(model, idx, targets)
    torch._dynamo.reset()
    model.check_ids = False  # as train.py runs it compiled
    _, loss, grads = loss_and_grads_of(torch.compile(model), idx, targets, params=model)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def loss_and_grads_of(model, idx, targets, params=None):
    (params or model).zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in (params or model).named_parameters()}


def test_loss_chunk_rows_must_be_a_count():
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match=r"loss_chunk_rows must be an integer >= 0"):
            tiny_config(loss_chunk_rows=bad).validate()


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_matches_uncached(batch):
    torch.manual_seed(4)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 101, (batch, 32))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_kv_cache(batch, 32)
        steps = [model.forward_cached(idx[:, :9], torch.arange(9))]  # the prompt in one pass
        for t in range(9, 32):  # then one token per step
            steps.append(model.forward_cached(idx[:, t:t + 1], torch.tensor([t]), kv_len=t + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_last_only_returns_the_last_positions_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        model.setup_kv_cache(2, 32)
        full = model.forward_cached(idx, torch.arange(12))
        model.setup_kv_cache(2, 32)
        last = model.forward_cached(idx, torch.arange(12), last_only=True)
    assert last.shape == (2, 1, 101)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


def test_a_kv_cache_longer_than_the_block_is_refused():
    model = GPT(tiny_config())
    model.setup_kv_cache(1, 32)
    with pytest.raises(ValueError, match="max_seq_len 33 exceeds block_size 32"):
        model.setup_kv_cache(1, 33)


def test_kv_cache_under_autocast_and_a_kv_len_too_short():
    torch.manual_seed(4)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():  # wider than GPT-2's init, so that attention is far from uniform and a wrong key shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(idx)
        model.setup_kv_cache(2, 12)  # float32 buffers, like the weights; autocast computes in bfloat16
        cached = model.forward_cached(idx, torch.arange(12))
    # bfloat16 keeps 8 bits: 2% of the logits' range covers its rounding, not a key or value stored wrong
    torch.testing.assert_close(cached.float(), full.float(), atol=0.02 * full.float().abs().max().item(), rtol=0)
    with torch.no_grad(), pytest.raises(ValueError, match=r"kv_len 3 does not cover the cache slots \[3\]"):
        model.forward_cached(idx[:, :1], torch.tensor([3]), kv_len=3)


def test_left_padded_rows_compute_what_they_compute_alone():
    torch.manual_seed(5)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 101, (3, 20))
    pad = torch.tensor([0, 4, 11])
    idx[1, :4] = 0
    idx[2, :11] = 0
    with torch.no_grad():
        model.setup_kv_cache(3, 24)
        out = model.forward_cached(idx, torch.arange(20), pad=pad)
        nxt = torch.randint(0, 101, (3, 1))
        step = model.forward_cached(nxt, torch.tensor([20]), pad=pad)
        for b in range(3):
            alone, _ = model(torch.cat([idx[b:b + 1, pad[b]:], nxt[b:b + 1]], dim=1))
            torch.testing.assert_close(out[b, pad[b]:], alone[0, :-1], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[b, 0], alone[0, -1], atol=1e-5, rtol=0)
        # a padding query sees only itself: token 0 at position 0, alone (never NaN from an empty row)
        pad_alone = model(torch.zeros(1, 1, dtype=torch.long))[0][0, 0]
        for b in range(3):
            torch.testing.assert_close(out[b, :pad[b]], pad_alone.expand(int(pad[b]), -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_parameter_counts_equal_gpt2(name, count):
    with torch.device("meta"):  # nothing is allocated
        model = GPT(preset_config(name))
    assert model.get_num_params() == count


def test_training_forward_has_no_graph_breaks():
    model = GPT(tiny_config(dropout=0.1)).train()
    idx = torch.randint(0, 101, (2, 16))
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def loss_and_grads(model, idx, seed):
    torch.manual_seed(seed)  # the same dropout masks in every model
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, idx)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_regions_trace_one_block_for_all_and_compute_what_eager_does(monkeypatch, checkpointing):
    graphs = []

    def recording_backend(gm, example_inputs):  # runs the traced graph as it is, so results stay bit-exact
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or real_compile(
        fn, backend=recording_backend))
    torch._dynamo.reset()
    torch.manual_seed(8)
    eager = GPT(tiny_config(n_layer=3, dropout=0.1, gradient_checkpointing=checkpointing)).train()
    regional = GPT(tiny_config(n_layer=3, dropout=0.1, gradient_checkpointing=checkpointing)).train()
    regional.load_state_dict(eager.state_dict())
    keys = list(regional.state_dict())
    regional.compile_regions("max-autotune")
    regional.compile_regions("max-autotune")  # a second call changes nothing
    assert modes == ["max-autotune"] * 5  # embedding, 3 blocks, head
    assert list(regional.state_dict()) == keys  # no compiled wrapper shows up in checkpoints
    import model as model_module
    checkpointed, checkpoint = [], model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda block, *a, **k: checkpointed.append(block) or checkpoint(
        block, *a, **k))
    idx = torch.randint(0, 101, (2, 16))
    want, got = loss_and_grads(eager, idx, 1), loss_and_grads(regional, idx, 1)
    assert len(checkpointed) == (2 * 3 if checkpointing else 0)  # each model's 3 blocks, regions included
    for seed in (1, 2):
        want, got = loss_and_grads(eager, idx, seed), loss_and_grads(regional, idx, seed)
        torch.testing.assert_close(got[:2], want[:2], atol=0, rtol=0)
        for n in want[2]:
            torch.testing.assert_close(got[2][n], want[2][n], atol=0, rtol=0, msg=n)
    # one graph each for the embedding, the blocks (all three share it) and the head; a second step
    # and evaluation without gradients reuse them (inference graphs are traced by the same code)
    assert len(graphs) == 3
    with torch.no_grad():
        regional.eval()
        torch.testing.assert_close(regional(idx)[0], eager.eval()(idx)[0], atol=0, rtol=0)
    # the KV-cache path stays eager: generation does not trace anything
    n = len(graphs)
    regional.setup_kv_cache(1, 8)
    regional.forward_cached(idx[:1, :4], torch.arange(4))
    assert len(graphs) == n


def test_compiled_regions_under_inductor_match_eager():
    """The real compiler (C++ kernels on a CPU): the same loss and gradients up to float rounding."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    eager = GPT(tiny_config(n_layer=2)).train()
    regional = GPT(tiny_config(n_layer=2)).train()
    regional.load_state_dict(eager.state_dict())
    regional.compile_regions()
    idx = torch.randint(0, 101, (2, 16))
    want, got = loss_and_grads(eager, idx, 0), loss_and_grads(regional, idx, 0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], atol=1e-5, rtol=1e-4, msg=n)


def test_compiled_regions_still_refuse_too_long_sequences():
    model = GPT(tiny_config())
    model.compile_regions()
    with pytest.raises(ValueError, match="length 33 .* block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_gradients(dropout, monkeypatch):
    import model as model_module
    calls, checkpoint = [], model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(6)
        model = GPT(tiny_config(dropout=dropout, gradient_checkpointing=checkpointing)).train()
        idx = torch.randint(0, 101, (2, 16))
        torch.manual_seed(7)  # the same dropout masks; checkpoint replays the RNG state in backward
        _, loss = model(idx, idx)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert len(calls) == (2 if checkpointing else 0)  # each block of the second model, none of the first
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=0, msg=n)


def test_sequence_longer_than_block_size():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="length 33 .* block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("idx", [torch.zeros(5, dtype=torch.long), torch.zeros(1, 2, 5, dtype=torch.long),
                                 torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.bool),
                                 torch.zeros(1, 5, dtype=torch.uint8), torch.zeros(1, 5, dtype=torch.int16),
                                 torch.from_numpy(np.zeros((1, 5), np.uint16))])  # as a memmapped .bin holds ids
def test_input_that_is_not_a_batch_of_token_ids(idx):
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) tensor of integer token ids \(torch.long or "
                                         rf"torch.int32\), got shape {re.escape(str(tuple(idx.shape)))} and dtype "
                                         rf"{idx.dtype}; .* idx.long\(\) converts"):
        model(idx)
    model.setup_kv_cache(1, 8)
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) tensor"):
        model.forward_cached(idx, torch.tensor([0]))


def test_int32_token_ids_give_what_int64_ids_give():
    model = GPT(tiny_config()).eval()
    idx = torch.tensor([[1, 2, 3, 100]])
    torch.testing.assert_close(model(idx.int())[0], model(idx)[0], atol=0, rtol=0)


def test_token_ids_outside_the_vocabulary():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=r"\[101\] are outside the vocabulary \[0, 101\)"):
        model(torch.tensor([[1, 2, 101]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-3, 2]]))
    model.setup_kv_cache(1, 8)
    with pytest.raises(ValueError, match=r"\[101\] are outside the vocabulary"):
        model.forward_cached(torch.tensor([[101]]), torch.tensor([0]))


def test_directory_that_is_not_gpt2(tmp_path):
    with pytest.raises(CheckpointFormatError, match="expected config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointFormatError, match="expected a GPT-2 checkpoint"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}))
    with pytest.raises(CheckpointFormatError, match="no weights"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointFormatError, match="neither a directory nor"):
        GPT.from_pretrained(str(tmp_path / "missing"))


def test_a_train_checkpoint_given_as_a_pretrained_model_gets_the_ways_to_use_it(tmp_path):
    (tmp_path / "best_checkpoint.pt").write_bytes(b"a checkpoint")
    with pytest.raises(CheckpointFormatError, match=r"expected config.json .*; it holds train.py's checkpoints: "
                                                    r"sample with generate.py --checkpoint_dir .*export it"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointFormatError, match=r"neither a directory .*; it is a train.py checkpoint: sample"):
        GPT.from_pretrained(str(tmp_path / "best_checkpoint.pt"))
    (tmp_path / "best_checkpoint.pt").unlink()  # other folders and files get no such hint
    (tmp_path / "weights.pt").mkdir()
    for name in (tmp_path, tmp_path / "weights.pt", tmp_path / "missing.pt"):
        with pytest.raises(CheckpointFormatError) as e:
            GPT.from_pretrained(str(name))
        assert "train.py" not in str(e.value)


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 548105171\n"


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", LFS_POINTER, "is a git-lfs pointer, not the weights: run `git lfs pull`"),
    ("pytorch_model.bin", LFS_POINTER, "is a git-lfs pointer, not the weights: run `git lfs pull`"),
    ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{", "cannot read weights file"),
    ("pytorch_model.bin", b"PK\x03\x04 cut short", "cannot read weights file"),
])
def test_unreadable_weights_file_is_one_clear_error(hf_dir, tmp_path, name, content, message):
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(tmp_path))
    assert message in str(e.value) and str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_shard_is_one_clear_error(hf_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"cannot read weights file .*model-00001-of-00002.safetensors"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("index", ["not json", "{\"metadata\": {}}", "[1, 2]", "{\"weight_map\": {\"a\": 3}}"])
def test_a_broken_shard_index_is_one_clear_error(hf_dir, tmp_path, index):
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    (tmp_path / "model.safetensors.index.json").write_text(index)  # e.g. a download cut short
    with pytest.raises(CheckpointFormatError) as e:
        GPT.from_pretrained(str(tmp_path))
    assert f"cannot read {tmp_path / 'model.safetensors.index.json'}" in str(e.value) and "\n" not in str(e.value)


def test_a_pickled_object_in_pytorch_model_bin_is_refused(hf_dir, tmp_path):
    import argparse
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="refusing to load .*pytorch_model.bin: it holds pickled objects"):
        GPT.from_pretrained(str(tmp_path))
    for not_a_state_dict in ({"wte": [1, 2]}, {0: torch.zeros(1)}):  # a tensor that is no one's
        torch.save(not_a_state_dict, tmp_path / "pytorch_model.bin")
        with pytest.raises(CheckpointFormatError, match="is not a state_dict"):
            GPT.from_pretrained(str(tmp_path))


@pytest.mark.skipif(sys.platform != "linux", reason="a file name in bytes that are not UTF-8, as Linux keeps them")
def test_an_export_into_a_folder_named_in_gbk_loads_back(tmp_path):
    """safetensors opens UTF-8 paths only; a Chinese folder name from a GBK system arrives as other bytes."""
    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    folder = os.fsdecode(os.fsencode(tmp_path) + "/导出".encode("gbk"))
    model.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    loaded = GPT.from_pretrained(folder)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        rows = 50 if name in ("transformer.wte.weight", "lm_head.weight") else None  # padding rows are not exported
        assert torch.equal(a[:rows], b[:rows]), name


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "gpt2", "n_embd": 8,', "is not valid JSON"),
    ("\xff\xfe not text", "is not valid JSON"),
    ('{"model_type": "gpt2", "n_embd": ' + "1" * 5000 + "}", "is not valid JSON"),  # Python's digit limit
    ("[" * 100_000, "is not valid JSON"),  # nested too deeply
    ('["gpt2"]', "holds a JSON list"),
    ('{"model_type": "gpt2", "n_embd": 8, "n_head": 2}', "lacks the GPT-2 fields n_layer, n_positions, vocab_size"),
])
def test_broken_config_json_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointFormatError) as e:
        GPT.from_pretrained(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value) and message in str(e.value)


def test_a_config_json_without_a_width_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": None, "n_head": 2, "n_layer": 1, "n_positions": 8, "vocab_size": 10}))
    with pytest.raises(UserError, match="n_embd must be an integer > 0, got None"):
        GPT.from_pretrained(str(tmp_path))


def test_save_pretrained_writes_config_json_last(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        GPT(tiny_config()).save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no config.json announcing an export without weights


def test_an_export_leaves_no_file_of_the_folders_earlier_model(tmp_path, monkeypatch):
    """Written without safetensors (pytorch_model.bin), over an export that has model.safetensors and a
    Hub download's generation_config.json: neither may be taken for the new model's."""
    GPT(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 50256}')
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (tmp_path / ".model.safetensors.k2j4h1x9.tmp").write_bytes(b"a killed export's weights")
    (tmp_path / ".config.json.a1.tmp").write_text("{")
    for mine in ("best-of-5-runs.safetensors", "out-of-domain.bin", "notes.txt", ".notes.tmp"):  # the user's: they stay
        (tmp_path / mine).write_text("mine")
    import sys
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails: not installed
    new = GPT(tiny_config(n_layer=3)).eval()
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "best-of-5-runs.safetensors", "config.json",
                                                          "notes.txt", "out-of-domain.bin", "pytorch_model.bin"]
    monkeypatch.undo()
    loaded = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 101, (1, 8))
    torch.testing.assert_close(loaded(idx)[0], new(idx)[0])
    data = tmp_path / "data"  # a prepared data set's folder is refused: its tokenizer.json stays
    data.mkdir()
    (data / "meta.json").write_text("{}")
    (data / "tokenizer.json").write_text('{"kind": "char", "chars": ["a"]}')
    with pytest.raises(CheckpointFormatError, match="holds a prepared data set .*export the model into a folder"):
        new.save_pretrained(data)
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "tokenizer.json"]
    mine = tmp_path / "mine"  # a tokenizer trained into a folder, no export there yet: refused, nothing deleted
    mine.mkdir()
    for name in ("tokenizer.json", "merges.txt", "notes.txt"):
        (mine / name).write_text("mine")
    with pytest.raises(CheckpointFormatError, match=r"holds tokenizer.json, merges.txt but no exported model"):
        new.save_pretrained(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["merges.txt", "notes.txt", "tokenizer.json"]
    (mine / ".pytorch_model.bin.x1.tmp").write_bytes(b"a killed export's weights")  # then it was an export
    from tokenizer import CharTokenizer
    new.save_pretrained(mine, CharTokenizer("abc"))
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json",
                                                      "tokenizer_config.json", "toolkit_tokenizer.json"]
    for i, earlier in enumerate(("model-00001-of-00002.safetensors", "toolkit_tokenizer.json")):  # an export's too
        folder = tmp_path / f"earlier{i}"
        folder.mkdir()
        (folder / earlier).write_text("old")
        (folder / "merges.txt").write_text("old")  # a GPT-2 tokenizer's, which the char tokenizer does not write
        new.save_pretrained(folder, CharTokenizer("abc"))
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                            "tokenizer_config.json", "toolkit_tokenizer.json"]
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generation_config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="holds generation_config.json but no exported model"):
        new.save_pretrained(tmp_path / "gen")


def test_an_export_with_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    from tokenizer import CharTokenizer
    with pytest.raises(CheckpointFormatError, match="the tokenizer has 120 ids and the model only 101"):
        GPT(tiny_config()).save_pretrained(tmp_path / "x", tokenizer=CharTokenizer([chr(32 + i) for i in range(120)]))
    assert not (tmp_path / "x").exists()


def test_an_export_with_gpt2s_tokenizer_loads_in_autotokenizer(tmp_path, gpt2_files):
    """vocab.json and merges.txt rebuilt from tiktoken are OpenAI's encoder.json and vocab.bpe, so
    transformers' AutoTokenizer and pipeline load the folder; this project's own file is named apart."""
    from tokenizer import GPT2Tokenizer
    GPT(tiny_config(vocab_size=50257)).save_pretrained(tmp_path, tokenizer=GPT2Tokenizer())
    encoder_json, vocab_bpe = gpt2_files
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == json.loads(encoder_json.read_text())
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8")
    assert merges.split() == vocab_bpe.read_text(encoding="utf-8").split()
    assert not (tmp_path / "tokenizer.json").exists() and (tmp_path / "toolkit_tokenizer.json").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, 你好！ It's 2026.\n\n  spaces\t<|endoftext|>"
    assert hf(text)["input_ids"] == gpt2_encoding().encode(text, allowed_special="all")
    assert hf.eos_token_id == 50256


HF_TEXTS = ["Hello world, 你好！ It's 2026.\n\n  spaces\t", "ROMEO:\nWhat, ho! 😀 naïve café\r\n",
            "中文的标点，和 English words 混在一起。", "   \n\n\n  x  "]


@pytest.mark.parametrize("specials", [[], ["<|endoftext|>"], ["<|endoftext|>", "<|sep|>", "<|sp ace|>"]])
def test_an_export_with_a_trained_bpe_loads_in_autotokenizer(tmp_path, shakespeare_text, specials):
    """A trained byte-level BPE with GPT-2's split pattern is what GPT-2's vocab.json and merges.txt
    describe: transformers encodes and decodes every text as this project does."""
    from tokenizer import BPETokenizer
    text = shakespeare_text[:100_000] + "".join(HF_TEXTS[1:3]) * 30
    tok = BPETokenizer().train(text, 700, special_tokens=specials)
    GPT(tiny_config(vocab_size=tok.vocab_size)).save_pretrained(tmp_path, tokenizer=tok)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for t in HF_TEXTS + [shakespeare_text[-3000:], "a<|sep|>b <|endoftext|> x<|sp ace|>y"]:
        ids = tok.encode(t, allowed_special="all")
        assert hf(t)["input_ids"] == ids, t
        assert hf.decode(ids) == t
    assert len(hf) == tok.vocab_size  # nothing added beyond the model's vocabulary
    assert hf.model_max_length == 32 and len(hf(shakespeare_text[:2000], truncation=True)["input_ids"]) == 32
    assert hf.eos_token_id == tok.eot_token  # None without '<|endoftext|>'
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert hf_model.config.eos_token_id == tok.eot_token


def test_an_export_with_a_bpe_transformers_cannot_express_has_only_this_projects_file(tmp_path, shakespeare_text):
    from tokenizer import BPETokenizer
    tok = BPETokenizer(r"\w+|\s+|[^\w\s]+").train(shakespeare_text[:20_000], 300)  # not GPT-2's split pattern
    GPT(tiny_config(vocab_size=tok.vocab_size)).save_pretrained(tmp_path, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "toolkit_tokenizer.json"]


def test_an_export_with_a_character_tokenizer_loads_in_autotokenizer(tmp_path, shakespeare_text):
    from tokenizer import CharTokenizer
    tok = CharTokenizer.from_text(shakespeare_text + "".join(HF_TEXTS))
    GPT(tiny_config(vocab_size=tok.vocab_size)).save_pretrained(tmp_path, tokenizer=tok)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    spaced = "hello , world . I 'm here ! ok ?"  # transformers' clean-up would drop these spaces
    for t in HF_TEXTS + [shakespeare_text[:3000], spaced]:
        ids = tok.encode(t)
        assert hf(t)["input_ids"] == ids, t
        assert hf.decode(ids) == t
    assert len(hf) == tok.vocab_size and hf.eos_token_id is None
    with pytest.raises(Exception, match="UNK"):  # a character never seen: an error there too, not a guess
        hf("ß€")
    out = transformers.pipeline("text-generation", model=str(tmp_path))("ROMEO:", max_new_tokens=10, do_sample=False)
    assert out[0]["generated_text"].startswith("ROMEO:") and len(out[0]["generated_text"]) == 16  # a token a character
    # generate.py reads this project's file, not transformers' tokenizer.json
    from generate import load_model
    _, again, _ = load_model(init_from=str(tmp_path))
    assert again.to_dict() == tok.to_dict()


def test_save_pretrained_over_an_earlier_export(tmp_path, monkeypatch):
    from tokenizer import CharTokenizer
    GPT(tiny_config()).save_pretrained(tmp_path, tokenizer=CharTokenizer("abc"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = GPT(tiny_config(n_layer=3)).eval()
    # no tokenizer this time: the folder's would be deleted, and generate.py would take the model for GPT-2's
    with pytest.raises(CheckpointFormatError, match=r"holds toolkit_tokenizer.json, tokenizer.json, "
                                                    r"tokenizer_config.json, which an export without a tokenizer "
                                                    r"would delete: pass the model's tokenizer"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    model.save_pretrained(tmp_path, CharTokenizer("abc"))
    assert GPT.from_pretrained(str(tmp_path)).config.n_layer == 3
    assert (tmp_path / "toolkit_tokenizer.json").read_bytes() == before["toolkit_tokenizer.json"]
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError):
        GPT(tiny_config(n_layer=4)).save_pretrained(tmp_path, CharTokenizer("abc"))
    assert not (tmp_path / "config.json").exists()  # the 3-layer config.json no longer vouches for the files


def hf_model_dir(path, tie=True, **config):
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(**{**dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4),
                                     **config}, tie_word_embeddings=tie)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(path)
    return path


@pytest.mark.parametrize("change, message", [
    (dict(tie=False), "tie_word_embeddings is False"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx is True"),
    (dict(scale_attn_weights=False), "scale_attn_weights is False"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon 1e-06 differs from 1e-5"),
    (dict(n_inner=64), "n_inner 64 differs from 4 \\* n_embd"),
])
def test_from_pretrained_refuses_other_attention_or_output_layers(tmp_path, change, message):
    hf_model_dir(tmp_path, **change)
    with pytest.raises(CheckpointFormatError, match=message):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_refuses_weights_config_json_does_not_describe(tmp_path):
    import safetensors.torch
    hf_model_dir(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    # a layer more than config.json says
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(CheckpointFormatError, match=r"no place for: \['h\.1\."):
        GPT.from_pretrained(str(tmp_path))
    # an untied lm_head stored beside a config.json that claims tying
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    key = next(k for k in weights if k.endswith("wte.weight"))
    safetensors.torch.save_file({**weights, "lm_head.weight": torch.randn_like(weights[key])},
                                tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(str(tmp_path))
    # fewer embedding rows than vocab_size
    safetensors.torch.save_file({**weights, key: weights[key][:50].contiguous()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"wte.weight has shape \(50, 32\), expected \(101, 32\)"):
        GPT.from_pretrained(str(tmp_path))


def test_optimizer_decays_only_matrices():
    model = GPT(tiny_config())
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())  # the tied matrix once, nothing missing
    assert opt.defaults["fused"]
    mps = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device_type="mps")
    assert not mps.defaults["fused"]


def test_gpt2_parameter_count_and_flops_are_the_known_figures():
    """123.65M without the position embeddings: the figure nanoGPT prints for GPT-2 124M, counted
    by hand here (tied wte 50257 x 768, 12 blocks of 12 C^2 + 13 C, ln_f 2 C)."""
    with torch.device("meta"):
        model = GPT(preset_config("gpt2"))
    C, L = 768, 12
    assert model.get_num_params(non_embedding=True) == 50257 * C + L * (12 * C * C + 13 * C) + 2 * C == 123_653_376
    assert model.get_num_params() == 123_653_376 + 1024 * C
    assert model.flops_per_token() == 6 * 123_653_376 + 12 * L * C * 1024


def test_mfu_is_a_fraction_of_the_gpus_peak(monkeypatch):
    model = GPT(tiny_config())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    mfu = model.estimate_mfu(1000, 0.5, "cuda", torch.bfloat16)
    assert mfu == pytest.approx(model.flops_per_token() * 1000 / 0.5 / 989e12)


def test_a_checkpoint_with_torchs_name_for_the_tanh_gelu_loads(tmp_path):
    """transformers writes activation_function 'gelu_pytorch_tanh' for the same tanh GELU as 'gelu_new'."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, activation_function="gelu_pytorch_tanh")).eval()
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        ours = GPT.from_pretrained(str(tmp_path)).eval()(idx)[0]
        torch.testing.assert_close(ours[..., :50], hf(idx).logits, atol=1e-5, rtol=0)


def test_gelu_is_gpt2s_tanh_form():
    from transformers.activations import NewGELUActivation
    x = torch.linspace(-6, 6, 1001)
    mlp = GPT(tiny_config()).transformer.h[0].mlp
    gelu = next(m for m in mlp.modules() if isinstance(m, torch.nn.GELU))
    torch.testing.assert_close(gelu(x), NewGELUActivation()(x), atol=1e-6, rtol=0)
    assert (gelu(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-4  # the exact form would differ


def test_residual_projections_start_smaller_with_depth():
    """GPT-2's init: c_proj weights get std 0.02 / sqrt(2 n_layer), the other matmuls 0.02."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=4, n_embd=256, n_head=4))
    proj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    fc = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_fc.weight")])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.03)
    assert fc.std().item() == pytest.approx(0.02, rel=0.03)
    # embeddings std 0.02 too, biases 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and "ln" not in n]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_flops_and_mfu(monkeypatch):
    model = GPT(tiny_config())
    n = model.get_num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 32
    assert model.estimate_mfu(1000, 0.5) is None  # CPU: no made-up percentage
    assert model.achieved_flops(1000, 0.5) == pytest.approx(model.flops_per_token() * 2000)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA H800 PCIe", 756e12), ("NVIDIA H800", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("Some New GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops("cuda", torch.bfloat16) == peak
    assert peak_flops("cuda", torch.float32) is None


def test_attention_kernel_is_the_one_torch_picks():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    config = tiny_config()  # head size 8
    # what torch's own chooser returns for those shapes, and what the forward pass then runs
    q = torch.empty(2, config.n_head, config.block_size, config.n_embd // config.n_head, requires_grad=True)
    assert SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)) == SDPBackend.FLASH_ATTENTION  # on the CPU
    assert attention_kernel(config, 2, "cpu", torch.float32) == "flash"
    with sdpa_kernel(SDPBackend.MATH):  # the priority order in force decides
        assert attention_kernel(config, 2, "cpu", torch.float32) == "math"
    config.dropout = 0.2  # the CPU's flash kernel has no dropout: training falls back to the math kernel
    assert SDPBackend(torch._fused_sdp_choice(q, q, q, dropout_p=0.2, is_causal=True)) == SDPBackend.MATH
    assert attention_kernel(config, 2, "cpu", torch.float32) == "math"
    assert attention_kernel(config, 2, "cpu", torch.float32, training=False) == "flash"


# ---------------------------------------------------------------------------- float8 matmuls


def fake_float8(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to dtype with its own per-tensor scale, back in float32: what the float8 product sees."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.abs().amax().float()
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype).float() / scale


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Records the operands of every torch._scaled_mm call."""
    calls, real = [], torch._scaled_mm

    def spy(a, b, **kwargs):
        calls.append((a, b, kwargs))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    return calls


def test_float8_matmul_equals_its_rounding_and_hands_cuda_its_layouts(scaled_mm_calls):
    from model import _Float8Matmul
    torch.manual_seed(0)
    x = (torch.randn(64, 48) * 3).requires_grad_()
    w = (torch.randn(80, 48) * 0.02).requires_grad_()
    grad = torch.randn(64, 80) * 1e-3
    y = _Float8Matmul.apply(x, w, torch.float32)
    y.backward(grad)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    fx, fw, fg = fake_float8(x.detach(), e4m3), fake_float8(w.detach(), e4m3), fake_float8(grad, e5m2)
    torch.testing.assert_close(y, fx @ fw.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, fg @ fw, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(w.grad, fg.T @ fx, rtol=1e-4, atol=1e-8)
    # and not merely the exact product: float8 rounding is visible, the e5m2 gradients coarser still
    assert (y - x.detach() @ w.detach().T).abs().max() > 1e-4
    assert len(scaled_mm_calls) == 3
    for a, b, kw in scaled_mm_calls:
        assert a.is_contiguous() and b.t().is_contiguous()  # row-major first operand, column-major second
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0 and b.shape[0] == a.shape[1]
        assert kw["scale_a"].dtype == kw["scale_b"].dtype == torch.float32 and kw["scale_a"].numel() == 1
        assert e4m3 in (a.dtype, b.dtype)  # CUDA has no e5m2 x e5m2 product
    assert [kw["out_dtype"] for _, _, kw in scaled_mm_calls] == [torch.float32] * 3


def test_float8_training_keeps_weights_and_evaluation(scaled_mm_calls):
    torch.manual_seed(0)
    plain = GPT(tiny_config(n_embd=32))
    fp8 = GPT(tiny_config(n_embd=32, fp8=True))
    fp8.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == fp8.state_dict().keys()
    x, y = torch.randint(0, 101, (4, 32)), torch.randint(0, 101, (4, 32))
    _, loss, = plain(x, y)
    _, loss8 = fp8(x, y)
    assert len(scaled_mm_calls) == 2 * 4  # the four Linear layers of each block; lm_head stays as it is
    assert loss8 != loss and abs(loss8.item() - loss.item()) < 0.01 * loss.item()
    loss8.backward()
    assert all(p.grad is not None for p in fp8.parameters())
    calls = len(scaled_mm_calls)
    plain.eval(), fp8.eval()
    with torch.no_grad():
        assert torch.equal(plain(x, y)[1], fp8(x, y)[1])  # evaluation multiplies the weights as they are
    fp8.train()
    with torch.no_grad():
        fp8(x, y)
    assert len(scaled_mm_calls) == calls
    fp8.set_fp8(False)
    assert type(fp8.transformer.h[0].mlp.c_fc) is torch.nn.Linear and not fp8.config.fp8


def test_float8_under_bfloat16_autocast_returns_bfloat16():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=32, fp8=True))
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.transformer.h[0].mlp.c_fc(x)
        layer = model.transformer.h[0].mlp.c_fc
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == (2, 16, 128)
    assert (out.float() - ref.float()).abs().max() < 0.1 * ref.float().abs().max()


def test_float8_of_all_zeros_stays_finite(scaled_mm_calls):
    """A zero weight (a zero-initialised layer) or a zero gradient has no largest magnitude to scale by."""
    from model import _Float8Matmul, to_float8
    x8, inv = to_float8(torch.zeros(4, 16), torch.float8_e4m3fn)
    assert torch.isfinite(inv) and torch.all(x8.float() == 0)
    x = torch.randn(16, 16, requires_grad=True)
    w = torch.zeros(32, 16, requires_grad=True)
    y = _Float8Matmul.apply(x, w, torch.float32)
    y.sum().backward()
    assert torch.all(y == 0) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_float8_needs_dimensions_divisible_by_16():
    with pytest.raises(ConfigError, match=r"fp8 needs n_embd \(40\) and batch_size x block_size \(96\) divisible"):
        GPT(tiny_config(n_embd=40, n_head=4, batch_size=3, block_size=32, fp8=True))
    assert fp8_problem(torch.device("cpu")) is None
    assert fp8_problem(torch.device("mps")) == "fp8 runs on CUDA GPUs and CPUs, not on mps"


def learn_one_batch_on_the_gpu(model, data, steps: int, step_model=None) -> torch.Tensor:
    """The losses of `steps` AdamW steps (lr 3e-3) on one batch under bfloat16 autocast: it learns the batch by heart."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            # not `step_model or model`: truth asks a compiled module its len(), which raises TypeError
            _, loss = (model if step_model is None else step_model)(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return torch.tensor(out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                    reason="compiled bfloat16 training as train.py runs it needs a CUDA GPU with bfloat16")
def test_the_chunked_loss_compiled_in_bfloat16_on_the_gpu_follows_the_plain_loss():
    """GPT-2's 50,257-wide vocabulary, three chunks of which the last is shorter, compiled as train.py compiles."""
    def losses(rows: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(tiny_config(vocab_size=50257, n_embd=128, block_size=64, loss_chunk_rows=rows)).cuda()
        model.check_ids = False
        data = torch.randint(0, 50257, (8, 65), generator=torch.Generator().manual_seed(0)).cuda()
        return learn_one_batch_on_the_gpu(model, data, 20, step_model=torch.compile(model))

    plain, chunked = losses(0), losses(192)
    assert chunked[-1] < 0.5 * chunked[0]
    # the same body on a CPU, eager, data seeds 0-3: the first 10 losses within a relative 0.8% of the plain
    # loss's; later the two runs drift apart (by up to 0.55 at step 20) as bfloat16 rounds differently
    torch.testing.assert_close(chunked[:10], plain[:10], rtol=0.02, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 matmuls need a CUDA GPU of compute capability 8.9+")
def test_float8_training_on_the_gpu_follows_bfloat16():
    def losses(fp8: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(tiny_config(vocab_size=128, n_embd=128, block_size=64, fp8=fp8)).cuda()
        data = torch.randint(0, 128, (8, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        return learn_one_batch_on_the_gpu(model, data, 30)

    bf16, fp8 = losses(False), losses(True)
    assert fp8[-1] < 0.2 * fp8[0]
    # the same body on a CPU (bf16 autocast, data seeds 0-5): the first 10 losses within 2.6% of bf16's,
    # all 30 within 0.094, as the two runs drift apart while learning the batch by heart
    torch.testing.assert_close(fp8[:10], bf16[:10], rtol=0.05, atol=0)
    torch.testing.assert_close(fp8, bf16, rtol=0, atol=0.15)
