"""A site's privacy ledger: its local DP-SGD history, kept across rounds and restarts.

The ledger lives in two places: ``<state dir>/privacy_ledger.json`` (survives a SuperNode
restart; written atomically) and the node's ``context.state`` (survives between rounds of
one SuperNode). On load the one with the larger spend wins, so a lost or stale copy can
only make the site more careful, never reset its epsilon.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context

from ctfed.common.config import LocalDPConfig, TrainConfig
from ctfed.common.dp import LedgerEntry, PrivacyLedger

LEDGER_FILE = "privacy_ledger.json"
LEDGER_STATE_KEY = "privacy-ledger"
_LEDGER_JSON = "json"
# Compare copies at this delta; any fixed delta orders histories the same way in practice.
_COMPARE_DELTA = 1e-5


def ledger_path(state_dir: Path) -> Path:
    return state_dir / LEDGER_FILE


def load_site_ledger(state_dir: Path, context: Context | None = None) -> PrivacyLedger:
    """The site's ledger: the file's copy or the in-memory one, whichever spent more."""
    from_file = PrivacyLedger.load(ledger_path(state_dir))
    if context is None or LEDGER_STATE_KEY not in context.state:
        return from_file
    from_state = PrivacyLedger.from_json(str(context.state[LEDGER_STATE_KEY][_LEDGER_JSON]))
    if from_state.total_steps > from_file.total_steps or (
        from_state.total_steps == from_file.total_steps
        and from_state.epsilon(_COMPARE_DELTA) > from_file.epsilon(_COMPARE_DELTA)
    ):
        return from_state
    return from_file


def save_site_ledger(ledger: PrivacyLedger, state_dir: Path, context: Context | None = None) -> None:
    ledger.save(ledger_path(state_dir))
    if context is not None:
        context.state[LEDGER_STATE_KEY] = ConfigRecord({_LEDGER_JSON: ledger.to_json()})


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

