"""FedKDLoRA: a teacher on the server and the federated LoRA student learn from each other on the server's data.

Each round::

    s ← Σ_i p_i θ_i                         FedIT: the clients' LoRA (and head), weighted by n_i
    teacher: teacher_epochs of CE on D_server
    mutual distillation, kd_epochs on D_server: the student descends L_s, the teacher L_t
    (:mod:`fedtune.distillation`: ``standard`` T²-scaled KL, FedKD's ``adaptive`` form, or the
    ``reference`` code's loss with its attention term)
    the distilled student goes to the clients

D_server is ``partition.server_fraction`` of the training split, rows no client holds. The teacher is any
classifier (its own tokenizer: each model reads the server's texts tokenised its own way, and distillation
works on class logits), pre-trained on D_server before the first round (``teacher_pretrain_epochs``), fully
or with LoRA. It never leaves the server: its tensors live in the server state (``extra``: checkpointed,
never in a payload), so the bytes are FedIT's. The pre-trained teacher is saved in ``<run>/teacher/``;
a later run reuses it by giving that folder as ``teacher`` with ``teacher_pretrain_epochs: 0``.

With ``kd_epochs: 0`` and ``teacher_epochs: 0`` the student is FedIT's average, exactly. Each round logs
``kd_student_shift``, ‖distilled student − FedIT average‖ over the student's tensors: what distillation did.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fedtune.aggregation import Tensors
from fedtune.algorithms.base import ClientUpdate, NoOptions, ServerState
from fedtune.algorithms.fedit import FedIT
from fedtune.distillation import attention_mse, mutual_losses, reference_attention_loss
from fedtune.errors import FedtuneError
from fedtune.device import to_device
from fedtune.models.base import public_model_name, quiet_loading
from fedtune.models.kinds.full import Full
from fedtune.models.kinds.lora import Lora, LoraConfig
from fedtune.models.lora import load_trainable, trainable_state
from fedtune.seeds import derive_seed
from fedtune.server_context import ServerContext
from fedtune.training import make_optimizer, round_lr

TEACHER_DIR = "teacher"
"""The pre-trained teacher inside the run directory: a model folder (full) or a peft adapter (LoRA)."""
TEACHER_JSON = "teacher.json"
"""Beside a saved teacher: what it is (``model``, ``finetune``) and what it was pre-trained on."""
_TEACHER = "teacher/"
_SEED = 60_601  # seeds of the server's own training: (run seed, round, _SEED)


class FedKDOptions(NoOptions):
    teacher: str = "smollm2-135m"
    """The teacher classifier: a packaged name, Hub id or model folder (read with its own tokenizer), or the
    ``teacher/`` folder an earlier fedkd run saved (with ``teacher_pretrain_epochs: 0`` it is used as it is)."""
    teacher_finetune: Literal["full", "lora"] = "full"
    """How the teacher trains: every parameter, or LoRA of rank ``teacher_lora_r`` (and its head)."""
    teacher_lora_r: int = Field(default=16, ge=1)
    """``teacher_finetune: lora``: the teacher's LoRA rank (alpha = 2r, on its attention projections)."""
    teacher_pretrain_epochs: float = Field(default=3.0, ge=0)
    """Epochs of CE on the server's data before the first round (the seed: 5 for CoLA, 3 for SST-2)."""
    teacher_epochs: float = Field(default=1.0, ge=0)
    """Epochs of CE on the server's data for the teacher alone, each round, before distillation."""
    kd_epochs: float = Field(default=1.0, ge=0)
    """Epochs of mutual distillation on the server's data each round (0: the student is FedIT's average)."""
    kd_loss: Literal["standard", "adaptive", "reference"] = "standard"
    """``standard``: CE + T²·KL(softmax(t/T) ‖ softmax(s/T)), and symmetrically for the teacher. ``adaptive``:
    FedKD's, softmax KL over 1 + both CEs; ``reference``: the reference code's, KLDivLoss on raw logits over
    1 + both (detached) CEs, and its attention term (see fedtune.distillation). Neither has a temperature or
    weights."""
    temperature: float = Field(default=2.0, gt=0)
    """``standard``: the softmax temperature T."""
    ce_weight: float = Field(default=1.0, ge=0)
    """``standard``: the weight of each model's own cross-entropy."""
    kd_weight: float = Field(default=1.0, ge=0)
    """``standard``: the weight of the T²-scaled KL term."""
    attention_weight: float | None = Field(default=None, ge=0)
    """Weight of an attention-map MSE between teacher and student. ``standard`` / ``adaptive``: the mean over
    layers, in models of the same layers and heads (default 0: none). ``reference``: the reference code's term,
    every student layer against the teacher's layer mapped from the top, over 1 + both CEs (default 1, as the
    reference code always adds it; 0 leaves it out). Both need the same heads and tokenizer in both models."""
    teacher_lr: float | None = Field(default=None, gt=0)
    """The teacher's learning rate; default 5e-5 (full) or 5e-4 (LoRA)."""
    student_lr: float | None = Field(default=None, gt=0)
    """The student's learning rate in distillation; default the clients' learning rate of the round."""

    @model_validator(mode="after")
    def _fixed_forms_have_no_knobs(self) -> "FedKDOptions":
        knobs = sorted({"temperature", "ce_weight", "kd_weight"} & self.model_fields_set)
        if self.kd_loss != "standard" and knobs:
            raise ValueError(f"kd_loss={self.kd_loss} has no temperature or weights; remove {', '.join(knobs)}")
        if "teacher_lora_r" in self.model_fields_set and self.teacher_finetune != "lora":
            raise ValueError("teacher_lora_r is the rank of a LoRA teacher; set teacher_finetune: lora, or remove it")
        return self


