"""Checkpoint interop: parity with diffusers' PixArtTransformer2DModel, exact round trips, strict loading."""
import dataclasses
import json
import os

import pytest
import torch

from pixart_ds.commands.convert import run as convert_file
from pixart_ds.model.convert import (DIFFUSERS_NULL_CAPTION, diffusers_config, ours_to_diffusers, read_diffusers,
                                     read_official, write_diffusers, write_official)
from pixart_ds.model.pixart import build_model
from pixart_ds.model.weights import check_state_dict, load_model, load_ours, save_ours
from pixart_ds.testing import randomize, tiny_cfg


def _diffusers_model(model):
    from diffusers import PixArtTransformer2DModel

    dm = PixArtTransformer2DModel(**diffusers_config(model.cfg, 64))
    dm.load_state_dict(ours_to_diffusers(model.state_dict(), model.cfg), strict=True)
    return dm.eval()


def _batch(h, w, B=4, L=8, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    t = torch.tensor([0, 1, 500, 999])[:B]
    y = torch.randn(B, L, C, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.5).long()
    mask[:, 0] = 1  # diffusers' -10000 bias equals masking only when a caption has a real token
    hw = torch.tensor([[h * 8.0, w * 8.0]] * B)
    ar = torch.tensor([[h / w]] * B)
    return x, t, y, mask, hw, ar


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("multi_scale,hw", [(False, (8, 8)), (True, (8, 8)), (True, (6, 10))])
def test_parity_with_diffusers(backend, multi_scale, hw):
    model = randomize(build_model(tiny_cfg(multi_scale=multi_scale, attention=backend)), std=0.2).eval()
    dm = _diffusers_model(model)
    x, t, y, mask, res, ar = _batch(*hw)
    with torch.no_grad():
        ours = model(x, t, y, mask, data_info={"img_hw": res, "aspect_ratio": ar})
        ref = dm(x, y, t, encoder_attention_mask=mask,
                 added_cond_kwargs={"resolution": res, "aspect_ratio": ar} if multi_scale else None).sample
    diff = (ours - ref).abs().max().item()
    print(f"parity multi_scale={multi_scale} {hw} {backend}: max |diff| = {diff:.3g} (|out| max {ref.abs().max():.3g})")
    assert diff <= 1e-5


@pytest.mark.parametrize("multi_scale", [False, True])
def test_official_ours_diffusers_ours_is_exact(tmp_path, multi_scale):
    model = randomize(build_model(tiny_cfg(multi_scale=multi_scale, attention="sdpa")), std=0.2)
    sd = model.state_dict()
    official = tmp_path / "official.pth"
    write_official(str(official), sd, model)
    raw = torch.load(official, weights_only=True)
    assert set(raw) == {"state_dict"} and raw["state_dict"]["pos_embed"].shape == (1, 16, 48)
    assert "y_embedder.y_embedding" in raw["state_dict"]
    # architecture (incl. multi-scale), heads (preset) and resolution (pos_embed) are inferred from the file
    convert_file("official", "ours", str(official), str(tmp_path / "ours1"))
    convert_file("ours", "diffusers", str(tmp_path / "ours1"), str(tmp_path / "diff"))
    convert_file("diffusers", "ours", str(tmp_path / "diff"), str(tmp_path / "ours2"))
    convert_file("ours", "official", str(tmp_path / "ours2"), str(tmp_path / "back.pth"))
    cfg1, res1, sd1 = load_ours(str(tmp_path / "ours1"))
    cfg2, res2, sd2 = load_ours(str(tmp_path / "ours2"))
    assert res1 == res2 == 64 and cfg1 == cfg2
    assert cfg1.multi_scale == multi_scale and cfg1.num_heads == 3
    assert sd1.keys() == sd2.keys() == sd.keys()
    for k in sd:
        assert torch.equal(sd[k], sd1[k]) and torch.equal(sd[k], sd2[k]), k
    back = read_official(str(tmp_path / "back.pth"))
    assert all(torch.equal(back[k], sd[k]) for k in sd) and back.keys() == sd.keys()


def test_diffusers_folder_loads_with_from_pretrained(tmp_path):
    from diffusers import PixArtTransformer2DModel

    model = randomize(build_model(tiny_cfg(attention="sdpa")), std=0.2).eval()
    write_diffusers(str(tmp_path / "d"), model.state_dict(), model.cfg, 64)
    assert os.path.isfile(tmp_path / "d" / DIFFUSERS_NULL_CAPTION)
    dm = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "d")).eval()
    x, t, y, mask, _, _ = _batch(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dm(x, y, t, encoder_attention_mask=mask).sample, model(x, t, y, mask),
                                   rtol=0, atol=1e-5)
    # and a diffusers folder without our null caption still converts (with a stated, seeded init)
    os.remove(tmp_path / "d" / DIFFUSERS_NULL_CAPTION)
    cfg, res, sd = read_diffusers(str(tmp_path / "d"))
    assert sd["y_embedder.y_embedding"].shape == (120, 32) and res == 64  # default 120 tokens
    cfg, res, sd = read_diffusers(str(tmp_path / "d"), {"max_text_tokens": 8})
    assert sd["y_embedder.y_embedding"].shape == (8, 32)


