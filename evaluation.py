"""Evaluate a DualTowerVLM checkpoint (MMStar by default); the same as `python -m dualtower.evaluate`.

python evaluation.py --model DIR_OR_REPO --tasks mmstar --batch_size 32 --process_with_media
"""

import sys

from dualtower.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
