"""Differential privacy: per-volume DP-SGD, persistent site ledger, budget, central clip/noise."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant
from torch.utils.data import Dataset

from ctfed.client.ledger import LEDGER_FILE, load_site_ledger, local_sample_rate
from ctfed.client.policy import SITE_POLICIES_FILE_KEY
from ctfed.client.privacy_round import RoundRefused, SitePrivacyRound
from ctfed.client.site import SiteIdentity
from ctfed.client.train import LocalTrainer
from ctfed.common.config import (
    CentralDPConfig,
    LocalDPConfig,
    MIMObjective,
    ModelConfig,
    PrivacyConfig,
    PrivacyMode,
    TrainConfig,
)
from ctfed.common.dp import (
    RDP_ORDERS,
    LedgerEntry,
    PrivacyLedger,
    SecureRandom,
    add_gaussian_noise,
    central_noise_std,
    clip_update,
    epsilon_for,
)
from ctfed.common.exchange import BUDGET_REFUSED_CODE, RoundInstructions
from ctfed.common.fileio import write_json_atomic
from ctfed.server.central_dp import CentralDP, uniform_mean

MODEL = ModelConfig()
NUM_VOLUMES = 4


class RandomVolumes(Dataset):
    def __init__(self, count: int = NUM_VOLUMES, seed: int = 0) -> None:
        size = MODEL.image_size
        self.volumes = torch.rand(count, MODEL.in_channels, size, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def _train_cfg(**overrides: object) -> TrainConfig:
    # lr_reference_batch = batch: the unscaled LR, so a step moves the weights well past float noise.
    values = dict(local_steps=2, batch_size=2, schedule_rounds=3, num_local_crops=1, lr_reference_batch=2)
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def _dp_trainer(seed: int = 0, dp: LocalDPConfig | None = None, **train: object) -> LocalTrainer:
    dp = dp or LocalDPConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = LocalTrainer(MODEL, _train_cfg(**train), RandomVolumes(), seed=seed, dp=dp)
    torch.manual_seed(123)
    trainer.set_global_encoder({k: v.clone() for k, v in trainer.encoder_state().items()})
    return trainer


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- local DP-SGD ---------------------------------------------------------------------------


def test_dp_sgd_noise_is_never_reproducible_from_the_seed() -> None:
    """Two identical rounds (same seed, data, crops and masks, every volume in every batch,
    so the batches match too) differ: only the noise can make them differ."""
    dp = LocalDPConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    same = dict(seed=3, dp=dp, batch_size=NUM_VOLUMES, local_steps=1)
    first, again = _dp_trainer(**same), _dp_trainer(**same)  # type: ignore[arg-type]
    first.train_round(0)
    again.train_round(0)
    assert _max_diff(first.encoder_state(), again.encoder_state()) > 1e-4


def test_poisson_batches_come_from_the_csprng() -> None:
    trainer = _dp_trainer(seed=3)
    other = _dp_trainer(seed=3)
    assert trainer.dp is not None and other.dp is not None
    take = lambda dp: [tuple(next(batches)) for batches in [dp.poisson_batches()] for _ in range(40)]  # noqa: E731
    assert take(trainer.dp) != take(other.dp)
    sizes = [len(batch) for batch in take(trainer.dp)]
    assert 0.3 < sum(sizes) / (40 * NUM_VOLUMES) < 0.7  # rate batch_size / volumes = 0.5


def test_secure_random_draws_have_the_stated_distribution() -> None:
    rng = SecureRandom()
    uniform = rng.uniform(100_000)
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    noise = rng.normal((300, 1000), std=2.5, dtype=torch.float64)
    assert noise.shape == (300, 1000) and noise.dtype == torch.float64
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(noise.std()) == pytest.approx(2.5, rel=0.01)
    kurtosis = float(((noise / noise.std()) ** 4).mean())
    assert kurtosis == pytest.approx(3.0, abs=0.05)  # Gaussian, not uniform (1.8) or Laplace (6)
    assert not torch.equal(SecureRandom().normal((8,), 1.0), SecureRandom().normal((8,), 1.0))


def test_local_dp_config_has_no_rng_switch() -> None:
    from ctfed.common.config import ConfigError, to_section

    with pytest.raises(ConfigError, match="secure_rng"):
        to_section(LocalDPConfig, {"secure_rng": False})


@pytest.mark.parametrize(("mim_weight", "mim_objective"), [(0.0, "ibot"), (1.0, "ibot"), (1.0, "mae")])
def test_per_volume_clipping_bounds_each_volume(mim_weight: float, mim_objective: str) -> None:
    clip = 1e-3
    trainer = _dp_trainer(
        dp=LocalDPConfig(noise_multiplier=1e-6, max_grad_norm=clip), mim_weight=mim_weight, mask_probability=1.0,
        local_steps=3, mim_objective=MIMObjective(mim_objective),
    )
    # MAE's decoder (global crops only) gets per-volume gradients like the rest.
    assert (trainer.student.decoder is not None) == (mim_objective == "mae")
    assert trainer.dp is not None
    seen: list[tuple[int, list[float], float]] = []
    original = trainer.dp.clip_and_noise

    def checked_clip_and_noise() -> bool:
        params = trainer.dp.params
        batch = params[0].grad_sample.shape[0]
        if batch:
            # Folding rows into volumes keeps the total gradient (autograd's own p.grad). The
            # tolerance scales with the gradient: float32 sums of terms of size ~5 that cancel
            # to ~0 differ by a few 1e-6 with the summation order, which varies by CPU.
            for param in params:
                scale = float(param.grad.abs().max())
                assert torch.allclose(param.grad_sample.sum(0), param.grad, rtol=1e-3, atol=1e-5 * scale + 1e-9)
            norms = torch.stack([p.grad_sample.reshape(batch, -1).norm(dim=1) for p in params], dim=1).norm(dim=1)
            before = norms.tolist()
        else:
            before = []
        done = original()
        seen.append((batch, before, trainer.dp.summed_clipped_grad_norm()))
        return done

    trainer.dp.clip_and_noise = checked_clip_and_noise  # type: ignore[method-assign]
    result = trainer.train_round(0)
    assert result.dp_steps == 3 and len(seen) == 3
    assert any(batch > 0 for batch, _, _ in seen)
    for batch, before, summed in seen:
        assert all(norm > clip for norm in before), "the test needs gradients above the bound"
        assert summed <= batch * clip * (1 + 1e-3)


def test_dp_sgd_centres_move_but_never_read_the_sites_scans() -> None:
    """DINO without centring collapses, so DP-SGD must centre; but a centre from the site's own
    batches would couple every volume's target to every other volume, outside the clipping."""
    trainer = _dp_trainer()
    trainer.train_round(0)
    for center in (trainer.loss_fn.center, trainer.ibot_loss.center):
        assert torch.count_nonzero(center) > 0 and torch.isfinite(center).all()
    # The losses no longer update their centres from a batch under DP-SGD ...
    before = trainer.loss_fn.center.clone()
    ncrops = trainer.multicrop.num_crops
    trainer.loss_fn(torch.randn(ncrops * 2, MODEL.head_prototypes), torch.randn(4, MODEL.head_prototypes) * 10)
    assert torch.equal(trainer.loss_fn.center, before)
    # ... and the centre step gives the same centres whatever the site holds: sites with other
    # scans, the same teacher and centres, end up with identical centres.
    other = LocalTrainer(MODEL, _train_cfg(), RandomVolumes(seed=99), seed=5, dp=LocalDPConfig())
    other.teacher.load_state_dict(trainer.teacher.state_dict())
    for mine, theirs in ((trainer.loss_fn, other.loss_fn), (trainer.ibot_loss, other.ibot_loss)):
        theirs.center.copy_(mine.center)
    trainer._update_dp_centres(7)
    other._update_dp_centres(7)
    assert torch.equal(trainer.loss_fn.center, other.loss_fn.center)
    assert torch.equal(trainer.ibot_loss.center, other.ibot_loss.center)


