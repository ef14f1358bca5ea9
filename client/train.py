"""One site's local DINO + iBOT training for one federated round.

Losses: ``train.dino_weight`` x DINO on the CLS token over all crop pairs, plus
``train.mim_weight`` x iBOT on patch tokens: about half the student's *global* crops get
3D block masks, and their masked tokens predict the teacher's tokens of the same, unmasked
crop. The DINO head is shared by both losses (iBOT/DINOv2 default), so no extra head has to
be kept or sent; the iBOT loss has its own centre. ``mim_weight = 0`` is plain DINO, step for
step as before masking existed (the mask token then stays frozen and out of the optimizer).
``train.mim_objective=mae`` swaps iBOT for MAE's loss: the same masked global crops go
through the student once, and a small decoder (``MAEDecoder``, local like the head, no
teacher) reconstructs the masked patches' normalised voxels.

What travels and what stays:

* ``shared_state()`` is what the site receives, sends (as a delta) and the coordinator
  averages: the student encoder (``SSLModel.encoder`` keys) and, with ``train.share_heads``,
  the student head and the DINO and iBOT centres (``common.model.SHARED_HEAD_PREFIX``).
* ``local_state()`` - student head, MAE decoder (if any), the whole teacher (encoder + head),
  the DINO and iBOT centres and the AdamW moments - stays at the site between rounds. The
  ClientApp builds a new ``LocalTrainer`` every round, so without it the head, decoder,
  centre and optimizer would restart. With shared heads the head and centres in it are
  overwritten by the global ones when they arrive (``set_global_state``); the teacher head
  follows the teacher policy below, like the teacher encoder.

With shared heads the head and centres are averaged like the encoder; why, and why that
costs no privacy: docs/decisions/shared-heads-and-centres.md.

Teacher policy (``train.teacher_on_new_global``):

* ``"reset"`` (default): the teacher encoder is set to the new global student when it arrives.
  The averaged model plays the role of DINO's slow, ensembled teacher, every site distils
  towards the same target, and a site that lost its local state behaves like the others.
* ``"keep"``: the teacher keeps its EMA across rounds (FedEMA/FedU style), so it integrates the
  sequence of global students and this site's local steps.

Local differential privacy (``dp=`` a LocalDPConfig): every optimizer step is per-volume
DP-SGD on Poisson-sampled batches (``client/dp_sgd.py``); ``train.grad_clip`` is then
replaced by the per-volume clipping. The loop (``LocalTrainer._round``) is one; what
differs, the batches, how a step's gradient is formed and clipped, and where the centres come
from, is one object (``_PlainGradients`` or ``_DPGradients``).

Centring under DP-SGD: the centres are EMAs of the teacher's outputs on public reference
heads (``common/reference.py``), so they are post-processing of DP-SGD and cost no epsilon
(docs/decisions/shared-heads-and-centres.md).

Either way a site's first global encoder also initialises its teacher encoder. Without shared
heads the teacher head is always the EMA of this site's student head (heads never leave the
site); with them it is reset to the global head (``reset``) or initialised by the first one
and then kept (``keep``), exactly as the teacher encoder.

All sites build the head from ``train.seed`` (not the per-site seed), so they start from the
same prototypes; the per-site ``seed`` only drives data order, crops and masks.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ctfed.client.ledger import local_sample_rate
from ctfed.common.config import LocalDPConfig, MIMObjective, ModelConfig, Precision, TrainConfig
from ctfed.common.device import autocast, check_precision, limit_heap_fragmentation, resolve_device, use_activation_checkpointing
from ctfed.common.masking import random_keep, sample_masks
from ctfed.common.model import (
    DINO_CENTER_NAME,
    IBOT_CENTER_NAME,
    SHARED_HEAD_PREFIX,
    SSLModel,
    build_teacher,
    shared_head_state,
    split_shared_state,
)
from ctfed.common.preprocess import input_stats_mismatch
from ctfed.common.reference import reference_heads
from ctfed.common.ssl import (
    DINOLoss,
    KoLeoLoss,
    MAELoss,
    MultiCrop3D,
    cosine_schedule,
    iBOTPatchLoss,
    update_teacher,
)

if TYPE_CHECKING:
    from ctfed.client.dp_sgd import VolumeDPSGD

logger = logging.getLogger(__name__)

HEAD_PREFIX = "head."
DECODER_PREFIX = "mae_decoder."
TEACHER_PREFIX = "teacher."
CENTER_KEY = "loss.center"
IBOT_CENTER_KEY = "ibot_loss.center"
OPTIMIZER_PREFIX = "optimizer."
# AdamW's per-parameter state entries, all tensors in torch >= 2.0.
ADAMW_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the message names the round and step."""


