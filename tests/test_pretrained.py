"""model.weights: a pretrained state dict from disk into the configured network (src/medrobust/models/pretrained.py):
wrapper keys and prefixes found, the classifier head allowed to differ, every other mismatch a clear error."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import compose_config
from medrobust.models.pretrained import head_prefix, load_pretrained
from medrobust.runner import build_data_and_module, build_net


def _net(tmp_path, model: str, *overrides: str):
    return build_net(compose_config("train", [f"model={model}", *overrides], tmp_path))


def test_a_lightning_checkpoint_loads_through_the_config_and_says_so(tiny, tmp_path, caplog):
    """A task module's checkpoint (``state_dict`` with ``net.`` keys) into model=small_cnn through
    ``model.weights``: every tensor equal to the file's, the log naming what loaded."""
    source = _net(tmp_path, "small_cnn")
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, path)
    with caplog.at_level(logging.INFO, logger="medrobust"):
        _, module = build_data_and_module(compose_config("train", [*tiny, f"model.weights={path}"], tmp_path))
    for key, value in source.state_dict().items():
        assert torch.equal(module.net.state_dict()[key], value), key
    n = len(source.state_dict())
    assert f"{n} tensors loaded; head kept as initialised (other shape): none; missing from the file: none" in caplog.text


@pytest.mark.parametrize("model", ["resnet18", "densenet121"])
def test_a_head_of_another_class_count_is_kept_as_initialised(model, tmp_path):
    """Weights of a 7-class network (ISIC's) into a 2-class one: the body loads, the head stays, the report names it."""
    source = _net(tmp_path, model, "module.num_classes=7")
    target = _net(tmp_path, model)
    initial_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(head_prefix(target))}
    path = tmp_path / "weights.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)  # a DDP-wrapped save
    report = load_pretrained(target, path)
    assert sorted(report.head_skipped) == sorted(k for k in initial_head if "weight" in k or "bias" in k)
    assert not report.missing and not report.unused
    for key, value in target.state_dict().items():
        expected = initial_head[key] if key in report.head_skipped else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_a_mismatch_outside_the_head_fails_naming_the_key_and_shapes(tmp_path):
    path = tmp_path / "rgb.pt"
    torch.save(_net(tmp_path, "small_cnn", "+in_channels=3").state_dict(), path)
    target = _net(tmp_path, "small_cnn")
    first = next(iter(target.state_dict()))
    with pytest.raises(ValueError, match=rf"{first} has shape \(16, 3, 3, 3\) in the file and \(16, 1, 3, 3\) "
                                         r"in the configured network"):
        load_pretrained(target, path)


def test_files_that_are_no_state_dict_of_this_network_fail_naming_the_file(tmp_path):
    target = _net(tmp_path, "small_cnn")
    with pytest.raises(FileNotFoundError, match="model.weights: no such file"):
        load_pretrained(target, tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"text.pt is not a state dict"):
        load_pretrained(target, tmp_path / "text.pt")
    torch.save({"epoch": 1, "note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"empty.pt holds no tensors"):
        load_pretrained(target, tmp_path / "empty.pt")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"none of its 2 tensors matches the configured network SmallCNN"):
        load_pretrained(target, tmp_path / "other.pt")
