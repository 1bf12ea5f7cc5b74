"""What does a fine-tuning round change where the pathologist did not look?

Same scenario as `bench_finetune.py` (validation images, left half corrected with the ground truth,
right half unseen). `dump` runs ONE round per image with the engine's defaults and saves the old
and the trained weights' whole-image probabilities, the ground truth and the round's settings
(npz, one per image; trained weights whatever the decision). `objects` prints, for one dumped image,
every object on the unseen half before and after the round: which ground-truth gland each old /
new object covers, and which old objects a new object joins (a merge) or breaks up (a split).
`rules` replays label-free "did the round join or break objects the previous model had outside
the reviewed region" rules (`finetune_check.object_changes`) over every dumped image.

    python benchmarks/diagnose_unseen.py dump GlaS /tmp/ft_dump/GlaS --images train_18
    python benchmarks/diagnose_unseen.py objects /tmp/ft_dump/GlaS/train_18.npz
    python benchmarks/diagnose_unseen.py rules /tmp/ft_dump/GlaS /tmp/ft_dump/MoNuSeg
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_finetune import TASK  # noqa: E402
from src_models import metrics as M  # noqa: E402
from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.instances import InstanceMaker  # noqa: E402


def dump(args) -> None:
    # The same round and dump as diagnose_check.py's (engine defaults, validation images); its npz
    # files hold everything this script reads, and more.
    from diagnose_check import dump as dump_rounds
    dump_rounds(argparse.Namespace(**vars(args), variant=None, split="validation"))


def load(path: Path):
    d = np.load(path)
    meta = json.loads(str(d["meta"]))
    return d["gt"], d["old"].astype(np.float32), d["new"].astype(np.float32), meta


def _card(task: str):
    return load_checkpoint(for_validation(task))[1]


def objects(args) -> None:
    gt, old, new, meta = load(Path(args.file))
    card = _card(meta["task"])
    h, w = gt.shape
    right = np.zeros((h, w), bool)
    right[:, w // 2:] = True
    old_lab = InstanceMaker(old, card).labels(**meta["old_params"])
    new_lab = InstanceMaker(new, card).labels(**meta["new_params"])
    print(f"{meta['image']}: right-half {meta['task']} score {meta['before']:.3f} -> "
          f"{meta['trained']:.3f} (trained weights), kept={meta['kept']}: {meta['reason']}")
    print(f"old settings threshold {meta['old_params']['threshold']}, new "
          f"{meta['new_params']['threshold']} (min_size {meta['new_params']['min_size']}, "
          f"marker_threshold {meta['new_params']['marker_threshold']})")
    for name, lab in (("old", old_lab), ("new", new_lab)):
        g = np.where(right, gt, 0)
        p = np.where(right, lab, 0)
        ov = M.overlaps(M.relabel_sequential(g)[0], M.relabel_sequential(p)[0])
        print(f"\n{name} model: {len(np.unique(p)) - 1} objects on the right half "
              f"({len(np.unique(g)) - 1} ground-truth glands)")
        for j in np.unique(p[p > 0]):
            obj = p == j
            cover = {int(i): int(np.count_nonzero(obj & (g == i))) for i in np.unique(g[obj]) if i}
            ys, xs = np.nonzero(obj)
            print(f"  object {j}: {obj.sum()} px, rows {ys.min()}-{ys.max()}, cols {xs.min()}-{xs.max()}, "
                  f"covers gt {cover} (gt sizes {({i: int((g == i).sum()) for i in cover})})")
        del ov
    from src_models.finetune_check import object_changes
    ch = object_changes(old_lab, new_lab, right, int(meta["old_params"]["min_size"]))
    print(f"\nobject_changes (old -> new, right half): {ch}")


def rules(args) -> None:
    from src_models.finetune_check import object_changes
    cards = {}
    for folder in args.folders:
        print(f"\n## {folder}")
        for path in sorted(Path(folder).glob("*.npz")):
            gt, old, new, meta = load(path)
            card = cards.setdefault(meta["task"], _card(meta["task"]))
            h, w = gt.shape
            right = np.zeros((h, w), bool)
            right[:, w // 2:] = True
            old_lab = InstanceMaker(old, card).labels(**meta["old_params"])
            new_lab = InstanceMaker(new, card).labels(**meta["new_params"])
            ch = object_changes(old_lab, new_lab, right, int(meta["old_params"]["min_size"]))
            print(f"{meta['image']:14s} before {meta['before']:.3f} trained {meta['trained']:.3f} "
                  f"({meta['trained'] - meta['before']:+.3f}) kept={str(meta['kept']):5s} | {ch}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("dataset", choices=sorted(TASK))
    d.add_argument("out")
    d.add_argument("--images", default=None)
    o = sub.add_parser("objects")
    o.add_argument("file")
    r = sub.add_parser("rules")
    r.add_argument("folders", nargs="+")
    args = ap.parse_args()
    {"dump": dump, "objects": objects, "rules": rules}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
