"""``fewsam segment``: a few labelled slices of one real volume segment another, end to end."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fewsam_lib.bench.metrics import overlap
from fewsam_lib.bench.profiles import load_profile
from fewsam_lib.bench.runs import load_run
from fewsam_lib.cli import main
from fewsam_lib.data.volumes import load_case
from fewsam_lib.methods.fewshot import MODEL_FILE


@pytest.fixture(scope="module")
def partial_support(hippocampus, tmp_path_factory):
    """A real training volume whose label keeps only 3 annotated axial slices (the rest erased)."""
    case = hippocampus.case(hippocampus.case_ids("train")[0])
    label = nib.load(case.label)
    data = np.asarray(label.dataobj).astype(np.uint8)
    both = [i for i in range(data.shape[2]) if {1, 2} <= set(np.unique(data[:, :, i]))]
    keep = both[len(both) // 2 - 1 : len(both) // 2 + 2]
    partial = np.zeros_like(data)
    partial[:, :, keep] = data[:, :, keep]
    folder = tmp_path_factory.mktemp("support")
    nib.save(nib.Nifti1Image(partial, label.affine, label.header), folder / "partial.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(data), label.affine, label.header), folder / "empty.nii.gz")
    return case.image, folder / "partial.nii.gz", folder / "empty.nii.gz", keep


@pytest.fixture(scope="module")
def query(hippocampus):
    return hippocampus.case(load_profile("smoke").test_case_ids(hippocampus)[0])


def _segment(*arguments: str) -> int:
    # The paper-faithful variant keeps these mechanics cheap: the default one also trains a location
    # head and encodes augmented twins (tested with real slices in test_location and test_augmentation).
    return main(["segment", "--quiet", "--steps", "10", "--variant", "centred", *map(str, arguments)])


def test_segment_trains_on_the_labelled_slices_writes_the_query_and_reloads(partial_support, query, tmp_path, capsys):
    """The mechanics, with a 10-step schedule (the decoder's quality is tested on the runs)."""
    image, partial, _, keep = partial_support
    out, model = tmp_path / "prediction.nii.gz", tmp_path / "model.pt"
    assert (
        _segment(
            "--support",
            image,
            "--support-labels",
            partial,
            "--query",
            query.image,
            "--out",
            out,
            "--labels",
            "1=anterior,2=posterior",
            "--save-model",
            model,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"trained on 3 labelled slices of {image}: {keep}" in printed and "anterior" in printed

    written, reference = nib.load(out), nib.load(query.image)
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
    predicted = np.asarray(written.dataobj)
    assert set(np.unique(predicted)) <= {0, 1, 2}

    again = tmp_path / "again.nii.gz"
    assert _segment("--model", model, "--query", query.image, "--out", again) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(again).dataobj), predicted)
    assert not list(tmp_path.glob(".*partial*"))  # atomic writes left nothing behind


def test_segment_with_a_run_s_saved_model_reproduces_the_run_s_prediction(
    fewshot_smoke_run, query, hippocampus, tmp_path
):
    """The model file a benchmark run saves segments the same case identically through the CLI."""
    out = tmp_path / "prediction.nii.gz"
    assert _segment("--model", fewshot_smoke_run / MODEL_FILE, "--query", query.image, "--out", out) == 0
    volume = load_case(hippocampus, query.case_id)
    segmented, recorded = (
        np.moveaxis(volume.read_on_canonical_grid(path), hippocampus.slice_axis, 0)
        for path in (out, fewshot_smoke_run / "predictions" / f"{query.case_id}.nii.gz")
    )
    start, stop = load_run(fewshot_smoke_run)[0]["scored_slices"][query.case_id]  # the smoke profile's slab
    np.testing.assert_array_equal(segmented[start:stop], recorded[start:stop])
    assert not recorded[:start].any() and not recorded[stop:].any()
    truth = np.asarray(nib.load(query.label).dataobj)
    assert overlap(truth > 0, np.asarray(nib.load(out).dataobj) > 0)[1] > 0.3


@pytest.fixture(scope="module")
def located_model(partial_support, tmp_path_factory):
    """A saved model with a location head (variant ``located``; 10 decoder and 30 head steps, enough for
    the mechanics tested with it) from the support."""
    image, partial, _, _ = partial_support
    folder = tmp_path_factory.mktemp("located")
    arguments = ["--support", image, "--support-labels", partial, "--query", image, "--out", folder / "first.nii.gz"]
    saved = ["--save-model", folder / "model.pt", "--copy-distance", "0"]
    short = ["--steps", "10", "--head-steps", "30", "--variant", "located"]
    assert main(["segment", "--quiet", *map(str, short + arguments + saved)]) == 0
    return folder / "model.pt"


def test_segment_on_the_support_volume_adapts_a_saved_model_and_copies_next_to_labelled_slices(
    partial_support, located_model, hippocampus, tmp_path, capsys
):
    """``--model`` with ``--support`` fine-tunes a copy of the saved location head on the support's
    labelled slices (``--save-model`` keeps the adapted one); the query being the support, its labelled
    slices keep their labels and the slices next to them (``--copy-distance``, default 1) copy them."""
    image, partial, _, keep = partial_support
    saved_bytes = located_model.read_bytes()
    support = ["--model", located_model, "--support", image, "--support-labels", partial, "--query", image]
    support.append("--no-blend")  # the model alone, with the labels copied next to labelled slices
    outs = {name: tmp_path / f"{name}.nii.gz" for name in ("adapted", "loaded", "no_copy", "reloaded")}
    kept = tmp_path / "adapted.pt"
    assert main(["segment", "--quiet", *map(str, [*support, "--out", outs["adapted"], "--save-model", kept])]) == 0
    printed = capsys.readouterr().out
    assert f"adapted {located_model} to 3 labelled slices of {image}: {keep}" in printed
    assert "slices within 1 of one copy its labels" in printed
    assert main(["segment", "--quiet", *map(str, [*support, "--out", outs["loaded"], "--adapt-steps", "0"])]) == 0
    assert located_model.read_bytes() == saved_bytes  # the saved model itself is never changed
    again = ["--model", kept, "--support", image, "--support-labels", partial, "--query", image, "--adapt-steps", "0"]
    again.append("--no-blend")
    assert main(["segment", "--quiet", *map(str, [*again, "--out", outs["reloaded"]])]) == 0
    # the adapted model as saved, without copying (the same as adapting again with --copy-distance 0)
    assert main(["segment", "--quiet", *map(str, [*again, "--out", outs["no_copy"], "--copy-distance", "0"])]) == 0
    np.testing.assert_array_equal(nib.load(outs["reloaded"]).dataobj, nib.load(outs["adapted"]).dataobj)

    truth = np.asarray(nib.load(partial).dataobj)
    adapted, loaded, no_copy = (np.asarray(nib.load(outs[name]).dataobj) for name in ("adapted", "loaded", "no_copy"))
    for index in keep:  # the user's labels stay, with or without copying
        np.testing.assert_array_equal(adapted[:, :, index], truth[:, :, index])
        np.testing.assert_array_equal(no_copy[:, :, index], truth[:, :, index])
    np.testing.assert_array_equal(adapted[:, :, keep[0] - 1], truth[:, :, keep[0]])
    np.testing.assert_array_equal(adapted[:, :, keep[-1] + 1], truth[:, :, keep[-1]])
    farther = [i for i in range(truth.shape[2]) if min(abs(i - k) for k in keep) > 1]
    np.testing.assert_array_equal(adapted[:, :, farther], no_copy[:, :, farther])  # copying reaches no farther
    assert (adapted[:, :, farther] != loaded[:, :, farther]).any()  # the fine-tuned head segments differently


def test_segment_blend_leans_on_the_labelled_slices_where_the_model_is_weak(
    partial_support, located_model, hippocampus, tmp_path, capsys
):
    """Every third slice of a real volume labelled; the blend (the default when the query is the
    support) keeps them and mixes them into the slices between, so a weak model (10 decoder and 30
    head steps) gains on the unlabelled slices over the model alone (``--no-blend``)."""
    image, partial, _, _ = partial_support
    label = nib.load(hippocampus.case(hippocampus.case_ids("train")[0]).label)
    truth = np.asarray(label.dataobj).astype(np.uint8)
    holding = [i for i in range(truth.shape[2]) if truth[:, :, i].any()]
    keep = holding[1::3]
    sparse = np.zeros_like(truth)
    sparse[:, :, keep] = truth[:, :, keep]
    nib.save(nib.Nifti1Image(sparse, label.affine, label.header), tmp_path / "sparse.nii.gz")
    support = ["--model", located_model, "--support", image, "--support-labels", tmp_path / "sparse.nii.gz"]
    outs = {name: tmp_path / f"{name}.nii.gz" for name in ("blend", "model")}
    common = [*support, "--query", image, "--adapt-steps", "0"]
    assert main(["segment", "--quiet", *map(str, [*common, "--out", outs["blend"]])]) == 0
    assert "labelled slices kept; the others blend the model with the labelled slices" in capsys.readouterr().out
    no_blend = [*common, "--no-blend", "--copy-distance", "0", "--out", outs["model"]]
    assert main(["segment", "--quiet", *map(str, no_blend)]) == 0
    blended, alone = (np.asarray(nib.load(outs[name]).dataobj) for name in ("blend", "model"))
    for index in keep:
        np.testing.assert_array_equal(blended[:, :, index], truth[:, :, index])
    between = [i for i in range(keep[0], keep[-1]) if i not in keep]

    def dice(predicted: np.ndarray) -> float:
        pairs = [(truth[:, :, i] == task, predicted[:, :, i] == task) for i in between for task in (1, 2)]
        return float(np.mean([overlap(*pair)[1] for pair in pairs]))

    assert dice(blended) > max(0.6, dice(alone) + 0.05), (dice(blended), dice(alone))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_labels", "empty.nii.gz: no labelled slice"),
        ("other_grid", "differs from image shape"),
        ("unknown_backbone", "unknown backbone 'sam_vit_z'"),
        ("unnamed_label", "label values [2] are not named in --labels"),
        ("missing_query", "missing.nii.gz: file does not exist"),
        ("support_without_labels", "give --support and --support-labels together"),
        ("nothing_to_learn_from", "give --support and --support-labels"),
        ("copy_into_another_volume", "--copy-distance copies labels within one volume"),
        ("head_steps_without_a_head", "--head-steps: variant centred has no location head"),
        ("head_steps_with_a_model", "--head-steps trains a new model's location head; with --model use --adapt-steps"),
        ("blend_into_another_volume", "--blend mixes in the labelled slices around each slice: give --query the"),
    ],
)
def test_segment_errors_are_one_clear_line(case, expected, partial_support, query, hippocampus, tmp_path, capsys):
    image, partial, empty, _ = partial_support
    other_label = hippocampus.case(hippocampus.case_ids("train")[1]).label
    support = ["--support", image, "--support-labels", partial]
    arguments = {
        "empty_labels": ["--support", image, "--support-labels", empty],
        "other_grid": ["--support", image, "--support-labels", other_label],
        "unknown_backbone": [*support, "--backbone", "sam_vit_z"],
        "unnamed_label": [*support, "--labels", "1=anterior"],
        "missing_query": [*support],
        "support_without_labels": ["--support", image],
        "nothing_to_learn_from": [],
        "copy_into_another_volume": [*support, "--copy-distance", "1"],
        "head_steps_without_a_head": [*support, "--head-steps", "5"],
        "head_steps_with_a_model": ["--model", tmp_path / "model.pt", "--head-steps", "5"],
        "blend_into_another_volume": [*support, "--blend"],
    }[case]
    query_image = tmp_path / "missing.nii.gz" if case == "missing_query" else query.image
    assert _segment(*arguments, "--query", query_image, "--out", tmp_path / "out.nii.gz") == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error and error.count("\n") == 1
    assert not (tmp_path / "out.nii.gz").exists()


def test_segment_refuses_to_adapt_what_it_cannot(
    fewshot_smoke_run, located_model, partial_support, query, tmp_path, capsys
):
    """A model without a location head, or support labels the model has no task for: one clear line."""
    image, partial, _, keep = partial_support
    label = nib.load(partial)
    foreign = np.asarray(label.dataobj).copy()
    foreign[:, :, keep[0]][foreign[:, :, keep[0]] == 2] = 3
    nib.save(nib.Nifti1Image(foreign, label.affine, label.header), tmp_path / "foreign.nii.gz")
    for model, labels, expected in (
        (fewshot_smoke_run / MODEL_FILE, partial, "few-shot variant 'centred' has no location head to adapt"),
        (located_model, tmp_path / "foreign.nii.gz", f"label values [3] are not tasks of {located_model}"),
    ):
        arguments = ["--model", model, "--support", image, "--support-labels", labels, "--query", query.image]
        assert main(["segment", "--quiet", *map(str, [*arguments, "--out", tmp_path / "out.nii.gz"])]) == 2
        error = capsys.readouterr().err
        assert expected in error and "Traceback" not in error and error.count("\n") == 1
        assert not (tmp_path / "out.nii.gz").exists()
