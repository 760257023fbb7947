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

Order of operations in one decoding step:
    1. log-softmax every model's logits (`log_probs`), drop rows with non-finite values (`finite_rows`);
    2. shifts d_t and targets f_t, r_t from the small models (`expert_shifts`);
    3. alpha from the mode: zeros (`none`), fixed (`static`), grid (`paper_alpha`) or
       continuous (`dynamic_alpha`);
    4. fused logits (`fuse`), then sampling (elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

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


def expert_shifts(small_logp: Tensor, expert_logp: Tensor) -> ExpertShifts:
    """d_t = log Q_t - log Q;  f_t = sum_v Q_t (log Q_t - log Q);  r_t = sum_v Q (log Q - log Q_t)."""
    deltas = expert_logp - small_logp[:, None, :]  # [B, T, V]
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
    for a in grid.tolist():
        forward, reverse = _axis_kls(large_logp, centred, torch.full_like(shifts.forward_kl, a))
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
) -> Tensor:
    """Continuous minimiser of L over [alpha_min, alpha_max]^T, joint over the active experts.

    L = n * [(KL(P~||P) - mean f)^2 + (KL(P||P~) - mean r)^2] + const, so the solver matches the
    experts' mean forward and reverse shift. Three stages, vectorised over rows and experts:
      1. scan every single-expert axis on the grid (the paper's candidates): L is not unimodal in
         general (the curve (KL(P~||P), KL(P||P~)) can pass the target twice), so the scan is what
         makes the result never worse than the paper's;
      2. safeguarded (Gauss-)Newton with analytic derivatives inside the best grid cell of each axis;
      3. from the best axis point, Levenberg-Marquardt steps on the two residuals in R^T, each
         accepted only if it lowers L (several experts can match both targets at once).
    """
    mean_forward, mean_reverse = _active_means(shifts, active)
    centred = _centre(large_logp, shifts.deltas)
    grid = alpha_grid(alpha_min, alpha_max, grid_step, device=large_logp.device)
    axis_alpha, axis_loss = _best_axis(
        large_logp, centred, active, mean_forward, mean_reverse, grid, newton_steps
    )
    alpha = _joint_refine(
        large_logp, centred, active, mean_forward, mean_reverse,
        axis_alpha, axis_loss, alpha_min, alpha_max, joint_steps,
    )  # fmt: skip
    return torch.nan_to_num(alpha, nan=0.0).clamp(alpha_min, alpha_max) * active


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


