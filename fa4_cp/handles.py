"""String handles: how what a custom op's schema cannot carry (a group, a 2-D mesh's two dims, a
backend object, the call's RingOptions) reaches the ring's ops, and back. A process group travels
as its own name, as torch's functional collectives do; a RingGroup or a backend object under a
name registered here (held weakly: the objects' owners keep them alive); RingOptions under a name
made from their values (held for the process: a model has a few). Under torch.compile the names
are constants of the graph. No communication.
"""

from __future__ import annotations

import hashlib
import weakref

import torch
import torch.distributed as dist

from .comm.group import RingGroup, resolve_group
from .comm.mesh import resolve_mesh
from .kernels import AttentionBackend
from .options import RingOptions

LOCAL_NAME = "fa4_cp:local"
_named: weakref.WeakValueDictionary[str, RingGroup] = weakref.WeakValueDictionary()
_names: weakref.WeakKeyDictionary[RingGroup, str] = weakref.WeakKeyDictionary()


@torch.compiler.assume_constant_result
def group_name(group: object = None) -> str:
    """A name for `group=` that the ring's custom ops can carry (their schema takes no objects):
    a process group's own name (as torch's functional collectives use), or a name registered here
    for a RingGroup object. No communication. Under torch.compile, a constant of the graph."""
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return dist.group.WORLD.group_name if dist.is_available() and dist.is_initialized() else LOCAL_NAME
    if isinstance(group, (DeviceMesh, dist.ProcessGroup)):
        ring = resolve_group(group)
        return ring.group.group_name
    if isinstance(group, RingGroup):
        if group not in _names:
            name = f"fa4_cp:ring_group:{len(_names)}:{id(group)}"
            _names[group], _named[name] = name, group
        return _names[group]
    return resolve_group(group).group.group_name  # raises the ValueError naming what group= takes


def group_by_name(name: str) -> RingGroup:
    """The RingGroup of a `group_name`."""
    if name == LOCAL_NAME:
        return resolve_group(None)
    if name in _named:
        return _named[name]
    from torch.distributed.distributed_c10d import _resolve_process_group

    return resolve_group(_resolve_process_group(name))


@torch.compiler.assume_constant_result
def ring_and_ulysses_names(group: object) -> tuple[str, str | None]:
    """The ring's group name and the ulysses dim's, None for a 1-D group or a 1 x W mesh (the
    plain ring). Under torch.compile, a constant of the graph."""
    mesh = resolve_mesh(group)
    if mesh is None:
        return group_name(group), None
    return group_name(mesh.ring), None if mesh.ulysses.world_size == 1 else group_name(mesh.ulysses)


_backends: weakref.WeakValueDictionary[str, AttentionBackend] = weakref.WeakValueDictionary()


@torch.compiler.assume_constant_result
def backend_key(backend: str | AttentionBackend | None) -> str | None:
    """A backend name as is; a backend object under a name registered for it."""
    if backend is None or isinstance(backend, str):
        return backend
    if not (hasattr(backend, "forward") and hasattr(backend, "backward")):
        raise ValueError(f"backend: expected a backend name or a backend object, got {backend!r}")
    key = f"fa4_cp:backend:{getattr(backend, 'name', type(backend).__name__)}:{id(backend)}"
    _backends[key] = backend
    return key


def backend_of(key: str | None) -> str | AttentionBackend | None:
    """The backend a `backend_key` names."""
    return _backends.get(key, key) if key is not None else None


_options: dict[str, RingOptions] = {}
_handles: dict[tuple, str] = {}  # fields -> handle: a call's options are made and hashed once


@torch.compiler.assume_constant_result
def options_handle(*fields) -> str:
    """The handle of the RingOptions with these fields (options.checked_options' values): the same
    name for the same values, on every rank and in every process."""
    name = _handles.get(fields)
    if name is None:
        options = RingOptions(*fields)
        name = f"fa4_cp:options:{hashlib.blake2b(repr(options).encode(), digest_size=8).hexdigest()}"
        _options.setdefault(name, options)
        _handles[fields] = name
    return name


def options_of(handle: str) -> RingOptions:
    """The RingOptions an `options_handle` names."""
    if handle not in _options:
        raise ValueError(f"options: {handle!r} names no RingOptions of this process (make it with handles.options_handle)")
    return _options[handle]


_calls: dict[str, tuple[str, str | None, str, bool]] = {}
_call_handles: dict[tuple[str, str | None, str, bool], str] = {}


@torch.compiler.assume_constant_result
def call_handle(ring: str, ulysses: str | None, options: str, grad: bool) -> str:
    """One handle for what a forward call carries beside its tensors (the ring's and the ulysses
    dim's group names, the options' handle, whether a backward follows): torch's custom-op
    autograd walks the op's schema once per argument, so every argument fewer is host time saved
    on every call."""
    fields = (ring, ulysses, options, grad)
    name = _call_handles.get(fields)
    if name is None:
        name = _call_handles[fields] = f"fa4_cp:call:{hashlib.blake2b(repr(fields).encode(), digest_size=8).hexdigest()}"
        _calls.setdefault(name, fields)
    return name


def call_of(handle: str) -> tuple[str, str | None, str, bool]:
    """(ring, ulysses, options, grad) of a `call_handle`."""
    if handle not in _calls:
        raise ValueError(f"call: {handle!r} names no call of this process (make it with handles.call_handle)")
    return _calls[handle]
