# %% [markdown]
# # core
#
# > Settings, typed configs, seeding, device and precision, progress bars: the pieces every other module stands on.

# %%
#| default_exp core

# %%
#| export
from __future__ import annotations
import configparser, contextlib, dataclasses, os, random, types, typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail

# %% [markdown]
# ## Settings
#
# `settings.ini` holds what differs from one machine to the next: where data, caches, checkpoints and
# outputs live, and which local folders hold pretrained weights. Values resolve in layers,
# built-in defaults < the file < `XR0_*` environment variables, and each resolved value remembers
# where it came from so `xr0 settings` can show it.

# %%
#| export
class SettingsError(RuntimeError):
    "A settings file that cannot be read or parsed."

_PATH_KEYS = ("data_root", "cache_dir", "checkpoint_dir", "output_dir")
_DEFAULTS = dict(data_root="~/xr0-data", cache_dir="~/.cache/xr0", checkpoint_dir="checkpoints", output_dir="runs")

def env_var_name(section: str, key: str) -> str:
    "The environment variable that overrides `key` of `section` in settings.ini."
    norm = key.upper().replace("-", "_").replace(".", "_")
    return f"XR0_{norm}" if section == "paths" else f"XR0_{section.upper().rstrip('S')}_{norm}"

@dataclass
class Settings:
    "Resolved machine-local settings; `sources` says where each value came from."
    data_root: Path
    cache_dir: Path
    checkpoint_dir: Path
    output_dir: Path
    weights: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)
    file: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def weight_path(self, name: str) -> Path:
        "Local folder of the pretrained backbone `name` from `[weights]`."
        if name not in self.weights:
            raise KeyError(f"no weights named {name!r} in [weights] of {self.file or 'settings.ini'}; known: {sorted(self.weights)}")
        return self.weights[name]

    def dataset_root(self, name: str) -> Path:
        "Root folder of data set `name`: its `[datasets]` entry, else `data_root/name`."
        return self.datasets.get(name, self.data_root / name)

# %%
#| export
def find_settings_file(start: str | Path | None = None) -> Path | None:
    "`$XR0_SETTINGS`, else the first settings.ini in `start` (default cwd) or a parent, else the one beside the package."
    if os.environ.get("XR0_SETTINGS"): return Path(os.environ["XR0_SETTINGS"]).expanduser()
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "settings.ini").is_file(): return d / "settings.ini"
    beside_pkg = Path(__file__).resolve().parent.parent / "settings.ini"
    return beside_pkg if beside_pkg.is_file() else None

def _resolve(value: str, base: Path) -> Path:
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else (base / p)

def get_settings(path: str | Path | None = None, env: dict | None = None) -> Settings:
    "Read settings: defaults < `path` (or the file `find_settings_file` finds) < `XR0_*` variables in `env`."
    env = os.environ if env is None else env
    file = Path(path).expanduser() if path is not None else find_settings_file()
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # keep key case: weight names are case-sensitive folders
    if file is not None:
        if not file.is_file(): raise SettingsError(f"settings file {file} does not exist or is not a file")
        try: cp.read_string(file.read_text(), source=str(file))
        except (configparser.Error, UnicodeDecodeError, OSError) as e:
            raise SettingsError(f"cannot read settings file {file}: {e}") from e
        unknown = set(cp.sections()) - {"paths", "weights", "datasets"}
        if unknown: raise SettingsError(f"settings file {file}: unknown section(s) {sorted(unknown)}; expected [paths], [weights], [datasets]")
        if cp.has_section("paths"):
            bad = set(cp["paths"]) - set(_PATH_KEYS)
            if bad: raise SettingsError(f"settings file {file}: unknown key(s) {sorted(bad)} in [paths]; expected {list(_PATH_KEYS)}")
    base = file.parent if file is not None else Path.cwd()
    sources, vals = {}, {}
    for k in _PATH_KEYS:
        v, src = _DEFAULTS[k], "default"
        if cp.has_option("paths", k): v, src = cp["paths"][k], f"{file} [paths]"
        ev = env_var_name("paths", k)
        if env.get(ev): v, src = env[ev], f"env {ev}"
        vals[k], sources[k] = _resolve(v, base), src
    maps = {}
    for sec in ("weights", "datasets"):
        d = {}
        if cp.has_section(sec):
            for k, v in cp[sec].items(): d[k], sources[f"{sec}.{k}"] = _resolve(v, base), f"{file} [{sec}]"
        prefix = env_var_name(sec, "")
        for ev, v in env.items():
            if ev.startswith(prefix) and v:
                match = [k for k in d if env_var_name(sec, k) == ev]
                k = match[0] if match else ev[len(prefix):].lower().replace("_", "-")
                d[k], sources[f"{sec}.{k}"] = _resolve(v, base), f"env {ev}"
        maps[sec] = d
    return Settings(**vals, weights=maps["weights"], datasets=maps["datasets"], file=file, sources=sources)

