"""Plugin discovery and lookup.

The built-in backends, solvers and gradient estimators are plugin modules listed in
:data:`BUILTINS` and imported from that list (as pytest and llm do), so a source checkout
works without installed metadata and with autoload disabled. Third parties arrive through
entry points of the group ``implicit_core``. Both kinds register through the same pluggy
hooks (:mod:`implicit_core.hookspecs`), called through pluggy one plugin at a time, so that
one broken plugin is reported (and listed as broken by ``implicit-core plugins``) while the
others load. Built-ins are registered in pluggy under ``implicit_core.<name>``: an entry point
called ``torch`` cannot collide with them.

Precedence on a name clash: the first registration wins. Built-ins load first, so a third
party cannot silently replace a built-in; its clashing object is listed as broken with the
reason. At run time, ``register(obj, replace=True)`` replaces deliberately.

Environment:
    IMPLICIT_CORE_DISABLE_PLUGIN_AUTOLOAD=1  load only the built-ins (and the allow-list);
                                             1/true/yes/on in any case.
    IMPLICIT_CORE_PLUGINS=dist-a,dist-b      with the above: third-party distributions to load
                                             (an unknown name is warned about).

Thread safety: loading happens once, under a lock, and is complete before any lookup returns;
lookups and registrations take the same lock, so a registration racing a solve is safe.
Plugin names are compared after Unicode NFKC normalisation and case folding: a name that only
looks like a taken one (a ligature, fullwidth letters, another case) is refused.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
import unicodedata
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from ._backend import Backend, requirements_found
from ._errors import BackendUnavailableError, ConfigurationError, PluginError, PluginWarning, UnknownPluginError, did_you_mean
from ._plugin_base import GradientEstimator, Solver

BUILTIN_DIST = "implicit-core"
GROUP = "implicit_core"
AUTOLOAD_ENV = "IMPLICIT_CORE_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "IMPLICIT_CORE_PLUGINS"

KINDS = {"backend": Backend, "solver": Solver, "gradient": GradientEstimator}
HOOKS = {
    "backend": "implicit_core_backends",
    "solver": "implicit_core_solvers",
    "gradient": "implicit_core_gradients",
}
#: The built-in plugins: (pluggy name, module). Imported from this list, never from metadata.
BUILTINS: tuple[tuple[str, str], ...] = (
    ("implicit_core.numpy", "implicit_numpy"),
    ("implicit_core.cupy", "implicit_cupy"),
    ("implicit_core.torch", "implicit_torch"),
    ("implicit_core.jax", "implicit_jax"),
    ("implicit_core.solvers", "implicit_solvers"),
    ("implicit_core.gradients", "implicit_gradients"),
)


@dataclass(frozen=True)
class PluginInfo:
    """One row of :func:`implicit_core.plugins`."""

    kind: str  # "backend", "solver", "gradient", or "plugin" for a module that failed to load
    name: str
    source: str  # the distribution that provides it, or "runtime"
    plugin: str  # the entry point / registered plugin name
    available: bool
    reason: str = ""
    #: False for a backend whose framework was only looked up, not imported: ``available``
    #: then means "installed" (``plugins(check=True)`` imports and probes it).
    checked: bool = True


@dataclass(frozen=True)
class Command:
    """An ``implicit-core`` sub-command contributed through ``implicit_core_commands``."""

    name: str
    run: Any
    help: str
    add_arguments: Any
    source: str
    plugin: str


@dataclass
class _Entry:
    kind: str
    name: str
    obj: Any
    source: str
    plugin: str


def _normalise(dist: str) -> str:
    return dist.lower().replace("_", "-")


def name_key(name: str) -> str:
    """How plugin names are compared: NFKC-normalised and case-folded."""
    return unicodedata.normalize("NFKC", name).casefold()


TRUTHY = ("1", "true", "yes", "on")


class Registry:
    """The process-wide registry; use the module-level functions rather than this class."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self._entries: dict[str, dict[str, _Entry]] = {k: {} for k in KINDS}
        self._commands: dict[str, Command] = {}
        self._broken: list[PluginInfo] = []
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # ----------------------------------------------------------------- loading
    def reload(self) -> None:
        """Forget everything and load the entry points again (used by tests and tools)."""
        with self._lock:
            for name, plugin in list(self.pm.list_name_plugin()):
                self.pm.unregister(plugin, name=name)
            self._entries = {k: {} for k in KINDS}
            self._commands = {}
            self._broken = []
            self._loaded = False
        self.ensure_loaded()

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        pending: list[str] = []
        with self._lock:
            if self._loaded:
                return
            self._pending_warnings = pending
            try:
                self._load_builtins()
                self._load_entry_points()
            finally:
                # Set only once every plugin is in: a concurrent first use waits on the lock
                # instead of seeing a half-filled registry.
                self._loaded = True
                self._pending_warnings = None
        # Warned after loading is complete: under `-W error` a warning is an exception, and it
        # must not cut the loading loop short (every later plugin would be lost).
        for message in pending:
            warnings.warn(message, PluginWarning, stacklevel=3)

    def _selected_entry_points(self) -> list[tuple[metadata.EntryPoint, str]]:
        chosen, seen = [], set()
        autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in TRUTHY
        allow = {_normalise(d) for d in os.environ.get(ALLOW_ENV, "").split(",") if d.strip()}
        found = set()
        eps = list(metadata.entry_points(group=GROUP))
        for ep in eps:
            found.add(_normalise(ep.dist.name if ep.dist is not None else "unknown"))
        for missing in sorted(allow - found):
            self._warn(
                f"{ALLOW_ENV} names {missing!r}, but no installed distribution by that name provides "
                f"implicit-core plugins (installed: {', '.join(sorted(found - {BUILTIN_DIST})) or 'none'})"
            )
        builtin_modules = {module for _, module in BUILTINS}
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "unknown"
            if ep.value.split(":")[0] in builtin_modules:
                continue  # metadata of an older install: the built-ins come from BUILTINS
            key = (ep.name, ep.value, _normalise(dist))
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            builtin = _normalise(dist) == BUILTIN_DIST
            if builtin or autoload or _normalise(dist) in allow:
                chosen.append((ep, dist))
        # Built-ins first: they win name clashes.
        chosen.sort(key=lambda item: _normalise(item[1]) != BUILTIN_DIST)
        return chosen

    def _load_builtins(self) -> None:
        for plugin_name, module_name in BUILTINS:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # e.g. a checkout whose backends/ is not importable
                self._mark_broken("plugin", plugin_name, BUILTIN_DIST, plugin_name, f"failed to import {module_name!r}: {exc!r}")
                continue
            self._register_plugin(module, plugin_name, BUILTIN_DIST)

    def _load_entry_points(self) -> None:
        for ep, dist in self._selected_entry_points():
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not stop the others
                self._mark_broken("plugin", ep.name, dist, ep.name, f"failed to import {ep.value!r}: {exc!r}")
                continue
            self._register_plugin(module, ep.name, dist)

    def _register_plugin(self, module: Any, plugin_name: str, source: str) -> None:
        try:
            self.pm.register(module, name=plugin_name)
            self.pm.check_pending()
        except Exception as exc:
            self._mark_broken("plugin", plugin_name, source, plugin_name, f"invalid hooks: {exc!r}")
            try:
                self.pm.unregister(module)
            except Exception:
                pass
            return
        others = [p for p in self.pm.get_plugins() if p is not module]
        registrars = {kind: (lambda obj, k=kind: self._add(k, obj, source, plugin_name)) for kind in KINDS}
        calls = [(hook_name, registrars[kind]) for kind, hook_name in HOOKS.items()]
        calls.append(("implicit_core_commands", lambda name, run, **kw: self._add_command(name, run, source, plugin_name, **kw)))
        for hook_name, register in calls:
            # Through pluggy, restricted to this plugin: its failure is its own.
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(register=register)
            except Exception as exc:
                kind = next((k for k, h in HOOKS.items() if h == hook_name), "command")
                self._mark_broken(kind, plugin_name, source, plugin_name, f"hook {hook_name} raised {exc!r}")

    def _add_command(self, name: str, run: Any, source: str, plugin: str, *, help: str = "",
                     add_arguments: Any = None) -> None:
        try:
            if not isinstance(name, str) or not name.replace("-", "_").isidentifier():
                raise PluginError(f"a command name must be a word like 'train', got {name!r}")
            if not callable(run) or (add_arguments is not None and not callable(add_arguments)):
                raise PluginError(f"command {name!r}: run (and add_arguments) must be callables")
            if name in self._commands or name == "plugins":
                taken = self._commands.get(name)
                raise PluginError(f"command {name!r} is already taken by {taken.source if taken else 'implicit-core'}")
        except Exception as exc:
            self._mark_broken("command", str(name), source, plugin, str(exc))
            return
        self._commands[name] = Command(name, run, help, add_arguments, source, plugin)

    def _mark_broken(self, kind: str, name: str, source: str, plugin: str, reason: str) -> None:
        self._broken.append(PluginInfo(kind, name, source, plugin, False, reason))
        self._warn(f"implicit-core plugin {plugin!r} ({source}) is broken and was skipped: {reason}")

    _pending_warnings: list[str] | None = None

    def _warn(self, message: str) -> None:
        if self._pending_warnings is not None:  # while loading: after the loop
            self._pending_warnings.append(message)
        else:
            warnings.warn(message, PluginWarning, stacklevel=4)

    def _add(self, kind: str, obj: Any, source: str, plugin: str, replace: bool = False, strict: bool = False) -> None:
        """Validate and store one registration: the one path for hooks and ``register()``.

        From a hook (``strict=False``) an invalid object or a taken name becomes a 'broken' row
        (a plugin may hand over anything: report it, never crash); at run time it raises.
        """
        try:
            entry = self._make_entry(kind, obj, source, plugin)
            taken = self._taken(kind, entry.name)
            if taken is not None and not (replace and taken.name == entry.name):
                advice = ("; the first registration wins" if not strict
                          else "; pass replace=True to replace it, or choose another name" if taken.name == entry.name
                          else "; choose a name that does not imitate another")
                raise PluginError(self._taken_message(kind, entry.name, taken) + advice)
        except Exception as exc:
            if strict:
                raise
            self._mark_broken(kind, getattr(obj, "name", repr(obj)), source, plugin, str(exc))
            return
        self._entries[kind][entry.name] = entry

    def _taken(self, kind: str, name: str) -> _Entry | None:
        """The entry whose name equals ``name`` or only looks like it (NFKC, case)."""
        key = name_key(name)
        return next((e for n, e in self._entries[kind].items() if name_key(n) == key), None)

    @staticmethod
    def _taken_message(kind: str, name: str, taken: _Entry) -> str:
        same = "" if taken.name == name else f" (as {taken.name!r}, which {name!r} only looks like)"
        return f"{kind} name {name!r} is already taken{same} by {taken.source} ({taken.plugin})"

    def _make_entry(self, kind: str, obj: Any, source: str, plugin: str) -> _Entry:
        base = KINDS[kind]
        cls = obj if inspect.isclass(obj) else type(obj)
        if not issubclass(cls, base):
            raise PluginError(f"expected a {base.__name__} subclass for a {kind}, got {obj!r}")
        if kind != "backend" and not inspect.isclass(obj):
            raise PluginError(f"register the {kind} class {cls.__name__}, not an instance")
        if kind == "backend" and inspect.isclass(obj):
            obj = obj()
        name = getattr(obj, "name", "")
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"{cls.__name__}.name must be a non-empty identifier, got {name!r}")
        return _Entry(kind, name, obj, source, plugin)

    # ----------------------------------------------------------------- public
    def register(self, obj: Any, *, replace: bool = False) -> None:
        self.ensure_loaded()
        with self._lock:
            self._add(_kind_of(obj), obj, "runtime", "runtime", replace=replace, strict=True)

    def unregister(self, name: str, kind: str | None = None) -> None:
        self.ensure_loaded()
        with self._lock:
            kinds = [kind] if kind else [k for k in KINDS if name in self._entries[k]]
            if not kinds or any(name not in self._entries.get(k, {}) for k in kinds):
                known = [n for k in KINDS for n in self._entries[k]]
                raise UnknownPluginError(f"nothing is registered under {name!r}.{did_you_mean(name, known)}")
            for k in kinds:
                del self._entries[k][name]

    def get(self, kind: str, name: str) -> Any:
        self.ensure_loaded()
        with self._lock:
            entries = dict(self._entries[kind])
        if not isinstance(name, str) or name not in entries:
            label = {"gradient": "gradient estimator"}.get(kind, kind)
            broken = [b for b in self._broken if b.name == name]
            hint = f" It is installed but broken: {broken[0].reason}." if broken else did_you_mean(name, entries)
            raise UnknownPluginError(
                f"unknown {label} {name!r}.{hint} Available: {', '.join(sorted(entries)) or 'none'} "
                "(see `implicit-core plugins`)."
            )
        return entries[name].obj

    def commands(self) -> list[Command]:
        self.ensure_loaded()
        with self._lock:
            return list(self._commands.values())

    def solvers_with_inverse(self) -> list[str]:
        self.ensure_loaded()
        with self._lock:
            return sorted(n for n, e in self._entries["solver"].items() if e.obj.provides_inverse)

    def backends(self) -> list[Backend]:
        self.ensure_loaded()
        with self._lock:
            return [e.obj for e in self._entries["backend"].values()]

    def infos(self, check: bool = False) -> list[PluginInfo]:
        self.ensure_loaded()
        with self._lock:
            snapshot = {kind: list(entries.values()) for kind, entries in self._entries.items()}
            broken = list(self._broken)
        rows = []
        for kind, entries in snapshot.items():
            for entry in entries:
                ok, reason, checked = True, "", True
                if kind == "backend":
                    ok, reason, checked = _backend_status(entry.obj, check)
                rows.append(PluginInfo(kind, entry.name, entry.source, entry.plugin, ok, reason, checked))
        rows += [PluginInfo("command", c.name, c.source, c.plugin, True) for c in self.commands()]
        return rows + broken


