"""equinox: `eqx.partition` into an array PyTree (the params) and the static rest."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

import vidleak_jax as vl


class Classifier(eqx.Module):
  conv: eqx.nn.Conv3d
  out: eqx.nn.Linear

  def __init__(self, num_classes: int, keys: jax.Array):
    self.conv = eqx.nn.Conv3d(3, 8, 3, padding=1, key=keys[0])  # over (T, H, W)
    self.out = eqx.nn.Linear(8 * 4 * 8 * 8, num_classes, key=keys[1])

  def __call__(self, clip: jax.Array) -> jax.Array:  # one clip [T,H,W,C] -> [K]
    x = jax.nn.relu(self.conv(jnp.moveaxis(clip, -1, 0)))  # equinox is channels-first
    return self.out(x.reshape(-1))


def main() -> None:
  data_key, init_key, attack_key = jax.random.split(jax.random.key(0), 3)
  synthetic = functools.partial(vl.data.synthetic_clips, num_clips=1, frames=4, height=8, width=8)
  clips, labels = jax.jit(synthetic)(data_key)  # jit: one compile, not one per op
  params, static = eqx.partition(Classifier(4, jax.random.split(init_key)), eqx.is_array)
  apply_fn = lambda params, clips: jax.vmap(eqx.combine(params, static))(clips)  # [B,...]->[B,K]
  grads = vl.fl.client_update(apply_fn, params, clips, labels)  # a Classifier of gradients
  rec = vl.attack.reconstruct(attack_key, apply_fn, params, grads, clip_shape=clips.shape,
                              config=vl.attack.AttackConfig(steps=100, log_every=50))
  print(f"labels {labels.tolist()} recovered {rec.labels.tolist()}")  # labels=None: from grads
  print(f"PSNR init {float(vl.metrics.psnr(rec.init_clips, clips)[0]):.2f} dB "
        f"reconstruction {float(vl.metrics.psnr(rec.clips, clips)[0]):.2f} dB")


if __name__ == "__main__":
  main()
