"""python -m fracture.export"""

import sys

from fracture.export.export import main

sys.exit(main())
