"""Embedding optimization (Wen et al. 5.1) and the prompt-augmentation baselines, on tiny models."""

from __future__ import annotations

import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from diffmem.mitigate import (AUGMENT_STYLES, MitigationConfig, augment_prompt, default_target_loss, mitigate_unit,
                              optimize_prompt_embedding)
from diffmem.mitigations.augment import random_vocabulary_word
from diffmem.model import Conditioning
from diffmem.sampling import SamplingConfig, initial_noise, sample_unit

PROMPTS = ["a cat on a mat", "a dog in the fog", "the red barn at dawn"]


def first_step(model, prompts, G=2, steps=10, seed=0):
    model.scheduler.set_timesteps(steps)
    t = model.scheduler.timesteps[0]
    x = torch.stack([initial_noise(model, G, seed + p) for p in range(len(prompts))])  # (P, G, C, H, W)
    return model.encode_prompts(prompts), x, t


def test_unreachable_target_runs_all_iterations_and_reduces_d(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS)
    r = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=-1.0, lr=0.05, max_iters=10)
    assert r.iterations.tolist() == [10, 10, 10]
    assert (r.final_d < 0.7 * r.initial_d).all()
    assert not torch.equal(r.embeddings[:, 1:], cond.embeddings[:, 1:])


def test_start_token_never_changes(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS)
    r = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=-1.0, lr=0.5, max_iters=5)
    assert torch.equal(r.embeddings[:, 0], cond.embeddings[:, 0])  # AdamW's weight decay included


def test_target_above_d_stops_at_once_and_changes_nothing(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS)
    r = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=1e6)
    assert r.iterations.tolist() == [0, 0, 0]
    assert torch.equal(r.embeddings, cond.embeddings)
    assert torch.equal(r.final_d, r.initial_d)


def test_stops_as_soon_as_d_reaches_the_target(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS[:1])
    three = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=-1.0, max_iters=3)
    target = float(three.final_loss[0])  # the loss after exactly 3 steps
    r = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=target, max_iters=10)
    assert 1 <= int(r.iterations[0]) <= 3
    assert float(r.final_loss[0]) <= target
    if int(r.iterations[0]) == 3:
        assert torch.equal(r.embeddings, three.embeddings)


def test_a_finished_prompt_stops_changing_while_others_continue(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS)
    d0 = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=1e6).initial_loss
    lo = int(d0.argmin())
    target = float(d0[lo]) + 1e-6  # only the lowest prompt is already there
    joint = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=target)
    assert int(joint.iterations[lo]) == 0
    assert torch.equal(joint.embeddings[lo], cond.embeddings[lo])
    others = [i for i in range(len(PROMPTS)) if i != lo]
    assert all(int(joint.iterations[i]) > 0 for i in others)
    for i in others:  # batching does not change any prompt's optimization
        alone = optimize_prompt_embedding(tiny_sd, cond[i:i + 1], x[i:i + 1], t, target_loss=target)
        assert int(alone.iterations[0]) == int(joint.iterations[i])
        torch.testing.assert_close(alone.embeddings[0], joint.embeddings[i], atol=1e-5, rtol=1e-4)
        assert float(joint.final_loss[i]) <= target or int(joint.iterations[i]) == 10


def test_prompt_that_ignores_the_text_has_d_zero_and_needs_no_iterations(tiny_sd):
    fake = SimpleNamespace(scheduler=tiny_sd.scheduler, empty_conditioning=tiny_sd.empty_conditioning,
                           predict=lambda x, t, cond: 0.5 * x + 0 * cond.embeddings.sum(),
                           frozen_token_positions=(0,), defaults=tiny_sd.defaults)
    cond, x, t = first_step(tiny_sd, PROMPTS[:2])
    r = optimize_prompt_embedding(fake, cond, x, t, target_loss=0.0)
    assert r.initial_d.tolist() == [0.0, 0.0]
    assert r.iterations.tolist() == [0, 0]


def test_bad_shapes_are_rejected(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS[:2])
    with pytest.raises(ValueError, match="cond"):
        optimize_prompt_embedding(tiny_sd, cond, x.flatten(0, 1), t, target_loss=1.0)


# -- sampling with a mitigation -------------------------------------------------------------------

SAMPLING = SamplingConfig(num_inference_steps=3, num_generations=2, seed=7)


