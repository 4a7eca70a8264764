"""Prompt augmentations (Somepalli et al., NeurIPS 2023, "Understanding and mitigating copying in
diffusion models"): ``rand-word-add`` (random vocabulary tokens), ``rand-numb-add`` (random integers
< 100000), ``rand-word-repeat`` (words of the prompt itself), ``repeat_num`` items inserted at random
word positions (4 at inference; 1 as the training-time baseline of ``diffmem train``); the original
code's spellings (``rand_word_add``, ...) are accepted everywhere. The draws of
the prompt at position p use ``random.Random(config.seed + p)``. A drawn token that is a word of
diffmem's blocklist (``diffmem.lab.data.blocked_words``: obscenities, slurs, violence), or a word
piece whose letters are one, is drawn again, so no baseline shows a user such a word."""

from __future__ import annotations

import random
import re

from diffmem.mitigations import Plan, Unit, canonical_name, register

AUGMENT_STYLES = ("rand-word-add", "rand-numb-add", "rand-word-repeat")
# training only: the caption replaced by `repeat_num` random vocabulary tokens (Somepalli et al.'s "randrepl")
TRAIN_AUGMENT_STYLES = (*AUGMENT_STYLES, "rand-word-replace")
CLIP_RANDOM_TOKEN_LIMIT = 49400  # Somepalli et al. draw token ids below this in CLIP's 49,408-token vocabulary
RANDOM_NUMBER_LIMIT = 100000  # rand-numb-add draws integers below this


def random_vocabulary_word(tokenizer, rng: random.Random) -> str:
    """A uniformly drawn non-special token id below min(vocabulary size, 49400), decoded to one word
    that is not on the blocklist (a blocked draw is redrawn)."""
    from diffmem.lab.data import blocked_words

    limit = min(len(tokenizer), CLIP_RANDOM_TOKEN_LIMIT)
    special = set(tokenizer.all_special_ids)
    blocked = blocked_words()
    for _ in range(1000):
        i = rng.randrange(limit)
        word = tokenizer.decode([i]).strip()
        if i not in special and word and not any(c.isspace() for c in word) and not blocked_in(word, blocked):
            return word
    raise ValueError(f"tokenizer {type(tokenizer).__name__}: no decodable single-word token in 1,000 draws")


def blocked_in(word: str, blocked: frozenset[str]) -> bool:
    """Whether a run of letters of `word` (a whole token, or a piece such as WordPiece's "##xyz") is blocked."""
    return any(run in blocked for run in re.findall(r"[a-z]+", word.lower()))


def insert_word(prompt: str, word: str, rng: random.Random) -> str:
    """Insert `word` at a uniformly drawn position among the prompt's space-separated words."""
    words = prompt.split(" ")
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def augment_prompt(prompt: str, style: str, repeat_num: int, model, rng: random.Random) -> str:
    """Insert `repeat_num` items into `prompt` (Somepalli et al. 2023's caption augmentations).

    rand-word-add: random vocabulary tokens; rand-numb-add: random integers < 100000;
    rand-word-repeat: random words of the prompt itself; rand-word-replace (training only): the
    prompt replaced by `repeat_num` random vocabulary tokens.
    """
    style = canonical_name(style)
    if style not in TRAIN_AUGMENT_STYLES:
        raise ValueError(f"prompt augmentation {style!r}: expected one of {', '.join(TRAIN_AUGMENT_STYLES)}")
    if repeat_num < 0:
        raise ValueError(f"repeat_num {repeat_num}: must be >= 0")
    if style == "rand-word-replace":
        return " ".join(random_vocabulary_word(model.tokenizer, rng) for _ in range(repeat_num))
    words = prompt.split(" ")
    tokenizer = model.tokenizer if style == "rand-word-add" else None
    for _ in range(repeat_num):
        if style == "rand-word-add":
            item = random_vocabulary_word(tokenizer, rng)
        elif style == "rand-numb-add":
            item = str(rng.randrange(RANDOM_NUMBER_LIMIT))
        else:
            item = rng.choice(words)
        prompt = insert_word(prompt, item, rng)
    return prompt


class _Augmentation:
    flow_refusal = None  # it rewrites the prompt: any family
    knob = "repeat_num"  # a MitigationConfig field (config_knob)
    config_knob = True
    off = {"repeat_num": 0}

    def sweep(self, model, sampling) -> list[dict]:
        return [{"repeat_num": n} for n in (1, 2, 4, 8)]  # Wen et al. sweep 1-8 items

    def plan(self, model, unit: Unit, params) -> Plan:
        c = unit.config
        modified = [augment_prompt(p, self.name, c.repeat_num, model, random.Random(c.seed + pos))
                    for p, pos in zip(unit.prompts, unit.positions)]
        return Plan(prompts=modified, cond=model.encode_prompts(modified))


@register
class RandWordAdd(_Augmentation):
    name = "rand-word-add"


@register
class RandNumbAdd(_Augmentation):
    name = "rand-numb-add"


@register
class RandWordRepeat(_Augmentation):
    name = "rand-word-repeat"
