"""Gaussian diffusion for per-token diffusion losses (MAR / MaskGen-KL), after improved DDPM.

The denoiser predicts the noise (epsilon) and, in a second half of its output channels, an interpolation
``v`` in [-1, 1] between the log of the clipped posterior variance and log(beta) ("learned range").
Training minimises ``mse(eps) + vb``, where the variational-bound term (in bits) trains the variance only.
Sampling runs ancestral steps over a respaced subset of the training timesteps; the denoiser always
receives the original timestep indices.

Schedules are float64 on the CPU and gathered per device as float32 (no module buffers, so casting a
model to bf16 never touches them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from titok_lightning.sampling import progress_bar

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x_t [N, C], t [N] int64 original timesteps) -> [N, 2C]`` (eps, variance interpolation)."""


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule ``alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)`` (float64)."""
    alpha_bar = [math.cos((i / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(num_steps + 1)]
    return torch.tensor(
        [min(1 - alpha_bar[i + 1] / alpha_bar[i], max_beta) for i in range(num_steps)],
        dtype=torch.float64,
        device="cpu",
    )


def space_timesteps(num_steps: int, section_counts: str | int | list[int]) -> list[int]:
    """Timesteps kept when respacing ``num_steps`` into sections with the given step counts.

    ``"100"`` keeps 100 evenly spread steps, ``"10,20"`` 10 from the first half and 20 from the second,
    ``"ddim50"`` the integer stride that yields exactly 50 steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[4:])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == wanted:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot create exactly {wanted} steps from {num_steps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size, extra = divmod(num_steps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        length = size + (i < extra)
        if count > length or count < 1:
            raise ValueError(f"cannot divide a section of {length} steps into {count}")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
        start += length
    return sorted(set(kept))


class GaussianDiffusion:
    """Epsilon-prediction diffusion with learned-range variance over ``betas`` (float64 [T]).

    ``timestep_map[i]`` is the original timestep of respaced step ``i`` (identity without respacing).
    """

    def __init__(self, betas: torch.Tensor, timestep_map: list[int] | None = None):
        betas = betas.to("cpu", torch.float64)  # host tables, also when built under a meta/cuda device context
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(self.num_timesteps))
        self._respaced = self.timestep_map != list(range(self.num_timesteps))
        self.alphas_cumprod = alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        self._tables = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
            "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            "log_betas": betas.log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def cosine(cls, num_steps: int = 1000, respacing: str | int | list[int] | None = None) -> GaussianDiffusion:
        """Cosine schedule over ``num_steps``, optionally respaced (e.g. ``"100"``) for sampling."""
        betas = cosine_betas(num_steps)
        if respacing in (None, ""):
            return cls(betas)
        kept = space_timesteps(num_steps, respacing)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)[kept]
        spaced = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return cls(spaced, timestep_map=kept)

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        tables = self._on_device.get(t.device)
        if tables is None:
            tables = self._on_device[t.device] = {k: v.to(t.device) for k, v in self._tables.items()}
        return tables[name][t].float().view(-1, *([1] * (ndim - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse ``x_start`` [N, ...] to (respaced) step ``t`` [N] with the given noise."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.dim()) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.dim()) * noise
        )

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            self._extract("posterior_mean_coef1", t, x_t.dim()) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.dim()) * x_t
        )

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the denoiser output [N, 2C] (fp32)."""
        eps, var_interp = model_output.float().chunk(2, dim=1)
        frac = (var_interp + 1) / 2
        min_log = self._extract("posterior_log_variance_clipped", t, x_t.dim())
        max_log = self._extract("log_betas", t, x_t.dim())
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_x_start = (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.dim()) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.dim()) * eps
        )
        return self.q_posterior_mean(pred_x_start, x_t, t), log_variance

    def _vb_bits(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VLB term in bits: KL to the true posterior, or the decoder NLL at t = 0."""
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_var = self._extract("posterior_log_variance_clipped", t, x_t.dim())
        mean, log_var = self.p_mean_variance(model_output, x_t, t)
        kl = 0.5 * (
            -1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean) ** 2 * (-log_var).exp()
        )
        nll = -_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)
        dims = list(range(1, x_start.dim()))
        return torch.where(t == 0, nll.mean(dims), kl.mean(dims)) / math.log(2.0)

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample ``loss = mse + vb`` (and both terms) for ``x_start`` [N, C] at steps ``t`` [N]."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self._original_t(t)).float()
        eps, var_interp = model_output.chunk(2, dim=1)
        # the VLB term trains the variance only: the mean comes from a detached epsilon
        vb = self._vb_bits(x_start, x_t, t, torch.cat([eps.detach(), var_interp], dim=1))
        mse = (noise - eps).pow(2).mean(list(range(1, x_start.dim())))
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _original_t(self, t: torch.Tensor) -> torch.Tensor:
        if not self._respaced:
            return t
        return torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling from ``noise`` [N, C] over every (respaced) step; ``temperature`` scales the
        injected noise. Returns x_0 [N, C] in fp32."""
        x = noise.float()
        for i in progress_bar(range(self.num_timesteps - 1, -1, -1), progress, "diffusion"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            mean, log_var = self.p_mean_variance(model_fn(x, torch.full_like(t, self.timestep_map[i])), x, t)
            if i == 0:
                x = mean
            else:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + (0.5 * log_var).exp() * z * temperature
        return x


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` under a Gaussian discretised to 8-bit bins on [-1, 1] (IDDPM decoder)."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
