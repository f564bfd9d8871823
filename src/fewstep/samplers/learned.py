"""``learned``: a multistep solver whose few coefficients per step are fitted to one model.

Two forms of a linear multistep step from sigma_i to sigma_{i+1} (``r_i = sigma_{i+1} / sigma_i``):

    eps  (default):  x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j w_ij eps_{i-j},   eps_k = (x_k - D_k) / sigma_k
    data:            x_{i+1} = r_i x_i + (1 - r_i) sum_j w_ij D_{i-j},              j = 0 .. history - 1,

where ``D_k`` is the denoiser output at step k. DEIS with polynomials in log sigma (Zhang & Chen
2023; :func:`~fewstep.samplers.multistep.sample_deis`) is one choice of the eps weights,
DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) one of the data weights; they are used when none are
given. At few steps no fixed rule is accurate on every model, so, in the spirit of PAS (Wang et al.
2024, "Diffusion sampling correction via approximately 10 parameters") and AMED (Zhou et al. 2024),
the weights are learned per model and per grid, from the model's own trajectories:

1. a fine solution of the probability-flow ODE from a batch of noises, recorded at the grid's levels
   (DPM-Solver++(3M) on a grid that refines every interval ``substeps`` times in log sigma);
2. step by step, from the solver's *own* state so far (not the fine solution's: errors must be
   corrected, not assumed away), the weights of step i solve the linear least-squares problem
   ``min_w || x*_{i+1} - step_i(x_i, w) ||^2 + lambda || w - w_fixed ||^2`` in closed form; ``lambda``
   (``ridge`` times the mean squared norm of the terms) pulls towards the fixed rule, more strongly
   the shorter the step.

3. all the weights at once, by L-BFGS through the whole solve, on the end error plus a small pull
   towards the fine trajectory (:func:`refine_coefficients`), kept only if it also lowers the error
   of a quarter of the batch it did not see.

With ``start_from`` (a fixed multistep sampler in data form, e.g. UniPC) step 2 is skipped: step 3
starts from that sampler's own weights on the grid (:func:`multistep_weights`), which on networks ends
lower than starting from the step-by-step fit. Which start ends lowest depends on the network and the
budget: with a list (``start_from=[unipc, dpmpp_3m]``) ``DiffusionModel.sample`` fits from each and keeps
the one :func:`start_errors` ranks first on held-out noise.

That is ``history`` numbers per step (30 at 10 steps). Steps 1-2 cost ``fine NFE + steps`` network
calls on the fitting batch and no gradients, step 3 about ``50 steps`` calls with their backward
pass. The final step (to sigma = 0) is fitted to the fine solution's end: with ``end_sigma`` (what the
library passes, the schedule's smallest level) continued down to it and then denoised, so that a grid
whose final jump starts high learns to reach the ODE's end, not the denoiser's blurred output there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fewstep.samplers.multistep import _deis_weights
from fewstep.samplers.registry import batch_sigma, check_sigmas, get_sampler, register

FORMS = ("data", "eps")
REFINE_ITERATIONS = 40  # L-BFGS iterations of refine_coefficients, by default


def base_weights(form: str, sigmas: Sequence[float], i: int, history: int) -> list[float]:
    """The fixed rule a fit starts from, in the form of step i (padded with zeros to ``history``):
    DPM-Solver++(2M)'s ``(1 + 1/(2 rho), -1/(2 rho))``, ``rho = h_{i-1} / h_i``, for ``data``;
    DEIS's log-sigma weights over ``sigma_{i+1} - sigma_i`` (:func:`sample_deis`) for ``eps``."""
    last = sigmas[i + 1] == 0
    if form == "eps" and not last:
        k = min(history, i + 1)
        nodes = [math.log(sigmas[i - j]) for j in range(k)]
        weights = _deis_weights(nodes, math.log(sigmas[i]), math.log(sigmas[i + 1]), "log_sigma")
        weights = [w / (sigmas[i + 1] - sigmas[i]) for w in weights]
    elif form == "data" and i > 0 and not last and history >= 2:
        h = math.log(sigmas[i] / sigmas[i + 1])
        rho = math.log(sigmas[i - 1] / sigmas[i]) / h
        weights = [1 + 1 / (2 * rho), -1 / (2 * rho)]
    else:
        weights = [1.0]
    return (weights + [0.0] * history)[:history]


