import pytest

from udaseg.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    LABEL_SETS,
    label_set,
)


def test_against_cityscapesscripts_labels_table():
    from cityscapesscripts.helpers import labels  # test-only dependency (pip install .[test])

    train = sorted((l for l in labels.labels if 0 <= l.trainId < 255), key=lambda l: l.trainId)
    assert tuple(l.name for l in train) == CITYSCAPES_CLASSES
    assert tuple(tuple(l.color) for l in train) == CITYSCAPES_PALETTE
    expected = {l.id: l.trainId for l in labels.labels if 0 <= l.trainId < 255 and l.id >= 0}
    assert expected == CITYSCAPES_ID_TO_TRAINID


def test_protocol_sizes():
    assert len(LABEL_SETS["cityscapes19"]) == 19
    assert len(LABEL_SETS["synthia16"]) == 16 and 9 not in LABEL_SETS["synthia16"].class_ids
    assert len(LABEL_SETS["synthia13"]) == 13
    assert len(LABEL_SETS["dsec18"]) == 18 and "truck" not in LABEL_SETS["dsec18"].class_names
    with pytest.raises(ValueError, match="known label sets"):
        label_set("cityscapes20")
