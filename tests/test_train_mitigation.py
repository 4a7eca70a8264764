"""Training-time mitigation (Wen et al. 5.2): the hard-threshold filter and the caption-augmentation
baseline, run through the real trainer on a tiny Stable Diffusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.metrics import text_noise_norm
from diffmem.train import ImagePairs, TrainConfig, train

CAPTIONS = ["a cat on a mat", "a dog in the fog", "the red barn at dawn", "two ships at sea"]


def tiny_model(folder):
    from diffmem.adapters import load_model

    return load_model(str(folder))


def dataset():
    g = torch.Generator().manual_seed(1)
    return ImagePairs(torch.rand(4, 3, 32, 32, generator=g), CAPTIONS)


def run_one_step(folder, out, hard_threshold, steps=1, **kw):
    """Train `steps` steps on a batch of all 4 pairs; return (log rows, d per sample of every UNet call pair)."""
    torch.manual_seed(0)  # the VAE's latent sampling draws from the global generator
    model = tiny_model(folder)
    calls = []
    hook = model.unet.register_forward_hook(lambda mod, args, kwargs, output: calls.append(
        (kwargs["encoder_hidden_states"].detach().clone(), output[0].detach().float().clone(), args[1].clone())),
        with_kwargs=True)
    config = TrainConfig(output_dir=str(out), max_train_steps=steps, train_batch_size=4, learning_rate=1e-3,
                         hard_threshold=hard_threshold, log_every=1, num_threads=1, **kw)
    train(model, dataset(), config, save_model=lambda unet, folder: None, progress=False)
    hook.remove()
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    return model, rows, calls


def test_filter_leaves_out_exactly_the_samples_at_or_above_the_threshold(tiny_sd_folder, tmp_path):
    # 1. The per-sample d of step 0, from an unfiltered run's conditional and unconditional UNet calls.
    _, rows, calls = run_one_step(tiny_sd_folder, tmp_path / "probe", hard_threshold=float("inf"))
    (_, eps_c, _), (emb_u, eps_u, _) = calls[0], calls[1]
    assert torch.equal(emb_u, emb_u[:1].expand_as(emb_u))  # the unconditional call uses one (empty) prompt
    d = np.sort(text_noise_norm(eps_c, eps_u).numpy())
    assert rows[0]["left_out"] == 0.0 and len(set(d.tolist())) == 4
    # 2. Thresholds between and at the values: exactly the samples with d >= threshold are left out.
    for k, threshold in [(1, (d[2] + d[3]) / 2), (2, (d[1] + d[2]) / 2), (3, float(d[1])), (4, float(d[0]) / 2)]:
        _, rows, calls = run_one_step(tiny_sd_folder, tmp_path / f"t{k}", hard_threshold=float(threshold))
        d_run = text_noise_norm(calls[0][1], calls[1][1]).numpy()
        np.testing.assert_array_equal(np.sort(d_run), d)  # same batch, noise and timesteps as the probe
        assert rows[0]["left_out"] == pytest.approx(k / 4)
        assert rows[0]["skipped"] == (k == 4)


def test_hard_threshold_per_band_of_timesteps():
    from diffmem.train import hard_threshold_at, parse_hard_threshold

    t = torch.tensor([0, 99, 100, 499, 500, 999])
    assert hard_threshold_at(2.0, t, 1000).tolist() == [2.0] * 6
    assert hard_threshold_at((1.0, 2.0), t, 1000).tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    tens = hard_threshold_at(tuple(float(k) for k in range(10)), t, 1000).tolist()
    assert tens == [0.0, 0.0, 1.0, 4.0, 5.0, 9.0]
    assert parse_hard_threshold("2") == 2.0 and parse_hard_threshold("0.5,3") == (0.5, 3.0)
    with pytest.raises(ValueError, match="--hard-threshold 'a,b'"):
        parse_hard_threshold("a,b")


def test_calibrated_thresholds_are_each_bands_percentile_of_ordinary_d():
    from diffmem.training_stats import calibrate_hard_threshold

    # band 0 (t < 500): d = 0..99; band 1: d = 100..199 (100 samples each)
    stats = {"t": np.r_[np.full(100, 10), np.full(100, 700)], "d": np.arange(200, dtype=np.float64)}
    assert calibrate_hard_threshold(stats, 2, 50.0, 1000) == pytest.approx((49.5, 149.5))
    assert calibrate_hard_threshold(stats, 2, (99.0, 0.0), 1000) == pytest.approx((98.01, 100.0))
    with pytest.raises(ValueError, match="one per band"):
        calibrate_hard_threshold(stats, 2, (50.0, 50.0, 50.0), 1000)
    with pytest.raises(ValueError, match="band 1 of 2"):
        calibrate_hard_threshold({"t": stats["t"][:105], "d": stats["d"][:105]}, 2, 50.0, 1000)


def test_per_band_filter_leaves_out_the_samples_above_their_bands_threshold(tiny_sd_folder, tmp_path):
    # probe: d and t of each sample at step 0
    _, _, calls = run_one_step(tiny_sd_folder, tmp_path / "probe", hard_threshold=float("inf"))
    d = text_noise_norm(calls[0][1], calls[1][1]).numpy()
    t = calls[0][2].numpy()
    assert len(set(t.tolist())) == 4  # distinct timesteps: one band each with 1000 bands
    # 1000 bands (one per timestep): the band of sample 0 just under its d, of sample 1 just over it,
    # every other band at 0 but for the bands of samples 2 and 3 (infinite)
    bands = [0.0] * 1000
    bands[t[0]], bands[t[1]], bands[t[2]], bands[t[3]] = d[0] * 0.99, d[1] * 1.01, float("inf"), float("inf")
    _, rows, _ = run_one_step(tiny_sd_folder, tmp_path / "bands", hard_threshold=tuple(float(b) for b in bands))
    assert rows[0]["left_out"] == pytest.approx(0.25)  # exactly sample 0


def test_a_batch_with_everything_left_out_is_skipped_cleanly(tiny_sd_folder, tmp_path):
    before = {k: v.clone() for k, v in tiny_model(tiny_sd_folder).unet.state_dict().items()}
    model, rows, _ = run_one_step(tiny_sd_folder, tmp_path / "all", hard_threshold=0.0, steps=3)
    assert [r["skipped"] for r in rows] == [True, True, True]
    assert all(r["left_out"] == 1.0 and r["loss"] is None for r in rows)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step, no weight decay


def test_filter_that_keeps_everything_trains_as_without_it(tiny_sd_folder, tmp_path):
    a, rows_a, _ = run_one_step(tiny_sd_folder, tmp_path / "a", hard_threshold=None, steps=2)
    b, rows_b, _ = run_one_step(tiny_sd_folder, tmp_path / "b", hard_threshold=1e9, steps=2)
    assert [r["loss"] for r in rows_a] == pytest.approx([r["loss"] for r in rows_b])
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.allclose(sa[k], sb[k]) for k in sa)


def test_caption_augmentation_adds_one_random_word_per_caption(tiny_sd_folder, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tiny_sd_folder)
    seen: list[str] = []
    encode = model.encode_prompts
    model.encode_prompts = lambda prompts: (seen.extend(prompts), encode(prompts))[1]
    config = TrainConfig(output_dir=str(tmp_path), max_train_steps=2, train_batch_size=4, log_every=1,
                         prompt_aug_style="rand-word-add", repeat_num=1, num_threads=1)
    train(model, dataset(), config, save_model=lambda unet, folder: None, progress=False)
    trained = [c for c in seen if c]  # the empty prompt is encoded once for caption dropout
    assert trained and all(c not in CAPTIONS for c in trained)
    for c in trained:
        words = c.split(" ")
        originals = [o for o in CAPTIONS if len(o.split(" ")) == len(words) - 1
                     and all(w in iter(words) for w in o.split(" "))]
        assert originals, c


def test_train_cli_with_hard_threshold_logs_left_out(tiny_sd_folder, tmp_path):
    from PIL import Image

    from diffmem.cli.main import main

    data = tmp_path / "pairs"
    data.mkdir()
    for i, c in enumerate(CAPTIONS):
        Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)).save(data / f"{i:08d}.png")
        (data / f"{i:08d}.txt").write_text(c)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_sd_folder), "--dataset", str(data), "--output-dir", str(out),
               "--max-train-steps", "2", "--train-batch-size", "4", "--hard-threshold", "0", "--threads", "1"])
    assert rc == 0
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows and all(r["skipped"] and r["left_out"] == 1.0 for r in rows)
    assert (out / "unet" / "config.json").is_file()


# -- Somepalli et al.'s training strategies ---------------------------------------------------------

def captions_trained(folder, tmp_path, steps=3, data=None, **options) -> list[str]:
    """The captions the trainer encoded over `steps` steps (batch: all 4 pairs)."""
    torch.manual_seed(0)
    model = tiny_model(folder)
    seen: list[str] = []
    encode = model.encode_prompts
    model.encode_prompts = lambda prompts: (seen.extend(prompts), encode(prompts))[1]
    config = TrainConfig(output_dir=str(tmp_path / f"o{len(list(tmp_path.iterdir()))}"), max_train_steps=steps,
                         train_batch_size=4, log_every=1, num_threads=1, **options)
    train(model, data or dataset(), config, save_model=lambda unet, folder: None, progress=False)
    return [c for c in seen if c]


def test_caption_replacement_with_random_tokens(tiny_sd_folder, tmp_path):
    trained = captions_trained(tiny_sd_folder, tmp_path, prompt_aug_style="rand-word-replace", repeat_num=4)
    assert trained and all(c not in CAPTIONS for c in trained)
    assert all(len(c.split(" ")) == 4 for c in trained)  # 4 single-word tokens, nothing of the caption kept


def test_augmentation_probability_changes_that_share_of_samples(tiny_sd_folder, tmp_path):
    """p = 0.1 (Somepalli et al.) leaves most captions as they are; p = 0 none; p = 1 all."""
    none = captions_trained(tiny_sd_folder, tmp_path, steps=5, prompt_aug_style="rand-word-add", repeat_num=2,
                            prompt_aug_prob=0.0)
    assert set(none) <= set(CAPTIONS)
    some = captions_trained(tiny_sd_folder, tmp_path, steps=25, prompt_aug_style="rand-word-add", repeat_num=2,
                            prompt_aug_prob=0.1)
    new = [c for c in set(some) if c not in CAPTIONS]
    assert new and all(len(c.split(" ")) == len(o.split(" ")) + 2 for c in new
                       for o in CAPTIONS if set(o.split(" ")) <= set(c.split(" ")))
    # each of the 100 uses is augmented with probability 0.1: far from all of them
    assert 0 < sum(c not in CAPTIONS for c in some) < 30


def test_one_of_several_captions_is_drawn_per_use(tiny_sd_folder, tmp_path):
    g = torch.Generator().manual_seed(1)
    multi = [f"{c}\n{c} again" for c in CAPTIONS]
    data = ImagePairs(torch.rand(4, 3, 32, 32, generator=g), multi)
    trained = captions_trained(tiny_sd_folder, tmp_path, steps=6, data=data, caption_per_line=True)
    options = {line for c in multi for line in c.split("\n")}
    assert set(trained) <= options and len(set(trained)) > len(CAPTIONS)  # both lines of some image were drawn
    joined = captions_trained(tiny_sd_folder, tmp_path, steps=1, data=data)
    assert set(joined) == set(multi)  # without the option the whole text is the caption


def test_embedding_noise_is_added_to_the_caption_embeddings(tiny_sd_folder, tmp_path):
    """The UNet sees the caption embeddings plus std * N(0, 1): the difference from the plain run's
    embeddings has that std (caption dropout off)."""
    _, _, plain = run_one_step(tiny_sd_folder, tmp_path / "a", None)
    _, _, noisy = run_one_step(tiny_sd_folder, tmp_path / "b", None, embedding_noise=0.5)
    diff = noisy[0][0] - plain[0][0]
    assert diff.std().item() == pytest.approx(0.5, rel=0.05)
    assert diff.mean().abs().item() < 0.02


def test_bad_training_strategy_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--prompt-aug-prob"):
        TrainConfig(output_dir=str(tmp_path), prompt_aug_prob=1.5)
    with pytest.raises(ValueError, match="--embedding-noise"):
        TrainConfig(output_dir=str(tmp_path), embedding_noise=-1)
    with pytest.raises(ValueError, match="--prompt-aug-style"):
        TrainConfig(output_dir=str(tmp_path), prompt_aug_style="shuffle")


def test_pair_keys_name_the_pair_beneath_the_repeats():
    from diffmem.train import memorization_mix, pair_keys

    mem, non = dataset(), ImagePairs(torch.rand(5, 3, 32, 32), [f"caption {i}" for i in range(5)])
    mix = memorization_mix(mem, non, end=2, repeats=3, non_mem_ratio=1.0)  # pairs 0, 1 x3, then 6 non-memorized
    keys = pair_keys(mix)
    assert len(keys) == len(mix) == 12
    assert keys[:6].tolist() == [0, 1] * 3
    assert keys[6:].tolist() == [4, 5, 6, 7, 8, 4]  # the non-memorized source after the 4 memorized pairs, cycled
    for i in range(len(mix)):  # same key <=> same caption here
        assert (mix[i][1] == mix[0][1]) == (keys[i] == keys[0])


def test_pair_filter_leaves_a_pair_out_for_good_once_it_exceeded_in_its_share_of_draws():
    from diffmem.train import PairFilter

    f = PairFilter(3, share=0.5, min_draws=2)
    f.update(torch.tensor([0, 1, 2]), torch.tensor([True, True, False]))
    assert f.is_left_out(torch.tensor([0, 1, 2])).tolist() == [False, False, False]  # one draw < min_draws
    f.update(torch.tensor([0, 1, 2]), torch.tensor([False, False, False]))  # 1 of 2 exceeded: share 0.5 reached
    assert f.left_out.tolist() == [True, True, False]
    f.update(torch.tensor([0, 0, 2]), torch.tensor([False, False, False]))  # sticky: later draws below change nothing
    assert f.left_out.tolist() == [True, True, False] and f.draws.tolist() == [4, 2, 3]
    g = PairFilter(3, share=0.5, min_draws=2)
    g.load_state_dict(f.state_dict())  # travels in checkpoints
    assert torch.equal(g.draws, f.draws) and torch.equal(g.exceeded, f.exceeded) and torch.equal(g.left_out, f.left_out)


def test_pair_level_rule_keeps_a_pair_out_after_its_d_falls_below_the_threshold(tiny_sd_folder, tmp_path):
    # step 0 of a probe: d per sample; a threshold between the 2nd and 3rd leaves two samples out
    _, _, calls = run_one_step(tiny_sd_folder, tmp_path / "probe", hard_threshold=float("inf"), steps=2)
    d0 = text_noise_norm(calls[0][1], calls[1][1])
    threshold = float(d0.sort().values[1:3].mean())
    steps, share = 6, 0.5
    _, rows, calls = run_one_step(tiny_sd_folder, tmp_path / "pairs", hard_threshold=threshold, steps=steps,
                                  pair_filter_share=share, pair_filter_min_draws=1)
    # the rule replayed from the run's own UNet calls: 4 pairs, batch 4, so one epoch (one permutation) per step
    draws, exceeded, out = np.zeros(4), np.zeros(4), set()
    kept_out_below = 0
    for step in range(steps):
        pair_at = torch.randperm(4, generator=torch.Generator().manual_seed(step)).tolist()  # sample j is pair_at[j]
        over = (text_noise_norm(calls[2 * step][1], calls[2 * step + 1][1]) >= threshold).tolist()
        kept_out_below += sum(pair_at[j] in out and not over[j] for j in range(4))
        for j in range(4):
            draws[pair_at[j]] += 1
            exceeded[pair_at[j]] += over[j]
        out |= {p for p in range(4) if exceeded[p] >= share * draws[p]}
        assert rows[step]["pairs_left_out"] == len(out)
        assert rows[step]["left_out"] == len(out | {pair_at[j] for j in range(4) if over[j]}) / 4
    assert rows[0]["left_out"] == 0.5 and 2 <= len(out) < 4
    assert kept_out_below  # a pair left out earlier stayed out at a draw whose d was under the threshold


def test_pair_level_rule_needs_a_threshold(tmp_path):
    with pytest.raises(ValueError, match="--pair-filter-share needs --hard-threshold"):
        TrainConfig(output_dir=str(tmp_path), pair_filter_share=0.5)
    with pytest.raises(ValueError, match="--pair-filter-share 2.0"):
        TrainConfig(output_dir=str(tmp_path), hard_threshold=1.0, pair_filter_share=2.0)
    from diffmem.cli.main import build_parser
    from diffmem.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--output-dir", str(tmp_path), "--hard-threshold", "2.4",
                                      "--pair-filter-share", "0.3", "--pair-filter-min-draws", "20"])
    config = config_from_args(args)
    assert (config.hard_threshold, config.pair_filter_share, config.pair_filter_min_draws) == (2.4, 0.3, 20)


# -- IET-AGC's anti-gradient control ---------------------------------------------------------------

def _official_agc(batches, ratio, decay, T=1000):
    """A replica of the official loop (clients_acce_es.py): mask from the means before the batch, then
    one EMA update per sample in batch order."""
    avg = [0.0] * T
    masks = []
    for losses, ts in batches:
        masks.append([loss * ratio >= avg[t] for loss, t in zip(losses, ts)])
        for loss, t in zip(losses, ts):
            avg[t] = decay * avg[t] + (1.0 - decay) * loss
    return masks, avg


def test_agc_keeps_and_updates_as_the_official_loop():
    from diffmem.train import LossEMAFilter

    rng = np.random.default_rng(0)
    batches = [(rng.random(6).tolist(), rng.integers(0, 5, 6).tolist()) for _ in range(12)]  # timesteps repeat
    expected, avg = _official_agc(batches, 1.25, 0.8)
    agc = LossEMAFilter(1000, 1.25, 0.8)
    got = [agc.keep_and_update(torch.tensor(losses), torch.tensor(ts)).tolist() for losses, ts in batches]
    assert got == expected and not all(all(m) for m in got)  # some samples were left out
    np.testing.assert_allclose(agc.mean.numpy(), avg)
    state = agc.state_dict()
    again = LossEMAFilter(1000, 1.25, 0.8)
    again.load_state_dict(state)
    assert torch.equal(again.mean, agc.mean)


def test_agc_in_the_trainer_leaves_out_low_loss_samples(tiny_sd_folder, tmp_path, monkeypatch):
    """From running means of +inf every sample is under them (all left out, no update); from 0 training
    is as without the rule."""
    import diffmem.train as train_mod

    class StartAt(train_mod.LossEMAFilter):
        start = 0.0

        def __init__(self, *args):
            super().__init__(*args)
            self.mean[:] = self.start

    monkeypatch.setattr(train_mod, "LossEMAFilter", StartAt)
    StartAt.start = float("inf")
    before = {k: v.clone() for k, v in tiny_model(tiny_sd_folder).unet.state_dict().items()}
    model, rows, _ = run_one_step(tiny_sd_folder, tmp_path / "inf", hard_threshold=None, steps=2, agc_ratio=1.25)
    assert all(r["skipped"] and r["left_out"] == 1.0 for r in rows)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    StartAt.start = 0.0
    a, rows_a, _ = run_one_step(tiny_sd_folder, tmp_path / "zero", hard_threshold=None, steps=1, agc_ratio=1.25)
    b, rows_b, _ = run_one_step(tiny_sd_folder, tmp_path / "none", hard_threshold=None, steps=1)
    assert rows_a[0]["left_out"] == 0.0 and rows_a[0]["loss"] == pytest.approx(rows_b[0]["loss"])
    with pytest.raises(ValueError, match="--agc-ratio 0: must be > 0"):
        TrainConfig(output_dir="x", agc_ratio=0)


def test_ensemble_shards_deal_whole_pairs_evenly():
    from diffmem.train import ensemble_shards, memorization_mix, pair_keys

    data = memorization_mix(dataset(), ImagePairs(torch.rand(9, 3, 8, 8), [f"c{i}" for i in range(9)]),
                            end=3, repeats=5, non_mem_ratio=0.5)
    keys = pair_keys(data)
    shards = ensemble_shards(keys, 4, seed=0)
    positions = torch.cat(shards).sort().values
    assert torch.equal(positions, torch.arange(len(data)))  # a partition of the items
    pairs = [set(keys[s.numpy()].tolist()) for s in shards]
    assert sum(len(p) for p in pairs) == len(set(keys.tolist()))  # no pair in two shards
    assert max(map(len, pairs)) - min(map(len, pairs)) <= 1
    assert [s.tolist() for s in ensemble_shards(keys, 4, seed=1)] != [s.tolist() for s in shards]
    with pytest.raises(ValueError, match="--ensemble-shards 20: the data holds only 11 distinct pairs"):
        ensemble_shards(keys, 20, seed=0)


def _weights(model):
    return [p.detach().clone() for p in model.unet.parameters()]


def _train_tiny(folder, out, data, **kw):
    torch.manual_seed(0)
    model = tiny_model(folder)
    config = TrainConfig(output_dir=str(out), train_batch_size=2, learning_rate=1e-3, log_every=1, num_threads=1,
                         agc_ratio=1.25, **kw)
    train(model, data, config, save_model=lambda unet, folder: None, progress=False)
    return model


@pytest.mark.parametrize("use_ema", [False, True])
def test_one_round_of_the_ensemble_is_the_average_of_plain_runs_on_each_shard(tiny_sd_folder, tmp_path, use_ema):
    """IET with one round: copy k is a plain run with seed k on shard k (its own optimizer, AGC means and
    EMA); the result is the mean of the copies' weights (with EMA, of their averages)."""
    from diffmem.train import ensemble_shards, pair_keys

    shards = ensemble_shards(pair_keys(dataset()), 2, seed=0)
    copies = [_weights(_train_tiny(tiny_sd_folder, tmp_path / f"plain{k}", torch.utils.data.Subset(dataset(), s.tolist()),
                                   seed=k, max_train_steps=2, use_ema=use_ema, ema_decay=0.5))
              for k, s in enumerate(shards)]
    ens = _train_tiny(tiny_sd_folder, tmp_path / "ens", dataset(), seed=0, max_train_steps=4,
                      ensemble_shards=2, ensemble_rounds=1, use_ema=use_ema, ema_decay=0.5)
    base = _weights(tiny_model(tiny_sd_folder))
    assert any(not torch.equal(a, b) for a, b in zip(copies[0], base))  # the copies did learn
    for got, a, b in zip(_weights(ens), *copies):
        torch.testing.assert_close(got, (a + b) / 2, rtol=0, atol=1e-7)
    rows = [json.loads(line) for line in (tmp_path / "ens" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["round"], r["copy"]) for r in rows] == [(1, 1, 0), (2, 1, 0), (3, 1, 1), (4, 1, 1)]