def _axis_terms(
    large_logp: Tensor,
    centred: Tensor,
    centred_sq: Tensor,
    a: Tensor,
    mean_forward: Tensor,
    mean_reverse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """h, h' and the Gauss-Newton h'' at alpha = a_t * e_t for every expert t ([B, T] each).

    With K1 = K'(a) = E_P~[d], K2 = K''(a) = Var_P~(d), x = KL(P~||P) = a K1 - K, y = KL(P||P~) = K,
    x' = a K2, y' = K1 and h = (x - mean f)^2 + (y - mean r)^2:
        h' = 2 (x - f) a K2 + 2 (y - r) K1,    h'' ~ 2 (a K2)^2 + 2 K1^2  (always > 0 off a = 0).
    """
    logits = large_logp[:, None, :] + a[..., None] * centred  # [B, T, V]
    top = logits.amax(-1, keepdim=True)
    unnorm = torch.exp(logits - top)
    total = unnorm.sum(-1)
    cgf = top[..., 0] + torch.log(total)  # K
    mean = (unnorm * centred).sum(-1) / total  # K1
    var = ((unnorm * centred_sq).sum(-1) / total - mean**2).clamp(min=0)  # K2
    res_x = a * mean - cgf - mean_forward[:, None]
    res_y = cgf - mean_reverse[:, None]
    h = res_x**2 + res_y**2
    dh = 2 * res_x * a * var + 2 * res_y * mean
    d2h = 2 * (a * var) ** 2 + 2 * mean**2
    return h, dh, d2h


def _grid_argmin(
    large_logp: Tensor,
    centred: Tensor,
    mean_forward: Tensor,
    mean_reverse: Tensor,
    grid: Tensor,
    stride: int = 4,
) -> Tensor:
    """Index of the best grid point on every axis ([B, T]) without evaluating the whole grid.

    For a >= 0 both KLs are non-decreasing along an axis, so inside a cell [c_j, c_j+1] the point
    (x, y) stays in the box [x_j, x_j+1] x [y_j, y_j+1] and h >= LB_j, the squared distance from the
    target (mean f, mean r) to that box. So: evaluate every `stride`-th grid point, then the grid
    points inside the two cells of lowest bound; a cell whose bound is still below the best value
    found is scanned in full (rare). The result is the exact argmin over the grid.
    """
    batch, experts = mean_forward.shape[0], centred.shape[1]
    target_x, target_y = mean_forward[:, None], mean_reverse[:, None]

    def evaluate(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, y = _axis_kls(large_logp, centred, grid[index])
        h = (x - target_x) ** 2 + (y - target_y) ** 2
        return x, y, torch.nan_to_num(h, nan=torch.inf)

    def full_scan() -> Tensor:
        everywhere = torch.arange(grid.numel(), device=grid.device)
        h = torch.stack([evaluate(i.expand(batch, experts))[2] for i in everywhere], dim=-1)
        return h.argmin(dim=-1)

    if grid[0] < 0 or grid.numel() <= 2 * stride:
        return full_scan()
    last = grid.numel() - 1
    coarse = torch.unique(torch.cat([torch.arange(0, last, stride), torch.tensor([last])])).to(
        grid.device
    )
    xs, ys, hs = (
        torch.stack(v, -1)
        for v in zip(*(evaluate(c.expand(batch, experts)) for c in coarse), strict=True)
    )
    best_h, best = hs.min(dim=-1)
    best = coarse[best]
    gap_x = (xs[..., :-1] - target_x[..., None]).clamp(min=0) + (
        target_x[..., None] - xs[..., 1:]
    ).clamp(min=0)
    gap_y = (ys[..., :-1] - target_y[..., None]).clamp(min=0) + (
        target_y[..., None] - ys[..., 1:]
    ).clamp(min=0)
    bound = gap_x**2 + gap_y**2  # [B, T, cells]
    refined = bound.argsort(dim=-1)[..., :2]  # [B, T, 2]
    for cell in refined.unbind(-1):
        start, end = coarse[cell], coarse[cell + 1]
        for offset in range(1, stride):
            index = torch.minimum(start + offset, end)
            h = evaluate(index)[2]
            better = h < best_h
            best_h, best = torch.where(better, h, best_h), torch.where(better, index, best)
    open_cells = bound <= best_h[..., None] * (1 + 1e-6) + 1e-12
    open_cells.scatter_(-1, refined, False)
    unresolved = open_cells.any(dim=-1)
    if bool(unresolved.any()):
        best = torch.where(unresolved, full_scan(), best)
    return best


def _best_axis(
    large_logp: Tensor,
    centred: Tensor,
    active: Tensor,
    mean_forward: Tensor,
    mean_reverse: Tensor,
    grid: Tensor,
    newton_steps: int,
) -> tuple[Tensor, Tensor]:
    """Stages 1-2: minimise h along every axis, keep the best axis per row -> alpha [B, T], h [B]."""
    batch, experts = active.shape
    k = _grid_argmin(large_logp, centred, mean_forward, mean_reverse, grid)  # [B, T]
    last = grid.numel() - 1
    a, left, right = grid[k], grid[(k - 1).clamp(min=0)], grid[(k + 1).clamp(max=last)]
    centred_sq = centred**2
    h, dh, d2h = _axis_terms(large_logp, centred, centred_sq, a, mean_forward, mean_reverse)
    best_a, best_h = a, h
    for _ in range(newton_steps):
        # The minimum lies on the side h' points away from. At a bracket end h' carries no side
        # to drop (at alpha = 0 it is 0 up to rounding), so only interior points shrink the bracket.
        right = torch.where((dh > 0) & (a > left), a, right)
        left = torch.where((dh < 0) & (a < right), a, left)
        newton = a - dh / d2h
        inside = (d2h > 0) & (newton > left) & (newton < right)
        a = torch.where(inside, newton, (left + right) / 2)
        h, dh, d2h = _axis_terms(large_logp, centred, centred_sq, a, mean_forward, mean_reverse)
        better = h < best_h
        best_a, best_h = torch.where(better, a, best_a), torch.where(better, h, best_h)
    best_h = torch.where(active, torch.nan_to_num(best_h, nan=torch.inf), torch.inf)
    axis = best_h.argmin(dim=-1)  # [B]
    rows = torch.arange(batch, device=best_a.device)
    alpha = torch.zeros_like(best_a)
    alpha[rows, axis] = best_a[rows, axis]
    return alpha, best_h[rows, axis]


def _joint_terms(
    large_logp: Tensor, centred: Tensor, alpha: Tensor, mean_forward: Tensor, mean_reverse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Residuals ([B, 2]), their Jacobian ([B, 2, T]) and h ([B]) at a joint alpha.

    dKL(P||P~)/dalpha = E_P~[d];  dKL(P~||P)/dalpha = Cov_P~(d) alpha = E_P~[d s] - E_P~[d] E_P~[s]
    with s = sum_t alpha_t d_t (no T x T matrix needed).
    """
    shift = torch.einsum("bt,btv->bv", alpha, centred)  # s
    cgf = torch.logsumexp(large_logp + shift, dim=-1)  # [B]
    weights = torch.exp(large_logp + shift - cgf[:, None])  # [B, V]
    mean = torch.einsum("bv,btv->bt", weights, centred)  # [B, T]
    mean_shift = (weights * shift).sum(-1)  # [B]
    cov_alpha = torch.einsum("bv,btv->bt", weights * shift, centred) - mean * mean_shift[:, None]
    residual = torch.stack([mean_shift - cgf - mean_forward, cgf - mean_reverse], -1)
    jacobian = torch.stack([cov_alpha, mean], dim=1)
    return residual, jacobian, (residual**2).sum(-1)


def _joint_refine(
    large_logp: Tensor,
    centred: Tensor,
    active: Tensor,
    mean_forward: Tensor,
    mean_reverse: Tensor,
    alpha: Tensor,
    loss: Tensor,
    alpha_min: float,
    alpha_max: float,
    steps: int,
) -> Tensor:
    """Stage 2: damped minimum-norm Gauss-Newton on the two residuals, accepted only if h drops."""
    if active.shape[1] < 2:
        return alpha
    mask = active.to(alpha.dtype)
    residual, jacobian, _ = _joint_terms(large_logp, centred, alpha, mean_forward, mean_reverse)
    damping = torch.full_like(loss, 1e-3)
    eye = torch.eye(2, dtype=alpha.dtype, device=alpha.device)
    for _ in range(steps):
        jac = jacobian * mask[:, None, :]  # inactive experts stay at 0
        gram = jac @ jac.transpose(1, 2)  # [B, 2, 2]
        scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-12)
        system = gram + (damping * scale)[:, None, None] * eye
        step = -(jac.transpose(1, 2) @ torch.linalg.solve(system, residual[..., None]))[..., 0]
        candidate = (alpha + step).clamp(alpha_min, alpha_max) * mask
        new_residual, new_jacobian, new_loss = _joint_terms(
            large_logp, centred, candidate, mean_forward, mean_reverse
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
    mode: str,
    static_weights: Tensor,
    alpha_min: float = 0.0,
    alpha_max: float = 2.0,
    grid_step: float = 0.1,
    newton_steps: int = 3,
) -> AlphaSolver | None:
    """The alpha solver of a fusion mode; None for `none` (the large model alone)."""
    if mode == "none":
        return None
    if mode == "static":
        return lambda large_logp, shifts, active: static_alpha(static_weights, active)
    if mode == "paper":
        grid = alpha_grid(alpha_min, alpha_max, grid_step)
        return lambda large_logp, shifts, active: paper_alpha(
            large_logp, shifts, active, grid.to(large_logp.device)
        )
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

    A row where any model's logits are not finite falls back to the large model (flagged); a row
    where the large model itself has no finite logit cannot be sampled: it is flagged in `fault`
    (its logits are zeros) and the caller ends that row alone, the other rows go on.
    """
    fused_models = solver is not None and expert_logits is not None and expert_logits.shape[1] > 0
    ok = (
        finite_rows(large_logits, small_logits, expert_logits)
        if fused_models
        else finite_rows(large_logits)
    )
    if not bool(ok.all()):
        return _fusion_step_with_faults(
            large_logits, small_logits, expert_logits, active, solver, fused_models
        )
    large_logp = log_probs(large_logits)
    no_fault = torch.zeros_like(ok)
    if not fused_models:
        width = 0 if expert_logits is None else expert_logits.shape[1]
        return FusedStep(large_logp, large_logp.new_zeros(ok.shape[0], width), ~ok, no_fault)
    shifts = expert_shifts(log_probs(small_logits), log_probs(expert_logits))
    alpha = solver(large_logp, shifts, active)
    return FusedStep(fuse(large_logp, shifts.deltas, alpha), alpha, ~ok, no_fault)


def _fusion_step_with_faults(
    large_logits: Tensor,
    small_logits: Tensor | None,
    expert_logits: Tensor | None,
    active: Tensor,
    solver: AlphaSolver | None,
    fused_models: bool,
) -> FusedStep:
    """`fusion_step` when some row has a non-finite logit somewhere (masks every input)."""
    batch = large_logits.shape[0]
    large_ok = torch.isfinite(large_logits)
    fault = ~large_ok.any(dim=-1)  # [B]
    # A faulty row reads as uniform zeros so the batch can still be sampled; the caller drops it.
    large_ok |= fault[:, None]
    large_logits = torch.where(fault[:, None], 0.0, large_logits)
    large_logp = log_probs(torch.where(large_ok, large_logits, -torch.inf))
    ok = large_ok.all(dim=-1) & ~fault
    if not fused_models:
        width = 0 if expert_logits is None else expert_logits.shape[1]
        return FusedStep(large_logp, large_logp.new_zeros(batch, width), ~ok, fault)
    ok &= finite_rows(small_logits, expert_logits)
    keep = ok[:, None]
    clean_large = torch.where(keep, large_logp, 0.0)
    shifts = expert_shifts(
        log_probs(torch.where(keep, small_logits, 0.0)),
        log_probs(torch.where(keep[..., None], expert_logits, 0.0)),
    )
    alpha = solver(clean_large, shifts, active) * keep
    fused = torch.where(keep, fuse(clean_large, shifts.deltas, alpha), large_logp)
    return FusedStep(fused, alpha, ~ok, fault)
