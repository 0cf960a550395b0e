"""AdversarialTraining and RobustnessEvaluation: validation, schedule, resume, DDP reduction."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from medrobust.attacks import FGSM, PGD
from medrobust.callbacks import AdversarialTraining, RobustnessEvaluation
from medrobust.reporting import read_csv
from medrobust.runner import build_data_and_module
from conftest import compose_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "adv.eps must be >= 0, got -0.1"),
        ({"eps": 0.1, "eps_unit": "hu"}, "adv.eps_unit must be one of"),
        ({"eps": 0.1, "adv_fraction": 0.0}, "adv.adv_fraction must be in (0, 1], got 0.0"),
        ({"eps": 0.1, "warmup_epochs": -1}, "adv.warmup_epochs must be >= 0, got -1"),
        ({"eps": 0.1, "clean_epochs": -1}, "adv.clean_epochs must be an integer >= 0, got -1"),
        ({"eps": 0.1, "clean_epochs": 1.5}, "adv.clean_epochs must be an integer >= 0, got 1.5"),
        ({"eps": 0.1, "clean_weight": 0.0, "adv_weight": 0.0}, "not both 0"),
        ({"eps": 0.1, "guard_action": "ignore"}, "adv.guard_action must be one of"),
    ],
)
def test_adversarial_training_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        AdversarialTraining(PGD(steps=2), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": [0.0, -0.002]}, "eval.eps must be a non-empty list of values >= 0"),
        ({"eps_unit": "percent"}, "eval.eps_unit must be one of"),
        ({"every_n_epochs": 0}, "eval.every_n_epochs must be >= 1, got 0"),
        ({"max_batches": 0}, "eval.max_batches must be >= 1 or null"),
    ],
)
def test_robustness_evaluation_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        RobustnessEvaluation([FGSM()], **kwargs)
    assert message in str(info.value)


def test_eps_warmup_is_linear_then_flat():
    callback = AdversarialTraining(PGD(steps=2), eps=0.008, warmup_epochs=3)
    assert [callback.eps_at(e) for e in range(6)] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.008, 0.008])
    assert AdversarialTraining(PGD(steps=2), eps=0.008).eps_at(0) == 0.008


def test_clean_epochs_come_before_the_warm_up_or_the_schedule():
    callback = AdversarialTraining(PGD(steps=2), eps=0.008, warmup_epochs=1, clean_epochs=2)
    assert [callback.eps_at(e) for e in range(5)] == pytest.approx([0.0, 0.0, 0.004, 0.008, 0.008])
    rounds = AdversarialTraining(PGD(steps=2), eps=0.004, schedule=[[2, 0.002], [1, 0.004]], clean_epochs=1)
    assert [rounds.eps_at(e) for e in range(6)] == pytest.approx([0.0, 0.002, 0.002, 0.004, 0.004, 0.004])


def test_the_overfitting_guard_rests_in_clean_epochs(tiny, tmp_path):
    """An FGSM run whose first epoch is clean: the guard checks nothing there (its clean accuracy would be the
    best it ever saw, and the first attacked epoch would look like a collapse), then checks every attacked one."""
    cfg = compose_config("train", ["task=lidc", *tiny], tmp_path)
    adv = AdversarialTraining(FGSM(), eps=0.008, clean_epochs=1, guard_attack=PGD(steps=2), guard_drop=0.01)
    trainer, _ = _fit(cfg, [adv], max_epochs=2)
    assert [epoch for epoch, _ in adv.guard_history] == [1] and trainer.current_epoch == 2


def _fit(cfg, callbacks, max_epochs, ckpt_path=None):
    from hydra.utils import instantiate

    datamodule, module = build_data_and_module(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, max_epochs=max_epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module


def _callbacks(run_dir: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    adv = AdversarialTraining(PGD(steps=2, early_stop=False), eps=0.008, warmup_epochs=3)
    evaluation = RobustnessEvaluation([FGSM(), PGD(steps=3)], eps=[0.0, 0.004], max_batches=1, output_dir=str(run_dir))
    return [adv, evaluation, ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)]


def test_resume_restores_schedule_and_curve_history(tiny, tmp_path):
    cfg = compose_config("train", [*tiny], tmp_path)
    first = _callbacks(tmp_path)
    _fit(cfg, first, max_epochs=2)
    assert [e for e, _ in first[0].eps_history] == [0, 1]

    second = _callbacks(tmp_path)  # fresh instances: all they know comes from the checkpoint
    trainer, module = _fit(cfg, second, max_epochs=3, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    adv, evaluation = second[0], second[1]
    assert [epoch for epoch, _ in adv.eps_history] == [0, 1, 2]
    assert [eps for _, eps in adv.eps_history] == pytest.approx([0.002, 0.004, 0.006])
    assert sorted({row["epoch"] for row in evaluation.history}) == [0, 1, 2]
    on_disk = read_csv(tmp_path / "robustness.csv")
    assert sorted({row["epoch"] for row in on_disk}) == [0, 1, 2]
    # 3 epochs x 2 attacks x 2 eps x 4 metrics, nothing duplicated by the resume
    assert len(on_disk) == 3 * 2 * 2 * 4
    assert module.train_objective.__name__ == "clean_objective"  # teardown gave the module back


def test_adversarial_objective_raises_the_loss_and_leaves_parameters_alone(tiny, tmp_path):
    cfg = compose_config("train", [*tiny, "adv=pgd"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.input_bounds = datamodule.input_bounds
    batch = next(iter(datamodule.train_dataloader()))
    callback = AdversarialTraining(PGD(steps=3, early_stop=False), eps=0.03)
    module.train()
    loss = callback.objective(module, batch)
    assert loss.requires_grad
    assert all(p.grad is None for p in module.parameters())  # the attack left parameter grads alone
    assert module.training  # mode restored after the attack
    module.eval()  # compare like with like: no dropout, fixed BatchNorm statistics
    with torch.no_grad():
        clean = module.attack_loss(module(batch["image"]), batch).mean()
    adversarial = callback.objective(module, batch)
    assert adversarial.item() > clean.item() + 1e-3


@pytest.mark.slow
def test_ddp_spawn_reduces_across_ranks_like_one_process(tiny, tmp_path):
    """Two CPU ranks attack their own batches; the reduced curve equals the one-process curve."""
    from hydra.utils import instantiate

    cfg = compose_config("train", [*tiny], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    results = {}
    for name, strategy, devices in (("one", "auto", 1), ("ddp", "ddp_spawn", 2)):
        module.load_state_dict(state)
        evaluation = RobustnessEvaluation([FGSM()], eps=[0.0, 0.004], max_batches=None, output_dir=str(tmp_path / name))
        trainer = instantiate(cfg.trainer, callbacks=[evaluation], logger=False, strategy=strategy, devices=devices,
                              limit_val_batches=None, default_root_dir=str(tmp_path / name))
        trainer.validate(module, datamodule=datamodule)
        results[name] = {(r["eps"], r["metric"]): r["value"] for r in read_csv(tmp_path / name / "robustness.csv")}
    assert results["one"].keys() == results["ddp"].keys()
    for key, value in results["one"].items():  # whole batches per rank, none repeated (datamodules/sharding.py)
        assert abs(results["ddp"][key] - value) <= 1e-6, key


def test_eps_in_hounsfield_units_equals_the_same_eps_in_model_units(tiny, tmp_path):
    """eval.eps_unit=native: 5.6 HU through the [-1000, 400] window is 0.004 on [0, 1]."""
    cfg = compose_config("train", [*tiny], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    module.input_bounds, module.intensity = datamodule.input_bounds, datamodule.intensity
    loader = datamodule.val_dataloader()
    rows = {}
    for unit, eps in (("model", 0.004), ("native", 5.6)):
        evaluation = RobustnessEvaluation([FGSM()], eps=[eps], eps_unit=unit)
        result = evaluation.evaluate(module, loader, split="val", epoch=0, max_batches=2)
        rows[unit] = [r["value"] for r in result.rows]
        example = result.examples["fgsm_linf"]
        x, x_adv, masks = example.x, example.x_adv, example.masks
        assert masks is None  # a classifier has no label maps to show: its captions name the classes
        with torch.no_grad():
            clean = module.eval()(x).softmax(dim=1)
        assert [c.split("\n")[:2] for c in example.captions] == [
            [f"true {module.class_names[y]}", f"clean {module.class_names[int(p.argmax())]} {float(p.max()):.2f}"]
            for y, p in zip(next(iter(loader))["label"].tolist(), clean)]
        assert (x_adv - x).abs().max().item() == pytest.approx(0.004, rel=1e-4)  # FGSM moves by exactly eps
    assert rows["native"] == pytest.approx(rows["model"], abs=1e-6)
    assert len(rows["model"]) == 2 * 4  # eps 0 and 0.004, four metrics


def test_eps_in_native_units_through_the_trainer(tiny, tmp_path):
    """eval.eps_unit=native as a run uses it: the callback is set up before the module binds its data's window."""
    from medrobust.runner import build_callbacks, build_trainer

    cfg = compose_config("train", [*tiny, "eval.eps_unit=native", "eval.eps=[0,5.6]"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    trainer.validate(module, datamodule=datamodule)
    rows = read_csv(tmp_path / "robustness.csv")
    assert {row["eps"] for row in rows} == {0.0, 5.6} and {row["eps_unit"] for row in rows} == {"native"}


def test_overfitting_guard_stops_training_when_robust_accuracy_collapses(tiny, tmp_path):
    """FGSM training's guard: PGD accuracy on a training batch falling by more than guard_drop stops the run."""
    import lightning as L

    cfg = compose_config("train", [*tiny], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.input_bounds = datamodule.input_bounds
    batch = next(iter(datamodule.train_dataloader()))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    guard = AdversarialTraining(FGSM(random_start=True, rel_step_size=1.25), eps=0.004,
                                guard_attack=PGD(steps=5), guard_drop=0.2, guard_action="stop")
    guard._guard_batch = batch
    guard.guard_best = 1.0  # an earlier epoch's robust accuracy on the training batch
    with torch.no_grad():  # a model that the guard's PGD breaks on most samples: big eps, untrained net
        clean = module.is_correct(module.eval()(batch["image"]), batch).float().mean().item()
    guard.eps = 0.5
    guard.on_train_epoch_end(trainer, module)
    accuracy = guard.guard_history[-1][1]
    assert accuracy <= clean and accuracy < 1.0 - 0.2
    assert trainer.should_stop
    assert guard.state_dict()["guard_history"] == guard.guard_history


def test_tensorboard_logger_writes_event_files(tiny, tmp_path):
    from medrobust.runner import build_callbacks, build_loggers, build_trainer

    cfg = compose_config("train", [*tiny, "logger=tensorboard", "eval=none"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))



class GatherProbe(L.LightningModule):
    """Each rank holds per-sample values of its own count (rank 0: 1, rank 1: 3), as same-shape batches of whole
    volumes can leave them, and rank 0 writes what ``_gather`` returns."""

    def __init__(self, out: str):
        super().__init__()
        self.out, self.layer = out, torch.nn.Linear(1, 1)

    def setup(self, stage):
        import atexit

        from lightning.fabric.utilities.distributed import _destroy_dist_connection

        # each spawned rank destroys its gloo group at exit, as Lightning does only for NCCL: left to the
        # interpreter's teardown, a rank of this seconds-long run aborted ("terminate called without an active
        # exception") in about 1 run of 10
        atexit.register(_destroy_dist_connection)

    def validation_step(self, batch, batch_idx):
        return None

    def on_validation_epoch_end(self):
        from medrobust.evaluation.gather import gather as _gather

        rank = self.global_rank
        gathered = _gather(self, torch.arange(3 * rank, 3 * rank + 1 + 2 * rank, dtype=torch.float32))
        if rank == 0:
            Path(self.out).write_text(",".join(f"{v:g}" for v in gathered.tolist()))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)

@pytest.mark.slow
def test_ddp_gather_of_per_sample_values_takes_uneven_rank_counts(tmp_path):
    """Radii gathered across ranks that hold different numbers of samples: every value once, in rank order."""
    out = tmp_path / "gathered.txt"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(GatherProbe(str(out)))
    assert out.read_text() == "0,3,4,5"
