"""A site's side of secure aggregation: one handler per protocol stage.

(a) ``secagg_train``: train as on the plain path (the ClientApp's own train handler),
    check the delta locally (finite, norm), keep it in ``context.state``, reply the
    metrics and a *signed advertisement*: two fresh public keys (pk1: pairwise masks,
    pk2: encrypting shares), the site id, and SHA-256s of the model and instructions it
    received, signed with the site's long-term Ed25519 key for this run, round and node.
(b) ``secagg_share_keys``: check the coordinator's threshold and neighbourhood size
    against this site's floors (``SitePolicy``), verify every neighbour's advertisement
    against the roster pinned at the hospital, check that every neighbour received the
    same model and instructions, then Shamir-share a fresh self-mask seed and the pairwise
    secret key sk1, each share encrypted for its neighbour (ECDH on sk2/pk2 + Fernet).
(c) ``secagg_masked_input``: receive the shares addressed to us, reply
    ``weight * quantise(delta) + self mask +- pairwise masks`` modulo 2**bits.
(d) ``secagg_consistency``: sign the survivor set the coordinator announces (Bonawitz et
    al. 2017), after checking it against our neighbourhood and floors.
(e) ``secagg_unmask``: only with at least ``threshold`` valid roster signatures from our
    neighbours over exactly the survivor set we signed: for each neighbour in it, our share
    of its self-mask seed; for each one we masked with that is not, our share of its sk1.
    Never both for one neighbour.

Which roster entry a Flower node id is: the node ids are the coordinator's to assign, so a
site never trusts a node id -> site mapping it is told. Each advertisement names its
site id and node id, and the signature (by that site's roster key) binds the two for this
run and round; a site learns its neighbours' site ids only from advertisements it has
verified, and checks consistency signatures against those sites' keys. Any check that fails
ends the round at this site with a ``ProtocolViolation`` naming the reason (logged, and in
the ClientApp audited as ``secagg-abort``); nothing is revealed after it.

The coordinator can no longer vet a single site's update, so the site does: a non-finite
or oversized delta is refused here, before anything is masked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, cast

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from ctfed.client.audit import AUDIT_FILE, KIND_SECAGG_PREFIX, AuditLog, secagg_share_lists
from ctfed.client.finetune_round import CLASSIFIER_BASE_KEY
from ctfed.client.monitor_round import drop_held, release_held
from ctfed.client.policy import load_site_policy
from ctfed.client.site import DATA_PATH_KEY, PARTITION_ID_KEY, SITE_ID_KEY, identify_site
from ctfed.common import secagg as sa
from ctfed.common.certs import ROSTER_FILE, load_roster, load_signing_key, signing_public_line
from ctfed.common.config import ConfigError, SitePolicy
from ctfed.common.dp import POISSON_MAX_MEAN, SecureRandom
from ctfed.common.exchange import (
    ARRAYS_KEY,
    BASE_DIGEST_KEY,
    CONFIG_KEY,
    FINETUNE_PHASE,
    FULL_STATE_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PHASE_KEY,
    PRETRAIN_PHASE,
    UpdateRejected,
    record_to_state,
    update_norm,
)

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


class ProtocolViolation(RuntimeError):
    """The coordinator asked for something the protocol forbids; the site stops this round."""


# Where a site finds its signing key and roster (see ``load_site_auth``).
SIGNING_KEY_KEY = "secagg-signing-key"  # node config: the site's Ed25519 key file
ROSTER_KEY = "secagg-roster"  # node config: the roster pinned at the site
SIGNING_KEYS_DIR_KEY = "secagg-keys-dir"  # run config, Flower simulation engine nodes only

# Fields of the site's state record (STATE_KEY).
_ROUND, _STAGE, _NODE = "round", "stage", "node-id"
_SK1, _PK1, _SK2, _PK2, _SEED = "sk1", "pk1", "sk2", "pk2", "seed"
_NUM_EXAMPLES = "num-examples"
_SITE_ID, _MODEL_HASH, _INSTRUCTIONS_HASH = "site-id", "model-sha256", "instructions-sha256"
_NEIGHBOURS, _N_PK1, _N_PK2, _N_SITES = "neighbours", "neighbour-pk1", "neighbour-pk2", "neighbour-sites"
_SEED_SHARE_OWNERS, _SEED_SHARES, _SK1_SHARES = "share-owners", "seed-shares", "sk1-shares"
_MASKED_WITH = "masked-with"
_SURVIVORS = "survivors"
_PARAM_FIELDS = (sa.P_CLIPPING, sa.P_QUANTIZATION, sa.P_MODULUS_BITS, sa.P_MAX_WEIGHT, sa.P_MAX_NORM)
# Instructions that legitimately differ between sites in one round (phase 2: whether a site
# gets the whole classifier or only its trainable part); the model hash covers the result.
_PER_SITE_INSTRUCTIONS = frozenset({FULL_STATE_KEY, BASE_DIGEST_KEY})


@dataclass(frozen=True)
class SiteAuth:
    """This site's signing identity and the federation roster pinned at it."""

    site_id: str
    signing_key: Ed25519PrivateKey
    roster: dict[str, Ed25519PublicKey]

    def verify(self, site_id: str, signature: bytes, message: bytes) -> bool:
        try:
            self.roster[site_id].verify(signature, message)
        except InvalidSignature:
            return False
        return True


