"""Optimizers and learning-rate schedules for the attack, by registry name (optax)."""

from __future__ import annotations

from typing import Callable

import optax

from vidleak_jax.registry import Registry

SCHEDULES: Registry[Callable[[float, int], optax.Schedule]] = Registry("lr schedule")
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformationExtraArgs]] = (
    Registry("optimizer"))  # (lr or schedule, *, lbfgs_memory) -> optimizer
LBFGS_MEMORY = 10  # optax's default


@SCHEDULES.register("constant")
def _constant(lr: float, steps: int) -> optax.Schedule:
  return optax.constant_schedule(lr)


@SCHEDULES.register("cosine")
def _cosine(lr: float, steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.01)


@SCHEDULES.register("multistep")
def _multistep(lr: float, steps: int) -> optax.Schedule:
  """Inverting Gradients' schedule: ×0.1 at 3/8, 5/8 and 7/8 of the run."""
  bounds = {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8) if int(steps * f) > 0}
  return optax.piecewise_constant_schedule(lr, bounds)


@OPTIMIZERS.register("signed_adam")
def _signed_adam(lr: optax.ScalarOrSchedule, **_) -> optax.GradientTransformationExtraArgs:
  """Adam on the sign of the gradient (Inverting Gradients)."""
  return optax.chain(optax.scale_by_sign(), optax.adam(lr))


@OPTIMIZERS.register("adam")
def _adam(lr: optax.ScalarOrSchedule, **_) -> optax.GradientTransformationExtraArgs:
  return optax.chain(optax.adam(lr))


@OPTIMIZERS.register("sgd")
def _sgd(lr: optax.ScalarOrSchedule, **_) -> optax.GradientTransformationExtraArgs:
  return optax.chain(optax.sgd(lr, momentum=0.9))


@OPTIMIZERS.register("lbfgs")
def _lbfgs(lr: optax.ScalarOrSchedule, *, lbfgs_memory: int = LBFGS_MEMORY
           ) -> optax.GradientTransformationExtraArgs:
  """L-BFGS with a zoom line search (DLG); the step size comes from the line search;
  `lbfgs_memory` past (step, gradient change) pairs shape its curvature model."""
  del lr
  return optax.lbfgs(memory_size=lbfgs_memory)


def make_optimizer(name: str, lr: float, schedule: str, steps: int, *,
                   lbfgs_memory: int = LBFGS_MEMORY) -> optax.GradientTransformationExtraArgs:
  """Optimizer `name` with learning rate `lr` following `schedule` over `steps` steps
  (`lbfgs_memory`: L-BFGS's history length; other optimizers ignore it)."""
  return OPTIMIZERS.get(name)(SCHEDULES.get(schedule)(lr, steps), lbfgs_memory=lbfgs_memory)
