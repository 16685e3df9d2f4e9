"""Knowledge-distillation losses between a student and a teacher classifier (mutual distillation).

Both losses of a pair are computed from the same batch's class logits ``s`` (student) and
``t`` (teacher) and labels ``y``. Each model's loss sees the other model's logits
detached, so one backward pass over the sum trains each model on its own loss only.

``standard`` (Hinton et al., 2015, made mutual)::

    L_s = a · CE(y, s) + b · T² · KL(softmax(t / T) ‖ softmax(s / T))
    L_t = a · CE(y, t) + b · T² · KL(softmax(s / T) ‖ softmax(t / T))

``seed`` (the FedKDLoRA seed code's form; FedKD's adaptive distillation, Wu et al. 2022,
with 1 added to the denominator): KL on the raw logits (no temperature, no weights),
divided by one plus both cross-entropies, which weighs distillation up where both
models already fit the labels::

    L_s = CE(y, s) + KL(softmax(t) ‖ softmax(s)) / (1 + CE(y, s) + CE(y, t))
    L_t = CE(y, t) + KL(softmax(s) ‖ softmax(t)) / (1 + CE(y, s) + CE(y, t))

(the other model's CE in a denominator is a constant, as its logits are detached; the model's
own CE there carries gradient, as in FedKD). KL(p ‖ q) = Σ_c p_c (log p_c − log q_c), summed
over classes and averaged over the batch; CE is averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

KD_LOSSES = ("standard", "seed")


def kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target / T) ‖ softmax(logits / T)), summed over classes, mean over the batch."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def mutual_losses(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, form: str = "standard",
                  temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_s, L_t) of the module docstring, for logits of shape (batch, classes)."""
    s_fixed, t_fixed = student.detach(), teacher.detach()
    ce_s = F.cross_entropy(student.float(), labels)
    ce_t = F.cross_entropy(teacher.float(), labels)
    if form == "standard":
        scale = kd_weight * temperature**2
        return (ce_weight * ce_s + scale * kl(t_fixed, student, temperature),
                ce_weight * ce_t + scale * kl(s_fixed, teacher, temperature))
    if form == "seed":
        return (ce_s + kl(t_fixed, student) / (1 + ce_s + ce_t.detach()),
                ce_t + kl(s_fixed, teacher) / (1 + ce_s.detach() + ce_t))
    raise ValueError(f"unknown KD loss '{form}' (choose one of: {', '.join(KD_LOSSES)})")


def attention_mse(attentions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean squared difference of attention maps (batch × heads × length × length)."""
    if len(attentions) != len(targets):
        raise ValueError(f"{len(attentions)} attention layers against {len(targets)}")
    return torch.stack([F.mse_loss(a.float(), t.float()) for a, t in zip(attentions, targets)]).mean()
