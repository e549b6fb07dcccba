import sys

from careservice.cli import main

sys.exit(main())
