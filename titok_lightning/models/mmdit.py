"""MM-DiT: the joint text/image transformer of Stable Diffusion 3, used by the MaskGen generators.

Two token streams (image tokens ``x`` [B, N, D] and text tokens ``context`` [B, L, D]) keep separate
weights but attend jointly: queries, keys and values of both are concatenated (image first) into one
``F.scaled_dot_product_attention`` call. Both streams are modulated by a pooled condition vector with
adaLN-zero. The last block is "context pre-only": it updates the image stream only, so its text stream
has no output projection or MLP and its text queries are never needed.

Parameter names are this project's (fused ``qkv``, ``proj``, ``mlp.fc1``); :func:`convert_diffusers_keys`
maps checkpoints written with diffusers' ``JointTransformerBlock`` / ``AdaLayerNormContinuous``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from titok_lightning.convert import name_rules, rename_keys
from titok_lightning.models.blocks import Mlp, merge_heads, modulate, split_heads

NORM_EPS = 1e-6


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (the adaptive norms supply scale and shift)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


class AdaLayerNormZero(nn.Module):
    """adaLN-zero: one linear layer maps the (SiLU-activated) condition to six modulations.

    ``forward(x, c)`` returns the modulated attention input and ``(gate_attn, shift_mlp, scale_mlp,
    gate_mlp)``, each [B, 1, D].
    """

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(c).unsqueeze(1).chunk(6, dim=-1)
        return modulate(_layer_norm(x), shift, scale), (gate, shift_mlp, scale_mlp, gate_mlp)


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by ``(scale, shift) = linear(c)`` (note the order: scale first)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(c).unsqueeze(1).chunk(2, dim=-1)
        return modulate(_layer_norm(x), shift, scale)


class JointAttention(nn.Module):
    """Joint self-attention over ``cat([x, context])`` with per-stream projections.

    ``context_pre_only`` computes attention for the image queries only and returns ``None`` for the
    context (its query rows of ``context_qkv`` are kept so official checkpoints load, but unused).
    """

    def __init__(self, dim: int, num_heads: int, context_pre_only: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.context_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.context_proj = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x)
        if self.context_proj is None:
            context_kv = F.linear(context, self.context_qkv.weight[d:], self.context_qkv.bias[d:])
            k, v = torch.cat([qkv[..., d:], context_kv], dim=1).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(split_heads(qkv[..., :d], h), k, v)
            return self.proj(merge_heads(out)), None
        joint = torch.cat([qkv, self.context_qkv(context)], dim=1)
        q, k, v = joint.view(b, joint.shape[1], 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v))
        return self.proj(out[:, :n]), self.context_proj(out[:, n:])


class JointTransformerBlock(nn.Module):
    """MM-DiT block: adaLN-zero modulated joint attention and per-stream GELU(tanh) MLPs."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        hidden = int(dim * mlp_ratio)
        gelu_tanh = partial(nn.GELU, approximate="tanh")
        self.norm1 = AdaLayerNormZero(dim, dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim, dim)
        self.attn = JointAttention(dim, num_heads, context_pre_only=context_pre_only)
        self.mlp = Mlp(dim, hidden, act_layer=gelu_tanh)
        self.context_mlp = None if context_pre_only else Mlp(dim, hidden, act_layer=gelu_tanh)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N, D], context [B, L, D], c = SiLU(pooled condition) [B, D] -> (x, context or None)."""
        x_in, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, c)
        if self.context_pre_only:
            attn_x, _ = self.attn(x_in, self.norm1_context(context, c))
        else:
            context_in, context_mods = self.norm1_context(context, c)
            attn_x, attn_context = self.attn(x_in, context_in)
        x = x + gate * attn_x
        x = x + gate_mlp * self.mlp(modulate(_layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_mods
        context = context + c_gate * attn_context
        context = context + c_gate_mlp * self.context_mlp(modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


class MMDiT(nn.Module):
    """Text-conditioned MM-DiT trunk: condition projections, joint blocks and a final adaptive norm.

    ``embed_condition`` projects text tokens [B, L, context_dim] and the pooled condition [B, pooled_dim]
    (text embedding plus any micro-conditioning) to the model width; ``forward`` runs the blocks on image
    tokens [B, N, D] with those projected conditions and returns [B, N, D].
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        context_dim: int,
        pooled_dim: int,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.context_embed = nn.Linear(context_dim, dim)
        self.pooled_embed = nn.Linear(pooled_dim, dim)
        self.blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_heads, mlp_ratio, context_pre_only=i == depth - 1) for i in range(depth)
        )
        self.norm = AdaLayerNormContinuous(dim, dim)

    def embed_condition(self, context: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens [B, L, context_dim] and pooled condition [B, pooled_dim] -> [B, L, D], [B, D]."""
        return self.context_embed(context), self.pooled_embed(pooled)

    def forward(self, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        c = F.silu(pooled)  # every adaptive norm starts with SiLU of the same vector: compute it once
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x, context = checkpoint(block, x, context, c, use_reentrant=False)
            else:
                x, context = block(x, context, c)
        return self.norm(x, c)


def _diffusers_names(blocks: str, norm: str, prefix: str) -> list[tuple[str, str]]:
    """(diffusers name, ours) of the MM-DiT modules whose names differ; ours sit under ``prefix``."""
    ours = f"{prefix}blocks.*."
    return [
        (f"{blocks}.*.attn.to_out.0.", f"{ours}attn.proj."),
        (f"{blocks}.*.attn.to_add_out.", f"{ours}attn.context_proj."),
        (f"{blocks}.*.ff.net.0.proj.", f"{ours}mlp.fc1."),
        (f"{blocks}.*.ff.net.2.", f"{ours}mlp.fc2."),
        (f"{blocks}.*.ff_context.net.0.proj.", f"{ours}context_mlp.fc1."),
        (f"{blocks}.*.ff_context.net.2.", f"{ours}context_mlp.fc2."),
        # the rest of these modules only moves under ``prefix`` (after the renames above)
        (f"{blocks}.*.norm1.", f"{ours}norm1."),
        (f"{blocks}.*.norm1_context.", f"{ours}norm1_context."),
        (f"{blocks}.*.attn.", f"{ours}attn."),
        (f"{norm}.linear.", f"{prefix}norm.linear."),
    ]


def convert_diffusers_keys(state_dict: Mapping[str, torch.Tensor], blocks: str, norm: str, prefix: str) -> dict:
    """Map diffusers MM-DiT keys (``<blocks>.<i>.attn.to_q`` ..., final ``<norm>``) onto :class:`MMDiT`
    under ``prefix``: q/k/v projections are concatenated into the fused ``qkv`` / ``context_qkv``."""
    sd = rename_keys(state_dict, name_rules(_diffusers_names(blocks, norm, prefix)))
    fused = {"": ("to_q", "to_k", "to_v"), "context_": ("add_q_proj", "add_k_proj", "add_v_proj")}
    attn_prefixes = sorted({k.rsplit(".attn.", 1)[0] for k in sd if ".attn.to_q." in k})
    for block in attn_prefixes:
        for target, parts in fused.items():
            for kind in ("weight", "bias"):
                names = [f"{block}.attn.{part}.{kind}" for part in parts]
                if all(name in sd for name in names):
                    sd[f"{block}.attn.{target}qkv.{kind}"] = torch.cat([sd.pop(name) for name in names], dim=0)
    return sd


def to_diffusers_keys(state_dict: Mapping[str, torch.Tensor], blocks: str, norm: str, prefix: str) -> dict:
    """The inverse of :func:`convert_diffusers_keys`: fused projections split back into q / k / v."""
    sd = dict(state_dict)
    fused = {"qkv": ("to_q", "to_k", "to_v"), "context_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
    for key in [k for k in sd if k.startswith(f"{prefix}blocks.") and k.rsplit(".", 2)[-2] in fused]:
        block, name, kind = key.rsplit(".", 2)
        for part, tensor in zip(fused[name], sd.pop(key).chunk(3, dim=0)):
            sd[f"{block}.{part}.{kind}"] = tensor
    return rename_keys(sd, name_rules(_diffusers_names(blocks, norm, prefix), to_reference=True))
