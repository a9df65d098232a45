"""RAR: randomized autoregressive class-conditional generator over image token sequences.

A causal transformer over ``[cls, condition, t_0 .. t_{N-1}]`` whose blocks are modulated per position
(adaLN-zero) by the condition embedding plus a learned per-step embedding. During training the image
tokens are presented in a random order per sample with probability ``random_ratio`` (annealed from 1 to
0, :func:`randomness_ratio`); every position then also receives the *target-aware* positional
embedding of the token it has to predict next, so the model knows which position comes next. Sampling
(:func:`rar_generate`) runs in raster order with a preallocated KV cache (:class:`KVCache`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titok_lightning.models.blocks import Attention, Mlp, init_trunc_normal, modulate
from titok_lightning.models.class_conditional import ClassConditionalGenerator
from titok_lightning.registry import register_model
from titok_lightning.sampling import (
    CUDAGraphCall,
    GraphCache,
    can_graph,
    power_cosine_guidance,
    progress_bar,
    resolve_generator,
)

# Rows of the reference's position tables beyond the sequence: unused, kept so that checkpoints load.
POSITION_TABLE_EXTRA_ROWS = 1024
STEP_TABLE_EXTRA_ROWS = 100
PREFIX_LEN = 2  # [cls, condition]
# A decoding step attends to the cache's first slots rounded up to a multiple of this: RAR-B reads 63% of its
# cache on average instead of all of it, with 4 static shapes (one CUDA graph each, captured per sampling call).
DECODE_KEY_BLOCK = 64


def randomness_ratio(step: int, anneal_start: int, anneal_end: int) -> float:
    """Probability of a random token order at training ``step``: 1 until ``anneal_start``, then linearly
    down to 0 at ``anneal_end``."""
    if step < anneal_start:
        return 1.0
    if step > anneal_end:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)


@dataclass(frozen=True)
class RARSampling:
    """Sampler settings (defaults: RAR-B's official evaluation)."""

    guidance_scale: float = 16.0
    """Reached at the end along the power-cosine schedule; 0 (the reference's switch) or 1 disable guidance."""
    guidance_scale_pow: float = 2.75
    """0 gives a constant ``guidance_scale``."""
    randomize_temperature: float = 1.0
    """Softmax temperature."""
    kv_cache: bool = True
    cuda_graph: bool = True
    """With the KV cache on a CUDA device, replay each decoding step from a CUDA graph (one per key length)."""


# ----------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer in preallocated [layers, B, heads, max_len, head_dim] buffers.

    The buffers are allocated on the first write with the dtype and batch of the values (so autocast
    works) and then written in place, either after the ``length`` cached positions (:meth:`update`, which
    returns views of the filled part; ``length`` advances once all layers have seen a chunk) or at a
    position given as a device tensor (:meth:`write`, static shapes for CUDA graphs; it leaves ``length``
    alone, so a cache is filled by ``update`` first and continued by ``write``, as in :func:`rar_generate`).
    """

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def _allocate(self, v: torch.Tensor) -> None:
        if self.keys is None:
            b, h, _, d = v.shape
            self.keys = v.new_zeros(self.num_layers, b, h, self.max_len, d)
            self.values = v.new_zeros(self.num_layers, b, h, self.max_len, d)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values [B, H, T, D] at ``length`` and return all cached ones [B, H, length+T, D]."""
        self._allocate(v)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} were requested")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def write(
        self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position's keys/values [B, H, 1, D] at ``position`` (a 0-dim long tensor) and return
        the first ``key_length`` slots [B, H, key_length, D]; slots past ``position`` must be masked by the
        caller."""
        self._allocate(v)
        index = position.view(1)
        self.keys[layer].index_copy_(2, index, k)
        self.values[layer].index_copy_(2, index, v)
        return self.keys[layer, :, :, :key_length], self.values[layer, :, :, :key_length]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions

    def reset(self) -> None:
        """Empty, keeping the buffers (and so the CUDA graphs that read and write them)."""
        self.length = 0


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class RARBlock(nn.Module):
    """Pre-norm causal block with adaLN-zero modulation (shift/scale/gate for attention and MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm=True, norm_eps=1e-6, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        position: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x, c: [B, T, D]; with ``kv_cache`` the T new positions follow the cached ones, or, given
        ``position`` (0-dim tensor), the single new position is that one and it attends to the cache slots
        where ``visible`` [1, key_length] is true (static shapes, :meth:`RAR.decode_step`)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        q, k, v = self.attn.project_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        # Under autocast the qk-norm returns fp32 and SDPA casts to the value dtype anyway; casting here
        # keeps the cached keys in that dtype too.
        q, k = q.to(v.dtype), k.to(v.dtype)
        attn = self._attend(q, k, v, kv_cache, layer, position, visible)
        x = x + gate_msa * attn
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache | None,
        layer: int,
        position: torch.Tensor | None,
        visible: torch.Tensor | None,
    ) -> torch.Tensor:
        if kv_cache is None:
            return self.attn.attend(q, k, v, is_causal=True)
        if position is not None:
            k, v = kv_cache.write(layer, position, k, v, visible.shape[-1])
            return self.attn.attend(q, k, v, attn_mask=visible)
        start = kv_cache.length
        k, v = kv_cache.update(layer, k, v)
        new = q.shape[2]
        if start == 0:
            return self.attn.attend(q, k, v, is_causal=new > 1)
        if new == 1:
            return self.attn.attend(q, k, v)
        # Several new positions after a cached prefix: causal with an offset.
        allowed = torch.ones(new, start + new, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return self.attn.attend(q, k, v, attn_mask=allowed)


class RARFinalLayer(nn.Module):
    """Affine-free LayerNorm modulated by the condition (scale first, then shift, as in the reference)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class RAR(ClassConditionalGenerator):
    """Randomized autoregressive generator.

    Token space as MaskGIT (:mod:`titok_lightning.sampling`): image codes, one unused mask id, shifted
    class ids and a null class for guidance. ``forward`` returns ``N + 1`` logits per sample: position
    ``i`` predicts the ``i``-th token of the (possibly permuted) order, the last one predicts past the end.
    """

    sampling_cls = RARSampling
    reference_sampling_fields = ("guidance_scale", "guidance_scale_pow", "randomize_temperature")

    def __init__(
        self,
        codebook_size: int = 1024,
        image_seq_len: int = 256,
        num_classes: int = 1000,
        hidden_size: int = 768,
        num_layers: int = 24,
        num_heads: int = 16,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        attn_drop: float = 0.1,
        class_label_dropout: float = 0.1,
        randomness_anneal_start: int = 125_000,
        randomness_anneal_end: int = 187_500,
        sampling: RARSampling | dict | None = None,
    ):
        super().__init__(codebook_size, image_seq_len, num_classes, class_label_dropout, sampling)
        self.randomness_anneal_start = randomness_anneal_start
        self.randomness_anneal_end = randomness_anneal_end

        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + POSITION_TABLE_EXTRA_ROWS, hidden_size))
        self.target_aware_pos_embed = nn.Parameter(
            torch.zeros(1, image_seq_len + POSITION_TABLE_EXTRA_ROWS, hidden_size)
        )
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, image_seq_len + STEP_TABLE_EXTRA_ROWS, hidden_size))
        self.blocks = nn.ModuleList(
            RARBlock(hidden_size, num_heads, intermediate_size, dropout, attn_drop) for _ in range(num_layers)
        )
        self.embeddings = nn.Embedding(self.vocab_size, hidden_size)
        self.adaln_before_head = RARFinalLayer(hidden_size)
        self.lm_head = nn.Linear(hidden_size, codebook_size)
        # A tensor, not a float attribute, so that annealing it does not retrigger torch.compile.
        self.register_buffer("random_ratio", torch.zeros(()), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(init_trunc_normal)
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, std=0.02)
        nn.init.zeros_(self.cls_token)
        for modulation in [b.adaLN_modulation[-1] for b in self.blocks] + [self.adaln_before_head.adaLN_modulation[-1]]:
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)

    # -- random orders -------------------------------------------------------------------------------------

    def set_random_ratio(self, ratio: float) -> None:
        self.random_ratio.fill_(ratio)

    def set_random_ratio_from_step(self, step: int) -> float:
        """Anneal the random-order probability for training ``step``; returns the new ratio."""
        ratio = randomness_ratio(step, self.randomness_anneal_start, self.randomness_anneal_end)
        self.set_random_ratio(ratio)
        return ratio

    def sample_orders(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[B, N] token orders: a random permutation with probability ``random_ratio``, else raster."""
        permutations = torch.rand(batch_size, self.image_seq_len, device=device, generator=generator).argsort(-1)
        use_random = torch.rand(batch_size, 1, device=device, generator=generator) < self.random_ratio
        raster = torch.arange(self.image_seq_len, device=device)
        return torch.where(use_random, permutations, raster)

    # -- network -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        condition: torch.Tensor,
        return_labels: bool = False,
        orders: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        """Training pass over image ids [B, N] and condition token ids [B] (see ``preprocess_condition``).

        Tokens are permuted by ``orders`` [B, N] (default: drawn with :meth:`sample_orders`).
        Returns logits [B, N + 1, codebook_size] and, with ``return_labels``, the permuted ids [B, N].
        """
        if orders is None:
            orders = self.sample_orders(input_ids.shape[0], input_ids.device, generator)
        return self.forward_fn(input_ids, condition, return_labels=return_labels, orders=orders)

    def forward_fn(
        self,
        input_ids: torch.Tensor,
        condition: torch.Tensor,
        return_labels: bool = False,
        orders: torch.Tensor | None = None,
        is_sampling: bool = False,
        kv_cache: KVCache | None = None,
    ):
        """The reference's ``forward_fn``.

        Args:
            input_ids: [B, n] image ids; n == N unless ``is_sampling`` (a generated prefix).
            condition: [B] condition token ids.
            orders: [B, N] token orders (default raster). Positional embeddings always follow them; the
                tokens are permuted too unless ``is_sampling`` (then they already are in that order).
            kv_cache: process only the positions after ``kv_cache.length`` and append them to the cache.
        Returns:
            logits [B, n + 1, codebook_size] (with a cache: one per new position, the cls position
            excluded), and the (permuted) labels [B, n] if ``return_labels``.
        """
        batch, n = input_ids.shape
        if n > self.image_seq_len or (not is_sampling and n != self.image_seq_len):
            raise ValueError(f"expected input ids [B, {self.image_seq_len}] (or a prefix when sampling), got {n}")
        if not is_sampling and orders is not None:
            input_ids = input_ids.gather(1, orders)
        start = 0 if kv_cache is None else kv_cache.length
        end = n + PREFIX_LEN
        if not start < end:
            raise ValueError(f"nothing to process: the KV cache already holds {start} of {end} positions")

        # Token embeddings of positions [start, end): cls, condition, image tokens.
        condition_embed = self.embeddings(condition)
        sequence = torch.cat([condition[:, None], input_ids], dim=1)
        x = self.embeddings(sequence[:, max(start - 1, 0) :])
        if start == 0:
            x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        x = x + self._position_embeddings(orders, start, end, input_ids.device)
        c = condition_embed[:, None] + self.timesteps_embeddings[:, start:end]

        for layer, block in enumerate(self.blocks):
            x = block(x, c, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(end - start)
        if start == 0:  # the cls position predicts nothing
            x, c = x[:, 1:], c[:, 1:]
        logits = self.lm_head(self.adaln_before_head(x, c))
        return (logits, input_ids) if return_labels else logits

    def _position_embeddings(
        self, orders: torch.Tensor | None, start: int, end: int, device: torch.device
    ) -> torch.Tensor:
        """Positional plus target-aware embeddings of sequence positions [start, end) -> [B or 1, T, D].

        Image token ``i`` (sequence position 2 + i) gets position row ``2 + orders[i]``; position ``p`` >= 1
        also gets the target-aware row of the token it predicts, ``2 + orders[p - 1]`` (none for the cls
        position and past the end).
        """
        if orders is None:  # raster: contiguous table rows, no gather (the per-step sampling path)
            lo, hi = max(start, 1), min(end, self.image_seq_len + 1)
            target = F.pad(self.target_aware_pos_embed[:, lo + 1 : hi + 1], (0, 0, lo - start, end - hi))
            return self.pos_embed[:, start:end] + target
        prefix_rows = torch.arange(PREFIX_LEN, device=device).expand(orders.shape[0], -1)
        rows = torch.cat([prefix_rows, orders + PREFIX_LEN], dim=1)[:, start:end]
        embed = self.pos_embed[0][rows]
        # Target rows of positions 1..N; cls (0) and the position past the end (N + 1) have none.
        target_rows = F.pad(orders + PREFIX_LEN, (1, 1), value=-1)[:, start:end]
        has_target = (target_rows >= 0)[..., None]
        target = self.target_aware_pos_embed[0][target_rows.clamp(min=0)]
        return embed + torch.where(has_target, target, torch.zeros((), dtype=target.dtype, device=device))

    def make_kv_cache(self) -> KVCache:
        return KVCache(len(self.blocks), self.image_seq_len + PREFIX_LEN)

    def decode_step(
        self,
        token_ids: torch.Tensor,
        condition: torch.Tensor,
        position: torch.Tensor,
        kv_cache: KVCache,
        key_length: int | None = None,
    ) -> torch.Tensor:
        """One raster-order decoding step with static shapes (capturable in a CUDA graph).

        Args:
            token_ids: [B] ids of the image token at sequence ``position``.
            condition: [B] condition token ids.
            position: 0-dim long tensor on the model's device: the token's sequence position (image
                token ``i`` sits at ``2 + i``, ``i < N - 1``); ``kv_cache`` holds every earlier position.
            key_length: attend over the cache's first ``key_length`` slots (more than ``position``;
                default all, see :func:`decode_key_length`).
        Returns:
            logits [B, codebook_size] of the next token.
        """
        key_length = key_length or kv_cache.max_len
        index = position.view(1)
        x = self.embeddings(token_ids)[:, None] + self.pos_embed[0].index_select(0, index)
        # In raster order position p predicts image token p - 1, whose target-aware row is p + 1.
        x = x + self.target_aware_pos_embed[0].index_select(0, index + 1)
        c = self.embeddings(condition)[:, None] + self.timesteps_embeddings[0].index_select(0, index)
        visible = (torch.arange(key_length, device=position.device) <= position)[None]  # [1 query, key_length]
        for layer, block in enumerate(self.blocks):
            x = block(x, c, kv_cache, layer, position=position, visible=visible)
        return self.lm_head(self.adaln_before_head(x, c))[:, 0]

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        generator: torch.Generator | int | None = None,
        progress: bool = False,
        graphs: GraphCache | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Sample image token ids [B, N] for class ids [B] with ``self.sampling`` (fields overridable); ``graphs``
        keeps the CUDA graphs for the next call."""
        self.check_class_ids(condition)
        return rar_generate(self, condition, replace(self.sampling, **overrides), generator, progress, graphs)

    # -- reference checkpoints -----------------------------------------------------------------------------

    @classmethod
    def kwargs_from_reference_config(cls, config: dict) -> dict[str, Any]:
        gen = config["model"]["generator"]
        return dict(
            super().kwargs_from_reference_config(config),
            dropout=gen.get("dropout", 0.1),
            attn_drop=gen.get("attn_drop", 0.1),
            randomness_anneal_start=gen.get("randomness_anneal_start", 125_000),
            randomness_anneal_end=gen.get("randomness_anneal_end", 187_500),
        )

    @classmethod
    def reference_config(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        config = super().reference_config(kwargs)
        config["model"]["generator"].update(
            {k: kwargs[k] for k in ("dropout", "attn_drop", "randomness_anneal_start", "randomness_anneal_end")}
        )
        return config

    @staticmethod
    def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Same key names; drops the causal mask should a checkpoint carry it."""
        return {k: v for k, v in state_dict.items() if k != "attn_mask"}


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


# cuDNN attention builds a plan for every new key length, i.e. for every decoding step; the others do not.
DECODING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_key_length(position: int, max_len: int) -> int:
    """Cache slots a decoding step at sequence ``position`` attends over: ``position + 1`` rounded up to a
    multiple of :data:`DECODE_KEY_BLOCK`; the last block runs to ``max_len`` (no graph for a sliver)."""
    rounded = -(-(position + 1) // DECODE_KEY_BLOCK) * DECODE_KEY_BLOCK
    return rounded if rounded + DECODE_KEY_BLOCK <= max_len else max_len


@torch.no_grad()
def rar_generate(
    model: RAR,
    condition: torch.Tensor,
    sampling: RARSampling | None = None,
    generator: torch.Generator | int | None = None,
    progress: bool = False,
    graphs: GraphCache | None = None,
) -> torch.Tensor:
    """Raster-order autoregressive sampling with classifier-free guidance.

    At step ``s`` the guidance scale is ``power_cosine_guidance(s / N, guidance_scale, guidance_scale_pow)``
    and ``logits = uncond + scale * (cond - uncond)``; the next token is drawn from
    ``softmax(logits / randomize_temperature)``. Conditional and null-class rows run as one batch. With
    the KV cache the first step fills it with the cls and condition positions, every later step feeds
    one token through :meth:`RAR.decode_step` over the first :func:`decode_key_length` cache slots
    (replayed from a CUDA graph per key length on CUDA devices).

    Args:
        condition: class ids [B] in [0, num_classes).
        generator: torch.Generator on the model's device, or an int seed.
        graphs: keeps the CUDA graphs and the KV cache they use for later calls with as many rows.
    Returns:
        token ids [B, N] in [0, codebook_size).
    """
    sampling = sampling or model.sampling
    device = condition.device
    generator = resolve_generator(generator, device)
    batch, seq_len = condition.shape[0], model.image_seq_len
    guided = sampling.guidance_scale not in (0.0, 1.0)  # scale 1 mixes to the conditional logits exactly
    cond_ids = model.preprocess_condition(condition)
    if guided:
        cond_ids = torch.cat([cond_ids, model.null_condition(batch, device)])
    rows = cond_ids.shape[0]
    ids = torch.zeros(rows, seq_len, dtype=torch.long, device=device)
    graphed = sampling.kv_cache and sampling.cuda_graph and can_graph(model, device)
    cache, decoders = None, {}  # decoders: key length -> (token ids [rows], condition [rows], position) -> logits
    if graphed:  # the graphs write into the cache: both kept together
        cache, decoders = (graphs or GraphCache()).get("rar", model, (rows,), lambda: (model.make_kv_cache(), {}))
        cache.reset()
    elif sampling.kv_cache:
        cache = model.make_kv_cache()

    def decoder(key_length: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
        def decode(token_ids: torch.Tensor, condition: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return model.decode_step(token_ids, condition, position, cache, key_length)

        return CUDAGraphCall(decode) if graphed else decode

    with sdpa_kernel(DECODING_SDPA_BACKENDS):
        for step in progress_bar(range(seq_len), progress, "RAR"):
            if cache is None or step == 0:
                logits = model.forward_fn(ids[:, :step], cond_ids, is_sampling=True, kv_cache=cache)[:, -1]
            else:
                position = step + 1  # of image token step - 1
                key_length = decode_key_length(position, cache.max_len)
                if key_length not in decoders:
                    decoders[key_length] = decoder(key_length)
                if not graphed:
                    position = torch.tensor(position, device=device)
                logits = decoders[key_length](ids[:, step - 1], cond_ids, position)
            logits = logits.float()
            if guided:
                scale = power_cosine_guidance(step / seq_len, sampling.guidance_scale, sampling.guidance_scale_pow)
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + scale * (cond_logits - uncond_logits)
            probs = F.softmax(logits / sampling.randomize_temperature, dim=-1)
            sampled = torch.multinomial(probs, num_samples=1, generator=generator)
            ids[:, step : step + 1] = sampled.repeat(rows // batch, 1)
    return ids[:batch]


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_RAR_VARIANTS = {
    # name: (hidden size, depth, MLP width, official evaluation sampler settings)
    "rar_b": (768, 24, 3072, RARSampling(guidance_scale=16.0, guidance_scale_pow=2.75, randomize_temperature=1.0)),
    "rar_l": (1024, 24, 4096, RARSampling(guidance_scale=15.5, guidance_scale_pow=2.5, randomize_temperature=1.02)),
    "rar_xl": (1280, 32, 5120, RARSampling(guidance_scale=6.9, guidance_scale_pow=1.5, randomize_temperature=1.02)),
    "rar_xxl": (1408, 40, 6144, RARSampling(guidance_scale=8.0, guidance_scale_pow=1.2, randomize_temperature=1.02)),
}

for _name, (_width, _depth, _mlp, _sampling) in _RAR_VARIANTS.items():
    register_model(
        _name,
        RAR,
        family="generator",
        checkpoint=f"yucornetto/RAR/{_name}.bin",
        tokens="256 x VQ 1024 (MaskGIT-VQGAN)",
        codebook_size=1024,
        image_seq_len=256,
        num_classes=1000,
        hidden_size=_width,
        num_layers=_depth,
        num_heads=16,
        intermediate_size=_mlp,
        sampling=asdict(_sampling),
    )
