"""Models: pooling, RetrievalNet, every checkpoint layout of docs/models.md, fastap checkpoints.

Checkpoints are fabricated with random weights in the exact key layouts the published
repositories write (no network access here), saved with torch.save and read back through
``from_pretrained``.
"""

from __future__ import annotations

import argparse
import os
import re
from urllib.parse import urlparse

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fastap import models as M

# ---------------------------------------------------------------------------------------------
# Fabricated checkpoints
# ---------------------------------------------------------------------------------------------


def random_torchvision_sd(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict with random weights *and* random BatchNorm statistics."""
    torch.manual_seed(seed)
    sd = dict(getattr(torchvision.models, arch)(weights=None).state_dict())
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000 + seed)
        elif k.endswith("running_var"):
            sd[k] = torch.rand_like(v) + 0.5
        elif k.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")) or ".bn" in k:
            sd[k] = torch.randn_like(v)
    return sd


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _trunk(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _mlp_head(prefix: str, in_dim: int, out_dim: int = 128) -> dict:
    return {f"{prefix}fc.0.weight": torch.randn(in_dim, in_dim), f"{prefix}fc.0.bias":
            torch.randn(in_dim), f"{prefix}fc.2.weight": torch.randn(out_dim, in_dim),
            f"{prefix}fc.2.bias": torch.randn(out_dim)}


def fabricate(layout: str, sd: dict, feat_dim: int) -> object:
    """The checkpoint object ``layout`` stores for the ResNet weights ``sd``."""
    trunk = _trunk(sd)
    if layout == "moco":  # MoCo v2: MLP head under encoder_q.fc, key encoder, queue
        state = {**_prefixed("module.encoder_q.", trunk),
                 **_mlp_head("module.encoder_q.", feat_dim),
                 **_prefixed("module.encoder_k.", trunk),
                 **_mlp_head("module.encoder_k.", feat_dim),
                 "module.queue": torch.randn(128, 64),
                 "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        return {"epoch": 200, "arch": "resnet50", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}
    if layout == "mocov3":  # projector under base_encoder.fc, momentum encoder and predictor
        proj = {"fc.0.weight": torch.randn(64, feat_dim), "fc.1.weight": torch.randn(64),
                "fc.1.bias": torch.randn(64), "fc.1.running_mean": torch.randn(64),
                "fc.1.running_var": torch.rand(64), "fc.1.num_batches_tracked": torch.tensor(5),
                "fc.3.weight": torch.randn(32, 64)}
        state = {**_prefixed("module.base_encoder.", {**trunk, **proj}),
                 **_prefixed("module.momentum_encoder.", {**trunk, **proj}),
                 "module.predictor.0.weight": torch.randn(64, 32),
                 "module.predictor.3.weight": torch.randn(32, 64)}
        return {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {},
                "scaler": {}}
    if layout == "dino":  # the released backbone: bare torchvision dict without fc
        return dict(trunk)
    if layout == "dino-full":
        head = {"head.mlp.0.weight": torch.randn(64, feat_dim), "head.mlp.0.bias": torch.randn(64),
                "head.last_layer.weight_g": torch.randn(100, 1),
                "head.last_layer.weight_v": torch.randn(100, 64)}
        teacher = {**_prefixed("module.backbone.", sd), **_prefixed("module.", head)}
        student = {k: v + 1 for k, v in teacher.items()}
        return {"student": student, "teacher": teacher, "optimizer": {}, "epoch": 800,
                "args": argparse.Namespace(arch="resnet50", out_dim=60000),
                "dino_loss": {"center": torch.zeros(1, 100)}}
    if layout == "simclr":  # converted: plain torchvision names incl. fc, under 'state_dict'
        return {"state_dict": dict(sd)}
    if layout == "byol":  # converted: bare dict incl. fc, no num_batches_tracked
        return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if layout == "torchvision":
        return dict(sd)
    raise AssertionError(layout)


LAYOUTS = ["moco", "mocov3", "dino", "dino-full", "simclr", "byol", "torchvision"]


@pytest.fixture(scope="module")
def r18_sd():
    return random_torchvision_sd("resnet18", seed=1)


@pytest.fixture(scope="module")
def r50_sd():
    return random_torchvision_sd("resnet50", seed=2)


def assert_trunk_equal(net: M.RetrievalNet, sd: dict) -> None:
    got = net.backbone.state_dict()
    expected = {k: v for k, v in sd.items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(expected) <= set(got)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def test_gem_p1_is_average_pooling():
    x = torch.rand(2, 5, 4, 3)
    out = M.GeM(p=1.0)(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(x, 1).flatten(1))
    torch.testing.assert_close(M.SPoC()(x), x.mean(dim=(2, 3)))


def test_gem_large_p_approaches_max():
    x = torch.rand(2, 5, 4, 4) * 0.9 + 0.05
    mx = M.MAC()(x)
    torch.testing.assert_close(mx, x.amax(dim=(2, 3)))
    errors = [(mx - M.GeM(p=p)(x)).abs().max().item() for p in (3.0, 30.0, 300.0)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * mx.max().item()
    # GeM lies between the average and the max.
    g = M.GeM(p=3.0)(x)
    assert (g >= x.mean(dim=(2, 3)) - 1e-6).all() and (g <= mx + 1e-6).all()


def test_gem_clamp_and_gradient_to_p():
    x = torch.rand(1, 3, 2, 2)
    x[0, 0] = -1.0  # negative activations are clamped to eps before the power
    gem = M.GeM(p=3.0, eps=1e-6)
    out = gem(x)
    assert torch.isfinite(out).all() and out[0, 0].item() == pytest.approx(1e-6, rel=1e-4)
    out.sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()
    frozen = M.GeM(p=2.0, learnable=False)
    assert "p" in frozen.state_dict() and not list(frozen.parameters())


def test_gem_float16_input_does_not_overflow():
    x = torch.full((1, 2, 4, 4), 60.0, dtype=torch.float16)  # 60^3 > float16 max
    out = M.GeM()(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2), 60.0))


# ---------------------------------------------------------------------------------------------
# RetrievalNet
# ---------------------------------------------------------------------------------------------


def test_retrieval_net_forward_and_meta():
    net = M.RetrievalNet("resnet18", "gem", whitening_dim=64).eval()
    assert net.out_dim == 64 and net.feat_dim == 512
    assert net.meta["arch"] == "resnet18" and net.meta["pooling"] == "gem"
    assert net.meta["mean"] == list(M.IMAGENET_MEAN) and net.meta["std"] == list(M.IMAGENET_STD)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        v = net(net.preprocess(x))
        fmap = net.features(net.preprocess(x))
    assert v.shape == (2, 64) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    assert fmap.shape == (2, 512, 2, 2)
    # Identity-initialised whitening: the first 64 channels of the unwhitened descriptor.
    plain = F.normalize(net.pool(fmap), dim=1)
    torch.testing.assert_close(v, F.normalize(plain[:, :64], dim=1))
    # Backbone keys are torchvision's (no avgpool/fc).
    keys = set(net.backbone.state_dict())
    assert "conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    for pooling in ("mac", "spoc"):
        other = M.RetrievalNet("resnet18", pooling)
        assert other.out_dim == 512 and other.gem_p is None


def test_preprocess_respects_meta():
    net = M.RetrievalNet("resnet18", mean=None, std=None)
    x = torch.rand(3, 8, 8)
    assert net.preprocess(x) is x
    net = M.RetrievalNet("resnet18")
    y = net.preprocess(x)
    torch.testing.assert_close(y[1], (x[1] - 0.456) / 0.224)


def test_parameter_groups():
    net = M.RetrievalNet("resnet18", whitening_dim=32)
    groups = net.parameter_groups(lr=0.01, weight_decay=1e-4)
    assert len(groups) == 2
    main, pgroup = groups
    assert pgroup["params"] == [net.pool.p]
    assert pgroup["lr"] == pytest.approx(0.1) and pgroup["weight_decay"] == 0.0
    assert main["lr"] == 0.01 and main["weight_decay"] == 1e-4
    ids = {id(p) for p in main["params"]}
    assert id(net.pool.p) not in ids and id(net.whiten.weight) in ids
    assert len(main["params"]) + 1 == len(list(net.parameters()))
    torch.optim.SGD(groups, lr=0.01)  # accepted by an optimizer
    frozen = M.RetrievalNet("resnet18", learn_p=False).parameter_groups(0.01)
    assert len(frozen) == 1


def test_bad_options():
    with pytest.raises(ValueError, match="arch"):
        M.RetrievalNet("vgg16")
    with pytest.raises(ValueError, match="pooling"):
        M.RetrievalNet("resnet18", "avg")
    with pytest.raises(ValueError, match="mean"):
        M.RetrievalNet("resnet18", mean=(0.5, 0.5, 0.5), std=None)


# ---------------------------------------------------------------------------------------------
# Foreign checkpoint layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_resnet18(layout, r18_sd, tmp_path):
    path = tmp_path / f"{layout}.pth"
    torch.save(fabricate(layout, r18_sd, 512), path)
    net = M.from_pretrained(path, arch="resnet18")
    assert_trunk_equal(net, r18_sd)
    assert net.meta["layout"] == layout
    assert net.meta["source"] == str(path)
    if layout == "simclr":
        assert net.meta["mean"] is None and net.meta["std"] is None
    else:
        assert net.meta["mean"] == list(M.IMAGENET_MEAN)
        assert net.meta["std"] == list(M.IMAGENET_STD)
    # BatchNorm counters: present ones are loaded, absent ones (BYOL) are filled in.
    bn = net.backbone.state_dict()["bn1.num_batches_tracked"]
    assert bn.dtype == torch.long


@pytest.mark.parametrize("data_parallel", [False, True], ids=["plain", "module"])
def test_training_script_checkpoint_is_imagenet_normalised(r18_sd, tmp_path, data_parallel):
    # pytorch/examples' model_best.pth.tar and MoCo's main_lincls outputs wrap torchvision names
    # in 'state_dict' next to training state, like the SimCLR conversion (which holds nothing
    # else): they were once read as SimCLR and fed un-normalised input.
    prefix = "module." if data_parallel else ""
    obj = {"epoch": 90, "arch": "resnet18", "best_acc1": 69.8,
           "state_dict": _prefixed(prefix, r18_sd), "optimizer": {"state": {}}}
    path = tmp_path / "model_best.pth.tar"
    torch.save(obj, path)
    net = M.from_pretrained(path, arch="resnet18")
    assert net.meta["layout"] == "torchvision"
    assert net.meta["mean"] == list(M.IMAGENET_MEAN) and net.meta["std"] == list(M.IMAGENET_STD)
    assert_trunk_equal(net, r18_sd)
    # DataParallel names alone under 'state_dict' are not the SimCLR conversion either.
    torch.save({"state_dict": _prefixed("module.", r18_sd)}, path)
    assert M.from_pretrained(path, arch="resnet18").meta["layout"] == "torchvision"


def test_layout_forward_pass(r18_sd, tmp_path):
    path = tmp_path / "moco.pth"
    torch.save(fabricate("moco", r18_sd, 512), path)
    net = M.from_pretrained(path, arch="resnet18", pooling="gem", whitening_dim=16).eval()
    ref = torchvision.models.resnet18()
    ref.load_state_dict(r18_sd)
    ref.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fmap = torch.nn.Sequential(*list(ref.children())[:-2])(x)
        torch.testing.assert_close(net.features(x), fmap)
    assert net(x).shape == (1, 16)


@pytest.mark.parametrize("layout", ["mocov3", "dino-full"])
def test_resnet50_layouts(layout, r50_sd, tmp_path):
    path = tmp_path / f"{layout}50.pth"
    torch.save(fabricate(layout, r50_sd, 2048), path)
    net = M.from_pretrained(path)  # arch defaults to resnet50
    assert net.meta["arch"] == "resnet50" and net.out_dim == 2048
    assert_trunk_equal(net, r50_sd)


def test_wrong_arch_lists_keys_and_suggests_arch(r50_sd, tmp_path):
    path = tmp_path / "dino50.pth"
    torch.save(fabricate("dino", r50_sd, 2048), path)
    with pytest.raises(ValueError) as info:
        M.from_pretrained(path, arch="resnet18")
    msg = str(info.value)
    assert "unexpected keys" in msg and "layer1.0.conv3.weight" in msg
    assert "resnet50" in msg and str(path) in msg


def test_extra_and_missing_keys_are_listed(r18_sd, tmp_path):
    ck = fabricate("moco", r18_sd, 512)
    ck["state_dict"]["module.encoder_q.layer5.0.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"unexpected keys: 'layer5\.0\.weight'"):
        M.from_pretrained(path, arch="resnet18")

    ck = fabricate("byol", r18_sd, 512)
    del ck["layer4.1.bn2.weight"]
    path = tmp_path / "missing.pth"
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"missing keys: 'layer4\.1\.bn2\.weight'"):
        M.from_pretrained(path, arch="resnet18")

    ck = fabricate("dino", r18_sd, 512)
    ck["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(ck, path)
    with pytest.raises(ValueError, match="shape mismatches: conv1.weight"):
        M.from_pretrained(path, arch="resnet18")


def test_unreadable_and_undetectable_files(r18_sd, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match="garbage.pth is not a readable PyTorch checkpoint"):
        M.from_pretrained(garbage, arch="resnet18")

    good = tmp_path / "good.pth"
    torch.save(fabricate("dino", r18_sd, 512), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth is not a readable PyTorch checkpoint"):
        M.from_pretrained(truncated, arch="resnet18")

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        M.from_pretrained(tmp_path / "nowhere.pth")

    odd = tmp_path / "odd.pth"
    torch.save({"model_ema": {"blocks.0.weight": torch.zeros(1)}, "epoch": 3}, odd)
    with pytest.raises(ValueError, match=r"cannot detect the checkpoint layout.*'epoch'.*'model_ema'"):
        M.from_pretrained(odd, arch="resnet18")

    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ValueError, match="list"):
        M.from_pretrained(not_dict, arch="resnet18")


def test_preprocessing_is_not_a_caller_option(r18_sd, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(fabricate("dino", r18_sd, 512), path)
    with pytest.raises(ValueError, match="preprocessing comes from the checkpoint"):
        M.from_pretrained(path, arch="resnet18", mean=None)


def test_detect_layout_directly(r18_sd):
    for layout in LAYOUTS:
        name, sd = M.detect_layout(fabricate(layout, r18_sd, 512))
        assert name == layout
        assert not any(k.startswith("fc.") for k in sd)
    # single-GPU MoCo (no module. prefix)
    ck = {"state_dict": _prefixed("encoder_q.", _trunk(r18_sd))}
    assert M.detect_layout(ck)[0] == "moco"


# ---------------------------------------------------------------------------------------------
# torchvision weights
# ---------------------------------------------------------------------------------------------


def test_torchvision_weights_from_hub_cache(r18_sd, tmp_path, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(r18_sd, cache / os.path.basename(urlparse(weights.url).path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = M.from_pretrained("torchvision:IMAGENET1K_V1", arch="resnet18")
    assert_trunk_equal(net, r18_sd)
    assert net.meta["layout"] == "torchvision"
    assert net.meta["source"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert net.meta["mean"] == pytest.approx(list(M.IMAGENET_MEAN))
    net2 = M.from_pretrained("torchvision:ResNet18_Weights.DEFAULT", arch="resnet18")
    assert_trunk_equal(net2, r18_sd)


@pytest.mark.parametrize("failure", ["offline", "bad hash", "damaged cache"])
def test_torchvision_weights_that_cannot_be_fetched_are_named(tmp_path, monkeypatch, failure):
    # torch.hub's own download is replaced by the failure it raises offline (URLError) or for a
    # download whose SHA-256 does not match the name (RuntimeError, the file removed); a damaged
    # file already in the hub cache is read for real.
    import urllib.error

    def fail(url, dst, *args, **kwargs):
        if failure == "offline":
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        raise RuntimeError('invalid hash value (expected "f37072fd", got "00000000")')

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if failure == "offline":
        expected = (OSError, rf"downloading torchvision weights {weights} from "
                             rf"{re.escape(weights.url)} failed \(\[Errno -2\] Name or service"
                             rf".*\); offline, put that file at {re.escape(str(cached))}$")
    elif failure == "bad hash":
        expected = (ValueError, r"invalid hash value .*; rerun to download it again$")
    else:
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"<html>proxy login</html>")
        expected = (ValueError, rf"^{re.escape(str(cached))} cannot be read as torchvision "
                                r"weights .*; delete it to download it again$")
    with pytest.raises(expected[0], match=expected[1]):
        M.from_pretrained("torchvision:IMAGENET1K_V1", arch="resnet18")


def test_torchvision_weights_via_get_state_dict(r50_sd, monkeypatch):
    seen = []

    def fake_get_state_dict(self, *args, **kwargs):
        seen.append(self)
        return dict(r50_sd)

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    net = M.from_pretrained("torchvision:IMAGENET1K_V2")
    assert seen == [torchvision.models.ResNet50_Weights.IMAGENET1K_V2]
    assert_trunk_equal(net, r50_sd)


def test_torchvision_bad_names():
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        M.from_pretrained("torchvision:IMAGENET9K", arch="resnet18")
    with pytest.raises(ValueError, match="are for resnet50, not resnet18"):
        M.from_pretrained("torchvision:ResNet50_Weights.IMAGENET1K_V2", arch="resnet18")


# ---------------------------------------------------------------------------------------------
# fastap checkpoints
# ---------------------------------------------------------------------------------------------


def _trained_net() -> M.RetrievalNet:
    torch.manual_seed(3)
    net = M.RetrievalNet("resnet18", "gem", whitening_dim=32, source="somewhere.pth")
    with torch.no_grad():
        net.pool.p.fill_(4.25)
        net.whiten.weight.normal_()
        net.whiten.bias.normal_()
        net.backbone.layer4[1].bn2.running_mean.normal_()
    net.meta["layout"] = "moco"
    return net


def test_fastap_checkpoint_round_trip(tmp_path):
    net = _trained_net().eval()
    path = M.save_checkpoint(net, tmp_path / "ck" / "net.pth", epoch=7, metrics={"map": 61.2})
    assert path.exists()
    loaded = M.from_pretrained(path)  # arch/pooling/whitening come from the checkpoint
    assert loaded.meta == net.meta
    assert loaded.gem_p == pytest.approx(4.25) and loaded.out_dim == 32
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x))
    net2, extra = M.load_checkpoint(path)
    assert extra == {"epoch": 7, "metrics": {"map": 61.2}}
    assert net2.gem_p == pytest.approx(4.25)
    with pytest.raises(ValueError, match="disagrees"):
        M.from_pretrained(path, whitening_dim=16)
    with pytest.raises(ValueError, match="reserved"):
        M.save_checkpoint(net, tmp_path / "x.pth", meta={})


def test_fastap_checkpoint_keeps_simclr_preprocessing_and_frozen_p(r18_sd, tmp_path):
    src = tmp_path / "simclr.pth"
    torch.save(fabricate("simclr", r18_sd, 512), src)
    net = M.from_pretrained(src, arch="resnet18", pooling="gem", learn_p=False, p=2.5)
    path = M.save_checkpoint(net, tmp_path / "net.pth")
    loaded = M.from_pretrained(path)
    assert loaded.meta["mean"] is None and loaded.meta["layout"] == "simclr"
    assert loaded.gem_p == pytest.approx(2.5) and not list(loaded.pool.parameters())
    assert_trunk_equal(loaded, r18_sd)


def test_load_checkpoint_rejects_foreign_files(r18_sd, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(fabricate("dino", r18_sd, 512), path)
    with pytest.raises(ValueError, match="not a fastap checkpoint"):
        M.load_checkpoint(path)


def _tmp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_save_success_leaves_no_temp_file(tmp_path):
    net = M.RetrievalNet("resnet18")
    M.save_checkpoint(net, tmp_path / "a.pth")
    M.save_checkpoint(net, tmp_path / "a.pth")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth"]


def test_atomic_save_interrupted_keeps_old_file(tmp_path, monkeypatch):
    net = M.RetrievalNet("resnet18")
    path = M.save_checkpoint(net, tmp_path / "net.pth", epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(net, path, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []
    assert M.load_checkpoint(path)[1] == {"epoch": 1}


def test_gem_stays_finite_when_a_channel_is_zero_and_p_is_large():
    """eps^p underflows float32 once p passes about 6.3 (eps = 1e-6): an all-zero channel then
    had a zero mean, whose p-th root has an infinite derivative, and training stopped on NaN
    (the demo's contrastive stage drove p to 6.4 and fine-tuning raised it further)."""
    for p in (3.0, 6.4, 8.0, 12.0):
        gem = M.GeM(p=p)
        x = torch.zeros(2, 3, 4, 4, requires_grad=True)
        with torch.no_grad():
            x[:, 1] = 0.5                                       # one ordinary channel
        out = gem(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(gem.p.grad).all()
        assert torch.isfinite(x.grad).all()
        torch.testing.assert_close(out[:, 1], torch.full((2,), 0.5))   # unchanged where normal
        # eps where eps^p is a normal float32, else the p-th root of the smallest normal one
        bound = max(1e-6, torch.finfo(torch.float32).tiny ** (1 / p)) * (1 + 1e-5)
        assert (out[:, 0] <= bound).all()
