"""`pixart-ds train` as users start it: single process, torchrun (2 ranks), the deepspeed launcher (2 ranks); stage
initialisation through the DiT -> PixArt re-parameterization; stop on SIGUSR1 with the requeue exit code; and
bad input stopping before training with a one-line error."""
import os
import signal
import subprocess
import time

import pytest
import torch

from pixart_ds.testing import (REPO, TINY_CLASS, TINY_TEXT, clean_env, describe, latest_tag, meta, read_metrics,
                               run_train, train_cmd, worker_pids, write_class_shards, write_text_shards)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_text_shards(str(tmp_path_factory.mktemp("shards") / "text"))


def _src(path):
    return f"data.sources=[{{local: {path}}}]"


def _check_run(run_dir, steps, world, every=3, keep=2):
    recs, events = read_metrics(run_dir)
    assert sorted(recs) == list(range(1, steps + 1))
    for r in recs.values():
        assert isinstance(r["loss"], float) and 0 < r["loss"] < 10 and r["skipped"] == 0.0
        assert r["grad_norm"] > 0 and r["images_per_s_per_gpu"] > 0 and r["peak_mem_gib"] > 0
    assert recs[1]["lr"] == pytest.approx(5e-4) and recs[2]["lr"] == pytest.approx(1e-3)  # warm-up over 2 steps
    assert recs[steps]["images_seen"] == 8 * steps
    start = [e for e in events if e["event"] == "start"][0]
    assert start["world_size"] == world
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert saved == [s for s in range(every, steps + 1, every)]
    ck = os.path.join(run_dir, "checkpoints")
    tags = sorted(t for t in os.listdir(ck) if t.startswith("step_"))
    assert tags == [f"step_{s:08d}" for s in saved][-keep:]  # keep_last
    assert latest_tag(run_dir) == tags[-1]
    m = meta(run_dir, tags[-1])
    assert m["world_size"] == world and m["step"] == steps
    optim = [f for f in os.listdir(os.path.join(ck, tags[-1])) if f.endswith("optim_states.pt")]
    assert len(optim) == world  # one ZeRO-2 optimizer partition per rank
    from pixart_ds import config as C

    cfg = C.load(os.path.join(run_dir, "config.yaml"))  # the resolved recipe, loadable as a recipe
    assert cfg.run_dir == run_dir and cfg.train.precision == "bf16"
    return recs, events


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, shards, tiny_t5_dir, tiny_vae_dir):
    """One single-process run (TensorBoard and a sample grid every 3 steps on) shared by several tests."""
    run = str(tmp_path_factory.mktemp("single") / "run")
    p = run_train(TINY_TEXT, [f"run_dir={run}", _src(shards), "log.tensorboard=true", "log.sample_every_steps=3",
                              "log.sample_prompts=[a red square, a blue circle]", "sample.steps=2",
                              f"encoders.text_encoder={tiny_t5_dir}", f"encoders.vae={tiny_vae_dir}"])
    assert p.returncode == 0, describe(p)
    return run, p


def test_train_single_process(single_run):
    run, p = single_run
    assert "done at step 6" in p.stdout
    recs, events = _check_run(run, 6, 1)
    start = [e for e in events if e["event"] == "start"][0]
    assert start["launcher"] == "single" and start["grad_accum"] == 4  # 8 = 2 x 4 x 1
    assert [e["step"] for e in events if e["event"] == "sample"] == [3, 6]
    from PIL import Image

    grid = Image.open(os.path.join(run, "samples", "step_00000006.png"))
    assert grid.size[0] > 64 and grid.size[1] >= 64  # two 64x64 samples side by side (+ padding)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))
    assert "Traceback" not in p.stderr and "sample grid at step" not in p.stderr


