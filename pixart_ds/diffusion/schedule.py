"""The forward (noising) process PixArt trains with: DDPM's linear betas over 1,000 steps.

Paper (PixArt-alpha, training details) and official code (diffusion/iddpm.py -> gaussian_diffusion
.get_named_beta_schedule("linear", 1000)): betas = linspace(1e-4, 0.02, 1000) in float64. Every per-timestep table
below is kept in float64 (as improved DDPM does, "Use float64 for accuracy") and cast to float32 only when it is
gathered for a batch, exactly like the official `_extract_into_tensor(...).float()`.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021, "improved DDPM", §2): t in [0, T) indexes the step, so t = 0
means one step of noise. alpha_bar_t = prod_{s<=t} (1 - beta_s). q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0,
(1 - alpha_bar_t) I) and the posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM eq. 6-7).
"""
from __future__ import annotations

import torch


class Schedule:
    """Per-timestep tables of the diffusion process, each a float64 tensor of shape [T]."""

    def __init__(self, betas: torch.Tensor, beta_schedule: str = "linear", beta_start: float | None = None,
                 beta_end: float | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must be a 1-D tensor in (0, 1], got shape {tuple(betas.shape)}")
        self.beta_schedule = beta_schedule
        self.beta_start = float(betas[0]) if beta_start is None else float(beta_start)
        self.beta_end = float(betas[-1]) if beta_end is None else float(beta_end)
        self.num_timesteps = int(betas.shape[0])
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # beta~_t (DDPM eq. 7); it is 0 at t = 0, so its log is clipped to beta~_1 there (improved DDPM code).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = torch.log(
                torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        else:
            self.posterior_log_variance_clipped = torch.log(betas)
        # mu~_t = coef1 * x_0 + coef2 * x_t (DDPM eq. 7)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        self._device_cache: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls(betas, "linear", beta_start, beta_end)

    @classmethod
    def from_config(cls, dcfg) -> "Schedule":
        """From a `config.DiffusionConfig` (num_timesteps, beta_schedule, beta_start, beta_end)."""
        if dcfg.beta_schedule != "linear":
            raise ValueError(f"diffusion.beta_schedule: {dcfg.beta_schedule!r} is not supported (only 'linear')")
        if dcfg.num_timesteps < 1:
            raise ValueError(f"diffusion.num_timesteps: must be >= 1, got {dcfg.num_timesteps}")
        return cls.linear(dcfg.num_timesteps, dcfg.beta_start, dcfg.beta_end)

    def diffusers_config(self) -> dict:
        """Keyword arguments that give a diffusers scheduler the same training betas.

        diffusers builds linear betas with float32 linspace; they agree with ours to ~1e-9 (see tests), so the
        named schedule is used rather than 1,000 explicit `trained_betas` (keeps exported configs readable).
        """
        return dict(num_train_timesteps=self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end,
                    beta_schedule=self.beta_schedule)

    # ------------------------------------------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        # float64 copies cached per device so a training step does not move tables (or sync) every call.
        key = str(device)
        cache = self._device_cache.setdefault(key, {})
        if name not in cache:
            cache[name] = getattr(self, name).to(device)
        return cache[name]

    def extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Table `name` gathered at timesteps t [B], cast to float32 and shaped [B, 1, ..., 1] (ndim dims)."""
        v = self._table(name, t.device)[t.long()].float()
        return v.reshape(v.shape[0], *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4); x0/noise [B, C, h, w], t [B]."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        a = self.extract("sqrt_alphas_cumprod", t, x0.ndim).to(x0.dtype)
        s = self.extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim).to(x0.dtype)
        return a * x0 + s * noise

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform t ~ U{0, ..., T-1} [B] int64 (official: torch.randint(0, num_timesteps, (B,)))."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps (inverse of q_sample)."""
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mu~_t(x_t, x_0) of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
        return (self.extract("posterior_mean_coef1", t, x_t.ndim) * x0
                + self.extract("posterior_mean_coef2", t, x_t.ndim) * x_t)

    def __repr__(self) -> str:
        return (f"Schedule({self.beta_schedule}, T={self.num_timesteps}, beta {self.beta_start:g}..{self.beta_end:g})")
