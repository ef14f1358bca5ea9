"""Local DP's privacy unit: one volume must be one person, or the guarantee is per scan.

DP-SGD clips and samples per *volume*, so its epsilon bounds what the update reveals about
one volume. A patient with several volumes in the cache (several studies, or
``preprocess.series_selection.per_study=all``) is several units, and by group privacy gets
up to that many times the epsilon. The site therefore refuses local DP on a cache where one
person has more than one volume, instead of reporting an epsilon it does not deliver.

Who a volume belongs to, from its manifest entry (``common/preprocess.py``), entry by entry:

* ``patient_key`` (HMAC of the PatientID under the cache's site secret), when the entry has
  one: ``ctfed prepare`` writes it for every DICOM series with a non-empty PatientID;
* otherwise ``study_key`` (the pseudonym of its study): a series without a PatientID, a NIfTI
  file, or a cache prepared before patient pseudonyms (re-running ``prepare`` adds them
  without reprocessing). For such a volume one volume per *study* is what is checked; a
  patient without a PatientID in several studies is still several units, and the site logs
  how many volumes that concerns every DP round.

Both are checked: at most one volume per patient pseudonym, and at most one per study
pseudonym (a study is one patient's, whatever its entries say). An entry with neither is
refused: nothing would tie its volumes together. The error gives counts only, never a key.

A site whose policy says ``local_dp_repeat_volumes: one_per_person`` trains such a round on
``one_volume_per_person`` instead: each person's contribution is then one volume, so the
guarantee is per person again. Which volume is kept depends on that person's own volumes only
(the first by content hash), so adding or removing one person changes no one else's choice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

PATIENT_FIELD = "patient_key"
STUDY_FIELD = "study_key"


class PrivacyUnitViolation(RuntimeError):
    """The cache holds several volumes of one person; the message gives the counts."""


@dataclass(frozen=True)
class PrivacyUnits:
    """How the cache's volumes were attributed: by patient pseudonym, or by study only."""

    by_patient: int
    by_study: int


def privacy_unit_field(entry: Mapping[str, Any]) -> str:
    """The manifest field that names this volume's person: its patient pseudonym if it has one."""
    return PATIENT_FIELD if entry.get(PATIENT_FIELD) else STUDY_FIELD


def check_one_volume_per_person(entries: Sequence[Mapping[str, Any]]) -> PrivacyUnits:
    """Raise PrivacyUnitViolation unless every person has at most one volume; returns how
    many volumes were attributed by patient and how many by study only."""
    unattributed = sum(1 for entry in entries if not entry.get(privacy_unit_field(entry)))
    if unattributed:
        raise PrivacyUnitViolation(
            f"local DP: {unattributed} of {len(entries)} cached volumes have no {PATIENT_FIELD} or {STUDY_FIELD}, "
            "so the site cannot tell whose they are; re-run ctfed prepare"
        )
    # A study is one patient's, so both must hold: one volume per patient pseudonym (where
    # entries have one) and one volume per study pseudonym (every entry that has one).
    for field, person in ((PATIENT_FIELD, "patient"), (STUDY_FIELD, "study")):
        per_person = Counter(str(entry[field]) for entry in entries if entry.get(field))
        shared = [count for count in per_person.values() if count > 1]
        if shared:
            raise PrivacyUnitViolation(
                f"local DP protects one volume, but {len(shared)} {person} pseudonyms have more than one volume in "
                f"this cache (up to {max(shared)} for one; {len(entries)} volumes, {len(per_person)} {person} "
                f"pseudonyms), so each of those would get up to {max(shared)}x the epsilon; prepare the cache with "
                "one series per study (preprocess.series_selection.per_study=one) and one study per patient"
            )
    by_patient = sum(1 for entry in entries if privacy_unit_field(entry) == PATIENT_FIELD)
    return PrivacyUnits(by_patient=by_patient, by_study=len(entries) - by_patient)


def one_volume_per_person(entries: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the entries to train on under local DP: per person (patient pseudonym, else
    study pseudonym) the first by content hash, never two of one study; in index order. Entries
    with neither pseudonym are left out (``check_one_volume_per_person`` refuses them)."""
    taken: set[tuple[str, str]] = set()
    keep = []
    order = sorted(range(len(entries)), key=lambda i: (str(entries[i].get("content_hash", "")), i))
    for index in order:
        entry = entries[index]
        units = {(field, str(entry[field])) for field in (PATIENT_FIELD, STUDY_FIELD) if entry.get(field)}
        if units and not units & taken:
            taken |= units
            keep.append(index)
    return sorted(keep)
