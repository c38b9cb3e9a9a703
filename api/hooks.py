"""The seam between state changes and the event log: called inside the transaction that makes the change.

CommandService calls `command_changed` for every applied status change (and at create); the device
registry calls `device_changed` whenever presence or reported state is written. Whatever the hooks
add to the session commits (or rolls back) with the change itself, so the event log can never hold
an event for a change that did not happen, nor miss one that did. They run on the writer thread:
no awaiting, no I/O beyond the session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from sqlmodel import Session

if TYPE_CHECKING:
    from api.models import CommandRow, Device, HistoryRow


class ChangeHooks(Protocol):
    def command_changed(self, s: Session, cmd: CommandRow, history: list[HistoryRow]) -> None: ...

    def device_changed(self, s: Session, device: Device, was_online: bool, reported_before: dict[str, Any]) -> None: ...


class NoHooks:
    def command_changed(self, s: Session, cmd: CommandRow, history: list[HistoryRow]) -> None:
        pass

    def device_changed(self, s: Session, device: Device, was_online: bool, reported_before: dict[str, Any]) -> None:
        pass


NO_HOOKS = NoHooks()


class AllHooks:
    """Several ChangeHooks called in turn, in the same transaction (api/app.py composes them)."""

    def __init__(self, *hooks: ChangeHooks) -> None:
        self.hooks = hooks

    def command_changed(self, s: Session, cmd: CommandRow, history: list[HistoryRow]) -> None:
        for h in self.hooks:
            h.command_changed(s, cmd, history)

    def device_changed(self, s: Session, device: Device, was_online: bool, reported_before: dict[str, Any]) -> None:
        for h in self.hooks:
            h.device_changed(s, device, was_online, reported_before)
