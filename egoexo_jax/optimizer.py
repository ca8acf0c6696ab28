"""The optimiser and its learning-rate schedule, from `config.optimizer` (egoexo_jax/train.py builds them once)."""

from __future__ import annotations

import jax
import ml_collections
import optax

from egoexo_jax import lr_policy


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate per step.

  With `optimizer.lr_policy` ('cosine', 'steps_with_relative_lrs'): PySlowFast's policy, in epochs when
  config.epochs > 0 (egoexo_jax/lr_policy.py; resolve_run_length first sets num_train_steps). Otherwise,
  linear warm-up from `warmup_start_fraction` of the peak to the peak, then `optimizer.schedule`:
  'cosine' (to zero at num_train_steps; the default) or 'steps' (the peak multiplied by `decay_factor` at
  each step of `decay_steps`, as EPIC-Kitchens fine-tuning).

  The peak is `base_learning_rate`, scaled linearly with the global batch when
  `reference_batch_size` (default 64, PySlowFast's convention) is non-zero.
  """
  opt = config.optimizer
  if opt.get("lr_policy", ""):
    try:
      return lr_policy.make_schedule(config, lr_policy.plan(config))
    except lr_policy.RecordCountUnknown as e:  # restoring for evaluation needs only the optimiser's structure
      return lr_policy.unresolved_schedule(e)
  if not 0 <= opt.warmup_steps < config.num_train_steps:
    raise ValueError(f"config optimizer.warmup_steps ({opt.warmup_steps}) must be in [0, num_train_steps) "
                     f"(num_train_steps is {config.num_train_steps})")
  reference = opt.get("reference_batch_size", 64)
  peak = opt.base_learning_rate * (config.global_batch_size / reference if reference else 1.0)
  kind = opt.get("schedule", "cosine")
  if kind == "cosine":
    main = optax.cosine_decay_schedule(peak, config.num_train_steps - opt.warmup_steps)
  elif kind == "steps":
    boundaries = [int(b) - opt.warmup_steps for b in opt.decay_steps]
    if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
      raise ValueError(f"config optimizer.decay_steps {tuple(opt.decay_steps)} must increase and come after "
                       f"warm-up ({opt.warmup_steps} steps)")
    main = optax.piecewise_constant_schedule(peak, {b: opt.decay_factor for b in boundaries})
  else:
    raise ValueError(f"unknown config optimizer.schedule '{kind}': use 'cosine' or 'steps'")
  if not opt.warmup_steps:
    return main  # no zero-length warm-up schedule (optax warns: "non-positive transition_steps")
  warmup = optax.linear_schedule(peak * opt.warmup_start_fraction, peak, opt.warmup_steps)
  return optax.join_schedules([warmup, main], [opt.warmup_steps])


def is_normalization_module(name: str) -> bool:
  """PySlowFast's test, "'bn' in the parameter's name", on one module name of our trees ('bn', 'bn_a',
  'shortcut_bn', 'bn1', 'BatchNorm_0'), extended to LayerNorm-style names ('norm', 'ln_1')."""
  tokens = [t.rstrip("0123456789") for t in name.lower().split("_")]
  return "norm" in name.lower() or "bn" in tokens or "ln" in tokens


def weight_decay_mask(weight_decay_on: str):
  """params -> pytree of bools: which parameters weight decay applies to (make_optimizer)."""
  if weight_decay_on == "kernels":
    return lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if weight_decay_on == "all_but_batchnorm":
    def mask(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: not any(is_normalization_module(str(getattr(k, "key", k))) for k in path[:-1]), params)
    return mask
  raise ValueError(f"unknown config optimizer.weight_decay_on '{weight_decay_on}': use 'kernels' or "
                   "'all_but_batchnorm'")


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser of `config.optimizer` and its learning-rate schedule (make_schedule).

  optimizer.name: 'sgd' (default; momentum, nesterov, L2 weight decay added to the gradient, as
  PySlowFast), 'adam' (beta1, beta2; L2 weight decay when non-zero) or 'adamw' (decoupled weight
  decay). optimizer.weight_decay_on: 'kernels' (default; arrays of 2 or more dimensions, not BatchNorm,
  LayerNorm or biases) or 'all_but_batchnorm' (PySlowFast's optimizer: every parameter outside a
  normalisation layer, biases included; see is_normalization_module). optimizer.frozen lists top-level
  parameter names (e.g. 'exo_backbone') that receive no updates at all.
  """
  opt = config.optimizer
  schedule = make_schedule(config)
  decay_mask = weight_decay_mask(opt.get("weight_decay_on", "kernels"))
  name = opt.get("name", "sgd")
  if name == "sgd":
    optimizer = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                            optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  elif name == "adam":
    optimizer = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                            optax.adam(schedule, b1=opt.get("beta1", 0.9), b2=opt.get("beta2", 0.999)))
  elif name == "adamw":
    optimizer = optax.adamw(schedule, b1=opt.get("beta1", 0.9), b2=opt.get("beta2", 0.999),
                            weight_decay=opt.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"unknown config optimizer.name '{name}': use 'sgd', 'adam' or 'adamw'")
  frozen = tuple(opt.get("frozen", ()))
  if frozen:
    def labels(params):
      unknown = sorted(set(frozen) - set(params))
      if unknown:
        raise ValueError(f"config optimizer.frozen names {unknown}, which are not top-level parameters "
                         f"(they are {sorted(params)})")
      return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "trained", v) for k, v in params.items()}
    optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
  return optimizer, schedule
