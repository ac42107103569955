"""Task identity: a stable string for every callable, and the way back from the string.

A task is stored as its dotted import path (``myapp.mail.send_welcome``) or as the name it was
registered under (``@pq.task(name="welcome")``), never as an object.  Workers resolve the string
through the registry first, then through an import that ``allowed_tasks`` must permit *before*
anything is imported: the jobs table is a code-execution boundary.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from .errors import InvalidOption, TaskNotAllowed, TaskNotImportable

if TYPE_CHECKING:
    from .models import Job
    from .pq import PQ

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class TaskOptions:
    """Defaults a registered task gives each of its jobs (overridable per call)."""

    queue: str | None = None
    priority: int | None = None
    timeout: Any = None
    max_retries: int | None = None
    retry_in: Any = None
    result_ttl: int | None = None
    atomic: bool = False
    """Run inside the transaction that records the job's completion (see docs/guarantees)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The options of :data:`EXTRA_TASK_OPTIONS` (``define_job`` keeps its hooks here too)."""

    @property
    def serial(self) -> bool:
        return bool(self.extra.get("serial"))


TASK_OPTIONS = (
    "name", "queue", "priority", "timeout", "max_retries", "retry_in", "result_ttl", "atomic",
    "serial", "schedule_at", "run_at", "expected_at", "failure_hook",
)
"""Every option ``@pq.task(...)`` takes."""

EXTRA_TASK_OPTIONS = frozenset({"serial", "schedule_at", "run_at", "expected_at", "failure_hook"})
"""The ones kept in :attr:`TaskOptions.extra`."""


