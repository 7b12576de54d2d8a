"""GAN losses against values computed by hand (math module, float64), and the monitors."""
from __future__ import annotations

import math

import pytest
import torch

from genscale.families.gan_losses import (d_loss_bce, d_loss_classes, g_loss_classes, g_loss_nonsaturating,
                                          masked_mse, real_probability)
from genscale.families.gan_monitor import (GanMonitor, batch_diversity, collapsed, discriminator_wins,
                                           diversity_ratio)


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_discriminator_bce_by_hand():
    real, fake = [2.0, -1.0], [0.5, -3.0, 1.0]
    expected = (-(math.log(sig(2.0)) + math.log(sig(-1.0))) / 2
                - (math.log(1 - sig(0.5)) + math.log(1 - sig(-3.0)) + math.log(1 - sig(1.0))) / 3)
    assert d_loss_bce(t(*real), t(*fake)).item() == pytest.approx(expected, rel=1e-12)


def test_generator_nonsaturating_by_hand():
    assert g_loss_nonsaturating(t(0.5, -2.0)).item() == pytest.approx(
        -(math.log(sig(0.5)) + math.log(sig(-2.0))) / 2, rel=1e-12)
    # D fooled completely -> loss 0; D certain it is fake -> large loss (no saturation)
    assert g_loss_nonsaturating(t(40.0)).item() < 1e-12
    assert g_loss_nonsaturating(t(-40.0)).item() == pytest.approx(40.0, rel=1e-9)


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_n_plus_one_discriminator_and_generator_by_hand():
    # 2 classes + fake = 3 logits per image.
    real = [[1.0, 0.2, -0.5], [0.1, 2.0, 0.3], [0.4, 0.4, 1.5]]
    labels = [0, 1, -1]  # the third real image is unlabelled
    fake = [[0.3, -0.2, 0.9], [1.2, 0.0, -1.0]]
    p = [softmax(r) for r in real]
    q = [softmax(r) for r in fake]
    real_terms = [-math.log(p[0][0]), -math.log(p[1][1]), -math.log(1 - p[2][2])]
    fake_terms = [-math.log(q[0][2]), -math.log(q[1][2])]
    expected = sum(real_terms) / 3 + sum(fake_terms) / 2
    got = d_loss_classes(torch.tensor(real, dtype=torch.float64), torch.tensor(labels),
                         torch.tensor(fake, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)

    g = g_loss_classes(torch.tensor(fake, dtype=torch.float64), torch.tensor([1, 0]))
    assert g.item() == pytest.approx((-math.log(q[0][1]) - math.log(q[1][0])) / 2, rel=1e-12)

    probs = real_probability(torch.tensor(real, dtype=torch.float64))
    assert probs.tolist() == pytest.approx([1 - pr[2] for pr in p], rel=1e-6)


def test_real_probability_of_logits_and_patch_maps():
    assert real_probability(t(0.0, 2.0)).tolist() == pytest.approx([0.5, sig(2.0)], rel=1e-6)
    patches = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    assert real_probability(patches).item() == pytest.approx((0.5 + sig(2) + sig(-2) + 0.5) / 4, rel=1e-6)


def test_masked_mse_counts_only_holes():
    target = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)  # right column is the hole
    # hole values: channel 0 -> 2, 4; channel 1 -> 0, 1
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 16 + 0 + 1) / 4)


def test_discriminator_wins_and_collapse_predicates():
    assert discriminator_wins(0.99, 0.01)
    assert not discriminator_wins(0.99, 0.2)
    assert not discriminator_wins(0.7, 0.01)
    assert collapsed(0.1) and not collapsed(0.6)


def test_batch_diversity_by_hand():
    # two images of 4 values at distance sqrt(4 * 1^2) -> RMS distance 1
    x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    assert float(batch_diversity(x)) == pytest.approx(1.0)
    # three images 0, 1, 3 (one value): pair distances 1, 3, 2 -> mean 2
    assert float(batch_diversity(torch.tensor([[0.0], [1.0], [3.0]]))) == pytest.approx(2.0)
    same = torch.ones(8, 1, 4, 4)
    assert float(diversity_ratio(same, torch.randn(8, 1, 4, 4))) == 0.0


def run_monitor(steps: int, d_real: float, d_fake: float, diversity: float, monitor=None):
    monitor = monitor or GanMonitor(warmup=20, patience=10, repeat_every=100)
    return monitor, [m for m in (monitor.update(d_real, d_fake, diversity) for _ in range(steps)) if m]


def test_monitor_warns_when_d_wins_and_when_samples_collapse_but_not_when_healthy():
    _, healthy = run_monitor(300, 0.7, 0.3, 0.8)
    assert healthy == []
    _, wins = run_monitor(300, 0.999, 0.001, 0.8)
    assert wins and all("discriminator wins" in m for m in wins)
    assert len(wins) == 3  # first after warm-up + patience, then once per repeat_every
    _, collapse = run_monitor(300, 0.6, 0.4, 0.02)
    assert collapse and all("collapsed" in m for m in collapse)


def test_monitor_ignores_a_single_bad_step():
    monitor, _ = run_monitor(100, 0.7, 0.3, 0.8)
    assert monitor.update(1.0, 0.0, 0.0) is None
    _, later = run_monitor(5, 0.7, 0.3, 0.8, monitor)
    assert later == []