def test_no_mitigation_and_a_target_above_d_sample_as_plain_sampling(tiny_sd):
    plain = sample_unit(tiny_sd, PROMPTS[:2], [0, 1], SAMPLING, decode=True)
    none = mitigate_unit(tiny_sd, PROMPTS[:2], [0, 1], MitigationConfig(method="none"), SAMPLING)
    opt = mitigate_unit(tiny_sd, PROMPTS[:2], [0, 1], MitigationConfig(method="embedding-opt", target_loss=1e6), SAMPLING)
    for p, n, o in zip(plain, none, opt):
        assert torch.equal(p.images, n.images)
        assert torch.equal(p.images, o.images)
        assert n.final_d == n.initial_d and o.iterations == 0


def test_embedding_opt_samples_with_the_optimized_embedding(tiny_sd):
    res = mitigate_unit(tiny_sd, PROMPTS[:2], [0, 1], MitigationConfig(method="embedding-opt", target_loss=-1.0,
                                                                      max_iters=4), SAMPLING)
    for r in res:
        assert r.iterations == 4 and r.final_d < r.initial_d
        assert r.images.shape == (2, 3, 32, 32) and r.modified_prompt == r.prompt
    direct = sample_unit(tiny_sd, PROMPTS[:2], [0, 1], SAMPLING, decode=True,
                         conditioning=Conditioning(torch.stack([r.embedding for r in res])))
    for r, s in zip(res, direct):
        torch.testing.assert_close(r.images, s.images)


def test_augmentation_samples_the_modified_prompt(tiny_sd):
    res = mitigate_unit(tiny_sd, PROMPTS[:2], [0, 1], MitigationConfig(method="rand-numb-add", repeat_num=2), SAMPLING)
    for r in res:
        assert len(r.modified_prompt.split(" ")) == len(r.prompt.split(" ")) + 2
    direct = sample_unit(tiny_sd, [r.modified_prompt for r in res], [0, 1], SAMPLING, decode=True)
    for r, s in zip(res, direct):
        torch.testing.assert_close(r.images, s.images)


def test_default_target_loss_is_the_normal_median_or_half_the_threshold():
    assert default_target_loss([0.3, 0.1, 0.2, 0.9], threshold=0.5) == pytest.approx(0.25)
    assert default_target_loss([], threshold=0.5, unit="mean") == 0.25
    assert default_target_loss([], threshold=0.5, unit="batch", num_generations=4) == 0.5  # sqrt(4) x a mean d


# -- the seed's units and options, against an independent replica of its loop --------------------

def seed_aug_prompt(model, prompt, x_t, t, target_loss, lr=0.05, optim_iters=10, optim_epsilon=None, alpha=0.5):
    """The seed's aug_prompt at one target step, written from its description: AdamW (weight decay
    0.01) on the prompt's embedding; each iteration the batch [empty x G, prompt x G] through the
    UNet, loss = ||eps_c - eps_u||_2 over the whole batch, stop when loss <= target before stepping;
    the start token's gradient zeroed; past optim_epsilon (mean L2 distance of positions 1.. from
    the start) the loss becomes alpha * loss + (1 - alpha) * that distance. Returns (embedding,
    iterations, last loss)."""
    G = len(x_t)
    uncond = model.empty_conditioning().embeddings
    single = model.encode_prompts([prompt]).embeddings.clone().detach().requires_grad_(True)
    init = single.detach().clone()
    opt = torch.optim.AdamW([single], lr=lr)
    x_in = model.scheduler.scale_model_input(torch.cat([x_t, x_t]), t)
    with torch.no_grad():
        eps_u = model.unet(x_in[:G], t, encoder_hidden_states=uncond.repeat(G, 1, 1)).sample
    loss_item, steps = None, 0
    for j in range(optim_iters):
        l_2 = (init[:, 1:] - single.detach()[:, 1:]).norm(dim=-1).mean()
        eps_c = model.unet(x_in[G:], t, encoder_hidden_states=single.repeat(G, 1, 1)).sample
        loss = torch.norm(eps_c - eps_u, p=2)
        loss_item = loss.item()
        if optim_epsilon is not None and l_2 > optim_epsilon:
            loss = alpha * loss + (1 - alpha) * (init[:, 1:] - single[:, 1:]).norm(dim=-1).mean()
        if loss_item <= target_loss:
            break
        (single.grad,) = torch.autograd.grad(loss, [single])
        single.grad[:, [0]] = 0
        opt.step()
        opt.zero_grad()
        steps += 1
    return single.detach(), steps, loss_item


