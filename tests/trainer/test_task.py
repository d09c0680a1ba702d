"""The built-in review task: corpus grammar, gold-score spread, tokenizer, tiny model, labels."""

import math
import random
import re

import pytest
import torch

from rlhf import task


@pytest.fixture(scope="module")
def corpus():
    return task.make_corpus(2000, seed=0, return_kinds=True)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    texts = [e["prompt"] + e["completion"] for e in corpus]
    return task.train_tokenizer(texts + task.all_prompts("heldout"), vocab_size=1024)


def test_corpus_is_deterministic_and_well_formed(corpus):
    again = task.make_corpus(2000, seed=0, return_kinds=True)
    assert again == corpus
    assert task.make_corpus(50, seed=1) != task.make_corpus(50, seed=2)
    train_prompts = set(task.all_prompts("train"))
    for example in corpus:
        assert set(example) == {"prompt", "completion", "kind"}
        assert example["prompt"] in train_prompts
        assert example["completion"].startswith(" ") and not example["completion"].startswith("  ")
        assert task.MIN_WORDS <= len(example["completion"].split()) <= task.MAX_WORDS
    assert set(task.make_corpus(3, seed=0)[0]) == {"prompt", "completion"}
    # Diverse enough that the SFT model cannot just memorise a handful of reviews.
    assert len({e["completion"] for e in corpus}) > 0.95 * len(corpus)


def test_gold_scores_spread_over_the_whole_range(corpus):
    scores = torch.tensor(task.gold_scores([e["completion"] for e in corpus]))
    assert scores.min() >= -1 and scores.max() <= 1
    # Every tenth of [-1, 1] is populated, and both strong signs are common: the SFT model sees
    # good and bad reviews, and PPO has room to move the mean (about 0.06 here) up to ~0.95.
    counts = torch.histc(scores, bins=10, min=-1, max=1)
    assert (counts > 0.01 * len(corpus)).all(), counts
    assert (scores < -0.5).float().mean() > 0.2 and (scores > 0.5).float().mean() > 0.2
    assert abs(scores.mean()) < 0.25 and scores.std() > 0.5
    by_kind = {kind: scores[[i for i, e in enumerate(corpus) if e["kind"] == kind]]
               for kind in task.SENTIMENT_KINDS}
    assert by_kind["positive"].min() > 0.3 and by_kind["negative"].max() < -0.3
    assert (by_kind["neutral"] == 0).all()  # neutral sentences use words VADER scores 0
    assert by_kind["mixed"].min() < -0.5 and by_kind["mixed"].max() > 0.5