def test_time_limit_stops_with_requeue_code_and_resumes_exactly(tmp_path, shards, single_run, tiny_t5_dir,
                                                                 tiny_vae_dir):
    """train.time_limit_s: checkpoint + exit 75 at the first step boundary past the limit; the same command without
    the limit (an allowed change) resumes, and the per-step losses equal the uninterrupted run's."""
    from pixart_ds.train.trainer import REQUEUE_EXIT_CODE

    run = str(tmp_path / "run")
    common = [f"run_dir={run}", _src(shards), "log.tensorboard=true", "log.sample_every_steps=3",
              "log.sample_prompts=[a red square, a blue circle]", "sample.steps=2",
              f"encoders.text_encoder={tiny_t5_dir}", f"encoders.vae={tiny_vae_dir}"]
    p = run_train(TINY_TEXT, common + ["train.time_limit_s=0.001"])
    assert p.returncode == REQUEUE_EXIT_CODE, describe(p)
    assert "stopped at step 1 with a checkpoint" in p.stderr
    assert latest_tag(run) == "step_00000001"
    p = run_train(TINY_TEXT, common)
    assert p.returncode == 0, describe(p)
    recs, events = read_metrics(run)
    assert [e["reason"] for e in events if e["event"] == "stop"] == ["train.time_limit_s=0.001"]
    ref, _ = read_metrics(single_run[0])
    assert sorted(recs) == sorted(ref) == list(range(1, 7))
    assert [recs[s]["loss"] for s in recs] == [ref[s]["loss"] for s in recs]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, shards):
    """Injected NaN loss (rank 0) at step 2, then 4-6 with train.max_nonfinite_steps=3: step 2 is skipped and
    counted and training goes on; three in a row stop the run at step 6 with exit code 3, naming the steps; no
    checkpoint is written after the first bad step (the latest, step 3, predates it)."""
    from pixart_ds.train.trainer import NONFINITE_EXIT_CODE

    run = str(tmp_path / "run")
    p = run_train(TINY_TEXT, [f"run_dir={run}", _src(shards), "train.total_steps=9", "train.max_nonfinite_steps=3"],
                  env={"PIXART_DS_INJECT_NAN_AT_STEP": "2,4-6"})
    assert p.returncode == NONFINITE_EXIT_CODE, describe(p)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("pixart-ds train: error:")]
    assert len(err) == 1 and "stopped at step 6: 3 consecutive non-finite steps (first at step 4" in err[0]
    assert "latest checkpoint: step_00000003" in err[0]
    recs, events = read_metrics(run)
    assert [s for s in recs if recs[s]["skipped"]] == [2, 4, 5, 6]
    assert recs[2]["skipped_total"] == 1 and recs[6]["skipped_total"] == 4
    assert recs[2]["loss"] == "nan" and recs[3]["loss"] < 10  # training went on after the isolated bad step
    assert latest_tag(run) == "step_00000003"
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3]


def test_train_two_ranks_torchrun(tmp_path, shards):
    launcher = "torchrun"
    run = str(tmp_path / "run")
    p = run_train(TINY_TEXT, [f"run_dir={run}", _src(shards), "log.sample_ids=true"], launcher=launcher)
    assert p.returncode == 0, describe(p)
    recs, events = _check_run(run, 6, 2)
    start = [e for e in events if e["event"] == "start"][0]
    assert start["launcher"] == launcher and start["grad_accum"] == 2  # 8 = 2 x 2 x 2
    ids = [i for s in range(1, 7) for i in recs[s]["sample_idx"]]
    assert len(ids) == 48 and len(set(ids)) == 48  # 48 of the 64 samples, none twice within the epoch


