"""A job's resumable state in files that cannot run code: safetensors for the tensors, JSON for the rest.

Accelerate's `save_state` pickles the LR schedule, custom objects and RNG states (and `torch.save`s the
optimizer); unpickling a file runs whatever it says, and checkpoints are shared (a run moved between
machines, a colleague's folder). So a job writes its own state, and resuming never unpickles:

    adapter_state.safetensors       the trained tensors by name (the fp32 masters when there are some; the
                                    EMA as "ema.<name>", train/jobs/ema.py)
    optimizer.safetensors           every tensor of the optimizer's per-parameter state as "<index>.<name>"
                                    (AdamW: exp_avg, exp_avg_sq and its 0-d `step` counter, whichever of the
                                    for-loop, foreach or fused kernels made them; Adafactor's factored row
                                    and column moments; Prodigy's s and p0; bitsandbytes' uint8 moments,
                                    block maxima and quantile maps: `state_tensor_fits` says which shapes)
    optimizer.json                  param_groups (hyper-parameters as of this step, parameter indices;
                                    Prodigy's step-size estimate d and its sums live here too) and any
                                    non-tensor per-parameter value (Adafactor's and Prodigy's int `step`)
    lr_schedule.json                the LambdaLR counters (last_epoch, _step_count, base_lrs, _last_lr, ...);
                                    the lambda itself is rebuilt from the recipe
    loss_scaler.json                fp16 only: LossScaler.state_dict()
    random_states_<p>.safetensors   process p's torch generators as uint8 tensors: "cpu", "cuda.<device>"
    random_states_<p>.json          process p's global python `random` and numpy states

Nothing else of accelerate's save_state is needed for exact resume: the jobs prepare no dataloader (the
batch order is BatchPlan's pure function of the step), accelerate's GradScaler is unused (fp16 has our
LossScaler), and its step counter only drives gradient accumulation, which the jobs do themselves.

Reading is split from applying. `TrainingState.read(folder, processes)` parses every file and checks it
against the live objects (names, shapes and dtypes of tensors; keys and value types of the JSON) without
changing anything, so resume can pass over a bad checkpoint to an older one; `apply` then loads. Every
process reads all processes' RNG files, so all of them judge a checkpoint alike.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save, save_file
from torch import Tensor

from adapterkit.train.jobs.precision import LossScaler, MasterWeights

STATE_FILE = "adapter_state.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
SCHEDULE_FILE, SCALER_FILE = "lr_schedule.json", "loss_scaler.json"
# What the saved JSON must hold: the values that change as a run trains (the others are flags the
# optimizer and schedule are built with, the same in every run of the recipe).
GROUP_KEYS = frozenset({"params", "lr", "initial_lr", "betas", "eps", "weight_decay",
                        "d", "d_max", "d_numerator", "d_hat", "d_denom", "k"})   # prodigyopt's estimate
SCHEDULE_KEYS = frozenset({"last_epoch", "_step_count", "base_lrs", "_last_lr"})


def random_state_files(process: int) -> tuple[str, str]:
    return f"random_states_{process}.safetensors", f"random_states_{process}.json"


class StateFileError(ValueError):
    """A state file that cannot be read, or that does not fit this run; `file` is its name."""

    def __init__(self, file: str, problem: str):
        self.file = file
        super().__init__(f"{file} {problem}")


@dataclass
class RandomStates:
    """One process's global generators: torch's as uint8 tensors, python's and numpy's as JSON."""
    tensors: dict[str, Tensor]
    plain: dict

    @classmethod
    def capture(cls) -> RandomStates:
        tensors = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        version, internal, gauss = random.getstate()
        numpy = np.random.get_state(legacy=False)
        numpy["state"]["key"] = numpy["state"]["key"].tolist()
        return cls(tensors, {"python": [version, list(internal), gauss], "numpy": numpy})

    def encoded(self) -> tuple[bytes, str]:
        """The two files' contents (sent from every process to the main one, which writes them)."""
        return save(self.tensors), json.dumps(self.plain)

    def check(self, names: tuple[str, str]) -> None:
        """Raise StateFileError unless every state is one its generator accepts (tried on scratch ones)."""
        others = self.tensors.keys() - {"cpu"}
        if "cpu" not in self.tensors or any(not k.removeprefix("cuda.").isdigit() for k in others):
            raise StateFileError(names[0], f"holds {sorted(self.tensors)}, not the 'cpu' (and 'cuda.<i>') "
                                           "generator states")
        for key, value in self.tensors.items():
            try:
                check_generator_state(key, value)
            except (RuntimeError, TypeError, ValueError) as e:
                raise StateFileError(names[0], f"holds no valid torch generator state under {key!r} ({e})") \
                    from None
        try:
            version, internal, gauss = self.plain["python"]
            random.Random().setstate((version, tuple(internal), gauss))
            np.random.RandomState().set_state(_numpy_state(self.plain["numpy"]))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise StateFileError(names[1], "holds no valid python/numpy generator state "
                                           f"({type(e).__name__}: {e})") from None

    def restore(self) -> list[str]:
        """Set this process's generators; returns notes on what could not be restored here."""
        torch.set_rng_state(self.tensors["cpu"])
        version, internal, gauss = self.plain["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_numpy_state(self.plain["numpy"]))
        saved = sorted(int(k.removeprefix("cuda.")) for k in self.tensors if k.startswith("cuda."))
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i in saved:
            if i < here:
                torch.cuda.set_rng_state(self.tensors[f"cuda.{i}"], i)
        if len(saved) == here:
            return []
        rest = "the others start from the seed" if here > len(saved) else "only the first are restored"
        return [f"the checkpoint holds the CUDA generators of {len(saved)} devices, this machine has {here}: "
                + rest]


def check_generator_state(key: str, value: Tensor) -> None:
    """Raise unless `value` is a state a generator of `key`'s kind ("cpu", "cuda.<i>") accepts, tried on a
    scratch one (without CUDA here, a CUDA state is only checked to be bytes)."""
    if value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"a {value.dtype} tensor of shape {list(value.shape)}, not bytes")
    if key == "cpu" or torch.cuda.is_available():
        torch.Generator("cpu" if key == "cpu" else "cuda").set_state(value)


