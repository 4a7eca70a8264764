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


# -- the flow lab's report and benchmarks -----------------------------------------------------------

def test_sd_first_step_sigma_has_the_snr_of_sd_first_ddim_step():
    """By hand: SD's scaled-linear betas, alpha_bar at t = 981 (step 1 of 50 with steps_offset 1), and
    the flow sigma where ((1 - sigma) / sigma)^2 equals alpha_bar / (1 - alpha_bar)."""
    from diffmem.adapters.flow import sd_first_step_sigma, sigma_of_snr

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = float(torch.cumprod(1 - betas, 0)[981])
    sigma = sd_first_step_sigma(50)
    assert ((1 - sigma) / sigma) ** 2 == pytest.approx(alpha_bar / (1 - alpha_bar), rel=1e-5)
    assert sigma == pytest.approx(0.929, abs=5e-4)
    assert sigma_of_snr(0.0) == 1.0 and sigma_of_snr(1.0) == 0.5
    with pytest.raises(ValueError, match="snr -1"):
        sigma_of_snr(-1)


def test_flow_windows_pick_the_step_nearest_the_matched_sigma(tiny_flow_lab):
    from diffmem.lab.report import flow_windows

    windows = flow_windows(tiny_flow_lab, 50)
    (name,) = [k for k in windows if k.startswith("sigma")]
    k = windows[name].start
    sigmas = torch.linspace(1, 1 / 1000, 50)  # the unshifted schedule of the lab's FlowMatch Euler
    assert k == int((sigmas - 0.9292).abs().argmin()) == 3 and name == "sigma 0.929 (step 4)"
    assert windows["first step"] == slice(0, 1) and windows["first 5 steps"] == slice(0, 5)


def test_first_step_spread_by_hand():
    import numpy as np

    from diffmem.lab.report import first_step_spread

    scores = np.array([[1.0, 3.0], [4.0, 4.0], [2.0, 6.0]])  # 3 prompts x 2 initial noises
    out = first_step_spread(scores)
    stds = [2 ** 0.5, 0.0, 8 ** 0.5]  # per prompt, ddof 1
    assert out["mean_cv"] == pytest.approx((stds[0] / 2 + 0 + stds[2] / 4) / 3)
    assert out["between_over_within"] == pytest.approx(float(np.std([2.0, 4.0, 4.0], ddof=1)) / (sum(stds) / 3))
    assert (out["prompts"], out["generations"]) == (3, 2)