def _backend_status(backend: Backend, check: bool) -> tuple[bool, str, bool]:
    """``(ok, reason, checked)``: probed when asked or when its framework is imported already,
    otherwise only looked up on disk (importing torch, JAX and CuPy to list them takes seconds)."""
    # (already imported: then available() is cheap)
    if check or all(module in sys.modules for module in backend.requires):
        return (*_safe_available(backend), True)
    try:
        ok, reason = requirements_found(backend)
    except Exception as exc:
        return False, f"looking up its modules raised {exc!r}", True
    return bool(ok), str(reason), not ok


def _safe_available(backend: Backend) -> tuple[bool, str]:
    try:
        ok, reason = backend.available()
        return bool(ok), str(reason)
    except Exception as exc:  # a backend's probe must not take the listing down
        return False, f"available() raised {exc!r}"


def _kind_of(obj: Any) -> str:
    cls = obj if inspect.isclass(obj) else type(obj)
    for kind, base in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise ConfigurationError(
        f"cannot register {obj!r}: expected a Backend, Solver or GradientEstimator subclass"
    )


REGISTRY = Registry()


def plugins(check: bool = False) -> list[PluginInfo]:
    """Every registered backend, solver, gradient estimator and command, and every broken plugin.

    Backends whose framework is not imported yet are only looked up on disk
    (``importlib.util.find_spec``): their row says ``checked=False`` and ``available`` means
    "installed". ``check=True`` imports each framework and probes it (CuPy: a CUDA device).
    """
    return REGISTRY.infos(check)


