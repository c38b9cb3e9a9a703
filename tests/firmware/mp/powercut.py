"""Power cut while saving state, on littlefs and FAT, under the MicroPython Unix port.

    micropython powercut.py lfs2|fat [torn]

A RAM block device counts write operations (block writes, and erases for
littlefs) and stops writing after K of them: the power went. For every K from
0 to the number of operations the whole workload needs, the workload runs on a
fresh copy of a formatted image with the cut at K, then the image as it was at
the cut is mounted again ("reboot") and the store loaded. Checked each time:
- the filesystem mounts and the loader returns a record exactly as some save
  wrote it (never a mix, never garbage), or None before the first save ended;
- every save that returned before the cut is there: no executed id is lost;
- the recovered filesystem takes the next save, and that one loads back.
With "torn", the write at the cut is half done (the first half of its bytes).
Prints "OK <fs> cuts=<n> ops=<total>" or raises.
"""
import os
import sys

import vfs

from firmware.store import Store

BS = 512
MOUNT = "/pc"


class PowerCutDevice:
    def __init__(self, nblocks, data=None, limit=None, torn=False):
        self.n = nblocks
        self.data = bytearray(data) if data is not None else bytearray(nblocks * BS)
        self.ops = 0
        self.limit = limit
        self.torn = torn
        self.frozen = None  # the image at the instant of the cut

    def _write(self, addr, buf):
        if self.limit is not None and self.ops >= self.limit:
            self.ops += 1
            return  # no power: nothing reaches the flash
        self.ops += 1
        if self.limit is not None and self.ops == self.limit and self.torn and len(buf) > 1:
            half = len(buf) // 2
            self.data[addr:addr + half] = buf[:half]
        else:
            self.data[addr:addr + len(buf)] = buf

    def readblocks(self, block, buf, off=0):
        a = block * BS + off
        buf[:] = self.data[a:a + len(buf)]

    def writeblocks(self, block, buf, off=0):
        self._write(block * BS + off, buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return BS
        if op == 6:  # erase (littlefs)
            self._write(arg * BS, b"\xff" * BS)
            return 0
        return 0


def ids(rec):
    return [r[0] for r in rec["executed"]] if rec else []


def workload_records(n):
    """The successive records the controller would persist: ids pile up, oldest evicted."""
    recs = []
    executed = []
    for i in range(n):
        executed.append(["%032x" % (i + 1), 1700000000000 + i, "in_progress", None])
        executed = executed[-6:]
        recs.append({"executed": [list(r) for r in executed]})
        executed[-1][2] = "succeeded"
        recs.append({"executed": [list(r) for r in executed]})
    return recs


def run(fs_kind, torn):
    if fs_kind == "lfs2":
        cls, nblocks = vfs.VfsLfs2, 48
    else:
        cls, nblocks = vfs.VfsFat, 200
    base = PowerCutDevice(nblocks)
    cls.mkfs(base)
    # a first record saved long ago, so there is a real file to replace
    first = {"executed": [["%032x" % 0, 1, "succeeded", None]]}
    dev = PowerCutDevice(nblocks, base.data)
    vfs.mount(cls(dev), MOUNT)
    Store(MOUNT + "/state.json").save(first)
    vfs.umount(MOUNT)
    image = bytes(dev.data)

    records = workload_records(4)
    expected_states = [first] + records

    def workload(limit):
        d = PowerCutDevice(nblocks, image, limit=limit, torn=torn)
        vfs.mount(cls(d), MOUNT)
        st = Store(MOUNT + "/state.json")
        assert st.load() == first
        done = []  # ops count when each save returned
        try:
            for rec in records:
                st.save(rec)
                done.append(d.ops)
        except OSError:
            # after the cut the filesystem may read back what never got written
            if limit is None or d.ops < limit:
                raise
        vfs.umount(MOUNT)
        return d, done

    full, done_full = workload(None)
    total = full.ops
    assert total == done_full[-1], (total, done_full)
    cuts = 0
    how = {}
    for k in range(total + 1):
        d, done = workload(k)
        # saves that returned before the cut (the run is deterministic up to it)
        # (with a torn write, the K-th write itself did not finish)
        completed = [i for i, ops in enumerate(done_full) if ops <= (k - 1 if torn else k)]
        assert done[:len(completed)] == done_full[:len(completed)]
        # reboot on the image as the cut left it
        img = PowerCutDevice(nblocks, d.data)
        try:
            fs = cls(img)
            vfs.mount(fs, MOUNT)
        except OSError as e:
            raise AssertionError("K=%d: filesystem does not mount after the cut: %r" % (k, e))
        try:
            st = Store(MOUNT + "/state.json")
            got = st.load()
            how[st.recovered] = how.get(st.recovered, 0) + 1
            assert got in expected_states, "K=%d: loaded a record no save wrote: %r" % (k, got)
            at = expected_states.index(got)  # 0 = first, i+1 = records[i]
            if completed:
                last = completed[-1]
                assert at >= last + 1, "K=%d: save %d had returned but load gave state %d" % (k, last, at)
                for cid in ids(records[last]):
                    assert cid in ids(got), "K=%d: lost executed id %s" % (k, cid)
            # the device carries on: the next save works and loads back
            nxt = {"executed": got["executed"] + [["f" * 32, 2, "succeeded", None]]}
            st.save(nxt)
            assert Store(MOUNT + "/state.json").load() == nxt, "K=%d: save after recovery" % k
            names = os.listdir(MOUNT)
            assert "state.json.tmp" not in names, names
        finally:
            vfs.umount(MOUNT)
        cuts += 1
    print("OK %s%s cuts=%d ops=%d loaded-from=%s" % (fs_kind, " torn" if torn else "", cuts, total,
                                                    ",".join("%s:%d" % (k, how[k]) for k in sorted(how))))


run(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "torn")
