"""Structured configs: every knob of a run, with its meaning, in one place.

The YAML files under conf/ and the registries (registry/: every source and model option) pick
values; these dataclasses fix the keys and types, so a misspelt key (``train.epoch=5``) or a wrong
type fails when Hydra composes the config, before any work. Defaults are the paper's
(docs/study.md, "Training"); the data, model and source options override them per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

class ConfigError(ValueError):
    """Bad user input: the message says what was wrong, what is valid, and what to do."""


@dataclass
class DataConfig:
    name: str = MISSING  # digits | cifar10 | cifar100 | mnist | npz | folder (run/data.py; docs/models.md)
    # where the data are: the folder holding cifar-10-batches-py / cifar-100-python / MNIST's files,
    # the .npz file (data=npz), or the folder holding train/ and test/ (data=folder)
    root: Optional[str] = "data"  # null (data=npz, folder): must be given
    download: bool = False  # let torchvision download CIFAR into `root` if it is missing
    verify_md5: bool = True  # CIFAR/MNIST files must match the published md5s; false only for reduced copies (recorded)
    num_classes: Optional[int] = None  # output width of the model's last layer; null = from the data (npz, folder)
    channels: Optional[int] = 3  # input channels (digits, mnist: 1); null = from the data
    image_size: Optional[int] = 32  # height = width of the stored images (digits: 8); null = from the data
    pad: int = 4  # training crop: zero-pad by this many pixels, crop back to image_size (0 = no crop)
    flip: bool = True  # training augmentation: random horizontal flip with p = 0.5
    # Which image gets the k-th crop/flip draw of an epoch (docs/sources.md, "Shuffle and augmentation"):
    # by_position = the k-th sample visited (the authors' pipeline: a new shuffle seed also re-assigns
    # every image's augmentation); by_image = image k (a new shuffle seed changes the order only).
    augment_draw: str = "by_position"
    # per channel, 0..1 scale; null = the training split's (npz, folder: recorded in run.json)
    mean: Optional[List[float]] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: Optional[List[float]] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])
    train_subset: Optional[int] = None  # keep only the first k training images (quick checks); null = all
    test_subset: Optional[int] = None  # keep only the first k test images (quick checks); null = all
    test_size: int = 497  # digits only: size of the fixed stratified test split (split seed 0)
    layout: str = "auto"  # npz only: images [N,H,W,C] (NHWC) or [N,C,H,W] (NCHW); auto decides when unambiguous
    max_side: int = 256  # folder only: the largest image side accepted (images are never resized)
    max_bytes: int = 2 << 30  # npz/folder: the most bytes of decoded images (or of one .npz file) accepted
    # npz/folder: SHA-256 of the .npz file / of the folder's file list with each file's SHA-256. Filled in
    # before the run id is made (registry/inputs.py): a dataset's content, not its path, is its identity
    fingerprint: Optional[str] = None


@dataclass
class ModelConfig:
    """What every model has; each family's schema below adds the keys of its builder.

    Every key of ``model`` is part of the run id, so a family's keys are its own: adding a family
    (a schema here, a builder in run/zoo/build.py, entries in registry/models.py) leaves the ids of
    every other family's runs as they are. Families without keys (linear, mnist_cnn) use this one.
    """
    name: str = MISSING  # the option model=NAME: an entry of registry/models.py (docs/models.md)


@dataclass
class ResNetConfig(ModelConfig):
    """The "resnet" family: this package's CIFAR-style ResNets (run/models.py, ResNet)."""
    widths: List[int] = MISSING  # channels of each stage; the stem has widths[0] channels
    blocks: List[int] = MISSING  # basic blocks per stage
    shortcut: str = "A"  # A: subsample + BN + zero channels (paper's ResNet-14); B: 1x1 conv + BN


@dataclass
class CifarResNetConfig(ModelConfig):
    """The "cifar_resnet" family: the authors' CIFAR ResNets, option A (run/zoo/cifar_resnet.py)."""
    widths: List[int] = MISSING  # channels of each stage (may only grow)
    blocks: List[int] = MISSING  # basic blocks per stage


@dataclass
class HiddenFCConfig(ModelConfig):
    hidden: int = 512  # units of the hidden fully connected layer (hiddennet1)


