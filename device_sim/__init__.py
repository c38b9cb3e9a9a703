"""A simulator of many bike locks, each running the firmware's own LockController the way the firmware runs it.

What CI trusts about a lock is what the firmware does, so the simulator shares the firmware's code
(firmware/controller.py decides everything; firmware/store.py's format and loader keep its record;
firmware/config.py's timings drive it) and mirrors what cannot run under CPython (firmware/app.py's
main loop and reconnect handling, firmware/mqtt.py's outgoing queue). Modules:

    lock.py        one lock: the controller's effects in order, commands one at a time, PUBACK last
    store.py       its persisted record: durable, off the event loop, group-committed per lock
    outbox.py      its outgoing QoS 1 queue, kept across reconnects (firmware/mqtt.py's rules)
    ticker.py      the main loop: every lock's controller tick every tick_ms, one task per period
    actuations.py  the per-process actuation record a benchmark reads
    fleet.py       many locks, started with bounded concurrency
    provision.py   `latch sim`: register through the API once, run the fleet

Files in a simulator's data dir (`latch sim --data-dir D` uses D/sim/; tests pass any directory):

    <device id>.state.json    the lock's record, exactly as the firmware keeps state.json: two lines,
                              {"seq": n, "data": {"executed": [[command id, expires_at ms, result,
                              reason], ...], "clock": newest server ms known}} and the sha256 hex of
                              that line; written to <device id>.state.json.tmp, fsynced, renamed, the
                              directory fsynced; read back with firmware.store.Store(path).load().
                              Durable before the lock acts on it: before its "received" ack and the
                              motor, before its "succeeded"/"failed" ack.
    actuations-<pid>-<start ms>.jsonl
                              the actuation record of one simulator process (a restart adds a file;
                              read them all, device_sim.actuations.read_actuations(D/sim)). One JSON
                              object per line, appended and handed to the kernel per actuation:
                              {"v": 1, "event": "actuate", "device", "command_id", "action"
                              ("unlock" | "lock" | "beep"), "at_ms", "expires_at", "before_expiry", "pid"}
                              before the motor moves, then {"v": 1, "event": "result", "device",
                              "command_id", "action", "at_ms", "ok", "reason", "locked", "pid"} when it
                              stopped. Full description: device_sim/actuations.py.

Without a data dir a lock keeps its record in memory only (a new SimulatedLock forgets, as a wiped
board would) and writes no actuation record; `SimulatedLock.actuations` and `.answers` hold what it
did in either case, for tests.
"""
