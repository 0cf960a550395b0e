"""Every task x adv x eval config composes, instantiates and runs one tiny fit + test (3-D tasks: every adv and every eval).

Nothing here names a task, an adv or an eval: they are discovered from conf/, and what each task gets from its
composed config (as timm's contract test runs over every registered model). A new task needs only
conf/task/<task>.yaml and its tiny data, conf/debug/tiny/<task>.yaml, to be covered.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig

from medrobust.tasks.base import lacking
from medrobust.reporting import read_csv
from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_net, build_trainer
from conftest import CONF, DEBUG, compose_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@cache
def _composed(task: str, evaluation: str | None = None):
    """The tiny run's train config of ``task`` (its own default eval, or ``evaluation``), with Hydra's choices;
    composed at collection, so nothing that needs a run directory is resolved."""
    overrides = [f"task={task}", DEBUG] + ([f"eval={evaluation}"] if evaluation else [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _task_has(task: str, member: str) -> bool:
    """Whether the task module class (``module._target_``) has ``member``: a method or class attribute, or a
    constructor argument it keeps (ClassificationTask's ``num_classes``). Nothing is built or trained."""
    cls = get_class(_composed(task).module._target_)
    return not lacking(cls, (member,)) or member in inspect.signature(cls).parameters


@cache
def _eval_requirements(evaluation: str) -> tuple[str | None, tuple[str, ...]]:
    """The objective ``evaluation`` asks of a task and the task members its callback and attacks declare in
    ``requires``; composed once per eval (with the default task: a task sets an eval's budgets, never its attacks)."""
    node = _composed(_default_task(), evaluation).eval
    target = node.get("_target_")
    needs = tuple(getattr(get_class(target), "requires", ())) if target is not None else ()
    attacks = instantiate(node.get("attacks") or {})
    attacks = attacks.values() if hasattr(attacks, "values") else attacks
    return node.get("objective"), needs + tuple(member for attack in attacks for member in getattr(attack, "requires", ()))


def _applies(task: str, evaluation: str) -> bool:
    """Whether the task declares the objective ``evaluation`` climbs and has every member its callback and attacks
    declare in ``requires`` (what the evaluation checks at setup): a regression-only evaluation does not apply to a
    classifier, eval=shape's point objective nor eval=ood to a segmenter."""
    objective, needs = _eval_requirements(evaluation)
    if objective is not None and objective not in getattr(get_class(_composed(task).module._target_),
                                                           "attack_objectives", {}):
        return False
    return all(_task_has(task, member) for member in needs)


@cache
def _default_task() -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", return_hydra_config=True).hydra.runtime.choices.task


@cache
def _adv_requirements(adv: str) -> tuple[str, ...]:
    """The task members the defence of ``adv`` declares in ``requires``; composed once per adv."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        defense = compose("train", overrides=[f"adv={adv}"]).adv.get("defense")
    return tuple(getattr(get_class(defense._target_), "requires", ())) if defense is not None else ()


def _adv_applies(task: str, adv: str) -> bool:
    """Whether the task module has every member the defence of ``adv`` declares in ``requires`` (MART: a
    classifier), as AdversarialTraining checks at setup."""
    return adv == "none" or all(_task_has(task, member) for member in _adv_requirements(adv))


def _targets(node) -> tuple:
    """The ``_target_`` of every object a config node instantiates (nested) with the norm it runs in, if any."""
    if isinstance(node, DictConfig):
        own = ((node["_target_"], node.get("norm"), node.get("objective")),) if "_target_" in node else ()
        return own + tuple(t for key in node if key != "_target_" for t in _targets(node[key]))
    if isinstance(node, ListConfig):
        return tuple(t for item in node for t in _targets(item))
    return ()


def _distinct(options: list[str], group: str, first: str) -> list[str]:
    """``options`` of ``group`` (adv / eval) less those that build nothing the ones before (``first`` first) did not:
    an adv of the same defence and attack classes as another (``iterative`` as ``pgd``), an eval of attacks in the
    same norms as others (``standard`` inside ``seed004``)."""
    seen: set = set()
    kept = []
    for option in sorted(options, key=lambda o: (o != first, o)):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            targets = set(_targets(compose("train", overrides=[f"{group}={option}"])[group] or DictConfig({})))
        if not targets or not targets <= seen:
            kept.append(option)
        seen |= targets
    GlobalHydra.instance().clear()
    return kept


DATA_ADVS = ("pgd", "margin")  # the defences whose batches need more of the data than images and labels


def _combos() -> list[tuple[str, str, str]]:
    """Every task: every applicable eval with adv=none and every applicable adv with the task's own default eval,
    less the options that build only what another option builds (:func:`_distinct`). A task whose module class an
    earlier task has (the default task first) brings only its data: adv=none with eval=none and its default eval,
    PGD and margin training. The default task runs every option, and PGD training with every applicable eval (the
    adv and eval callbacks together on every suite)."""
    combos = []
    distinct_advs = _distinct(_options("adv"), "adv", first="pgd")
    distinct_evals = _distinct(_options("eval"), "eval", first=_composed(_default_task()).hydra.runtime.choices.eval)
    covered: set[str] = set()  # task module classes that a task before has run every option on
    for task in sorted(_options("task"), key=lambda t: t != _default_task()):
        default = task == _default_task()
        default_eval = _composed(task).hydra.runtime.choices.eval
        module_class = _composed(task).module._target_
        # another task of a covered module class brings only its data: its default eval, and the defences that
        # read more of a batch than images and labels (PGD, margin's sample ids); the attacks' and defences' logic
        # is the module's, already run
        own_data_only = module_class in covered
        covered.add(module_class)
        evals = [e for e in _options("eval") if _applies(task, e) and (default or e in distinct_evals)
                 and (not own_data_only or e in ("none", default_eval))]
        advs = [a for a in _options("adv") if a != "none" and _adv_applies(task, a)
                and (default or a in (DATA_ADVS if own_data_only else distinct_advs))]
        combos += [(task, "none", e) for e in evals]
        combos += [(task, adv, default_eval) for adv in advs]
        if default:
            combos += [(task, "pgd", e) for e in evals if e != default_eval]
    return combos


COMBOS = _combos()


def _short_suites(cfg) -> None:
    """Suites' budgets cut to a few steps and queries: the contract is that they run, not how strong they are
    (tests/test_suites.py and the attack tests check that)."""
    from omegaconf import open_dict

    attacks = list((cfg.eval.get("attacks") or {}).values())
    attacks += [attack.attack for attack in attacks if attack.get("attack") is not None]  # wrapped (targeted) attacks
    for attack in attacks:
        with open_dict(attack):
            if attack.get("steps", 0) > 10:
                attack.steps = 2
            if attack.get("queries", 0) > 20:
                attack.queries = 10
    if cfg.eval is not None and cfg.eval.get("steps", 0) > 10:  # an evaluation's own optimiser (eval=ood)
        cfg.eval.steps = 2


EVALUATIONS = {"RobustnessEvaluation", "OODEvaluation"}  # the callbacks an eval config builds


@pytest.mark.parametrize(("task", "adv", "evaluation"), COMBOS, ids=["-".join(c) for c in COMBOS])
def test_config_composes_instantiates_and_fits(tiny_for, task, adv, evaluation, tmp_path):
    assert (CONF / "debug" / "tiny" / f"{task}.yaml").is_file(), f"task={task} has no tiny data for debug=tiny"
    cfg = compose_config("train", [*tiny_for(task), f"adv={adv}", f"eval={evaluation}"], tmp_path)
    _short_suites(cfg)
    datamodule, module = build_data_and_module(cfg)
    callbacks = build_callbacks(cfg)
    names = {type(cb).__name__ for cb in callbacks}
    assert ("AdversarialTraining" in names) == (adv != "none")
    assert bool(names & EVALUATIONS) == (evaluation != "none")
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.state.finished
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert "test/accuracy" in trainer.callback_metrics
    if evaluation != "none":
        assert (Path(tmp_path) / ("ood.csv" if "OODEvaluation" in names else "robustness.csv")).is_file()
        assert (Path(tmp_path) / "summary.md").is_file()
    if evaluation.startswith("curve"):  # the minimum-norm suite's per-sample radii (robustness.csv rows), histogram
        rows = read_csv(Path(tmp_path) / "robustness.csv")
        radii = [r for r in rows if r["metric"] == "radius" and r["split"] == "test"]
        evaluated = min(cfg.data.batch_size, len(datamodule.data_test))  # test_max_batches=1
        assert len(radii) == len({r["sample"] for r in radii}) == evaluated
        assert all(r["value"] >= 0 for r in radii) and all(r["eps"] == "" for r in radii)
        norm = cfg.eval.attacks.curve.minimum_norm.norm
        assert (Path(tmp_path) / "curves" / f"test_fmn-curve_{norm}_radii.png").is_file()


def test_a_regression_only_evaluation_on_a_classifier_fails_at_setup(tiny_for, tmp_path):
    assert not _applies("lidc", "age_shift")  # what the contract combos leave out, for the reason setup gives
    cfg = compose_config("train", [*tiny_for("lidc"), "eval=age_shift"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    with pytest.raises(TypeError, match=r"directional_up_linf needs a task module with \['prediction'\]"):
        trainer.fit(module, datamodule=datamodule)


# the hybrid needs anatomical features from the data: it runs in the brain-age experiment test; the shape networks
# (2-D, outlines and masks) run in tests/test_shape_net.py and in task=lidc_shape's runs here
IMAGE_ONLY_MODELS = [m for m in _options("model") if m != "brain_hybrid" and not m.startswith("shape_")]


@pytest.mark.parametrize("model", IMAGE_ONLY_MODELS)
def test_every_model_runs_2d_and_3d(model, tmp_path):
    """Each image-only model config builds for 2-D and 3-D input and gives logits (B, num_outputs): one row per
    image, or (dense models) one map per image like the input; the CenterNet gives its heatmap logits (one channel
    per class) with its size and offset maps (one channel per axis), all at the model's stride; the RetinaNet its
    class logits, box deltas and anchors per anchor."""
    import torch

    for dims, shape in ((2, (2, 1, 32, 32)), (3, (2, 1, 32, 32, 32))):
        cfg = compose_config("train", [f"model={model}", f"data.spatial_dims={dims}"], tmp_path)
        net = build_net(cfg).eval()
        with torch.no_grad():
            out = net(torch.rand(shape))
        if isinstance(out, dict) and "anchors" in out:  # RetinaNet: 3 anchors per cell at strides 4, 8 and 16
            anchors = 3 * sum((shape[2] // stride) ** dims for stride in (4, 8, 16))
            assert {k: tuple(v.shape) for k, v in out.items()} == {
                "heatmap": (2, cfg.num_outputs, anchors), "box": (2, 2 * dims, anchors),
                "anchors": (2, 2 * dims, anchors)}
        elif isinstance(out, dict):
            cells = tuple(side // cfg.model.stride for side in shape[2:])
            assert {k: tuple(v.shape) for k, v in out.items()} == {
                "heatmap": (2, cfg.num_outputs, *cells), "size": (2, dims, *cells), "offset": (2, dims, *cells)}
        else:
            assert out.shape[:2] == (2, cfg.num_outputs) and out.shape[2:] in ((), shape[2:])


@pytest.mark.parametrize("model", ["small_cnn", "resnet18", "densenet121"])
def test_classifiers_take_the_channels_of_the_data(model, tmp_path):
    """RGB 2-D images (ISIC) and 2-channel volumes: the classifier configs build for the data's channels, as the
    runner sets ``in_channels`` from a task=classify dataset."""
    import torch

    for dims, shape in ((2, (2, 3, 32, 32)), (3, (2, 2, 32, 32, 32))):
        cfg = compose_config("train", [f"model={model}", f"data.spatial_dims={dims}", f"+in_channels={shape[1]}"],
                             tmp_path)
        with torch.no_grad():
            assert build_net(cfg).eval()(torch.rand(shape)).shape == (2, cfg.num_outputs)


def test_3d_patches_train_attack_and_test(tiny, tmp_path):
    """data.spatial_dims=3: 3-D patches through adversarial training, the evaluation and the test."""
    cfg = compose_config("train", [*tiny, "adv=pgd", "data.spatial_dims=3", "data.patch_size=24"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert next(iter(datamodule.test_dataloader()))["image"].shape[1:] == (1, 24, 24, 24)
    from medrobust.reporting import read_csv

    rows = read_csv(Path(tmp_path) / "robustness.csv")
    assert {r["split"] for r in rows} == {"val", "test"} and len(rows) == 2 * 2 * 5 * 4
    assert (Path(tmp_path) / "examples" / "test_pgd10_linf_eps0p008.png").is_file()
