"""The reader of the authors' released artifacts, on artifacts generated here in the released formats
(the real files cannot be downloaded in tests): key layouts as the authors' code writes them, every
checkpoint loading to the logits of the cdlib network it was filled from, planted Omega features
counted directly, and a named error for every damaged or foreign file."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlib.core import data
from cdlib.core.models import build_model
from cdlib.released import analysis, artifacts as art
from test_data import make_cifar100

SMALL = 0.125  # narrow networks with the released key names, for files written in tests


def released_state(method: str, arch: str, seed: int = 0, width: float = SMALL) -> tuple[torch.nn.Module, dict]:
    """A cdlib network with random weights and BN statistics, and its state dict under the released key names."""
    torch.manual_seed(seed)
    model = build_model(art.network_for(method, arch), art.CIFAR100_CLASSES, width)
    for module in model.modules():  # non-trivial BN statistics, so a swapped buffer changes the logits
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    names = art.released_keys(model, art.FAMILY[method])
    return model.eval(), {names[k]: v.clone() for k, v in model.state_dict().items()}


# What the authors' code names and shapes (their training/models, baselines/cs-kd/models, baselines/ps-kd/models),
# at full width for CIFAR-100: key count and a few keys.
LAYOUTS = {
    ("baseline", "resnet18"): (122, {"conv1.0.weight": (64, 3, 3, 3), "conv3_x.0.shortcut.0.weight": (128, 64, 1, 1),
                                     "conv5_x.1.residual_function.4.weight": (512,), "fc.weight": (100, 512)}),
    ("baseline", "resnet50"): (320, {"conv2_x.0.shortcut.0.weight": (256, 64, 1, 1),
                                     "conv2_x.0.residual_function.6.weight": (256, 64, 1, 1), "fc.weight": (100, 2048)}),
    ("baseline", "densenet121"): (722, {"conv1.weight": (64, 3, 3, 3),
                                        "features.transition_layer_0.down_sample.1.weight": (128, 256, 1, 1),
                                        "features.dense_block3.bottle_neck_layer_15.bottle_neck.0.weight": (992,),
                                        "features.bn.weight": (1024,), "linear.weight": (100, 1024)}),
    ("cs-kd", "resnet18"): (107, {"conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,),
                                  "layer2.0.shortcut.0.weight": (128, 64, 1, 1), "layer4.1.conv2.weight": (512, 512, 3, 3),
                                  "linear.weight": (100, 512)}),
    ("cs-kd", "resnet50"): (300, {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer1.0.bn3.weight": (64,),
                                  "linear.weight": (100, 2048)}),
    ("ps-kd", "resnet50"): (320, {"layer1.0.shortcut.1.weight": (256,), "layer4.2.bn3.weight": (2048,),
                                  "linear.weight": (100, 2048)}),
    ("ps-kd", "densenet121"): (722, {"dense1.0.conv1.weight": (128, 64, 1, 1), "trans1.conv.weight": (128, 256, 1, 1),
                                     "dense4.15.bn1.weight": (992,), "bn.weight": (1024,), "linear.weight": (100, 1024)}),
}


@pytest.mark.parametrize("method, arch", LAYOUTS)
def test_released_key_names_and_shapes_are_the_authors(method, arch):
    model = build_model(art.network_for(method, arch), art.CIFAR100_CLASSES)
    names = art.released_keys(model, art.FAMILY[method])
    shapes = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    count, some = LAYOUTS[(method, arch)]
    assert len(shapes) == count and {k: shapes[k] for k in some} == some


@pytest.mark.parametrize("method", art.TABLE2_METHODS)
@pytest.mark.parametrize("arch", art.TABLE2_ARCHS)
def test_every_released_checkpoint_gives_the_logits_of_the_network_it_came_from(tmp_path, monkeypatch, method, arch):
    monkeypatch.setattr(art, "WIDTH", SMALL)
    model, state = released_state(method, arch)
    path = tmp_path / "run1.pth"
    torch.save(state, path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(art.load_released_model(path, method, arch)(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [lambda s: {"net": s, "optimizer": {}, "epoch": 3},
                                  lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
                                  lambda s: {"model": s}])
def test_nested_and_data_parallel_checkpoints_load(tmp_path, monkeypatch, wrap):
    monkeypatch.setattr(art, "WIDTH", SMALL)
    model, state = released_state("ps-kd", "resnet18")
    torch.save(wrap(state), tmp_path / "c.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(art.load_released_model(tmp_path / "c.pth", "ps-kd", "resnet18")(x), model(x))


class NotAWeight:
    pass


def _write(path, payload):
    torch.save(payload, path)
    return path


BAD_CHECKPOINTS = {
    "a key missing": (lambda s, p: _write(p, {k: v for k, v in s.items() if k != "layer2.0.conv1.weight"}),
                      "key 'layer2.0.conv1.weight' is missing"),
    "another code's network": (lambda s, p: _write(p, released_state("baseline", "resnet18")[1]),
                               "key 'conv1.weight' is missing and key 'conv1.0.weight' is not one this network has"),
    "another class count": (lambda s, p: _write(p, {**s, "linear.weight": torch.zeros(10, s["linear.weight"].shape[1]),
                                                    "linear.bias": torch.zeros(10)}),
                            "key 'linear.weight' is (10, 64)"),
    "truncated": (lambda s, p: (_write(p, s), p.write_bytes(p.read_bytes()[:1000]))[0], "cannot read"),
    "Python objects": (lambda s, p: _write(p, {"net": NotAWeight()}), "holds Python objects"),
    "not a state dict": (lambda s, p: _write(p, {"acc": torch.tensor(1.0), "epoch": 3}), "is not a state dict"),
    "missing file": (lambda s, p: p, "is missing; the released folder is incomplete"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_damaged_or_foreign_checkpoint_is_a_named_error(tmp_path, monkeypatch, record_fault, case):
    monkeypatch.setattr(art, "WIDTH", SMALL)
    _, state = released_state("cs-kd", "resnet18")
    make, message = BAD_CHECKPOINTS[case]
    path = make(state, tmp_path / "run1.pth")
    with pytest.raises(art.ReleasedArtifactError) as err:
        art.load_released_model(path, "cs-kd", "resnet18")
    assert message in str(err.value) and "run1.pth" in str(err.value)
    record_fault(f"released: checkpoint {case}", str(err.value), None)


# ------------------------------------------------------------------ Omega

def planted_omega(models: int, images: int, features: int, seed: int = 0) -> np.ndarray:
    """0/1 (M, N, T): each model uses a random subset of features, each on a random subset of images."""
    rng = np.random.default_rng(seed)
    uses = rng.random((models, 1, features)) < 0.4
    return ((rng.random((models, images, features)) < 0.3) & uses).astype(np.int32)


def direct_statistics(omega: np.ndarray, models: range) -> dict:
    """|F|, E[F], features per image by plain loops over features and images."""
    T, N = omega.shape[2], omega.shape[1]
    frequency = [sum(any(omega[m, n, t] for m in models) for n in range(N)) for t in range(T)]
    used = [f for f in frequency if f > 0]
    per_image = [sum(any(omega[m, n, t] for m in models) for t in range(T)) for n in range(N)]
    return {"n_features": len(used), "mean_frequency": sum(used) / len(used), "per_image": sum(per_image) / N}


def test_omega_statistics_match_a_direct_count(tmp_path):
    kd, cd = planted_omega(60, 40, 12), planted_omega(40, 40, 9, seed=1)
    torch.save(torch.from_numpy(kd), tmp_path / art.OMEGA_FILES["kd"][0])
    torch.save(torch.from_numpy(cd), tmp_path / art.OMEGA_FILES["cd"][0])
    for which, omega in (("kd", kd), ("cd", cd)):
        result = analysis.feature_analysis(tmp_path, which, n_images=40)
        for name, models in art.OMEGA_FILES[which][1].items():
            group, expected = result.groups[name], direct_statistics(omega, models)
            assert group.n_features == expected["n_features"], (which, name)
            assert group.mean_frequency == pytest.approx(expected["mean_frequency"])
            assert group.mean_features_per_image == pytest.approx(expected["per_image"])
    table = analysis.feature_analysis(tmp_path, "kd", n_images=40).summary_table()
    assert "features shared by all groups" in set(table["statistic"])


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc to see memory maps")
def test_omega_is_memory_mapped_not_copied(tmp_path):
    """The tensor's memory is a mapping of the file itself (Linux: /proc/self/maps), not a copy in RAM."""
    path = tmp_path / art.OMEGA_FILES["kd"][0]
    torch.save(torch.from_numpy(planted_omega(60, 40, 12)), path)
    omega = art.load_omega(tmp_path, "kd", n_images=40)  # kept alive: freeing it unmaps the file
    address = omega.tensor.data_ptr()
    mapped = [line.split(maxsplit=5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()
              if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)]
    assert mapped == [str(path)]


