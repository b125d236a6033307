"""The figures read without the code (issue 21): each says what it shows, its texts clear its images,
counts and scales are on it. Drawn from real arrays and a real small run, inspected as matplotlib Figures."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox
from skimage import data as samples
from skimage.transform import resize

from finetune.analysis.cam import cam_figure, grad_cam, plt
from finetune.commands.compare import RunResult, compare, comparison_figure, frontier_figure
from finetune.commands.evaluate import evaluate, split_predictions
from finetune.models import create_model
from finetune.analysis.reports import confusion_figure, errors_figure, reliability_figure
from helpers import compose_config, write_digits_folder


def _photos(size: int = 64) -> torch.Tensor:
    """Three scikit-image sample photos, B×3×size×size in [0, 1]."""
    pictures = [samples.astronaut(), samples.coffee(), samples.chelsea()]
    return torch.stack([torch.from_numpy(resize(p, (size, size), anti_aliasing=True)).permute(2, 0, 1).float()
                        for p in pictures])


def _image_axes(fig: matplotlib.figure.Figure) -> list:
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def _overlaps(a: Bbox, b: Bbox) -> bool:
    """Whether two display boxes share area (touching edges do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def _drawn(fig: matplotlib.figure.Figure) -> matplotlib.figure.Figure:
    """`fig` laid out and drawn on an Agg canvas (a figure pyplot closed has lost its own)."""
    FigureCanvasAgg(fig).draw()
    return fig


def _titles_clear_other_images(fig: matplotlib.figure.Figure) -> None:
    """No axes' title, nor the figure's, covers an image of another axes or another title."""
    renderer = fig.canvas.get_renderer()
    images = _image_axes(fig)
    texts = [(ax, ax.title) for ax in images]
    if fig._suptitle is not None:
        texts.append((None, fig._suptitle))
    for owner, text in texts:
        box = text.get_window_extent(renderer)
        for ax in images:
            if ax is not owner:
                assert not _overlaps(box, ax.get_window_extent(renderer)), (text.get_text(), ax.title.get_text())
        for _, other in texts:
            if other is not text and text.get_text() and other.get_text():
                assert not _overlaps(box, other.get_window_extent(renderer)), (text.get_text(), other.get_text())


# --- Grad-CAM ------------------------------------------------------------------------------------------------

def test_cam_figure_names_the_explained_class_each_prediction_and_the_scale():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=3, pretrained=None, resolution=64).eval()
    images, classes = _photos(), ["astronaut", "coffee", "cat"]
    with torch.no_grad():
        probabilities = model(images).softmax(-1)  # an independent forward pass
    predicted = probabilities.argmax(1)
    labels = torch.stack([predicted[0], (predicted[1] + 1) % 3, predicted[2]])  # two right, one wrong
    activations = {policy: grad_cam(model, images, labels) for policy in ("frozen", "full")}
    predictions = {p: [(classes[int(k)], float(probabilities[i, k])) for i, k in enumerate(predicted)]
                   for p in activations}
    fig = cam_figure(images, {p: a.maps for p, a in activations.items()}, [classes[i] for i in labels], predictions)
    fig.canvas.draw()
    torch.testing.assert_close(activations["full"].probabilities, probabilities, rtol=1e-5, atol=1e-6)

    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0) and "true class" in bars[0].get_ylabel()
    assert "true class" in fig._suptitle.get_text()
    grid = np.array(_image_axes(fig)).reshape(3, 3)
    for i, row in enumerate(grid):
        assert row[0].get_title() == f"true: {classes[labels[i]]}"
        for ax, policy in zip(row[1:], ("frozen", "full")):
            right = i != 1
            name, probability = predictions[policy][i]
            assert ax.get_title() == f"{policy}\npredicts {name} ({probability:.2f}), {'right' if right else 'wrong'}"
            assert ax.title.get_color() == ("tab:green" if right else "tab:red")
    assert {ax.get_title().endswith("wrong") for ax in grid[:, 1:].flat} == {True, False}  # both kinds drawn
    _titles_clear_other_images(fig)
    renderer = fig.canvas.get_renderer()
    for ax in grid.flat:
        assert not _overlaps(bars[0].get_window_extent(renderer), ax.get_window_extent(renderer))
    plt.close(fig)


def _run(policy: str, val_acc: list[float], test_acc: float | None) -> RunResult:
    """A run as comparison.json records it (the demo's figures in README, What the demo does)."""
    return RunResult(model="lite0", policy=policy, run=policy, resolution=96, params=3_383_818, macs=104_000_000,
                     trainable_params=12_810, best_val_acc=max(val_acc), test_acc=test_acc, epoch_seconds=1.0,
                     train_images_per_second=1000.0, peak_memory_mb=8.0, total_seconds=8.0, cached_features=False,
                     val_acc=val_acc, train_loss=[1.0, 0.5, 0.4])


