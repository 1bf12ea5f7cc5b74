"""Train a segmentation model on an annotated folder (`napari-dca train`).

Random crops at the tile size from full-resolution images (or, as an option for comparison with
the paper's table, whole images resized to 224x224), H&E-aware augmentation, Dice + cross-entropy,
AdamW with warm-up and cosine decay, early stopping on validation Dice, a time budget, resumable,
seeded. The best model so far is always on disk as a checkpoint with a complete card.

Files: the checkpoint is `checkpoints.checkpoint_path(cfg.out)` (the user's suffix kept:
`mymodel.v2` -> `mymodel.v2.safetensors`), its resume state `<stem>.resume.pt` beside it; both are
written atomically (safe_write). An existing checkpoint is refused unless cfg.overwrite (or
cfg.resume, which continues the run that wrote it). A cancel before the first validation writes
nothing. A NaN/inf loss (or weights) stops training: nothing more is written, so the last good
checkpoint on disk stays as it was.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .augment import AugmentConfig, colour, geometric, random_crop
from .checkpoints import CheckpointError, ModelCard, card_for, checkpoint_path, non_finite_weights, \
    save_checkpoint
from .data import Sample, load_samples, split_names
from .inference import predict, select_device
from .instances import foreground_probability
from .losses import dice_ce_loss, labels_to_target, touching_gap_weights
from .targets import BOUNDARY_WIDTH, DISTANCE_LEVELS, GAP_RADIUS, check_head, head_channels, instance_target
from .preprocess import DEFAULT_NORMALIZATION, as_float01, normalize
from .registry import build_model

# Per-task defaults for turning probabilities into objects (see instances.py).
INSTANCE_DEFAULTS = {
    "nuclei": {"mode": "nuclei", "threshold": 0.5, "min_size": 12, "min_distance": 3},
    "glands": {"mode": "glands", "threshold": 0.5, "min_size": 200, "fill_holes": True},
    "semantic": {"mode": "semantic", "threshold": 0.5, "min_size": 0},
}
# Marker settings of the instance heads before `scripts/tune_instances.py` chooses them.
MARKER_DEFAULTS = {"marker_threshold": 0.5, "marker_min_size": 0}
# Inner-rim width of the three-class boundary, per task: nuclei are ~10 px across, glands ~100.
BOUNDARY_WIDTHS = {"nuclei": 1, "glands": 3}
CLASS_NAMES = {"three_class": ["background", "interior", "boundary"],
               "distance": ["background"] + [f"distance_level_{k}" for k in range(1, DISTANCE_LEVELS + 1)]}

LICENCES = {
    "GlaS": "Trained on GlaS (Warwick-QU, MICCAI 2015): research use only, no commercial use. "
            "Cite Sirinukunwattana et al. 2015 (TMI) and 2017 (MedIA).",
    "MoNuSeg": "Trained on MoNuSeg (MICCAI 2018), CC BY-NC-SA 4.0. Cite Kumar et al. 2017 and 2019 (TMI).",
}


@dataclass
class TrainConfig:
    data: str                                   # folder with images/ and masks/
    out: str                                    # checkpoint path (.safetensors)
    task: str = "nuclei"                        # nuclei | glands | semantic
    architecture: str = "unet"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"dca": True, "width": 0.125})
    protocol: str = "tiles"                     # tiles (native resolution) | paper (resize to 224)
    tile_size: int = 256
    batch_size: int = 8
    steps: int = 2000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    val_every: int = 100
    patience: int = 10                          # validations without improvement before stopping
    max_minutes: float | None = None            # stop (keeping the best model) after this long
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    resume: bool = False
    init: str | None = None                     # start from this checkpoint's weights (its card: parent)
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    augment: dict[str, Any] = field(default_factory=dict)
    instance_params: dict[str, Any] | None = None
    trained_on: str = ""
    gap_weight: float = 1.0                     # CE weight on gaps between touching instances (1 = off)
    gap_radius: int = 6                         # pixels: how close two instances must be for a gap
    overwrite: bool = False                     # replace an existing checkpoint at `out`
    head: str = "binary"                        # targets.HEADS: what the model learns to output
    boundary_width: int | None = None           # three_class rim (pixels); None: BOUNDARY_WIDTHS[task]
    select_on: str | None = None                # "dice" | "objects" (object F1 / AJI); None: by head
    validate: bool = True                       # False: train on every image (train + validation
                                                # split) for `steps`, no early stopping: the final
                                                # weights of a recipe chosen on the validation split
    focus_crops: str | None = None              # JSON of hard-negative centres per image
                                                # (benchmarks/find_false_glands.py); None: off
    focus_fraction: float = 0.0                 # share of crops drawn around those centres
                                                # (random_crop's centre, quarter-window jitter)

    def target_settings(self) -> dict[str, int]:
        """instance_target's settings, recorded in the card (training["target"]) for fine-tuning."""
        width = self.boundary_width or BOUNDARY_WIDTHS.get(self.task, BOUNDARY_WIDTH)
        return {"boundary_width": int(width), "gap_radius": GAP_RADIUS, "levels": DISTANCE_LEVELS}

    def selection_metric(self) -> str:
        chosen = self.select_on or ("dice" if self.head == "binary" else "objects")
        if chosen not in ("dice", "objects"):
            raise ValueError(f"select_on must be 'dice' or 'objects', got {chosen!r}")
        return "dice_native" if chosen == "dice" or self.task not in ("glands", "nuclei") else "objects"


