"""finetune-evaluate: predictions with class names, and reports on labelled folders, from a trained checkpoint."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from finetune.compare import read_scalars
from finetune.evaluate import main
from finetune.module import FineTuneModule
from finetune.reports import confusion_figure, plt
from finetune.train import fit
from helpers import compose_config, image_tags

MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.4, 0.3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Pretrained Lite0, its head trained 4 epochs on red/green/blue squares: easy enough to be right on new ones."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
    for name, colour in colours.items():
        (root / name).mkdir()
        for i in range(10):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    cfg = compose_config(["model=lite0", "model.resolution=64", "finetune=frozen", "data=imagefolder",
                          f"data.root={root}", "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=4",
                          "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "optim.lr=1e-1",
                          "logger=csv"], tmp_path_factory.mktemp("run"))
    metrics = fit(cfg)
    probe = tmp_path_factory.mktemp("probe")
    for name, colour in colours.items():  # unseen images of the same kind, another size and format
        img = np.clip(np.array(colour) + rng.normal(0, 20, (50, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(probe / f"{name}.jpg", quality=95)
    # last.ckpt: on 6 val images the "best" can tie at 100% already after one epoch.
    return str(Path(metrics["best_checkpoint"]).with_name("last.ckpt")), probe


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory):
    """Real handwritten digits (scikit-learn's) as 36 px RGB PNGs in root/{train,val,test}/<digit>/."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for label in range(10):
        images = iter(digits.images[digits.target == label])
        for split, count in (("train", 12), ("val", 6), ("test", 5)):
            (root / split / str(label)).mkdir(parents=True)
            for i in range(count):
                gray = np.rint(next(images) * (255 / 16)).astype(np.uint8)
                Image.fromarray(gray).resize((36, 36), Image.BILINEAR).convert("RGB").save(root / split / str(label) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits_run(digits_tree, tmp_path_factory):
    """Pretrained Lite0, its head trained 2 short epochs on the digits with data.mean/std overriding the weights'
    normalisation, logging to TensorBoard; its best checkpoint tested on the test split."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(["model=lite0", "model.resolution=32", "data=imagefolder", f"data.root={digits_tree}",
                          f"data.mean={list(MEAN)}", f"data.std={list(STD)}", "finetune=frozen", "data.num_workers=0",
                          "data.batch_size=16", "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                          "optim.lr=3e-2", "logger=tensorboard", "trainer.enable_progress_bar=false"], out)
    return digits_tree, out, fit(cfg)


def _evaluate(checkpoint, folder, output):
    main([str(checkpoint), str(folder), "--output", str(output), "--num-workers", "0"])
    return json.loads((output / "report.json").read_text())


def test_val_accuracy_equals_the_val_acc_training_logged(digits_run, tmp_path):
    root, out, metrics = digits_run
    best = Path(metrics["best_checkpoint"])
    assert FineTuneModule.from_checkpoint(best).preprocessing.mean == MEAN  # the override, read from the checkpoint
    logged = [v for _, v in read_scalars(out / "tensorboard")["val/acc"]]
    assert len(logged) == 2 and 0 < min(logged) and max(logged) < 1  # a result that wrong preprocessing could change
    report = _evaluate(best, root / "val", tmp_path / "best")
    assert report["images"] == 60
    assert report["accuracy"] == pytest.approx(metrics["best_val_acc"], abs=1e-6)
    assert report["accuracy"] == pytest.approx(max(logged), abs=1e-6)
    assert f"val_acc{report['accuracy']:.4f}" in best.name
    last = _evaluate(best.with_name("last.ckpt"), root / "val", tmp_path / "last")
    assert last["accuracy"] == pytest.approx(logged[-1], abs=1e-6)


def _ece(confidence, correct, bins=15):
    index = np.minimum(np.floor(confidence * bins).astype(int), bins)  # [k/15, (k+1)/15); 1.0 on its own
    return sum(abs(correct[index == b].mean() - confidence[index == b].mean()) * (index == b).mean()
               for b in np.unique(index))


def test_report_files_equal_a_direct_computation_on_the_predictions(digits_run, tmp_path, capsys):
    root, _, metrics = digits_run
    report = _evaluate(metrics["best_checkpoint"], root / "test", tmp_path)
    assert "images, 10 classes: accuracy" in capsys.readouterr().out
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and rows[0]["file"].endswith(".png")
    true = np.array([r["true"] for r in rows])
    predicted = np.array([r["predicted"] for r in rows])
    top5 = [[name for name, _ in json.loads(r["top5"])] for r in rows]
    confidence = np.array([float(r["probability"]) for r in rows])
    assert all(t[0] == p for t, p in zip(top5, predicted)) and all(len(t) == 5 for t in top5)
    assert (predicted != true).any() and (predicted == true).any()

    labels = [str(i) for i in range(10)]
    present = sorted(set(true) | set(predicted))  # torchmetrics' macro average leaves out classes absent from both
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=labels, zero_division=0)
    assert report["accuracy"] == pytest.approx((predicted == true).mean(), abs=1e-6)
    assert report["top5_accuracy"] == pytest.approx(np.mean([t in row for t, row in zip(true, top5)]), abs=1e-6)
    assert [c["class"] for c in report["per_class"]] == labels
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        np.testing.assert_allclose([c[name] for c in report["per_class"]], values, atol=1e-6)
    assert [c["support"] for c in report["per_class"]] == support.tolist()
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(true, predicted, labels=present, average=average, zero_division=0)
        assert report[f"{average}_avg"] == pytest.approx({"precision": p, "recall": r, "f1": f}, abs=1e-6)
    assert report["expected_calibration_error"] == pytest.approx(_ece(confidence, predicted == true), abs=1e-5)
    matrix = confusion_matrix(true, predicted, labels=labels)
    assert report["confusion_matrix"] == matrix.tolist()
    off = [(-matrix[t, p], labels[t], labels[p]) for t in range(10) for p in range(10) if t != p and matrix[t, p]]
    assert [(-p["count"], p["true"], p["predicted"]) for p in report["most_confused"]] == sorted(off)[:10]

    table = (tmp_path / "report.md").read_text()
    assert f"| accuracy | {report['accuracy']:.4f} |" in table
    c = report["per_class"][3]
    assert f"| 3 | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |" in table
    for png in ("confusion_matrix.png", "reliability.png", "errors.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_training_logs_the_same_test_report_to_tensorboard(digits_run, tmp_path):
    root, out, metrics = digits_run
    report = _evaluate(metrics["best_checkpoint"], root / "test", tmp_path)  # trainer.test ran the best checkpoint
    series = read_scalars(out / "tensorboard")
    expected = {"test/acc": report["accuracy"], "test/acc_top5": report["top5_accuracy"],
                "test/ece": report["expected_calibration_error"],
                **{f"test/{k}_{a}": report[f"{a}_avg"][k] for a in ("macro", "weighted") for k in ("precision", "recall", "f1")}}
    for tag, value in expected.items():
        assert series[tag][-1][1] == pytest.approx(value, abs=1e-5), tag
        assert metrics[tag] == pytest.approx(value, abs=1e-5), tag
    assert "test/confusion_matrix" in image_tags(out / "tensorboard")


def test_confusion_matrix_stays_legible_with_102_classes():
    rng = np.random.default_rng(0)
    names = [f"flower species {i}" for i in range(102)]
    counts = rng.integers(0, 3, (102, 102)) + np.diag(rng.integers(5, 20, 102))
    fig = confusion_figure(counts, names)
    fig.canvas.draw()
    ax = fig.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()).sum(1), 1.0, rtol=1e-6)
    renderer = fig.canvas.get_renderer()
    for labels, span in ((ax.get_yticklabels(), lambda b: (b.y0, b.y1)), (ax.get_xticklabels(), lambda b: (b.x0, b.x1))):
        assert [t.get_text() for t in labels] == names and labels[0].get_fontsize() >= 5
        spans = sorted(span(t.get_window_extent(renderer)) for t in labels)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two labels overlap
    plt.close(fig)


def test_labelled_folder_mistakes_are_one_line_errors(digits_run, tmp_path, capsys):
    root, _, metrics = digits_run
    checkpoint = metrics["best_checkpoint"]
    mixed = tmp_path / "mixed"
    (mixed / "3").mkdir(parents=True)
    (mixed / "cats").mkdir()
    (tmp_path / "file").write_text("")
    for args, message in [
        ([str(mixed)], "folders the checkpoint has no class for (cats)"),
        ([str(root / "val"), "--output", str(tmp_path / "file" / "report")], "cannot write to"),
        ([str(root / "val"), "--csv", str(tmp_path / "p.csv")], "drop --csv"),
        ([str(root / "val" / "3"), "--output", str(tmp_path / "out")], "--output writes a report for a labelled folder"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([checkpoint, *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_predicts_class_names_for_a_folder_and_writes_csv(trained, tmp_path, capsys):
    checkpoint, probe = trained
    main([checkpoint, str(probe), "--top-k", "2", "--csv", str(tmp_path / "p.csv")])
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["image", "rank", "class", "probability"] and len(rows) == 1 + 3 * 2
    top1 = {r[0].rsplit("/", 1)[-1]: r[2] for r in rows[1:] if r[1] == "1"}
    assert top1 == {"blue.jpg": "blue", "green.jpg": "green", "red.jpg": "red"}
    assert "green.jpg\t1\tgreen" in capsys.readouterr().out


def test_plain_weights_and_missing_files_are_one_line_errors(trained, tmp_path, capsys):
    checkpoint, probe = trained
    torch.save({"stem.conv.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    for args, message in [
        ([str(tmp_path / "plain.pth"), str(probe)], "is not a checkpoint written by finetune"),
        ([checkpoint, str(tmp_path / "nothing")], "no such image or folder"),
        ([str(tmp_path / "missing.ckpt"), str(probe)], "weights file not found"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
