"""Secure aggregation maths shared by sites and coordinator (SecAgg+ on the Message API).

What a site uploads is ``encode(weight * quantise(clip(delta))) + self_mask + sum(+-pairwise
masks) mod 2**bits``, with its weight appended as one more element. Pairwise masks cancel
in the sum; self masks are removed by the coordinator from Shamir shares of each survivor's
seed. The coordinator only learns ``sum(weight_i * q_i)`` and ``sum(weight_i)``.

Masks: Flower's ``pseudo_rand_gen`` folds the shared secret to a 32-bit seed for numpy's
RandomState, so a coordinator can brute-force 2**32 seeds and strip a site's mask. Here
every mask is the ChaCha20 keystream under a key derived with HKDF-SHA256 from the FULL
secret, with the round and the mask's purpose bound into both key and nonce.

Quantisation error (``aggregation_error_bound``): values inside +-clipping_range are
rounded stochastically (unbiased) to a grid of step ``2 * clipping_range /
quantization_range``; each site's rounding error is below one step per value, and the
weighted mean of such errors is too. The rounding's dither comes from a generator seeded
by a hash of the values rounded and the round (``rounding_rng``): the same delta gives the
same integers, so a simulation is bit-reproducible, and a coordinator, which never sees a
site's delta, cannot predict it. So, per value,
``|secure mean - plain weighted mean of the clipped deltas| < step`` (plus float32
rounding of the result). Values outside the range are clipped, counted, and reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, get_args, get_origin

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

from ctfed.common.config import SecAggConfig
from ctfed.common.dp import SecureRandom

# --- message types and record keys, one definition for both sides -----------------------

# Message types "train.<action>": each stage is its own ClientApp action.
STAGE_TRAIN = "secagg_train"
STAGE_SHARE_KEYS = "secagg_share_keys"
STAGE_MASKED_INPUT = "secagg_masked_input"
STAGE_CONSISTENCY = "secagg_consistency"
STAGE_UNMASK = "secagg_unmask"
STAGES = (STAGE_TRAIN, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT, STAGE_CONSISTENCY, STAGE_UNMASK)

# Bound into every signature, so a signature of one protocol (or version) means nothing in another.
PROTOCOL_VERSION = "ctfed-secagg/2"


def message_type(stage: str) -> str:
    return f"train.{stage}"


# Record names inside a message's RecordDict.
PARAMS_KEY = "secagg-params"  # ConfigRecord: protocol parameters for this round (stage a)
PROTOCOL_KEY = "secagg"  # ConfigRecord: the stage's protocol payload, both directions
MASKED_KEY = "secagg-masked"  # ArrayRecord: the masked vector (stage c reply)
MASKED_ARRAY = "masked"
# Site-side state between stages (context.state).
STATE_KEY = "secagg-state"  # ConfigRecord
DELTA_STATE_KEY = "secagg-delta"  # ArrayRecord: the site's own delta, never sent in clear
# ConfigRecord: distributed DP's grid and noise of the round, written by the site's privacy
# round from the instructions it checked (client/privacy_round.py), read at stage (c).
NOISE_STATE_KEY = "secagg-dp-noise"
NOISE_ROUND, NOISE_CLIP_NORM, NOISE_GRANULARITY, NOISE_MULTIPLIER = "round", "clip-norm", "granularity", "noise-multiplier"

# Fields of PARAMS_KEY.
P_ROUND = "round"
P_THRESHOLD = "reconstruction-threshold"
P_CLIPPING = "clipping-range"
P_QUANTIZATION = "quantization-range"
P_MODULUS_BITS = "modulus-bits"
P_MAX_WEIGHT = "max-weight"
P_MAX_NORM = "max-update-norm"

# Fields of PROTOCOL_KEY.
K_PK1 = "pk1"  # public key for pairwise masks
K_PK2 = "pk2"  # public key for encrypting shares
K_NODE_IDS = "node-ids"
K_PK1_LIST = "pk1-list"
K_PK2_LIST = "pk2-list"
K_DESTINATIONS = "destinations"
K_SOURCES = "sources"
K_CIPHERTEXTS = "ciphertexts"
K_SURVIVORS = "survivors"
K_DROPPED = "dropped"
K_SEED_OWNERS = "seed-owners"
K_SEED_SHARES = "seed-shares"
K_SK1_OWNERS = "sk1-owners"
K_SK1_SHARES = "sk1-shares"
K_CLIPPED = "clipped-values"
K_WEIGHT_CAPPED = "weight-capped"
# Signed key advertisement (stage a reply; lists of them forwarded in stage b).
K_SITE_ID = "site-id"
K_MODEL_HASH = "model-sha256"
K_INSTRUCTIONS_HASH = "instructions-sha256"
K_SIGNATURE = "signature"
K_SITE_IDS = "site-ids"
K_MODEL_HASHES = "model-sha256-list"
K_INSTRUCTIONS_HASHES = "instructions-sha256-list"
K_SIGNATURES = "signatures"
# Consistency round: the signers of the survivor set and their signatures (stage e).
K_SIGNERS = "signers"

# Each stage's payload, both directions: field -> type (``list[x]``: a list of x). Both sides
# check a payload on receipt (``checked_payload``), so a malformed or hostile message ends
# at a named field, never at a KeyError or a silently truncated value inside a handler.
REQUEST_FIELDS: dict[str, dict[str, Any]] = {
    STAGE_TRAIN: {  # PARAMS_KEY, beside the round's instructions
        P_ROUND: int, P_CLIPPING: float, P_QUANTIZATION: int, P_MODULUS_BITS: int, P_MAX_WEIGHT: int, P_MAX_NORM: float,
    },
    STAGE_SHARE_KEYS: {
        P_ROUND: int, P_THRESHOLD: int, K_NODE_IDS: list[int], K_PK1_LIST: list[bytes], K_PK2_LIST: list[bytes],
        K_SITE_IDS: list[str], K_MODEL_HASHES: list[str], K_INSTRUCTIONS_HASHES: list[str], K_SIGNATURES: list[bytes],
    },
    STAGE_MASKED_INPUT: {P_ROUND: int, K_SOURCES: list[int], K_CIPHERTEXTS: list[bytes]},
    STAGE_CONSISTENCY: {P_ROUND: int, K_SURVIVORS: list[int]},
    STAGE_UNMASK: {P_ROUND: int, K_SIGNERS: list[int], K_SIGNATURES: list[bytes]},
}
REPLY_FIELDS: dict[str, dict[str, Any]] = {
    STAGE_TRAIN: {
        K_PK1: bytes, K_PK2: bytes, K_SITE_ID: str, K_MODEL_HASH: str, K_INSTRUCTIONS_HASH: str, K_SIGNATURE: bytes,
    },
    STAGE_SHARE_KEYS: {K_DESTINATIONS: list[int], K_CIPHERTEXTS: list[bytes]},
    STAGE_MASKED_INPUT: {K_CLIPPED: int, K_WEIGHT_CAPPED: bool},
    STAGE_CONSISTENCY: {K_SIGNATURE: bytes},
    STAGE_UNMASK: {K_SEED_OWNERS: list[int], K_SEED_SHARES: list[bytes], K_SK1_OWNERS: list[int], K_SK1_SHARES: list[bytes]},
}


def request_record(stage: str) -> str:
    """The record of a coordinator's ``stage`` message that REQUEST_FIELDS describes."""
    return PARAMS_KEY if stage == STAGE_TRAIN else PROTOCOL_KEY


