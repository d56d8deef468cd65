"""Whole and sliding-window inference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from udaseg.eval.inference import (
    Window,
    predict,
    slide_inference,
    slide_windows,
    whole_inference,
)

K = 5


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def strided_head(conv: torch.nn.Conv2d):
    """A stride-4 'model': 4x4 average pool then 1x1 conv (logits at 1/4 resolution)."""
    return lambda x: conv(F.avg_pool2d(x, 4, ceil_mode=True))


def test_whole_inference_output_size() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, K, 1)
    images = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        out = whole_inference(strided_head(conv), images)
        assert out.shape == (2, K, 37, 50)
        out = whole_inference(strided_head(conv), images, out_size=(74, 100))
        assert out.shape == (2, K, 74, 100)
        # full-resolution forward_fn, same size: returned untouched
        same = whole_inference(conv, images)
        assert torch.equal(same, conv(images))


def test_slide_windows_non_divisible() -> None:
    # H = 70, crop 32, stride 24: ceil(38 / 24) + 1 = 3 rows, the last shifted back to 38..70
    wins = slide_windows(70, 70, 32, 24)
    rows = sorted({(w.y1, w.y2) for w in wins})
    assert rows == [(0, 32), (24, 56), (38, 70)]
    assert len(wins) == 9
    assert all(w.y2 - w.y1 == 32 and w.x2 - w.x1 == 32 for w in wins)
    count = torch.zeros(70, 70)
    for w in wins:
        count[w.y1 : w.y2, w.x1 : w.x2] += 1
    assert count.min() >= 1 and count.max() == 4
    # mmseg formula h_grids = max(H - crop + stride - 1, 0) // stride + 1
    for h, crop, stride in [(70, 32, 24), (64, 32, 16), (1024, 1024, 512), (2048, 1024, 512), (33, 32, 32)]:
        n = len(slide_windows(h, crop, crop, stride))
        assert n == max(h - crop + stride - 1, 0) // stride + 1
    # Cityscapes at full res with HRDA's outer windows: 1 x 3
    assert len(slide_windows(1024, 2048, 1024, 512)) == 3


def test_slide_windows_smaller_than_crop_and_bad_stride() -> None:
    assert slide_windows(20, 15, 32, 24) == [Window(0, 20, 0, 15)]
    wins = slide_windows(20, 70, 32, 24)
    assert [(w.y1, w.y2) for w in wins] == [(0, 20)] * 3
    with pytest.raises(ValueError, match="stride"):
        slide_windows(70, 70, 32, 40)
    with pytest.raises(ValueError, match="positive"):
        slide_windows(70, 70, 0, 16)


@pytest.mark.parametrize("batch_windows", [1, 4, None])
def test_slide_equals_whole_for_translation_equivariant_fn(batch_windows) -> None:
    g = torch.Generator().manual_seed(0)
    # integer-valued floats: sums of up to 4 equal values and the division are exact
    images = torch.randint(-50, 50, (2, K, 70, 53), generator=g).float()
    whole = whole_inference(identity, images)
    slide = slide_inference(
        identity, images, crop_size=(32, 24), stride=(24, 16), num_classes=K, batch_windows=batch_windows
    )
    assert slide.shape == whole.shape
    assert torch.equal(slide, whole)

    # a real 1x1 conv on random floats: equal up to float rounding
    conv = torch.nn.Conv2d(K, K, 1)
    x = torch.randn(2, K, 70, 53, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            slide_inference(conv, x, (32, 32), (24, 24), K, batch_windows=batch_windows),
            whole_inference(conv, x),
            rtol=1e-5,
            atol=1e-6,
        )


def test_slide_batches_windows_and_counts_calls() -> None:
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return x

    images = torch.randn(3, K, 70, 70)
    slide_inference(fn, images, 32, 24, K, batch_windows=4)
    assert [c[0] for c in calls] == [12, 12, 3]  # 9 windows x 3 images in chunks of 4 windows
    assert all(c[2:] == (32, 32) for c in calls)
    calls.clear()
    slide_inference(fn, images, 32, 24, K, batch_windows=None)
    assert calls == [(27, K, 32, 32)]


def test_slide_resizes_strided_logits_and_out_size() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, K, 1)
    images = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        out = slide_inference(strided_head(conv), images, 32, 24, K, out_size=(35, 45))
    assert out.shape == (1, K, 35, 45) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_slide_image_smaller_than_crop() -> None:
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return x * 2

    images = torch.randn(2, K, 20, 15)
    out = slide_inference(fn, images, (32, 32), (24, 24), K)
    assert calls == [(2, K, 20, 15)]  # one window of the image's own size, no padding
    assert torch.equal(out, images * 2)

    calls.clear()
    out = slide_inference(fn, images, (32, 32), (24, 24), K, pad_to_crop=True)
    assert calls == [(2, K, 32, 32)]  # zero-padded to the crop, padding cropped away again
    assert torch.equal(out, images * 2)


def test_slide_checks_channels() -> None:
    with pytest.raises(ValueError, match="expected"):
        slide_inference(identity, torch.randn(1, 3, 40, 40), 32, 16, num_classes=K)


@dataclass
class FakeSegOutput:
    logits: torch.Tensor


def test_predict_modes_and_outputs() -> None:
    images = torch.randn(2, K, 40, 44)
    logits = predict(identity, images)
    assert torch.equal(logits, images)
    probs = predict(lambda x: FakeSegOutput(x), images, "slide", crop_size=32, stride=16, num_classes=K, output="probs")
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 40, 44))
    labels = predict(lambda x: {"logits": x}, images, output="labels", out_size=(20, 22))
    assert labels.shape == (2, 20, 22) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="crop_size, stride"):
        predict(identity, images, "slide", num_classes=K)
    with pytest.raises(ValueError, match="mode"):
        predict(identity, images, "tiles")  # type: ignore[arg-type]
    w = torch.nn.Parameter(torch.ones(()))
    assert not predict(lambda x: x * w, images).requires_grad
    assert torch.isfinite(probs).all()


def test_whole_inference_resizes_in_two_steps_as_mmseg() -> None:
    # mmseg: encode_decode resizes the stride-4 logits to the network input (H, W), then
    # rescale resizes them to the label size; one resize straight to the label size differs
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 64, 96)
    noisy = torch.randn(2, 19, 16, 24, generator=g)
    out = whole_inference(lambda x: noisy, images, out_size=(100, 150))
    two_step = F.interpolate(F.interpolate(noisy, size=(64, 96), mode="bilinear"),
                             size=(100, 150), mode="bilinear")
    one_step = F.interpolate(noisy, size=(100, 150), mode="bilinear")
    assert torch.equal(out, two_step)
    assert (out.argmax(1) != one_step.argmax(1)).any()  # the two orders really differ here
    # no out_size: one resize to the input size
    assert torch.equal(whole_inference(lambda x: noisy, images),
                       F.interpolate(noisy, size=(64, 96), mode="bilinear"))
