"""`pixart-ds model-info` and `pixart-ds convert`, run as a user would (subprocess)."""
import dataclasses
import json

import pytest
import torch

from pixart_ds.model.convert import write_official
from pixart_ds.model.pixart import build_model
from pixart_ds.model.weights import load_ours, save_ours
from pixart_ds.testing import randomize, tiny_cfg


def test_model_info_json_counts(run_cli):
    p = run_cli("model-info", "--preset", "PixArt-XL/2", "--json", check=True)
    info = json.loads(p.stdout)
    assert info["total"] == 610_856_096 and sum(info["components"].values()) == info["total"]
    p = run_cli("model-info", "--preset", "PixArt-XL/2", "--multi-scale", "--json", check=True)
    assert json.loads(p.stdout)["total"] == 611_349_152


def test_model_info_text_shows_block_adaln_next_to_paper(run_cli):
    p = run_cli("model-info", "--adaln", "block", check=True)
    assert "828,494,240 trainable parameters" in p.stdout
    assert "833M" in p.stdout and "blocks.adaln_mlp" in p.stdout


def test_model_info_bad_preset_is_one_line_error(run_cli):
    p = run_cli("model-info", "--preset", "PixArt-XXL/2")
    assert p.returncode == 2 and "unknown model preset 'PixArt-XXL/2'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_convert_official_to_ours_and_diffusers(run_cli, tmp_path):
    model = randomize(build_model(tiny_cfg(attention="sdpa")))
    write_official(str(tmp_path / "m.pth"), model.state_dict(), model)
    run_cli("convert", "--from", "official", "--to", "ours", tmp_path / "m.pth", tmp_path / "ours", check=True)
    cfg, res, sd = load_ours(str(tmp_path / "ours"))
    assert res == 64 and cfg.depth == 2 and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    p = run_cli("convert", "--from", "ours", "--to", "diffusers", tmp_path / "ours", tmp_path / "diff", check=True)
    assert "-> diffusers" in p.stdout
    assert json.loads((tmp_path / "diff" / "config.json").read_text())["_class_name"] == "PixArtTransformer2DModel"


def test_convert_refuses_bad_checkpoint_with_key_names(run_cli, tmp_path):
    cfg = tiny_cfg(attention="sdpa")
    sd = dict(build_model(cfg).state_dict())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 48)
    save_ours(str(tmp_path / "bad"), dataclasses.asdict(cfg.model), sd, 64)
    p = run_cli("convert", "--from", "ours", "--to", "official", tmp_path / "bad", tmp_path / "x.pth")
    assert p.returncode == 2
    assert "blocks.0.attn.qkv.weight: file [10, 48] vs model [144, 48]" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.pth").exists()


def test_convert_dit_checkpoint(run_cli, tmp_path):
    stage1 = randomize(build_model(tiny_cfg(adaln="block", condition="class", attention="sdpa")))
    sd = dict(stage1.state_dict())
    sd["pos_embed"] = stage1.pos_embed
    torch.save(sd, tmp_path / "dit.pt")
    p = run_cli("convert", "--from", "dit", "--to", "official", tmp_path / "dit.pt", tmp_path / "pixart.pth",
                "--reparam-t", "250", "--model-json", '{"caption_channels": 32, "max_text_tokens": 8, "num_heads": 3}',
                check=True)
    out = torch.load(tmp_path / "pixart.pth", weights_only=True)["state_dict"]
    assert "t_block.1.weight" in out and "blocks.1.cross_attn.kv_linear.weight" in out
    assert torch.count_nonzero(out["blocks.0.cross_attn.proj.weight"]) == 0
    assert "single/text" in p.stdout


def test_convert_dit_of_no_preset_size_takes_num_heads_from_model_json(run_cli, tmp_path):
    """A DiT whose (depth, width, patch) matches no preset: --model-json gives its num_heads, as the error says."""
    cfg = tiny_cfg(adaln="block", condition="class", attention="sdpa", depth=3, num_heads=4)
    stage1 = randomize(build_model(cfg))
    sd = dict(stage1.state_dict())
    sd["pos_embed"] = stage1.pos_embed
    torch.save(sd, tmp_path / "dit.pt")
    args = ["convert", "--from", "dit", "--to", "ours", tmp_path / "dit.pt"]
    p = run_cli(*args, tmp_path / "no", "--model-json", '{"caption_channels": 32, "max_text_tokens": 8}')
    assert p.returncode == 2 and "cannot infer num_heads" in p.stderr and "--model-json" in p.stderr
    run_cli(*args, tmp_path / "ours", "--model-json",
            '{"num_heads": 4, "caption_channels": 32, "max_text_tokens": 8}', check=True)
    mc, res, out = load_ours(str(tmp_path / "ours"))
    assert (mc.depth, mc.hidden_size, mc.num_heads, mc.adaln, mc.condition) == (3, 48, 4, "single", "text")
    assert torch.equal(out["blocks.2.attn.qkv.weight"], sd["blocks.2.attn.qkv.weight"])


@pytest.mark.parametrize("src, raw_key, ema_key", [("dit", "model", "ema"), ("official", "state_dict",
                                                                             "state_dict_ema")])
def test_convert_chooses_the_ema_of_a_training_checkpoint(run_cli, tmp_path, src, raw_key, ema_key):
    """Training checkpoints hold raw and EMA weights: the EMA by default (said on stderr), --weights raw the other."""
    cond = "class" if src == "dit" else "text"
    raw_model = randomize(build_model(tiny_cfg(adaln="block" if src == "dit" else "single", condition=cond,
                                               attention="sdpa")), seed=1)
    raw = dict(raw_model.state_dict(), pos_embed=raw_model.pos_embed)
    ema = {k: v + 1.0 if v.is_floating_point() and k != "pos_embed" else v for k, v in raw.items()}
    torch.save({raw_key: raw, ema_key: ema, "steps": 7}, tmp_path / "train.pth")
    extra = ["--model-json", '{"caption_channels": 32, "max_text_tokens": 8}'] if src == "dit" else []
    probe = "x_embedder.proj.weight"
    p = run_cli("convert", "--from", src, "--to", "ours", tmp_path / "train.pth", tmp_path / "ema", *extra, check=True)
    assert f"using the ema weights ('{ema_key}'; the file also holds '{raw_key}')" in p.stderr
    assert torch.equal(load_ours(str(tmp_path / "ema"))[2][probe], ema[probe])
    p = run_cli("convert", "--from", src, "--to", "ours", tmp_path / "train.pth", tmp_path / "raw", *extra,
                "--weights", "raw", check=True)
    assert f"using the raw weights ('{raw_key}'" in p.stderr
    assert torch.equal(load_ours(str(tmp_path / "raw"))[2][probe], raw[probe])
    torch.save(raw, tmp_path / "bare.pth")
    p = run_cli("convert", "--from", src, "--to", "ours", tmp_path / "bare.pth", tmp_path / "x", *extra,
                "--weights", "ema")
    assert p.returncode == 2 and "--weights ema" in p.stderr and "one weight set" in p.stderr