BAD_OMEGAS = {
    "float values": (lambda: torch.rand(60, 40, 5), "is a torch.float32 tensor"),
    "another model count": (lambda: torch.zeros(50, 40, 5, dtype=torch.int32), "shape (60, 40, T)"),
    "a dict": (lambda: {"omega": torch.zeros(60, 40, 5, dtype=torch.int32)}, "holds a dict"),
    "counts, not 0/1": (lambda: torch.full((60, 40, 5), 2, dtype=torch.int32), "values other than 0 and 1"),
}


@pytest.mark.parametrize("case", BAD_OMEGAS)
def test_a_foreign_omega_is_a_named_error(tmp_path, record_fault, case):
    make, message = BAD_OMEGAS[case]
    path = tmp_path / art.OMEGA_FILES["kd"][0]
    torch.save(make(), path)
    with pytest.raises(art.ReleasedArtifactError) as err:
        analysis.feature_analysis(tmp_path, "kd", n_images=40)
    assert message in str(err.value) and path.name in str(err.value)
    record_fault(f"released: Omega {case}", str(err.value), None)


# ------------------------------------------------------------------ the command

@pytest.fixture
def released_folder(tmp_path, monkeypatch):
    """A released folder in the layout (narrow networks, 3 runs of four methods on ResNet-18, the Section 4.1
    teacher, both Omega files) and a CIFAR-100 test split of 100 images."""
    monkeypatch.setattr(art, "WIDTH", SMALL)
    monkeypatch.setattr(art, "TEST_IMAGES", 40)
    monkeypatch.setattr(data, "CIFAR_COUNTS", {"train": 500, "test": 100})
    split = make_cifar100(tmp_path / "data", np.random.default_rng(0)) / "test"
    test = pickle.loads(split.read_bytes())
    test["fine_labels"] = list(range(100))  # every class once: M has a row for each
    split.write_bytes(pickle.dumps(test))
    folder = tmp_path / "released"
    for method in ("baseline", "cs-kd", "ps-kd", "cd-300"):
        for run in art.RUNS:
            path = art.table2_checkpoint(folder, method, "resnet18", run)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(released_state(method, "resnet18", seed=run)[1], path)
    teacher = folder / art.SECTION_4_1_TEACHER
    teacher.parent.mkdir(parents=True)
    torch.save(released_state("baseline", "resnet152")[1], teacher)
    torch.save(torch.from_numpy(planted_omega(60, 40, 12)), folder / art.OMEGA_FILES["kd"][0])
    torch.save(torch.from_numpy(planted_omega(40, 40, 9, seed=1)), folder / art.OMEGA_FILES["cd"][0])
    return folder, tmp_path / "data"