# %%
#| hide
with tempfile.TemporaryDirectory() as d:
    ini = Path(d) / "settings.ini"
    ini.write_text("[paths]\ndata_root = data\n[weights]\nrad-dino = /w/rad-dino\n")
    s = get_settings(ini, env={})
    test_eq(s.data_root, Path(d) / "data")
    test_eq(s.sources["data_root"], f"{ini} [paths]")
    test_eq(s.sources["cache_dir"], "default")
    test_eq(s.weight_path("rad-dino"), Path("/w/rad-dino"))
    # environment beats the file, for paths and weights alike
    s = get_settings(ini, env={"XR0_DATA_ROOT": "/elsewhere", "XR0_WEIGHT_RAD_DINO": "/x"})
    test_eq(s.data_root, Path("/elsewhere")); test_eq(s.weights["rad-dino"], Path("/x"))
    test_eq(s.dataset_root("mura"), Path("/elsewhere/mura"))
    # an unreadable or malformed file names itself
    bad = Path(d) / "bad.ini"; bad.write_text("this is not [an ini")
    test_fail(lambda: get_settings(bad, env={}), contains=str(bad))
    test_fail(lambda: get_settings(Path(d) / "missing.ini", env={}), contains="missing.ini")
    typo = Path(d) / "typo.ini"; typo.write_text("[paths]\ndata_rot = x\n")
    test_fail(lambda: get_settings(typo, env={}), contains="data_rot")
    test_fail(lambda: s.weight_path("nope"), contains="nope")

# %% [markdown]
# ## Typed configs
#
# Experiments and training runs are described by nested dataclasses. They load from YAML files, from
# plain dicts (papermill parameters) and from `key.sub=value` overrides. Every key is checked against the
# dataclass: an unknown or mistyped key raises `ConfigError` with its dotted path, so a typo never
# silently falls back to a default. No library does this strictly for stdlib dataclasses without adding
# a heavy dependency (pydantic, omegaconf), so the checker is a few dozen lines here.

# %%
#| export
class ConfigError(ValueError):
    "An unknown key or a value of the wrong type in a config."

