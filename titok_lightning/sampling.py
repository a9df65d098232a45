"""Pieces shared by the class-conditional token generators (MaskGIT, RAR) and their samplers.

- Token space: image codes ``[0, K)``, the mask id ``K``, class ``c`` as ``K + 1 + c`` and one null
  class ``K + 1 + num_classes`` for classifier-free guidance;
  :class:`~titok_lightning.models.class_conditional.ClassConditionalGenerator` holds it for the models.
- Randomness: every sampler takes a ``torch.Generator`` (or an int seed) so that runs repeat exactly.
- Schedules: the masking schedules (MaskGIT's arccos and others) and the power-cosine guidance
  schedule (MDT).
- CUDA graphs: the samplers' network calls, replayed from a graph on CUDA devices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------------
# Token space
# ----------------------------------------------------------------------------------------------------------


def class_condition_ids(
    class_ids: torch.Tensor,
    codebook_size: int,
    num_classes: int,
    drop_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class ids [B] -> condition token ids [B]: ``codebook_size + 1 + class``, or the null class id
    ``codebook_size + 1 + num_classes`` with probability ``drop_prob`` (label dropout for CFG)."""
    if class_ids.ndim != 1 or class_ids.is_floating_point():
        raise ValueError(f"class ids must be an integer tensor of shape [B], got {tuple(class_ids.shape)}")
    condition = class_ids + (codebook_size + 1)
    if drop_prob > 0:
        drop = torch.rand(class_ids.shape, generator=generator, device=class_ids.device) < drop_prob
        condition = condition.masked_fill(drop, codebook_size + 1 + num_classes)
    return condition


# ----------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------


def resolve_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    """An int seeds a fresh generator on ``device``; a generator must live on ``device``'s type."""
    device = torch.device(device)
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"the generator is on {generator.device} but sampling runs on {device}")
        return generator
    if isinstance(generator, int):
        return torch.Generator(device).manual_seed(generator)
    raise TypeError(f"expected a torch.Generator, an int seed or None, got {type(generator).__name__}")


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device, generator=None) -> torch.Tensor:
    """Standard Gumbel noise in fp32, ``-log(-log(u))`` with both logs clamped at 1e-20 as in MaskGIT."""
    u = torch.rand(shape, device=device, generator=generator)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------


_MASK_SCHEDULES = {
    "root": lambda r, lib: 1 - r**0.5,
    "square": lambda r, lib: 1 - r**2,
    "cosine": lambda r, lib: lib.cos(r * math.pi / 2),
    "arccos": lambda r, lib: lib.acos(r) / (math.pi / 2),
    "linear": lambda r, lib: 1 - r,
}


def masking_ratio(progress: float | torch.Tensor, mode: str = "arccos") -> float | torch.Tensor:
    """Fraction of tokens still masked at ``progress`` in [0, 1]: 1 at 0, 0 at 1 for every mode (MaskGIT
    uses ``"arccos"``)."""
    if mode not in _MASK_SCHEDULES:
        raise ValueError(f"unknown masking schedule {mode!r}; choose from {sorted(_MASK_SCHEDULES)}")
    return _MASK_SCHEDULES[mode](progress, torch if isinstance(progress, torch.Tensor) else math)


