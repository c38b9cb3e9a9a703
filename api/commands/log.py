"""One log line when a command is created and one at its final outcome; DEBUG lines for the states between.

A ChangeHooks (api/hooks.py) composed beside the event log's Journal in api/app.py: it only observes what
CommandService already reports in each change's transaction. The lines are written after that transaction
commits and is durable (a Session `after_commit` listener hands them to api/group_commit.py after_durable:
for a unit of SQLite's group-committed batch, after the batch's COMMIT); a change that rolls back (a lost
race, a failed write, a broken batch) logs nothing. Each line carries `command_id` and `device_id` as fields
(foundation/logs.py), and the request id when
the change ran in the request's context (the asynchronous drivers; the threaded ones run it on a database
thread, where the HTTP request's own DEBUG line in api/request_id.py carries it).

    INFO  command 01J... unlock on bike-0001: created (queued)
    DEBUG command 01J... unlock on bike-0001: sent (dispatch)
    INFO  command 01J... unlock on bike-0001: timed_out after 5003 ms: the lock did not answer in time
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlmodel import Session

from api.commands.states import Status, is_final
from api.group_commit import after_durable
from foundation.logs import request_id

if TYPE_CHECKING:
    from api.models import CommandRow, Device, HistoryRow

log = logging.getLogger("latch.commands")

_PENDING = "latch_command_log"   # Session.info key: lines waiting for the commit

Line = tuple[int, str, tuple[Any, ...], dict[str, str]]


class CommandLog:
    def command_changed(self, s: Session, cmd: CommandRow, history: list[HistoryRow]) -> None:
        lines: list[Line] = []
        ctx = {"command_id": cmd.id, "device_id": cmd.device_id}
        rid = request_id.get()
        if rid is not None:
            ctx["request_id"] = rid
        for h in history:
            if h.to_status is None or not h.applied:
                continue
            status = Status(h.to_status)
            if h.event == "created":
                lines.append((logging.INFO, "command %s %s on %s: created (%s)",
                              (cmd.id, cmd.action, cmd.device_id, status.value), ctx))
            elif is_final(status):
                reason = cmd.reason if status == Status(cmd.status) else h.detail
                lines.append((logging.INFO, "command %s %s on %s: %s after %d ms%s",
                              (cmd.id, cmd.action, cmd.device_id, status.value, h.at - cmd.created_at,
                               f": {reason}" if reason else ""), ctx))
            elif log.isEnabledFor(logging.DEBUG):
                lines.append((logging.DEBUG, "command %s %s on %s: %s (%s) after %d ms",
                              (cmd.id, cmd.action, cmd.device_id, status.value, h.event, h.at - cmd.created_at),
                              ctx))
        if not lines:
            return
        pending = s.info.get(_PENDING)
        if pending is None:
            pending = s.info[_PENDING] = []
            event.listen(s, "after_commit", _flush)
            event.listen(s, "after_rollback", _discard)
        pending.extend(lines)

    def device_changed(self, s: Session, device: Device, was_online: bool, reported_before: dict[str, Any]) -> None:
        pass


def _flush(s: Session) -> None:
    """The unit committed: its lines go out once that is durable (for a unit of a group-committed batch,
    after the batch's COMMIT: api/group_commit.py)."""
    pending = s.info.get(_PENDING)
    if not pending:
        return
    lines = list(pending)
    pending.clear()
    after_durable(s, lambda: _emit(lines))


def _emit(lines: list[Line]) -> None:
    for level, msg, args, ctx in lines:
        log.log(level, msg, *args, extra=ctx)


def _discard(s: Session) -> None:
    pending = s.info.get(_PENDING)
    if pending:
        pending.clear()
