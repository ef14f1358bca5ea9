"""A hospital's own rules for what its site takes part in, checked before any data is read.

The policy is the site IT's (``policy:`` in ``site.yaml``), never the coordinator's: the
coordinator can only describe a round in its instructions, and the site declines a round
that its policy does not allow. The ClientApp calls ``check_instructions`` first, before it
opens the cache, so a refused round has touched nothing.

Where a node finds its policy:

* deployed: ``ctfed site`` writes the policy from site.yaml to ``<state dir>/policy.json``
  and names it in the node config as ``policy-file``;
* simulation: ``ctfed simulate`` writes ``<run dir>/sites/policies.json`` (site id ->
  policy, from ``simulation.site_policy`` / ``simulation.site_policies``) and names it in
  the run config as ``site-policies-file``;
* neither: the permissive default ``SitePolicy()``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from ctfed.common.config import ConfigError, PrivacyMode, SitePolicy, to_section
from ctfed.common.exchange import (
    FINETUNE_PHASE,
    MIN_SITES_KEY,
    PLAN_LOCAL_STEPS_KEY,
    SECURE_AGGREGATION_KEY,
    RoundInstructions,
)

POLICY_FILE_KEY = "policy-file"  # node config (deployed site)
SITE_POLICIES_FILE_KEY = "site-policies-file"  # run config (simulation)
POLICY_FILE = "policy.json"
DEFAULT_POLICY_ENTRY = "*"  # in a site-policies file: the policy of sites not named


class PolicyViolation(RuntimeError):
    """Round instructions the site's policy does not allow; the message lists every reason."""


