"""The recipe schema: strict loading, dotted overrides, derived values, errors that name file and key."""
import dataclasses
import os

import pytest
import yaml

from pixart_ds import config
from pixart_ds.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, data, name="x.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, {"model": {"hiden_size": 64}})
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value) == f"{p}: model.hiden_size: unknown key (did you mean hidden_size?)"


def test_unknown_section_and_nested_list_key(tmp_path):
    p = write(tmp_path, {"modle": {}})
    with pytest.raises(ConfigError, match=r"x.yaml: modle: unknown key \(did you mean model\?\)"):
        config.load(p)
    p = write(tmp_path, {"data": {"sources": [{"local": "a", "proportoin": 1.0}]}})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].proportoin: unknown key"):
        config.load(p)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"model": {"depth": "deep"}}, "model.depth: expected an integer"),
        ({"model": {"adaln": "double"}}, "model.adaln: 'double' is not one of single, block"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"model": {"multi_scale": 1}}, "model.multi_scale: expected true/false"),
        ({"train": {"adam_betas": [0.9]}}, "train.adam_betas: expected 2 items"),
        ({"data": {"sources": {"local": "a"}}}, "data.sources: expected a list"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, data, key):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}: {key}")


def test_preset_fills_dimensions_and_explicit_keys_win(tmp_path):
    p = write(tmp_path, {"model": {"preset": "PixArt-S/2", "depth": 4}})
    cfg = config.load(p)
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads) == (4, 384, 6)
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'PixArt-XXL/2'"):
        config.load(write(tmp_path, {"model": {"preset": "PixArt-XXL/2"}}))


def test_overrides_are_dotted_yaml_values(tmp_path):
    p = write(tmp_path, {"model": {"preset": "tiny"}})
    cfg = config.load(p, ["model.depth=4", "train.lr=1e-4", "data.sources=[{local: /d, proportion: 3}]",
                          "log.sample_prompts=[a cat, a dog]", "train.init_from=null"])
    assert cfg.model.depth == 4 and cfg.train.lr == 1e-4
    assert cfg.data.sources[0].local == "/d" and cfg.data.sources[0].proportion == 3.0
    assert cfg.log.sample_prompts == ("a cat", "a dog")
    with pytest.raises(ConfigError, match=r"override model.detph\): model.detph: unknown key \(did you mean depth\?\)"):
        config.load(p, ["model.detph=4"])
    with pytest.raises(ConfigError, match="an override must look like key.path=value"):
        config.load(p, ["model.depth"])


def test_config_is_frozen():
    cfg = config.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.depth = 3


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"train": {"global_batch_size": 8, "micro_batch_size": 16}}, "train.micro_batch_size: 16 exceeds"),
        ({"model": {"preset": "tiny", "num_heads": 5}}, "model.hidden_size: 48 is not divisible by model.num_heads=5"),
        ({"data": {"resolution": 260}}, "data.resolution: 260 is not a multiple of 8 x patch size = 16"),
        ({"model": {"multi_scale": True}}, "data.multi_scale: False but model.multi_scale is True"),
        ({"data": {"sources": [{"local": "a", "proportion": 1}, {"local": "b"}]}}, "data.sources: either every"),
    ],
)
def test_inconsistent_values_are_refused(data, msg):
    with pytest.raises(ConfigError, match=msg):
        config.from_dict(data, "r.yaml")


def test_batch_plan_keeps_the_global_batch():
    cfg = config.from_dict({"train": {"global_batch_size": 11392, "micro_batch_size": 178}})
    assert config.batch_plan(cfg, 64) == (178, 1)
    assert config.batch_plan(cfg, 32) == (178, 2)
    assert config.batch_plan(cfg, 16) == (178, 4)
    micro, accum = config.batch_plan(cfg, 8)
    assert micro * accum * 8 == 11392 and micro <= 178
    with pytest.raises(ConfigError, match="train.global_batch_size: 11392 is not divisible by the world size 3"):
        config.batch_plan(cfg, 3)


def test_derived_values():
    cfg = config.from_dict({"data": {"resolution": 1024}})
    assert config.latent_size(cfg) == 128 and config.pe_interpolation(cfg) == 2.0
    assert config.pe_interpolation(config.from_dict({"data": {"resolution": 256}})) == 0.5
    cfg = config.from_dict({"train": {"lr": 2e-5, "lr_scaling": "sqrt", "global_batch_size": 1024}})
    assert config.effective_lr(cfg) == pytest.approx(4e-5)


def test_dump_roundtrip_and_diff(tmp_path):
    cfg = config.load(None, ["model.preset=tiny", "data.sources=[{local: /d}]", "train.lr=3e-4"])
    config.dump(cfg, tmp_path / "run" / "config.yaml")
    again = config.load(tmp_path / "run" / "config.yaml")
    assert again == cfg
    changed = config.replace(cfg, **{"train.lr": 1e-3, "model.depth": 3})
    assert config.diff(cfg, changed) == ["model.depth", "train.lr"]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: recipe file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config.load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: the recipe must be a mapping"):
        config.load(lst)


def test_every_recipe_key_has_a_description():
    keys = config.describe_keys()
    assert len(keys) > 70
    assert not [k for k, _, doc in keys if not doc], "config fields without a one-line docstring"
    assert ("train.lr", "2.0e-05", "Learning rate after warm-up (constant).") in keys
    assert any(k == "data.sources[i].remote" for k, _, _ in keys)


def test_keys_verb_and_recipe_doc_are_current(run_cli):
    p = run_cli("keys", "--markdown", check=True)
    with open(os.path.join(REPO, "docs", "recipe.md")) as f:
        assert f.read() == p.stdout, "docs/recipe.md is stale: pixart-ds keys --markdown > docs/recipe.md"
    p = run_cli("keys", "--grep", "ema_decay", check=True)
    assert p.stdout.split()[:2] == ["train.ema_decay", "0.9999"]
    p = run_cli("keys", "--grep", "no_such_key")
    assert p.returncode == 2 and p.stderr.strip() == "pixart-ds keys: error: --grep 'no_such_key': no recipe key " \
                                                       "contains it"
