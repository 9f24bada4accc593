import pytest
import torch

from kdlab.models import BLOCKS_PER_STAGE, build_model


@pytest.mark.parametrize("name", list(BLOCKS_PER_STAGE))
def test_forward_returns_stages_embedding_and_logits(name):
    model = build_model(name, num_classes=7)
    outputs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 64), (2, 7)]
    # Stage outputs are post-ReLU.
    assert all((o >= 0).all() for o in outputs[:3])


def test_depths_and_sizes_match_the_cifar_resnets():
    def weight_layers(m):
        return sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())

    # 6n + 2 weight layers on the main path plus the two projection convs.
    for name, n in BLOCKS_PER_STAGE.items():
        assert weight_layers(build_model(name, 10)) == 6 * n + 2 + 2
    # Parameter counts of the 10-class CIFAR ResNets (He et al. 2016: 0.27M, 0.85M, 1.7M).
    count = lambda name: sum(p.numel() for p in build_model(name, 10).parameters())  # noqa: E731
    assert 0.26e6 < count("ResNet20") < 0.28e6
    assert 0.84e6 < count("ResNet56") < 0.87e6
    assert 1.70e6 < count("ResNet110") < 1.75e6
    assert count("ResNet112") == count("ResNet110")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'ResNet57'; known models: ResNet8, .*ResNet112"):
        build_model("ResNet57", 10)
