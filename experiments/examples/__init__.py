"""Runnable examples: one small video classifier per framework, attacked end to end.

`python -m experiments.examples.<name>` for name in linen, nnx, equinox_model, plain. Each builds a
classifier of 4×8×8×3 clips, computes one client's FedSGD gradient (`vl.fl.client_update`), and
reconstructs the clip from it (`vl.attack.reconstruct`, labels recovered analytically), printing
the true and recovered labels and the PSNR of the attack's starting point and of its result.
"""
