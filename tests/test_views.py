"""Tests of the TTA views (docs/study.md, "Test-time augmentation") against an independent naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nondet_hpc.run.data import normalize
from nondet_hpc.run.views import crop_batch, evaluate_views, pad_black
from nondet_hpc.viewspec import VIEWS, view_count, view_transforms

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
H, W = 6, 9  # not square, so a swapped axis cannot pass


class Tiny(nn.Module):
    """The model API the trainer uses: model(x), forward_features(x) -> [B, d], fc(features).

    The flatten + linear readout makes the logits depend on every pixel's position, so a wrong crop
    offset or flip shows; dropout makes train mode visible.
    """

    def __init__(self, c: int = 3, h: int = H, w: int = W, d: int = 7, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.proj = nn.Linear(4 * h * w, d)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(d, classes)
        self.seen: list[int] = []  # batch size of every forward pass

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return self.drop(torch.relu(self.proj(torch.relu(self.conv(x)).flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _model(**kw: int) -> Tiny:
    torch.manual_seed(0)
    return Tiny(**kw)


def _images(n: int, c: int = 3, h: int = H, w: int = W, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


# ---- independent reference: written from docs/study.md with plain torch ops, one forward per transform


def _naive_list(name: str, pad: int) -> list[tuple[bool, int, int]]:
    full = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    even = [(dy, dx) for dy, dx in full if dy % 2 == 0 and dx % 2 == 0]
    crops = {"crop81": full, "crop25": even, "flip-crop81": full, "flip-crop25": even}
    orig = [(False, pad, pad)]
    if name == "plain":
        return orig
    if name == "flip":
        return orig + [(True, pad, pad)]
    flips = (False, True) if name.startswith("flip-") else (False,)
    return orig + [(f, dy, dx) for f in flips for dy, dx in crops[name]]


def _naive_image(u8: torch.Tensor, mean, std, flip: bool, dy: int, dx: int, pad: int
                 ) -> torch.Tensor:
    # Pad the raw [0, 1] image with 0, then normalise: the "black pixel" of docs/study.md by definition.
    x = u8.float() / 255
    if flip:
        x = torch.flip(x, dims=[3])
    x = F.pad(x, (pad, pad, pad, pad), value=0.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = (x - m) / s
    return x[:, :, dy : dy + u8.shape[2], dx : dx + u8.shape[3]]


def _naive(model: nn.Module, u8, mean, std, views, pad: int = 4) -> dict[str, np.ndarray]:
    model.eval()
    out = {}
    with torch.no_grad():
        for v in views:
            ts = _naive_list(v, pad)
            total = sum(model(_naive_image(u8, mean, std, *t, pad)).double() for t in ts)
            out[v] = (total / len(ts)).float().numpy()
    return out


# ---- view definitions


def test_view_counts() -> None:
    expected = {"plain": 1, "flip": 2, "crop25": 26, "crop81": 82,
                "flip-crop25": 51, "flip-crop81": 163}
    assert set(VIEWS) == set(expected)
    for name, count in expected.items():
        assert view_count(name) == count
        assert view_transforms(name) == _naive_list(name, 4)
        assert view_transforms(name)[0] == (False, 4, 4)  # the original is always a view
    # Crop views count the original twice: as the original and as the offset-(4, 4) crop.
    assert view_transforms("crop81").count((False, 4, 4)) == 2
    assert len(set(view_transforms("flip-crop81"))) == 162
    # Digits-sized padding: the grid follows 0..2*pad.
    assert view_count("crop81", pad=1) == 10 and view_count("crop25", pad=1) == 5


def test_unknown_view_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="crop9.*valid views: plain, flip, crop25, crop81, flip-"):
        view_count("crop9")
    model = _model()
    with pytest.raises(ValueError, match="bogus"):
        evaluate_views(model, _images(4), None, MEAN, STD, ["plain", "bogus"])
    assert model.seen == []  # rejected before any work


def test_normalize_matches_definition() -> None:
    u8 = _images(3)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    ref = (u8.float() / 255 - m) / s
    x = normalize(u8, MEAN, STD)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize(u8.float(), MEAN, STD)
    with pytest.raises(ValueError, match="3 values"):
        normalize(u8, MEAN[:2], STD[:2])


# ---- transformed images, checked by hand


def _padded(u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = normalize(u8, MEAN, STD)
    return x, pad_black(x, MEAN, STD, 4)


def test_pad_value_unnormalises_to_zero() -> None:
    x, p = _padded(_images(2))
    assert p.shape == (2, 3, H + 8, W + 8)
    raw = p * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    border = torch.ones(H + 8, W + 8, dtype=torch.bool)
    border[4 : 4 + H, 4 : 4 + W] = False
    assert raw[:, :, border].abs().max() < 1e-6
    # The border is exactly normalize(raw 0), e.g. (0 - 0.4914) / 0.2023 = -2.42907 in channel 0.
    assert p[0, 0, 0, 0].item() == pytest.approx(-0.4914 / 0.2023, abs=1e-6)
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), MEAN, STD).view(1, 3, 1)
    assert torch.equal(p[:, :, border], zero.expand(2, 3, int(border.sum())))


def test_centre_crop_equals_original() -> None:
    x, p = _padded(_images(3))
    assert torch.equal(crop_batch(p, [(False, 4, 4)], H, W), x)


def test_corner_crop_is_shifted_image_with_black_border() -> None:
    u8 = torch.arange(H * W, dtype=torch.uint8).view(1, 1, H, W).repeat(1, 3, 1, 1)
    x, p = _padded(u8)
    out = crop_batch(p, [(False, 0, 0)], H, W)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    raw = torch.round((out * s + m) * 255)
    # Offset (0, 0) of the 4-padded image: rows 0-3 and columns 0-3 are black; pixel (i, j) for
    # i, j >= 4 is original pixel (i-4, j-4), whose raw value is (i-4)*W + (j-4).
    assert (raw[0, :, :4, :] == 0).all() and (raw[0, :, :, :4] == 0).all()
    assert raw[0, 0, 4, 4] == 0  # original (0, 0) holds 0 too, so check further pixels
    assert raw[0, 1, 4, 5] == 1
    assert raw[0, 2, 5, 4] == W
    assert raw[0, 0, 5, 8] == W + 4
    assert torch.equal(out[:, :, 4:, 4:], x[:, :, : H - 4, : W - 4])
    # Bottom-right offset: the image moves up-left and black enters from the bottom and right.
    out = crop_batch(p, [(False, 8, 8)], H, W)
    assert torch.equal(out[:, :, : H - 4, : W - 4], x[:, :, 4:, 4:])
    assert torch.equal(out[:, :, H - 4 :, :], p[:, :, :4, : W].expand_as(out[:, :, H - 4 :, :]))


def test_flip_is_horizontal() -> None:
    x, p = _padded(_images(2))
    out = crop_batch(p, [(True, 4, 4)], H, W)
    assert torch.equal(out, torch.flip(x, dims=[3]))
    assert torch.equal(out[..., 0], x[..., W - 1])
    assert torch.equal(out[:, :, 0], x[:, :, 0].flip(-1))
    # A flipped crop is a crop of the flipped image.
    torch.testing.assert_close(
        crop_batch(p, [(True, 1, 6)], H, W),
        _naive_image(_images(2), MEAN, STD, True, 1, 6, 4),
        rtol=0,
        atol=1e-6,
    )


def test_crop_batch_is_transform_major() -> None:
    x, p = _padded(_images(3))
    out = crop_batch(p, [(False, 4, 4), (True, 4, 4), (False, 0, 8)], H, W)
    assert out.shape == (9, 3, H, W)
    assert torch.equal(out[:3], x) and torch.equal(out[3:6], x.flip(3))
    with pytest.raises(ValueError, match="outside"):
        crop_batch(p, [(False, 9, 0)], H, W)


# ---- evaluate_views


def test_matches_naive_loop_all_views() -> None:
    model, u8 = _model(), _images(11)
    got, feats = evaluate_views(model, u8, None, MEAN, STD, list(VIEWS), batch_size=40)
    ref = _naive(model, u8, MEAN, STD, VIEWS)
    assert feats is None and list(got) == list(VIEWS)
    for v in VIEWS:
        assert got[v].dtype == np.float32 and got[v].shape == (11, 5)
        np.testing.assert_allclose(got[v], ref[v], rtol=1e-5, atol=1e-6, err_msg=v)
    # The views really differ, so the comparison above has teeth.
    assert np.abs(got["plain"] - got["flip"]).max() > 1e-2
    assert np.abs(got["crop81"] - got["crop25"]).max() > 1e-3


def test_digits_shape_and_pad() -> None:
    model, u8 = _model(c=1, h=8, w=8), _images(6, c=1, h=8, w=8)
    mean, std = (0.5,), (0.25,)
    for pad in (1, 4):
        got, _ = evaluate_views(model, u8, None, mean, std, list(VIEWS), pad=pad)
        ref = _naive(model, u8, mean, std, VIEWS, pad=pad)
        for v in VIEWS:
            np.testing.assert_allclose(got[v], ref[v], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{v} pad={pad}")


def test_each_transform_runs_once() -> None:
    model, u8 = _model(), _images(10)
    evaluate_views(model, u8, None, MEAN, STD, list(VIEWS), batch_size=25)
    # 81 crops + 81 crops of the flip cover every view; the naive loop would run 325.
    assert sum(model.seen) == 162 * 10
    assert max(model.seen) <= 25
    model.seen.clear()
    evaluate_views(model, u8, None, MEAN, STD, ["plain", "flip"], batch_size=1000)
    assert model.seen == [20]  # both transforms in one pass


@pytest.mark.parametrize("views", [list(VIEWS), ["flip-crop25", "plain"]])
def test_batch_size_does_not_change_results(views: list[str]) -> None:
    model, u8 = _model(), _images(13)
    runs = [evaluate_views(model, u8, torch.zeros(13), MEAN, STD, views, batch_size=b)[0]
            for b in (1, 5, 13, 40, 10_000)]
    for r in runs[1:]:
        assert list(r) == views
        for v in views:
            np.testing.assert_allclose(r[v], runs[0][v], rtol=1e-6, atol=1e-6, err_msg=v)


def test_features_give_plain_logits() -> None:
    model, u8 = _model(), _images(9)
    got, feats = evaluate_views(model, u8, None, MEAN, STD, ["plain", "crop25"],
                                with_features=True, batch_size=7)
    assert feats is not None and feats.dtype == np.float32 and feats.shape == (9, 7)
    model.eval()  # the direct reference below must not drop units
    with torch.no_grad():
        fc_logits = model.fc(torch.from_numpy(feats)).numpy()
        np.testing.assert_allclose(fc_logits, got["plain"], rtol=0, atol=1e-6)
        direct = model.forward_features(normalize(u8, MEAN, STD)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    # Features do not need the plain view to be requested, and do not change the logits.
    only, feats2 = evaluate_views(model, u8, None, MEAN, STD, ["crop25"], with_features=True)
    np.testing.assert_allclose(feats2, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(only["crop25"], got["crop25"], rtol=1e-5, atol=1e-6)


def test_eval_mode_used_and_restored() -> None:
    model, u8 = _model(), _images(5)
    model.train()
    got, _ = evaluate_views(model, u8, None, MEAN, STD, ["flip"])
    assert model.training  # restored
    ref = _naive(model, u8, MEAN, STD, ["flip"])["flip"]
    np.testing.assert_allclose(got["flip"], ref, rtol=1e-5, atol=1e-6)
    model.eval()
    evaluate_views(model, u8, None, MEAN, STD, ["plain"])
    assert not model.training


def test_channels_last_and_input_checks() -> None:
    model, u8 = _model(), _images(4)
    a, _ = evaluate_views(model, u8, None, MEAN, STD, ["crop25"])
    b, _ = evaluate_views(model, u8, None, MEAN, STD, ["crop25"], channels_last=True, device="cpu")
    np.testing.assert_allclose(a["crop25"], b["crop25"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        evaluate_views(model, u8, torch.zeros(3), MEAN, STD, ["plain"])
    with pytest.raises(ValueError, match="uint8"):
        evaluate_views(model, u8.float(), None, MEAN, STD, ["plain"])
    assert evaluate_views(model, u8, None, MEAN, STD, []) == ({}, None)