def test_sentiment_mix_controls_the_gold_score():
    positive = task.make_corpus(200, seed=3, sentiment_mix={"positive": 1.0})
    negative = task.make_corpus(200, seed=3, sentiment_mix={"negative": 1.0})
    assert min(task.gold_scores([e["completion"] for e in positive])) > 0.3
    assert max(task.gold_scores([e["completion"] for e in negative])) < -0.3
    with pytest.raises(ValueError, match="unknown kinds.*'happy'"):
        task.make_corpus(5, sentiment_mix={"happy": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        task.make_corpus(5, sentiment_mix={"positive": 0.0})
    with pytest.raises(ValueError, match="split"):
        task.make_corpus(5, split="test")


def test_prompt_splits_are_disjoint_and_cover_the_vocabulary():
    train, heldout = task.all_prompts("train"), task.all_prompts("heldout")
    assert len(train) == 160 and len(heldout) == 40
    assert not set(train) & set(heldout)
    def words(prompts):
        return {word for prompt in prompts for word in re.findall(r"\w+", prompt.lower())}

    assert words(heldout) <= words(train)
    sample = task.ppo_prompts(40, seed=0, split="heldout")
    assert sorted(sample) == sorted(heldout)  # one full cycle: no duplicates
    assert task.ppo_prompts(40, seed=0, split="heldout") == sample
    long = task.ppo_prompts(500, seed=1)
    assert len(long) == 500 and set(long) == set(train)
    assert task.ppo_prompts(0) == []


def test_tokenizer_round_trip_specials_and_save_load(tokenizer, corpus, tmp_path):
    from transformers import AutoTokenizer

    assert len(tokenizer) == 1024
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = corpus[0]["prompt"] + corpus[0]["completion"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level: text outside the corpus still encodes and decodes exactly.
    odd = "Zoë’s ünseen wörds — 42%!"
    assert tokenizer.decode(tokenizer(odd)["input_ids"], skip_special_tokens=True) == odd
    # Mostly whole words: the tiny model sees short sequences.
    lengths = [len(tokenizer(e["prompt"] + e["completion"])["input_ids"]) for e in corpus[:300]]
    assert max(lengths) <= 64
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        task.train_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        task.train_tokenizer([])


def test_tiny_llama_config_builds_a_small_model(tokenizer):
    from transformers import LlamaForCausalLM

    config = task.tiny_llama_config(tokenizer)
    assert config.vocab_size == len(tokenizer) and not config.tie_word_embeddings
    assert config.pad_token_id == tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e5 < n_params < 1e6, n_params
    ids = tokenizer(["Review of the tent: It is great."], return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    assert task.tiny_llama_config(tokenizer, num_hidden_layers=3).num_hidden_layers == 3


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_label_pairs_follow_bradley_terry():
    good, bad = "The sound is great and I love it.", "The sound is bad."
    gold_good, gold_bad = task.gold_scores([good, bad])
    n, beta = 4000, 1.0
    prob_good = _sigmoid(beta * (gold_good - gold_bad))
    # Alternate the order so that "a" is not always the better text.
    texts_a = [good if i % 2 else bad for i in range(n)]
    texts_b = [bad if i % 2 else good for i in range(n)]
    pairs, ceiling = task.label_pairs(["p"] * n, texts_a, texts_b, beta=beta, seed=0)
    assert len(pairs) == n
    freq = sum(pair["chosen"] == good for pair in pairs) / n
    assert abs(freq - prob_good) < 4 * math.sqrt(prob_good * (1 - prob_good) / n)
    assert ceiling == pytest.approx(max(prob_good, 1 - prob_good), abs=1e-12)
    assert {tuple(sorted((p["chosen"], p["rejected"]))) for p in pairs} == {tuple(sorted(
        (good, bad)))}

    # A noiseless annotator always prefers the higher gold score.
    pairs, ceiling = task.label_pairs(["p"] * 10, texts_a[:10], texts_b[:10], beta=math.inf)
    assert all(p["chosen"] == good for p in pairs) and ceiling == 1.0


def test_label_pairs_ties_and_errors():
    neutral_a, neutral_b = "It arrived in a brown box.", "It comes in three colors."
    assert task.gold_scores([neutral_a, neutral_b]) == [0.0, 0.0]
    texts_a = [neutral_a, "I love it.", "Same text."]
    texts_b = [neutral_b, "I hate it.", "Same text."]
    pairs, ceiling = task.label_pairs(["x", "y", "z"], texts_a, texts_b, seed=0)
    assert [p["prompt"] for p in pairs] == ["y"]  # both ties dropped
    gap = task.gold_scores(["I love it."])[0] - task.gold_scores(["I hate it."])[0]
    assert ceiling == pytest.approx(_sigmoid(task.DEFAULT_BETA * gap))
    pairs, ceiling_with_ties = task.label_pairs(["x", "y", "z"], texts_a, texts_b,
                                                drop_ties=False)
    assert [p["prompt"] for p in pairs] == ["x", "y", "z"]
    assert ceiling_with_ties == pytest.approx((0.5 + ceiling + 0.5) / 3)
    assert math.isnan(task.label_pairs([], [], [])[1])
    with pytest.raises(ValueError, match="same length"):
        task.label_pairs(["x"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="beta"):
        task.label_pairs(["x"], ["a"], ["b"], beta=0.0)


def test_default_beta_gives_a_noise_ceiling_near_087(corpus):
    # Pairs of two reviews from the default mix stand in for two SFT samples of one prompt.
    completions = [e["completion"] for e in corpus]
    random.Random(0).shuffle(completions)
    half = len(completions) // 2
    pairs, ceiling = task.label_pairs([""] * half, completions[:half], completions[half:])
    assert 0.85 <= ceiling <= 0.9, ceiling
    assert len(pairs) > 0.9 * half