class MalformedPayload(ValueError):
    """A stage payload that lacks a field it needs, or has one of another type."""


def _is(value: Any, kind: type) -> bool:
    if kind is int:  # a bool is an int to Python, not to the protocol
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def checked_payload(content: RecordDict, record_name: str, fields: Mapping[str, Any], what: str) -> ConfigRecord:
    """``content``'s ``record_name`` record, once every one of ``fields`` is there with its
    type; else MalformedPayload naming ``what`` (the message) and the field."""
    record = content.config_records.get(record_name)
    if record is None:
        raise MalformedPayload(f"{what} has no '{record_name}' record")
    for name, kind in fields.items():
        if name not in record:
            raise MalformedPayload(f"{what} lacks '{name}'")
        value = record[name]
        if get_origin(kind) is list:
            (element,) = get_args(kind)
            ok = isinstance(value, list) and all(_is(item, element) for item in value)
        else:
            ok = _is(value, kind)
        if not ok:
            shown = type(value).__name__ if not isinstance(value, list) else "a list of other values"
            wanted = str(kind) if get_origin(kind) is list else kind.__name__
            raise MalformedPayload(f"{what}: '{name}' is {shown}, not {wanted}")
    return record


# Purposes bound into mask keys and nonces, so no two masks ever share a keystream.
PURPOSE_SELF = b"self-mask"
PURPOSE_PAIRWISE = b"pairwise-mask"

