"""finetune-evaluate: predictions with class names, and reports on labelled folders, from a trained checkpoint."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score
from torch.utils.data import DataLoader, TensorDataset

from finetune.commands.compare import read_scalars
from finetune.commands.evaluate import Inference, Predictions, ScoreKeeper, evaluate, main, predict
from finetune.models.preprocessing import Preprocessing
from finetune.training.module import FineTuneModule
from finetune.analysis.reports import confusion_figure, plt
from finetune.build import fit
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


def _square(path, colour, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)).save(path)


def test_a_folder_is_listed_as_training_lists_it_skipping_hidden_files(trained, tmp_path, capsys):
    checkpoint, probe = trained
    folder = tmp_path / "copied-from-a-mac"
    folder.mkdir()
    for image in probe.iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
        (folder / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # AppleDouble fork
    (folder / ".thumbnails").mkdir()
    (folder / ".thumbnails" / "red.jpg").write_bytes(b"not an image either")
    main([checkpoint, str(folder), "--csv", str(tmp_path / "p.csv"), "--num-workers", "0"])
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert sorted({Path(r[0]).name for r in rows[1:]}) == ["blue.jpg", "green.jpg", "red.jpg"]
    assert all(Path(r[0]).parent == folder for r in rows[1:]) and "unreadable" not in capsys.readouterr().err


def test_an_unreadable_image_is_named_with_the_flag_that_leaves_it_out(trained, tmp_path, capsys):
    checkpoint, _ = trained
    rng = np.random.default_rng(1)
    folder = tmp_path / "labelled"
    for name, colour in {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}.items():
        for i in range(3):
            _square(folder / name / f"{i}.png", colour, rng)
    bad = folder / "green" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header opens, the pixels do not decode
    with pytest.raises(SystemExit) as exit_:
        main([checkpoint, str(folder), "--output", str(tmp_path / "strict")])  # default: decoding workers
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"cannot decode image '{bad}'" in err and "pass --skip-corrupt" in err and "data.skip_corrupt" not in err

    with pytest.warns(UserWarning, match=f"skipping unreadable image '{bad}'"):
        main([checkpoint, str(folder), "--output", str(tmp_path / "out"), "--skip-corrupt", "--num-workers", "0"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["unreadable_skipped"] == 1 and report["unreadable_files"] == [str(bad)] and report["images"] == 8
    assert "8 images, 3 classes" in capsys.readouterr().out.replace("; 1 unreadable image skipped", "")
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(rows) == 8 and str(bad) not in {r["file"] for r in rows}


# --- issue 20: evaluation at scale -------------------------------------------------------------------------------


def _full_forward_pass(checkpoint, folder):
    """{file: every class's probability}, from a float32 pass of our own over PIL-opened files (no evaluate code)."""
    module = FineTuneModule.from_checkpoint(checkpoint)
    transform, files = module.preprocessing.eval_transform(), sorted(Path(folder).glob("*/*.png"))
    with torch.no_grad():
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        probs = module.model.eval()(module.preprocessing.normalize(x)).softmax(-1).numpy()
    return {str(f): p for f, p in zip(files, probs)}, module.class_names


def test_metrics_updated_per_batch_equal_those_of_the_full_probability_matrix(digits_run, tmp_path):
    root, _, metrics = digits_run
    main([metrics["best_checkpoint"], str(root / "test"), "--output", str(tmp_path), "--num-workers", "0",
          "--batch-size", "16", "--device", "cpu"])  # 50 images: 4 batches, the last one short
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["device"], report["precision"]) == ("cpu", "32-true")
    full, names = _full_forward_pass(metrics["best_checkpoint"], root / "test")
    files = sorted(full)
    probs = np.stack([full[f] for f in files])
    true = np.array([names.index(Path(f).parent.name) for f in files])
    predicted = probs.argmax(1)
    assert report["images"] == len(files) == 50 and 0 < (predicted == true).mean() < 1
    assert report["accuracy"] == pytest.approx((predicted == true).mean(), abs=1e-6)
    assert report["top5_accuracy"] == pytest.approx(top_k_accuracy_score(true, probs, k=5, labels=range(10)), abs=1e-6)
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=range(10), zero_division=0)
    np.testing.assert_allclose([c["f1"] for c in report["per_class"]], f1, atol=1e-6)
    np.testing.assert_allclose([c["precision"] for c in report["per_class"]], precision, atol=1e-6)
    assert [c["support"] for c in report["per_class"]] == support.tolist()
    assert report["expected_calibration_error"] == pytest.approx(_ece(probs.max(1), predicted == true), abs=1e-5)
    assert report["confusion_matrix"] == confusion_matrix(true, predicted, labels=range(10)).tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "confusion.npy"), confusion_matrix(true, predicted, labels=range(10)))
    for row in csv.DictReader((tmp_path / "predictions.csv").open()):  # kept top-5 = the full matrix's top 5
        p = full[row["file"]]
        top = np.argsort(-p, kind="stable")[:5]
        assert [name for name, _ in json.loads(row["top5"])] == [names[i] for i in top]
        np.testing.assert_allclose([v for _, v in json.loads(row["top5"])], p[top], atol=2e-6)


