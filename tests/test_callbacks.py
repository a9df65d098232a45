"""EMA, reconstruction-metrics and image-logging callbacks on a tiny LightningModule (CPU)."""

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from scipy import linalg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch_fidelity.metric_isc import isc_features_to_metric

from callbacks import EMACallback, ImageLoggerCallback, ReconstructionMetricsCallback
from titok_lightning import metrics
from titok_lightning.loading import load_model_state_dict

CODEBOOK_SIZE = 16


class TinyAutoencoder(LightningModule):
    """``model`` is averaged; ``loss.discriminator`` (trained too) and ``teacher`` (frozen) must not be."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1))
        self.model.register_buffer("calls", torch.zeros(()))
        self.loss = nn.Module()
        self.loss.discriminator = nn.Linear(3, 1)
        self.teacher = nn.Linear(3, 3).requires_grad_(False)
        self.trained_weights = []  # (global_step, model[0].weight) after each optimizer step
        self.validation_weights = []

    def training_step(self, batch, batch_idx):
        images = batch[0]
        reconstructions = self.model(images)
        adversarial = self.loss.discriminator(reconstructions.mean(dim=(2, 3))).mean()
        return (reconstructions - self.teacher(images.mean(dim=(2, 3)))[..., None, None]).pow(2).mean() + adversarial

    def on_train_batch_end(self, outputs, batch, batch_idx):
        last_step = self.trained_weights[-1][0] if self.trained_weights else 0
        if self.trainer.global_step != last_step:  # an optimizer step happened (not just accumulation)
            self.trained_weights.append((self.trainer.global_step, self.model[0].weight.detach().clone()))

    def validation_step(self, batch, batch_idx):
        images = batch[0]
        self.validation_weights.append(self.model[0].weight.detach().clone())
        return {
            "inputs": images,
            "reconstructions": self.model(images).clamp(0, 1),
            "codes": (images[:, 0, :2, :2].flatten(1) * CODEBOOK_SIZE).long().clamp(max=CODEBOOK_SIZE - 1),
            "codebook_size": CODEBOOK_SIZE,
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def loader(num_images=12, batch_size=4, seed=1):
    images = torch.rand(num_images, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(images), batch_size=batch_size)


def make_trainer(tmp_path, callbacks, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def hand_ema(weights, decay, every, start):
    """EMA after each optimizer step, from the reference's schedule written out longhand."""
    ema = None
    for k, weight in enumerate(weights, start=1):
        if (k - 1) % every != 0:
            continue
        s = k - start - 1
        d = 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))
        ema = weight.clone() if ema is None else d * ema + (1 - d) * weight
    return ema


# ---------------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decay, every, start, accumulate",
    [(0.4, 1, 0, 1), (0.95, 2, 3, 1), (0.5, 1, 0, 2)],
)
def test_ema_matches_hand_computation(tmp_path, decay, every, start, accumulate):
    module = TinyAutoencoder()
    ema = EMACallback(decay=decay, update_every_n_steps=every, start_step=start)
    trainer = make_trainer(tmp_path, [ema], max_steps=9, limit_val_batches=0, accumulate_grad_batches=accumulate)
    trainer.fit(module, loader(num_images=4 * 9 * accumulate))
    weights = [w for _, w in module.trained_weights]
    assert len(weights) == ema.num_updates == 9
    torch.testing.assert_close(ema._ema[0], hand_ema(weights, decay, every, start), rtol=1e-6, atol=1e-7)
    # The model itself keeps training with the raw weights.
    assert torch.equal(module.model[0].weight, weights[-1])


def test_ema_averages_only_the_model_and_evaluates_with_it(tmp_path):
    module = TinyAutoencoder()
    ema = EMACallback(decay=0.9)
    trainer = make_trainer(tmp_path, [ema], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, loader(), loader(num_images=4))

    assert {id(p) for p in ema._params} == {id(p) for p in module.model.parameters()}
    # Validation ran with the EMA weights (nothing changed them since the last validation) ...
    assert torch.equal(module.validation_weights[-1], ema._ema[0])
    assert not torch.equal(ema._ema[0], module.trained_weights[-1][1])
    # ... and the raw weights are back afterwards.
    assert torch.equal(module.model[0].weight, module.trained_weights[-1][1])

    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state_dict, ema_state = checkpoint["state_dict"], checkpoint["callbacks"]["EMACallback"]
    for (name, param), averaged in zip(module.model.named_parameters(), ema._ema):
        assert torch.equal(state_dict[f"model.{name}"], averaged)
        assert torch.equal(ema_state["raw_model_state"][f"model.{name}"], param)
    assert torch.equal(state_dict["model.calls"], module.model.calls)  # buffers as they are
    for name, tensor in [*module.loss.named_parameters(prefix="loss"), *module.teacher.named_parameters("teacher")]:
        assert torch.equal(state_dict[name], tensor)
    assert ema_state["num_updates"] == 6

    # Inference consumers get the EMA weights by default.
    inference_weights = load_model_state_dict(path)
    assert torch.equal(inference_weights["0.weight"], ema._ema[0])
    assert torch.equal(load_model_state_dict(path, use_ema=False)["0.weight"], module.model[0].weight)


