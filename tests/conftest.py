import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the internet
sys.path.insert(0, str(Path(__file__).parent))
