import pytest
import torch

import models
from models import UnknownModelError, build_model, profile, with_features

PAPER_PARAMS_CIFAR10 = {"plain-2": 13_000, "plain-4": 37_000, "plain-6": 83_000, "plain-8": 328_000,
                        "plain-10": 2_490_000, "resnet-8": 78_000, "resnet-20": 272_000, "resnet-110": 1_730_000}


@pytest.mark.parametrize("name,expected", PAPER_PARAMS_CIFAR10.items())
def test_parameter_counts_match_the_paper(name, expected):
    n = profile(build_model(name, 3, 10, 32), (3, 32, 32))["params"]
    assert abs(n - expected) / expected < 0.05


@pytest.mark.parametrize("name", ["plain-2", "plain-4", "plain-6", "plain-8", "plain-10", "air-32", "air-48", "resnet-8",
                                  "resnet-14", "resnet-26", "resnet-32", "resnet-44", "resnet-56"])
def test_every_registered_model_runs_on_fashion_mnist(name):
    m = build_model(name, 1, 10, 28)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and m.arch == name


def test_narrower_students_keep_plain_2s_layout_at_a_fraction_of_its_width():
    sizes = {}
    for name in ("plain-2-w2", "plain-2-w4", "plain-2-w8", "plain-2"):
        m = build_model(name, 1, 10, 28)
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
        sizes[name] = profile(m, (1, 28, 28))["params"]
    assert [c.out_channels for c in build_model("plain-2-w4", 1, 10, 28).modules()
            if isinstance(c, torch.nn.Conv2d)] == [4, 4]
    assert sizes["plain-2-w2"] < sizes["plain-2-w4"] < sizes["plain-2-w8"] < sizes["plain-2"]


def test_cifar100_plain_cnns_are_wider():
    assert profile(build_model("plain-2", 3, 100, 32), (3, 32, 32))["params"] > \
        profile(build_model("plain-2", 3, 10, 32), (3, 32, 32))["params"]


def test_torchvision_models_adapt_channels_and_classes():
    m = build_model("tv:resnet18", 1, 7, 28)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_names_are_refused():
    with pytest.raises(UnknownModelError, match="unknown model 'plain-3'"):
        build_model("plain-3", 1, 10, 28)
    with pytest.raises(UnknownModelError, match="unknown torchvision classifier"):
        build_model("tv:nope", 1, 10, 28)


def test_profile_reports_size_and_flops():
    p = profile(build_model("plain-2", 1, 10, 28), (1, 28, 28))
    assert p["size_bytes"] == 4 * p["params"] + 4 * 2 * 2 * 16 + 8 * 2  # fp32 weights + BN buffers
    # conv1: 28*28*16*9*2, conv2: 14*14*16*16*9*2, fc: 16*7*7*10*2
    assert p["flops"] == 28 * 28 * 16 * 9 * 2 + 14 * 14 * 16 * 16 * 9 * 2 + 16 * 7 * 7 * 10 * 2


@pytest.mark.parametrize("name", ["plain-4", "resnet-8"])
def test_named_features_leave_logits_unchanged(name):
    m = build_model(name, 1, 10, 28).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, feats = with_features(m)(x)
    assert torch.allclose(logits, m(x), atol=1e-5)
    assert list(feats) == models.feature_names(m) and all(f.shape[0] == 3 for f in feats.values())


def test_seeded_build_is_the_same_while_other_threads_build_and_seed():
    """Trainings run side by side in threads (experiments' task runner): a seeded build must not
    be disturbed by other threads drawing from or seeding torch's global generator."""
    import threading

    from engine.device import seed_everything
    from models import build_model

    def weights(seed):
        return torch.cat([p.detach().flatten() for p in build_model("plain-4", 3, 10, 32, seed=seed).parameters()])

    reference = weights(7)
    stop, bad = threading.Event(), []

    def noise():
        while not stop.is_set():
            build_model("plain-2", 3, 10, 32)
            seed_everything(123)

    others = [threading.Thread(target=noise) for _ in range(2)]
    for t in others:
        t.start()
    try:
        for _ in range(30):
            if not torch.equal(weights(7), reference):
                bad.append(1)
    finally:
        stop.set()
        for t in others:
            t.join()
    assert not bad
    state = torch.get_rng_state()
    build_model("plain-2", 3, 10, 32, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded build leaves the global generator alone
