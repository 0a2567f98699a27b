"""The schedule and the hybrid loss against an independent float64 NumPy computation of the improved-DDPM formulas."""
import math

import numpy as np
import pytest
import torch

from pixart_ds import config
from pixart_ds.diffusion.losses import training_losses
from pixart_ds.diffusion.schedule import Schedule

T = 1000


def _np_tables():
    """Written from the papers, not from our module: DDPM eq. 4/6/7, improved DDPM eq. 15."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    return betas, ab, ab_prev, post_var, post_logvar


def _np_phi(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_losses(out, x0, noise, t):
    """Per-sample (mse, vb) in float64 for model output `out` [B, 2C, h, w]."""
    betas, ab, ab_prev, post_var, post_logvar = _np_tables()
    C = x0.shape[1]
    mse_all, vb_all = [], []
    for i in range(x0.shape[0]):
        ti = int(t[i])
        eps, v = out[i, :C], out[i, C:]
        x_t = math.sqrt(ab[ti]) * x0[i] + math.sqrt(1.0 - ab[ti]) * noise[i]
        # posterior mean mu~_t(x_t, x_0) (DDPM eq. 7)
        c1 = betas[ti] * math.sqrt(ab_prev[ti]) / (1.0 - ab[ti])
        c2 = (1.0 - ab_prev[ti]) * math.sqrt(1.0 - betas[ti]) / (1.0 - ab[ti])
        true_mean = c1 * x0[i] + c2 * x_t
        x0_hat = (x_t - math.sqrt(1.0 - ab[ti]) * eps) / math.sqrt(ab[ti])
        model_mean = c1 * x0_hat + c2 * x_t
        frac = (v + 1.0) / 2.0
        model_logvar = frac * np.log(betas[ti]) + (1.0 - frac) * post_logvar[ti]
        if ti == 0:
            # -log of the Gaussian mass of the 8-bit bin around x0 (edges open at +-1), DDPM §3.3
            s = np.exp(-0.5 * model_logvar)
            up = _np_phi(s * (x0[i] - model_mean + 1 / 255))
            lo = _np_phi(s * (x0[i] - model_mean - 1 / 255))
            p = np.where(x0[i] < -0.999, up, np.where(x0[i] > 0.999, 1.0 - lo, up - lo))
            term = -np.log(np.maximum(p, 1e-12))
        else:
            lv1, lv2 = post_logvar[ti], model_logvar
            term = 0.5 * (lv2 - lv1 + np.exp(lv1 - lv2) + (true_mean - model_mean) ** 2 / np.exp(lv2) - 1.0)
        vb_all.append(term.mean() / np.log(2.0))
        mse_all.append(((noise[i] - eps) ** 2).mean())
    return np.array(mse_all), np.array(vb_all)


def test_schedule_tables_and_q_sample():
    s = Schedule.from_config(config.Config().diffusion)
    betas, ab, *_ = _np_tables()
    assert s.betas.dtype == torch.float64 and s.num_timesteps == T
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ab, rtol=1e-12)
    assert abs(float(s.alphas_cumprod[-1]) - 4.0358e-5) < 1e-8  # the well-known alpha_bar_T of DDPM's schedule
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = s.q_sample(x0, t, noise)
    for i in range(3):
        ref = math.sqrt(ab[t[i]]) * x0[i].double() + math.sqrt(1 - ab[t[i]]) * noise[i].double()
        torch.testing.assert_close(xt[i].double(), ref, rtol=1e-6, atol=1e-6)
    # uniform timesteps: all in range, reproducible from the generator, roughly flat
    tt = s.sample_timesteps(20000, torch.Generator().manual_seed(1))
    assert tt.dtype == torch.int64 and int(tt.min()) >= 0 and int(tt.max()) <= T - 1
    assert torch.equal(tt, s.sample_timesteps(20000, torch.Generator().manual_seed(1)))
    assert abs(float((tt < 500).float().mean()) - 0.5) < 0.02


def test_schedule_matches_diffusers_linear_betas():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    s = Schedule.linear()
    for cls in (DDPMScheduler, DPMSolverMultistepScheduler):
        sch = cls(**s.diffusers_config())
        np.testing.assert_allclose(sch.alphas_cumprod.double().numpy(), s.alphas_cumprod.numpy(), rtol=2e-6)


def test_bad_schedule_names_key():
    with pytest.raises(ValueError, match="beta_schedule"):
        Schedule.from_config(type("D", (), dict(beta_schedule="cosine", num_timesteps=10, beta_start=1e-4,
                                                 beta_end=0.02))())


def _fixed_batch():
    g = torch.Generator().manual_seed(0)
    B, C = 6, 4
    # latents ~ N(0, 1.5^2) so the t = 0 decoder hits all three bins (x < -0.999, inside, x > 0.999)
    x0 = 1.5 * torch.randn(B, C, 4, 4, generator=g)
    noise = torch.randn(B, C, 4, 4, generator=g)
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    eps_pred = noise + 0.3 * torch.randn(B, C, 4, 4, generator=g)
    v = torch.rand(B, C, 4, 4, generator=g) * 2 - 1
    return x0, noise, t, torch.cat([eps_pred, v], 1)


def test_hybrid_loss_equals_independent_iddpm_computation():
    s = Schedule.linear()
    x0, noise, t, out = _fixed_batch()
    x_t = s.q_sample(x0, t, noise)
    got = training_losses(out, x0, x_t, t, noise, s, pred_sigma=True)
    mse_ref, vb_ref = _np_losses(out.double().numpy(), x0.double().numpy(), noise.double().numpy(), t.numpy())
    for k in ("loss", "mse", "vb"):
        assert got[k].shape == (6,) and got[k].dtype == torch.float32
    np.testing.assert_allclose(got["mse"].numpy(), mse_ref, rtol=1e-5)
    # float32 (as the official code) vs float64: measured max relative difference 7e-6 on a 2-core CPU
    np.testing.assert_allclose(got["vb"].numpy(), vb_ref, rtol=5e-5)
    np.testing.assert_allclose(got["loss"].numpy(), mse_ref + vb_ref, rtol=5e-5)
    # t = 0 rows are the decoder NLL (large: bits of an 8-bit bin), t > 0 rows are KLs (small)
    assert (got["vb"][:2] > 1.0).all() and (got["vb"][2:] < got["vb"][:2].min()).all()


def test_vb_trains_only_variance_and_mse_only_epsilon():
    s = Schedule.linear()
    x0, noise, t, out = _fixed_batch()
    x_t = s.q_sample(x0, t, noise)
    out = out.clone().requires_grad_(True)
    terms = training_losses(out, x0, x_t, t, noise, s, pred_sigma=True)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    C = x0.shape[1]
    assert g_vb[:, :C].abs().max() == 0 and g_vb[:, C:].abs().max() > 0  # detached mean (improved DDPM §3.1)
    assert g_mse[:, C:].abs().max() == 0 and g_mse[:, :C].abs().max() > 0


def test_pred_sigma_false_is_plain_mse_and_shapes_are_checked():
    s = Schedule.linear()
    x0, noise, t, out = _fixed_batch()
    x_t = s.q_sample(x0, t, noise)
    eps = out[:, :4]
    got = training_losses(eps, x0, x_t, t, noise, s, pred_sigma=False)
    torch.testing.assert_close(got["loss"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(got["vb"], torch.zeros(6))
    with pytest.raises(ValueError, match="pred_sigma=True"):
        training_losses(eps, x0, x_t, t, noise, s, pred_sigma=True)
    # bf16 network output is upcast: same numbers as the float32 computation of the rounded values
    got16 = training_losses(out.bfloat16(), x0, x_t, t, noise, s)
    ref16 = training_losses(out.bfloat16().float(), x0, x_t, t, noise, s)
    torch.testing.assert_close(got16["loss"], ref16["loss"])