def check_task_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Validate the decorator's extra options, in place: a typo (``max_retry=3``) must fail at
    decoration, not leave the task silently without retries.  ``schedule_at`` becomes ``run_at``
    (pq's name for the same default)."""
    unknown = sorted(set(extra) - EXTRA_TASK_OPTIONS)
    if unknown:
        raise InvalidOption(
            f"unknown @pq.task option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            f"the options are {', '.join(TASK_OPTIONS)}"
        )
    if "schedule_at" in extra:
        if extra.get("run_at") is not None and extra["schedule_at"] is not None:
            raise InvalidOption("give run_at or schedule_at, not both (they are the same option)")
        schedule_at = extra.pop("schedule_at")
        if extra.get("run_at") is None:
            extra["run_at"] = schedule_at
    if not isinstance(extra.get("serial", False), bool):
        raise InvalidOption(f"serial must be True or False, not {extra['serial']!r}")
    return extra


@dataclass
class RegisteredTask:
    name: str
    func: Callable[..., Any]
    options: TaskOptions


_REGISTRY: dict[str, RegisteredTask] = {}
"""Tasks registered by name (``@pq.task``, ``define_job``), process-wide."""
_GENERATION = [0]
"""Bumped at every registration: what was resolved from the registry before is stale."""


def registry_generation() -> int:
    return _GENERATION[0]


_BY_FUNC: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_REF_CACHE: weakref.WeakKeyDictionary[Any, TaskRef] = weakref.WeakKeyDictionary()
"""Plain functions seen before (enqueue is a hot path)."""


def register(name: str, func: Callable[..., Any], options: TaskOptions | None = None) -> RegisteredTask:
    existing = _REGISTRY.get(name)
    target = inspect.unwrap(func)
    if existing is not None and inspect.unwrap(existing.func) is not target:
        # Re-registration by a reloaded module is fine; two different functions are not.
        if (getattr(existing.func, "__module__", None), getattr(existing.func, "__qualname__", None)) != (
            getattr(func, "__module__", None),
            getattr(func, "__qualname__", None),
        ):
            raise ValueError(
                f"task name {name!r} is already registered for "
                f"{existing.func.__module__}.{existing.func.__qualname__}; choose another name"
            )
    entry = RegisteredTask(name, func, options or TaskOptions())
    _REGISTRY[name] = entry
    _REF_CACHE.clear()
    _GENERATION[0] += 1
    try:
        _BY_FUNC[target] = name
    except TypeError:
        pass
    return entry


def registered(name: str) -> RegisteredTask | None:
    return _REGISTRY.get(name)


def registered_options(name: str) -> TaskOptions | None:
    entry = _REGISTRY.get(name)
    return entry.options if entry else None


# -- from callable to string ------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRef:
    """What an enqueue stores: the task string, and a bound instance that must travel by dill."""

    name: str
    instance: Any = None


def task_ref(func: Any) -> TaskRef:
    """The stored identity of ``func``; raise TaskNotImportable when no worker could find it."""
    if isinstance(func, str):
        name = func.strip().replace(":", ".")
        if not name or any(not part.isidentifier() for part in name.split(".")):
            raise TaskNotImportable(f"{func!r} is not a task name or dotted import path")
        return TaskRef(name)
    if isinstance(func, TaskFunction):
        return TaskRef(func.name)
    if inspect.isfunction(func):
        cached = _REF_CACHE.get(func)
        if cached is not None:
            return cached
        ref = _function_ref(func)
        _REF_CACHE[func] = ref
        return ref
    return _function_ref(func)


def _function_ref(func: Any) -> TaskRef:
    try:
        known = _BY_FUNC.get(inspect.unwrap(func))
    except TypeError:
        known = None
    if known is not None:
        return TaskRef(known)
    if inspect.ismethod(func):
        owner = func.__self__
        if inspect.isclass(owner):  # a classmethod: the class is importable like a function
            return TaskRef(f"{_importable_path(owner)}.{func.__name__}")
        path = _instance_path(owner)
        if path is not None:
            return TaskRef(f"{path}.{func.__name__}")
        cls = type(owner)
        return TaskRef(f"{_importable_path(cls)}.{func.__name__}", instance=owner)
    if callable(func) and not inspect.isfunction(func) and not inspect.isbuiltin(func):
        # a callable instance: store it like a bound __call__
        if not inspect.isclass(func):
            path = _instance_path(func)
            if path is not None:
                return TaskRef(path)
            return TaskRef(f"{_importable_path(type(func))}.__call__", instance=func)
    return TaskRef(_importable_path(func))


def _importable_path(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    label = repr(obj)
    if not module or not qualname:
        raise TaskNotImportable(f"{label} has no module and name a worker could import")
    if "<lambda>" in qualname:
        raise TaskNotImportable(
            f"{label} is a lambda; a worker cannot import it. Define a module-level function"
        )
    if "<locals>" in qualname:
        raise TaskNotImportable(
            f"{module}.{qualname} is defined inside a function; a worker cannot import it. Move "
            "it to module level"
        )
    if module == "__main__":
        raise TaskNotImportable(
            f"{qualname} is defined in __main__, which a worker imports as a different module. "
            "Move it to an importable module, or register it with @pq.task"
        )
    target = sys.modules.get(module)
    found: Any = target
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            break
    if found is None or (inspect.unwrap(found) is not inspect.unwrap(obj) and found is not obj):
        raise TaskNotImportable(
            f"{module}.{qualname} cannot be found under that name (is it shadowed or "
            "dynamically created?); a worker could not import it"
        )
    return f"{module}.{qualname}"


def _instance_path(owner: Any) -> str | None:
    """``module.name`` when ``owner`` is a module-level object, else None."""
    module = sys.modules.get(getattr(type(owner), "__module__", "") or "")
    if module is None or module.__name__ == "__main__":
        return None
    for attr, value in vars(module).items():
        if value is owner and not attr.startswith("__"):
            return f"{module.__name__}.{attr}"
    return None


# -- from string to callable ---------------------------------------------------------------------

_STDLIB = frozenset(sys.stdlib_module_names) | {"builtins"}


def check_allowed(path: str, allowed: Iterable[str]) -> None:
    """Raise TaskNotAllowed unless ``path`` may be imported by a worker.  Imports nothing."""
    allowed = tuple(allowed)
    top = path.split(".", 1)[0]
    if allowed:
        for prefix in allowed:
            prefix = prefix.strip().rstrip(".")
            if path == prefix or path.startswith(prefix + "."):
                return
        raise TaskNotAllowed(
            f"task {path!r} is outside allowed_tasks ({', '.join(allowed)}); it was not imported"
        )
    if top in _STDLIB:
        raise TaskNotAllowed(
            f"task {path!r} is in the standard library, which workers never run; it was not "
            "imported"
        )


def resolve(path: str, allowed: Iterable[str] = ()) -> Callable[..., Any]:
    """The callable behind a task string: registry first, then a permitted import."""
    entry = _REGISTRY.get(path)
    if entry is not None:
        return entry.func
    check_allowed(path, allowed)
    return import_object(path)


@functools.lru_cache(maxsize=1024)
def import_object(path: str) -> Any:
    """Import ``a.b.c`` as the longest importable module prefix plus attributes."""
    parts = path.replace(":", ".").split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            raise
        obj: Any = module
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise TaskNotImportable(
                f"{path!r}: module {module_name!r} has no attribute {'.'.join(parts[cut:])!r}"
            ) from None
        return obj
    raise TaskNotImportable(f"{path!r} cannot be imported: no module of that name")


def resolve_method(path: str, instance: Any, allowed: Iterable[str] = ()) -> Callable[..., Any]:
    """A method of an instance that travelled by dill: check the class path, then bind."""
    check_allowed(path, allowed)
    method_name = path.rsplit(".", 1)[-1]
    return getattr(instance, method_name)


def is_async(func: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - a callable object's __call__
    )


# -- the decorator -------------------------------------------------------------------------------


class TaskFunction(Generic[P, R]):
    """A function registered with ``@pq.task``: call it directly, or ``.delay()`` it."""

    def __init__(self, pq: PQ, func: Callable[P, R], name: str, options: TaskOptions) -> None:
        self.pq = pq
        self.func = func
        self.name = name
        self.options = options
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> Job:
        """Enqueue a call.  ``_schedule_at``/``_expected_at``/``_priority``/``_queue`` override
        the task's options for this call (pq's underscore convention); the SPEC's reserved
        option names (``run_at``, ``priority``...) work too."""
        options: dict[str, Any] = {}
        for key in list(kwargs):
            if key.startswith("_") and key[1:] in _UNDERSCORE_OPTIONS:
                options[_UNDERSCORE_OPTIONS[key[1:]]] = kwargs.pop(key)
        queue = self._queue(options.pop("queue", None), options.pop("session", None))
        return queue.enqueue(self, *args, **{**kwargs, **options})

    push = delay  # pgtq's name

    def enqueue_call(self, args: Any = (), kwargs: Any = None, **options: Any) -> Job:
        queue = self._queue(options.pop("queue", None), options.pop("session", None))
        return queue.enqueue_call(self, args=args, kwargs=kwargs, **options)

    def _queue(self, name: str | None, session: Any) -> Any:
        """The task's queue.  Its other defaults (``serial``, ``schedule_at``, retries...) are
        applied by ``Queue.build``, whichever way the task is enqueued."""
        return self.pq.queue(name or self.options.queue, session=session)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


_UNDERSCORE_OPTIONS = {
    "schedule_at": "run_at",
    "run_at": "run_at",
    "expected_at": "expected_at",
    "priority": "priority",
    "queue": "queue",
    "timeout": "timeout",
    "client_id": "client_id",
    "session": "session",
    "depends_on": "depends_on",
    "max_retries": "max_retries",
    "retry_in": "retry_in",
    "result_ttl": "result_ttl",
}
