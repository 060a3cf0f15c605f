"""Per-level loss-weight schedules of the multi-scale Loc-Net.

``level_weights(kind, epoch, total_epochs, n_levels)`` returns a float array ``w`` of shape
``(n_levels,)`` indexed by pyramid level ``l`` (``0`` = finest, ``n_levels - 1`` =
coarsest), the order of ``model.loss_weights``. Epochs are 0-based: ``epoch`` runs from 0
to ``total_epochs - 1``; the training fraction is ``t = epoch / (total_epochs - 1)``
(clipped to [0, 1]).

Kinds
-----
``linear`` (default; the paper's piecewise-linear weights)
    Hat functions on the training fraction: level ``l`` peaks at
    ``t_l = (L - 1 - l) / (L - 1)`` and ``w_l(t) = max(0, 1 - |t - t_l| (L - 1))``. The
    coarsest level starts at 1 and falls linearly to 0 at ``t = 1 / (L - 1)``; the finest
    rises from 0 at ``t = (L - 2) / (L - 1)`` to 1 at the end; each middle level rises from
    0 to 1 and back to 0 around its own peak. The hats form a partition of unity, so the
    weights always sum to 1 (no normalisation needed) and at most two adjacent levels are
    active at any time. For ``L = 2``: coarse ``1 - t``, fine ``t``.

``step`` (the authors' public code)
    Five equal phases; phase ``floor(5 * epoch / total_epochs)`` (``total_epochs = 500``
    gives the authors' 100-epoch steps; other lengths are scaled proportionally). For four
    levels the weights (coarsest ... finest) are the factors of the authors' callback:
    ``(.8, .2, 0, 0)``, ``(.1, .7, .2, 0)``, ``(0, .1, .7, .2)``, ``(0, 0, .2, .8)``,
    ``(0, 0, 0, 1)``. (Their callback *multiplies* the current weight variables by these
    factors every epoch, which compounds and drives the weights to ~0 within a few epochs;
    we use the factors as the intended weights.) For other level counts there are
    ``L + 1`` phases: in phase ``p < L`` the level ``p`` steps from the coarsest gets 0.7,
    the next coarser 0.1 and the next finer 0.2 (weight that would fall outside the pyramid
    goes to the main level), and the last phase is the finest level alone.

``multistep`` (the multi-step baseline)
    ``L`` equal phases, one-hot: phase ``p = floor(L * epoch / total_epochs)`` trains level
    ``L - 1 - p`` (coarse to fine). :func:`multistep_level` gives the active level.

Phases
------
A run of the multi-step method is trained in those ``L`` phases, one level at a time
(:func:`multistep_phase`, :func:`phase_bounds`); every other method in one phase.
:class:`Phases` says, for the training code, which phase an epoch belongs to, which level
sub-network a phase trains (the others are frozen) and where a phase's model-selection window
is clipped.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "SCHEDULES",
    "Phases",
    "level_weights",
    "multistep_level",
    "multistep_phase",
    "phase_bounds",
    "training_fraction",
]

SCHEDULES = ("linear", "step", "multistep")

# Authors' step factors for four levels, coarsest first, one row per 1/5 of training.
_STEP4 = np.array(
    [
        [0.8, 0.2, 0.0, 0.0],
        [0.1, 0.7, 0.2, 0.0],
        [0.0, 0.1, 0.7, 0.2],
        [0.0, 0.0, 0.2, 0.8],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _check(epoch: int, total_epochs: int, n_levels: int) -> None:
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")


def training_fraction(epoch: int, total_epochs: int) -> float:
    """``epoch / (total_epochs - 1)`` clipped to [0, 1] (0 for a single epoch)."""
    if total_epochs <= 1:
        return 0.0
    return float(min(max(epoch / (total_epochs - 1), 0.0), 1.0))


def _phase(epoch: int, total_epochs: int, n_phases: int) -> int:
    return int(min(math.floor(n_phases * epoch / total_epochs), n_phases - 1))


def _linear(epoch: int, total_epochs: int, n_levels: int) -> np.ndarray:
    if n_levels == 1:
        return np.ones(1)
    t = training_fraction(epoch, total_epochs)
    levels = np.arange(n_levels)
    peaks = (n_levels - 1 - levels) / (n_levels - 1)
    return np.maximum(0.0, 1.0 - np.abs(t - peaks) * (n_levels - 1))


def _step(epoch: int, total_epochs: int, n_levels: int) -> np.ndarray:
    if n_levels == 1:
        return np.ones(1)
    if n_levels == 4:
        table = _STEP4
    else:
        table = np.zeros((n_levels + 1, n_levels))
        for p in range(n_levels):  # p: position from the coarsest
            for offset, share in ((-1, 0.1), (0, 0.7), (1, 0.2)):
                j = p + offset
                table[p, j if 0 <= j < n_levels else p] += share
        table[n_levels, n_levels - 1] = 1.0
    row = table[_phase(epoch, total_epochs, table.shape[0])]
    return row[::-1].copy()  # coarsest-first -> level index (0 = finest)


def multistep_level(epoch: int, total_epochs: int, n_levels: int) -> int:
    """The level trained at ``epoch`` by the multi-step schedule (coarsest first)."""
    _check(epoch, total_epochs, n_levels)
    return n_levels - 1 - _phase(epoch, total_epochs, n_levels)


def level_weights(kind: str, epoch: int, total_epochs: int, n_levels: int) -> np.ndarray:
    """Loss weight per level (index 0 = finest) at ``epoch``; see the module docstring."""
    _check(epoch, total_epochs, n_levels)
    if kind == "linear":
        w = _linear(epoch, total_epochs, n_levels)
    elif kind == "step":
        w = _step(epoch, total_epochs, n_levels)
    elif kind == "multistep":
        w = np.zeros(n_levels)
        w[multistep_level(epoch, total_epochs, n_levels)] = 1.0
    else:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    return np.asarray(w, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# phases of the multi-step training
# --------------------------------------------------------------------------------------------
def multistep_phase(epoch: int, total_epochs: int, n_levels: int) -> tuple[int, int]:
    """``(phase, level)`` of ``epoch`` in multi-step training: phase 0 trains the coarsest level
    ``n_levels - 1``, the last phase level 0 (:func:`multistep_level`: ``n_levels`` equal
    phases, phase ``floor(n_levels * epoch / total_epochs)``)."""
    level = int(multistep_level(epoch, total_epochs, n_levels))
    return n_levels - 1 - level, level


def phase_bounds(total_epochs: int, n_levels: int) -> list[tuple[int, int]]:
    """Epoch ranges ``[start, end)`` of the multi-step phases (coarse to fine)."""
    bounds = [[None, None] for _ in range(n_levels)]
    for e in range(total_epochs):
        p, _ = multistep_phase(e, total_epochs, n_levels)
        if bounds[p][0] is None:
            bounds[p][0] = e
        bounds[p][1] = e + 1
    return [(a, b) if a is not None else (total_epochs, total_epochs) for a, b in bounds]


class Phases:
    """The training phases of a run of ``total_epochs`` epochs over ``n_levels`` loss levels.

    ``multistep``: one phase per level, coarse to fine (:func:`phase_bounds`); otherwise a
    single phase ``0`` of all epochs. Epochs are 0-based training epochs unless said otherwise.
    """

    def __init__(self, total_epochs: int, n_levels: int, multistep: bool):
        self.total_epochs = total_epochs
        self.n_levels = n_levels
        self.multistep = multistep
        #: ``[start, end)`` epochs of each phase
        self.bounds = (phase_bounds(total_epochs, n_levels) if multistep
                       else [(0, total_epochs)])

    def phase_of(self, epoch: int) -> int:
        """The phase of training epoch ``epoch``."""
        return multistep_phase(epoch, self.total_epochs, self.n_levels)[0] if self.multistep else 0

    def history_range(self, epoch: int) -> tuple[int, int]:
        """First and last history epoch (1-based) of the phase of history epoch ``epoch``."""
        a, b = self.bounds[self.phase_of(epoch - 1)]
        return a + 1, b

    def trained_level(self, phase: int) -> int | None:
        """The level whose sub-network ``phase`` trains, the others frozen (``None``: all
        levels are trained)."""
        return self.n_levels - 1 - phase if self.multistep else None

    def has_empty_phase(self) -> bool:
        """Whether some phase gets no epoch (fewer epochs than phases)."""
        return any(a == b for a, b in self.bounds)
