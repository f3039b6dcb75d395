"""Functions that the hosts cannot import by name, shipped by value as Ray ships them: with cloudpickle,
together with what they close over.

A function defined in `__main__` (a script run as `python train.py`, `python -`, `python -c`), in a
notebook or an interactive session, or nested in another function, has no name a host could import
without running the user's script again (and with it, a module-level `jaxlaunch.launch(...)`). It
travels as bytes instead. Before anything starts, a value it uses that cannot travel (an open file, a
lock, a live JAX array on the driver) is named; and its fingerprint, a hash of its code and of what
it closes over, that ignores where the code sits (file names and line numbers change with every
notebook cell run and every kernel), decides whether a resume runs the same code.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import cloudpickle

from jaxlaunch.contract.protocol import ConfigError

DIGEST_CHARS = 12
"""Hex digits of the fingerprint kept in the run's entry name (48 bits: a resume compares one run's two codes)."""


def importable(obj: Any) -> bool:
    """Whether a host can import `obj` by its module and qualified name (and get this very object)."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module_name or module_name == "__main__" or "<" in qualname:
        return False
    module = sys.modules.get(module_name)
    if module is None or getattr(module, "__spec__", None) is None:
        return False
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


def _is_jax_array(obj: Any) -> bool:
    # By name: the contract never imports JAX.
    return any(c.__module__.split(".")[0] in ("jax", "jaxlib") and c.__name__ in ("Array", "ArrayImpl")
               for c in type(obj).__mro__)


class _Unshippable(TypeError):
    pass


class _ShippingPickler(cloudpickle.Pickler):
    """cloudpickle, refusing a JAX array: it lives on the driver's devices, which no host has."""

    def reducer_override(self, obj: Any) -> Any:
        if _is_jax_array(obj):
            raise _Unshippable("a JAX array on the driver")
        return super().reducer_override(obj)


# cloudpickle's own rule for what it pickles by value (a class of `__main__`, or of a module
# registered with register_pickle_by_value): exactly the classes whose identity is per process.
_by_reference = cloudpickle.cloudpickle._should_pickle_by_reference


def _ordered(consts: tuple) -> tuple:
    """A code object's constants with its frozensets (`x in {"a", "b"}`) in an order that does not
    follow the process's string hashing."""
    return tuple(("frozenset", *sorted(c, key=repr)) if isinstance(c, frozenset) else c for c in consts)


def _code_identity(*fields: Any) -> NoReturn:
    raise AssertionError("a fingerprint is never unpickled")


class _FingerprintPickler(_ShippingPickler):
    """The shipping pickle, with code objects and classes defined by value reduced to what they do:
    no file names or line numbers, and no per-process class identifiers (cloudpickle tracks
    dynamic classes by a random id)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType):
            return _code_identity, (
                obj.co_name, obj.co_qualname, obj.co_argcount, obj.co_posonlyargcount, obj.co_kwonlyargcount,
                obj.co_flags, obj.co_code, _ordered(obj.co_consts), obj.co_names, obj.co_varnames, obj.co_freevars,
                obj.co_cellvars, obj.co_exceptiontable)
        if isinstance(obj, type) and not _by_reference(obj):
            # (function, args, state): the class is memoised before its state, so methods that
            # refer back to it (super(), a classmethod) do not recurse.
            state = {k: v for k, v in vars(obj).items()
                     if k not in ("__dict__", "__weakref__", "__module__", "_abc_impl", "__abstractmethods__")}
            return _code_identity, (obj.__qualname__, obj.__bases__), sorted(state.items())
        if type(obj).__name__ == "PjitFunction":
            # A jitted function's state holds its source location (in its cache-miss closure):
            # what it does is its function and its compile options.
            state = obj.__reduce_ex__(cloudpickle.DEFAULT_PROTOCOL)[2]
            return _code_identity, ("jax.jit", state["fun"], state["static_argnums"], state["static_argnames"],
                                    repr(state["global_cache_key"]))
        return super().reducer_override(obj)


def _dumps(obj: Any, pickler: type[cloudpickle.Pickler]) -> bytes:
    buffer = io.BytesIO()
    pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _uses(function: types.FunctionType) -> Iterator[tuple[str, Any]]:
    """(name, value) of what a function uses: its closure, the globals its code names, its defaults."""
    code = function.__code__
    for name, cell in zip(code.co_freevars, function.__closure__ or (), strict=True):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell: a name assigned after the function was made
            continue
    for name in dict.fromkeys(_code_names(code)):
        if name in function.__globals__:
            yield name, function.__globals__[name]
    parameters: Iterable[inspect.Parameter]
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read
        parameters = ()
    for parameter in parameters:
        if parameter.default is not inspect.Parameter.empty:
            yield parameter.name, parameter.default


def _culprit(function: types.FunctionType, seen: set[int]) -> tuple[list[str], str] | None:
    """The path of names to the first value `function` uses that cannot be pickled, and why."""
    seen.add(id(function))
    for name, value in _uses(function):
        try:
            _dumps(value, _ShippingPickler)
            continue
        except Exception as err:  # noqa: BLE001 - any pickling error names the value
            why = str(err) if isinstance(err, _Unshippable) else f"a {type(value).__name__}: {err}"
        inner = inspect.unwrap(value) if callable(value) else value
        if isinstance(inner, types.FunctionType) and not importable(inner) and id(inner) not in seen:
            deeper = _culprit(inner, seen)
            if deeper is not None:
                return [name, *deeper[0]], deeper[1]
        return [name], why
    return None


def pickled(function: Callable) -> tuple[bytes, str]:
    """The function's bytes for the hosts and its fingerprint. Raises ConfigError naming a value it
    uses that cannot travel to the hosts."""
    name = getattr(function, "__qualname__", repr(function))
    try:
        payload = _dumps(function, _ShippingPickler)
        fingerprint = hashlib.sha256(_dumps(function, _FingerprintPickler)).hexdigest()[:DIGEST_CHARS]
    except Exception as err:  # noqa: BLE001 - any pickling error is the user's to fix
        inner = inspect.unwrap(function)
        found = _culprit(inner, set()) if isinstance(inner, types.FunctionType) else None
        if found is None:
            raise ConfigError(f"{name} cannot be sent to the hosts: {err}; define it in an importable file "
                              f"and pass that (--entry path/to/file.py:{name.split('.')[-1]})") from None
        path, why = found
        via = "".join(f", through {p!r}" for p in path[:-1])
        fix = ("make it inside the function (in init), or pass a numpy array" if "JAX array" in why
               else "create it inside the function, or pass what it is made from (a path, a setting)")
        raise ConfigError(f"{name} cannot be sent to the hosts: it uses {path[-1]!r}{via}, {why}; {fix}") from None
    return payload, fingerprint


def unpickled(payload: bytes) -> Callable:
    return cloudpickle.loads(payload)