def _numpy_state(plain: dict) -> dict:
    key = np.asarray(plain["state"]["key"], dtype=np.int64)
    if key.shape != (624,) or key.min() < 0 or key.max() >= 2 ** 32:
        raise ValueError("the MT19937 key must be 624 integers in [0, 2^32)")
    return plain | {"state": plain["state"] | {"key": key.astype(np.uint32)}}


@dataclass
class Loaded:
    """A checkpoint's state, read and checked, not yet applied (TrainingState.read -> apply)."""
    tensors: dict[str, Tensor]
    optimizer: dict
    lr_schedule: dict
    scaler: dict | None
    random: RandomStates | None          # this process's; None: the checkpoint had fewer processes
    notes: list[str]


@dataclass
class TrainingState:
    """Everything a checkpoint holds to continue a run exactly, and how to write and read it back.

    `tensors()` returns the trained tensors by name as detached views of the live ones (loading copies
    into them; with `master`, the fp32 masters, copied on into the model afterwards). `what` names
    them in errors ("LoRA config", "ControlNet")."""
    accelerator: Accelerator
    tensors: Callable[[], dict[str, Tensor]]
    optimizer: Any                        # a torch optimizer, or accelerate's wrapper of one
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    master: MasterWeights | None = None
    scaler: LossScaler | None = None
    what: str = "adapter"

    # --- writing ------------------------------------------------------------------------------------

    def random_states(self) -> list[tuple[bytes, str]]:
        """Every process's RNG state, encoded (a collective: all processes call it, the main one uses it)."""
        mine = RandomStates.capture().encoded()
        return [mine] if self.accelerator.num_processes == 1 else gather_object([mine])

    def save(self, folder: Path, random_states: list[tuple[bytes, str]]) -> None:
        """Write the state files into `folder` (on the main process; `random_states` from all of them)."""
        save_file(self.tensors(), str(folder / STATE_FILE))
        tensors, plain = optimizer_files(self.optimizer.state_dict())
        save_file(tensors, str(folder / OPTIMIZER_TENSORS))
        _write_json(folder / OPTIMIZER_JSON, plain)
        _write_json(folder / SCHEDULE_FILE, schedule_counters(self.lr_schedule))
        if self.scaler:
            _write_json(folder / SCALER_FILE, self.scaler.state_dict())
        for process, (raw, plain_rng) in enumerate(random_states):
            names = random_state_files(process)
            (folder / names[0]).write_bytes(raw)
            (folder / names[1]).write_text(plain_rng)

    def files(self, processes: int) -> list[str]:
        """The state files a checkpoint written by `processes` processes must hold."""
        return [STATE_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULE_FILE,
                *([SCALER_FILE] if self.scaler else []),
                *(name for p in range(processes) for name in random_state_files(p))]

    # --- reading ------------------------------------------------------------------------------------

    def read(self, folder: Path, processes: int) -> Loaded:
        """Parse and check the state files in `folder` (written by `processes` processes); changes nothing.
        Raises StateFileError naming the first file that is unreadable or does not fit this run."""
        folder = Path(folder)
        tensors = self._read_tensors(folder)
        optimizer = self._read_optimizer(folder)
        schedule = self._read_schedule(folder)
        scaler = self._read_scaler(folder)
        states = [self._read_random(folder, p) for p in range(processes)]
        index, notes = self.accelerator.process_index, []
        if index >= processes:
            notes.append(f"the checkpoint was written by {processes} processes: process {index}'s random "
                         "generators start from the seed")
        mine = states[index] if index < processes else None
        return Loaded(tensors, optimizer, schedule, scaler, mine, notes)

    def _read_tensors(self, folder: Path) -> dict[str, Tensor]:
        saved, own = _read_safetensors(folder / STATE_FILE), self.tensors()
        missing, unknown = own.keys() - saved.keys(), saved.keys() - own.keys()
        if missing or unknown:
            raise StateFileError(STATE_FILE, f"does not match this run's {self.what} ({len(missing)} tensors "
                                             f"missing, e.g. {sorted(missing)[:2]}; {len(unknown)} unknown, "
                                             f"e.g. {sorted(unknown)[:2]})")
        for name, value in saved.items():
            if value.shape != own[name].shape or value.dtype != own[name].dtype:
                raise StateFileError(STATE_FILE, f"holds {name} as {value.dtype} {list(value.shape)}, this "
                                                 f"run's {self.what} has {own[name].dtype} "
                                                 f"{list(own[name].shape)}")
        return saved

    def _read_optimizer(self, folder: Path) -> dict:
        live = self.optimizer.state_dict()
        plain = _read_json(folder / OPTIMIZER_JSON)
        if not isinstance(plain, dict) or not isinstance(plain.get("param_groups"), list) \
                or not isinstance(plain.get("state"), dict):
            raise StateFileError(OPTIMIZER_JSON, "holds no optimizer state "
                                                 "({'param_groups': [...], 'state': {...}})")
        groups = plain["param_groups"]
        if len(groups) != len(live["param_groups"]):
            raise StateFileError(OPTIMIZER_JSON, f"holds {len(groups)} parameter groups, this run has "
                                                 f"{len(live['param_groups'])}")
        groups = [_like(g, lg, OPTIMIZER_JSON, f"param_groups[{i}]", GROUP_KEYS & lg.keys())
                  for i, (g, lg) in enumerate(zip(groups, live["param_groups"]))]
        for i, (group, lg) in enumerate(zip(groups, live["param_groups"])):
            if group["params"] != lg["params"]:
                raise StateFileError(OPTIMIZER_JSON, f"holds parameter group {i} over other parameters than "
                                                     "this run's")
        shapes = {i: p.shape for group, lg in zip(self.optimizer.param_groups, live["param_groups"])
                  for i, p in zip(lg["params"], group["params"])}
        state: dict[int, dict] = {}
        for key, value in _read_safetensors(folder / OPTIMIZER_TENSORS).items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) not in shapes or not name:
                raise StateFileError(OPTIMIZER_TENSORS, f"holds {key!r}, not '<parameter index>.<name>' of "
                                                        f"one of this run's {len(shapes)} parameters")
            shape = shapes[int(index)]
            if not state_tensor_fits(name, value, shape):
                raise StateFileError(OPTIMIZER_TENSORS, f"holds {key} as {value.dtype} {list(value.shape)} "
                                                        f"for a parameter of shape {list(shape)}")
            state.setdefault(int(index), {})[name] = value
        for index, values in plain["state"].items():
            if not index.isdigit() or int(index) not in shapes or not isinstance(values, dict):
                raise StateFileError(OPTIMIZER_JSON, f"holds state for {index!r}, not one of this run's "
                                                     f"{len(shapes)} parameters")
            state.setdefault(int(index), {}).update(values)
        # (Adafactor keeps other moments for a matrix than for a vector, and bitsandbytes 32-bit ones for
        # small tensors: the parameters' states need not be of one kind.)
        return {"state": state, "param_groups": groups}

    def _read_schedule(self, folder: Path) -> dict:
        return _like(_read_json(folder / SCHEDULE_FILE), schedule_counters(self.lr_schedule), SCHEDULE_FILE,
                     "the LR schedule", SCHEDULE_KEYS)

    def _read_scaler(self, folder: Path) -> dict | None:
        if not self.scaler:
            return None
        saved = _read_json(folder / SCALER_FILE)
        try:
            LossScaler().load_state_dict(saved)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateFileError(SCALER_FILE, f"holds no valid loss scaler state ({e})") from None
        return saved

    def _read_random(self, folder: Path, process: int) -> RandomStates:
        names = random_state_files(process)
        states = RandomStates(_read_safetensors(folder / names[0]), _read_json(folder / names[1]))
        if not isinstance(states.plain, dict):
            raise StateFileError(names[1], "holds no {'python': ..., 'numpy': ...} generator states")
        states.check(names)
        return states

    # --- applying -----------------------------------------------------------------------------------

    def apply(self, loaded: Loaded) -> list[str]:
        """Load what `read` checked into the live objects; returns notes for the person resuming."""
        own = self.tensors()
        with torch.no_grad():
            for name, value in loaded.tensors.items():
                own[name].copy_(value)
        if self.master:
            self.master.master_to_model()
        try:
            self.optimizer.load_state_dict(loaded.optimizer)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise StateFileError(OPTIMIZER_JSON, f"does not fit this run's optimizer ({e})") from None
        lambdas = [None] * len(self.lr_schedule.lr_lambdas)       # ours are functions: nothing to restore
        self.lr_schedule.load_state_dict(loaded.lr_schedule | {"lr_lambdas": lambdas})
        if self.scaler:
            self.scaler.load_state_dict(loaded.scaler)
        notes = list(loaded.notes)
        if loaded.random:                                   # last: nothing may draw after it
            notes += loaded.random.restore()
        return notes


