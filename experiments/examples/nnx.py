"""flax.nnx: `vl.models.pure` splits the module (`nnx.split`) into a pure apply_fn and a dict."""

import functools

import jax
from flax import nnx

import vidleak_jax as vl


class Classifier(nnx.Module):
  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3, 3), rngs=rngs)  # a 3-D convolution over (T, H, W)
    self.logits = nnx.Linear(4 * 8 * 8 * 8, num_classes, rngs=rngs)  # any name: found by role

  def __call__(self, clips: jax.Array) -> jax.Array:  # [B,T,H,W,C] -> [B,K]
    x = nnx.relu(self.conv(clips))
    return self.logits(x.reshape(x.shape[0], -1))


def main() -> None:
  data_key, attack_key = jax.random.split(jax.random.key(0))
  synthetic = functools.partial(vl.data.synthetic_clips, num_clips=1, frames=4, height=8, width=8)
  clips, labels = jax.jit(synthetic)(data_key)  # jit: one compile, not one per op
  apply_fn, params = vl.models.pure(Classifier(4, rngs=nnx.Rngs(0)))  # params: a plain dict
  grads = vl.fl.client_update(apply_fn, params, clips, labels)  # what the client shares
  rec = vl.attack.reconstruct(attack_key, apply_fn, params, grads, clip_shape=clips.shape,
                              config=vl.attack.AttackConfig(steps=100, log_every=50))
  print(f"labels {labels.tolist()} recovered {rec.labels.tolist()}")  # labels=None: from grads
  print(f"PSNR init {float(vl.metrics.psnr(rec.init_clips, clips)[0]):.2f} dB "
        f"reconstruction {float(vl.metrics.psnr(rec.clips, clips)[0]):.2f} dB")


if __name__ == "__main__":
  main()
