import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the internet
sys.path.insert(0, str(Path(__file__).parent))

import tempfile

# Image-folder indexes go to the user's cache directory by default: the tests' to a throwaway one.
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="finetune-test-cache-"))
