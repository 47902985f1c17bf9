"""C-SWAP's causal criterion against scipy and hand computations."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_xai.attribution.causal import (
    CRITICAL,
    DETRIMENTAL,
    NEUTRAL,
    classify_neurons,
    cut_channels,
    global_causal_effect,
    paired_t_test,
    reference_causal_scores,
    true_class_probability,
)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [2, 5, 40])
def test_t_test_equals_scipy_ttest_rel(seed, m):
    gen = torch.Generator().manual_seed(seed)
    before = torch.rand(7, m, generator=gen, dtype=torch.float64)
    after = before + torch.randn(7, m, generator=gen, dtype=torch.float64) * 0.1 + 0.02
    t, p = paired_t_test(before, after)
    ref = stats.ttest_rel(after.numpy(), before.numpy(), axis=-1)
    np.testing.assert_allclose(t.numpy(), ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(p.numpy(), ref.pvalue, rtol=1e-10)


def test_t_test_degenerate_pairs():
    before = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]], dtype=torch.float64)
    after = torch.stack([before[0], before[1] + 0.1])
    _, p = paired_t_test(before, after)
    assert p[0] == 1.0  # nothing changed: no evidence
    assert p[1] == 0.0  # the same non-zero shift on every pair
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t_test(torch.zeros(1), torch.ones(1))


def test_xi_by_hand_on_a_tiny_net():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0]]))
        net[2].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    sigma, star = reference_causal_scores(net, [net[2]], [0, 1, 2], x, y)
    h = torch.relu(x @ net[0].weight.T)

    def prob(hidden):
        logits = hidden @ net[2].weight.T
        return torch.softmax(logits.double(), 1)[torch.arange(3), y]

    for n in range(3):
        cut = h.clone()
        cut[:, n] = 0
        expected = ((prob(cut) - prob(h)) / prob(h)).mean()
        assert global_causal_effect(sigma, star[n]).item() == pytest.approx(expected.item(), rel=1e-9)


def test_neuron_with_zero_outgoing_weights_is_neutral():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[2].weight[:, 2] = 0.0
    x = torch.randn(60, 4)
    y = torch.randint(0, 3, (60,))
    sigma, star = reference_causal_scores(net, [net[2]], range(6), x, y)
    verdict = classify_neurons(sigma, star, y)
    assert verdict.category[2] == NEUTRAL
    assert not verdict.significant[2].any()


def test_voting_rule_of_definition_2():
    gen = torch.Generator().manual_seed(1)
    sigma = torch.rand(40, generator=gen, dtype=torch.float64) * 0.5 + 0.4
    labels = torch.arange(40) % 4
    only_class_3_hurt = sigma.clone()
    only_class_3_hurt[labels == 3] *= 0.5  # significant for one class only, ξ < 0
    helps_everyone = sigma * 1.1 + torch.rand(40, generator=gen, dtype=torch.float64) * 1e-3
    noise = sigma + torch.randn(40, generator=gen, dtype=torch.float64) * 1e-6  # tiny, symmetric
    v = classify_neurons(sigma, torch.stack([only_class_3_hurt, helps_everyone, sigma]), labels)
    assert v.category.tolist() == [CRITICAL, DETRIMENTAL, NEUTRAL]
    assert v.significant[0].tolist() == [False, False, False, True]
    assert classify_neurons(sigma, noise[None], labels, alpha=1e-12).category.tolist() == [NEUTRAL]
    with pytest.raises(ValueError, match=r"`alpha` must be > 0.0, got 0"):
        classify_neurons(sigma, sigma[None], labels, alpha=0)
    with pytest.raises(ValueError, match="shapes disagree"):
        classify_neurons(sigma, sigma[None, :10], labels)


def test_removing_neutral_neurons_of_a_linear_toy_model_keeps_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[2].weight[:, [1, 4, 6]] = 0.0
    x = torch.randn(90, 5)
    y = net(x).argmax(1)
    sigma, star = reference_causal_scores(net, [net[2]], range(8), x, y)
    neutral = [i for i, c in enumerate(classify_neurons(sigma, star, y).category.tolist()) if c == NEUTRAL]
    assert {1, 4, 6} <= set(neutral)
    keep = [i for i in range(8) if i not in neutral]
    small = nn.Sequential(nn.Linear(5, len(keep)), nn.ReLU(), nn.Linear(len(keep), 3))
    with torch.no_grad():
        small[0].weight.copy_(net[0].weight[keep])
        small[0].bias.copy_(net[0].bias[keep])
        small[2].weight.copy_(net[2].weight[:, keep])
        small[2].bias.copy_(net[2].bias)
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-6)


def test_cut_hooks_are_removed_even_on_error():
    lin = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with cut_channels([lin], [0]):
            raise RuntimeError("boom")
    assert not lin._forward_pre_hooks


def test_true_class_probability():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    p = true_class_probability(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(p, torch.softmax(logits.double(), 1).diagonal())
