"""Knowledge-distillation losses between a student and a teacher classifier (mutual distillation).

Both losses of a pair are computed from the same batch's class logits ``s`` (student) and
``t`` (teacher) and labels ``y``. Each model's loss sees the other model's logits
detached, so one backward pass over the sum trains each model on its own loss only.

``standard`` (Hinton et al., 2015, made mutual)::

    L_s = a · CE(y, s) + b · T² · KL(softmax(t / T) ‖ softmax(s / T))
    L_t = a · CE(y, t) + b · T² · KL(softmax(s / T) ‖ softmax(t / T))

``adaptive`` (FedKD's adaptive distillation, Wu et al. 2022, with 1 added to the denominator): the KL
of the softmax distributions (no temperature, no weights), divided by one plus both cross-entropies,
which weighs distillation up where both models already fit the labels::

    L_s = CE(y, s) + KL(softmax(t) ‖ softmax(s)) / (1 + CE(y, s) + CE(y, t))
    L_t = CE(y, t) + KL(softmax(s) ‖ softmax(t)) / (1 + CE(y, s) + CE(y, t))

(the other model's CE in a denominator is a constant, as its logits are detached; the model's own CE
there carries gradient). KL(p ‖ q) = Σ_c p_c (log p_c − log q_c), summed over classes and averaged over
the batch; CE is averaged over the batch.

``reference``: the FedKDLoRA reference code's loss as it computes it (``distillation.py``:
``nn.KLDivLoss(reduction="batchmean", log_target=True)(t.detach(), s)``). On raw logits, with the
model's own logits as the log-target, that term is K(s; t) = (1/B) Σ_b Σ_c e^{s_bc} (s_bc − t_bc) — not a
divergence between distributions; it draws s towards t − 1, a shift softmax ignores. Its denominator
D = 1 + CE(y, s) + CE(y, t) is detached::

    L_s = CE(y, s) + K(s; t) / D,    L_t = CE(y, t) + K(t; s) / D

and one term trains both models (nothing detached), the student's attention maps against the
teacher's, layer l from the top against teacher layer l·⌊L_t / L_s⌋ from the top::

    L_att = Σ_{l=0}^{L_s−1} MSE(A_s[−l−1], A_t[−l·⌊L_t/L_s⌋−1]) / (1 + CE(y, s) + CE(y, t))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

KD_LOSSES = ("standard", "adaptive", "reference")


def kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target / T) ‖ softmax(logits / T)), summed over classes, mean over the batch."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def raw_logit_kl(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """K(s; t) = (1/B) Σ e^{s} (s − t): ``KLDivLoss(batchmean, log_target=True)(t, s)`` on raw logits."""
    return F.kl_div(other.float(), logits.float(), reduction="batchmean", log_target=True)


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
    if form == "adaptive":
        return (ce_s + kl(t_fixed, student) / (1 + ce_s + ce_t.detach()),
                ce_t + kl(s_fixed, teacher) / (1 + ce_s.detach() + ce_t))
    if form == "reference":
        d = 1 + ce_s.detach() + ce_t.detach()
        return ce_s + raw_logit_kl(student, t_fixed) / d, ce_t + raw_logit_kl(teacher, s_fixed) / d
    raise ValueError(f"unknown KD loss '{form}' (choose one of: {', '.join(KD_LOSSES)})")


def attention_mse(attentions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean squared difference of attention maps (batch × heads × length × length)."""
    if len(attentions) != len(targets):
        raise ValueError(f"{len(attentions)} attention layers against {len(targets)}")
    return torch.stack([F.mse_loss(a.float(), t.float()) for a, t in zip(attentions, targets)]).mean()


def reference_attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                             student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """L_att of the module docstring: the layer-mapped attention MSE, summed, over 1 + both CEs (nothing detached)."""
    ratio = len(teacher) // len(student)
    mse = sum(F.mse_loss(student[-l - 1].float(), teacher[-l * ratio - 1].float()) for l in range(len(student)))
    ce = F.cross_entropy(student_logits.float(), labels) + F.cross_entropy(teacher_logits.float(), labels)
    return mse / (1 + ce)
