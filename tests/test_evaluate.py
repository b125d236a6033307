"""finetune-evaluate: predictions with class names from a trained checkpoint."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.evaluate import main
from finetune.train import fit
from helpers import compose_config


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
