"""`pixart-ds sample` and `pixart-ds export` as a user runs them, and parity with diffusers' PixArtAlphaPipeline.

Everything is built here: a tiny random PixArt saved as an "ours" folder, the tiny T5 (d_model 32) and the tiny
VAE from conftest. diffusers' pipeline uses T5("") as its unconditional input, so the parity checks sample ours with
uncond="empty" (CLI: --uncond empty); the null-caption path is what `sample` does by default.
"""
import json
import os

import numpy as np
import pytest
import torch

from pixart_ds import config

PROMPT = "a small red circle in the center"
SEED, STEPS, GUIDANCE = 3, 20, 4.5

# Measured on a 2-core CPU (fp32, torch SDPA in both): max |ours - diffusers| = 0 on latents and images
# in this configuration; the bounds leave room for other BLAS/attention kernels.
LATENT_TOL = 1e-4
IMAGE_TOL = 1e-4  # images in [0, 1]
GPU_LATENT_TOL = 1e-3  # CUDA kernels (TF32 convolutions, other SDPA kernels) differ between the two code paths
GPU_IMAGE_TOL = 1e-3


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from pixart_ds.model.pixart import build_model
    from pixart_ds.model.weights import save_ours

    cfg = config.from_dict({"model": {"preset": "tiny", "caption_channels": 32, "attention": "sdpa"},
                            "data": {"resolution": 64}})
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh model predicts 0 exactly (zero final layer): give every weight some signal
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    d = str(tmp_path_factory.mktemp("ckpt") / "ours")
    save_ours(d, config.to_dict(cfg)["model"], model.state_dict(), 64)
    return d


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tiny_t5_dir, tiny_vae_dir, tmp_path_factory):
    """`pixart-ds export` in a subprocess; returns the pipeline folder."""
    import subprocess
    import sys

    out = str(tmp_path_factory.mktemp("export") / "pipe")
    p = subprocess.run([sys.executable, "-m", "pixart_ds.cli", "export", "--ckpt", tiny_ckpt, "--to", "diffusers", out,
                        "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return out


def test_export_writes_a_complete_pipeline(exported):
    with open(os.path.join(exported, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "PixArtAlphaPipeline"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and os.path.isdir(os.path.join(exported, part)), part
    with open(os.path.join(exported, "scheduler", "scheduler_config.json")) as f:
        sch = json.load(f)
    assert sch["_class_name"] == "DPMSolverMultistepScheduler" and sch["algorithm_type"] == "dpmsolver++"
    assert (sch["beta_start"], sch["beta_end"], sch["num_train_timesteps"]) == (1e-4, 0.02, 1000)
    # nothing half-written is left beside it
    assert not [n for n in os.listdir(os.path.dirname(exported)) if n.startswith(".tmp")]


def _ours(ckpt, t5, vae, prompt=PROMPT, uncond="empty", device="cpu", autocast_dtype=None):
    from pixart_ds.diffusion import sampling as S
    from pixart_ds.model.encoders import load_text_encoder, load_vae
    from pixart_ds.train.weights import build_sampling_model, resolve_checkpoint

    ck = resolve_checkpoint(ckpt)
    tok, te = load_text_encoder(t5, dtype="fp32", device=device)
    model = build_sampling_model(ck, device)
    return S.generate(model, ck.model_cfg, [prompt], vae=load_vae(vae, device=device), tokenizer=tok,
                      text_encoder=te, sampler="dpm-solver", steps=STEPS, guidance=GUIDANCE, seeds=[SEED], height=64,
                      width=64, uncond=uncond, device=device, autocast_dtype=autocast_dtype)


def _run_diffusers(exported, device="cpu"):
    """diffusers' PixArtAlphaPipeline from our export: (final latents [1, 4, 8, 8], image [1, 3, 64, 64] in [0, 1])."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(exported, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    img = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
               generator=torch.Generator().manual_seed(SEED), output_type="pt", clean_caption=False,
               use_resolution_binning=False, callback=lambda i, t, lat: seen.update(latents=lat.clone()),
               callback_steps=1).images
    return seen["latents"].cpu(), img.cpu()


@pytest.fixture(scope="module")
def diffusers_ref(exported):
    return _run_diffusers(exported)


def test_dpm_solver_matches_diffusers_pipeline_loaded_from_export(diffusers_ref, exported, tiny_ckpt, tiny_t5_dir,
                                                                  tiny_vae_dir):
    ref_lat, ref_img = diffusers_ref
    ours = _ours(tiny_ckpt, tiny_t5_dir, tiny_vae_dir)
    lat_err = (ours.latents - ref_lat).abs().max().item()
    img_err = ((ours.images / 2 + 0.5).clamp(0, 1) - ref_img).abs().max().item()
    print(f"parity: max |latent diff| = {lat_err:.3g}, max |image diff| = {img_err:.3g} (images in [0, 1])")
    assert ours.latents.abs().max() > 0.1  # a real signal, not two zero tensors
    assert lat_err <= LATENT_TOL and img_err <= IMAGE_TOL
    # our sampler reading the exported folder itself (diffusers weights + kept null caption) agrees too
    again = _ours(exported, exported, exported)
    assert (again.latents - ours.latents).abs().max().item() <= LATENT_TOL
    # the default unconditional input is the null caption: a different (guided) image
    null = _ours(tiny_ckpt, tiny_t5_dir, tiny_vae_dir, uncond="null")
    assert (null.latents - ours.latents).abs().max() > 1e-2


def test_sample_cli_writes_pngs_grid_and_settings(run_cli, tiny_ckpt, tiny_t5_dir, tiny_vae_dir, tmp_path):
    long_prompt = " ".join(["a big blue square"] * 40)  # well over 120 tokens
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{long_prompt}\n\n")
    out = tmp_path / "samples"
    p = run_cli("sample", "--ckpt", tiny_ckpt, "--prompt", PROMPT, "--prompts-file", pf, "--steps", 3,
                "--seed", 5, "--out", out, "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir, check=True)
    assert "truncated" in p.stderr and "120 tokens" in p.stderr
    rec = json.loads((out / "samples.json").read_text())
    assert [im["prompt"] for im in rec["images"]] == [PROMPT, long_prompt]
    assert [im["seed"] for im in rec["images"]] == [5, 6]
    for key, want in dict(sampler="dpm-solver", steps=3, guidance=4.5, seed=5, height=64, width=64,
                          checkpoint_kind="ours").items():
        assert rec[key] == want, key
    assert rec["unconditional"].startswith("null caption") and rec["scheduler"]["solver_order"] == 2
    from PIL import Image

    for im in rec["images"]:
        assert Image.open(out / im["file"]).size == (64, 64)
    assert Image.open(out / "grid.png").size[0] > 128


def test_sample_cli_on_export_matches_diffusers_png(run_cli, exported, diffusers_ref, tmp_path):
    """The exported folder alone is enough for `sample` (vae/ and text_encoder/ inside); PNGs match diffusers'."""
    out = tmp_path / "s"
    run_cli("sample", "--ckpt", exported, "--prompt", PROMPT, "--steps", STEPS, "--seed", SEED, "--uncond", "empty",
            "--out", out, "--device", "cpu", check=True)
    from PIL import Image

    ours = np.asarray(Image.open(out / "0000.png"), dtype=np.int16)
    # diffusers' own PIL conversion: round(255 * image) of the [0, 1] output
    ref = (diffusers_ref[1][0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert ours.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours - ref).max() <= 1  # 8-bit levels
    assert not (out / "grid.png").exists()  # one prompt, no grid


def test_bad_input_is_one_line_naming_the_value(run_cli, tiny_ckpt, tiny_t5_dir, tiny_vae_dir, tmp_path):
    from pixart_ds.model.encoders import make_tiny_t5

    def err(p):
        assert p.returncode == 2, (p.stdout, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pixart-ds")]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        return lines[0]

    missing = tmp_path / "nope"
    line = err(run_cli("sample", "--ckpt", missing, "--prompt", "x", "--out", tmp_path / "o"))
    assert f"checkpoint not found: {missing}" in line
    line = err(run_cli("sample", "--ckpt", tiny_ckpt, "--prompt", "x", "--resolution", 72, "--out", tmp_path / "o",
                       "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir))
    assert "resolution 72 is not a multiple of 8 x patch size = 16" in line
    t5_16 = make_tiny_t5(str(tmp_path / "t5_16"), d_model=16)
    line = err(run_cli("export", "--ckpt", tiny_ckpt, "--to", "diffusers", tmp_path / "e", "--vae", tiny_vae_dir,
                       "--text-encoder", t5_16))
    assert f"text encoder {t5_16}: width d_model=16 does not match the model's caption_channels=32" in line
    assert not (tmp_path / "e").exists()


def test_sample_checks_before_any_work(tiny_ckpt, tiny_t5_dir, tiny_vae_dir, tmp_path):
    from pixart_ds.commands.sample import run as sample_cli
    from pixart_ds.model.encoders import make_tiny_t5

    kw = dict(ckpt=tiny_ckpt, prompts=["x"], out=str(tmp_path / "o"), vae=tiny_vae_dir, text_encoder=tiny_t5_dir,
              steps=1)
    t5_16 = make_tiny_t5(str(tmp_path / "t5_16"), d_model=16)
    with pytest.raises(ValueError, match=f"text encoder {t5_16}: width d_model=16 does not match the model's "
                                         f"caption_channels=32"):
        sample_cli(**dict(kw, text_encoder=t5_16))
    with pytest.raises(ValueError, match="--aspect-ratio 16:9: this model is not multi-scale"):
        sample_cli(**dict(kw, aspect_ratio="16:9"))
    with pytest.raises(ValueError, match="no prompt given"):
        sample_cli(**dict(kw, prompts=[]))
    with pytest.raises(FileNotFoundError, match="--prompts-file not found: .*missing.txt"):
        sample_cli(**dict(kw, prompts_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="--vae is required"):
        sample_cli(**dict(kw, vae=None))
    with pytest.raises(FileNotFoundError, match="VAE folder not found: .*no_vae"):
        sample_cli(**dict(kw, vae=str(tmp_path / "no_vae")))
    with pytest.raises(ValueError, match="--sampler 'euler'"):
        sample_cli(**dict(kw, sampler="euler"))
    assert not (tmp_path / "o").exists()  # nothing written on refusal


@pytest.mark.gpu
def test_gpu_parity_and_bf16_autocast(exported, tiny_ckpt, tiny_t5_dir, tiny_vae_dir):
    """On CUDA: fp32 ours vs diffusers' pipeline on the same GPU, and the bf16-autocast path `sample` uses there."""
    ref_lat, ref_img = _run_diffusers(exported, "cuda")
    ours = _ours(tiny_ckpt, tiny_t5_dir, tiny_vae_dir, device="cuda")
    lat_err = (ours.latents - ref_lat).abs().max().item()
    img_err = ((ours.images / 2 + 0.5).clamp(0, 1) - ref_img).abs().max().item()
    bf16 = _ours(tiny_ckpt, tiny_t5_dir, tiny_vae_dir, device="cuda", autocast_dtype=torch.bfloat16)
    bf16_err = (bf16.latents - ours.latents).abs().max().item()
    print(f"gpu parity: max |latent diff| = {lat_err:.3g}, max |image diff| = {img_err:.3g}; "
          f"bf16 autocast vs fp32: max |latent diff| = {bf16_err:.3g} (latent max {ours.latents.abs().max():.3g})")
    assert lat_err <= GPU_LATENT_TOL and img_err <= GPU_IMAGE_TOL
    assert torch.isfinite(bf16.latents).all() and bf16_err < 0.1 * float(ours.latents.abs().max())


def test_sample_from_a_training_run(run_cli, tiny_t5_dir, tiny_vae_dir, tmp_path):
    """--ckpt RUN_DIR: EMA weights by default, encoders from the run's resolved config."""
    from pixart_ds.train.weights import resolve_checkpoint
    from pixart_ds.testing import TINY_TEXT, describe, run_train, write_text_shards

    shards = write_text_shards(str(tmp_path / "shards"), n=32)
    run = str(tmp_path / "run")
    p = run_train(TINY_TEXT, [f"run_dir={run}", f"data.sources=[{{local: {shards}}}]", "train.total_steps=3",
                              f"encoders.text_encoder={tiny_t5_dir}", f"encoders.vae={tiny_vae_dir}"])
    assert p.returncode == 0, describe(p)
    out = tmp_path / "s"
    run_cli("sample", "--ckpt", run, "--prompt", PROMPT, "--steps", 2, "--out", out, "--device", "cpu", check=True)
    rec = json.loads((out / "samples.json").read_text())
    assert (rec["checkpoint_kind"], rec["weights"], rec["use_ema"]) == ("run", "ema", True)
    assert rec["text_encoder"] == os.path.abspath(tiny_t5_dir) and rec["vae"] == os.path.abspath(tiny_vae_dir)
    assert rec["model"]["max_text_tokens"] == 16 and (out / "0000.png").is_file()
    ema, raw = resolve_checkpoint(run), resolve_checkpoint(run, use_ema=False)
    assert raw.weights == "raw" and any(not torch.equal(ema.state_dict[k], raw.state_dict[k]) for k in ema.state_dict)
    # export from the run alone (encoders from its config); diffusers loads and runs it
    pipe_dir = tmp_path / "pipe"
    run_cli("export", "--ckpt", run, "--to", "diffusers", pipe_dir, check=True)
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    img = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="pt", clean_caption=False,
               use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
