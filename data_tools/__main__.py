"""`python -m data_tools ...` is `arcshard-data ...`."""

from data_tools.cli import main

raise SystemExit(main())