# -- site ledger, restarts, budget ----------------------------------------------------------


def _context(state_dir: Path, run_config: dict | None = None) -> Context:
    return Context(
        run_id=7, node_id=1, node_config={"state-dir": str(state_dir)}, state=RecordDict(), run_config=run_config or {}
    )


def _instructions(server_round: int, train: TrainConfig, dp: LocalDPConfig) -> RoundInstructions:
    return RoundInstructions(
        server_round=server_round, model=MODEL, train=train, privacy=PrivacyConfig(mode=PrivacyMode.local, local=dp)
    )


def _site_round(state_dir: Path, context: Context, server_round: int, train: TrainConfig, dp: LocalDPConfig) -> SitePrivacyRound:
    identity = SiteIdentity(site_id="site_a", index=0, cache_dir=state_dir / "no-cache", state_dir=state_dir)
    return SitePrivacyRound(
        identity, context, _instructions(server_round, train, dp), secure_path=False, server_round=server_round
    )


def test_site_epsilon_accumulates_across_rounds_and_a_restart(tmp_path: Path) -> None:
    dp = LocalDPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    train = _train_cfg()
    context = _context(tmp_path)
    epsilons: list[float] = []
    for server_round in (1, 2, 3):
        if server_round == 3:
            context = _context(tmp_path)  # a restarted SuperNode: empty context.state
        site_round = _site_round(tmp_path, context, server_round, train, dp)
        site_round.check_budget(train, num_volumes=NUM_VOLUMES)
        trainer = LocalTrainer(MODEL, train, RandomVolumes(), seed=0, dp=site_round.local_dp)
        result = trainer.train_round(server_round - 1)
        site_round.after_training(result.dp_steps)
        # The site's own epsilon (the reply carries it only where the volume count is shared,
        # tests/integration/test_site_privacy_attacks.py).
        assert site_round.epsilon_after is not None
        epsilons.append(site_round.epsilon_after)
    assert epsilons[0] < epsilons[1] < epsilons[2]

    accountant = RDPAccountant()
    for _ in range(3 * train.local_steps):
        accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=local_sample_rate(train.batch_size, NUM_VOLUMES))
    assert epsilons[2] == pytest.approx(accountant.get_epsilon(dp.delta), rel=1e-9)

    ledger = load_site_ledger(tmp_path)  # what a later process finds on disk
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    assert ledger.epsilon(dp.delta) == pytest.approx(epsilons[2], rel=1e-12)


