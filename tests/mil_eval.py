"""A reference evaluator for saved Core ML programs, in numpy, for tests on machines without Core ML.

It loads the MIL program stored in an ``.mlpackage`` (``model.mil`` + ``weights/weight.bin``, read back
with coremltools' own proto loader, so what is checked is what was written to disk) and evaluates it op
by op:

* each ordinary op with coremltools' own per-op value inference (``Operation.value_inference``, the code
  coremltools uses for constant folding), called on a shallow copy of the op whose inputs are bound to
  concrete numpy values;
* ``read_state`` / ``coreml_update_state`` against a state dict, with Core ML's semantics (a state is
  read where the program reads it and replaced where it writes it; the saved ``write_state`` +
  ``read_state`` pairs come back from coremltools' loader as ``coreml_update_state``);
* ``constexpr_blockwise_shift_scale`` and ``constexpr_lut_to_dense`` by an independent numpy
  implementation of their documented formulas (``scale * (data - offset)`` per block; LUT lookup per
  group), evaluated once at load;
* ``conv`` and ``silu``, which have no value inference, by small numpy fallbacks.

Every op's result is stored in the dtype the program declares for it (fp16 activations), computed in
float32: a model of fp16 storage with fp32 accumulation.  This proves the conversion, the state and the
compression semantics; it says nothing about Apple's kernels, which only a Mac or an iPhone runs.

The class mimics ``coremltools.models.MLModel``: ``make_state()`` and ``predict(inputs, state=None)``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np

STATE_READ, STATE_WRITE = "read_state", "coreml_update_state"
# Ops that only move or select values: exact in any dtype, so they run on the stored fp16 values as they
# are (the KV state is by far the largest tensor, and copying it to float32 per layer is slow).
DATA_MOVEMENT = {"slice_by_index", "slice_update", "reshape", "transpose", "expand_dims", "squeeze", "concat",
                 "gather", "shape", "split", "tile", "select"}
_FLOATS = (np.float16, np.float32)


class _Bound:
    """A MIL Var stand-in carrying a concrete value, for an op's own ``value_inference``."""

    def __init__(self, var, value):
        self._var = var
        self.val = self.sym_val = value
        self.shape = tuple(np.shape(value))
        self.rank = len(self.shape)

    @property
    def sym_type(self):
        from coremltools.converters.mil.mil import types

        return types.tensor(self._var.dtype, self.shape) if self.rank else self._var.dtype

    def __getattr__(self, name):
        return getattr(self._var, name)