def test_evaluation_keeps_the_top_k_per_image_not_every_probability():
    """2,000 images × 1,000 classes through `predict`: what it keeps grows with N·k, not N·C."""
    classes, n, k = 1000, 2000, 5
    torch.manual_seed(0)
    module = FineTuneModule(model={"name": "b0", "pretrained": None, "resolution": 32}, num_classes=classes)
    torch.nn.init.normal_(module.model.classifier.weight, std=0.5)  # a zero head ties every class
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=250)
    scores = predict(module, loader, lambda b: (module.preprocessing.normalize(b[0]), b[1]),
                     inference=Inference.choose("cpu"), top_k=3)
    per_image = {name: value for name, value in vars(scores).items() if isinstance(value, torch.Tensor)}
    assert {name: tuple(t.shape) for name, t in per_image.items()} == {
        "top_probs": (n, k), "top_classes": (n, k), "labels": (n,)}
    kept = sum(t.numel() * t.element_size() for t in per_image.values())
    assert kept <= n * (k * 8 + 8) and kept * 80 < n * classes * 4  # 96 KB, against 8 MB of probabilities
    assert torch.equal(scores.labels, labels) and (scores.top_probs[:, :-1] >= scores.top_probs[:, 1:]).all()
    hits = scores.top_classes.long() == labels[:, None]
    assert float(scores.metrics["acc"]) == pytest.approx(hits[:, 0].double().mean().item(), abs=1e-9)
    assert float(scores.metrics["acc_top5"]) == pytest.approx(hits.any(1).double().mean().item(), abs=1e-9)
    assert int(scores.metrics["confusion"].sum()) == n


def test_default_device_is_the_gpu_when_there_is_one():
    chosen = Inference.choose()
    assert chosen.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert chosen.precision in (("bf16-mixed", "16-mixed") if torch.cuda.is_available() else ("32-true",))


@pytest.mark.slow  # make test's time
def test_the_training_folder_is_warned_of_by_path_and_by_its_recorded_split(digits_run, tmp_path, capsys):
    root, _, metrics = digits_run
    checkpoint = metrics["best_checkpoint"]
    shutil.copytree(root / "train", tmp_path / "copy")  # elsewhere: same relative paths and labels
    for folder, reason in [(root / "train", f"data.root '{root}'"), (tmp_path / "copy", "recorded training split"),
                           (root / "val", None)]:
        out = tmp_path / "eval" / folder.name
        main([checkpoint, str(folder), "--output", str(out), "--num-workers", "0"])
        report = json.loads((out / "report.json").read_text())
        warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        if reason is None:
            assert warned == [] and report["training_data"] is None
        else:
            assert len(warned) == 1 and f"'{folder}' is the checkpoint's training data" in warned[0], warned
            assert "not held-out" in warned[0] and reason in report["training_data"] and reason in warned[0]


def test_a_1000_class_report_keeps_a_readable_figure_and_the_dense_matrix_in_its_own_file(tmp_path):
    classes, n = 1000, 5000
    rng = np.random.default_rng(0)
    true = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), true] += 3
    swapped = (true % 10 == 0) & (rng.random(n) < 0.6)  # classes 0, 10, 20, ... often taken for the next one
    logits[swapped, true[swapped] + 1] += 8
    probs = torch.from_numpy(logits).float().softmax(-1)
    keeper = ScoreKeeper(classes, top_k=5, device=torch.device("cpu"))
    for batch in torch.arange(n).split(512):
        keeper.update(probs[batch], torch.from_numpy(true)[batch])
    preprocessing = Preprocessing(resolution=8)
    images = TensorDataset(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.from_numpy(true))
    names = [f"class {i}" for i in range(classes)]
    predictions = Predictions(**vars(keeper.scores()), items=[f"{i}.png" for i in range(n)], class_names=names,
                              dataset=images, transform=lambda b: (preprocessing.normalize(b[0]), b[1]),
                              preprocessing=preprocessing, inference=Inference.choose("cpu"))
    evaluate(predictions, tmp_path)

    expected = confusion_matrix(true, probs.argmax(1).numpy(), labels=range(classes))
    np.testing.assert_array_equal(np.load(tmp_path / "confusion.npy"), expected)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["confusion_matrix"] == {"file": "confusion.npy", "shape": [classes, classes], "dtype": "int64"}
    assert (tmp_path / "report.json").stat().st_size < 300_000  # the per-class table; dense, it would be ~9 MB
    off = [(-expected[t, p], t, p) for t, p in zip(*np.nonzero(expected)) if t != p]
    top = sorted(off)[:10]
    assert [(p["true"], p["predicted"], p["count"]) for p in report["most_confused"]] == [
        (names[t], names[p], -c) for c, t, p in top]
    width, height = Image.open(tmp_path / "confusion_matrix.png").size
    assert width <= 1500 and height <= 1500
    fig = confusion_figure(expected, names)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert "most-confused of 1000 classes" in ax.get_title() and len(shown) == 40 and ax.get_yticklabels()[0].get_fontsize() >= 7
    assert {names[t] for _, t, _ in top} | {names[p] for _, _, p in top} <= set(shown)
    plt.close(fig)
