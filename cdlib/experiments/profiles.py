"""Profiles: how big a reproduction to run, as small TOML files.

A profile fixes the data set, network width, epochs, and how many models and seeds
every notebook trains. The built-in ones are files in ``cdlib/profiles/``:

    smoke   the whole pipeline on a CPU in minutes (synthetic data, tiny networks)
    cpu     real data on a 2-core CPU in one sitting (CIFAR-10 subset, tiny networks, a validation split)
    quick   real CIFAR-100, ResNet-18 only, shortened schedules (an afternoon on one GPU)
    paper   the paper's recipe (CIFAR-100, 200/300 epochs, 20 models per group, 3 seeds per cell)

A profile of one's own is a file with the same keys (``Profile``'s fields), or
``base = "quick"`` and only the keys that change. Anywhere a profile is chosen (the
command lines' ``--profile`` and ``--set``, the notebooks' ``profile`` and ``overrides``
parameters, ``get_profile``) a built-in name or a file path can be given, plus
overrides such as ``width=0.25 epochs=15 dataset=cifar10``. A key or value that is wrong
is a ``ConfigError`` that names it.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

from cdlib.core.config import TrainConfig
from cdlib.core.util import GPUUnusableError, resolve_device, unusable_gpu
from cdlib.errors import ConfigError

PAPER_EPOCHS = 200  # the paper's baseline schedule; other profiles scale every schedule by epochs / 200
BUILTIN = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    dataset: str
    width: float              # channel multiplier of every network
    epochs: int               # baseline / KD epochs (paper: 200)
    feature_models: int       # models per group in the Interaction Tensor (paper: 20)
    seeds: int                # seeds per table cell (paper: 3)
    table_archs: tuple        # networks of Table 2
    student_arch: str = "resnet18"
    teacher_arch: str = "resnet152"
    teacher_width: float | None = None  # the teachers' channel multiplier; None: ``width``
    teacher_epochs: int | None = None   # the teachers' epochs; None: ``epochs`` (the paper trains all alike)
    rotation: float = 15.0
    validation: int = 0       # training images held out for validation and CD's "holdout" source; 0: none
    train_images: int = 0     # train on a fixed stratified subset of the rest; 0: all
    # How the profile was chosen (not keys of a file): the built-in name or file path, and the overrides.
    source: str = ""
    overrides: tuple = ()

    @property
    def label(self) -> str:
        """The name, with the overrides: what tables and reports call this profile."""
        return self.name + (f" ({', '.join(self.overrides)})" if self.overrides else "")

    def cli_args(self) -> str:
        """The command-line arguments that choose this profile again."""
        return f"--profile {self.source or self.name}" + (f" --set {' '.join(self.overrides)}" if self.overrides else "")

    def scaled(self, paper_epochs: float) -> int:
        """A paper epoch count (e.g. 300, or a 30-epoch phase) in this profile's units, at least 1."""
        return max(1, round(paper_epochs * self.epochs / PAPER_EPOCHS))

    def scaled_schedule(self, segments: list[int]) -> list[int]:
        """Phase lengths (e.g. CD's hard/soft segments) scaled so that they sum to ``scaled(sum(segments))``,
        the budget every method of that paper length gets. Each phase is rounded as ``scaled`` rounds it
        (at least one epoch), then the drift is corrected on the phases rounding moved most (earlier
        phases first on ties), as largest-remainder rounding does; rounding alone drifts (CD-200 at 15
        epochs got 14). With fewer budget epochs than phases, each phase gets one."""
        total = max(self.scaled(sum(segments)), len(segments))
        exact = [s * total / sum(segments) for s in segments]
        lengths = [max(1, round(x)) for x in exact]
        while sum(lengths) != total:
            short = sum(lengths) < total
            movable = [i for i in range(len(lengths)) if short or lengths[i] > 1]
            i = max(movable, key=lambda i: (exact[i] - lengths[i]) if short else (lengths[i] - exact[i]))
            lengths[i] += 1 if short else -1
        return lengths

    def recipe(self, **changes) -> TrainConfig:
        """The profile's base training config, with ``changes`` applied."""
        base = TrainConfig(dataset=self.dataset, width=self.width, epochs=self.epochs, rotation=self.rotation,
                           validation=self.validation, train_images=self.train_images)
        return replace(base, **changes)

    def to_toml(self) -> str:
        """The resolved profile as a TOML file that ``load_profile`` reads back to an equal profile."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                  if k in KEYS and v is not None}
        return f"# profile {self.label}: {self.cli_args()}\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in values.items())


FIELDS = {f.name: f for f in fields(Profile)}
KEYS = [name for name in FIELDS if name not in ("name", "source", "overrides")]  # what a profile file sets
REQUIRED = [name for name in KEYS if FIELDS[name].default is FIELDS[name].default_factory]


def _checked(key: str, value, source: str):
    """``value`` of profile key ``key`` in its field's type (ints are accepted as floats; a list or a
    comma-separated string as a tuple), or a ``ConfigError`` that names the key and ``source``."""
    if key not in KEYS:
        raise ConfigError(f"{source}: unknown profile key {key!r}; profile keys are {', '.join(KEYS)}")
    kind = FIELDS[key].type
    if kind == "tuple":
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list) and items and all(isinstance(v, str) and v.strip() for v in items):
            return tuple(v.strip() for v in items)
        rule = "a non-empty list of names"
    elif kind in ("float", "float | None"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        rule = "a number"
    elif kind in ("int", "int | None"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        rule = "a whole number"
    else:
        if isinstance(value, str):
            return value
        rule = "a string"
    raise ConfigError(f"{source}: profile key {key!r} must be {rule}, got {value!r}")


def _check_profile(profile: Profile, source: str) -> Profile:
    """Every config the profile makes must be valid: a bad width, data set or network is named here."""
    for key in ("epochs", "feature_models", "seeds", "teacher_epochs"):
        if getattr(profile, key) is not None and getattr(profile, key) < 1:
            raise ConfigError(f"{source}: profile key {key!r} must be >= 1, got {getattr(profile, key)}")
    try:
        for arch in profile.table_archs + (profile.student_arch,):
            profile.recipe(arch=arch)
        profile.recipe(arch=profile.teacher_arch, width=profile.teacher_width or profile.width)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}".replace("TrainConfig.", "profile key ")) from None
    return profile


def parse_override(text: str) -> tuple[str, object]:
    """``"width=0.25"`` -> ``("width", 0.25)``: the value is read as TOML, else taken as a plain string
    (so ``dataset=cifar10`` needs no quotes)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. width=0.25)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


