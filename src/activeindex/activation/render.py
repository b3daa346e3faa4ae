"""The budgeted perturbation and the rendered image, forward and backward written out, tile by tile.

For a batch of originals ``x0`` and parameters ``δ`` (both (B, 3, H, W)), activation renders

    p = bound ⊙ tanh(δ),   mse = Σ p² / n_valid,   s = min(1, sqrt(mse_max / mse))
    x = clamp(x0 + s · p, 0, 1),   image loss = mse · s²

(:mod:`activeindex.activation.optimize`). Written as a chain of torch ops, that is some twenty passes
over full-resolution tensors per iteration (each op reads and writes the whole batch), and at photo
sizes the passes, not the model, are the cost: a 16-image batch of 1024×768 photos holds 150 MB per
tensor, which a 2-core machine streams at a few GB/s. :class:`Render` computes the same values and
gradients in two passes each way over tiles of about ``TILE_ELEMENTS`` values (a few rows of one
image's channel plane, which stay in the core's cache between the ops on them); on a GPU, whose
memory keeps up, a tile is a whole image.

Equal to the op chain's autograd up to float rounding (``tests/test_activation.py`` compares both
in float64), including where the clamp saturates (no gradient) and where the budget does not bind
(``s = 1``: no gradient through ``s``).
"""

from __future__ import annotations

import torch

# Values per tile on a CPU: 128 rows of a 1024-px image (512 KB per float32 tensor; 64–256 rows
# were within 20 % of each other, the whole batch at once 2.6× slower, on bench/activate.py's
# 2-core machine at 1024×768).
TILE_ELEMENTS = 128 * 1024


