"""Segmentation examples in W&B: wandb.Image with ground-truth / clean / adversarial masks, read back from what an
offline run wrote (its .wandb log and media files)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medrobust.reporting.loggers import wandb_logger
from medrobust.reporting.wandb_examples import log_examples_to_wandb
from medrobust.reporting.examples import Example
from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer
from conftest import compose_config

MASKS = ("ground_truth", "clean_prediction", "adversarial_prediction")


def _offline_run(save_dir: Path, timeout: float = 30.0) -> tuple[dict, dict, Path]:
    """``(history, config, files)`` of the one offline W&B run under ``save_dir``: history items by key (the last
    value wins), the config's ``_wandb`` entry, and the run's files folder. Waits for the run's exit record: W&B's
    core process may still be writing the log after ``finish()`` returns (seen on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        (path,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
        history, config, done = {}, {}, False
        for record in _records(path.read_bytes(), path):
            done |= record.WhichOneof("record_type") == "exit"
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.config.update:
                if item.key == "_wandb":
                    config = json.loads(item.value_json)
        if done or time.monotonic() > deadline:
            assert done, f"{path} has no exit record after {timeout} s"
            return history, config, path.parent / "files"
        time.sleep(0.2)


def _records(data: bytes, path: Path):
    """The protobuf records of a .wandb log: LevelDB-style (32 KiB blocks, 7-byte record headers after a 7-byte
    file header); this W&B version ships no reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and pos <= len(data):  # a full record, or the last fragment of one (and not cut off)
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _png(files: Path, relative: str) -> np.ndarray:
    return np.asarray(Image.open(files / relative))


def test_masks_are_the_grids_planes_with_the_class_names(tmp_path, monkeypatch):
    """3-D: each sample's slice with the most ground-truth foreground; every mask at its key; class names."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    x = torch.linspace(-3, 5, 2 * 5 * 6 * 7).reshape(2, 1, 5, 6, 7)  # z-scored: outside [0, 1]
    truth = torch.zeros(2, 5, 6, 7, dtype=torch.long)
    truth[0, 1, 1:4, 2:6] = 2  # sample 0: most foreground on slice 1, a little on slice 3
    truth[0, 3, 0, 0] = 1
    truth[1, 4, 3:, :] = 1  # sample 1: slice 4 only
    clean = torch.zeros_like(truth)
    clean[:, :, 0, :] = 1  # row 0 on every slice
    adversarial = torch.zeros_like(truth)
    adversarial[:, :, :, 6] = 2  # column 6 on every slice
    masks = {"ground truth": truth, "clean prediction": clean, "adversarial prediction": adversarial}
    # a classifier's example has captions (its predicted classes), no masks; one with neither is not logged
    captions = ["true benign\nclean benign 0.90\nadv malignant 0.60", "true malignant\nclean malignant 0.70\nadv benign 0.55"]
    examples = {"segpgd_linf": Example(0.004, x, x + 0.004, masks), "pgd10_linf": Example(0.004, x, x + 0.004, None),
                "fgsm_linf": Example(0.004, x, x + 0.004, None, captions)}
    logger = wandb_logger(offline=None, save_dir=str(tmp_path), project="medrobust-test")
    log_examples_to_wandb([logger], examples, "test", ["background", "nodule", "vessel"])
    logger.experiment.finish()

    history, config, files = _offline_run(tmp_path)
    assert not any(key.startswith("examples/test_pgd10_linf") for key in history)
    assert history["examples/test_fgsm_linf/captions"] == [
        "fgsm_linf at eps=0.004 (model): sample 0, slice 2: true benign, clean benign 0.90, adv malignant 0.60",
        "fgsm_linf at eps=0.004 (model): sample 1, slice 2: true malignant, clean malignant 0.70, adv benign 0.55"]
    logged = "examples/test_segpgd_linf"
    assert history[f"{logged}/count"] == 2
    assert history[f"{logged}/captions"] == ["segpgd_linf at eps=0.004 (model): sample 0, slice 1",
                                             "segpgd_linf at eps=0.004 (model): sample 1, slice 4"]
    for i, (slice_, one) in enumerate(zip((1, 4), history[f"{logged}/all_masks"])):
        assert set(one) == set(MASKS)
        for key, mask in zip(MASKS, masks.values()):
            np.testing.assert_array_equal(_png(files, one[key]["path"]), mask[i, slice_].numpy(), err_msg=key)
        # the image is the same plane, grey-scaled over the shown samples' range (W&B would clip it to [0, 1])
        grey = (x[i, 0, slice_] + 3) / 8 * 255
        np.testing.assert_allclose(_png(files, history[f"{logged}/filenames"][i]), grey.numpy(), atol=0.51)
    labels = config["mask/class_labels"]
    for key in MASKS:
        assert labels[f"{logged}_wandb_delimeter_{key}"]["value"] == {"0": "background", "1": "nodule", "2": "vessel"}


def test_a_segmentation_test_run_logs_its_masks(tiny_for, tmp_path, monkeypatch):
    """Through the callback: task=brainseg logger=wandb, test only; masks of the first test batch, the task's names."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [*tiny_for("brainseg"), "logger=wandb", "~eval.attacks.pgd",
                                             "eval.eps=[0.004]"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.test(module, datamodule=datamodule)
    trainer.loggers[-1].experiment.finish()

    assert list((tmp_path / "examples").glob("test_*.png")), "no PNG grid written"
    history, config, files = _offline_run(tmp_path)
    (logged,) = {key.split("/")[1] for key in history if key.startswith("examples/")}
    truth = next(iter(datamodule.test_dataloader()))["label"]
    shown = history[f"examples/{logged}/all_masks"]
    assert len(shown) == min(6, len(truth))
    for i, one in enumerate(shown):  # 2-D slices: the plane is the whole label map
        np.testing.assert_array_equal(_png(files, one["ground_truth"]["path"]), truth[i].numpy())
        assert _png(files, one["adversarial_prediction"]["path"]).shape == tuple(truth.shape[1:])
    names = dict(enumerate(module.class_names))
    assert config["mask/class_labels"][f"examples/{logged}_wandb_delimeter_ground_truth"]["value"] == {
        str(k): v for k, v in names.items()}
    assert names == {0: "background", 1: "csf", 2: "ventricles", 3: "gm", 4: "wm"}


def test_landmarks_are_named_boxes_on_the_grids_plane(tmp_path, monkeypatch):
    """Point sets (landmarks, a targeted attack's targets) as W&B box groups: one 3 x 3 pixel box per point on the
    plane the PNG grid shows (3-D: through the first set's median slice), captioned with the point's name."""
    from medrobust.reporting.points import PointSet

    monkeypatch.setenv("WANDB_MODE", "offline")
    x = torch.rand(2, 1, 6, 8, 9)
    truth = PointSet(torch.tensor([[[2.0, 3.0, 4.0], [2.0, 5.0, 1.0], [4.0, 1.0, 7.0]]] * 2), ["AC", "PC", "GENU"])
    clean = PointSet(truth + 0.5, truth.point_names)
    targets = PointSet(truth[:, :1] + torch.tensor([0.0, 2.0, 0.0]), ["AC target"])
    masks = {"ground truth": truth, "clean prediction": clean, "targets": targets}
    logger = wandb_logger(offline=None, save_dir=str(tmp_path), project="medrobust-test")
    log_examples_to_wandb([logger], {"pgd10_linf": Example(0.004, x, x, masks)}, "test")
    logger.experiment.finish()

    history, config, files = _offline_run(tmp_path)
    logged = "examples/test_pgd10_linf"
    assert history[f"{logged}/captions"] == ["pgd10_linf at eps=0.004 (model): sample 0, slice 2",
                                             "pgd10_linf at eps=0.004 (model): sample 1, slice 2"]
    one = history[f"{logged}/all_boxes"][0]
    assert set(one) == {"ground_truth", "clean_prediction", "targets"}
    boxes = json.loads((files / one["ground_truth"]["path"]).read_text())["box_data"]
    assert [box["box_caption"] for box in boxes] == ["AC", "PC", "GENU"]
    ac = boxes[0]["position"]  # AC at (slice 2, row 3, column 4): W&B's x is the column, y the row
    assert (ac["minX"], ac["maxX"], ac["minY"], ac["maxY"]) == (2.5, 5.5, 1.5, 4.5)
    target = json.loads((files / one["targets"]["path"]).read_text())["box_data"]
    assert [box["box_caption"] for box in target] == ["AC target"] and target[0]["position"]["minY"] == 3.5
    labels = config["bounding_box/class_labels"]
    assert labels[f"{logged}_wandb_delimeter_ground_truth"]["value"] == {"0": "AC", "1": "PC", "2": "GENU"}