# A NaN/inf loss skips its step (float16 autocast can overflow once); this many in a row stop the run.
MAX_NON_FINITE_STEPS = 3


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN/inf; the message says what was kept."""


def resume_path(out: str | Path) -> Path:
    """The resume state beside a checkpoint: mymodel.v2.safetensors -> mymodel.v2.resume.pt."""
    return checkpoint_path(out).with_suffix(".resume.pt")


def check_output(cfg: "TrainConfig") -> Path:
    """The checkpoint path for cfg.out; FileExistsError when it exists and neither cfg.overwrite
    nor cfg.resume allows replacing it; ValueError for --resume without a resume file."""
    out = checkpoint_path(cfg.out)
    if cfg.resume and not resume_path(out).exists():
        raise ValueError(f"no {resume_path(out).name} to resume from beside {out}; train without "
                         f"--resume (with --overwrite to replace {out.name})")
    if out.exists() and not (cfg.overwrite or cfg.resume):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, --resume to continue "
                              f"its run, or choose another -o")
    from .safe_write import check_output_path
    check_output_path(out)
    return out


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save into memory, then an atomic write: a kill never leaves a truncated file."""
    import io

    from .safe_write import write_bytes_atomic
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "best", "bad", "history", "best_metrics")


def load_resume_state(path: Path) -> dict[str, Any]:
    """The resume state, read weights-only (no code is unpickled); CheckpointError in one line for
    a truncated or foreign file."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name}: empty file; delete it and train without --resume")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError ...
        raise CheckpointError(f"{path.name} cannot be read ({type(err).__name__}: {err}); it is "
                              f"truncated or not a resume file: delete it and train without --resume") from err
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path.name} is not a napari-dca resume file (missing {missing}); "
                              f"delete it and train without --resume")
    return state


class TileSampler:
    """Draws augmented (image, target) batches from in-memory samples, images chosen by area."""

    def __init__(self, samples: list[Sample], cfg: TrainConfig, in_channels: int, num_classes: int):
        self.samples = samples
        self.cfg = cfg
        self.aug = AugmentConfig(**cfg.augment)
        self.in_channels = in_channels
        self.num_classes = num_classes
        areas = np.array([s.mask.size for s in samples], dtype=np.float64)
        self.p = areas / areas.sum()
        self.focus = focus_centres(cfg, samples)
        if cfg.protocol == "paper":  # the paper: whole images resized to 224 x 224
            from skimage.transform import resize
            self.samples = [Sample(s.name,
                                   (resize(s.image, (224, 224, 3), order=1, preserve_range=True,
                                           anti_aliasing=True)).astype(np.uint8),
                                   resize(s.mask, (224, 224), order=0, preserve_range=True,
                                          anti_aliasing=False).astype(s.mask.dtype))
                            for s in samples]

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, targets, per-pixel CE weights or None when gap weighting is off)."""
        xs, ys, ws = [], [], []
        for _ in range(self.cfg.batch_size):
            centre = None
            if self.focus and rng.random() < self.cfg.focus_fraction:  # no draw when focus is off
                i, *centre = self.focus[rng.integers(len(self.focus))]
                s = self.samples[i]
            else:
                s = self.samples[rng.choice(len(self.samples), p=self.p)]
            if self.cfg.protocol == "paper":
                img, msk = s.image, s.mask
            else:
                scale = float(np.exp(rng.uniform(*np.log(self.cfg.scale_jitter))))
                img, msk = random_crop(s.image, s.mask, self.cfg.tile_size, rng, scale=scale, centre=centre)
            img, msk = geometric(img, msk, self.aug, rng)
            img01 = colour(as_float01(img), self.aug, rng)
            xs.append(normalize(img01 if self.in_channels == 3 else img01.mean(-1, keepdims=True),
                                DEFAULT_NORMALIZATION))
            if self.cfg.head == "binary":
                ys.append(labels_to_target(msk, self.num_classes))
            else:
                ys.append(instance_target(msk, self.cfg.head, **self.cfg.target_settings()))
            if self.cfg.gap_weight != 1.0:
                ws.append(touching_gap_weights(msk, self.cfg.gap_radius, self.cfg.gap_weight))
        weights = torch.from_numpy(np.stack(ws)) if ws else None
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), weights