def test_bench_detect_on_a_flow_model_skips_the_detectors_its_family_cannot_run(tiny_flow_lab, tmp_path):
    """All detectors by default: those defined on the noise or on cross-attention are listed with their
    reason, the rest run; a refused detector named by the user is refused, before sampling."""
    from diffmem.bench import BenchDetectConfig, applies, bench_detect
    from diffmem.detectors import DETECTORS, flow_refusal
    from diffmem.prompts import PromptRecord, PromptSet

    data = tiny_flow_lab.training_data()
    as_set = lambda name, n: PromptSet([PromptRecord(i, p.caption) for i, p in
                                        enumerate(data.prompt_set(name)[:n])], f"lab:{name}")
    config = BenchDetectConfig(generations=(1,), steps=("first",), num_inference_steps=4, bootstrap=0, timing_prompts=0)
    table = bench_detect(tiny_flow_lab, as_set("memorized", 2), {"novel": as_set("novel", 3)}, config, tmp_path / "b",
                         progress=False)
    runs = {n for n, cls in DETECTORS.items() if flow_refusal(cls) is None and n != "flux-guidance"}
    assert {"wen", "cond-jacobian", "broken-memories"} <= runs
    assert set(table["skipped"]) == set(DETECTORS) - runs
    assert {r["method"] for r in table["rows"]} == {m for m in runs if applies(m, "first", 1)}
    md = (tmp_path / "b" / "table.md").read_text()
    assert "Not run on this model:" in md and f"- jeon: {flow_refusal(DETECTORS['jeon'])}" in md
    assert table["skipped"]["flux-guidance"].startswith("it differentiates the velocity in the distilled guidance")
    with pytest.raises(ValueError, match=r"^jeon cannot run on lab \("):
        bench_detect(tiny_flow_lab, as_set("memorized", 2), {"novel": as_set("novel", 3)},
                     replace(config, methods=("wen", "jeon")), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_bench_mitigate_plan_skips_what_a_flow_model_cannot_run(tiny_flow_lab):
    from diffmem.mitigate import METHODS
    from diffmem.mitigations import check_model, get_mitigation, refusal

    reasons = {m: refusal(get_mitigation(m), tiny_flow_lab) for m in METHODS}
    assert reasons["none"] is None and reasons["embedding-opt"] is None and reasons["rand-word-add"] is None
    assert reasons["nemo"].startswith("cannot run on lab (") and "sigma = 1" in reasons["nemo"]
    assert "no LoRA adapter" in reasons["lora-scale"]
    assert reasons["broken-memories"] is None and "sigma = 1" in reasons["guard"]
    with pytest.raises(ValueError, match=r"^--method nemo: cannot run on lab \("):
        check_model("nemo", tiny_flow_lab)


def test_lab_flow_names_the_shipped_flow_lab(monkeypatch, tmp_path):
    import diffmem.lab as lab
    from diffmem.adapters import resolve_model_path

    monkeypatch.setitem(lab.BUILT_IN, "lab-flow", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"--model lab-flow: .*--preset flow"):
        resolve_model_path("lab-flow")


def test_delayed_cfg_on_a_flow_model_switches_at_the_matched_noise_level(tiny_flow_lab):
    """Guidance 0 while sigma is above the sigma with the SNR of SD's t = 500 (0.618), full after: against
    a hand-written Euler loop on the velocities."""
    from diffmem.adapters.flow import sd_sigma_at
    from diffmem.mitigate import MitigationConfig, mitigate_unit

    m, N, w = tiny_flow_lab, 10, 2.0
    sigmas = torch.cat([torch.linspace(1, 1 / 1000, N), torch.zeros(1)])
    k = int((sigmas[:N] <= sd_sigma_at(500)).nonzero()[0])
    assert k == 4 and sd_sigma_at(500) == pytest.approx(0.618, abs=1e-3)
    cfg = SamplingConfig(num_inference_steps=N, num_generations=2, seed=3, guidance_scale=w, batch_size=8)
    prompt = "the velvet harbor: a blue square"
    (res,) = mitigate_unit(m, [prompt], [0], MitigationConfig(method="delayed-cfg"), cfg)
    assert res.info["switch_step"] == [k, k]
    x = initial_noise(m, 2, 3)
    cond, unc = m.encode_prompts([prompt]).expand(2), m.empty_conditioning().expand(2)
    with torch.no_grad():
        for i in range(N):
            t = sigmas[i] * 1000
            v_c, v_u = m.model_output(x, t, cond), m.model_output(x, t, unc)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + (w if i >= k else 0.0) * (v_c - v_u))
    torch.testing.assert_close(res.images, m.decode(x), rtol=1e-4, atol=1e-4)


def test_the_shipped_flow_lab_loads_as_lab_flow():
    m = load_model("lab-flow")
    assert m.name == "lab-flow" and m.family == "lab" and m.sampler_prediction == "flow"
    assert type(m.denoiser).__name__ == "SD3Transformer2DModel" and m.identity()["name"] == "lab-flow"
    data = m.training_data()
    assert len(data.memorized) == 22 and m.default_guidance_scale == 1.25


def test_broken_memories_corrects_a_flow_model_calibrated_on_its_own_prompts(tiny_flow_lab):
    from diffmem.mitigate import MitigationConfig, mitigate_unit

    sampling = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, seed=1)
    config = MitigationConfig(method="broken-memories", seed=1, params={"tau_mild": 0.2, "tau_strong": 0.5})
    (res,) = mitigate_unit(tiny_flow_lab, ["the velvet harbor: a blue square"], [0], config, sampling)
    assert torch.isfinite(res.images).all() and sum(res.info["broken_memories_corrected_steps"]) > 0
