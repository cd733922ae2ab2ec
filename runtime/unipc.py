"""Wan 2.1's UniPC flow sampler as small pure-torch functions, matching diffusers' WanPipeline sampling.

It reproduces diffusers' ``UniPCMultistepScheduler`` (checked against diffusers 0.42) configured as the Wan 2.1
diffusers checkpoints are, i.e. as ``scripts/convert_wan_to_diffusers.py`` builds it for T2V
(``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
flow_shift=3.0)``), with every other argument at its default::

    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift (3.0 at 480p, 5.0 at 720p),
    num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
    disable_corrector=[], final_sigmas_type="zero", timestep_spacing="linspace" (unused with flow sigmas),
    thresholding=False, solver_p=None, use_dynamic_shifting=False, shift_terminal=None,
    use_karras_sigmas=use_exponential_sigmas=use_beta_sigmas=False

(``UniPCFlowSampler(order=k)`` reproduces ``solver_order=k``; Wan uses 2) and driven as ``WanPipeline`` drives it (``set_timesteps(num_steps)``, ``set_begin_index(0)``, then one
``step(noise_pred, t, latents)`` per timestep). In that configuration:

- sigmas: ``u = linspace(1, 1/1000, num_steps + 1)[:-1]`` (float64), ``s = shift*u / (1 + (shift-1)*u)``,
  ``s[0] -= 1e-6`` when ``|s[0] - 1| < 1e-6``, then a terminal 0.0, cast to float32;
- timesteps (what the transformer receives): ``int64(s * 1000)`` of the float64 sigmas, truncated toward zero;
- the model output is a velocity ``v``; UniPC works on the data prediction ``x0 = sample - sigma * v`` with
  ``alpha = 1 - sigma``, ``lambda = log(alpha) - log(sigma)``: a corrector (UniC, B(h) = expm1(-h)) re-solves the
  previous step from the previous corrected sample once the new ``x0`` is known, then a predictor (UniP) steps on;
  the first step is order 1 (warm-up) and so is the last (lower_order_final), which lands on ``x0``.

All scalar coefficients are computed once, in float64 from the float32 sigmas, when the sampler is built; a step is a
few tensor multiply-adds on the latent's device with Python-float coefficients (no host syncs). As in diffusers, a
bf16/fp16 velocity is multiplied by sigma rounded to its dtype (torch promotes the 0-dim sigma tensor to it) and the
data prediction and samples stay in the sample's dtype (float32 in WanPipeline).
"""

import math

import torch

from ddit_profiles import DDiTError

NUM_TRAIN_TIMESTEPS = 1000
_FIRST_SIGMA_EPS = 1e-6


def _wan_flow_sigmas_f64(num_steps: int, shift: float) -> list[float]:
    """-> num_steps Python floats (IEEE double, as numpy computes them): diffusers' shifted flow sigmas, no terminal."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise DDiTError(f"--steps must be at least 1, got {num_steps}")
    shift = float(shift)
    if not math.isfinite(shift) or shift <= 0.0:
        raise DDiTError(f"flow shift must be a positive number, got {shift}")
    # np.linspace(1, 1/T, n + 1): start + i * step, with the endpoint set exactly; [:-1] drops it.
    start, stop = 1.0, 1.0 / NUM_TRAIN_TIMESTEPS
    step = (stop - start) / num_steps
    base = [i * step + start for i in range(num_steps)]
    sigmas = [shift * u / (1 + (shift - 1) * u) for u in base]
    if math.fabs(sigmas[0] - 1) < _FIRST_SIGMA_EPS:  # keeps log(alpha) finite on the first steps
        sigmas[0] -= _FIRST_SIGMA_EPS
    return sigmas


def wan_flow_sigmas(num_steps: int, shift: float, device: torch.device | str | None = None) -> torch.Tensor:
    """-> [num_steps + 1] float32: Wan 2.1's shifted flow sigmas from just under 1.0 down, then a terminal 0.0.

    Equal to ``UniPCMultistepScheduler(...).set_timesteps(num_steps)`` ``.sigmas`` for the configuration in the
    module docstring; ``shift`` is ``flow_shift`` (3.0 at 480p, 5.0 at 720p).
    """
    sigmas = _wan_flow_sigmas_f64(num_steps, shift) + [0.0]
    return torch.tensor(sigmas, dtype=torch.float64).to(dtype=torch.float32, device=device)


def wan_flow_timesteps(num_steps: int, shift: float, device: torch.device | str | None = None) -> torch.Tensor:
    """-> [num_steps] int64: the transformer's timesteps, bit-exact with diffusers' ``.timesteps``.

    Truncates the float64 sigmas times 1000 as diffusers does; prefer it to ``timesteps_from_sigmas`` when the
    schedule is Wan's own.
    """
    sigmas = _wan_flow_sigmas_f64(num_steps, shift)
    return torch.tensor([int(s * NUM_TRAIN_TIMESTEPS) for s in sigmas], dtype=torch.int64, device=device)


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """[num_steps + 1] sigmas (terminal included) -> [num_steps] int64 timesteps: ``trunc(sigma * 1000)``.

    That is what diffusers hands the transformer (``torch.from_numpy(sigmas * 1000).to(torch.int64)``); cast it for
    engines that take float timesteps. Diffusers truncates the float64 sigmas: from float32 sigmas the result can
    differ by 1 where ``sigma * 1000`` lies within ~1e-4 of an integer (measured: never for shift 3.0 up to 221
    steps or shift 5.0 up to 686 steps; often with shift 1.0). ``wan_flow_timesteps`` is exact in every case.
    """
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise DDiTError(f"sigmas must be a 1-D schedule with a terminal entry, got shape {tuple(sigmas.shape)}")
    return torch.trunc(sigmas[:-1].to(torch.float64) * NUM_TRAIN_TIMESTEPS).to(torch.int64)


def flow_euler_step(
    sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Plain flow-matching Euler step (for comparison): sample + (sigma_next - sigma) * velocity."""
    return sample + (sigma_next - sigma) * velocity