def test_ledger_copy_with_more_spend_wins_and_a_corrupt_file_is_an_error(tmp_path: Path) -> None:
    from ctfed.client.ledger import save_site_ledger

    entry = LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=0.5, steps=4)
    longer = PrivacyLedger([entry, entry])
    context = _context(tmp_path)
    save_site_ledger(longer, tmp_path, context)
    save_site_ledger(PrivacyLedger([entry]), tmp_path)  # a stale file must not reset the spend
    assert load_site_ledger(tmp_path, context).total_steps == 8
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        load_site_ledger(tmp_path)


def test_budget_refuses_the_round_that_would_cross_it(tmp_path: Path) -> None:
    dp = LocalDPConfig(noise_multiplier=1.1, delta=1e-5)
    train = _train_cfg()
    rate = local_sample_rate(train.batch_size, NUM_VOLUMES)
    after_two = epsilon_for([(dp.noise_multiplier, rate, 2 * train.local_steps)], 1e-5)
    after_three = epsilon_for([(dp.noise_multiplier, rate, 3 * train.local_steps)], 1e-5)
    budget = (after_two + after_three) / 2
    policies = tmp_path / "policies.json"
    write_json_atomic(policies, {"site_a": {"max_epsilon": budget, "delta": 1e-5}})
    context = _context(tmp_path, {SITE_POLICIES_FILE_KEY: str(policies)})
    for server_round in (1, 2):
        site_round = _site_round(tmp_path, context, server_round, train, dp)
        site_round.check_policy()
        site_round.check_budget(train, num_volumes=NUM_VOLUMES)
        site_round.after_training(train.local_steps)
    site_round = _site_round(tmp_path, context, 3, train, dp)
    with pytest.raises(RoundRefused) as refused:
        site_round.check_budget(train, num_volumes=NUM_VOLUMES)
    assert refused.value.code == BUDGET_REFUSED_CODE
    message = str(refused.value)
    assert f"{after_two:.4g}" in message and f"{after_three:.4g}" in message
    assert f"by {after_three - budget:.4g}" in message
    # The refused round spent nothing.
    assert load_site_ledger(tmp_path).epsilon(1e-5) == pytest.approx(after_two)


