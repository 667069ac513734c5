"""config.py: defaults, presets, overrides, validation and round trips."""
import re
import sys

import pytest
import torch

from config import GPT2_CONFIGS, GPT2Config, ConfigError, MODEL_SHAPE_KEYS, field_names, parse_args, preset_config


def test_defaults_match_the_project_description():
    c = GPT2Config()
    expected = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, batch_size=12,
                    learning_rate=6e-4, max_iters=100000, data_dir="./data/shakespeare", warmup_iters=2000,
                    lr_decay_iters=100000, min_lr=6e-5, grad_clip=1.0, checkpoint_dir="./checkpoints",
                    log_dir="./runs", device="auto",
                    # AdamW as GPT-3's paper trains (appendix B), the usual recipe for GPT-2 sizes
                    weight_decay=0.1, beta1=0.9, beta2=0.95, dropout=0.0, bias=True)
    assert {k: getattr(c, k) for k in expected} == expected
    c.validate()


def test_description_snippet_applies_a_preset():
    config = GPT2Config()
    for k, v in GPT2_CONFIGS["gpt2-medium"].items():
        setattr(config, k, v)
    assert (config.n_layer, config.n_head, config.n_embd) == (24, 16, 1024)
    assert GPT2Config.n_layer == 12  # the class defaults are untouched


@pytest.mark.parametrize("name, shape, lr", [("gpt2", (12, 12, 768), 6e-4), ("gpt2-medium", (24, 16, 1024), 3e-4),
                                             ("gpt2-large", (36, 20, 1280), 2.5e-4), ("gpt2-xl", (48, 25, 1600), 2e-4)])
def test_gpt2_presets(name, shape, lr):
    c = preset_config(name)
    assert (c.n_layer, c.n_head, c.n_embd) == shape
    # GPT-3's learning rates for models of these sizes (its paper's Table 2.1), decaying to a tenth
    assert (c.learning_rate, c.min_lr) == pytest.approx((lr, lr / 10), rel=1e-12)
    # the loss in one chunk for a 16 x 1024 micro-batch, as measured faster on a GPU; the class keeps the plain loss
    assert c.loss_chunk_rows == 16 * 1024 and GPT2Config.loss_chunk_rows == 0
    c.validate()


@pytest.mark.parametrize("name, setup", [
    # the setups BENCHMARKS.md measured: the GPU target run (6/6/384, block 256, batch 64, 5000 steps,
    # evaluation every 250 over 50 batches) and the 2-core CPU run
    ("shakespeare-char", dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                              learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100, max_iters=5000,
                              lr_decay_iters=2500, eval_interval=250, eval_iters=50, compile_eval=False,
                              log_interval=50, sample_tokens=0, data_dir="./data/shakespeare_char",
                              compile_mode="reduce-overhead")),
    ("shakespeare-char-cpu", dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                                  learning_rate=3e-3, min_lr=3e-4, beta2=0.99, warmup_iters=100, max_iters=2000,
                                  lr_decay_iters=2000, eval_interval=500, eval_iters=50, device="cpu",
                                  compile=False, log_interval=50, data_dir="./data/shakespeare_char")),
])
def test_the_character_presets_are_the_measured_setups(name, setup):
    assert GPT2_CONFIGS[name] == setup  # every key: each one was part of what was measured
    c = preset_config(name)
    assert {k: getattr(c, k) for k in setup} == setup


COUNT_FIELDS = [k for k in field_names() if type(getattr(GPT2Config, k)) is int and k != "seed"]


@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_every_count_is_checked(field):
    """--keep_last_n=-1 deleted a kept checkpoint at every save; --eval_interval=0 divided by zero mid-run."""
    with pytest.raises(ConfigError, match=rf"{field} must be an integer >"):
        GPT2Config(**{field: -1}).validate()
    with pytest.raises(ConfigError, match=rf"{field} must be an integer >"):
        GPT2Config(**{field: 2.0}).validate()


@pytest.mark.parametrize("field", ["data_dir", "checkpoint_dir", "log_dir"])
def test_an_empty_path_is_refused(field):
    """--checkpoint_dir=$UNSET would put the checkpoints in the current folder."""
    with pytest.raises(ConfigError, match=f"{field} must be a non-empty string, got ''"):
        parse_args([f"--{field}="])[0].validate()


