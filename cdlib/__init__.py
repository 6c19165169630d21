"""cdlib: the library behind the reproduction of Kang & Kim (ICPR 2026),
"What Do Students Learn? A Feature-Level Analysis of Dark Knowledge".

Modules follow the paper's concepts: ``data`` (data sets, GPU augmentation),
``models`` (CIFAR networks), ``objectives`` (CE, LS, KD, Tf-KD, CS-KD, PS-KD,
Confusion Distillation), ``train`` (the loop), ``runs`` (the run store),
``profiles`` and ``plans`` (what each notebook trains), ``interaction`` and
``feature_analysis`` (the Interaction Tensor and the KD feature analysis),
``confusion`` and ``dark_knowledge`` (confusion matrices as dark knowledge),
``distillation_results`` (Tables 1-2), ``claims`` and ``report`` (the claims
report), ``tables`` and ``figures``.
"""
__version__ = "0.1.0"
