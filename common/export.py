"""``ctfed export``: a checkpoint (encoder or classifier) as a MONAI bundle or as TorchScript.

MONAI bundle (``--format monai-bundle``), the layout of MONAI's model zoo:

* ``configs/metadata.json``: MONAI's metadata keys (versions, task, the network's input and
  output format) plus ``ctfed``: the card's facts (kind, round, hash, model, labels, pooling,
  operating point, evaluation, data summary, fine-tuning and privacy facts). A card holds no
  patient identifier; only the whitelisted keys travel (``CARD_FACTS``), never the losses.
* ``configs/inference.json``: ``network_def`` (``bundle_network`` below: ctfed's own modules),
  ``preprocessing``: ctfed's transform chain (``common/preprocess.py`` ``transform_volume``) as
  MONAI dictionary transforms on a NIfTI volume in HU, from LoadImaged to the float16 rounding
  of the cache and the model's input size; ``inferer`` and ``postprocessing`` (sigmoid for a
  classifier's logits; an encoder's CLS features as they are); ``network_ts``: the same network
  from ``models/model.ts`` for readers without ctfed installed.
* ``models/model.pt``: the network's state dict; ``models/model.ts``: TorchScript (traced on one
  input volume, the metadata embedded as MONAI's ``save_net_with_metadata`` does).

DICOM input is not in the bundle's chain: ctfed's series selection and loading (padding,
gantry tilt, slice gaps) are its own; convert with ``ctfed prepare``'s reader or score with
``ctfed predict``. ``--format torchscript`` writes ``model.ts`` and ``card.json`` only.

A classifier whose feature statistics stayed at the sites (federated phase 2) is refused
unless ``--cache`` names a prepared cache to fit them on, as ``ctfed predict`` does.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctfed.common.checkpoint import card_preprocessing_plan, load_checkpoint
from ctfed.common.model import encoder_part
from ctfed.common.config import ConfigError, FeaturePooling, ModelConfig, to_section
from ctfed.common.fileio import write_json_atomic

FORMATS = ("monai-bundle", "torchscript")
CLASSIFIER_KIND = "classifier"
ENCODER_KIND = "encoder"
BUNDLE_VERSION = "0.1.0"
# What of a card travels in an exported model's metadata: facts about the model and its data
# in aggregate; never per-step losses, and nothing a card does not already hold.
CARD_FACTS = (
    "kind", "round", "sha256", "model", "label_names", "pooling", "operating_point", "evaluation", "data_summary",
    "encoder", "train_scans", "test_scans", "steps", "finetune", "finetune_stage", "trainable_blocks",
    "central_privacy_ledger",
)


class EncoderFeatures(nn.Module):
    """An encoder as an exported network: volumes (B, C, S, S, S) -> CLS features (B, hidden)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.cls_features(x)


def bundle_network(kind: str, model: dict[str, Any], num_outputs: int = 1, pooling: str = "cls") -> nn.Module:
    """The bundle's ``network_def``: ctfed's encoder (CLS features) or classifier (logits),
    unweighted; ``models/model.pt`` holds its weights."""
    from ctfed.common.finetune import build_classifier
    from ctfed.common.model import ViTEncoder

    model_cfg = to_section(ModelConfig, dict(model))
    if kind == ENCODER_KIND:
        return EncoderFeatures(ViTEncoder(model_cfg))
    if kind == CLASSIFIER_KIND:
        return build_classifier(model_cfg, num_outputs, pooling=FeaturePooling(pooling))
    raise ValueError(f"bundle network kind must be '{ENCODER_KIND}' or '{CLASSIFIER_KIND}', got {kind!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="an encoder or classifier checkpoint (.safetensors with its .json card)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="monai-bundle (folder) or torchscript (model.ts)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (a bundle's root)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a prepared cache to fit a federated classifier's feature statistics on")


def run(args: argparse.Namespace) -> int:
    written = export(args.checkpoint, args.format, args.out, cache=args.cache)
    print(f"exported {args.checkpoint} as {args.format}: {written}")
    return 0


