"""Discrete-time DDPM noise schedules (betas -> alpha_bar tables)."""

import math

import torch

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine")
MAX_BETA = 0.999  # below 1 so alpha_bar stays > 0 unless zero terminal SNR is asked for explicitly


def _linear_betas(num_timesteps: int) -> torch.Tensor:
    # Ho et al. used 1e-4..0.02 for T=1000; scaling by 1000/T keeps alpha_bar's shape for other T (improved-diffusion).
    # For T <= 20 the scaled betas would reach 1 (alpha_bar = 0), hence the clamp.
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(max=MAX_BETA)


def _scaled_linear_betas(num_timesteps: int) -> torch.Tensor:
    # Stable Diffusion: linear in sqrt(beta). Same 1000/T scaling as "linear"; at T=1000 it is exactly SD's schedule.
    scale = 1000.0 / num_timesteps
    root = torch.linspace(math.sqrt(scale * 0.00085), math.sqrt(scale * 0.012), num_timesteps, dtype=torch.float64)
    return (root**2).clamp(max=MAX_BETA)


def _cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    # Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); clipping avoids beta=1 at t=T.
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last step is pure noise (SNR 0).

    alpha_bar[0] is kept; the last beta becomes 1, so epsilon-prediction is undefined there (use v or sample).
    """
    if len(betas) < 2:
        raise ValueError("zero terminal SNR needs at least 2 timesteps (alpha_bar[0] is kept, alpha_bar[-1] set to 0)")
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """Discrete-time DDPM schedule with T steps; tensors kept in float64, returned as float32 on the caller's device.

    Index t in 0..T-1 is the noise level of x_t: alpha_bar[t] = prod_{s<=t} (1 - beta_s); x_{-1} is the clean data.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps: int = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha_bar of x_{t-1}; 1 for t=0 because x_{-1} is the data.
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Tabulated in float64 here so 1 - alpha_bar near 0 keeps its precision and devices without float64 (MPS) work.
        self.snrs = self.alphas_cumprod / (1 - self.alphas_cumprod)
        # Per-device copies so a training step does not re-upload the table (the schedule is not an nn.Module).
        self._tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_name(
        cls, name: str = "linear", num_timesteps: int = 1000, zero_terminal_snr: bool = False
    ) -> "NoiseSchedule":
        makers = {"linear": _linear_betas, "scaled_linear": _scaled_linear_betas, "cosine": _cosine_betas}
        if name not in makers:
            raise ValueError(f"unknown noise schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        betas = makers[name](num_timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def terminal_alpha_bar(self) -> float:
        return float(self.alphas_cumprod[-1])

    def _gather(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t)
        key = (name, t.device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = getattr(self, name).to(device=t.device, dtype=dtype)
            self._tables[key] = table
        return table[t.long()]

    def alpha_bar(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha_bar[t] for integer timesteps t (any shape), on t's device."""
        return self._gather("alphas_cumprod", t, dtype)

    def alpha_bar_prev(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha_bar[t-1], with 1 for t=0."""
        return self._gather("alphas_cumprod_prev", t, dtype)

    def beta(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather("betas", t, dtype)

    def snr(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
        return self._gather("snrs", t, dtype)

    def __repr__(self) -> str:
        first, last = float(self.alphas_cumprod[0]), self.terminal_alpha_bar
        return f"NoiseSchedule(T={self.num_timesteps}, alpha_bar[0]={first:.6g}, alpha_bar[-1]={last:.6g})"
