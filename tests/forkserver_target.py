"""A fork server's target other than the kernel (tests/test_forkserver.py): says what the forked process sees, then
exits with the status its second argument names."""

import importlib.util
import os
import sys


def main() -> None:
    module, status = sys.argv[1], int(sys.argv[2])
    found = importlib.util.find_spec(module) is not None
    print(os.getpid(), os.getppid(), os.getcwd(), "torch" in sys.modules, found, os.environ.get("SAGECHECK_PROBE"), flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
