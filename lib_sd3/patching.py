"""Reversible, idempotent monkey-patches, kept in one registry.

The extension has to change A1111 behaviour in a handful of places (token counter, samplers,
schedulers, IC-Light hooks, text encoders). Doing that with scattered assignments makes it
impossible to answer "what did you change?" or to put things back when the user switches to
an SD1.5 model. Here every change is a :class:`Patch` with a detector, ``apply`` and ``undo``;
the :class:`PatchRegistry` applies each at most once, logs each failure once, and never lets a
missing target raise into the WebUI's start-up.

This module is pure: it knows nothing about A1111, so it is tested on its own.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger

log = get_logger("patches")

_MISSING = object()


class PatchState(str, enum.Enum):
    """Where a patch stands; the string values are what ``GET /sd3/status`` reports."""

    PENDING = "pending"
    APPLIED = "applied"
    UNAVAILABLE = "unavailable"  # its target is missing in this WebUI: feature disabled
    FAILED = "failed"  # apply() raised: feature disabled, WebUI keeps running


class AttributeSwap:
    """Replace ``owner.attr`` and remember exactly what was there, so undo is bit-exact.

    ``make`` receives the original value and returns the replacement; the replacement is built
    at apply time so that it wraps whatever is current (another extension may have wrapped it
    first). If the attribute was inherited rather than defined on ``owner`` itself, undo deletes
    our override instead of pinning the inherited value onto ``owner``.
    """

    def __init__(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        self.owner = owner
        self.attr = attr
        self.make = make
        self._saved: Any = _MISSING
        self._applied = False

    @property
    def original(self) -> Any:
        """The value that was in place before :meth:`apply` (inherited lookups included)."""
        if not self._applied:
            return getattr(self.owner, self.attr)
        return getattr(self.owner, self.attr).__sd3_original__

    def apply(self) -> None:
        if self._applied:
            return
        own = vars(self.owner).get(self.attr, _MISSING) if hasattr(self.owner, "__dict__") else _MISSING
        current = getattr(self.owner, self.attr)
        replacement = self.make(current)
        try:
            replacement.__sd3_original__ = current
        except (AttributeError, TypeError):
            raise TypeError(f"replacement for {self.attr} must accept attributes (use a function)") from None
        self._saved = own
        setattr(self.owner, self.attr, replacement)
        self._applied = True

    def undo(self) -> None:
        if not self._applied:
            return
        if self._saved is _MISSING:
            delattr(self.owner, self.attr)
        else:
            setattr(self.owner, self.attr, self._saved)
        self._saved = _MISSING
        self._applied = False


class AttributeAddition:
    """Add an attribute a class lacks; undo removes exactly ours (:class:`AttributeSwap` needs one that exists).

    ``owner`` is looked up at apply time (the class may not exist when the patch is declared).
    """

    def __init__(self, owner: Callable[[], Any], name: str, value: Any) -> None:
        self.find_owner, self.name, self.value = owner, name, value
        self.owner: Any = None

    def apply(self) -> None:
        self.owner = self.find_owner()
        setattr(self.owner, self.name, self.value)

    def undo(self) -> None:
        if self.owner is not None and vars(self.owner).get(self.name) is self.value:
            delattr(self.owner, self.name)
        self.owner = None


class ConvertOnSet:
    """A data descriptor for an instance attribute that converts each value as it is stored.

    Installed over a class attribute with :class:`AttributeSwap` (``lambda _default: ConvertOnSet(...)``):
    reads give what was stored, after ``convert(instance, value)``; undo puts the class attribute back.
    """

    def __init__(self, name: str, convert: Callable[[Any, Any], Any]) -> None:
        self.name, self.convert = name, convert

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else instance.__dict__.get(self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.name] = self.convert(instance, value)


class NotNeeded(str):
    """A detector's reason when the WebUI already does what the patch would: not applied, logged at debug only."""