def focus_centres(cfg: TrainConfig, samples: list[Sample]) -> list[tuple[int, int, int]]:
    """(sample index, row, col) of every centre in cfg.focus_crops (find_false_glands.py's JSON:
    {"images": {name: {"centres": [{"row", "col"}, ...]}}}) whose image is among `samples`;
    [] when focus is off. Centres of images not trained on (validation images) are ignored; a file
    that matches none of the samples is an error, not a silent no-op."""
    if not cfg.focus_crops or cfg.focus_fraction <= 0:
        return []
    if cfg.protocol == "paper":
        raise ValueError("focus_crops needs the tiles protocol (the paper protocol does not crop)")
    listed = json.loads(Path(cfg.focus_crops).read_text())["images"]
    index = {s.name: i for i, s in enumerate(samples)}
    out = [(index[name], int(c["row"]), int(c["col"])) for name, entry in sorted(listed.items())
           if name in index for c in entry["centres"]]
    if not out:
        raise ValueError(f"{cfg.focus_crops}: none of its {len(listed)} images is a training image here")
    return out


def predict_probabilities(model: torch.nn.Module, image: np.ndarray, tile_size: int,
                          device: torch.device, normalization=DEFAULT_NORMALIZATION) -> np.ndarray:
    """Foreground probability (H, W) for validation, through the same tiled, blended inference the
    plugin and `napari-dca segment` use."""
    card = ModelCard(architecture=getattr(model, "registry_name", "unet"),
                     model_kwargs=dict(getattr(model, "config", {})),
                     normalization=dict(normalization), tile_size=tile_size)
    prob = predict(model, image, card, device=str(device))
    return foreground_probability(prob, multiclass=prob.ndim == 3)