def check_instructions(policy: SitePolicy, instructions: RoundInstructions, *, secure_path: bool) -> None:
    """Raise PolicyViolation unless ``policy`` allows the round ``instructions`` describe.

    ``secure_path`` is the protocol path the message arrived on (True: stage (a) of secure
    aggregation, which keeps the update at the site and sends it masked only; False: the
    plain ``train`` handler, which replies the update in clear). It is the site's own
    fact, never the instructions' ``secure_aggregation`` claim: a coordinator could set
    that flag on a plain message and collect a clear update.

    A key the instructions leave out counts against the round (RoundInstructions'
    defaults: min_sites 1, no differential privacy). Every violated rule is named.
    """
    model, train, privacy, phase = instructions.model, instructions.train, instructions.privacy, instructions.phase
    claims_secure, min_sites = instructions.secure_aggregation, instructions.min_sites

    reasons: list[str] = []
    if phase not in policy.allowed_phases:
        reasons.append(f"phase '{phase}' is not in policy.allowed_phases {list(policy.allowed_phases)}")
    if claims_secure and not secure_path:
        # No honest coordinator does this: its secure rounds use the secagg stages.
        reasons.append(
            f"the instructions say {SECURE_AGGREGATION_KEY}=true, but this message came on the plain "
            "train path, which would send the update in clear"
        )
    if policy.require_secure_aggregation and not secure_path:
        reasons.append(
            "policy.require_secure_aggregation is set but this message came on the plain train path "
            "(the update would leave the site in clear)"
        )
    if min_sites < policy.min_sites:
        reasons.append(
            f"the coordinator may aggregate as few as {min_sites} sites ({MIN_SITES_KEY}); "
            f"policy.min_sites is {policy.min_sites}"
        )
    if policy.require_dp and privacy.mode is PrivacyMode.none:
        reasons.append("policy.require_dp is set but this round has no differential privacy (privacy.mode=none)")
    for budget in ("max_epsilon", "max_round_epsilon"):
        if getattr(policy, budget) > 0 and privacy.mode is PrivacyMode.none:
            # The site accounts its own epsilon for local and central DP; without DP there
            # is no epsilon to keep within a budget.
            reasons.append(
                f"policy.{budget}={getattr(policy, budget):g} is a privacy budget, "
                f"but this round uses privacy.mode={privacy.mode.value}"
            )
    if policy.require_site_noise and privacy.mode is PrivacyMode.central:
        reasons.append(
            "policy.require_site_noise is set but this round uses privacy.mode=central, whose noise the coordinator "
            "adds after seeing the clipped sum; use privacy.mode=distributed (or local)"
        )
    if privacy.mode is PrivacyMode.distributed and not secure_path:
        # Its noise is added under the masks (client/secagg.py): a plain reply would carry none.
        reasons.append(
            "privacy.mode=distributed adds the site's noise under secure aggregation, but this message came on "
            "the plain train path (the update would leave the site in clear, without noise)"
        )
    if privacy.mode is not PrivacyMode.none:
        # The numbers the site's own accounting (client/privacy_round.py) will use.
        dp = getattr(privacy, privacy.mode.value)
        section = f"privacy.{privacy.mode.value}"
        counted = dp.noise_multiplier
        if privacy.mode is PrivacyMode.distributed:  # the noise of the sites it counts on, its own included
            counted *= policy.distributed_dp_honest_sites**0.5
        if policy.min_noise_multiplier and counted < policy.min_noise_multiplier:
            reasons.append(
                f"{section}.noise_multiplier={dp.noise_multiplier:g} is below "
                f"policy.min_noise_multiplier={policy.min_noise_multiplier:g}"
                + (f" (counted over policy.distributed_dp_honest_sites={policy.distributed_dp_honest_sites}: {counted:.4g})"
                   if privacy.mode is PrivacyMode.distributed else "")
            )
        if policy.max_delta and dp.delta > policy.max_delta:
            reasons.append(f"{section}.delta={dp.delta:g} exceeds policy.max_delta={policy.max_delta:g}")
    # Phase 2 trains its own number of steps per round (the plan's), not train.local_steps.
    # A step of train.accumulation_steps micro-batches costs that many: they count as steps here.
    steps_key = PLAN_LOCAL_STEPS_KEY if phase == FINETUNE_PHASE else "train.local_steps x train.accumulation_steps"
    steps = instructions.plan_local_steps if phase == FINETUNE_PHASE else train.local_steps * train.accumulation_steps
    if policy.max_local_steps and steps > policy.max_local_steps:
        reasons.append(f"{steps_key}={steps} exceeds policy.max_local_steps={policy.max_local_steps}")
    if policy.allowed_models and model.name not in policy.allowed_models:
        reasons.append(f"model '{model.name}' is not in policy.allowed_models {list(policy.allowed_models)}")
    if policy.max_hidden_size and model.hidden_size > policy.max_hidden_size:
        reasons.append(
            f"model.hidden_size={model.hidden_size} exceeds policy.max_hidden_size={policy.max_hidden_size}"
        )
    if policy.max_layers and model.num_layers > policy.max_layers:
        reasons.append(f"model.num_layers={model.num_layers} exceeds policy.max_layers={policy.max_layers}")
    if reasons:
        raise PolicyViolation("policy: " + "; ".join(reasons))


def policy_to_dict(policy: SitePolicy) -> dict[str, Any]:
    return {key: value for key, value in asdict(policy).items() if key in SitePolicy.__dataclass_fields__}


def policy_from_dict(values: Mapping[str, Any], where: str) -> SitePolicy:
    try:
        return to_section(SitePolicy, dict(values))
    except ConfigError as err:
        raise ConfigError(f"site policy in {where}: {err}") from None


def write_policy_file(policy: SitePolicy, state_dir: Path) -> Path:
    """Write a deployed site's policy for its ClientApp; returns the file's path."""
    from ctfed.common.fileio import write_json_atomic

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / POLICY_FILE
    write_json_atomic(path, policy_to_dict(policy))
    return path


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid JSON: {err}") from None


def load_site_policy(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], site_id: str
) -> SitePolicy:
    """This node's policy (see the module docstring); ConfigError if a named file is bad."""
    policy_file = str(node_config.get(POLICY_FILE_KEY, ""))
    if policy_file:
        return policy_from_dict(_read_json(Path(policy_file), "site policy file"), policy_file)
    policies_file = str(run_config.get(SITE_POLICIES_FILE_KEY, ""))
    if policies_file:
        table = _read_json(Path(policies_file), "site policies file")
        entry = table.get(site_id, table.get(DEFAULT_POLICY_ENTRY, {}))
        return policy_from_dict(entry, f"{policies_file} [{site_id}]")
    return SitePolicy()