def load_site_auth(context: Context) -> SiteAuth:
    """The site's signing key and roster, from its own configuration only.

    A deployed site (and an in-process one) names both files in its node config, which the
    hospital sets (``ctfed site``: ``site.signing_key``, ``site.roster``). A node of Flower's
    simulation engine (``partition-id``, no ``data-path``), where one machine plays every
    party anyway, finds them in the run config's ``secagg-keys-dir`` (``ctfed simulate``
    generates them); a deployed site never reads keys from the run config, which the
    coordinator writes. Raises ProtocolViolation if the site cannot authenticate.
    """
    node_config, run_config = context.node_config, context.run_config
    key_file, roster_file = str(node_config.get(SIGNING_KEY_KEY, "")), str(node_config.get(ROSTER_KEY, ""))
    simulated = DATA_PATH_KEY not in node_config and PARTITION_ID_KEY in node_config
    try:
        site_id = str(node_config.get(SITE_ID_KEY) or identify_site(context).site_id)
        if simulated and not key_file and run_config.get(SIGNING_KEYS_DIR_KEY):
            keys_dir = Path(str(run_config[SIGNING_KEYS_DIR_KEY]))
            key_file, roster_file = str(keys_dir / f"{site_id}.key"), str(keys_dir / ROSTER_FILE)
        if not key_file or not roster_file:
            raise ProtocolViolation(
                "this site has no signing key and roster (site.signing_key, site.roster): it cannot verify its "
                "neighbours, so it takes no part in secure aggregation"
            )
        key, roster = load_signing_key(Path(key_file)), load_roster(Path(roster_file))
    except ConfigError as err:
        raise ProtocolViolation(f"secure aggregation keys: {err}") from None
    if site_id not in roster or signing_public_line(roster[site_id]) != signing_public_line(key):
        raise ProtocolViolation(f"the roster {roster_file} does not list this site ('{site_id}') under its signing key")
    return SiteAuth(site_id, key, roster)


def _policy(context: Context, site_id: str) -> SitePolicy:
    try:
        return load_site_policy(context.node_config, context.run_config, site_id)
    except ConfigError as err:
        raise ProtocolViolation(f"site policy: {err}") from None


def _model_hash(msg: Message, context: Context) -> str:
    """SHA-256 of the model this site trained from, identical at every site of the round.
    Phase 2 may send a site only the trainable part, which it lays over the classifier it
    holds (client/finetune_round.py keeps a received whole one as that base)."""
    records = [msg.content[ARRAYS_KEY]]
    instructions = msg.content[CONFIG_KEY]
    if str(instructions.get(PHASE_KEY, PRETRAIN_PHASE)) == FINETUNE_PHASE and CLASSIFIER_BASE_KEY in context.state:
        records.insert(0, context.state[CLASSIFIER_BASE_KEY])
    return sa.arrays_sha256(records)


def _instructions_hash(msg: Message) -> str:
    return sa.instructions_sha256([msg.content[CONFIG_KEY], msg.content[sa.PARAMS_KEY]], exclude=_PER_SITE_INSTRUCTIONS)