def register(obj: Any, *, replace: bool = False) -> None:
    """Register a Solver / GradientEstimator subclass, or a Backend (class or instance), now."""
    REGISTRY.register(obj, replace=replace)


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module (with ``@hookimpl`` functions) now, as an entry point would.

    Its hooks run at once, through the same path as installed plugins: what they register is
    listed with source ``"runtime"``, and a failure is reported as a broken plugin (with a
    :class:`PluginWarning`) rather than raised.
    """
    REGISTRY.ensure_loaded()
    plugin_name = name or getattr(plugin, "__name__", type(plugin).__name__)
    with REGISTRY._lock:
        REGISTRY._register_plugin(plugin, plugin_name, "runtime")


def unregister(name: str, kind: str | None = None) -> None:
    """Remove a registration by name (``kind`` disambiguates when names repeat across kinds)."""
    REGISTRY.unregister(name, kind)


def reload_plugins() -> None:
    """Discard run-time registrations and load the entry points again."""
    REGISTRY.reload()


def _instantiate(kind: str, name: str, options: dict[str, Any]) -> Any:
    cls = REGISTRY.get(kind, name)
    options = cls.upgrade_options(options)
    allowed = cls.option_names()
    unknown = [k for k in options if k not in allowed]
    if unknown:
        key = unknown[0]
        raise ConfigurationError(
            f"unknown option {key!r} for {kind} {name!r}.{did_you_mean(key, allowed)} "
            f"Its options are: {', '.join(allowed) or 'none'}."
        )
    return cls(**options)


def get_solver(name: str, **options: Any) -> Solver:
    """A configured solver instance, e.g. ``get_solver("anderson", m=6)``."""
    return _instantiate("solver", name, options)


def get_gradient(name: str, **options: Any) -> GradientEstimator:
    """A configured gradient estimator, e.g. ``get_gradient("ift", solver="broyden", tol=1e-8)``."""
    return _instantiate("gradient", name, options)


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (it may be unavailable; see ``available()``)."""
    return REGISTRY.get("backend", name)


def available_backends() -> list[str]:
    return [b.name for b in REGISTRY.backends() if _safe_available(b)[0]]


def require_available(backend: Backend) -> Backend:
    """``backend`` itself, or ``BackendUnavailableError`` saying why not and what can be used."""
    ok, reason = _safe_available(backend)
    if not ok:
        raise BackendUnavailableError(
            f"backend {backend.name!r} is unavailable here: {reason}. Available: {', '.join(available_backends())}"
        )
    return backend


def solver_names_with_inverse() -> list[str]:
    """Registered solvers that expose an inverse-Jacobian estimate (for error messages)."""
    return REGISTRY.solvers_with_inverse()
