"""Augmented twins of support slices (``located_augmented`` variants), on real hippocampus slices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fewsam_lib.data.augmentation import SupportAugmentation, augment_support, augmented_twin
from fewsam_lib.data.collection import draw_collection
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.fewshot import (
    FEWSHOT_VARIANTS,
    encode_twins,
    fit_fewshot,
    get_fewshot_variant,
    support_slices,
    variant_from_definition,
)

STILL = SupportAugmentation(rotation_degrees=0, scale=0, shift_pixels=0, gamma=1)


@pytest.fixture(scope="module")
def hippocampus_collection(hippocampus):
    """Grey and label slices of a real 5-shot collection."""
    return support_slices(hippocampus, draw_collection(hippocampus, 5, 0))


def test_a_twin_without_transform_is_its_slice(hippocampus_collection):
    greys, labels = hippocampus_collection
    twin, twin_label = augmented_twin(greys[0], labels[0], STILL, np.random.default_rng(0))
    np.testing.assert_allclose(twin, greys[0], atol=1e-3)
    np.testing.assert_array_equal(twin_label, labels[0])


def test_twins_move_label_and_image_together_and_keep_label_values(hippocampus_collection):
    """Without a gamma change, the grey levels under a twin's label match those under the original's."""
    greys, labels = hippocampus_collection
    settings = dataclasses.replace(SupportAugmentation(), gamma=1)
    twin_greys, twin_labels = augment_support(greys, labels, settings, seed=0)
    assert len(twin_greys) == settings.copies * len(greys)
    moved = 0
    for index, (grey, label) in enumerate(zip(twin_greys, twin_labels)):
        original_grey, original = greys[index % len(greys)], labels[index % len(greys)]
        assert grey.shape == original_grey.shape and grey.dtype == np.float32 and label.dtype == original.dtype
        assert 0 <= grey.min() and grey.max() <= 255
        assert set(np.unique(label)) <= set(np.unique(original))
        moved += not np.array_equal(label, original)
        for value in np.unique(original)[1:]:
            if (label == value).sum() >= 10:  # the structure is still on the twin
                inside = grey[label == value].mean()
                assert inside == pytest.approx(original_grey[original == value].mean(), rel=0.15)
    assert moved == len(twin_labels)


def test_twins_are_seeded(hippocampus_collection):
    greys, labels = hippocampus_collection
    first = augment_support(greys, labels, SupportAugmentation(copies=1), seed=3)
    again = augment_support(greys, labels, SupportAugmentation(copies=1), seed=3)
    other = augment_support(greys, labels, SupportAugmentation(copies=1), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first[0], again[0]))
    assert not all(np.array_equal(a, b) for a, b in zip(first[0], other[0]))


def test_bad_augmentation_settings_are_refused():
    for bad in ({"copies": 0}, {"scale": 1.0}, {"gamma": 0.5}, {"rotation_degrees": -1}):
        with pytest.raises(FewsamError, match="support augmentation"):
            SupportAugmentation(**bad)


def test_augmenting_variants_need_their_twins_and_keep_them_in_their_definition(hippocampus, hippocampus_collection):
    augmented = get_fewshot_variant("located_augmented_fused")
    assert augmented.definition()["augmentation"] == dataclasses.asdict(SupportAugmentation())
    assert variant_from_definition(augmented.definition(), "test") == augmented
    assert "augmentation" not in FEWSHOT_VARIANTS["located_context_box"].definition()  # its runs keep their names
    greys, labels = hippocampus_collection
    with pytest.raises(FewsamError, match="twins"):
        fit_fewshot(None, "mobile_sam", [], labels, hippocampus.tasks, augmented, 0, {}, progress=False)
    assert encode_twins(None, greys, labels, get_fewshot_variant("located_context_box"), 0) is None