@dataclasses.dataclass
class Patch:
    """One named change to the WebUI.

    ``detect`` returns ``None`` when the target exists, or a short reason it does not (this is
    the feature detection: hasattr / signature checks, never version strings). ``sd3_only``
    patches are applied while an SD3 model is loaded and undone otherwise, so SD1.5 / SDXL run
    A1111's original functions.
    """

    name: str
    feature: str
    detect: Callable[[], str | None]
    apply: Callable[[], None]
    undo: Callable[[], None]
    sd3_only: bool = False
    state: PatchState = PatchState.PENDING
    reason: str = ""

    def wanted(self, sd3_loaded: bool) -> bool:
        """The one rule for "only while an SD3 model is loaded"."""
        return sd3_loaded or not self.sd3_only

    @classmethod
    def from_swaps(
        cls,
        name: str,
        feature: str,
        detect: Callable[[], str | None],
        swaps: Callable[[], list[AttributeSwap]],
        sd3_only: bool = False,
    ) -> Patch:
        """Build a patch out of attribute swaps created lazily (targets are looked up at apply)."""
        made: list[AttributeSwap] = []

        def apply() -> None:
            made[:] = swaps()
            done: list[AttributeSwap] = []
            try:
                for swap in made:
                    swap.apply()
                    done.append(swap)
            except BaseException:
                for swap in reversed(done):
                    swap.undo()
                made.clear()
                raise

        def undo() -> None:
            for swap in reversed(made):
                swap.undo()
            made.clear()

        return cls(name=name, feature=feature, detect=detect, apply=apply, undo=undo, sd3_only=sd3_only)


class PatchRegistry:
    """All patches of the extension; applying twice is a no-op, failures are logged once."""

    def __init__(self) -> None:
        self._patches: dict[str, Patch] = {}
        self._logged: set[str] = set()

    def add(self, patch: Patch) -> Patch:
        if patch.name in self._patches:
            raise ValueError(f"patch {patch.name!r} registered twice")
        self._patches[patch.name] = patch
        return patch

    def get(self, name: str) -> Patch:
        return self._patches[name]

    def __iter__(self):
        return iter(list(self._patches.values()))

    def _log_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(message, *args, exc_info=exc_info)

    def apply(self, name: str) -> PatchState:
        """Apply one patch if its target exists; never raises."""
        patch = self._patches[name]
        if patch.state is PatchState.APPLIED:
            return patch.state
        try:
            reason = patch.detect()
        except Exception as error:  # a broken detector must not take the WebUI down either
            reason = f"detector raised {error!r}"
        if reason:
            patch.state, patch.reason = PatchState.UNAVAILABLE, reason
            if isinstance(reason, NotNeeded):
                log.debug("patch %s not applied: %s", name, reason)
                return patch.state
            self._log_once(f"{name}:unavailable", "%s disabled: %s (patch %s)", patch.feature, reason, name)
            return patch.state
        try:
            patch.apply()
        except Exception as error:
            patch.state, patch.reason = PatchState.FAILED, repr(error)
            self._log_once(f"{name}:failed", "%s disabled: applying patch %s failed", patch.feature, name, exc_info=True)
            return patch.state
        patch.state, patch.reason = PatchState.APPLIED, ""
        log.debug("applied patch %s", name)
        return patch.state

    def undo(self, name: str) -> PatchState:
        """Undo one patch if it is applied; never raises."""
        patch = self._patches[name]
        if patch.state is not PatchState.APPLIED:
            return patch.state
        try:
            patch.undo()
        except Exception as error:
            patch.state, patch.reason = PatchState.FAILED, f"undo failed: {error!r}"
            self._log_once(f"{name}:undo", "undoing patch %s failed", name, exc_info=True)
            return patch.state
        patch.state, patch.reason = PatchState.PENDING, ""
        log.debug("undid patch %s", name)
        return patch.state

    def sync(self, sd3_loaded: bool) -> None:
        """Apply global patches, and SD3-only ones exactly while an SD3 model is loaded."""
        for patch in self:
            if patch.wanted(sd3_loaded):
                self.apply(patch.name)
            else:
                self.undo(patch.name)

    def reapply(self, names: list[str] | tuple[str, ...], sd3_loaded: bool) -> None:
        """Undo and apply again, on what exists now: patches on objects A1111 rebuilds (on a UI reload, its
        script runners and extension modules), so they wrap the new objects, under the same rule as :meth:`sync`."""
        for name in names:
            self.undo(name)
            if self._patches[name].wanted(sd3_loaded):
                self.apply(name)

    def undo_all(self) -> None:
        """Undo every patch and forget "unavailable"/"failed" verdicts.

        Called when A1111 unloads our script (a UI reload): until the next :meth:`sync` detects
        every target afresh, ``/sd3/status`` must not report verdicts from before the reload.
        """
        for patch in reversed(list(self)):
            self.undo(patch.name)
            if patch.state is not PatchState.APPLIED:
                patch.state, patch.reason = PatchState.PENDING, ""

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            p.name: {"feature": p.feature, "state": p.state.value, "reason": p.reason, "sd3_only": p.sd3_only}
            for p in self
        }