def _check_value(tp, v, where: str):
    "Coerce `v` to annotation `tp` or raise ConfigError naming `where`."
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any: return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args: return None
        errs = []
        for a in args:
            if a is type(None): continue
            try: return _check_value(a, v, where)
            except ConfigError as e: errs.append(str(e))
        raise ConfigError(f"{where}: {v!r} does not fit {tp}")
    if origin is Literal:
        if v not in args: raise ConfigError(f"{where}: {v!r} is not one of {list(args)}")
        return v
    if is_dataclass(tp):
        if isinstance(v, tp): return v
        if not isinstance(v, dict): raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(v).__name__}")
        return config_from_dict(tp, v, _prefix=where + ".")
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)): raise ConfigError(f"{where}: expected a list, got {type(v).__name__} {v!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(v): raise ConfigError(f"{where}: expected {len(args)} items, got {len(v)}")
            return tuple(_check_value(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        inner = args[0] if args else Any
        out = [_check_value(inner, x, f"{where}[{i}]") for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(v, dict): raise ConfigError(f"{where}: expected a mapping, got {type(v).__name__}")
        return dict(v)
    if tp is bool:
        if isinstance(v, bool): return v
        raise ConfigError(f"{where}: expected true/false, got {v!r}")
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool): return float(v)
        raise ConfigError(f"{where}: expected a number, got {type(v).__name__} {v!r}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool): return v
        if isinstance(v, float) and v.is_integer(): return int(v)
        raise ConfigError(f"{where}: expected an integer, got {type(v).__name__} {v!r}")
    if tp is str:
        if isinstance(v, str): return v
        raise ConfigError(f"{where}: expected a string, got {type(v).__name__} {v!r}")
    if tp is Path:
        if isinstance(v, (str, Path)): return Path(v)
        raise ConfigError(f"{where}: expected a path, got {type(v).__name__} {v!r}")
    return v

def config_from_dict(cls, d: dict, _prefix: str = ""):
    "Build dataclass `cls` from nested dict `d`, rejecting unknown keys and wrong types by dotted name."
    if d is None: d = {}
    if not isinstance(d, dict): raise ConfigError(f"{_prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in known]
    if unknown:
        import difflib
        k = unknown[0]; near = difflib.get_close_matches(k, known, n=1)
        hint = f"; did you mean {_prefix}{near[0]}?" if near else f"; known keys: {sorted(known)}"
        raise ConfigError(f"unknown config key {_prefix}{k}{hint}")
    kw = {k: _check_value(hints[k], v, f"{_prefix}{k}") for k, v in d.items()}
    return cls(**kw)

def config_to_dict(cfg) -> dict:
    "A plain, YAML-ready dict of a config dataclass."
    def conv(v):
        if isinstance(v, Path): return str(v)
        if isinstance(v, tuple): return [conv(x) for x in v]
        if isinstance(v, list): return [conv(x) for x in v]
        if isinstance(v, dict): return {k: conv(x) for k, x in v.items()}
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}

# %%
#| export
def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

def parse_overrides(pairs: Iterable[str]) -> dict:
    "Turn `['train.lr=1e-3', 'model.arch=vit_small']` into a nested dict; values parse as YAML."
    out: dict = {}
    for p in pairs or ():
        if "=" not in p: raise ConfigError(f"override {p!r} is not of the form key.sub=value")
        k, v = p.split("=", 1)
        cur = out
        *head, last = k.strip().split(".")
        for h in head: cur = cur.setdefault(h, {})
        cur[last] = yaml.safe_load(v) if v.strip() else ""
    return out

def load_config(cls, source: str | Path | dict | None = None, overrides: Iterable[str] | dict | None = None):
    "Load `cls` from a YAML file or dict, then apply overrides (`key.sub=value` strings or a nested dict)."
    base: dict = {}
    if isinstance(source, (str, Path)):
        p = Path(source)
        try: base = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e: raise ConfigError(f"cannot read config file {p}: {e}") from e
        if not isinstance(base, dict): raise ConfigError(f"config file {p}: top level must be a mapping")
    elif isinstance(source, dict): base = source
    elif is_dataclass(source): base = config_to_dict(source)
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    try: return config_from_dict(cls, _deep_merge(base, ov))
    except ConfigError as e:
        if isinstance(source, (str, Path)): raise ConfigError(f"{source}: {e}") from None
        raise

def save_config(cfg, path: str | Path) -> Path:
    "Write a config dataclass as YAML."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path

# %%
#| hide
@dataclass
class _Opt:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)

@dataclass
class _Cfg:
    name: str = "x"
    steps: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    manifest: Path | None = None
    opt: _Opt = field(default_factory=_Opt)

c = load_config(_Cfg, {"steps": 5, "opt": {"lr": 0.1}}, ["opt.betas=[0.8, 0.9]", "precision=bf16"])
test_eq((c.steps, c.opt.lr, c.opt.betas, c.precision), (5, 0.1, (0.8, 0.9), "bf16"))
test_fail(lambda: load_config(_Cfg, {"stesp": 5}), contains="did you mean steps")
test_fail(lambda: load_config(_Cfg, {"opt": {"lrr": 1}}), contains="opt.lrr")
test_fail(lambda: load_config(_Cfg, {"steps": "ten"}), contains="steps")
test_fail(lambda: load_config(_Cfg, {}, ["precision=fp8"]), contains="precision")
with tempfile.TemporaryDirectory() as d:
    p = save_config(c, Path(d) / "c.yaml")
    test_eq(load_config(_Cfg, p), c)
    Path(d, "bad.yaml").write_text("opt:\n  lr: [1, 2]\n")
    test_fail(lambda: load_config(_Cfg, Path(d) / "bad.yaml"), contains="bad.yaml: opt.lr")

# %% [markdown]
# ## Seeding
#
# One call seeds Python, NumPy and torch (all devices). `deterministic=True` also asks torch for
# deterministic kernels, which the bitwise resume test of the trainer relies on.

# %%
#| export
def seed_everything(seed: int, deterministic: bool = False) -> int:
    "Seed python, numpy and torch; with `deterministic`, force deterministic torch kernels."
    random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return seed

# %%
#| hide
seed_everything(3); a = (random.random(), np.random.rand(), torch.rand(1).item())
seed_everything(3); b = (random.random(), np.random.rand(), torch.rand(1).item())
test_eq(a, b)

# %% [markdown]
# ## Device and precision
#
# `select_device("auto")` picks CUDA when present; `autocast` wraps a block in the chosen precision
# (no-op for fp32) so model code never branches on the device.

# %%
#| export
Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def select_device(name: str = "auto") -> torch.device:
    "`auto` → cuda if available else cpu; otherwise the named device, checked to exist."
    if name == "auto": return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev

def precision_dtype(precision: str) -> torch.dtype:
    "The torch dtype of a precision name (fp32, bf16, fp16)."
    if precision not in _DTYPES: raise ValueError(f"unknown precision {precision!r}; expected one of {list(_DTYPES)}")
    return _DTYPES[precision]

def autocast(device: torch.device | str, precision: str = "fp32"):
    "A context that runs the block in `precision` on `device` (mixed precision; fp32 does nothing)."
    dt = precision_dtype(precision)
    dev = torch.device(device)
    if dt is torch.float32: return contextlib.nullcontext()
    if dev.type == "cpu" and dt is torch.float16:
        raise ValueError("fp16 autocast on CPU is not supported; use bf16 on CPU")
    return torch.autocast(device_type=dev.type, dtype=dt)

# %%
#| hide
test_eq(select_device("cpu").type, "cpu")
test_eq(precision_dtype("bf16"), torch.bfloat16)
test_fail(lambda: precision_dtype("fp8"), contains="fp8")
with autocast("cpu", "bf16"):
    test_eq((torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.bfloat16)
with autocast("cpu", "fp32"):
    test_eq((torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.float32)

# %% [markdown]
# ## Progress
#
# Every long loop goes through `progress`, a thin tqdm wrapper. `XR0_PROGRESS=0` silences all bars
# (CI logs, papermill), and non-zero ranks of a distributed job never draw one.

# %%
#| export
def progress(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
             disable: bool | None = None, **kw) -> tqdm:
    "A tqdm progress bar; off when `XR0_PROGRESS=0` or on a non-zero distributed rank."
    if disable is None:
        disable = os.environ.get("XR0_PROGRESS", "1") == "0" or int(os.environ.get("RANK", "0")) != 0
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **kw)

# %%
#| hide
test_eq(sum(progress(range(5), desc="t", disable=True)), 10)