def test_the_command_writes_table2_section_4_1_features_and_claims(released_folder, isolated_outputs):
    from cdlib.__main__ import main
    folder, data_root = released_folder
    assert main(["released", "--folder", str(folder), "--data-root", str(data_root), "--device", "cpu",
                 "--num-shuffles", "5"]) == 0
    out = isolated_outputs / "released"
    runs = __import__("pandas").read_csv(out / "table2_runs.csv")
    assert len(runs) == 12 and set(runs["network"]) == {"resnet18", "preact_resnet18"}
    # The reader's numbers equal a direct evaluation of the network the file was written from.
    model, _ = released_state("cs-kd", "resnet18", seed=2)
    images, labels = analysis.test_set(data_root)
    direct = analysis.evaluation(analysis.logits_of(model, images, "cs-kd", "cpu"), labels)
    row = runs[(runs["method"] == "cs-kd") & (runs["run"] == "run2")].iloc[0]
    assert row["top1"] == pytest.approx(direct["top1"]) and row["nll"] == pytest.approx(direct["nll"])
    section = (out / "REPORT_SECTION.md").read_text()
    assert "From the authors' released artifacts" in section and "test set (the released code's leak)" in section
    claims = {c["number"]: c for c in json.loads((out / "claims.json").read_text())}
    assert set(claims) == {1, 2, 5} and "features: |F| baseline" in claims[5]["ours"]
    assert (out / "section_4_1.md").is_file() and (out / "features_kd.md").is_file()
    assert {p.stem for p in out.glob("fig*.png")} == {"fig1a_feature_frequency", "fig1b_common_features",
                                                      "fig3a_feature_frequency", "fig3b_features_per_image"}
    from cdlib.experiments import report
    from cdlib.experiments.profiles import get_profile
    text = report.render(get_profile("smoke"), [], isolated_outputs)
    assert "## From the authors' released artifacts" in text and "### Table 2, re-evaluated" in text


def test_without_released_artifacts_the_report_says_how_to_get_them(isolated_outputs):
    from cdlib.experiments import report
    from cdlib.experiments.profiles import get_profile
    text = report.render(get_profile("smoke"), [], isolated_outputs)
    assert "Not computed yet" in text and "python -m cdlib released --folder PATH" in text


def test_a_missing_folder_says_how_to_get_it(tmp_path, capsys):
    from cdlib.__main__ import main
    assert main(["released", "--folder", str(tmp_path / "nope")]) == 2
    assert "snapshot_download" in capsys.readouterr().err


def test_notebooks_03_to_05_show_the_released_numbers_or_say_how_to_get_them(released_folder, capsys):
    from cdlib.experiments import pipeline
    for notebook in pipeline.notebooks(["03", "04", "05"]):
        cells = json.loads(notebook.read_text())["cells"]
        parameters = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])
        assert "released = None" in parameters, notebook.name
        assert any("released_analysis.notebook_part(" in "".join(c["source"]) for c in cells), notebook.name
    assert analysis.notebook_part("table2", None) is None
    assert "snapshot_download" in capsys.readouterr().out
    folder, data_root = released_folder
    table = analysis.notebook_part("table2", folder, data_root, "cpu")
    assert list(table["method"]) == ["baseline", "cs-kd", "ps-kd", "cd-300"] and set(table["runs"]) == {3}
    assert "features |F|" in set(analysis.notebook_part("cd-tensor", folder)["statistic"])