def test_ours_folder_and_load_model(tmp_path):
    cfg = tiny_cfg(adaln="block", condition="class", attention="sdpa")
    model = randomize(build_model(cfg))
    save_ours(str(tmp_path / "m"), dataclasses.asdict(cfg.model), model.state_dict(), 64)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["resolution"] == 64 and meta["adaln"] == "block"
    loaded, res = load_model(str(tmp_path / "m"))
    assert res == 64 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                               model.state_dict().values()))


def test_bad_checkpoints_are_refused_with_names_and_shapes(tmp_path):
    model = randomize(build_model(tiny_cfg(attention="sdpa")))
    sd = dict(model.state_dict())
    cfg = dataclasses.asdict(model.cfg)

    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.1.extra.weight"] = torch.zeros(2, 3)
    bad["t_block.1.weight"] = torch.zeros(7, 48)
    save_ours(str(tmp_path / "bad"), cfg, bad, 64)
    with pytest.raises(ValueError) as e:
        load_model(str(tmp_path / "bad"))
    msg = str(e.value)
    assert "missing 1 keys: blocks.1.mlp.fc2.bias [48]" in msg
    assert "unexpected 1 keys: blocks.1.extra.weight [2, 3]" in msg
    assert "t_block.1.weight: file [7, 48] vs model [288, 48]" in msg
    assert "model.safetensors" in msg and "\n" not in msg

    # the CLI path refuses the same way
    with pytest.raises(ValueError, match="missing 1 keys"):
        convert_file("ours", "diffusers", str(tmp_path / "bad"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

    # an official checkpoint with a foreign key is refused, not silently dropped
    torch.save({"state_dict": {**sd, "ema_decay": torch.tensor(0.9)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"unexpected 1 keys: ema_decay \[\]"):
        convert_file("official", "ours", str(tmp_path / "x.pth"), str(tmp_path / "o"), resolution=64)

    with pytest.raises(ValueError, match="adaLN-single and text-conditional"):
        convert_file("ours", "diffusers", str(_class_folder(tmp_path)), str(tmp_path / "d2"))
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_file("official", "ours", str(tmp_path / "nope.pth"), str(tmp_path / "o2"))


def _class_folder(tmp_path):
    cfg = tiny_cfg(adaln="block", condition="class", attention="sdpa")
    save_ours(str(tmp_path / "cls"), dataclasses.asdict(cfg.model), build_model(cfg).state_dict(), 64)
    return tmp_path / "cls"


def test_check_state_dict_lists_everything():
    with pytest.raises(ValueError) as e:
        check_state_dict({"a": torch.zeros(2)}, {"b": torch.zeros(3)}, "src")
    assert str(e.value) == ("src: checkpoint does not match the model: missing 1 keys: a [2]; "
                            "unexpected 1 keys: b [3]")
