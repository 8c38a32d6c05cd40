"""`python -m adsvc.server [flags]`: run the gRPC server (same as `adsvc serve`)."""

import sys

from adsvc.server.app import main

sys.exit(main())
