"""The device mesh as config data, and logical-axis -> mesh-axis sharding rules.

Every weight names its axes once (`model.param_axes`: ("layers", "embed", "q_heads", "head_dim"));
a rules table maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated).
There are two tables, because training and decoding want different layouts (SPEC.md section 7):

- `TRAIN_RULES`: FSDP + tensor parallelism. Weights are sharded over "fsdp" along their embed
  dim and over "tensor" along heads / mlp / vocab; the batch is split over "data" and "fsdp".
- `SAMPLE_RULES`: no FSDP while decoding (a decode step would all-gather every weight for one
  token): weights only tensor-sharded, replicated over data and fsdp; the batch and the KV cache
  split over data and fsdp.

Activations are constrained at block boundaries with `constrain(x, logical_axes)`. It reads the
rules active while a function is traced (`under_rules`) and is a no-op outside, so the
single-device programs are unchanged.

On the CPU backend, `use_cpu_devices` (called by `grpo-jax run` before JAX starts) makes one XLA
CPU device per core, and `cpu_rollout_mesh` spreads the rollouts over them while training stays
on one device: decoding's small matmuls keep the cores busier as one program per core than as one
program whose matmuls are split across threads.

A mesh axis named in a rule but absent from the mesh counts as size 1 (a mesh written as
(("data", -1), ("tensor", 1)) simply has no FSDP). jax is imported inside the functions, so that
`grpo_jax.config` can import `MeshConfig` without importing jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from grpo_jax.config import ModelConfig

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical names: weights (model.param_axes) and activations ("batch", "length", "act_*").
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_kv_heads", "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)
SAMPLE_RULES: Rules = tuple((name, None if name == "embed" else axes) for name, axes in TRAIN_RULES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Named mesh axes with their sizes, in device order (the last axis varies fastest, so put
    "tensor" last: its collectives then stay between neighbouring devices). A size of -1 takes
    the devices the other axes leave (at most one -1)."""

    axes: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))

    def __post_init__(self):
        if not self.axes:
            raise ValueError("mesh.axes: needs at least one (name, size) pair")
        names = [name for name, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"mesh.axes: axis names must be unique, got {names}")
        for name, size in self.axes:
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.axes: size of {name!r} must be an int >= 1 or -1 (the "
                                 f"remaining devices), got {size!r}")
        rest = [name for name, size in self.axes if size == -1]
        if len(rest) > 1:
            raise ValueError(f"mesh.axes: at most one axis may have size -1, got {rest}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    def sizes(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes with -1 resolved; their product is `num_devices` or this raises."""
        fixed = math.prod(size for _, size in self.axes if size != -1)
        written = " x ".join(f"{n}={s}" for n, s in self.axes)
        if any(size == -1 for _, size in self.axes):
            if num_devices % fixed:
                raise ValueError(f"mesh.axes: {written}: the fixed axes ({fixed} devices) do not "
                                 f"divide the {num_devices} devices")
            return tuple(num_devices // fixed if s == -1 else s for _, s in self.axes)
        if fixed != num_devices:
            raise ValueError(f"mesh.axes: {written} = {fixed} devices, but there are "
                             f"{num_devices}; use -1 for one axis to take the rest")
        return tuple(s for _, s in self.axes)


def make_mesh(mcfg: MeshConfig, devices=None) -> Mesh:
    """The `Mesh` of a `MeshConfig` over `devices` (default: every device of every process).
    Axes are Auto: XLA propagates shardings from the inputs and our constraints."""
    import jax
    from jax.sharding import AxisType

    devices = jax.devices() if devices is None else list(devices)
    sizes = mcfg.sizes(len(devices))
    return jax.make_mesh(sizes, mcfg.names, axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices)


# ----------------------------------------------------------------------------- CPU rollout devices

_cpu_devices: int | None = None  # the CPU device count `use_cpu_devices` gave JAX


def use_cpu_devices(n: int = 0) -> int:
    """Ask JAX for `n` XLA CPU devices (0: one per core this process may run on). It must run
    before JAX starts its backends; it leaves the count alone (and returns 1) when they have
    started, when XLA_FLAGS (--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES
    already set it, or for n = 1. Returns the count set. On a GPU / TPU host the extra CPU
    devices exist but go unused (`cpu_rollout_mesh` is None there)."""
    import jax

    global _cpu_devices
    n = n or len(os.sched_getaffinity(0))
    fixed = ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
             or "JAX_NUM_CPU_DEVICES" in os.environ)
    if n <= 1 or fixed:
        return 1
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started: too late to change
        return 1
    _cpu_devices = n
    return n


def cpu_rollout_mesh() -> Mesh | None:
    """A 1-D ("data",) mesh over the CPU devices that `use_cpu_devices` made, for the sampler
    (`SAMPLE_RULES` then replicate the weights: one independent decode program per device); None
    unless JAX runs on the CPU backend in one process with more than one such device."""
    import jax
    from jax.sharding import AxisType

    if _cpu_devices is None or jax.default_backend() != "cpu" or jax.process_count() > 1:
        return None
    devices = jax.local_devices()
    if len(devices) < 2:
        return None
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


# ----------------------------------------------------------------------------- rules -> specs


def logical_to_spec(axes: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
    """The `PartitionSpec` of an array whose dims have logical names `axes` (None: replicated).
    Fails on a name without a rule and on two dims mapped to the same mesh axis."""
    from jax.sharding import PartitionSpec

    table = dict(rules)
    spec, used = [], {}
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule (rules cover "
                             f"{sorted(table)})")
        mesh_axes = table[name]
        for m in _as_tuple(mesh_axes):
            if m in used:
                raise ValueError(f"dims {used[m][0]} ({used[m][1]}) and {dim} ({name}) are both "
                                 f"mapped to mesh axis {m!r}")
            used[m] = (dim, name)
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> Any:
    """`NamedSharding` of every weight (the params' pytree structure), from `model.param_axes`.

    Fails, naming the weight, the dim, the logical and mesh axes and both sizes, when a mesh axis
    does not divide the dim it shards or two dims of a weight map to one mesh axis."""
    import jax

    from grpo_jax import model

    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)

    def one(path, axes, shape):
        where = _path_str(path)
        try:
            spec = logical_to_spec(axes, rules)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        spec = _in_mesh(spec, mesh)
        for dim, (name, mesh_axes) in enumerate(zip(axes, spec)):
            parts = _as_tuple(mesh_axes)
            size = math.prod(mesh.shape[m] for m in parts)
            if shape.shape[dim] % size:
                split = " x ".join(f"{m}={mesh.shape[m]}" for m in parts)
                what = f"mesh axis {split}" if len(parts) == 1 else f"mesh axes {split} = {size}"
                raise ValueError(f"{where} dim {dim} ({name}={shape.shape[dim]}) is not divisible "
                                 f"by {what}; change the mesh or the rule for {name!r}")
        return _named(mesh, spec)

    return jax.tree.map_with_path(one, model.param_axes(cfg), model.param_shapes(cfg),
                                  is_leaf=is_axes)


def opt_state_shardings(tx, params_sharding, param_shapes) -> Any:
    """Shardings of `tx.init(params)`: every params-shaped subtree (Adam's moments...) like the
    params, every other leaf (step counts) replicated."""
    import jax
    import optax
    from jax.sharding import NamedSharding

    mesh = jax.tree.leaves(params_sharding)[0].mesh
    return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, param_shapes),
                                 params_sharding, transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
    return _named(mesh, ())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """The leading (batch / group) axis over the rules' "batch" mesh axes; the rest replicated.
    One sharding for arrays of any rank ([B, P] prompts, [B, G, T] completions)."""
    return _named(mesh, _in_mesh(logical_to_spec(("batch",), rules), mesh))


