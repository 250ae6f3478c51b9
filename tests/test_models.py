"""Built-in architectures: shapes, the `classifier` contract, registry behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softlabels import models
from softlabels.errors import SpecError
from softlabels.models import build_model, list_models, register_model

SHAPES = [(40,), (2, 40), (1, 8, 8), (3, 32, 32), (64,)]


def test_list_models():
    assert {"cnn", "mlp", "resmlp", "linear"} <= set(list_models())


@pytest.mark.parametrize("arch", ["cnn", "mlp", "resmlp", "linear", "tangmlp-16", "resnet20"])
@pytest.mark.parametrize("shape", SHAPES)
def test_models_output_logits_from_a_linear_classifier(arch, shape):
    if arch == "resnet20" and len(shape) != 3:
        pytest.skip("image inputs only")
    torch.manual_seed(0)
    model = build_model(arch, shape, 7).eval()
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    seen = {}
    model.classifier.register_forward_hook(lambda m, a, out: seen.update(inp=a[0], out=out))
    x = torch.randn(3, *shape)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.equal(seen["out"], logits)  # nothing runs after the classifier
    assert seen["inp"].shape == (3, model.classifier.in_features)


def test_mlp_is_the_mnist1d_40_100_100_10_student():
    model = build_model("mlp", (40,), 10)
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(100, 40), (100, 100), (10, 100)]
    assert sum(p.numel() for p in model.parameters()) == 15210


def test_cnn_is_three_convs_for_1d_and_larger_than_the_student():
    model = build_model("cnn", (40,), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 3 and [c.stride[0] for c in convs] == [2, 2, 2]
    assert model.classifier.in_features == 64 * 5
    n_cnn = sum(p.numel() for p in model.parameters())
    n_mlp = sum(p.numel() for p in build_model("mlp", (40,), 10).parameters())
    assert n_cnn > n_mlp
    assert any(isinstance(m, nn.Conv2d) for m in build_model("cnn", (1, 8, 8), 10).modules())


def test_unknown_arch_and_bad_shapes():
    with pytest.raises(SpecError, match=r"unknown architecture 'vgg'; built-ins: cnn, linear, mlp, resmlp, resnet20"):
        build_model("vgg", (40,), 10)
    with pytest.raises(SpecError, match=r"cnn: supports \(L,\), \(C, L\) and \(C, H, W\) inputs"):
        build_model("cnn", (1, 2, 3, 4), 10)
    with pytest.raises(SpecError, match=r"1D inputs of length 2 are too short \(need >= 3\)"):
        build_model("cnn", (2,), 10)
    with pytest.raises(SpecError, match=r"num_classes must be >= 1"):
        build_model("mlp", (40,), 0)


def test_tangmlp_has_a_cosine_classifier():
    """Tang et al.'s MLP: BN, a residual second layer, L2-normalised weight rows and inputs."""
    torch.manual_seed(0)
    model = build_model("tangmlp-16", (32,), 5).eval()
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 2 and model.classifier.bias is None
    h = torch.randn(4, 16)
    w = model.classifier.weight
    cos = (h / h.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    assert torch.allclose(model.classifier(h), 10.0 * cos, atol=1e-6)
    assert torch.allclose(model.classifier(3 * h), model.classifier(h), atol=1e-6)  # scale-free in the features
    assert model.classifier.scale.requires_grad  # a learned logit scale


def test_cifar_resnets_have_he_et_al_sizes():
    count = lambda arch: sum(p.numel() for p in build_model(arch, (3, 32, 32), 10).parameters())  # noqa: E731
    assert count("resnet20") == 269_722 and count("resnet56") == 853_018
    with pytest.raises(SpecError, match=r"resnet20: needs \(C, H, W\) image inputs"):
        build_model("resnet20", (40,), 10)


def test_register_model_decorator(monkeypatch):
    monkeypatch.setattr(models._REGISTRY, "_entries", dict(models._REGISTRY._entries))

    @register_model("tiny")
    def tiny(input_shape, num_classes):
        return models.MLP(40, (), num_classes)

    assert "tiny" in list_models() and build_model("TINY", (40,), 3).classifier.out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny")(tiny)