def test_each_round_starts_from_the_last_average(tiny_sd_folder, tmp_path, monkeypatch):
    import diffmem.train as train_mod

    averages, starts = [], []
    real_average, real_load = train_mod.average_weights, train_mod.TrainingRun.load_copy_state

    def average(copies):
        averages.append(real_average(copies))
        return averages[-1]

    def load(run, state):  # the weights a copy starts its turn from
        starts.append([p.detach().clone() for p in run.weights()])
        real_load(run, state)

    monkeypatch.setattr(train_mod, "average_weights", average)
    monkeypatch.setattr(train_mod.TrainingRun, "load_copy_state", load)
    model = _train_tiny(tiny_sd_folder, tmp_path / "ens", dataset(), max_train_steps=8, ensemble_shards=2,
                        ensemble_rounds=2)
    assert len(averages) == 2 and len(starts) == 4
    for k in (2, 3):  # round 2's copies start from round 1's average
        assert all(torch.equal(a, b) for a, b in zip(starts[k], averages[0]))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), averages[1]))
    assert not all(torch.equal(a, b) for a, b in zip(averages[0], averages[1]))


def test_bad_ensemble_settings_are_refused():
    with pytest.raises(ValueError, match="--max-train-steps 10: an ensemble of 4 shards x 25 rounds needs a multiple of 100"):
        TrainConfig(output_dir="x", max_train_steps=10, ensemble_shards=4)
    with pytest.raises(ValueError, match="need at least 2 shards"):
        TrainConfig(output_dir="x", max_train_steps=100, ensemble_shards=1)
    with pytest.raises(ValueError, match="is not checkpointed"):
        TrainConfig(output_dir="x", max_train_steps=100, ensemble_shards=4, checkpointing_steps=50)