def load_network(checkpoint: Path, cache: Path | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """The checkpoint as an exportable network in eval mode, its kind (encoder / classifier), its card."""
    try:
        state, model_cfg, card = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{checkpoint}: {err}") from None
    kind = str(card.get("kind", ""))
    if kind.endswith(ENCODER_KIND):
        network: nn.Module = bundle_network(ENCODER_KIND, card["model"])
        # A global checkpoint of a run with train.share_heads also carries the SSL heads: not exported.
        network.encoder.load_state_dict(encoder_part(state), strict=True)  # type: ignore[union-attr]
        return network.eval(), ENCODER_KIND, card
    if not kind.endswith(CLASSIFIER_KIND):
        raise ConfigError(f"{checkpoint} is a '{kind}' checkpoint; export takes an encoder or a classifier")
    from ctfed.common.finetune import fit_standardizer_on_cache, load_classifier

    try:
        classifier, card = load_classifier(checkpoint)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not classifier.standardizer.fitted:
        if cache is None:
            raise ConfigError(
                f"{checkpoint} has no feature statistics (a federated classifier's stay at the sites); pass --cache "
                "with a site's prepared cache to fit them on its scans"
            )
        fit_standardizer_on_cache(classifier, cache, model_cfg.image_size)
    return classifier.eval(), CLASSIFIER_KIND, card


def card_facts(card: dict[str, Any]) -> dict[str, Any]:
    return {key: card[key] for key in CARD_FACTS if key in card}


def preprocessing_transforms(plan: dict[str, Any], image_size: int) -> list[dict[str, Any]]:
    """``transform_volume`` on a NIfTI volume in HU, as MONAI dictionary transforms (key ``image``),
    ending in the model's input: float32 (C, z, y, x), rounded through float16 like the cache."""
    air = 1024.0  # -AIR_HU: resampling pads with zeros, which must mean air
    names = [window["name"] for window in plan["windows"]]
    spacing = float(plan["spacing_mm"])
    size = int(plan["output_size"])
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True, "dtype": "$np.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "Lambdad", "keys": "image", "func": f"$lambda x: x + {air}"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [spacing] * 3, "mode": "bilinear", "padding_mode": "zeros",
         "dtype": f"$torch.{plan.get('resample_dtype', 'float64')}"},  # older plans resampled in float64
        {"_target_": "Lambdad", "keys": "image", "func": f"$lambda x: x - {air}"},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
         "select_fn": f"$lambda x: x > {float(plan['foreground_hu'])}", "allow_smaller": True},
        {"_target_": "CopyItemsd", "keys": "image", "times": len(names), "names": names},
    ]
    for window in plan["windows"]:
        low = float(window["level"]) - float(window["width"]) / 2.0
        transforms.append({"_target_": "ScaleIntensityRanged", "keys": window["name"], "a_min": low,
                           "a_max": low + float(window["width"]), "b_min": 0.0, "b_max": 1.0, "clip": True})
    transforms += [
        {"_target_": "ConcatItemsd", "keys": names, "name": "image", "dim": 0},
        {"_target_": "DeleteItemsd", "keys": names},
        {"_target_": "Resized", "keys": "image", "spatial_size": [size] * 3, "mode": "trilinear", "anti_aliasing": True},
        # (C, x, y, z) RAS -> ctfed's (C, z, y, x); [0, 1] and float16 as the cache stores it.
        {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x.clamp(0.0, 1.0).permute(0, 3, 2, 1).half().float()"},
    ]
    if size != image_size:
        transforms.append({"_target_": "Lambdad", "keys": "image", "func": (
            f"$lambda x: torch.nn.functional.interpolate(torch.as_tensor(x)[None], size=({image_size},) * 3, "
            "mode='trilinear', align_corners=False)[0]"
        )})
    transforms.append({"_target_": "EnsureTyped", "keys": "image", "data_type": "tensor", "track_meta": False})
    return transforms


def _metadata(kind: str, card: dict[str, Any], plan: dict[str, Any] | None) -> dict[str, Any]:
    import monai
    import numpy

    model = card["model"]
    channels = int(model.get("in_channels", 3))
    if kind == CLASSIFIER_KIND:
        outputs = {"pred": {"type": "probabilities", "format": "sigmoid per task", "num_channels": len(card["label_names"]),
                            "spatial_shape": [], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                            "channel_def": dict(enumerate(card["label_names"]))}}
        task = f"head CT classification: {', '.join(card['label_names'])}"
    else:
        outputs = {"pred": {"type": "features", "format": "CLS embedding", "num_channels": int(model["hidden_size"]),
                            "spatial_shape": [], "dtype": "float32", "value_range": [], "is_patch_data": False,
                            "channel_def": {}}}
        task = "head CT representation (self-supervised 3D ViT encoder)"
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported by ctfed"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"ctfed": _ctfed_version(), "nibabel": _version("nibabel")},
        "name": f"ctfed {card.get('kind', kind)}",
        "task": task,
        "description": "ctfed: a 3D head-CT ViT pretrained by federated self-supervision across hospitals",
        "authors": "ctfed",
        "copyright": "see the federation's agreement",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": channels,
                                 "spatial_shape": [int(model["image_size"])] * 3, "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {i: w["name"] for i, w in enumerate((plan or {}).get("windows", []))}}},
            "outputs": outputs,
        },
        "ctfed": card_facts(card),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _ctfed_version() -> str:
    return _version("ctfed")


