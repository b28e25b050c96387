"""flax.linen: `model.apply` with the variables dict as params."""

import functools

import flax.linen as nn
import jax

import vidleak_jax as vl


class Classifier(nn.Module):
  num_classes: int = 4

  @nn.compact
  def __call__(self, clips: jax.Array) -> jax.Array:  # [B,T,H,W,C] -> [B,K]
    x = nn.relu(nn.Conv(8, (3, 3, 3))(clips))  # a 3-D convolution over (T, H, W)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def main() -> None:
  data_key, init_key, attack_key = jax.random.split(jax.random.key(0), 3)
  synthetic = functools.partial(vl.data.synthetic_clips, num_clips=1, frames=4, height=8, width=8)
  clips, labels = jax.jit(synthetic)(data_key)  # jit: one compile, not one per op
  model = Classifier()
  variables = model.init(init_key, clips)  # {"params": {"Conv_0": ..., "Dense_0": ...}}
  grads = vl.fl.client_update(model.apply, variables, clips, labels)  # what the client shares
  rec = vl.attack.reconstruct(attack_key, model.apply, variables, grads, clip_shape=clips.shape,
                              config=vl.attack.AttackConfig(steps=100, log_every=50))
  print(f"labels {labels.tolist()} recovered {rec.labels.tolist()}")  # labels=None: from grads
  print(f"PSNR init {float(vl.metrics.psnr(rec.init_clips, clips)[0]):.2f} dB "
        f"reconstruction {float(vl.metrics.psnr(rec.clips, clips)[0]):.2f} dB")


if __name__ == "__main__":
  main()