@pytest.mark.parametrize("overrides, problem", [
    (dict(beta2=1.0), "beta2 must be in [0, 1), got 1.0"),
    (dict(beta1=1), "beta1 must be in [0, 1), got 1"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(seed=2**63), "seed must be an integer from 0 to 2**63 - 1"),
    (dict(seed=-1), "seed must be an integer from 0 to 2**63 - 1"),
    (dict(fp8=True, n_embd=24, n_head=2), "fp8 needs n_embd (24) and batch_size x block_size"),
    (dict(fp8=True, batch_size=3, block_size=5), "batch_size x block_size (15) divisible by 16"),
    (dict(min_lr=1e-3, learning_rate=6e-4), "min_lr (0.001) must not exceed learning_rate"),
    # AdamW's decoupled decay multiplies the weights by 1 - lr x wd: at 1 they are zeroed
    (dict(weight_decay=1000, learning_rate=1e-3, min_lr=0), "weight_decay x learning_rate (1000 x 0.001) must be "
                                                            "below 1"),
])
def test_values_just_past_a_limit_are_refused(overrides, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        GPT2Config(**overrides).validate()


@pytest.mark.parametrize("overrides", [dict(min_lr=6e-4, learning_rate=6e-4), dict(seed=2**63 - 1), dict(seed=0),
                                       dict(beta2=0.0, dropout=0.999), dict(fp8=True, n_embd=32, n_head=2),
                                       dict(weight_decay=999, learning_rate=1e-3, min_lr=0)])
def test_values_at_a_limit_are_taken(overrides):
    GPT2Config(**overrides).validate()


def test_a_weight_decay_alone_waits_for_the_learning_rate():
    """A resumed run's flags are checked alone (partial): its learning rate may come from the checkpoint."""
    parse_args(["--weight_decay", "2000"])
    with pytest.raises(ConfigError) as e:  # an infinite one is named once, not again in the product
        GPT2Config(weight_decay=float("inf")).validate()
    assert "weight_decay must be a number" in str(e.value) and "weight_decay x learning_rate" not in str(e.value)


def test_a_boolean_is_no_number_for_a_float_field():
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_args(["--learning_rate=True"])[0].validate()


def test_every_preset_validates():
    for name in GPT2_CONFIGS:
        preset_config(name).validate()


def test_dtype_accepts_torch_dtypes_and_strings():
    c = GPT2Config()
    c.dtype = torch.float16
    assert c.dtype == "float16"  # stored as its name, as a flag gives it
    c.dtype = torch.bfloat16
    assert c.to_dict()["dtype"] == "bfloat16"
    c.dtype = "float64"
    with pytest.raises(ConfigError, match="dtype"):
        c.validate()
    with pytest.raises(ConfigError):
        c.dtype = torch.int32


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_float16_before_ampere(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) only emulate bfloat16, which torch.cuda.is_bf16_supported() still calls
    # supported; the capability is asked of the GPU that will run, not of the current one
    from utils import resolve_dtype
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    device = torch.device("cuda", 1)
    assert resolve_dtype("auto", device) == expected
    assert asked == [device]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_validate_reports_every_problem_at_once():
    c = GPT2Config(n_embd=100, n_head=3, min_lr=1.0, block_size=0, dropout=1.5)
    with pytest.raises(ConfigError) as e:
        c.validate()
    msg = str(e.value)
    for needle in ("n_embd (100) must be divisible by n_head (3)", "min_lr (1.0) must not exceed",
                   "block_size must be an integer > 0", "dropout must be in [0, 1)"):
        assert needle in msg
    assert "\n" not in msg  # one line for the command-line scripts


@pytest.mark.parametrize("overrides, problem", [
    (dict(dtype=["float16"]), "dtype must be one of"),  # a list: no TypeError from the lookup
    (dict(device="cudafoo"), "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'cudafoo'"),
    (dict(device="cuda:x"), "got 'cuda:x'"),
    (dict(compile=1), "compile must be True, False or 'auto', got 1"),  # 1 == True, but is not True
    (dict(cuda_graph="yes"), "cuda_graph must be True, False or 'auto', got 'yes'"),
    (dict(cuda_graph=0), "cuda_graph must be True, False or 'auto', got 0"),
    (dict(compile_mode=["default"]), "compile_mode must be one of"),
])
def test_values_of_the_wrong_kind_are_problems_too(overrides, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        GPT2Config(**overrides).validate()
    GPT2Config(device="cuda:1", compile=True).validate()


@pytest.mark.parametrize("name", ["cpu:0", "mps:0", "cuda:x", "cuda ", "cuda:-1", "gpu", "meta", "", "cuda:01",
                                  "cuda:\u0661", "cuda:" + "9" * 20])
def test_generate_and_bench_refuse_the_device_names_that_train_refuses(name):
    """torch.device takes 'cpu:0', 'cuda ' and 'meta'; a name that one script takes and another refuses is a trap."""
    from utils import UserError, resolve_device
    message = f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        GPT2Config(device=name).validate()
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        resolve_device(name)
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu")  # what torch may give out itself


@pytest.mark.parametrize("index", [2, 128, 255, 256, 999999999])
def test_a_gpu_index_past_the_machines_gpus_is_refused_not_wrapped(monkeypatch, index):
    """torch.device keeps an index's low 8 bits: 'cuda:255' is the current GPU, 'cuda:128' is cuda:-128."""
    from utils import DeviceError, resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=rf"^--device=cuda:{index} was asked for, but this machine has 2 CUDA GPU"):
        resolve_device(f"cuda:{index}")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda")
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_every_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'; did you mean 'n_layer'.*; unknown config "
                                          "key 'n_heads'; did you mean 'n_head'"):
        GPT2Config(n_layers=4, n_heads=4)