def overrides_dict(overrides: Mapping | Sequence[str] | None) -> dict:
    """Overrides as a dict, from a dict or from ``KEY=VALUE`` strings (the command lines' ``--set``)."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [overrides]
    return dict(parse_override(item) for item in overrides)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"profile file {path} does not exist; give a built-in profile "
                          f"({', '.join(builtin_names())}) or the path of a .toml file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read profile file {path}: {err}") from None


def load_profile(path: str | Path, overrides: Mapping | Sequence[str] | None = None, _seen: tuple = ()) -> Profile:
    """A profile from a TOML file (its name is the file's stem), with ``overrides`` applied."""
    path = Path(path).expanduser()
    values = _read_toml(path)
    base = values.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or base in _seen or base == path.stem:
            raise ConfigError(f"{path}: 'base' must name another profile, got {base!r}")
        base_path = _builtin_path(base) if base in builtin_names() else (path.parent / base)
        start = asdict(load_profile(base_path, _seen=_seen + (path.stem,)))
    else:
        start = {}
    start.update({k: _checked(k, v, str(path)) for k, v in values.items()})
    changes = overrides_dict(overrides)
    start.update({k: _checked(k, v, "override") for k, v in changes.items()})
    start.update(name=path.stem, source=str(path),
                 overrides=tuple(f"{k}={_override_text(v)}" for k, v in changes.items()))
    missing = [k for k in REQUIRED if k not in start]
    if missing:
        raise ConfigError(f"{path}: profile keys {missing} are missing (or set base = \"quick\" to start from a "
                          f"built-in profile)")
    return _check_profile(Profile(**start), f"{path}" + (f" with --set {' '.join(start['overrides'])}"
                                                          if start["overrides"] else ""))


def _override_text(value) -> str:
    return value if isinstance(value, str) else ",".join(value) if isinstance(value, (list, tuple)) else json.dumps(value)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.toml"))


def _builtin_path(name: str) -> Path:
    return BUILTIN / f"{name}.toml"


def get_profile(name: str = "auto", dataset: str | None = None, announce: bool = True,
                overrides: Mapping | Sequence[str] | None = None, device=None) -> Profile:
    """A built-in profile by name or a profile file by path, with ``overrides`` (a dict or ``KEY=VALUE``
    strings) and ``dataset`` (an override of the data set) applied. ``auto`` is ``paper`` when the
    device (``device``, by default CUDA when available) is a GPU, otherwise ``smoke``. On a machine
    with an NVIDIA GPU that this PyTorch cannot use (a driver too old for its CUDA build, a CPU-only
    build), ``auto`` without a device raises a ``GPUUnusableError`` that says so and how to fix it,
    rather than quietly running ``smoke`` on the CPU."""
    if name == "auto":
        chosen = device not in (None, "auto")
        problem = None if chosen else unusable_gpu()
        if problem:
            raise GPUUnusableError(f"profile 'auto' stops rather than fall back to 'smoke': {problem}")
        name = "paper" if resolve_device(device).type == "cuda" else "smoke"
        reason = f"device {device}" if chosen else "CUDA is available" if name == "paper" else "no CUDA device found"
        if announce:
            print(f"profile: {name} ({reason}; pass profile='smoke'|'cpu'|'quick'|'paper' or a .toml file to choose)")
    changes = overrides_dict(overrides)
    if dataset:
        changes["dataset"] = dataset
    if name in builtin_names():
        return replace(load_profile(_builtin_path(name), changes), source=name)
    if str(name).endswith(".toml") or Path(str(name)).expanduser().is_file():
        return load_profile(name, changes)
    raise ConfigError(f"unknown profile {name!r}; choose one of {builtin_names()}, 'auto', or the path of a "
                      f".toml profile file")


def add_profile_arguments(parser) -> None:
    """``--profile``, ``--set`` and ``--dataset``, the same on every command line."""
    parser.add_argument("--profile", default="auto",
                        help=f"{' | '.join(builtin_names())} | auto (paper with CUDA, else smoke) | a .toml file")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override profile keys, e.g. --set width=0.25 epochs=15 dataset=cifar10")
    parser.add_argument("--dataset", default=None, help="override the profile's data set (as --set dataset=...)")


def profile_from_args(args, announce: bool = True) -> Profile:
    return get_profile(args.profile, args.dataset, announce=announce, overrides=args.overrides,
                       device=getattr(args, "device", None))


__all__ = ["Profile", "PAPER_EPOCHS", "get_profile", "load_profile", "builtin_names", "parse_override",
           "overrides_dict", "add_profile_arguments", "profile_from_args"]
