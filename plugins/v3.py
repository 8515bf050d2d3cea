"""The moe:: plugins as ``IPluginV3`` classes with ``IPluginCreatorV3One`` creators: the form TensorRT
for RTX's ONNX parser takes ("imports IPluginV3 plugins registered with an IPluginCreatorV3One creator
only"; it refuses the Quickly Deployable Plugins of ``trt.py``).

One generic plugin class serves every plugin the registry lists, driven by its parts:

- attributes: the spec's (``spec.py``), read from the node and serialised into the engine;
- output types and shapes: ``shapes.py``'s functions, evaluated on TensorRT's dimension expressions;
- formats: LINEAR, each tensor in a dtype its spec allows, outputs typed as ``shapes.py`` says;
- the kernel: at build, ``kernels.node_recipe`` of the node's build-time shapes names the variant, its
  PTX for the build's target (``plugins.aot.compiled_kernel``: a bundle's precompiled PTX, else
  Triton) is serialised with the plugin; at run time the recipe of the actual shapes gives the grid
  and scalars, and ``enqueue`` launches the PTX through CUDA's driver API (cuda-python), so a
  runtime needs neither Triton nor torch.

Nothing here imports tensorrt: the module is handed in (``tensorrt_rtx``, or ``tensorrt`` whose
classes are the same), so this file imports anywhere.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from plugins import registry
from plugins.aot import compiled_kernel
from plugins.recipe import KernelRecipe

__all__ = ["KERNEL_FIELD", "Unknown", "errors", "recipe_dims", "register_all"]

#: The serialised field holding a plugin's compiled kernel (JSON: recipe key, entry, PTX, launch).
KERNEL_FIELD = "moe_kernel"
_errors: list[str] = []  # what plugin callbacks raised: TensorRT reports only "non-zero return code"


def errors() -> list[str]:
    """The messages of exceptions raised inside plugin callbacks in this process, oldest first."""
    return list(_errors)


def _reported(method):
    """Records a callback's exception before TensorRT turns it into an error code."""

    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            return method(self, *args)
        except Exception as e:
            who = getattr(self, "plugin_name", None) or getattr(self, "name", "?")
            _errors.append(f"{who}.{method.__name__}: {type(e).__name__}: {e}")
            raise

    return wrapper