@pytest.mark.parametrize("lr, problem", [(-1.0, "learning_rate must be a number > 0, got -1.0"),
                                         (0.0, "learning_rate must be a number > 0, got 0.0")])
def test_a_bad_learning_rate_is_one_problem(lr, problem):
    with pytest.raises(ConfigError) as e:
        GPT2Config(learning_rate=lr, min_lr=0.0).validate()
    assert str(e.value) == f"invalid configuration: {problem}"


def test_lr_decay_problem_is_reported_with_the_others():
    c = GPT2Config(warmup_iters=100, lr_decay_iters=50, max_iters=1000, n_head=0)
    with pytest.raises(ConfigError) as e:
        c.validate()
    msg = str(e.value)
    assert "n_head must be an integer > 0" in msg
    assert "lr_decay_iters (50) must exceed warmup_iters (100)" in msg and "--lr_decay_iters=1000" in msg
    GPT2Config(warmup_iters=100, lr_decay_iters=50, decay_lr=False).validate()  # no decay, no constraint
    # the flags alone are checked field by field: a resumed run's checkpoint may supply warmup_iters
    config, _ = parse_args(["--lr_decay_iters=100"])
    with pytest.raises(ConfigError, match="lr_decay_iters .* must exceed"):
        config.validate()
    config.validate(partial=True)


def test_properties_are_not_settings():
    with pytest.raises(ConfigError, match="unknown config key 'padded_vocab_size'"):
        GPT2Config(padded_vocab_size=1)


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("TRUE", True), ("false", False),
                                         ("False", False), ("fAlSe", False), ("auto", "auto")])
def test_compile_flag_takes_booleans_in_any_case(text, value):
    config, explicit = parse_args([f"--compile={text}"])
    assert config.compile is value if isinstance(value, bool) else config.compile == value
    assert "compile" in explicit


def test_unknown_keys_suggest_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        GPT2Config(n_layers=4)
    c = GPT2Config()
    c.learning_rat = 1e-3  # setattr accepts anything; validate catches it
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        c.validate()


def test_to_dict_round_trip_is_plain_data():
    c = GPT2Config(n_layer=3, dtype=torch.bfloat16, compile=False)
    d = c.to_dict()
    assert set(d) == set(field_names())
    assert all(isinstance(v, (int, float, str, bool)) for v in d.values())
    assert GPT2Config.from_dict(d).to_dict() == d
    assert GPT2Config.from_dict({**d, "from_the_future": 1}).n_layer == 3


def test_padded_vocab_and_shape_keys():
    assert GPT2Config().padded_vocab_size == 50304
    assert GPT2Config(vocab_size=65).padded_vocab_size == 128
    assert set(MODEL_SHAPE_KEYS) <= set(field_names())


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean 'gpt2-xl'"):
        preset_config("gpt2-x")


