"""``python -m sfbatch``: the same as the ``sfbatch`` command."""

from sfbatch.cli import main

raise SystemExit(main())
