"""The flow lab's machinery on a tiny build: an MMDiT trained by rectified flow, loaded as a lab model,
its d on the velocity and its sampling held to a hand-written Euler loop, its training noise to
diffusers' own flow scheduler; and flow-matching training on SD3."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffmem.adapters import load_model
from diffmem.adapters.lab import LabModelConfig
from diffmem.lab.build import PRESETS, build_lab
from diffmem.sampling import SamplingConfig, initial_noise, sample_unit


@pytest.fixture(scope="module")
def tiny_flow_lab(tmp_path_factory):
    config = replace(PRESETS["fast"], max_train_steps=6, lr_warmup_steps=1, train_batch_size=4,
                     model=LabModelConfig(noise_schedule="flow", denoiser="sd3-transformer", transformer_layers=1,
                                          transformer_heads=2, transformer_head_dim=16))
    return load_model(str(build_lab(tmp_path_factory.mktemp("flow_lab") / "model", config, progress=False)))


def test_flow_lab_loads_as_a_flow_model(tiny_flow_lab):
    m = tiny_flow_lab
    assert m.family == "lab" and m.prediction_type == "flow" and m.sampler_prediction == "flow"
    assert type(m.denoiser).__name__ == "SD3Transformer2DModel" and m.identity()["prediction_type"] == "flow"
    assert float(m.scheduler.config.shift) == 1.0


def test_flow_lab_samples_as_a_hand_written_euler_loop_and_d_is_the_velocity_difference(tiny_flow_lab):
    """x_{k+1} = x_k + (sigma_{k+1} - sigma_k) (v_u + w (v_c - v_u)) with FlowMatch Euler's unshifted
    sigmas, linspace(1, 1/T, N) for T = 1000 training timesteps, then 0; the pass's first-step d is
    ||v_c - v_u|| at x_T."""
    m, N, w = tiny_flow_lab, 4, 1.25
    cfg = SamplingConfig(num_inference_steps=N, num_generations=2, seed=7, guidance_scale=w, batch_size=8)
    (res,) = sample_unit(m, ["the velvet harbor: a blue square"], [0], cfg, decode=True)
    x = initial_noise(m, 2, 7)
    cond = m.encode_prompts(["the velvet harbor: a blue square"]).expand(2)
    unc = m.empty_conditioning().expand(2)
    sigmas = torch.cat([torch.linspace(1, 1 / 1000, N), torch.zeros(1)])
    with torch.no_grad():
        for k in range(N):
            t = sigmas[k] * 1000
            v_c, v_u = m.model_output(x, t, cond), m.model_output(x, t, unc)
            if k == 0:
                torch.testing.assert_close(res.text_noise_norm[:, 0].float(), (v_c - v_u).flatten(1).norm(dim=1),
                                           rtol=1e-4, atol=1e-5)
            x = x + (sigmas[k + 1] - sigmas[k]) * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(res.latents, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.images, m.decode(x), rtol=1e-4, atol=1e-4)


def test_flow_training_noise_is_the_flow_schedulers(tiny_flow_lab):
    """train.flow_noised equals diffusers' FlowMatchEulerDiscreteScheduler.scale_noise at its sigmas."""
    from diffmem.train import flow_noised

    sched = tiny_flow_lab.scheduler
    sched.set_timesteps(5)
    x0, eps = torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16)
    for k, t in enumerate(sched.timesteps):
        want = sched.scale_noise(x0[k:k + 1], t[None], eps[k:k + 1])
        got = flow_noised(x0[k:k + 1], eps[k:k + 1], sched.sigmas[k][None])
        torch.testing.assert_close(got, want)


def test_flow_matching_training_runs_on_sd3_with_the_velocity_filter(tiny_sd3_folder, tmp_path):
    from diffmem.train import ImagePairs, TrainConfig, train

    model = load_model(str(tiny_sd3_folder))
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    images = torch.rand(4, 3, model.image_size, model.image_size)
    out = train(model, ImagePairs(images, ["a red cat", "two dogs", "a house", "a car"]),
                TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, learning_rate=1e-3,
                            hard_threshold=1e6), progress=False)
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert log and all("nan" not in line for line in log)
    changed = [k for k, v in model.denoiser.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    with pytest.raises(ValueError, match="--snr-gamma: .* flow-matching model"):
        train(model, ImagePairs(images, ["a"] * 4), TrainConfig(output_dir=str(tmp_path / "r2"), snr_gamma=5.0),
              progress=False)