def _state(context: Context, expected_stage: str, server_round: int) -> ConfigRecord:
    if sa.STATE_KEY not in context.state:
        raise ProtocolViolation(f"no secure aggregation in progress (asked for the stage after {expected_stage})")
    state = context.state[sa.STATE_KEY]
    if state[_STAGE] != expected_stage or int(state[_ROUND]) != server_round:
        raise ProtocolViolation(
            f"out of order: at stage {state[_STAGE]} of round {state[_ROUND]}, asked for the stage after "
            f"{expected_stage} of round {server_round}"
        )
    return state


def _request(msg: Message, stage: str) -> ConfigRecord:
    """The coordinator's payload for ``stage``, every field there with its type; a malformed
    one ends the round at this site like any other violation (logged, audited, state cleared)."""
    try:
        return sa.checked_payload(
            msg.content, sa.request_record(stage), sa.REQUEST_FIELDS[stage], f"the coordinator's {stage} message"
        )
    except sa.MalformedPayload as err:
        raise ProtocolViolation(str(err)) from None


def _reply(msg: Message, payload: dict, **records) -> Message:  # noqa: ANN003 - extra named records
    content = RecordDict({sa.PROTOCOL_KEY: ConfigRecord(payload), **records})
    return Message(content=content, reply_to=msg)


def handle_train(msg: Message, context: Context, local_train: Handler) -> Message:
    """Stage (a): local training, local vetting of the delta, a signed advertisement of fresh keys."""
    context.state.pop(sa.STATE_KEY, None)  # a new round always starts clean, a refused one too
    context.state.pop(sa.DELTA_STATE_KEY, None)
    context.state.pop(sa.NOISE_STATE_KEY, None)
    drop_held(context)  # a held monitor of an unfinished round never leaves
    params = _request(msg, sa.STAGE_TRAIN)
    server_round = int(params[sa.P_ROUND])
    auth = load_site_auth(context)  # a site that cannot authenticate does not even train

    trained = local_train(msg, context)
    if trained.has_error():  # a refusal (policy, privacy budget): pass it on unchanged
        return trained
    delta_record = trained.content[ARRAYS_KEY]
    delta = record_to_state(delta_record)  # raises UpdateRejected on NaN/inf
    norm = update_norm(delta)
    if norm > float(params[sa.P_MAX_NORM]):
        raise UpdateRejected(f"own update norm {norm:.3g} exceeds max-update-norm {float(params[sa.P_MAX_NORM]):g}")

    me = int(msg.metadata.dst_node_id)
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    pk1_bytes, pk2_bytes = public_key_to_bytes(pk1), public_key_to_bytes(pk2)
    model_hash, instructions_hash = _model_hash(msg, context), _instructions_hash(msg)
    signature = auth.signing_key.sign(
        sa.advertisement_message(context.run_id, server_round, me, auth.site_id, pk1_bytes, pk2_bytes, model_hash, instructions_hash)
    )
    state = ConfigRecord(
        {
            _ROUND: server_round,
            _STAGE: sa.STAGE_TRAIN,
            _NODE: me,
            _SITE_ID: auth.site_id,
            _MODEL_HASH: model_hash,
            _INSTRUCTIONS_HASH: instructions_hash,
            _SK1: private_key_to_bytes(sk1),
            _PK1: pk1_bytes,
            _SK2: private_key_to_bytes(sk2),
            _PK2: pk2_bytes,
            _NUM_EXAMPLES: int(trained.content[METRICS_KEY][NUM_EXAMPLES_KEY]),
            **{name: params[name] for name in _PARAM_FIELDS},
            # Distributed DP's noise, held by the privacy round of this training (stage c adds it).
            **_noise_fields(context.state.pop(sa.NOISE_STATE_KEY, None), server_round),
        }
    )
    context.state[sa.STATE_KEY] = state
    context.state[sa.DELTA_STATE_KEY] = delta_record
    # Metrics and site id travel in clear as on the plain path; the weights do not.
    records = {name: record for name, record in trained.content.items() if name != ARRAYS_KEY}
    advertisement = {
        sa.K_PK1: pk1_bytes,
        sa.K_PK2: pk2_bytes,
        sa.K_SITE_ID: auth.site_id,
        sa.K_MODEL_HASH: model_hash,
        sa.K_INSTRUCTIONS_HASH: instructions_hash,
        sa.K_SIGNATURE: signature,
    }
    return _reply(msg, advertisement, **records)


