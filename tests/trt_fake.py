"""A strict fake of the TensorRT Python API of one recorded release (tests only).

``strict_trt("11.4.0.106")`` returns a module-like object that behaves enough like TensorRT for
the engine builder and the trt backend to run against it, and that raises AttributeError for
every name the real bindings of that release do not have (``calibration/trt_api.json``, recorded
from the real wheels by ``tools/trt_api_table.py``). The behaviour (a network of layers, a
builder config that records its calls, an engine whose execution context checks that every I/O
tensor has a non-null address) is here; which names exist comes from the record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

API = json.loads((Path(__file__).resolve().parent.parent / "calibration" / "trt_api.json").read_text())["releases"]


class Strict:
    """Attribute access limited to the recorded members of TensorRT class `_trt_cls`."""

    _trt_cls = ""
    _members: frozenset[str] = frozenset()
    _release = ""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            cls = type(self)
            if name not in cls._members:
                raise AttributeError(f"TensorRT {cls._release}: '{cls._trt_cls}' object has no attribute '{name}'")
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):
            cls = type(self)
            if name not in cls._members:
                raise AttributeError(f"TensorRT {cls._release}: cannot set '{cls._trt_cls}.{name}' (no such attribute)")
        object.__setattr__(self, name, value)


class Enum:
    """A recorded enum: members are (name, value) objects; unknown names raise AttributeError."""

    def __init__(self, release: str, name: str, members: list[str]):
        self._release, self._name = release, name
        self._values = [m for m in members if m not in ("name", "value") and m.isupper()]

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_") or item not in self._values:
            raise AttributeError(f"TensorRT {self._release}: type object '{self._name}' has no attribute '{item}'")
        return EnumValue(self._name, item, self._values.index(item))


class EnumValue:
    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnumValue) and (other.enum, other.name) == (self.enum, self.name)

    def __hash__(self) -> int:
        return hash((self.enum, self.name))

    def __repr__(self) -> str:
        return f"{self.enum}.{self.name}"


class FakeTrt:
    """The module. `calls` records what the builder was told; `layers` are the parsed network's
    layers as (trt.LayerType name, ElementWise/Unary op or None, inputs, outputs)."""

    def __init__(self, release: str, layers: list[tuple] | None = None, engines: dict[str, dict] | None = None):
        self._release = release
        self._api = API[release]
        self._module = set(self._api["module"])
        self.calls: list[tuple] = []
        self._layers = layers or []
        self._engines = engines or {}
        self.__version__ = self._api["version"]
        self._built: dict[str, Any] = {}
        self._make_classes()

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_"):
            raise AttributeError(item)
        if item not in self._module:
            raise AttributeError(f"module 'tensorrt' ({self._release}) has no attribute '{item}'")
        if item in self._built:
            return self._built[item]
        members = self._api["classes"].get(item)
        if members is not None and item[0].isupper() and not item.startswith("I") and item not in (
                "Logger", "Builder", "Runtime", "OnnxParser"):
            return Enum(self._release, item, members)
        if item in ("float32", "float16", "int8", "int32", "int64", "bool"):
            return EnumValue("DataType", item, 0)
        raise AttributeError(f"the fake TensorRT does not implement {item!r} (add it to tests/trt_fake.py)")

    # ---- classes, bound to the record ----------------------------------------------------------------
    def _cls(self, name: str, base: type = Strict, body: dict | None = None) -> type:
        members = frozenset(self._api["classes"].get(name, ()))
        return type(name, (base,), {"_trt_cls": name, "_members": members, "_release": self._release, **(body or {})})

    def _make_classes(self) -> None:
        fake = self
        names = self._api["classes"]

        def enum(name: str) -> Enum:
            return Enum(self._release, name, names.get(name, []))

        Logger = self._cls("Logger", body={"__init__": lambda s, sev=None: None})
        Logger.WARNING = "WARNING"  # class attribute: Logger.WARNING is recorded in every release
        ILayer = self._cls("ILayer")

        def layer_init(s: Any, ltype: str, op: str | None, ins: list[str], outs: list[str]) -> None:
            object.__setattr__(s, "_ltype", ltype)
            object.__setattr__(s, "_op", op)
            object.__setattr__(s, "_ins", ins)
            object.__setattr__(s, "_outs", outs)

        class _Layer(ILayer):  # type: ignore[misc, valid-type]
            __init__ = layer_init

            @property
            def type(self) -> Any:
                return EnumValue("LayerType", self._ltype, 0)

            @property
            def num_inputs(self) -> int:
                return len(self._ins)

            @property
            def num_outputs(self) -> int:
                return len(self._outs)

            def get_input(self, i: int) -> Any:
                return _Tensor(self._ins[i])

            def get_output(self, i: int) -> Any:
                return _Tensor(self._outs[i])

            @property
            def precision(self) -> Any:
                return None

            @precision.setter
            def precision(self, value: Any) -> None:
                fake.calls.append(("precision", self._ltype, str(value)))

            def set_output_type(self, i: int, dtype: Any) -> None:
                fake.calls.append(("output_type", self._ltype, str(dtype)))

            @property
            def op(self) -> Any:
                return EnumValue("Op", self._op, 0)

        _Layer._members = ILayer._members  # ILayer's members only, unless cast to a subclass below

        ITensor = self._cls("ITensor")

        class _Tensor(ITensor):  # type: ignore[misc, valid-type]
            def __init__(self, name: str) -> None:
                object.__setattr__(self, "_name", name)

            @property
            def name(self) -> str:
                return self._name

            @property
            def dtype(self) -> Any:
                return EnumValue("DataType", "float32", 0)

        def layer_subclass(name: str) -> type:
            members = frozenset(names.get(name, ())) | ILayer._members
            return type(name, (_Layer,), {"_trt_cls": name, "_members": members, "_release": self._release})

        INetworkDefinition = self._cls("INetworkDefinition")

        class _Network(INetworkDefinition):  # type: ignore[misc, valid-type]
            @property
            def num_layers(self) -> int:
                return len(fake._layers)

            def get_layer(self, i: int) -> Any:
                ltype, op, ins, outs = fake._layers[i]
                return _Layer(ltype, op, list(ins), list(outs))

        IOptimizationProfile = self._cls("IOptimizationProfile")

        class _Profile(IOptimizationProfile):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                object.__setattr__(self, "_shapes", {})

            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                self._shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        ITimingCache = self._cls("ITimingCache")

        class _Cache(ITimingCache):  # type: ignore[misc, valid-type]
            def serialize(self) -> bytes:
                return b"timing-bytes"

        IBuilderConfig = self._cls("IBuilderConfig")

        class _Config(IBuilderConfig):  # type: ignore[misc, valid-type]
            def __setattr__(self, k: str, v: Any) -> None:
                super().__setattr__(k, v)
                fake.calls.append(("set", k, "calibrator" if k == "int8_calibrator" else v))

            def set_memory_pool_limit(self, pool: Any, size: int) -> None:
                fake.calls.append(("workspace", str(pool), size))

            def set_flag(self, flag: Any) -> None:
                fake.calls.append(("flag", flag.name))

            def add_optimization_profile(self, p: Any) -> None:
                fake.calls.append(("profile", p._shapes))

            def set_calibration_profile(self, p: Any) -> None:
                fake.calls.append(("calibration_profile", p._shapes))

            def create_timing_cache(self, data: bytes) -> Any:
                fake.calls.append(("timing_in", data))
                return _Cache()

            def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> None:
                fake.calls.append(("timing_set", ignore_mismatch))

        class _Builder(self._cls("Builder")):  # type: ignore[misc]
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int = 0) -> Any:
                fake.calls.append(("network_flags", flags))
                return _Network()

            def create_builder_config(self) -> Any:
                return _Config()

            def create_optimization_profile(self) -> Any:
                return _Profile()

            def build_serialized_network(self, network: Any, config: Any) -> bytes:
                return b"engine-bytes"

        class _Parser(self._cls("OnnxParser")):  # type: ignore[misc]
            def __init__(self, network: Any, logger: Any) -> None:
                pass

            @property
            def num_errors(self) -> int:
                return 0

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse", Path(path).name))
                return True

        IExecutionContext = self._cls("IExecutionContext")

        class _Context(IExecutionContext):  # type: ignore[misc, valid-type]
            def __init__(self, spec: dict) -> None:
                object.__setattr__(self, "_spec", spec)
                object.__setattr__(self, "_shapes", {})
                object.__setattr__(self, "_addr", {})

            def set_optimization_profile_async(self, p: int, stream: Any) -> bool:
                return True

            def set_input_shape(self, name: str, shape: tuple) -> bool:
                self._shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                self._addr[name] = ptr
                return True

            def get_tensor_shape(self, name: str) -> tuple:
                return self._spec["output_shape"](self._shapes, name)

            def execute_async_v3(self, stream: Any) -> bool:
                names = [n for n, _, _ in self._spec["io"]]
                null = [n for n in names if not self._addr.get(n)]
                if null:  # TensorRT requires a non-null address for every I/O tensor, empty ones too
                    raise RuntimeError(f"TensorRT: tensor(s) {null} have a null address")
                fake.calls.append(("execute", dict(self._shapes)))
                return True

        class _Engine(self._cls("ICudaEngine")):  # type: ignore[misc]
            def __init__(self, spec: dict) -> None:
                object.__setattr__(self, "_spec", spec)

            @property
            def num_io_tensors(self) -> int:
                return len(self._spec["io"])

            def get_tensor_name(self, i: int) -> str:
                return self._spec["io"][i][0]

            def get_tensor_mode(self, name: str) -> Any:
                mode = next(m for n, m, _ in self._spec["io"] if n == name)
                return enum("TensorIOMode").__getattr__(mode)

            def get_tensor_dtype(self, name: str) -> Any:
                return next(d for n, _, d in self._spec["io"] if n == name)

            @property
            def num_optimization_profiles(self) -> int:
                return self._spec.get("profiles", 1)

            def create_execution_context(self) -> Any:
                return _Context(self._spec)

        class _Runtime(self._cls("Runtime")):  # type: ignore[misc]
            def __init__(self, logger: Any) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Any:
                return _Engine(fake._engines[data.decode()])

        self._built.update({
            "Logger": Logger, "Builder": _Builder, "OnnxParser": _Parser, "Runtime": _Runtime,
            "IElementWiseLayer": layer_subclass("IElementWiseLayer"), "IUnaryLayer": layer_subclass("IUnaryLayer"),
            "init_libnvinfer_plugins": lambda logger, ns: True,
            "nptype": lambda dtype: dtype,
        })
        for calib in ("IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"):
            if calib in self._module:
                self._built[calib] = type(calib, (), {"__init__": lambda s: None})


class FakeCuda:
    """Device memory as numbered addresses (never 0) backed by host arrays."""

    def __init__(self) -> None:
        self.next = 4096
        self.mem: dict[int, int] = {}
        self.stream = object()
        self.device_id = 0

    def malloc(self, nbytes: int) -> int:
        ptr = self.next
        self.next += max(int(nbytes), 256) + 256
        self.mem[ptr] = int(nbytes)
        return ptr

    def free(self, ptr: int) -> None:
        self.mem.pop(ptr, None)

    def htod(self, dst: int, arr: np.ndarray) -> None:
        assert dst, "copy to a null device pointer"

    def dtoh(self, out: np.ndarray, src: int, offset_bytes: int = 0) -> np.ndarray:
        return out

    def sync(self) -> None:
        pass

    def properties(self) -> dict[str, Any]:
        return {"name": "Fake GPU", "compute_capability": "8.7", "total_memory_bytes": 1 << 30, "integrated": True}

    def close(self) -> None:
        pass

