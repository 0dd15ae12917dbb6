"""One registry per kind of plugin, fed by entry points and by in-process registration.

Kinds are ``attention``, ``rule``, ``mixer``, ``eviction``, ``task`` and ``model``. Each kind is the
entry-point group ``sleepzoo.<kind>``; sleepzoo declares its own built-ins there exactly as a third-party
package would. Listing names reads package metadata only; a plugin's module is imported the first time its
name is asked for, and whatever goes wrong then is reported against that name alone:

* :class:`UnknownPluginError`   the name is not registered (with close matches and the known names);
* :class:`MissingDependencyError` the plugin needs an optional package that is not installed;
* :class:`PluginImportError`   the plugin's module raised while importing (names the distribution);
* :class:`PluginConflictError` two distributions register the name (names both; none is picked).

A plugin's import is contained: any exception it raises (``SystemExit`` included, only ``KeyboardInterrupt``
goes through) becomes a :class:`PluginImportError`, and whatever it prints goes to stderr, never to stdout
(so ``sleepzoo plugins list --json`` stays JSON). A name that two distributions register is never resolved
by install order: a built-in (distribution ``sleepzoo``) is never replaced silently.

Example::

    from sleepzoo import registry

    @registry.register("rule", "my_rule")
    def my_rule(q, k, v, g, beta, **kw): ...

    registry.names("rule")          # ['delta', 'gated_delta', 'my_rule']
    registry.get("rule", "my_rule")
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import fnmatch
import importlib.metadata as md
import io
import os
import site
import sys
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("attention", "rule", "mixer", "eviction", "task", "model")
BUILTIN = "sleepzoo"  # the distribution that declares the built-in plugins


class SleepzooError(Exception):
    """Base class of every error sleepzoo raises on bad user input."""


class PluginError(SleepzooError):
    """Base class of the registry's errors."""


class UnknownPluginError(PluginError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class MissingDependencyError(PluginError, ImportError):
    pass


class PluginImportError(PluginError, ImportError):
    pass


class PluginConflictError(PluginError):
    pass


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    provider: str  # distribution name, or "<runtime>" for in-process registration
    target: str  # "module:attr" or the object's qualified name
    status: str = "available"  # available | loaded | missing-dependency | import-error | conflict
    error: str | None = None  # why it does not load (with load=True)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "provider": self.provider, "target": self.target,
                "status": self.status, "error": self.error}


_runtime: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
_loaded: dict[tuple[str, str], Any] = {}
_failed: dict[tuple[str, str], PluginError] = {}
# kind -> name -> the entry points registering it, one per distribution (more than one is a conflict)
_entry_points_cache: dict[str, dict[str, list[md.EntryPoint]]] | None = None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownPluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")


def _entry_points() -> dict[str, dict[str, list[md.EntryPoint]]]:
    global _entry_points_cache
    if _entry_points_cache is None:
        found: dict[str, dict[str, list[md.EntryPoint]]] = {k: {} for k in KINDS}
        for kind in KINDS:
            for ep in md.entry_points(group=f"sleepzoo.{kind}"):  # one entry per distribution name
                found[kind].setdefault(ep.name, []).append(ep)
        _entry_points_cache = found
    return _entry_points_cache


def refresh() -> None:
    """Forget what was discovered (call after installing a plugin into the running interpreter)."""
    global _entry_points_cache
    _entry_points_cache = None
    _failed.clear()
    for key in [k for k in _loaded if k[1] not in _runtime[k[0]]]:
        del _loaded[key]
    importlib.invalidate_caches()  # a package pip-installed after start-up must be visible


