"""The loss PixArt trains with: improved DDPM's hybrid objective L_simple + L_vlb.

Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models"), §3.1: the network predicts epsilon
and a per-dimension interpolation v in [-1, 1] between the log of the two natural variances (eq. 15),

    log Sigma_theta = frac * log beta_t + (1 - frac) * log beta~_t,     frac = (v + 1) / 2,

and is trained with L_hybrid = L_simple + lambda * L_vlb (eq. 16), where L_vlb sees a stop-gradient on the mean so
that only the variance learns from it. L_vlb at step t > 0 is KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) and
at t = 0 the discretized-Gaussian decoder NLL -log p_theta(x_0|x_1) (DDPM §3.3), both in bits per dimension.

Weights as in the official PixArt code (diffusion/iddpm.py: `IDDPM(..., rescale_learned_sigmas=False)` ->
LossType.MSE; diffusion/model/gaussian_diffusion.py `training_losses`): loss = mse + vb with weight 1 on the
per-timestep vb term (no 1/1000 rescaling; with T = 1000 the RESCALED_MSE variant would be identical anyway).
"""
from __future__ import annotations

import math

import torch

from pixart_ds.diffusion.schedule import Schedule

_LN2 = math.log(2.0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation used by improved DDPM (and GELU-tanh)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for a Gaussian integrated over the 8-bit bin around x (DDPM §3.3, eq. 13), elementwise in nats.

    The data are assumed to be 256 levels scaled to [-1, 1] (bin half-width 1/255); the outermost bins extend to
    +-inf. PixArt applies this unchanged to VAE latents, as its code does; we follow it.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def learned_range_log_variance(var_values: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Improved DDPM eq. 15: v in [-1, 1] [B, C, h, w] -> log Sigma_theta [B, C, h, w]."""
    min_log = schedule.extract("posterior_log_variance_clipped", t, var_values.ndim)
    max_log = schedule.extract("log_betas", t, var_values.ndim)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def vb_terms_bpd(eps: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 schedule: Schedule) -> torch.Tensor:
    """One term of the VLB per sample [B], in bits/dim: KL for t > 0, decoder NLL for t = 0.

    eps, var_values, x0, x_t: [B, C, h, w] float32; t: [B] int64. The model mean comes from eps through
    x0_hat = x0 from eps (no clipping: latents are unbounded) and mu~_t(x_t, x0_hat).
    """
    true_mean = schedule.q_posterior_mean(x0, x_t, t)
    true_log_var = schedule.extract("posterior_log_variance_clipped", t, x_t.ndim)
    model_log_var = learned_range_log_variance(var_values, t, schedule)
    model_mean = schedule.q_posterior_mean(schedule.predict_x0_from_eps(x_t, t, eps), x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LN2
    nll = -discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
    nll = mean_flat(nll) / _LN2
    return torch.where(t == 0, nll, kl)


def training_losses(model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, schedule: Schedule, pred_sigma: bool = True) -> dict[str, torch.Tensor]:
    """Per-sample losses, each [B] float32: {"loss", "mse", "vb"}.

    model_out: [B, 2C, h, w] (epsilon, variance interpolation v) when pred_sigma, else [B, C, h, w] (epsilon).
    x0 (clean latents), x_t (= schedule.q_sample(x0, t, noise)), noise: [B, C, h, w]; t: [B] int64.
    Computed in float32 whatever the network's dtype (the official code's tables are float32 too).
    With pred_sigma = False, vb is zeros and loss = mse (plain epsilon MSE, DDPM's L_simple).
    """
    B, C = x0.shape[:2]
    want = 2 * C if pred_sigma else C
    if model_out.shape[0] != B or model_out.shape[1] != want or model_out.shape[2:] != x0.shape[2:]:
        raise ValueError(f"model output shape {tuple(model_out.shape)} does not match latents {tuple(x0.shape)} "
                         f"with pred_sigma={pred_sigma} (expected {want} channels)")
    model_out = model_out.float()
    x0, x_t, noise = x0.float(), x_t.float(), noise.float()
    if pred_sigma:
        eps, var_values = model_out[:, :C], model_out[:, C:]
        # Stop-gradient on the mean (improved DDPM §3.1): the VLB trains only the variance head.
        vb = vb_terms_bpd(eps.detach(), var_values, x0, x_t, t, schedule)
    else:
        eps = model_out
        vb = torch.zeros(B, dtype=torch.float32, device=model_out.device)
    mse = mean_flat((noise - eps) ** 2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
