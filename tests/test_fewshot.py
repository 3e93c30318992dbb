"""The few-shot method on real hippocampus slices: collection, tokens, decoder training, runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import HIPPOCAMPUS_MANIFEST, assert_predictions_reproduce_the_metrics, results_dir_of

from fewsam_lib.bench.evaluate import evaluate
from fewsam_lib.bench.profiles import PROFILE_DIR, load_profile
from fewsam_lib.bench.runs import RunSpec, load_run, score_case
from fewsam_lib.data.collection import SupportSlice, draw_collection, explicit_collection
from fewsam_lib.data.volumes import grey_slices, load_case, slice_table
from fewsam_lib.encoders.cache import EmbeddingCache
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.base import PlannedRun
from fewsam_lib.methods.fewshot import (
    CURVE_FILE,
    MODEL_FILE,
    CollectionModelStore,
    FewShotModel,
    embedding_grid_weights,
    few_shot_tokens,
    fit_fewshot,
    get_design,
    get_fewshot_variant,
    load_support,
    point_token_norm,
    pooled_embedding,
    train_decoder,
    train_on_collection,
)


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
            row = train_table[
                (train_table.case_id == support.case_id) & (train_table.slice_index == support.slice_index)
            ]
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
    cosine = torch.nn.functional.cosine_similarity(
        centred["anterior"] - positive_type, centred["posterior"] - positive_type
    )
    assert float(cosine) < 0.9
    with_background = few_shot_tokens(model, embeddings, labels, tasks, get_design("centred_bg"))
    assert with_background["anterior"].shape == (2, 256)
    assert torch.equal(with_background["anterior"][1], with_background["posterior"][1])

    labels[1][labels[1] == 2] = 0
    with pytest.raises(FewsamError, match="task 'posterior' has no labelled pixel"):
        few_shot_tokens(model, embeddings, labels, tasks, get_design("centred"))
    with pytest.raises(FewsamError, match="unknown few-shot variant"):
        get_design("magic")


# --- the trained decoder -------------------------------------------------------------------------

PREPROCESSING = {"slice_axis": 2, "intensity": {"mode": "percentile", "lower": 0.5, "upper": 99.5}}


@pytest.fixture(scope="module")
def support(hippocampus, train_table):
    """Real cached embeddings and labels of a 2-shot collection (about 4 slices)."""
    cache = EmbeddingCache("mobile_sam")
    embeddings, labels = load_support(
        hippocampus, draw_collection(hippocampus, 2, 0, train_table), cache, progress=False
    )
    return cache, embeddings, labels


def _fit(support, hippocampus, seed: int, steps: int = 2):
    cache, embeddings, labels = support
    variant = get_fewshot_variant("centred").with_schedule(steps=steps)
    return fit_fewshot(
        cache.backbone.model,
        "mobile_sam",
        embeddings,
        labels,
        hippocampus.tasks,
        variant,
        seed,
        PREPROCESSING,
        progress=False,
    )


def test_training_never_runs_the_encoder_and_changes_only_the_decoder(support, hippocampus, monkeypatch):
    cache, _, _ = support
    model = cache.backbone.model
    before = {name: value.clone() for name, value in model.state_dict().items()}
    misses = cache.stats.misses

    def no_encoder(*args, **kwargs):
        raise AssertionError("the image encoder ran during training")

    monkeypatch.setattr(model.image_encoder, "forward", no_encoder)
    fitted, history = _fit(support, hippocampus, seed=0, steps=3)
    assert len(history) == 3 and cache.stats.misses == misses
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # SAM untouched
    trained = fitted.decoder.state_dict()
    changed = [name for name, value in trained.items() if not torch.equal(value, before[f"mask_decoder.{name}"])]
    assert len(changed) > len(trained) // 2
    assert not any(token.requires_grad for token in fitted.tokens.values())


def test_same_seed_same_weights_other_seed_other_weights(support, hippocampus):
    first, _ = _fit(support, hippocampus, seed=0)
    again, _ = _fit(support, hippocampus, seed=0)
    other, _ = _fit(support, hippocampus, seed=1)
    weights, same, different = (m.decoder.state_dict() for m in (first, again, other))
    assert all(torch.equal(weights[name], same[name]) for name in weights)
    assert not all(torch.equal(weights[name], different[name]) for name in weights)


def test_a_support_slice_showing_no_task_is_left_out_of_box_prompted_decoder_training(support, hippocampus):
    """Every k-th slice of a volume may fall between its organs (CT at k = 4): with boxes such a
    slice has nothing to train, and it must neither fail the run nor change what the others train."""
    cache, embeddings, labels = support
    model = cache.backbone.model
    variant = get_fewshot_variant("located_augmented_head_weighted").with_schedule(steps=3)
    tokens = few_shot_tokens(model, embeddings, labels, hippocampus.tasks, variant.tokens)

    def train(slices, label_slices):
        decoder, _ = train_decoder(
            model, tokens, slices, label_slices, hippocampus.tasks, variant.schedule, 0, progress=False, with_boxes=True
        )
        return decoder.state_dict()

    alone = train(embeddings, labels)
    with_empty = train([embeddings[0], *embeddings], [np.zeros_like(labels[0]), *labels])
    assert all(torch.equal(alone[name], with_empty[name]) for name in alone)
    with pytest.raises(FewsamError, match="no support slice shows any of the tasks"):
        train(embeddings[:1], [np.zeros_like(labels[0])])


def short_profile(tmp_path: Path, steps: int) -> str:
    """The smoke profile with a schedule of ``steps`` decoder steps, as a profile file of its own."""
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["fewshot"]["training"] = {"steps": steps}
    path = tmp_path / f"smoke_{steps}_steps.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": f"smoke{steps}steps"}))
    return str(path)


def test_same_seed_gives_identical_runs_and_a_third_run_reuses_the_trained_model(tmp_path, isolated_cache):
    run = PlannedRun("fewshot", str(HIPPOCAMPUS_MANIFEST), "mobile_sam", "centred", 3, short_profile(tmp_path, 2), 1)
    folders = []
    for name in ("first", "second", "third"):
        if name != "third":  # the first two train, so that training itself is shown to be seeded
            shutil.rmtree(isolated_cache / "_collection_models", ignore_errors=True)
        folders.append(evaluate(run, results_dir=tmp_path / name, progress=False))
    (first_meta, first), *others = (load_run(folder) for folder in folders)
    for meta, metrics in others:
        pd.testing.assert_frame_equal(first, metrics)
        assert meta["collection"] == first_meta["collection"]
    assert [meta["collection_model"]["reused"] for meta in (first_meta, *(m for m, _ in others))] == [
        False,
        False,
        True,
    ]
    saved = [torch.load(folder / MODEL_FILE, weights_only=True)["decoder"] for folder in folders]
    assert all(torch.equal(saved[0][name], other[name]) for other in saved[1:] for name in saved[0])


def test_a_stored_collection_model_is_reused_only_for_the_same_inputs(hippocampus, train_table, caplog):
    cache = EmbeddingCache("mobile_sam")
    store = CollectionModelStore(cache)
    shutil.rmtree(store.folder, ignore_errors=True)
    collection = draw_collection(hippocampus, 2, 0, train_table)
    variant = get_fewshot_variant("centred").with_schedule(steps=2)

    def train(seed: int = 0, chosen=variant):
        return train_on_collection(hippocampus, collection, cache, chosen, seed, progress=False)

    trained, reused = train(), train()
    assert (trained.reused, reused.reused) == (False, True) and reused.key == trained.key
    assert reused.trained_seconds == pytest.approx(trained.trained_seconds)
    assert reused.record()["collection_model"] == {**trained.record()["collection_model"], "reused": True}
    pd.testing.assert_frame_equal(trained.curve, reused.curve)
    assert all(torch.equal(trained.model.tokens[name], reused.model.tokens[name]) for name in trained.model.tokens)
    embedding, label = load_support(hippocampus, collection, cache, progress=False)
    one_slice, shape = torch.stack(embedding[:1]), label[0].shape
    model = cache.backbone.model
    np.testing.assert_array_equal(
        trained.model.segment(model, one_slice, shape), reused.model.segment(model, one_slice, shape)
    )
    other_seed, longer = train(seed=1), train(chosen=variant.with_schedule(steps=3))
    assert not other_seed.reused and not longer.reused
    assert len({trained.key, other_seed.key, longer.key}) == 3

    model_path, record_path = store.paths(trained.key)
    model_path.write_bytes(b"not a model")
    with caplog.at_level("WARNING"):
        again = train()
    assert not again.reused and str(record_path) in caplog.text
    assert train().reused  # the damaged entry was replaced by a readable one


def test_a_model_that_cannot_be_stored_is_still_returned(hippocampus, train_table, monkeypatch, caplog):
    def disk_full(self, trained):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CollectionModelStore, "save", disk_full)
    cache = EmbeddingCache("mobile_sam")
    shutil.rmtree(CollectionModelStore(cache).folder, ignore_errors=True)
    variant = get_fewshot_variant("centred").with_schedule(steps=1)
    with caplog.at_level("WARNING"):
        trained = train_on_collection(hippocampus, draw_collection(hippocampus, 2, 0, train_table), cache, variant, 0)
    assert not trained.reused and len(trained.curve) == 1 and "No space left on device" in caplog.text


@pytest.fixture(scope="module")
def smoke_case(hippocampus):
    """The slices the smoke profile scores of its test case, with real mobile_sam embeddings."""
    cache = EmbeddingCache("mobile_sam")
    smoke = load_profile("smoke")
    volume = load_case(hippocampus, smoke.test_case_ids(hippocampus)[0])
    extent = smoke.scored_slices(hippocampus, volume)
    return cache, volume, extent, cache.get_many(grey_slices(hippocampus, volume, extent), progress=False)


def _case_dice(hippocampus, volume, prediction, extent: range) -> float:
    spec = RunSpec(hippocampus.dataset, "fewshot", "centred", "mobile_sam", 0, "smoke", 5)
    rows = pd.DataFrame(score_case(hippocampus, spec, volume, prediction, list(extent), "all_slices", extent))
    return float(rows[rows.level == "slice"].dice.mean())


def test_fewshot_smoke_notebook_writes_a_complete_run(fewshot_smoke_run, hippocampus):
    folder = fewshot_smoke_run
    meta, metrics = load_run(folder)
    smoke_variant = get_fewshot_variant("centred").with_schedule(steps=60).name  # the smoke schedule's own name
    assert smoke_variant.startswith("centred-") and meta["variant"] == smoke_variant
    spec = RunSpec("msd_hippocampus", "fewshot", smoke_variant, "mobile_sam", 0, "smoke", 5, "openvino-fp32")
    assert folder == spec.folder(results_dir_of(folder))
    notebook = json.loads((folder / "notebook.ipynb").read_text())
    assert any("parameters" in cell["metadata"].get("tags", []) for cell in notebook["cells"])
    assert meta["shots"] == 5 and meta["parameters"]["training"]["steps"] == 60  # the smoke schedule
    assert all(len(slices) == 5 for slices in meta["collection"]["per_task"].values())
    assert len(pd.read_csv(folder / CURVE_FILE)) == 60
    assert meta["data"]["manifest_sha256"] == hippocampus.sha256
    assert set(metrics.level) == {"slice", "volume"} and (metrics.slice_selection == "all_slices").all()
    assert (metrics.shots == 5).all() and (metrics.method == "fewshot").all()


def test_fewshot_predictions_reproduce_the_recorded_metrics(fewshot_smoke_run, hippocampus):
    assert_predictions_reproduce_the_metrics(fewshot_smoke_run)


def test_trained_decoder_beats_the_untrained_one_and_depends_on_its_tokens(fewshot_smoke_run, smoke_case, hippocampus):
    cache, volume, extent, embeddings = smoke_case
    model = cache.backbone.model
    trained = FewShotModel.load(fewshot_smoke_run / MODEL_FILE, model, "mobile_sam")

    def predict(fewshot_model: FewShotModel) -> np.ndarray:
        return fewshot_model.segment_volume(model, embeddings, volume.shape, hippocampus.slice_axis, extent)

    prediction = predict(trained)
    meta, metrics = load_run(fewshot_smoke_run)
    assert meta["scored_slices"] == {volume.case_id: [extent.start, extent.stop]}
    recorded = metrics[(metrics.level == "slice") & (metrics.case_id == volume.case_id)].dice.mean()
    assert _case_dice(hippocampus, volume, prediction, extent) == pytest.approx(
        recorded
    )  # the saved model is the run's
    untrained = dataclasses.replace(trained, decoder=model.mask_decoder)
    assert recorded > _case_dice(hippocampus, volume, predict(untrained), extent) + 0.2

    swapped_tokens = {"anterior": trained.tokens["posterior"], "posterior": trained.tokens["anterior"]}
    swapped = predict(dataclasses.replace(trained, tokens=swapped_tokens))
    foreground = (prediction > 0) | (swapped > 0)
    assert foreground.sum() > 100
    assert (prediction == swapped)[foreground].mean() < 0.2  # swapping the tokens swaps (or destroys) the masks


def test_a_saved_model_from_another_backbone_or_a_foreign_file_is_refused(fewshot_smoke_run, smoke_case, tmp_path):
    model = smoke_case[0].backbone.model
    with pytest.raises(FewsamError, match="trained on mobile_sam embeddings, cannot decode lite_medsam"):
        FewShotModel.load(fewshot_smoke_run / MODEL_FILE, model, "lite_medsam")
    foreign = tmp_path / "weights.pt"
    torch.save({"something": torch.zeros(2)}, foreign)
    with pytest.raises(FewsamError, match="not a fewsam few-shot model"):
        FewShotModel.load(foreign, model, "mobile_sam")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((fewshot_smoke_run / MODEL_FILE).read_bytes()[:1000])
    with pytest.raises(FewsamError, match="not a readable few-shot model"):
        FewShotModel.load(truncated, model, "mobile_sam")


def test_an_explicit_collection_names_its_slices_and_checks_them(hippocampus, train_table):
    case_id = hippocampus.case_ids("train")[0]
    rows = train_table[train_table.case_id == case_id]
    both = rows[(rows.anterior > 0) & (rows.posterior > 0)].slice_index.tolist()
    only_posterior = rows[(rows.anterior == 0) & (rows.posterior > 0)].slice_index.tolist()
    collection = explicit_collection(hippocampus, [(case_id, both[0]), (case_id, only_posterior[0])], train_table)
    assert collection.per_task["anterior"] == (SupportSlice(case_id, both[0]),)
    assert len(collection.per_task["posterior"]) == 2 and collection.shots is None
    with pytest.raises(FewsamError, match="task 'anterior' is on none"):
        explicit_collection(hippocampus, [(case_id, only_posterior[0])], train_table)
    with pytest.raises(FewsamError, match="has no slice 999"):
        explicit_collection(hippocampus, [(case_id, 999)], train_table)
    with pytest.raises(FewsamError, match="no case 'nobody'"):
        explicit_collection(hippocampus, [("nobody", 3)], train_table)
