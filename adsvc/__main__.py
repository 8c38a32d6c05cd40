"""`python -m adsvc ...`: the same as the `adsvc` command."""

from adsvc.cli import main

raise SystemExit(main())
