"""``python -m volunteer``: the ``volunteer`` command without the console script (child processes of the demo
and the benchmark run it this way, with ``sys.executable``)."""

from volunteer.cli import main

if __name__ == "__main__":
    main()