def _check_floors(threshold: int, neighbourhood: int, policy: SitePolicy) -> None:
    """Point 4 of issue #12: the coordinator's threshold and neighbourhood size against this site's policy."""
    if neighbourhood < policy.min_sites:
        raise ProtocolViolation(f"{neighbourhood} neighbours (itself included), below this site's policy.min_sites={policy.min_sites}")
    if not 1 <= threshold <= neighbourhood:
        raise ProtocolViolation(f"reconstruction threshold {threshold} is impossible with {neighbourhood} neighbours")
    floor = policy.min_secagg_threshold_fraction
    if not sa.threshold_meets_floor(threshold, neighbourhood, floor):
        raise ProtocolViolation(
            f"reconstruction threshold {threshold} of {neighbourhood} neighbours is not above this site's floor "
            f"{floor:.3g} * {neighbourhood} (policy.min_secagg_threshold_fraction)"
        )


def _verify_advertisements(payload: ConfigRecord, state: ConfigRecord, auth: SiteAuth, run_id: int, server_round: int) -> list[str]:
    """Every neighbour's advertisement is signed by its roster key and commits to the same
    model and instructions as ours (points 1 and 3); returns the neighbours' site ids."""
    node_ids = [int(n) for n in cast(list, payload[sa.K_NODE_IDS])]
    site_ids, model_hashes, instruction_hashes, signatures = (
        list(cast(list, payload[key])) for key in (sa.K_SITE_IDS, sa.K_MODEL_HASHES, sa.K_INSTRUCTIONS_HASHES, sa.K_SIGNATURES)
    )
    if not len(site_ids) == len(model_hashes) == len(instruction_hashes) == len(signatures) == len(node_ids):
        raise ProtocolViolation("malformed advertisement lists")
    if len(set(site_ids)) != len(site_ids):
        raise ProtocolViolation("two neighbours claim the same site id")
    pk1s, pk2s = cast(list, payload[sa.K_PK1_LIST]), cast(list, payload[sa.K_PK2_LIST])
    me = int(state[_NODE])
    for index, node_id in enumerate(node_ids):
        site_id = str(site_ids[index])
        if node_id == me and site_id != auth.site_id:
            raise ProtocolViolation(f"own advertisement altered: listed as site '{site_id}'")
        if site_id not in auth.roster:
            raise ProtocolViolation(f"neighbour node {node_id} claims site '{site_id}', which is not in this site's roster")
        message = sa.advertisement_message(
            run_id, server_round, node_id, site_id, pk1s[index], pk2s[index], str(model_hashes[index]), str(instruction_hashes[index])
        )
        if not auth.verify(site_id, cast(bytes, signatures[index]), message):
            raise ProtocolViolation(
                f"the advertisement of neighbour node {node_id} (site '{site_id}') is not signed by that site's roster key "
                "for this run, round, node and public keys"
            )
    for index, node_id in enumerate(node_ids):
        if model_hashes[index] != state[_MODEL_HASH]:
            raise ProtocolViolation(f"round binding: site '{site_ids[index]}' received a different model than this site")
        if instruction_hashes[index] != state[_INSTRUCTIONS_HASH]:
            raise ProtocolViolation(f"round binding: site '{site_ids[index]}' received different instructions than this site")
    return [str(site) for site in site_ids]