def batch_parallelism(mesh: Mesh, rules: Rules) -> int:
    """Number of shards of the batch axis: what `prompts_per_step` must be a multiple of."""
    batch_axes = _in_mesh(logical_to_spec(("batch",), rules), mesh)[0]
    return math.prod(mesh.shape[m] for m in _as_tuple(batch_axes))


def activation_sharding(mesh: Mesh, rules: Rules, shape, axes) -> NamedSharding:
    """The sharding of an activation of `shape` with logical `axes`; a dim keeps the longest
    prefix of its mesh axes that divides it (e.g. 2 prompts on data=2 x fsdp=2: split over data
    only, replicated over fsdp). Shapes vary inside a program (micro-batches, a prompt batch
    beside its G-times larger completion batch); they need not all divide the mesh."""
    spec = []
    for n, mesh_axes in zip(shape, _in_mesh(logical_to_spec(axes, rules), mesh)):
        keep = ()
        for m in _as_tuple(mesh_axes):
            if n % (math.prod(mesh.shape[k] for k in keep) * mesh.shape[m]):
                break
            keep += (m,)
        spec.append(keep[0] if len(keep) == 1 else (keep or None))
    return _named(mesh, spec)


# ----------------------------------------------------------------------------- placing arrays


def init_sharded(init_fn: Callable[[], Any], shardings) -> Any:
    """Run `init_fn()` under jit with `out_shardings`: each device only materializes its shards
    (a model that does not fit on one device can still be initialized)."""
    import jax

    return jax.jit(init_fn, out_shardings=shardings)()


