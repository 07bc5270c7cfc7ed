import json
import re

import jsonschema
import pytest
import torch
import yaml

from pipelines.common.config import SCHEMA_COMMAND, SCHEMA_FILE, Config, from_dict, load_config, schema_text
from sagan.config import ConfigError, dump_yaml, flatten, to_dict, validate, with_overrides
from sagan.models import build_models
from sagan.step import make_optimizers


def test_defaults_are_the_demo_setting():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert (cfg.model.resolution, cfg.model.num_classes, cfg.scaling.num_workers) == (32, 10, 2)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.g_attn=[8,16]", "optim.lr_d=3e-4", "run.name=x"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "optim.lr_d=4e-4",
            "model.g_attn=[8,16]",
            "model.d_attn=[]",
            "train.precision=bf16",
            "model.g_sn=false",
            "eval.inception_weights=/w.pth",
        ],
    )
    assert cfg.optim.lr_d == 4e-4 and isinstance(cfg.optim.lr_d, float)
    assert cfg.model.g_attn == (8, 16) and cfg.model.d_attn == ()
    assert cfg.train.precision == "bf16" and cfg.model.g_sn is False
    assert cfg.eval.inception_weights == "/w.pth"


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 3\n")
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.batch_size) == (9, 3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.foo=1", "unknown config key 'model.foo'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("train.steps=abc", "train.steps: expected int, got 'abc'"),
        ("train.steps=1.5", "train.steps: expected int"),
        ("model.g_sn=3", "model.g_sn: expected bool"),
        ("optim.betas=[0.1]", "optim.betas: expected 2 values"),
        ("model.g_attn=[4]", r"model.g_attn has no \[4\]"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("data.verify=md5", "data.verify: 'md5' is not one of full, size, off"),
        ("train.steps=0", "train.steps: must be positive"),
        ("steps", "not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_data_verify_takes_off_unquoted_as_yaml_reads_it():
    assert load_config(None, ["data.verify=off"]).data.verify == "off"
    assert load_config(None, ["data.verify=size"]).data.verify == "size"
    assert load_config(None).data.verify == "full"


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr_q: 1\n")
    with pytest.raises(ConfigError, match="optim.lr_q"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_imagenet128_config_is_the_papers_setting():
    cfg = load_config("configs/imagenet128.yaml")
    m, o = cfg.model, cfg.optim
    assert (m.resolution, m.ch, m.z_dim, m.num_classes, m.g_attn, m.d_attn) == (128, 64, 128, 1000, (64,), (64,))
    assert (o.lr_g, o.lr_d, o.betas, o.n_dis) == (1e-4, 4e-4, (0.0, 0.999), 1)
    assert cfg.train.batch_size * cfg.scaling.num_workers == 256
    assert cfg.train.ema_decay > 0


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.eval.feature_extractor == "sample-classifier"


def test_integer_betas_from_yaml_build_an_adam(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  betas: [0, 0.999]\nmodel:\n  ch: 8\n  g_attn: []\n  d_attn: []\n")
    cfg = load_config(path)
    assert cfg.optim.betas == (0.0, 0.999) and all(isinstance(b, float) for b in cfg.optim.betas)
    G, D = build_models(cfg.model)
    opt_g, _ = make_optimizers(G, D, cfg)
    G(torch.randn(2, cfg.model.z_dim), torch.tensor([0, 1])).mean().backward()
    opt_g.step()


def test_flatten_gives_dotted_params():
    flat = flatten(load_config(None))
    assert flat["optim.lr_d"] == 4e-4 and flat["model.g_attn"] == [16]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr_g=-1", "optim.lr_g: must be a finite number above 0"),
        ("optim.lr_d=.inf", "optim.lr_d: must be a finite number above 0"),
        ("scaling.cpus_per_worker=-2", "scaling.cpus_per_worker"),
        ("train.eval_every=-5", "train.eval_every: must be 0 or more"),
        ("model.ch=1", "model.ch: attention at G@16 would have 4 channels"),
    ],
)
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_empty_section_and_non_mapping_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  # ch: 8\n")
    assert load_config(path).model.ch == 16
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  ch: 8\n   z_dim: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (
        str(e.value) == f"config file {path} is not valid YAML at line 3, column 9: mapping values are not allowed here"
    )


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr_q=1"])
    assert str(e.value) == "unknown config key 'optim.lr_q'; valid keys here: betas, lr_d, lr_g, n_dis"


@pytest.mark.parametrize(
    "text, message",
    [
        ('train:\n  steps: "16"\n', "train.steps: expected int, got '16' ({path} line 2, column 10)"),
        ("train:\n  steps: true\n", "train.steps: expected int, got True ({path} line 2, column 10)"),
        (
            "optim:\n  lr_q: 1\n",
            "unknown config key 'optim.lr_q'; valid keys here: betas, lr_d, lr_g, n_dis ({path} line 2, column 3)",
        ),
        (
            "optim:\n  betas: [0.5, 2]\n",
            "optim.betas: each value must be in [0, 1), got 2.0 ({path} line 2, column 16)",
        ),
        ("model: [1]\n", "model: expected a mapping of keys, got [1] ({path} line 1, column 8)"),
        (
            "model:\n  ch: 1\n",
            "model.ch: attention at G@16 would have 4 channels; it needs a multiple of 8 ({path} line 2, column 7)",
        ),
        (
            "model:\n  g_attn: [4]\n",
            "model.g_attn has no [4] feature map for attention; valid sizes are [8, 16, 32] ({path} line 2, column 11)",
        ),
        ("data:\n  verify: md5\n", "data.verify: 'md5' is not one of full, size, off ({path} line 2, column 11)"),
    ],
)
def test_a_bad_value_in_the_file_names_its_line_and_column(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == message.format(path=path)


def test_a_bad_override_names_no_position_even_over_a_file_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nmodel:\n  ch: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.steps=x"])
    assert str(e.value) == "train.steps: expected int, got 'x'"
    with pytest.raises(ConfigError) as e:
        load_config(path, ["model.ch=1"])  # a check across keys, on the overridden key
    assert str(e.value).endswith("it needs a multiple of 8")


def test_yaml_1_1_readings_are_kept(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 (no dot) as a string, 2 as an int, an unquoted off as false.
    path.write_text(
        "optim:\n  lr_g: 1e-4\n  lr_d: 2\ndata:\n  verify: off\ntrain:\n  compile: auto\n  channels_last: auto\n"
    )
    cfg = load_config(path)
    assert cfg.optim.lr_g == 1e-4 and cfg.optim.lr_d == 2.0 and isinstance(cfg.optim.lr_d, float)
    assert cfg.data.verify == "off" and cfg.train.compile is None and cfg.train.channels_last is None
    assert load_config(None, ["run.name=2024", "model.g_attn=8"]).run.name == "2024"  # numbers as text; one size
    assert load_config(None, ["model.g_attn=8"]).model.g_attn == (8,)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.resolution=48", "model.resolution: 48 is not one of 32, 64, 128"),
        ("model.resolution='32'", "model.resolution: expected int, got '32'"),
        ("optim.lr_g=true", "optim.lr_g: expected float, got True"),
        ("eval.num_samples=5", "eval.num_samples: must be at least 10 (IS uses 10 splits), got 5"),
        ("data.loader_workers=-1", "data.loader_workers: must be 0 or more (or null for the rank's CPUs), got -1"),
        ("train.diverge_factor=0.5", "train.diverge_factor: must be 0 (off) or above 1, got 0.5"),
        ("train.ema_decay=1", "train.ema_decay: must be in [0, 1), got 1.0"),
        ("tune.reduction_factor=1", "tune.reduction_factor: must be above 1, got 1.0"),
        ("tune.lr_g=[1e-4,-1]", "tune.lr_g: each value must be a finite number above 0, got -1.0"),
        ("tune.name=it's", "tune.name: 'it's' must be letters, digits"),
        ("tune.metric=loop/acc", "tune.metric: 'loop/acc' is not reported by the training loop; use one of loop/fid"),
        ("model=5", "model: expected a mapping of keys, got 5"),
    ],
)
def test_each_refusal_is_one_line_naming_the_key_value_and_rule(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(None, [override])
    assert len(str(e.value).splitlines()) == 1


def test_config_objects_compare_copy_and_take_assignments():
    cfg = load_config(None, ["tune.attn=[[16],[]]", "model.g_attn=[8,16]"])
    assert cfg.model.g_attn == (8, 16) and hash(cfg.model.g_attn) == hash((8, 16))
    assert from_dict(to_dict(cfg)) == cfg and from_dict(to_dict(cfg)) is not cfg
    assert to_dict(cfg)["tune"]["attn"] == [[16], []] and to_dict(cfg)["model"]["g_attn"] == [8, 16]
    assert with_overrides(cfg, ["train.steps=5"]).train.steps == 5 and cfg.train.steps == 1000
    cfg.run.name = "renamed"  # the pipelines set paths and names on a loaded config
    assert cfg.run.name == "renamed" and cfg != load_config(None, ["tune.attn=[[16],[]]", "model.g_attn=[8,16]"])
    assert flatten(Config())["model.g_attn"] == [16]
    cfg.train.steps = 0  # assignments are not checked; validate() checks the whole tree again
    with pytest.raises(ConfigError, match="train.steps: must be positive"):
        validate(cfg)


def test_schema_file_is_current():
    assert SCHEMA_FILE.read_text() == schema_text(), f"configs/schema.json is stale; regenerate it: {SCHEMA_COMMAND}"


def test_every_config_file_validates_against_the_schema():
    schema = json.loads(SCHEMA_FILE.read_text())
    files = sorted(SCHEMA_FILE.parent.glob("*.yaml"))
    assert files
    for path in files:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    for bad in ({"train": {"steps": "x"}}, {"train": {"stpes": 5}}, {"model": {"resolution": 48}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    jsonschema.validate({"model": None, "train": {"compile": "auto"}}, schema)  # as load_config reads them