def handle_share_keys(msg: Message, context: Context) -> Message:
    """Stage (b): floors, authentication and round binding; then Shamir-share the
    self-mask seed and sk1 among the neighbours."""
    payload = _request(msg, sa.STAGE_SHARE_KEYS)
    server_round = int(payload[sa.P_ROUND])
    state = _state(context, sa.STAGE_TRAIN, server_round)
    me = int(state[_NODE])
    node_ids = [int(n) for n in cast(list, payload[sa.K_NODE_IDS])]
    pk1s, pk2s = cast(list, payload[sa.K_PK1_LIST]), cast(list, payload[sa.K_PK2_LIST])
    threshold = int(payload[sa.P_THRESHOLD])
    if not len(node_ids) == len(pk1s) == len(pk2s) or len(set(node_ids)) != len(node_ids):
        raise ProtocolViolation("malformed neighbour list")
    _check_floors(threshold, len(node_ids), _policy(context, str(state[_SITE_ID])))
    if len(set(pk1s) | set(pk2s)) != 2 * len(node_ids):
        raise ProtocolViolation("some neighbours' public keys are identical")
    if me not in node_ids or pk1s[node_ids.index(me)] != state[_PK1] or pk2s[node_ids.index(me)] != state[_PK2]:
        raise ProtocolViolation("own public keys are missing or altered in the neighbour list")
    site_ids = _verify_advertisements(payload, state, load_site_auth(context), context.run_id, server_round)

    seed = os.urandom(32)
    seed_shares = create_shares(seed, threshold, len(node_ids))
    sk1_shares = create_shares(cast(bytes, state[_SK1]), threshold, len(node_ids))
    sk2 = bytes_to_private_key(cast(bytes, state[_SK2]))
    destinations, ciphertexts = [], []
    for index, (nid, pk2) in enumerate(zip(node_ids, pk2s)):
        if nid == me:
            state[_SEED_SHARE_OWNERS] = [me]
            state[_SEED_SHARES] = [seed_shares[index]]
            state[_SK1_SHARES] = [sk1_shares[index]]
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2))
        destinations.append(nid)
        ciphertexts.append(encrypt(key, sa.share_plaintext(me, nid, seed_shares[index], sk1_shares[index])))
    state[_SEED] = seed
    state[sa.P_THRESHOLD] = threshold
    state[_NEIGHBOURS], state[_N_PK1], state[_N_PK2] = node_ids, list(pk1s), list(pk2s)
    state[_N_SITES] = site_ids
    state[_STAGE] = sa.STAGE_SHARE_KEYS
    return _reply(msg, {sa.K_DESTINATIONS: destinations, sa.K_CIPHERTEXTS: ciphertexts})


