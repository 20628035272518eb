"""`python -m ms_xcomposer` is the same as the `ms-xcomposer` command."""
from ms_xcomposer.cli import main

raise SystemExit(main())
