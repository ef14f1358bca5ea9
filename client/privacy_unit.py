"""Local DP's privacy unit: one volume must be one person, or the guarantee is per scan.

DP-SGD clips and samples per *volume*, so its epsilon bounds what the update reveals about
one volume. A patient with several volumes in the cache (several studies, or
``preprocess.series_selection.per_study=all``) is several units, and by group privacy gets
up to that many times the epsilon. The site therefore refuses local DP on a cache where one
person has more than one volume, instead of reporting an epsilon it does not deliver.

Who a volume belongs to, from its manifest entry (``common/preprocess.py``):

* ``patient_key`` (a salted pseudonym of the patient), when the cache records one;
* otherwise ``study_key`` (the pseudonym of its study): the best the manifest knows today.
  Then one volume per *study* is enforced, and a patient with several studies is still
  several units; docs/security.md says so, and the site logs it every DP round.

An entry with neither is refused: nothing would tie its volumes together. The error gives
counts only, never a key.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

PATIENT_FIELD = "patient_key"
STUDY_FIELD = "study_key"


class PrivacyUnitViolation(RuntimeError):
    """The cache holds several volumes of one person; the message gives the counts."""


def privacy_unit_field(entries: Sequence[Mapping[str, Any]]) -> str:
    """The manifest field that names a volume's person: patient pseudonym if every entry has one."""
    if entries and all(entry.get(PATIENT_FIELD) for entry in entries):
        return PATIENT_FIELD
    return STUDY_FIELD


def check_one_volume_per_person(entries: Sequence[Mapping[str, Any]]) -> str:
    """Raise PrivacyUnitViolation unless every person has at most one volume; returns the field used."""
    field = privacy_unit_field(entries)
    unattributed = sum(1 for entry in entries if not entry.get(field))
    if unattributed:
        raise PrivacyUnitViolation(
            f"local DP: {unattributed} of {len(entries)} cached volumes have no {PATIENT_FIELD} or {STUDY_FIELD}, "
            "so the site cannot tell whose they are; re-run ctfed prepare"
        )
    per_person = Counter(str(entry[field]) for entry in entries)
    shared = [count for count in per_person.values() if count > 1]
    if shared:
        person = "patient" if field == PATIENT_FIELD else "study"
        raise PrivacyUnitViolation(
            f"local DP protects one volume, but {len(shared)} {person} pseudonyms have more than one volume in "
            f"this cache (up to {max(shared)} for one; {len(entries)} volumes, {len(per_person)} {person} "
            f"pseudonyms), so each of those would get up to {max(shared)}x the epsilon; prepare the cache with "
            "one series per study (preprocess.series_selection.per_study=one) and one study per patient"
        )
    return field
