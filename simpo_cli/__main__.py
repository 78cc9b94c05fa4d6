"""The `simpo` command (and `python -m simpo_cli`, how the launcher starts training processes).

The stop signals are taken before anything else is imported: a scheduler may send SIGUSR1 or
SIGTERM seconds after a job starts, while Python is still loading torch, and Python's default
would end the process at once instead of stopping it well (stops.py).
"""

from simpo_cli import stops

stops.take()

from simpo_cli.cli import main  # noqa: E402  (after the signals are taken)

if __name__ == "__main__":
    main()