@dataclass
class RoundResult:
    losses: list[float]  # per local step, the weighted total
    num_examples: int  # volumes seen (for FedAvg weighting)
    seconds: float
    dino_losses: list[float] = field(default_factory=list)  # per local step, unweighted
    mim_losses: list[float] = field(default_factory=list)  # per local step, unweighted; empty if MIM is off
    koleo_losses: list[float] = field(default_factory=list)  # per local step, unweighted; empty if KoLeo is off
    # Time spent reading volumes and making crops: the data loader's share of the round.
    data_seconds: float = 0.0
    # DP-SGD only: optimizer steps taken (each one accounted, empty batches included).
    dp_steps: int = 0


class _ShuffledBatches:
    """Batches of (position in the round, volume index), shuffled epoch after epoch without
    end; batches stay full unless the whole site holds fewer volumes than one batch."""

    def __init__(self, num_volumes: int, batch_size: int, seed: int) -> None:
        self.num_volumes, self.batch_size, self.seed = num_volumes, batch_size, seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed)
        position = 0
        while True:
            order = torch.randperm(self.num_volumes, generator=generator).tolist()
            full = len(order) - len(order) % self.batch_size if len(order) >= self.batch_size else len(order)
            for start in range(0, full, self.batch_size):
                batch = order[start : start + self.batch_size]
                yield [(position + k, index) for k, index in enumerate(batch)]
                position += len(batch)


def content_order(dataset: Dataset) -> list[int]:
    """The dataset's indices by their volumes' content hash (a prepared cache's entries), else
    as they are. A cache lists its volumes by keyed pseudonym, and a new site secret (a cache
    prepared again, every ``ctfed simulate`` run before its synthetic secrets were seeded)
    reorders them; sampled in content order, the same scans train the same way."""
    size = len(dataset)  # type: ignore[arg-type]
    entries = getattr(dataset, "entries", None)
    if not isinstance(entries, list) or len(entries) != size:
        return list(range(size))
    return sorted(range(size), key=lambda i: (str(entries[i].get("content_hash", "")) if isinstance(entries[i], dict) else "", i))


class _CropViews(Dataset):
    """(position, volume index) -> that volume's multi-crop views (crops, C, S, S, S), drawn
    from a generator seeded by (round's crop seed, position). Indices count in ``order``
    (``content_order``), so a draw names a scan, not a place in the manifest."""

    def __init__(self, dataset: Dataset, multicrop: MultiCrop3D, seed: np.random.SeedSequence, order: list[int]) -> None:
        self.dataset, self.multicrop, self.seed, self.order = dataset, multicrop, seed, order

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        position, index = item
        volume = self.dataset[self.order[index]]
        if not isinstance(volume, torch.Tensor) or volume.ndim != 4:
            shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
            raise ValueError(f"dataset must yield volumes (C, S, S, S), got {shape}")
        self.multicrop.reseed(np.random.SeedSequence(self.seed.entropy, spawn_key=(*self.seed.spawn_key, position)))
        return torch.stack(self.multicrop(volume))


class _PlainGradients:
    """How a plain step gets its gradient: shuffled full batches, autograd (loss-scaled under
    fp16), FedProx's proximal term, clipping by the gradient's norm (``train.grad_clip``)."""

    per_volume_rows = False  # the SSL loss need not say which volume each patch row is

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer

    def batches(self, order_seed: int, crop_seed: np.random.SeedSequence) -> Iterator[torch.Tensor | None]:
        return self.trainer._batches(order_seed, crop_seed)

    def zero_grad(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)

    def empty_batch(self) -> None:
        raise AssertionError("shuffled batches are never empty")

    def regularised(self, loss: torch.Tensor) -> torch.Tensor:
        return loss + self.trainer._proximal_term() if self.trainer.train_cfg.proximal_mu > 0 else loss

    def backward(self, loss: torch.Tensor, batch: int, student_rows: int, teacher_rows: int, patch_rows: torch.Tensor | None) -> None:
        scaler = self.trainer.scaler
        (loss if scaler is None else scaler.scale(loss)).backward()

    def finish(self, step: int) -> None:
        trainer = self.trainer
        trainer._freeze_prototypes(step)  # before the norm, which must not count the frozen layer
        if trainer.train_cfg.grad_clip > 0:
            if trainer.scaler is not None:
                trainer.scaler.unscale_(trainer.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainer.student.parameters(), trainer.train_cfg.grad_clip)

    def after_step(self, step: int) -> None:
        """Nothing: the centres move with the teacher's outputs on the batch (``DINOLoss``)."""


