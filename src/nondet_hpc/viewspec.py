"""Test-time-augmentation views as names and transform lists: pure Python, no torch.

What each view averages is described in :mod:`nondet_hpc.run.views` (which evaluates them); this
module only says which transforms a view is made of, so that the cost model (presets) and the
input checks can count views without importing torch.
"""

from __future__ import annotations

VIEWS: tuple[str, ...] = ("plain", "flip", "crop25", "crop81", "flip-crop25", "flip-crop81")

Transform = tuple[bool, int, int]
"""(flip, dy, dx): flip horizontally if flip, pad, take the H x W window at row dy, column dx."""

# name -> (use the flip, crop stride or None for no crops). Stride 2 over offsets 0..2*pad is the
# study's crop25 ({0,2,4,6,8}^2 at pad 4); stride 1 is crop81.
_SPEC: dict[str, tuple[bool, int | None]] = {
    "plain": (False, None),
    "flip": (True, None),
    "crop25": (False, 2),
    "crop81": (False, 1),
    "flip-crop25": (True, 2),
    "flip-crop81": (True, 1),
}


def check_view_name(name: str) -> None:
    """Refuse a name that is not one of VIEWS (the message lists them)."""
    if name not in _SPEC:
        raise ValueError(f"unknown TTA view {name!r}; valid views: {', '.join(VIEWS)}")


def check_pad(pad: int) -> None:
    """Refuse a pad that is not a non-negative int."""
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")


def view_transforms(name: str, pad: int = 4) -> list[Transform]:
    """The transforms whose logits view ``name`` averages, original first (docs/study.md, TTA).

    Order: original ``(False, pad, pad)``; for ``flip`` then ``(True, pad, pad)``; for crop views
    the crops of the image, then (flip-crop) the crops of its flip, each row-major over offsets
    ``range(0, 2*pad + 1, stride)``. A crop view lists ``(False, pad, pad)`` twice when the grid
    contains (pad, pad): once as the original, once as the centre crop, as the study counted.
    """
    check_view_name(name)
    check_pad(pad)
    use_flip, stride = _SPEC[name]
    out: list[Transform] = [(False, pad, pad)]
    if stride is None:
        if use_flip:
            out.append((True, pad, pad))
        return out
    offsets = range(0, 2 * pad + 1, stride)
    for flip in (False, True) if use_flip else (False,):
        out.extend((flip, dy, dx) for dy in offsets for dx in offsets)
    return out


def view_count(name: str, pad: int = 4) -> int:
    """Number of views averaged by ``name``: 1, 2, 26, 82, 51, 163 at pad 4 (docs/study.md, TTA)."""
    return len(view_transforms(name, pad))
