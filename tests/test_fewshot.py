"""Few-shot collection and token pooling (the decoder training is tested in its own issue's tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewsam_lib.errors import FewsamError
from fewsam_lib.fewshot import (
    draw_collection,
    embedding_grid_weights,
    few_shot_tokens,
    get_design,
    point_token_norm,
    pooled_embedding,
)
from fewsam_lib.volumes import slice_table


@pytest.fixture(scope="module")
def train_table(hippocampus):
    return slice_table(hippocampus, hippocampus.case_ids("train"))


def test_collection_is_seeded_nested_and_from_training_slices(hippocampus, train_table):
    five = draw_collection(hippocampus, 5, seed=0, table=train_table)
    assert draw_collection(hippocampus, 5, seed=0, table=train_table) == five
    assert draw_collection(hippocampus, 5, seed=1, table=train_table).slices != five.slices
    one = draw_collection(hippocampus, 1, seed=0, table=train_table)
    for task in hippocampus.task_names:
        assert len(five.per_task[task]) == 5
        assert five.per_task[task][:1] == one.per_task[task]  # nested collections
        for support in five.per_task[task]:
            assert support.case_id in hippocampus.split["train"]
            row = train_table[(train_table.case_id == support.case_id) & (train_table.slice_index == support.slice_index)]
            assert int(row[task].iloc[0]) > 0
    assert set(five.slices) == {s for slices in five.per_task.values() for s in slices}
    with pytest.raises(FewsamError, match="fewer than"):
        draw_collection(hippocampus, 10**6, seed=0, table=train_table)


def test_grid_weights_follow_sam_resize_and_padding():
    weights = embedding_grid_weights(np.ones((35, 51), bool), 1024)
    assert weights.shape == (64, 64)
    # 35x51 -> 703x1024 px -> the image fills rows 0..43 (703/16 = 43.9) of the 64x64 grid.
    assert torch.allclose(weights[:43], torch.ones(43, 64))
    assert 0.8 < weights[43, 0] < 1 and (weights[44:] == 0).all()


def test_pooling_a_hand_made_embedding():
    embedding = torch.zeros(256, 64, 64)
    embedding[:, :, :34] = torch.arange(256, dtype=torch.float32)[:, None, None]  # left part: value = channel
    embedding[:, :, 34:] = -5.0
    mask = np.zeros((64, 64), bool)
    mask[10:20, :32] = True  # a 64x64 slice maps pixel (r, c) onto embedding cell (r, c)
    weights = embedding_grid_weights(mask, 1024)
    assert float(weights[15, 5]) == pytest.approx(1.0) and float(weights[15, 40]) == 0.0
    pooled = pooled_embedding([embedding], [weights])
    assert torch.allclose(pooled, torch.arange(256, dtype=torch.float32), atol=1e-5)
    assert pooled_embedding([embedding], [torch.zeros(64, 64)]) is None


def test_tokens_per_design_and_absent_task_error(mobile_sam):
    model = mobile_sam.model
    generator = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(256, 64, 64, generator=generator) for _ in range(2)]
    labels = [np.zeros((35, 51), np.int32) for _ in range(2)]
    labels[0][5:15, 10:20] = 1
    labels[1][20:30, 30:45] = 2
    tasks = {1: "anterior", 2: "posterior"}

    raw = few_shot_tokens(model, embeddings, labels, tasks, get_design("raw"))
    assert raw["anterior"].shape == (1, 256)
    centred = few_shot_tokens(model, embeddings, labels, tasks, get_design("centred"))
    positive_type = model.prompt_encoder.point_embeddings[1].weight[0]
    for name in tasks.values():
        assert float((centred[name][0] - positive_type).norm()) == pytest.approx(point_token_norm(model), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(centred["anterior"] - positive_type,
                                                   centred["posterior"] - positive_type)
    assert float(cosine) < 0.9
    with_background = few_shot_tokens(model, embeddings, labels, tasks, get_design("centred_bg"))
    assert with_background["anterior"].shape == (2, 256)
    assert torch.equal(with_background["anterior"][1], with_background["posterior"][1])

    labels[1][labels[1] == 2] = 0
    with pytest.raises(FewsamError, match="task 'posterior' has no labelled pixel"):
        few_shot_tokens(model, embeddings, labels, tasks, get_design("centred"))
    with pytest.raises(FewsamError, match="unknown few-shot variant"):
        get_design("magic")