class _DPGradients:
    """How a local DP-SGD step gets its gradient (``client/dp_sgd.py``): Poisson-sampled
    batches (an empty one is a step of noise only), per-volume sums of per-row gradients,
    clipped and noised; after the step the centres move on public reference heads, never on
    the site's batches (docs/decisions/shared-heads-and-centres.md)."""

    per_volume_rows = True

    def __init__(self, trainer: LocalTrainer, dp: VolumeDPSGD) -> None:
        self.trainer, self.dp = trainer, dp

    def batches(self, order_seed: int, crop_seed: np.random.SeedSequence) -> Iterator[torch.Tensor | None]:
        return self.trainer._dp_batches(crop_seed)  # the order comes from the OS CSPRNG, never a seed

    def zero_grad(self) -> None:
        self.dp.zero_grad()

    def empty_batch(self) -> None:
        self.dp.empty_step_gradients()

    def regularised(self, loss: torch.Tensor) -> torch.Tensor:
        return loss  # no proximal term: RunConfig refuses train.proximal_mu under local DP

    def backward(self, loss: torch.Tensor, batch: int, student_rows: int, teacher_rows: int, patch_rows: torch.Tensor | None) -> None:
        # Student rows are crop-major (row r is volume r % batch), in one pass or, for MAE,
        # two (masked global crops, whole local crops), whose per-row gradients Opacus sums
        # row by row; the head also sees iBOT's selected patch tokens after the CLS rows.
        crop_rows = torch.arange(student_rows) % batch  # every other layout is a prefix of it
        row_maps = [crop_rows[:n] for n in {student_rows, teacher_rows, student_rows - teacher_rows} if n > 0]
        if patch_rows is not None:
            row_maps.append(torch.cat([crop_rows[:student_rows], patch_rows % batch]))
        # The losses are means over the batch; their per-volume gradients are those of
        # batch x loss, so clipping bounds each volume whatever the batch size.
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer, whose input (the scan) needs no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (loss * batch).backward()
        self.dp.fold_rows_to_volumes(row_maps, batch)

    def finish(self, step: int) -> None:
        if not self.dp.clip_and_noise():
            raise RuntimeError("DP optimizer skipped a step; every step must be noised and accounted")
        self.trainer._freeze_prototypes(step)  # after the noise, which would give the layer a gradient again

    def after_step(self, step: int) -> None:
        self.trainer._update_dp_centres(step)


