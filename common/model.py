"""3D ViT encoder and DINO projection head, built from MONAI blocks.

Two later needs shape this module more than the ViT itself does:

* Masked image modelling (iBOT) swaps a learnable mask token into the patch tokens after the
  conv embedding but *before* the fixed position embedding is added, so a masked token still
  knows where it sits. MONAI's ``PatchEmbeddingBlock.forward`` adds the position embedding
  internally, so the encoder calls its parts (conv, position table, dropout) itself.
* Opacus DP-SGD computes per-sample gradients module by module. It fails on MONAI's ``ViT``
  because that module owns ``cls_token`` directly and returns a tuple. Here every trainable
  parameter lives in a layer Opacus supports (Conv3d, Linear, LayerNorm) or in a small module
  with an exact per-sample-gradient rule registered below, and every forward returns one tensor.

Module names follow MONAI's ``ViT`` (``patch_embedding``, ``blocks``, ``norm``) so MONAI ViT
checkpoints (e.g. FM-CT's) map onto this encoder by renaming only the CLS token.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctfed.common.config import ModelConfig

logger = logging.getLogger(__name__)

# DINO/timm initialisation scale for tokens and linear layers.
INIT_STD = 0.02


class ClsToken(nn.Module):
    """Prepends one learnable token to a (B, N, D) sequence."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.token, std=INIT_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)


class MaskToken(nn.Module):
    """Replaces the patch tokens selected by a (B, N) boolean mask with one learnable token.

    The mask must be passed positionally: Opacus' forward hooks record positional inputs
    only, and the per-sample-gradient rule below needs the mask.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        # Zeros as in iBOT: a masked token starts as "no content" plus its position.
        self.token = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.unsqueeze(-1), self.token.to(tokens.dtype), tokens)


class DroppedPatchFill(nn.Module):
    """MAE's decoder input: (B, V) visible tokens scattered back onto the N-patch grid, every
    dropped patch holding one learnable token. ``keep`` is positional, for Opacus' hooks."""

    def __init__(self, hidden_size: int, num_patches: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.token, std=INIT_STD)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        grid = self.token.to(visible.dtype).expand(visible.shape[0], self.num_patches, -1)
        return grid.scatter(1, keep.unsqueeze(-1).expand(-1, -1, visible.shape[-1]), visible)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose weight rows are L2-normalised in every forward.

    This is DINO's ``weight_norm`` last layer with the magnitude frozen at 1, written out
    because ``torch.nn.utils.parametrizations.weight_norm`` breaks Opacus (1.6, torch 2.13:
    ``IndexError`` in the per-sample-gradient hooks; Opacus' Linear rule targets
    ``layer.weight``, which under a parametrization is recomputed, not the real parameter).
    Opacus handles this module with its functorch fallback (one input, one output).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