class FedKD(FedIT):
    name = "fedkd"
    summary = "FedKDLoRA: FedIT average, then mutual distillation with a server-side teacher on the server's data"
    Options = FedKDOptions
    trains_on_server = True
    requires = "model.task: classification"

    # ------------------------------------------------------------------ the teacher
    def setup_server(self, server: ServerContext) -> None:
        o = self.options
        self.server = server
        torch.manual_seed(derive_seed(server.cfg.seed, _SEED))  # the teacher's head and LoRA
        self.teacher, tokenizer, self.teacher_kind, self.teacher_base = self._load_teacher(server)
        self.teacher.to(server.device)  # built on the CPU, as the student, then moved beside it
        self.teacher_data, self.teacher_eval = server.encode(tokenizer)
        self.teacher_tokenizer = tokenizer
        self.teacher_lr = o.teacher_lr or (5e-5 if self.teacher_kind == "full" else 5e-4)
        if self.attention_weight:
            self._check_attention_layouts()
        total = sum(p.numel() for p in self.teacher.parameters())
        trained = sum(p.numel() for p in self.teacher.parameters() if p.requires_grad)
        server.note(f"teacher {o.teacher}: {total / 1e6:.1f}M parameters, training {trained:,} "
                    f"({self.teacher_kind}); {len(server.rows)} server rows")

    def _load_teacher(self, server: ServerContext):
        """(teacher, its tokenizer, its kind, the base model it names) from ``teacher``: a saved fedkd teacher
        folder, else a classifier with a fresh head and the chosen kind built into it."""
        o = self.options
        folder = Path(o.teacher).expanduser()
        if (folder / TEACHER_JSON).is_file():
            info = json.loads((folder / TEACHER_JSON).read_text())
            kind = info["finetune"]
            if "teacher_finetune" in o.model_fields_set and o.teacher_finetune != kind:
                raise FedtuneError(f"teacher {folder} was trained with teacher_finetune={kind}; set that, or drop it")
            if "teacher_lora_r" in o.model_fields_set:
                raise FedtuneError(f"teacher {folder} is a saved teacher: its LoRA rank (if any) is the one it was "
                                   "trained with; remove teacher_lora_r")
            if info.get("label_names") != server.label_names:
                raise FedtuneError(f"teacher {folder} classifies into {info.get('label_names')}, this run into "
                                   f"{server.label_names}; give a teacher of this task")
            if o.teacher_pretrain_epochs:
                server.note(f"note: teacher {folder} was pre-trained by fedtune already "
                            f"({info.get('pretrain_epochs')} epochs); it is pre-trained again on top "
                            "(set teacher_pretrain_epochs: 0 to use it as it is)")
            if kind == "full":
                model, tokenizer = server.load_classifier(str(folder))
            else:
                from peft import PeftModel

                base, tokenizer = server.load_classifier(info["model"])
                with quiet_loading():
                    model = PeftModel.from_pretrained(base, folder, is_trainable=True)
            return model, tokenizer, kind, info["model"]
        model, tokenizer = server.load_classifier(o.teacher)
        kind = Lora(LoraConfig(r=o.teacher_lora_r, alpha=2.0 * o.teacher_lora_r)) if o.teacher_finetune == "lora" else Full()
        with quiet_loading():
            model = kind.build(model, "classification")
        return model, tokenizer, o.teacher_finetune, o.teacher

    @property
    def attention_weight(self) -> float:
        """The attention term's weight: as set, else 1 for ``kd_loss: reference`` (the reference code's) and 0."""
        o = self.options
        return o.attention_weight if o.attention_weight is not None else float(o.kd_loss == "reference")

    def _check_attention_layouts(self) -> None:
        """Attention maps of one shape in both models: the same heads and tokens, and (but for the reference
        form, which maps layers) the same layers."""
        s_cfg, t_cfg = self.server.model.config, self.teacher.config
        s_layout = (s_cfg.num_hidden_layers, s_cfg.num_attention_heads)
        t_layout = (t_cfg.num_hidden_layers, t_cfg.num_attention_heads)
        same_tokens = self.server.examples.features["input_ids"] == self.teacher_data.features["input_ids"]
        mapped = self.options.kd_loss == "reference"
        same_layout = s_layout[1] == t_layout[1] if mapped else s_layout == t_layout
        if not same_layout or not same_tokens:
            why = (f"the student has {s_layout[0]} layers × {s_layout[1]} heads, the teacher {t_layout[0]} × "
                   f"{t_layout[1]}" if same_tokens else "their tokenizers split the server's texts differently")
            what = ("kd_loss: reference adds the reference code's attention term, which" if mapped and
                    self.options.attention_weight is None else "algorithm.options.attention_weight")
            raise FedtuneError(f"{what} needs attention maps of one layout in teacher and student: {why}; set "
                               "attention_weight: 0")
        self.teacher.set_attn_implementation("eager")

    def _teacher_state(self) -> Tensors:
        return {_TEACHER + n: t for n, t in trainable_state(self.teacher).items()}

    def _set_teacher(self, extra: Tensors) -> None:
        load_trainable(self.teacher, {n[len(_TEACHER):]: t for n, t in extra.items() if n.startswith(_TEACHER)})

    def _save_teacher(self, loss: float) -> None:
        run_dir = self.server.run_dir
        if run_dir is None:
            return
        folder = run_dir / TEACHER_DIR
        (Lora() if self.teacher_kind == "lora" else Full()).save(
            self.teacher, self.teacher_tokenizer, folder, public_model_name(self.teacher_base), classification=True)
        cfg = self.server.cfg
        (folder / TEACHER_JSON).write_text(json.dumps({
            "model": self.teacher_base, "finetune": self.teacher_kind, "label_names": self.server.label_names,
            "pretrain_epochs": self.options.teacher_pretrain_epochs, "pretrain_loss": loss, "data": cfg.data.name,
            "server_rows": len(self.server.rows), "seed": cfg.seed}, indent=2) + "\n")
        (folder / "README.md").write_text(
            f"# The FedKDLoRA teacher of run `{cfg.name}`\n\n"
            f"`{self.teacher_base}` with a {len(self.server.label_names)}-class head "
            f"({', '.join(self.server.label_names)}), trained {self.teacher_kind} "
            f"({'a peft adapter on that base' if self.teacher_kind == 'lora' else 'a complete model folder'}), "
            f"pre-trained {self.options.teacher_pretrain_epochs:g} epochs on the server's {len(self.server.rows)} rows "
            f"of `{cfg.data.name}` (mean loss {loss:.4f}). `{TEACHER_JSON}` records the same.\n\n"
            "Reuse it in a later run, without pre-training it again:\n\n"
            f"```yaml\nalgorithm:\n  name: fedkd\n  options:\n    teacher: {folder.resolve()}\n"
            "    teacher_pretrain_epochs: 0\n```\n")

    # ------------------------------------------------------------------ rounds
    def init(self, initial: Tensors) -> ServerState:
        state = super().init(initial)
        epochs = self.options.teacher_pretrain_epochs
        if epochs:
            self.server.note(f"pre-training the teacher: {epochs:g} epochs ({self.server.steps(epochs)} steps) on the "
                             f"{len(self.server.rows)} server rows …")
            loss = self.server.train(self.teacher, self.teacher_data, epochs, self.teacher_lr,
                                     derive_seed(self.server.cfg.seed, 0, _SEED))
            self.server.note(f"teacher pre-trained: {epochs:g} epochs on {len(self.server.rows)} server rows "
                             f"(mean loss {loss:.4f})")
            self._save_teacher(loss)
        state.extra = self._teacher_state()
        return state

    def aggregate(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        o, server = self.options, self.server
        student = super().aggregate(rnd, updates, state).global_tensors
        self._set_teacher(state.extra)
        seed = derive_seed(server.cfg.seed, rnd, _SEED)
        metrics: dict[str, float] = {}
        if o.teacher_epochs:
            metrics["teacher_loss"] = server.train(self.teacher, self.teacher_data, o.teacher_epochs,
                                                   self.teacher_lr, seed)
        if o.kd_epochs:
            with server.borrowed_model() as model:
                server.load_state(student)
                metrics.update(self._distil(model, rnd, seed + 1))
                averaged, student = student, {n: t for n, t in trainable_state(model).items() if n in student}
                metrics["kd_student_shift"] = float(sum((student[n].double() - averaged[n].double()).pow(2).sum()
                                                        for n in student) ** 0.5)
        return ServerState(round=rnd, global_tensors=student, extra=self._teacher_state(), metrics=metrics)

    def _distil(self, student: torch.nn.Module, rnd: int, seed: int) -> dict[str, float]:
        """``kd_epochs`` of mutual distillation: each step, one batch of server rows through both models (each
        with its own tokens), one backward of L_s + L_t, one step of each model's optimiser."""
        o, server = self.options, self.server
        train = server.cfg.train
        attention = self.attention_weight > 0
        if attention:
            student.set_attn_implementation("eager")  # restored when the borrowed model is given back
        s_lr = o.student_lr or round_lr(train, rnd, server.cfg.federation.rounds)
        optimizers = [make_optimizer(student, train, s_lr), make_optimizer(self.teacher, train, self.teacher_lr)]
        params = [[p for p in m.parameters() if p.requires_grad] for m in (student, self.teacher)]
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        rows = np.arange(len(server.rows))
        order = iter(())
        student.train()
        self.teacher.train()
        totals, n = np.zeros(3), 0
        for _ in range(server.steps(o.kd_epochs)):
            idx = next(order, None)
            if idx is None:  # a new epoch: a fresh permutation of the server's rows
                perm = rng.permutation(rows)
                order = iter(np.array_split(perm, math.ceil(len(perm) / train.batch_size)))
                idx = next(order)
            s_batch = to_device(server.examples.collate(idx), server.device)
            t_batch = to_device(self.teacher_data.collate(idx), server.device)
            labels = s_batch.pop("labels")
            t_batch.pop("labels")
            s_out = student(**s_batch, output_attentions=attention)
            t_out = self.teacher(**t_batch, output_attentions=attention)
            loss_s, loss_t = mutual_losses(s_out.logits, t_out.logits, labels, o.kd_loss, o.temperature,
                                           o.ce_weight, o.kd_weight)
            shared = torch.zeros(())  # a term that trains both models
            if attention and o.kd_loss == "reference":
                shared = self.attention_weight * reference_attention_loss(
                    s_out.attentions, t_out.attentions, s_out.logits, t_out.logits, labels)
            elif attention:
                loss_s = loss_s + self.attention_weight * attention_mse(s_out.attentions,
                                                                        [a.detach() for a in t_out.attentions])
                loss_t = loss_t + self.attention_weight * attention_mse(t_out.attentions,
                                                                        [a.detach() for a in s_out.attentions])
            (loss_s + loss_t + shared).backward()
            for opt, ps in zip(optimizers, params):
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(ps, train.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            totals += (loss_s.item() * len(idx), loss_t.item() * len(idx), shared.item() * len(idx))
            n += len(idx)
        out = {"kd_student_loss": totals[0] / max(n, 1), "kd_teacher_loss": totals[1] / max(n, 1)}
        if attention and o.kd_loss == "reference":
            out["kd_attention_loss"] = totals[2] / max(n, 1)
        return out

    def evaluate_on_server(self, state: ServerState) -> dict[str, dict[str, float]]:
        """The teacher, scored on the eval split (its own tokens): ``eval/teacher/<metric>``."""
        if self.teacher_eval is None:
            return {}
        self._set_teacher(state.extra)
        return {"teacher": self.server.evaluate(self.teacher, self.teacher_eval)}
