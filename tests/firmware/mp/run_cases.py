"""Run a cases module's CASES under MicroPython: `micropython run_cases.py MODULE`."""
import sys

mod = __import__(sys.argv[1])
failed = 0
for case in mod.CASES:
    try:
        case()
        print("PASS", case.__name__)
    except Exception as e:
        failed += 1
        print("FAIL", case.__name__, repr(e))
        sys.print_exception(e)
print("DONE %d passed, %d failed" % (len(mod.CASES) - failed, failed))
