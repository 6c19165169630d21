"""cdlib: the library behind the reproduction of Kang & Kim (ICPR 2026),
"What Do Students Learn? A Feature-Level Analysis of Dark Knowledge".

Three layers, each importing only the ones below it:

- ``cdlib.core``: data sets and GPU augmentation, networks, objectives (losses on
  logits), the training loop (``train.fit``: one run), the run store, and the tensor analyses (Interaction
  Tensor, confusion matrices);
- ``cdlib.experiments``: profiles and plans (what each notebook trains), the
  per-notebook analyses, claims, report, tables and figures, the notebook pipeline;
- ``cdlib.scaleout``: the one scheduler (``executors``: in this process, on GPU slots, on
  Slurm), planning and run-time estimates.

``cdlib.paths`` knows where the repository, data and outputs live.
``python -m cdlib`` lists the command-line tools.
"""
__version__ = "0.1.0"