@dataclass
class HiddenConvConfig(ModelConfig):
    channels: int = 64  # channels of the hidden 5x5 stride-2 conv layer (hiddennet2)


@dataclass
class VGGConfig(ModelConfig):
    depth: int = MISSING  # 11 | 13 | 16


@dataclass
class ShuffleNetConfig(ModelConfig):
    size: float = MISSING  # 0.5 | 1.0


@dataclass
class TorchvisionResNetConfig(ModelConfig):
    depth: int = MISSING  # 18 | 34 | 50


@dataclass
class CustomConfig(ModelConfig):
    """model=custom: the researcher's own nn.Module (docs/own_model.md)."""
    factory: Optional[str] = None  # package.module:function returning an nn.Module (importable from here)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory (plain values)
    # SHA-256 of the factory module's source file, filled in before the run id is made
    # (registry/inputs.py): editing the model makes new runs
    source_sha256: Optional[str] = None


@dataclass
class SourceConfig:
    name: str = MISSING  # the option source=NAME: an entry of registry/sources.py (none, init, ..., all)
    label: str = MISSING  # row name in the paper's tables, e.g. "Parameter Initialization"
    vary: List[str] = field(default_factory=list)  # streams seeded by the replicate seed; others get 1
    deterministic_kernels: bool = True  # GPU: deterministic cuDNN/cuBLAS (false = the cudnn source)
    # the parameter the bit change moves (a name of model.named_parameters()); null = the model's entry in
    # registry/models.py (the first layer's weight), for model=custom the first weight in registration order
    bitflip_param: Optional[str] = None
    # the epoch from which the source applies (docs/experiments/stability.md): 0 = from the start (every
    # source as before); k > 0 = the first k epochs are the determinism control's (trained once, by the
    # parent run), then the bit change at the start of epoch k, the varied shuffle/augment streams seeded
    # with the replicate seed from epoch k on, the kernel switch from epoch k on. Refused for init.
    from_epoch: int = 0


@dataclass
class TrainConfig:
    epochs: int = 500  # total epochs (docs/study.md: 500; the report also uses 100..400)
    batch_size: int = 512  # SGD batch; the last batch of an epoch may be smaller
    lr: float = 0.4  # peak LR of conv and linear weights
    lr_scale_bias_bn: float = 0.1  # the small group (see param_groups) uses lr * this (peak 0.04)
    # Which parameters train at lr * lr_scale_bias_bn: authors = the authors' name rule (every bias,
    # every BN scale except the shortcut BN's, which trains at the full peak); by_type = every
    # parameter that is not a conv/linear weight (all BN scales and biases). train.py, param_groups.
    param_groups: str = "authors"
    momentum: float = 0.9  # SGD momentum (PyTorch's, no Nesterov)
    weight_decay: float = 5e-4  # on all parameters, as in the study's code
    warmup_epochs: float = 3.0  # linear warm-up from 0 to the peak, per cycle
    snapshots: int = 1  # cycles of warm-up + cosine-to-0 in the same budget; >1 = accelerated ensembling
    checkpoint_every: int = 10  # epochs between checkpoints (also at every snapshot and at the end)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # torch CPU threads; 0 = torch's default here (on SLURM: the launcher's cpus_per_task). Results
    # differ with the thread count, so the count (0 resolved) is part of the run id
    threads: int = 0
    # Memory format of activations: auto = NCHW for fp32/tf32 and on CPU, channels_last for amp on
    # CUDA (until gpu_check.sh measures otherwise) | true | false. run.json `step` has the result.
    channels_last: str = "auto"
    # Arithmetic of the training step (docs/performance.md): fp32 = IEEE float32 everywhere (the
    # protocol, default); tf32 = TensorFloat-32 convolutions/matmuls on Ampere+ GPUs (no effect on
    # CPU or a V100); amp_fp16 = autocast float16 with loss scaling (GradScaler); amp_bf16 = autocast
    # bfloat16. Part of the run identity, so the reducer never puts two precisions in one group.
    # Evaluation always runs in float32 (with TF32 under tf32). sources.precision_record, step.py.
    precision: str = "fp32"
    # Capture the full-size training step in a CUDA graph: auto = on for CUDA (not with amp_fp16),
    # off on CPU | true (refused on CPU) | false. The captured step uses SGD's fused kernel with
    # device-tensor LRs (step.StaticStep), so it is part of the run identity; docs/performance.md.
    cuda_graph: str = "auto"
    # Retired: replaced by train.precision (ieee -> fp32, tf32 -> tf32). Any value is refused with
    # that message (task.validate); kept only so an old override gets the message, not a schema error.
    fp32_precision: Optional[str] = None


