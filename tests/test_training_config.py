"""Recipes, overrides and the errors of bad configurations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fastap.cli import main
from fastap.training import ConfigError, apply_overrides, config_to_dict, load_config, lr_factor
from fastap.training.config import config_from_dict

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-5", "model.whitening_dim=512", "loss.score_range=[-1,1]",
                             "train.amp=bfloat16", "model.pretrained=", "train.chunk_size=64",
                             "stage=finetune", "log.tensorboard=false"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # '1e-5' is a str in YAML
    assert cfg.model.whitening_dim == 512 and cfg.model.pretrained is None
    assert cfg.loss.score_range == [-1.0, 1.0] and cfg.train.precision == "bf16"
    assert cfg.train.chunk_size == 64 and cfg.log.tensorboard is False
    # Untouched keys keep their defaults.
    assert cfg.optim.name == "adam" and cfg.data.image_size == 224


def test_yaml_file_with_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {name: sgd, lr: 0.1}\ndata: {image_size: 64}\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\noptim: {lr: 0.05}\n")
    cfg = load_config(tmp_path / "run.yaml", ["data.image_size=32"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.05 and cfg.data.image_size == 32
    round_trip = config_from_dict(config_to_dict(cfg))
    assert round_trip == cfg


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=0.1"], r"unknown config key 'optim.lrr'.*did you mean 'lr'"),
    (["optimizer.lr=0.1"], r"unknown config key 'optimizer'.*did you mean 'optim'"),
    (["optim.lr=-1"], r"optim\.lr: must be > 0"),
    (["optim.lr=fast"], r"optim\.lr: expected a number"),
    (["optim.name=lars"], r"optim\.name: must be one of"),
    (["train.accumulate=1.5"], r"train\.accumulate: expected an integer"),
    (["model.freeze_bn=maybe"], r"model\.freeze_bn: expected true/false"),
    (["model.arch=resnet51"], r"model\.arch: .*did you mean 'resnet50'"),
    (["data.crop_scale=[0.5, 0.2]"], r"data\.crop_scale"),
    (["loss.score_range=[1, 0]"], r"loss\.score_range"),
    (["optim=3"], r"optim: expected a mapping"),
    (["optim.lr"], r"expected key\.sub=value"),
    (["stage=contrastive", "data.augment=retrieval"], r"data\.augment: the contrastive stage"),
    (["loss.contrastive_weight=0.5", "contrastive.method=simclr"], r"contrastive\.method"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.momentun'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("stage: finetune\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "train.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastap: error:") and "train.epochz" in err and "Traceback" not in err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_are_valid(path):
    cfg = load_config(path)
    assert cfg.model.arch == "resnet50"
    if cfg.stage == "finetune":
        assert cfg.model.freeze_bn and cfg.loss.name == "ap" and cfg.train.chunk_size
        assert cfg.data.classes_per_batch * cfg.data.images_per_class == 4096  # Revaud's batch


def test_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert {"mocov2_r50_pretrain.yaml", "mocov2_r50_ap_sfm120k.yaml", "mocov2_r50_ap_gldv2.yaml",
            "imagenet_r50_ap_sfm120k.yaml"} <= names


def test_lr_schedules():
    def factors(*overrides, total=10):
        cfg = load_config(None, list(overrides))
        return [lr_factor(cfg.schedule, s, total) for s in range(total)]

    assert factors() == [1.0] * 10
    warm = factors("schedule.name=cosine", "schedule.warmup_steps=2")
    assert warm[:2] == [0.5, 1.0]
    assert warm[2] == pytest.approx(1.0) and warm[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert factors("schedule.name=step", "schedule.milestones=[3,6]", "schedule.gamma=0.5") == \
        [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]
    assert factors("schedule.name=exponential", "schedule.gamma=0.5",
                   "schedule.decay_every=4")[:9] == [1, 1, 1, 1, .5, .5, .5, .5, .25]
    lin = factors("schedule.name=linear", "schedule.min_lr_factor=0.2")
    assert lin[0] == 1.0 and lin[5] == pytest.approx(1 - 0.8 * 0.5)


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=1", "x=[1, 2]"]) == {"a": {"b": {"c": 1}}, "x": [1, 2]}
    with pytest.raises(ConfigError, match="a.b is not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])


@pytest.mark.parametrize("override", [
    "optim.lr=nan", "optim.lr=.nan", "optim.lr=inf", "optim.lr=.inf", "optim.weight_decay=nan",
    "optim.grad_clip=nan", "optim.grad_clip=inf", "contrastive.temperature=nan",
    "model.gem_p=nan", "schedule.gamma=-.inf", "optim.betas=[0.9, .nan]",
])
def test_non_finite_numbers_are_rejected(override):
    # NaN fails no "> 0" comparison and inf passes it: both used to be accepted.
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}(\[1\])?: must be a finite number"):
        load_config(None, [override])


def test_contrastive_stage_refuses_a_whitening_layer():
    # Its projection head reads the pooled features: a whitening layer would get no gradient
    # (never trained in one process, a DDP error on several).
    base = ["stage=contrastive", "data.augment=mocov2"]
    with pytest.raises(ConfigError, match=r"model\.whitening_dim: the contrastive stage"):
        load_config(None, base + ["model.whitening_dim=128"])
    assert load_config(None, base).model.whitening_dim is None
    assert load_config(None, ["model.whitening_dim=128"]).model.whitening_dim == 128


def test_finetune_needs_two_images_per_class():
    # One image per class: no query has a positive and the AP loss is a constant 0.
    with pytest.raises(ConfigError, match=r"data\.images_per_class: .* at least 2.* got 1"):
        load_config(None, ["data.images_per_class=1"])
    assert load_config(None, ["data.images_per_class=2"]).data.images_per_class == 2
    # The contrastive stage does not use it.
    assert load_config(None, ["stage=contrastive", "data.augment=simclr",
                              "data.images_per_class=1"]).stage == "contrastive"


def test_sfm120k_recipe_decay_comment_holds():
    """The recipe's comment: a pass over SfM-120k's 551 training 3D models is 551 // 128 = 4
    steps, and x0.99 every 100 steps leaves 0.99^49 of the learning rate at step 5000."""
    from fastap.training import ClassBalancedBatchSampler

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" /
                      "mocov2_r50_ap_sfm120k.yaml")
    labels = [c for c in range(551) for _ in range(2)]
    sampler = ClassBalancedBatchSampler(labels, cfg.data.classes_per_batch,
                                        cfg.data.images_per_class)
    assert sampler.batches_per_epoch == 4
    assert cfg.schedule.decay_every == 100 and cfg.train.max_steps == 5000
    last = lr_factor(cfg.schedule, cfg.train.max_steps - 1, cfg.train.max_steps)
    assert last == pytest.approx(0.99 ** 49) and round(last, 2) == 0.61


def test_precision_key_and_its_older_spelling():
    assert load_config(None, []).train.precision == "fp32"
    for amp, precision in (("bfloat16", "bf16"), ("float16", "fp16")):
        cfg = load_config(None, [f"train.amp={amp}"])
        assert cfg.train.precision == precision and cfg.train.amp == "none"
    assert load_config(None, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(ConfigError, match=r"train\.precision: must be one of"):
        load_config(None, ["train.precision=bfloat16"])
    with pytest.raises(ConfigError, match=r"train\.amp: 'float16' contradicts train\.precision"):
        load_config(None, ["train.amp=float16", "train.precision=bf16"])
