"""`pixart-ds ckpt export RUN_DIR OUT [--raw]`: consolidated EMA / fp32 master weights of a 2-rank ZeRO-2 run as an
"ours" folder that loads strictly into the model and that `pixart-ds sample` reads."""
import os

import pytest
import torch

from pixart_ds.testing import TINY_TEXT, describe, run_train, write_text_shards


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    shards = write_text_shards(str(base / "shards"))
    run_dir = str(base / "run")
    p = run_train(TINY_TEXT, [f"run_dir={run_dir}", f"data.sources=[{{local: {shards}}}]", "train.total_steps=3",
                              "log.progress_bar=false"], launcher="torchrun")
    assert p.returncode == 0, describe(p)
    return run_dir


def test_export_ema_and_raw(run, tmp_path, run_cli):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pixart_ds.model.weights import load_model, load_ours
    from pixart_ds.train import zero

    ema_dir, raw_dir = tmp_path / "ema", tmp_path / "raw"
    p = run_cli("ckpt", "export", run, ema_dir)
    assert p.returncode == 0, p.stderr
    assert "EMA weights" in p.stdout
    p = run_cli("ckpt", "export", run, raw_dir, "--raw")
    assert p.returncode == 0, p.stderr

    cfg_e, res_e, ema = load_ours(str(ema_dir))
    cfg_r, res_r, raw = load_ours(str(raw_dir))
    assert res_e == res_r == 64 and cfg_e == cfg_r
    assert cfg_e.condition == "text" and cfg_e.caption_channels == 32 and cfg_e.pe_interpolation == 0.125
    model, res = load_model(str(ema_dir))  # strict: every key and shape of the model
    assert res == 64 and sum(p.numel() for p in model.parameters()) > 0

    tag_dir = os.path.join(run, "checkpoints", "step_00000003")
    client = zero.read_model_states(tag_dir)[zero.CLIENT_KEY]
    for k, v in client["ema"]["state_dict"].items():
        assert torch.equal(ema[k], v), k  # EMA exported bit-exact (fp32)
    master = get_fp32_state_dict_from_zero_checkpoint(os.path.join(run, "checkpoints"), tag="step_00000003")
    for k, v in master.items():
        assert raw[k].dtype == torch.float32 and torch.equal(raw[k], v), k  # raw = fp32 masters, not bf16 module
    # ema_decay 0.9 over 3 updates: the EMA lags the raw weights
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])


def test_exported_weights_sample(run, tmp_path, run_cli, tiny_t5_dir, tiny_vae_dir):
    out = tmp_path / "ema"
    assert run_cli("ckpt", "export", run, out).returncode == 0
    p = run_cli("sample", "--ckpt", out, "--prompt", "a red square", "--steps", "2", "--out", tmp_path / "img",
                "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir, "--resolution", "64")
    assert p.returncode == 0, p.stderr[-3000:]
    files = [f for f in os.listdir(tmp_path / "img") if f.endswith(".png")]
    assert files


def test_export_errors_are_one_line(tmp_path, run_cli):
    p = run_cli("ckpt", "export", tmp_path / "missing", tmp_path / "out")
    assert p.returncode == 2
    assert p.stderr.strip() == f"pixart-ds ckpt: error: ckpt export: {tmp_path / 'missing'}: no such file or directory"
    (tmp_path / "empty").mkdir()
    p = run_cli("ckpt", "export", tmp_path / "empty", tmp_path / "out")
    assert p.returncode == 2 and "not a run directory with checkpoints" in p.stderr
