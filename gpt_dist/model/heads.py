"""GPT-1's fine-tuning head (Radford et al. 2018, §3.2-3.3, Figure 1).

A labelled example goes through the pretrained decoder once per input transformation
(``start text extract``, ``start a delim b extract`` ...); the last hidden state at the
*extract* token, h_l^m, is fed to one new linear layer W_y:

    classification / entailment   P(y | x) = softmax(h W_y)                 W_y: [h, classes]
    similarity                    P(y | a, b) = softmax((h_ab + h_ba) W_y)  both orderings, added
                                  (regression on scores: one output, mean squared error)
    multiple choice               P(i | ctx) = softmax_i(h_i W_y)           W_y: [h, 1], per choice

The objective is L3 = L2 + lambda * L1: the task loss plus the next-token loss on the same
input tokens (padding masked). ``TaskHead.objective`` computes all of it from the LM logits
and the hidden states, so the plain model (``GPT.forward``) and the pipeline's last stage
(``pipeline.py``'s loss function) share one implementation.

Parallelism: the hidden state the head reads is replicated over the TP ranks (gathered first
under sequence parallelism), so W_y is a small replicated parameter: every TP rank computes
the same gradient for it, like a LayerNorm gain, and the gradient it sends back into the
residual stream is already complete (no TP reduction, unlike the vocabulary-parallel LM head).
Its dropout uses the default generator, identical over TP ranks, so the masks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt_dist.model.lm_head import lm_loss
from gpt_dist.model.sequence_parallel import seq_gather
from gpt_dist.parallel import TPGroup


@dataclass(frozen=True)
class TaskHeadSpec:
    """What the head needs to know about the task (from the config's ``finetune`` section)."""

    task: str
    """classification | entailment | similarity | multiple_choice"""
    n_out: int
    """Classes; 1 for similarity scores (regression) and for multiple choice (one score per choice)."""
    dropout: float = 0.1
    lm_coef: float = 0.5

    @property
    def regression(self) -> bool:
        return self.task == "similarity" and self.n_out == 1

    @property
    def k(self) -> int | None:
        """Sequences per example when fixed by the task (similarity: the two orderings)."""
        return 2 if self.task == "similarity" else None


class TaskHead(nn.Module):
    """W_y and the fine-tuning objective. Parameters: ``linear.weight`` [n_out, h], ``linear.bias``."""

    def __init__(self, n_embd: int, spec: TaskHeadSpec, tp: TPGroup | None = None, sequence_parallel: bool = False,
                 init: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.sequence_parallel = sequence_parallel
        self.tp = tp or TPGroup()
        self.linear = nn.Linear(n_embd, spec.n_out)
        if init is not None:  # (seed, name)-seeded N(0, 0.02) weight, zero bias (GPT-1's code)
            init(self.linear)

    def extract(self, hidden: torch.Tensor, extract_pos: torch.Tensor) -> torch.Tensor:
        """hidden [s(/tp), b, h] -> the extract tokens' states [b, h]."""
        if self.sequence_parallel:  # every TP rank uses the whole gathered tensor the same way
            hidden = seq_gather(hidden, self.tp, reduce_grad=False)
        rows = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden[extract_pos, rows]

    def forward(self, states: torch.Tensor, n_examples: int) -> torch.Tensor:
        return self.scores(states, n_examples)

    def scores(self, states: torch.Tensor, n_examples: int) -> torch.Tensor:
        """Extract states [B*K, h] (example-major) -> task logits [B, classes] or [B, K]."""
        if self.spec.task == "similarity":                       # h_ab + h_ba, then W_y
            states = states.view(n_examples, -1, states.shape[-1]).sum(dim=1)
        states = F.dropout(states, self.spec.dropout, self.training)
        out = self.linear(states)
        if self.spec.task == "multiple_choice":
            return out.view(n_examples, -1)                      # [B, K]
        return out                                               # [B, classes] (or [B, 1])

    def task_loss(self, task_logits: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        if self.spec.regression:
            return F.mse_loss(task_logits.float().squeeze(-1), task_labels.float())
        return F.cross_entropy(task_logits.float(), task_labels.long())

    def objective(self, lm_logits: torch.Tensor, hidden: torch.Tensor, lm_labels: torch.Tensor,
                  lm_mask: torch.Tensor, extract_pos: torch.Tensor,
                  task_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (L3 scalar, [L1, L2] detached, task logits [B, n] detached).

        lm_logits [s, b, V/tp] (vocabulary-parallel), hidden [s(/tp), b, h], lm_labels and
        lm_mask [b, s], extract_pos [b], task_labels [B] with b = B*K."""
        n = task_labels.shape[0]
        task_logits = self.scores(self.extract(hidden, extract_pos), n)  # not self(): the pipeline
        # layer's forward passes activations through
        l2 = self.task_loss(task_logits, task_labels)
        if self.spec.lm_coef:
            l1 = lm_loss(lm_logits, lm_labels, lm_mask)
            loss = l2 + self.spec.lm_coef * l1
        else:  # lambda = 0: no auxiliary objective, L1 still reported
            with torch.no_grad():
                l1 = lm_loss(lm_logits, lm_labels, lm_mask)
            loss = l2
        parts = torch.stack([l1.detach().float(), l2.detach().float()])
        return loss, parts, task_logits.detach()