class Unknown:
    """A dimension that is dynamic at build time: ``value`` None while building (the recipe's
    variant, not its grid, is wanted), the actual size at run time. ``plugins.recipe.static_dim``
    sees it as not static either way, so both evaluations pick the same variant."""

    is_constant = False

    def __init__(self, value: int | None = None):
        self.value = value

    def _op(self, other, fn):
        other = other.value if isinstance(other, Unknown) else other
        return Unknown(None if self.value is None or other is None else fn(self.value, int(other)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    __radd__, __rmul__ = __add__, __mul__

    def _cmp(self, other, fn) -> bool:  # max/min at build time (no value) keep the Unknown
        other = other.value if isinstance(other, Unknown) else other
        return False if self.value is None or other is None else fn(self.value, int(other))

    def __lt__(self, other):
        return self._cmp(other, lambda a, b: a < b)

    def __gt__(self, other):
        return self._cmp(other, lambda a, b: a > b)

    def __int__(self) -> int:
        if self.value is None:
            raise ValueError("a dynamic dimension has no value while building")
        return self.value


def recipe_dims(dims, dynamic=()) -> tuple:
    """Build-time or run-time dims as the recipes take them: ints, and ``Unknown`` where ``dynamic``
    (the build saw -1 there) marks them."""
    return tuple(Unknown(None if d < 0 else d) if d < 0 or i in dynamic else int(d) for i, d in enumerate(dims))


@functools.cache
def _classes(trt):
    """The plugin and creator classes for one TensorRT module (``tensorrt_rtx`` or ``tensorrt``)."""
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int32: "int32"}
    types = {v: k for k, v in names.items()}

    class Expr:
        """A TensorRT ``IDimensionExpr`` with ``+ - * //`` (what ``shapes.py`` writes)."""

        def __init__(self, expr, builder):
            self.expr, self.builder = expr, builder

        def _op(self, op, other, swap=False):
            other = other.expr if isinstance(other, Expr) else self.builder.constant(int(other))
            a, b = (other, self.expr) if swap else (self.expr, other)
            return Expr(self.builder.operation(op, a, b), self.builder)

        def __add__(self, other):
            return self._op(trt.DimensionOperation.SUM, other)

        def __sub__(self, other):
            return self._op(trt.DimensionOperation.SUB, other)

        def __mul__(self, other):
            return self._op(trt.DimensionOperation.PROD, other)

        def __floordiv__(self, other):
            return self._op(trt.DimensionOperation.FLOOR_DIV, other)

        def __radd__(self, other):
            return self._op(trt.DimensionOperation.SUM, other, swap=True)

        def __rmul__(self, other):
            return self._op(trt.DimensionOperation.PROD, other, swap=True)

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, name: str, attrs: dict, arch: int | None, kernel: dict | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            spec = registry.spec(name)
            self.plugin_name, self.plugin_namespace, self.plugin_version = name, spec.namespace, "1"
            self.num_outputs = len(spec.outputs)
            self.timing_cache_id = ""
            self.metadata_string = ""
            self.attrs, self.arch, self.kernel = attrs, arch, kernel
            self._function = None  # the loaded CUDA function (run time)
            self._serialized: dict[str, tuple] = {}  # get_fields_to_serialize's fields, kept alive

        @property
        def spec(self):
            return registry.spec(self.plugin_name)

        def _shapes(self):
            return registry.module(self.plugin_name, "shapes")

        def get_capability_interface(self, type):
            return self

        def clone(self):
            copy = Plugin(self.plugin_name, dict(self.attrs), self.arch, self.kernel)
            copy._function = self._function
            return copy

        @_reported
        def get_output_data_types(self, input_types):
            dtypes = self._shapes().output_dtypes([names[t] for t in input_types], **self.attrs)
            return [types[d] for d in dtypes]

        @_reported
        def get_output_shapes(self, inputs, shape_inputs, builder):
            shapes = [tuple(Expr(d, builder) for d in dims) for dims in inputs]

            def extreme(op, fallback):
                def pick(a, b):
                    if not isinstance(a, Expr) and not isinstance(b, Expr):
                        return fallback(a, b)
                    a = a if isinstance(a, Expr) else Expr(builder.constant(int(a)), builder)
                    return a._op(op, b)

                return pick

            smax = extreme(trt.DimensionOperation.MAX, max)
            smin = extreme(trt.DimensionOperation.MIN, min)
            out = self._shapes().output_shapes(shapes, smax=smax, smin=smin, **self.attrs)
            return [
                trt.DimsExprs([d.expr if isinstance(d, Expr) else builder.constant(int(d)) for d in shape])
                for shape in out
            ]

        @_reported
        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in names:
                return False
            spec = self.spec
            tensor = spec.inputs[pos] if pos < num_inputs else spec.outputs[pos - num_inputs]
            if names[desc.type] not in tensor.dtypes:
                return False
            if pos < num_inputs:
                return True
            inputs = [in_out[i].desc.type for i in range(num_inputs)]
            if any(t not in names for t in inputs):
                return False
            wanted = self._shapes().output_dtypes([names[t] for t in inputs], **self.attrs)
            return names[desc.type] == wanted[pos - num_inputs]

        @_reported
        def configure_plugin(self, inputs, outputs):
            """At build: the variant the node needs, compiled for the target, kept for serialisation."""
            if self.arch is None:
                return  # a creator without a target (parsing only): nothing to compile
            dims = [tuple(d.desc.dims) for d in inputs]
            dtypes = [names[d.desc.type] for d in inputs]
            recipe = self._recipe([recipe_dims(d) for d in dims], dtypes)
            compiled = compiled_kernel(recipe, self.arch)
            self.kernel = {
                "key": recipe.key(),
                "name": compiled.name,
                "ptx": compiled.ptx,
                "shared": compiled.shared,
                "num_warps": compiled.num_warps,
                "arch": compiled.arch,
                "dynamic": [[i for i, d in enumerate(shape) if d < 0] for shape in dims],
            }

        def _recipe(self, shapes, dtypes) -> KernelRecipe:
            kernels = registry.module(self.plugin_name, "kernels")
            token = dtypes[0] if len(self.spec.inputs[0].dtypes) > 1 else self.spec.inputs[0].dtypes[0]
            return kernels.node_recipe(shapes, token, **self.attrs)

        @_reported
        def get_fields_to_serialize(self):
            # NOTE: a PluginField points into its array without owning it, and TensorRT reads the fields
            # after this returns, from earlier calls too: every collection made stays alive with the plugin.
            key = json.dumps([self.attrs, self.kernel], sort_keys=True)
            if key not in self._serialized:
                arrays = [_field_data(a, self.attrs[a.name]) for a in self.spec.attributes]
                fields = [
                    trt.PluginField(a.name, d, _FIELD_TYPES[a.type](trt)) for a, d in zip(self.spec.attributes, arrays)
                ]
                if self.kernel is not None:
                    arrays.append(np.frombuffer(json.dumps(self.kernel).encode(), dtype=np.int8))
                    fields.append(trt.PluginField(KERNEL_FIELD, arrays[-1], trt.PluginFieldType.CHAR))
                self._serialized[key] = (trt.PluginFieldCollection(fields), fields, arrays)
            return self._serialized[key][0]

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def attach_to_context(self, context):
            return self.clone()

        @_reported
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            if self.kernel is None:
                raise RuntimeError("the engine holds no kernel for this plugin (built without a target)")
            dynamic = self.kernel["dynamic"]
            shapes = [recipe_dims(tuple(d.dims), dynamic[i]) for i, d in enumerate(input_desc)]
            recipe = self._recipe(shapes, [names[d.type] for d in input_desc])
            if recipe.key() != self.kernel["key"]:
                raise RuntimeError(
                    f"shapes {shapes} ask for kernel {recipe.key()}, the engine holds {self.kernel['key']}"
                )
            if self._function is None:
                self._function = _load(self.kernel)
            _launch(self._function, recipe, self.kernel, list(inputs), list(outputs), stream)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, spec):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = spec.name, spec.namespace, "1"
            self._names = [
                trt.PluginField(a.name, _field_data(a, None), _FIELD_TYPES[a.type](trt)) for a in spec.attributes
            ]
            self.field_names = trt.PluginFieldCollection(self._names)
            self.arch: int | None = None  # the build's target (sm_XX as XX); set by register_all

        @_reported
        def create_plugin(self, name, fc, phase):
            fields = {f.name: f for f in fc}
            spec = registry.spec(self.name)
            given = {a.name: _value(a.type, fields[a.name].data) for a in spec.attributes if a.name in fields}
            attrs = spec.attribute_values(given)  # defaults filled in; a KeyError names a missing one
            kernel = json.loads(_value("str", fields[KERNEL_FIELD].data)) if KERNEL_FIELD in fields else None
            return Plugin(self.name, attrs, self.arch, kernel)

    Plugin.__name__, Creator.__name__ = "MoePlugin", "MoePluginCreator"
    return Plugin, Creator


