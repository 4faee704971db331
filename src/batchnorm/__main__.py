"""``python -m batchnorm``: the ``batchnorm`` command."""

from batchnorm.cli import main

raise SystemExit(main())