def _lambda(sigma: float) -> float:
    """log-SNR of the flow schedule, log(alpha) - log(sigma) with alpha = 1 - sigma (+inf at sigma = 0)."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Small dense linear solve (Gaussian elimination with partial pivoting), as torch.linalg.solve in diffusers."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if m[pivot][col] == 0.0:
            raise DDiTError("UniPC coefficients are singular: the sigmas repeat")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _bh2_terms(h: float, order: int) -> tuple[float, float, list[float]]:
    """-> (h_phi_1, B_h, b[order]) of diffusers' UniPC B(h) = expm1(-h) ("bh2") with predict_x0."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def _update_weights(
    sig: list[float], lam: list[float], s0: int, t: int, order: int, corrector: bool
) -> tuple[float, list[float]]:
    """One UniP (predictor) or UniC (corrector) update from index s0 to t as a linear combination.

    -> (a, w): x_t = a * x_s0 + sum_j w[j] * m[s0 - j] (+ w[-1] * m[t] for the corrector), where m[i] is the data
    prediction at sigma i. ``order`` is the UniP order p (uses m[s0 .. s0-p+1]) or the UniC order (m[s0 .. s0-p+1]
    plus m[t]).
    """
    alpha_t, sigma_t, sigma_s0 = 1.0 - sig[t], sig[t], sig[s0]
    h = lam[t] - lam[s0]
    rks = [(lam[s0 - i] - lam[s0]) / h for i in range(1, order)]
    h_phi_1, b_h, b = _bh2_terms(h, order)
    a = sigma_t / sigma_s0
    # x_t = a*x - alpha_t*h_phi_1*m0 - alpha_t*B_h*(sum_i rho_i*(m_i - m0)/r_i [+ rho_t*(m_t - m0)])
    if corrector:
        if order == 1:
            rhos = [0.5]
        else:
            r_all = rks + [1.0]
            rhos = _solve([[r**i for r in r_all] for i in range(order)], b)
        rhos_hist, rho_t = rhos[:-1], rhos[-1]
    else:
        if order == 1:
            rhos_hist = []
        elif order == 2:
            rhos_hist = [0.5]
        else:
            rhos_hist = _solve([[r**i for r in rks] for i in range(order - 1)], b[:-1])
        rho_t = 0.0
    k = -alpha_t * b_h
    w = [-alpha_t * h_phi_1 - k * (sum(rho / r for rho, r in zip(rhos_hist, rks, strict=True)) + rho_t)]
    w += [k * rho / r for rho, r in zip(rhos_hist, rks, strict=True)]
    if corrector:
        w.append(k * rho_t)
    return a, w