@dataclass
class EvalConfig:
    views: List[str] = field(default_factory=lambda: ["plain"])  # logits/<view>.npy written at the end
    features: bool = False  # also save penultimate features (features.npy) for CKA
    batch_size: int = 500  # images per forward pass at evaluation


@dataclass
class StudyTargetConfig:
    # Precision targets of a study grown in waves (docs/experiments/planning.md, "Waves"); a group
    # stops when every target set here is met. null = no such target.
    acc_sd_se: Optional[float] = None  # bootstrap SE of the accuracy SD, in percentage points
    ce_sd_se: Optional[float] = None  # bootstrap SE of the cross-entropy SD, in nats


@dataclass
class StudyConfig:
    # Grow a SLURM sweep in waves until its precision target is met (sweep/waves.py, advanced by cluster/advance.py). Off while no
    # target is set: the sweep is submitted whole, as always. Bookkeeping: never part of a run's identity.
    target: StudyTargetConfig = field(default_factory=StudyTargetConfig)
    wave: int = 10  # seeds per group per wave: the first `wave` seeds of the sweep, then the next ones
    # most models per group; null = every seed the sweep names (min(max_models, seeds swept) when both)
    max_models: Optional[int] = None


@dataclass
class RecordConfig:
    # What a run keeps of its training besides the logits (docs/metrics.md, "Instability"; the files'
    # formats: records/). Bookkeeping: recording never changes a bit of training, so no key is part
    # of the run id. Keep the settings a run started with when it resumes (a checkpoint refuses others).
    trajectory: bool = True  # trajectory.npz: fingerprint, norms, sketch, probe logits at the grid's points
    weights: bool = True  # weights.safetensors: the final parameters and BatchNorm buffers
    weights_max_params: int = 50_000_000  # no weights file for a larger model (run.json says why)
    step_base: int = 2  # first epoch: steps 1, b, b^2, ... (2 = log2 grid, 1 = every step, 0 = none)
    epoch_base: int = 2  # epoch ends 1, e, e^2, ... (2 = log2 grid, 0 = none); the last epoch always
    extra_epochs: List[int] = field(default_factory=list)  # more epoch ends to record (e.g. [5, 10])
    # epochs at whose end a copy of the full checkpoint is kept (checkpoints/epoch-K.pt; recorded in the
    # trajectory too, so a run started from it can check its fingerprint)
    keep_checkpoints: List[int] = field(default_factory=list)
    sketch_dim: int = 4096  # buckets of the count sketch (its distance error ~ 1/sqrt(2 D): 1.1 %)
    probe: int = 512  # test examples whose logits are kept at each point (evenly spaced; digits: 256)


@dataclass
class BarrierConfig:
    # Loss barriers between pairs of runs of each group (docs/experiments/stability.md), computed after
    # the runs (locally before the report; on SLURM by a job behind the arrays). Bookkeeping.
    pairs: int = 0  # at most this many pairs per group (all pairs when a group has that few); 0 = none
    points: int = 11  # points on the straight line between two final models, end points included
    bn_images: int = 5000  # training images the BatchNorm statistics are recomputed on at each point


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    source: SourceConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1  # replicate index (1..N): the seed of every stream named in source.vary
    out_dir: str = "outputs/default"  # the sweep folder: runs go to out_dir/runs/<run id>/
    force: bool = False  # retrain a run even if it is DONE (its old folder is moved aside, never deleted)
    experiment: Optional[str] = None  # name of the experiment preset, if one was used (set by the preset)
    study: StudyConfig = field(default_factory=StudyConfig)  # waves until a precision target (SLURM sweeps)
    record: RecordConfig = field(default_factory=RecordConfig)  # weights and trajectory files (bookkeeping)
    barriers: BarrierConfig = field(default_factory=BarrierConfig)  # loss barriers after the runs (bookkeeping)


