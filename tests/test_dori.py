"""DoRI, the attack that tests mitigations: its optimization against a hand-written loop on the tiny SD
(DDPM noising written out, the UNet called directly, torch's Adam), and on a flow model the velocity
target at uniform sigma."""

from __future__ import annotations

import pytest
import torch

from diffmem.dori import DoriConfig, dori_attack


def test_dori_equals_a_hand_written_loop(tiny_sd):
    model = tiny_sd
    x0 = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    start = model.encode_prompts(["a red barn at dawn"])
    cond, losses = dori_attack(model, x0, start, DoriConfig(steps=3, lr=0.1, batch=4, seed=7))
    gen = torch.Generator("cpu").manual_seed(7)
    emb = start.embeddings.clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=0.1)
    abar = model.scheduler.alphas_cumprod
    expected = []
    for _ in range(3):
        eps = torch.randn((4, *x0.shape[1:]), generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = ((model.unet(x_t, t, encoder_hidden_states=emb.expand(4, -1, -1)).sample - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(float(loss))
    assert losses == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(cond.embeddings, emb.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(cond.embeddings, start.embeddings)


def test_dori_on_a_flow_model_regresses_the_velocity(tiny_sd3_folder):
    from diffmem.adapters import load_model
    from diffmem.dori import noised_batch

    model = load_model(str(tiny_sd3_folder))
    x0 = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator("cpu").manual_seed(2)
    noisy, t, target = noised_batch(model, x0, 3, gen)
    gen = torch.Generator("cpu").manual_seed(2)
    eps = torch.randn((3, *x0.shape[1:]), generator=gen)
    sigma = 1 - torch.rand(3, generator=gen)
    torch.testing.assert_close(noisy, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(t, sigma * 1000)
    torch.testing.assert_close(target, eps - x0.expand(3, -1, -1, -1))
    cond, losses = dori_attack(model, x0, model.encode_prompts(["a cat"]), DoriConfig(steps=2, batch=2))
    assert len(losses) == 2 and cond.embeddings.shape == model.encode_prompts(["a cat"]).embeddings.shape
    with pytest.raises(ValueError, match="DoRI steps 0"):
        DoriConfig(steps=0)
