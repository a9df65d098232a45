"""MaskGen text-to-image generators over TA-TiTok tokens (MaskGen-VQ and MaskGen-KL).

Both run an MM-DiT (:mod:`titok_lightning.models.mmdit`) over the image tokens, jointly with projected
CLIP text tokens and modulated by the pooled CLIP text embedding concatenated with a sinusoidal
encoding of the aesthetic score ("micro-conditioning").

- :class:`MaskGenVQ` predicts discrete token ids (MaskGIT-style masked modelling, weight-tied head) and
  samples with text-conditioned MaskGIT decoding.
- :class:`MaskGenKL` is an MAE-style decoder over continuous VAE tokens whose per-token output
  conditions a small diffusion MLP (:class:`DiffLoss`); it samples MAR-style, a random subset of tokens
  per step, each drawn by a diffusion sampler.

Text features come precomputed ([B, L, text_dim] penultimate CLIP tokens and [B, 1, text_dim] pooled),
so neither model needs CLIP (see :mod:`titok_lightning.models.clip_text` for encoding captions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from titok_lightning.convert import CheckpointMismatchError, FromReferenceConfig, name_rules, rename_keys
from titok_lightning.models.blocks import TimestepEmbedder, init_trunc_normal, modulate, timestep_embedding
from titok_lightning.models.diffusion import GaussianDiffusion
from titok_lightning.models.mmdit import (
    AdaLayerNormContinuous,
    JointAttention,
    MMDiT,
    convert_diffusers_keys,
    to_diffusers_keys,
)
from titok_lightning.models.quantizers import DiagonalGaussianDistribution
from titok_lightning.registry import register_model
from titok_lightning.sampling import (
    masking_ratio,
    power_cosine_guidance,
    progress_bar,
    random_masking,
    resolve_generator,
    sample_and_remask,
)

# ----------------------------------------------------------------------------------------------------
# Micro-conditioning encodings


def sin_cos_encoding(x: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """MaskGen-VQ micro-condition encoding of ``x`` [B] -> [B, dim]: sin half then cos half."""
    emb = timestep_embedding(x, dim, max_period=max_period)  # cos half first, zero-padded when dim is odd
    half = dim // 2
    return torch.cat([emb[:, half : 2 * half], emb[:, :half], emb[:, 2 * half :]], dim=-1)


def interleaved_sin_cos_encoding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """MaskGen-KL micro-condition encoding of ``x`` [B] -> [B, dim]: even channels sin, odd channels cos,
    wavelengths ``10000^(-2i/dim)``."""
    if dim % 2:
        raise ValueError(f"the interleaved encoding needs an even dimension, got {dim}")
    freqs = torch.pow(10000, -torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)
    args = x.float()[:, None] * freqs
    return torch.stack([torch.sin(args), torch.cos(args)], dim=-1).flatten(1)


# ----------------------------------------------------------------------------------------------------
# Shared text conditioning


class _TextConditionedGenerator(FromReferenceConfig, nn.Module):
    """Text-conditioning helpers shared by both generators (``self.transformer`` is an :class:`MMDiT`)."""

    transformer: MMDiT
    REFERENCE_NAMES: list[tuple[str, str]]  # (reference name, ours) where they differ outside the MM-DiT blocks
    micro_condition: bool
    micro_condition_embed_dim: int
    text_drop_prob: float
    sample_aesthetic_score: float

    def encode_micro_condition(self, aesthetic_score: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference_parameter_name(self, name: str) -> str:
        """The reference's name of parameter ``name`` where the two differ in what its weight-decay rule reads: the
        text projections (the reference decays ``cond_pooled_proj``, ``text_emb``, ``text_pooled_emb``; ours are all
        called ``*_embed``, a name it exempts)."""
        (renamed,) = rename_keys({name: None}, name_rules(self.REFERENCE_NAMES, to_reference=True))
        return renamed

    def pooled_condition(
        self, condition_pooled: torch.Tensor, aesthetic_score: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Pooled text feature [B, 1, text_dim] (or [B, text_dim]) -> [B, text_dim (+ micro_dim)], with the
        encoding of ``aesthetic_score * 100`` appended when the model is micro-conditioned."""
        pooled = condition_pooled.flatten(1)
        if not self.micro_condition:
            return pooled
        if aesthetic_score is None:
            raise ValueError("this model is micro-conditioned: pass aesthetic_score ([B] or a float)")
        if not isinstance(aesthetic_score, torch.Tensor):
            aesthetic_score = torch.full((pooled.shape[0],), float(aesthetic_score), device=pooled.device)
        micro = self.encode_micro_condition(aesthetic_score.to(pooled.device).float() * 100)
        return torch.cat([pooled, micro.to(pooled.dtype)], dim=-1)

    def embed_condition(
        self,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        aesthetic_score: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens [B, L, text_dim] and pooled feature [B, 1, text_dim] -> projected context
        [B, L, D] and pooled condition [B, D] for :meth:`MMDiT.forward`."""
        return self.transformer.embed_condition(condition, self.pooled_condition(condition_pooled, aesthetic_score))

    def drop_condition(
        self,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        null_condition: torch.Tensor,
        null_condition_pooled: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free-guidance training: replace each sample's text features by the empty-caption
        features ([1, L, D] / [1, 1, D]) with probability ``text_drop_prob``."""
        drop = torch.rand(condition.shape[0], generator=generator, device=condition.device) < self.text_drop_prob
        condition = torch.where(drop[:, None, None], null_condition.to(condition.dtype), condition)
        condition_pooled = torch.where(drop[:, None, None], null_condition_pooled.to(condition.dtype), condition_pooled)
        return condition, condition_pooled

    def _guidance_condition(
        self,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        null_condition: torch.Tensor | None,
        null_condition_pooled: torch.Tensor | None,
        aesthetic_score: torch.Tensor | float | None,
        guided: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected conditions; with guidance the null condition's rows follow the B conditional ones."""
        b = condition.shape[0]
        if aesthetic_score is None:
            aesthetic_score = self.sample_aesthetic_score
        if not guided:
            return self.embed_condition(condition, condition_pooled, aesthetic_score)
        if null_condition is None or null_condition_pooled is None:
            raise ValueError("guidance needs null_condition and null_condition_pooled (empty-caption features)")
        null_condition = null_condition.expand(b, *null_condition.shape[1:])
        null_condition_pooled = null_condition_pooled.expand(b, *null_condition_pooled.shape[1:])
        if isinstance(aesthetic_score, torch.Tensor):
            aesthetic_score = torch.cat([aesthetic_score, aesthetic_score])
        return self.embed_condition(
            torch.cat([condition, null_condition.to(condition.dtype)]),
            torch.cat([condition_pooled, null_condition_pooled.to(condition_pooled.dtype)]),
            aesthetic_score,
        )


def _reference_sections(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any], dict[str, Any]]:
    """The reference config's ``vq_model`` and ``maskgen`` sections, and the text-conditioning and
    transformer arguments that both generators read from them."""
    model = config.get("model", config)
    vq, mg = model["vq_model"], model["maskgen"]
    conditioning = dict(
        embed_dim=mg["decoder_embed_dim"],
        depth=mg["decoder_depth"],
        num_heads=mg["decoder_num_heads"],
        text_embed_dim=vq.get("text_embed_dim", 768),
        micro_condition=mg["micro_condition"],
        micro_condition_embed_dim=mg["micro_condition_embed_dim"],
        text_drop_prob=mg["text_drop_prob"],
        sample_aesthetic_score=mg.get("sample_aesthetic_score", 6.0),
    )
    return vq, mg, conditioning


def _reference_sections_of(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inverse of :func:`_reference_sections`: ``vq_model`` and ``maskgen`` sections with the shared arguments."""
    vq = dict(num_latent_tokens=kwargs["num_tokens"], text_embed_dim=kwargs["text_embed_dim"])
    mg = dict(
        decoder_embed_dim=kwargs["embed_dim"],
        decoder_depth=kwargs["depth"],
        decoder_num_heads=kwargs["num_heads"],
        micro_condition=kwargs["micro_condition"],
        micro_condition_embed_dim=kwargs["micro_condition_embed_dim"],
        text_drop_prob=kwargs["text_drop_prob"],
        sample_aesthetic_score=kwargs["sample_aesthetic_score"],
    )
    return vq, mg


# (reference name, ours) of the text conditioning's projections (and MaskGen-KL's positional embeddings); the rest
# of the MM-DiT is renamed by convert_diffusers_keys / to_diffusers_keys
_VQ_NAMES = [
    ("text_embed_proj.", "transformer.context_embed."),
    ("cond_pooled_proj.", "transformer.pooled_embed."),
]
_KL_NAMES = [
    ("decoder_pos_embed_learned", "pos_embed"),
    ("diffusion_pos_embed_learned", "diffusion_pos_embed"),
    ("text_emb.", "transformer.context_embed."),
    ("text_pooled_emb.", "transformer.pooled_embed."),
]


# ----------------------------------------------------------------------------------------------------
# MaskGen-VQ


class MaskGenVQ(_TextConditionedGenerator):
    """Masked token generator over discrete tokenizer ids, conditioned on text.

    Token space of the embedding table: ``[0, codebook_size)`` image codes, ``codebook_size`` the mask
    token, then ``num_classes`` class tokens and one "no class" token (unused by text conditioning, kept
    for checkpoint compatibility). With ``weight_tying`` the output head reuses the first
    ``codebook_size`` embedding rows.
    """

    REFERENCE_NAMES = _VQ_NAMES

    def __init__(
        self,
        codebook_size: int = 8192,
        num_tokens: int = 128,
        num_classes: int = 1000,
        embed_dim: int = 1024,
        depth: int = 16,
        num_heads: int = 16,
        text_embed_dim: int = 768,
        micro_condition: bool = True,
        micro_condition_embed_dim: int = 256,
        text_drop_prob: float = 0.1,
        sample_aesthetic_score: float = 6.0,
        weight_tying: bool = True,
        mask_schedule: str = "arccos",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        masking_ratio(0.5, mask_schedule)  # validates the name
        self.codebook_size = codebook_size
        self.num_tokens = num_tokens
        self.mask_token_id = codebook_size
        self.micro_condition = micro_condition
        self.micro_condition_embed_dim = micro_condition_embed_dim
        self.text_drop_prob = text_drop_prob
        self.sample_aesthetic_score = sample_aesthetic_score
        self.mask_schedule = mask_schedule
        pooled_dim = text_embed_dim + (micro_condition_embed_dim if micro_condition else 0)
        self.transformer = MMDiT(
            embed_dim, depth, num_heads, text_embed_dim, pooled_dim, grad_checkpointing=grad_checkpointing
        )
        self.embeddings = nn.Embedding(codebook_size + 1 + num_classes + 1, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.lm_head = None if weight_tying else nn.Linear(embed_dim, codebook_size)
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) weights, zero biases, zero continuous adaptive norms."""
        self.apply(init_trunc_normal)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLayerNormContinuous):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)

    def encode_micro_condition(self, aesthetic_score: torch.Tensor) -> torch.Tensor:
        return sin_cos_encoding(aesthetic_score, self.micro_condition_embed_dim, max_period=1000.0)

    def predict(self, input_ids: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, codebook_size] from ids [B, N] and projected conditions (:meth:`embed_condition`)."""
        x = self.embeddings(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        x = self.transformer(x, context, pooled)
        if self.lm_head is None:
            return F.linear(x, self.embeddings.weight[: self.codebook_size])
        return self.lm_head(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        aesthetic_score: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Logits [B, N, codebook_size] for token ids [B, N] (masked positions hold ``mask_token_id``),
        text tokens [B, L, text_dim], pooled text [B, 1, text_dim] and aesthetic scores [B]."""
        return self.predict(input_ids, *self.embed_condition(condition, condition_pooled, aesthetic_score))

    def mask_tokens(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training corruption: per sample, a ratio from the masking schedule at a uniform time masks
        ``round(N * ratio)`` (at least 1) random positions. Returns (masked ids [B, N], mask [B, N] bool)."""
        return random_masking(tokens, self.mask_token_id, generator, self.mask_schedule)

    def guidance_scale_at(self, ratio: float, guidance_scale: float, decay: str, scale_pow: float = 1.0) -> float:
        """Guidance strength after ``ratio`` of the steps: ``"none"`` constant, ``"linear"`` 1 -> scale,
        ``"cosine"`` 1 -> scale along a half cosine, ``"flippedcosine"`` the mirror image, from
        (scale + 1) / 2 down to (3 - scale) / 2."""
        if decay == "none":
            return guidance_scale
        if decay == "linear":
            return ratio * (guidance_scale - 1) + 1
        if decay == "cosine":
            return power_cosine_guidance(ratio, guidance_scale, scale_pow)
        if decay == "flippedcosine":
            return (guidance_scale - 1) * math.cos(ratio**scale_pow * math.pi) / 2 + 1
        raise ValueError(f"unknown guidance decay {decay!r}; choose none, linear, cosine or flippedcosine")

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        null_condition: torch.Tensor | None = None,
        null_condition_pooled: torch.Tensor | None = None,
        aesthetic_score: torch.Tensor | float | None = None,
        guidance_scale: float = 12.0,
        guidance_decay: str = "cosine",
        guidance_decay_scale_pow: float = 1.0,
        randomize_temperature: float = 2.0,
        softmax_temperature_annealing: bool = True,
        num_steps: int = 16,
        prob_sorting: bool = True,
        generator: torch.Generator | int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Text-conditioned MaskGIT decoding; returns token ids [B, num_tokens] in [0, codebook_size).

        Args:
            condition / condition_pooled: text tokens [B, L, text_dim] and pooled text [B, 1, text_dim].
            null_condition / null_condition_pooled: features of the empty caption ([1 or B, L, text_dim],
                [1 or B, 1, text_dim]); needed unless ``guidance_decay="none"`` with ``guidance_scale=0``.
            aesthetic_score: float or [B]; defaults to ``sample_aesthetic_score``.
            guidance_scale, guidance_decay, guidance_decay_scale_pow: guided logits are
                ``cond + s * (cond - uncond)`` with ``s`` from :meth:`guidance_scale_at` (s = 0: no guidance).
            randomize_temperature: Gumbel noise scale, annealed linearly to 0 over the steps.
            softmax_temperature_annealing: divide logits by ``0.5 + 0.8 * (1 - progress)`` (else by the
                annealed Gumbel temperature).
            num_steps: decoding steps; ``prob_sorting`` adds Gumbel noise to the confidences that choose
                which tokens are re-masked.
            generator: a ``torch.Generator`` on the conditions' device or an int seed (reproducible samples).
        """
        b, n = condition.shape[0], self.num_tokens
        device = condition.device
        generator = resolve_generator(generator, device)
        scales = [
            self.guidance_scale_at((s + 1) / num_steps, guidance_scale, guidance_decay, guidance_decay_scale_pow)
            for s in range(num_steps)
        ]
        guided = any(scale != 0 for scale in scales)
        context, pooled = self._guidance_condition(
            condition, condition_pooled, null_condition, null_condition_pooled, aesthetic_score, guided
        )
        ids = torch.full((b, n), self.mask_token_id, device=device, dtype=torch.long)
        num_masked = n
        for step in progress_bar(range(num_steps), progress, "MaskGen-VQ"):
            ratio = (step + 1) / num_steps
            gumbel_temperature = randomize_temperature * (1.0 - ratio)
            if scales[step] != 0:
                cond_logits, uncond_logits = self.predict(torch.cat([ids, ids]), context, pooled).float().chunk(2)
                logits = cond_logits + (cond_logits - uncond_logits) * scales[step]
            else:
                logits = self.predict(ids, context[:b], pooled[:b]).float()
            # without annealing the softmax temperature reaches 0 at the last step: keep it finite
            softmax_temperature = 0.5 + 0.8 * (1 - ratio) if softmax_temperature_annealing else gumbel_temperature
            logits = logits / max(softmax_temperature, 1e-6)
            if step == num_steps - 1:
                num_masked = None
            else:
                # schedule evaluated in float32 like the reference, so the counts agree at integer boundaries
                ratio_left = masking_ratio(torch.tensor(ratio, dtype=torch.float32), self.mask_schedule)
                num_masked = max(1, min(num_masked - 1, int(torch.floor(n * ratio_left))))
            ids = sample_and_remask(
                logits, ids, self.mask_token_id, gumbel_temperature, num_masked, generator, prob_sorting
            )
        return ids

    @classmethod
    def kwargs_from_reference_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from the reference's nested config (``model.vq_model`` / ``model.maskgen``)."""
        vq, mg, conditioning = _reference_sections(config)
        return dict(
            codebook_size=vq["codebook_size"],
            num_tokens=vq["num_latent_tokens"],
            num_classes=mg["condition_num_classes"],
            **conditioning,
            weight_tying=mg.get("weight_tying", True),
            mask_schedule=mg.get("mask_schedule_strategy", "arccos"),
        )

    @classmethod
    def reference_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        vq, mg = _reference_sections_of(kwargs)
        vq["codebook_size"] = kwargs["codebook_size"]
        mg.update(
            condition_num_classes=kwargs["num_classes"],
            weight_tying=kwargs["weight_tying"],
            mask_schedule_strategy=kwargs["mask_schedule"],
        )
        return {"model": {"vq_model": vq, "maskgen": mg}}

    @staticmethod
    def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = to_diffusers_keys(state_dict, blocks="blocks", norm="norm", prefix="transformer.")
        sd = rename_keys(sd, name_rules(_VQ_NAMES, to_reference=True))
        if "lm_head.weight" not in sd:  # tied: the reference saves the table under both names
            sd["lm_head.weight"] = sd["embeddings.weight"]
        return sd

    @staticmethod
    def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference ``MaskGen_VQ`` keys -> ours. A tied checkpoint may hold the shared table as
        ``embeddings.weight``, ``lm_head.weight`` or both (then they must be equal)."""
        sd = dict(state_dict)
        if "lm_head.bias" not in sd and "lm_head.weight" in sd:  # tied: lm_head.weight is the whole table
            head = sd.pop("lm_head.weight")
            table = sd.setdefault("embeddings.weight", head)
            if table.shape != head.shape or (
                not table.is_meta and table is not head and not torch.equal(table, head.to(table.dtype))
            ):
                raise CheckpointMismatchError("weight-tied checkpoint: lm_head.weight differs from embeddings.weight")
        sd = rename_keys(sd, name_rules(_VQ_NAMES))
        return convert_diffusers_keys(sd, blocks="blocks", norm="norm", prefix="transformer.")


# ----------------------------------------------------------------------------------------------------
# Diffusion head of MaskGen-KL


class ResBlock(nn.Module):
    """Residual MLP block with adaLN (shift, scale, gate) modulation."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Denoising MLP of the diffusion loss: noisy token x [N, in], timestep t [N] and condition c [N, z]
    -> [N, out] (eps and variance interpolation when out = 2 * in)."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) timestep MLP, zero adaLN modulations and output layer (DiT)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for linear in [blk.adaLN_modulation[-1] for blk in self.res_blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward_embedded(self, x: torch.Tensor, t: torch.Tensor, c_embedded: torch.Tensor) -> torch.Tensor:
        """As :meth:`forward` with ``c_embedded = cond_embed(c)`` precomputed (constant while sampling)."""
        x = self.input_proj(x)
        y = self.time_embed(t) + c_embedded
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, t, self.cond_embed(c))


