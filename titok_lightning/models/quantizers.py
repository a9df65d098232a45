"""Latent bottlenecks of the 1D tokenizers: a vector quantizer and a diagonal Gaussian posterior.

Both work on the tokenizers' "fake 2D" latent layout ``[B, C, 1, N]`` (channels, a height of one,
N tokens). Quantizer distances and Gaussian statistics are computed in fp32 with autocast off:
nearest-code decisions and ``exp(logvar)`` are not bf16-safe.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every DDP rank along dim 0 (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a straight-through estimator.

    ``use_l2_norm`` compares l2-normalised features with l2-normalised codes (cosine distance) and
    returns normalised codes. ``clustering_vq`` (TA-TiTok) keeps an EMA of each code's usage in the
    persistent buffer ``embed_prob`` and, in training mode, pulls rarely used codes towards the
    encoder feature nearest to them (gathered over all DDP ranks), so that dead codes revive.
    """

    def __init__(
        self,
        codebook_size: int = 1024,
        token_size: int = 256,
        commitment_cost: float = 0.25,
        use_l2_norm: bool = False,
        clustering_vq: bool = False,
        clustering_decay: float = 0.99,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.token_size = token_size
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.clustering_vq = clustering_vq
        self.clustering_decay = clustering_decay
        self.embedding = nn.Embedding(codebook_size, token_size)
        if clustering_vq:
            self.register_buffer("embed_prob", torch.zeros(codebook_size))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -1.0 / self.codebook_size, 1.0 / self.codebook_size)
        if self.clustering_vq:
            self.embed_prob.zero_()

    def codebook(self) -> torch.Tensor:
        """The code vectors [K, C] as the quantizer compares them (normalised when ``use_l2_norm``)."""
        weight = self.embedding.weight
        if self.clustering_vq and self.training:
            # The refresh below rewrites the weight in place; autograd must see the values used here.
            weight = weight.clone()
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    @staticmethod
    def _distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distances [M, K] between rows of ``flat`` [M, C] and ``codebook`` [K, C]."""
        return flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2.0 * (flat @ codebook.t())

    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Ids [B, H, W] (int64) of the nearest codes to ``z`` [B, C, H, W], without losses or gradients."""
        if z.shape[1] != self.token_size:
            raise ValueError(f"expected {self.token_size} latent channels, got shape {tuple(z.shape)}")
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            b, c, h, w = z.shape
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
            if self.use_l2_norm:
                flat = F.normalize(flat, dim=-1)
            return self._distances(flat, self.codebook()).argmin(dim=1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize ``z`` [B, C, H, W] (tokenizers: [B, C, 1, N]).

        Returns the straight-through quantized latents [B, C, H, W] (fp32; normalised features plus
        the detached step to the code when ``use_l2_norm``) and a dict with the scalar
        ``quantizer_loss`` = ``commitment_loss`` + ``codebook_loss`` and ``min_encoding_indices``
        [B, H, W] (int64).
        """
        if z.shape[1] != self.token_size:
            raise ValueError(f"expected {self.token_size} latent channels, got shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            b, c, h, w = z.shape
            # contiguous before the normalisation: reducing over the strided channel dim of the permuted view
            # rounds differently (1 ulp) from the reference, which normalises a contiguous [B, H, W, C] copy
            z = z.float().permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
            features = z.reshape(-1, c)
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            codebook = self.codebook()
            distances = self._distances(z.reshape(-1, c), codebook)
            indices = distances.argmin(dim=1)
            z_quantized = codebook[indices].view_as(z)

            commitment_loss = self.commitment_cost * torch.mean((z_quantized.detach() - z) ** 2)
            codebook_loss = torch.mean((z_quantized - z.detach()) ** 2)

            if self.clustering_vq and self.training:
                self._refresh_codes(distances, indices, features)

            z_quantized = z + (z_quantized - z).detach()
            z_quantized = z_quantized.permute(0, 3, 1, 2).contiguous()
        return z_quantized, {
            "quantizer_loss": commitment_loss + codebook_loss,
            "commitment_loss": commitment_loss,
            "codebook_loss": codebook_loss,
            "min_encoding_indices": indices.view(b, h, w),
        }

    @torch.no_grad()
    def _refresh_codes(self, distances: torch.Tensor, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Clustering update (CVQ-VAE): usage EMA, then move each code towards its nearest feature by a
        weight that is ~1 for unused codes and vanishes for used ones."""
        indices = _all_gather_cat(indices)
        distances = _all_gather_cat(distances)
        features = _all_gather_cat(features.detach())
        counts = torch.zeros(self.codebook_size, device=indices.device).scatter_add_(
            0, indices, torch.ones_like(indices, dtype=torch.float32)
        )
        self.embed_prob.mul_(self.clustering_decay).add_(counts / indices.numel(), alpha=1 - self.clustering_decay)
        nearest_features = features[distances.argmin(dim=0)]  # [K, C]
        step = torch.exp(-(self.embed_prob * self.codebook_size * 10) / (1 - self.clustering_decay) - 1e-3)
        weight = self.embedding.weight
        weight.copy_(weight * (1 - step[:, None]) + nearest_features * step[:, None])

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for integer ids [...] -> [..., C], or for soft assignments [..., K] (float
        weights over the codebook) -> [..., C] (the weighted code mix). With ``use_l2_norm`` the
        result rows are l2-normalised."""
        if indices.is_floating_point():
            if indices.shape[-1] != self.codebook_size:
                raise ValueError(f"soft codes need a last axis of {self.codebook_size}, got {tuple(indices.shape)}")
            entries = indices @ self.embedding.weight
        else:
            entries = self.embedding(indices)
        return F.normalize(entries, dim=-1) if self.use_l2_norm else entries


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior of the VAE tokenizers.

    ``parameters`` [B, 2C, 1, N] holds the mean in its first C channels and the log-variance
    (clamped to [-30, 20]) in the last C. ``deterministic`` makes the std zero, so ``sample()`` returns
    the mean and ``kl()`` zeros. Statistics are fp32.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.dim() != 4 or parameters.shape[1] % 2:
            raise ValueError(f"expected parameters [B, 2C, 1, N], got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = deterministic
        with torch.autocast(device_type=parameters.device.type, enabled=False):
            self.mean, logvar = parameters.float().chunk(2, dim=1)
            self.logvar = logvar.clamp(-30.0, 20.0)
            if deterministic:
                self.std = torch.zeros_like(self.mean)
                self.var = torch.zeros_like(self.mean)
            else:
                self.std = torch.exp(0.5 * self.logvar)
                self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with eps ~ N(0, I) drawn from ``generator`` (global RNG if None)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per token: ``0.5 * sum_{C, H}(mean^2 + var - 1 - logvar)`` -> [B, N]."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0], self.mean.shape[3])
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2])
