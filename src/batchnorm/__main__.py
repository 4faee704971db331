"""``python -m batchnorm``: the ``batchnorm`` command."""

from batchnorm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
