"""Evaluation during training (config `eval`, pixart_ds.eval.training): a run with eval.every_steps set writes the
metrics to metrics.jsonl and TensorBoard and the grids into the run directory, and leaves training itself alone.
(tests/test_resume.py runs its exact-resume check with evaluation on.)"""
import json
import os

import pytest
from eval_helpers import eval_overrides

from pixart_ds import config as C
from pixart_ds.testing import TINY_TEXT, describe, read_metrics, run_train, write_text_shards


def test_training_with_eval_writes_metrics_tensorboard_and_grids(tmp_path, tiny_t5_dir, tiny_vae_dir):
    shards = write_text_shards(str(tmp_path / "shards"), n=32)
    run = str(tmp_path / "run")
    p = run_train(TINY_TEXT, [f"run_dir={run}", f"data.sources=[{{local: {shards}}}]", "train.total_steps=4",
                              "log.tensorboard=true", "log.progress_bar=false",
                              *eval_overrides(str(tmp_path), tiny_t5_dir, tiny_vae_dir)])
    assert p.returncode == 0, describe(p)
    steps, events = read_metrics(run)
    ev = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in ev] == [2, 4]
    for e in ev:
        assert {"fid", "kid", "kid_std", "clip_score", "alignment", "judge_shape"} <= set(e) and e["images"] == 4
        assert e["fid"] > 0 and 0 <= e["alignment"] <= 1
        assert os.path.isfile(e["grid"]) and e["grid"] == os.path.join(run, "eval", f"step_{e['step']:08d}.png")
        with open(e["record"]) as f:
            assert json.load(f)["fid"] == pytest.approx(e["fid"])
    # the reference statistics were computed once and reused by the second evaluation
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npz")]) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    assert {"eval/fid", "eval/kid", "eval/clip_score", "eval/alignment"} <= set(acc.Tags()["scalars"])
    assert [s.step for s in acc.Scalars("eval/fid")] == [2, 4]
    assert [s.value for s in acc.Scalars("eval/fid")] == pytest.approx([e["fid"] for e in ev])
    assert "eval" in acc.Tags()["images"]


def test_eval_settings_are_checked_before_training(tmp_path, tiny_t5_dir, tiny_vae_dir):
    with pytest.raises(C.ConfigError, match="eval.prompts: eval.every_steps > 0 needs a prompt set"):
        C.load(TINY_TEXT, ["eval.every_steps=5"])
    with pytest.raises(C.ConfigError, match="eval.inception: eval.reference needs"):
        C.load(TINY_TEXT, ["eval.every_steps=5", "eval.prompts=[a]", "eval.reference=/x"])
    p = run_train(TINY_TEXT, [f"run_dir={tmp_path / 'r'}", f"encoders.text_encoder={tiny_t5_dir}",
                              f"encoders.vae={tiny_vae_dir}", "eval.every_steps=2", "eval.prompts=[a]",
                              f"eval.reference={tmp_path}", f"eval.inception={tmp_path / 'nope.pt'}"])
    assert p.returncode == 2 and "eval.inception: " in p.stderr and "nope.pt: no such file" in p.stderr, describe(p)