def handle_masked_input(msg: Message, context: Context) -> Message:
    """Stage (c): store the shares addressed to us, reply our masked, quantised, weighted delta."""
    payload = _request(msg, sa.STAGE_MASKED_INPUT)
    server_round = int(payload[sa.P_ROUND])
    state = _state(context, sa.STAGE_SHARE_KEYS, server_round)
    me = int(state[_NODE])
    neighbours = [int(n) for n in cast(list, state[_NEIGHBOURS])]
    sources = [int(s) for s in cast(list, payload[sa.K_SOURCES])]
    ciphertexts = cast(list, payload[sa.K_CIPHERTEXTS])
    threshold = int(state[sa.P_THRESHOLD])
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources):
        raise ProtocolViolation("malformed share list")
    if me in sources or not set(sources) <= set(neighbours):
        raise ProtocolViolation("shares from outside the neighbourhood")
    if len(sources) + 1 < threshold:
        raise ProtocolViolation(f"only {len(sources)} neighbours left, threshold {threshold}")

    sk2 = bytes_to_private_key(cast(bytes, state[_SK2]))
    pk2s = dict(zip(neighbours, cast(list, state[_N_PK2])))
    owners = list(cast(list, state[_SEED_SHARE_OWNERS]))
    seed_shares, sk1_shares = list(cast(list, state[_SEED_SHARES])), list(cast(list, state[_SK1_SHARES]))
    for src, ciphertext in zip(sources, ciphertexts):
        key = generate_shared_key(sk2, bytes_to_public_key(pk2s[src]))
        actual_src, dst, seed_share, sk1_share = sa.parse_share_plaintext(decrypt(key, ciphertext))
        if actual_src != src or dst != me:
            raise ProtocolViolation(f"a share for node {dst} from node {actual_src} was relayed as from {src}")
        owners.append(src)
        seed_shares.append(seed_share)
        sk1_shares.append(sk1_share)

    delta_state = context.state[sa.DELTA_STATE_KEY].to_torch_state_dict()
    delta = sa.flatten_state(delta_state)
    if not np.isfinite(delta).all():  # checked at training already; masking must never hide a NaN
        raise UpdateRejected("own delta contains NaN or infinite values")
    clipping, levels, bits = float(state[sa.P_CLIPPING]), int(state[sa.P_QUANTIZATION]), int(state[sa.P_MODULUS_BITS])
    noise = _held_noise(state, clipping, levels, int(state[sa.P_MAX_WEIGHT]))
    quantised = sa.quantize(delta, clipping, levels, sa.rounding_rng(delta, server_round))  # same delta, same integers
    if quantised.clipped:
        logger.warning(
            "secure aggregation round %d: %d of %d update values were outside +-%g and were clipped",
            server_round, quantised.clipped, delta.size, clipping,
        )
    if noise is not None:  # distributed DP: the site's own noise, on the integers, before any mask
        mean = sa.skellam_mean(float(noise[sa.NOISE_MULTIPLIER]), int(noise[sa.NOISE_GRANULARITY]), delta.size)
        if not mean <= POISSON_MAX_MEAN:
            raise UpdateRejected(
                f"distributed DP: a Poisson mean of {mean:.3g} is beyond the exact sampler's {POISSON_MAX_MEAN:g}; "
                "lower privacy.distributed.granularity or noise_multiplier"
            )
        sa.add_skellam_noise(quantised.values, mean, SecureRandom())
    num_examples, max_weight = int(state[_NUM_EXAMPLES]), int(state[sa.P_MAX_WEIGHT])
    weight = sa.site_weight(num_examples, max_weight)
    if weight < num_examples and max_weight > 1:  # max-weight 1 is central DP's uniform mean, not a cap
        logger.warning("secure aggregation: weight %d capped at max-weight %d", num_examples, max_weight)
    vector = sa.encode_weighted(quantised.values, weight, bits)
    clipped = quantised.clipped
    del quantised, delta  # keep peak memory near one vector
    sa.apply_mask(vector, cast(bytes, state[_SEED]), sign=1, purpose=sa.PURPOSE_SELF, server_round=server_round)
    sk1 = bytes_to_private_key(cast(bytes, state[_SK1]))
    pk1s = dict(zip(neighbours, cast(list, state[_N_PK1])))
    for src in sources:
        secret = generate_shared_key(sk1, bytes_to_public_key(pk1s[src]))
        sa.apply_mask(vector, secret, sign=sa.pairwise_sign(me, src), purpose=sa.PURPOSE_PAIRWISE, server_round=server_round)

    state[_SEED_SHARE_OWNERS], state[_SEED_SHARES], state[_SK1_SHARES] = owners, seed_shares, sk1_shares
    state[_MASKED_WITH] = sources
    state[_STAGE] = sa.STAGE_MASKED_INPUT
    del context.state[sa.DELTA_STATE_KEY]  # the clear delta is not needed any more
    return _reply(
        msg,
        {sa.K_CLIPPED: clipped, sa.K_WEIGHT_CAPPED: weight < num_examples},
        **{sa.MASKED_KEY: ArrayRecord({sa.MASKED_ARRAY: Array(vector)})},
    )


_NOISE_FIELDS = (sa.NOISE_CLIP_NORM, sa.NOISE_GRANULARITY, sa.NOISE_MULTIPLIER)


def _noise_fields(noise: ConfigRecord | None, server_round: int) -> dict[str, float | int]:
    """The held noise of this round's training as fields of the round's state ({}: none)."""
    if noise is None:
        return {}
    if int(noise[sa.NOISE_ROUND]) != server_round:  # cannot happen: held by this very training
        raise UpdateRejected(f"distributed DP noise held for round {noise[sa.NOISE_ROUND]}, not {server_round}")
    return {f"noise-{name}": noise[name] for name in _NOISE_FIELDS}