def threads_for(threads: int, *, cpus: int | None = None, runs_per_task: int = 1,
                local_default: int | None = None) -> int:
    """The thread count a run computes with: THE rule, used wherever a run id is made.

    ``train.threads`` > 0 is taken as it is. ``train.threads=0`` resolves, on SLURM (``cpus`` =
    the task's ``cpus_per_task``), to the run's share of the task's CPUs, ``cpus // runs_per_task``
    (at least 1; K packed runs split one allocation), and elsewhere to ``local_default``, torch's
    pool size in the process that trains (its default, or OMP_NUM_THREADS). On CPU the thread
    count changes results, so the resolved count is part of the run's identity (run ids).
    """
    if threads < 0:
        raise ConfigError(f"train.threads={threads} is invalid: 0 keeps torch's default, N >= 1 sets N threads.")
    if threads > 0:
        return int(threads)
    if cpus is not None:
        return max(1, int(cpus) // max(1, int(runs_per_task)))
    if local_default is None:
        raise ValueError("threads_for: train.threads=0 needs cpus (SLURM) or local_default (torch's pool size)")
    return int(local_default)


def conf_dir() -> str:
    """conf/ inside an installed wheel, else the repository's top-level conf/ (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"nondet_hpc: no conf/config.yaml beside {here}; reinstall the package.")


#: Top-level config nodes that can decide what a run computes; every other top-level key
#: (out_dir, force, eval, experiment, study, record, barriers) is bookkeeping.
IDENTITY_ROOTS = ("data", "model", "source", "train", "seed")

#: Config keys that never change the trained model, so they are never part of a run's identity:
#: moving a sweep, adding an evaluation view or changing the checkpoint interval keeps run ids,
#: and the SLURM launcher never compares them between submissions of one sweep folder. The ONE
#: list: identity_items and the launcher both use it.
BOOKKEEPING_KEYS = ("force", "out_dir", "experiment", "study", "eval", "record", "barriers", "train.checkpoint_every",
                    "data.root", "data.download", "data.verify_md5", "data.max_side", "data.max_bytes")


#: Keys kept in the schema only to refuse them with the name of their replacement: never part of
#: the identity (validate refuses any value but null).
RETIRED_KEYS = {"train.fp32_precision": "train.precision (fp32 | tf32 | amp_fp16 | amp_bf16; ieee is now fp32)"}


def key_matches(key: str, patterns: Any) -> bool:
    """True when dotted ``key`` is one of ``patterns`` or lies below one (``eval`` covers ``eval.views``)."""
    return any(key == p or key.startswith(p + ".") for p in patterns)


#: Identity keys added after version 0.1.0, with the value that computes exactly what a run of
#: 0.1.0 computed. While a key holds that value it is left out of the identity, so adding an option
#: never renames (or retrains) the runs that do not use it; any other value is part of the run id.
#: A new identity key with a neutral default gets its entry here, in the same change.
NEUTRAL_DEFAULTS: dict[str, Any] = {
    "source.bitflip_param": None,  # the model's registered bit-change parameter (issue 22)
    "data.layout": "auto",  # npz only (issue 22)
    "data.fingerprint": None,  # npz/folder content; CIFAR/digits/MNIST are fixed by name and md5 (issue 22)
    "source.from_epoch": 0,  # the source applies from the start (issue 21)
}


def identity_items(cfg: Any) -> dict:
    """The config keys that decide what a run computes, flattened to dotted names.

    Only the IDENTITY_ROOTS nodes, without BOOKKEEPING_KEYS, RETIRED_KEYS and keys at their
    NEUTRAL_DEFAULTS. ``cfg``: a config, or the plain resolved container of one (the SLURM launcher
    has it already for 1000s of jobs).
    """
    from omegaconf import OmegaConf

    c = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat: dict = {}

    def walk(prefix: str, node: Any) -> None:
        if key_matches(prefix, BOOKKEEPING_KEYS) or prefix in RETIRED_KEYS:
            return
        if prefix in NEUTRAL_DEFAULTS and node == NEUTRAL_DEFAULTS[prefix]:
            return
        if isinstance(node, dict):
            for k in sorted(node):
                walk(f"{prefix}.{k}" if prefix else k, node[k])
        else:
            flat[prefix] = node

    for root in sorted(IDENTITY_ROOTS):  # the order identity_items always had
        if root in c:
            walk(root, c[root])
    return flat
