"""`python -m collective ...`: the same as the `collective` command."""

from collective.cli import main

raise SystemExit(main())