def register_dp_grad_samplers() -> None:
    """Teach Opacus the per-sample gradients of the token layers (idempotent).

    Called by DP-SGD before it wraps a model, not at import: importing Opacus costs
    seconds, and every Flower ClientApp message of a deployed site starts a new process
    that would pay it even in rounds without DP.
    """
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(ClsToken)
    def _cls_token_grad_sample(
        layer: ClsToken, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        # Each sample's gradient for the token is the gradient at its own position 0.
        return {layer.token: backprops[:, :1, :].unsqueeze(1)} if layer.token.requires_grad else {}

    @register_grad_sampler(MaskToken)
    def _mask_token_grad_sample(
        layer: MaskToken, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        if not layer.token.requires_grad:
            return {}
        mask = activations[1].unsqueeze(-1).to(backprops.dtype)
        # The token is shared by every masked position, so its gradient is their sum.
        return {layer.token: (backprops * mask).sum(dim=1)[:, None, None, :]}

    @register_grad_sampler(DroppedPatchFill)
    def _dropped_fill_grad_sample(
        layer: DroppedPatchFill, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        if not layer.token.requires_grad:
            return {}
        dropped = torch.ones(backprops.shape[:2], dtype=backprops.dtype, device=backprops.device)
        dropped.scatter_(1, activations[1], 0.0)
        return {layer.token: (backprops * dropped.unsqueeze(-1)).sum(dim=1)[:, None, None, :]}


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)



@contextlib.contextmanager
def _quiet_monai_meshgrid() -> Iterator[None]:
    """MONAI's sin-cos position table calls ``torch.meshgrid`` without ``indexing`` (its
    result is the same either way): a deprecation warning at every model build, i.e. in every
    site's log every round, that a hospital cannot act on (issue #14 item 10). Only that one
    warning, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
        yield

class ViTEncoder(nn.Module):
    """3D ViT: conv patches, optional mask token, fixed sin-cos positions, CLS, blocks, norm.

    ``forward`` returns the whole normalised sequence (B, 1 + N, hidden): index 0 is CLS,
    the rest are patch tokens in the conv's (depth, height, width) raster order.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_patches = cfg.tokens_per_side**3
        self.hidden_size = cfg.hidden_size
        with _quiet_monai_meshgrid():
            self.patch_embedding = PatchEmbeddingBlock(
                in_channels=cfg.in_channels,
                img_size=cfg.image_size,
                patch_size=cfg.patch_size,
                hidden_size=cfg.hidden_size,
                num_heads=cfg.num_heads,
                proj_type="conv",
                pos_embed_type="sincos",
                dropout_rate=cfg.dropout,
                spatial_dims=3,
            )
        self.mask_token = MaskToken(cfg.hidden_size)
        self.cls_token = ClsToken(cfg.hidden_size)
        self.activation_checkpointing = False
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.blocks.apply(_init_linear_and_norm)
        # MAE's patch-embedding initialisation (the conv as one linear layer, Xavier-uniform):
        # torch's default conv init gives patch content a third of the position table's size.
        conv = self.patch_embedding.patch_embeddings
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        # Fixed, from the model config: buffers outside the state dict, so nothing new travels.
        shape = (1, cfg.in_channels, 1, 1, 1)
        self.register_buffer("input_mean", torch.tensor(cfg.input_mean).view(shape), persistent=False)
        self.register_buffer("input_std", torch.tensor(cfg.input_std).view(shape), persistent=False)
        for block in self.blocks:
            # MONAI always builds this LayerNorm but only uses it with cross-attention (off
            # here). A trainable parameter that never gets a gradient breaks DP-SGD, whose
            # optimizer expects a per-sample gradient for every trainable parameter.
            block.norm_cross_attn.requires_grad_(False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode volumes (B, C, S, S, S) in [0, 1] (standardised here).

        ``mask`` (B, N) bool swaps the marked patches for the mask token (iBOT). ``keep``
        (B, V) long drops every other patch instead (MAE): only the V listed patch tokens,
        with their positions, enter the blocks, and the output is (B, 1 + V, hidden) in
        ``keep``'s order. Without ``keep`` it is the whole sequence (B, 1 + N, hidden): index 0
        is CLS, then the patch tokens in the conv's (depth, height, width) raster order.
        """
        embed = self.patch_embedding
        x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        tokens = embed.patch_embeddings(x).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.num_patches:
            raise ValueError(
                f"input of spatial shape {tuple(x.shape[2:])} gives {tokens.shape[1]} patches, "
                f"the encoder was built for {self.num_patches}; resize inputs to model.image_size"
            )
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
                raise ValueError(
                    f"mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            tokens = self.mask_token(tokens, mask)
        tokens = embed.dropout(tokens + embed.position_embeddings)
        if keep is not None:
            if keep.dtype != torch.long or keep.ndim != 2 or keep.shape[0] != tokens.shape[0]:
                raise ValueError(f"keep must be a (B, V) long tensor, got {keep.dtype} {tuple(keep.shape)}")
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = self.cls_token(tokens)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Recomputed in the backward pass instead of kept (train.activation_checkpointing).
            tokens = checkpoint(block, tokens, use_reentrant=False) if recompute else block(tokens)
        return self.norm(tokens)

    def cls_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The CLS embedding (B, hidden): the volume-level representation."""
        return self(x, mask)[:, 0]


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int, nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck)]
        else:
            layers = [nn.Linear(in_dim, hidden), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden, hidden), nn.GELU()]
            layers.append(nn.Linear(hidden, bottleneck))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear_and_norm)
        self.last_layer = WeightNormLinear(bottleneck, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MAEDecoder(nn.Module):
    """MAE's decoder: the encoder's visible patch tokens -> every patch's voxels (B, N, C * p^3).

    As in MAE: narrower than the encoder, its own fixed sin-cos positions, and its own mask
    token for the patches the encoder dropped (``keep`` lists the visible ones). Given the
    whole grid (``keep`` None) it needs no mask token.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        grid = cfg.tokens_per_side
        self.embed = nn.Linear(cfg.hidden_size, cfg.decoder_hidden)
        self.fill = DroppedPatchFill(cfg.decoder_hidden, grid**3)
        # Fixed, so a buffer outside the state dict: nothing to send, train or restore.
        with _quiet_monai_meshgrid():
            positions = build_sincos_position_embedding([grid] * 3, cfg.decoder_hidden, spatial_dims=3)
        self.register_buffer("position_embeddings", positions.detach().clone(), persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.decoder_hidden, 4 * cfg.decoder_hidden, cfg.decoder_heads)
            for _ in range(cfg.decoder_layers)
        )
        for block in self.blocks:
            block.norm_cross_attn.requires_grad_(False)  # unused, as in the encoder
        self.norm = nn.LayerNorm(cfg.decoder_hidden)
        self.predict = nn.Linear(cfg.decoder_hidden, cfg.in_channels * cfg.patch_size**3)
        self.apply(_init_linear_and_norm)

    def forward(self, patch_tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(patch_tokens)
        if keep is not None:
            tokens = self.fill(tokens, keep)
        tokens = tokens + self.position_embeddings.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.predict(self.norm(tokens))


class SSLModel(nn.Module):
    """The student: encoder (federated) + DINO head (stays at the site unless
    ``train.share_heads``), and with
    ``mae_decoder`` MAE's reconstruction decoder (stays at the site too).

    The DINO head serves DINO on the CLS token and, with the iBOT objective, the masked
    patch tokens as well.
    """

    def __init__(self, cfg: ModelConfig, mae_decoder: bool = False) -> None:
        super().__init__()
        self.encoder = ViTEncoder(cfg)
        self.head = DINOHead(cfg.hidden_size, cfg.head_hidden, cfg.head_bottleneck, cfg.head_prototypes)
        self.decoder = MAEDecoder(cfg) if mae_decoder else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prototype logits (B, head_prototypes) from the CLS embedding."""
        return self.head(self.encoder.cls_features(x, mask))

    def forward_with_patches(
        self, x: torch.Tensor, mask: torch.Tensor | None, select: torch.Tensor, return_cls_embeddings: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """CLS logits (B, K) and head logits (M, K) of the patch tokens ``select`` picks.

        ``select`` (B', N) bool addresses the first B' samples (the global crops) and its
        M True entries come out in ``select.nonzero()`` order. The head is shared by CLS and
        patch tokens (iBOT's and DINOv2's default) and runs once on both, only on the
        selected tokens: the full patch grid through a 65,536-prototype head would dominate
        the cost. ``return_cls_embeddings`` adds the CLS embeddings (B, hidden) the head saw
        (for KoLeo). Returns a tuple, so DP-SGD (Opacus) should wrap ``forward`` instead.
        """
        if select.dtype != torch.bool or select.ndim != 2 or select.shape[0] > x.shape[0]:
            raise ValueError(
                f"select must be a (B' <= {x.shape[0]}, N) bool tensor, got {select.dtype} {tuple(select.shape)}"
            )
        tokens = self.encoder(x, mask)
        patches = tokens[: select.shape[0], 1:][select]
        logits = self.head(torch.cat([tokens[:, 0], patches]))
        if return_cls_embeddings:
            return logits[: x.shape[0]], logits[x.shape[0] :], tokens[:, 0]
        return logits[: x.shape[0]], logits[x.shape[0] :]


# With ``train.share_heads`` the student's projection head (the one head DINO and iBOT share,
# last layer included) and the DINO and iBOT centres travel beside the encoder's weights, in
# the same ArrayRecord, under this prefix: no encoder parameter name starts with it.
SHARED_HEAD_PREFIX = "ssl_head."
DINO_CENTER_NAME = "center.dino"
IBOT_CENTER_NAME = "center.ibot"


def shared_head_state(head: DINOHead, dino_center: torch.Tensor, ibot_center: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head's weights and both centres under ``SHARED_HEAD_PREFIX`` (detached CPU copies)."""
    state = {**head.state_dict(), DINO_CENTER_NAME: dino_center, IBOT_CENTER_NAME: ibot_center}
    return {SHARED_HEAD_PREFIX + name: t.detach().cpu().clone() for name, t in state.items()}


def split_shared_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder weights, shared head entries without their prefix) of a global state."""
    encoder = {name: t for name, t in state.items() if not name.startswith(SHARED_HEAD_PREFIX)}
    heads = {name[len(SHARED_HEAD_PREFIX) :]: t for name, t in state.items() if name.startswith(SHARED_HEAD_PREFIX)}
    return encoder, heads


def encoder_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights of a global state or checkpoint, shared heads left out: what
    fine-tuning, the monitor and every downstream reader load."""
    return split_shared_state(state)[0]


def build_teacher(student: SSLModel) -> SSLModel:
    """A frozen copy of the student (without MAE's decoder, which has no teacher), to be updated only by EMA."""
    decoder, student.decoder = student.decoder, None
    try:
        teacher = copy.deepcopy(student)
    finally:
        student.decoder = decoder
    teacher.requires_grad_(False)
    return teacher


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter elements (trainable ones only by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
