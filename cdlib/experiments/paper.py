"""Numbers the paper reports (CIFAR-100 top-1 %, PAPER.md section 7), shown next to ours in every table.

They are never used to tune or to fill in a result; they only stand in a
"paper" column.
"""
TABLE2_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121")

# Table 2: mean of 3 runs, best test epoch (the released code's reporting).
TABLE2 = {
    "baseline": (75.86, 77.61, 78.48, 79.03),
    "cskd": (76.38, 76.73, 76.31, 76.53),
    "pskd": (77.41, 77.33, 78.41, 79.84),
    "cd200": (76.85, 77.87, 78.63, 78.71),
    "cd300": (77.13, 78.53, 79.38, 79.64),
}


def table2(method: str, arch: str) -> float | None:
    """The paper's Table 2 number for ``method`` on ``arch``, or None when it reports none."""
    if method not in TABLE2 or arch not in TABLE2_ARCHS:
        return None
    return TABLE2[method][TABLE2_ARCHS.index(arch)]
