from dataclasses import dataclass

import pytest

from configurator import ConfigError, configure, show_value
from helpers import REPO, run_in_process
from train import TrainConfig


@dataclass
class Cfg:
    out_dir: str = "out"
    batch_size: int = 12
    learning_rate: float = 1e-3
    compile: bool = False
    top_k: int | None = 200


def test_defaults():
    assert configure(Cfg, []) == Cfg()


def test_overrides_parse_as_literals_and_bare_strings():
    cfg = configure(Cfg, ["--batch_size=32", "--learning_rate=3e-4", "--compile=True", "--top_k=None",
                          "--out_dir=out-shakespeare"])
    assert cfg == Cfg(out_dir="out-shakespeare", batch_size=32, learning_rate=3e-4, compile=True, top_k=None)


def test_int_accepted_for_float():
    cfg = configure(Cfg, ["--learning_rate=1"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_value_may_contain_equals_sign():
    assert configure(Cfg, ["--out_dir=runs/a=1,b=2"]).out_dir == "runs/a=1,b=2"


def test_config_file_then_override(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text("import math\nbatch_size = 4\nlearning_rate = 2 * 1e-3\n_private = 3\n")
    cfg = configure(Cfg, [str(path), "--batch_size=8"])
    assert cfg.batch_size == 8 and cfg.learning_rate == 2e-3
    assert configure(Cfg, ["--batch_size=8", str(path)]) == cfg  # an override wins wherever it is typed
    other = tmp_path / "other.py"
    other.write_text("batch_size = 6\n")
    assert configure(Cfg, [str(path), str(other)]).batch_size == 6  # of two files, the later wins


def test_a_text_setting_takes_text_that_looks_like_a_number():
    @dataclass
    class Text:
        start: str = "\n"
        run_name: str | None = None
    assert configure(Text, ["--start=42", "--run_name=2024"]) == Text(start="42", run_name="2024")
    assert configure(Text, ["--run_name=None"]).run_name is None
    assert configure(Cfg, ["--out_dir=3"]).out_dir == "3"


def test_shipped_configs_load():
    gpu = configure(TrainConfig, [f"{REPO}/config/train_shakespeare_char.py"])
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size, gpu.batch_size) == (6, 6, 384, 256, 64)
    assert gpu.out_dir == "out-shakespeare-char" and gpu.max_iters == gpu.lr_decay_iters == 5000
    cpu = configure(TrainConfig, [f"{REPO}/config/train_shakespeare_char_cpu.py"])
    assert cpu.out_dir == "out-shakespeare-char-cpu"


def test_the_settings_given_are_recorded():
    """For settings that follow others unless given (sizing.py): the keys of the config files and the
    command line, whatever their values (--n_layer=6 is given, though 6 is the default)."""
    cfg = configure(TrainConfig, [f"{REPO}/config/train_shakespeare_char_cpu.py", "--n_layer=6"])
    assert {"n_layer", "eval_iters", "size_to_budget"} <= set(cfg.given_settings)
    assert "n_embd" not in cfg.given_settings and cfg.n_layer == 6 == TrainConfig.n_layer
    assert configure(TrainConfig, []).given_settings == ()
    with pytest.raises(ConfigError, match="'--given_settings' is not a setting here"):
        configure(TrainConfig, ["--given_settings=('n_layer',)"])


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=3"], "unknown config key '--batch_sise'; did you mean 'batch_size'"),
    (["--batch_size=3.5"], "batch_size must be int, got 3.5"),
    (["--batch_size=True"], "batch_size must be int"),
    (["--compile=yes"], "compile must be bool, got 'yes'"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--top_k=1.5"], "top_k must be int or None"),
    (["--batch_size"], "has no value"),
    (["no_such_config.py"], "config file 'no_such_config.py' not found"),
])
def test_errors_name_the_problem(argv, message):
    with pytest.raises(ConfigError) as e:
        configure(Cfg, argv)
    assert message in str(e.value)


def test_a_config_file_that_sets_nothing_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"n_layer": 4}\n')  # runs as Python, and assigns nothing
    with pytest.raises(ConfigError, match=r"c.json' sets nothing; a config file assigns settings in Python, one a "
                                          r"line: n_layer = 4$"):
        configure(Cfg, [str(path)])


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' in .*bad.py; did you mean 'learning_rate'"):
        configure(Cfg, [str(path)])


def test_a_field_the_script_sets_itself_is_not_a_setting(tmp_path):
    with pytest.raises(ConfigError, match="'--vocab_size' is not a setting here: it is the dataset's number of "
                                          "tokens"):
        configure(TrainConfig, ["--vocab_size=100"])
    path = tmp_path / "cfg.py"
    path.write_text("vocab_size = 100\n")
    with pytest.raises(ConfigError, match="'vocab_size' in .*cfg.py is not a setting here"):
        configure(TrainConfig, [str(path)])


def test_broken_config_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="failed to run: SyntaxError"):
        configure(Cfg, [str(path)])


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_scripts_exit_2_with_one_line(script):
    r = run_in_process(script, "--n_layr=3" if script == "train.py" else "--temprature=1")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown config key")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("script, flag", [("train.py", "--help"), ("train.py", "-h"), ("sample.py", "--help"),
                                          ("bench.py", "-h")])
def test_help_lists_every_setting_with_its_default_type_and_meaning(script, flag):
    """Generated from the dataclasses and their comments: every setting, none without a meaning."""
    import dataclasses
    import importlib
    module = importlib.import_module(script[:-3])
    config_class = {"train": "TrainConfig", "sample": "SampleConfig", "bench": "BenchConfig"}[script[:-3]]
    config_class = getattr(module, config_class)
    r = run_in_process(script, "config/train_shakespeare_char.py", flag)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"usage: python {script} [CONFIG.py ...] [--key=value ...]")
    lines = r.stdout.splitlines()
    for f in dataclasses.fields(config_class):
        rows = [line.split() for line in lines if line.split()[:1] == [f"--{f.name}={show_value(f.default)}"]]
        if f.name in getattr(config_class, "not_settings", {}):
            assert rows == [], f.name
            continue
        assert len(rows) == 1, f.name
        kind = getattr(f.type, "__name__", str(f.type))
        assert " ".join(rows[0][1:]).startswith(kind) and len(" ".join(rows[0][1:])) > len(kind) + 5, rows[0]