def _traced(network: nn.Module, image_size: int, channels: int) -> torch.jit.ScriptModule:
    example = torch.rand(1, channels, image_size, image_size, image_size, generator=torch.Generator().manual_seed(0))
    # The encoder's size check becomes a constant of the trace: right, since its position table
    # fixes the input size anyway. torch 2.13 deprecates TorchScript; it still loads (docs).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace(network, example, check_trace=False)


def _save_torchscript(network: nn.Module, path: Path, kind: str, card: dict[str, Any]) -> None:
    from monai.data import save_net_with_metadata

    model = card["model"]
    traced = _traced(network, int(model["image_size"]), int(model.get("in_channels", 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        save_net_with_metadata(traced, str(path.with_suffix("")), ".ts", meta_values={"ctfed": card_facts(card), "kind": kind})


def export(checkpoint: Path, fmt: str, out: Path, cache: Path | None = None) -> Path:
    """Write ``checkpoint`` to ``out`` in ``fmt`` (see the module docstring); returns what was written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    network, kind, card = load_network(checkpoint, cache)
    if fmt == "torchscript":
        _save_torchscript(network, out / "model.ts", kind, card)
        write_json_atomic(out / "card.json", card_facts(card))
        return out / "model.ts"
    plan = card_preprocessing_plan(card)
    if plan is None:
        raise ConfigError(f"{checkpoint}'s card records no preprocessing plan; the bundle's preprocessing needs it")
    model = card["model"]
    network_def: dict[str, Any] = {"_target_": "ctfed.common.export.bundle_network", "kind": kind, "model": model}
    postprocessing: dict[str, Any] = {"_target_": "Identity"}
    if kind == CLASSIFIER_KIND:
        network_def.update(num_outputs=len(card["label_names"]), pooling=card.get("pooling", "cls"))
        postprocessing = {"_target_": "Activations", "sigmoid": True}
    inference = {
        "imports": ["$import glob", "$import json", "$import os", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "network_ts": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(plan, int(model["image_size"]))},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": postprocessing,
        # monai.bundle.run(config_file=..., meta_file=..., bundle_root=DIR, input_dir=NIFTI_DIR,
        # output_file="out.json"): every NIfTI volume's output (the `python -m monai.bundle run`
        # command line does the same where MONAI's optional `fire` is installed).
        "input_dir": "$@bundle_root + '/input'",
        "output_file": "$@bundle_root + '/predictions.json'",
        "datalist": "$sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))",
        "predict": (
            "$torch.no_grad()(lambda path: @postprocessing(@inferer(@preprocessing({'image': path})['image'][None]"
            ".to(@device), @network)[0]).cpu().tolist())"
        ),
        "run": [
            "$@load_weights",
            "$@network.eval()",
            "$json.dump({os.path.basename(p): @predict(p) for p in @datalist}, open(@output_file, 'w'), indent=2)",
        ],
    }
    for folder in ("configs", "models", "docs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "configs" / "metadata.json", _metadata(kind, card, plan))
    write_json_atomic(out / "configs" / "inference.json", inference)
    torch.save(network.state_dict(), out / "models" / "model.pt")
    _save_torchscript(network, out / "models" / "model.ts", kind, card)
    (out / "docs" / "README.md").write_text(
        f"# {card.get('kind', kind)} exported by ctfed\n\n"
        "Input: a NIfTI CT volume in HU (`{\"image\": path}`); `configs/inference.json` holds ctfed's "
        "preprocessing as MONAI transforms. `network` + `load_weights` need ctfed installed; `network_ts` "
        "(models/model.ts) does not. Facts of the model card: `configs/metadata.json`, key `ctfed`.\n",
        encoding="utf-8",
    )
    return out