_CHUNK_VALUES = 1 << 20  # keystream is produced and applied in 1M-value chunks (bounded memory)
_NPY_HEADER_MAX = 4096  # bytes: an npy header (magic, length, dict) of a 1-D array is far shorter


# --- mask expansion -------------------------------------------------------------------------


def uint_dtype(modulus_bits: int) -> np.dtype:
    """Unsigned dtype whose native wrap-around is arithmetic modulo 2**modulus_bits."""
    if modulus_bits == 32:
        return np.dtype(np.uint32)
    if modulus_bits == 64:
        return np.dtype(np.uint64)
    raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits}")


def _signed_dtype(modulus_bits: int) -> np.dtype:
    return np.dtype(np.int32) if modulus_bits == 32 else np.dtype(np.int64)


def mask_cipher_params(secret: bytes, purpose: bytes, server_round: int) -> tuple[bytes, bytes]:
    """ChaCha20 (key, 16-byte nonce) for one mask: key = HKDF-SHA256(full secret)."""
    if len(secret) < 16:
        raise ValueError("a mask secret must have at least 128 bits")
    context = b"ctfed-secagg|" + purpose + b"|round=" + str(int(server_round)).encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(secret)
    # cryptography's ChaCha20 nonce is a 4-byte block counter (start at 0) + 12-byte nonce.
    nonce = b"\x00" * 4 + hashlib.sha256(context).digest()[:12]
    return key, nonce


def _keystream_chunks(secret: bytes, length: int, dtype: np.dtype, purpose: bytes, server_round: int):
    key, nonce = mask_cipher_params(secret, purpose, server_round)
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    chunk = np.empty(min(length, _CHUNK_VALUES), dtype=dtype)
    zeros = memoryview(bytes(chunk.nbytes))  # a view: slicing it copies nothing
    for start in range(0, length, _CHUNK_VALUES):
        count = min(_CHUNK_VALUES, length - start)
        nbytes = count * dtype.itemsize
        # Encrypting zeros yields the raw keystream, written straight into the chunk buffer.
        encryptor.update_into(zeros[:nbytes], memoryview(chunk).cast("B")[:nbytes])
        yield start, chunk[:count]


def mask_vector(secret: bytes, length: int, modulus_bits: int, *, purpose: bytes, server_round: int) -> np.ndarray:
    """The mask expanded from ``secret``: uniform over [0, 2**modulus_bits), ``length`` values."""
    dtype = uint_dtype(modulus_bits)
    out = np.empty(length, dtype=dtype)
    for start, chunk in _keystream_chunks(secret, length, dtype, purpose, server_round):
        out[start : start + len(chunk)] = chunk
    return out


def apply_mask(
    target: np.ndarray, secret: bytes, *, sign: int, purpose: bytes, server_round: int
) -> None:
    """``target += sign * mask(secret)`` modulo 2**bits, in place and chunk by chunk."""
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    for start, chunk in _keystream_chunks(secret, len(target), target.dtype, purpose, server_round):
        view = target[start : start + len(chunk)]
        if sign > 0:
            np.add(view, chunk, out=view)
        else:
            np.subtract(view, chunk, out=view)


def pairwise_sign(own_node_id: int, other_node_id: int) -> int:
    """The larger node id adds the pairwise mask, the smaller subtracts it: they cancel."""
    if own_node_id == other_node_id:
        raise ValueError("no pairwise mask with oneself")
    return 1 if own_node_id > other_node_id else -1


# --- quantisation, weighting, encoding ------------------------------------------------------


def quantization_step(clipping_range: float, quantization_range: int) -> float:
    """Width of one quantisation step: [-c, c] is split into quantization_range steps."""
    return 2.0 * clipping_range / quantization_range


def aggregation_error_bound(cfg: SecAggConfig) -> float:
    """Largest per-value difference between the secure mean and the plain weighted mean.

    Holds for deltas inside +-clipping_range, comparing against the weighted mean with the
    same capped weights (``site_weight``). Stochastic rounding moves each value by less
    than one step and the weighted mean of errors below one step stays below one step.
    The result is then rounded to float32 (``float32_rounding`` on top of this).
    """
    return quantization_step(cfg.clipping_range, cfg.quantization_range)


