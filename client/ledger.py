"""A site's privacy ledgers: its DP history, kept across rounds and restarts.

One ledger per DP mode, because their epsilons protect different units and do not compose:
local DP-SGD (``privacy_ledger.json``: noise, sample rate, steps of every round; a volume
is the unit), central DP (``central_privacy_ledger.json``: one sampled Gaussian per
round the site took part in; its whole update is the unit) and distributed DP
(``distributed_privacy_ledger.json``: one Skellam mechanism per round, its whole update the
unit, with the noise of the sites its policy counts on). The site writes each itself
from the round's parameters and its own data; nothing the coordinator reports enters them.

Each ledger lives in two places: ``<state dir>/<file>`` (survives a SuperNode restart;
written atomically) and the node's ``context.state`` (survives between rounds of one
SuperNode). On load the one with the larger spend wins, so a lost or stale copy can only
make the site more careful, never reset its epsilon.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context

from ctfed.common.config import CentralDPConfig, DistributedDPConfig, LocalDPConfig, PrivacyMode, TrainConfig
from ctfed.common.dp import SKELLAM, LedgerEntry, PrivacyLedger

LEDGER_FILE = "privacy_ledger.json"  # local DP-SGD
LEDGER_STATE_KEY = "privacy-ledger"
CENTRAL_LEDGER_FILE = "central_privacy_ledger.json"
CENTRAL_LEDGER_STATE_KEY = "central-privacy-ledger"
DISTRIBUTED_LEDGER_FILE = "distributed_privacy_ledger.json"
DISTRIBUTED_LEDGER_STATE_KEY = "distributed-privacy-ledger"
# (file, context.state key) of each mode's ledger.
_LEDGERS = {
    PrivacyMode.local: (LEDGER_FILE, LEDGER_STATE_KEY),
    PrivacyMode.central: (CENTRAL_LEDGER_FILE, CENTRAL_LEDGER_STATE_KEY),
    PrivacyMode.distributed: (DISTRIBUTED_LEDGER_FILE, DISTRIBUTED_LEDGER_STATE_KEY),
}
# A site cannot verify how the coordinator samples sites, and it was asked: no
# amplification by sampling is credited to central rounds.
CENTRAL_SITE_SAMPLE_RATE = 1.0
_LEDGER_JSON = "json"
# Compare copies at this delta; any fixed delta orders histories the same way in practice.
_COMPARE_DELTA = 1e-5


def _state_key(mode: PrivacyMode) -> str:
    return _LEDGERS[mode][1]


def ledger_path(state_dir: Path, mode: PrivacyMode = PrivacyMode.local) -> Path:
    if mode is PrivacyMode.none:
        raise ValueError("privacy.mode=none keeps no ledger")
    return state_dir / _LEDGERS[mode][0]


def load_site_ledger(
    state_dir: Path, context: Context | None = None, mode: PrivacyMode = PrivacyMode.local
) -> PrivacyLedger:
    """The site's ledger of ``mode``: the file's copy or the in-memory one, whichever spent more."""
    from_file = PrivacyLedger.load(ledger_path(state_dir, mode))
    key = _state_key(mode)
    if context is None or key not in context.state:
        return from_file
    from_state = PrivacyLedger.from_json(str(context.state[key][_LEDGER_JSON]))
    if from_state.total_steps > from_file.total_steps or (
        from_state.total_steps == from_file.total_steps
        and from_state.epsilon(_COMPARE_DELTA) > from_file.epsilon(_COMPARE_DELTA)
    ):
        return from_state
    return from_file


def save_site_ledger(
    ledger: PrivacyLedger, state_dir: Path, context: Context | None = None, mode: PrivacyMode = PrivacyMode.local
) -> None:
    ledger.save(ledger_path(state_dir, mode))
    if context is not None:
        context.state[_state_key(mode)] = ConfigRecord({_LEDGER_JSON: ledger.to_json()})


def local_sample_rate(batch_size: int, num_volumes: int) -> float:
    """Poisson sampling rate of DP-SGD: each volume joins a step's batch with this chance."""
    if num_volumes < 1:
        raise ValueError("the site has no volumes")
    return min(1.0, batch_size / num_volumes)


def planned_local_entry(
    dp: LocalDPConfig, train: TrainConfig, num_volumes: int, server_round: int, run_id: str = ""
) -> LedgerEntry:
    """What one round of local DP-SGD will add to the ledger (known before any data is read)."""
    return LedgerEntry(
        round=server_round,
        noise_multiplier=dp.noise_multiplier,
        sample_rate=local_sample_rate(train.batch_size, num_volumes),
        steps=train.local_steps,
        run_id=run_id,
    )



def planned_central_entry(dp: CentralDPConfig, server_round: int, run_id: str = "") -> LedgerEntry:
    """What one central-DP round adds to the site's own ledger: one Gaussian mechanism on the
    uniform mean, noise ``dp.noise_multiplier`` times the sensitivity, at sample rate 1."""
    return LedgerEntry(
        round=server_round, noise_multiplier=dp.noise_multiplier, sample_rate=CENTRAL_SITE_SAMPLE_RATE,
        steps=1, run_id=run_id,
    )


def planned_distributed_entry(dp: DistributedDPConfig, honest_sites: int, server_round: int, run_id: str = "") -> LedgerEntry:
    """What one distributed-DP round adds to the site's own ledger: one Skellam mechanism on the
    sum, with the noise of ``honest_sites`` sites like its own (its policy's count, never the
    coordinator's): multiplier ``dp.noise_multiplier x sqrt(honest_sites)``, and the L2
    sensitivity's floor of ``dp.granularity`` grid steps (``common.dp.skellam_rdp``), at
    sample rate 1 (no amplification by a sampling the site cannot check)."""
    return LedgerEntry(
        round=server_round, noise_multiplier=dp.noise_multiplier * honest_sites**0.5, sample_rate=1.0, steps=1,
        run_id=run_id, mechanism=SKELLAM, l2_sensitivity=float(dp.granularity),
    )