def _held_noise(state: ConfigRecord, clipping: float, levels: int, max_weight: int) -> dict[str, float | int] | None:
    """Distributed DP's noise for this round, as the site's privacy round held it (None: the
    round has no distributed DP). The coordinator's grid must be the one the instructions
    name, and every site weighted 1: the site's noise is calibrated to that grid and to a
    uniform sum."""
    if f"noise-{sa.NOISE_GRANULARITY}" not in state:
        return None
    noise = {name: state[f"noise-{name}"] for name in _NOISE_FIELDS}
    grid = sa.distributed_dp_grid(float(noise[sa.NOISE_CLIP_NORM]), int(noise[sa.NOISE_GRANULARITY]))
    if (clipping, levels) != grid or max_weight != 1:
        raise ProtocolViolation(
            f"distributed DP: the coordinator's grid (+-{clipping:g} in {levels} steps, max weight {max_weight}) is not "
            f"the instructions' (+-{grid[0]:g} in {grid[1]} steps, weight 1)"
        )
    return noise


def handle_consistency(msg: Message, context: Context) -> Message:
    """Stage (d): sign the survivor set we are given (point 2), after checking it."""
    payload = _request(msg, sa.STAGE_CONSISTENCY)
    server_round = int(payload[sa.P_ROUND])
    state = _state(context, sa.STAGE_MASKED_INPUT, server_round)
    me = int(state[_NODE])
    survivors = [int(n) for n in cast(list, payload[sa.K_SURVIVORS])]
    if len(set(survivors)) != len(survivors):
        raise ProtocolViolation("malformed survivor set")
    neighbours = {int(n) for n in cast(list, state[_NEIGHBOURS])}
    known = {int(n) for n in cast(list, state[_MASKED_WITH])} | {me}
    live = neighbours & set(survivors)
    if me not in survivors:
        raise ProtocolViolation("the survivor set leaves out this site, which sent its masked input")
    if not live <= known:
        raise ProtocolViolation("the survivor set names neighbours whose shares this site never received")
    threshold = int(state[sa.P_THRESHOLD])
    if len(live) < threshold:
        raise ProtocolViolation(f"only {len(live)} of this site's neighbours survive, below the reconstruction threshold {threshold}")
    policy = _policy(context, str(state[_SITE_ID]))
    if len(survivors) < policy.min_sites:
        raise ProtocolViolation(f"{len(survivors)} survivors, below this site's policy.min_sites={policy.min_sites}")
    signature = load_site_auth(context).signing_key.sign(sa.consistency_message(context.run_id, server_round, me, survivors))
    state[_SURVIVORS] = sorted(survivors)
    state[_STAGE] = sa.STAGE_CONSISTENCY
    return _reply(msg, {sa.K_SIGNATURE: signature})


def handle_unmask(msg: Message, context: Context) -> Message:
    """Stage (e): with ``threshold`` neighbours' signatures over our survivor set, seed shares
    of surviving neighbours and sk1 shares of dropped ones, never both for one."""
    payload = _request(msg, sa.STAGE_UNMASK)
    server_round = int(payload[sa.P_ROUND])
    state = _state(context, sa.STAGE_CONSISTENCY, server_round)
    survivors = [int(n) for n in cast(list, state[_SURVIVORS])]
    neighbours = [int(n) for n in cast(list, state[_NEIGHBOURS])]
    site_of = dict(zip(neighbours, (str(s) for s in cast(list, state[_N_SITES]))))
    auth = load_site_auth(context)
    signers = [int(n) for n in cast(list, payload[sa.K_SIGNERS])]
    signatures = cast(list, payload[sa.K_SIGNATURES])
    if len(signers) != len(signatures):
        raise ProtocolViolation("malformed consistency signatures")
    valid: set[int] = set()
    for signer, signature in zip(signers, signatures):
        # Only surviving neighbours, verified under the site id their signed advertisement
        # gave; a signature over any other set (or by anyone else) does not count.
        if signer in site_of and signer in survivors and auth.verify(
            site_of[signer], cast(bytes, signature), sa.consistency_message(context.run_id, server_round, signer, survivors)
        ):
            valid.add(signer)
    threshold = int(state[sa.P_THRESHOLD])
    if len(valid) < threshold:
        raise ProtocolViolation(
            f"consistency check failed: {len(valid)} valid neighbour signatures over the survivor set this site signed, "
            f"{threshold} needed (the coordinator may have shown sites different survivor sets)"
        )
    alive = set(survivors)
    dropped = {int(n) for n in cast(list, state[_MASKED_WITH])} - alive
    owners = [int(n) for n in cast(list, state[_SEED_SHARE_OWNERS])]
    seed_shares, sk1_shares = cast(list, state[_SEED_SHARES]), cast(list, state[_SK1_SHARES])
    seed_owners = sorted(n for n in owners if n in alive)
    sk1_owners = sorted(n for n in owners if n in dropped)
    reply = {
        sa.K_SEED_OWNERS: seed_owners,
        sa.K_SEED_SHARES: [seed_shares[owners.index(n)] for n in seed_owners],
        sa.K_SK1_OWNERS: sk1_owners,
        sa.K_SK1_SHARES: [sk1_shares[owners.index(n)] for n in sk1_owners],
    }
    del context.state[sa.STATE_KEY]  # the round is over for this site; no second unmask
    # The representation monitor of the model every neighbour received, held since stage (a)
    # (client/monitor_round.py): it leaves only now, with the round's aggregate assured.
    held = release_held(context)
    return _reply(msg, reply, **({METRICS_KEY: held} if held is not None else {}))


