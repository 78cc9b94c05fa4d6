"""The `simpo` command (and `python -m simpo_cli`, how the launcher starts training processes).

The stop signals are taken before anything else is imported: a scheduler may send SIGUSR1 or
SIGTERM seconds after a job starts, while Python is still loading torch, and Python's default
would end the process at once instead of stopping it well (stops.py).
"""

from simpo_cli import stops

stops.take()

import logging  # noqa: E402

from simpo_cli.cli import main  # noqa: E402  (after the signals are taken)


def _not_cpu_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed, loaded by transformers wherever it is installed, logs "[WARNING] ... Setting
    accelerator to CPU ..." to stdout in every process of a run on a machine without a GPU,
    where the CPU is what the run means: that one line is dropped; its other messages stay."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


logging.getLogger("DeepSpeed").addFilter(_not_cpu_notice)

if __name__ == "__main__":
    main()
