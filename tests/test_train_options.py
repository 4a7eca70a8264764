"""The seed's training options: min-SNR weighting, offset noise, input perturbation, EMA details,
raw weights beside the EMA ones, validation images, bilinear resizing. Each against a hand computation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.train import EMA, ImagePairs, TrainConfig, _to_tensor, train

CAPTIONS = ["a red cat", "a blue dog", "a green frog", "a white swan"]


def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def one_step_loss(folder, tmp_path, **options) -> float:
    from diffmem.adapters import load_model

    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    config = TrainConfig(output_dir=str(out), max_train_steps=1, train_batch_size=4, learning_rate=1e-4, log_every=1,
                         seed=0, **options)
    train(load_model(str(folder)), ImagePairs(images(), CAPTIONS), config, progress=False)
    return json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]


def hand_loss(folder, snr_gamma=None, noise_offset=0.0, input_perturbation=0.0) -> float:
    """The trainer's first step written out: its seeded draws in its order (batch permutation, caption
    dropout, VAE sample, noise, [offset], timesteps, [perturbation]) and diffusers' formulas."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffmem.adapters import load_model

    model = load_model(str(folder))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    ddpm = DDPMScheduler.from_pretrained(folder / "scheduler")
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    x_img = images()[perm] * 2 - 1
    caps = [CAPTIONS[int(i)] for i in perm]
    gen = torch.Generator().manual_seed(0)
    torch.rand(4, generator=gen)  # caption dropout draw
    with torch.no_grad():
        x0 = model.vae.encode(x_img).latent_dist.sample(generator=gen) * model.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        noise_in = noise + input_perturbation * torch.randn(x0.shape, generator=gen) if input_perturbation else noise
        a = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise_in
        v_pred = ddpm.config.prediction_type == "v_prediction"
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
        out = unet(x_t, t, encoder_hidden_states=model.encode_prompts(caps).embeddings).sample
        per = ((out - target) ** 2).flatten(1).mean(1)
        if snr_gamma is not None:
            snr = (a / (1 - a)).flatten()
            per = per * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
    return float(per.mean())


@pytest.mark.parametrize("options", [{"snr_gamma": 0.5}, {"noise_offset": 0.1}, {"input_perturbation": 1.0}],
                         ids=lambda o: next(iter(o)))
def test_loss_options_follow_diffusers(tiny_sd_folder, tmp_path, options):
    logged = one_step_loss(tiny_sd_folder, tmp_path, **options)
    assert logged == pytest.approx(hand_loss(tiny_sd_folder, **options), rel=1e-5)
    assert logged != pytest.approx(hand_loss(tiny_sd_folder), rel=1e-4)  # the option changes the loss


def test_min_snr_uses_the_velocity_form_on_v_prediction(tiny_v_folder, tmp_path):
    logged = one_step_loss(tiny_v_folder, tmp_path, snr_gamma=5.0)
    assert logged == pytest.approx(hand_loss(tiny_v_folder, snr_gamma=5.0), rel=1e-4)
    assert logged != pytest.approx(hand_loss(tiny_v_folder), rel=1e-3)


def test_ema_counts_steps_the_filter_left_empty_and_takes_its_decay(tiny_sd_folder, tmp_path):
    """hard_threshold 0 leaves every sample out (d >= 0); the EMA still steps, as in the seed."""
    from diffmem.adapters import load_model

    config = TrainConfig(output_dir=str(tmp_path / "o"), max_train_steps=3, train_batch_size=4, use_ema=True,
                         ema_decay=0.75, hard_threshold=0.0, checkpointing_steps=2, log_every=1)
    train(load_model(str(tiny_sd_folder)), ImagePairs(images(), CAPTIONS), config, progress=False)
    log = [json.loads(l) for l in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["skipped"] for r in log)
    state = torch.load(tmp_path / "o" / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["step"] == 2 and state["decay"] == 0.75


def test_ema_average_with_its_warm_up():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # d = min(0.5, 2/11)
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    ema.update()  # d = min(0.5, 3/12)
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1 - (2 / 11) * (3 / 12)))


def test_raw_weights_are_saved_beside_the_ema_ones(tiny_sd_folder, tmp_path):
    """The raw weights of a run with EMA are those of the same run without it (EMA does not touch training)."""
    from diffmem.adapters import load_model

    for name, ema in (("plain", False), ("ema", True)):
        config = TrainConfig(output_dir=str(tmp_path / name), max_train_steps=3, train_batch_size=4, learning_rate=1e-2,
                             use_ema=ema, ema_decay=0.9)
        train(load_model(str(tiny_sd_folder)), ImagePairs(images(), CAPTIONS), config, progress=False)
    weights = lambda folder: dict(load_model(str(tiny_sd_folder), unet=str(folder)).unet.named_parameters())
    plain, raw, averaged = weights(tmp_path / "plain" / "unet"), weights(tmp_path / "ema" / "raw" / "unet"), \
        weights(tmp_path / "ema" / "unet")
    for name in plain:
        torch.testing.assert_close(raw[name], plain[name])
    assert any(not torch.allclose(averaged[n], plain[n]) for n in plain)
    assert not (tmp_path / "plain" / "raw").exists()


def test_validation_images_are_the_weights_samples(tiny_sd_folder, tmp_path):
    from diffmem.adapters import load_model
    from diffmem.files import load_png
    from diffmem.sampling import SamplingConfig, sample_prompts

    config = TrainConfig(output_dir=str(tmp_path / "o"), max_train_steps=2, train_batch_size=4, learning_rate=1e-3,
                         validation_prompts=("a cat", "a dog"), validation_epochs=1, validation_inference_steps=3)
    train(load_model(str(tiny_sd_folder)), ImagePairs(images(), CAPTIONS), config, progress=False)
    folders = sorted((tmp_path / "o" / "validation").iterdir())
    assert [f.name for f in folders] == ["step-1", "step-2"]
    assert (folders[1] / "prompts.txt").read_text().splitlines() == ["a cat", "a dog"]
    final = load_model(str(tiny_sd_folder), unet=str(tmp_path / "o" / "unet"))
    expected = sample_prompts(final, ["a cat", "a dog"], SamplingConfig(num_inference_steps=3, num_generations=1))
    for i, r in enumerate(expected):
        assert np.abs(load_png(folders[1] / f"{i:03d}.png") - r.images[0].numpy()).max() <= 1 / 255 + 1e-6


def test_training_images_are_resized_bilinearly():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    x = _to_tensor(img, 20, center_crop=True, random_flip=False)
    expected = img.resize((30, 20), Image.BILINEAR).crop((5, 0, 25, 20))
    torch.testing.assert_close(x, torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255).permute(2, 0, 1))
    bicubic = img.resize((30, 20), Image.BICUBIC).crop((5, 0, 25, 20))
    assert not np.allclose(np.asarray(bicubic), np.asarray(expected))