def validate(model: torch.nn.Module, samples: list[Sample], cfg: TrainConfig, device: torch.device,
             threshold: float = 0.5) -> dict[str, float]:
    """Mean per-image Dice at native resolution and on 224x224 nearest-resized masks (the paper's
    metric protocol, `metrics.pixel_scores`). The paper protocol predicts on images resized to 224."""
    from skimage.transform import resize

    from .metrics import pixel_scores, resize_nearest
    model.eval()
    native, paper, objects = [], [], []
    for s in samples:
        gt = s.mask > 0
        if cfg.protocol == "paper":
            img = resize(s.image, (224, 224, 3), order=1, preserve_range=True, anti_aliasing=True).astype(np.uint8)
            prob = predict_probabilities(model, img, 224, device)
            paper.append(pixel_scores(resize_nearest(gt), prob > threshold)["dice"])
            pred = resize(prob, gt.shape, order=1) > threshold
        elif cfg.head != "binary" and cfg.task in ("glands", "nuclei"):
            objects_score, pred = _object_validation(model, s, cfg, device)
            objects.append(objects_score)
            paper.append(pixel_scores(gt, pred, "paper")["dice"])
        else:
            pred = predict_probabilities(model, s.image, cfg.tile_size, device) > threshold
            paper.append(pixel_scores(gt, pred, "paper")["dice"])
        native.append(pixel_scores(gt, pred)["dice"])
    model.train()
    out = {"dice_native": float(np.mean(native)), "dice_paper_protocol": float(np.mean(paper))}
    if objects:
        out["objects"] = float(np.mean(objects))
        out["objects_metric"] = "object_f1" if cfg.task == "glands" else "aji"
    return out


def _object_validation(model: torch.nn.Module, sample: Sample, cfg: TrainConfig,
                       device: torch.device) -> tuple[float, np.ndarray]:
    """(object F1 for glands / AJI for nuclei, predicted foreground) of an instance head, for
    choosing the step, not for reporting. Post-processing: the recipe's `instance_params` when it
    gives them (a run continuing a tuned model is selected as it will be used), else the untuned
    defaults."""
    from .instances import InstanceMaker
    from .metrics import aji, object_f1
    card = ModelCard(architecture=getattr(model, "registry_name", "unet"),
                     model_kwargs=dict(getattr(model, "config", {})), tile_size=cfg.tile_size,
                     task=cfg.task, head=cfg.head,
                     instance_params=cfg.instance_params or (INSTANCE_DEFAULTS[cfg.task] | MARKER_DEFAULTS))
    maker = InstanceMaker(predict(model, sample.image, card, device=str(device)), card)
    labels = maker.labels()
    score = object_f1(sample.mask, labels).f1 if cfg.task == "glands" else aji(sample.mask, labels)
    return float(score), labels > 0


def warm_head_offsets(head: str) -> np.ndarray | None:
    """Bias offsets of the foreground channels (1..K-1) when a binary parent's output convolution
    starts an instance head: every foreground channel copies the parent's foreground logit, and the
    offsets make 1 - P(background) equal the parent's sigmoid at step 0 (distance: the levels share
    it evenly) or nearly so (three_class: the boundary starts 20x less likely than the interior).
    The new head then starts from the parent's pixel quality and only has to learn the split."""
    if head == "three_class":
        return np.array([0.0, -3.0])
    if head == "distance":
        return np.full(DISTANCE_LEVELS, -math.log(DISTANCE_LEVELS))
    return None