def _provider(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown distribution>"


def _conflict(kind: str, name: str, eps: list[md.EntryPoint]) -> PluginConflictError:
    who = " and ".join(f"{_provider(ep)!r} ({ep.value})" for ep in eps)
    others = [_provider(ep) for ep in eps if _provider(ep) != BUILTIN]
    if len(others) < len(eps):  # one of them is sleepzoo's own
        how = (f"a built-in is never replaced: uninstall {' and '.join(others)} (pip uninstall "
               f"{' '.join(others)}) or ask its authors to rename their {kind}")
    else:
        how = f"uninstall all but one of them (e.g. pip uninstall {others[-1]})"
    return PluginConflictError(
        f"{kind} {name!r} is registered by {len(eps)} distributions, {who}; sleepzoo does not pick one by "
        f"install order: {how}. In Python, registry.register({kind!r}, {name!r})(TheClass) also chooses for this process.")


@contextlib.contextmanager
def _contained_output(captured: io.StringIO):
    """Send everything printed inside to ``captured``: Python's sys.stdout and sys.stderr, and what native
    code writes to file descriptor 1 goes to descriptor 2 (so nothing a plugin prints reaches stdout)."""
    saved_fd = None
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _excerpt(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _load_entry_point(ep: md.EntryPoint) -> Any:
    """``ep.load()``; a distribution installed (editable) after start-up is made importable first.

    Editable installs put their source folder on ``sys.path`` through a ``.pth`` file, which Python only
    reads at start-up; reading that distribution's ``.pth`` files here lets ``pip install -e`` plus
    :func:`refresh` work without restarting the interpreter.
    """
    try:
        return ep.load()
    except ModuleNotFoundError as exc:
        dist = getattr(ep, "dist", None)
        if dist is None or (exc.name or "").split(".")[0] != ep.module.split(".")[0]:
            raise
        for f in dist.files or ():
            if f.suffix == ".pth":
                site.addpackage(str(f.locate().parent), f.name, set())
        return ep.load()


def names(kind: str, pattern: str | None = None) -> list[str]:
    """Sorted names registered for ``kind``, optionally filtered by a glob ``pattern``. Imports nothing."""
    _check_kind(kind)
    all_names = set(_entry_points()[kind]) | set(_runtime[kind])
    if pattern:
        all_names = {n for n in all_names if fnmatch.fnmatch(n, pattern)}
    return sorted(all_names)


def register(kind: str, name: str | None = None) -> Callable[[Any], Any]:
    """Decorator registering an object under ``kind`` in this process; the name defaults to ``obj.__name__``."""
    _check_kind(kind)

    def deco(obj: Any) -> Any:
        key = name or obj.__name__
        _runtime[kind][key] = obj
        _loaded[(kind, key)] = obj
        _failed.pop((kind, key), None)
        return obj

    return deco


def unregister(kind: str, name: str) -> None:
    _check_kind(kind)
    _runtime[kind].pop(name, None)
    _loaded.pop((kind, name), None)


def _unknown(kind: str, name: str) -> UnknownPluginError:
    known = names(kind)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(known) if known else "(none installed)"
    return UnknownPluginError(
        f"unknown {kind} {name!r}.{hint} Known {kind} names: {listing}. "
        f"A plugin registers more through the entry-point group 'sleepzoo.{kind}'."
    )


def get(kind: str, name: str) -> Any:
    """The object registered as ``name`` under ``kind``; imports its plugin on first use."""
    _check_kind(kind)
    if not isinstance(name, str):
        raise UnknownPluginError(f"{kind} name must be a string, got {type(name).__name__} {name!r}")
    key = (kind, name)
    if key in _loaded:
        return _loaded[key]
    if key in _failed:
        raise _failed[key]
    eps = _entry_points()[kind].get(name)
    if not eps:
        raise _unknown(kind, name)
    if len(eps) > 1:
        _failed[key] = _conflict(kind, name, eps)
        raise _failed[key]
    ep = eps[0]
    provider = _provider(ep)
    printed = io.StringIO()
    try:
        with _contained_output(printed):
            obj = _load_entry_point(ep)
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        own_module = ep.module.split(".")[0]
        if missing.split(".")[0] == own_module:
            # The plugin's own module is absent although its distribution is installed: a stale install.
            err: PluginError = PluginImportError(
                f"{kind} {name!r} from distribution {provider!r} points at module {ep.module!r}, which can not "
                f"be imported ({exc}). Reinstall {provider!r}, or restart Python if it was installed just now."
            )
        else:
            err = MissingDependencyError(
                f"{kind} {name!r} (from distribution {provider!r}, {ep.value}) needs the package {missing!r}, "
                f"which is not installed. Install it (pip install {missing.split('.')[0].replace('_', '-')}; "
                f"accelerated back ends run on CUDA only), or choose another {kind}: {', '.join(names(kind))}."
            )
        _failed[key] = err
        raise err from exc
    except BaseException as exc:  # anything a plugin raises on import is reported, not propagated raw
        if isinstance(exc, KeyboardInterrupt):
            raise
        said = f" It printed: {_excerpt(printed.getvalue())}" if printed.getvalue().strip() else ""
        err = PluginImportError(
            f"{kind} {name!r} from distribution {provider!r} ({ep.value}) failed to import: "
            f"{type(exc).__name__}: {_excerpt(str(exc)) or '(no message)'}.{said} Other plugins are "
            f"unaffected; reinstall or fix that package."
        )
        _failed[key] = err
        raise err from exc
    if printed.getvalue():  # a plugin that loads but talks: what it said goes to stderr
        sys.stderr.write(printed.getvalue())
    _loaded[key] = obj
    return obj


def info(kind: str | None = None, *, load: bool = False) -> list[PluginInfo]:
    """Describe registered plugins. With ``load=True`` each is imported so its status is known."""
    kinds = KINDS if kind is None else (kind,)
    out: list[PluginInfo] = []
    for k in kinds:
        _check_kind(k)
        eps = _entry_points()[k]
        for n in names(k):
            if n in _runtime[k]:
                obj = _runtime[k][n]
                out.append(PluginInfo(k, n, "<runtime>", getattr(obj, "__qualname__", repr(obj)), "loaded"))
                continue
            provider = ", ".join(_provider(ep) for ep in eps[n])
            target = ", ".join(ep.value for ep in eps[n])
            status, error = "available", None
            if load:
                try:
                    get(k, n)
                    status = "loaded"
                except PluginError as exc:
                    status, error = _STATUS.get(type(exc), "import-error"), str(exc)
            elif (k, n) in _loaded:
                status = "loaded"
            out.append(PluginInfo(k, n, provider, target, status, error))
    return out


_STATUS = {MissingDependencyError: "missing-dependency", PluginImportError: "import-error",
           PluginConflictError: "conflict"}
