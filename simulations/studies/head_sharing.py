"""Prototype drift across sites: the same federation with and without ``train.share_heads``.

Issue #11, item 7. Synthesises a small federation of sites of different sizes (prepared like
``label_signal``'s tuning set), then runs the coordinator's real round loop in process against
the real ClientApp handler (plain FedAvg path: the mean SecAgg+ computes is the same within
1e-12) once per arm, from the same initial encoder and seeds. It reports per arm:

* each site's DINO loss per round (the unweighted DINO term of its local steps, first and last
  round's mean), recorded from the sites' own ``LocalTrainer`` results;
* the spread of the site teachers' prototype outputs after the last round: every site's
  teacher (encoder + head, its centre and teacher temperature) on the same pooled scans, as
  DINO's target distribution; mean pairwise Jensen-Shannon divergence between sites (nats;
  0: identical, ln 2 the maximum), how often two sites' targets pick the same prototype, how
  many prototypes a site's targets use and their entropy; and, since targets at DINO's uniform
  fixed point are alike whatever the head, the correlation of the sites' raw prototype scores
  on the same scans and the cosine of corresponding prototypes (1: the same);
* a frozen-feature probe of the final global encoder (CLS; label_signal's 5-fold logistic
  regression AUROC, transductive on the pooled scans) per task::

    python -m ctfed.simulations.studies.head_sharing --out /tmp/heads --rounds 8 --local-steps 10 --train \
        train.batch_size=2 train.lr_reference_batch=2 train.num_local_crops=0 \
        train.augment.affine_prob=0 train.augment.blur_prob=0
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict

import ctfed.client.app as client_app
from ctfed.client.train import LocalTrainer, RoundResult
from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import FeaturePooling, RunConfig
from ctfed.simulations.config import SynthConfig, load_simulation_config
from ctfed.common.exchange import LOCAL_STATE_KEY
from ctfed.common.model import encoder_part
from ctfed.common.monitor import encoder_features
from ctfed.server.rounds import run_federation
from ctfed.simulations.runtime.inprocess import InProcessGrid
from ctfed.simulations.data.label_signal import TuningSet, _Scans, not_probeable, probe_auroc, tuning_set

logger = logging.getLogger(__name__)


class _RecordingTrainer(LocalTrainer):
    """The site's trainer, also keeping each round's DINO losses by site seed (measurement only)."""

    dino: dict[tuple[int, int], list[float]] = {}

    def train_round(self, round_index: int) -> RoundResult:
        result = super().train_round(round_index)
        self.dino[(self.seed, round_index)] = list(result.dino_losses)
        return result


@dataclass
class SiteTeacher:
    targets: torch.Tensor  # (scans, prototypes): DINO's target distribution
    logits: torch.Tensor  # (scans, prototypes): the teacher's raw prototype scores (cosines)
    prototypes: torch.Tensor  # (prototypes, bottleneck): the teacher's last layer, rows L2-normalised


@torch.no_grad()
def site_teacher(cfg: RunConfig, context: Context, dataset: Any, volumes: list[torch.Tensor]) -> SiteTeacher:
    """A site's teacher after the last round on ``volumes``: its targets (softmax after its
    centre, at the final teacher temperature), raw logits and prototypes."""
    trainer = LocalTrainer(cfg.model, cfg.train, dataset, device="cpu")
    trainer.load_local_state(context.state[LOCAL_STATE_KEY].to_torch_state_dict())
    logits = torch.cat([trainer.teacher(v.unsqueeze(0)) for v in volumes])
    targets = F.softmax((logits - trainer.loss_fn.center) / cfg.train.teacher_temp, dim=-1)
    return SiteTeacher(targets, logits, F.normalize(trainer.teacher.head.last_layer.weight, dim=1))


def target_spread(teachers: list[SiteTeacher]) -> dict[str, float]:
    """Between every two sites, on the same scans: JS divergence of the targets and how often
    they pick the same prototype; correlation of the raw logits (1: the same scores); cosine
    of corresponding prototypes (1: the same prototypes). Per site: prototypes its targets
    pick and their entropy (ln K: uniform)."""
    js, agree, logit_corr, proto_cos = [], [], [], []
    for a, b in itertools.combinations(teachers, 2):
        mean = 0.5 * (a.targets + b.targets)
        kl = lambda p: (p * (p.clamp_min(1e-12).log() - mean.clamp_min(1e-12).log())).sum(-1)  # noqa: E731
        js.append(float((0.5 * kl(a.targets) + 0.5 * kl(b.targets)).mean()))
        agree.append(float((a.targets.argmax(-1) == b.targets.argmax(-1)).float().mean()))
        centred_a = a.logits - a.logits.mean(-1, keepdim=True)
        centred_b = b.logits - b.logits.mean(-1, keepdim=True)
        logit_corr.append(float(F.cosine_similarity(centred_a, centred_b, dim=-1).mean()))
        proto_cos.append(float((a.prototypes * b.prototypes).sum(-1).mean()))
    return {
        "js_divergence": float(np.mean(js)),
        "argmax_agreement": float(np.mean(agree)),
        "logit_correlation": float(np.mean(logit_corr)),
        "prototype_cosine": float(np.mean(proto_cos)),
        "prototypes_used": float(np.mean([len(set(t.targets.argmax(-1).tolist())) for t in teachers])),
        "target_entropy": float(np.mean([float(-(t.targets * t.targets.clamp_min(1e-12).log()).sum(-1).mean()) for t in teachers])),
    }


def run_arm(data: TuningSet, cache_root: Path, run_dir: Path, overrides: list[str], seed: int) -> dict[str, Any]:
    cfg = load_simulation_config(["secagg.enabled=false", "monitor.enabled=false", *overrides])
    nodes = list(range(1, len(data.caches) + 1))
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(),
                   run_config={"data-dir": str(cache_root), "run-dir": str(run_dir)})
        for i, n in enumerate(nodes)
    }
    _RecordingTrainer.dino = {}
    original, client_app.LocalTrainer = client_app.LocalTrainer, _RecordingTrainer  # type: ignore[misc]
    started = time.perf_counter()
    try:
        recorder = run_federation(InProcessGrid({"train": client_app.train}, nodes, contexts=contexts), cfg, run_dir)
    finally:
        client_app.LocalTrainer = original  # type: ignore[misc]
    seconds = time.perf_counter() - started
    rounds = cfg.federation.rounds
    dino = {
        f"site_{i}": [float(np.mean(_RecordingTrainer.dino[(cfg.train.seed + i, r)])) for r in range(rounds)]
        for i in range(len(nodes))
    }
    teachers = [site_teacher(cfg, contexts[n], data.caches[i], data.volumes) for i, n in enumerate(nodes)]
    last = run_dir / "checkpoints" / recorder.rounds[-1].checkpoint
    encoder = encoder_part(load_checkpoint(last)[0])
    features = encoder_features(cfg.model, encoder, _Scans(data.volumes), FeaturePooling.cls)
    probe = {
        task: probe_auroc(features, labels, seed)
        for task, labels in data.labels.items() if not_probeable(labels) is None
    }
    return {
        "overrides": overrides, "seconds": round(seconds, 1), "dino_loss_per_round": dino,
        "teacher_spread": target_spread(teachers), "probe_auroc_cls": probe,
        "probe_mean": float(np.mean(list(probe.values()))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=3, help="synth seed (default %(default)s)")
    parser.add_argument("--scans-per-site", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--finding-scale", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="extra Hydra overrides for both arms")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    counts = list(args.scans_per_site)
    synth = SynthConfig(
        sites=len(counts), seed=args.seed, finding_scale=args.finding_scale,
        scans_per_site=max(counts), scans_per_site_list=counts,
    )
    data = tuning_set(args.out / "data", synth, args.size)
    common = [
        f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}", f"federation.min_sites={len(counts)}",
        f"model.image_size={args.size}", f"preprocess.output_size={args.size}", *args.train,
    ]
    report: dict[str, Any] = {"command": f"python -m ctfed.simulations.studies.head_sharing {' '.join(argv)}".strip(),
                              "sites": counts, "scans": len(data.volumes), "arms": {}}
    for share in (False, True):
        name = f"share_heads={str(share).lower()}"
        print(f"{name}: {args.rounds} rounds x {args.local_steps} steps at {len(counts)} sites", flush=True)
        arm = run_arm(data, args.out / "data" / "cache", args.out / name, [*common, f"train.{name}"], args.seed)
        report["arms"][name] = arm
        spread = arm["teacher_spread"]
        print(
            f"  {arm['seconds']:.0f} s; DINO loss first -> last round per site: "
            + ", ".join(f"{s} {v[0]:.3f} -> {v[-1]:.3f}" for s, v in arm["dino_loss_per_round"].items())
            + f"\n  site teachers: JS {spread['js_divergence']:.4f} nats, argmax agreement {spread['argmax_agreement']:.3f}, "
            f"logit correlation {spread['logit_correlation']:.3f}, prototype cosine {spread['prototype_cosine']:.3f}, "
            f"prototypes used {spread['prototypes_used']:.1f}, target entropy {spread['target_entropy']:.3f}"
            f"\n  probe AUROC (CLS) mean {arm['probe_mean']:.3f}: "
            + ", ".join(f"{t} {v:.3f}" for t, v in arm["probe_auroc_cls"].items()),
            flush=True,
        )
        (args.out / "head_sharing.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out / 'head_sharing.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