class LocalTrainer:
    """DINO student/teacher training on one site's cached volumes (C, S, S, S) in [0, 1]."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        dataset: Dataset,
        device: str | None = None,
        seed: int = 0,
        dp: LocalDPConfig | None = None,
    ) -> None:
        """``device`` (auto, cpu, cuda, cuda:N) overrides ``train.device``: a site pins its GPU."""
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the site's dataset is empty; prepare its cache first")
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.dataset = dataset
        self.volume_order = content_order(dataset)  # what batches index: scans, not pseudonyms
        self.device = resolve_device(device or train_cfg.device)
        check_precision(train_cfg.precision, self.device)
        self.seed = seed
        if dp is not None:
            unsupported = [
                name for name, on in (
                    (f"train.precision={train_cfg.precision.value}", train_cfg.precision is not Precision.fp32),
                    ("train.activation_checkpointing=true", train_cfg.activation_checkpointing),
                    (f"train.accumulation_steps={train_cfg.accumulation_steps}", train_cfg.accumulation_steps > 1),
                ) if on
            ]
            if unsupported:
                raise ValueError(
                    f"{', '.join(unsupported)} cannot run under local DP-SGD: per-volume clipping needs fp32 "
                    "per-sample gradients of one pass over one Poisson batch per step"
                )

        mismatch = input_stats_mismatch(
            getattr(dataset, "channel_stats", None), model_cfg.input_mean, model_cfg.input_std
        )
        if mismatch:
            logger.warning(
                "this site's cache does not look like the inputs model.input_mean/input_std standardise "
                "(%s): check its preprocessing (windows) against the federation's", mismatch,
            )
        self.mim_enabled = train_cfg.mim_weight > 0
        self.mae = self.mim_enabled and train_cfg.mim_objective is MIMObjective.mae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)
            self.student = SSLModel(model_cfg, mae_decoder=self.mae).to(self.device)
        self.student.encoder.activation_checkpointing = use_activation_checkpointing(
            train_cfg.activation_checkpointing, self.device, sum(p.numel() for p in self.student.encoder.parameters()), dp is not None
        )
        if self.device.type == "cpu":
            limit_heap_fragmentation()  # activations freed each step go back to the OS, not a fragmented heap
        # Only iBOT uses the encoder's mask token (MAE drops masked patches instead); unused,
        # it is frozen, so it stays out of the optimizer and of DP-SGD.
        self.student.encoder.mask_token.requires_grad_(self.mim_enabled and not self.mae)
        self.teacher = build_teacher(self.student).eval()
        self.student.train()
        self._teacher_synced = False
        self._warned_koleo = False
        self._proximal_reference: dict[str, torch.Tensor] | None = None  # FedProx: the global weights

        # MAE alone (dino_weight 0) reads neither the teacher nor the head, and local crops feed
        # DINO only: skipping them halves the views of a step. Not under DP-SGD, whose per-volume
        # gradients are taken over every trainable parameter (the head's are zero there).
        self._mae_alone = self.mae and train_cfg.dino_weight == 0 and dp is None
        self.multicrop = MultiCrop3D(
            train_cfg.global_crop_scale, train_cfg.local_crop_scale,
            0 if self._mae_alone else train_cfg.num_local_crops, model_cfg.image_size,
            augment=train_cfg.augment, voxel_mm=MultiCrop3D.site_voxel_mm(dataset),
        )
        self.loss_fn = DINOLoss(
            model_cfg.head_prototypes,
            self.multicrop.num_crops,
            train_cfg.student_temp,
            train_cfg.teacher_temp,
            train_cfg.center_momentum,
        ).to(self.device)
        self.ibot_loss = iBOTPatchLoss(
            model_cfg.head_prototypes, train_cfg.student_temp, train_cfg.teacher_temp, train_cfg.center_momentum
        ).to(self.device)
        self.mae_loss = MAELoss(model_cfg.patch_size, train_cfg.mae_norm_pix_loss)
        self._mim_name = "MAE" if self.mae else "iBOT"

        self._param_names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        params = dict(self.student.named_parameters())
        # DINO: no weight decay on biases and norm/1-D parameters.
        decayed = [params[n] for n in self._param_names if params[n].ndim > 1 and not n.endswith(".bias")]
        undecayed = [params[n] for n in self._param_names if params[n].ndim <= 1 or n.endswith(".bias")]
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "apply_wd": True}, {"params": undecayed, "apply_wd": False, "weight_decay": 0.0}],
            lr=train_cfg.scaled_lr,
            weight_decay=train_cfg.weight_decay,
        )

        self.koleo_loss = KoLeoLoss()
        # fp16's small range needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda") if train_cfg.precision is Precision.fp16 else None
        self.dp: VolumeDPSGD | None = None
        if dp is not None:
            if train_cfg.koleo_weight > 0:
                raise ValueError(
                    "train.koleo_weight > 0 cannot run under local DP-SGD: KoLeo couples the volumes of a batch, "
                    "so no per-volume gradient exists to clip; set train.koleo_weight=0"
                )
            # Imported here: Opacus costs seconds at import, paid only by DP-SGD rounds.
            from ctfed.client.dp_sgd import VolumeDPSGD

            num_volumes = len(dataset)  # type: ignore[arg-type]
            self.dp = VolumeDPSGD(
                self.student, self.optimizer, dp, local_sample_rate(train_cfg.batch_size, num_volumes), num_volumes
            )
            # Centres from public reference heads, never from the site's batches (module docstring).
            self.loss_fn.center_from_batch = False
            self.ibot_loss.center_from_batch = False
            self._reference = reference_heads(train_cfg.dp_center_volumes, model_cfg.image_size, seed=train_cfg.seed)
        # What differs between a plain and a DP-SGD step; the loop (_round) is one.
        self.gradients: _PlainGradients | _DPGradients = (
            _PlainGradients(self) if self.dp is None else _DPGradients(self, self.dp)
        )

        total_steps = train_cfg.schedule_steps
        self.lr_schedule = cosine_schedule(
            train_cfg.scaled_lr, train_cfg.scaled_min_lr, total_steps, train_cfg.fraction_steps(train_cfg.warmup_fraction)
        )
        self.wd_schedule = cosine_schedule(train_cfg.weight_decay, train_cfg.weight_decay_end, total_steps)
        self.momentum_schedule = cosine_schedule(
            train_cfg.teacher_momentum, train_cfg.teacher_momentum_end, total_steps
        )
        self.freeze_last_layer_steps = train_cfg.fraction_steps(train_cfg.freeze_last_layer_fraction)
        # Linear warm-up, then constant (a "cosine" from a value to itself).
        temp_warmup = train_cfg.fraction_steps(train_cfg.teacher_temp_warmup_fraction)
        self.teacher_temp_schedule = cosine_schedule(
            train_cfg.teacher_temp, train_cfg.teacher_temp, max(temp_warmup, 1), temp_warmup,
            start_warmup=train_cfg.teacher_temp_warmup,
        )

    # -- federation interface -------------------------------------------------------------

    def set_global_encoder(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the coordinator's encoder into the student (and the teacher, per policy)."""
        try:
            self.student.encoder.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"global encoder does not fit this site's model config: {err}") from None
        if self.train_cfg.teacher_on_new_global == "reset" or not self._teacher_synced:
            self.teacher.encoder.load_state_dict(state, strict=True)
            self._teacher_synced = True
        if self.train_cfg.proximal_mu > 0:
            self._proximal_reference = {name: t.detach().clone().float() for name, t in state.items()}

    def _proximal_term(self) -> torch.Tensor:
        """FedProx: mu/2 * ||w - w_global||^2 over the student encoder's parameters (and the
        head's, when the global state carried shared heads)."""
        reference = self._proximal_reference
        if reference is None:
            raise RuntimeError("train.proximal_mu > 0 needs the global encoder (set_global_encoder) first")
        squared = [(param - reference[name]).pow(2).sum() for name, param in self.student.encoder.named_parameters()]
        if HEAD_PREFIX + "last_layer.weight" in reference:  # shared heads: held near the global head too
            squared += [
                (param - reference[HEAD_PREFIX + name]).pow(2).sum() for name, param in self.student.head.named_parameters()
            ]
        return 0.5 * self.train_cfg.proximal_mu * torch.stack(squared).sum()

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The student encoder's weights."""
        return {k: v.detach().cpu().clone() for k, v in self.student.encoder.state_dict().items()}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What the site receives and sends (as a delta) and the coordinator averages: the
        student encoder, and with ``train.share_heads`` the student head and both centres
        (``SHARED_HEAD_PREFIX`` names, after the encoder's)."""
        state = self.encoder_state()
        if self.train_cfg.share_heads:
            state.update(shared_head_state(self.student.head, self.loss_fn.center, self.ibot_loss.center))
        return state

    def set_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the coordinator's global state (``shared_state``'s names): the encoder as
        ``set_global_encoder`` does and, with ``train.share_heads``, the head into the student,
        into the teacher by the teacher policy (as the encoder), and the centres."""
        encoder, heads = split_shared_state(state)
        if bool(heads) != self.train_cfg.share_heads:
            raise ValueError(
                f"the global state {'carries' if heads else 'lacks'} the shared heads ({SHARED_HEAD_PREFIX}*) "
                f"but train.share_heads={str(self.train_cfg.share_heads).lower()}"
            )
        sync_teacher = self.train_cfg.teacher_on_new_global == "reset" or not self._teacher_synced
        self.set_global_encoder(encoder)
        if not heads:
            return
        centres = {DINO_CENTER_NAME: self.loss_fn.center, IBOT_CENTER_NAME: self.ibot_loss.center}
        head = {name: t for name, t in heads.items() if name not in centres}
        try:
            self.student.head.load_state_dict(head, strict=True)
            if sync_teacher:
                self.teacher.head.load_state_dict(head, strict=True)
        except RuntimeError as err:
            raise ValueError(f"global heads do not fit this site's model config: {err}") from None
        for name, centre in centres.items():
            if name not in heads or heads[name].shape != centre.shape:
                got = tuple(heads[name].shape) if name in heads else "none"
                raise ValueError(f"global {SHARED_HEAD_PREFIX}{name} has shape {got}, expected {tuple(centre.shape)}")
            centre.copy_(heads[name])
        if self.train_cfg.proximal_mu > 0:
            self._proximal_reference.update(  # type: ignore[union-attr] - set by set_global_encoder
                {HEAD_PREFIX + name: t.detach().clone().float() for name, t in head.items()}
            )

    def local_state(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Head, MAE decoder, teacher, DINO and iBOT centres and AdamW moments: what stays at the site.
        ``copy=False`` (a caller that serialises it at once): the CPU tensors themselves, not a
        1.4 GB second copy at ViT-B size."""
        state = {HEAD_PREFIX + k: v for k, v in self.student.head.state_dict().items()}
        if self.student.decoder is not None:
            state.update({DECODER_PREFIX + k: v for k, v in self.student.decoder.state_dict().items()})
        state.update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
        state[CENTER_KEY] = self.loss_fn.center
        state[IBOT_CENTER_KEY] = self.ibot_loss.center
        params = dict(self.student.named_parameters())
        for name in self._param_names:
            for key, value in self.optimizer.state.get(params[name], {}).items():
                state[f"{OPTIMIZER_PREFIX}{name}.{key}"] = value
        return {k: (v.detach().cpu().clone() if copy else v.detach().cpu()) for k, v in state.items()}

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``local_state`` returned last round (AdamW moments are optional)."""
        head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        decoder = {k[len(DECODER_PREFIX) :]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
        teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
        optim = {k[len(OPTIMIZER_PREFIX) :]: v for k, v in state.items() if k.startswith(OPTIMIZER_PREFIX)}
        unknown = set(state) - {HEAD_PREFIX + k for k in head} - {TEACHER_PREFIX + k for k in teacher}
        unknown -= {DECODER_PREFIX + k for k in decoder}
        centres = ((CENTER_KEY, self.loss_fn.center), (IBOT_CENTER_KEY, self.ibot_loss.center))
        unknown -= {OPTIMIZER_PREFIX + k for k in optim} | {key for key, _ in centres}
        missing = [key for key, _ in centres if key not in state]
        if unknown or missing:
            raise ValueError(
                f"not a LocalTrainer local state: unknown keys {sorted(unknown)[:5]}, missing keys {missing}"
            )
        if bool(decoder) != (self.student.decoder is not None):
            raise ValueError(
                "local state was saved with a different train.mim_objective: "
                + ("it has no MAE decoder" if self.student.decoder is not None else "it holds an MAE decoder")
            )
        try:
            self.student.head.load_state_dict(head, strict=True)
            if self.student.decoder is not None:
                self.student.decoder.load_state_dict(decoder, strict=True)
            self.teacher.load_state_dict(teacher, strict=True)
        except RuntimeError as err:
            raise ValueError(f"local state does not fit this site's model config: {err}") from None
        for key, center in centres:
            if state[key].shape != center.shape:
                raise ValueError(
                    f"{'DINO' if key == CENTER_KEY else 'iBOT'} centre has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(center.shape)}"
                )
        for key, center in centres:
            center.copy_(state[key])
        self._load_optimizer_state(optim)
        self._teacher_synced = True

    # -- training -------------------------------------------------------------------------

    def train_round(self, round_index: int) -> RoundResult:
        """Run ``train.local_steps`` optimizer steps; schedules follow the global step.

        Torch's global generator (dropout draws from it) is seeded for the round and restored
        after: in a reused process (a simulation engine's actor plays several sites, in
        whatever order they come) its state would otherwise depend on what ran there before.
        """
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        global_seed = np.random.SeedSequence([self.seed, round_index]).spawn(4)[3]  # _round's fourth child
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(global_seed.generate_state(1)[0]))
            return self._round(round_index)

    def _round(self, round_index: int) -> RoundResult:
        """``train_round``'s work, under its seeded global generator.

        Plain and DP-SGD steps share this loop; what differs (batches, how the gradient is
        formed and clipped, where the centres come from) is ``self.gradients``.
        """
        started = time.perf_counter()
        cfg = self.train_cfg
        gradients = self.gradients
        # Seeding by (site seed, round) keeps rounds reproducible yet different, even though
        # the ClientApp builds a fresh trainer every round. Every volume draw's crops come from
        # (crop seed, its position in the round), so they are the same whichever loader process
        # makes them. (The fourth child, once DP noise, seeds torch's global generator in
        # ``train_round``: dropout. DP noise draws from the OS CSPRNG.)
        crop_seed, order_seed, mask_seed, _ = np.random.SeedSequence([self.seed, round_index]).spawn(4)
        mask_generator = torch.Generator().manual_seed(int(mask_seed.generate_state(1)[0]))
        batches = gradients.batches(int(order_seed.generate_state(1)[0]), crop_seed)

        result = RoundResult(losses=[], num_examples=0, seconds=0.0, dp_steps=cfg.local_steps if self.dp else 0)
        micro = cfg.accumulation_steps
        for local_step in range(cfg.local_steps):
            step = round_index * cfg.local_steps + local_step
            self._apply_schedules(step)
            gradients.zero_grad()
            parts: list[tuple[float, float, float | None, float | None]] = []
            for _ in range(micro):
                data_started = time.perf_counter()
                views = next(batches)
                if views is not None:
                    student_in, teacher_in = self._views(views)
                result.data_seconds += time.perf_counter() - data_started
                if views is None:  # an empty Poisson batch: the step is noise only, as DP-SGD's analysis assumes
                    gradients.empty_batch()
                    continue
                batch = views.shape[0]
                with autocast(self.device, cfg.precision):
                    loss, dino, mim, koleo, patch_rows = self._ssl_loss(
                        student_in, teacher_in, mask_generator, with_rows=gradients.per_volume_rows
                    )
                loss = gradients.regularised(loss)
                self._check_finite(loss, dino, mim, round_index, local_step, step)
                gradients.backward(loss / micro, batch, student_in.shape[0], teacher_in.shape[0], patch_rows)
                parts.append((loss.item(), dino.item(), None if mim is None else mim.item(),
                              None if koleo is None else koleo.item()))
                result.num_examples += batch
            gradients.finish(step)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self._update_teacher(step)
            gradients.after_step(step)
            if parts:  # per optimiser step: the mean over its micro-batches
                result.losses.append(sum(p[0] for p in parts) / len(parts))
                result.dino_losses.append(sum(p[1] for p in parts) / len(parts))
                if parts[0][2] is not None:
                    result.mim_losses.append(sum(p[2] for p in parts) / len(parts))  # type: ignore[misc]
                if parts[0][3] is not None:
                    result.koleo_losses.append(sum(p[3] for p in parts) / len(parts))  # type: ignore[misc]

        result.seconds = time.perf_counter() - started
        self._log_round(round_index, result)
        if not result.losses:  # DP-SGD: every Poisson batch came out empty, nothing was measured
            result.losses, result.dino_losses = [math.nan], [math.nan]
        return result

    def _freeze_prototypes(self, step: int) -> None:
        """Keep the prototypes fixed early on: no gradient means AdamW skips the last layer
        entirely (no decay, no moments)."""
        if step < self.freeze_last_layer_steps:
            for param in self.student.head.last_layer.parameters():
                param.grad = None

    @torch.no_grad()
    def _update_dp_centres(self, step: int) -> None:
        """DP-SGD: one EMA step of both centres on the teacher's outputs for two public
        reference heads (round robin), their patch tokens subsampled like iBOT's masks."""
        count = min(2, len(self._reference))
        first = (2 * step) % len(self._reference)
        heads = self._reference[[(first + i) % len(self._reference) for i in range(count)]].to(self.device)
        if self.mim_enabled and not self.mae:
            grid = self.model_cfg.tokens_per_side
            generator = torch.Generator().manual_seed(step)
            select = torch.rand(count, grid**3, generator=generator) < 0.5
            select[:, 0] |= ~select.any(dim=1)  # at least one token per head
            cls_logits, patch_logits = self.teacher.forward_with_patches(heads, None, select.to(self.device))
            self.ibot_loss.update_center(patch_logits)
        else:
            cls_logits = self.teacher(heads)
        self.loss_fn.update_center(cls_logits)

    def _log_round(self, round_index: int, result: RoundResult) -> None:
        cfg = self.train_cfg
        mode = "" if self.dp is None else (
            f" (DP-SGD, noise {self.dp.dp.noise_multiplier:.3g}, clip {self.dp.dp.max_grad_norm:.3g})"
        )
        losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
        mim = result.mim_losses
        logger.info(
            "round %d%s: %d steps, %d volumes%s%s, %.1fs",  # 1-based, as the coordinator counts rounds
            round_index + 1, mode, cfg.local_steps, result.num_examples, losses,
            f" ({self._mim_name} {mim[0]:.4f} -> {mim[-1]:.4f})" if mim else "", result.seconds,
        )

    def _check_finite(
        self, loss: torch.Tensor, dino: torch.Tensor, mim: torch.Tensor | None, round_index: int, local_step: int, step: int
    ) -> None:
        if not torch.isfinite(loss):
            parts = f"DINO {dino.item():.4g}" + ("" if mim is None else f", {self._mim_name} {mim.item():.4g}")
            raise NonFiniteLossError(
                f"training loss is {loss.item()} ({parts}) at round {round_index}, local step {local_step} "
                f"(global step {step}, lr {self.lr_schedule(step):.3g}); lower train.lr or "
                "raise train.warmup_steps"
            )

    def _ssl_loss(
        self, student_in: torch.Tensor, teacher_in: torch.Tensor, generator: torch.Generator, with_rows: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(weighted loss, DINO loss, MIM loss or None, KoLeo or None, patch rows or None) of one batch.

        ``with_rows`` (DP-SGD) also returns which student row each masked patch token came
        from, so per-row gradients can be folded back to their volume.
        """
        cfg = self.train_cfg
        global_rows = teacher_in.shape[0]
        if self.mae:
            dino, mim, student_cls = self._dino_and_mae(student_in, teacher_in, generator)
            patch_rows = None
            loss = cfg.dino_weight * dino + cfg.mim_weight * mim
        elif self.mim_enabled:
            dino, mim, student_cls, patch_rows = self._dino_and_mim(student_in, teacher_in, generator)
            loss = cfg.dino_weight * dino + cfg.mim_weight * mim
        else:
            with torch.no_grad():
                teacher_out = self.teacher(teacher_in)
            student_cls = self.student.encoder.cls_features(student_in)
            dino, mim, patch_rows = self.loss_fn(self.student.head(student_cls), teacher_out), None, None
            loss = cfg.dino_weight * dino
        koleo = None
        if cfg.koleo_weight > 0:
            koleo = self._koleo(student_cls[:global_rows])
            loss = loss + cfg.koleo_weight * koleo
        return loss, dino, mim, koleo, patch_rows if with_rows else None

    def _koleo(self, global_cls: torch.Tensor) -> torch.Tensor:
        """KoLeo of the student's global-crop CLS embeddings, within each crop (DINOv2)."""
        per_crop = global_cls.chunk(2)
        if per_crop[0].shape[0] < 2:
            # A site smaller than one batch: no neighbour to push away from.
            if not self._warned_koleo:
                logger.warning("KoLeo term skipped: a batch of %d volume(s) has no neighbours", per_crop[0].shape[0])
                self._warned_koleo = True
            return global_cls.sum() * 0.0
        return torch.stack([self.koleo_loss(crop) for crop in per_crop]).sum()

    def _dino_and_mim(
        self, student_in: torch.Tensor, teacher_in: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(DINO loss, iBOT loss, student CLS embeddings, patch rows): DINO on CLS, iBOT on
        masked patch tokens; only the student's global crops are masked. ``patch_rows`` says
        which student row each masked patch token came from (``select.nonzero()`` order)."""
        cfg = self.train_cfg
        grid = self.model_cfg.tokens_per_side
        global_masks = sample_masks(
            teacher_in.shape[0], grid, cfg.mask_ratio, cfg.mask_probability, generator
        ).to(self.device)
        local_rows = student_in.shape[0] - teacher_in.shape[0]
        student_mask = torch.cat([global_masks, global_masks.new_zeros(local_rows, grid**3)])
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher.forward_with_patches(teacher_in, None, global_masks)
        student_cls, student_patches, student_embeddings = self.student.forward_with_patches(
            student_in, student_mask, global_masks, return_cls_embeddings=True
        )
        dino = self.loss_fn(student_cls, teacher_cls)
        mim = self.ibot_loss(student_patches, teacher_patches, global_masks)
        return dino, mim, student_embeddings, global_masks.nonzero()[:, 0].cpu()

    def _dino_and_mae(
        self, student_in: torch.Tensor, teacher_in: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(DINO loss, MAE loss, student CLS embeddings): MAE's random masking of every global
        crop at ``train.mae_mask_ratio``, with the masked patches dropped from the encoder (only
        the visible ones enter the blocks); the decoder reconstructs them from the visible
        tokens, and DINO reads the same pass's CLS. Local crops, if any, go whole through a
        second pass (a different token count), rows kept crop-major."""
        global_rows = teacher_in.shape[0]
        keep, global_masks = random_keep(
            global_rows, self.model_cfg.tokens_per_side**3, self.train_cfg.mae_mask_ratio, generator
        )
        keep, global_masks = keep.to(self.device), global_masks.to(self.device)
        visible = self.student.encoder(teacher_in, None, keep)
        student_cls = visible[:, 0]
        if self._mae_alone:
            dino = visible.new_zeros(())
        else:
            with torch.no_grad():
                teacher_cls = self.teacher(teacher_in)
            if student_in.shape[0] > global_rows:
                student_cls = torch.cat([student_cls, self.student.encoder(student_in[global_rows:])[:, 0]])
            dino = self.loss_fn(self.student.head(student_cls), teacher_cls)
        assert self.student.decoder is not None
        reconstruction = self.student.decoder(visible[:, 1:], keep)
        # The target is the global crop as the teacher saw it: unmasked (masking acts on tokens).
        mim = self.mae_loss(reconstruction, teacher_in, global_masks)
        return dino, mim, student_cls

    def _update_teacher(self, step: int) -> None:
        """EMA of the student's encoder and DINO head (MAE's decoder has no teacher)."""
        momentum = self.momentum_schedule(step)
        update_teacher(self.student.encoder, self.teacher.encoder, momentum)
        update_teacher(self.student.head, self.teacher.head, momentum)

    def _apply_schedules(self, step: int) -> None:
        lr, wd = self.lr_schedule(step), self.wd_schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        teacher_temp = self.teacher_temp_schedule(step)
        self.loss_fn.teacher_temp = teacher_temp
        self.ibot_loss.teacher_temp = teacher_temp

    def _batches(self, order_seed: int, crop_seed: np.random.SeedSequence) -> Iterator[torch.Tensor]:
        """Micro-batches of multi-crop views (B, crops, C, S, S, S): shuffled volumes, epoch after
        epoch, cropped in ``train.loader_workers`` processes ahead of the step (pinned for a GPU)."""
        # The site's cores are the site's: an instruction cannot fork more workers than it has.
        workers = min(self.train_cfg.loader_workers, os.cpu_count() or 1)
        if workers < self.train_cfg.loader_workers:
            logger.warning("train.loader_workers=%d capped at this site's %d cores", self.train_cfg.loader_workers, workers)
        loader = DataLoader(
            _CropViews(self.dataset, self.multicrop, crop_seed, self.volume_order),
            batch_sampler=_ShuffledBatches(len(self.dataset), self.train_cfg.batch_size, order_seed),  # type: ignore[arg-type]
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )
        yield from loader

    def _dp_batches(self, crop_seed: np.random.SeedSequence) -> Iterator[torch.Tensor | None]:
        """DP-SGD's Poisson-sampled batches of views (None where a batch came out empty), made
        in this process: a batch's size is random, and an empty one has nothing to collate."""
        assert self.dp is not None
        if self.train_cfg.loader_workers:
            logger.info("local DP-SGD makes its crops in the training process (train.loader_workers ignored)")
        views = _CropViews(self.dataset, self.multicrop, crop_seed, self.volume_order)
        position = 0
        for indices in self.dp.poisson_batches():
            items = [(position + k, index) for k, index in enumerate(indices)]
            position += len(items)
            yield torch.stack([views[item] for item in items]) if items else None

    def _views(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop-major student input (all crops; row r is volume r % B) and teacher input (the
        2 global crops), on the training device."""
        batch, crops = views.shape[:2]
        student_in = views.transpose(0, 1).reshape(batch * crops, *views.shape[2:])
        student_in = student_in.to(self.device, non_blocking=True)
        return student_in, student_in[: 2 * batch]

    def _load_optimizer_state(self, flat: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.student.named_parameters())
        expected = {f"{name}.{key}" for name in self._param_names for key in ADAMW_STATE_KEYS}
        unknown = set(flat) - expected
        if unknown:
            raise ValueError(f"optimizer state names unknown parameters: {sorted(unknown)[:5]}")
        self.optimizer.state.clear()
        for name in self._param_names:
            entries = {key: flat.get(f"{name}.{key}") for key in ADAMW_STATE_KEYS}
            if all(value is None for value in entries.values()):
                continue
            if any(value is None for value in entries.values()):
                raise ValueError(f"optimizer state for '{name}' is incomplete: needs {', '.join(ADAMW_STATE_KEYS)}")
            state = {k: v.clone().to(self.device) for k, v in entries.items()}
            state["step"] = state["step"].cpu()  # AdamW keeps its step counter on the CPU
            self.optimizer.state[params[name]] = state