@pytest.mark.parametrize("argv, problem", [
    (["--n_lay=4"], "unknown config key 'n_lay'; did you mean 'n_layer'?"),  # no abbreviations: a typo is no flag
    (["--learning=1e-3"], "unknown config key 'learning'"),
    (["-n_layer=4"], "'-n_layer=4' needs two dashes: --n_layer=4"),  # not "unknown ...; did you mean 'n_layer'"
    (["---max_iters", "4"], "'---max_iters' needs two dashes: --max_iters"),
    (["a.py", "b.py"], "unexpected argument 'b.py': give at most one config file"),
    ([""], "config file '' is empty; pass a Python file"),  # "$CFG" with CFG unset
    (["missing.py"], "config file 'missing.py' does not exist; pass a Python file"),
])
def test_what_the_command_line_refuses(argv, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_args(argv)


def test_string_fields_take_the_flag_as_written_and_paths_expand_home():
    import os
    config, _ = parse_args(["--log_dir=2024_01", "--checkpoint_dir=1e3", "--data_dir='a b'", "--init_from=~/m"])
    assert (config.log_dir, config.checkpoint_dir, config.data_dir) == ("2024_01", "1e3", "a b")
    assert config.init_from == os.path.expanduser("~/m")
    assert parse_args(["--data_dir=~/d"])[0].data_dir == os.path.expanduser("~/d")


def test_every_script_expands_home_in_its_paths(tmp_path, monkeypatch):
    """--checkpoint_dir=~/runs reaches the script unexpanded (no shell expands ~ after '='): train.py expands
    it, so the other scripts must too, or generate.py would not find what train.py wrote."""
    import bench
    import generate
    import prepare_data
    import tokenizer
    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    g = generate.get_parser().parse_args(["--checkpoint=~/c.pt", "--checkpoint_dir=~/ck", "--init_from=~/hf",
                                          "--prompt_file=~/p.txt"])
    assert (g.checkpoint, g.checkpoint_dir, g.init_from, g.prompt_file) == (
        f"{home}/c.pt", f"{home}/ck", f"{home}/hf", f"{home}/p.txt")
    assert generate.get_parser().parse_args(["--init_from=gpt2"]).init_from == "gpt2"
    d = prepare_data.parse_args(["--dataset=custom", "--input=~/in.txt", "--output_dir=~/data"])
    assert (d.input, d.output_dir) == (f"{home}/in.txt", f"{home}/data")
    t = tokenizer.build_parser().parse_args(["--train=~/a.txt", "--bench=~/b.txt", "--out=~/tok.json"])
    assert (t.train, t.bench, t.out) == (f"{home}/a.txt", f"{home}/b.txt", f"{home}/tok.json")
    b = bench.parse_args(["--data_dir=~/d", "--json=~/b.json"])
    assert (b.data_dir, b.json) == (f"{home}/d", f"{home}/b.json")
    assert bench.parse_args(["--tokenize", "--input=~/w.txt"]).input == f"{home}/w.txt"


def test_a_config_file_may_define_classes_but_must_run(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("class Sizes:\n    width = 256\nn_embd = Sizes.width\n")
    assert parse_args([str(ok)])[0].n_embd == 256
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = undefined_name\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py failed: NameError: name 'undefined_name'"):
        parse_args([str(bad)])


def test_a_config_file_runs_as_a_script(tmp_path, monkeypatch):
    """It knows its __file__ and may build paths with pathlib; a sys.exit() in it is an error, not the end of
    train.py; a helper name of its own must start with _."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.py").write_text("import os\nfrom pathlib import Path\n_width = 96\nn_embd = _width\n"
                                   "data_dir = os.path.join(os.path.dirname(__file__), 'data')\n"
                                   "checkpoint_dir = Path(__file__).parent / 'ck'\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config, _ = parse_args([str(folder / "run.py")])
    assert config.n_embd == 96
    assert (config.data_dir, config.checkpoint_dir) == (str(folder / "data"), str(folder / "ck"))
    (folder / "bye.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(ConfigError, match=r"config file .*bye.py failed: SystemExit: 0"):
        parse_args([str(folder / "bye.py")])
    (folder / "helper.py").write_text("BATCH = 8\nbatch_size = BATCH\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'BATCH' .*\(a name of the file's own starts with "
                                          r"_, e.g. _BATCH\)"):
        parse_args([str(folder / "helper.py")])
    # a file beside it named like one of this project's modules is not what `import data` finds
    (folder / "data.py").write_text("n_layer = 2\n")
    (folder / "mine.py").write_text("from data import *\n")
    path_before = list(sys.path)
    parse_args([str(folder / "mine.py")])
    assert sys.path == path_before and not getattr(sys.modules.get("data"), "__file__", "").startswith(str(folder))


def test_help_gives_each_fields_meaning_and_default():
    from config import MAX_SAMPLE_TOKENS, build_parser, field_comments
    comments = field_comments()
    assert set(comments) == set(GPT2Config().to_dict())
    for field, comment in comments.items():  # a comment cut where it went on to a second line
        assert comment.count("(") == comment.count(")") and not comment.endswith((",", "(", " at most")), field
    assert f"at most {MAX_SAMPLE_TOKENS:,};" in comments["sample_tokens"]
    text = " ".join(build_parser().format_help().split())
    assert "--block_size V context length in tokens (default: 1024)" in text
    assert "--weight_decay V applied to 2-D tensors only (matmul weights, embeddings) (default: 0.1)" in text