def test_target_loss_is_the_seeds_loss_over_all_generations(tiny_sd):
    """G = 4: for three targets that take 1 to 9 iterations, the seed's loop and ours take the same
    number of iterations and stop at the same loss. What remains different in the embedding: the
    seed's AdamW decays the start token (x (1 - lr * 0.01) per step), diffmem keeps it."""
    cond, x, t = first_step(tiny_sd, PROMPTS[:1], G=4)
    _, _, start = seed_aug_prompt(tiny_sd, PROMPTS[0], x[0], t, target_loss=-1.0, optim_iters=1)
    losses = [seed_aug_prompt(tiny_sd, PROMPTS[0], x[0], t, target_loss=-1.0, optim_iters=k + 1)[2] for k in range(10)]
    assert losses[0] == pytest.approx(start) and losses[9] < losses[0]
    for k in (1, 4, 9):  # a target between the loss after k - 1 and after k steps: k iterations
        target = 0.5 * (losses[k - 1] + losses[k])
        emb, steps, last = seed_aug_prompt(tiny_sd, PROMPTS[0], x[0], t, target_loss=target)
        ours = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=target, lr=0.05, max_iters=10)
        assert steps == k and int(ours.iterations[0]) == k
        assert float(ours.final_loss[0]) == pytest.approx(last, rel=1e-4)
        torch.testing.assert_close(emb[0, 0], cond.embeddings[0, 0] * (1 - 0.05 * 0.01) ** k)
        torch.testing.assert_close(ours.embeddings[0, 0], cond.embeddings[0, 0])
        torch.testing.assert_close(ours.embeddings[0, 1:], emb[0, 1:], atol=1e-4, rtol=1e-3)
    # the mean-d unit is another number for the same prompt: the seed's is at least sqrt(G) x it
    mean = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=1e6, target_unit="mean")
    assert float(mean.initial_loss[0]) == pytest.approx(float(mean.initial_d[0]))
    assert start >= 2.0 * float(mean.initial_loss[0]) * (1 - 1e-6)


def test_l2_constrained_variant_matches_the_seed(tiny_sd):
    cond, x, t = first_step(tiny_sd, PROMPTS[:1], G=2)
    emb, steps, _ = seed_aug_prompt(tiny_sd, PROMPTS[0], x[0], t, target_loss=-1.0, lr=0.05, optim_iters=6,
                                    optim_epsilon=0.05, alpha=0.25)
    ours = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=-1.0, lr=0.05, max_iters=6, epsilon=0.05,
                                     alpha=0.25)
    plain = optimize_prompt_embedding(tiny_sd, cond, x, t, target_loss=-1.0, lr=0.05, max_iters=6)
    torch.testing.assert_close(ours.embeddings[0, 1:], emb[0, 1:], atol=1e-4, rtol=1e-3)
    assert (ours.embeddings[0, 1:] - plain.embeddings[0, 1:]).abs().max() > 1e-3  # the constraint acted
    dist = lambda e: (e[0, 1:] - cond.embeddings[0, 1:]).norm(dim=-1).mean()
    assert dist(ours.embeddings) < dist(plain.embeddings)


def test_optimization_at_a_later_step(tiny_sd):
    """--optim-step k optimizes at the latents the original prompt reaches at step k, then samples
    from x_T with the result."""
    from diffmem.sampling import schedule, tracked_pass

    config = MitigationConfig(method="embedding-opt", target_loss=-1.0, max_iters=2, optim_step=1)
    res = mitigate_unit(tiny_sd, PROMPTS[:1], [0], config, SAMPLING)
    cond = tiny_sd.encode_prompts(PROMPTS[:1])
    ts = schedule(tiny_sd, SAMPLING.num_inference_steps)
    x_T = initial_noise(tiny_sd, 2, SAMPLING.seed)
    x_1 = tracked_pass(tiny_sd, x_T, cond.expand(2), tiny_sd.empty_conditioning().expand(2), ts[:1],
                       SAMPLING.guidance(tiny_sd))
    direct = optimize_prompt_embedding(tiny_sd, cond, x_1[None], ts[1], target_loss=-1.0, max_iters=2)
    torch.testing.assert_close(res[0].embedding, direct.embeddings[0])
    assert res[0].final_loss == pytest.approx(float(direct.final_loss[0]), rel=1e-5)
    plain = sample_unit(tiny_sd, PROMPTS[:1], [0], SAMPLING, decode=True, conditioning=Conditioning(direct.embeddings))
    torch.testing.assert_close(res[0].images, plain[0].images)
    with pytest.raises(ValueError, match="--optim-step 3"):
        mitigate_unit(tiny_sd, PROMPTS[:1], [0], MitigationConfig(target_loss=1.0, optim_step=3), SAMPLING)