def float32_rounding(values: np.ndarray) -> np.ndarray:
    """float32 rounding of a result, per value (half an ulp)."""
    return np.abs(values).astype(np.float64) * 2.0**-24 + np.finfo(np.float32).tiny


def site_weight(num_examples: int, max_weight: int) -> int:
    """A site's integer weight: its number of examples, capped so the sum cannot wrap."""
    return max(0, min(int(num_examples), int(max_weight)))


@dataclass
class Quantised:
    values: np.ndarray  # int64, in [-quantization_range/2, quantization_range/2]
    clipped: int  # how many values were outside +-clipping_range


def rounding_rng(values: np.ndarray, server_round: int) -> np.random.Generator:
    """The stochastic rounding's generator for ``values`` in ``server_round``, seeded by a
    BLAKE2b hash of their bytes and the round: a function of the inputs (a rerun with the same
    delta rounds it the same way; an OS-seeded generator made every run's aggregate differ in
    its last bits), yet unpredictable to whoever lacks the delta. Costs one pass over the
    vector: 0.35 s for 20M float32 values on one shared core, so about 1.5 s at ViT-B's 89M."""
    digest = hashlib.blake2b(digest_size=32, person=b"ctfed-dither")
    digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    digest.update(int(server_round).to_bytes(8, "big", signed=True))
    return np.random.default_rng(np.frombuffer(digest.digest(), dtype=np.uint32))