def test_deepspeed_launcher_stop_on_sigusr1_with_requeue_code(tmp_path, shards):
    """Two ranks under the `deepspeed` launcher; SIGUSR1 to ONE worker (as Slurm's --signal would deliver it): all
    ranks agree at the next step boundary, write one checkpoint together and exit 75, which the launcher passes on."""
    from pixart_ds.train.trainer import REQUEUE_EXIT_CODE

    run = str(tmp_path / "run")
    cmd = train_cmd(TINY_TEXT, [f"run_dir={run}", _src(shards), "train.total_steps=1000",
                                "checkpoint.every_steps=1000"], launcher="deepspeed")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            cwd=REPO, start_new_session=True)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.exists(metrics) and sum(1 for line in open(metrics) if '"loss"' in line) >= 2:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training did not start: " + proc.communicate()[1][-3000:])
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == REQUEUE_EXIT_CODE, f"{proc.returncode}\n{err[-3000:]}"
    recs, events = read_metrics(run)
    start = [e for e in events if e["event"] == "start"][0]
    assert start["launcher"] == "deepspeed" and start["world_size"] == 2 and start["grad_accum"] == 2
    stop = [e for e in events if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["exit_code"] == REQUEUE_EXIT_CODE
    step = stop[0]["step"]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [step]
    assert latest_tag(run) == f"step_{step:08d}" and max(recs) == step < 1000
    assert meta(run, latest_tag(run))["world_size"] == 2


def test_stage1_to_stage2_init_from_reparameterizes(tmp_path):
    """A class-conditional adaLN-block run (stage 1) initialises a text-conditional adaLN-single run (stage 2)
    through convert.dit_to_pixart at train.init_reparam_t; with ema_decay 1 the stage-2 EMA stays the converted
    stage-1 EMA, which the test recomputes independently."""
    from pixart_ds.model.reparam import dit_to_pixart
    from pixart_ds.model.weights import build
    from pixart_ds.train.weights import load_weights

    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    cls_shards = write_class_shards(str(tmp_path / "cls"))
    txt_shards = write_text_shards(str(tmp_path / "txt"))
    p = run_train(TINY_CLASS, [f"run_dir={s1}", _src(cls_shards), "train.total_steps=2"])
    assert p.returncode == 0, describe(p)
    p = run_train(TINY_TEXT, [f"run_dir={s2}", _src(txt_shards), f"train.init_from={s1}", "train.init_reparam_t=300",
                              "train.total_steps=1", "train.ema_decay=1.0"])
    assert p.returncode == 0, describe(p)
    _, events = read_metrics(s2)
    start = [e for e in events if e["event"] == "start"][0]
    assert "re-parameterized" in start["init"] and "t=300" in start["init"]

    from pixart_ds import config as C

    cfg2 = C.load(os.path.join(s2, "config.yaml"))
    src_cfg, res, ema1 = load_weights(s1, use_ema=True)
    dit = build(src_cfg, res)
    dit.load_state_dict(ema1)
    want = dit_to_pixart(dit, target_cfg=cfg2.model, reparam_t=300, seed=cfg2.train.seed).state_dict()
    _, _, ema2 = load_weights(s2, use_ema=True)
    assert set(want) == set(ema2)
    for k in want:
        # the module is bf16 in training: buffers copied from it are bf16-rounded, parameters are the fp32 EMA
        tol = 1e-2 if k.endswith("y_embedding") else 0
        assert torch.allclose(want[k].float(), ema2[k].float(), atol=tol, rtol=tol), k
    # the shared DiT weights really came from stage 1
    assert torch.equal(ema2["blocks.0.attn.qkv.weight"], ema1["blocks.0.attn.qkv.weight"].float())


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, before training (in-process through cli.main; one case also as a subprocess)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_inproc(monkeypatch, capsys):
    """cli.main in this process with a clean launcher environment (fit exports RANK/WORLD_SIZE/...)."""
    from pixart_ds import cli

    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)

    def run(*args):
        rc = cli.main(list(map(str, args)))
        err = capsys.readouterr().err
        return rc, err

    yield run
    os.environ.clear()
    os.environ.update(saved)
    import torch.distributed as tdist

    assert not tdist.is_initialized()


@pytest.mark.parametrize("override,message", [
    ("model.caption_channels=64", "model.caption_channels: 64 but"),
    ("model.in_channels=8", "model.in_channels: 8 but"),
    ("data.resolution=128", "data.resolution: 128 px means 16x16 latents but"),
    ("train.global_batch_size=128", "fewer than one global batch (train.global_batch_size=128)"),
    ("train.init_from=/nonexistent/stage1", "train.init_from: /nonexistent/stage1: no such file or directory"),
])
def test_bad_input_one_line_error(tmp_path, shards, cli_inproc, override, message):
    rc, err = cli_inproc("train", TINY_TEXT, f"run_dir={tmp_path / 'run'}", _src(shards), override)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("pixart-ds train: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_bad_encoders_one_line_error(tmp_path, shards, cli_inproc, tiny_t5_dir, tiny_vae_dir):
    rc, err = cli_inproc("train", TINY_TEXT, f"run_dir={tmp_path / 'run'}", _src(shards), "model.caption_channels=48",
                         f"encoders.text_encoder={tiny_t5_dir}")
    assert rc == 2 and "encoders.text_encoder:" in err and "has width 32 but model.caption_channels is 48" in err
    rc, err = cli_inproc("train", TINY_TEXT, f"run_dir={tmp_path / 'run'}", _src(shards), "model.in_channels=8",
                         f"encoders.vae={tiny_vae_dir}")
    assert rc == 2 and "has 4 latent channels but model.in_channels is 8" in err


def test_bad_input_subprocess(tmp_path, shards):
    p = run_train(TINY_TEXT, [f"run_dir={tmp_path / 'run'}", _src(shards), "train.global_batch_size=128"])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("pixart-ds train: error: data.sources: 64 samples per epoch")
    assert "Traceback" not in p.stderr


def test_resume_refuses_changed_recipe(tmp_path, shards, single_run, cli_inproc):
    run = single_run[0]
    rc, err = cli_inproc("train", TINY_TEXT, f"run_dir={run}", _src(shards), "train.total_steps=8", "train.lr=0.002",
                         "model.mlp_ratio=2.0")
    assert rc == 2
    assert "the recipe changed since this checkpoint was written: model.mlp_ratio (4.0 -> 2.0), train.lr (0.001 -> " \
           "0.002); pass --allow-config-change" in err, err
    assert latest_tag(run) == "step_00000006"  # nothing written