#: The PluginFieldType of each attribute type (the ONNX parser narrows INT to INT32).
_FIELD_TYPES = {
    "int": lambda trt: trt.PluginFieldType.INT32,
    "float": lambda trt: trt.PluginFieldType.FLOAT32,
    "str": lambda trt: trt.PluginFieldType.CHAR,
}


def _field_data(attr, value) -> np.ndarray:
    """A spec attribute's value as a PluginField's data (empty for the creator's field list)."""
    if attr.type == "int":
        return np.array([] if value is None else [value], dtype=np.int32)
    if attr.type == "float":
        return np.array([] if value is None else [value], dtype=np.float32)
    return np.frombuffer((value or "").encode(), dtype=np.int8)


def _value(kind: str, data):
    """A field's data as the attribute's Python value."""
    array = np.asarray(data).reshape(-1)
    if kind == "int":
        return int(array[0])
    if kind == "float":
        return float(array[0])
    return array.astype(np.uint8).tobytes().rstrip(b"\0").decode()


_creators: dict[tuple[int, str], object] = {}  # TensorRT's registry is per process: one creator per plugin


def register_all(trt, arch: int | None = None) -> list[str]:
    """Registers a creator for every plugin of the registry with ``trt``'s plugin registry (once per
    process) and points them at the build's target ``sm_<arch>`` (None: parse only, no kernels).
    Returns the plugin ids."""
    _, Creator = _classes(trt)
    plugin_registry = trt.get_plugin_registry()
    for spec in registry.specs().values():
        key = (id(trt), spec.id)
        if key not in _creators:
            creator = Creator(spec)
            if not plugin_registry.register_creator(creator, spec.namespace):
                raise RuntimeError(f"TensorRT refused the creator of {spec.id}")
            _creators[key] = creator
        _creators[key].arch = arch
    return [spec.id for spec in registry.specs().values()]


# --- run time: the PTX through CUDA's driver API (cuda-python), no Triton, no torch ----------------------

MAX_STATIC_SHARED = 48 * 1024  # more dynamic shared memory needs the function attribute raised first


def _check(result):
    """cuda-python returns (error, *values): the values, or RuntimeError naming the error."""
    from cuda.bindings import driver

    error, *values = result
    if error != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(error)
        raise RuntimeError(f"CUDA driver error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


def _load(kernel: dict):
    """The kernel's CUDA function, its PTX loaded into the current context (the engine's)."""
    from cuda.bindings import driver

    module = _check(driver.cuModuleLoadData(kernel["ptx"].encode() + b"\0"))
    function = _check(driver.cuModuleGetFunction(module, kernel["name"].encode()))
    if kernel["shared"] > MAX_STATIC_SHARED:
        attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(driver.cuFuncSetAttribute(function, attribute, kernel["shared"]))
    return function


def _launch(function, recipe: KernelRecipe, kernel: dict, inputs: list[int], outputs: list[int], stream: int):
    """``kernel<<<grid, num_warps*32, shared, stream>>>(*inputs, *scalars, *outputs)``."""
    import ctypes

    from cuda.bindings import driver

    grid = [int(g) for g in recipe.grid]
    if min(grid) == 0:
        return  # an empty tensor: nothing to compute
    scalars = [int(s) for s in recipe.scalar_values]
    values = (*inputs, *scalars, *outputs)
    kinds = (*[ctypes.c_void_p] * len(inputs), *[ctypes.c_int32] * len(scalars), *[ctypes.c_void_p] * len(outputs))
    _check(
        driver.cuLaunchKernel(
            function,
            *grid,
            kernel["num_warps"] * 32,
            1,
            1,
            kernel["shared"],
            driver.CUstream(stream),
            (values, kinds),
            0,
        )
    )