def test_ledger_serialises_and_matches_opacus() -> None:
    ledger = PrivacyLedger(
        [LedgerEntry(round=1, noise_multiplier=0.8, sample_rate=0.1, steps=10),
         LedgerEntry(round=2, noise_multiplier=1.5, sample_rate=0.2, steps=5, run_id="r")]
    )
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    accountant = RDPAccountant()
    accountant.history = [(0.8, 0.1, 10), (1.5, 0.2, 5)]
    assert ledger.epsilon(1e-6) == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-12)
    with pytest.raises(ValueError):
        PrivacyLedger.from_dict({"entries": []})


# -- central DP -----------------------------------------------------------------------------


def _update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": scale * torch.randn(3, 4, generator=generator), "b": scale * torch.randn(5, generator=generator)}


def _norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def test_clip_update_bounds_norm_and_keeps_direction() -> None:
    update = _update(0, scale=10.0)
    clipped, scale, was_clipped = clip_update(update, 1.5)
    assert was_clipped and scale == pytest.approx(1.5 / _norm(update))
    assert _norm(clipped) <= 1.5 * (1 + 1e-6)
    for name in update:
        cosine = torch.nn.functional.cosine_similarity(clipped[name].flatten(), update[name].flatten(), dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-6)

    small = _update(1, scale=0.01)
    same, scale, was_clipped = clip_update(small, 1.5)
    assert not was_clipped and scale == 1.0
    assert all(torch.equal(same[k], small[k]) for k in small)
    with pytest.raises(ValueError):
        clip_update(small, 0.0)


def test_central_noise_has_the_documented_scale() -> None:
    assert central_noise_std(1.2, 2.0, 4) == pytest.approx(0.6)
    cfg = CentralDPConfig(clip_norm=2.0, noise_multiplier=1.2)
    central = CentralDP(cfg)
    big = {"w": torch.zeros(200_000)}
    noisy, std = central.aggregate([big, big, big, big], server_round=1, sample_rate=1.0)
    assert std == pytest.approx(1.2 * 2.0 / 4)
    assert float(noisy["w"].std()) == pytest.approx(std, rel=0.02)
    assert abs(float(noisy["w"].mean())) < 0.01
    # The mean is uniform: a site's example count plays no part.
    updates = [_update(0), _update(1), _update(2)]
    mean = uniform_mean(updates)
    assert torch.allclose(mean["a"], (updates[0]["a"] + updates[1]["a"] + updates[2]["a"]) / 3)
    unnoised = add_gaussian_noise(mean, 0.0)
    assert torch.equal(unnoised["a"], mean["a"])
    # The coordinator's noise is not reproducible either: two identical rounds differ.
    again, _ = CentralDP(cfg).aggregate([big, big, big, big], server_round=1, sample_rate=1.0)
    assert not torch.equal(noisy["w"], again["w"])


def test_central_accountant_matches_opacus_rdp() -> None:
    cfg = CentralDPConfig(clip_norm=1.0, noise_multiplier=1.3, delta=1e-5)
    central = CentralDP(cfg)
    for server_round in (1, 2, 3):
        central.aggregate([_update(server_round)] * 3, server_round=server_round, sample_rate=0.5)
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.3, sample_rate=0.5)
    assert central.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    # The ledger round-trips, so a resumed coordinator continues the same epsilon.
    resumed = CentralDP(cfg, ledger=PrivacyLedger.from_dict(central.ledger.to_dict()))
    assert resumed.epsilon() == central.epsilon()
    assert central.max_update_norm(100.0) == pytest.approx(1.0001)


def test_rdp_orders_are_opacus_defaults() -> None:
    assert RDP_ORDERS == list(RDPAccountant.DEFAULT_ALPHAS)


def test_site_processes_import_opacus_only_for_dp_rounds() -> None:
    # Every ClientApp message of a deployed site starts a new process; Opacus costs
    # seconds at import, so only a DP-SGD round may load it.
    probe = "import sys, ctfed.client.app, ctfed.server.app; print(sorted(m for m in sys.modules if m.startswith('opacus')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