def _combine(first: torch.Tensor, a: float, terms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    out = first * a
    for tensor, weight in terms:
        out = out.add(tensor, alpha=weight)
    return out


class UniPCFlowSampler:
    """Stateful UniPC multistep sampler over a fixed flow-sigma schedule (see the module docstring).

    Call ``step(velocity, i, sample)`` for ``i = 0 .. num_steps - 1`` in order, with ``sample`` the latent the model
    saw at ``sigmas[i]`` and ``velocity`` its (guided) output; each call returns the latent for ``sigmas[i + 1]``,
    equal to diffusers' ``scheduler.step(velocity, timesteps[i], sample).prev_sample``. Calling ``step`` with index 0
    starts a new trajectory. Latents may have any shape ([B, C, F, H, W] for Wan) and live on any device.
    """

    def __init__(self, sigmas: torch.Tensor, order: int = 2):
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise DDiTError(f"UniPC order must be a positive integer, got {order}")
        if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.shape[0] < 2:
            shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
            raise DDiTError(f"sigmas must be a 1-D tensor [num_steps + 1] with a terminal entry, got {shape}")
        sig = [float(s) for s in sigmas.detach().to("cpu", torch.float64).tolist()]  # the one host read
        if not all(0.0 < s < 1.0 for s in sig[:-1]) or not 0.0 <= sig[-1] < 1.0:
            raise DDiTError("flow sigmas must lie in (0, 1), with the terminal one in [0, 1)")
        if any(b >= a for a, b in zip(sig, sig[1:], strict=False)):
            raise DDiTError("flow sigmas must be strictly decreasing")
        self.sigmas = sig
        self._sigmas_cpu = sigmas.detach().to("cpu")
        self._sigmas_by_dtype: dict[torch.dtype, list[float]] = {}
        self.order = order
        self.num_steps = n = len(sig) - 1
        lam = [_lambda(s) for s in sig]
        # diffusers: this_order = min(solver_order, num_steps - k) (lower_order_final), then warm-up min(., k + 1)
        self._orders = [min(order, n - k, k + 1) for k in range(n)]
        self._predictor = [_update_weights(sig, lam, k, k + 1, self._orders[k], corrector=False) for k in range(n)]
        # UniC at step k re-solves sigma[k-1] -> sigma[k] with the order the predictor used at step k - 1.
        self._corrector = [None] + [
            _update_weights(sig, lam, k - 1, k, self._orders[k - 1], corrector=True) for k in range(1, n)
        ]
        self._history: list[torch.Tensor] = []  # data predictions, newest first
        self._last_sample: torch.Tensor | None = None
        self._next_index = 0

    def _sigma_as(self, dtype: torch.dtype) -> list[float]:
        """The sigmas rounded to ``dtype`` as Python floats (computed on the CPU once per dtype)."""
        cached = self._sigmas_by_dtype.get(dtype)
        if cached is None:
            cached = self._sigmas_by_dtype[dtype] = [float(s) for s in self._sigmas_cpu.to(dtype).tolist()]
        return cached

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Velocity at ``sigmas[step_index]`` and the sample it saw -> the sample at ``sigmas[step_index + 1]``."""
        if step_index == 0:
            self._history, self._last_sample = [], None
        elif step_index != self._next_index:
            raise DDiTError(f"UniPC steps must run in order from 0: expected step {self._next_index}, got {step_index}")
        if step_index >= self.num_steps:
            raise DDiTError(f"step {step_index} is past the last of {self.num_steps} steps")
        if velocity.shape != sample.shape:
            raise DDiTError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} differ in shape")
        # convert_model_output, flow_prediction: diffusers multiplies by a 0-dim sigma tensor, which torch's type
        # promotion first casts to the velocity's dtype (bf16 velocity -> bf16 sigma); a Python float of that value
        # gives the same product.
        x0 = sample - self._sigma_as(velocity.dtype)[step_index] * velocity
        if step_index > 0:  # UniC: redo the previous update from the last corrected sample with the new x0
            a, w = self._corrector[step_index]
            hist = self._history[: len(w) - 1]
            terms = list(zip(hist, w[:-1], strict=True)) + [(x0, w[-1])]
            sample = _combine(self._last_sample, a, terms).to(sample.dtype)
        self._history = ([x0] + self._history)[: self.order]
        self._last_sample = sample
        a, w = self._predictor[step_index]  # UniP
        out = _combine(sample, a, list(zip(self._history[: len(w)], w, strict=True))).to(sample.dtype)
        self._next_index = step_index + 1
        return out
