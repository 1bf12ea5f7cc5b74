"""Choose a checkpoint's instance post-processing on its TRAINING images.

Binary heads: threshold and minimum size. Instance heads (card.head "three_class" / "distance"):
also the watershed markers (marker threshold and marker minimum size, see src_models/instances.py).
The validation split stays untouched, so the validation scores in the card remain honest. The
search is two grids in turn (thresholds first, at the first of each size list; then the sizes, at
the best thresholds), so it stays a few minutes on one core. The script prints a table and the
best setting by object F1 (glands) or AJI (nuclei). With --write, it
also stores that setting in the checkpoint's card (the weights are unchanged).

--extra FIELD=V1,V2,... (repeatable) adds a third grid over other InstanceParams fields (the
marker-watershed settings: marker_opening, boundary_weight, grow, small_objects, ...; the first
value of each list should be its default), searched at the best setting of the first two; the
best combination is stored with the rest. The search covers the listed values only.

    python scripts/tune_instances.py CHECKPOINT DATA_DIR [--max-images 20] [--write]
        [--extra marker_opening=0,2,3 --extra grow=0,1,2]
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_extras(specs: list[str], params_cls) -> dict[str, list]:
    """["grow=0,1,2", "unseeded=keep,drop"] -> {"grow": [0, 1, 2], "unseeded": ["keep", "drop"]},
    each value converted to the type of the field's default."""
    out = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        field = params_cls.__dataclass_fields__.get(name)
        if field is None or not values:
            raise SystemExit(f"--extra {spec!r}: expected FIELD=V1,V2 with an InstanceParams field")
        kind = type(field.default)
        if kind is bool:
            kind = lambda v: {"true": True, "false": False}[v.lower()]  # noqa: E731
        elif field.default is None:
            raise SystemExit(f"--extra {name}: a field without a typed default cannot be searched")
        out[name] = [kind(v) for v in values.split(",") if v]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="dataset folder with images/ and masks/")
    ap.add_argument("--max-images", type=int, default=12)
    ap.add_argument("--thresholds", default="0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--min-sizes", default="")
    ap.add_argument("--marker-thresholds", default="0.4,0.5,0.6,0.7,0.8",
                    help="instance heads only")
    ap.add_argument("--marker-min-sizes", default="", help="instance heads only")
    ap.add_argument("--extra", action="append", default=[], metavar="FIELD=V1,V2",
                    help="another InstanceParams field to search (repeatable), after the others")
    ap.add_argument("--tta", action="store_true", help="tune on flip-averaged probabilities")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="store the best setting in the checkpoint's card")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from src_models import metrics as M
    from src_models.checkpoints import load_checkpoint, save_checkpoint
    from src_models.data import load_samples, split_names
    from src_models.inference import predict
    from src_models.instances import InstanceMaker, InstanceParams
    from src_models.targets import head_of

    model, card = load_checkpoint(args.checkpoint)
    recorded = (card.data_split or {}).get("train")
    # The card's own record of its training images; the folder's split for older cards.
    train_names = sorted(recorded) if recorded else split_names(args.data)[0]
    names = train_names[:: max(1, len(train_names) // args.max_images)][: args.max_images]
    samples = load_samples(args.data, names)
    probs = [predict(model, s.image, card, tta=args.tta) for s in samples]
    glands = card.task == "glands"
    head = head_of(card)
    default_sizes = "200,100,300,500" if glands else "12,8,20,30"
    sizes = _ints(args.min_sizes or default_sizes)
    thresholds = _floats(args.thresholds)
    if head == "binary":
        marker_thresholds, marker_sizes = [None], [None]
    else:
        marker_thresholds = _floats(args.marker_thresholds)
        marker_sizes = _ints(args.marker_min_sizes or ("0,50,200" if glands else "0,4,10"))
    key = "object_f1" if glands else "aji"
    makers = [InstanceMaker(p, card) for p in probs]
    extras = parse_extras(args.extra, InstanceParams)

    def score(thr, size, mthr, msize, extra=None) -> tuple:
        objects, dice = [], []
        for s, maker in zip(samples, makers):
            settings = dict(threshold=thr, min_size=size, marker_threshold=mthr, marker_min_size=msize)
            labels = maker.labels(**(settings | (extra or {})))   # an --extra field may re-search one of these
            objects.append(M.object_f1(s.mask, labels).f1 if glands else M.aji(s.mask, labels))
            dice.append(M.dice(s.mask > 0, labels > 0))
        return (thr, size, mthr, msize, float(np.mean(objects)), float(np.mean(dice)), dict(extra or {}))

    rows = [score(t, sizes[0], m, marker_sizes[0]) for t, m in itertools.product(thresholds, marker_thresholds)]
    best = max(rows, key=lambda r: (r[4], r[5]))
    rows += [score(best[0], z, best[2], mz) for z, mz in itertools.product(sizes, marker_sizes)
             if (z, mz) != (sizes[0], marker_sizes[0])]
    if extras:
        best = max(rows, key=lambda r: (r[4], r[5]))
        names_x = list(extras)
        rows += [score(*best[:4], dict(zip(names_x, combo)))
                 for combo in itertools.product(*extras.values())]
    print(f"{len(samples)} training images of {args.data} (head {head}); {key} and pixel Dice by setting\n")
    print(f"| threshold | min size | marker threshold | marker min size | other | {key} | dice |\n"
          f"|---|---|---|---|---|---|---|")
    for r in rows:
        other = ", ".join(f"{k} {v}" for k, v in r[6].items()) or "-"
        print(f"| {r[0]:.2f} | {r[1]} | {'-' if r[2] is None else r[2]} | {'-' if r[3] is None else r[3]} "
              f"| {other} | {r[4]:.4f} | {r[5]:.4f} |")
    best = max(rows, key=lambda r: (r[4], r[5]))
    chosen = {"threshold": best[0], "min_size": best[1]}
    if head != "binary":
        chosen |= {"marker_threshold": best[2], "marker_min_size": best[3]}
    chosen |= best[6]
    print(f"\nbest: {json.dumps(chosen)} ({key} {best[4]:.4f})")
    if args.write:
        card.instance_params = dict(card.instance_params) | chosen
        card.training = dict(card.training) | {"instance_tuning": {
            "images": names, "criterion": key, "tta": args.tta, **chosen,
            **({"searched": {k: list(v) for k, v in extras.items()}} if extras else {})}}
        save_checkpoint(model, args.checkpoint, card)
        print(f"wrote the setting into {args.checkpoint}: {json.dumps(card.instance_params)}")


if __name__ == "__main__":
    main()
