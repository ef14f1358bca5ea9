"""Sample-level DP-SGD for LocalTrainer, with Opacus, where a *sample* is one volume.

Why not ``PrivacyEngine.make_private``: one volume becomes several rows of the student's
batch (its multi-crop views, and for iBOT its masked patch tokens through the head), so
Opacus' per-row clipping would bound each crop, not each volume, and the noise would be
calibrated to the wrong sensitivity. Here Opacus computes per-row gradients
(``GradSampleModule``), ``fold_rows_to_volumes`` sums the rows of each volume, and Opacus'
``DPOptimizer`` clips each *volume's* gradient to ``max_grad_norm`` and adds
N(0, (noise_multiplier * max_grad_norm)^2) noise. Batches are Poisson-sampled volumes
(rate ``batch_size / volumes``), which is what the RDP accountant's analysis assumes.

What is private: the student encoder and head (every trainable parameter). The teacher is
an EMA of the private student (post-processing). The DINO/iBOT centres would be statistics
of raw teacher outputs outside DP-SGD's clipping, so under DP-SGD they move on public
reference heads instead (``client/train.py`` ``_DPGradients``;
docs/decisions/shared-heads-and-centres.md).

Randomness: the noise and the Poisson batches come from ``common.dp.SecureRandom`` (the OS
CSPRNG), always. Nothing takes a seed: a coordinator that knew the seed (``train.seed``
plus the site index, 0 at every deployed site) could regenerate the noise and subtract it.
Crops and masks stay seeded; they are part of the per-volume function that is clipped, not
of the privacy mechanism.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from ctfed.common.config import LocalDPConfig
from ctfed.common.dp import SecureRandom
from ctfed.common.model import register_dp_grad_samplers


class CSPRNGDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its noise drawn from ``SecureRandom`` instead of a torch
    generator; clipping, accumulation and scaling are Opacus' own."""

    def __init__(self, *args: object, rng: SecureRandom, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.rng = rng

    def add_noise(self) -> None:
        # Opacus' add_noise, with the noise source replaced (the sum-of-four construction of
        # its secure_mode is inside SecureRandom.normal).
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.rng.normal(p.summed_grad.shape, std, dtype=p.summed_grad.dtype).to(p.summed_grad.device)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class VolumeDPSGD:
    """Per-volume clipping and noise around a student model and its optimizer."""

    def __init__(
        self,
        student: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: LocalDPConfig,
        sample_rate: float,
        num_volumes: int,
    ) -> None:
        self.dp = dp
        self.sample_rate = sample_rate
        self.num_volumes = num_volumes
        register_dp_grad_samplers()
        # Hooks go onto the student's own submodules; the student keeps its plain interface.
        # "sum": per-row gradients of the loss as given; the trainer passes a per-volume sum.
        self.grad_sample_module = GradSampleModule(student, loss_reduction="sum")
        self.params = [p for p in student.parameters() if p.requires_grad]
        # One fresh CSPRNG stream per trainer (the ClientApp builds one per round).
        self.rng = SecureRandom()
        self.optimizer = CSPRNGDPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(sample_rate * num_volumes, 1e-12),
            loss_reduction="mean",
            rng=self.rng,
        )

    def poisson_batches(self) -> Iterator[list[int]]:
        """Volume indices per step: each volume joins each batch independently with the sample
        rate, by a coin from the CSPRNG."""
        while True:
            chosen = self.rng.bernoulli(self.num_volumes, self.sample_rate)
            yield chosen.nonzero().flatten().tolist()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def fold_rows_to_volumes(self, row_volume: Iterable[torch.Tensor], num_volumes: int) -> None:
        """Turn every parameter's per-row gradients into per-volume gradients.

        ``row_volume`` lists candidate row->volume maps, one per batch length a module saw
        (the student's crop rows; the head's crop rows plus selected patch tokens).
        """
        maps = {int(m.numel()): m for m in row_volume}
        for param in self.params:
            grad_sample = getattr(param, "grad_sample", None)
            folded = param.new_zeros((num_volumes, *param.shape))
            if grad_sample is not None:
                if isinstance(grad_sample, list):
                    grad_sample = torch.cat(grad_sample)
                index = maps.get(grad_sample.shape[0])
                if index is None:
                    raise RuntimeError(
                        f"per-sample gradient with {grad_sample.shape[0]} rows fits none of the batch "
                        f"layouts {sorted(maps)}; cannot attribute it to volumes"
                    )
                folded.index_add_(0, index.to(grad_sample.device), grad_sample.to(folded.dtype))
            # A parameter unused this step (e.g. the mask token without masks) gets zeros,
            # so every volume still has a complete gradient.
            param.grad_sample = folded

    def empty_step_gradients(self) -> None:
        """A Poisson batch can be empty: the step is then noise only, as the analysis assumes."""
        for param in self.params:
            param.grad_sample = param.new_zeros((0, *param.shape))

    def clip_and_noise(self) -> bool:
        """Clip per volume, add noise, average; sets ``p.grad``. False if the step was skipped."""
        return bool(self.optimizer.pre_step())

    def summed_clipped_grad_norm(self) -> float:
        """L2 norm of the last step's sum of clipped per-volume gradients (before noise)."""
        total = sum(float(p.summed_grad.double().pow(2).sum()) for p in self.params if p.summed_grad is not None)
        return total**0.5

    def close(self) -> None:
        self.grad_sample_module._close()
