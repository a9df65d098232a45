"""Image-quality and tokenizer metrics shared by the training callbacks and the sampling script.

- ``FeatureStatistics``: running first and second moments of feature vectors (float64, one matrix product per
  batch) for the Frechet Inception Distance; ``frechet_distance`` turns two sets of moments into a FID.
- ``inception_score``: Inception Score from classifier logits, split and shuffled as torch-fidelity does.
- ``CodebookHistogram``: code counts on device, giving codebook usage and entropy (bits).
- ``ImageMetricAccumulator``: feeds real/generated images through a feature extractor and collects what FID and
  IS need; works for reconstructions (real = inputs) and for generated images (real = precomputed statistics).
- ``load_inception_extractor``: torch-fidelity's InceptionV3 (TF-FID weights), loaded safely, or a clear error
  naming the file to download when it is not available offline.
- ``save_npz_for_adm`` / ``load_adm_reference_statistics``: the file formats of OpenAI's ADM evaluator.

Every accumulator has a ``sync()`` that combines the state of all DDP ranks (a no-op without a process group);
call it once, on every rank, before reading results.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# (uint8 images [B, 3, H, W]) -> (features [B, D], logits [B, C])
FeatureExtractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
# pytorch-fid publishes the same converted TF weights under another name (the reference evaluator's download).
INCEPTION_WEIGHTS_ALTERNATIVE_NAMES = ("pt_inception-2015-12-05-6726825d.pth",)


class InceptionWeightsUnavailableError(RuntimeError):
    """The InceptionV3 weights are neither at the given path nor in the torch hub cache, and cannot be downloaded."""


def _distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 in [0, 255] (rounded, so uint8 inputs round-trip exactly).

    Args:
        images: [B, 3, H, W] floating point, values in [0, 1] (clamped).
    Returns:
        [B, 3, H, W] uint8.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1] or uint8 images, got dtype {images.dtype}")
    return images.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, H, W], got shape {tuple(images.shape)}")


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------------


class FeatureStatistics:
    """Running sum and Gram matrix (float64) of feature vectors, for their mean and covariance.

    ``update`` costs one [D, B] x [B, D] product per batch and stays on the features' device.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.feature_sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [B, D]."""
        if features.dim() != 2:
            raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}")
        features = features.double()
        if self.feature_sum is None:
            dim = features.shape[1]
            self.feature_sum = features.new_zeros(dim)
            self.gram = features.new_zeros(dim, dim)
        elif features.shape[1] != self.feature_sum.shape[0]:
            raise ValueError(f"feature dimension changed from {self.feature_sum.shape[0]} to {features.shape[1]}")
        self.feature_sum += features.sum(dim=0)
        self.gram.addmm_(features.T, features)
        self.count += features.shape[0]

    def sync(self) -> None:
        """Sum the statistics of all DDP ranks (every rank must call this; each must have seen >= 1 batch)."""
        if _distributed_world_size() == 1:
            return
        if self.feature_sum is None:
            raise RuntimeError("FeatureStatistics.sync() on a rank that saw no features")
        count = torch.tensor([self.count], dtype=torch.float64, device=self.feature_sum.device)
        for tensor in (self.feature_sum, self.gram, count):
            dist.all_reduce(tensor)
        self.count = int(count.item())

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean [D], unbiased covariance [D, D]), float64."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        mean = self.feature_sum / self.count
        covariance = (self.gram - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr(sqrt(sigma1 @ sigma2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(sigma1) @ sigma2 @ sqrt(sigma1) (same spectrum), which is stable where a general matrix sqrt is not.

    Args:
        mu1, mu2: means [D] (tensors or arrays).
        sigma1, sigma2: covariances [D, D].
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(x).double().cpu() for x in (mu1, sigma1, mu2, sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt_product = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    distance = diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product
    return float(distance)


# ---------------------------------------------------------------------------------------------------------------------
# Inception score
# ---------------------------------------------------------------------------------------------------------------------


def inception_score(
    logits: torch.Tensor, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score from unbiased Inception logits, as torch-fidelity computes it.

    Args:
        logits: [N, C] classifier logits (torch-fidelity's "logits_unbiased").
        splits: number of disjoint chunks; the score is exp(E[KL(p(y|x) || p(y))]) per chunk.
        shuffle: permute the samples first with ``np.random.RandomState(seed)`` (torch-fidelity's default).
    Returns:
        (mean, std) over the splits.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    num_samples = logits.shape[0]
    if num_samples < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, have {num_samples}")
    if shuffle:
        permutation = torch.from_numpy(np.random.RandomState(seed).permutation(num_samples)).to(logits.device)
        logits = logits[permutation]
    log_p = logits.double().log_softmax(dim=1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        chunk = slice(i * num_samples // splits, (i + 1) * num_samples // splits)
        log_marginal = p[chunk].mean(dim=0, keepdim=True).log()
        kl = (p[chunk] * (log_p[chunk] - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate [N_rank, ...] tensors of all ranks along dim 0 (N_rank may differ between ranks)."""
    world_size = _distributed_world_size()
    if world_size == 1:
        return tensor
    num_rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_num_rows = [torch.empty_like(num_rows) for _ in range(world_size)]
    dist.all_gather(all_num_rows, num_rows)
    all_num_rows = [int(n.item()) for n in all_num_rows]
    padded = tensor.new_zeros((max(all_num_rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, all_num_rows)])


# ---------------------------------------------------------------------------------------------------------------------
# Codebook usage
# ---------------------------------------------------------------------------------------------------------------------


class CodebookHistogram:
    """Counts of code indices, accumulated on device without host synchronisation."""

    def __init__(self, codebook_size: int, device: torch.device | str | None = None) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Add code indices of any shape (e.g. [B, N]); values must lie in [0, codebook_size)."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        codes = codes.reshape(-1).to(device=self.counts.device, dtype=torch.int64)
        # index_add_ instead of bincount: bincount waits for the host to size its output.
        self.counts.index_add_(0, codes, torch.ones_like(codes))

    def sync(self) -> None:
        if _distributed_world_size() > 1:
            dist.all_reduce(self.counts)

    def usage(self) -> float:
        """Fraction of codebook entries used at least once."""
        return float((self.counts > 0).double().mean())

    def entropy(self) -> float:
        """Entropy of the code distribution in bits (log2(codebook_size) when uniform)."""
        total = self.counts.sum()
        if int(total) == 0:
            raise ValueError("no codes were counted")
        p = self.counts[self.counts > 0].double() / total
        return float(-(p * p.log2()).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Feature extraction and the FID/IS accumulator
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Disable TF32 and autocast: reportable Inception features need full-precision float32 (or float64) math."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _inception_weights_candidates(weights_path: str | os.PathLike | None) -> list[Path]:
    if weights_path is not None:
        return [Path(weights_path)]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    names = (os.path.basename(INCEPTION_WEIGHTS_URL), *INCEPTION_WEIGHTS_ALTERNATIVE_NAMES)
    return [cache / name for name in names]


def load_inception_extractor(
    weights_path: str | os.PathLike | None = None,
    dtype: str = "float64",
    device: torch.device | str = "cpu",
    download: bool = True,
) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with the TF-FID weights, returning ("2048" features, "logits_unbiased").

    The module takes uint8 images [B, 3, H, W] (resized to 299 like TF1) and returns a tuple of float32 tensors
    ([B, 2048], [B, 1008]). dtype is the internal precision: "float64" as the reference evaluator, or "float32".

    The weights are read with ``torch.load(weights_only=True)`` from ``weights_path``, else from the torch hub
    cache (``<torch.hub.get_dir()>/checkpoints/``), downloading there if ``download`` and the network allows.

    Raises:
        InceptionWeightsUnavailableError: the weights are not available; the message says what to fetch and where.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    candidates = _inception_weights_candidates(weights_path)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None and weights_path is None and download:
        try:
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(candidates[0]), progress=False)
            path = candidates[0]
        except (OSError, ValueError, RuntimeError):  # URLError is an OSError
            path = None
    if path is None:
        raise InceptionWeightsUnavailableError(
            f"InceptionV3 (FID) weights not found at {', '.join(str(p) for p in candidates)}. Download "
            f"{INCEPTION_WEIGHTS_URL} to {candidates[0]}, or pass the file: metrics.inception_weights_path=<file> "
            "(sample.py), callbacks.reconstruction_metrics.inception_weights_path=<file> (train.py)."
        )
    from titok_lightning.torch_files import NotACheckpointError, torch_load

    try:
        state_dict = torch_load(path)
    except NotACheckpointError as error:
        raise InceptionWeightsUnavailableError(f"{error}: not the InceptionV3 (FID) weights") from None
    # torch-fidelity only loads from a path with weights_only=False: hand it the verified tensors re-serialised.
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=buffer,
            feature_extractor_internal_dtype=dtype,
        )
    except RuntimeError as error:  # load_state_dict's missing / unexpected keys
        problem = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise InceptionWeightsUnavailableError(
            f"{path} does not hold the InceptionV3 (FID) weights of {INCEPTION_WEIGHTS_URL} ({problem[:200]})"
        ) from None
    return extractor.to(device)


class ImageMetricAccumulator:
    """Collects Inception features of generated (or reconstructed) images and of real images for FID and IS.

    Args:
        feature_extractor: callable uint8 images [B, 3, H, W] -> (features [B, D], logits [B, C]); e.g.
            ``load_inception_extractor()``.
        compute_fid: keep feature statistics for FID.
        compute_is: keep the logits of the generated images for the Inception Score.
        reference_statistics: (mu [D], sigma [D, D]) of the real distribution (e.g. ADM's reference batch); when
            given, ``update`` needs no real images.
    """

    def __init__(
        self,
        feature_extractor: FeatureExtractor,
        compute_fid: bool = True,
        compute_is: bool = True,
        reference_statistics: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray] | None = None,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.compute_fid = compute_fid
        self.compute_is = compute_is
        self.reference_statistics = reference_statistics
        self.fake_statistics = FeatureStatistics()
        self.real_statistics = FeatureStatistics()
        self.logits: list[torch.Tensor] = []
        self.count = 0

    def reset(self) -> None:
        self.fake_statistics.reset()
        self.real_statistics.reset()
        self.logits = []
        self.count = 0

    def _device(self) -> torch.device:
        if self.logits:
            return self.logits[0].device
        if self.fake_statistics.feature_sum is not None:
            return self.fake_statistics.feature_sum.device
        raise RuntimeError("ImageMetricAccumulator.sync() on a rank that saw no images")

    @torch.no_grad()
    def update(self, fake_images: torch.Tensor, real_images: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            fake_images: [B, 3, H, W] generated/reconstructed images, float in [0, 1] or uint8.
            real_images: [B', 3, H, W] real images (same format); required for FID without reference_statistics.
        """
        _check_images(fake_images, "fake_images")
        need_real = self.compute_fid and self.reference_statistics is None
        if need_real and real_images is None:
            raise ValueError("FID needs real_images (or reference_statistics at construction)")
        images = images_to_uint8(fake_images)
        if need_real:
            _check_images(real_images, "real_images")
            images = torch.cat([images, images_to_uint8(real_images).to(images.device)])
        with exact_float32():
            features, logits = self.feature_extractor(images)
        num_fake = fake_images.shape[0]
        if self.compute_fid:
            self.fake_statistics.update(features[:num_fake])
            if need_real:
                self.real_statistics.update(features[num_fake:])
        if self.compute_is:
            self.logits.append(logits[:num_fake].float())
        self.count += num_fake

    def sync(self) -> None:
        """Combine all DDP ranks (call on every rank, once, before ``compute``); ``count`` becomes the total."""
        if _distributed_world_size() > 1:
            count = torch.tensor([self.count], dtype=torch.int64, device=self._device())
            dist.all_reduce(count)
            self.count = int(count.item())
        if self.compute_fid:
            self.fake_statistics.sync()
            if self.reference_statistics is None:
                self.real_statistics.sync()
        if self.compute_is:
            self.logits = [_all_gather_rows(torch.cat(self.logits))]

    def compute(self, is_splits: int = 10) -> dict[str, float]:
        """Returns {"fid", "inception_score", "inception_score_std"} for the enabled metrics."""
        results = {}
        if self.compute_fid:
            if self.reference_statistics is None:
                reference_mu, reference_sigma = self.real_statistics.mean_and_covariance()
            else:
                reference_mu, reference_sigma = self.reference_statistics
            results["fid"] = frechet_distance(
                *self.fake_statistics.mean_and_covariance(), reference_mu, reference_sigma
            )
        if self.compute_is:
            results["inception_score"], results["inception_score_std"] = inception_score(
                torch.cat(self.logits), splits=is_splits
            )
        return results


# ---------------------------------------------------------------------------------------------------------------------
# ADM evaluator files
# ---------------------------------------------------------------------------------------------------------------------


def save_npz_for_adm(path: str | os.PathLike, images: np.ndarray | torch.Tensor) -> None:
    """Write images as the ``arr_0`` array of an .npz, the sample-batch format of OpenAI's ADM evaluator.

    Args:
        images: uint8 [N, H, W, 3] (channels last).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype} (convert [0, 1] floats with images_to_uint8)")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] (channels last), got shape {images.shape}")
    np.savez(path, arr_0=images)


def load_adm_reference_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) from an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz."""
    with np.load(path) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise KeyError(f"{path} has no {sorted(missing)} arrays (found {data.files}); not an ADM reference batch")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


__all__ = [
    "CodebookHistogram",
    "FeatureExtractor",
    "FeatureStatistics",
    "ImageMetricAccumulator",
    "InceptionWeightsUnavailableError",
    "exact_float32",
    "frechet_distance",
    "images_to_uint8",
    "inception_score",
    "load_adm_reference_statistics",
    "load_inception_extractor",
    "save_npz_for_adm",
]
