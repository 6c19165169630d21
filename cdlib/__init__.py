"""cdlib: the library behind the reproduction of Kang & Kim (ICPR 2026),
"What Do Students Learn? A Feature-Level Analysis of Dark Knowledge".

Modules follow the paper's concepts: ``data`` (data sets, GPU augmentation),
``models`` (CIFAR networks), ``objectives`` (CE, LS, KD, CS-KD, PS-KD, Confusion
Distillation), ``train`` (the loop), ``runs`` (the run store), ``profiles`` and
``plans`` (what each notebook trains), ``interaction`` (Interaction Tensor),
``confusion`` (confusion matrices as dark knowledge), ``tables`` and ``figures``.
"""
__version__ = "0.1.0"
