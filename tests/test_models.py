"""Our EfficientNets against timm, torchvision and lukemelas, number for number."""

import pytest
import torch
import timm
import torchvision

from finetune import create_model
from finetune.models.profile import PAPER_TABLE2, profile_phi, profile_variant
from helpers import randomize_norm_stats, relative_error

TIMM_PARAMS = {
    "b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232,
    "b4": 19_341_616, "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960,
}
# Non-square, odd-sized after several stride-2 steps: exercises TF 'same' asymmetric padding.
X = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(0))


def _parity(timm_name: str, ours_name: str, **overrides) -> tuple[float, int, int]:
    if not timm_name.startswith("tf_"):  # a bare state dict says nothing of its family: say it
        overrides = {"padding": "symmetric", "bn_eps": 1e-5, **overrides}
    ref = randomize_norm_stats(timm.create_model(timm_name))
    ours = create_model(ours_name, pretrained=ref.state_dict(), **overrides).eval()
    with torch.no_grad():
        err = relative_error(ours(X), ref(X))
    return err, sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ref.parameters())


# B5-B7 (20-50 s each on the 2-core machine) run in make test-all; B0-B4 in make test.
VARIANTS_BY_COST = [pytest.param(v, marks=pytest.mark.slow) if v in ("b5", "b6", "b7") else v for v in TIMM_PARAMS]


@pytest.mark.parametrize("variant", VARIANTS_BY_COST)
def test_matches_timm_efficientnet(variant):
    err, n_ours, n_ref = _parity(f"efficientnet_{variant}", variant)
    assert err <= 1e-5
    assert n_ours == n_ref == TIMM_PARAMS[variant]


@pytest.mark.parametrize("variant", VARIANTS_BY_COST)
def test_matches_timm_tf_efficientnet_with_same_padding(variant):
    err, _, _ = _parity(f"tf_efficientnet_{variant}", variant, padding="same", bn_eps=1e-3)
    assert err <= 1e-5


@pytest.mark.parametrize("i", range(5))
def test_matches_timm_lite(i):
    err, n_ours, n_ref = _parity(f"efficientnet_lite{i}", f"lite{i}")
    assert err <= 1e-5 and n_ours == n_ref
    err, _, _ = _parity(f"tf_efficientnet_lite{i}", f"lite{i}", padding="same", bn_eps=1e-3)
    assert err <= 1e-5


def test_same_padding_matters():
    """Guard against the parity tests passing vacuously: the wrong padding must differ."""
    err, _, _ = _parity("tf_efficientnet_b0", "b0", padding="symmetric", bn_eps=1e-3)
    assert err > 1e-3


@pytest.mark.parametrize("variant", ["b0", "b5"])
def test_matches_torchvision(variant):
    ref = randomize_norm_stats(getattr(torchvision.models, f"efficientnet_{variant}")())
    eps = ref.features[0][1].eps  # b5-b7 are TF ports with eps 1e-3
    ours = create_model(variant, pretrained=ref.state_dict(), bn_eps=eps).eval()
    with torch.no_grad():
        assert relative_error(ours(X), ref(X)) <= 1e-5


def test_matches_lukemelas_and_infers_tf_settings():
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    ref = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b1", image_size=tuple(X.shape[-2:]))
    ref = randomize_norm_stats(ref)
    ours = create_model("b1", pretrained=ref.state_dict()).eval()
    assert (ours.config.padding, ours.config.bn_eps) == ("same", 1e-3)
    with torch.no_grad():
        assert relative_error(ours(X), ref(X)) <= 1e-5


def test_compound_scaling_builds_any_phi():
    m = create_model("phi", phi=2.5, num_classes=7)
    assert m.resolution == 320 and m.num_classes == 7
    # depth 1.2**2.5 = 1.577: ceil(1.577 * [1, 2, 2, 3, 3, 4, 1])
    assert [len(s) for s in m.stages] == [2, 4, 4, 5, 5, 7, 2]
    assert create_model("phi", phi=0).state_dict().keys() == create_model("b0").state_dict().keys()


def test_model_interface():
    m = create_model("b3", num_classes=5, drop_rate=0.1).eval()
    assert (m.resolution, m.drop_rate, m.mean) == (300, 0.1, (0.485, 0.456, 0.406))
    assert len(m.stages) == 7
    feats = m.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, m.num_features, 2, 2) and m.num_features == 1536
    m.reset_classifier(12)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 12)
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1536)
    assert create_model("lite2").mean == (0.5, 0.5, 0.5)
    assert create_model("b2").resolution == 260 and create_model("b2", resolution=128).resolution == 128


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = create_model("b0", num_classes=3, drop_path_rate=0.0, drop_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()
    plain = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for a, b in zip(plain, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="b9"), "unknown model 'b9'; valid names: b0, b1"),
        (dict(name="b0", padding="valid"), "unknown padding 'valid'; valid: symmetric, same"),
        (dict(name="b0", resolution=16), "resolution must be an integer >= 32"),
        (dict(name="b0", resolution=100.5), "resolution must be an integer >= 32"),
        (dict(name="b0", bn_eps=0), "bn_eps must be a number in"),
        (dict(name="b0", drop_rate=1.5), "drop_rate must be in"),
        (dict(name="b0", num_classes=-1), "num_classes must be an integer >= 0"),
        (dict(name="phi"), "needs a compound coefficient"),
        (dict(name="phi", phi=-1), "phi must be a finite number >= 0"),
        (dict(name="b0", phi=2), "only applies to model 'phi'"),
        (dict(name="phi", phi=1, pretrained=True), "no released weights for 'phi1'|no released weights"),
        (dict(name="lite0", pretrained="torchvision"), "b0..b7 only"),
    ],
)
def test_bad_values_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**kwargs)


@pytest.mark.parametrize("variant", [f"b{i}" for i in range(8)])
def test_params_and_macs_within_5_percent_of_paper_table2(variant):
    """B2 is 9.11M params in every PyTorch implementation (paper: 9.2M), still within 5%."""
    p = profile_variant(variant)
    paper_params, paper_macs = PAPER_TABLE2[variant]
    assert p.params == TIMM_PARAMS[variant]
    assert abs(p.params / paper_params - 1) <= 0.05
    assert abs(p.macs / paper_macs - 1) <= 0.05


def test_phi_profile_follows_the_compound_formula():
    b0 = profile_variant("b0")
    # alpha * beta^2 * gamma^2 = 1.92, and ceil() on depth adds a little: ~2^phi within 20%.
    for phi in (1, 2, 3):
        ratio = profile_phi(phi).macs / b0.macs
        assert abs(ratio / 2**phi - 1) < 0.2, (phi, ratio)
