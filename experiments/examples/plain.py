"""A plain function: `jax.lax` convolution + a params dict whose names say nothing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import vidleak_jax as vl


def apply_fn(params: dict, clips: jax.Array) -> jax.Array:  # [B,T,H,W,C] -> [B,K]
  x = jax.lax.conv_general_dilated(clips, params["w1"], (1, 1, 1), "SAME",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  x = jax.nn.relu(x + params["b1"])
  return x.reshape(x.shape[0], -1) @ params["wd"] + params["bd"]


def main() -> None:
  data_key, attack_key = jax.random.split(jax.random.key(0))
  synthetic = functools.partial(vl.data.synthetic_clips, num_clips=1, frames=4, height=8, width=8)
  clips, labels = jax.jit(synthetic)(data_key)  # jit: one compile, not one per op
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {
      "w1": rng.normal(size=(3, 3, 3, 3, 8)) / 9, "b1": np.zeros(8),
      "wd": rng.normal(size=(4 * 8 * 8 * 8, 4)) / 45, "bd": np.zeros(4)})
  grads = vl.fl.client_update(apply_fn, params, clips, labels)  # what the client shares
  rec = vl.attack.reconstruct(attack_key, apply_fn, params, grads, clip_shape=clips.shape,
                              config=vl.attack.AttackConfig(steps=100, log_every=50))
  print(f"labels {labels.tolist()} recovered {rec.labels.tolist()}")  # labels=None: from grads
  print(f"PSNR init {float(vl.metrics.psnr(rec.init_clips, clips)[0]):.2f} dB "
        f"reconstruction {float(vl.metrics.psnr(rec.clips, clips)[0]):.2f} dB")


if __name__ == "__main__":
  main()