def test_comparison_stars_each_test_accuracy_at_its_best_epoch_or_says_there_is_none():
    runs = [_run("frozen", [0.90, 0.9417, 0.93], 0.9304), _run("full", [0.95, 0.97, 0.9861], 0.9777)]
    fig = comparison_figure(runs, "digits")
    acc_ax = fig.axes[0]
    np.testing.assert_allclose([c.get_offsets()[0] for c in acc_ax.collections], [(2, 0.9304), (3, 0.9777)])
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == [
        "frozen (test 0.9304)", "full (test 0.9777)", "test accuracy"]
    assert fig._suptitle.get_text().startswith("lite0 at 96 px on digits")
    plt.close(fig)
    fig = comparison_figure([_run("full", [0.95, 0.97, 0.9861], None)], "the image folder photos")
    assert not fig.axes[0].collections and "no test split" in fig.axes[0].get_title()
    plt.close(fig)


# --- Reliability ---------------------------------------------------------------------------------------------

def test_reliability_gap_bars_sit_beside_accuracy_in_the_legend_and_the_axis_starts_at_the_data():
    rng = np.random.default_rng(0)
    confidence = torch.from_numpy(rng.uniform(0.47, 1.0, 400))
    correct = torch.from_numpy(rng.uniform(size=400) < confidence.numpy() - 0.1)  # overconfident by about 0.1
    fig = reliability_figure(confidence, correct, ece=0.1)
    fig.canvas.draw()
    ax, hist = fig.axes
    accuracy_bars, gap_bars = ax.containers
    assert len(accuracy_bars) == len(gap_bars) == 8  # bins 7..14 of 15 hold images
    for a, g in zip(accuracy_bars, gap_bars):
        assert a.get_x() + a.get_width() <= g.get_x() and g.get_x() + g.get_width() <= a.get_x() + 1 / 15 + 1e-12
        assert a.get_facecolor()[3] == g.get_facecolor()[3] == 1.0  # opaque: no blended colour the legend lacks
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    gap_entry = next(h for label, h in legend.items() if label.startswith("gap"))
    assert gap_entry.get_facecolor() == gap_bars[0].get_facecolor() and gap_entry.get_hatch() == gap_bars[0].get_hatch()
    lowest = 7 / 15  # the bin holding 0.47
    assert ax.get_xlim() == pytest.approx((lowest, 1.0)) and hist.get_xlim() == pytest.approx((lowest, 1.0))
    assert min(b.get_x() for b in hist.patches) == pytest.approx(lowest)
    plt.close(fig)


# --- Confusion matrix ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [3, 10])
def test_confusion_cells_print_counts_and_rates_sized_to_the_cell(classes):
    rng = np.random.default_rng(classes)
    counts = rng.integers(0, 4, (classes, classes)) + np.diag(rng.integers(20, 250, classes))
    counts[-1] = [1] + [0] * (classes - 2) + [400]  # 1 of 401: a share that rounds to 0%
    names = [f"class {i}" for i in range(classes)]
    fig = confusion_figure(counts, names)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    box = ax.get_images()[0].get_window_extent(renderer)
    cell_w, cell_h = box.width / classes, box.height / classes
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert set(cells) == set(zip(*np.nonzero(counts)))
    for (true, pred), text in cells.items():
        count, rate = text.get_text().split("\n")
        assert int(count) == counts[true, pred]
        share = counts[true, pred] / counts[true].sum()
        assert rate == (f"{100 * share:.0f}%" if share >= 0.005 else "<1%")
        extent = text.get_window_extent(renderer)
        assert 0.4 * cell_h <= extent.height <= cell_h and extent.width <= cell_w  # fills the cell, stays inside
    plt.close(fig)


# --- Errors --------------------------------------------------------------------------------------------------

def test_error_images_have_frames_and_titles_clear_the_image_above():
    photos = _photos(48)
    white = torch.ones(1, 3, 48, 48)
    images = torch.cat([white, photos, photos, white])  # 8 images: two rows of four
    titles = [f"true: class {i}\npredicted: class {9 - i} (0.{90 + i})\nfolder/sample_{i:03d}.png" for i in range(8)]
    fig = errors_figure(images, titles)
    fig.canvas.draw()
    _titles_clear_other_images(fig)
    renderer = fig.canvas.get_renderer()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    height = pixels.shape[0]
    for ax in (_image_axes(fig)[0], _image_axes(fig)[-1]):  # the all-white ones
        b = ax.get_window_extent(renderer)
        x0, x1, y0, y1 = round(b.x0), round(b.x1), height - round(b.y1), height - round(b.y0)  # image rows run down
        darkest = pixels.max(2)  # a grey or black pixel is dark in every channel
        edges = [darkest[y0 + 3:y1 - 3, x - 2:x + 3].min(1) for x in (x0, x1)]
        edges += [darkest[y - 2:y + 3, x0 + 3:x1 - 3].min(0) for y in (y0, y1)]
        assert (pixels[y0 + 4:y1 - 4, x0 + 4:x1 - 4] == 255).all()  # the image is white
        assert all((edge < 128).all() for edge in edges)  # inside a dark frame on all four sides
    plt.close(fig)