class Render:
    """The rendering of one batch: its constants (``x0``, ``bound``, the per-image budget) and
    buffers reused by every iteration — including the ``x`` that :meth:`forward` returns and the
    gradient :meth:`backward` returns, which the next call overwrites (one iteration's are used
    up before the next begins). ``n_valid`` (B,) counts each image's values (padding excluded;
    ``bound`` is zero there)."""

    def __init__(self, x0: torch.Tensor, bound: torch.Tensor, n_valid: torch.Tensor, mse_max: float) -> None:
        b, c, h, w = x0.shape
        self.shape = x0.shape
        self.x0, self.bound = x0.reshape(b, c * h * w), bound.reshape(b, c * h * w)
        self.n_valid, self.mse_max = n_valid, mse_max
        per_image = c * h * w
        step = per_image if x0.device.type != "cpu" else max(w, TILE_ELEMENTS // w * w)
        self.tiles = [(i, j, min(j + step, per_image)) for i in range(b) for j in range(0, per_image, step)]
        # Saved by forward for backward (overwritten at each iteration).
        self.th = torch.empty_like(self.x0)
        # Where the clamp let x through, as 0/1 in x's dtype: a product with a bool mask takes a
        # casting path 6× slower than with a float one (and the comparison into bool 3×).
        self.inside = torch.empty_like(self.x0)
        # The rendered x and the two gradients, allocated once: a fresh full-resolution tensor per
        # iteration costs more than the passes over it (its pages are mapped and zeroed anew:
        # 50 ms for 150 MB against 4 ms for an in-place pass, 2 cores). So the next forward
        # overwrites the x returned by this one, and the next backward the gradient.
        self._x = torch.empty_like(self.x0)
        self._g_pre = torch.empty_like(self.x0)
        self._g_delta = torch.empty_like(self.x0)
        self.scale = torch.ones(b, dtype=x0.dtype, device=x0.device)
        self.mse = torch.zeros(b, dtype=x0.dtype, device=x0.device)

    def _budget(self, sumsq: torch.Tensor) -> None:
        self.mse = sumsq / self.n_valid
        self.scale = torch.sqrt(self.mse_max / self.mse.clamp_min(1e-20)).clamp(max=1.0)

    def forward(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """δ (B, 3, H, W) → (x (B, 3, H, W), image loss (B,)); keeps what backward needs."""
        d = delta.reshape(self.x0.shape)
        sumsq = torch.zeros(len(self.x0), dtype=torch.float64, device=d.device)
        for i, j0, j1 in self.tiles:  # pass 1: tanh(δ), and Σ p² per image
            th = torch.tanh(d[i, j0:j1], out=self.th[i, j0:j1])
            p = th * self.bound[i, j0:j1]
            sumsq[i] += torch.dot(p, p)
        self._budget(sumsq.to(self.x0.dtype))
        x = self._x
        scale = _scalars(self.scale)
        for i, j0, j1 in self.tiles:  # pass 2: x = clamp(x0 + s·p), and where the clamp let it through
            bound, value = _times(self.bound[i, j0:j1], scale[i])
            pre = torch.addcmul(self.x0[i, j0:j1], self.th[i, j0:j1], bound, value=value)
            out = torch.clamp(pre, 0.0, 1.0, out=x[i, j0:j1])
            torch.eq(out, pre, out=self.inside[i, j0:j1])
        return x.view(self.shape), self.mse * self.scale.square()

    def backward(self, gx: torch.Tensor, g_loss: torch.Tensor | None) -> torch.Tensor:
        """Gradients of x and of the image loss → the gradient of δ."""
        g = gx.reshape(self.x0.shape).to(self.x0.dtype)
        g_loss = torch.zeros_like(self.scale) if g_loss is None else g_loss.to(self.x0.dtype)
        g_pre = self._g_pre
        dot = torch.zeros(len(self.x0), dtype=torch.float64, device=g.device)
        for i, j0, j1 in self.tiles:  # pass 1: through the clamp; Σ g·p per image (for s)
            gp = torch.mul(g[i, j0:j1], self.inside[i, j0:j1], out=g_pre[i, j0:j1])
            dot[i] += torch.dot(gp, self.th[i, j0:j1] * self.bound[i, j0:j1])
        s, mse = self.scale, self.mse
        # s = min(1, sqrt(mse_max / max(mse, 1e-20))): ds/dmse = -s / (2 mse) where neither bound binds.
        binds = (s < 1.0) & (mse > 1e-20)
        ds_dmse = torch.where(binds, -0.5 * s / mse.clamp_min(1e-20), torch.zeros_like(s))
        g_s = dot.to(s.dtype) + g_loss * 2.0 * mse * s  # loss = mse·s²
        g_mse = g_loss * s.square() + g_s * ds_dmse
        coef = 2.0 * g_mse / self.n_valid  # dmse/dp = 2p / n_valid
        g_delta = self._g_delta
        s_list, c_list = _scalars(s), _scalars(coef)
        for i, j0, j1 in self.tiles:  # pass 2: g_p = s·g_pre + coef·p, then through bound·tanh
            th, bound = self.th[i, j0:j1], self.bound[i, j0:j1]
            gd = torch.mul(g_pre[i, j0:j1], s_list[i], out=g_delta[i, j0:j1])
            factor, value = _times(bound, c_list[i])
            gd.addcmul_(th, factor, value=value).mul_(bound).mul_(1.0 - th * th)
        return g_delta.view(self.shape)

    @torch.no_grad()
    def perturbation(self, delta: torch.Tensor) -> torch.Tensor:
        """The budgeted perturbation s·p (B, 3, H, W) for δ (no gradient), in the buffer of the
        rendered x (the last call of the loop: nothing renders after it)."""
        self.forward(delta)
        p = torch.mul(self.th, self.bound, out=self._x)  # x's buffer, its rendering no longer needed
        return p.mul_(self.scale[:, None]).view(self.shape)


def _scalars(v: torch.Tensor) -> list[float] | torch.Tensor:
    """Per-image scalars for the tile loops: Python floats on a CPU (no tensor op per tile), the
    tensor itself elsewhere (indexing it keeps a GPU's work queued, without a host sync)."""
    return v.tolist() if v.device.type == "cpu" else v


def _times(t: torch.Tensor, s: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """``t·s`` as an ``addcmul`` factor and its ``value``: a Python float stays the ``value`` (no
    temporary tile), a device scalar is folded into the factor (``value`` takes numbers only)."""
    return (t, s) if isinstance(s, float) else (t * s, 1.0)


class _RenderFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta: torch.Tensor, render: Render) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.render = render
        return render.forward(delta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx: torch.Tensor, g_loss: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return ctx.render.backward(gx, g_loss), None


def render(delta: torch.Tensor, r: Render) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable: δ → (x, image loss) of :class:`Render` ``r``."""
    return _RenderFn.apply(delta, r)