def state_tensor_fits(name: str, value: Tensor, shape: torch.Size) -> bool:
    """Whether `value` can be the optimizer state `name` of a parameter of `shape`: a float tensor of
    the parameter's shape or 0-d (AdamW's moments and step), or one of the optimizers' own layouts."""
    if value.dtype == torch.uint8:          # bitsandbytes' 8-bit moments (bitsandbytes/optim/optimizer.py)
        return name in ("state1", "state2") and value.shape == shape
    if not value.is_floating_point():
        return False
    if value.dim() == 0 or value.shape == shape:
        return True
    if name == "exp_avg_sq_row":                 # transformers Adafactor: the factored second moment
        return tuple(value.shape) == tuple(shape[:-1])
    if name == "exp_avg_sq_col":
        return tuple(value.shape) == tuple(shape[:-2]) + tuple(shape[-1:])
    if name in ("s", "p0"):                      # prodigyopt: the flattened parameter, every slice_p-th value
        return value.dim() == 1 and value.numel() <= math.prod(shape)
    if name in ("absmax1", "absmax2", "qmap1", "qmap2"):   # bitsandbytes: block maxima, quantile maps
        return value.dim() == 1
    return False


def optimizer_files(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state_dict as (tensors "<index>.<name>", the rest as JSON-able values)."""
    tensors, plain = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain}


def schedule_counters(lr_schedule) -> dict:
    """The LR schedule's state without its lambdas (functions: rebuilt from the recipe, never stored)."""
    return {k: v for k, v in lr_schedule.state_dict().items() if k != "lr_lambdas"}


def _like(saved: Any, live: Any, file: str, where: str, needed: frozenset[str] = frozenset()) -> Any:
    """`saved` (from JSON) checked to hold `live`'s kinds of values (numbers, lists of the same length,
    ...), with tuples restored. Of a dict's keys, those in `needed` must be there (what the run's state
    is); another of `live`'s keys that `saved` lacks keeps its live value (a flag that a newer torch
    added), and one only `saved` has is dropped (a flag that it removed)."""
    def bad(what: str):
        return StateFileError(file, f"does not fit this run ({where}: {what})")
    if isinstance(live, dict):
        if not isinstance(saved, dict) or not needed <= saved.keys():
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise bad(f"holds {got}, needs {sorted(needed)}")
        return {k: _like(saved[k], v, file, f"{where}.{k}") if k in saved else v for k, v in live.items()}
    if isinstance(live, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(live):
            raise bad(f"{saved!r:.60} where a list of {len(live)} belongs")
        items = [_like(s, v, file, f"{where}[{i}]") for i, (s, v) in enumerate(zip(saved, live))]
        return tuple(items) if isinstance(live, tuple) else items
    number = (int, float)
    if isinstance(live, number) and not isinstance(live, bool):
        if not isinstance(saved, number) or isinstance(saved, bool) or (isinstance(live, int) and
                                                                        not isinstance(saved, int)):
            raise bad(f"{saved!r:.60} where a {type(live).__name__} belongs")
        return saved
    if type(saved) is not type(live):
        raise bad(f"{saved!r:.60} where a {type(live).__name__} belongs")
    return saved


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise StateFileError(path.name, "is missing") from None
    except Exception as e:                # SafetensorError and friends: the file is not what it claims
        raise StateFileError(path.name, f"is not a readable safetensors file ({type(e).__name__}: "
                                        f"{str(e)[:200]})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise StateFileError(path.name, "is missing") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateFileError(path.name, f"is not readable JSON ({type(e).__name__}: {str(e)[:200]})") \
            from None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, allow_nan=True, sort_keys=True))

