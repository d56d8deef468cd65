"""Confusion matrix, IoUResult and SegmentationMetric against brute force and hand-made cases."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from udaseg.data.classes import CITYSCAPES_CLASSES, IGNORE_INDEX, LABEL_SETS
from udaseg.eval.metrics import IoUResult, SegmentationMetric, confusion_matrix

K = 19


def brute_force(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int = IGNORE_INDEX):
    """Per-class intersection/union and confusion counts with plain Python loops."""
    inter = [0] * k
    gt = [0] * k
    pr = [0] * k
    cm = [[0] * k for _ in range(k)]
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist(), strict=True):
        if t == ignore:
            continue
        cm[t][p] += 1
        gt[t] += 1
        pr[p] += 1
        if p == t:
            inter[t] += 1
    union = [gt[c] + pr[c] - inter[c] for c in range(k)]
    iou = [inter[c] / union[c] if union[c] > 0 else math.nan for c in range(k)]
    return cm, inter, union, iou


def random_case(seed: int, absent: tuple[int, ...] = (5,), shape=(2, 17, 23)):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([c for c in range(K) if c not in absent])
    target = allowed[torch.randint(len(allowed), shape, generator=g)]
    pred = allowed[torch.randint(len(allowed), shape, generator=g)]
    # make predictions partly right so IoUs are not all tiny
    agree = torch.rand(shape, generator=g) < 0.4
    pred = torch.where(agree, target, pred)
    ignore = torch.rand(shape, generator=g) < 0.1
    target = target.masked_fill(ignore, IGNORE_INDEX)
    # garbage predictions at ignored pixels must not matter
    pred = torch.where(ignore & (torch.rand(shape, generator=g) < 0.5), torch.tensor(200), pred)
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_confusion_and_iou_match_brute_force(seed: int) -> None:
    pred, target = random_case(seed)
    cm_ref, inter, union, iou_ref = brute_force(pred, target, K)

    cm = confusion_matrix(pred, target, num_classes=K)
    assert cm.dtype == torch.int64 and cm.shape == (K, K)
    assert cm.tolist() == cm_ref

    res = IoUResult(cm)
    assert res.intersection.tolist() == inter
    assert res.union.tolist() == union
    np.testing.assert_allclose(res.iou, np.array(iou_ref), rtol=0, atol=1e-15, equal_nan=True)
    # class 5 absent from GT and predictions -> NaN and excluded from the mean
    assert math.isnan(res.iou[5])
    present = [v for v in iou_ref if not math.isnan(v)]
    assert len(present) == K - 1
    assert res.miou() == pytest.approx(sum(present) / len(present), abs=1e-12)
    assert 0.0 <= res.miou() <= 1.0
    n_valid = int((target != IGNORE_INDEX).sum())
    assert res.total_pixels == n_valid
    assert res.pixel_accuracy == pytest.approx(sum(inter) / n_valid)


def test_hand_checkable_3x3() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    res = IoUResult(cm)
    # class 0: I=1, |gt|=2, |pred|=2 -> U=3; class 1: I=2, U=2+3-2=3; class 2: I=0, U=1
    assert res.intersection.tolist() == [1, 2, 0]
    assert res.union.tolist() == [3, 3, 1]
    np.testing.assert_allclose(res.iou, [1 / 3, 2 / 3, 0.0])
    assert res.miou(None) == pytest.approx(1 / 3)
    assert res.pixel_accuracy == pytest.approx(3 / 5)
    assert res.per_class(None) == pytest.approx({"class_0": 1 / 3, "class_1": 2 / 3, "class_2": 0.0})
    with pytest.raises(ValueError, match="only 3 classes"):
        res.miou("cityscapes19")


def test_hand_checkable_2x2_with_empty_class() -> None:
    # class 1 never appears and is never predicted: IoU NaN, mIoU = IoU of class 0 = 1
    res = IoUResult.from_predictions(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 2)
    assert res.iou[0] == 1.0 and math.isnan(res.iou[1])
    assert res.miou(None) == 1.0


def test_confusion_matrix_errors() -> None:
    t = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.full((4, 4), 19), t)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.full((4, 4), -1), t)
    with pytest.raises(ValueError, match="neither"):
        confusion_matrix(t, torch.full((4, 4), 30))
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(torch.zeros(4, 4), t)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(t, torch.zeros(4, 5, dtype=torch.long))
    # out-of-range predictions at ignored pixels are fine; uint8 labels are fine
    cm = confusion_matrix(torch.full((4, 4), 250), torch.full((4, 4), 255, dtype=torch.uint8))
    assert int(cm.sum()) == 0


def test_synthia16_is_nanmean_over_its_classes() -> None:
    pred, target = random_case(7, absent=())
    res = IoUResult(confusion_matrix(pred, target))
    _, _, _, iou = brute_force(pred, target, K)
    for name in ("synthia16", "synthia13", "dsec18", "cityscapes19"):
        ids = LABEL_SETS[name].class_ids
        vals = [iou[i] for i in ids if not math.isnan(iou[i])]
        assert res.miou(name) == pytest.approx(sum(vals) / len(vals), abs=1e-12)
        per = res.per_class(name)
        assert list(per) == [CITYSCAPES_CLASSES[i] for i in ids]
        assert len(per) == len(ids)
    assert len(res.per_class("synthia16")) == 16
    assert "terrain" not in res.per_class("synthia16")


def test_shortcut_differs_when_missing_classes_are_absent_everywhere() -> None:
    # Synthia-like model on a split where terrain/truck/train never occur and are never predicted.
    pred, target = random_case(11, absent=(9, 14, 16))
    res = IoUResult(confusion_matrix(pred, target))
    assert all(math.isnan(res.iou[c]) for c in (9, 14, 16))
    exact = res.miou("synthia16")
    # nanmean over 19 already excludes the three NaN classes, so mIoU19 == mIoU16 ...
    assert res.miou("cityscapes19") == pytest.approx(exact)
    # ... and the x19/16 shortcut inflates it
    assert res.scaled_miou19(16) == pytest.approx(exact * 19 / 16)
    assert res.scaled_miou19(16) > exact + 0.01
    assert res.scaled_miou19("synthia16") == res.scaled_miou19(16)


def test_shortcut_agrees_when_missing_classes_are_in_gt_but_never_predicted() -> None:
    # Cityscapes GT contains terrain/truck/train, the Synthia model never predicts them: IoU = 0.
    g = torch.Generator().manual_seed(3)
    target = torch.randint(K, (2, 32, 32), generator=g)
    pred = target.clone()
    wrong = torch.rand(target.shape, generator=g) < 0.3
    pred[wrong] = torch.randint(K, (int(wrong.sum()),), generator=g)
    pred[torch.isin(pred, torch.tensor([9, 14, 16]))] = 0  # never predicted
    res = IoUResult(confusion_matrix(pred, target))
    assert all(res.iou[c] == 0.0 for c in (9, 14, 16))
    assert res.scaled_miou19(16) == pytest.approx(res.miou("synthia16"), abs=1e-12)
    # dsec18 drops only truck, also IoU 0 here, so its 19/18 shortcut agrees as well
    assert res.scaled_miou19(18) == pytest.approx(res.miou("dsec18"), abs=1e-12)
    # ... but once a dropped class is predicted correctly somewhere, its IoU leaks in
    pred[target == 14] = 14
    leaky = IoUResult(confusion_matrix(pred, target))
    assert leaky.iou[14] > 0
    assert leaky.scaled_miou19(18) > leaky.miou("dsec18") + 1e-3


def test_to_dict_percent_and_nan() -> None:
    pred, target = random_case(5)
    res = IoUResult(confusion_matrix(pred, target))
    d = res.to_dict("cityscapes19")
    assert set(d) == {"mIoU", "IoU", "aAcc", "protocol", "num_classes"}
    assert d["protocol"] == "cityscapes19" and d["num_classes"] == 19
    assert d["mIoU"] == pytest.approx(100 * res.miou())
    assert d["IoU"]["pole"] is None  # class 5 absent
    assert d["IoU"]["road"] == pytest.approx(100 * res.iou[0])
    assert d["aAcc"] == pytest.approx(100 * res.pixel_accuracy)
    frac = res.to_dict("synthia13", percent=False)
    assert frac["num_classes"] == 13 and frac["mIoU"] == pytest.approx(res.miou("synthia13"))
    with pytest.raises(ValueError, match="known label sets"):
        res.to_dict("nope")


def test_iou_result_is_frozen_and_addable() -> None:
    a = IoUResult(confusion_matrix(*random_case(0)))
    b = IoUResult(confusion_matrix(*random_case(1)))
    with pytest.raises(AttributeError):
        a.confmat = b.confmat  # type: ignore[misc]
    with pytest.raises(ValueError):
        a.confmat[0, 0] = 1
    assert ((a + b).confmat == a.confmat + b.confmat).all()


def test_metric_accumulates_like_one_big_confusion_matrix() -> None:
    metric = SegmentationMetric(num_classes=K)
    preds, targets = [], []
    for seed in range(4):
        p, t = random_case(seed, shape=(3, 9, 13))
        preds.append(p)
        targets.append(t)
        metric.update(p, t)
    result = metric.compute()
    assert isinstance(result, IoUResult)
    big = confusion_matrix(torch.cat(preds), torch.cat(targets))
    assert (result.confmat == big.numpy()).all()
    # cached second call, and a reset
    assert (metric.compute().confmat == big.numpy()).all()
    metric.reset()
    assert int(metric.confmat.sum()) == 0


def test_metric_logits_are_argmaxed_and_forward_returns_batch_result() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 8, 10, generator=g)
    target = torch.randint(K, (2, 8, 10), generator=g)
    target[0, :2] = IGNORE_INDEX
    m1, m2 = SegmentationMetric(), SegmentationMetric()
    m1.update(logits, target)
    m2.update(logits.argmax(1), target.unsqueeze(1))  # (B, 1, H, W) target accepted
    assert (m1.compute().confmat == m2.compute().confmat).all()

    m3 = SegmentationMetric()
    batch = m3(logits, target)  # forward: batch value, also accumulated
    assert isinstance(batch, IoUResult)
    assert (batch.confmat == m1.compute().confmat).all()
    m3(logits, target)
    assert int(m3.compute().total_pixels) == 2 * m1.compute().total_pixels

    with pytest.raises(ValueError, match="resize the logits"):
        m1.update(torch.randn(2, K, 4, 5), target)
    with pytest.raises(ValueError, match="channels"):
        m1.update(torch.randn(2, 7, 8, 10), target)


def test_metric_state_reduces_by_sum_and_survives_copy() -> None:
    a, b = SegmentationMetric(), SegmentationMetric()
    pa, ta = random_case(0)
    pb, tb = random_case(1)
    a.update(pa, ta)
    b.update(pb, tb)
    assert a._reductions["confmat"] is not None
    a.merge_state(b)  # same reduction DDP uses
    expected = confusion_matrix(torch.cat([pa, pb]), torch.cat([ta, tb]))
    assert (a.compute().confmat == expected.numpy()).all()
    c = copy.deepcopy(a)
    assert isinstance(c.compute(), IoUResult)
    assert (c.compute().confmat == expected.numpy()).all()
