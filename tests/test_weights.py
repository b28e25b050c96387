"""PyTorch-layout weight import: a torch.nn ResNet-18 (torchvision's layout, written here) saved
as .safetensors reproduces its forward pass in the NNX ResNet; mismatching files fail clearly."""

from __future__ import annotations

import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidleak_jax.models import backbones, extractors, victims, weights

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn


class TorchBasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(nn.Module):
  """torchvision.models.resnet18's module tree and forward pass."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, width in enumerate((64, 128, 256, 512)):
      stride = 1 if i == 0 else 2
      setattr(self, f"layer{i + 1}", nn.Sequential(TorchBasicBlock(cin, width, stride),
                                                   TorchBasicBlock(width, width, 1)))
      cin = width
    self.fc = nn.Linear(512, num_classes)

  def features(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    return x.mean(dim=(2, 3))

  def forward(self, x):
    return self.fc(self.features(x))


def _reference(num_classes=1000, seed=0):
  torch.manual_seed(seed)
  model = TorchResNet18(num_classes)
  for module in model.modules():  # non-trivial running statistics and affine parameters
    if isinstance(module, nn.BatchNorm2d):
      module.running_mean.uniform_(-0.2, 0.2)
      module.running_var.uniform_(0.5, 1.5)
      module.weight.data.uniform_(0.5, 1.5)
      module.bias.data.uniform_(-0.2, 0.2)
  return model.eval()


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
  model = _reference()
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.safetensors")
  safetensors_torch.save_file(model.state_dict(), path)
  return model, path


def test_safetensors_import_reproduces_the_torch_forward_pass(saved_reference):
  model, path = saved_reference
  frames = np.random.default_rng(0).uniform(size=(2, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    want_logits, want_features = model(x).numpy(), model.features(x).numpy()
  net = backbones.ResNet(rngs=nnx.Rngs(params=0))
  weights.load_torch_safetensors(net, path)
  got = np.asarray(net(jnp.asarray(frames)))
  np.testing.assert_allclose(got, want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(net.features(jnp.asarray(frames))), want_features,
                             rtol=1e-4, atol=1e-4)
  assert np.abs(want_logits).max() > 0.1  # not a trivially small output

  # The registered extractor: per-frame pooled features of clips [N,T,H,W,C] (normalised inside).
  module = extractors.create_extractor("resnet18", jax.random.key(3), frames=2, height=48,
                                       width=48, channels=3, weights_path=path)
  clips = frames.reshape(1, 2, 48, 48, 3)
  mean, std = np.asarray(victims.IMAGENET_MEAN), np.asarray(victims.IMAGENET_STD)
  with torch.no_grad():
    normalised = torch.from_numpy(((frames - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    want = model.features(normalised).numpy()
  got = np.asarray(extractors.frozen(module)(jnp.asarray(clips)))
  assert got.shape == (1, 2, 512)
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


def test_mismatched_weights_file_lists_the_first_mismatches(saved_reference, tmp_path):
  model, _ = saved_reference
  state = dict(model.state_dict())
  del state["layer4.1.bn2.running_var"]
  state["layer5.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
  state["fc.weight"] = torch.zeros(10, 512)
  path = str(tmp_path / "bad.safetensors")
  safetensors_torch.save_file(state, path)
  net = backbones.ResNet(rngs=nnx.Rngs(params=0))
  before = np.asarray(net.conv1.kernel[...]).copy()
  with pytest.raises(ValueError) as err:
    weights.load_torch_safetensors(net, path)
  message = str(err.value)
  assert "bad.safetensors" in message and "ResNet" in message
  assert "missing ['layer4.1.bn2.running_var']" in message
  assert "unexpected ['layer5.0.conv1.weight']" in message
  assert "fc.weight: file [10, 512], model [1000, 512]" in message
  np.testing.assert_array_equal(np.asarray(net.conv1.kernel[...]), before)  # nothing assigned


def test_unreadable_weights_file_is_named(tmp_path):
  path = tmp_path / "not_weights.safetensors"
  path.write_bytes(b"\x00" * 64)
  with pytest.raises(ValueError, match="not_weights.safetensors"):
    weights.load_safetensors(str(path))
  with pytest.raises(FileNotFoundError, match="missing.safetensors"):
    weights.load_safetensors(str(tmp_path / "missing.safetensors"))


def test_lpips_weights_are_read_without_executing_pickled_code():
  arrays = weights.lpips_trunk_arrays("alexnet")
  assert [a["kernel"].shape[-1] for a in arrays] == [64, 192, 384, 256, 256]

  class Payload:
    def __reduce__(self):
      return (print, ("side effect",))

  with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
    weights._ArrayUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()
