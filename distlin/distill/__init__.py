"""Distillation of LinFusion layers from a Stable Diffusion UNet (teacher: the UNet with softmax attention).

Modules, from math to command line: ``sampling`` (randomness by sample position, batch sharding), ``losses``
(the objective), ``data`` and ``cache`` (images, captions, precomputed encodings), ``encode`` (UNet inputs),
``student`` (teacher and student in one UNet), ``checkpoint``, ``metrics``, ``trainer``, ``evaluate``, ``cli``.
"""
