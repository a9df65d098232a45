"""Metric functions: feature statistics, FID, IS, codebook usage, ADM files, Inception loading, DDP sync."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import linalg
from torch_fidelity.metric_isc import isc_features_to_metric

from titok_lightning import metrics
from titok_lightning.metrics import (
    CodebookHistogram,
    FeatureStatistics,
    ImageMetricAccumulator,
    InceptionWeightsUnavailableError,
    frechet_distance,
    images_to_uint8,
    inception_score,
    load_adm_reference_statistics,
    save_npz_for_adm,
)


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID straight from the definition, with scipy's general matrix square root."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class TinyExtractor(torch.nn.Module):
    """Random conv net standing in for Inception: uint8 [B, 3, H, W] -> (features [B, 12], logits [B, 7])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.head = torch.nn.Linear(12, 7)

    def forward(self, images):
        assert images.dtype == torch.uint8
        features = torch.tanh(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))
        return features, self.head(features)


def test_feature_statistics_match_numpy():
    features = torch.randn(53, 6, dtype=torch.float64) * 3 + 1
    stats = FeatureStatistics()
    for chunk in features.split([20, 1, 32]):
        stats.update(chunk.float())
    mean, cov = stats.mean_and_covariance()
    x = features.float().double().numpy()
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)
    assert stats.count == 53
    with pytest.raises(ValueError, match="feature dimension"):
        stats.update(torch.randn(2, 5))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    y = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) + 0.5
    ours = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(scipy_fid(x, y), rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_of_shifted_sets_large():
    x = torch.randn(400, 8, dtype=torch.float64)
    a, b = FeatureStatistics(), FeatureStatistics()
    a.update(x)
    b.update(x)
    assert abs(frechet_distance(*a.mean_and_covariance(), *b.mean_and_covariance())) < 1e-8
    shifted = FeatureStatistics()
    shifted.update(torch.randn(400, 8, dtype=torch.float64) + 3)
    # A mean shift of 3 in each of 8 unit-variance dimensions: FID ~ 8 * 9 = 72.
    assert frechet_distance(*a.mean_and_covariance(), *shifted.mean_and_covariance()) > 60
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_inception_score_matches_torch_fidelity():
    logits = torch.randn(97, 11) * 4
    expected = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-8)


def test_inception_score_limits():
    # Uniform predictions: IS = 1. Confident, evenly spread over 5 classes: IS = 5.
    assert inception_score(torch.zeros(20, 5), splits=1)[0] == pytest.approx(1.0)
    confident = torch.nn.functional.one_hot(torch.arange(20) % 5, 5).float() * 100
    assert inception_score(confident, splits=1, shuffle=False)[0] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(3, 5), splits=10)


def test_codebook_usage_and_entropy_on_known_histogram():
    hist = CodebookHistogram(8)
    hist.update(torch.tensor([[0, 0], [1, 3]]))
    assert hist.counts.tolist() == [2, 1, 0, 1, 0, 0, 0, 0]
    assert hist.usage() == pytest.approx(3 / 8)
    assert hist.entropy() == pytest.approx(1.5)  # p = (1/2, 1/4, 1/4)
    uniform = CodebookHistogram(16)
    uniform.update(torch.arange(16).repeat(3))
    assert uniform.usage() == 1.0
    assert uniform.entropy() == pytest.approx(4.0)
    with pytest.raises(TypeError, match="integer"):
        hist.update(torch.zeros(3))
    with pytest.raises((IndexError, RuntimeError)):
        hist.update(torch.tensor([8]))


def test_images_to_uint8_round_trips_uint8():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(images_to_uint8(images.float() / 255), images)
    with pytest.raises(TypeError):
        images_to_uint8(images.long())


def test_adm_npz_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    save_npz_for_adm(tmp_path / "samples.npz", torch.from_numpy(images))
    with np.load(tmp_path / "samples.npz") as data:
        assert data.files == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], images)
    with pytest.raises(TypeError, match="uint8"):
        save_npz_for_adm(tmp_path / "bad.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match="channels last"):
        save_npz_for_adm(tmp_path / "bad.npz", images.transpose(0, 3, 1, 2))

    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, arr_0=images)
    loaded_mu, loaded_sigma = load_adm_reference_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    with pytest.raises(KeyError, match="sigma"):
        load_adm_reference_statistics(tmp_path / "samples.npz")


def test_image_accumulator_fid_and_reference_statistics():
    extractor = TinyExtractor()
    real = torch.rand(40, 3, 8, 8)
    fake = (real + 0.2 * torch.randn_like(real)).clamp(0, 1)
    accumulator = ImageMetricAccumulator(extractor)
    for r, f in zip(real.split(16), fake.split(16)):
        accumulator.update(f, r)
    accumulator.sync()
    result = accumulator.compute(is_splits=4)

    with torch.no_grad():
        real_features, _ = extractor((real * 255).round().to(torch.uint8))
        fake_features, fake_logits = extractor((fake * 255).round().to(torch.uint8))
    expected_fid = scipy_fid(fake_features.double().numpy(), real_features.double().numpy())
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert result["inception_score"] == pytest.approx(inception_score(fake_logits, splits=4)[0], rel=1e-6)

    x = real_features.double().numpy()
    with_reference = ImageMetricAccumulator(extractor, compute_is=False, reference_statistics=(x.mean(0), np.cov(x.T)))
    with_reference.update(fake)
    assert with_reference.compute()["fid"] == pytest.approx(expected_fid, rel=1e-6)
    with pytest.raises(ValueError, match="real_images"):
        accumulator.update(fake)


def test_load_inception_extractor_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InceptionWeightsUnavailableError, match="weights-inception-2015-12-05"):
        metrics.load_inception_extractor(download=False)
    with pytest.raises(InceptionWeightsUnavailableError, match="missing.pth"):
        metrics.load_inception_extractor(tmp_path / "missing.pth")


def test_load_inception_extractor_from_local_file(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

    # Random weights with the right keys: build the module once with weight loading disabled.
    with monkeypatch.context() as patch:
        patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        random_inception = fidelity_inception.FeatureExtractorInceptionV3("random", ["2048"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir()
    torch.save(random_inception.state_dict(), cached)

    extractor = metrics.load_inception_extractor(dtype="float32", download=False)
    assert torch.equal(extractor.fc.weight, random_inception.fc.weight)
    # Its forward (a 299x299 Inception pass, slow on CPU) returns the tuple (features, logits) in this order.
    assert extractor.features_list == ["2048", "logits_unbiased"]


def _sync_worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(11, 5, generator=generator, dtype=torch.float64)
        logits = torch.randn(11, 4, generator=generator)
        codes = torch.randint(0, 9, (11, 3), generator=generator)
        mine = slice(0, 4) if rank == 0 else slice(4, 11)  # unequal shares

        stats = FeatureStatistics()
        stats.update(features[mine])
        stats.sync()
        mean, cov = stats.mean_and_covariance()
        assert stats.count == 11
        torch.testing.assert_close(mean, features.mean(0))
        torch.testing.assert_close(cov, torch.cov(features.T))

        assert torch.equal(metrics._all_gather_rows(logits[mine]), logits)

        hist = CodebookHistogram(9)
        hist.update(codes[mine])
        hist.sync()
        assert torch.equal(hist.counts, torch.bincount(codes.flatten(), minlength=9))
    finally:
        dist.destroy_process_group()


def test_statistics_sync_across_ranks(tmp_path):
    # fork: children need not re-import this module (and its heavy imports).
    mp.start_processes(_sync_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True, start_method="fork")
