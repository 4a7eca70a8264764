"""Kim & No's padding mitigation (clip-pad) against token ids padded and rows zeroed by hand, as
their ``experiments.py`` does with a tokenizer whose pad token is "!"."""

import pytest
import torch

from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.mitigations import get_mitigation, make_params
from diffmem.sampling import SamplingConfig, sample_unit

PROMPTS = ["a red cat on a mat", "x" * 100]  # the second is truncated: its end token is at position 76
SAMPLING = SamplingConfig(num_inference_steps=3, num_generations=2, batch_size=8, seed=3)


def _encode_ids(model, ids):
    with torch.no_grad():
        return model.text_encoder(torch.tensor([ids]))[0][0]  # (T, D)


def _by_hand(model, prompt, pad_id, zero_end=True):
    """Their steps on token ids: the prompt's ids (end token kept when truncated), padded with
    `pad_id` to 77, encoded, the end token's row zeroed."""
    ids = model.tokenizer(prompt).input_ids
    if len(ids) > model.max_tokens:
        ids = ids[:model.max_tokens - 1] + [ids[-1]]
    emb = _encode_ids(model, ids + [pad_id] * (model.max_tokens - len(ids))).clone()
    if zero_end:
        emb[len(ids) - 1] = 0
    return emb, len(ids) - 1


def _unit(model):
    from diffmem.mitigations import Unit
    from diffmem.sampling import schedule, unit_inputs

    x, _, uncond = unit_inputs(model, [0, 1], SAMPLING, PROMPTS)
    return Unit(PROMPTS, [0, 1], model.encode_prompts(PROMPTS), uncond, x, schedule(model, 3), SAMPLING, 7.5,
                MitigationConfig(method="clip-pad", seed=3), None, x, None)


def test_main_setting_pads_with_bang_and_zeroes_the_end_token_on_both_branches(tiny_sd):
    model = tiny_sd
    bang = model.tokenizer.convert_tokens_to_ids("!")
    plan = get_mitigation("clip-pad").plan(model, _unit(model), make_params("clip-pad", {}))
    for j, prompt in enumerate(PROMPTS):
        expected, end = _by_hand(model, prompt, bang)
        torch.testing.assert_close(plan.cond.embeddings[j], expected, rtol=1e-5, atol=1e-6)
        assert plan.info[j]["end_token"] == end and plan.info[j]["uncond_changed"]
    assert plan.info[1]["end_token"] == 76
    null, _ = _by_hand(model, "", bang, zero_end=False)  # their null: "" with "!" padding, its end token kept
    assert len(plan.uncond) == 4
    for row in plan.uncond.embeddings:
        torch.testing.assert_close(row, null, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(null, model.empty_conditioning().embeddings[0])  # the unconditional branch changed
    assert model.tokenizer.pad_token == "<|endoftext|>"  # the tokenizer is restored
    # only the conditional branch, when asked
    plan = get_mitigation("clip-pad").plan(model, _unit(model), make_params("clip-pad", {"uncond_same_padding": False}))
    assert plan.uncond is None and not plan.info[0]["uncond_changed"]


def test_pad_mask_ratio_zeroes_the_first_pad_rows(tiny_sd):
    model = tiny_sd
    params = make_params("clip-pad", {"pad_token": None, "mask_end_token": False, "pad_mask_ratio": 0.4})
    plan = get_mitigation("clip-pad").plan(model, _unit(model), params)
    eos = model.tokenizer.eos_token_id
    expected, end = _by_hand(model, PROMPTS[0], eos, zero_end=False)  # the default padding: end-token copies
    k = int(0.4 * (77 - (end + 1)))
    for i in range(77):
        if end < i <= end + k:
            expected[i] = 0
    torch.testing.assert_close(plan.cond.embeddings[0], expected, rtol=1e-5, atol=1e-6)
    zero_rows = int((plan.cond.embeddings[0].abs().sum(-1) == 0).sum())
    assert plan.info[0]["pad_rows_masked"] == k == zero_rows == 24 and plan.uncond is None  # 13 letters: end = 14
    assert plan.info[1]["pad_rows_masked"] == 0  # nothing after a truncated prompt's end token


def test_on_sd2_padding_the_method_is_the_end_token_masking(tiny_sd2):
    model = tiny_sd2  # pads with "!" already
    plan = get_mitigation("clip-pad").plan(model, _unit(model), make_params("clip-pad", {}))
    default = model.encode_prompts(PROMPTS[:1]).embeddings[0].clone()
    default[plan.info[0]["end_token"]] = 0
    torch.testing.assert_close(plan.cond.embeddings[0], default)
    torch.testing.assert_close(plan.uncond.embeddings[0], model.empty_conditioning().embeddings[0])


def test_mitigate_samples_with_the_edited_branches_and_off_is_unmitigated(tiny_sd):
    model = tiny_sd
    out = mitigate_unit(model, PROMPTS, [0, 1], MitigationConfig(method="clip-pad", seed=3), SAMPLING)
    bang = model.tokenizer.convert_tokens_to_ids("!")
    cond = torch.stack([_by_hand(model, p, bang)[0] for p in PROMPTS])
    null = _by_hand(model, "", bang, zero_end=False)[0]
    from diffmem.model import Conditioning

    ref = sample_unit(model, PROMPTS, [0, 1], SAMPLING, decode=True, conditioning=Conditioning(cond),
                      uncond=Conditioning(null.expand(4, -1, -1)))
    none = mitigate_unit(model, PROMPTS, [0, 1], MitigationConfig(method="none", seed=3), SAMPLING)
    for a, b, c in zip(out, ref, none):
        torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
        assert a.unet_rows == c.unet_rows  # no extra UNet row
        assert not torch.allclose(a.images, c.images, atol=1e-3)  # and it does change the images
    off = mitigate_unit(model, PROMPTS, [0, 1], MitigationConfig(method="clip-pad", seed=3,
                                                                  params=get_mitigation("clip-pad").off), SAMPLING)
    for a, b in zip(none, off):
        assert torch.equal(a.images, b.images) and torch.equal(a.text_noise_norm, b.text_noise_norm)


def test_clip_pad_refuses_models_without_one_clip_encoder():
    class Other:
        family, name = "lab", "lab"

    reason = get_mitigation("clip-pad").check(Other())
    assert reason.startswith("cannot run on lab (lab): Kim & No edit one CLIP encoder's padding") and "\n" not in reason
    with pytest.raises(ValueError, match="pad_mask_ratio 1.5: must be between 0 and 1"):
        make_params("clip-pad", {"pad_mask_ratio": 1.5})


def test_bench_mitigate_runs_their_four_settings():
    from diffmem.bench import BenchMitigateConfig, sweep_configs
    from diffmem.evaluate import settings_of

    method = get_mitigation("clip-pad")
    configs = sweep_configs("clip-pad", method.sweep(None, None), BenchMitigateConfig(methods=("clip-pad",)))
    settings = [s.params for c in configs for s in settings_of(c)]
    assert settings == [{"pad_token": None, "mask_end_token": False, "pad_mask_ratio": 0.4},
                        {"pad_token": None, "mask_end_token": False, "pad_mask_ratio": 0.7},
                        {"mask_end_token": False}, {}]
