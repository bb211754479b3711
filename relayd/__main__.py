"""`python -m relayd` runs the command line."""

from relayd.cli import main

raise SystemExit(main())
