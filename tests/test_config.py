import pytest
import torch

from sagan.config import Config, ConfigError, dump_yaml, flatten, load_config
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
