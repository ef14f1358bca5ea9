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

* ``encoder_state()`` - the student encoder only - is what the site sends and what the
  coordinator averages (``SSLModel.encoder`` keys).
* ``local_state()`` - student head, MAE decoder (if any), the whole teacher (encoder + head),
  the DINO and iBOT centres and the AdamW moments - stays at the site between rounds. The
  ClientApp builds a new ``LocalTrainer`` every round, so without it the head, decoder,
  centre and optimizer would restart.

Teacher policy (``train.teacher_on_new_global``):

* ``"reset"`` (default): the teacher encoder is set to the new global student when it arrives.
  The averaged model plays the role of DINO's slow, ensembled teacher, every site distils
  towards the same target, and a site that lost its local state behaves like the others.
* ``"keep"``: the teacher keeps its EMA across rounds (FedEMA/FedU style), so it integrates the
  sequence of global students and this site's local steps.

Local differential privacy (``dp=`` a LocalDPConfig): every optimizer step is per-volume
DP-SGD on Poisson-sampled batches (``client/dp_sgd.py``); ``train.grad_clip`` is then
replaced by the per-volume clipping, and the DINO/iBOT centres stay frozen.

Either way a site's first global encoder also initialises its teacher encoder; the teacher
head is always the EMA of this site's student head (heads never leave the site).

All sites build the head from ``train.seed`` (not the per-site seed), so they start from the
same prototypes; the per-site ``seed`` only drives data order, crops and masks.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ctfed.client.ledger import local_sample_rate
from ctfed.common.config import LocalDPConfig, MIMObjective, ModelConfig, TrainConfig
from ctfed.common.masking import sample_masks
from ctfed.common.model import SSLModel, build_teacher
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