def _term(form: str, x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    return denoised if form == "data" else (x - denoised) / sigma


def _step(form: str, x: Tensor, sigma: float, sigma_next: float, combination: Tensor) -> Tensor:
    """``r x + (1 - r) combination`` (data) or ``x + (sigma' - sigma) combination`` (eps)."""
    if form == "data":
        r = sigma_next / sigma
        return r * x + (1 - r) * combination
    return x + (sigma_next - sigma) * combination


def start_candidates(start_from: str | Sequence[str] | None) -> list[str]:
    """``start_from`` as a list of sampler names: ``[]`` for none, ``[name]`` for one name; a list (e.g.
    ``[unipc, dpmpp_3m]``, any sequence, an OmegaConf list too) is the candidates to choose from."""
    if start_from is None:
        return []
    return [start_from] if isinstance(start_from, str) else [str(name) for name in start_from]


def _check(form: str, history: int, start_from: str | Sequence[str] | None = None) -> None:
    if form not in FORMS:
        raise ValueError(f"sampler.form must be one of {', '.join(FORMS)}, got {form!r}")
    if not isinstance(history, int) or isinstance(history, bool) or history < 1:
        raise ValueError(f"sampler.history must be an integer >= 1, got {history!r}")
    if start_from is not None:
        names = start_candidates(start_from)
        if not names:
            raise ValueError("sampler.start_from=[] names no sampler: give one (unipc) or a list, or null")
        for name in names:
            get_sampler(name)  # a known name, or the list of them
        if form != "data":
            raise ValueError(
                f"sampler.start_from={start_from} gives weights on the denoiser outputs: set sampler.form=data"
            )


@torch.no_grad()
def multistep_weights(name: str, sigmas: Tensor, history: int, **options) -> list[list[float]]:
    """The data-form weights (module docstring) that make ``learned`` the fixed sampler ``name`` on
    this grid: ``x_{i+1} = r_i x_i + (1 - r_i) sum_j w_ij D_{i-j}``, ``x_i`` the state the denoiser
    sees at step i.

    A multistep method (DPM-Solver++(2M/3M), UniPC with its corrector, ...) is linear in the start and
    the denoiser outputs, so running it on a denoiser that returns independent random vectors and solving
    for each step's weights by least squares recovers them exactly (UniPC-2's corrector, which moves the
    state after its output is taken, becomes part of the next step's weights on three outputs). A
    sampler of another form (two calls per step, fresh noise, more than ``history`` outputs per step)
    leaves a residual and is refused."""
    s = sigmas.double().tolist()
    generator = torch.Generator().manual_seed(0)
    seen: list[Tensor] = []
    outputs: list[Tensor] = []

    def probe(x: Tensor, sigma: Tensor, **cond) -> Tensor:
        seen.append(x.clone())
        outputs.append(torch.randn(x.shape, generator=generator, dtype=x.dtype))
        return outputs[-1]

    start = torch.randn((1, 512), generator=generator, dtype=torch.float64) * s[0]
    seen_end = get_sampler(name)(probe, start, sigmas.double(), **options)
    if len(outputs) != len(s) - 1:
        raise ValueError(
            f"sampler.start_from={name} calls the network {len(outputs)} times on {len(s) - 1} steps; "
            "choose a multistep sampler (one call per step), e.g. unipc or dpmpp_2m"
        )
    states, weights = [*seen, seen_end], []
    for i in range(len(s) - 1):
        r = s[i + 1] / s[i]
        columns = torch.stack([outputs[i - j].flatten() for j in range(min(history, i + 1))], 1)
        target = (states[i + 1] - r * states[i]).flatten()
        w = torch.linalg.lstsq(columns, target[:, None]).solution.flatten()
        if float((columns @ w - target).abs().max()) > 1e-8 * (1 + float(target.abs().max())):
            raise ValueError(
                f"sampler.start_from={name} is not a multistep method on the last {history} denoiser outputs "
                "(fresh noise, eps-form weights or more outputs per step): raise sampler.history, or choose "
                "unipc (history 3) or dpmpp_2m (2)"
            )
        weights.append(((w / (1 - r)).tolist() + [0.0] * history)[:history])
    return weights


@register("learned")
@torch.no_grad()
def sample_learned(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    form: str = "eps",
    history: int = 3,
    coefficients: list[list[float]] | None = None,
    start_from: str | Sequence[str] | None = None,
) -> Tensor:
    """Learned multistep (module docstring): ``coefficients[i]`` are step i's weights on the newest
    ``history`` outputs (newest first). Without them this is the fixed rule of ``form``
    (:func:`base_weights`, no lower-order final steps), or with ``start_from`` that sampler itself
    (:func:`multistep_weights`); ``DiffusionModel.sample("learned")`` fits them for the model and grid
    (:func:`fit_coefficients`, from ``start_from``'s weights when given; from each of a list of them,
    keeping the best) and caches them beside the checkpoint.
    """
    _check(form, history, start_from)
    sigmas = check_sigmas(sigmas, x)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    if coefficients is not None and (len(coefficients) != steps or any(len(w) != history for w in coefficients)):
        raise ValueError(
            f"sampler.coefficients hold {len(coefficients)} steps of weights; this grid has {steps} steps of "
            f"{history}: fit them for this grid (DiffusionModel.sample('learned') does)"
        )
    if coefficients is not None:
        weights = coefficients
    elif start_from is not None:
        if len(start_candidates(start_from)) > 1:
            raise ValueError(
                f"sampler.start_from={list(start_from)} is a choice made when fitting: sample through "
                "DiffusionModel.sample('learned') (or sample.py), which fits each and keeps the best, or name one"
            )
        weights = multistep_weights(start_candidates(start_from)[0], sigmas.cpu(), history)
    else:
        weights = [base_weights(form, s, i, history) for i in range(steps)]
    return _solve(denoiser, x, sigmas, weights, form, history, cond, callback)


def _solve(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    weights: Sequence[Sequence[float]] | Tensor,
    form: str,
    history: int,
    cond: dict | None,
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """The steps of :func:`sample_learned` with step i's weights ``weights[i]``; differentiable in them
    when they are a tensor (:func:`refine_coefficients`)."""
    s = sigmas.tolist()
    terms: list[Tensor] = []  # newest first
    for i in range(len(s) - 1):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        terms = [_term(form, x, s[i], denoised), *terms[: history - 1]]
        x = _step(form, x, s[i], s[i + 1], sum(w * t for w, t in zip(weights[i], terms, strict=False)))
    return x


@torch.no_grad()
def fine_trajectory(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sequence[float],
    substeps: int = 16,
    cond: dict | None = None,
    start_sigma: float | None = None,
    end_sigma: float | None = None,
) -> list[Tensor]:
    """The probability-flow ODE solution from ``x`` at ``start_sigma`` (default ``sigmas[0]``) recorded at
    every positive level of ``sigmas`` and, last, its end: continued down to ``end_sigma`` when that is
    below the smallest positive level (default: that level), then denoised. DPM-Solver++(3M) with every
    interval cut into ``substeps`` equal steps in log sigma, the one down to ``end_sigma`` into twice
    as many (it spans more log sigma than a grid's interval).

    The end matters when a grid's last positive level is high (a trailing or searched grid's final
    jump starts at sigma ~0.5): the denoiser's output there is a blurred mean, not where the ODE ends
    (0.059 RMS apart on the ``make train`` model at sigma 0.5), so a fit aimed at it misses the
    solution by that much however good its weights."""
    positive = [float(v) for v in sigmas if v > 0]
    above = start_sigma is not None and start_sigma > positive[0] * (1 + 1e-6)  # (not a rounding of the top)
    if above:  # a grid that starts below the top: the solution from the top, recorded from sigmas[0] on
        positive = [float(start_sigma), *positive]
    recorded = len(positive)
    marks = {k * substeps for k in range(recorded)}
    if end_sigma is not None and 0 < end_sigma < positive[-1] * (1 - 1e-6):  # (not a rounding of the last level)
        positive = [*positive, float(end_sigma)]  # not recorded: only its denoised end
    fine = [positive[0]]
    for j, (hi, lo) in enumerate(zip(positive[:-1], positive[1:], strict=True)):
        n = substeps if j < recorded - 1 else 2 * substeps  # the way to the end spans more log sigma
        fine += [math.exp(math.log(hi) + (k / n) * (math.log(lo) - math.log(hi))) for k in range(1, n + 1)]
    states: list[Tensor] = []

    def record(info: dict) -> None:
        if info["i"] in marks:
            states.append(info["x"].clone())
        if info["i"] == len(fine) - 1:
            states.append(info["denoised"].clone())

    grid = torch.tensor([*fine, 0.0], dtype=torch.float64)
    get_sampler("dpmpp_3m")(denoiser, x, grid, callback=record, cond=cond, lower_order_final=False)
    return states[1:] if above else states


@torch.no_grad()
def fit_coefficients(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    sigmas: Tensor,
    *,
    form: str = "eps",
    history: int = 3,
    ridge: float = 1e-3,
    substeps: int = 16,
    refine: int = REFINE_ITERATIONS,
    chunk: int = 16,
    cond: dict | None = None,
    start_sigma: float | None = None,
    end_sigma: float | None = None,
    start_from: str | Sequence[str] | None = None,
) -> list[list[float]]:
    """Fit :func:`sample_learned`'s weights for this denoiser and grid on ``noise`` ~ N(0, I) (a batch
    of the model's sample shape): sequential ridge least squares against the fine ODE solution
    (module docstring), then ``refine`` L-BFGS iterations on the end error (:func:`refine_coefficients`;
    0: none). The fit costs ``substeps * (positive levels - 1) + 1`` fine calls plus one per step.

    ``start_sigma``: the level the solution to match starts from, ``noise * start_sigma``, when the grid
    starts lower (a searched start, ``optimize_sigmas(move_start=True)``): the sampler still starts from
    ``noise * sigmas[0]``, and its weights learn to reach the solution from the top, not the one from
    its own start (default: ``sigmas[0]``; one more interval of ``substeps`` fine calls).

    ``end_sigma``: the level the solution to match is continued down to before its final denoising,
    when the grid's last positive level is higher (:func:`fine_trajectory`; the library passes the
    schedule's smallest level, where the reference solutions end): the last step learns to reach the
    ODE's end, not the denoiser's blurred output at that level (``2 substeps`` more fine calls).

    ``start_from``: a fixed multistep sampler (``form="data"``; e.g. ``"unipc"``): instead of the
    sequential fit, the refinement starts from that sampler's own weights on this grid
    (:func:`multistep_weights`), and the held-out check keeps them unless it beats them. The sequential
    fit pulls every step onto the fine trajectory, a basin the end-error refinement does not leave;
    from UniPC's weights on UniPC's searched grid it ends lower (``make train`` model at 10 NFE:
    0.0384 against 0.0408, the cosine v-prediction model 0.0259 against 0.0304; level at 5)."""
    _check(form, history, start_from)
    if len(start_candidates(start_from)) > 1:
        raise ValueError(f"fit_coefficients fits from one sampler; fit each of {list(start_from)} and compare them")
    start_from = start_candidates(start_from)[0] if start_from is not None else None
    sigmas = check_sigmas(sigmas.double().cpu(), noise.new_empty(0, dtype=torch.float64))
    s, steps = sigmas.tolist(), len(sigmas) - 1
    if start_from is not None and refine <= 0:  # nothing to fit: no fine trajectory needed
        return multistep_weights(start_from, sigmas, history)
    top = s[0] if start_sigma is None else max(float(start_sigma), s[0])
    x = noise * s[0]
    # x*_0 .. at the grid's levels, then the end
    targets = fine_trajectory(denoiser, noise * top, s, substeps, cond, start_sigma=top, end_sigma=end_sigma)
    coefficients: list[list[float]] = []
    if start_from is not None:
        coefficients = multistep_weights(start_from, sigmas, history)
    terms: list[Tensor] = []
    for i in range(steps if start_from is None else 0):  # the sequential fit
        denoised = denoiser(x, batch_sigma(sigmas[i].to(x), x), **(cond or {}))
        terms = [_term(form, x, s[i], denoised), *terms[: history - 1]]
        # columns: what each weight adds to x'; target: what x' must add to the part without weights
        zero = torch.zeros_like(x)
        features = torch.stack([(_step(form, zero, s[i], s[i + 1], t)).double().flatten() for t in terms], 1)
        target = (targets[i + 1] - _step(form, x, s[i], s[i + 1], zero)).double().flatten()
        base = torch.tensor(base_weights(form, s, i, history)[: len(terms)], dtype=torch.float64)
        gram = features.T @ features
        # The penalty is measured on the terms themselves, not on the step's share (1 - r) of them:
        # a tiny step (two nearly equal levels) then keeps the fixed rule's weights instead of blowing
        # them up to cancel an error it cannot fix.
        lam = ridge * float(gram.diagonal().mean()) / max((1 - s[i + 1] / s[i]) ** 2, 1e-12)
        eye = torch.eye(len(terms), dtype=torch.float64)
        weights = torch.linalg.solve(gram + lam * eye, features.T @ target + lam * base)
        coefficients.append((weights.tolist() + [0.0] * history)[:history])
        x = _step(form, x, s[i], s[i + 1], sum(float(w) * t for w, t in zip(weights, terms, strict=True)))
    if refine > 0:
        coefficients = refine_coefficients(
            denoiser, noise * s[0], sigmas, coefficients, targets, form=form, iterations=refine, chunk=chunk, cond=cond
        )
    return coefficients


def refine_coefficients(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    coefficients: list[list[float]],
    trajectory: Sequence[Tensor],
    *,
    form: str = "eps",
    iterations: int = REFINE_ITERATIONS,
    chunk: int = 16,
    trajectory_weight: float = 1e-3,
    cond: dict | None = None,
) -> list[list[float]]:
    """All the weights at once: L-BFGS on the end error ``|| solve(x; w) - x*_end ||^2`` plus
    ``trajectory_weight`` times the squared distances of the states along the way to the fine
    trajectory's (``trajectory``: :func:`fine_trajectory`), the gradient taken through the whole solve
    (every network call), from the sequential fit's weights.

    The sequential fit pulls each step onto the fine trajectory; what matters is the end, and a step
    may undo the error of an earlier one (the cancellation LD3, Tong et al. 2025, finds for the grid;
    AMED, Zhou et al. 2024, and PAS likewise train their few parameters on the end error). The end
    error alone is not enough: on the 784-d benchmark mixture it halved the error of most held-out
    samples but sent 3 of 256 to the wrong component, since states free to stray from the fine
    trajectory can cross the boundary between two modes; the small pull towards it prevents that.
    The refinement runs on three quarters of the batch; the last quarter decides between the refined
    and the sequential weights, so an overfitted refinement is dropped. ``chunk`` images go through
    the solve at a time (memory: ``steps`` network calls' activations of ``chunk`` images); each
    L-BFGS evaluation costs ``steps`` calls and their backward pass per image.
    """
    history, target = len(coefficients[0]), trajectory[-1]
    trajectory = trajectory[1:-1]  # the states after steps 0 .. steps - 2
    grid = sigmas.to(x)
    checked = len(x) // 4
    fit = slice(0, len(x) - checked)
    weights = torch.tensor(coefficients, dtype=torch.float64, requires_grad=True)
    best: list = [float("inf"), coefficients]  # the best seen: a failed line search never makes them worse

    def error(part: slice, w: Tensor) -> Tensor:
        part_cond = {k: v[part] for k, v in (cond or {}).items()}
        states: list[Tensor] = []
        end = _solve(denoiser, x[part], grid, w.to(x.dtype), form, history, part_cond, lambda i: states.append(i["x"]))
        drift = sum((a - b[part]).double().pow(2).sum() for a, b in zip(states[1:], trajectory, strict=True))
        return (end.double() - target[part].double()).pow(2).sum() + trajectory_weight * drift

    def closure() -> Tensor:
        total, grad = 0.0, torch.zeros_like(weights)
        for start in range(fit.start, fit.stop, chunk):
            with torch.enable_grad():
                loss = error(slice(start, min(start + chunk, fit.stop)), weights)
                (part_grad,) = torch.autograd.grad(loss, weights)
            total, grad = total + loss.item(), grad + part_grad
        if math.isfinite(total) and bool(grad.isfinite().all()) and total < best[0]:
            best[:] = [total, weights.detach().tolist()]
        weights.grad = grad if grad.isfinite().all() else torch.zeros_like(grad)
        return torch.tensor(total if math.isfinite(total) else float("inf"), dtype=torch.float64)

    torch.optim.LBFGS([weights], lr=1, max_iter=iterations, line_search_fn="strong_wolfe").step(closure)
    if checked:
        with torch.no_grad():
            part = slice(fit.stop, len(x))
            sequential, refined = (float(error(part, torch.tensor(w))) for w in (coefficients, best[1]))
        if not refined < sequential:
            return coefficients
    return best[1]


@torch.no_grad()
def start_errors(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    candidates: Mapping[str, tuple[Tensor, Sequence[Sequence[float]]]],
    *,
    start_sigma: float,
    end_sigma: float,
    form: str = "data",
    history: int = 3,
    fine_steps: int = 256,
    cond: dict | None = None,
) -> dict[str, float]:
    """The RMS error of each fitted ``learned`` sampler in ``candidates`` (name -> its grid and weights,
    e.g. fitted from UniPC's and from DPM-Solver++(3M)'s weights, each on its own searched grid) to the
    probability-flow ODE solution from ``noise * start_sigma`` (DPM-Solver++(3M), ``fine_steps`` equal
    steps in log sigma down to ``end_sigma``, then denoised): what ``start_from=[...]`` keeps the best
    of. ``noise`` must be a batch none of them was searched or fitted on: a refinement that overfits its
    own noises then counts against it. Costs ``fine_steps + 1`` calls plus each candidate's steps.

    Which start wins depends on the network and the budget (``make train`` model: DPM-Solver++(3M) at 5
    calls, 0.0914 against 0.107 from UniPC; UniPC at 10, 0.0384 against 0.0650). On 32 noises this picked
    the better start in all four cells of the benchmark (two networks, 5 and 10 calls), although two of
    the held-out gaps were only 1-5 % (docs/samplers.md, "Choosing the start")."""
    levels = torch.linspace(math.log(start_sigma), math.log(end_sigma), fine_steps + 1, dtype=torch.float64).exp()
    fine = torch.cat([levels, levels.new_zeros(1)])
    reference = get_sampler("dpmpp_3m")(denoiser, noise * start_sigma, fine, cond=cond, lower_order_final=False)
    errors = {}
    for name, (sigmas, weights) in candidates.items():
        grid = sigmas.to(noise)
        x = sample_learned(denoiser, noise * grid[0], grid, cond=cond, form=form, history=history, coefficients=weights)
        errors[name] = float((x.double() - reference.double()).pow(2).mean().sqrt())
    return errors


def fitted_sampler(
    *,
    form: str = "eps",
    history: int = 3,
    substeps: int = 16,
    start_sigma: float | None = None,
    end_sigma: float | None = None,
) -> Callable[..., Tensor]:
    """``learned`` with its weights fitted (:func:`fit_coefficients`) to each grid it runs on, from the
    noise it starts from (``x / sigmas[0]``): the sampler to tune a grid for (``spacing=optimized``,
    :func:`~fewstep.samplers.optimize.optimize_sigmas`). A grid searched for the fixed rule is the
    wrong target: the fitted weights correct other errors than the fixed rule makes, and on the
    784-d benchmark mixture searching with the fit inside cut the held-out error at 5 and 10 steps
    2.4x and 1.4x (docs/samplers.md). Each run costs a fit, ``substeps (steps - 1) + 1 + steps``
    calls (``2 substeps`` more with ``end_sigma``), plus the ``steps`` calls of the run itself.
    ``start_sigma``: the level of the solution the search scores against (the top of its first grid),
    for grids whose start moves below it; ``end_sigma``: the level its reference descends to before
    denoising (:func:`fit_coefficients`)."""
    _check(form, history)

    def run_fitted(
        denoiser: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        *,
        generator: torch.Generator | None = None,
        cond: dict | None = None,
    ) -> Tensor:
        noise = x / float(sigmas[0])
        coefficients = fit_coefficients(  # the sequential fit alone: a refined fit per trial costs too much
            denoiser,
            noise,
            sigmas,
            form=form,
            history=history,
            substeps=substeps,
            refine=0,
            cond=cond,
            start_sigma=start_sigma,
            end_sigma=end_sigma,
        )
        return sample_learned(denoiser, x, sigmas, cond=cond, form=form, history=history, coefficients=coefficients)

    return run_fitted
