"""The training objectives of the mitigations, on plain tensors: logits (batch, seq, vocab) and labels
(batch, seq) with -100 outside the response, exactly as ``capsafe.common.formatting.collate`` builds them.

Every function shifts once (position t predicts token t+1) and averages over response tokens, like the
causal-LM cross-entropy it sits beside, so coefficients mean the same at any batch or sequence size.
"""

from __future__ import annotations

from typing import Any

from capsafe.common.formatting import IGNORE_INDEX


def _shift(logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """(logits predicting each label, labels with -100 replaced by 0, response mask), shifted by one."""
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits, labels.masked_fill(~mask, 0), mask


def response_positions(labels: Any) -> Any:
    """0 for the first response token of each row, 1 for the second, ... (-1 outside the response), shifted
    like the logits: what 'the first response tokens' means in the token-wise objective."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask.long().cumsum(dim=1) * mask - 1


def token_logprobs(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(log-probability of each label token, response mask), both (batch, seq-1)."""
    import torch

    logits, targets, mask = _shift(logits, labels)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, mask


def kl_to_reference(logits: Any, ref_logits: Any, labels: Any) -> Any:
    """Mean over response tokens of KL(p_model || p_reference), over the whole next-token distribution."""
    import torch

    logits, _, mask = _shift(logits, labels)
    ref = ref_logits[:, :-1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref.float(), dim=-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def token_betas(positions: Any, beta: float, first_token_factor: float, bias_factor: float,
                bias_length: int) -> Any:
    """Per-token beta of the token-wise constrained objective (Qi et al. 2024): ``beta * bias_factor`` on the
    first ``bias_length`` response tokens, ``beta * first_token_factor`` on the very first one (its loss starts
    high, so a strong beta would saturate the sigmoid at once), ``beta`` after that."""
    import torch

    betas = torch.full(positions.shape, float(beta))
    betas = torch.where(positions < bias_length, beta * bias_factor, betas)
    if bias_length > 0:
        betas = torch.where(positions == 0, beta * first_token_factor, betas)
    return betas


def token_wise_constrained(logits: Any, ref_logits: Any, labels: Any, beta: float, first_token_factor: float,
                           bias_factor: float, bias_length: int) -> Any:
    """Qi et al. (2024), "Safety alignment should be made more than just a few tokens deep", eq. 3:
    mean over response tokens of ``-(2 / beta_t) * log sigmoid(beta_t * (log p(y_t) - log p_aligned(y_t)))``.

    Its gradient is the token's cross-entropy gradient scaled by ``2 * (1 - sigmoid(beta_t * delta_t))``: a
    token that already drifted up from the aligned model (delta > 0) is pushed less, a large beta_t holds
    the early tokens, which decide whether the model refuses, close to the aligned model. As beta -> 0 the
    loss tends to cross-entropy plus a constant."""
    import torch
    import torch.nn.functional as F

    logp, mask = token_logprobs(logits, labels)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ref_logits, labels)
    betas = token_betas(response_positions(labels), beta, first_token_factor, bias_factor,
                        bias_length).to(logp.device)
    per_token = -(2.0 / betas) * F.logsigmoid(betas * (logp - ref_logp))
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def proximal(params: list[Any], anchors: list[Any], rho: float) -> Any:
    """``rho / 2 * ||w - w_anchor||^2`` over the trainable parameters (Lisa's proximal term)."""
    total = sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * rho * total
