"""The local web app (``distlin-app``, ``launch/app.py``): a Gradio page that drives one device or a whole
torchrun group through :func:`distlin.run.generate`, with a queue, cancel, a gallery and a deep-zoom viewer.

Nothing heavy is imported here: :mod:`distlin.app.cli` checks its flags before torch or Gradio load.
"""