# --- The commands write them ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_figures(tmp_path_factory) -> dict:
    """finetune-compare (two policies) and finetune-evaluate on a small real digit folder; every figure they saved."""
    root = write_digits_folder(tmp_path_factory.mktemp("digits"), per_class=8)
    overrides = ["model=b0", "model.pretrained=null", "model.resolution=32", "data=imagefolder", f"data.root={root}",
                 "data.num_workers=0", "data.batch_size=16", "trainer.max_epochs=2", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false"]
    out = tmp_path_factory.mktemp("compare")
    saved: dict[str, matplotlib.figure.Figure] = {}
    original = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved[Path(path).name] = fig
        return original(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", keep)
        results = compare([*overrides, "compare.policies=[frozen,full]", "compare.cam_images=3"], out)
        cfg = compose_config(overrides, out / "evaluate")
        evaluate(split_predictions(results[-1].best_checkpoint, cfg, "test"), out / "evaluate")
    return {"results": results, "out": out, "cfg": cfg, "figures": saved}


def test_compare_and_evaluate_write_every_figure(saved_figures):
    out, figures = saved_figures["out"], saved_figures["figures"]
    for name in ("comparison.png", "comparison_frontier.png", "comparison_cam.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and name in figures
    for name in ("confusion_matrix.png", "reliability.png", "errors.png"):
        assert (out / "evaluate" / name).read_bytes()[:4] == b"\x89PNG" and name in figures


def test_compare_cam_panels_say_what_each_checkpoint_predicts(saved_figures):
    results, cfg = saved_figures["results"], saved_figures["cfg"]
    fig = saved_figures["figures"]["comparison_cam.png"]
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    grid = np.array(_image_axes(fig)).reshape(3, 1 + len(results))
    for column, result in enumerate(results, start=1):
        val = split_predictions(result.best_checkpoint, cfg, "val")  # evaluation's path over the same first images
        for row in range(3):
            name = val.class_names[int(val.predicted[row])]
            verdict = "right" if val.predicted[row] == val.labels[row] else "wrong"
            assert grid[row][0].get_title() == f"true: {val.class_names[int(val.labels[row])]}"
            assert grid[row][column].get_title() == (
                f"{result.run}\npredicts {name} ({float(val.confidence[row]):.2f}), {verdict}")
    _titles_clear_other_images(_drawn(fig))


def test_comparison_names_model_and_data_and_shows_test_accuracy(saved_figures):
    results = saved_figures["results"]
    fig = saved_figures["figures"]["comparison.png"]
    title = fig._suptitle.get_text()
    assert "b0" in title and "32 px" in title and str(saved_figures["cfg"].data.root) in title
    acc_ax = fig.axes[0]
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    for r in results:
        assert r.test_acc is not None and f"{r.run} (test {r.test_acc:.4f})" in labels
    stars = [c.get_offsets()[0] for c in acc_ax.collections]
    expected = [(r.val_acc.index(max(r.val_acc)) + 1, r.test_acc) for r in results]
    np.testing.assert_allclose(stars, expected)
    assert "test accuracy" in acc_ax.get_title()


def test_frontier_draws_only_costs_that_differ(saved_figures):
    results: list[RunResult] = saved_figures["results"]
    fig = frontier_figure(results)  # one model: one GMACs value
    panels = [ax for ax in fig.axes if ax.collections]
    assert [ax.get_title() for ax in panels] == ["accuracy against training time"]
    assert f"{results[0].macs / 1e9:.3g} GMACs" in fig._suptitle.get_text()
    plt.close(fig)
    two_models = [*results, *(dataclasses.replace(r, model="b1", macs=2 * r.macs) for r in results)]
    fig = frontier_figure(two_models)
    assert [ax.get_title() for ax in fig.axes if ax.collections] == ["accuracy against compute",
                                                                      "accuracy against training time"]
    assert len({float(c.get_offsets()[0][0]) for c in fig.axes[0].collections}) == 2  # two GMACs values drawn
    plt.close(fig)


def test_evaluate_figures_carry_counts_frames_and_populated_range(saved_figures):
    figures, out = saved_figures["figures"], saved_figures["out"]
    confusion = np.load(out / "evaluate" / "confusion.npy")
    ax = figures["confusion_matrix.png"].axes[0]
    shown = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text().split("\n")[0]) for t in ax.texts}
    assert shown == {(t, p): int(confusion[t, p]) for t, p in zip(*np.nonzero(confusion))}
    with (out / "evaluate" / "predictions.csv").open() as f:
        probability = np.array([float(row["probability"]) for row in csv.DictReader(f)])
    reliability = figures["reliability.png"].axes[0]
    assert reliability.get_xlim()[0] == pytest.approx(np.floor(probability.min() * 15) / 15)
    errors = figures["errors.png"]
    assert _image_axes(errors) and all(ax.spines["top"].get_visible() and ax.axison for ax in _image_axes(errors))
    _titles_clear_other_images(_drawn(errors))