class DiffLoss(nn.Module):
    """Per-token diffusion loss and sampler: :class:`SimpleMLPAdaLN` over a 1000-step cosine schedule
    (training) and its ``num_sampling_steps`` respacing (sampling)."""

    def __init__(
        self,
        token_size: int,
        cond_dim: int,
        width: int,
        depth: int,
        num_sampling_steps: str | int = "100",
        num_train_steps: int = 1000,
    ):
        super().__init__()
        self.token_size = token_size
        self.net = SimpleMLPAdaLN(token_size, width, 2 * token_size, cond_dim, depth)
        self.train_diffusion = GaussianDiffusion.cosine(num_train_steps)
        self.gen_diffusion = GaussianDiffusion.cosine(num_train_steps, respacing=str(num_sampling_steps))

    def forward(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean ``mse + vb`` over tokens ``target`` [N, C] conditioned on ``z`` [N, D] at uniform random
        timesteps; with ``mask`` [N] a weighted mean over the masked tokens."""
        t = torch.randint(
            0, self.train_diffusion.num_timesteps, (target.shape[0],), generator=generator, device=target.device
        )
        loss = self.train_diffusion.training_losses(lambda x, ts: self.net(x, ts, z), target, t, generator=generator)
        loss = loss["loss"]
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        guidance_scale: float = 1.0,
        z_null: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token latents [N, C] for conditions ``z`` [N, D]. With ``z_null`` (null-text conditions, [N, D])
        the noise prediction is guided: ``uncond + scale * (cond - uncond)``; the variance stays the
        conditional one."""
        c = self.token_size
        noise = torch.randn(z.shape[0], c, generator=generator, device=z.device)
        if z_null is None:
            c_emb = self.net.cond_embed(z)
            return self.gen_diffusion.p_sample_loop(
                lambda x, t: self.net.forward_embedded(x, t, c_emb), noise, temperature, generator
            )
        c_emb = self.net.cond_embed(torch.cat([z, z_null]))

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cond, uncond = self.net.forward_embedded(torch.cat([x, x]), torch.cat([t, t]), c_emb).float().chunk(2)
            eps = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
            return torch.cat([eps, cond[:, c:]], dim=1)

        return self.gen_diffusion.p_sample_loop(guided, noise, temperature, generator)


# ----------------------------------------------------------------------------------------------------
# MaskGen-KL


class MaskGenKL(_TextConditionedGenerator):
    """MAE-style MM-DiT decoder over continuous tokenizer latents with a per-token diffusion head.

    Latents are handled as [B, N, C] after multiplication by ``scale_factor``; the tokenizer's layout
    is [B, C, 1, N] (see :meth:`latents_from_posterior` and :meth:`tokens_from_latents`).
    """

    REFERENCE_NAMES = _KL_NAMES

    def __init__(
        self,
        token_size: int = 16,
        num_tokens: int = 32,
        scale_factor: float = 0.7525,
        embed_dim: int = 1024,
        depth: int = 16,
        num_heads: int = 16,
        text_embed_dim: int = 768,
        micro_condition: bool = True,
        micro_condition_embed_dim: int = 256,
        text_drop_prob: float = 0.1,
        sample_aesthetic_score: float = 6.0,
        diffloss_depth: int = 8,
        diffloss_width: int = 1024,
        diffusion_batch_mul: int = 4,
        num_sampling_steps: str | int = "100",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.token_size = token_size
        self.num_tokens = num_tokens
        self.scale_factor = scale_factor
        self.micro_condition = micro_condition
        self.micro_condition_embed_dim = micro_condition_embed_dim
        self.text_drop_prob = text_drop_prob
        self.sample_aesthetic_score = sample_aesthetic_score
        self.diffusion_batch_mul = diffusion_batch_mul
        pooled_dim = text_embed_dim + (micro_condition_embed_dim if micro_condition else 0)
        self.z_proj = nn.Linear(token_size, embed_dim)
        self.z_proj_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.transformer = MMDiT(
            embed_dim, depth, num_heads, text_embed_dim, pooled_dim, grad_checkpointing=grad_checkpointing
        )
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.diffloss = DiffLoss(token_size, embed_dim, diffloss_width, diffloss_depth, num_sampling_steps)
        self.init_weights()

    def init_weights(self) -> None:
        """As the reference: N(0, 0.02) tokens and position embeddings, then Xavier-uniform for every
        linear layer of the model, the diffusion MLP included (this overrides the MLP's own zero and
        N(0, 0.02) initialisation); fused q/k/v weights get Xavier per projection."""
        for p in (self.mask_token, self.pos_embed, self.diffusion_pos_embed):
            nn.init.normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, JointAttention):
                for weight in (module.qkv.weight, module.context_qkv.weight):
                    for part in weight.data.chunk(3):
                        nn.init.xavier_uniform_(part)

    def encode_micro_condition(self, aesthetic_score: torch.Tensor) -> torch.Tensor:
        return interleaved_sin_cos_encoding(aesthetic_score, self.micro_condition_embed_dim)

    def latents_from_posterior(
        self, posterior_parameters: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Tokenizer posterior parameters [B, 2C, 1, N] -> sampled, scaled latents [B, N, C]."""
        latents = DiagonalGaussianDistribution(posterior_parameters).sample(generator) * self.scale_factor
        return latents.flatten(2).transpose(1, 2)

    def tokens_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, N, C] -> tokenizer tokens [B, C, 1, N] (divided by ``scale_factor``)."""
        return (latents / self.scale_factor).transpose(1, 2).unsqueeze(2)

    def forward_decoder(
        self, latents: torch.Tensor, mask: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """Latents [B, N, C] with ``mask`` [B, N] (1 = masked: replaced by the mask token) and projected
        conditions (:meth:`embed_condition`) -> per-token conditions for the diffusion head [B, N, D]."""
        x = self.z_proj_ln(self.z_proj(latents))
        x = torch.where(mask.bool()[..., None], self.mask_token.to(x.dtype), x) + self.pos_embed
        return self.transformer(x, context, pooled) + self.diffusion_pos_embed

    def random_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """Training mask [B, N] (float, 1 = masked): one arccos-schedule ratio per batch, ``ceil(N * ratio)``
        random positions per sample."""
        t = torch.rand(1, generator=generator, device=device)
        num_masked = torch.ceil(self.num_tokens * masking_ratio(t, "arccos").clamp(1e-6, 1.0))
        ranks = torch.rand(batch_size, self.num_tokens, generator=generator, device=device).argsort(dim=-1)
        return (ranks < num_masked).float()

    def forward(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        aesthetic_score: torch.Tensor | float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for scaled latents [B, N, C] (see :meth:`latents_from_posterior`), text tokens
        [B, L, text_dim], pooled text [B, 1, text_dim] and aesthetic scores [B].

        Returns the diffusion loss over the masked tokens (each repeated ``diffusion_batch_mul`` times with
        independent timesteps) and ``{"diff_loss": detached loss}``.
        """
        b, n, c = latents.shape
        context, pooled = self.embed_condition(condition, condition_pooled, aesthetic_score)
        mask = self.random_mask(b, latents.device, generator)
        z = self.forward_decoder(latents, mask, context, pooled)
        mul = self.diffusion_batch_mul
        loss = self.diffloss(
            latents.detach().reshape(b * n, c).repeat(mul, 1),
            z.reshape(b * n, -1).repeat(mul, 1),
            mask.reshape(b * n).repeat(mul),
            generator=generator,
        )
        return loss, {"diff_loss": loss.detach()}

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        condition_pooled: torch.Tensor,
        null_condition: torch.Tensor | None = None,
        null_condition_pooled: torch.Tensor | None = None,
        aesthetic_score: torch.Tensor | float | None = None,
        num_steps: int = 32,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "linear",
        temperature: float = 1.0,
        generator: torch.Generator | int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """MAR-style sampling; returns tokenizer tokens [B, token_size, 1, num_tokens] (unscaled).

        Each step runs the decoder on the current latents and draws the tokens of the next random-order
        slice with the diffusion sampler; the number of tokens left masked follows a cosine schedule.

        Args:
            condition / condition_pooled: text tokens [B, L, text_dim] and pooled text [B, 1, text_dim].
            null_condition / null_condition_pooled: empty-caption features ([1 or B, ...]); needed unless
                ``guidance_scale == 1`` (which runs without guidance).
            aesthetic_score: float or [B]; defaults to ``sample_aesthetic_score``.
            guidance_schedule: ``"linear"`` grows guidance from 1 with the fraction of decided tokens,
                ``"constant"`` keeps ``guidance_scale``.
            temperature: scale of the noise injected by the diffusion sampler.
            generator: a ``torch.Generator`` on the conditions' device or an int seed (reproducible samples).
        """
        if guidance_schedule not in ("linear", "constant"):
            raise ValueError(f"unknown guidance schedule {guidance_schedule!r}; choose linear or constant")
        b, n, dim = condition.shape[0], self.num_tokens, self.pos_embed.shape[-1]
        device = condition.device
        generator = resolve_generator(generator, device)
        guided = guidance_scale != 1.0
        context, pooled = self._guidance_condition(
            condition, condition_pooled, null_condition, null_condition_pooled, aesthetic_score, guided
        )
        copies = 2 if guided else 1
        orders = torch.rand(b, n, generator=generator, device=device).argsort(dim=-1)  # orders[:, :k] stay masked
        latents = torch.zeros(b, n, self.token_size, device=device)
        mask = torch.ones(b, n, device=device)
        num_masked = n
        for step in progress_bar(range(num_steps), progress, "MaskGen-KL"):
            next_masked = max(1, min(num_masked - 1, math.floor(n * math.cos(math.pi / 2 * (step + 1) / num_steps))))
            keep_masked = 0 if step == num_steps - 1 else next_masked
            if keep_masked == num_masked:
                continue
            z = self.forward_decoder(latents.repeat(copies, 1, 1), mask.repeat(copies, 1), context, pooled)
            chosen = orders[:, keep_masked:num_masked]  # [B, k] positions drawn this step
            k = chosen.shape[1]
            z = z.gather(1, chosen.repeat(copies, 1)[..., None].expand(-1, -1, dim)).reshape(copies, b * k, dim)
            scale = guidance_scale
            if guidance_schedule == "linear":
                scale = 1 + (guidance_scale - 1) * (n - next_masked) / n
            drawn = self.diffloss.sample(z[0], temperature, scale, z[1] if guided else None, generator)
            latents = latents.scatter(1, chosen[..., None].expand(-1, -1, self.token_size), drawn.view(b, k, -1))
            mask = mask.scatter(1, chosen, 0.0)
            num_masked = keep_masked
        return self.tokens_from_latents(latents)

    @classmethod
    def kwargs_from_reference_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from the reference's nested config (``model``, ``losses``)."""
        vq, mg, conditioning = _reference_sections(config)
        losses = config.get("losses", {})
        return dict(
            token_size=vq["token_size"],
            num_tokens=vq["num_latent_tokens"],
            scale_factor=vq["scale_factor"],
            **conditioning,
            diffloss_depth=losses["diffloss_d"],
            diffloss_width=losses["diffloss_w"],
            diffusion_batch_mul=mg.get("diffusion_batch_mul", 4),
            num_sampling_steps=losses.get("num_sampling_steps", "100"),
        )

    @classmethod
    def reference_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        vq, mg = _reference_sections_of(kwargs)
        vq.update(token_size=kwargs["token_size"], scale_factor=kwargs["scale_factor"])
        mg["diffusion_batch_mul"] = kwargs["diffusion_batch_mul"]
        losses = dict(
            diffloss_d=kwargs["diffloss_depth"],
            diffloss_w=kwargs["diffloss_width"],
            num_sampling_steps=kwargs["num_sampling_steps"],
        )
        return {"model": {"vq_model": vq, "maskgen": mg}, "losses": losses}

    @staticmethod
    def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = to_diffusers_keys(state_dict, blocks="decoder_blocks", norm="decoder_norm", prefix="transformer.")
        return rename_keys(sd, name_rules(_KL_NAMES, to_reference=True))

    @staticmethod
    def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference ``MaskGen_KL`` keys -> ours (the diffusion head keeps its names)."""
        sd = rename_keys(state_dict, name_rules(_KL_NAMES))
        return convert_diffusers_keys(sd, blocks="decoder_blocks", norm="decoder_norm", prefix="transformer.")


# ----------------------------------------------------------------------------------------------------
# Registry: the official MaskGen checkpoints (configs/infer/MaskGen/*.yaml)

_TEXT = dict(text_embed_dim=768, micro_condition=True, micro_condition_embed_dim=256, text_drop_prob=0.1)
_VQ = dict(codebook_size=8192, num_tokens=128, num_classes=1000, sample_aesthetic_score=6.5, **_TEXT)
_KL = dict(token_size=16, num_tokens=32, scale_factor=0.7525, sample_aesthetic_score=6.5, diffloss_depth=8, **_TEXT)
_TOKENS = {MaskGenVQ: "128 x VQ 8192 (tatitok_bl128_vq)", MaskGenKL: "32 x KL 16 (tatitok_bl32_vae)"}

_MASKGEN_VARIANTS = {
    # name: (class, width, depth, class-specific kwargs); 16 heads throughout
    "maskgen_vq_l": (MaskGenVQ, 1024, 16, _VQ),
    "maskgen_vq_xl": (MaskGenVQ, 1280, 20, _VQ),
    "maskgen_kl_l": (MaskGenKL, 1024, 16, dict(_KL, diffloss_width=1024)),
    "maskgen_kl_xl": (MaskGenKL, 1280, 20, dict(_KL, diffloss_width=1280)),
}

for _name, (_cls, _width, _depth, _kwargs) in _MASKGEN_VARIANTS.items():
    register_model(
        _name,
        _cls,
        family="generator",
        checkpoint=f"turkeyju/generator_{_name}",
        tokens=_TOKENS[_cls],
        embed_dim=_width,
        depth=_depth,
        num_heads=16,
        **_kwargs,
    )
