import pytest
import torch

from cdlib.core.models import ARCHITECTURES, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ResNet-18/34/50 are the paper's numbers (its Section 2). ResNet-101/152 and DenseNet-121 are
# this code's values, recorded as regression guards, not the paper's. The pre-activation ones are
# the counts of the CS-KD / PS-KD code's CIFAR networks. Equal counts do not make equal networks:
# test_released.py checks every network a released checkpoint loads into by its forward pass.
PARAMS_100 = {
    "preact_resnet18": 11_217_444,
    "preact_resnet34": 21_325_604,
    "preact_resnet50": 23_693_604,
    "cskd_densenet121": 7_048_548,
    "resnet18": 11_220_132,
    "resnet34": 21_328_292,
    "resnet50": 23_705_252,
    "resnet101": 42_697_380,
    "resnet152": 58_341_028,
    "densenet121": 7_048_548,
}
FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
               "densenet121": 1024, "preact_resnet18": 512, "preact_resnet34": 512, "preact_resnet50": 2048,
               "cskd_densenet121": 1024}


def test_architectures_listed():
    assert set(ARCHITECTURES) == set(PARAMS_100)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_param_count_and_feature_dim(arch):
    model = build_model(arch, 100)
    assert n_params(model) == PARAMS_100[arch]
    assert model.feature_dim == FEATURE_DIM[arch]
    assert model.classifier.in_features == FEATURE_DIM[arch]


def _check_shapes(model, classes):
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap, feats, logits = model.feature_map(x), model.features(x), model(x)
    d = model.feature_dim
    assert fmap.shape == (2, d, 4, 4)
    assert feats.shape == (2, d)
    assert logits.shape == (2, classes)
    torch.testing.assert_close(feats, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(model.classifier(feats), logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_small_width(arch):
    torch.manual_seed(0)
    _check_shapes(build_model(arch, 10, width=0.125), 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_shapes_full_width(arch):
    torch.manual_seed(0)
    _check_shapes(build_model(arch, 100), 100)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_width_and_classes_scale_params(arch):
    small, tiny = build_model(arch, 100, width=0.25), build_model(arch, 100, width=0.125)
    assert n_params(tiny) < n_params(small) < PARAMS_100[arch]
    more = build_model(arch, 110, width=0.125)
    assert more.classifier.out_features == 110
    assert n_params(more) - n_params(tiny) == 10 * (tiny.feature_dim + 1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_bfloat16_autocast_train_step(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=0.125).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg16", 100)
