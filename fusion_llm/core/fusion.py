"""Logit fusion and the per-step alpha solvers: pure functions over tensors.

Dimensions: B rows of the batch, T experts, V vocabulary, C candidates. Every input is a
log-probability (log-softmax) tensor in float32; row constants cancel in softmax, so fusing
log-probabilities gives the same distribution as fusing raw logits.

Notation (per row): P = softmax(z_large), Q = softmax(z_small), Q_t = softmax(z_t) for expert t,
d_t = log Q_t - log Q (the expert's shift), and the fused distribution

    P~ = softmax(log P + sum_t alpha_t * d_t).

Fine-tuning moved the small model by f_t = KL(Q_t || Q) (forward) and r_t = KL(Q || Q_t) (reverse).
The fusion objective (Eq. 3 for one expert, Eq. 5 for several) asks the large model to move as much:

    L(alpha) = sum_t active [ (KL(P~ || P) - f_t)^2 + (KL(P || P~) - r_t)^2 ].

Constraints: a token whose large-model logit is -inf (a grammar, min_tokens, allowed ids, bad
words: what a caller masks) is not allowed. With A the allowed tokens of a row, all three
distributions are restricted to A and renormalised, P_A = P / P(A) on A (likewise Q_A, Q_t,A), alpha
is solved on them, and the fused distribution is 0 outside A:

    P~ = softmax(log P_A + sum_t alpha_t (log Q_t,A - log Q_A))  on A,   P~ = 0 off A.

With every token allowed this is the unconstrained fusion, bit for bit. A row with no allowed
(finite) token is a fault; NaN or +inf anywhere still makes the row fall back to the large model.

Order of operations in one decoding step:
    1. log-softmax every model's logits restricted to the allowed tokens (`log_probs`), drop rows
       with NaN or +inf, or with non-finite small-model values on allowed tokens (`finite_rows`);
    2. shifts d_t and targets f_t, r_t from the small models (`expert_shifts`), 0 off A;
    3. alpha from the mode: zeros (`none`), fixed (`static`), grid (`paper_alpha`) or
       continuous (`dynamic_alpha`);
    4. fused logits (`fuse`), then sampling (elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .config import FusionSpec

Tensor = torch.Tensor


class ExpertShifts(NamedTuple):
    """What fine-tuning did to the small base, per row and expert."""

    deltas: Tensor  # [B, T, V] d_t = log Q_t - log Q
    forward_kl: Tensor  # [B, T] f_t = KL(Q_t || Q)
    reverse_kl: Tensor  # [B, T] r_t = KL(Q || Q_t)


def log_probs(logits: Tensor) -> Tensor:
    """log-softmax in float32 over the last axis, whatever the model's dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def finite_rows(*logits: Tensor) -> Tensor:
    """[B] True where every given tensor ([B, ..., V]) is finite in that row."""
    ok = torch.ones(logits[0].shape[0], dtype=torch.bool, device=logits[0].device)
    for z in logits:
        ok &= torch.isfinite(z).flatten(1).all(dim=1)
    return ok


def expert_shifts(
    small_logp: Tensor, expert_logp: Tensor, allowed: Tensor | None = None
) -> ExpertShifts:
    """d_t = log Q_t - log Q;  f_t = sum_v Q_t (log Q_t - log Q);  r_t = sum_v Q (log Q - log Q_t).

    `allowed` [B, V]: the tokens the distributions are restricted to (both log-probabilities are
    -inf elsewhere); d_t is 0 off them, so no token outside shifts the large model or counts."""
    deltas = expert_logp - small_logp[:, None, :]  # [B, T, V]
    if allowed is not None:
        deltas = torch.where(allowed[:, None, :], deltas, 0.0)
    forward_kl = (expert_logp.exp() * deltas).sum(-1)  # [B, T]
    reverse_kl = -(small_logp.exp()[:, None, :] * deltas).sum(-1)  # [B, T]
    return ExpertShifts(deltas, forward_kl, reverse_kl)


