"""Fixtures the trainer tests share."""

import pytest
import torch

from rlhf import arithmetic, task

# the chat template of the tiny chat model's tokenizer
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer that has a chat template, saved as a folder."""
    from transformers import LlamaForCausalLM

    texts = [f"<user>{arithmetic.question(a, b)}<eos><assistant>{a} + {b} = {a + b}<eos>"
             for a, b in arithmetic.problems("train", 300)]
    tokenizer = task.train_tokenizer(texts, vocab_size=300)
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(task.tiny_llama_config(tokenizer, hidden_size=32,
                                                    intermediate_size=64))
    folder = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
