"""LoRADropout (lora/layers.py): nn.Dropout's behaviour with a cheaper CPU mask.

Checked against what dropout must be, not against our own output: each element is kept with
probability 1 - p (within 5 binomial standard deviations, on each of the four 16-bit lanes a
64-bit draw feeds, and for p near 0 and 1), kept elements are scaled by 1 / (1 - p) exactly and
dropped ones are 0, the gradient is the same mask and scale, masks are independent of the
input values, a seed gives the same mask, eval mode and p = 0 are the identity, and p = 1
drops everything.
"""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.lora import LoraConfig, apply_lora, lora_layers
from weightsmith.lora.layers import LoRADropout


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 400_000
    y = LoRADropout(p)(torch.ones(n))
    kept = y != 0
    sd = math.sqrt(p * (1 - p) / (n / 4))
    for lane in range(4):  # element i takes bits 16 (i % 4) .. of its 64-bit draw
        assert abs(kept[lane::4].float().mean().item() - (1 - p)) < 5 * sd
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # neighbours are independent: the keep rate of a pair is (1 - p)^2
    both = (kept[0::2] & kept[1::2]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n / 2))


def test_gradient_is_the_mask_scaled_and_values_pass_through():
    torch.manual_seed(1)
    x = torch.randn(37, 19, requires_grad=True)  # not a multiple of 4 elements
    drop = LoRADropout(0.25)
    y = drop(x)
    kept = y != 0
    assert torch.equal(y[kept], x.detach()[kept] * (1 / 0.75))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * (1 / 0.75), 0.0))


def test_seeded_masks_repeat_and_modes_that_keep_everything():
    x = torch.randn(64, 33)
    drop = LoRADropout(0.5)
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(drop(x) != 0)
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(drop(x) != 0, masks[0])  # the next call draws anew
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)
    assert torch.equal(LoRADropout(0.0)(x), x)
    assert torch.equal(LoRADropout(1.0)(x), torch.zeros_like(x))
    bf16 = LoRADropout(0.5)(x.bfloat16())
    assert bf16.dtype == torch.bfloat16


def test_adapters_with_dropout_use_it():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(8, 8))
    apply_lora(model, LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=["q_proj"]))
    (layer,) = lora_layers(model).values()
    assert isinstance(layer.lora_dropout["default"], LoRADropout)
    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout)  # PEFT's type, for code that checks
