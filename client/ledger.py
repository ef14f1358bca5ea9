"""A site's privacy ledgers: its DP history, kept across rounds and restarts.

One ledger per DP mode, because their epsilons protect different units and do not compose:
local DP-SGD (``privacy_ledger.json``: noise, sample rate, steps of every round; a volume
is the unit) and central DP (``central_privacy_ledger.json``: one sampled Gaussian per
round the site took part in; its whole update is the unit). The site writes both itself
from the round's parameters and its own data; nothing the coordinator reports enters them.

Each ledger lives in two places: ``<state dir>/<file>`` (survives a SuperNode restart;
written atomically) and the node's ``context.state`` (survives between rounds of one
SuperNode). On load the one with the larger spend wins, so a lost or stale copy can only
make the site more careful, never reset its epsilon.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context

from ctfed.common.config import CentralDPConfig, LocalDPConfig, PrivacyMode, TrainConfig
from ctfed.common.dp import LedgerEntry, PrivacyLedger

LEDGER_FILE = "privacy_ledger.json"  # local DP-SGD
LEDGER_STATE_KEY = "privacy-ledger"
CENTRAL_LEDGER_FILE = "central_privacy_ledger.json"
CENTRAL_LEDGER_STATE_KEY = "central-privacy-ledger"
# A site cannot verify how the coordinator samples sites, and it was asked: no
# amplification by sampling is credited to central rounds.
CENTRAL_SITE_SAMPLE_RATE = 1.0
_LEDGER_JSON = "json"
# Compare copies at this delta; any fixed delta orders histories the same way in practice.
_COMPARE_DELTA = 1e-5


def _state_key(mode: PrivacyMode) -> str:
    return CENTRAL_LEDGER_STATE_KEY if mode is PrivacyMode.central else LEDGER_STATE_KEY


def ledger_path(state_dir: Path, mode: PrivacyMode = PrivacyMode.local) -> Path:
    if mode is PrivacyMode.none:
        raise ValueError("privacy.mode=none keeps no ledger")
    return state_dir / (CENTRAL_LEDGER_FILE if mode is PrivacyMode.central else LEDGER_FILE)


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