class MilProgram:
    """One saved ``.mlpackage``'s main function, runnable in numpy."""

    def __init__(self, package: str | Path):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load

        self.package = Path(package)
        model = ct.models.MLModel(str(self.package), skip_model_load=True)
        spec = model.get_spec()
        self.spec = spec
        program = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
        self.function = program.functions["main"]
        self.state_names = [n for n, v in self.function.inputs.items() if _is_state(v)]
        self.input_names = [n for n in self.function.inputs if n not in self.state_names]
        self.constants = {}
        for op in self.function.operations:
            if op.op_type == "const":
                self.constants[op.outputs[0]] = op.outputs[0].val
            elif op.op_type.startswith("constexpr_"):
                self.constants[op.outputs[0]] = decompress(op, self.constants)
        # values are computed in float32: upcast the weights once, not on every call
        self.compute_constants = {var: _compute(val) for var, val in self.constants.items()}
        self.ops = [op for op in self.function.operations
                    if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
        self.op_counts: dict[str, int] = {}
        for op in self.function.operations:
            self.op_counts[op.op_type] = self.op_counts.get(op.op_type, 0) + 1

    def weights(self) -> dict[str, np.ndarray]:
        """The (decompressed) weight of every ``linear`` and ``gather`` table, by the name of the const
        coremltools made for it (``layers_0_mlp_up_proj_weight_to_fp16``; a compressed op's suffix
        dropped)."""
        found = {}
        for op in self.ops:
            slot = {"linear": "weight", "gather": "x"}.get(op.op_type)
            var = getattr(op, slot, None) if slot else None
            if var is not None and var in self.constants and var.rank == 2:
                name = var.op.name
                for suffix in ("_quantized", "_palettized"):
                    name = name.removesuffix(suffix)
                found[name] = self.constants[var]
        return found

    def make_state(self) -> dict[str, np.ndarray]:
        state = {}
        for name in self.state_names:
            var = self.function.inputs[name]
            wrapped = var.sym_type.wrapped_type()
            state[name] = np.zeros(wrapped.get_shape(), dtype=_np_dtype(wrapped.get_primitive()))
        return state

    def predict(self, inputs: dict, state: dict | None = None) -> dict[str, np.ndarray]:
        env = dict(self.compute_constants)
        for name in self.input_names:
            var = self.function.inputs[name]
            env[var] = np.asarray(inputs[name]).astype(_np_dtype(var.dtype))
        for name in self.state_names:
            if state is None:
                raise ValueError(f"{self.package.name} is stateful: pass state=make_state()")
            env[self.function.inputs[name]] = name
        for op in self.ops:
            self._run(op, env, state)
        return {var.name: env[var] for var in self.function.outputs}

    def _run(self, op, env: dict, state: dict | None) -> None:
        if op.op_type == STATE_READ:
            env[op.outputs[0]] = state[env[op.input]].copy()
        elif op.op_type == STATE_WRITE:
            value = env[op.value].astype(state[env[op.state]].dtype)
            state[env[op.state]] = value
            env[op.outputs[0]] = value
        else:
            results = evaluate_op(op, env)
            check = op.op_type not in DATA_MOVEMENT
            for var, value in zip(op.outputs, results):
                env[var] = _store(value, var, check)


def evaluate_op(op, env: dict) -> tuple:
    """Run one op on the values in ``env`` with coremltools' value inference (or a numpy fallback)."""
    if op.op_type in FALLBACKS:
        result = FALLBACKS[op.op_type](op, env)
    else:
        prepare = (lambda v: v) if op.op_type in DATA_MOVEMENT else _compute
        bound = copy.copy(op)
        bound._input_vars = dict(op._input_vars)
        for name, var in op._input_vars.items():
            if var is None:
                continue
            value = tuple(_Bound(v, prepare(env[v])) for v in var) if isinstance(var, (list, tuple)) \
                else _Bound(var, prepare(env[var]))
            setattr(bound, name, value)
            bound._input_vars[name] = value
        result = bound.value_inference()
        if result is None:
            raise NotImplementedError(f"coremltools has no value inference for {op.op_type} ({op.name})")
    return result if isinstance(result, tuple) else (result,)


def _compute(value):
    """fp16 values are computed in float32 (and stored back in fp16 by ``_store``)."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    if isinstance(value, np.bool_):
        return bool(value)  # numpy 2 rejects np.bool_ where coremltools passes keepdims=
    return value


def _store(value, var, check: bool = True):
    dtype = _np_dtype(var.dtype)
    out = np.asarray(value).astype(dtype, copy=False) if dtype is not None else np.asarray(value)
    if check and out.dtype in _FLOATS and not np.isfinite(out).all():
        raise FloatingPointError(f"{var.name} ({var.op.op_type}) is not finite in {np.dtype(out.dtype).name}")
    return out


def _np_dtype(builtin):
    from coremltools.converters.mil.mil import types

    try:
        return types.nptype_from_builtin(builtin)
    except (TypeError, KeyError):
        return None


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


# --------------------------------------------------------------------------- constexpr ops


def decompress(op, constants: dict) -> np.ndarray:
    """The documented formulas of the iOS 18 compression ops, independent of coremltools' code."""
    values = {name: (constants[var] if var in constants else var.val)
              for name, var in op._input_vars.items() if var is not None}
    if op.op_type == "constexpr_blockwise_shift_scale":
        return _shift_scale(values["data"], values["scale"], values.get("offset"))
    if op.op_type == "constexpr_lut_to_dense":
        return _lut_to_dense(values["indices"], values["lut"])
    raise NotImplementedError(f"constexpr op {op.op_type} ({op.name}) is not supported by the reference")


def _expand_blocks(per_block: np.ndarray, shape: tuple) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, per_block.shape)):
        if n % m:
            raise ValueError(f"block count {m} does not divide axis {axis} of size {n}")
        per_block = np.repeat(per_block, n // m, axis=axis)
    return per_block


def _shift_scale(data, scale, offset) -> np.ndarray:
    data = data.astype(np.float32)
    if offset is not None:
        data = data - _expand_blocks(offset.astype(np.float32), data.shape)
    return (_expand_blocks(scale.astype(np.float32), data.shape) * data).astype(scale.dtype)


def _lut_to_dense(indices, lut) -> np.ndarray:
    """Scalar palettization: ``lut [g0, .., gk, 2**bits, 1]``, one table per block of indices."""
    if lut.shape[-1] != 1:
        raise NotImplementedError("vector palettization is not supported by the reference")
    rank = indices.ndim
    groups = lut.shape[:rank]
    block = tuple(n // g for n, g in zip(indices.shape, groups))
    group_index = tuple(np.arange(n)[(slice(None),) + (None,) * (rank - 1 - a)] // b
                        for a, (n, b) in enumerate(zip(indices.shape, block)))
    return lut[group_index + (indices.astype(np.int64), 0)]


# --------------------------------------------------------------------------- fallbacks


def _conv(op, env):
    """2-D convolution (groups 1, no dilation), the vision patch embedding's op."""
    x = _compute(env[op.x])
    w = _compute(env[op.weight])
    if op.groups.val != 1 or any(d != 1 for d in op.dilations.val) or x.ndim != 4:
        raise NotImplementedError(f"conv {op.name}: only 2-D, groups 1, no dilation")
    pad = op.pad.val if op.pad is not None else np.zeros(4, dtype=int)
    if op.pad_type.val != "custom" and op.pad_type.val != "valid":
        raise NotImplementedError(f"conv {op.name}: pad_type {op.pad_type.val}")
    if op.pad_type.val == "valid":
        pad = np.zeros(4, dtype=int)
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])))
    sh, sw = op.strides.val
    kh, kw = w.shape[2:]
    out_h = (x.shape[2] - kh) // sh + 1
    out_w = (x.shape[3] - kw) // sw + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :out_h, :out_w]
    out = np.einsum("nchwij,ocij->nohw", windows, w, optimize=True)
    if op.bias is not None:
        out = out + _compute(env[op.bias])[None, :, None, None]
    return out


def _silu(op, env):
    x = _compute(env[op.x])
    return x / (1.0 + np.exp(-x))


FALLBACKS = {"conv": _conv, "silu": _silu}


# --------------------------------------------------------------------------- test plumbing


@contextlib.contextmanager
def single_threaded():
    """One torch and one BLAS thread: on a shared, loaded CPU, spinning worker threads make torch and
    numpy ten times slower than one thread does."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(previous)