def random_masking(
    input_ids: torch.Tensor, mask_token_id: int, generator: torch.Generator | None = None, schedule: str = "arccos"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time masking: per sample draw ``t ~ U(0, 1)``, mask ``round(N * masking_ratio(t))`` tokens
    (at least one) at uniformly random positions.

    Args:
        input_ids: [B, N] token ids.
        schedule: a :func:`masking_ratio` mode.
    Returns:
        masked ids [B, N] (masked positions hold ``mask_token_id``) and the boolean mask [B, N].
    """
    batch, seq_len = input_ids.shape
    device = input_ids.device
    t = torch.rand(batch, device=device, generator=generator)
    ratio = masking_ratio(t, schedule).clamp(1e-6, 1.0)
    num_masked = (seq_len * ratio).round().clamp(min=1)
    ranks = torch.rand(batch, seq_len, device=device, generator=generator).argsort(dim=-1)
    mask = ranks < num_masked[:, None]
    return input_ids.masked_fill(mask, mask_token_id), mask


def sample_and_remask(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask_token_id: int,
    temperature: float,
    num_masked: int | None,
    generator: torch.Generator | None = None,
    confidence_noise: bool = True,
) -> torch.Tensor:
    """One MaskGIT decoding step on ids [B, N] given logits [B, N, V] -> ids [B, N].

    Every masked position gets a Gumbel-max sample (noise scaled by ``temperature``); decided positions
    keep their ids. Then the ``num_masked`` least confident new tokens are masked again (confidence: the
    sampled logit, plus ``temperature``-scaled Gumbel noise with ``confidence_noise``); ``num_masked=None``
    (the last step) keeps every sample.
    """
    device = logits.device
    sampled = (logits + temperature * gumbel_noise(logits.shape, device, generator)).argmax(dim=-1)
    is_masked = ids == mask_token_id
    sampled = torch.where(is_masked, sampled, ids)
    if num_masked is None:
        return sampled
    # Already decided tokens are never re-masked (infinite confidence).
    confidence = logits.gather(-1, sampled[..., None]).squeeze(-1).masked_fill(~is_masked, math.inf)
    if confidence_noise:
        confidence = confidence + temperature * gumbel_noise(confidence.shape, device, generator)
    least_confident = confidence.topk(num_masked, dim=-1, largest=False).indices
    return sampled.scatter(-1, least_confident, mask_token_id)


def power_cosine_guidance(progress: float, guidance_scale: float, power: float) -> float:
    """Guidance scale rising from 1 at ``progress`` 0 to ``guidance_scale`` at 1 along
    ``(1 - cos(pi * progress**power)) / 2`` (MDT); ``power`` 0 gives a constant ``guidance_scale``."""
    return (guidance_scale - 1.0) * (1.0 - math.cos(math.pi * progress**power)) / 2.0 + 1.0


def progress_bar(iterable: Iterable[T], enabled: bool, desc: str) -> Iterator[T]:
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, leave=False))


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------------------


def can_graph(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s sampling calls on ``device`` can be replayed from CUDA graphs: a CUDA device and
    unsharded parameters (FSDP gathers each sharded block in its forward: collectives and allocations a
    graph cannot replay)."""
    return device.type == "cuda" and not any(type(p).__name__ == "DTensor" for p in model.parameters())


class CUDAGraphCall:
    """``fn`` run eagerly at its first call, captured in a CUDA graph right after, and replayed for every
    later call with inputs of the same shapes.

    A sampler's network call at small batch (one RAR token, a MaskGIT step over 33 tokens) is bound by
    kernel launches and Python, not by arithmetic; a replay launches the whole call at once. The first call
    is a real one (it also makes the lazy initialisations a capture must not see), so capturing costs no
    extra device work; the capture itself only records. Later calls copy their inputs into the captured
    buffers (an int fills a 0-dim long tensor: no host-to-device copy) and return the graph's output
    tensor, which the next replay overwrites.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, *inputs: torch.Tensor | int) -> torch.Tensor:
        if self.graph is None:
            return self._run_and_capture(inputs)
        for buffer, value in zip(self.inputs, inputs, strict=True):
            if isinstance(value, int):
                buffer.fill_(value)
            else:
                buffer.copy_(value)
        self.graph.replay()
        return self.output

    def _run_and_capture(self, inputs: tuple[torch.Tensor | int, ...]) -> torch.Tensor:
        device = next(x.device for x in inputs if isinstance(x, torch.Tensor))
        self.inputs = tuple(torch.tensor(x, device=device) if isinstance(x, int) else x.clone() for x in inputs)
        first = self._first_call()
        self.graph, self.output = self._capture()
        return first

    def _autocast(self) -> torch.autocast:
        """The caller's autocast state, with the weight-cast cache off: that cache would hand the graph
        tensors that are freed after capture."""
        return torch.autocast(
            "cuda",
            dtype=torch.get_autocast_dtype("cuda"),
            enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False,
        )

    def _first_call(self) -> torch.Tensor:
        """``fn`` on the input buffers, for real, on the side stream the capture will use (its library handles and
        workspaces are then made before the capture)."""
        device = self.inputs[0].device
        current = torch.cuda.current_stream(device)
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(self.stream), self._autocast():
            first = self.fn(*self.inputs)
        current.wait_stream(self.stream)
        first.record_stream(current)  # made on the side stream, read on this one
        return first

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record ``fn`` on the input buffers (nothing runs): the graph and its output tensor. Everything a
        replay must vary has to be read from the buffers; any other value is fixed at capture.

        Captured with ``CUDAGraph.capture_begin/end`` on a side stream of the inputs' device rather than in
        ``torch.cuda.graph``, which synchronises the device and empties the allocator's cache (on older torch also
        collects garbage) at every capture: a sampler captures at every call, and a MaskGIT call lasts a few
        network calls."""
        device = self.inputs[0].device
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.stream(self.stream), self._autocast():
            graph.capture_begin()
            try:
                output = self.fn(*self.inputs)
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture's own error would hide fn's
                    graph.capture_end()
                raise
            graph.capture_end()
        current.wait_stream(self.stream)
        return graph, output


class GraphCache:
    """A sampler's CUDA graphs (and the buffers they read and write), kept from one ``generate`` call to the next,
    e.g. over ``sample.py``'s batches, where capturing at every call would cost a few network calls each time.

    One entry per sampler kind; it is rebuilt whenever something a graph fixed at capture differs: the sampler's
    own key (batch rows), the model's training mode, the autocast state, or the storage of any parameter or buffer
    of the model (``.to()``, a replaced tensor). Values changed in place (a loaded state dict, swapped-in EMA
    weights) are read by the replays as they are. Without a cache each call captures its own graphs.
    """

    def __init__(self):
        self._entries: dict[str, tuple[tuple, Any]] = {}

    def get(self, kind: str, model: torch.nn.Module, key: tuple, build: Callable[[], T]) -> T:
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        storage = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
        full_key = (key, model.training, autocast, storage)  # training: dropout is in a graph or not
        entry = self._entries.get(kind)
        if entry is None or entry[0] != full_key:
            entry = self._entries[kind] = (full_key, build())  # the old entry's graphs and buffers are freed
        return entry[1]