# -- prompt augmentation --------------------------------------------------------------------------

def inserted(original: str, augmented: str) -> list[str]:
    """The inserted words, after checking that the original words survive in order."""
    new, it = augmented.split(" "), iter(augmented.split(" "))
    assert all(w in it for w in original.split(" ")), (original, augmented)
    return list((Counter(new) - Counter(original.split(" "))).elements())


@pytest.fixture(scope="module")
def lab_tokenizer_model():
    from transformers import AutoTokenizer

    from diffmem.adapters.lab import text_encoder_path

    return SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(text_encoder_path()))


@pytest.mark.parametrize("style", AUGMENT_STYLES)
@pytest.mark.parametrize("repeat_num", [0, 1, 4, 8])
def test_augmentations_insert_exactly_repeat_num_items(style, repeat_num, tiny_sd, lab_tokenizer_model):
    for model in (tiny_sd, lab_tokenizer_model):
        for seed in range(5):
            prompt = "the cobalt wages: a green circle"
            out = augment_prompt(prompt, style, repeat_num, model, random.Random(seed))
            items = inserted(prompt, out)
            assert len(out.split(" ")) == len(prompt.split(" ")) + repeat_num
            assert len(items) == repeat_num
            assert all(i.strip() == i and i for i in items)
            if style == "rand-numb-add":
                assert all(i.isdigit() and int(i) < 100000 for i in items)
            if style == "rand-word-repeat":
                assert set(items) <= set(prompt.split(" "))


def test_rand_word_add_draws_vocabulary_tokens(lab_tokenizer_model):
    tok = lab_tokenizer_model.tokenizer
    prompt = "the cobalt wages: a green circle"
    for seed in range(10):
        for item in inserted(prompt, augment_prompt(prompt, "rand-word-add", 3, lab_tokenizer_model, random.Random(seed))):
            assert item in tok.get_vocab() and item not in tok.all_special_tokens


def test_random_words_never_show_a_blocked_word(lab_tokenizer_model):
    """The lab's vocabulary holds blocklisted words (about 2% of its ids): unfiltered, 2,000 draws
    would show dozens; the baseline redraws them, so none appears."""
    from diffmem.lab.data import blocked_words

    import re

    tok, blocked = lab_tokenizer_model.tokenizer, blocked_words()
    letters = lambda words: {run for w in words for run in re.findall(r"[a-z]+", w.lower())}  # "##cum" too
    rng = random.Random(0)
    unfiltered = [tok.decode([rng.randrange(len(tok))]).strip() for _ in range(2000)]
    assert len(letters(unfiltered) & blocked) > 10
    rng = random.Random(0)
    drawn = [random_vocabulary_word(tok, rng) for _ in range(2000)]
    assert not letters(drawn) & blocked


def test_augmentation_is_seeded_and_checked(tiny_sd):
    a = augment_prompt("a b c", "rand-word-add", 4, tiny_sd, random.Random(3))
    assert a == augment_prompt("a b c", "rand-word-add", 4, tiny_sd, random.Random(3))
    with pytest.raises(ValueError, match="expected one of"):
        augment_prompt("a b c", "rand_word_swap", 1, tiny_sd, random.Random(0))


def test_the_original_spellings_of_the_augmentations_are_accepted(tiny_sd_folder, tmp_path):
    """rand_word_add (the original code's and diffmem's former spelling) names rand-word-add everywhere."""
    from diffmem.bench import BenchMitigateConfig
    from diffmem.cli.main import main
    from diffmem.evaluate import EvaluateConfig
    from diffmem.mitigate import MitigationConfig
    from diffmem.mitigations import get_mitigation
    from diffmem.train import TrainConfig

    assert MitigationConfig(method="rand_numb_add").method == "rand-numb-add"
    assert get_mitigation("rand_word_repeat").name == "rand-word-repeat"
    assert EvaluateConfig(methods=("none", "rand_word_add")).methods == ("none", "rand-word-add")
    assert BenchMitigateConfig(methods=("rand_word_add",)).methods == ("rand-word-add",)
    assert TrainConfig(str(tmp_path / "t"), prompt_aug_style="rand_word_replace").prompt_aug_style == "rand-word-replace"
    (tmp_path / "p.txt").write_text("a red cat\n")
    assert main(["mitigate", "--model", str(tiny_sd_folder), "--prompts", str(tmp_path / "p.txt"), "--method",
                 "rand_word_add", "--repeat-num", "1", "--num-inference-steps", "2", "--num-generations", "1",
                 "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["mitigation"]["method"] == "rand-word-add"
