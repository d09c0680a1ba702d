"""The tiny review-task models the stage tests train (not a test module itself).

tests/trainer/test_stages.py, test_packing.py, test_quantization.py, test_run_directory.py and the
distributed worker each built the same things their own way: a BPE tokenizer trained on the
built-in review corpus and a random Llama of ``task.tiny_llama_config`` for it. They build them
here. Building is cheap (milliseconds); what is shared is one definition, so the files cannot
drift apart. Sizes stay per caller: each test file keeps the shape its numbers were checked at.
``interrupt_at`` is the Ctrl-C stand-in every resume test stops its run with.
"""

from __future__ import annotations

import torch

from rlhf import task

# the shape most stage tests train: 2 layers, hidden 32, one KV head shared by two query heads
STAGE_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1)
# "your model" of the pipeline tests on your own model and data: the same with one layer
OWN_MODEL_SHAPE = dict(STAGE_SHAPE, num_hidden_layers=1)


def review_tokenizer(corpus, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on the prompts + completions of a review corpus
    (``task.make_corpus``)."""
    return task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                vocab_size=vocab_size)


def rl_tokenizer():
    """The tokenizer of the RL loop tests (test_grpo, test_dynamic_sampling,
    test_trainer_subsystems): trained on ``task.make_corpus(96, seed=1)``, 300 tokens."""
    return review_tokenizer(task.make_corpus(96, seed=1), vocab_size=300)


def tiny_llama(tokenizer, seed: int = 0, **shape):
    """A random ``LlamaForCausalLM`` for ``tokenizer``: ``STAGE_SHAPE`` unless ``shape`` gives
    the fields (``task.tiny_llama_config`` names). Seeds the global RNG with ``seed`` first, as
    every caller did (wrap it in ``torch.random.fork_rng`` to leave the caller's stream alone)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(task.tiny_llama_config(tokenizer, **(shape or STAGE_SHAPE)))


def interrupt_at(stop: int):
    """An ``on_step`` / ``on_iteration`` callback that raises KeyboardInterrupt (what Ctrl-C
    raises) once step or iteration ``stop`` is done: the stage saves a checkpoint and re-raises."""
    def callback(step, _metrics):
        if step == stop:
            raise KeyboardInterrupt
    return callback