def init_from(model: torch.nn.Module, checkpoint: str, architecture: str, head: str = "binary") -> list[str]:
    """Load a parent checkpoint's weights into `model`. From a binary parent with another number
    of output channels (a binary model starting a three-class one), every weight but the output
    convolution is taken, and the output convolution is warm-started from the parent's
    (`warm_head_offsets`) where the head allows it, else left freshly initialised. Returns the
    names of the weights not taken from the parent as they were."""
    from .checkpoints import load_checkpoint
    parent, parent_card = load_checkpoint(checkpoint)
    # patch_size only sets DCA's token grid (pooling size), not any weight's shape: a model with a
    # finer token grid (the "accurate" variants) starts from the fast one's weights.
    shape_free = {"num_classes", "patch_size"}
    same_body = {k: v for k, v in parent_card.model_kwargs.items() if k not in shape_free} == \
        {k: v for k, v in model.config.items() if k not in shape_free}
    if parent_card.architecture != architecture or not same_body:
        raise ValueError(f"--init checkpoint {checkpoint} is a {parent_card.architecture} with "
                         f"{parent_card.model_kwargs}, not the requested {architecture} with {model.config}")
    ours, theirs = model.state_dict(), parent.state_dict()
    taken = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    offsets = warm_head_offsets(head) if parent_card.num_classes == 1 else None
    for k, v in theirs.items():
        if k in taken or k not in ours or offsets is None or v.shape[0] != 1 \
                or ours[k].shape[0] != len(offsets) + 1 or ours[k].shape[1:] != v.shape[1:]:
            continue
        warm = torch.zeros_like(ours[k])
        warm[1:] = v.expand_as(warm[1:])
        if v.ndim == 1:  # the bias: the offsets go there
            warm[1:] += torch.as_tensor(offsets, dtype=warm.dtype)
        taken[k] = warm
    model.load_state_dict(taken, strict=False)
    return sorted(set(ours) - set(k for k in taken if k in theirs and theirs[k].shape == ours[k].shape))


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None,
          cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train and write the best checkpoint to cfg.out. Returns a summary dict.

    progress(info) is called after every step with step, steps, loss and the last validation;
    cancel() is checked between steps (the best model so far stays on disk)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = select_device(cfg.device)
    root = Path(cfg.data)
    train_names, val_names = split_names(root)
    if not train_names or not val_names:
        raise ValueError(f"{root} has {len(train_names) + len(val_names)} image/mask pair(s); training "
                         f"needs at least 2 (one is held out for validation)")
    if not cfg.validate:
        train_names, val_names = sorted(train_names + val_names), []
    train_samples, val_samples = load_samples(root, train_names), load_samples(root, val_names)

    check_head(cfg.head)
    model_kwargs = dict(cfg.model_kwargs)
    if cfg.head != "binary":
        model_kwargs["num_classes"] = head_channels(cfg.head)
    model = build_model(cfg.architecture, **model_kwargs).to(device)
    reinitialised: list[str] = []
    if cfg.init:
        reinitialised = init_from(model, cfg.init, cfg.architecture, cfg.head)
    in_ch = model.config["in_channels"]
    num_classes = model.config["num_classes"]
    sampler = TileSampler(train_samples, cfg, in_ch, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    out = check_output(cfg)
    state_path = resume_path(out)
    start, best, best_metrics, history, bad = 0, -1.0, {}, [], 0
    if cfg.resume:
        st = load_resume_state(state_path)
        try:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            start, best, bad = int(st["step"]), float(st["best"]), int(st["bad"])
            history = json.loads(st["history"])
            best_metrics = json.loads(st["best_metrics"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{state_path.name} was written for another model or settings "
                                  f"({str(err).splitlines()[0][:160]}); resume with the same --arch, "
                                  f"--width and --model-kwargs, or train without --resume") from err
        rng = np.random.default_rng([cfg.seed, start])
        torch.manual_seed(cfg.seed + start)

    dataset_name = root.parent.name if root.name == "train" else root.name
    instance_params = cfg.instance_params or (INSTANCE_DEFAULTS.get(cfg.task, INSTANCE_DEFAULTS["semantic"])
                                              | (MARKER_DEFAULTS if cfg.head != "binary" else {}))
    select_key = cfg.selection_metric()

    def write_best(metrics: dict, step: int) -> None:
        card = card_for(model, normalization=dict(DEFAULT_NORMALIZATION),
                        tile_size=224 if cfg.protocol == "paper" else cfg.tile_size,
                        class_names=CLASS_NAMES.get(cfg.head) or (
                            ["foreground"] if num_classes == 1 else [f"class_{i}" for i in range(num_classes)]),
                        task=cfg.task, head=cfg.head, instance_params=dict(instance_params),
                        trained_on=cfg.trained_on or f"{dataset_name} ({len(train_names)} training images)",
                        data_split={"dataset": dataset_name, "train": train_names, "validation": val_names,
                                    "rule": "seeded 20% validation, grouped by patient where known (src_models.data.split_names)"},
                        training={k: v for k, v in asdict(cfg).items() if k not in ("out",)} | {
                            "best_step": step, "device": device.type,
                            "torch": torch.__version__, "target": cfg.target_settings(),
                            "selected_on": select_key,
                            "init_reinitialised": reinitialised},
                        metrics={"validation": metrics},
                        parent=Path(cfg.init).name if cfg.init else None,
                        licence=LICENCES.get(dataset_name, ""))
        save_checkpoint(model, out, card, overwrite=True)  # check_output allowed replacing it

    t0 = time.time()
    model.train()
    step = start
    stopped = "steps"
    non_finite = 0  # consecutive steps with a NaN/inf loss
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.task}", unit="step", dynamic_ncols=True)
    last_val: dict = best_metrics
    while step < cfg.steps:
        if cancel is not None and cancel():
            stopped = "cancelled"
            break
        if cfg.max_minutes is not None and (time.time() - t0) / 60 > cfg.max_minutes:
            stopped = "time budget"
            break
        x, y, w = sampler.batch(rng)
        x, y = x.to(device), y.to(device)
        w = None if w is None else w.to(device)
        if device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=use_amp):
            loss = dice_ce_loss(model(x).float(), y, pixel_weight=w)
        if not torch.isfinite(loss):  # skip this step; a few in a row mean the run diverged
            non_finite += 1
            if non_finite >= MAX_NON_FINITE_STEPS:
                stopped = f"non-finite loss at step {step + 1}"
                break
            continue
        non_finite = 0
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        step += 1
        history.append(loss.item())
        if step % cfg.val_every == 0 or step == cfg.steps:
            if non_finite_weights(model.state_dict()):
                stopped = f"non-finite weights at step {step}"
                break
        if not cfg.validate and (step % cfg.val_every == 0 or step == cfg.steps):
            best, best_metrics = float(step), {"step": step, "validated": False}
            write_best(best_metrics, step)  # the latest weights: there is nothing to select on
        elif step % cfg.val_every == 0 or step == cfg.steps:
            last_val = validate(model, val_samples, cfg, device) | {"step": step}
            if last_val.get(select_key, last_val["dice_native"]) > best:
                best, best_metrics, bad = last_val.get(select_key, last_val["dice_native"]), last_val, 0
                write_best(best_metrics, step)
            else:
                bad += 1
            save_resume_state(state_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "best": best, "bad": bad,
                "history": json.dumps(history), "best_metrics": json.dumps(best_metrics)})
            if bad >= cfg.patience:
                stopped = "early stopping"
                break
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}",
                        val_dice=f"{last_val.get('dice_native', float('nan')):.3f}")
        if progress is not None:
            progress({"step": step, "steps": cfg.steps, "loss": history[-1], "validation": last_val})
    bar.close()
    if stopped.startswith("non-finite"):
        kept = (f"the last good checkpoint {out.name} (step {best_metrics.get('step')}) is kept"
                if best >= 0 else "nothing was saved")
        raise TrainingDiverged(f"training diverged: {stopped}; {kept}. Lower --lr (it was {cfg.lr:g})")
    if best < 0 and stopped == "cancelled":  # cancelled before any validation: write nothing
        return {"checkpoint": None, "steps": step, "stopped": stopped, "best": {},
                "minutes": (time.time() - t0) / 60, "loss_history": history}
    if best < 0 or (not cfg.validate and best_metrics.get("step") != step):
        # Stopped by the time budget before the first validation (keep what we have), or
        # unvalidated weights newer than the last written.
        best_metrics = (validate(model, val_samples, cfg, device) if cfg.validate
                        else {"validated": False}) | {"step": step}
        write_best(best_metrics, step)
    return {"checkpoint": str(out), "steps": step, "stopped": stopped, "best": best_metrics,
            "minutes": (time.time() - t0) / 60, "loss_history": history}
