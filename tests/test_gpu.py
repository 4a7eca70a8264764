"""On a CUDA device in half precision: the pass equals diffusers' pipeline there, the seed contract
holds, and the verbs run. Skipped where no CUDA device exists (CI is CPU-only);
``benchmarks/device_check.sh`` runs these on a GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.cli.main import main
from diffmem.files import read_rows
from diffmem.sampling import SamplingConfig, initial_noise, sample_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = ["float16", "bfloat16"]
PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square"]
# Half-precision tolerances on latents after 6 DDIM steps of the tiny model: the pipeline and the
# pass make the same calls in the same order, so they agree far inside these.
TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-2}


@pytest.fixture(scope="module", params=DTYPES)
def cuda_model(request, tiny_sd_folder):
    from diffmem.adapters import load_model

    return request.param, load_model(str(tiny_sd_folder), device="cuda", dtype=request.param)


def test_pass_equals_the_pipeline_on_the_device(cuda_model, tiny_sd_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype, model = cuda_model
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=getattr(torch, dtype)).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cfg = SamplingConfig(num_inference_steps=6, guidance_scale=7.5, num_generations=2, seed=11, batch_size=4)
    ours = sample_prompts(model, PROMPTS, cfg, decode=False)
    for i, prompt in enumerate(PROMPTS):
        ref = pipe(prompt, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2,
                   generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent").images
        assert ours[i].latents.device.type == "cuda" and ours[i].latents.dtype == getattr(torch, dtype)
        assert (ref.float() - ours[i].latents.float()).abs().max().item() <= TOLERANCE[dtype]


def test_seed_contract_on_the_device(cuda_model, tiny_sd):
    """x_T is drawn on the CPU generator: the same numbers as on a CPU model, in the device's dtype."""
    dtype, model = cuda_model
    x = initial_noise(model, 3, seed=7)
    assert x.device.type == "cuda"
    expected = torch.randn((3, *model.latent_shape), generator=torch.Generator("cpu").manual_seed(7),
                           dtype=getattr(torch, dtype)) * model.scheduler.init_noise_sigma
    assert torch.equal(x.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_verbs_run_and_resume_on_the_device(tiny_sd_folder, tmp_path, dtype, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(5)))
    common = ["--model", str(tiny_sd_folder), "--device", "cuda", "--dtype", dtype]
    fast = ["--num-inference-steps", "3", "--num-generations", "2", "--batch-size", "4", "--no-progress"]
    # detect, killed after 2 prompts (simulated by --end), resumed; equal to one whole run
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert main(["detect", *common, "--prompts", str(prompts), "--out", str(whole), *fast]) == 0
    assert main(["detect", *common, "--prompts", str(prompts), "--out", str(part), "--end", "2", *fast]) == 0
    meta = json.loads((tmp_path / "whole.meta.json").read_text())
    (tmp_path / "part.meta.json").write_text(json.dumps(meta))
    assert main(["detect", *common, "--prompts", str(prompts), "--out", str(part), "--resume", *fast]) == 0
    assert [r["text_noise_norm"] for r in read_rows(part)] == [r["text_noise_norm"] for r in read_rows(whole)]
    assert main(["explain", *common, "--prompt", "a red cat", "--num-inference-steps", "3", "--num-generations", "2",
                 "--json", str(tmp_path / "e.json"), "--no-png"]) == 0
    ex = json.loads((tmp_path / "e.json").read_text())
    assert all(t["score"] == t["score"] for t in ex["tokens"]) and ex["score"] > 0  # no NaN
    assert main(["mitigate", *common, "--prompts", str(prompts), "--method", "embedding-opt", "--target-loss", "0",
                 "--max-iters", "2", "--out", str(tmp_path / "m"), *fast]) == 0
    rows = [json.loads(l) for l in (tmp_path / "m" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["iterations"] == 2 and r["final_loss"] == r["final_loss"] for r in rows)