def test_ema_resume_continues_exactly(tmp_path):
    uninterrupted = TinyAutoencoder()
    ema_full = EMACallback(decay=0.9)
    make_trainer(tmp_path / "a", [ema_full], max_epochs=2).fit(uninterrupted, loader(), loader(num_images=4))

    first_half = TinyAutoencoder()
    ema_first = EMACallback(decay=0.9)
    trainer = make_trainer(tmp_path / "b", [ema_first], max_epochs=1)
    trainer.fit(first_half, loader(), loader(num_images=4))
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    assert not torch.equal(ema_first._ema[0], first_half.model[0].weight)

    resumed = TinyAutoencoder()
    ema_resumed = EMACallback(decay=0.9)
    make_trainer(tmp_path / "c", [ema_resumed], max_epochs=2).fit(
        resumed, loader(), loader(num_images=4), ckpt_path=path
    )
    assert ema_resumed.num_updates == ema_full.num_updates == 6
    for a, b in zip(ema_full._ema, ema_resumed._ema):
        assert torch.equal(a, b)
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_ema_checkpoint_for_evaluation_loads_ema_weights(tmp_path):
    module = TinyAutoencoder()
    ema = EMACallback(decay=0.9)
    trainer = make_trainer(tmp_path, [ema], max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    fresh = TinyAutoencoder()
    evaluator = make_trainer(tmp_path, [EMACallback()])
    evaluator.validate(fresh, loader(num_images=4), ckpt_path=path, verbose=False)
    assert torch.equal(fresh.validation_weights[-1], ema._ema[0])


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction metrics
# ---------------------------------------------------------------------------------------------------------------------


class TinyExtractor(nn.Module):
    """Random conv features standing in for Inception: uint8 [B, 3, H, W] -> (features [B, 6], logits [B, 5])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, images):
        features = torch.tanh(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))
        return features, self.head(features) * 3


def direct_metrics(module, extractor, data, max_samples=None):
    """The same metrics from scratch: numpy/scipy FID, torch-fidelity IS, unique codes."""
    outputs = [module.validation_step(batch, i) for i, batch in enumerate(data)]
    inputs = torch.cat([o["inputs"] for o in outputs])[:max_samples]
    reconstructions = torch.cat([o["reconstructions"] for o in outputs])[:max_samples]
    codes = torch.cat([o["codes"] for o in outputs])[:max_samples]
    with torch.no_grad():
        real, _ = extractor((inputs * 255).round().to(torch.uint8))
        fake, logits = extractor((reconstructions * 255).round().to(torch.uint8))
    x, y = fake.double().numpy(), real.double().numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fid = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return {
        "rfid": float(fid),
        "inception_score": isc_features_to_metric(logits, splits=2)["inception_score_mean"],
        "codebook_usage": len(counts) / CODEBOOK_SIZE,
        "codebook_entropy": float(-(p * p.log2()).sum()),
    }


@pytest.mark.parametrize("max_samples", [None, 7])
def test_metrics_callback_logs_directly_computed_values(tmp_path, max_samples):
    module, extractor = TinyAutoencoder(), TinyExtractor()
    callback = ReconstructionMetricsCallback(feature_extractor=extractor, is_splits=2, max_samples=max_samples)
    trainer = make_trainer(tmp_path, [callback])
    data = loader(num_images=12)
    trainer.validate(module, data, verbose=False)

    expected = direct_metrics(module, extractor, data, max_samples)
    assert callback.last_metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert callback.last_metrics[name] == pytest.approx(value, rel=1e-6), name
        assert trainer.callback_metrics[f"val/{name}"].item() == pytest.approx(value, rel=1e-5), name


def test_metrics_callback_without_inception_weights_warns_once(tmp_path, monkeypatch):
    attempts = []

    def unavailable(*args, **kwargs):
        attempts.append(1)
        raise metrics.InceptionWeightsUnavailableError("download weights-inception.pth to /cache/checkpoints.")

    monkeypatch.setattr(metrics, "load_inception_extractor", unavailable)
    callback = ReconstructionMetricsCallback()
    module = TinyAutoencoder()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(), loader(num_images=4))
    assert len(attempts) == 1
    assert sum("weights-inception.pth" in str(w.message) for w in caught) == 1
    assert "val/rfid" not in trainer.callback_metrics
    assert set(callback.last_metrics) == {"codebook_usage", "codebook_entropy"}
    assert "val/codebook_usage" in trainer.callback_metrics


def test_metrics_callback_rejects_outputs_without_images(tmp_path):
    class NoOutputs(TinyAutoencoder):
        def validation_step(self, batch, batch_idx):
            return None

    trainer = make_trainer(tmp_path, [ReconstructionMetricsCallback(feature_extractor=TinyExtractor())])
    with pytest.raises(TypeError, match="reconstructions"):
        trainer.validate(NoOutputs(), loader(num_images=4), verbose=False)


# ---------------------------------------------------------------------------------------------------------------------
# Image logging
# ---------------------------------------------------------------------------------------------------------------------


def test_image_logger_writes_one_grid_per_due_validation(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    callback = ImageLoggerCallback(every_n_steps=4, num_images=2)
    trainer = make_trainer(tmp_path, [callback, EMACallback(decay=0.9)], max_epochs=3, logger=logger)
    trainer.fit(TinyAutoencoder(), loader(), loader(num_images=8, batch_size=4))

    # 3 steps per epoch: validations at steps 3, 6, 9 -> grids at 3 (first) and 9 (6 steps later).
    files = sorted(p.name for p in (tmp_path / "run" / "version_0" / "images").iterdir())
    assert files == ["step_0000003.png", "step_0000009.png"]
    grid = Image.open(tmp_path / "run" / "version_0" / "images" / files[0])
    assert grid.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2 columns x 2 rows of 8x8 images, padding 2


class ReconstructingAutoencoder(TinyAutoencoder):
    """A tokenizer module's interface: dict batches and ``reconstruct(batch) -> (images, info)``."""

    def __init__(self):
        super().__init__()
        self.reconstructed = []  # (global_step, model in training mode, model[0].weight, inputs, outputs) per call

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"],), batch_idx)

    def reconstruct(self, batch):
        outputs = self.model(batch["image"])
        weight = self.model[0].weight.clone()
        self.reconstructed.append((self.trainer.global_step, self.model.training, weight, batch["image"], outputs))
        return outputs, None


def test_image_logger_reconstructs_training_images_with_the_ema_every_n_steps(tmp_path):
    # the reference's generate_every: training images and their reconstructions by the EMA weights, in eval mode
    images = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    batches = DataLoader([{"image": image} for image in images], batch_size=4)
    module, ema = ReconstructingAutoencoder(), EMACallback(decay=0.9)
    trainer = make_trainer(tmp_path, [ema, ImageLoggerCallback(every_n_steps=2, num_images=3)], max_steps=6)
    trainer.fit(module, batches)

    folder = tmp_path / "images"
    assert sorted(p.name for p in folder.iterdir()) == [f"train_step_000000{n}.png" for n in (2, 4, 6)]
    assert [call[:2] for call in module.reconstructed] == [(2, False), (4, False), (6, False)]
    trained = [weight for _, weight in module.trained_weights]
    for step, _, weight, _, _ in module.reconstructed:
        torch.testing.assert_close(weight, hand_ema(trained[:step], 0.9, 1, 0), rtol=1e-6, atol=1e-7)
    assert module.model.training and torch.equal(module.model[0].weight, trained[-1])  # raw weights, training mode

    grid = torch.from_numpy(np.asarray(Image.open(folder / "train_step_0000004.png"))).permute(2, 0, 1) / 255
    top, bottom = grid[:, 2:10], grid[:, 12:20]  # rows of 8x8 images with padding 2
    _, _, _, inputs, reconstructions = module.reconstructed[1]
    torch.testing.assert_close(inputs, images[12:15])  # step 4 trains on the fourth batch: its first 3 images
    reconstructions = reconstructions.clamp(0, 1)
    for column in range(3):
        left = 2 + column * 10
        torch.testing.assert_close(top[:, :, left : left + 8], inputs[column], atol=1 / 255, rtol=0)
        torch.testing.assert_close(bottom[:, :, left : left + 8], reconstructions[column], atol=1 / 255, rtol=0)


def test_image_logger_sends_grid_to_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb")
    sent = []
    monkeypatch.setattr(logger.experiment, "add_image", lambda tag, image, global_step: sent.append((tag, image)))
    trainer = make_trainer(tmp_path, [ImageLoggerCallback(every_n_steps=1, num_images=3)], max_epochs=1, logger=logger)
    trainer.fit(TinyAutoencoder(), loader(), loader(num_images=4))
    assert [tag for tag, _ in sent] == ["val/reconstructions"]
    assert sent[0][1].shape == (3, 2 * 8 + 3 * 2, 3 * 8 + 4 * 2)
    assert (tmp_path / "tb" / "version_0" / "images" / "step_0000003.png").is_file()


def test_metrics_callback_combines_ranks(tmp_path):
    module, extractor = TinyAutoencoder(), TinyExtractor()
    callback = ReconstructionMetricsCallback(feature_extractor=extractor, is_splits=2)
    # fork: the two CPU ranks need not re-import this module; each validates 6 of the 12 images.
    trainer = make_trainer(tmp_path, [callback], strategy="ddp_fork", devices=2)
    data = loader(num_images=12)
    trainer.validate(module, data, verbose=False)

    expected = direct_metrics(module, extractor, data)
    for name, value in expected.items():
        assert trainer.callback_metrics[f"val/{name}"].item() == pytest.approx(value, rel=1e-5), name
