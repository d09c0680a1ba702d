"""The built-in review-writing task: corpus, tokenizer, tiny model config, gold judge, labels.

Everything here runs offline on a CPU in seconds, so that `rlhf pipeline` needs no download:

- `make_corpus` writes short product and movie reviews (10-30 words) from a template grammar.
  Each review is drawn with a sentiment *kind* (positive, negative, mixed, neutral) from a
  controllable mix, so the SFT model learns to write good and bad reviews alike and PPO has room
  to move the gold score.
- `train_tokenizer` trains a small byte-level BPE tokenizer (about 1k tokens) on those texts with
  the `tokenizers` library and wraps it as a `transformers.PreTrainedTokenizerFast`.
- `tiny_llama_config` sizes a Llama-style model of a few hundred thousand parameters.
- `gold_scores` is the gold judge: the VADER compound sentiment score in [-1, 1] (the
  `vaderSentiment` package; nobody in this repository wrote it or can tune it).
- `label_pairs` plays the human annotator: it prefers the text with the higher gold score under
  Bradley-Terry noise, P(a preferred) = sigmoid(beta * (gold_a - gold_b)), and reports the noise
  ceiling, the best accuracy any reward model can reach on such labels.
- `ppo_prompts` gives prompts from a train split or a held-out split of the prompt space.

The prompt space is (prompt template x subject). The held-out split is a fixed fifth of those
combinations; every subject and every template also appears in the train split, so held-out
prompts are new combinations of known words, not unknown words.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cache, lru_cache

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_SENTIMENT_MIX",
    "PPO_SETTINGS",
    "PRETRAINED_PIPELINE_SETTINGS",
    "PRETRAINED_PPO_SETTINGS",
    "PRETRAINED_REWARD_SETTINGS",
    "PRETRAINED_RL_SETTINGS",
    "PRETRAINED_SFT_SETTINGS",
    "REWARD_SETTINGS",
    "SFT_SETTINGS",
    "SENTIMENT_KINDS",
    "all_prompts",
    "gold_scores",
    "label_pairs",
    "make_corpus",
    "ppo_prompts",
    "tiny_llama_config",
    "train_tokenizer",
]

SENTIMENT_KINDS = ("positive", "negative", "mixed", "neutral")
# A balanced mix: the SFT model's samples then centre near a gold score of 0, so PPO can move them.
DEFAULT_SENTIMENT_MIX = {"positive": 0.3, "negative": 0.3, "mixed": 0.25, "neutral": 0.15}
# Bradley-Terry inverse temperature of the simulated annotator. With the gold-score gaps of pairs
# of reviews drawn from the default mix, beta = 5 gives a noise ceiling of about 0.88 (measured in
# tests/trainer/test_task.py): noisy enough to be realistic, clean enough for a 0.75-accurate
# reward model.
DEFAULT_BETA = 5.0
# Two gold scores closer than this are a tie: no annotator preference exists to learn.
TIE_TOLERANCE = 1e-6

MIN_WORDS, MAX_WORDS = 10, 30
HELDOUT_EVERY = 5  # one prompt combination in five is held out

# ----------------------------------------------------------------------------------------------
# Training settings of the built-in task: a tiny Llama trained from scratch on a CPU in about a
# minute (a high learning rate, short sequences, a fixed number of steps). They are this task's
# own; the stage configs' defaults (rlhf/sft.py, reward.py, ppo.py) are for real pretrained
# models. `rlhf pipeline` and `rlhf sft` without a model start from these; a value set in the
# config still wins. With `sft.model` set, the pipeline starts from the stage defaults instead.
# ----------------------------------------------------------------------------------------------
SFT_SETTINGS = {"max_length": 64, "batch_size": 32, "grad_accum_steps": 1, "max_steps": 400,
                "lr": 3e-3, "warmup_steps": 20, "save_every": 100, "lora_rank": 0}
REWARD_SETTINGS = {"max_length": 80, "batch_size": 32, "grad_accum_steps": 1, "epochs": 2.0,
                   "lr": 3e-3, "warmup_steps": 10, "save_every": 0}
PPO_SETTINGS = {"num_iterations": 20, "rollout_batch_size": 64, "minibatch_size": 32,
                "max_prompt_length": 24, "max_new_tokens": 32, "lr": 2e-3, "critic_lr": 2e-3,
                "forward_batch_size": 0, "save_every": 5}

# ----------------------------------------------------------------------------------------------
# The review task on a pretrained model (`rlhf pipeline model=smollm2-135m-instruct`, or
# `sft.model=...`, without datasets): plain prompts ("Review of the blender:", at most 10 tokens
# with SmolLM2's tokenizer; the reviews are at most 36), LoRA SFT on the corpus (merged into the
# SFT model), the reward model a LoRA adapter and a value head on it, then RL with LoRA. Sized
# so that a 135M model runs every stage on a 2-core CPU in about half an hour
# (docs/real_model.md has the runs behind them); raise the counts on a GPU.
# ----------------------------------------------------------------------------------------------
PRETRAINED_SFT_SETTINGS = {"lora_rank": 16, "max_length": 64, "batch_size": 8,
                           "grad_accum_steps": 1, "max_steps": 60, "lr": 5e-4, "warmup_steps": 5,
                           "save_every": 20}
PRETRAINED_REWARD_SETTINGS = {"max_length": 64, "batch_size": 8, "grad_accum_steps": 1,
                              "epochs": 2.0, "lr": 2e-4, "warmup_steps": 3, "save_every": 0}
# Critic-free (GRPO, RLOO, ...): 4 prompts x 8 samples per iteration, two optimizer steps of 16
# rows each (micro-batches of 8); 40 new tokens hold the corpus's longest review.
PRETRAINED_RL_SETTINGS = {"num_iterations": 8, "rollout_batch_size": 32, "group_size": 8,
                          "minibatch_size": 8, "grad_accum_steps": 2, "ppo_epochs": 1,
                          "max_prompt_length": 16, "max_new_tokens": 40, "lr": 2e-4,
                          "warmup_steps": 0, "min_lr_ratio": 1.0, "forward_batch_size": 0,
                          "save_every": 5}
# PPO: one sample for each of 32 prompts, two epochs (four optimizer steps per iteration); the
# critic starts from the reward adapter and head.
PRETRAINED_PPO_SETTINGS = {**{k: v for k, v in PRETRAINED_RL_SETTINGS.items()
                              if k != "group_size"},
                           "ppo_epochs": 2, "critic_lr": 2e-4}
# The pipeline's own settings of the task on a pretrained model: pairs sampled from 256 prompts,
# 200 held-out samples per model (5 for each of the 40 held-out prompts).
PRETRAINED_PIPELINE_SETTINGS = {"pair_prompts": 256, "eval_samples": 200,
                                "sample_batch_size": 64}

# ----------------------------------------------------------------------------------------------
# The grammar. Words were checked against VADER's lexicon: the adjectives and verbs below carry
# strong scores of the intended sign, the boosters are in VADER's booster list, and the neutral
# sentences use words VADER scores 0, so a review's kind really drives its gold score.
# ----------------------------------------------------------------------------------------------

PRODUCTS = (
    "wireless headphones", "coffee maker", "running shoes", "desk lamp", "phone case", "blender",
    "backpack", "laptop stand", "water bottle", "keyboard", "floor vacuum", "electric kettle",
    "wrist watch", "yoga mat", "office chair", "toaster", "tent", "camera", "bike helmet",
    "rice cooker",
)
MOVIES = (
    "The Silent Harbor", "Midnight Garden", "Iron Valley", "The Last Orchard", "Paper Rivers",
    "Glass City", "The Long Winter", "Northern Signal", "A House of Clocks", "Blue Meridian",
    "The Quiet Engine", "Salt and Stone", "Echo Park Nights", "The Ninth Lantern", "Desert Choir",
    "Summer of Wires", "The Copper Fox", "Harbor Lights", "The Hollow Crown Road", "Tin Soldiers",
)
PRODUCT_PROMPTS = (
    "Review of the {s}:", "{S} review:", "My review of the {s}:", "Customer review for the {s}:",
    "What I think of the {s}:",
)
MOVIE_PROMPTS = (
    "Review of {s}:", "{s} review:", "My review of {s}:", "Film review for {s}:",
    "What I think of {s}:",
)
ASPECTS = {
    "product": ("battery", "sound", "screen", "build quality", "price", "design", "setup",
                "size", "weight", "customer service", "packaging", "charger", "handle", "finish"),
    "movie": ("acting", "plot", "ending", "soundtrack", "dialogue", "cast", "pacing", "story",
              "camera work", "script", "lead actor", "opening scene", "music", "editing"),
}
POSITIVE_ADJECTIVES = ("great", "excellent", "wonderful", "amazing", "good", "nice", "fantastic",
                       "perfect", "awesome", "impressive", "beautiful", "brilliant", "superb",
                       "lovely", "delightful")
NEGATIVE_ADJECTIVES = ("terrible", "awful", "bad", "poor", "horrible", "disappointing", "useless",
                       "weak", "annoying", "ugly", "dull", "pathetic", "boring")
NEUTRAL_ADJECTIVES = ("average", "standard", "typical", "plain", "about what I expected",
                      "similar to the last one")
BOOSTERS = ("", "", "", "really ", "very ", "extremely ", "incredibly ", "quite ", "so ",
            "absolutely ")
POSITIVE_VERBS = ("love", "like", "enjoy", "adore")
NEGATIVE_VERBS = ("hate", "dislike", "regret buying")
DURATIONS = ("two weeks", "a month", "three days", "a year", "one weekend", "six months")

POSITIVE_SENTENCES = {
    "common": (
        "The {aspect} is {boost}{pos}.",
        "I {pos_verb} the {aspect}.",
        "The {aspect} is {boost}{pos} and the {aspect2} is {pos} too.",
        "Honestly the {aspect} is {pos}!",
        "This made me happy.",
        "Best purchase of the year!",
    ),
    "product": (
        "It works {boost}well and feels {pos}.",
        "Worth every penny, highly recommended.",
        "I would happily buy it again.",
        "After {duration} it still works perfectly.",
    ),
    "movie": (
        "I enjoyed every minute of it.",
        "The film is {boost}{pos}, highly recommended.",
        "The {aspect} left me smiling.",
        "I would happily watch it again.",
    ),
}
NEGATIVE_SENTENCES = {
    "common": (
        "The {aspect} is {boost}{neg}.",
        "I {neg_verb} the {aspect}.",
        "The {aspect} is {boost}{neg} and the {aspect2} is {neg} too.",
        "The {aspect} is not {pos} at all.",
        "This made me sad and angry.",
        "Worst purchase of the year!",
    ),
    "product": (
        "It broke after {duration}.",
        "A total waste of money, avoid it.",
        "It failed after {duration} and support was useless.",
        "I was disappointed from day one.",
    ),
    "movie": (
        "I was bored the whole time.",
        "The film is {boost}{neg}, skip it.",
        "The {aspect} was a mess.",
        "I was disappointed by the {aspect}.",
    ),
}
NEUTRAL_SENTENCES = {
    "common": (
        "The {aspect} is {neu}.",
        "The {aspect} and the {aspect2} are {neu}.",
        "There is not much to say about the {aspect}.",
    ),
    "product": (
        "I used it for {duration}.",
        "It arrived in a brown box.",
        "It comes in three colors.",
        "The {aspect} is the same as on the older model.",
    ),
    "movie": (
        "I watched it on a Sunday evening.",
        "It runs for about two hours.",
        "It is based on an old book.",
        "The {aspect} follows the usual pattern.",
    ),
}
# Mixed reviews join two opposite clauses; VADER weighs the clause after "but" more heavily, so
# mixed reviews spread over both signs instead of cancelling to 0.
MIXED_SENTENCES = (
    "The {aspect} is {boost}{pos}, but the {aspect2} is {neg}.",
    "The {aspect} is {boost}{neg}, but the {aspect2} is {pos}.",
    "I {pos_verb} the {aspect}, but the {aspect2} is {neg}.",
    "I {neg_verb} the {aspect}, but the {aspect2} is {pos}.",
)


def _domain_prompts(domain: str) -> list[str]:
    templates, subjects = ((PRODUCT_PROMPTS, PRODUCTS) if domain == "product"
                           else (MOVIE_PROMPTS, MOVIES))
    prompts = []
    for subject_index, subject in enumerate(subjects):
        for template_index, template in enumerate(templates):
            prompts.append((subject_index + template_index, template.format(
                s=subject, S=subject[:1].upper() + subject[1:])))
    return prompts


@cache
def _prompt_split() -> dict[str, tuple[tuple[str, str], ...]]:
    """All (domain, prompt) pairs, split into "train" and "heldout" deterministically."""
    split: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for domain in ("product", "movie"):
        for combo_index, prompt in _domain_prompts(domain):
            # A diagonal of the subject x template grid: every subject and every template keeps
            # most of its combinations in train.
            name = "heldout" if combo_index % HELDOUT_EVERY == 0 else "train"
            split[name].append((domain, prompt))
    return {name: tuple(items) for name, items in split.items()}


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def all_prompts(split: str = "train") -> list[str]:
    """Every distinct prompt of a split, in a fixed order ("train": 160, "heldout": 40)."""
    _check_split(split)
    return [prompt for _, prompt in _prompt_split()[split]]


def _fill(template: str, domain: str, rng: random.Random) -> str:
    aspects = ASPECTS[domain]
    aspect, aspect2 = rng.sample(aspects, 2)
    return template.format(
        aspect=aspect, aspect2=aspect2, boost=rng.choice(BOOSTERS),
        pos=rng.choice(POSITIVE_ADJECTIVES), neg=rng.choice(NEGATIVE_ADJECTIVES),
        neu=rng.choice(NEUTRAL_ADJECTIVES), pos_verb=rng.choice(POSITIVE_VERBS),
        neg_verb=rng.choice(NEGATIVE_VERBS), duration=rng.choice(DURATIONS),
    )


def _sentence(pool: dict[str, tuple[str, ...]], domain: str, rng: random.Random) -> str:
    return _fill(rng.choice(pool["common"] + pool[domain]), domain, rng)


def _distinct_sentences(pool: dict[str, tuple[str, ...]], domain: str, rng: random.Random,
                        count: int) -> list[str]:
    # A review never repeats a sentence word for word (a tiny LM would learn to loop otherwise).
    sentences: list[str] = []
    while len(sentences) < count:
        sentence = _sentence(pool, domain, rng)
        if sentence not in sentences:
            sentences.append(sentence)
    return sentences


def _review(kind: str, domain: str, rng: random.Random) -> str:
    """One review body of `kind`; the word count is not enforced here (see make_corpus)."""
    pools = {"positive": POSITIVE_SENTENCES, "negative": NEGATIVE_SENTENCES,
             "neutral": NEUTRAL_SENTENCES}
    if kind in pools:
        sentences = _distinct_sentences(pools[kind], domain, rng, rng.randint(2, 4))
    else:  # mixed: one contrastive sentence plus one plain sentence of each sign, shuffled
        sentences = [_fill(rng.choice(MIXED_SENTENCES), domain, rng),
                     _sentence(POSITIVE_SENTENCES, domain, rng),
                     _sentence(NEGATIVE_SENTENCES, domain, rng)]
        rng.shuffle(sentences)
        sentences = sentences[: rng.randint(2, 3)]
    if rng.random() < 0.5:  # a neutral sentence of context makes texts less formulaic
        context = _sentence(NEUTRAL_SENTENCES, domain, rng)
        if context not in sentences:
            sentences.insert(rng.randint(0, len(sentences)), context)
    return " ".join(sentences)


def _check_mix(mix: dict[str, float]) -> list[float]:
    unknown = sorted(set(mix) - set(SENTIMENT_KINDS))
    if unknown:
        raise ValueError(f"sentiment_mix has unknown kinds {unknown}; valid kinds: "
                         f"{list(SENTIMENT_KINDS)}")
    weights = [float(mix.get(kind, 0.0)) for kind in SENTIMENT_KINDS]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"sentiment_mix weights must be finite, >= 0 and not all 0, got {mix}")
    return weights


def make_corpus(
    n: int,
    seed: int = 0,
    sentiment_mix: dict[str, float] | None = None,
    split: str = "train",
    return_kinds: bool = False,
) -> list[dict[str, str]]:
    """`n` synthetic reviews as SFT examples `{"prompt": str, "completion": str}`.

    prompt: e.g. "Review of the coffee maker:" or "Iron Valley review:", drawn from `split`.
    completion: a review of 10-30 words with a leading space (prompt + completion is the natural
    text), sentiment kind drawn from `sentiment_mix` (weights over SENTIMENT_KINDS, normalised;
    default DEFAULT_SENTIMENT_MIX). With `return_kinds`, each example also has "kind".
    Deterministic for a given seed (Python's `random`, so identical on every platform).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_split(split)
    weights = _check_mix(DEFAULT_SENTIMENT_MIX if sentiment_mix is None else sentiment_mix)
    rng = random.Random(seed)
    prompts = _prompt_split()[split]
    corpus = []
    for _ in range(n):
        domain, prompt = rng.choice(prompts)
        kind = rng.choices(SENTIMENT_KINDS, weights)[0]
        while True:  # rejection sampling keeps every length in range with the same grammar
            text = _review(kind, domain, rng)
            if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                break
        example = {"prompt": prompt, "completion": " " + text}
        if return_kinds:
            example["kind"] = kind
        corpus.append(example)
    return corpus


def ppo_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """`n` prompts from `split` ("train" for PPO rollouts, "heldout" for evaluation).

    Every distinct prompt of the split is used once, in a seeded random order, before any repeats,
    so a held-out evaluation of n <= 40 prompts has no duplicates.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = all_prompts(split)
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        cycle = list(pool)
        rng.shuffle(cycle)
        prompts.extend(cycle[: n - len(prompts)])
    return prompts


# ----------------------------------------------------------------------------------------------
# Tokenizer and model config
# ----------------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 1024,
    model_max_length: int = 128,
):
    """A byte-level BPE tokenizer trained on `texts`, as a `PreTrainedTokenizerFast`.

    Byte-level: any text encodes (no unknown token) and decode(encode(text)) == text.
    Special tokens: "<pad>" (id 0), "<bos>" (id 1), "<eos>" (id 2). Like Llama's tokenizer,
    encoding a text with `add_special_tokens=True` (the default) prepends <bos>; <eos> is never
    added automatically (data.py appends it after completions). Padding side: right.
    Save and load with `save_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("train_tokenizer needs at least one text, got an empty sequence")
    min_size = 256 + 3  # the byte alphabet plus the special tokens
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} for a byte-level BPE, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=model_max_length,
    )


def tiny_llama_config(tokenizer, **overrides):
    """A `transformers.LlamaConfig` of a few hundred thousand parameters for `tokenizer`.

    Defaults: hidden 64, 2 layers, 4 heads (2 KV heads), MLP 192, context 128, untied
    embeddings (so the lm_head is its own (V, H) weight, as the trainer's fused logprobs expect).
    About 0.27M parameters with a 1024-token vocabulary; `overrides` replace any field.
    """
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=getattr(tokenizer, "model_max_length", 128)
        if getattr(tokenizer, "model_max_length", 0) <= 4096 else 128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


# ----------------------------------------------------------------------------------------------
# Gold judge and simulated annotator
# ----------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    # Two branches so that no exp overflows, including beta = inf (x = +-inf).
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_scores(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text, a float in [-1, 1] (0 for an empty text)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def label_pairs(
    prompts: Sequence[str],
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    drop_ties: bool = True,
) -> tuple[list[dict[str, str]], float]:
    """Preference pairs labelled by a noisy Bradley-Terry annotator over the gold score.

    For pair i: p_i = sigmoid(beta * (gold(a_i) - gold(b_i))), and a_i is chosen with
    probability p_i (else b_i). A larger `beta` is a less noisy annotator; beta = inf always
    prefers the higher gold score.
    Ties (identical texts, or gold scores within TIE_TOLERANCE) carry no preference: with
    `drop_ties` (default) they are left out; otherwise they are labelled by a fair coin.
    Returns (pairs, noise_ceiling): pairs are {"prompt", "chosen", "rejected"} in input order
    (ties removed); noise_ceiling = mean_i max(p_i, 1 - p_i) over the returned pairs, the
    expected accuracy of the best possible reward model (one that ranks by the gold score) on
    these labels (nan when no pair is left).
    """
    if not (len(prompts) == len(texts_a) == len(texts_b)):
        raise ValueError(f"prompts, texts_a and texts_b must have the same length, got "
                         f"{len(prompts)}, {len(texts_a)}, {len(texts_b)}")
    if not beta > 0:  # also rejects nan
        raise ValueError(f"beta must be > 0 (inverse temperature of the annotator), got {beta}")
    rng = random.Random(seed)
    gold_a, gold_b = gold_scores(texts_a), gold_scores(texts_b)
    pairs, best_accuracy = [], []
    for prompt, text_a, text_b, score_a, score_b in zip(prompts, texts_a, texts_b, gold_a, gold_b):
        gap = score_a - score_b
        is_tie = text_a == text_b or abs(gap) <= TIE_TOLERANCE
        if is_tie and drop_ties:
            continue
        prob_a = 0.5 if is_tie else _sigmoid(beta * gap)
        a_wins = rng.random() < prob_a
        chosen, rejected = (text_a, text_b) if a_wins else (text_b, text_a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        best_accuracy.append(max(prob_a, 1.0 - prob_a))
    ceiling = sum(best_accuracy) / len(best_accuracy) if best_accuracy else float("nan")
    return pairs, ceiling
