"""A site's local training state on disk, so that a resumed federation continues where the
site left off.

What stays at a site between phase-1 rounds (``LocalTrainer.local_state()``: DINO/iBOT
head, MAE decoder, EMA teacher, DINO and iBOT centres, AdamW moments) lives in the node's
``context.state``, which lasts one Flower run. A resumed federation (``ctfed simulate
--resume``, a coordinator restarted on its run folder) is a new Flower run, so the site also
writes that state after every round to its state folder::

    <state dir>/local_state/<federation id>/round_NNNN.pt

and loads it when ``context.state`` holds none and the file is of the round just before the
one asked. The federation id is the coordinator's (``RoundInstructions.federation_id``, one
per run, kept by every resume).

Why the last ``KEPT_ROUNDS`` rounds and not one file: a site writes its state before it
replies, the coordinator checkpoints after it aggregated; a coordinator killed in between
resumes from the round before the one the site already trained. Keeping that round's file
too makes such a resume exact; a resume from further back (an unusable last checkpoint) finds
no file of its round, is logged, and the site starts that state afresh (what every resume
did before). Disk: at most ``KEPT_ROUNDS`` files per federation for the last
``KEPT_FEDERATIONS`` federations (one file is about 1.4 GB at ViT-B), and a federation's
files are removed when its phase 2 starts (that state is of no further use).

Threat model (docs/security.md): the id comes from a coordinator that may be hostile. It
becomes part of a path only after ``check_federation_id`` (exactly 32 lowercase hex digits:
no separator, no dot), so the coordinator can neither write outside the state folder nor
name another federation's folder except by its id, which only that federation's coordinator
and the site know. The file holds tensors, the id and the round: no identifier, and it never
leaves the site. It is read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ctfed.common.exchange import check_federation_id

logger = logging.getLogger(__name__)

LOCAL_STATE_DIR = "local_state"
# Rounds of one federation kept on disk: the last one and the one before (module docstring).
KEPT_ROUNDS = 2
# Federations whose files are kept (the newest by file time, the current one always among
# them): a site taking part in two runs at once keeps both resumable, and an old run's files
# do not pile up.
KEPT_FEDERATIONS = 2
FORMAT = "ctfed-site-local-state/1"
_PREFIX, _SUFFIX = "round_", ".pt"


def federation_dir(state_dir: Path, federation_id: str) -> Path:
    """``<state dir>/local_state/<id>``; ConfigError for an id that is not a federation id."""
    return state_dir / LOCAL_STATE_DIR / check_federation_id(federation_id)


def state_file(state_dir: Path, federation_id: str, server_round: int) -> Path:
    """The file holding the local state after ``server_round`` of that federation."""
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise ValueError(f"a local state belongs to a round >= 1, not {server_round!r}")
    return federation_dir(state_dir, federation_id) / f"{_PREFIX}{server_round:04d}{_SUFFIX}"


def saved_rounds(state_dir: Path, federation_id: str) -> list[int]:
    """The rounds of that federation whose local state is on disk, oldest first."""
    folder = federation_dir(state_dir, federation_id)
    rounds = []
    for path in folder.glob(f"{_PREFIX}*{_SUFFIX}") if folder.is_dir() else []:
        digits = path.name[len(_PREFIX) : -len(_SUFFIX)]
        if digits.isdigit():
            rounds.append(int(digits))
    return sorted(rounds)


def save_local_state(
    state_dir: Path, federation_id: str, server_round: int, state: Mapping[str, torch.Tensor]
) -> Path:
    """Write the state after ``server_round`` atomically (a reader sees the old file or the
    whole new one); then only it and the round before stay on disk for that federation."""
    path = state_file(state_dir, federation_id, server_round)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Rounds other than this one's predecessor go first, so a write needs room for two files, not three.
    for old in saved_rounds(state_dir, federation_id):
        if old != server_round - 1 and old != server_round:
            state_file(state_dir, federation_id, old).unlink(missing_ok=True)
    tmp = folder / f".{path.name}.tmp"
    payload = {
        "format": FORMAT,
        "federation_id": federation_id,
        "round": server_round,
        "state": {name: tensor.detach().cpu() for name, tensor in state.items()},
    }
    try:
        with tmp.open("wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _keep_recent_federations(state_dir, federation_id)
    return path


def load_local_state(
    state_dir: Path, federation_id: str, server_round: int, site_id: str
) -> dict[str, torch.Tensor] | None:
    """The local state saved after round ``server_round - 1`` of that federation; None, with
    the reason logged, when there is none or it is unusable (the site then starts it afresh)."""
    wanted = server_round - 1
    if wanted < 1:
        return None  # round 1 of a federation: nothing before it
    path = state_file(state_dir, federation_id, wanted)
    short = federation_id[:8]
    if not path.is_file():
        others = saved_rounds(state_dir, federation_id)
        held = f"it holds rounds {others} of it" if others else "it holds none of it"
        logger.warning(
            "site %s round %d: no local training state of round %d of federation %s on disk (%s); "
            "the head, teacher, centres and optimiser start afresh",
            site_id, server_round, wanted, short, held,
        )
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if payload.get("federation_id") != federation_id or payload.get("round") != wanted:
            raise ValueError(
                f"it records federation {str(payload.get('federation_id'))[:8]} round {payload.get('round')!r}"
            )
        state = payload["state"]
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError("its state is not a dict of tensors")
    except Exception as err:  # noqa: BLE001 - any unreadable file: logged, the site starts afresh
        logger.warning(
            "site %s round %d: the local training state %s is unusable (%s); it starts afresh",
            site_id, server_round, path.name, err,
        )
        return None
    logger.info(
        "site %s round %d: resumed its local training state of round %d of federation %s from disk",
        site_id, server_round, wanted, short,
    )
    return state


def discard_local_state(state_dir: Path, federation_id: str) -> None:
    """Remove that federation's files (phase 2 has begun: the SSL state is of no further use)."""
    folder = federation_dir(state_dir, federation_id)
    if folder.is_dir():
        shutil.rmtree(folder)


def _keep_recent_federations(state_dir: Path, current: str) -> None:
    """Remove the files of all but the ``KEPT_FEDERATIONS`` most recently written federations
    (the current one always kept); folders that are not federation ids are left alone."""
    root = state_dir / LOCAL_STATE_DIR
    others = []
    for folder in root.iterdir():
        if folder.name == current or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            check_federation_id(folder.name, source="a folder name")
        except ValueError:
            continue
        others.append((folder.stat().st_mtime, folder))
    for _, folder in sorted(others, reverse=True)[KEPT_FEDERATIONS - 1 :]:
        logger.info("removing the local training state of an older federation %s", folder.name[:8])
        shutil.rmtree(folder)