def _logged(stage: str, handler: Handler) -> Handler:
    """A protocol violation ends the round at this site: say so in the site's log."""

    def logged(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ProtocolViolation as err:
            logger.warning("secure aggregation stopped at this site at %s: %s", stage, err)
            context.state.pop(sa.STATE_KEY, None)  # nothing more is revealed this round
            context.state.pop(sa.DELTA_STATE_KEY, None)
            drop_held(context)
            raise

    return logged


def stage_handlers(local_train: Handler) -> dict[str, Handler]:
    """Message type -> handler, for the ClientApp and for in-process protocol runs."""
    handlers: dict[str, Handler] = {
        sa.STAGE_TRAIN: lambda msg, ctx: handle_train(msg, ctx, local_train),
        sa.STAGE_SHARE_KEYS: handle_share_keys,
        sa.STAGE_MASKED_INPUT: handle_masked_input,
        sa.STAGE_CONSISTENCY: handle_consistency,
        sa.STAGE_UNMASK: handle_unmask,
    }
    return {sa.message_type(stage): _logged(stage, handlers[stage]) for stage in sa.STAGES}


def _audited(stage: str, handler: Handler, audit_replies: bool = True) -> Handler:
    """Write every protocol reply to the site's audit log (stage (a)'s reply is audited by
    the training round itself, client/privacy_round.py), and every abort with its reason."""

    def audited(msg: Message, context: Context) -> Message:
        record = msg.content.config_records.get(sa.PROTOCOL_KEY) or msg.content.config_records.get(sa.PARAMS_KEY)
        claimed = record.get(sa.P_ROUND) if record is not None else None
        server_round = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) else 0  # for the audit only
        try:
            reply = handler(msg, context)
        except ProtocolViolation as err:
            identity = identify_site(context)
            AuditLog(identity.state_dir / AUDIT_FILE).append(
                kind=f"{KIND_SECAGG_PREFIX}abort", run_id=context.run_id, server_round=server_round,
                site_id=identity.site_id, reason=f"{stage}: {err}",
            )
            raise
        if audit_replies and reply.has_content():
            identity = identify_site(context)
            masked = reply.content.array_records.get(sa.MASKED_KEY)
            AuditLog(identity.state_dir / AUDIT_FILE).append(
                kind=f"{KIND_SECAGG_PREFIX}{stage}",
                run_id=context.run_id,
                server_round=server_round,
                site_id=identity.site_id,
                arrays=masked,
                metrics={
                    "protocol-bytes": sa.payload_bytes(reply.content),
                    **dict(reply.content.metric_records.get(METRICS_KEY, {})),  # the unmask stage's monitor
                },
                shares=secagg_share_lists(stage, reply.content[sa.PROTOCOL_KEY], msg.content[sa.PROTOCOL_KEY]),
            )
        return reply

    return audited


def register_secagg(app: ClientApp, local_train: Handler) -> None:
    """Register the protocol stages as named train actions of the ClientApp."""
    for stage, handler in zip(sa.STAGES, stage_handlers(local_train).values()):
        app.train(stage)(_audited(stage, handler, audit_replies=stage != sa.STAGE_TRAIN))