def quantize(
    values: np.ndarray, clipping_range: float, quantization_range: int, rng: np.random.Generator | None = None
) -> Quantised:
    """Clip to +-clipping_range (counting what was clipped) and round stochastically to the grid
    (the dither from ``rng``: a site passes ``rounding_rng``; None draws it from the OS)."""
    rng = rng or np.random.default_rng()
    values = np.asarray(values)
    clipped = int(np.count_nonzero(np.abs(values) > clipping_range))
    scale = quantization_range / (2.0 * clipping_range)
    out = np.empty(values.shape, dtype=np.int64)
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _CHUNK_VALUES):
        part = flat_in[start : start + _CHUNK_VALUES].astype(np.float64)
        np.clip(part, -clipping_range, clipping_range, out=part)
        part *= scale
        # floor(x + u), u ~ U[0, 1): unbiased, and never more than one step from x.
        part += rng.random(part.size)
        np.floor(part, out=part)
        np.clip(part, -(quantization_range // 2), quantization_range // 2, out=part)
        flat_out[start : start + part.size] = part
    return Quantised(out, clipped)


def noise_record(server_round: int, clip_norm: float, granularity: int, noise_multiplier: float) -> ConfigRecord:
    """What a site's privacy round holds for stage (c) under distributed DP (NOISE_STATE_KEY)."""
    return ConfigRecord({NOISE_ROUND: int(server_round), NOISE_CLIP_NORM: float(clip_norm),
                         NOISE_GRANULARITY: int(granularity), NOISE_MULTIPLIER: float(noise_multiplier)})


def distributed_dp_grid(clip_norm: float, granularity: int) -> tuple[float, int]:
    """(clipping range, quantisation range) of a distributed-DP round: [-clip_norm, clip_norm]
    in 2 x granularity steps, i.e. clip_norm / granularity each. Both sides derive it from the
    instructions' privacy.distributed; a site refuses a round whose parameters differ."""
    return float(clip_norm), 2 * int(granularity)


def skellam_mean(noise_multiplier: float, granularity: int, num_values: int) -> float:
    """Each Poisson's mean of a site's Skellam noise: (z x its L2 sensitivity)^2 / 2, the
    sensitivity in grid steps being at most granularity + sqrt(values) (the clipped update is
    at most granularity steps long, and rounding moves each value by under one step)."""
    return (noise_multiplier * (granularity + math.sqrt(num_values))) ** 2 / 2


def add_skellam_noise(quantised: np.ndarray, mean: float, rng: SecureRandom) -> None:
    """``quantised += Skellam(mean)`` per value, in place, chunk by chunk (int64; the noise is
    not clipped: its sum over the sites is what protects each)."""
    flat = quantised.reshape(-1)
    for start in range(0, flat.size, _CHUNK_VALUES):
        part = flat[start : start + _CHUNK_VALUES]
        part += rng.skellam(part.size, mean)


def encode_weighted(quantised: np.ndarray, weight: int, modulus_bits: int) -> np.ndarray:
    """``[weight * q..., weight]`` as unsigned integers modulo 2**bits (two's complement)."""
    dtype = uint_dtype(modulus_bits)
    out = np.empty(quantised.size + 1, dtype=dtype)
    body = out[:-1]
    if modulus_bits == 64:
        # Two's complement: the int64 bit pattern IS the value modulo 2**64 (no cast pass).
        np.multiply(quantised.reshape(-1), np.int64(weight), out=body.view(np.int64))
    else:
        body[:] = (quantised.reshape(-1) * np.int64(weight)).astype(dtype)  # C cast wraps mod 2**32
    out[-1] = weight
    return out


def decode_mean(unmasked_sum: np.ndarray, cfg: SecAggConfig) -> tuple[np.ndarray, int]:
    """From ``sum(encode_weighted(...))`` to (weighted mean as float32 values, total weight).

    Chunk by chunk, so decoding adds only the float32 result to the integer sum (a float64
    copy of 89M values would be 712 MB on the coordinator)."""
    signed = unmasked_sum.view(_signed_dtype(cfg.modulus_bits))
    total_weight = int(signed[-1])
    if total_weight <= 0:
        raise ValueError(f"total weight {total_weight} is not positive")
    factor = quantization_step(cfg.clipping_range, cfg.quantization_range) / total_weight
    body = signed[:-1]
    mean = np.empty(body.size, dtype=np.float32)
    for start in range(0, body.size, _CHUNK_VALUES):
        part = body[start : start + _CHUNK_VALUES].astype(np.float64)
        part *= factor
        mean[start : start + part.size] = part
    return mean, total_weight


def array_view(array: Array) -> np.ndarray:
    """A Flower ``Array`` (NumPy serialisation) as a read-only view of its bytes, no copy.

    ``Array.numpy()`` copies through ``np.load``; for a masked input of 89M values that is
    712 MB more per arriving site. Only plain C-order arrays of a non-object dtype are read."""
    if array.stype != SType.NUMPY:
        raise ValueError(f"array serialisation {array.stype!r} is not numpy")
    header = io.BytesIO(memoryview(array.data)[:_NPY_HEADER_MAX])
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(header)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(header)
    else:
        raise ValueError(f"npy format version {version} is not read here")
    if fortran_order or dtype.hasobject:
        raise ValueError("only C-order arrays of plain dtypes are read")
    count = math.prod(shape)
    offset = header.tell()
    if len(array.data) - offset != count * dtype.itemsize:
        raise ValueError(f"array data holds {len(array.data) - offset} bytes, its header says {count * dtype.itemsize}")
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset).reshape(shape)


# --- state dicts as one vector --------------------------------------------------------------


def flatten_state(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All floating tensors of a state dict, in its order, as one float32 vector."""
    parts = [t.detach().cpu().reshape(-1).float().numpy() for t in state.values()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def unflatten_state(vector: np.ndarray, like: Mapping[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of ``flatten_state`` against a state dict with the wanted names and shapes.
    ``copy=False`` returns views of a float32 ``vector`` (no second copy of the whole state)."""
    total = sum(t.numel() for t in like.values())
    if vector.size != total:
        raise ValueError(f"vector has {vector.size} values, the state dict {total}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor in like.items():
        n = tensor.numel()
        part = vector[offset : offset + n]
        if copy or part.dtype != np.float32 or not part.flags.writeable:
            part = np.array(part, dtype=np.float32)
        out[name] = torch.from_numpy(part).reshape(tensor.shape)
        offset += n
    return out


def state_size(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def vector_norm(vector: np.ndarray) -> float:
    """Euclidean norm, accumulated in float64 chunk by chunk (no float64 copy of the vector)."""
    total = 0.0
    for start in range(0, vector.size, _CHUNK_VALUES):
        part = vector[start : start + _CHUNK_VALUES].astype(np.float64)
        total += float(np.dot(part, part))
    return math.sqrt(total)


# --- SecAgg+ neighbourhoods ------------------------------------------------------------------


def effective_num_shares(num_shares: int, num_sites: int) -> int:
    """Neighbourhood size for this round (Flower's rule: odd when it is not everyone)."""
    shares = min(num_shares, num_sites)
    if shares < num_sites and shares % 2 == 0:
        shares += 1
    return min(shares, num_sites)


def neighbourhoods(shuffled_node_ids: list[int], num_shares: int) -> dict[int, list[int]]:
    """SecAgg+ ring graph (Flower's construction): each node and the ``num_shares // 2``
    nodes either side of it in a random order; everyone when num_shares covers all.
    Each list includes the node itself and is sorted, so both ends agree on share order."""
    n = len(shuffled_node_ids)
    if num_shares >= n:
        everyone = sorted(shuffled_node_ids)
        return {nid: list(everyone) for nid in shuffled_node_ids}
    half = num_shares // 2
    return {
        nid: sorted({shuffled_node_ids[(idx + offset) % n] for offset in range(-half, half + 1)})
        for idx, nid in enumerate(shuffled_node_ids)
    }


def share_plaintext(src: int, dst: int, seed_share: bytes, sk1_share: bytes) -> bytes:
    """What one encrypted share carries; src and dst are inside so a relay cannot swap them."""
    return b"".join(
        [
            src.to_bytes(8, "little"),
            dst.to_bytes(8, "little"),
            len(seed_share).to_bytes(4, "little"),
            seed_share,
            sk1_share,
        ]
    )


def parse_share_plaintext(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    src = int.from_bytes(plaintext[:8], "little")
    dst = int.from_bytes(plaintext[8:16], "little")
    size = int.from_bytes(plaintext[16:20], "little")
    return src, dst, plaintext[20 : 20 + size], plaintext[20 + size :]


def payload_bytes(content: RecordDict) -> int:
    """Approximate bytes of a message's content: array data, byte/str values, 8 per number."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
            continue
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


# --- authentication: what sites sign (Bonawitz et al. 2017, the malicious-server variant) ----


def default_threshold(neighbourhood: int) -> int:
    """The smallest threshold above 2/3 of a neighbourhood (t > 2n/3)."""
    return 2 * neighbourhood // 3 + 1


def round_threshold(configured: int, neighbourhood: int) -> int:
    """This round's reconstruction threshold: the configured one, or (0) above 2n/3."""
    return configured if configured else default_threshold(neighbourhood)


def threshold_meets_floor(threshold: int, neighbourhood: int, fraction: float) -> bool:
    """A site's floor: the threshold must exceed ``fraction`` of its neighbourhood."""
    return threshold > fraction * neighbourhood


def _fields(*values: bytes | str | int) -> bytes:
    """Unambiguous concatenation: each field length-prefixed, strings UTF-8, ints decimal."""
    out = []
    for value in values:
        raw = value if isinstance(value, bytes) else str(value).encode()
        out.append(len(raw).to_bytes(4, "big") + raw)
    return b"".join(out)


def advertisement_message(
    run_id: int, server_round: int, node_id: int, site_id: str, pk1: bytes, pk2: bytes, model_hash: str, instructions_hash: str
) -> bytes:
    """What a site signs in stage (a): who it is (site and node), its two public keys, and
    the model and instructions it received, for this run and round only."""
    return _fields(
        PROTOCOL_VERSION, "advertise", int(run_id), int(server_round), int(node_id), site_id, pk1, pk2,
        model_hash, instructions_hash,
    )


def consistency_message(run_id: int, server_round: int, node_id: int, survivors: list[int]) -> bytes:
    """What a site signs in the consistency round: the survivor set it was given."""
    return _fields(PROTOCOL_VERSION, "consistency", int(run_id), int(server_round), int(node_id), *sorted(int(n) for n in survivors))


def arrays_sha256(records: list[ArrayRecord]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of arrays, in name order; a later record's
    array replaces an earlier one of the same name (a held base overlaid with what arrived)."""
    arrays = {}
    for record in records:
        arrays.update(record.items())
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(_fields(name, str(array.dtype), str(tuple(array.shape)), array.data))
    return digest.hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def instructions_sha256(records: list[ConfigRecord], exclude: frozenset[str] = frozenset()) -> str:
    """SHA-256 of the round's instructions and protocol parameters: every key and value in a
    canonical JSON form; ``exclude`` names keys that legitimately differ between sites."""
    merged: dict[str, object] = {}
    for index, record in enumerate(records):
        for key, value in record.items():
            if key not in exclude:
                merged[f"{index}:{key}"] = _canonical(value)
    return hashlib.sha256(json.dumps(merged, sort_keys=True, allow_nan=True).encode()).hexdigest()
