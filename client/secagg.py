"""A site's side of secure aggregation: one handler per protocol stage.

(a) ``secagg_train``: train as on the plain path (the ClientApp's own train handler),
    check the delta locally (finite, norm), keep it in ``context.state``, reply the
    metrics and two fresh public keys (pk1: pairwise masks, pk2: encrypting shares).
(b) ``secagg_share_keys``: receive the neighbours' public keys, Shamir-share a fresh
    self-mask seed and the pairwise secret key sk1, reply each share encrypted for its
    neighbour (ECDH on sk2/pk2 + Fernet, Flower's primitives).
(c) ``secagg_masked_input``: receive the shares addressed to us, reply
    ``weight * quantise(delta) + self mask +- pairwise masks`` modulo 2**bits.
(d) ``secagg_unmask``: for each neighbour the coordinator says survived, reveal our
    share of its self-mask seed; for each one it says dropped, our share of its sk1.
    Never both for one neighbour.

The coordinator can no longer vet a single site's update, so the site does: a non-finite
or oversized delta is refused here, before anything is masked.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, cast

import numpy as np
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
from ctfed.client.site import identify_site
from ctfed.common import secagg as sa
from ctfed.common.exchange import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, UpdateRejected, record_to_state, update_norm

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


class ProtocolViolation(RuntimeError):
    """The coordinator asked for something the protocol forbids; the site stops this round."""


# Fields of the site's state record (STATE_KEY).
_ROUND, _STAGE, _NODE = "round", "stage", "node-id"
_SK1, _PK1, _SK2, _PK2, _SEED = "sk1", "pk1", "sk2", "pk2", "seed"
_NUM_EXAMPLES = "num-examples"
_NEIGHBOURS, _N_PK1, _N_PK2 = "neighbours", "neighbour-pk1", "neighbour-pk2"
_SEED_SHARE_OWNERS, _SEED_SHARES, _SK1_SHARES = "share-owners", "seed-shares", "sk1-shares"
_MASKED_WITH = "masked-with"
_PARAM_FIELDS = (sa.P_THRESHOLD, sa.P_CLIPPING, sa.P_QUANTIZATION, sa.P_MODULUS_BITS, sa.P_MAX_WEIGHT, sa.P_MAX_NORM)


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


def _reply(msg: Message, payload: dict, **records) -> Message:  # noqa: ANN003 - extra named records
    content = RecordDict({sa.PROTOCOL_KEY: ConfigRecord(payload), **records})
    return Message(content=content, reply_to=msg)


def handle_train(msg: Message, context: Context, local_train: Handler) -> Message:
    """Stage (a): local training, local vetting of the delta, fresh key pairs."""
    params = msg.content[sa.PARAMS_KEY]
    server_round = int(params[sa.P_ROUND])
    context.state.pop(sa.STATE_KEY, None)  # a new round always starts clean
    context.state.pop(sa.DELTA_STATE_KEY, None)

    trained = local_train(msg, context)
    if trained.has_error():  # a refusal (policy, privacy budget): pass it on unchanged
        return trained
    delta_record = trained.content[ARRAYS_KEY]
    delta = record_to_state(delta_record)  # raises UpdateRejected on NaN/inf
    norm = update_norm(delta)
    if norm > float(params[sa.P_MAX_NORM]):
        raise UpdateRejected(f"own update norm {norm:.3g} exceeds max-update-norm {float(params[sa.P_MAX_NORM]):g}")

    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = ConfigRecord(
        {
            _ROUND: server_round,
            _STAGE: sa.STAGE_TRAIN,
            _NODE: int(msg.metadata.dst_node_id),
            _SK1: private_key_to_bytes(sk1),
            _PK1: public_key_to_bytes(pk1),
            _SK2: private_key_to_bytes(sk2),
            _PK2: public_key_to_bytes(pk2),
            _NUM_EXAMPLES: int(trained.content[METRICS_KEY][NUM_EXAMPLES_KEY]),
            **{name: params[name] for name in _PARAM_FIELDS},
        }
    )
    context.state[sa.STATE_KEY] = state
    context.state[sa.DELTA_STATE_KEY] = delta_record
    # Metrics and site id travel in clear as on the plain path; the weights do not.
    records = {name: record for name, record in trained.content.items() if name != ARRAYS_KEY}
    return _reply(msg, {sa.K_PK1: state[_PK1], sa.K_PK2: state[_PK2]}, **records)


def handle_share_keys(msg: Message, context: Context) -> Message:
    """Stage (b): Shamir-share the self-mask seed and sk1 among the neighbours."""
    payload = msg.content[sa.PROTOCOL_KEY]
    state = _state(context, sa.STAGE_TRAIN, int(payload[sa.P_ROUND]))
    me = int(state[_NODE])
    node_ids = [int(n) for n in cast(list, payload[sa.K_NODE_IDS])]
    pk1s, pk2s = cast(list, payload[sa.K_PK1_LIST]), cast(list, payload[sa.K_PK2_LIST])
    threshold = int(state[sa.P_THRESHOLD])
    if not len(node_ids) == len(pk1s) == len(pk2s) or len(set(node_ids)) != len(node_ids):
        raise ProtocolViolation("malformed neighbour list")
    if len(node_ids) < threshold:
        raise ProtocolViolation(f"{len(node_ids)} neighbours cannot meet reconstruction threshold {threshold}")
    if len(set(pk1s) | set(pk2s)) != 2 * len(node_ids):
        raise ProtocolViolation("some neighbours' public keys are identical")
    if me not in node_ids or pk1s[node_ids.index(me)] != state[_PK1] or pk2s[node_ids.index(me)] != state[_PK2]:
        raise ProtocolViolation("own public keys are missing or altered in the neighbour list")

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
    state[_NEIGHBOURS], state[_N_PK1], state[_N_PK2] = node_ids, list(pk1s), list(pk2s)
    state[_STAGE] = sa.STAGE_SHARE_KEYS
    return _reply(msg, {sa.K_DESTINATIONS: destinations, sa.K_CIPHERTEXTS: ciphertexts})


def handle_masked_input(msg: Message, context: Context) -> Message:
    """Stage (c): store the shares addressed to us, reply our masked, quantised, weighted delta."""
    payload = msg.content[sa.PROTOCOL_KEY]
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
    quantised = sa.quantize(delta, clipping, levels)
    if quantised.clipped:
        logger.warning(
            "secure aggregation round %d: %d of %d update values were outside +-%g and were clipped",
            server_round, quantised.clipped, delta.size, clipping,
        )
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


def handle_unmask(msg: Message, context: Context) -> Message:
    """Stage (d): seed shares of survivors, sk1 shares of dropped neighbours, never both."""
    payload = msg.content[sa.PROTOCOL_KEY]
    state = _state(context, sa.STAGE_MASKED_INPUT, int(payload[sa.P_ROUND]))
    me = int(state[_NODE])
    survivors = {int(n) for n in cast(list, payload[sa.K_SURVIVORS])}
    dropped = {int(n) for n in cast(list, payload[sa.K_DROPPED])}
    known = set(int(n) for n in cast(list, state[_MASKED_WITH])) | {me}
    if survivors & dropped:
        raise ProtocolViolation("a neighbour was reported both surviving and dropped")
    if me not in survivors or not (survivors | dropped) <= known:
        raise ProtocolViolation("the survivor/dropped lists do not match this site's neighbourhood")
    if len(survivors) < int(state[sa.P_THRESHOLD]):
        raise ProtocolViolation(f"only {len(survivors)} survivors, below the reconstruction threshold")
    owners = [int(n) for n in cast(list, state[_SEED_SHARE_OWNERS])]
    seed_shares, sk1_shares = cast(list, state[_SEED_SHARES]), cast(list, state[_SK1_SHARES])
    seed_owners = sorted(n for n in owners if n in survivors)
    sk1_owners = sorted(n for n in owners if n in dropped)
    reply = {
        sa.K_SEED_OWNERS: seed_owners,
        sa.K_SEED_SHARES: [seed_shares[owners.index(n)] for n in seed_owners],
        sa.K_SK1_OWNERS: sk1_owners,
        sa.K_SK1_SHARES: [sk1_shares[owners.index(n)] for n in sk1_owners],
    }
    del context.state[sa.STATE_KEY]  # the round is over for this site; no second unmask
    return _reply(msg, reply)


def stage_handlers(local_train: Handler) -> dict[str, Handler]:
    """Message type -> handler, for the ClientApp and for in-process protocol runs."""
    return {
        sa.message_type(sa.STAGE_TRAIN): lambda msg, ctx: handle_train(msg, ctx, local_train),
        sa.message_type(sa.STAGE_SHARE_KEYS): handle_share_keys,
        sa.message_type(sa.STAGE_MASKED_INPUT): handle_masked_input,
        sa.message_type(sa.STAGE_UNMASK): handle_unmask,
    }


def _audited(stage: str, handler: Handler) -> Handler:
    """Write every protocol reply to the site's audit log (stage (a)'s reply is audited by
    the training round itself, client/privacy_round.py)."""

    def audited(msg: Message, context: Context) -> Message:
        reply = handler(msg, context)
        if reply.has_content():
            identity = identify_site(context)
            masked = reply.content.array_records.get(sa.MASKED_KEY)
            AuditLog(identity.state_dir / AUDIT_FILE).append(
                kind=f"{KIND_SECAGG_PREFIX}{stage}",
                run_id=context.run_id,
                server_round=int(msg.content[sa.PROTOCOL_KEY][sa.P_ROUND]),
                site_id=identity.site_id,
                arrays=masked,
                metrics={"protocol-bytes": sa.payload_bytes(reply.content)},
                shares=secagg_share_lists(stage, reply.content[sa.PROTOCOL_KEY], msg.content[sa.PROTOCOL_KEY]),
            )
        return reply

    return audited


def register_secagg(app: ClientApp, local_train: Handler) -> None:
    """Register the four stages as named train actions of the ClientApp."""
    for stage, handler in zip(sa.STAGES, stage_handlers(local_train).values()):
        app.train(stage)(handler if stage == sa.STAGE_TRAIN else _audited(stage, handler))