def fuse(large_logp: Tensor, deltas: Tensor, alpha: Tensor) -> Tensor:
    """Fused logits  log P + sum_t alpha_t d_t  ([B, V]); alpha is [B, T]."""
    return large_logp + torch.einsum("bt,btv->bv", alpha.to(deltas.dtype), deltas)


def fused_kls(large_logp: Tensor, deltas: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(P~ || P), KL(P || P~)), each [B].

    With s = sum_t alpha_t d_t and log Z = logsumexp(log P + s):
        KL(P~ || P) = E_P~[s] - log Z,    KL(P || P~) = log Z - E_P[s].
    """
    shift = torch.einsum("bt,btv->bv", alpha.to(deltas.dtype), deltas)  # [B, V]
    log_z = torch.logsumexp(large_logp + shift, dim=-1)  # [B]
    p_fused = torch.exp(large_logp + shift - log_z[:, None])
    forward = (p_fused * shift).sum(-1) - log_z
    reverse = log_z - (large_logp.exp() * shift).sum(-1)
    return forward, reverse


def fusion_objective(
    large_logp: Tensor, shifts: ExpertShifts, alpha: Tensor, active: Tensor
) -> Tensor:
    """L(alpha) of Eq. 5 per row ([B]); inactive experts ([B, T] False) neither shift nor count."""
    forward, reverse = fused_kls(large_logp, shifts.deltas, alpha * active)
    per_expert = (forward[:, None] - shifts.forward_kl) ** 2 + (
        reverse[:, None] - shifts.reverse_kl
    ) ** 2
    return (per_expert * active).sum(-1)


def static_alpha(weights: Tensor, active: Tensor) -> Tensor:
    """Fixed alpha per expert ([T]) broadcast to the rows ([B, T]); alpha = 1 is proxy-tuning."""
    return weights.to(active.device)[None, :] * active


def alpha_grid(alpha_min: float, alpha_max: float, step: float, device=None) -> Tensor:
    """alpha_min, alpha_min + step, ..., alpha_max (the paper: 0, 0.1, ..., 2)."""
    count = round((alpha_max - alpha_min) / step) + 1
    return torch.linspace(alpha_min, alpha_min + (count - 1) * step, count, device=device)


def paper_alpha(large_logp: Tensor, shifts: ExpertShifts, active: Tensor, grid: Tensor) -> Tensor:
    """The paper's solver: one expert at a time over a grid (default 0, 0.1, ..., 2).

    Candidates are alpha = a * e_t for every grid value a and active expert t; each is scored with
    the full loss L of Eq. 5 and the first best candidate (expert-major, ascending a) is kept.
    The best loss starts afresh at every step (the paper's pseudo-code forgets to reset it).
    """
    batch, experts = active.shape
    centred = _centre(large_logp, shifts.deltas)
    losses = []
    for a in grid:  # 0-dim tensors: no host read of the grid
        forward, reverse = _axis_kls(large_logp, centred, a.expand_as(shifts.forward_kl))
        loss = _summed_loss(forward, reverse, shifts, active)  # [B, T]
        losses.append(torch.where(active, loss, torch.inf))
    losses = torch.stack(losses, dim=-1)  # [B, T, n]
    best = losses.flatten(1).argmin(dim=1)  # [B] first minimum in expert-major order
    expert, step = best // grid.numel(), best % grid.numel()
    alpha = torch.zeros(batch, experts, dtype=large_logp.dtype, device=large_logp.device)
    alpha[torch.arange(batch, device=alpha.device), expert] = grid.to(alpha)[step]
    return alpha * active


def dynamic_alpha(
    large_logp: Tensor,
    shifts: ExpertShifts,
    active: Tensor,
    alpha_min: float = 0.0,
    alpha_max: float = 2.0,
    grid_step: float = 0.1,
    newton_steps: int = 3,
    joint_steps: int = 3,
    bins: int = 2048,
) -> Tensor:
    """Continuous minimiser of L over [alpha_min, alpha_max]^T, joint over the active experts.

    L = n * [(KL(P~||P) - mean f)^2 + (KL(P||P~) - mean r)^2] + const, so the solver matches the
    experts' mean forward and reverse shift. With c_t = d_t - E_P[d_t], along an expert axis
    K(a) = log E_P[exp(a c_t)], KL(P~||P) = a K'(a) - K(a) and KL(P||P~) = K(a) depend only on
    P's distribution of c_t, which one pass over V compresses into `bins` bins (`AxisMeasure`).
    Three stages, vectorised over rows and experts, with fixed iteration counts (no host sync):
      1. every axis on the grid (the paper's candidates), on the bins: L is not unimodal in
         general (the curve (KL(P~||P), KL(P||P~)) can pass the target twice), so the scan is what
         makes the result never worse than the paper's, up to the bins' Taylor remainder (when
         alpha_min <= 0, so that the paper's candidates a * e_t lie in the box);
      2. safeguarded (Gauss-)Newton with analytic derivatives inside the best grid cell of each axis,
         on the bins;
      3. from the best axis point, Levenberg-Marquardt steps on the two residuals in R^T over the
         full vocabulary, each accepted only if it lowers the exact L.
    """
    mean_forward, mean_reverse = _active_means(shifts, active)
    measure, shift_mean = _axis_measure(large_logp, shifts.deltas, bins)
    grid = alpha_grid(alpha_min, alpha_max, grid_step, device=large_logp.device)
    targets = (mean_forward[:, None, None], mean_reverse[:, None, None])
    axis_alpha = _best_axis(measure, active, targets, grid, newton_steps)
    alpha = _joint_refine(
        large_logp, shifts.deltas, shift_mean, active, mean_forward, mean_reverse,
        axis_alpha, alpha_min, alpha_max, joint_steps,
    )  # fmt: skip
    return torch.nan_to_num(alpha, nan=0.0).clamp(alpha_min, alpha_max) * active


CPU_PASS_ELEMENTS = 2**18  # elements of one [B, T, C, J] temporary of the grid scan on a CPU


def _centre(large_logp: Tensor, deltas: Tensor) -> Tensor:
    """d - E_P[d]: changes no P~, makes K'(0) = 0 and keeps the KL terms well conditioned."""
    return deltas - (large_logp.exp()[:, None, :] * deltas).sum(-1, keepdim=True)


def _summed_loss(forward: Tensor, reverse: Tensor, shifts: ExpertShifts, active: Tensor) -> Tensor:
    """sum_u active (forward - f_u)^2 + (reverse - r_u)^2, for fused KLs of shape [B, T]."""
    terms = (forward[..., None] - shifts.forward_kl[:, None, :]) ** 2 + (
        reverse[..., None] - shifts.reverse_kl[:, None, :]
    ) ** 2  # [B, T candidates, T experts]
    return (terms * active[:, None, :]).sum(-1)


def _active_means(shifts: ExpertShifts, active: Tensor) -> tuple[Tensor, Tensor]:
    count = active.sum(-1).clamp(min=1)  # [B]
    mean_forward = (shifts.forward_kl * active).sum(-1) / count
    mean_reverse = (shifts.reverse_kl * active).sum(-1) / count
    return mean_forward, mean_reverse


def _axis_kls(large_logp: Tensor, centred: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(P~||P), KL(P||P~)) at alpha = a_t * e_t for every expert t ([B, T] each), one exp pass.

    K(a) = log E_P[exp(a d)] with d centred:  KL(P~||P) = a K'(a) - K(a),  KL(P||P~) = K(a).
    """
    logits = large_logp[:, None, :] + a[..., None] * centred  # [B, T, V]
    top = logits.amax(-1, keepdim=True)
    unnorm = torch.exp(logits - top)
    total = unnorm.sum(-1)
    cgf = top[..., 0] + torch.log(total)  # K(a)
    mean = (unnorm * centred).sum(-1) / total  # K'(a)
    return a * mean - cgf, cgf


class AxisMeasure(NamedTuple):
    """P's distribution of every axis's centred shift c_t, as J bins (or the V tokens themselves).

    Bin j holds the ids v with c_v in [m_j - w/2, m_j + w/2): mass M_j = sum_{v in j} P_v and
    moments mu_jn = sum_{v in j} P_v (c_v - m_j)^n / M_j (n = 1, 2, 3). Taylor in c_v - m_j gives
        E_P[exp(a c)] = sum_j M_j exp(a m_j) p_j(a),   p_j(a) = 1 + mu_j1 a + mu_j2 a^2/2 + mu_j3 a^3/6,
    up to a relative error <= (|a| w/2)^4 / 24 * exp(|a| w/2): 3e-8 at |a| = 2, w = 60 / 2048.
    """

    centre: Tensor  # [B, T, J] m_j
    log_mass: Tensor  # [B, T, J] log M_j (-inf: empty bin)
    taylor: Tensor | None  # [B, T, J, 3] the coefficients of p_j: mu_j1, mu_j2 / 2, mu_j3 / 6;
    # None when the bins are the tokens themselves (p_j = 1): no polynomial work per candidate


def _axis_measure(large_logp: Tensor, deltas: Tensor, bins: int) -> tuple[AxisMeasure, Tensor]:
    """The measure of c_t and E_P[d_t] ([B, T]): the tokens themselves when V <= bins (exact),
    else `bins` bins per axis (one pass over V), where E_P[d] = sum_j M_j (m_j + mu_j1)."""
    if deltas.shape[-1] <= bins:
        shift_mean = torch.einsum("bv,btv->bt", large_logp.exp(), deltas)
        centre = deltas - shift_mean[..., None]
        log_mass = large_logp[:, None, :].expand_as(centre)
        return AxisMeasure(centre, log_mass, None), shift_mean
    mass = large_logp.double().exp_()  # [B, V] P in float64: no underflow above e^-745
    per_axis = [_binned_axis(mass, deltas[:, t], bins) for t in range(deltas.shape[1])]
    centre, log_mass, taylor = (torch.stack(part, dim=1) for part in zip(*per_axis, strict=True))
    shift_mean = (log_mass.exp() * (centre + taylor[..., 0])).sum(-1)  # [B, T], no pass over V
    return AxisMeasure(centre - shift_mean[..., None], log_mass, taylor), shift_mean


def _binned_axis(mass: Tensor, shift: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """One axis's bins over [min d, max d] ([B, J] centres and log masses, [B, J, 3] Taylor terms).

    Called once per axis rather than batched over T, so that the [B, V] temporaries stay small
    even in float64; float32 places each id within 2^-12 of a bin, 1e-7 of the range.
    """
    low = shift.amin(-1, keepdim=True)  # [B, 1]
    # a hair wider than (max - min) / bins, so that max d falls inside the last bin
    width = ((shift.amax(-1, keepdim=True) - low) / (bins - 0.01)).clamp(min=1e-30)  # [B, 1] w
    scaled = torch.sub(shift, low).div_(width)  # [B, V] in [0, bins)
    index = scaled.long().clamp_(0, bins - 1)
    offset = scaled.frac_().sub_(0.5).double()  # [B, V] (c_v - m_j) / w in [-1/2, 1/2)
    sums = _bin_sums(mass, index, offset, bins)  # [B, 4, J]
    powers = torch.arange(1, 4, device=shift.device)
    scale = width.double()[..., None] ** powers / powers.cumprod(0)  # [B, 1, 3] w^n / n!
    taylor = sums[:, 1:].transpose(1, 2) / sums[:, :1].mT.clamp(min=1e-300) * scale  # [B, J, 3]
    centre = low + (torch.arange(bins, device=shift.device) + 0.5) * width
    return centre, sums[:, 0].log().float(), taylor.float()


def _bin_sums(mass: Tensor, index: Tensor, offset: Tensor, bins: int) -> Tensor:
    """sum_{v in j} P_v offset_v^n for n = 0..3 ([B, 4, J]), offset = (c_v - m_j) / w, in float64."""
    sums = mass.new_zeros(mass.shape[0], 4, bins)
    sums[:, 0].scatter_add_(1, index, mass)
    term = mass * offset  # then in place: on a CPU, allocating [B, V] costs as much as the math
    sums[:, 1].scatter_add_(1, index, term)
    sums[:, 2].scatter_add_(1, index, term.mul_(offset))
    sums[:, 3].scatter_add_(1, index, term.mul_(offset))
    return sums


def _tilt(measure: AxisMeasure, a: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """K(a) for candidates a ([B, T, C]); P~ over the bins, p_j(a), p_j'(a)/p_j(a) ([B, T, C, J];
    None for exact token measures, where p_j = 1).

    E_P[exp(a c)] = sum_j M_j exp(a m_j) p_j(a) and E_j[c exp(a c)] / E_j[exp(a c)] = m_j + p_j'/p_j.
    """
    a = a[..., None]  # [B, T, C, 1]
    centre = measure.centre[:, :, None, :]
    logits = torch.addcmul(measure.log_mass[:, :, None, :], a, centre)
    poly = slope = None
    if measure.taylor is not None:
        t1, t2, t3 = (m[:, :, None, :] for m in measure.taylor.unbind(-1))  # [B, T, 1, J]
        poly = torch.addcmul(t2, a, t3).mul_(a).add_(t1).mul_(a).add_(1).clamp_(min=1e-30)  # p
        slope = torch.addcmul(2 * t2, a, 3 * t3).mul_(a).add_(t1).div_(poly)  # p'/p
        logits = logits.add_(poly.log())
    top = logits.amax(-1, keepdim=True)
    weights = logits.sub_(top).exp_()  # P~ over bins, times total
    total = weights.sum(-1, keepdim=True)
    return (top + total.log())[..., 0], weights.div_(total), poly, slope


def _bin_means(measure: AxisMeasure, slope: Tensor | None) -> Tensor:
    """m_j + p_j'/p_j: the tilted mean of c inside each bin ([B, T, C or 1, J])."""
    centre = measure.centre[:, :, None, :]
    return centre if slope is None else slope.add_(centre)


def _residuals(
    a: Tensor, cgf: Tensor, mean: Tensor, targets: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """x - mean f and y - mean r with x = KL(P~||P) = a K' - K and y = KL(P||P~) = K."""
    return a * mean - cgf - targets[0], cgf - targets[1]


def _axis_loss(measure: AxisMeasure, a: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
    """h = (x - mean f)^2 + (y - mean r)^2 at alpha = a * e_t for candidates a ([B, T, C])."""
    cgf, weights, _, slope = _tilt(measure, a)
    mean = (weights * _bin_means(measure, slope)).sum(-1)  # K' = E_P~[c]
    res_x, res_y = _residuals(a, cgf, mean, targets)
    return torch.nan_to_num(res_x**2 + res_y**2, nan=torch.inf)


def _axis_terms(
    measure: AxisMeasure, a: Tensor, targets: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """h, h' and the Gauss-Newton h'' at alpha = a * e_t for candidates a ([B, T, C] each).

    With K1 = K'(a) = E_P~[c], K2 = K''(a) = Var_P~(c) (the bin means' variance plus the
    within-bin variance p_j''/p_j - (p_j'/p_j)^2), x' = a K2, y' = K1:
        h' = 2 (x - f) a K2 + 2 (y - r) K1,    h'' ~ 2 (a K2)^2 + 2 K1^2  (always > 0 off a = 0).
    """
    cgf, weights, poly, slope = _tilt(measure, a)
    spread = None  # the within-bin variance: none when every bin is one token
    if measure.taylor is not None:
        t2, t3 = (m[:, :, None, :] for m in measure.taylor[..., 1:].unbind(-1))  # [B, T, 1, J]
        spread = torch.addcmul(2 * t2, a[..., None], 6 * t3).div_(poly).sub_(slope**2)
    bin_mean = _bin_means(measure, slope)  # (in place on slope: after the spread)
    mean = (weights * bin_mean).sum(-1)  # K1
    deviation = (bin_mean - mean[..., None]).square_()
    if spread is not None:
        deviation.add_(spread)
    var = (weights * deviation).sum(-1).clamp(min=0)
    res_x, res_y = _residuals(a, cgf, mean, targets)
    h = torch.nan_to_num(res_x**2 + res_y**2, nan=torch.inf)
    return h, 2 * res_x * a * var + 2 * res_y * mean, 2 * (a * var) ** 2 + 2 * mean**2


def _grid_losses(measure: AxisMeasure, grid: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
    """h at every grid value along every axis ([B, T, n]). On a CPU a few candidates per pass:
    [B, T, C, J] temporaries that stay in cache beat one pass over all candidates (3x at
    B = 32, T = 4, J = 2 000); an accelerator takes them all at once."""
    batch, experts, bins = measure.centre.shape
    per_pass = grid.numel()
    if measure.centre.device.type == "cpu":
        per_pass = max(1, CPU_PASS_ELEMENTS // (batch * experts * bins))
    return torch.cat(
        [
            _axis_loss(measure, part.expand(batch, experts, -1), targets)
            for part in grid.split(per_pass)
        ],
        dim=-1,
    )


def _best_axis(
    measure: AxisMeasure,
    active: Tensor,
    targets: tuple[Tensor, Tensor],
    grid: Tensor,
    newton_steps: int,
) -> Tensor:
    """Stages 1-2: minimise h along every axis, keep the best axis per row -> alpha [B, T]."""
    batch, experts = active.shape
    k = _grid_losses(measure, grid, targets).argmin(-1)  # [B, T]
    last = grid.numel() - 1
    a, left, right = grid[k], grid[(k - 1).clamp(min=0)], grid[(k + 1).clamp(max=last)]
    h, dh, d2h = (v[..., 0] for v in _axis_terms(measure, a[..., None], targets))
    best_a, best_h = a, h
    for _ in range(newton_steps):
        # The minimum lies on the side h' points away from. At a bracket end h' carries no side
        # to drop (at alpha = 0 it is 0 up to rounding), so only interior points shrink the bracket.
        right = torch.where((dh > 0) & (a > left), a, right)
        left = torch.where((dh < 0) & (a < right), a, left)
        newton = a - dh / d2h
        inside = (d2h > 0) & (newton > left) & (newton < right)
        a = torch.where(inside, newton, (left + right) / 2)
        h, dh, d2h = (v[..., 0] for v in _axis_terms(measure, a[..., None], targets))
        better = h < best_h
        best_a, best_h = torch.where(better, a, best_a), torch.where(better, h, best_h)
    axis = torch.where(active, best_h, torch.inf).argmin(dim=-1, keepdim=True)  # [B, 1]
    return torch.zeros_like(best_a).scatter_(1, axis, best_a.gather(1, axis))


def _joint_terms(
    large_logp: Tensor,
    deltas: Tensor,
    shift_mean: Tensor,
    alpha: Tensor,
    mean_forward: Tensor,
    mean_reverse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Residuals ([B, 2]), their Jacobian ([B, 2, T]) and h ([B]) at a joint alpha, over all of V.

    With s = sum_t alpha_t c_t and K = log E_P[exp(s)]: KL(P~||P) = E_P~[s] - K, KL(P||P~) = K,
    dKL(P||P~)/dalpha = E_P~[c];  dKL(P~||P)/dalpha = Cov_P~(c) alpha = E_P~[d s] - E_P~[d] E_P~[s]
    (no T x T matrix needed; d and c differ by constants, which covariances ignore).
    """
    offset = (alpha * shift_mean).sum(-1, keepdim=True)  # [B, 1] E_P[sum_t alpha_t d_t]
    shift = torch.einsum("bt,btv->bv", alpha, deltas) - offset  # [B, V] s
    logits = large_logp + shift
    top = logits.amax(-1, keepdim=True)
    unnorm = torch.exp(logits - top)  # [B, V] P~ * total
    total = unnorm.sum(-1)
    cgf = top[:, 0] + total.log()  # [B] K
    weighted_shift = unnorm * shift
    mean_shift = weighted_shift.sum(-1) / total  # [B] E_P~[s]
    mean = torch.einsum("bv,btv->bt", unnorm, deltas) / total[:, None]  # [B, T] E_P~[d]
    cov_alpha = torch.einsum("bv,btv->bt", weighted_shift, deltas) / total[:, None]
    cov_alpha = cov_alpha - mean * mean_shift[:, None]
    residual = torch.stack([mean_shift - cgf - mean_forward, cgf - mean_reverse], -1)
    jacobian = torch.stack([cov_alpha, mean - shift_mean], dim=1)
    return residual, jacobian, (residual**2).sum(-1)


def _solve_2x2(system: Tensor, rhs: Tensor) -> Tensor:
    """system^-1 rhs for [B, 2, 2] symmetric systems by Cramer's rule (no host sync on a device)."""
    a, b, d = system[:, 0, 0], system[:, 0, 1], system[:, 1, 1]
    first, second = rhs.unbind(-1)
    return (
        torch.stack([d * first - b * second, a * second - b * first], -1) / (a * d - b * b)[:, None]
    )


def _joint_refine(
    large_logp: Tensor,
    deltas: Tensor,
    shift_mean: Tensor,
    active: Tensor,
    mean_forward: Tensor,
    mean_reverse: Tensor,
    alpha: Tensor,
    alpha_min: float,
    alpha_max: float,
    steps: int,
) -> Tensor:
    """Stage 3: damped minimum-norm Gauss-Newton on the two residuals, accepted only if h drops."""
    if active.shape[1] < 2:
        return alpha
    mask = active.to(alpha.dtype)
    terms = (large_logp, deltas, shift_mean)
    residual, jacobian, loss = _joint_terms(*terms, alpha, mean_forward, mean_reverse)
    damping = torch.full_like(loss, 1e-3)
    eye = torch.eye(2, dtype=alpha.dtype, device=alpha.device)
    for _ in range(steps):
        jac = jacobian * mask[:, None, :]  # inactive experts stay at 0
        gram = jac @ jac.transpose(1, 2)  # [B, 2, 2]
        scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-12)
        system = gram + (damping * scale)[:, None, None] * eye
        step = -(jac.transpose(1, 2) @ _solve_2x2(system, residual)[..., None])[..., 0]
        candidate = (alpha + step).clamp(alpha_min, alpha_max) * mask
        new_residual, new_jacobian, new_loss = _joint_terms(
            *terms, candidate, mean_forward, mean_reverse
        )
        better = new_loss < loss
        alpha = torch.where(better[:, None], candidate, alpha)
        loss = torch.where(better, new_loss, loss)
        residual = torch.where(better[:, None], new_residual, residual)
        jacobian = torch.where(better[:, None, None], new_jacobian, jacobian)
        damping = torch.where(better, damping / 3, damping * 4)
    return alpha


class FusedStep(NamedTuple):
    """One decoding step's fused distribution (as logits), the alpha used, fallback and fault rows."""

    logits: Tensor  # [B, V]
    alpha: Tensor  # [B, T]
    fallback: Tensor  # [B] True where a model's logits were not finite and the large model ruled
    fault: Tensor  # [B] True where the large model has no finite logit: the row cannot go on


AlphaSolver = Callable[[Tensor, ExpertShifts, Tensor], Tensor]


def make_solver(
    mode: str, static_weights: Tensor, spec: FusionSpec | None = None
) -> AlphaSolver | None:
    """The alpha solver of a fusion mode under `spec`'s bounds, grid and Newton steps (default:
    `FusionSpec()`'s); None for `none` (the large model alone). `static_weights` [T]: each expert's
    alpha in `static` mode."""
    spec = spec or FusionSpec()
    alpha_min, alpha_max = spec.alpha_min, spec.alpha_max
    grid_step, newton_steps = spec.grid_step, spec.newton_steps
    if mode == "none":
        return None
    if mode == "static":
        return lambda large_logp, shifts, active: static_alpha(static_weights, active)
    if mode == "paper":
        return lambda large_logp, shifts, active: paper_alpha(
            large_logp, shifts, active,
            alpha_grid(alpha_min, alpha_max, grid_step, device=large_logp.device),
        )  # fmt: skip
    if mode == "dynamic":
        return lambda large_logp, shifts, active: dynamic_alpha(
            large_logp, shifts, active, alpha_min, alpha_max, grid_step, newton_steps
        )
    msg = f"unknown fusion mode {mode!r}; use none, static, paper or dynamic"
    raise ValueError(msg)


def fusion_step(
    large_logits: Tensor,
    small_logits: Tensor | None,
    expert_logits: Tensor | None,
    active: Tensor,
    solver: AlphaSolver | None,
) -> FusedStep:
    """Steps 1-4 of the module docstring for raw logits [B, V], [B, V], [B, T, V].

    -inf in a large row is a constraint (see the module docstring): the fused row is -inf there
    too. A row where any model has NaN or +inf, or a small model a non-finite logit on an allowed
    token, falls back to the large model (flagged); a row where the large model has no finite logit
    cannot be sampled: it is flagged in `fault` (its logits are zeros) and the caller ends that row
    alone, the other rows go on. Every input is masked rather than branched on, so the step never
    reads a tensor back to the host.
    """
    fused_models = solver is not None and expert_logits is not None and expert_logits.shape[1] > 0
    batch = large_logits.shape[0]
    allowed = torch.isfinite(large_logits)  # [B, V]
    fault = ~allowed.any(dim=-1)  # [B]
    # A faulty row reads as uniform zeros so the batch can still be sampled; the caller drops it.
    allowed |= fault[:, None]
    large_logits = torch.where(fault[:, None], 0.0, large_logits)
    large_logp = log_probs(torch.where(allowed, large_logits, -torch.inf))
    ok = (allowed | (large_logits == -torch.inf)).all(dim=-1) & ~fault  # no NaN or +inf
    if not fused_models:
        width = 0 if expert_logits is None else expert_logits.shape[1]
        return FusedStep(large_logp, large_logp.new_zeros(batch, width), ~ok, fault)
    ok &= finite_rows(
        torch.where(allowed, small_logits, 0.0), torch.where(allowed[:, None], expert_logits, 0.0)
    )
    keep = ok[:, None]
    clean_large = torch.where(keep, large_logp, 0.0)
    # Fallback rows read as uniform zeros (every token allowed) so the solver stays finite.
    restrict = allowed | ~keep  # [B, V]
    shifts = expert_shifts(
        log_probs(torch.where(keep, torch.where(restrict, small_logits, -torch.inf), 0.0)),
        log_probs(
            torch.where(
                keep[..., None],
                torch.where(restrict[:, None], expert_logits, -torch.inf),
                0.0,
            )
        ),
        restrict,
    )
    alpha = solver(clean_large, shifts, active) * keep
    fused = torch.where(keep, fuse(clean_large, shifts.deltas, alpha), large_logp)
    return FusedStep(fused, alpha, ~ok, fault)
