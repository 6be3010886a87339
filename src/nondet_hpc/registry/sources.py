"""The sources of nondeterminism and the random streams they seed: each declared once.

docs/study.md, "Sources and seeds". A *stream* is one random generator of a run (its draws go to
one part of training); a *source* is what a study varies: the streams that take the replicate seed
(every other stream gets seed 1) and whether GPU kernels may be nondeterministic. Everything that
names a source or a stream (the config options ``source=NAME``, the seeding in run/sources.py, the
table order and claim 1 in the report) reads these two tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stream:
    name: str  # a name source.vary may list; run.json `seeds` and checkpoints key the stream by it
    offset: int  # added to the seed: generators of two streams never share a seed (run/sources.py)
    drawn_by: str  # which code draws from it
    # True: drawn from once, before training, and only when a source varies it (its seed is None
    # otherwise: no bit change at all). False: a generator the training loop draws from all along,
    # seeded 1 when not varied, and saved in every checkpoint (run/sources.py, Streams).
    one_shot: bool = False


#: Largest replicate index (``seed``): below every gap between two offsets, so the generator seeds
#: of two streams (offset + 1 .. offset + MAX_SEED) never meet.
MAX_SEED = 1_000_000

#: The random streams of a run, in the order run.json lists their seeds. Offsets keep streams
#: apart even when two sources get the same integer seed.
STREAMS: dict[str, Stream] = {s.name: s for s in (
    Stream("init", 0, "run/zoo: every model's init rule (every parameter and buffer; a custom factory in its fork)"),
    Stream("shuffle", 1_000_003, "run/data.py: epoch_order (each epoch's permutation)"),
    Stream("augment", 2_000_003, "run/data.py: epoch_augment (each epoch's crops and flips)"),
    Stream("bitflip", 3_000_017, "run/sources.py: apply_bitflip (which weight, which direction)", one_shot=True),
)}


@dataclass(frozen=True)
class Source:
    name: str  # the option: source=NAME
    label: str  # the row name in the paper's tables
    vary: tuple[str, ...]  # streams seeded by the replicate seed; every other stream gets seed 1
    deterministic_kernels: bool  # False: nondeterministic cuDNN/cuBLAS (the cuDNN source)
    order: int  # position in the report's tables (the paper's row order)
    single: bool  # one source alone: claim 1 compares each with "all"
    doc: str  # one line: what the source varies (docs/sources.md tables every source)


#: Rows not listed here (a new combination) sort between the single sources and "all".
DEFAULT_ORDER = 8

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("none", "Determinism Control", (), True, 0, False,
           "every seed = 1 and deterministic kernels; replicates must be bit-identical"),
    Source("init", "Parameter Initialization", ("init",), True, 1, True,
           "parameter initialisation alone: the init generator takes the replicate seed"),
    Source("shuffle", "Data Shuffling", ("shuffle",), True, 2, True,
           "data order alone: the shuffle generator (each epoch's permutation) takes the replicate seed"),
    Source("augment", "Data Augmentation", ("augment",), True, 3, True,
           "augmentation alone: the augment generator (crops and flips) takes the replicate seed"),
    Source("cudnn", "cuDNN", (), False, 4, True,
           "GPU kernels alone: every seed = 1, nondeterministic cuDNN (benchmark on); no effect on CPU"),
    Source("init+shuffle", "Parameter Initialization + Data Shuffling", ("init", "shuffle"), True, 5, False,
           "initialisation and data order together, deterministic kernels"),
    Source("shuffle+cudnn", "Data Shuffling + cuDNN", ("shuffle",), False, 6, False,
           "data order with nondeterministic kernels (the paper's combination row)"),
    Source("shuffle+augment+cudnn", "Data Shuffling + Data Augmentation + cuDNN", ("shuffle", "augment"), False, 7,
           False, "data order and augmentation with nondeterministic kernels (the paper's combination row)"),
    Source("all", "All Nondeterminism Sources", ("init", "shuffle", "augment"), False, 9, False,
           "all sources together: init, shuffle and augment seeds = replicate index, nondeterministic kernels"),
    Source("bitflip", "Random Bit Change", ("bitflip",), True, 10, False,
           "one float32 ulp of one weight (chosen by the bitflip seed), everything else fixed"),
)}

#: The reference groups the claims compare with (by name).
CONTROL, ALL, BITFLIP = "none", "all", "bitflip"


def source_order(name: str) -> int:
    """Table position of a source by name (unknown combinations: DEFAULT_ORDER)."""
    s = SOURCES.get(name)
    return s.order if s is not None else DEFAULT_ORDER