class LocalTrainer:
    """DINO student/teacher training on one site's cached volumes (C, S, S, S) in [0, 1]."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        dataset: Dataset,
        device: str = "cpu",
        seed: int = 0,
        dp: LocalDPConfig | None = None,
    ) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the site's dataset is empty; prepare its cache first")
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.dataset = dataset
        self.device = torch.device(device)
        self.seed = seed

        self.mim_enabled = train_cfg.mim_weight > 0
        self.mae = self.mim_enabled and train_cfg.mim_objective is MIMObjective.mae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)
            self.student = SSLModel(model_cfg, mae_decoder=self.mae).to(self.device)
        # Without MIM the mask token is never used; frozen, it stays out of the optimizer and
        # of DP-SGD (which needs a gradient for every trainable parameter).
        self.student.encoder.mask_token.requires_grad_(self.mim_enabled)
        self.teacher = build_teacher(self.student).eval()
        self.student.train()
        self._teacher_synced = False
        self._warned_koleo = False
        self._proximal_reference: dict[str, torch.Tensor] | None = None  # FedProx: the global weights

        self.multicrop = MultiCrop3D(
            train_cfg.global_crop_scale, train_cfg.local_crop_scale, train_cfg.num_local_crops, model_cfg.image_size
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
            lr=train_cfg.lr,
            weight_decay=train_cfg.weight_decay,
        )

        self.koleo_loss = KoLeoLoss()
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
            # The centres are statistics of raw (unclipped, unnoised) teacher outputs.
            self.loss_fn.center_momentum = 1.0
            self.ibot_loss.center_momentum = 1.0

        total_steps = max(train_cfg.schedule_rounds, 1) * train_cfg.local_steps
        warmup = min(train_cfg.warmup_steps, total_steps)
        self.lr_schedule = cosine_schedule(train_cfg.lr, train_cfg.min_lr, total_steps, warmup)
        self.wd_schedule = cosine_schedule(train_cfg.weight_decay, train_cfg.weight_decay_end, total_steps)
        self.momentum_schedule = cosine_schedule(
            train_cfg.teacher_momentum, train_cfg.teacher_momentum_end, total_steps
        )
        # Linear warm-up, then constant (a "cosine" from a value to itself).
        temp_warmup = train_cfg.teacher_temp_warmup_steps
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
        """FedProx: mu/2 * ||w - w_global||^2 over the student encoder's parameters."""
        reference = self._proximal_reference
        if reference is None:
            raise RuntimeError("train.proximal_mu > 0 needs the global encoder (set_global_encoder) first")
        squared = [(param - reference[name]).pow(2).sum() for name, param in self.student.encoder.named_parameters()]
        return 0.5 * self.train_cfg.proximal_mu * torch.stack(squared).sum()

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The student encoder's weights: what the site sends."""
        return {k: v.detach().cpu().clone() for k, v in self.student.encoder.state_dict().items()}

    def local_state(self) -> dict[str, torch.Tensor]:
        """Head, MAE decoder, teacher, DINO and iBOT centres and AdamW moments: what stays at the site."""
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
        return {k: v.detach().cpu().clone() for k, v in state.items()}

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
        """Run ``train.local_steps`` optimizer steps; schedules follow the global step."""
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        started = time.perf_counter()
        cfg = self.train_cfg
        # Seeding by (site seed, round) keeps rounds reproducible yet different, even though
        # the ClientApp builds a fresh trainer every round. (The first two children do not
        # depend on how many are spawned, so crops and order match the pre-MIM trainer.)
        crop_seed, order_seed, mask_seed, noise_seed = np.random.SeedSequence([self.seed, round_index]).spawn(4)
        self.multicrop.reseed(crop_seed)
        mask_generator = torch.Generator().manual_seed(int(mask_seed.generate_state(1)[0]))
        if self.dp is not None:
            return self._train_round_dp(
                round_index, started, int(order_seed.generate_state(1)[0]), int(noise_seed.generate_state(1)[0]),
                mask_generator,
            )
        batches = self._batches(int(order_seed.generate_state(1)[0]))

        losses: list[float] = []
        dino_losses: list[float] = []
        mim_losses: list[float] = []
        koleo_losses: list[float] = []
        num_examples = 0
        data_seconds = 0.0
        for local_step in range(cfg.local_steps):
            step = round_index * cfg.local_steps + local_step
            self._apply_schedules(step)
            data_started = time.perf_counter()
            volumes = next(batches)
            student_in, teacher_in = self._views(volumes)
            data_seconds += time.perf_counter() - data_started

            loss, dino, mim, koleo, _ = self._ssl_loss(student_in, teacher_in, mask_generator)
            if cfg.proximal_mu > 0:
                loss = loss + self._proximal_term()
            self._check_finite(loss, dino, mim, round_index, local_step, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < cfg.freeze_last_layer_steps:
                # No gradient means AdamW skips the prototypes entirely (no decay, no moments).
                for param in self.student.head.last_layer.parameters():
                    param.grad = None
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self._update_teacher(step)

            losses.append(loss.item())
            dino_losses.append(dino.item())
            if mim is not None:
                mim_losses.append(mim.item())
            if koleo is not None:
                koleo_losses.append(koleo.item())
            num_examples += volumes.shape[0]

        seconds = time.perf_counter() - started
        logger.info(
            "round %d: %d steps, %d volumes, loss %.4f -> %.4f%s, %.1fs",
            round_index, cfg.local_steps, num_examples, losses[0], losses[-1],
            f" ({self._mim_name} {mim_losses[0]:.4f} -> {mim_losses[-1]:.4f})" if mim_losses else "", seconds,
        )
        return RoundResult(
            losses=losses,
            num_examples=num_examples,
            seconds=seconds,
            dino_losses=dino_losses,
            mim_losses=mim_losses,
            koleo_losses=koleo_losses,
            data_seconds=data_seconds,
        )

    def _train_round_dp(
        self, round_index: int, started: float, order_seed: int, noise_seed: int, mask_generator: torch.Generator
    ) -> RoundResult:
        """One round of per-volume DP-SGD on Poisson-sampled batches (see client/dp_sgd.py)."""
        assert self.dp is not None
        cfg = self.train_cfg
        batches = self.dp.poisson_batches()  # CSPRNG: DP draws take no seed (client/dp_sgd.py)
        losses: list[float] = []
        dino_losses: list[float] = []
        mim_losses: list[float] = []
        num_examples = 0
        data_seconds = 0.0
        for local_step in range(cfg.local_steps):
            step = round_index * cfg.local_steps + local_step
            self._apply_schedules(step)
            self.dp.zero_grad()
            data_started = time.perf_counter()
            indices = next(batches)
            if not indices:
                data_seconds += time.perf_counter() - data_started
                self.dp.empty_step_gradients()
            else:
                volumes = torch.stack([self.dataset[i] for i in indices])
                student_in, teacher_in = self._views(volumes)
                data_seconds += time.perf_counter() - data_started
                batch = volumes.shape[0]
                crop_rows = torch.arange(student_in.shape[0]) % batch
                # The encoder and DINO head see every crop; MAE's decoder only the global ones.
                row_maps = [crop_rows, crop_rows[: teacher_in.shape[0]]]
                loss, dino, mim, _, patch_rows = self._ssl_loss(student_in, teacher_in, mask_generator, with_rows=True)
                if patch_rows is not None:
                    row_maps.append(torch.cat([crop_rows, patch_rows % batch]))
                self._check_finite(loss, dino, mim, round_index, local_step, step)
                # The losses are means over the batch; their per-volume gradients are those of
                # batch x loss, so clipping bounds each volume whatever the batch size.
                with warnings.catch_warnings():
                    # Opacus' hooks on the first layer, whose input (the scan) needs no gradient.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    (loss * batch).backward()
                self.dp.fold_rows_to_volumes(row_maps, batch)
                losses.append(loss.item())
                dino_losses.append(dino.item())
                if mim is not None:
                    mim_losses.append(mim.item())
                num_examples += batch
            if not self.dp.clip_and_noise():
                raise RuntimeError("DP optimizer skipped a step; every step must be noised and accounted")
            if step < cfg.freeze_last_layer_steps:
                for param in self.student.head.last_layer.parameters():
                    param.grad = None
            self.optimizer.step()
            self._update_teacher(step)

        seconds = time.perf_counter() - started
        logger.info(
            "round %d (DP-SGD, noise %.3g, clip %.3g): %d steps, %d volumes, %.1fs",
            round_index, self.dp.dp.noise_multiplier, self.dp.dp.max_grad_norm, cfg.local_steps, num_examples, seconds,
        )
        if not losses:  # every Poisson batch came out empty: nothing was measured
            losses = [math.nan]
            dino_losses = [math.nan]
        return RoundResult(
            losses=losses,
            num_examples=num_examples,
            seconds=seconds,
            dino_losses=dino_losses,
            mim_losses=mim_losses,
            data_seconds=data_seconds,
            dp_steps=cfg.local_steps,
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
        """(DINO loss, MAE loss, student CLS embeddings): DINO on CLS, and the decoder
        reconstructs the masked patches of the student's global crops from the same pass."""
        cfg = self.train_cfg
        grid = self.model_cfg.tokens_per_side
        global_rows = teacher_in.shape[0]
        global_masks = sample_masks(global_rows, grid, cfg.mask_ratio, cfg.mask_probability, generator).to(self.device)
        student_mask = torch.cat([global_masks, global_masks.new_zeros(student_in.shape[0] - global_rows, grid**3)])
        with torch.no_grad():
            teacher_cls = self.teacher(teacher_in)
        tokens = self.student.encoder(student_in, student_mask)
        dino = self.loss_fn(self.student.head(tokens[:, 0]), teacher_cls)
        assert self.student.decoder is not None
        reconstruction = self.student.decoder(tokens[:global_rows, 1:])
        # The target is the global crop as the teacher saw it: unmasked (masking acts on tokens).
        mim = self.mae_loss(reconstruction, teacher_in, global_masks)
        return dino, mim, tokens[:, 0]

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

    def _batches(self, seed: int) -> Iterator[torch.Tensor]:
        """Shuffled batches of volumes, epoch after epoch, for as many steps as asked."""
        generator = torch.Generator().manual_seed(seed)
        batch_size = self.train_cfg.batch_size
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            # Keep batches full unless the whole site holds fewer volumes than one batch.
            drop_last=len(self.dataset) >= batch_size,  # type: ignore[arg-type]
        )
        while True:
            yield from loader

    def _views(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop-major student input (all crops) and teacher input (the 2 global crops)."""
        if volumes.ndim != 5:
            raise ValueError(f"dataset must yield volumes (C, S, S, S), got a batch of shape {tuple(volumes.shape)}")
        per_volume = [self.multicrop(volume) for volume in volumes]
        views = [torch.stack([crops[v] for crops in per_volume]) for v in range(self.multicrop.num_crops)]
        student_in = torch.cat(views).to(self.device)
        return student_in, student_in[: 2 * volumes.shape[0]]

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