def place(tree, shardings) -> Any:
    """`tree` with each leaf laid out as `shardings` (a matching pytree, or one sharding for all).

    Host arrays (numpy, e.g. weights read from safetensors) are cut into shards on the host, so
    every process only sends its own devices' shards; device arrays are resharded."""
    import jax
    import numpy as np
    from jax.sharding import Sharding

    if isinstance(shardings, Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if jax.process_count() == 1:  # one batched transfer (host arrays are cut on the host too)
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(treedef, jax.device_put(leaves, treedef.flatten_up_to(shardings)))

    def one(x, s):
        if isinstance(x, jax.Array) and (s.is_fully_addressable or not x.is_fully_addressable):
            return jax.device_put(x, s)
        x = np.asarray(x)  # host data, or one process's array bound for a multi-process mesh
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def host_shared(mesh: Mesh) -> bool:
    """Whether all of `mesh`'s devices read the same memory: XLA CPU devices of this process."""
    import jax

    return jax.process_count() == 1 and all(d.platform == "cpu" for d in mesh.devices.flat)


def share_replicated(tree, shardings) -> Any:
    """`tree` (arrays on one CPU device, or numpy views of them) as arrays of the fully
    replicated `shardings`, whose devices are CPU devices of this process (`host_shared`):
    every device's copy is a view of the same memory, so nothing is copied (one batched
    `device_put`; a leaf not 64-byte aligned is copied), and decode programs running side by
    side on several cores read one copy of the weights through the shared L3 cache instead of
    one copy each (~14% faster decode matmuls, docs/benchmarks.md). The views keep the source
    arrays alive, and JAX does not donate a buffer while a view of it exists (it copies)."""
    import jax
    import numpy as np

    leaves, treedef = jax.tree.flatten(tree)
    views = [np.asarray(x) for x in leaves]  # on the CPU backend, views of the device buffers
    placed = jax.device_put(views, treedef.flatten_up_to(shardings), may_alias=True)
    return jax.tree.unflatten(treedef, placed)


def to_host(tree) -> Any:
    """Numpy copies of a pytree of (possibly multi-process) arrays, the same on every process."""
    import jax
    from jax.experimental import multihost_utils

    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------- activations

_active = threading.local()  # (mesh, rules) while a function runs under `under_rules`


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules):
    """Within this context (at trace time), `constrain` applies `rules` on `mesh`."""
    prev = getattr(_active, "value", None)
    _active.value = (mesh, rules)
    try:
        yield
    finally:
        _active.value = prev


def under_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """`fn` tracing with `activation_rules(mesh, rules)`; wrap it before `jax.jit`. A new function
    per call, so that its jit trace cache is its own (the rules are not part of jit's key)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_rules(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint(x, <axes under the active rules>)`, or `x` when no rules are
    active (single device): the model calls it at block boundaries."""
    active = getattr(_active, "value", None)
    if active is None:
        return x
    import jax

    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, rules, x.shape, axes))


# ----------------------------------------------------------------------------- helpers


def _named(mesh: Mesh, spec) -> NamedSharding:
    """`NamedSharding(mesh, spec)` without trailing Nones: the form jit gives its outputs, which
    must compare equal to ours, or an array coming back from a program would recompile it."""
    from jax.sharding import NamedSharding, PartitionSpec

    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(mesh, PartitionSpec(*spec))


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _in_mesh(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """`spec` without the mesh axes this mesh does not have (they count as size 1)."""
    from jax.sharding import PartitionSpec

    def keep(mesh_axes):
        kept = tuple(m for m in _as_tuple(mesh_axes) if m in mesh.shape)
        return kept[0] if len(kept) == 1 else (kept or None)

    return PartitionSpec(*(keep(a) for a in spec))


def _path_str(path) -> str:
    import jax

    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k).lstrip("."))
    return ".".join(parts)
